// FluxPipeline with IP-Adapters (image prompts) against diffusers' FluxPipeline run with
// `ip_adapter_image=image.png` after `pipe.load_ip_adapter(...)` and `set_ip_adapter_scale(s)`
// ($DS_GOLDEN_DIR/conditioning/ip_adapter/pipeline_scale{1.0,0.5}.safetensors: the dev pipeline
// folder of pipeline/flux_pipeline, the CLIP vision encoder of conditioning/clip_vision): every
// step's latents, the final latents and the image within the README's float tolerance, the uint8
// image within one level. Plus the serving properties: scale 0 is the plain pipeline bit for bit,
// the image changes the output, image embeddings and images agree, the negative pass of true CFG
// gets a black image by default, adapters can be unloaded or replaced under a running request,
// and every bad input gets a precise error.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "handlers/image.h"
#include "handlers/image_processing.h"
#include "handlers/safetensors.h"
#include "models/flux/pipeline.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using ::ds::test::PipelineDir;
using ::ds::test::ReadJson;
using ::ds::test::WithinTolerance;

fs::path IpDir() { return fs::path(test::GoldenDir()) / "conditioning" / "ip_adapter"; }
fs::path VisionDir() { return fs::path(test::GoldenDir()) / "conditioning" / "clip_vision"; }
std::string AdapterFile() { return (IpDir() / "ip_adapter.safetensors").string(); }
std::string EncoderDir() { return (VisionDir() / "clip_vision_encoder").string(); }

torch::Tensor Golden(const std::string& file, const std::string& key) {
  auto f = SafetensorsFile::Open((IpDir() / file).string());
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto t = (*f)->Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : torch::Tensor();
}

torch::Tensor TestImage() {
  auto rgb = DecodeImageToRgb(test::ReadFileBytes((VisionDir() / "image.png").string()));
  EXPECT_TRUE(rgb.ok()) << rgb.status();
  return rgb.ok() ? *rgb : torch::Tensor();
}

class FluxPipelineIPAdapterTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const nlohmann::json spec = ReadJson(PipelineDir() / "cases.json")["cases"]["dev_dynamic_n2"];
    FluxPipelineLoadOptions load;
    load.scheduler_config_path =
        (PipelineDir() / spec["scheduler_config_file"].get<std::string>()).string();
    auto p = FluxPipeline::FromPretrained((PipelineDir() / "dev").string(), load);
    ASSERT_TRUE(p.ok()) << p.status();
    pipeline_ = std::move(p).value().release();
    IPAdapterLoadOptions options;
    options.image_encoder_path = EncoderDir();
    auto info = pipeline_->LoadIPAdapter("xlabs", AdapterFile(), options);
    ASSERT_TRUE(info.ok()) << info.status();
  }
  static void TearDownTestSuite() {
    delete pipeline_;
    pipeline_ = nullptr;
  }

  // The golden call: golden embeddings and noise, 32x48, 2 steps, guidance 3.5.
  static FluxPipelineRequest GoldenRequest(const std::string& file) {
    FluxPipelineRequest r;
    r.prompt_embeds = Golden(file, "inputs/prompt_embeds");
    r.pooled_prompt_embeds = Golden(file, "inputs/pooled_prompt_embeds");
    r.latents = Golden(file, "inputs/latents_unpacked");
    r.height = 32;
    r.width = 48;
    r.num_inference_steps = 2;
    r.guidance_scale = 3.5;
    return r;
  }
  static IPAdapterRequestInput ImagePrompt(double scale) {
    IPAdapterRequestInput in;
    in.name = "xlabs";
    in.image = TestImage();
    in.scales = {scale};
    return in;
  }

  static FluxPipeline* pipeline_;
};
FluxPipeline* FluxPipelineIPAdapterTest::pipeline_ = nullptr;

