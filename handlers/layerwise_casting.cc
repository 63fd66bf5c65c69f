#include "handlers/layerwise_casting.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <regex>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds {
namespace {

// diffusers' _GO_LC_SUPPORTED_PYTORCH_LAYERS, by class name.
constexpr const char* kCastableClasses[] = {
    "Linear",          "Conv1d",          "Conv2d",          "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding",
};

absl::StatusOr<std::vector<std::regex>> Compile(const std::vector<std::string>& patterns) {
  std::vector<std::regex> out;
  out.reserve(patterns.size());
  for (const std::string& p : patterns) {
    try {
      out.emplace_back(p, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(
          absl::StrCat("layerwise casting skip pattern '", p,
                       "' is not a valid regular expression: ", e.what()));
    }
  }
  return out;
}

// Whether any pattern matches `name` or one of its dotted ancestors ("a", "a.b", "a.b.c").
bool Skipped(const std::string& name, const std::vector<std::regex>& patterns) {
  for (size_t end = name.find('.');; end = name.find('.', end + 1)) {
    const std::string prefix = end == std::string::npos ? name : name.substr(0, end);
    for (const std::regex& re : patterns) {
      if (std::regex_search(prefix, re)) return true;
    }
    if (end == std::string::npos) return false;
  }
}

}  // namespace

const std::vector<std::string>& DefaultLayerwiseCastingSkipPatterns() {
  static const auto* const kPatterns =
      new std::vector<std::string>{"pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"};
  return *kPatterns;
}

std::vector<std::string> LayerwiseCastingSkipPatterns(
    const ModelOptions& options, const std::vector<std::string>& model_patterns,
    const std::vector<std::string>& keep_in_fp32_modules) {
  if (options.layerwise_casting_skip_patterns.has_value()) {
    return *options.layerwise_casting_skip_patterns;
  }
  std::vector<std::string> out;
  for (const auto* list :
       {&DefaultLayerwiseCastingSkipPatterns(), &keep_in_fp32_modules, &model_patterns}) {
    for (const std::string& p : *list) {
      if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
    }
  }
  return out;
}

bool IsLayerwiseCastableClass(absl::string_view class_name) {
  absl::string_view name = class_name;
  if (auto pos = name.rfind("::"); pos != absl::string_view::npos) name.remove_prefix(pos + 2);
  constexpr absl::string_view kImpl = "Impl";
  if (name.size() > kImpl.size() && name.substr(name.size() - kImpl.size()) == kImpl) {
    name.remove_suffix(kImpl.size());
  }
  for (const char* c : kCastableClasses) {
    if (name == c) return true;
  }
  return false;
}

std::optional<Float8Format> ParseFloat8Format(absl::string_view name) {
  if (name == "float8_e4m3fn" || name == "fp8") return Float8Format::kE4M3FN;
  if (name == "float8_e5m2") return Float8Format::kE5M2;
  return std::nullopt;
}

absl::StatusOr<std::optional<torch::Dtype>> ParseStorageDtype(absl::string_view name) {
  if (name.empty()) return std::optional<torch::Dtype>();
  if (name == "bfloat16" || name == "bf16") return std::optional<torch::Dtype>(torch::kBFloat16);
  if (name == "float16" || name == "fp16" || name == "half") {
    return std::optional<torch::Dtype>(torch::kFloat16);
  }
  if (ParseFloat8Format(name).has_value()) return std::optional<torch::Dtype>(torch::kByte);
  return absl::InvalidArgumentError(
      absl::StrCat("storage dtype '", name,
                   "' is not one of bfloat16, float16, float8_e4m3fn, float8_e5m2 (or empty for "
                   "none)"));
}

absl::Status SetStorageDtype(absl::string_view name, ModelOptions& options) {
  ASSIGN_OR_RETURN(std::optional<torch::Dtype> dtype, ParseStorageDtype(name));
  options.storage_dtype = dtype;
  if (std::optional<Float8Format> f = ParseFloat8Format(name)) options.float8_format = *f;
  return absl::OkStatus();
}

std::string StorageDtypeName(const std::optional<torch::Dtype>& dtype) {
  if (!dtype.has_value()) return "";
  switch (*dtype) {
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    case torch::kFloat32:
      return "float32";
    case torch::kByte:
      return "uint8";
    default:
      return c10::toString(*dtype);
  }
}

std::string StorageDtypeName(const ModelOptions& options) {
  if (options.storage_dtype == torch::kByte) return Float8FormatName(options.float8_format);
  return StorageDtypeName(options.storage_dtype);
}

absl::Status ValidateStorageDtype(const ModelOptions& options) {
  if (!options.storage_dtype.has_value()) return absl::OkStatus();
  const torch::Dtype storage = *options.storage_dtype;
  if (storage != torch::kBFloat16 && storage != torch::kFloat16 && storage != torch::kByte) {
    return absl::InvalidArgumentError(
        absl::StrCat("storage dtype ", c10::toString(storage),
                     " is not offered (bfloat16, float16, or uint8 for 8-bit floats)"));
  }
  if (c10::elementSize(storage) >= c10::elementSize(options.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("storage dtype ", StorageDtypeName(storage),
                     " is not lower than the compute dtype ", c10::toString(options.dtype),
                     " (layerwise casting stores weights narrower than they are computed in; "
                     "use compute dtype float32)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSkipPatterns(const std::vector<std::string>& patterns) {
  return Compile(patterns).status();
}

absl::StatusOr<std::vector<std::string>> LayerwiseCastParameterNames(
    const torch::nn::Module& module, const std::vector<std::string>& patterns) {
  ASSIGN_OR_RETURN(std::vector<std::regex> res, Compile(patterns));
  std::vector<std::string> out;
  for (const auto& item : module.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    const torch::nn::Module& m = *item.value();
    if (!IsLayerwiseCastableClass(m.name()) || Skipped(item.key(), res)) continue;
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      out.push_back(absl::StrCat(item.key(), ".", p.key()));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

namespace {

// 8-bit storage: quantizes the selected parameters of rank >= 2 and registers their scales.
absl::StatusOr<std::vector<std::string>> ApplyFloat8Storage(torch::nn::Module& module,
                                                            const std::vector<std::string>& names,
                                                            bool uninitialized,
                                                            Float8Format format) {
  std::vector<std::string> converted;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    modules.emplace(item.key(), item.value());
  }
  for (const std::string& name : names) {
    const size_t dot = name.rfind('.');
    const std::string owner = name.substr(0, dot), pname = name.substr(dot + 1);
    auto found = modules.find(owner);
    if (found == modules.end()) return absl::InternalError(absl::StrCat("no module '", owner, "'"));
    const std::shared_ptr<torch::nn::Module>& m = found->second;
    const auto own = m->named_parameters(/*recurse=*/false);
    const torch::Tensor* found_p = own.find(pname);
    if (found_p == nullptr || found_p->dim() < 2) continue;
    torch::Tensor param = *found_p;  // shares the module's tensor
    torch::Tensor* p = &param;
    Float8Tensor q;
    if (uninitialized) {
      ASSIGN_OR_RETURN(q.codes, TorchCall("8-bit storage", [&] {
                         return torch::empty(p->sizes(), p->options().dtype(torch::kByte));
                       }));
      q.scale = torch::empty({p->size(0)}, p->options().dtype(torch::kFloat));
    } else {
      ASSIGN_OR_RETURN(q, QuantizeFloat8(p->detach(), format, name));
    }
    RETURN_IF_ERROR(TorchCallVoid("8-bit storage", [&] {
      torch::NoGradGuard no_grad;
      p->set_requires_grad(false);  // integer codes cannot require gradients
      p->set_data(q.codes);
      m->register_buffer(Float8ScaleName(pname), q.scale);
    }));
    converted.push_back(name);
  }
  return converted;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ApplyLayerwiseCasting(
    torch::nn::Module& module, torch::Dtype storage, const std::vector<std::string>& patterns,
    bool uninitialized, Float8Format float8_format) {
  if (!c10::isFloatingType(storage) && storage != torch::kByte) {
    return absl::InvalidArgumentError(
        absl::StrCat("storage dtype ", c10::toString(storage),
                     " is not a floating-point type (nor uint8 for 8-bit floats)"));
  }
  ASSIGN_OR_RETURN(std::vector<std::string> names, LayerwiseCastParameterNames(module, patterns));
  if (storage == torch::kByte) {
    return ApplyFloat8Storage(module, names, uninitialized, float8_format);
  }
  TensorMap params;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    params.emplace(item.key(), item.value());
  }
  RETURN_IF_ERROR(TorchCallVoid("layerwise casting", [&] {
    torch::NoGradGuard no_grad;
    for (const std::string& name : names) {
      torch::Tensor& p = params.at(name);
      if (p.scalar_type() == storage) continue;
      p.set_data(uninitialized ? torch::empty(p.sizes(), p.options().dtype(storage))
                               : p.detach().to(storage));
    }
  }));
  return names;
}

// ---------------------------------------------------------------------------------------------
// 8-bit floats

namespace {

// The layout of a format: exponent bits, mantissa bits, bias; E4M3FN has no infinities and only
// the all-ones code as NaN, E5M2 follows IEEE 754 (all-ones exponent = Inf/NaN).
struct Float8Layout {
  int exponent_bits;
  int mantissa_bits;
  int bias;
  bool ieee_specials;
};

Float8Layout LayoutOf(Float8Format format) {
  return format == Float8Format::kE4M3FN ? Float8Layout{4, 3, 7, false}
                                         : Float8Layout{5, 2, 15, true};
}

std::array<float, 256> BuildTable(Float8Format format) {
  const Float8Layout l = LayoutOf(format);
  std::array<float, 256> table{};
  const int max_exponent = (1 << l.exponent_bits) - 1;
  for (int code = 0; code < 256; ++code) {
    const int magnitude = code & 0x7f;
    const int e = magnitude >> l.mantissa_bits;
    const int m = magnitude & ((1 << l.mantissa_bits) - 1);
    float v;
    if (!l.ieee_specials && magnitude == 0x7f) {
      v = std::numeric_limits<float>::quiet_NaN();
    } else if (l.ieee_specials && e == max_exponent) {
      v = m == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
    } else if (e == 0) {  // subnormal: m · 2^(1 - bias - M)
      v = std::ldexp(static_cast<float>(m), 1 - l.bias - l.mantissa_bits);
    } else {  // (2^M + m) · 2^(e - bias - M)
      v = std::ldexp(static_cast<float>((1 << l.mantissa_bits) + m), e - l.bias - l.mantissa_bits);
    }
    table[code] = (code & 0x80) != 0 ? -v : v;
  }
  return table;
}

// The code of the largest finite value (0x7e for E4M3FN, 0x7b for E5M2).
uint8_t MaxCode(Float8Format format) { return format == Float8Format::kE4M3FN ? 0x7e : 0x7b; }

}  // namespace

const char* Float8FormatName(Float8Format format) {
  return format == Float8Format::kE4M3FN ? "float8_e4m3fn" : "float8_e5m2";
}

float Float8Max(Float8Format format) { return Float8Table(format)[MaxCode(format)]; }

const std::array<float, 256>& Float8Table(Float8Format format) {
  static const std::array<float, 256> kE4M3 = BuildTable(Float8Format::kE4M3FN);
  static const std::array<float, 256> kE5M2 = BuildTable(Float8Format::kE5M2);
  return format == Float8Format::kE4M3FN ? kE4M3 : kE5M2;
}

uint8_t EncodeFloat8(float x, Float8Format format) {
  const Float8Layout l = LayoutOf(format);
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  if (std::isnan(x)) return sign | 0x7f;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  float a;
  std::memcpy(&a, &abs_bits, sizeof(a));
  const uint8_t max_code = MaxCode(format);
  if (a >= Float8Max(format)) return sign | max_code;  // saturate (also infinities)
  const int min_normal_exponent = 1 - l.bias;
  if (a < std::ldexp(1.0f, min_normal_exponent)) {
    // Subnormal range: a multiple of the quantum 2^(1 - bias - M). The scaling by a power of two
    // is exact; nearbyint rounds half to even in the default rounding mode. A result of 2^M is
    // the smallest normal, whose code is the same integer.
    const float m = std::nearbyint(std::ldexp(a, l.bias - 1 + l.mantissa_bits));
    return sign | static_cast<uint8_t>(m);
  }
  // Normal: round float32's 23-bit mantissa to M bits, ties to even, on the bit pattern (a carry
  // into the exponent is the correct next binade), then rebias the exponent from 127 to `bias`.
  const int drop = 23 - l.mantissa_bits;
  uint32_t r = abs_bits + ((1u << (drop - 1)) - 1) + ((abs_bits >> drop) & 1u);
  r >>= drop;
  r -= static_cast<uint32_t>(127 - l.bias) << l.mantissa_bits;
  // Values just below max never round past it (max is representable), but guard anyway.
  return sign | static_cast<uint8_t>(std::min<uint32_t>(r, max_code));
}

absl::StatusOr<Float8Tensor> QuantizeFloat8(const torch::Tensor& values, Float8Format format,
                                            absl::string_view what) {
  if (!values.defined() || !values.is_floating_point()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": 8-bit float storage needs a floating-point tensor, got ",
                     values.defined() ? c10::toString(values.scalar_type()) : "undefined"));
  }
  if (values.dim() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": 8-bit float storage needs a tensor of rank >= 1"));
  }
  Float8Tensor out;
  bool finite = true;
  RETURN_IF_ERROR(TorchCallVoid(absl::StrCat("quantizing ", what), [&] {
    torch::NoGradGuard no_grad;
    const int64_t rows = values.size(0);
    const int64_t cols = rows == 0 ? 0 : values.numel() / rows;
    const torch::Tensor v = values.to(torch::kCPU, torch::kFloat).contiguous().view({rows, cols});
    torch::Tensor codes = torch::empty({rows, cols}, torch::kByte);
    torch::Tensor scale = torch::empty({rows}, torch::kFloat);
    const float* src = v.data_ptr<float>();
    uint8_t* dst = codes.data_ptr<uint8_t>();
    float* sc = scale.data_ptr<float>();
    const float fmax = Float8Max(format);
    std::atomic<bool> all_finite{true};
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const float* row = src + r * cols;
                         float amax = 0;
                         for (int64_t j = 0; j < cols; ++j) {
                           const float a = std::fabs(row[j]);
                           if (!std::isfinite(a)) all_finite = false;
                           amax = std::max(amax, a);
                         }
                         const float s = amax > 0 && std::isfinite(amax) ? amax / fmax : 1.0f;
                         sc[r] = s;
                         uint8_t* out = dst + r * cols;
                         for (int64_t j = 0; j < cols; ++j)
                           out[j] = EncodeFloat8(row[j] / s, format);
                       }
                     });
    finite = all_finite;
    out.codes = codes.view(values.sizes()).to(values.device());
    out.scale = scale.to(values.device());
  }));
  if (!finite) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": has NaN or Inf values, which 8-bit float storage cannot scale"));
  }
  return out;
}

torch::Tensor DequantizeFloat8(const torch::Tensor& codes, const torch::Tensor& scale,
                               Float8Format format, torch::Dtype dtype) {
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.dim() >= 1,
              "DequantizeFloat8: codes must be uint8 of rank >= 1");
  const int64_t rows = codes.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows && scale.scalar_type() == torch::kFloat,
              "DequantizeFloat8: scale must be float32 [", rows, "]");
  const int64_t cols = rows == 0 ? 0 : codes.numel() / rows;
  const std::array<float, 256>& table = Float8Table(format);
  torch::Tensor out;
  if (codes.is_cpu()) {
    const torch::Tensor c = codes.contiguous();
    const torch::Tensor s = scale.to(torch::kCPU).contiguous();
    out = torch::empty(codes.sizes(), codes.options().dtype(torch::kFloat));
    const uint8_t* src = c.data_ptr<uint8_t>();
    const float* sc = s.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const float* lut = table.data();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const float f = sc[r];
                         const uint8_t* in = src + r * cols;
                         float* o = dst + r * cols;
                         for (int64_t j = 0; j < cols; ++j) o[j] = lut[in[j]] * f;
                       }
                     });
  } else {
    const torch::Tensor lut =
        torch::from_blob(const_cast<float*>(table.data()), {256}, torch::kFloat).to(codes.device());
    out = lut.index_select(0, codes.reshape({-1}).to(torch::kInt))
              .view({rows, cols})
              .mul_(scale.to(codes.device()).unsqueeze(1))
              .view(codes.sizes());
  }
  return dtype == torch::kFloat ? out : out.to(dtype);
}

