#include "models/flux/latents.h"

#include <torch/torch.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::flux {
namespace {

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

absl::Status CheckDimension(const char* name, int64_t value, int64_t multiple,
                            int64_t vae_scale_factor) {
  if (value >= multiple && value % multiple == 0) return absl::OkStatus();
  std::string nearest;
  if (value < multiple) {
    nearest = absl::StrCat("the nearest valid ", name, " is ", multiple);
  } else {
    const int64_t lo = value / multiple * multiple, hi = lo + multiple;
    if (value - lo < hi - value) {
      nearest = absl::StrCat("the nearest valid ", name, " is ", lo);
    } else if (value - lo > hi - value) {
      nearest = absl::StrCat("the nearest valid ", name, " is ", hi);
    } else {
      nearest = absl::StrCat("the nearest valid ", name, "s are ", lo, " and ", hi);
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat(name, " ", value, " is not a positive multiple of ", multiple,
                   " (2 x the VAE scale factor ", vae_scale_factor, "); ", nearest));
}

}  // namespace

absl::StatusOr<int64_t> VaeScaleFactor(const nlohmann::json& vae_config) {
  auto it = vae_config.is_object() ? vae_config.find("block_out_channels") : vae_config.end();
  if (!vae_config.is_object() || it == vae_config.end()) {
    return absl::InvalidArgumentError("VAE config has no 'block_out_channels'");
  }
  if (!it->is_array() || it->empty() || it->size() > 31) {
    return absl::InvalidArgumentError(
        absl::StrCat("VAE config field 'block_out_channels' must be a non-empty array of at most "
                     "31 entries, got ",
                     it->dump()));
  }
  return int64_t{1} << (it->size() - 1);
}

absl::Status ValidateImageSize(int64_t height, int64_t width, int64_t vae_scale_factor) {
  if (vae_scale_factor < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("VAE scale factor must be >= 1, got ", vae_scale_factor));
  }
  const int64_t multiple = 2 * vae_scale_factor;
  RETURN_IF_ERROR(CheckDimension("height", height, multiple, vae_scale_factor));
  return CheckDimension("width", width, multiple, vae_scale_factor);
}

absl::StatusOr<std::vector<int64_t>> LatentShape(int64_t batch, int64_t num_channels_latents,
                                                 int64_t height, int64_t width,
                                                 int64_t vae_scale_factor) {
  if (batch < 1 || num_channels_latents < 1) {
    return absl::InvalidArgumentError(absl::StrCat("batch (", batch, ") and latent channels (",
                                                   num_channels_latents, ") must be >= 1"));
  }
  RETURN_IF_ERROR(ValidateImageSize(height, width, vae_scale_factor));
  const int64_t m = 2 * vae_scale_factor;
  return std::vector<int64_t>{batch, num_channels_latents, 2 * (height / m), 2 * (width / m)};
}

absl::StatusOr<int64_t> PackedSequenceLength(int64_t height, int64_t width,
                                             int64_t vae_scale_factor) {
  RETURN_IF_ERROR(ValidateImageSize(height, width, vae_scale_factor));
  const int64_t m = 2 * vae_scale_factor;
  return (height / m) * (width / m);
}

absl::StatusOr<torch::Tensor> PackLatents(const torch::Tensor& latents) {
  if (!latents.defined() || latents.dim() != 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "latents to pack must be [batch, channels, height, width], got ",
        latents.defined() ? ShapeString(latents) : std::string("an undefined tensor")));
  }
  const int64_t b = latents.size(0), c = latents.size(1), h = latents.size(2), w = latents.size(3);
  if (h % 2 != 0 || w % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("latents to pack need an even height and width, got ", ShapeString(latents)));
  }
  return TorchCall("packing latents", [&] {
    return latents.reshape({b, c, h / 2, 2, w / 2, 2})
        .permute({0, 2, 4, 1, 3, 5})
        .reshape({b, (h / 2) * (w / 2), c * 4});
  });
}

absl::StatusOr<torch::Tensor> UnpackLatents(const torch::Tensor& packed, int64_t height,
                                            int64_t width, int64_t vae_scale_factor) {
  if (!packed.defined() || packed.dim() != 3 || packed.size(2) % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("packed latents must be [batch, tokens, 4 x channels], got ",
                     packed.defined() ? ShapeString(packed) : std::string("an undefined tensor")));
  }
  if (vae_scale_factor < 1 || height < 1 || width < 1) {
    return absl::InvalidArgumentError(absl::StrCat("cannot unpack to ", height, " x ", width,
                                                   " pixels with VAE scale factor ",
                                                   vae_scale_factor));
  }
  const int64_t m = 2 * vae_scale_factor;
  const int64_t h2 = height / m, w2 = width / m;
  if (h2 < 1 || w2 < 1 || packed.size(1) != h2 * w2) {
    return absl::InvalidArgumentError(
        absl::StrCat("packed latents ", ShapeString(packed), " do not fit a ", height, " x ", width,
                     " image (VAE scale factor ", vae_scale_factor, ": ", h2, " x ", w2, " = ",
                     h2 * w2, " tokens)"));
  }
  const int64_t b = packed.size(0), c = packed.size(2) / 4;
  return TorchCall("unpacking latents", [&] {
    return packed.reshape({b, h2, w2, c, 2, 2})
        .permute({0, 3, 1, 4, 2, 5})
        .reshape({b, c, h2 * 2, w2 * 2});
  });
}

absl::StatusOr<torch::Tensor> LatentImageIds(int64_t packed_height, int64_t packed_width,
                                             torch::Dtype dtype, torch::Device device) {
  if (packed_height < 1 || packed_width < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("image id grid ", packed_height, " x ", packed_width, " has a dimension < 1"));
  }
  return TorchCall("building image ids", [&] {
    torch::Tensor ids = torch::zeros({packed_height, packed_width, 3}, torch::kFloat32);
    ids.select(2, 1).add_(torch::arange(packed_height, torch::kFloat32).unsqueeze(1));
    ids.select(2, 2).add_(torch::arange(packed_width, torch::kFloat32).unsqueeze(0));
    return ids.reshape({packed_height * packed_width, 3}).to(device, dtype);
  });
}

absl::StatusOr<torch::Tensor> TextIds(int64_t num_tokens, torch::Dtype dtype,
                                      torch::Device device) {
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("text ids need at least one token, got ", num_tokens));
  }
  return TorchCall("building text ids", [&] {
    return torch::zeros({num_tokens, 3}, torch::TensorOptions().dtype(dtype).device(device));
  });
}

}  // namespace ds::flux
