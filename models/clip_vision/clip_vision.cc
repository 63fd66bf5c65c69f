#include "models/clip_vision/clip_vision.h"

#include <torch/torch.h>

#include <cmath>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds::clip_vision {

// ---------------------------------------------------------------------------------------------
// Modules

namespace {

torch::Tensor Param(torch::nn::Module& m, const char* name, at::IntArrayRef shape,
                    const torch::TensorOptions& options, double value = 0.0) {
  return m.register_parameter(name, ds::NewParameter(shape, options, value),
                              /*requires_grad=*/false);
}

}  // namespace

LinearImpl::LinearImpl(int64_t in, int64_t out, bool with_bias, const torch::TensorOptions& o) {
  weight = Param(*this, "weight", {out, in}, o);
  if (with_bias) bias = Param(*this, "bias", {out}, o);
}

LayerNormImpl::LayerNormImpl(int64_t dim, double eps_value, const torch::TensorOptions& o)
    : eps(eps_value) {
  weight = Param(*this, "weight", {dim}, o, 1.0);
  bias = Param(*this, "bias", {dim}, o);
}

WeightImpl::WeightImpl(at::IntArrayRef shape, const torch::TensorOptions& o) {
  weight = Param(*this, "weight", shape, o);
}

EmbeddingsImpl::EmbeddingsImpl(const ClipVisionConfig& c, const torch::TensorOptions& o) {
  const int64_t d = c.hidden_size;
  class_embedding = Param(*this, "class_embedding", {d}, o);
  patch_embedding = register_module(
      "patch_embedding",
      Weight(std::vector<int64_t>{d, c.num_channels, c.patch_size, c.patch_size}, o));
  position_embedding =
      register_module("position_embedding", Weight(std::vector<int64_t>{c.num_positions(), d}, o));
}

AttentionImpl::AttentionImpl(const ClipVisionConfig& c, const torch::TensorOptions& o)
    : heads(c.num_attention_heads) {
  const int64_t d = c.hidden_size;
  k_proj = register_module("k_proj", Linear(d, d, true, o));
  v_proj = register_module("v_proj", Linear(d, d, true, o));
  q_proj = register_module("q_proj", Linear(d, d, true, o));
  out_proj = register_module("out_proj", Linear(d, d, true, o));
}

