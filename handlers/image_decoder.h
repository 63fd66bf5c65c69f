// LatentImageDecoder: the model-agnostic face of a latent-to-image decoder (a VAE) as pipelines
// use it. A pipeline of one model family reaches the VAE of another model folder only through this
// interface (models/ folders never include each other): it loads the VAE through the registry as a
// ds::DiffusionModel and dynamic_casts it to LatentImageDecoder.
//
// The pipeline computes what it hands to DecodeLatents the way diffusers' pipelines do:
//   z = latents / latent_scaling_factor() + latent_shift_factor()
// (diffusers' vae.config.scaling_factor / shift_factor).
//
// Thread-safety: implementations are immutable once loaded; every method may run concurrently.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "absl/status/statusor.h"

namespace ds {

class LatentImageDecoder {
 public:
  virtual ~LatentImageDecoder() = default;

  // Decodes z [B, latent_channels(), h, w] (any floating dtype and device; already scaled and
  // shifted as above) to images [B, C, h * spatial_scale_factor(), w * spatial_scale_factor()] in
  // the decoder's dtype and device, values roughly in [-1, 1] (diffusers' vae.decode(z).sample).
  // INVALID_ARGUMENT naming `z` and its shape for a tensor that is not so shaped or not floating;
  // INTERNAL if LibTorch fails (e.g. out of memory).
  virtual absl::StatusOr<torch::Tensor> DecodeLatents(const torch::Tensor& z) const = 0;

  // diffusers' vae.config.scaling_factor (finite, non-zero).
  virtual double latent_scaling_factor() const = 0;
  // diffusers' vae.config.shift_factor; 0 when the config has none (null).
  virtual double latent_shift_factor() const = 0;
  // Pixels per latent along each axis (pipelines' vae_scale_factor: 8 for the FLUX.1 VAE).
  virtual int64_t spatial_scale_factor() const = 0;
  // Channels of the latents DecodeLatents takes (16 for the FLUX.1 VAE).
  virtual int64_t latent_channels() const = 0;
};

}  // namespace ds
