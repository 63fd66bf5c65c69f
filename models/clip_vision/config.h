// ClipVisionConfig: the parameters of transformers' CLIPVisionConfig (the config.json of a
// CLIPVisionModelWithProjection folder, e.g. an IP-Adapter `image_encoder/`), and the state-dict
// layout they imply.
//
// Pure data + JSON conversion, no LibTorch. Thread-safe as a value type.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::clip_vision {

inline constexpr char kClipVisionClassName[] = "CLIPVisionModelWithProjection";
inline constexpr char kClipVisionModelType[] = "clip_vision_model";

// Field names, meanings and defaults are exactly those of CLIPVisionConfig.__init__ (transformers
// 43ffb785): the ViT-B/32 vision tower.
struct ClipVisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;  // MLP width
  int64_t projection_dim = 512;      // width of image_embeds (visual_projection output)
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;  // must divide hidden_size
  int64_t num_channels = 3;
  int64_t image_size = 224;  // the only input size (position embeddings are learned per patch)
  int64_t patch_size = 32;   // must divide image_size
  // MLP activation: "quick_gelu" (x·sigmoid(1.702x), OpenAI CLIP), "gelu" (erf), "gelu_new" /
  // "gelu_pytorch_tanh" / "gelu_fast" (tanh approximation), "relu", "silu" / "swish".
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  // Tokens per image: the class token plus one per patch.
  int64_t num_positions() const { return num_patches() + 1; }

  // OK, or INVALID_ARGUMENT naming the first bad field: sizes positive, num_attention_heads
  // dividing hidden_size, patch_size dividing image_size, a known hidden_act, a finite positive
  // layer_norm_eps.
  absl::Status Validate() const;

  // Parses a transformers config.json: a CLIPVisionConfig ("model_type": "clip_vision_model"),
  // or a full CLIPConfig ("model_type": "clip"), whose "vision_config" is used as transformers'
  // CLIPVisionConfig.from_pretrained does. Absent keys take the defaults above; unknown keys (and
  // the dropout/initializer fields, which do not change inference) are ignored. INVALID_ARGUMENT
  // naming the field for a wrong type, another model_type, an "architectures" list without
  // CLIPVisionModelWithProjection (for a clip_vision_model config), and anything Validate()
  // rejects.
  static absl::StatusOr<ClipVisionConfig> FromJson(const nlohmann::json& json);

  // The normalized config as transformers writes it: every field above plus "model_type" and
  // "architectures": ["CLIPVisionModelWithProjection"]. FromJson(ToJson()) round-trips.
  nlohmann::json ToJson() const;
};

// Every parameter of CLIPVisionModelWithProjection as `config` describes it (name and shape, in
// module order): vision_model.embeddings.{class_embedding, patch_embedding.weight,
// position_embedding.weight}, vision_model.pre_layrnorm.*, vision_model.encoder.layers.N.*,
// vision_model.post_layernorm.*, visual_projection.weight. `config` must be valid.
std::vector<std::pair<std::string, std::vector<int64_t>>> ClipVisionParameters(
    const ClipVisionConfig& config);

}  // namespace ds::clip_vision
