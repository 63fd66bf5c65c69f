// CLIP image preprocessing: the golden CLIPImageProcessor runs (PIL 9.4 bicubic resize, center
// crop, pixel_values) must match exactly; properties of Pillow's resampling; bad input.
#include "handlers/image_processing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <png.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

// After <cstdio>: libjpeg's header needs FILE and size_t.
#include <jpeglib.h>

#include "handlers/safetensors.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::testing::HasSubstr;
using Size = std::pair<int64_t, int64_t>;
namespace fs = std::filesystem;

fs::path ClipVisionDir() { return fs::path(test::GoldenDir()) / "conditioning" / "clip_vision"; }

torch::Tensor Golden(const std::string& key) {
  auto f = SafetensorsFile::Open((ClipVisionDir() / "io.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto t = (*f)->Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

torch::Tensor FixtureImage() {
  const std::string bytes = test::ReadFileBytes((ClipVisionDir() / "image.png").string());
  auto rgb = DecodeImageToRgb(bytes);
  EXPECT_TRUE(rgb.ok()) << rgb.status();
  return rgb.ok() ? *rgb : torch::Tensor();
}

// Exact equality, reporting the first differing element.
void ExpectIdentical(const torch::Tensor& ours, const torch::Tensor& golden,
                     const std::string& what) {
  ASSERT_TRUE(ours.defined()) << what;
  ASSERT_EQ(ours.sizes(), golden.sizes()) << what;
  ASSERT_EQ(ours.scalar_type(), golden.scalar_type()) << what;
  const torch::Tensor diff = ours.ne(golden);
  const int64_t count = diff.sum().item<int64_t>();
  if (count != 0) {
    const torch::Tensor idx = diff.nonzero()[0];
    ADD_FAILURE() << what << ": " << count << " of " << ours.numel() << " values differ; first at "
                  << idx << ": ours " << ours.index({idx[0], idx[1], idx[2]}) << " vs golden "
                  << golden.index({idx[0], idx[1], idx[2]});
  }
}

TEST(ImageProcessingGoldenTest, DecodedPngMatchesPil) {
  ExpectIdentical(FixtureImage(), Golden("image_uint8"), "image_uint8");
}

void CheckGoldenCase(const std::string& name, const ClipImageProcessorConfig& config) {
  const torch::Tensor image = FixtureImage();
  ASSERT_TRUE(image.defined());
  auto out = PreprocessClipImage(image, config);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectIdentical(out->resized, Golden(name + "/resized_uint8"), name + "/resized_uint8");
  ExpectIdentical(out->cropped, Golden(name + "/cropped_uint8"), name + "/cropped_uint8");
  auto pv = ClipPixelValues(image, config);
  ASSERT_TRUE(pv.ok()) << pv.status();
  const torch::Tensor golden = Golden(name + "/pixel_values");
  ASSERT_EQ(pv->sizes(), golden.sizes());
  // Bit-exact float32 (the README: preprocessing is exact).
  EXPECT_TRUE(torch::equal(*pv, golden))
      << name << "/pixel_values: max |diff| " << (*pv - golden).abs().max().item<double>();
  EXPECT_TRUE(torch::equal(out->pixel_values, golden[0]));
}

TEST(ImageProcessingGoldenTest, Pre32FromPreprocessorConfig) {
  auto config = ClipImageProcessorConfig::FromFile(
      (ClipVisionDir() / "clip_vision_encoder" / "preprocessor_config.json").string());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->shortest_edge, 32);
  CheckGoldenCase("pre32", *config);
  // diffusers' load_ip_adapter builds the same processor from the encoder's image_size.
  CheckGoldenCase("pre32", ClipImageProcessorConfig::ForImageSize(32));
}

TEST(ImageProcessingGoldenTest, Pre224Defaults) {
  CheckGoldenCase("pre224", ClipImageProcessorConfig{});
  auto parsed = ClipImageProcessorConfig::FromJson(nlohmann::json::object());
  ASSERT_TRUE(parsed.ok());
  CheckGoldenCase("pre224", *parsed);
}

TEST(ClipResizeOutputSizeTest, ShortestEdgeWithTruncatedLongEdge) {
  // int(32 * 64 / 48) = int(42.67) = 42: truncation, not rounding.
  EXPECT_EQ(ClipResizeOutputSize(48, 64, 32), Size(32, 42));
  EXPECT_EQ(ClipResizeOutputSize(64, 48, 32), Size(42, 32));
  EXPECT_EQ(ClipResizeOutputSize(50, 50, 7), Size(7, 7));
  EXPECT_EQ(ClipResizeOutputSize(3, 1000, 224), Size(224, 74666));
}

torch::Tensor RandomImage(int64_t h, int64_t w, int seed) {
  torch::manual_seed(seed);
  return torch::randint(0, 256, {h, w, 3}, torch::kUInt8);
}

TEST(PilResizeTest, SameSizeIsACopy) {
  const torch::Tensor img = RandomImage(5, 7, 1);
  auto out = PilResize(img, 5, 7);
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(torch::equal(*out, img));
  EXPECT_NE(out->data_ptr(), img.data_ptr());
}

TEST(PilResizeTest, ConstantImagesStayConstantForEveryFilter) {
  for (PilResample r : {PilResample::kBox, PilResample::kBilinear, PilResample::kHamming,
                        PilResample::kBicubic, PilResample::kLanczos}) {
    for (int value : {0, 1, 77, 254, 255}) {
      const torch::Tensor img = torch::full({13, 9, 3}, value, torch::kUInt8);
      for (auto [h, w] : {std::pair<int64_t, int64_t>{4, 3}, {31, 20}, {13, 4}, {2, 9}}) {
        auto out = PilResize(img, h, w, r);
        ASSERT_TRUE(out.ok()) << out.status();
        ASSERT_EQ(out->sizes(), (std::vector<int64_t>{h, w, 3}));
        EXPECT_TRUE(out->eq(value).all().item<bool>())
            << "filter " << static_cast<int>(r) << " value " << value << " size " << h << "x" << w;
      }
    }
  }
}

TEST(PilResizeTest, BoxHalvingAveragesPairsRoundingHalfUp) {
  // BOX at scale 2 weighs each output pixel's two source pixels 1/2 each; Pillow's fixed-point
  // accumulator starts at 0.5, so .5 rounds up. One row only: the vertical pass is skipped.
  torch::Tensor img = torch::zeros({1, 4, 3}, torch::kUInt8);
  const int row[4] = {0, 101, 200, 51};
  for (int x = 0; x < 4; ++x) img.index_put_({0, x}, row[x]);
  auto out = PilResize(img, 1, 2, PilResample::kBox);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ((*out)[0][0][0].item<int>(), (0 + 101 + 1) / 2);
  EXPECT_EQ((*out)[0][1][1].item<int>(), (200 + 51 + 1) / 2);
}

TEST(PilResizeTest, SeparableOrderMattersOnlyThroughRounding) {
  // Resizing only the width equals resizing a transposed image's height, transposed back (same
  // 1-D filter, one pass each).
  const torch::Tensor img = RandomImage(6, 11, 2);
  auto wide = PilResize(img, 6, 5);
  auto tall = PilResize(img.transpose(0, 1).contiguous(), 5, 6);
  ASSERT_TRUE(wide.ok() && tall.ok());
  EXPECT_TRUE(torch::equal(*wide, tall->transpose(0, 1)));
}

TEST(PilResizeTest, RejectsBadInput) {
  auto bad_dtype = PilResize(torch::zeros({4, 4, 3}, torch::kFloat), 2, 2);
  EXPECT_EQ(bad_dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_dtype.status().message()), HasSubstr("[4, 4, 3]"));
  EXPECT_EQ(PilResize(torch::zeros({4, 4, 4}, torch::kUInt8), 2, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PilResize(torch::zeros({4, 4, 3}, torch::kUInt8), 0, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PilResize(torch::zeros({4, 4, 3}, torch::kUInt8), 2, 2, PilResample::kNearest)
                .status()
                .code(),
            absl::StatusCode::kUnimplemented);
}

TEST(CenterCropTest, OffsetsFloorAndPaddingCeil) {
  const torch::Tensor img = RandomImage(7, 10, 3);
  auto crop = CenterCrop(img, 4, 5);
  ASSERT_TRUE(crop.ok());
  // top = (7 - 4) // 2 = 1, left = (10 - 5) // 2 = 2.
  EXPECT_TRUE(torch::equal(*crop, img.narrow(0, 1, 4).narrow(1, 2, 5)));
  // Larger than the image in height: pad ceil((10 - 7) / 2) = 2 rows before, 1 after.
  auto padded = CenterCrop(img, 10, 4);
  ASSERT_TRUE(padded.ok());
  ASSERT_EQ(padded->sizes(), (std::vector<int64_t>{10, 4, 3}));
  EXPECT_TRUE(padded->narrow(0, 0, 2).eq(0).all().item<bool>());
  EXPECT_TRUE(padded->narrow(0, 9, 1).eq(0).all().item<bool>());
  EXPECT_TRUE(torch::equal(padded->narrow(0, 2, 7), img.narrow(1, 3, 4)));
  EXPECT_EQ(CenterCrop(img, 0, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CenterCrop(torch::zeros({3, 3}), 1, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ClipImageProcessorConfigTest, NonGoldenConfigFollowsTheSteps) {
  // Fixed (height, width) resize, no crop, no rescale, custom mean/std: pixel_values are
  // (x - mean) / std of the resized uint8 values in float32.
  auto config = ClipImageProcessorConfig::FromJson({{"size", {{"height", 9}, {"width", 6}}},
                                                    {"do_center_crop", false},
                                                    {"do_rescale", false},
                                                    {"image_mean", {10.0, 20.0, 30.0}},
                                                    {"image_std", 2.0},
                                                    {"resample", 2}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->OutputSize(30, 40), Size(9, 6));
  const torch::Tensor img = RandomImage(30, 40, 4);
  auto out = PreprocessClipImage(img, *config);
  ASSERT_TRUE(out.ok()) << out.status();
  auto resized = PilResize(img, 9, 6, PilResample::kBilinear);
  ASSERT_TRUE(resized.ok());
  EXPECT_TRUE(torch::equal(out->resized, *resized));
  EXPECT_TRUE(torch::equal(out->cropped, *resized));
  const torch::Tensor mean = torch::tensor({10.0f, 20.0f, 30.0f}).view({3, 1, 1});
  const torch::Tensor expected = (resized->permute({2, 0, 1}).to(torch::kFloat) - mean) / 2.0f;
  EXPECT_TRUE(torch::equal(out->pixel_values, expected));
}

TEST(ClipImageProcessorConfigTest, LegacyIntegerSizes) {
  auto config = ClipImageProcessorConfig::FromJson(
      {{"feature_extractor_type", "CLIPFeatureExtractor"}, {"size", 64}, {"crop_size", 48}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->shortest_edge, 64);
  EXPECT_EQ(config->crop_height, 48);
  EXPECT_EQ(config->crop_width, 48);
}

TEST(ClipImageProcessorConfigTest, BadFieldsAreNamed) {
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"size", {{"longest_edge", 3}}}}, "'size'"},
      {{{"size", {{"shortest_edge", 0}}}}, "size.shortest_edge"},
      {{{"crop_size", "big"}}, "'crop_size'"},
      {{{"resample", 9}}, "'resample'"},
      {{{"image_mean", {0.5, 0.5}}}, "'image_mean'"},
      {{{"image_std", {0.5, 0.0, 0.5}}}, "'image_std'"},
      {{{"do_resize", "yes"}}, "'do_resize'"},
      {{{"image_processor_type", "SiglipImageProcessor"}}, "image_processor_type"},
  };
  for (const auto& [json, field] : cases) {
    auto c = ClipImageProcessorConfig::FromJson(json);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << json.dump();
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(field)) << json.dump();
  }
  EXPECT_EQ(
      ClipImageProcessorConfig::FromFile("/nonexistent/preprocessor_config.json").status().code(),
      absl::StatusCode::kNotFound);
}

TEST(PreprocessClipImageTest, RejectsNonRgbUint8) {
  auto r = PreprocessClipImage(torch::zeros({1, 3, 8, 8}), ClipImageProcessorConfig{});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("[1, 3, 8, 8]"));
}

std::string EncodeRgbaPng(const torch::Tensor& rgba) {
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(rgba.size(1));
  image.height = static_cast<png_uint_32>(rgba.size(0));
  image.format = PNG_FORMAT_RGBA;
  png_alloc_size_t size = 0;
  EXPECT_TRUE(
      png_image_write_to_memory(&image, nullptr, &size, 0, rgba.data_ptr<uint8_t>(), 0, nullptr));
  std::string out(size, '\0');
  EXPECT_TRUE(png_image_write_to_memory(&image, out.data(), &size, 0, rgba.data_ptr<uint8_t>(), 0,
                                        nullptr));
  out.resize(size);
  return out;
}

TEST(DecodeImageToRgbTest, AlphaIsDroppedNotComposited) {
  // PIL's RGBA -> RGB conversion keeps the color channels as stored, whatever the alpha.
  torch::Tensor rgba = RandomImage(5, 6, 5);
  rgba = torch::cat({rgba, torch::randint(0, 255, {5, 6, 1}, torch::kUInt8)}, 2).contiguous();
  auto rgb = DecodeImageToRgb(EncodeRgbaPng(rgba));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_TRUE(torch::equal(*rgb, rgba.narrow(2, 0, 3)));
}

TEST(DecodeImageToRgbTest, RejectsUndecodableBytes) {
  auto garbage = DecodeImageToRgb("GIF89a not a png");
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(garbage.status().message()), HasSubstr("not a PNG"));
  const std::string png = test::ReadFileBytes((ClipVisionDir() / "image.png").string());
  auto truncated = DecodeImageToRgb(std::string_view(png).substr(0, png.size() / 2));
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeImageToRgb("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(DecodeImageToRgbTest, PixelLimitIsCheckedBeforeDecoding) {
  const std::string png = EncodeRgbaPng(torch::zeros({20, 30, 4}, torch::kUInt8));
  EXPECT_TRUE(DecodeImageToRgb(png, 600).ok());
  auto over = DecodeImageToRgb(png, 599);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("30 x 20"));
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("599 pixels"));
}


