#include "models/flux/ip_adapter.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <regex>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::flux {
namespace {

using Shape = std::vector<int64_t>;

std::string ShapeString(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }
std::string ShapeString(const torch::Tensor& t) { return ShapeString(t.sizes().vec()); }

// diffusers' LayerNorm(C) in ImageProjection: default eps.
constexpr double kProjectionNormEps = 1e-5;

// The two spellings diffusers' load_ip_adapter reads, per tensor role.
constexpr char kXLabsProj[] = "ip_adapter_proj_model.";
constexpr char kDiffusersProj[] = "image_proj.";

struct Found {
  std::string key;
  Shape shape;
};

absl::Status KeyError(absl::string_view key, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("IP-Adapter key '", key, "': ", what));
}

absl::Status ExpectShape(const Found& f, const Shape& expected, absl::string_view why) {
  if (f.shape != expected) {
    return KeyError(f.key, absl::StrCat("expected shape ", ShapeString(expected), " (", why,
                                        "), got ", ShapeString(f.shape)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FluxIPAdapterPlan> PlanFluxIPAdapter(const KeyShapes& keys,
                                                    const FluxConfig& config) {
  RETURN_IF_ERROR(config.Validate());
  // Sort every key into a role: "proj.weight" etc. for the projection, (layer, "k_weight", ...)
  // for the blocks; anything else is unexpected.
  std::map<std::string, Found> proj;                    // "proj.weight" -> key
  std::map<int64_t, std::map<std::string, Found>> lay;  // block -> "k.weight" -> key
  std::set<std::string> formats;
  std::vector<std::string> unexpected;
  static const std::regex kXLabsLayer(
      R"(double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias))");
  static const std::regex kDiffusersLayer(R"(ip_adapter\.(\d+)\.to_([kv])_ip\.(weight|bias))");
  for (const auto& [key, shape] : keys) {
    std::string role;
    std::string format;
    std::smatch m;
    for (const char* prefix : {kXLabsProj, kDiffusersProj}) {
      if (absl::StartsWith(key, prefix)) {
        role = key.substr(std::string(prefix).size());
        format = prefix == kXLabsProj ? kIPAdapterFormatXLabs : kIPAdapterFormatDiffusers;
      }
    }
    if (!role.empty()) {
      if (role != "proj.weight" && role != "proj.bias" && role != "norm.weight" &&
          role != "norm.bias") {
        unexpected.push_back(key);
        continue;
      }
      if (auto it = proj.find(role); it != proj.end()) {
        return KeyError(key,
                        absl::StrCat("the same tensor is also given as '", it->second.key, "'"));
      }
      proj[role] = {key, shape};
      formats.insert(format);
      continue;
    }
    const bool xlabs = std::regex_match(key, m, kXLabsLayer);
    if (xlabs || std::regex_match(key, m, kDiffusersLayer)) {
      const std::string digits = m[1].str();
      if (digits.size() > 9) {
        unexpected.push_back(key);
        continue;
      }
      const int64_t index = std::stoll(digits);
      if (index >= config.num_layers) {
        return KeyError(key, absl::StrCat("block ", index, " does not exist: the transformer has ",
                                          config.num_layers, " double-stream blocks (num_layers)"));
      }
      const std::string r = absl::StrCat(m[2].str(), ".", m[3].str());
      auto& slot = lay[index];
      if (auto it = slot.find(r); it != slot.end()) {
        return KeyError(key,
                        absl::StrCat("the same tensor is also given as '", it->second.key, "'"));
      }
      slot[r] = {key, shape};
      formats.insert(xlabs ? kIPAdapterFormatXLabs : kIPAdapterFormatDiffusers);
      continue;
    }
    unexpected.push_back(key);
  }
  if (!unexpected.empty()) {
    const size_t shown = std::min<size_t>(unexpected.size(), 8);
    return absl::InvalidArgumentError(
        absl::StrCat("IP-Adapter: ", unexpected.size(),
                     " unexpected key(s) (not an XLabs/diffusers Flux "
                     "IP-Adapter tensor): ",
                     absl::StrJoin(unexpected.begin(), unexpected.begin() + shown, ", "),
                     unexpected.size() > shown ? ", ..." : ""));
  }
  if (proj.empty() && lay.empty()) {
    return absl::InvalidArgumentError(
        "IP-Adapter: no IP-Adapter keys (expected "
        "ip_adapter_proj_model.* / image_proj.* and "
        "double_blocks.N.processor.ip_adapter_double_stream_*)");
  }
  FluxIPAdapterPlan plan;
  plan.format = formats.size() == 1 ? *formats.begin() : kIPAdapterFormatXLabs;
  const int64_t c = config.joint_attention_dim;
  const int64_t inner = config.inner_dim();
  plan.cross_attention_dim = c;
  plan.inner_dim = inner;
  for (const char* role : {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}) {
    if (proj.find(role) == proj.end()) {
      return absl::InvalidArgumentError(absl::StrCat("IP-Adapter: missing key '", kXLabsProj, role,
                                                     "' (or '", kDiffusersProj, role, "')"));
    }
  }
  const Found& pw = proj["proj.weight"];
  if (pw.shape.size() != 2 || pw.shape[0] < 1 || pw.shape[1] < 1) {
    return KeyError(pw.key, absl::StrCat("expected a matrix [num_tokens * ", c,
                                         ", image_embed_dim], got ", ShapeString(pw.shape)));
  }
  // The projection emits num_tokens tokens of the transformer's joint_attention_dim (what to_k_ip
  // takes); its row count must be a whole number of such tokens.
  if (pw.shape[0] % c != 0) {
    return KeyError(pw.key, absl::StrCat("expected [num_tokens * ", c,
                                         ", image_embed_dim] (tokens of the "
                                         "transformer's joint_attention_dim ",
                                         c, "), got ", ShapeString(pw.shape), ": ", pw.shape[0],
                                         " rows are not a "
                                         "multiple of ",
                                         c));
  }
  plan.num_tokens = pw.shape[0] / c;
  plan.image_embed_dim = pw.shape[1];
  RETURN_IF_ERROR(ExpectShape(proj["proj.bias"], {pw.shape[0]}, "one per projection row"));
  RETURN_IF_ERROR(ExpectShape(proj["norm.weight"], {c}, "joint_attention_dim"));
  RETURN_IF_ERROR(ExpectShape(proj["norm.bias"], {c}, "joint_attention_dim"));
  plan.proj_weight = pw.key;
  plan.proj_bias = proj["proj.bias"].key;
  plan.norm_weight = proj["norm.weight"].key;
  plan.norm_bias = proj["norm.bias"].key;
  for (int64_t i = 0; i < config.num_layers; ++i) {
    auto& slot = lay[i];
    FluxIPAdapterPlan::Layer l;
    for (const char* kv : {"k", "v"}) {
      for (const char* part : {"weight", "bias"}) {
        const std::string r = absl::StrCat(kv, ".", part);
        auto it = slot.find(r);
        if (it == slot.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "IP-Adapter: missing key 'double_blocks.", i, ".processor.ip_adapter_double_stream_",
              kv, "_proj.", part, "' (or 'ip_adapter.", i, ".to_", kv, "_ip.", part,
              "'): every one of the transformer's ", config.num_layers,
              " double-stream blocks needs its to_k_ip/to_v_ip"));
        }
        const bool weight = std::string(part) == "weight";
        RETURN_IF_ERROR(ExpectShape(
            it->second, weight ? Shape{inner, c} : Shape{inner},
            weight ? absl::StrCat("[inner_dim ", inner, ", joint_attention_dim ", c, "]")
                   : absl::StrCat("inner_dim ", inner)));
        std::string* dst =
            kv[0] == 'k' ? (weight ? &l.k_weight : &l.k_bias) : (weight ? &l.v_weight : &l.v_bias);
        *dst = it->second.key;
      }
    }
    plan.layers.push_back(std::move(l));
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// FluxIPAdapter

absl::StatusOr<FluxIPAdapterPtr> FluxIPAdapter::Load(const std::string& path,
                                                     const FluxConfig& config, torch::Dtype dtype,
                                                     torch::Device device) {
  ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file, SafetensorsFile::Open(path));
  ASSIGN_OR_RETURN(TensorMap tensors, file->GetAll());
  return FromStateDict(tensors, config, dtype, device, path);
}

absl::StatusOr<FluxIPAdapterPtr> FluxIPAdapter::FromStateDict(const TensorMap& state_dict,
                                                              const FluxConfig& config,
                                                              torch::Dtype dtype,
                                                              torch::Device device,
                                                              const std::string& source) {
  if (dtype != torch::kFloat32 && dtype != torch::kBFloat16 && dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": unsupported dtype ", c10::toString(dtype), " (float32, bfloat16 or float16)"));
  }
  KeyShapes shapes;
  for (const auto& [k, t] : state_dict) {
    if (!t.defined())
      return absl::InvalidArgumentError(absl::StrCat(source, ": '", k, "' is undefined"));
    shapes[k] = t.sizes().vec();
  }
  auto plan = PlanFluxIPAdapter(shapes, config);
  if (!plan.ok()) return Annotate(plan.status(), source);
  std::shared_ptr<FluxIPAdapter> adapter(new FluxIPAdapter());
  adapter->plan_ = *std::move(plan);
  adapter->dtype_ = dtype;
  adapter->device_ = device;
  auto take = [&](const std::string& key, torch::Tensor* out) -> absl::Status {
    const torch::Tensor& t = state_dict.at(key);
    if (!t.is_floating_point()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": IP-Adapter key '", key,
                                                     "': expected a floating tensor, got ",
                                                     c10::toString(t.scalar_type())));
    }
    ASSIGN_OR_RETURN(bool finite, TorchCall("IP-Adapter",
                                            [&] { return torch::isfinite(t).all().item<bool>(); }));
    if (!finite) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": IP-Adapter key '", key, "' has NaN or infinite values"));
    }
    ASSIGN_OR_RETURN(*out, TorchCall("IP-Adapter", [&] {
      return t.to(device, dtype, /*non_blocking=*/false, /*copy=*/true).contiguous();
    }));
    return absl::OkStatus();
  };
  const FluxIPAdapterPlan& p = adapter->plan_;
  RETURN_IF_ERROR(take(p.proj_weight, &adapter->proj_weight_));
  RETURN_IF_ERROR(take(p.proj_bias, &adapter->proj_bias_));
  RETURN_IF_ERROR(take(p.norm_weight, &adapter->norm_weight_));
  RETURN_IF_ERROR(take(p.norm_bias, &adapter->norm_bias_));
  for (const FluxIPAdapterPlan::Layer& l : p.layers) {
    Layer out;
    RETURN_IF_ERROR(take(l.k_weight, &out.k_weight));
    RETURN_IF_ERROR(take(l.k_bias, &out.k_bias));
    RETURN_IF_ERROR(take(l.v_weight, &out.v_weight));
    RETURN_IF_ERROR(take(l.v_bias, &out.v_bias));
    adapter->layers_.push_back(std::move(out));
  }
  return FluxIPAdapterPtr(std::move(adapter));
}

