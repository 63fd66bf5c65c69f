// FluxConfig: the parameters of diffusers' FluxTransformer2DModel (its config.json).
//
// Pure data + JSON conversion, no LibTorch. Thread-safe as a value type.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::flux {

// Field names, meanings and defaults are exactly those of FluxTransformer2DModel.__init__.
struct FluxConfig {
  int64_t patch_size = 1;    // proj_out emits patch_size² · out_channels values per token
  int64_t in_channels = 64;  // per-token input width (packed latents)
  std::optional<int64_t> out_channels;  // null in config.json means "same as in_channels"
  int64_t num_layers = 19;              // double-stream blocks (transformer_blocks)
  int64_t num_single_layers = 38;       // single-stream blocks (single_transformer_blocks)
  int64_t attention_head_dim = 128;
  int64_t num_attention_heads = 24;
  int64_t joint_attention_dim = 4096;   // width of encoder_hidden_states (T5)
  int64_t pooled_projection_dim = 768;  // width of pooled_projections (CLIP)
  bool guidance_embeds = false;         // guidance-distilled variant (dev): a guidance input
  std::vector<int64_t> axes_dims_rope = {16, 56, 56};  // RoPE dims per id column

  // num_attention_heads · attention_head_dim.
  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  // out_channels, or in_channels when unset.
  int64_t resolved_out_channels() const { return out_channels.value_or(in_channels); }

  // OK, or INVALID_ARGUMENT naming the first bad field: every size must be positive (the two layer
  // counts may be 0), each axes_dims_rope entry positive and even, and their sum equal to
  // attention_head_dim.
  absl::Status Validate() const;

  // Parses a diffusers config.json object: absent keys take the defaults above, keys starting with
  // '_' (such as "_class_name") and unknown keys are ignored, as diffusers does. INVALID_ARGUMENT
  // naming the field for a value of the wrong type (e.g. a non-integer size), and for anything
  // Validate() rejects. If "_class_name" is present it must be "FluxTransformer2DModel".
  static absl::StatusOr<FluxConfig> FromJson(const nlohmann::json& json);

  // The normalized config: every field present (out_channels as given, null when unset), plus
  // "_class_name": "FluxTransformer2DModel". FromJson(ToJson()) round-trips.
  nlohmann::json ToJson() const;
};

inline constexpr char kFluxClassName[] = "FluxTransformer2DModel";

}  // namespace ds::flux