TEST_F(FluxPipelineIPAdapterTest, LoadedAdapterIsDescribed) {
  ASSERT_NE(pipeline_, nullptr);
  EXPECT_TRUE(pipeline_->limits().supports_ip_adapter);
  const std::vector<IPAdapterInfo> list = pipeline_->ListIPAdapters();
  ASSERT_EQ(list.size(), 1u);
  const nlohmann::json config = ReadJson(IpDir() / "config.json");
  EXPECT_EQ(list[0].name, "xlabs");
  EXPECT_EQ(list[0].format, "xlabs");
  EXPECT_EQ(list[0].num_tokens, config["ip_adapter"]["num_image_text_embeds"].get<int64_t>());
  EXPECT_EQ(list[0].image_embed_dim, config["ip_adapter"]["image_embed_dim"].get<int64_t>());
  EXPECT_EQ(list[0].num_layers, config["transformer_config"]["num_layers"].get<int64_t>());
  EXPECT_GT(list[0].memory_bytes, 0);
  EXPECT_EQ(list[0].image_encoder, EncoderDir());
  const nlohmann::json vision = ReadJson(VisionDir() / "clip_vision_encoder" / "config.json");
  EXPECT_EQ(list[0].image_size, vision["image_size"].get<int64_t>());
}

TEST_F(FluxPipelineIPAdapterTest, ImagePromptsMatchDiffusersAtEveryScale) {
  ASSERT_NE(pipeline_, nullptr);
  for (const double scale : {1.0, 0.5}) {
    const std::string file = scale == 1.0 ? "pipeline_scale1.0.safetensors"
                                          : "pipeline_scale0.5.safetensors";
    SCOPED_TRACE(file);
    FluxPipelineRequest request = GoldenRequest(file);
    request.ip_adapters = {ImagePrompt(scale)};
    request.png = true;
    std::vector<torch::Tensor> steps;
    auto out = pipeline_->Generate(request, {}, [&](int, const torch::Tensor& latents) {
      steps.push_back(latents.clone());
    });
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_EQ(steps.size(), 2u);
    for (size_t i = 0; i < steps.size(); ++i) {
      EXPECT_TRUE(WithinTolerance(steps[i], Golden(file, absl::StrCat("step/", i, "/latents"))))
          << "step " << i;
    }
    EXPECT_TRUE(WithinTolerance(out->latents, Golden(file, "final/latents_unpacked")));
    EXPECT_TRUE(WithinTolerance(out->image, Golden(file, "final/image")));
    auto u8 = ImagesToUint8(out->image);
    ASSERT_TRUE(u8.ok());
    const torch::Tensor diff =
        ((*u8).to(torch::kInt32) - Golden(file, "final/image_uint8").to(torch::kInt32)).abs();
    EXPECT_LE(diff.max().item<int64_t>(), 1);
    EXPECT_GT(out->image_encode_seconds, 0);
    std::cout << file << ": max |latents diff| "
              << (out->latents - Golden(file, "final/latents_unpacked")).abs().max().item<double>()
              << ", max |image diff| "
              << (out->image - Golden(file, "final/image")).abs().max().item<double>() << "\n";
  }
}

TEST_F(FluxPipelineIPAdapterTest, ImageEmbeddingsGiveTheSameRunAsTheImage) {
  ASSERT_NE(pipeline_, nullptr);
  const std::string file = "pipeline_scale1.0.safetensors";
  FluxPipelineRequest request = GoldenRequest(file);
  IPAdapterRequestInput in;
  in.name = "xlabs";
  in.image_embeds = Golden(file, "inputs/ip_adapter_image_embeds");  // [1, 1, E] as diffusers
  request.ip_adapters = {in};
  auto out = pipeline_->Generate(request);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(WithinTolerance(out->image, Golden(file, "final/image")));
  EXPECT_EQ(out->image_encode_seconds, 0);
  // [E] and [1, E] are the same one image.
  for (const torch::Tensor& e : {request.ip_adapters[0].image_embeds.reshape({-1}),
                                 request.ip_adapters[0].image_embeds.reshape({1, -1})}) {
    FluxPipelineRequest r2 = request;
    r2.ip_adapters[0].image_embeds = e;
    auto again = pipeline_->Generate(r2);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_TRUE(torch::equal(again->image, out->image));
  }
}

