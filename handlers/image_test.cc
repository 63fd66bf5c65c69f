// Image postprocessing against diffusers' FluxPipeline outputs, and PNG encode/decode.
#include "handlers/image.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "handlers/safetensors.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::testing::HasSubstr;

// Every FluxPipeline case that records the decoded image and what PIL received.
std::vector<fs::path> PipelineCases() {
  std::vector<fs::path> out;
  const fs::path root = fs::path(GoldenDir()) / "pipeline" / "flux_pipeline";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (e.path().extension() == ".safetensors") out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

torch::Tensor Get(const SafetensorsFile& f, const std::string& key) {
  auto t = f.Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : torch::Tensor();
}

TEST(ImageTest, PostprocessMatchesDiffusersBitwise) {
  const std::vector<fs::path> cases = PipelineCases();
  ASSERT_FALSE(cases.empty()) << "no pipeline cases under " << GoldenDir();
  int checked = 0;
  for (const fs::path& path : cases) {
    SCOPED_TRACE(path.string());
    auto file = SafetensorsFile::Open(path.string());
    ASSERT_TRUE(file.ok()) << file.status();
    if (!(*file)->contains("final/image_decoded") || !(*file)->contains("final/image_uint8")) {
      continue;
    }
    const torch::Tensor decoded = Get(**file, "final/image_decoded");
    auto unit = DenormalizeImages(decoded);
    ASSERT_TRUE(unit.ok()) << unit.status();
    EXPECT_TRUE(torch::equal(*unit, Get(**file, "final/image"))) << "\"pt\" output differs";
    auto pixels = ImagesToUint8(*unit);
    ASSERT_TRUE(pixels.ok()) << pixels.status();
    const torch::Tensor golden = Get(**file, "final/image_uint8");
    ASSERT_EQ(pixels->sizes(), golden.sizes());
    EXPECT_TRUE(torch::equal(*pixels, golden.to(torch::kUInt8)))
        << "differing values: " << pixels->ne(golden.to(torch::kUInt8)).sum().item<int64_t>();
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

// A float32 x in [0, 1] whose float32 product x·255 is exactly `target` (NaN if none is near).
float WithProduct(float target) {
  float x = target / 255.f;
  for (int i = 0; i < 64; ++i) {
    const float p = x * 255.f;
    if (p == target) return x;
    x = std::nextafter(x, p < target ? 2.f : -1.f);
  }
  return NAN;
}

TEST(ImageTest, RoundingIsHalfToEvenAndClamped) {
  // numpy's round() (and PIL's input) rounds halves to even: 126.5 -> 126, 127.5 -> 128.
  const float a = WithProduct(126.5f), b = WithProduct(127.5f), c = WithProduct(2.5f);
  ASSERT_FALSE(std::isnan(a) || std::isnan(b) || std::isnan(c));
  const torch::Tensor x = torch::tensor({0.f, a, b, c, 1.f}).view({1, 1, 1, 5});
  auto u = ImagesToUint8(x);
  ASSERT_TRUE(u.ok()) << u.status();
  const std::vector<int> expected = {0, 126, 128, 2, 255};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(u->view({5})[i].item<int>(), expected[i]) << i;
  // Denormalize clamps.
  auto d = DenormalizeImages(torch::tensor({-3.f, -1.f, 0.f, 1.f, 3.f}).view({1, 1, 1, 5}));
  ASSERT_TRUE(d.ok());
  EXPECT_TRUE(torch::equal(d->view({5}), torch::tensor({0.f, 0.f, 0.5f, 1.f, 1.f})));
}

TEST(ImageTest, BadInputsAreNamed) {
  EXPECT_EQ(DenormalizeImages(torch::zeros({3, 4, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(DenormalizeImages(torch::zeros({3, 4, 4})).status().message()),
              HasSubstr("[3, 4, 4]"));
  EXPECT_EQ(DenormalizeImages(torch::zeros({1, 3, 4, 4}, torch::kInt)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto outside = ImagesToUint8(torch::full({1, 3, 2, 2}, 1.5f));
  EXPECT_EQ(outside.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(outside.status().message()), HasSubstr("1.5"));
  EXPECT_EQ(ImagesToUint8(torch::full({1, 3, 2, 2}, NAN)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(torch::zeros({4, 4, 4}, torch::kUInt8)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodePng(torch::zeros({4, 4, 3})).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ImagesToPng(torch::zeros({1, 4, 8, 8})).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto garbage = DecodePng("not a png at all");
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ImageTest, PngRoundTripsExactlyAndDeterministically) {
  torch::manual_seed(3);
  for (auto [h, w] : {std::pair<int64_t, int64_t>{1, 1}, {17, 5}, {32, 48}}) {
    const torch::Tensor rgb = torch::randint(0, 256, {h, w, 3}, torch::kUInt8);
    auto png = EncodePng(rgb);
    ASSERT_TRUE(png.ok()) << png.status();
    EXPECT_EQ(png->substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    auto again = EncodePng(rgb.clone());
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*png, *again) << "same pixels must give the same bytes";
    auto back = DecodePng(*png);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(torch::equal(*back, rgb)) << h << "x" << w;
  }
  // A strided view encodes its values, not its storage.
  const torch::Tensor base = torch::randint(0, 256, {3, 8, 6}, torch::kUInt8);
  const torch::Tensor view = base.permute({1, 2, 0});  // [8, 6, 3], non-contiguous
  auto png = EncodePng(view);
  ASSERT_TRUE(png.ok());
  auto back = DecodePng(*png);
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(torch::equal(*back, view));
  // A truncated file is an error, not a partial image.
  auto cut = DecodePng(png->substr(0, png->size() / 2));
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ImageTest, GoldenImagesToPngDecodeToWhatPilGets) {
  const std::vector<fs::path> cases = PipelineCases();
  ASSERT_FALSE(cases.empty());
  auto file = SafetensorsFile::Open(cases.front().string());
  ASSERT_TRUE(file.ok());
  const torch::Tensor golden = Get(**file, "final/image_uint8").to(torch::kUInt8);
  auto pngs = ImagesToPng(Get(**file, "final/image_decoded"));
  ASSERT_TRUE(pngs.ok()) << pngs.status();
  ASSERT_EQ(static_cast<int64_t>(pngs->size()), golden.size(0));
  for (int64_t i = 0; i < golden.size(0); ++i) {
    auto back = DecodePng((*pngs)[i]);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_TRUE(torch::equal(*back, golden[i])) << "image " << i;
  }
}

}  // namespace
}  // namespace ds
