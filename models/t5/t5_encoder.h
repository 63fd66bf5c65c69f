// T5EncoderModel (transformers) in LibTorch: the encoder half of T5 (T5-XXL v1.1 is FLUX.1's
// sequence text encoder).
//
// Every parameter is registered under its transformers name (shared.weight,
// encoder.block.0.layer.0.SelfAttention.q.weight, ...relative_attention_bias.weight in block 0
// only, encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight or .wi.weight,
// encoder.final_layer_norm.weight). transformers ties encoder.embed_tokens.weight to
// shared.weight; this module holds the tensor once, as shared.weight (AdaptT5StateDict accepts
// either name). The numerics follow transformers 4.43's T5Stack/T5Block/T5Attention: token
// embedding without scaling; pre-norm blocks with T5's RMS layer norm (no mean subtraction, no
// bias, variance of the float32 input, the normalized value cast to the weight dtype before the
// scale when that is 16-bit); self-attention without 1/sqrt(d) scaling, plus a learned relative
// position bias (bidirectional buckets: half the buckets per direction, half of those exact
// distances, the rest logarithmic up to relative_attention_max_distance, computed in float32 as
// transformers does) computed in block 0 and reused by every block, the padding mask ((1 - mask) ·
// finfo(dtype).min, all ones when none is given) added to it, softmax in float32; feed-forward
// wi -> act -> wo or act(wi_0) · wi_1 -> wo per feed_forward_proj; final_layer_norm.
//
// float16 follows transformers exactly: `wo` weights stay float32 (T5's _keep_in_fp32_modules),
// the feed-forward input is cast to float32 before wo, so the residual stream becomes float32
// after the first block's feed-forward; while the residual stream is float16 it is clamped to
// ±(65504 - 1000 if any value is inf, else 65504) after each sub-layer. bfloat16 runs entirely
// in bfloat16 (no clamping, as transformers). On CUDA 16-bit runs natively; on CPU it is emulated
// (float32 arithmetic rounded to each result's dtype after every operation).
//
// Weights are created directly in the requested dtype and device (layer-norm scales 1,
// everything else 0, or uninitialized under ScopedUninitializedParameters); load a state dict (or
// call InitRandomWeights) before running.
//
// Thread-safety: Encode() is const and may run concurrently from many threads; it only reads the
// parameters. Loading weights and set_differentiable() need exclusive access.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"
#include "handlers/text_encoder.h"
#include "models/t5/config.h"

namespace ds::t5 {

// torch.nn.Linear(in, out, bias=False): weight [out, in].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, const torch::TensorOptions& options);
  torch::Tensor weight;
};
TORCH_MODULE(Linear);

// torch.nn.Embedding: weight [num, dim].
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, const torch::TensorOptions& options);
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

// T5LayerNorm: weight [d_model] (1), no bias.
class T5LayerNormImpl : public torch::nn::Module {
 public:
  T5LayerNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  double eps;
  torch::Tensor weight;
};
TORCH_MODULE(T5LayerNorm);

// T5Attention: q, k, v [inner, d_model], o [d_model, inner]; relative_attention_bias
// [num_buckets, num_heads] when has_relative_attention_bias (block 0).
class T5AttentionImpl : public torch::nn::Module {
 public:
  T5AttentionImpl(const T5Config& config, bool has_relative_attention_bias,
                  const torch::TensorOptions& options);
  Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  Embedding relative_attention_bias{nullptr};  // null except in block 0
};
TORCH_MODULE(T5Attention);

// T5LayerSelfAttention: SelfAttention, layer_norm.
class T5LayerSelfAttentionImpl : public torch::nn::Module {
 public:
  T5LayerSelfAttentionImpl(const T5Config& config, bool has_relative_attention_bias,
                           const torch::TensorOptions& options);
  T5Attention SelfAttention{nullptr};  // NOLINT: the transformers name
  T5LayerNorm layer_norm{nullptr};
};
TORCH_MODULE(T5LayerSelfAttention);

// T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0, wi_1, wo). `wo_options` may differ
// from `options` (float32 under float16: _keep_in_fp32_modules).
class T5DenseImpl : public torch::nn::Module {
 public:
  T5DenseImpl(const T5Config& config, const torch::TensorOptions& options,
              const torch::TensorOptions& wo_options);
  Linear wi{nullptr};                    // non-gated only
  Linear wi_0{nullptr}, wi_1{nullptr};   // gated only
  Linear wo{nullptr};
};
TORCH_MODULE(T5Dense);

// T5LayerFF: DenseReluDense, layer_norm.
class T5LayerFFImpl : public torch::nn::Module {
 public:
  T5LayerFFImpl(const T5Config& config, const torch::TensorOptions& options,
                const torch::TensorOptions& wo_options);
  T5Dense DenseReluDense{nullptr};  // NOLINT: the transformers name
  T5LayerNorm layer_norm{nullptr};
};
TORCH_MODULE(T5LayerFF);

// T5Block (encoder): layer = [T5LayerSelfAttention, T5LayerFF].
class T5BlockImpl : public torch::nn::Module {
 public:
  T5BlockImpl(const T5Config& config, bool has_relative_attention_bias,
              const torch::TensorOptions& options, const torch::TensorOptions& wo_options);
  torch::nn::ModuleList layer{nullptr};
  T5LayerSelfAttention self_attention{nullptr};  // == layer[0]
  T5LayerFF ff{nullptr};                         // == layer[1]
};
TORCH_MODULE(T5Block);

// T5Stack (encoder): block, final_layer_norm (embed_tokens is the root's `shared`).
class T5StackImpl : public torch::nn::Module {
 public:
  T5StackImpl(const T5Config& config, const torch::TensorOptions& options,
              const torch::TensorOptions& wo_options);
  torch::nn::ModuleList block{nullptr};
  std::vector<T5Block> blocks;  // typed views of `block`
  T5LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(T5Stack);

struct T5EncoderOptions {
  T5Config config;                       // must be valid (T5Config::Validate)
  torch::Dtype dtype = torch::kFloat32;  // float32, bfloat16 or float16
  torch::Device device = torch::kCPU;    // CPU or CUDA
};

// The root module: shared, encoder.
class T5EncoderImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for an invalid config or an unsupported dtype.
  explicit T5EncoderImpl(const T5EncoderOptions& options);

  // transformers' T5EncoderModel(input_ids, attention_mask, output_hidden_states=...):
  // input_ids [B, L] (int64 on the model's device, ids in [0, vocab_size)), attention_mask
  // [B, L] (float on the model's device; 1 = token, 0 = padding) or undefined. Outputs in the
  // model dtype; `pooled` undefined; hidden_states (when asked): the embeddings, the outputs of
  // blocks 0..n-2 and the final normed state (= last_hidden_state), as transformers returns them.
  // Runs under torch::InferenceMode (unless differentiable()). Inputs are not validated here
  // (T5TextEncoder does).
  TextEncoderOutput Encode(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                           bool output_hidden_states) const;

  // transformers' T5Attention._relative_position_bucket(memory - context, bidirectional=True)
  // for a query length x key length grid: int64 [query_length, key_length] on `device`.
  static torch::Tensor RelativePositionBuckets(int64_t query_length, int64_t key_length,
                                               int64_t num_buckets, int64_t max_distance,
                                               const torch::Device& device);

  const T5Config& config() const { return options_.config; }

  // Differentiable mode (training): when on, forward passes run outside InferenceMode with
  // autograd-supported, out-of-place operations only, so gradients flow to the parameters (and
  // inputs); the results equal the default path's (float32) up to rounding. Off by default.
  // Not thread-safe: set it before running, never while forwards run.
  //
  // The float32 forward already uses out-of-place operations only, so the mode changes nothing
  // but the InferenceMode guard; last_hidden_state and hidden_states carry gradients. Parameters
  // are created with requires_grad false; setting the mode also sets every parameter's
  // requires_grad to `on` (freeze parameters selectively afterwards). float32 models only:
  // Encode() throws c10::Error in differentiable mode for a 16-bit model (the CPU emulation
  // rounds in place, and float16 keeps `wo` in float32).
  void set_differentiable(bool on);
  bool differentiable() const { return differentiable_; }

  Embedding shared{nullptr};
  T5Stack encoder{nullptr};

 private:
  T5EncoderOptions options_;
  bool differentiable_ = false;
};
TORCH_MODULE(T5Encoder);

// The ds::DiffusionModel for T5EncoderModel, and a ds::TextEncoder (handlers/text_encoder.h).
class T5TextEncoder final : public ds::DiffusionModel, public ds::TextEncoder {
 public:
  // INVALID_ARGUMENT for an invalid config (naming the field), an unsupported dtype
  // (float32/bfloat16/float16 only) or device type (cpu/cuda only); UNIMPLEMENTED for CUDA when
  // LibTorch or the machine has none; INTERNAL if LibTorch fails.
  static absl::StatusOr<std::unique_ptr<T5TextEncoder>> Create(const nlohmann::json& config,
                                                               const ds::ModelOptions& options);

  const std::string& class_name() const override;
  const nlohmann::json& config() const override { return config_json_; }
  const ds::ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *model_; }
  const torch::nn::Module& module() const override { return *model_; }
  // "input_ids"; optional "attention_mask".
  std::vector<std::string> required_inputs() const override;
  std::vector<std::string> optional_inputs() const override;

  // last_hidden_state of EncodeTokens; errors as EncodeTokens plus INVALID_ARGUMENT for a
  // missing or unknown input; UNIMPLEMENTED for a non-empty `lora`.
  using ds::DiffusionModel::Forward;
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const ds::LoraContext* lora) const override;

  // ds::TextEncoder (see there for the errors). No length limit (relative positions); `pooled`
  // is undefined; hidden_states' last entry is after the final layer norm.
  absl::StatusOr<TextEncoderOutput> EncodeTokens(const torch::Tensor& input_ids,
                                                 const torch::Tensor& attention_mask,
                                                 bool output_hidden_states = false) const override;
  int64_t hidden_size() const override { return t5_config().d_model; }
  int64_t max_position_embeddings() const override { return -1; }

  const T5Config& t5_config() const { return model_->config(); }
  const T5Encoder& t5() const { return model_; }
  // The module, e.g. to set_differentiable() (exclusive access, as for loading weights).
  T5Encoder& t5() { return model_; }

 private:
  T5TextEncoder(nlohmann::json config_json, ds::ModelOptions options, T5Encoder model);
  nlohmann::json config_json_;
  ds::ModelOptions options_;
  T5Encoder model_;
};

// The registry-facing factory.
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateT5EncoderModel(
    const nlohmann::json& config, const ds::ModelOptions& options);

// What transformers accepts in a T5EncoderModel checkpoint besides the module's names, before a
// strict load: the token embedding as "encoder.embed_tokens.weight" (tied to shared.weight; when
// both are stored shared.weight is used and the other dropped), "decoder.*" and "lm_head.weight"
// of a full T5 checkpoint (dropped, as T5EncoderModel ignores them). INVALID_ARGUMENT when
// both embedding names are stored with different shapes.
absl::StatusOr<TensorMap> AdaptT5StateDict(TensorMap state_dict);

}  // namespace ds::t5
