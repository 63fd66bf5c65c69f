// CLIPVisionModelWithProjection (transformers) in LibTorch: the CLIP ViT image tower with its
// projection, which turns preprocessed images into the `image_embeds` IP-Adapters condition on.
//
// Every parameter is registered under its transformers name (vision_model.embeddings.
// class_embedding, vision_model.pre_layrnorm.weight (sic), vision_model.encoder.layers.0.self_attn.
// q_proj.weight, ..., visual_projection.weight), so an `image_encoder/` folder (config.json +
// model.safetensors) loads strictly with no renaming. The numerics follow transformers 43ffb785
// (4.43) CLIPVisionModelWithProjection with eager attention:
//   embeddings = cat(class_embedding, patch_embedding(x) (conv, stride = kernel = patch_size, no
//     bias) flattened to tokens) + position_embedding (no interpolation: input must be image_size);
//   pre_layrnorm; each encoder layer is pre-norm: x + attn(layer_norm1(x)), then
//     x + fc2(act(fc1(layer_norm2(x)))); attention scales q by head_dim^-0.5 before q·kᵀ, softmax
//     in the activation dtype, no mask;
//   last_hidden_state = the last layer's output (no final norm); pooler_output =
//     post_layernorm(last_hidden_state[:, 0]); image_embeds = visual_projection(pooler_output)
//     (no bias). LayerNorm eps = config.layer_norm_eps.
//
// Weights are created directly in the requested dtype and device (LayerNorm scales 1, everything
// else 0, or uninitialized under ScopedUninitializedParameters); load a state dict (or call
// InitRandomWeights) before running. On CPU, bfloat16/float16 are emulated as in the Flux
// transformer (float32 arithmetic rounded to the model dtype after every operation).
//
// Thread-safety: forward() / Encode() are const and may run concurrently; they only read the
// parameters. Loading weights needs exclusive access.
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
#include "handlers/image_encoder.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"
#include "models/clip_vision/config.h"

namespace ds::clip_vision {

// torch.nn.Linear's parameters: weight [out, in], bias [out] (undefined without bias).
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const torch::TensorOptions& options);
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(Linear);

// torch.nn.LayerNorm(dim, eps) with affine parameters: weight (1) and bias (0) [dim].
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, double eps, const torch::TensorOptions& options);
  double eps;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(LayerNorm);

// A module holding one parameter named "weight" (nn.Conv2d without bias, nn.Embedding).
class WeightImpl : public torch::nn::Module {
 public:
  WeightImpl(at::IntArrayRef shape, const torch::TensorOptions& options);
  torch::Tensor weight;
};
TORCH_MODULE(Weight);

// CLIPVisionEmbeddings: class_embedding [D], patch_embedding.weight [D, C, p, p],
// position_embedding.weight [num_positions, D].
class EmbeddingsImpl : public torch::nn::Module {
 public:
  EmbeddingsImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  torch::Tensor class_embedding;
  Weight patch_embedding{nullptr};
  Weight position_embedding{nullptr};
};
TORCH_MODULE(Embeddings);

// CLIPAttention: k_proj, v_proj, q_proj, out_proj.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  int64_t heads;
  Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(Attention);

// CLIPMLP: fc1 (D -> intermediate), activation, fc2.
class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Mlp);

// CLIPEncoderLayer: self_attn, layer_norm1, mlp, layer_norm2.
class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  CLIPEncoderLayerImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  Attention self_attn{nullptr};
  LayerNorm layer_norm1{nullptr};
  Mlp mlp{nullptr};
  LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

// CLIPEncoder: layers.
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  torch::nn::ModuleList layers{nullptr};
  std::vector<CLIPEncoderLayer> layer_list;  // typed views of `layers`
};
TORCH_MODULE(Encoder);

// CLIPVisionTransformer: embeddings, pre_layrnorm, encoder, post_layernorm.
class VisionTransformerImpl : public torch::nn::Module {
 public:
  VisionTransformerImpl(const ClipVisionConfig& config, const torch::TensorOptions& options);
  Embeddings embeddings{nullptr};
  LayerNorm pre_layrnorm{nullptr};
  Encoder encoder{nullptr};
  LayerNorm post_layernorm{nullptr};
};
TORCH_MODULE(VisionTransformer);

// transformers' CLIPVisionModelWithProjection output.
struct ClipVisionOutput {
  torch::Tensor image_embeds;       // [B, projection_dim]
  torch::Tensor last_hidden_state;  // [B, num_positions, hidden_size]
  torch::Tensor pooler_output;      // [B, hidden_size]
  // Only when asked for: the embeddings after pre_layrnorm, then every layer's output
  // (num_hidden_layers + 1 entries; the last equals last_hidden_state).
  std::vector<torch::Tensor> hidden_states;
};

