// CLIPTextModel (transformers) in LibTorch: the text tower of CLIP (CLIP-L is FLUX.1's and SD's
// pooled / sequence text encoder), optionally with the text projection
// (CLIPTextModelWithProjection).
//
// Every parameter is registered under its transformers name
// (text_model.embeddings.token_embedding.weight, text_model.encoder.layers.0.self_attn.q_proj.weight,
// text_model.final_layer_norm.bias, text_projection.weight), so a transformers `text_encoder/`
// folder loads with ds::LoadStateDict and no renaming. The numerics follow transformers 4.43's
// eager CLIP path: token + learned position embeddings; pre-LayerNorm encoder layers (layer_norm1,
// self-attention with q scaled by head_dim^-0.5 before q·kᵀ, the causal mask and then the optional
// padding mask added as finfo(dtype).min, softmax in the model dtype, out_proj, residual;
// layer_norm2, fc1, activation per hidden_act, fc2, residual); final_layer_norm; pooled output at
// argmax(input_ids) when eos_token_id == 2, else at the first position equal to eos_token_id
// (position 0 when there is none, as transformers' argmax of all zeros gives).
//
// Weights are created directly in the requested dtype and device (LayerNorm scales 1, everything
// else 0, or uninitialized under ScopedUninitializedParameters); load a state dict (or call
// InitRandomWeights) before running. float32, bfloat16 and float16 are supported; on CUDA the
// 16-bit types run natively, on CPU they are emulated (float32 arithmetic rounded to the model
// dtype after every operation; LibTorch 1.13 has no 16-bit CPU matmul for float16).
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
#include "models/clip/config.h"

namespace ds::clip {

// ---------------------------------------------------------------------------------------------
// Building blocks (parameters only; the forward math lives in clip_text_model.cc).

// torch.nn.Linear's parameters: weight [out, in], bias [out] (unless without bias).
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias,
             const torch::TensorOptions& options);
  torch::Tensor weight;
  torch::Tensor bias;  // undefined without bias
};
TORCH_MODULE(Linear);

// torch.nn.LayerNorm(dim, eps): weight (1) and bias (0) [dim].
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  double eps;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(LayerNorm);

// torch.nn.Embedding's parameter: weight [num_embeddings, dim].
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t dim, const torch::TensorOptions& options);
  torch::Tensor weight;
};
TORCH_MODULE(Embedding);

// CLIPTextEmbeddings: token_embedding, position_embedding.
class CLIPTextEmbeddingsImpl : public torch::nn::Module {
 public:
  CLIPTextEmbeddingsImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  Embedding token_embedding{nullptr};
  Embedding position_embedding{nullptr};
};
TORCH_MODULE(CLIPTextEmbeddings);

// CLIPAttention: k_proj, v_proj, q_proj, out_proj (all with bias).
class CLIPAttentionImpl : public torch::nn::Module {
 public:
  CLIPAttentionImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(CLIPAttention);

// CLIPMLP: fc1 [intermediate, hidden], fc2 [hidden, intermediate].
class CLIPMLPImpl : public torch::nn::Module {
 public:
  CLIPMLPImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(CLIPMLP);

// CLIPEncoderLayer: self_attn, layer_norm1, mlp, layer_norm2.
class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  CLIPEncoderLayerImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  CLIPAttention self_attn{nullptr};
  LayerNorm layer_norm1{nullptr};
  CLIPMLP mlp{nullptr};
  LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

// CLIPEncoder: layers.
class CLIPEncoderImpl : public torch::nn::Module {
 public:
  CLIPEncoderImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  torch::nn::ModuleList layers{nullptr};
  std::vector<CLIPEncoderLayer> layer_list;  // typed views of `layers`
};
TORCH_MODULE(CLIPEncoder);

// CLIPTextTransformer: embeddings, encoder, final_layer_norm.
class CLIPTextTransformerImpl : public torch::nn::Module {
 public:
  CLIPTextTransformerImpl(const CLIPTextConfig& config, const torch::TensorOptions& options);
  CLIPTextEmbeddings embeddings{nullptr};
  CLIPEncoder encoder{nullptr};
  LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(CLIPTextTransformer);

// ---------------------------------------------------------------------------------------------

struct CLIPTextModelOptions {
  CLIPTextConfig config;                 // must be valid (CLIPTextConfig::Validate)
  bool with_projection = false;          // CLIPTextModelWithProjection: adds text_projection
  torch::Dtype dtype = torch::kFloat32;  // weights and compute: float32, bfloat16 or float16
  torch::Device device = torch::kCPU;    // CPU or CUDA
};

// The root module: text_model (and text_projection, without bias, when with_projection).
class CLIPTextModelImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for an invalid config or an unsupported dtype.
  explicit CLIPTextModelImpl(const CLIPTextModelOptions& options);

  // transformers' CLIPTextModel(input_ids, attention_mask, output_hidden_states=...):
  // input_ids [B, L] (int64 on the model's device, every id in [0, vocab_size), L <=
  // max_position_embeddings), attention_mask [B, L] (float on the model's device, 1 = token,
  // 0 = padding) or undefined. `pooled` is pooler_output, or text_embeds with the projection;
  // hidden_states (when asked): the embeddings and each layer's output, the last one before
  // final_layer_norm. Runs under torch::InferenceMode (unless differentiable()). Inputs are not
  // validated here
  // (ClipTextEncoder does); LibTorch throws c10::Error on a mismatch.
  TextEncoderOutput Encode(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                           bool output_hidden_states) const;

  const CLIPTextConfig& config() const { return options_.config; }
  bool with_projection() const { return options_.with_projection; }

  // Differentiable mode (training): when on, forward passes run outside InferenceMode with
  // autograd-supported, out-of-place operations only, so gradients flow to the parameters (and
  // inputs); the results equal the default path's (float32) up to rounding. Off by default.
  // Not thread-safe: set it before running, never while forwards run.
  //
  // The float32 forward already uses out-of-place operations only, so the mode changes nothing
  // but the InferenceMode guard; every output of Encode() (last_hidden_state, pooled,
  // hidden_states) carries gradients. Parameters are created with requires_grad false; setting
  // the mode also sets every parameter's requires_grad to `on` (freeze parameters selectively
  // afterwards). float32 models only: Encode() throws c10::Error in differentiable mode for a
  // 16-bit model (the CPU emulation rounds in place).
  void set_differentiable(bool on);
  bool differentiable() const { return differentiable_; }

  CLIPTextTransformer text_model{nullptr};
  Linear text_projection{nullptr};  // null unless with_projection

 private:
  CLIPTextModelOptions options_;
  bool differentiable_ = false;
};
TORCH_MODULE(CLIPTextModel);

// ---------------------------------------------------------------------------------------------

// The ds::DiffusionModel for CLIPTextModel / CLIPTextModelWithProjection: the module plus
// validated entry points. It is also a ds::TextEncoder (handlers/text_encoder.h), which is how
// pipelines of other model folders reach it.
class ClipTextEncoder final : public ds::DiffusionModel, public ds::TextEncoder {
 public:
  // `class_name`: "CLIPTextModel" or "CLIPTextModelWithProjection". INVALID_ARGUMENT for an
  // invalid config (naming the field), an unsupported dtype (float32/bfloat16/float16 only) or
  // device type (cpu/cuda only); UNIMPLEMENTED for CUDA when LibTorch or the machine has none;
  // INTERNAL if LibTorch fails (e.g. out of memory).
  static absl::StatusOr<std::unique_ptr<ClipTextEncoder>> Create(const nlohmann::json& config,
                                                                 const ds::ModelOptions& options,
                                                                 const std::string& class_name);

  const std::string& class_name() const override { return class_name_; }
  const nlohmann::json& config() const override { return config_json_; }
  const ds::ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *model_; }
  const torch::nn::Module& module() const override { return *model_; }
  // "input_ids"; optional "attention_mask" (transformers' forward arguments).
  std::vector<std::string> required_inputs() const override;
  std::vector<std::string> optional_inputs() const override;

  // last_hidden_state of EncodeTokens. INVALID_ARGUMENT naming the input for a missing or unknown
  // one and as EncodeTokens; UNIMPLEMENTED for a non-empty `lora` (no LoRA handler is wired).
  using ds::DiffusionModel::Forward;
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const ds::LoraContext* lora) const override;

  // ds::TextEncoder (see there for the errors). hidden_states' last entry is before
  // final_layer_norm (as transformers returns it).
  absl::StatusOr<TextEncoderOutput> EncodeTokens(const torch::Tensor& input_ids,
                                                 const torch::Tensor& attention_mask,
                                                 bool output_hidden_states = false) const override;
  int64_t hidden_size() const override { return clip_config().hidden_size; }
  int64_t max_position_embeddings() const override {
    return clip_config().max_position_embeddings;
  }

  const CLIPTextConfig& clip_config() const { return model_->config(); }
  const CLIPTextModel& clip() const { return model_; }
  // The module, e.g. to set_differentiable() (exclusive access, as for loading weights).
  CLIPTextModel& clip() { return model_; }

 private:
  ClipTextEncoder(std::string class_name, nlohmann::json config_json, ds::ModelOptions options,
                  CLIPTextModel model);
  std::string class_name_;
  nlohmann::json config_json_;
  ds::ModelOptions options_;
  CLIPTextModel model_;
};

// The registry-facing factories.
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateCLIPTextModel(
    const nlohmann::json& config, const ds::ModelOptions& options);
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateCLIPTextModelWithProjection(
    const nlohmann::json& config, const ds::ModelOptions& options);

// What transformers accepts in a CLIP text checkpoint besides the module's own names, removed
// before a strict load: "text_model.embeddings.position_ids" (a buffer older transformers
// versions saved; it is always arange). Only drops entries.
absl::StatusOr<TensorMap> AdaptClipStateDict(TensorMap state_dict);

}  // namespace ds::clip