TEST_F(FluxPipelineIPAdapterTest, ScaleZeroIsThePlainPipelineBitForBitAndTheImageMatters) {
  ASSERT_NE(pipeline_, nullptr);
  const FluxPipelineRequest plain = GoldenRequest("pipeline_scale1.0.safetensors");
  auto base = pipeline_->Generate(plain);
  ASSERT_TRUE(base.ok()) << base.status();
  FluxPipelineRequest zero = plain;
  zero.ip_adapters = {ImagePrompt(0.0)};
  auto z = pipeline_->Generate(zero);
  ASSERT_TRUE(z.ok()) << z.status();
  EXPECT_TRUE(torch::equal(z->latents, base->latents));
  EXPECT_TRUE(torch::equal(z->image, base->image));

  FluxPipelineRequest one = plain;
  one.ip_adapters = {ImagePrompt(1.0)};
  auto a = pipeline_->Generate(one);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GT((a->latents - base->latents).abs().max().item<double>(), 1e-3);
  // Another image, another result.
  one.ip_adapters[0].image = torch::flip(one.ip_adapters[0].image, {1}).contiguous();
  auto b = pipeline_->Generate(one);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_GT((a->latents - b->latents).abs().max().item<double>(), 1e-5);
}

TEST_F(FluxPipelineIPAdapterTest, TrueCfgNegativePassGetsABlackImageByDefault) {
  ASSERT_NE(pipeline_, nullptr);
  FluxPipelineRequest request = GoldenRequest("pipeline_scale1.0.safetensors");
  request.negative_prompt_embeds = torch::zeros_like(request.prompt_embeds);
  request.negative_pooled_prompt_embeds = torch::zeros_like(request.pooled_prompt_embeds);
  request.true_cfg_scale = 2.0;
  request.ip_adapters = {ImagePrompt(1.0)};
  auto by_default = pipeline_->Generate(request);
  ASSERT_TRUE(by_default.ok()) << by_default.status();
  EXPECT_TRUE(by_default->true_cfg_applied);
  // diffusers: np.zeros((width, height, 3)).
  request.ip_adapters[0].negative_image = torch::zeros({request.width, request.height, 3},
                                                       torch::kUInt8);
  auto black = pipeline_->Generate(request);
  ASSERT_TRUE(black.ok()) << black.status();
  EXPECT_TRUE(torch::equal(black->latents, by_default->latents));
  // The negative image reaches the negative pass.
  request.ip_adapters[0].negative_image = TestImage();
  auto other = pipeline_->Generate(request);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_GT((other->latents - by_default->latents).abs().max().item<double>(), 1e-6);
}

TEST_F(FluxPipelineIPAdapterTest, UnloadAndReplaceNeverDisturbARunningRequest) {
  ASSERT_NE(pipeline_, nullptr);
  IPAdapterLoadOptions options;
  options.image_encoder_path = EncoderDir();
  ASSERT_TRUE(pipeline_->LoadIPAdapter("swap", AdapterFile(), options).ok());
  FluxPipelineRequest request = GoldenRequest("pipeline_scale1.0.safetensors");
  request.ip_adapters = {ImagePrompt(1.0)};
  request.ip_adapters[0].name = "swap";
  auto reference = pipeline_->Generate(request);
  ASSERT_TRUE(reference.ok()) << reference.status();

  // Unloaded after the request started: it finishes with what it started with.
  auto during = pipeline_->Generate(request, [&](int step, int) -> absl::Status {
    if (step == 1) {
      EXPECT_TRUE(pipeline_->UnloadIPAdapter("swap").ok());
    }
    return absl::OkStatus();
  });
  ASSERT_TRUE(during.ok()) << during.status();
  EXPECT_TRUE(torch::equal(during->latents, reference->latents));
  auto gone = pipeline_->Generate(request);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
  EXPECT_TRUE(absl::StrContains(gone.status().message(), "ip_adapters[0].name")) << gone.status();

  // Replacing needs `replace`; an image encoder folder is loaded once and shared.
  ASSERT_TRUE(pipeline_->LoadIPAdapter("swap", AdapterFile(), options).ok());
  auto taken = pipeline_->LoadIPAdapter("swap", AdapterFile(), options);
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kAlreadyExists) << taken.status();
  options.replace = true;
  EXPECT_TRUE(pipeline_->LoadIPAdapter("swap", AdapterFile(), options).ok());
  EXPECT_TRUE(pipeline_->UnloadIPAdapter("swap").ok());
  EXPECT_EQ(pipeline_->UnloadIPAdapter("swap").code(), absl::StatusCode::kNotFound);
}

