#include "models/clip/clip_text_model.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::clip {
namespace {

torch::Tensor Param(torch::nn::Module& m, const std::string& name, at::IntArrayRef shape,
                    const torch::TensorOptions& options, double value = 0.0) {
  return m.register_parameter(name, NewParameter(shape, options, value), /*requires_grad=*/false);
}

}  // namespace

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias,
                       const torch::TensorOptions& options) {
  weight = Param(*this, "weight", {out_features, in_features}, options);
  if (with_bias) bias = Param(*this, "bias", {out_features}, options);
}

LayerNormImpl::LayerNormImpl(int64_t dim, double eps_in, const torch::TensorOptions& options)
    : eps(eps_in) {
  weight = Param(*this, "weight", {dim}, options, 1.0);
  bias = Param(*this, "bias", {dim}, options);
}

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim,
                             const torch::TensorOptions& options) {
  weight = Param(*this, "weight", {num_embeddings, dim}, options);
}

CLIPTextEmbeddingsImpl::CLIPTextEmbeddingsImpl(const CLIPTextConfig& c,
                                               const torch::TensorOptions& o) {
  token_embedding = register_module("token_embedding", Embedding(c.vocab_size, c.hidden_size, o));
  position_embedding = register_module("position_embedding",
                                       Embedding(c.max_position_embeddings, c.hidden_size, o));
}

CLIPAttentionImpl::CLIPAttentionImpl(const CLIPTextConfig& c, const torch::TensorOptions& o) {
  const int64_t d = c.hidden_size;
  k_proj = register_module("k_proj", Linear(d, d, true, o));
  v_proj = register_module("v_proj", Linear(d, d, true, o));
  q_proj = register_module("q_proj", Linear(d, d, true, o));
  out_proj = register_module("out_proj", Linear(d, d, true, o));
}

CLIPMLPImpl::CLIPMLPImpl(const CLIPTextConfig& c, const torch::TensorOptions& o) {
  fc1 = register_module("fc1", Linear(c.hidden_size, c.intermediate_size, true, o));
  fc2 = register_module("fc2", Linear(c.intermediate_size, c.hidden_size, true, o));
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& c,
                                           const torch::TensorOptions& o) {
  self_attn = register_module("self_attn", CLIPAttention(c, o));
  layer_norm1 = register_module("layer_norm1", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
  mlp = register_module("mlp", CLIPMLP(c, o));
  layer_norm2 = register_module("layer_norm2", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPTextConfig& c, const torch::TensorOptions& o) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    layer_list.emplace_back(c, o);
    layers->push_back(layer_list.back());
  }
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextConfig& c,
                                                 const torch::TensorOptions& o) {
  embeddings = register_module("embeddings", CLIPTextEmbeddings(c, o));
  encoder = register_module("encoder", CLIPEncoder(c, o));
  final_layer_norm =
      register_module("final_layer_norm", LayerNorm(c.hidden_size, c.layer_norm_eps, o));
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextModelOptions& o) : options_(o) {
  const absl::Status valid = o.config.Validate();
  TORCH_CHECK(valid.ok(), std::string(valid.message()));
  TORCH_CHECK(
      o.dtype == torch::kFloat32 || o.dtype == torch::kBFloat16 || o.dtype == torch::kFloat16,
      "CLIPTextModel: unsupported dtype ", o.dtype);
  const auto to = torch::TensorOptions().dtype(o.dtype).device(o.device);
  text_model = register_module("text_model", CLIPTextTransformer(o.config, to));
  if (o.with_projection) {
    text_projection = register_module(
        "text_projection", Linear(o.config.hidden_size, o.config.projection_dim, false, to));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

using torch::Tensor;

// Numerics of one encode.
struct Ctx {
  torch::ScalarType dtype;  // the model dtype
  bool emulate;             // float32 arithmetic rounded to `dtype` after every operation

  Tensor R(Tensor t) const {
    if (emulate) t.copy_(t.to(dtype));
    return t;
  }
  Tensor W(const Tensor& p) const {
    return emulate && p.defined() ? p.to(torch::kFloat) : p;
  }
  // The activations' dtype.
  torch::ScalarType act() const { return emulate ? torch::kFloat : dtype; }
};

Tensor Lin(const Ctx& c, const LinearImpl& m, const Tensor& x) {
  return c.R(torch::linear(x, c.W(m.weight), c.W(m.bias)));
}

Tensor Norm(const Ctx& c, const LayerNormImpl& m, const Tensor& x) {
  return c.R(torch::layer_norm(x, {x.size(-1)}, c.W(m.weight), c.W(m.bias), m.eps));
}

Tensor Activation(const Ctx& c, const std::string& act, const Tensor& x) {
  if (act == "quick_gelu") return c.R(x * c.R(torch::sigmoid(c.R(1.702 * x))));
  if (act == "gelu") return c.R(torch::gelu(x));
  if (act == "gelu_pytorch_tanh") return c.R(torch::gelu(x, "tanh"));
  if (act == "relu") return c.R(torch::relu(x));
  if (act == "silu" || act == "swish") return c.R(torch::silu(x));
  // gelu_new: transformers' NewGELUActivation, written out.
  TORCH_CHECK(act == "gelu_new", "unsupported activation ", act);
  const double k = std::sqrt(2.0 / M_PI);
  const Tensor inner = c.R(k * c.R(x + c.R(0.044715 * c.R(torch::pow(x, 3.0)))));
  return c.R(c.R(0.5 * x) * c.R(1.0 + c.R(torch::tanh(inner))));
}

// The most negative finite value of the model dtype (transformers' torch.finfo(dtype).min).
double MinValue(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat16:
      return -65504.0;
    case torch::kBFloat16:
      return -3.3895313892515355e38;
    default:
      return static_cast<double>(std::numeric_limits<float>::lowest());
  }
}

Tensor Attention(const Ctx& c, const CLIPAttentionImpl& m, const CLIPTextConfig& cfg,
                 const Tensor& x, const Tensor& causal, const Tensor& padding) {
  const int64_t b = x.size(0), l = x.size(1), heads = cfg.num_attention_heads;
  const int64_t hd = cfg.head_dim();
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  auto split = [&](const Tensor& t) { return t.view({b, l, heads, hd}).transpose(1, 2); };
  const Tensor q = split(c.R(Lin(c, *m.q_proj, x) * scale));
  const Tensor k = split(Lin(c, *m.k_proj, x));
  const Tensor v = split(Lin(c, *m.v_proj, x));
  Tensor scores = c.R(torch::matmul(q, k.transpose(-1, -2)));  // [B, H, L, L]
  scores = c.R(scores + causal);
  if (padding.defined()) scores = c.R(scores + padding);
  const Tensor probs = c.R(torch::softmax(scores, -1));
  const Tensor out = c.R(torch::matmul(probs, v)).transpose(1, 2).reshape({b, l, cfg.hidden_size});
  return Lin(c, *m.out_proj, out);
}

}  // namespace