MlpImpl::MlpImpl(const ClipVisionConfig& c, const torch::TensorOptions& o) {
  fc1 = register_module("fc1", Linear(c.hidden_size, c.intermediate_size, true, o));
  fc2 = register_module("fc2", Linear(c.intermediate_size, c.hidden_size, true, o));
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const ClipVisionConfig& c,
                                           const torch::TensorOptions& o) {
  self_attn = register_module("self_attn", Attention(c, o));
  layer_norm1 = register_module("layer_norm1", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
  mlp = register_module("mlp", Mlp(c, o));
  layer_norm2 = register_module("layer_norm2", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

EncoderImpl::EncoderImpl(const ClipVisionConfig& c, const torch::TensorOptions& o) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.emplace_back(c, o);
    layers->push_back(layer_list.back());
  }
}

VisionTransformerImpl::VisionTransformerImpl(const ClipVisionConfig& c,
                                             const torch::TensorOptions& o) {
  embeddings = register_module("embeddings", Embeddings(c, o));
  pre_layrnorm = register_module("pre_layrnorm", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
  encoder = register_module("encoder", Encoder(c, o));
  post_layernorm = register_module("post_layernorm", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

ClipVisionModelWithProjectionImpl::ClipVisionModelWithProjectionImpl(const ClipVisionOptions& o)
    : options_(o) {
  const absl::Status valid = o.config.Validate();
  TORCH_CHECK(valid.ok(), std::string(valid.message()));
  TORCH_CHECK(
      o.dtype == torch::kFloat32 || o.dtype == torch::kBFloat16 || o.dtype == torch::kFloat16,
      "CLIPVisionModelWithProjection: unsupported dtype ", o.dtype);
  const auto to = torch::TensorOptions().dtype(o.dtype).device(o.device);
  vision_model = register_module("vision_model", VisionTransformer(o.config, to));
  visual_projection = register_module(
      "visual_projection", Linear(o.config.hidden_size, o.config.projection_dim, false, to));
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

using torch::Tensor;

struct Ctx {
  torch::ScalarType dtype;  // the model dtype
  bool emulate;             // float32 arithmetic rounded to `dtype` after every operation
  const std::string* act;   // config.hidden_act

  Tensor R(Tensor t) const {
    if (emulate) t.copy_(t.to(dtype));
    return t;
  }
  Tensor W(const Tensor& p) const { return emulate ? p.to(torch::kFloat) : p; }
};

Tensor Lin(const Ctx& c, const LinearImpl& l, const Tensor& x) {
  return c.R(torch::linear(x, c.W(l.weight), l.bias.defined() ? c.W(l.bias) : Tensor()));
}

Tensor Norm(const Ctx& c, const LayerNormImpl& n, const Tensor& x) {
  return c.R(torch::layer_norm(x, {x.size(-1)}, c.W(n.weight), c.W(n.bias), n.eps));
}

Tensor Activation(const Ctx& c, const Tensor& x) {
  const std::string& a = *c.act;
  if (a == "quick_gelu") return c.R(x * c.R(torch::sigmoid(c.R(x * 1.702))));
  if (a == "gelu") return c.R(torch::gelu(x));
  if (a == "relu") return c.R(torch::relu(x));
  if (a == "silu" || a == "swish") return c.R(torch::silu(x));
  // gelu_new, gelu_pytorch_tanh, gelu_fast: the tanh approximation.
  return c.R(torch::gelu(x, "tanh"));
}

Tensor SelfAttention(const Ctx& c, const AttentionImpl& m, const Tensor& x) {
  const int64_t b = x.size(0), s = x.size(1), d = x.size(2), h = m.heads, hd = d / h;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  // [B, S, D] -> [B, H, S, hd]
  auto heads = [&](const Tensor& t) { return t.view({b, s, h, hd}).transpose(1, 2); };
  const Tensor q = heads(c.R(Lin(c, *m.q_proj, x) * scale));
  const Tensor k = heads(Lin(c, *m.k_proj, x));
  const Tensor v = heads(Lin(c, *m.v_proj, x));
  const Tensor scores = c.R(torch::matmul(q, k.transpose(-1, -2)));
  const Tensor probs = c.R(torch::softmax(scores, -1));
  const Tensor o = c.R(torch::matmul(probs, v)).transpose(1, 2).reshape({b, s, d});
  return Lin(c, *m.out_proj, o);
}

Tensor Layer(const Ctx& c, const CLIPEncoderLayerImpl& l, const Tensor& x) {
  Tensor h = c.R(x + SelfAttention(c, *l.self_attn, Norm(c, *l.layer_norm1, x)));
  const Tensor f =
      Lin(c, *l.mlp->fc2, Activation(c, Lin(c, *l.mlp->fc1, Norm(c, *l.layer_norm2, h))));
  return c.R(h + f);
}

}  // namespace

ClipVisionOutput ClipVisionModelWithProjectionImpl::forward(const Tensor& pixel_values,
                                                            bool output_hidden_states) const {
  c10::InferenceMode inference;
  const ClipVisionConfig& cfg = options_.config;
  const Ctx c{options_.dtype, options_.device.is_cpu() && options_.dtype != torch::kFloat32,
              &cfg.hidden_act};
  const Tensor x = c.emulate ? pixel_values.to(options_.device, c.dtype).to(torch::kFloat)
                             : pixel_values.to(options_.device, c.dtype);
  const EmbeddingsImpl& e = *vision_model->embeddings;
  const int64_t b = x.size(0);
  // [B, D, g, g] -> [B, g·g, D]
  const Tensor patches = c.R(torch::conv2d(x, c.W(e.patch_embedding->weight), {}, cfg.patch_size))
                             .flatten(2)
                             .transpose(1, 2);
  const Tensor cls = c.W(e.class_embedding).view({1, 1, -1}).expand({b, 1, cfg.hidden_size});
  Tensor h = c.R(torch::cat({cls, patches}, 1) + c.W(e.position_embedding->weight).unsqueeze(0));
  h = Norm(c, *vision_model->pre_layrnorm, h);
  ClipVisionOutput out;
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (const CLIPEncoderLayer& layer : vision_model->encoder->layer_list) {
    h = Layer(c, *layer, h);
    if (output_hidden_states) out.hidden_states.push_back(h);
  }
  out.last_hidden_state = h;
  out.pooler_output = Norm(c, *vision_model->post_layernorm, h.select(1, 0));
  out.image_embeds = Lin(c, *visual_projection, out.pooler_output);
  if (c.emulate) {
    for (Tensor* t : {&out.image_embeds, &out.last_hidden_state, &out.pooler_output}) {
      *t = t->to(c.dtype);
    }
    for (Tensor& t : out.hidden_states) t = t.to(c.dtype);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ClipVisionModel

namespace {

constexpr char kPixelValues[] = "pixel_values";

std::string Shape(const Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

}  // namespace

ClipVisionModel::ClipVisionModel(nlohmann::json config_json, ds::ModelOptions options,
                                 ClipVisionModelWithProjection model)
    : config_json_(std::move(config_json)), options_(options), model_(std::move(model)) {}

absl::StatusOr<std::unique_ptr<ClipVisionModel>> ClipVisionModel::Create(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(ClipVisionConfig cfg, ClipVisionConfig::FromJson(config));
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kBFloat16 &&
      options.dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPVisionModelWithProjection: unsupported dtype ",
                     c10::toString(options.dtype), " (float32, bfloat16 or float16)"));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPVisionModelWithProjection: unsupported device ", options.device.str(),
                     " (cpu or cuda)"));
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    return absl::UnimplementedError(
        absl::StrCat("CLIPVisionModelWithProjection: ", options.device.str(),
                     " requested but CUDA is not available (LibTorch build or machine)"));
  }
  ASSIGN_OR_RETURN(
      ClipVisionModelWithProjection model, TorchCall("building CLIPVisionModelWithProjection", [&] {
        ds::ScopedUninitializedParameters uninitialized(options.uninitialized_parameters);
        return ClipVisionModelWithProjection(ClipVisionOptions{cfg, options.dtype, options.device});
      }));
  return std::unique_ptr<ClipVisionModel>(
      new ClipVisionModel(cfg.ToJson(), options, std::move(model)));
}

const std::string& ClipVisionModel::class_name() const {
  static const std::string* const kName = new std::string(kClipVisionClassName);
  return *kName;
}

std::vector<std::string> ClipVisionModel::required_inputs() const { return {kPixelValues}; }

std::vector<std::string> ClipVisionModel::optional_inputs() const { return {}; }

absl::StatusOr<ClipVisionOutput> ClipVisionModel::Encode(const Tensor& pixel_values,
                                                         bool output_hidden_states) const {
  const ClipVisionConfig& cfg = vision_config();
  if (!pixel_values.defined()) {
    return absl::InvalidArgumentError("CLIPVisionModelWithProjection: 'pixel_values' is undefined");
  }
  if (!pixel_values.is_floating_point()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPVisionModelWithProjection: 'pixel_values' must be a floating tensor, "
                     "got ",
                     c10::toString(pixel_values.scalar_type())));
  }
  if (pixel_values.dim() != 4 || pixel_values.size(0) < 1 ||
      pixel_values.size(1) != cfg.num_channels || pixel_values.size(2) != cfg.image_size ||
      pixel_values.size(3) != cfg.image_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPVisionModelWithProjection: 'pixel_values' must be [B, ", cfg.num_channels,
                     ", ", cfg.image_size, ", ", cfg.image_size,
                     "] (num_channels, image_size; B >= 1), got ", Shape(pixel_values)));
  }
  return TorchCall("CLIPVisionModelWithProjection forward",
                   [&] { return model_->forward(pixel_values, output_hidden_states); });
}

absl::StatusOr<torch::Tensor> ClipVisionModel::EncodeImages(const Tensor& pixel_values) const {
  ASSIGN_OR_RETURN(ClipVisionOutput out, Encode(pixel_values));
  return out.image_embeds;
}

absl::StatusOr<torch::Tensor> ClipVisionModel::Forward(const TensorMap& inputs,
                                                       const ds::LoraContext* lora) const {
  if (lora != nullptr && !lora->empty()) {
    return absl::UnimplementedError(
        "CLIPVisionModelWithProjection has no LoRA support (no LoRA handler wired)");
  }
  for (const auto& [name, t] : inputs) {
    if (name != kPixelValues) {
      return absl::InvalidArgumentError(
          absl::StrCat("CLIPVisionModelWithProjection forward: unknown input '", name,
                       "' (inputs: pixel_values)"));
    }
  }
  auto it = inputs.find(kPixelValues);
  if (it == inputs.end()) {
    return absl::InvalidArgumentError(
        "CLIPVisionModelWithProjection forward: missing input 'pixel_values'");
  }
  return EncodeImages(it->second);
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateClipVisionModel(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<ClipVisionModel> model,
                   ClipVisionModel::Create(config, options));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

absl::StatusOr<TensorMap> AdaptClipVisionStateDict(TensorMap state_dict) {
  for (auto it = state_dict.begin(); it != state_dict.end();) {
    const std::string& k = it->first;
    const bool ignored = k == "vision_model.embeddings.position_ids" ||
                         absl::StartsWith(k, "text_model.") ||
                         absl::StartsWith(k, "text_projection.") || k == "logit_scale";
    it = ignored ? state_dict.erase(it) : std::next(it);
  }
  return state_dict;
}

absl::StatusOr<std::unique_ptr<ClipVisionModel>> LoadClipVisionModel(
    const std::string& dir, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(ModelFolder folder, OpenModelFolder(dir, "image_encoder"));
  // The strict load below assigns every parameter or fails (and the model is then discarded).
  ds::ModelOptions build = options;
  build.uninitialized_parameters = true;
  auto model = ClipVisionModel::Create(folder.config, build);
  if (!model.ok()) return Annotate(model.status(), absl::StrCat(folder.dir, "/config.json"));
  ASSIGN_OR_RETURN(TensorMap weights, AdaptClipVisionStateDict(std::move(folder.weights)));
  RETURN_IF_ERROR(LoadStateDict((*model)->module(), weights, folder.dir));
  return std::move(model).value();
}

}  // namespace ds::clip_vision