// A JPEG made by libjpeg's own encoder (defaults, 4:2:0 subsampling at this quality).
std::string EncodeJpeg(const torch::Tensor& image, int quality, bool gray) {
  jpeg_compress_struct cinfo;
  jpeg_error_mgr jerr;
  cinfo.err = jpeg_std_error(&jerr);
  jpeg_create_compress(&cinfo);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&cinfo, &buffer, &size);
  cinfo.image_width = static_cast<JDIMENSION>(image.size(1));
  cinfo.image_height = static_cast<JDIMENSION>(image.size(0));
  cinfo.input_components = gray ? 1 : 3;
  cinfo.in_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, quality, TRUE);
  jpeg_start_compress(&cinfo, TRUE);
  const torch::Tensor data = image.contiguous();
  const int64_t row = image.size(1) * (gray ? 1 : 3);
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW r[1] = {data.data_ptr<uint8_t>() + row * cinfo.next_scanline};
    jpeg_write_scanlines(&cinfo, r, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  std::string out(reinterpret_cast<char*>(buffer), size);
  std::free(buffer);
  return out;
}

// A smooth test image (JPEG is lossy: smooth content decodes close to the source).
torch::Tensor SmoothImage(int64_t h, int64_t w) {
  const torch::Tensor y = torch::linspace(0, 1, h).view({h, 1, 1});
  const torch::Tensor x = torch::linspace(0, 1, w).view({1, w, 1});
  const torch::Tensor c = torch::tensor({0.2, 0.5, 0.8}).view({1, 1, 3});
  return ((torch::sin(6 * x + 4 * y + 6 * c) * 0.4 + 0.5) * 255).round().to(torch::kUInt8);
}