struct ClipVisionOptions {
  ClipVisionConfig config;               // must be valid
  torch::Dtype dtype = torch::kFloat32;  // float32, bfloat16 or float16
  torch::Device device = torch::kCPU;
};

class ClipVisionModelWithProjectionImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for an invalid config or an unsupported dtype.
  explicit ClipVisionModelWithProjectionImpl(const ClipVisionOptions& options);

  // pixel_values [B, num_channels, image_size, image_size] (any float dtype and device) -> the
  // outputs in the model dtype. Runs under torch::InferenceMode. Shapes are not validated here
  // (ClipVisionModel does); LibTorch throws c10::Error on a mismatch.
  ClipVisionOutput forward(const torch::Tensor& pixel_values, bool output_hidden_states) const;

  const ClipVisionConfig& config() const { return options_.config; }

  VisionTransformer vision_model{nullptr};
  Linear visual_projection{nullptr};

 private:
  ClipVisionOptions options_;
};
TORCH_MODULE(ClipVisionModelWithProjection);

// The ds::DiffusionModel (and ds::ImageEncoder) for CLIPVisionModelWithProjection.
class ClipVisionModel final : public ds::DiffusionModel, public ds::ImageEncoder {
 public:
  // INVALID_ARGUMENT for an invalid config (naming the field), an unsupported dtype
  // (float32/bfloat16/float16) or device type (cpu/cuda); UNIMPLEMENTED for CUDA when LibTorch or
  // the machine has none; INTERNAL if LibTorch fails.
  static absl::StatusOr<std::unique_ptr<ClipVisionModel>> Create(const nlohmann::json& config,
                                                                 const ds::ModelOptions& options);

  const std::string& class_name() const override;
  const nlohmann::json& config() const override { return config_json_; }
  const ds::ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *model_; }
  const torch::nn::Module& module() const override { return *model_; }
  // "pixel_values" (transformers' forward argument); nothing optional.
  std::vector<std::string> required_inputs() const override;
  std::vector<std::string> optional_inputs() const override;

  // image_embeds of inputs["pixel_values"]. INVALID_ARGUMENT naming the input for a missing or
  // unknown one or a bad shape (as Encode); UNIMPLEMENTED for a non-empty `lora` (no LoRA handler
  // is wired); INTERNAL if LibTorch fails.
  using ds::DiffusionModel::Forward;
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const ds::LoraContext* lora) const override;

  // Every output. INVALID_ARGUMENT naming `pixel_values` and its shape unless it is a defined
  // floating tensor [B, num_channels, image_size, image_size] with B >= 1; INTERNAL if LibTorch
  // fails.
  absl::StatusOr<ClipVisionOutput> Encode(const torch::Tensor& pixel_values,
                                          bool output_hidden_states = false) const;

  // ds::ImageEncoder.
  absl::StatusOr<torch::Tensor> EncodeImages(const torch::Tensor& pixel_values) const override;
  int64_t image_size() const override { return vision_config().image_size; }
  int64_t num_channels() const override { return vision_config().num_channels; }
  int64_t image_embed_dim() const override { return vision_config().projection_dim; }

  const ClipVisionConfig& vision_config() const { return model_->config(); }
  const ClipVisionModelWithProjection& model() const { return model_; }

 private:
  ClipVisionModel(nlohmann::json config_json, ds::ModelOptions options,
                  ClipVisionModelWithProjection model);
  nlohmann::json config_json_;
  ds::ModelOptions options_;
  ClipVisionModelWithProjection model_;
};

// The registry-facing factory: ClipVisionModel::Create as a ds::DiffusionModel.
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateClipVisionModel(
    const nlohmann::json& config, const ds::ModelOptions& options);

// What transformers' from_pretrained accepts besides the module's own names, applied before the
// strict load: drops `vision_model.embeddings.position_ids` (a buffer older checkpoints saved) and
// the text tower of a full CLIPModel checkpoint (`text_model.*`, `text_projection.*`,
// `logit_scale`), as CLIPVisionModelWithProjection.from_pretrained ignores them. Only drops keys.
absl::StatusOr<TensorMap> AdaptClipVisionStateDict(TensorMap state_dict);

// Loads a transformers folder (config.json + model.safetensors, sharded or not) strictly after
// AdaptClipVisionStateDict; a pipeline or IP-Adapter root whose `image_encoder/` subfolder is one
// also works. NOT_FOUND when neither has the files; INVALID_ARGUMENT for a bad config (naming the
// field) or a state dict that does not match (missing / unexpected / mismatched keys named).
absl::StatusOr<std::unique_ptr<ClipVisionModel>> LoadClipVisionModel(
    const std::string& dir, const ds::ModelOptions& options = {});

}  // namespace ds::clip_vision
