// The AutoencoderKL single-file handler: original LDM/BFL VAE layout (`ae.safetensors`,
// `first_stage_model.*` of SD checkpoints) <-> diffusers naming, from key names and shapes only.
//
// The original names (encoder.down.i.block.j, decoder.up.{n-1-i}.block.j, mid.block_1/attn_1/
// block_2, nin_shortcut, norm_out, upsample/downsample.conv, attention q/k/v/proj_out as 1x1 conv
// weights [C, C, 1, 1]) map to diffusers' (encoder.down_blocks.i.resnets.j,
// decoder.up_blocks.i.resnets.j, mid_block.resnets.0/attentions.0/resnets.1, conv_shortcut,
// conv_norm_out, downsamplers.0/upsamplers.0.conv, to_q/to_k/to_v/to_out.0 as linear [C, C]).
// The plan is generated from the config derived from the weights (VaeParameters), so any number of
// levels, layers per block and channel widths maps; every key and shape is checked.
//
// Derived from the weights: in/out/latent channels, block_out_channels, layers_per_block, the mid
// blocks' attention, quant/post-quant convs. Not recorded in weights (listed as assumed, callers
// override with a config): norm_num_groups (32), act_fn (silu), scaling_factor / shift_factor and
// sample_size (FLUX.1's 0.3611 / 0.1159 / 1024 for the "flux-vae" variant: 16 latent channels and
// no quant convs; diffusers' class defaults 0.18215 / none / 32 for "ldm-vae"), latents_mean/std
// (null), force_upcast (true).
//
// Pure (no LibTorch); the handler object is immutable and thread-safe.
#pragma once

#include "handlers/weight_mapping.h"

namespace ds::autoencoder_kl {

class VaeWeightMapping : public WeightMappingHandler {
 public:
  std::vector<std::string> VariantNames() const override;
  std::vector<std::string> MarkerKeys() const override;
  // A match needs decoder.conv_in.weight and the first decoder mid-block resnet in one naming.
  absl::StatusOr<std::optional<WeightMappingDetection>> Detect(
      const KeyShapes& keys) const override;
  absl::StatusOr<MappingPlan> PlanToDiffusers(
      const KeyShapes& keys, const WeightMappingDetection& detection) const override;
  absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes& keys) const override;
  // "vae." (ComfyUI / all-in-one FLUX files) and "first_stage_model." (LDM / SD checkpoints).
  std::vector<std::string> ComponentPrefixes() const override;
};

// The handler object the AutoencoderKL spec wires (static lifetime).
const VaeWeightMapping& VaeWeightMappingHandler();

}  // namespace ds::autoencoder_kl