TEST(DecodeImageToRgbTest, JpegDecodesCloseToTheSource) {
  const torch::Tensor src = SmoothImage(37, 53);  // odd sizes: partial MCUs, upsampled chroma
  auto rgb = DecodeImageToRgb(EncodeJpeg(src, 95, false));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  ASSERT_THAT(rgb->sizes().vec(), ::testing::ElementsAre(37, 53, 3));
  const torch::Tensor diff = (rgb->to(torch::kInt32) - src.to(torch::kInt32)).abs();
  EXPECT_LT(diff.to(torch::kFloat32).mean().item<float>(), 2.0f);
  EXPECT_LE(diff.max().item<int32_t>(), 24);

  // Grayscale: three equal channels, as PIL's L -> RGB.
  const torch::Tensor gray_src = src.select(2, 1).contiguous();
  auto gray = DecodeImageToRgb(EncodeJpeg(gray_src, 95, true));
  ASSERT_TRUE(gray.ok()) << gray.status();
  EXPECT_TRUE(torch::equal(gray->select(2, 0), gray->select(2, 1)));
  EXPECT_TRUE(torch::equal(gray->select(2, 0), gray->select(2, 2)));
  EXPECT_LE((gray->select(2, 0).to(torch::kInt32) - gray_src.to(torch::kInt32)).abs().max()
                .item<int32_t>(),
            8);
}

TEST(DecodeImageToRgbTest, BadJpegsGetPreciseErrors) {
  const std::string jpeg = EncodeJpeg(SmoothImage(16, 24), 90, false);
  auto truncated = DecodeImageToRgb(std::string_view(jpeg).substr(0, 40));
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(truncated.status().message()), HasSubstr("JPEG"));
  auto over = DecodeImageToRgb(jpeg, 16 * 24 - 1);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("24 x 16"));
  EXPECT_TRUE(DecodeImageToRgb(jpeg, 16 * 24).ok());
  // Random bytes after the JPEG marker: corrupt, never a crash.
  std::string garbage = "\xFF\xD8\xFF";
  for (int i = 0; i < 200; ++i) garbage.push_back(static_cast<char>((i * 73 + 11) & 0xFF));
  EXPECT_EQ(DecodeImageToRgb(garbage).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds
