#include "handlers/layerwise_casting.h"

#include <torch/torch.h>

#include <algorithm>
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
    "Linear",          "Conv1d",          "Conv2d",          "Conv3d", "ConvTranspose1d",
    "ConvTranspose2d", "ConvTranspose3d", "Embedding",
};

absl::StatusOr<std::vector<std::regex>> Compile(const std::vector<std::string>& patterns) {
  std::vector<std::regex> out;
  out.reserve(patterns.size());
  for (const std::string& p : patterns) {
    try {
      out.emplace_back(p, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "layerwise casting skip pattern '", p, "' is not a valid regular expression: ", e.what()));
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
  static const auto* const kPatterns = new std::vector<std::string>{
      "pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"};
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

absl::StatusOr<std::optional<torch::Dtype>> ParseStorageDtype(absl::string_view name) {
  if (name.empty()) return std::optional<torch::Dtype>();
  if (name == "bfloat16" || name == "bf16") return std::optional<torch::Dtype>(torch::kBFloat16);
  if (name == "float16" || name == "fp16" || name == "half") {
    return std::optional<torch::Dtype>(torch::kFloat16);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("storage dtype '", name,
                   "' is not one of bfloat16, float16 (or empty for none; 8-bit float storage "
                   "is not offered)"));
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
    default:
      return c10::toString(*dtype);
  }
}

absl::Status ValidateStorageDtype(const ModelOptions& options) {
  if (!options.storage_dtype.has_value()) return absl::OkStatus();
  const torch::Dtype storage = *options.storage_dtype;
  if (storage != torch::kBFloat16 && storage != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat("storage dtype ", c10::toString(storage),
                                                   " is not offered (bfloat16 or float16)"));
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

absl::StatusOr<std::vector<std::string>> ApplyLayerwiseCasting(
    torch::nn::Module& module, torch::Dtype storage, const std::vector<std::string>& patterns,
    bool uninitialized) {
  if (!c10::isFloatingType(storage)) {
    return absl::InvalidArgumentError(absl::StrCat("storage dtype ", c10::toString(storage),
                                                   " is not a floating-point type"));
  }
  ASSIGN_OR_RETURN(std::vector<std::string> names, LayerwiseCastParameterNames(module, patterns));
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

int64_t ParameterBytes(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& [name, t] : NamedTensors(module)) {
    total += static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
  }
  return total;
}

}  // namespace ds