void CLIPTextModelImpl::set_differentiable(bool on) {
  differentiable_ = on;
  for (Tensor& p : parameters()) p.requires_grad_(on);
}

TextEncoderOutput CLIPTextModelImpl::Encode(const Tensor& input_ids, const Tensor& attention_mask,
                                            bool output_hidden_states) const {
  // Differentiable mode only drops the guard: the float32 path below has no in-place operation on
  // activations (Ctx::R rounds in place only when emulating 16-bit, refused here).
  TORCH_CHECK(!differentiable_ || options_.dtype == torch::kFloat32,
              "CLIPTextModel: differentiable mode needs a float32 model, got ", options_.dtype);
  std::optional<c10::InferenceMode> inference;
  if (!differentiable_) inference.emplace();
  const CLIPTextConfig& cfg = options_.config;
  const Ctx c{options_.dtype, options_.device.is_cpu() && options_.dtype != torch::kFloat32};
  const CLIPTextTransformerImpl& t = *text_model;
  const int64_t b = input_ids.size(0), l = input_ids.size(1);
  const auto act_options = torch::TensorOptions().dtype(c.act()).device(options_.device);

  const Tensor positions = torch::arange(l, torch::TensorOptions().dtype(torch::kLong).device(options_.device));
  Tensor x = c.R(torch::embedding(c.W(t.embeddings->token_embedding->weight), input_ids) +
                 torch::embedding(c.W(t.embeddings->position_embedding->weight), positions));

  // _create_4d_causal_attention_mask: finfo.min above the diagonal, 0 elsewhere.
  const double min_value = MinValue(options_.dtype);
  const Tensor causal =
      torch::full({l, l}, min_value, act_options).triu(1).view({1, 1, l, l});
  // _prepare_4d_attention_mask: 1 - mask, with finfo.min wherever that is non-zero, [B, 1, 1, L]
  // (broadcast over queries).
  Tensor padding;
  if (attention_mask.defined()) {
    const Tensor inverted = c.R(1.0 - c.R(attention_mask.to(c.act())));
    padding = inverted.masked_fill(inverted.ne(0), min_value).view({b, 1, 1, l});
  }

  TextEncoderOutput out;
  for (const CLIPEncoderLayer& layer : t.encoder->layer_list) {
    if (output_hidden_states) out.hidden_states.push_back(x);
    Tensor h = Attention(c, *layer->self_attn, cfg, Norm(c, *layer->layer_norm1, x), causal, padding);
    x = c.R(x + h);
    h = Norm(c, *layer->layer_norm2, x);
    h = Lin(c, *layer->mlp->fc2, Activation(c, cfg.hidden_act, Lin(c, *layer->mlp->fc1, h)));
    x = c.R(x + h);
  }
  if (output_hidden_states) out.hidden_states.push_back(x);
  x = Norm(c, *t.final_layer_norm, x);

  // Pooling as transformers' CLIPTextTransformer does it.
  const Tensor ids = input_ids.to(torch::kInt);
  const Tensor eos_index = cfg.legacy_eos_pooling()
                               ? ids.argmax(-1)
                               : ids.eq(cfg.eos_token_id).to(torch::kInt).argmax(-1);
  Tensor pooled = x.index({torch::arange(b, eos_index.options().dtype(torch::kLong)), eos_index});
  if (text_projection) pooled = Lin(c, *text_projection, pooled);

  auto finish = [&](const Tensor& v) { return c.emulate ? v.to(c.dtype) : v; };
  out.last_hidden_state = finish(x);
  out.pooled = finish(pooled);
  for (Tensor& h : out.hidden_states) h = finish(h);
  return out;
}

