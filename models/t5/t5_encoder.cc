#include "models/t5/t5_encoder.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::t5 {
namespace {

torch::Tensor Param(torch::nn::Module& m, const std::string& name, at::IntArrayRef shape,
                    const torch::TensorOptions& options, double value = 0.0) {
  return m.register_parameter(name, NewParameter(shape, options, value), /*requires_grad=*/false);
}

}  // namespace

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features,
                       const torch::TensorOptions& options) {
  weight = Param(*this, "weight", {out_features, in_features}, options);
}

EmbeddingImpl::EmbeddingImpl(int64_t num_embeddings, int64_t dim,
                             const torch::TensorOptions& options) {
  weight = Param(*this, "weight", {num_embeddings, dim}, options);
}

T5LayerNormImpl::T5LayerNormImpl(int64_t dim, double eps_in, const torch::TensorOptions& options)
    : eps(eps_in) {
  weight = Param(*this, "weight", {dim}, options, 1.0);
}

T5AttentionImpl::T5AttentionImpl(const T5Config& c, bool has_bias,
                                 const torch::TensorOptions& options) {
  const int64_t d = c.d_model, inner = c.inner_dim();
  q = register_module("q", Linear(d, inner, options));
  k = register_module("k", Linear(d, inner, options));
  v = register_module("v", Linear(d, inner, options));
  o = register_module("o", Linear(inner, d, options));
  if (has_bias) {
    relative_attention_bias =
        register_module("relative_attention_bias",
                        Embedding(c.relative_attention_num_buckets, c.num_heads, options));
  }
}

T5LayerSelfAttentionImpl::T5LayerSelfAttentionImpl(const T5Config& c, bool has_bias,
                                                   const torch::TensorOptions& o) {
  SelfAttention = register_module("SelfAttention", T5Attention(c, has_bias, o));
  layer_norm = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon, o));
}

T5DenseImpl::T5DenseImpl(const T5Config& c, const torch::TensorOptions& o,
                         const torch::TensorOptions& wo_options) {
  if (c.is_gated_act) {
    wi_0 = register_module("wi_0", Linear(c.d_model, c.d_ff, o));
    wi_1 = register_module("wi_1", Linear(c.d_model, c.d_ff, o));
  } else {
    wi = register_module("wi", Linear(c.d_model, c.d_ff, o));
  }
  wo = register_module("wo", Linear(c.d_ff, c.d_model, wo_options));
}

T5LayerFFImpl::T5LayerFFImpl(const T5Config& c, const torch::TensorOptions& o,
                             const torch::TensorOptions& wo_options) {
  DenseReluDense = register_module("DenseReluDense", T5Dense(c, o, wo_options));
  layer_norm = register_module("layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon, o));
}

T5BlockImpl::T5BlockImpl(const T5Config& c, bool has_bias, const torch::TensorOptions& o,
                         const torch::TensorOptions& wo_options) {
  self_attention = T5LayerSelfAttention(c, has_bias, o);
  ff = T5LayerFF(c, o, wo_options);
  layer = register_module("layer", torch::nn::ModuleList(self_attention, ff));
}

T5StackImpl::T5StackImpl(const T5Config& c, const torch::TensorOptions& o,
                         const torch::TensorOptions& wo_options) {
  block = register_module("block", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) {
    blocks.emplace_back(c, /*has_relative_attention_bias=*/i == 0, o, wo_options);
    block->push_back(blocks.back());
  }
  final_layer_norm =
      register_module("final_layer_norm", T5LayerNorm(c.d_model, c.layer_norm_epsilon, o));
}

T5EncoderImpl::T5EncoderImpl(const T5EncoderOptions& o) : options_(o) {
  const absl::Status valid = o.config.Validate();
  TORCH_CHECK(valid.ok(), std::string(valid.message()));
  TORCH_CHECK(
      o.dtype == torch::kFloat32 || o.dtype == torch::kBFloat16 || o.dtype == torch::kFloat16,
      "T5EncoderModel: unsupported dtype ", o.dtype);
  const auto to = torch::TensorOptions().dtype(o.dtype).device(o.device);
  // T5PreTrainedModel._keep_in_fp32_modules = ["wo"], applied by transformers for float16.
  const auto wo_options = o.dtype == torch::kFloat16 ? to.dtype(torch::kFloat32) : to;
  shared = register_module("shared", Embedding(o.config.vocab_size, o.config.d_model, to));
  encoder = register_module("encoder", T5Stack(o.config, to, wo_options));
}

torch::Tensor T5EncoderImpl::RelativePositionBuckets(int64_t query_length, int64_t key_length,
                                                     int64_t num_buckets, int64_t max_distance,
                                                     const torch::Device& device) {
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(device);
  const torch::Tensor context = torch::arange(query_length, longs).unsqueeze(1);
  const torch::Tensor memory = torch::arange(key_length, longs).unsqueeze(0);
  torch::Tensor relative = memory - context;
  // Bidirectional: half the buckets for each direction.
  num_buckets /= 2;
  torch::Tensor buckets = relative.gt(0).to(torch::kLong) * num_buckets;
  relative = relative.abs();
  const int64_t max_exact = num_buckets / 2;
  const torch::Tensor is_small = relative.lt(max_exact);
  // The same float32 expression as transformers (log of the float32 ratio, divided by the float64
  // constant log(max_distance / max_exact), scaled, truncated).
  torch::Tensor large =
      (torch::log(relative.to(torch::kFloat) / max_exact) /
       std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact)) *
       (num_buckets - max_exact))
          .to(torch::kLong) +
      max_exact;
  large = torch::minimum(large, torch::full_like(large, num_buckets - 1));
  return buckets + torch::where(is_small, relative, large);
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

