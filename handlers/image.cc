#include "handlers/image.h"

#include <png.h>
#include <torch/torch.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

std::string Shape(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

absl::Status CheckImages(absl::string_view what, const torch::Tensor& images) {
  if (!images.defined())
    return absl::InvalidArgumentError(absl::StrCat(what, ": undefined tensor"));
  if (!images.is_floating_point()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": expected a floating tensor, got ",
                                                   c10::toString(images.scalar_type())));
  }
  if (images.dim() != 4 || images.numel() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected non-empty images [B, C, H, W], got ", Shape(images)));
  }
  return absl::OkStatus();
}

constexpr int64_t kMaxSide = int64_t{1} << 24;

// libpng reports errors through a longjmp; the writer collects bytes into a std::string owned by
// the caller. Only trivially destructible locals live in the frames between setjmp and longjmp.
struct WriteState {
  std::string* out;
  char message[256];
};

void OnWrite(png_structp png, png_bytep data, png_size_t size) {
  auto* state = static_cast<WriteState*>(png_get_io_ptr(png));
  state->out->append(reinterpret_cast<const char*>(data), size);
}

void OnFlush(png_structp) {}

void OnError(png_structp png, png_const_charp message) {
  auto* state = static_cast<WriteState*>(png_get_error_ptr(png));
  std::snprintf(state->message, sizeof(state->message), "%s", message);
  png_longjmp(png, 1);
}

void OnWarning(png_structp, png_const_charp) {}

// Writes `rows` (height pointers to width·3 bytes) as PNG into state->out. Returns false with
// state->message set when libpng fails.
bool WritePng(WriteState* state, png_bytep* rows, png_uint_32 width, png_uint_32 height) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, state, OnError, OnWarning);
  if (png == nullptr) {
    std::snprintf(state->message, sizeof(state->message), "png_create_write_struct failed");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (info == nullptr) {
    png_destroy_write_struct(&png, nullptr);
    std::snprintf(state->message, sizeof(state->message), "png_create_info_struct failed");
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_set_write_fn(png, state, OnWrite, OnFlush);
  png_set_compression_level(png, 6);
  png_set_IHDR(png, info, width, height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  png_write_image(png, rows);
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

}  // namespace

absl::StatusOr<torch::Tensor> DenormalizeImages(const torch::Tensor& images) {
  RETURN_IF_ERROR(CheckImages("DenormalizeImages", images));
  return TorchCall("DenormalizeImages", [&] {
    c10::InferenceMode inference;
    const torch::Tensor x = images.to(torch::kCPU);
    // x·0.5 is exact in every float type; the sum rounds once to the input dtype, as a native
    // operation in that dtype would.
    return (x.to(torch::kFloat) * 0.5 + 0.5).to(x.scalar_type()).clamp(0, 1).to(torch::kFloat);
  });
}

absl::StatusOr<torch::Tensor> ImagesToUint8(const torch::Tensor& images) {
  RETURN_IF_ERROR(CheckImages("ImagesToUint8", images));
  ASSIGN_OR_RETURN(torch::Tensor x, TorchCall("ImagesToUint8", [&] {
                     c10::InferenceMode inference;
                     return images.to(torch::kCPU).to(torch::kFloat);
                   }));
  ASSIGN_OR_RETURN(bool in_range, TorchCall("ImagesToUint8", [&] {
                     c10::InferenceMode inference;
                     return (x >= 0).logical_and(x <= 1).all().item<bool>();
                   }));
  if (!in_range) {
    ASSIGN_OR_RETURN(double bad, TorchCall("ImagesToUint8", [&] {
                       c10::InferenceMode inference;
                       const torch::Tensor outside = (x >= 0).logical_and(x <= 1).logical_not();
                       return x.masked_select(outside)[0].item<double>();
                     }));
    return absl::InvalidArgumentError(
        absl::StrCat("ImagesToUint8: values must lie in [0, 1] (postprocess first), found ", bad));
  }
  return TorchCall("ImagesToUint8", [&] {
    c10::InferenceMode inference;
    // numpy: (images * 255).round().astype("uint8"); round() is half-to-even like torch.round.
    return (x * 255).round().to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
  });
}

absl::StatusOr<std::string> EncodePng(const torch::Tensor& rgb) {
  if (!rgb.defined() || rgb.scalar_type() != torch::kUInt8 || rgb.dim() != 3 || rgb.size(2) != 3 ||
      rgb.size(0) < 1 || rgb.size(1) < 1 || rgb.size(0) > kMaxSide || rgb.size(1) > kMaxSide) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EncodePng: expected a uint8 RGB image [H, W, 3] (1 <= H, W <= ", kMaxSide, "), got ",
        rgb.defined() ? absl::StrCat(c10::toString(rgb.scalar_type()), " ", Shape(rgb))
                      : std::string("an undefined tensor")));
  }
  ASSIGN_OR_RETURN(torch::Tensor pixels,
                   TorchCall("EncodePng", [&] { return rgb.to(torch::kCPU).contiguous(); }));
  const int64_t height = pixels.size(0), width = pixels.size(1);
  std::vector<png_bytep> rows(height);
  auto* base = pixels.data_ptr<uint8_t>();
  for (int64_t y = 0; y < height; ++y) rows[y] = base + y * width * 3;
  std::string out;
  WriteState state{&out, {0}};
  if (!WritePng(&state, rows.data(), static_cast<png_uint_32>(width),
                static_cast<png_uint_32>(height))) {
    return absl::InternalError(absl::StrCat("EncodePng: libpng: ", state.message));
  }
  return out;
}

absl::StatusOr<torch::Tensor> DecodePng(std::string_view bytes) {
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    const std::string why = image.message;
    png_image_free(&image);
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: not a valid PNG: ", why));
  }
  image.format = PNG_FORMAT_RGB;
  if (image.width < 1 || image.height < 1 || image.width > kMaxSide || image.height > kMaxSide) {
    png_image_free(&image);
    return absl::InvalidArgumentError(
        absl::StrCat("DecodePng: unsupported size ", image.width, " x ", image.height));
  }
  ASSIGN_OR_RETURN(torch::Tensor out, TorchCall("DecodePng", [&] {
                     return torch::empty(
                         {static_cast<int64_t>(image.height), static_cast<int64_t>(image.width), 3},
                         torch::kUInt8);
                   }));
  png_color black{0, 0, 0};
  if (!png_image_finish_read(&image, &black, out.data_ptr<uint8_t>(), /*row_stride=*/0,
                             /*colormap=*/nullptr)) {
    const std::string why = image.message;
    png_image_free(&image);
    return absl::InvalidArgumentError(absl::StrCat("DecodePng: corrupt PNG data: ", why));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ImagesToPng(const torch::Tensor& images) {
  ASSIGN_OR_RETURN(torch::Tensor unit, DenormalizeImages(images));
  if (unit.size(1) != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("ImagesToPng: expected RGB images [B, 3, H, W], got ", Shape(images)));
  }
  ASSIGN_OR_RETURN(torch::Tensor pixels, ImagesToUint8(unit));
  std::vector<std::string> out;
  for (int64_t i = 0; i < pixels.size(0); ++i) {
    ASSIGN_OR_RETURN(std::string png, EncodePng(pixels[i]));
    out.push_back(std::move(png));
  }
  return out;
}

}  // namespace ds
