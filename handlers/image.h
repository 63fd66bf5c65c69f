// Model-agnostic image output: diffusers' VaeImageProcessor postprocessing of decoded images and
// PNG encoding/decoding (libpng).
//
// Numerics follow diffusers (main at 58eb52c): postprocess(output_type="pt") is
// denormalize = (x * 0.5 + 0.5).clamp(0, 1) in the decoder's dtype; what PIL receives is
// numpy's (x.float() * 255).round().astype(uint8) (round half to even) of the [B, H, W, C]
// permutation.
//
// Thread-safety: every function is reentrant.
#pragma once

#include <torch/types.h>

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ds {

// [B, C, H, W] decoded images (floating, any device; values roughly in [-1, 1]) -> the same shape
// in [0, 1] (diffusers' "pt" output), float32 on the CPU, computed in the input's dtype as
// diffusers does. INVALID_ARGUMENT naming the shape for a non-4-D, empty or non-floating tensor;
// INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> DenormalizeImages(const torch::Tensor& images);

// [B, C, H, W] images in [0, 1] (floating, any device) -> [B, H, W, C] uint8 on the CPU:
// round-half-to-even of x·255 computed in float32. INVALID_ARGUMENT for a bad shape or dtype, or a
// value outside [0, 1] or NaN (naming the offending value); INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> ImagesToUint8(const torch::Tensor& images);

// One [H, W, 3] uint8 RGB image (any layout/device) -> the bytes of an 8-bit RGB PNG (no
// interlacing, zlib level 6, no time or text chunks): the same pixels give the same bytes.
// INVALID_ARGUMENT for another dtype or shape (1..2^24 pixels per side); INTERNAL if libpng fails.
absl::StatusOr<std::string> EncodePng(const torch::Tensor& rgb);

// Decodes PNG bytes of any color type and bit depth to [H, W, 3] uint8 RGB (alpha dropped by
// compositing on black, 16-bit scaled to 8, palettes and gray expanded, as libpng's simplified
// reader does). INVALID_ARGUMENT naming libpng's complaint for bytes that are not a valid PNG.
absl::StatusOr<torch::Tensor> DecodePng(std::string_view bytes);

// Decoded images [B, 3, H, W] in [-1, 1] -> one PNG per image (DenormalizeImages, ImagesToUint8,
// EncodePng). Errors as those functions.
absl::StatusOr<std::vector<std::string>> ImagesToPng(const torch::Tensor& images);

}  // namespace ds
