// AutoencoderKLConfig: the parameters of diffusers' AutoencoderKL (its config.json), and the
// diffusers state-dict layout they imply.
//
// Pure data + JSON conversion, no LibTorch. Thread-safe as a value type.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::autoencoder_kl {

inline constexpr char kAutoencoderKLClassName[] = "AutoencoderKL";
inline constexpr char kDownEncoderBlock2D[] = "DownEncoderBlock2D";
inline constexpr char kUpDecoderBlock2D[] = "UpDecoderBlock2D";

// Field names, meanings and defaults are exactly those of AutoencoderKL.__init__ (diffusers main at
// 58eb52c).
struct AutoencoderKLConfig {
  int64_t in_channels = 3;   // image channels the encoder takes
  int64_t out_channels = 3;  // image channels the decoder produces
  // One entry per resolution level; the only block types AutoencoderKL's Encoder/Decoder build are
  // DownEncoderBlock2D / UpDecoderBlock2D.
  std::vector<std::string> down_block_types = {kDownEncoderBlock2D};
  std::vector<std::string> up_block_types = {kUpDecoderBlock2D};
  std::vector<int64_t> block_out_channels = {64};  // channels per level, highest resolution first
  int64_t layers_per_block = 1;  // resnets per encoder level (decoder levels have one more)
  std::string act_fn = "silu";   // "silu" (or its alias "swish")
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;  // GroupNorm groups; must divide every block_out_channels entry
  // The training resolution, used by diffusers only for tiled decoding: an integer or [h, w].
  std::vector<int64_t> sample_size = {32};
  double scaling_factor = 0.18215;     // pipelines decode latents / scaling_factor + shift_factor
  std::optional<double> shift_factor;  // null: no shift
  std::optional<std::vector<double>> latents_mean;  // null or per-channel statistics (pipelines)
  std::optional<std::vector<double>> latents_std;
  bool force_upcast = true;    // pipelines run this VAE in float32 when the pipeline is float16
  bool use_quant_conv = true;  // 1x1 conv on the encoder's moments
  bool use_post_quant_conv = true;      // 1x1 conv on the latents before decoding
  bool mid_block_add_attention = true;  // self-attention in both mid blocks

  // Number of resolution levels (len(block_out_channels)).
  int64_t num_levels() const { return static_cast<int64_t>(block_out_channels.size()); }
  // Pixels per latent along each axis: 2^(levels - 1), as pipelines compute vae_scale_factor.
  int64_t scale_factor() const { return int64_t{1} << (num_levels() - 1); }

  // OK, or INVALID_ARGUMENT naming the first bad field: sizes positive, one block type per level
  // and every type known, act_fn silu/swish, norm_num_groups dividing every block_out_channels
  // entry, scaling_factor finite and non-zero, shift_factor finite, sample_size 1 or 2 entries.
  absl::Status Validate() const;

  // Parses a diffusers config.json object: absent keys take the defaults above, keys starting with
  // '_' (such as "_class_name") and unknown keys are ignored, as diffusers does. INVALID_ARGUMENT
  // naming the field for a value of the wrong type and for anything Validate() rejects (an unknown
  // block type is named with its position). If "_class_name" is present it must be
  // "AutoencoderKL".
  static absl::StatusOr<AutoencoderKLConfig> FromJson(const nlohmann::json& json);

  // The normalized config: every field present (nullable ones as null when unset, sample_size as
  // an integer when it has one entry), plus "_class_name": "AutoencoderKL". FromJson(ToJson())
  // round-trips.
  nlohmann::json ToJson() const;
};

// One parameter of AutoencoderKL's state dict in both namings.
struct VaeParameter {
  std::string diffusers;                // "decoder.mid_block.attentions.0.to_q.weight"
  std::string original;                 // BFL/LDM naming: "decoder.mid.attn_1.q.weight"
  std::vector<int64_t> shape;           // diffusers shape
  std::vector<int64_t> original_shape;  // original shape (1x1-conv attention weights: [C, C, 1, 1])
};

// Every parameter (weights and biases; AutoencoderKL has no buffers) of the model `config`
// describes, in module order, with both namings and shapes. The original (LDM/BFL) naming numbers
// decoder levels from the lowest resolution up: diffusers' decoder.up_blocks.i is
// decoder.up.{levels-1-i}. `config` must be valid.
std::vector<VaeParameter> VaeParameters(const AutoencoderKLConfig& config);

}  // namespace ds::autoencoder_kl