std::string Float8ScaleName(const std::string& parameter) { return parameter + "_scale"; }

std::map<std::string, std::string> Float8StoredParameters(const torch::nn::Module& module) {
  std::map<std::string, std::string> out;
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    const torch::nn::Module& m = *item.value();
    const auto buffers = m.named_buffers(/*recurse=*/false);
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      if (p.value().scalar_type() != torch::kByte) continue;
      const std::string scale = Float8ScaleName(p.key());
      if (buffers.find(scale) == nullptr) continue;
      const std::string prefix = item.key().empty() ? "" : item.key() + ".";
      out.emplace(prefix + p.key(), prefix + scale);
    }
  }
  return out;
}

absl::StatusOr<TensorMap> ToStorageForm(const torch::nn::Module& module, TensorMap state_dict,
                                        Float8Format float8_format) {
  const std::map<std::string, std::string> stored = Float8StoredParameters(module);
  for (const auto& [param, scale] : stored) {
    auto it = state_dict.find(param);
    if (it == state_dict.end() || !it->second.defined()) continue;  // the strict load reports it
    const torch::Tensor& t = it->second;
    if (t.scalar_type() == torch::kByte) {
      if (state_dict.count(scale) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("'", param, "' holds uint8 8-bit float codes but the state dict has no '",
                         scale, "' (the scales of an 8-bit state dict)"));
      }
      continue;
    }
    if (!t.is_floating_point()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", param, "': ", c10::toString(t.scalar_type()),
                       " cannot be stored as 8-bit floats (expected a floating-point tensor)"));
    }
    ASSIGN_OR_RETURN(Float8Tensor q,
                     QuantizeFloat8(t, float8_format, absl::StrCat("'", param, "'")));
    it->second = std::move(q.codes);
    state_dict[scale] = std::move(q.scale);
  }
  return state_dict;
}

int64_t ParameterBytes(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& [name, t] : NamedTensors(module)) {
    total += static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
  }
  return total;
}

}  // namespace ds
