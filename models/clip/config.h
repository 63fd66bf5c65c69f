// CLIPTextConfig: the parameters of transformers' CLIPTextModel (its config.json), and the
// transformers state-dict layout they imply.
//
// Pure data + JSON conversion, no LibTorch. Thread-safe as a value type.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::clip {

inline constexpr char kCLIPTextModelClassName[] = "CLIPTextModel";
inline constexpr char kCLIPTextModelWithProjectionClassName[] = "CLIPTextModelWithProjection";

// Field names, meanings and defaults are exactly those of transformers' CLIPTextConfig (4.43).
struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;  // MLP width (fc1 output)
  int64_t projection_dim = 512;      // text_projection output (CLIPTextModelWithProjection only)
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;       // must divide hidden_size
  int64_t max_position_embeddings = 77;  // rows of the learned position table
  // MLP activation: "quick_gelu" (x·sigmoid(1.702x)), "gelu" (exact erf), "gelu_new" (tanh
  // approximation written out, transformers' NewGELUActivation), "gelu_pytorch_tanh" (torch's tanh
  // approximation), "relu", "silu"/"swish".
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  double attention_dropout = 0.0;  // training only; kept for the round trip
  double initializer_range = 0.02;
  double initializer_factor = 1.0;
  int64_t pad_token_id = 1;
  int64_t bos_token_id = 49406;
  // Pooling: transformers takes the hidden state at argmax(input_ids) when eos_token_id == 2
  // (configs written before the field was fixed, where the end-of-text token is the highest id),
  // otherwise at the first position whose id equals eos_token_id.
  int64_t eos_token_id = 49407;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  // Whether pooling uses transformers' legacy argmax(input_ids) rule.
  bool legacy_eos_pooling() const { return eos_token_id == 2; }

  // OK, or INVALID_ARGUMENT naming the first bad field: sizes positive, num_attention_heads
  // dividing hidden_size, a supported hidden_act, layer_norm_eps positive and finite.
  absl::Status Validate() const;

  // Parses a transformers config.json object: a CLIPTextConfig, or a CLIPConfig whose
  // "text_config" object is then used (model_type "clip"). Absent keys take the defaults above;
  // other keys (architectures, torch_dtype, transformers_version, ...) are ignored, as
  // transformers does. INVALID_ARGUMENT naming the field (as "CLIPTextConfig.<field>") for a
  // value of the wrong type and for anything Validate() rejects.
  static absl::StatusOr<CLIPTextConfig> FromJson(const nlohmann::json& json);

  // The normalized config: every field above, "model_type": "clip_text_model" and
  // "architectures": [`class_name`]. FromJson(ToJson()) round-trips.
  nlohmann::json ToJson(const std::string& class_name = kCLIPTextModelClassName) const;
};

// One parameter of the transformers state dict (name and shape).
struct ClipParameter {
  std::string name;  // "text_model.encoder.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;
};

// Every parameter of CLIPTextModel (or, with `with_projection`, CLIPTextModelWithProjection:
// plus "text_projection.weight" [projection_dim, hidden_size]) for `config` (must be valid), in
// module order. The models have no persistent buffers (position_ids is non-persistent).
std::vector<ClipParameter> ClipTextParameters(const CLIPTextConfig& config, bool with_projection);

}  // namespace ds::clip