TEST_F(FluxPipelineIPAdapterTest, BadRequestsGetPreciseErrors) {
  ASSERT_NE(pipeline_, nullptr);
  const FluxPipelineRequest base = GoldenRequest("pipeline_scale1.0.safetensors");
  auto expect = [&](const IPAdapterRequestInput& in, absl::StatusCode code,
                    const std::string& needle) {
    FluxPipelineRequest r = base;
    r.ip_adapters = {in};
    auto out = pipeline_->Generate(r);
    EXPECT_EQ(out.status().code(), code) << out.status();
    EXPECT_TRUE(absl::StrContains(out.status().message(), needle))
        << out.status() << " lacks " << needle;
  };
  IPAdapterRequestInput in = ImagePrompt(1.0);
  in.name = "nope";
  expect(in, absl::StatusCode::kNotFound, "IP-Adapter 'nope' is not loaded (loaded: xlabs)");

  in = ImagePrompt(1.0);
  in.image_embeds = torch::zeros({32});
  expect(in, absl::StatusCode::kInvalidArgument, "image and image_embeds are both given");

  in = ImagePrompt(1.0);
  in.image = torch::Tensor();
  expect(in, absl::StatusCode::kInvalidArgument, "needs an image or image_embeds");

  in.image_embeds = torch::zeros({7});
  expect(in, absl::StatusCode::kInvalidArgument, "image_embeds");
  in.image_embeds = torch::full({32}, std::nan(""));
  expect(in, absl::StatusCode::kInvalidArgument, "NaN");
  in.image_embeds = torch::zeros({32}, torch::kInt64);
  expect(in, absl::StatusCode::kInvalidArgument, "expected floating");

  in = ImagePrompt(1.0);
  in.scales = {1.0, 2.0, 3.0};
  expect(in, absl::StatusCode::kInvalidArgument, "scales");
  in.scales = {std::nan("")};
  expect(in, absl::StatusCode::kInvalidArgument, "finite");

  in = ImagePrompt(1.0);
  in.image = torch::zeros({5, 5}, torch::kUInt8);  // not [H, W, 3]
  expect(in, absl::StatusCode::kInvalidArgument, "ip_adapters[0].image");

  // An adapter without an image encoder takes embeddings only.
  ASSERT_TRUE(pipeline_->LoadIPAdapter("embeds-only", AdapterFile(), {}).ok());
  in = ImagePrompt(1.0);
  in.name = "embeds-only";
  expect(in, absl::StatusCode::kFailedPrecondition, "without an image encoder");
  EXPECT_TRUE(pipeline_->UnloadIPAdapter("embeds-only").ok());
}

TEST_F(FluxPipelineIPAdapterTest, BadLoadsGetPreciseErrorsAndChangeNothing) {
  ASSERT_NE(pipeline_, nullptr);
  const std::vector<IPAdapterInfo> before = pipeline_->ListIPAdapters();
  IPAdapterLoadOptions options;
  options.image_encoder_path = EncoderDir();
  EXPECT_EQ(pipeline_->LoadIPAdapter("bad name!", AdapterFile(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto missing = pipeline_->LoadIPAdapter("m", "/nonexistent/ip.safetensors", options);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound) << missing.status();

  // An adapter made for another width: the projection and every to_k/to_v widened.
  auto sd = LoadSafetensorsWeights(AdapterFile());
  ASSERT_TRUE(sd.ok()) << sd.status();
  TensorMap wide;
  for (const auto& [key, t] : *sd) {
    wide[key] = absl::StrContains(key, "double_stream")
                    ? torch::cat({t, t}, 0).contiguous()
                    : t;
  }
  const fs::path dir = fs::path(::testing::TempDir()) / "ip_adapter_wide";
  fs::create_directories(dir);
  const std::string wide_file = (dir / "wide.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(wide_file, wide).ok());
  auto w = pipeline_->LoadIPAdapter("wide", wide_file, options);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument) << w.status();
  EXPECT_TRUE(absl::StrContains(w.status().message(), "double_blocks.0.processor")) << w.status();

  // A folder that is not an image encoder.
  IPAdapterLoadOptions vae;
  vae.image_encoder_path = (PipelineDir() / "dev" / "vae").string();
  auto not_encoder = pipeline_->LoadIPAdapter("v", AdapterFile(), vae);
  EXPECT_EQ(not_encoder.status().code(), absl::StatusCode::kInvalidArgument)
      << not_encoder.status();
  EXPECT_TRUE(absl::StrContains(not_encoder.status().message(), "not an image encoder"))
      << not_encoder.status();

  const std::vector<IPAdapterInfo> after = pipeline_->ListIPAdapters();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i].name, before[i].name);
}