int64_t FluxIPAdapter::memory_bytes() const {
  int64_t n = 0;
  for (const auto& [k, t] : DiffusersStateDict()) n += t.numel() * t.element_size();
  return n;
}

TensorMap FluxIPAdapter::DiffusersStateDict() const {
  TensorMap out = {{"image_proj.proj.weight", proj_weight_},
                   {"image_proj.proj.bias", proj_bias_},
                   {"image_proj.norm.weight", norm_weight_},
                   {"image_proj.norm.bias", norm_bias_}};
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string p = absl::StrCat("ip_adapter.", i, ".");
    out[p + "to_k_ip.weight"] = layers_[i].k_weight;
    out[p + "to_k_ip.bias"] = layers_[i].k_bias;
    out[p + "to_v_ip.weight"] = layers_[i].v_weight;
    out[p + "to_v_ip.bias"] = layers_[i].v_bias;
  }
  return out;
}

namespace {

// [B, N_img, E] (2-D [B, E] = one image) -> [B, N_img, E].
absl::StatusOr<torch::Tensor> EmbedsAs3d(const torch::Tensor& e, int64_t embed_dim,
                                         absl::string_view what) {
  if (!e.defined()) return absl::InvalidArgumentError(absl::StrCat(what, ": undefined tensor"));
  if (!e.is_floating_point()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected a floating tensor, got ", c10::toString(e.scalar_type())));
  }
  const bool ok = (e.dim() == 2 || e.dim() == 3) && e.size(0) >= 1 && e.size(-1) == embed_dim &&
                  (e.dim() == 2 || e.size(1) >= 1);
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected [batch, num_images, ", embed_dim, "] or [batch, ", embed_dim,
                     "] (the image encoder's image_embeds; this adapter takes width ", embed_dim,
                     "), got ", ShapeString(e)));
  }
  return e.dim() == 2 ? e.unsqueeze(1) : e;
}

