// Flux latent packing, unpacking and ids against diffusers' FluxPipeline on every case of
// $DS_GOLDEN_DIR/pipeline/flux_pipeline/ (bitwise: these are pure data movement), plus the size
// validation and shape contracts.
#include "models/flux/latents.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "handlers/safetensors.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::CaseNames;
using ::ds::test::PipelineDir;
using ::ds::test::ReadJson;
using ::testing::HasSubstr;
namespace fs = std::filesystem;


class FluxLatentsGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(FluxLatentsDiscoveryTest, FindsCases) {
  EXPECT_FALSE(CaseNames().empty()) << "no cases in " << PipelineDir() / "cases.json";
}

TEST_P(FluxLatentsGoldenTest, PackUnpackAndIdsAreBitIdentical) {
  const nlohmann::json spec = ReadJson(PipelineDir() / "cases.json")["cases"][GetParam()];
  const int64_t height = spec["height"].get<int64_t>(), width = spec["width"].get<int64_t>();
  const nlohmann::json vae_config =
      ReadJson(PipelineDir() / spec["pipeline_folder"].get<std::string>() / "vae" / "config.json");
  auto scale = VaeScaleFactor(vae_config);
  ASSERT_TRUE(scale.ok()) << scale.status();
  ASSERT_TRUE(ValidateImageSize(height, width, *scale).ok());

  auto file = SafetensorsFile::Open((PipelineDir() / spec["file"].get<std::string>()).string());
  ASSERT_TRUE(file.ok()) << file.status();
  auto get = [&](const std::string& key) {
    auto t = (*file)->Get(key);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : torch::Tensor();
  };
  const torch::Tensor noise = get("inputs/latents_unpacked");
  const torch::Tensor packed_noise = get("inputs/latents_packed");

  // The noise shape for this image and the transformer's in_channels / 4.
  const nlohmann::json tcfg = ReadJson(PipelineDir() / spec["pipeline_folder"].get<std::string>() /
                                       "transformer" / "config.json");
  auto shape =
      LatentShape(noise.size(0), tcfg["in_channels"].get<int64_t>() / 4, height, width, *scale);
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(*shape, noise.sizes().vec());

  auto packed = PackLatents(noise);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_TRUE(torch::equal(*packed, packed_noise));
  auto seq = PackedSequenceLength(height, width, *scale);
  ASSERT_TRUE(seq.ok());
  EXPECT_EQ(*seq, packed_noise.size(1));

  auto unpacked = UnpackLatents(get("final/latents_packed"), height, width, *scale);
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  EXPECT_TRUE(torch::equal(*unpacked, get("final/latents_unpacked")));
  auto round_trip = UnpackLatents(packed_noise, height, width, *scale);
  ASSERT_TRUE(round_trip.ok());
  EXPECT_TRUE(torch::equal(*round_trip, noise));

  const torch::Tensor golden_ids = get("ids/img_ids");
  auto ids =
      LatentImageIds(noise.size(2) / 2, noise.size(3) / 2, golden_ids.scalar_type(), torch::kCPU);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_TRUE(torch::equal(*ids, golden_ids));
  const torch::Tensor golden_txt = get("ids/txt_ids");
  auto txt = TextIds(golden_txt.size(0), golden_txt.scalar_type(), torch::kCPU);
  ASSERT_TRUE(txt.ok());
  EXPECT_TRUE(torch::equal(*txt, golden_txt));
}

INSTANTIATE_TEST_SUITE_P(Cases, FluxLatentsGoldenTest, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxLatentsGoldenTest);

