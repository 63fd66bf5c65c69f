// ImageEncoder: the model-agnostic face of an image encoder (CLIPVisionModelWithProjection, ...)
// as pipelines use it for image prompts (IP-Adapter). A pipeline of one model family reaches the
// image encoder of another model folder only through this interface (models/ folders never include
// each other): it loads the encoder through the registry as a ds::DiffusionModel
// (LoadModelFromFolder of an `image_encoder/` folder) and dynamic_casts it to ImageEncoder, as it
// does with LatentImageDecoder (image_decoder.h).
//
// Images are preprocessed by the caller (handlers/image_processing.h: ClipPixelValues with the
// pipeline's `feature_extractor/preprocessor_config.json`, or
// ClipImageProcessorConfig::ForImageSize(image_size()) as diffusers' load_ip_adapter builds it).
//
// Thread-safety: implementations are immutable once loaded; every method may run concurrently.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "absl/status/statusor.h"

namespace ds {

class ImageEncoder {
 public:
  virtual ~ImageEncoder() = default;

  // Encodes pixel_values [B, num_channels(), image_size(), image_size()] (any floating dtype and
  // device; B >= 1) to image_embeds [B, image_embed_dim()] in the encoder's dtype and device
  // (transformers' CLIPVisionModelWithProjection(pixel_values).image_embeds, what diffusers'
  // encode_image feeds an IP-Adapter). INVALID_ARGUMENT naming `pixel_values` and its shape for a
  // tensor that is not so shaped or not floating; INTERNAL if LibTorch fails.
  virtual absl::StatusOr<torch::Tensor> EncodeImages(const torch::Tensor& pixel_values) const = 0;

  // The square input size the encoder takes (config.image_size).
  virtual int64_t image_size() const = 0;
  // Channels of pixel_values (config.num_channels; 3 for RGB).
  virtual int64_t num_channels() const = 0;
  // Width of image_embeds (config.projection_dim).
  virtual int64_t image_embed_dim() const = 0;
};

}  // namespace ds