// ImageProjection on [B, N, E] in `compute` (rounded through `round_to` when set).
torch::Tensor Project(const FluxIPAdapter& a, const torch::Tensor& embeds3,
                      torch::ScalarType compute, std::optional<torch::ScalarType> round_to,
                      torch::Device device) {
  auto r = [&](torch::Tensor t) {
    if (round_to.has_value()) t = t.to(*round_to).to(compute);
    return t;
  };
  const int64_t b = embeds3.size(0), n = embeds3.size(1);
  // diffusers: image_embeds.to(weight dtype) before the linear.
  const torch::Tensor x = r(embeds3.to(device, round_to.value_or(compute)).to(compute))
                              .reshape({b * n, embeds3.size(2)});
  torch::Tensor y =
      r(torch::linear(x, a.proj_weight().to(device, compute), a.proj_bias().to(device, compute)));
  y = y.reshape({b * n, a.num_tokens(), a.cross_attention_dim()});
  y = r(torch::layer_norm(y, {a.cross_attention_dim()}, a.norm_weight().to(device, compute),
                          a.norm_bias().to(device, compute), kProjectionNormEps));
  return y.reshape({b, n, a.num_tokens(), a.cross_attention_dim()});
}

}  // namespace

absl::StatusOr<torch::Tensor> FluxIPAdapter::ProjectImageEmbeds(
    const torch::Tensor& image_embeds) const {
  ASSIGN_OR_RETURN(torch::Tensor e, EmbedsAs3d(image_embeds, image_embed_dim(), "image_embeds"));
  return TorchCall("IP-Adapter image projection", [&] {
    c10::InferenceMode inference;
    const bool emulate = device_.is_cpu() && dtype_ != torch::kFloat32;
    torch::Tensor y =
        Project(*this, e, emulate ? torch::kFloat : dtype_,
                emulate ? std::optional<torch::ScalarType>(dtype_) : std::nullopt, device_);
    return y.to(dtype_);
  });
}