// ---------------------------------------------------------------------------------------------
// ClipTextEncoder

namespace {

constexpr char kInputIds[] = "input_ids";
constexpr char kAttentionMask[] = "attention_mask";

}  // namespace

ClipTextEncoder::ClipTextEncoder(std::string class_name, nlohmann::json config_json,
                                 ds::ModelOptions options, CLIPTextModel model)
    : class_name_(std::move(class_name)),
      config_json_(std::move(config_json)),
      options_(options),
      model_(std::move(model)) {}

absl::StatusOr<std::unique_ptr<ClipTextEncoder>> ClipTextEncoder::Create(
    const nlohmann::json& config, const ds::ModelOptions& options, const std::string& class_name) {
  const bool with_projection = class_name == kCLIPTextModelWithProjectionClassName;
  if (!with_projection && class_name != kCLIPTextModelClassName) {
    return absl::InvalidArgumentError(absl::StrCat("CLIP text model: unknown class '", class_name,
                                                   "' (CLIPTextModel or "
                                                   "CLIPTextModelWithProjection)"));
  }
  ASSIGN_OR_RETURN(CLIPTextConfig cfg, CLIPTextConfig::FromJson(config));
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kBFloat16 &&
      options.dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat(class_name, ": unsupported dtype ",
                                                   c10::toString(options.dtype),
                                                   " (float32, bfloat16 or float16)"));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat(class_name, ": unsupported device ", options.device.str(), " (cpu or cuda)"));
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    return absl::UnimplementedError(
        absl::StrCat(class_name, ": ", options.device.str(),
                     " requested but CUDA is not available (LibTorch build or machine)"));
  }
  ASSIGN_OR_RETURN(CLIPTextModel model,
                   TorchCall(absl::StrCat("building ", class_name), [&] {
                     ds::ScopedUninitializedParameters uninitialized(
                         options.uninitialized_parameters);
                     return CLIPTextModel(
                         CLIPTextModelOptions{cfg, with_projection, options.dtype, options.device});
                   }));
  return std::unique_ptr<ClipTextEncoder>(
      new ClipTextEncoder(class_name, cfg.ToJson(class_name), options, std::move(model)));
}

std::vector<std::string> ClipTextEncoder::required_inputs() const { return {kInputIds}; }

std::vector<std::string> ClipTextEncoder::optional_inputs() const { return {kAttentionMask}; }

absl::StatusOr<TextEncoderOutput> ClipTextEncoder::EncodeTokens(
    const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
    bool output_hidden_states) const {
  const CLIPTextConfig& cfg = clip_config();
  const torch::ScalarType act =
      options_.device.is_cpu() && options_.dtype != torch::kFloat32 ? torch::kFloat
                                                                    : options_.dtype;
  ASSIGN_OR_RETURN(TokenInputs in,
                   PrepareTokenInputs(class_name_, input_ids, attention_mask, cfg.vocab_size,
                                      cfg.max_position_embeddings, options_.device, act));
  return TorchCall(class_name_, [&] {
    return model_->Encode(in.input_ids, in.attention_mask, output_hidden_states);
  });
}

absl::StatusOr<torch::Tensor> ClipTextEncoder::Forward(const TensorMap& inputs,
                                                       const ds::LoraContext* lora) const {
  if (lora != nullptr && !lora->empty()) {
    return absl::UnimplementedError(
        absl::StrCat(class_name_, " has no LoRA support (no LoRA handler wired)"));
  }
  for (const auto& [name, t] : inputs) {
    if (name != kInputIds && name != kAttentionMask) {
      return absl::InvalidArgumentError(absl::StrCat(class_name_, " forward: unknown input '", name,
                                                     "' (inputs: input_ids, attention_mask)"));
    }
  }
  auto ids = inputs.find(kInputIds);
  if (ids == inputs.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(class_name_, " forward: missing input 'input_ids'"));
  }
  auto mask = inputs.find(kAttentionMask);
  ASSIGN_OR_RETURN(TextEncoderOutput out,
                   EncodeTokens(ids->second,
                                mask == inputs.end() ? torch::Tensor() : mask->second, false));
  return out.last_hidden_state;
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateCLIPTextModel(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<ClipTextEncoder> model,
                   ClipTextEncoder::Create(config, options, kCLIPTextModelClassName));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateCLIPTextModelWithProjection(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<ClipTextEncoder> model,
                   ClipTextEncoder::Create(config, options, kCLIPTextModelWithProjectionClassName));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

absl::StatusOr<TensorMap> AdaptClipStateDict(TensorMap state_dict) {
  state_dict.erase("text_model.embeddings.position_ids");
  return state_dict;
}

}  // namespace ds::clip