TEST(FluxLatentsTest, ValidationNamesTheNearestValidSize) {
  EXPECT_TRUE(ValidateImageSize(1024, 768, 8).ok());
  EXPECT_TRUE(ValidateImageSize(16, 16, 8).ok());
  struct Bad {
    int64_t h, w;
    std::string want;
  };
  for (const Bad& b : std::vector<Bad>{
           {1000, 1024, "height 1000"},
           {1000, 1024, "the nearest valid heights are 992 and 1008"},
           {1001, 1024, "the nearest valid height is 1008"},
           {999, 1024, "the nearest valid height is 992"},
           {1024, 5, "the nearest valid width is 16"},
           {1024, 0, "width 0"},
           {-16, 1024, "height -16"},
       }) {
    absl::Status s = ValidateImageSize(b.h, b.w, 8);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << b.h << "x" << b.w;
    EXPECT_THAT(s.message(), HasSubstr(b.want));
    EXPECT_THAT(s.message(), HasSubstr("multiple of 16"));
  }
  // The suggested size is valid and nearest, for every size in a range and other scale factors.
  for (int64_t s : {4, 8, 16}) {
    for (int64_t h = 1; h < 200; ++h) {
      absl::Status st = ValidateImageSize(h, 2 * s, s);
      if (h % (2 * s) == 0) {
        EXPECT_TRUE(st.ok());
        continue;
      }
      const std::string msg(st.message());
      const size_t at = msg.rfind(' ');
      const int64_t suggested = std::stoll(msg.substr(at + 1));
      EXPECT_EQ(suggested % (2 * s), 0) << msg;
      EXPECT_GE(suggested, 2 * s) << msg;
      // No positive multiple of 2s is closer.
      for (int64_t k = 2 * s; k < 400; k += 2 * s) {
        EXPECT_LE(std::llabs(suggested - h), std::llabs(k - h)) << msg;
      }
    }
  }
  EXPECT_EQ(ValidateImageSize(16, 16, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LatentShape(0, 16, 16, 16, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LatentShape(1, 16, 24, 16, 8).status().code(), absl::StatusCode::kInvalidArgument);
  auto shape = LatentShape(2, 16, 1024, 768, 8);
  ASSERT_TRUE(shape.ok());
  EXPECT_EQ(*shape, (std::vector<int64_t>{2, 16, 128, 96}));
}

TEST(FluxLatentsTest, VaeScaleFactorFollowsBlockOutChannels) {
  auto four = VaeScaleFactor(nlohmann::json{{"block_out_channels", {128, 256, 512, 512}}});
  ASSERT_TRUE(four.ok());
  EXPECT_EQ(*four, 8);
  auto one = VaeScaleFactor(nlohmann::json{{"block_out_channels", {64}}});
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, 1);
  for (const nlohmann::json& bad :
       {nlohmann::json::object(), nlohmann::json{{"block_out_channels", 4}},
        nlohmann::json{{"block_out_channels", nlohmann::json::array()}}}) {
    auto s = VaeScaleFactor(bad);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad.dump();
    EXPECT_THAT(s.status().message(), HasSubstr("block_out_channels"));
  }
}

TEST(FluxLatentsTest, PackingLayoutAndRoundTrip) {
  // Token (r, c), channel ch*4 + dy*2 + dx holds pixel (2r + dy, 2c + dx) of channel ch.
  const int64_t b = 2, ch = 3, h = 6, w = 10;
  const torch::Tensor x = torch::randn({b, ch, h, w});
  auto p = PackLatents(x);
  ASSERT_TRUE(p.ok());
  ASSERT_EQ(p->sizes(), (std::vector<int64_t>{b, (h / 2) * (w / 2), ch * 4}));
  for (int64_t r = 0; r < h / 2; ++r) {
    for (int64_t c = 0; c < w / 2; ++c) {
      for (int64_t k = 0; k < ch; ++k) {
        for (int64_t dy = 0; dy < 2; ++dy) {
          for (int64_t dx = 0; dx < 2; ++dx) {
            EXPECT_EQ((*p)[1][r * (w / 2) + c][k * 4 + dy * 2 + dx].item<float>(),
                      x[1][k][2 * r + dy][2 * c + dx].item<float>());
          }
        }
      }
    }
  }
  // Pixels 6 x 10 at scale 1 are the 6 x 10 latent itself.
  auto back = UnpackLatents(*p, h, w, 1);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(torch::equal(*back, x));
  // Packing keeps the dtype.
  auto half = PackLatents(x.to(torch::kBFloat16));
  ASSERT_TRUE(half.ok());
  EXPECT_EQ(half->scalar_type(), torch::kBFloat16);

  EXPECT_EQ(PackLatents(torch::zeros({1, 4, 5, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PackLatents(torch::zeros({4, 4, 4})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UnpackLatents(*p, h + 2, w, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UnpackLatents(torch::zeros({1, 15, 6}), h, w, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UnpackLatents(*p, h, w, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FluxLatentsTest, IdsLayoutAndErrors) {
  auto ids = LatentImageIds(3, 5, torch::kFloat32, torch::kCPU);
  ASSERT_TRUE(ids.ok());
  ASSERT_EQ(ids->sizes(), (std::vector<int64_t>{15, 3}));
  for (int64_t r = 0; r < 3; ++r) {
    for (int64_t c = 0; c < 5; ++c) {
      EXPECT_EQ((*ids)[r * 5 + c][0].item<float>(), 0.0f);
      EXPECT_EQ((*ids)[r * 5 + c][1].item<float>(), static_cast<float>(r));
      EXPECT_EQ((*ids)[r * 5 + c][2].item<float>(), static_cast<float>(c));
    }
  }
  EXPECT_EQ(LatentImageIds(0, 5, torch::kFloat32, torch::kCPU).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TextIds(0, torch::kFloat32, torch::kCPU).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds::flux