using torch::Tensor;

struct Ctx {
  torch::ScalarType dtype;  // the model dtype
  bool emulate;             // float32 arithmetic rounded to each result's dtype

  // Rounds a fresh result to `logical` in place when emulating.
  Tensor R(Tensor t, torch::ScalarType logical) const {
    if (emulate && logical != torch::kFloat) t.copy_(t.to(logical));
    return t;
  }
  Tensor R(Tensor t) const { return R(std::move(t), dtype); }
  Tensor W(const Tensor& p) const { return emulate ? p.to(torch::kFloat) : p; }
};

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

// T5LayerNorm: the output has the weight's (= the model's) dtype.
Tensor Norm(const Ctx& c, const T5LayerNormImpl& m, const Tensor& x) {
  const Tensor variance = x.to(torch::kFloat).pow(2).mean(-1, /*keepdim=*/true);
  Tensor h = x * torch::rsqrt(variance + m.eps);  // float32
  if (c.dtype != torch::kFloat) h = c.R(h.to(c.emulate ? torch::kFloat : c.dtype));
  return c.R(c.W(m.weight) * h);
}

Tensor Lin(const Ctx& c, const LinearImpl& m, const Tensor& x) {
  return c.R(torch::linear(x, c.W(m.weight)), m.weight.scalar_type());
}

Tensor Activation(const Ctx& c, const std::string& act, const Tensor& x) {
  if (act == "relu") return c.R(torch::relu(x));
  if (act == "gelu") return c.R(torch::gelu(x));
  if (act == "gelu_pytorch_tanh") return c.R(torch::gelu(x, "tanh"));
  if (act == "silu" || act == "swish") return c.R(torch::silu(x));
  TORCH_CHECK(act == "gelu_new", "unsupported activation ", act);
  // transformers' NewGELUActivation, written out.
  const double k = std::sqrt(2.0 / M_PI);
  const Tensor inner = c.R(k * c.R(x + c.R(0.044715 * c.R(torch::pow(x, 3.0)))));
  return c.R(c.R(0.5 * x) * c.R(1.0 + c.R(torch::tanh(inner))));
}

// T5Block's clamp of a float16 residual stream.
Tensor ClampHalf(const Tensor& x, torch::ScalarType logical) {
  if (logical != torch::kFloat16) return x;
  const double max = 65504.0;
  const double clamp = x.isinf().any().item<bool>() ? max - 1000 : max;
  return torch::clamp(x, -clamp, clamp);
}

Tensor SelfAttention(const Ctx& c, const T5AttentionImpl& m, const T5Config& cfg, const Tensor& n,
                     const Tensor& position_bias) {
  const int64_t b = n.size(0), l = n.size(1);
  auto split = [&](const Tensor& t) { return t.view({b, l, cfg.num_heads, cfg.d_kv}).transpose(1, 2); };
  const Tensor q = split(Lin(c, *m.q, n));
  const Tensor k = split(Lin(c, *m.k, n));
  const Tensor v = split(Lin(c, *m.v, n));
  Tensor scores = c.R(torch::matmul(q, k.transpose(3, 2)));  // no 1/sqrt(d) scaling
  scores = c.R(scores + position_bias);
  const Tensor probs =
      c.R(torch::softmax(scores.to(torch::kFloat), -1).to(c.emulate ? torch::kFloat : c.dtype));
  const Tensor out = c.R(torch::matmul(probs, v)).transpose(1, 2).reshape({b, l, cfg.inner_dim()});
  return Lin(c, *m.o, out);
}

}  // namespace