// ---------------------------------------------------------------------------------------------
// Conditioning

bool FluxIPAdapterConditioning::active() const {
  for (const FluxIPAdapterInput& in : adapters) {
    for (double s : in.scales) {
      if (s != 0.0) return true;
    }
  }
  return false;
}

absl::Status ValidateIPAdapterConditioning(const FluxIPAdapterConditioning& conditioning,
                                           const FluxConfig& config, int64_t batch) {
  for (size_t i = 0; i < conditioning.adapters.size(); ++i) {
    const FluxIPAdapterInput& in = conditioning.adapters[i];
    const std::string what = absl::StrCat("ip_adapter[", i, "]");
    if (in.adapter == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": no adapter"));
    }
    const FluxIPAdapter& a = *in.adapter;
    if (a.num_layers() != config.num_layers || a.inner_dim() != config.inner_dim() ||
        a.cross_attention_dim() != config.joint_attention_dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": the adapter was built for another transformer (", a.num_layers(),
                       " double blocks, inner_dim ", a.inner_dim(), ", joint_attention_dim ",
                       a.cross_attention_dim(), "; this one has ", config.num_layers, ", ",
                       config.inner_dim(), ", ", config.joint_attention_dim, ")"));
    }
    ASSIGN_OR_RETURN(torch::Tensor e,
                     EmbedsAs3d(in.image_embeds, a.image_embed_dim(), what + ".image_embeds"));
    if (e.size(0) != 1 && e.size(0) != batch) {
      return absl::InvalidArgumentError(absl::StrCat(what, ".image_embeds: batch size ", e.size(0),
                                                     " does not match the forward's batch size ",
                                                     batch, " (must be equal or 1)"));
    }
    if (in.scales.size() != 1 && static_cast<int64_t>(in.scales.size()) != config.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ".scales: expected 1 scale or one per double-stream block (",
                       config.num_layers, "), got ", in.scales.size()));
    }
    for (size_t j = 0; j < in.scales.size(); ++j) {
      if (!std::isfinite(in.scales[j])) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ".scales[", j, "]: must be finite, got ", in.scales[j]));
      }
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// FluxIPAdapterRun

torch::Tensor FluxIPAdapterRun::R(torch::Tensor t) const {
  if (round_to_.has_value()) t = t.to(*round_to_).to(t.scalar_type());
  return t;
}

