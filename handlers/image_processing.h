// Model-agnostic image preprocessing for image encoders: transformers' CLIPImageProcessor as it
// runs on a PIL image (transformers 43ffb785 / 4.43, Pillow 9.4), and the Pillow pieces it relies
// on, reproduced bit for bit.
//
// CLIPImageProcessor.preprocess on one RGB uint8 image:
//   1. resize (PIL `Image.resize` on the uint8 image, resample = config.resample, BICUBIC for
//      CLIP) to ClipResizeOutputSize(): the shortest edge becomes size["shortest_edge"] and the
//      long edge int(shortest_edge * long / short) (Python float division, truncated), or exactly
//      (height, width) when the config gives those;
//   2. center crop to crop_size (offsets floor((in - crop) / 2); an image smaller than the crop is
//      zero-padded, transformers' ceil((crop - in) / 2) before);
//   3. rescale: float32(float64(x) * rescale_factor);
//   4. normalize: (x - float32(mean_c)) / float32(std_c), in float32;
//   5. channels first: pixel_values [3, crop_h, crop_w] float32.
//
// Pillow's resampling (src/libImaging/Resample.c) is separable: a horizontal pass, then a vertical
// one, each rounding to uint8. Per output pixel, float64 filter weights over the input pixels
// within `support * max(1, in/out)` of the pixel centre (normalized to sum 1) are converted to
// fixed point with 22 fractional bits (PRECISION_BITS = 32 - 8 - 2, rounded half away from zero);
// the accumulator starts at 2^21 (rounding), and the result is `acc >> 22` clipped to [0, 255].
// A pass whose size and box do not change is skipped (no rounding happens in it).
//
// Thread-safety: every function is reentrant.
#pragma once

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds {

// PIL.Image.Resampling values (transformers' PILImageResampling, the "resample" config field).
enum class PilResample : int {
  kNearest = 0,
  kLanczos = 1,
  kBilinear = 2,
  kBicubic = 3,
  kBox = 4,
  kHamming = 5,
};

// Resizes an RGB uint8 image [H, W, 3] (any strides, CPU) to [height, width, 3] uint8 exactly as
// Pillow 9.4's Image.resize((width, height), resample) does for an "RGB" image (no reducing_gap,
// full box). Supported filters: BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS (the convolution filters);
// NEAREST is UNIMPLEMENTED. INVALID_ARGUMENT naming the shape for a tensor that is not [H, W, 3]
// uint8 with H, W >= 1 or for a target size < 1 or > 2^24 per side.
absl::StatusOr<torch::Tensor> PilResize(const torch::Tensor& rgb, int64_t height, int64_t width,
                                        PilResample resample = PilResample::kBicubic);

// transformers' get_resize_output_image_size(image, size=shortest_edge, default_to_square=False):
// (height, width) with the shorter input side equal to `shortest_edge` and the longer one
// int(shortest_edge * long / short); a square input stays square. Inputs must be >= 1.
std::pair<int64_t, int64_t> ClipResizeOutputSize(int64_t height, int64_t width,
                                                 int64_t shortest_edge);

// transformers' image_transforms.center_crop on an [H, W, C] image (any dtype; CPU): the
// [crop_height, crop_width, C] window at top = floor((H - crop_height) / 2), left likewise; where
// the crop is larger than the image the missing rows/columns are zeros, placed as transformers
// pads (ceil((crop - in) / 2) before the image). INVALID_ARGUMENT for a non-3-D tensor or a crop
// size < 1.
absl::StatusOr<torch::Tensor> CenterCrop(const torch::Tensor& image, int64_t crop_height,
                                         int64_t crop_width);

// The fields of a `preprocessor_config.json` (CLIPImageProcessor; the legacy CLIPFeatureExtractor
// spelling reads the same). Defaults are CLIPImageProcessor()'s (CLIP ViT-L/14 at 224).
struct ClipImageProcessorConfig {
  bool do_convert_rgb = true;  // inputs are always decoded to RGB here; kept for round-tripping
  bool do_resize = true;
  // size: {"shortest_edge": N} (shortest_edge set) or {"height": H, "width": W} (resize_to set).
  // A bare integer N means {"shortest_edge": N}, as transformers' get_size_dict reads it.
  std::optional<int64_t> shortest_edge = 224;
  std::optional<std::pair<int64_t, int64_t>> resize_to;  // (height, width)
  PilResample resample = PilResample::kBicubic;
  bool do_center_crop = true;
  int64_t crop_height = 224;  // crop_size {"height", "width"}, or a bare integer for a square
  int64_t crop_width = 224;
  bool do_rescale = true;
  double rescale_factor = 1.0 / 255.0;
  bool do_normalize = true;
  std::array<double, 3> image_mean = {0.48145466, 0.4578275, 0.40821073};  // OpenAI CLIP
  std::array<double, 3> image_std = {0.26862954, 0.26130258, 0.27577711};

  // CLIPImageProcessor(size=image_size, crop_size=image_size): what diffusers' load_ip_adapter
  // builds when the pipeline has no feature_extractor (image_size = the image encoder's
  // config.image_size).
  static ClipImageProcessorConfig ForImageSize(int64_t image_size);

  // Parses a preprocessor_config.json object: absent keys take the defaults above, unknown keys
  // are ignored (as transformers does). INVALID_ARGUMENT naming the field for a wrong type, a size
  // that is neither form above, a size < 1, an unknown resample value, a mean/std that is not 3
  // numbers (a single number is repeated, as transformers does), a zero or non-finite std, or an
  // "image_processor_type" / "feature_extractor_type" other than CLIPImageProcessor /
  // CLIPFeatureExtractor.
  static absl::StatusOr<ClipImageProcessorConfig> FromJson(const nlohmann::json& json);
  // Reads `path` (a preprocessor_config.json) with FromJson. NOT_FOUND if absent; errors of
  // FromJson prefixed with the path.
  static absl::StatusOr<ClipImageProcessorConfig> FromFile(const std::string& path);

  // The pixel_values height and width this config produces for an input of (height, width).
  std::pair<int64_t, int64_t> OutputSize(int64_t height, int64_t width) const;
};

// The steps of one preprocessed image, for checking against the reference.
struct ClipPreprocessed {
  torch::Tensor resized;       // [h, w, 3] uint8 after resize (the input when !do_resize)
  torch::Tensor cropped;       // [ch, cw, 3] uint8 after center crop (= resized when !do_crop)
  torch::Tensor pixel_values;  // [3, ch, cw] float32, channels first
};

// CLIPImageProcessor.preprocess of one RGB uint8 image [H, W, 3] (CPU). INVALID_ARGUMENT naming
// the shape for another layout or dtype; UNIMPLEMENTED for resample NEAREST.
absl::StatusOr<ClipPreprocessed> PreprocessClipImage(const torch::Tensor& rgb,
                                                     const ClipImageProcessorConfig& config);

// pixel_values [1, 3, ch, cw] of one image: PreprocessClipImage(...).pixel_values[None], what
// `processor(image, return_tensors="pt").pixel_values` returns.
absl::StatusOr<torch::Tensor> ClipPixelValues(const torch::Tensor& rgb,
                                              const ClipImageProcessorConfig& config);

// Decodes image bytes to RGB uint8 [H, W, 3] as `PIL.Image.open(f).convert("RGB")` does for the
// formats supported here: PNG of any color type and bit depth (8-bit data exactly; an alpha
// channel is dropped, not composited, as PIL's RGBA -> RGB conversion does; palettes and gray are
// expanded) and JPEG (baseline or progressive, YCbCr / RGB / grayscale, decoded by libjpeg with
// its defaults — islow IDCT, fancy upsampling — as PIL's JPEG plugin does; CMYK/YCCK JPEGs are
// refused). INVALID_ARGUMENT for bytes that are not a supported image ("not a PNG or JPEG image")
// or a corrupt one, naming the decoder's complaint. Differences from PIL, by design of libpng's
// simplified reader: 16-bit samples are rounded to 8 bits (PIL truncates: at most one level), and
// a gAMA chunk far from sRGB is converted to sRGB (PIL ignores it). With `max_pixels` > 0, an
// image of more pixels is INVALID_ARGUMENT (naming its size) before anything is decoded, so a
// small file cannot expand into a huge buffer.
absl::StatusOr<torch::Tensor> DecodeImageToRgb(std::string_view bytes, int64_t max_pixels = 0);

}  // namespace ds