void T5EncoderImpl::set_differentiable(bool on) {
  differentiable_ = on;
  for (Tensor& p : parameters()) p.requires_grad_(on);
}

TextEncoderOutput T5EncoderImpl::Encode(const Tensor& input_ids, const Tensor& attention_mask,
                                        bool output_hidden_states) const {
  // Differentiable mode only drops the guard: the float32 path below has no in-place operation on
  // activations (Ctx::R rounds in place only when emulating 16-bit, refused here).
  TORCH_CHECK(!differentiable_ || options_.dtype == torch::kFloat32,
              "T5EncoderModel: differentiable mode needs a float32 model, got ", options_.dtype);
  std::optional<c10::InferenceMode> inference;
  if (!differentiable_) inference.emplace();
  const T5Config& cfg = options_.config;
  const Ctx c{options_.dtype, options_.device.is_cpu() && options_.dtype != torch::kFloat32};
  const torch::ScalarType act = c.emulate ? torch::kFloat : c.dtype;
  const int64_t b = input_ids.size(0), l = input_ids.size(1);

  Tensor x = c.R(torch::embedding(c.W(shared->weight), input_ids));
  torch::ScalarType xdt = c.dtype;  // the residual stream's dtype in a native run

  // get_extended_attention_mask: (1 - mask) * finfo.min as [B, 1, 1, L] (all ones when absent).
  const Tensor mask = attention_mask.defined()
                          ? attention_mask.to(act)
                          : torch::ones({b, l}, torch::TensorOptions().dtype(act).device(options_.device));
  const Tensor extended = c.R(c.R(1.0 - mask) * MinValue(c.dtype)).view({b, 1, 1, l});
  // Block 0's relative position bias [1, H, L, L] plus the mask, reused by every block.
  const T5AttentionImpl& first = *encoder->blocks.at(0)->self_attention->SelfAttention;
  const Tensor buckets = RelativePositionBuckets(l, l, cfg.relative_attention_num_buckets,
                                                 cfg.relative_attention_max_distance,
                                                 options_.device);
  const Tensor bias = torch::embedding(c.W(first.relative_attention_bias->weight), buckets)
                          .permute({2, 0, 1})
                          .unsqueeze(0);
  const Tensor position_bias = c.R(bias + extended);

  TextEncoderOutput out;
  const auto& blocks = encoder->blocks;
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    if (output_hidden_states) out.hidden_states.push_back(x);
    const T5LayerSelfAttentionImpl& sa = *blocks[i]->self_attention;
    const Tensor attn = SelfAttention(c, *sa.SelfAttention, cfg, Norm(c, *sa.layer_norm, x),
                                      position_bias);
    xdt = torch::promote_types(xdt, c.dtype);
    x = ClampHalf(c.R(x + attn, xdt), xdt);

    const T5LayerFFImpl& ff = *blocks[i]->ff;
    const T5DenseImpl& dense = *ff.DenseReluDense;
    const Tensor n = Norm(c, *ff.layer_norm, x);
    Tensor h = dense.wi ? Activation(c, cfg.dense_act_fn, Lin(c, *dense.wi, n))
                        : c.R(Activation(c, cfg.dense_act_fn, Lin(c, *dense.wi_0, n)) *
                              Lin(c, *dense.wi_1, n));
    const torch::ScalarType wo_dtype = dense.wo->weight.scalar_type();
    if (wo_dtype != c.dtype && !c.emulate) h = h.to(wo_dtype);
    const Tensor y = Lin(c, *dense.wo, h);
    xdt = torch::promote_types(xdt, wo_dtype);
    x = ClampHalf(c.R(x + y, xdt), xdt);
  }
  x = Norm(c, *encoder->final_layer_norm, x);
  if (output_hidden_states) out.hidden_states.push_back(x);

  out.last_hidden_state = x.to(c.dtype);
  for (Tensor& h : out.hidden_states) h = h.to(c.dtype);
  return out;
}

// ---------------------------------------------------------------------------------------------
// T5TextEncoder

namespace {

constexpr char kInputIds[] = "input_ids";
constexpr char kAttentionMask[] = "attention_mask";

}  // namespace

T5TextEncoder::T5TextEncoder(nlohmann::json config_json, ds::ModelOptions options,
                             T5Encoder model)
    : config_json_(std::move(config_json)), options_(options), model_(std::move(model)) {}

absl::StatusOr<std::unique_ptr<T5TextEncoder>> T5TextEncoder::Create(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(T5Config cfg, T5Config::FromJson(config));
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kBFloat16 &&
      options.dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat("T5EncoderModel: unsupported dtype ",
                                                   c10::toString(options.dtype),
                                                   " (float32, bfloat16 or float16)"));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("T5EncoderModel: unsupported device ",
                                                   options.device.str(), " (cpu or cuda)"));
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    return absl::UnimplementedError(
        absl::StrCat("T5EncoderModel: ", options.device.str(),
                     " requested but CUDA is not available (LibTorch build or machine)"));
  }
  ASSIGN_OR_RETURN(T5Encoder model, TorchCall("building T5EncoderModel", [&] {
                     ds::ScopedUninitializedParameters uninitialized(
                         options.uninitialized_parameters);
                     return T5Encoder(T5EncoderOptions{cfg, options.dtype, options.device});
                   }));
  return std::unique_ptr<T5TextEncoder>(
      new T5TextEncoder(cfg.ToJson(), options, std::move(model)));
}

const std::string& T5TextEncoder::class_name() const {
  static const std::string* const kName = new std::string(kT5EncoderModelClassName);
  return *kName;
}

std::vector<std::string> T5TextEncoder::required_inputs() const { return {kInputIds}; }

std::vector<std::string> T5TextEncoder::optional_inputs() const { return {kAttentionMask}; }

absl::StatusOr<TextEncoderOutput> T5TextEncoder::EncodeTokens(const torch::Tensor& input_ids,
                                                              const torch::Tensor& attention_mask,
                                                              bool output_hidden_states) const {
  const torch::ScalarType act =
      options_.device.is_cpu() && options_.dtype != torch::kFloat32 ? torch::kFloat
                                                                    : options_.dtype;
  ASSIGN_OR_RETURN(TokenInputs in,
                   PrepareTokenInputs(kT5EncoderModelClassName, input_ids, attention_mask,
                                      t5_config().vocab_size, -1, options_.device, act));
  return TorchCall(kT5EncoderModelClassName, [&] {
    return model_->Encode(in.input_ids, in.attention_mask, output_hidden_states);
  });
}

absl::StatusOr<torch::Tensor> T5TextEncoder::Forward(const TensorMap& inputs,
                                                     const ds::LoraContext* lora) const {
  if (lora != nullptr && !lora->empty()) {
    return absl::UnimplementedError("T5EncoderModel has no LoRA support (no LoRA handler wired)");
  }
  for (const auto& [name, t] : inputs) {
    if (name != kInputIds && name != kAttentionMask) {
      return absl::InvalidArgumentError(absl::StrCat("T5EncoderModel forward: unknown input '",
                                                     name, "' (inputs: input_ids, attention_mask)"));
    }
  }
  auto ids = inputs.find(kInputIds);
  if (ids == inputs.end()) {
    return absl::InvalidArgumentError("T5EncoderModel forward: missing input 'input_ids'");
  }
  auto mask = inputs.find(kAttentionMask);
  ASSIGN_OR_RETURN(TextEncoderOutput out,
                   EncodeTokens(ids->second,
                                mask == inputs.end() ? torch::Tensor() : mask->second, false));
  return out.last_hidden_state;
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateT5EncoderModel(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<T5TextEncoder> model, T5TextEncoder::Create(config, options));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

absl::StatusOr<TensorMap> AdaptT5StateDict(TensorMap state_dict) {
  constexpr char kShared[] = "shared.weight";
  constexpr char kEmbedTokens[] = "encoder.embed_tokens.weight";
  auto embed = state_dict.find(kEmbedTokens);
  if (embed != state_dict.end()) {
    auto shared = state_dict.find(kShared);
    if (shared == state_dict.end()) {
      state_dict[kShared] = embed->second;
    } else if (shared->second.sizes() != embed->second.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "T5EncoderModel checkpoint: '", kEmbedTokens, "' [",
          absl::StrJoin(embed->second.sizes(), ", "), "] and '", kShared, "' [",
          absl::StrJoin(shared->second.sizes(), ", "), "] are tied but differ in shape"));
    }
    state_dict.erase(kEmbedTokens);
  }
  for (auto it = state_dict.begin(); it != state_dict.end();) {
    if (absl::StartsWith(it->first, "decoder.") || it->first == "lm_head.weight") {
      it = state_dict.erase(it);
    } else {
      ++it;
    }
  }
  return state_dict;
}

}  // namespace ds::t5