FluxIPAdapterRun::FluxIPAdapterRun(const FluxIPAdapterConditioning& conditioning, int64_t batch,
                                   int64_t heads, torch::ScalarType compute,
                                   std::optional<torch::ScalarType> round_to, torch::Device device)
    : round_to_(round_to) {
  int64_t num_layers = 0;
  for (const FluxIPAdapterInput& in : conditioning.adapters) {
    num_layers = std::max(num_layers, in.adapter->num_layers());
  }
  layers_.resize(static_cast<size_t>(num_layers));
  for (const FluxIPAdapterInput& in : conditioning.adapters) {
    const FluxIPAdapter& a = *in.adapter;
    torch::Tensor e = in.image_embeds.dim() == 2 ? in.image_embeds.unsqueeze(1) : in.image_embeds;
    const torch::Tensor ip = Project(a, e, compute, round_to, device);
    projected_.push_back(ip);
    // The image tokens of all images of the adapter: [B', N_img·num_tokens, C].
    torch::Tensor tokens = ip.reshape({ip.size(0), -1, ip.size(3)});
    if (tokens.size(0) != batch) tokens = tokens.expand({batch, -1, -1});
    for (int64_t i = 0; i < a.num_layers(); ++i) {
      const double scale = in.scale(i);
      if (scale == 0.0) continue;  // diffusers adds 0·x: the output is unchanged
      const FluxIPAdapter::Layer& l = a.layer(i);
      auto kv = [&](const torch::Tensor& w, const torch::Tensor& b) {
        const torch::Tensor y =
            R(torch::linear(tokens, w.to(device, compute), b.to(device, compute)));
        return y.view({batch, y.size(1), heads, y.size(2) / heads});
      };
      layers_[static_cast<size_t>(i)].push_back(
          KV{kv(l.k_weight, l.k_bias), kv(l.v_weight, l.v_bias), scale});
    }
  }
}

bool FluxIPAdapterRun::active(int64_t layer) const {
  return layer < static_cast<int64_t>(layers_.size()) &&
         !layers_[static_cast<size_t>(layer)].empty();
}

torch::Tensor FluxIPAdapterRun::AttentionOutput(int64_t layer,
                                                const torch::Tensor& ip_query) const {
  const int64_t b = ip_query.size(0), s = ip_query.size(1), h = ip_query.size(2),
                d = ip_query.size(3);
  const double softmax_scale = 1.0 / std::sqrt(static_cast<double>(d));
  const torch::Tensor q = ip_query.transpose(1, 2);  // [B, H, S, d]
  torch::Tensor total;
  for (const KV& kv : layers_[static_cast<size_t>(layer)]) {
    const torch::Tensor k = kv.k.transpose(1, 2), v = kv.v.transpose(1, 2);  // [B, H, T, d]
    const torch::Tensor scores = R(torch::matmul(q, k.transpose(-1, -2)).mul_(softmax_scale));
    const torch::Tensor probs = R(torch::softmax(scores, -1));
    const torch::Tensor o = R(torch::matmul(probs, v)).transpose(1, 2).reshape({b, s, h * d});
    // ip_attn_output (zeros) += scale · o, in the activations' dtype.
    const torch::Tensor term = R(o * kv.scale);
    total = total.defined() ? R(total + term) : term;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Handler

namespace {

class Handler final : public ds::IPAdapterHandler {
 public:
  std::vector<std::string> FormatNames() const override {
    return {kIPAdapterFormatDiffusers, kIPAdapterFormatXLabs};
  }
  absl::StatusOr<ds::IPAdapterSummary> Inspect(const KeyShapes& keys,
                                               const nlohmann::json& model_config) const override {
    ASSIGN_OR_RETURN(FluxConfig config, FluxConfig::FromJson(model_config));
    ASSIGN_OR_RETURN(FluxIPAdapterPlan plan, PlanFluxIPAdapter(keys, config));
    return ds::IPAdapterSummary{plan.format, plan.num_tokens, plan.image_embed_dim,
                                static_cast<int64_t>(plan.layers.size())};
  }
};

}  // namespace

const ds::IPAdapterHandler& FluxIPAdapterHandler() {
  static const Handler* const kHandler = new Handler();
  return *kHandler;
}

}  // namespace ds::flux
