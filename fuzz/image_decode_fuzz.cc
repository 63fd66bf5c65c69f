// libFuzzer target: decoding of request images (IP-Adapter inputs) and the preprocessing after
// it, as the server runs them: DecodeImageToRgb(bytes, max_pixels) (PNG via libpng, JPEG via
// libjpeg) then CLIPImageProcessor preprocessing (handlers/image_processing.h), and the
// preprocessor_config.json parser.
//
// Input: byte 0 selects the mode, the rest is the payload.
//   byte 0 < 0xF0: the payload is an image file. It is decoded with a cap of 2^16 pixels (the
//     server passes max_image_side^2; uncapped decoding is never reachable from a request), then
//     preprocessed with one of four configs (byte 0 % 4): ForImageSize(32) (BICUBIC, crop),
//     exact resize to 24x40 BILINEAR without crop, shortest edge 16 LANCZOS + crop 8x12, no resize
//     and crop 20 (padding when the image is smaller).
//   byte 0 >= 0xF0: the payload is a preprocessor_config.json; when it parses and its output and
//     resize sizes stay within 512 pixels a side, a fixed 7x5 image is preprocessed with it.
// Findings: crashes, sanitizer reports, uncaught exceptions and broken invariants (Require): a
// decoded image that is not [H, W, 3] uint8 with 1 <= H*W <= the cap; preprocessing output whose
// shape differs from config.OutputSize() or that holds non-finite values; error codes other than
// INVALID_ARGUMENT (UNIMPLEMENTED for NEAREST, INTERNAL for LibTorch failures).
//
// Seeds: DS_FUZZ_WRITE_SEEDS=<dir> image_decode_fuzz_replay writes fuzz/corpus/image/: PNGs of
// every color type and bit depth (libpng's simplified writer), baseline / progressive / grayscale
// / CMYK JPEGs (libjpeg), truncated and corrupted variants, and preprocessor configs.
// clang-format off
#include <cstddef>
#include <cstdio>  // jpeglib.h needs size_t and FILE declared first
#include <jpeglib.h>
// clang-format on
#include <png.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "handlers/image_processing.h"

namespace {

using ds::ClipImageProcessorConfig;
using ds::PilResample;
using ds::fuzz::Require;

constexpr int64_t kMaxPixels = int64_t{1} << 16;
constexpr int64_t kMaxConfigSide = 512;

ClipImageProcessorConfig Config(int which) {
  ClipImageProcessorConfig c = ClipImageProcessorConfig::ForImageSize(32);
  switch (which) {
    case 1:
      c.shortest_edge.reset();
      c.resize_to = std::make_pair(int64_t{24}, int64_t{40});
      c.resample = PilResample::kBilinear;
      c.do_center_crop = false;
      break;
    case 2:
      c.shortest_edge = 16;
      c.resample = PilResample::kLanczos;
      c.crop_height = 8;
      c.crop_width = 12;
      break;
    case 3:
      c.do_resize = false;
      c.crop_height = c.crop_width = 20;
      break;
    default:
      break;
  }
  return c;
}

void Preprocess(const torch::Tensor& rgb, const ClipImageProcessorConfig& config) {
  auto out = ds::PreprocessClipImage(rgb, config);
  if (!out.ok()) {
    const absl::StatusCode code = out.status().code();
    Require(code == absl::StatusCode::kInvalidArgument ||
                code == absl::StatusCode::kUnimplemented || code == absl::StatusCode::kInternal,
            "preprocessing status code");
    return;
  }
  const auto [h, w] = config.OutputSize(rgb.size(0), rgb.size(1));
  const torch::Tensor& pv = out->pixel_values;
  Require(pv.dim() == 3 && pv.size(0) == 3 && pv.size(1) == h && pv.size(2) == w,
          "pixel_values has the config's output size");
  Require(pv.scalar_type() == torch::kFloat32, "pixel_values is float32");
  Require(pv.isfinite().all().item<bool>(), "pixel_values are finite");
}

void RunImage(uint8_t selector, std::string_view bytes) {
  auto rgb = ds::DecodeImageToRgb(bytes, kMaxPixels);
  if (!rgb.ok()) {
    Require(rgb.status().code() == absl::StatusCode::kInvalidArgument,
            "decode errors are INVALID_ARGUMENT");
    return;
  }
  Require(rgb->dim() == 3 && rgb->size(2) == 3 && rgb->scalar_type() == torch::kUInt8,
          "decoded images are [H, W, 3] uint8");
  Require(rgb->size(0) >= 1 && rgb->size(1) >= 1 && rgb->size(0) * rgb->size(1) <= kMaxPixels,
          "decoded images respect the pixel cap");
  Preprocess(*rgb, Config(selector % 4));
}

void RunConfig(std::string_view text) {
  nlohmann::json json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) return;
  auto config = ClipImageProcessorConfig::FromJson(json);
  if (!config.ok()) {
    Require(config.status().code() == absl::StatusCode::kInvalidArgument,
            "config errors are INVALID_ARGUMENT");
    return;
  }
  if (config->shortest_edge.value_or(0) > kMaxConfigSide) return;
  if (config->resize_to.has_value() &&
      (config->resize_to->first > kMaxConfigSide || config->resize_to->second > kMaxConfigSide)) {
    return;
  }
  const int64_t h = 7, w = 5;
  const auto [oh, ow] = config->OutputSize(h, w);
  if (oh > kMaxConfigSide || ow > kMaxConfigSide) return;
  // The resize before the crop may be larger than the output (long edge of shortest_edge).
  if (config->do_resize && config->shortest_edge.has_value() &&
      *config->shortest_edge * h / w > kMaxConfigSide) {
    return;
  }
  Preprocess(
      torch::arange(h * w * 3, torch::kInt64).remainder(256).to(torch::kUInt8).view({h, w, 3}),
      *config);
}

// ---------------------------------------------------------------------------------------------
// Seeds.

std::string Png(uint32_t format, int w, int h) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = w;
  image.height = h;
  image.format = format;
  const std::size_t size = PNG_IMAGE_SIZE(image);
  std::vector<uint8_t> pixels(size);
  for (std::size_t i = 0; i < size; ++i) pixels[i] = static_cast<uint8_t>(i * 37 + i / 5);
  png_alloc_size_t bytes = 0;
  Require(png_image_write_to_memory(&image, nullptr, &bytes, 0, pixels.data(), 0, nullptr) != 0,
          "png size");
  std::string out(bytes, '\0');
  Require(png_image_write_to_memory(&image, out.data(), &bytes, 0, pixels.data(), 0, nullptr) != 0,
          "png write");
  out.resize(bytes);
  return out;
}

std::string Jpeg(int w, int h, int components, J_COLOR_SPACE space, bool progressive) {
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buffer, &size);
  c.image_width = w;
  c.image_height = h;
  c.input_components = components;
  c.in_color_space = space;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 75, TRUE);
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  std::vector<uint8_t> row(static_cast<std::size_t>(w) * components);
  while (c.next_scanline < c.image_height) {
    for (std::size_t i = 0; i < row.size(); ++i) {
      row[i] = static_cast<uint8_t>(i * 11 + c.next_scanline * 29);
    }
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  std::string out(reinterpret_cast<char*>(buffer), size);
  jpeg_destroy_compress(&c);
  std::free(buffer);
  return out;
}

void WriteSeeds(ds::fuzz::SeedWriter& w) {
  auto with = [](uint8_t selector, const std::string& bytes) {
    return std::string(1, static_cast<char>(selector)) + bytes;
  };
  const std::string rgb = Png(PNG_FORMAT_RGB, 9, 6);
  w.Write("png_rgb8.bin", with(0, rgb));
  w.Write("png_rgba8.bin", with(1, Png(PNG_FORMAT_RGBA, 5, 7)));
  w.Write("png_gray8.bin", with(2, Png(PNG_FORMAT_GRAY, 12, 3)));
  w.Write("png_gray_alpha.bin", with(3, Png(PNG_FORMAT_GA, 4, 4)));
  w.Write("png_rgb16.bin", with(0, Png(PNG_FORMAT_LINEAR_RGB, 3, 5)));
  w.Write("png_rgba16.bin", with(1, Png(PNG_FORMAT_LINEAR_RGB_ALPHA, 2, 2)));
  w.Write("png_1x1.bin", with(3, Png(PNG_FORMAT_RGB, 1, 1)));
  w.Write("png_wide.bin", with(2, Png(PNG_FORMAT_RGB, 64, 2)));
  w.Write("png_truncated.bin", with(0, rgb.substr(0, rgb.size() / 2)));
  std::string corrupt = rgb;
  corrupt[corrupt.size() / 2] ^= 0x5A;
  w.Write("png_bad_crc.bin", with(1, corrupt));
  std::string huge = rgb;  // IHDR width/height patched to 40000 x 40000 (over the cap)
  const unsigned char dims[8] = {0, 0, 0x9C, 0x40, 0, 0, 0x9C, 0x40};
  for (int i = 0; i < 8; ++i) huge[16 + i] = static_cast<char>(dims[i]);
  w.Write("png_over_cap.bin", with(0, huge));
  const std::string jpeg = Jpeg(10, 7, 3, JCS_RGB, false);
  w.Write("jpeg_baseline.bin", with(0, jpeg));
  w.Write("jpeg_progressive.bin", with(1, Jpeg(17, 9, 3, JCS_RGB, true)));
  w.Write("jpeg_gray.bin", with(2, Jpeg(8, 8, 1, JCS_GRAYSCALE, false)));
  w.Write("jpeg_cmyk.bin", with(3, Jpeg(6, 6, 4, JCS_CMYK, false)));
  w.Write("jpeg_truncated.bin", with(0, jpeg.substr(0, jpeg.size() * 2 / 3)));
  w.Write("not_an_image.bin", with(0, "GIF89a\x01\x00\x01\x00"));
  w.Write("config_default.bin",
          with(0xF0,
               "{\"image_processor_type\": \"CLIPImageProcessor\", \"size\": "
               "{\"shortest_edge\": 24}, \"crop_size\": {\"height\": 16, \"width\": 20}, "
               "\"resample\": 3, \"image_mean\": [0.5, 0.5, 0.5], \"image_std\": 0.25}"));
  w.Write("config_exact.bin",
          with(0xF0,
               "{\"size\": {\"height\": 9, \"width\": 11}, \"do_center_crop\": false, "
               "\"resample\": 1, \"do_normalize\": false, \"rescale_factor\": 2}"));
  w.Write("config_nearest.bin", with(0xF0, "{\"size\": 8, \"resample\": 0, \"crop_size\": 8}"));
  w.Write("config_bad.bin",
          with(0xF0, "{\"size\": {\"shortest_edge\": 0}, \"image_std\": [0, 1]}"));
  w.Finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (auto seeds = ds::fuzz::SeedWriter::FromEnv()) WriteSeeds(*seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] >= 0xF0) {
    RunConfig(payload);
  } else {
    RunImage(data[0], payload);
  }
  return 0;
}