// A pipeline folder that lists `image_encoder` and `feature_extractor` (as diffusers'
// save_pretrained writes them after load_ip_adapter) loads them, and an adapter loaded without
// its own encoder uses the pipeline's: the same golden image.
TEST(FluxPipelineIPAdapterFolderTest, ThePipelinesImageEncoderComponentIsUsed) {
  const fs::path dir = fs::path(::testing::TempDir()) / "flux_dev_with_image_encoder";
  fs::remove_all(dir);
  fs::copy(PipelineDir() / "dev", dir, fs::copy_options::recursive);
  fs::copy(VisionDir() / "clip_vision_encoder", dir / "image_encoder",
           fs::copy_options::recursive);
  fs::create_directories(dir / "feature_extractor");
  fs::copy(VisionDir() / "clip_vision_encoder" / "preprocessor_config.json",
           dir / "feature_extractor" / "preprocessor_config.json");
  nlohmann::json index = ReadJson(dir / "model_index.json");
  index["image_encoder"] = {"transformers", "CLIPVisionModelWithProjection"};
  index["feature_extractor"] = {"transformers", "CLIPImageProcessor"};
  std::ofstream(dir / "model_index.json") << index.dump(2);

  const nlohmann::json spec = ReadJson(PipelineDir() / "cases.json")["cases"]["dev_dynamic_n2"];
  FluxPipelineLoadOptions load;
  load.scheduler_config_path =
      (PipelineDir() / spec["scheduler_config_file"].get<std::string>()).string();
  auto pipeline = FluxPipeline::FromPretrained(dir.string(), load);
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  const PipelineDescription d = (*pipeline)->describe();
  EXPECT_EQ(d.classes.at("image_encoder"), "CLIPVisionModelWithProjection");
  EXPECT_EQ(d.classes.at("feature_extractor"), "CLIPImageProcessor");
  EXPECT_EQ(d.not_loaded.count("image_encoder"), 0u);

  auto info = (*pipeline)->LoadIPAdapter("own", AdapterFile(), {});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->image_encoder, "image_encoder");
  const std::string file = "pipeline_scale1.0.safetensors";
  FluxPipelineRequest r;
  r.prompt_embeds = Golden(file, "inputs/prompt_embeds");
  r.pooled_prompt_embeds = Golden(file, "inputs/pooled_prompt_embeds");
  r.latents = Golden(file, "inputs/latents_unpacked");
  r.height = 32;
  r.width = 48;
  r.num_inference_steps = 2;
  IPAdapterRequestInput in;
  in.name = "own";
  in.image = TestImage();
  r.ip_adapters = {in};
  auto out = (*pipeline)->Generate(r);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(WithinTolerance(out->image, Golden(file, "final/image")));

  // A listed component that is not there: NOT_FOUND naming it.
  fs::remove_all(dir / "image_encoder");
  auto broken = FluxPipeline::FromPretrained(dir.string(), load);
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kNotFound) << broken.status();
  EXPECT_TRUE(absl::StrContains(broken.status().message(), "image_encoder")) << broken.status();
}

}  // namespace
}  // namespace ds::flux
