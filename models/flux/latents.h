// Flux latent geometry, as diffusers' FluxPipeline lays it out (pipeline_flux.py): the VAE latent
// [B, C, h, w] (h = 2 * (height / (2 s)), s = the VAE's scale factor) is cut into 2x2 patches and
// packed into a token sequence [B, (h/2) * (w/2), 4 C] whose token (r, c) carries its position as
// the image id [0, r, c]; text tokens have id [0, 0, 0].
//
// All functions are pure (no state) and thread-safe. Tensors come back on the input's device
// (ids: on `device`) in the dtype stated.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::flux {

// The VAE's spatial scale factor from its config.json as FluxPipeline derives it:
// 2 ** (len(block_out_channels) - 1) (8 for the FLUX.1 VAE). INVALID_ARGUMENT naming the field when
// block_out_channels is missing, not a non-empty array, or longer than 31 entries.
absl::StatusOr<int64_t> VaeScaleFactor(const nlohmann::json& vae_config);

// OK when `height` and `width` (pixels) are positive multiples of 2 * vae_scale_factor (16 for
// FLUX.1). Otherwise INVALID_ARGUMENT naming the offending dimension, its value and the nearest
// valid size (both neighbours on a tie), e.g. "height 1000 is not a multiple of 16 (2 x the VAE
// scale factor 8); the nearest valid heights are 992 and 1008". INVALID_ARGUMENT as well for
// vae_scale_factor < 1.
absl::Status ValidateImageSize(int64_t height, int64_t width, int64_t vae_scale_factor);

// The unpacked latent (noise) shape [batch, num_channels_latents, 2 * (height / (2 s)),
// 2 * (width / (2 s))] for an image of height x width pixels; num_channels_latents is the
// transformer's in_channels / 4. INVALID_ARGUMENT for sizes ValidateImageSize rejects or
// batch / num_channels_latents < 1.
absl::StatusOr<std::vector<int64_t>> LatentShape(int64_t batch, int64_t num_channels_latents,
                                                 int64_t height, int64_t width,
                                                 int64_t vae_scale_factor);

// The packed sequence length (h/2) * (w/2) of an image of height x width pixels: the
// image_seq_len FluxPipeline gives calculate_shift. Errors as ValidateImageSize.
absl::StatusOr<int64_t> PackedSequenceLength(int64_t height, int64_t width,
                                             int64_t vae_scale_factor);

// FluxPipeline._pack_latents: [B, C, h, w] -> [B, (h/2) * (w/2), 4 C], token index r * (w/2) + c,
// channel index ch * 4 + dy * 2 + dx. Same dtype and device. INVALID_ARGUMENT for a tensor that
// is not 4-D or has an odd h or w; INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> PackLatents(const torch::Tensor& latents);

// FluxPipeline._unpack_latents: [B, N, 4 C] -> [B, C, h, w] with h = 2 * (height / (2 s)),
// w = 2 * (width / (2 s)) (floored as diffusers does; validate sizes with ValidateImageSize).
// INVALID_ARGUMENT when the tensor is not 3-D, its last dimension is not a multiple of 4, N is not
// (h/2) * (w/2), or height, width, s < 1 give an empty grid; INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> UnpackLatents(const torch::Tensor& packed, int64_t height,
                                            int64_t width, int64_t vae_scale_factor);

// FluxPipeline._prepare_latent_image_ids(B, h/2, w/2): [(h/2) * (w/2), 3] rows [0, r, c], built in
// float32 and then cast to `dtype` (as diffusers does; bfloat16 rounds coordinates above 256).
// INVALID_ARGUMENT for a dimension < 1; INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> LatentImageIds(int64_t packed_height, int64_t packed_width,
                                             torch::Dtype dtype, torch::Device device);

// FluxPipeline's text ids: zeros [num_tokens, 3]. INVALID_ARGUMENT for num_tokens < 1.
absl::StatusOr<torch::Tensor> TextIds(int64_t num_tokens, torch::Dtype dtype, torch::Device device);

}  // namespace ds::flux
