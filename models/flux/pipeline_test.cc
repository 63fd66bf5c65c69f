// FluxPipeline end to end against diffusers' FluxPipeline on every case of
// $DS_GOLDEN_DIR/pipeline/flux_pipeline/ (and the text-encoder folder of flux_pipeline_text, run
// from its recorded embeddings), loaded from the pipeline FOLDERS (model_index.json): the final
// unpacked latents and the [0, 1] image within the README's float tolerance
// |ours - golden| <= 1e-4 + 1e-4 |golden|, and the uint8 image within its uint8 tolerance (at most
// one level, at most 0.1 % of the values). Plus properties: seeds are reproducible to the byte,
// guidance is ignored (and reported) without guidance_embeds, single files assemble the same
// pipeline, and bad requests get precise errors.
#include "models/flux/pipeline.h"

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
#include "handlers/safetensors.h"
#include "models/flux/latents.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::CaseNames;
using ::ds::test::PipelineDir;
using ::ds::test::ReadJson;
using ::ds::test::TextPipelineDir;
using ::ds::test::WithinTolerance;
namespace fs = std::filesystem;

constexpr double kMaxUint8DifferingFraction = 0.001;

// The README's uint8 tolerance: at most one level anywhere, at most 0.1 % of values differing.
::testing::AssertionResult Uint8WithinTolerance(const torch::Tensor& ours,
                                                const torch::Tensor& golden, int64_t* differing) {
  if (ours.sizes() != golden.sizes()) {
    return ::testing::AssertionFailure() << "shape " << ours.sizes() << " vs " << golden.sizes();
  }
  const torch::Tensor diff = (ours.to(torch::kInt32) - golden.to(torch::kInt32)).abs();
  const int64_t max_diff = diff.max().item<int64_t>();
  *differing = diff.gt(0).sum().item<int64_t>();
  const double fraction = static_cast<double>(*differing) / static_cast<double>(diff.numel());
  if (max_diff <= 1 && fraction <= kMaxUint8DifferingFraction) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "max level difference " << max_diff << ", " << *differing
                                       << " of " << diff.numel() << " values differ";
}

class Fixture {
 public:
  explicit Fixture(const fs::path& file) {
    auto f = SafetensorsFile::Open(file.string());
    EXPECT_TRUE(f.ok()) << f.status();
    if (f.ok()) file_ = std::move(f).value();
  }
  torch::Tensor Get(const std::string& key) const {
    if (file_ == nullptr) return {};
    auto t = file_->Get(key);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : torch::Tensor();
  }
  bool Has(const std::string& key) const { return file_ != nullptr && file_->contains(key); }

 private:
  std::shared_ptr<const SafetensorsFile> file_;
};

std::unique_ptr<FluxPipeline> LoadOrDie(const fs::path& folder,
                                        const FluxPipelineLoadOptions& options = {}) {
  auto p = FluxPipeline::FromPretrained(folder.string(), options);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(p).value() : nullptr;
}

// Checks a run against a golden file's final/* outputs.
void ExpectMatchesGolden(const FluxPipeline& pipeline, const FluxPipelineRequest& request,
                         const Fixture& golden, const std::string& name) {
  auto out = pipeline.Generate(request);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(WithinTolerance(out->latents, golden.Get("final/latents_unpacked")));
  EXPECT_TRUE(WithinTolerance(out->image, golden.Get("final/image")));
  EXPECT_TRUE(torch::equal(torch::tensor(out->sigmas), golden.Get("sigmas")));
  EXPECT_TRUE(torch::equal(torch::tensor(out->timesteps), golden.Get("timesteps")));

  auto ours_u8 = ImagesToUint8(out->image);
  ASSERT_TRUE(ours_u8.ok()) << ours_u8.status();
  int64_t differing = 0;
  EXPECT_TRUE(Uint8WithinTolerance(*ours_u8, golden.Get("final/image_uint8"), &differing));

  // The PNGs carry exactly those pixels.
  ASSERT_EQ(static_cast<int64_t>(out->png.size()), out->image.size(0));
  for (size_t b = 0; b < out->png.size(); ++b) {
    auto decoded = DecodePng(out->png[b]);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_TRUE(torch::equal(*decoded, (*ours_u8)[static_cast<int64_t>(b)]));
  }
  std::cout
      << name << ": max |latents diff| "
      << (out->latents.cpu() - golden.Get("final/latents_unpacked")).abs().max().item<double>()
      << ", max |image diff| "
      << (out->image - golden.Get("final/image")).abs().max().item<double>() << ", uint8 "
      << differing << " of " << ours_u8->numel() << " values differ\n";
}

class FluxPipelineGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(FluxPipelineDiscoveryTest, FindsCases) {
  EXPECT_FALSE(CaseNames(PipelineDir()).empty()) << "no cases in " << PipelineDir();
}

TEST_P(FluxPipelineGoldenTest, MatchesFluxPipeline) {
  const nlohmann::json spec = ReadJson(PipelineDir() / "cases.json")["cases"][GetParam()];
  const Fixture golden(PipelineDir() / spec["file"].get<std::string>());

  // The case's pipeline folder, with the scheduler config the case used (which may differ from
  // the folder's own).
  FluxPipelineLoadOptions load;
  load.scheduler_config_path =
      (PipelineDir() / spec["scheduler_config_file"].get<std::string>()).string();
  auto pipeline = LoadOrDie(PipelineDir() / spec["pipeline_folder"].get<std::string>(), load);
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->transformer_config().guidance_embeds, spec["guidance_embeds"].get<bool>());

  FluxPipelineRequest request;
  request.prompt_embeds = golden.Get("inputs/prompt_embeds");
  request.pooled_prompt_embeds = golden.Get("inputs/pooled_prompt_embeds");
  request.latents = golden.Get("inputs/latents_unpacked");
  request.height = spec["height"].get<int64_t>();
  request.width = spec["width"].get<int64_t>();
  request.num_inference_steps = spec["num_inference_steps"].get<int64_t>();
  request.guidance_scale = spec["guidance_scale"].get<double>();
  const nlohmann::json& extra = spec["extra_call_kwargs"];
  if (extra.contains("num_images_per_prompt")) {
    request.num_images_per_prompt = extra["num_images_per_prompt"].get<int64_t>();
  }
  if (extra.contains("true_cfg_scale")) {
    request.true_cfg_scale = extra["true_cfg_scale"].get<double>();
    request.negative_prompt_embeds = golden.Get("inputs/negative_prompt_embeds");
    request.negative_pooled_prompt_embeds = golden.Get("inputs/negative_pooled_prompt_embeds");
  }
  request.png = true;
  ExpectMatchesGolden(*pipeline, request, golden, GetParam());

  auto out = pipeline->Generate(request);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->guidance_applied, spec["guidance_applied"].get<bool>());
  EXPECT_EQ(out->true_cfg_applied, extra.contains("true_cfg_scale"));
  EXPECT_FALSE(out->seed.has_value());
}

INSTANTIATE_TEST_SUITE_P(Cases, FluxPipelineGoldenTest,
                         ::testing::ValuesIn(CaseNames(PipelineDir())),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxPipelineGoldenTest);

// The complete flux_tiny folder lists CLIP/T5 text encoders and tokenizers: with
// load_text_encoders = false it loads without them (reported), and its recorded text embeddings
// reproduce each case's image. (pipeline_text_test.cc runs the same folder from text prompts.)
TEST(FluxPipelineTest, FolderWithTextEncodersLoadsWithoutThemAndMatches) {
  FluxPipelineLoadOptions without_text;
  without_text.load_text_encoders = false;
  auto pipeline = LoadOrDie(TextPipelineDir() / "flux_tiny", without_text);
  ASSERT_NE(pipeline, nullptr);
  for (const char* key : {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}) {
    EXPECT_EQ(pipeline->not_loaded().count(key), 1u) << key;
  }
  EXPECT_EQ(pipeline->not_loaded().count("image_encoder"), 0u);  // listed as null
  const std::vector<std::string> cases = CaseNames(TextPipelineDir());
  ASSERT_FALSE(cases.empty());
  const nlohmann::json all = ReadJson(TextPipelineDir() / "cases.json")["cases"];
  for (const std::string& name : cases) {
    SCOPED_TRACE(name);
    const Fixture golden(TextPipelineDir() / all[name]["file"].get<std::string>());
    // Sizes, steps and guidance as the fixture recorded them.
    const torch::Tensor image = golden.Get("final/image");
    FluxPipelineRequest request;
    request.prompt_embeds = golden.Get("text/prompt_embeds");
    request.pooled_prompt_embeds = golden.Get("text/pooled_prompt_embeds");
    request.latents = golden.Get("inputs/latents_unpacked");
    request.height = image.size(2);
    request.width = image.size(3);
    request.num_inference_steps = golden.Get("timesteps").numel();
    request.guidance_scale = golden.Get("step/0/guidance_in")[0].item<double>();
    request.png = true;
    ExpectMatchesGolden(*pipeline, request, golden, name);
  }
}

FluxPipelineRequest SmallRequest(const FluxPipeline& p) {
  const FluxConfig& c = p.transformer_config();
  FluxPipelineRequest r;
  torch::manual_seed(7);
  r.prompt_embeds = torch::randn({5, c.joint_attention_dim});
  r.pooled_prompt_embeds = torch::randn({c.pooled_projection_dim});
  r.height = 2 * p.vae_scale_factor() * 2;
  r.width = 2 * p.vae_scale_factor() * 3;
  r.num_inference_steps = 2;
  r.seed = 1234;
  r.png = true;
  return r;
}

TEST(FluxPipelineTest, SameSeedSameBytesDifferentSeedDifferentBytes) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.num_images_per_prompt = 2;
  auto a = pipeline->Generate(r);
  auto b = pipeline->Generate(r);
  r.seed = 1235;
  auto c = pipeline->Generate(r);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok()) << a.status() << b.status() << c.status();
  ASSERT_EQ(a->png.size(), 2u);
  EXPECT_EQ(a->seed, std::optional<uint64_t>(1234));
  EXPECT_EQ(a->png, b->png);
  EXPECT_TRUE(torch::equal(a->image, b->image));
  EXPECT_NE(a->png[0], c->png[0]);
  EXPECT_NE(a->png[0], a->png[1]);  // two images of one prompt get different noise
  // The PNG has the requested size.
  auto decoded = DecodePng(a->png[0]);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->size(0), r.height);
  EXPECT_EQ(decoded->size(1), r.width);
  // Seeded noise is SeededNoise of the latent shape: the same run with that noise given.
  auto noise = SeededNoise(a->latents.sizes().vec(), 1234, torch::kFloat32, torch::kCPU);
  ASSERT_TRUE(noise.ok());
  r.seed.reset();
  r.latents = *noise;
  auto given = pipeline->Generate(r);
  ASSERT_TRUE(given.ok()) << given.status();
  EXPECT_EQ(given->png, a->png);
}

TEST(FluxPipelineTest, UnseededRequestReportsItsSeed) {
  auto pipeline = LoadOrDie(PipelineDir() / "schnell");
  ASSERT_NE(pipeline, nullptr);
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.seed.reset();
  auto a = pipeline->Generate(r);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(a->seed.has_value());
  r.seed = a->seed;
  auto b = pipeline->Generate(r);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->png, b->png);
}

TEST(FluxPipelineTest, GuidanceIgnoredAndReportedWithoutGuidanceEmbeds) {
  auto schnell = LoadOrDie(PipelineDir() / "schnell");
  auto dev = LoadOrDie(PipelineDir() / "dev");
  ASSERT_TRUE(schnell != nullptr && dev != nullptr);
  ASSERT_FALSE(schnell->transformer_config().guidance_embeds);
  ASSERT_TRUE(dev->transformer_config().guidance_embeds);
  for (FluxPipeline* p : {schnell.get(), dev.get()}) {
    FluxPipelineRequest r = SmallRequest(*p);
    r.guidance_scale = 1.0;
    auto low = p->Generate(r);
    r.guidance_scale = 9.0;
    auto high = p->Generate(r);
    ASSERT_TRUE(low.ok() && high.ok()) << low.status() << high.status();
    const bool applied = p->transformer_config().guidance_embeds;
    EXPECT_EQ(high->guidance_applied, applied);
    EXPECT_EQ(high->guidance_scale, 9.0);
    EXPECT_EQ(torch::equal(low->latents, high->latents), !applied);
  }
  EXPECT_EQ(schnell->variant(), "flux-schnell");
  EXPECT_EQ(dev->variant(), "flux-dev");
}

TEST(FluxPipelineTest, RejectsSizesNotMultiplesOfTwiceTheVaeScale) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  const int64_t m = 2 * pipeline->vae_scale_factor();
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.height = 3 * m + 1;  // nearest valid: 3m
  auto out = pipeline->Generate(r);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
  EXPECT_TRUE(absl::StrContains(out.status().message(), "height")) << out.status();
  EXPECT_TRUE(absl::StrContains(out.status().message(), std::to_string(3 * m))) << out.status();
  r = SmallRequest(*pipeline);
  r.width = 5 * m - 2;  // nearest valid: 5m
  out = pipeline->Generate(r);
  ASSERT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
  EXPECT_TRUE(absl::StrContains(out.status().message(), "width")) << out.status();
  EXPECT_TRUE(absl::StrContains(out.status().message(), std::to_string(5 * m))) << out.status();
  r = SmallRequest(*pipeline);
  r.height = -m;
  EXPECT_EQ(pipeline->Generate(r).status().code(), absl::StatusCode::kInvalidArgument);
  r = SmallRequest(*pipeline);
  r.width = (pipeline->options().max_image_side / m + 1) * m;
  EXPECT_EQ(pipeline->Generate(r).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FluxPipelineTest, RejectsBadEmbeddingsStepsAndLatents) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  const FluxConfig& c = pipeline->transformer_config();
  auto expect_invalid = [&](const FluxPipelineRequest& r, const std::string& needle) {
    auto out = pipeline->Generate(r);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << out.status();
    EXPECT_TRUE(absl::StrContains(out.status().message(), needle))
        << "'" << needle << "' not in: " << out.status();
  };
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.prompt_embeds = torch::randn({5, c.joint_attention_dim + 1});
  expect_invalid(r, "joint_attention_dim");
  r = SmallRequest(*pipeline);
  r.pooled_prompt_embeds = torch::randn({1, c.pooled_projection_dim * 2});
  expect_invalid(r, "pooled_projection_dim");
  r = SmallRequest(*pipeline);
  r.prompt_embeds = torch::Tensor();
  expect_invalid(r, "prompt_embeds is required");
  r = SmallRequest(*pipeline);
  r.prompt_embeds = torch::ones({2, 5, c.joint_attention_dim});  // batch 2 vs pooled batch 1
  expect_invalid(r, "batch");
  r = SmallRequest(*pipeline);
  r.negative_prompt_embeds = torch::randn({3, c.joint_attention_dim});  // pooled half missing
  expect_invalid(r, "negative_pooled_prompt_embeds");
  r = SmallRequest(*pipeline);
  r.num_inference_steps = 0;
  expect_invalid(r, "num_inference_steps");
  r.num_inference_steps = pipeline->options().max_inference_steps + 1;
  expect_invalid(r, std::to_string(pipeline->options().max_inference_steps));
  r = SmallRequest(*pipeline);
  r.sigmas = std::vector<double>{};
  expect_invalid(r, "sigmas");
  r = SmallRequest(*pipeline);
  r.num_images_per_prompt = 0;
  expect_invalid(r, "num_images_per_prompt");
  r.num_images_per_prompt = pipeline->options().max_batch + 1;
  expect_invalid(r, "max_batch");
  r = SmallRequest(*pipeline);
  r.guidance_scale = std::nan("");
  expect_invalid(r, "guidance_scale");
  r = SmallRequest(*pipeline);
  r.latents = torch::randn({1, pipeline->num_channels_latents() + 1, 4, 6});
  expect_invalid(r, "latents");
  r = SmallRequest(*pipeline);
  r.decode = false;  // png needs decode
  expect_invalid(r, "png");
}

TEST(FluxPipelineTest, CallerSigmasSetTheSteps) {
  auto pipeline = LoadOrDie(PipelineDir() / "schnell");
  ASSERT_NE(pipeline, nullptr);
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.num_inference_steps = 2;
  auto plain = pipeline->Generate(r);
  // FluxPipeline's own sigmas given explicitly, with a different (ignored) step count.
  r.sigmas = FluxPipelineSigmas(2);
  r.num_inference_steps = 50;
  auto given = pipeline->Generate(r);
  ASSERT_TRUE(plain.ok() && given.ok()) << plain.status() << given.status();
  EXPECT_EQ(given->steps, 2);
  EXPECT_EQ(given->sigmas, plain->sigmas);
  EXPECT_EQ(given->png, plain->png);
}

TEST(FluxPipelineTest, StepCallbackSeesEveryStepAndCanCancel) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  FluxPipelineRequest r = SmallRequest(*pipeline);
  r.num_inference_steps = 3;
  std::vector<std::pair<int, int>> calls;
  int latents_seen = 0;
  auto out = pipeline->Generate(
      r,
      [&](int step, int total) {
        calls.emplace_back(step, total);
        return absl::OkStatus();
      },
      [&](int, const torch::Tensor&) { ++latents_seen; });
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(calls, (std::vector<std::pair<int, int>>{{0, 3}, {1, 3}, {2, 3}, {3, 3}}));
  EXPECT_EQ(latents_seen, 3);
  calls.clear();
  out = pipeline->Generate(r, [&](int step, int total) {
    calls.emplace_back(step, total);
    return step == 1 ? absl::CancelledError("client went away") : absl::OkStatus();
  });
  EXPECT_EQ(out.status().code(), absl::StatusCode::kCancelled) << out.status();
  EXPECT_EQ(calls.size(), 2u);
}

TEST(FluxPipelineTest, SharedComponentsAndLatentsOnlyWithoutVae) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  // A second pipeline sharing the first one's transformer and VAE loads neither again.
  FluxPipelineLoadOptions shared;
  shared.transformer = pipeline->components().transformer;
  shared.vae = pipeline->components().vae;
  auto second = LoadOrDie(PipelineDir() / "dev", shared);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(second->components().transformer.get(), pipeline->components().transformer.get());
  EXPECT_EQ(second->components().vae.get(), pipeline->components().vae.get());

  // Without a VAE: latents only; asking for images is FAILED_PRECONDITION.
  FluxPipelineComponents c = pipeline->components();
  c.vae = nullptr;
  auto no_vae = FluxPipeline::Create(c);
  ASSERT_TRUE(no_vae.ok()) << no_vae.status();
  // FluxPipeline's vae_scale_factor without a VAE is 8.
  EXPECT_EQ((*no_vae)->vae_scale_factor(), 8);
  FluxPipelineRequest r = SmallRequest(**no_vae);
  EXPECT_EQ((*no_vae)->Generate(r).status().code(), absl::StatusCode::kFailedPrecondition);
  r.decode = false;
  r.png = false;
  auto latents_only = (*no_vae)->Generate(r);
  ASSERT_TRUE(latents_only.ok()) << latents_only.status();
  EXPECT_FALSE(latents_only->image.defined());
  auto shape = LatentShape(1, pipeline->num_channels_latents(), r.height, r.width, 8);
  ASSERT_TRUE(shape.ok());
  EXPECT_EQ(latents_only->latents.sizes().vec(), *shape);
}

// Per-request adapters: a LoRA (diffusers/PEFT naming, written here for this transformer's width)
// with weight 0 gives the base image bit for bit, with weight 1 a different one; the base is never
// changed by using it.
TEST(FluxPipelineTest, AdapterStackAppliesPerRequest) {
  auto pipeline = LoadOrDie(PipelineDir() / "dev");
  ASSERT_NE(pipeline, nullptr);
  ASSERT_TRUE(pipeline->transformer_host().supports_lora());
  const int64_t dim = pipeline->transformer_config().inner_dim();
  const int64_t rank = 2;
  torch::manual_seed(3);
  ds::test::TempDir dir;
  const std::string path = dir.File("lora.safetensors");
  const std::string module = "transformer.transformer_blocks.0.attn.to_q";
  ASSERT_TRUE(WriteSafetensors(path, {{module + ".lora_A.weight", torch::randn({rank, dim})},
                                      {module + ".lora_B.weight", torch::randn({dim, rank})}})
                  .ok());
  auto loaded = pipeline->transformer_host().Load("style", path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();

  FluxPipelineRequest r = SmallRequest(*pipeline);
  auto base = pipeline->Generate(r);
  auto zero = pipeline->transformer_host().Snapshot({{"style", 0.0}});
  auto one = pipeline->transformer_host().Snapshot({{"style", 1.0}});
  ASSERT_TRUE(zero.ok() && one.ok()) << zero.status() << one.status();
  r.adapters = *zero;
  auto with_zero = pipeline->Generate(r);
  r.adapters = *one;
  auto with_one = pipeline->Generate(r);
  r.adapters = nullptr;
  auto base_again = pipeline->Generate(r);
  ASSERT_TRUE(base.ok() && with_zero.ok() && with_one.ok() && base_again.ok());
  EXPECT_EQ(with_zero->png, base->png);
  EXPECT_FALSE(torch::equal(with_one->latents, base->latents));
  EXPECT_EQ(base_again->png, base->png);
}

// model_index.json pointing `vae` at a component that is no latent image decoder (a transformer).
TEST(FluxPipelineTest, RejectsAVaeThatIsNoLatentImageDecoder) {
  ds::test::TempDir dir;
  const fs::path root(dir.path());
  const fs::path dev = fs::absolute(PipelineDir() / "dev");
  nlohmann::json index = ReadJson(dev / "model_index.json");
  index["vae"] = {"diffusers", kFluxClassName};
  std::ofstream(root / "model_index.json") << index.dump();
  fs::create_directory_symlink(dev / "transformer", root / "transformer");
  fs::create_directory_symlink(dev / "transformer", root / "vae");
  fs::create_directory_symlink(dev / "scheduler", root / "scheduler");
  auto p = FluxPipeline::FromPretrained(root.string());
  ASSERT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
  EXPECT_TRUE(absl::StrContains(p.status().message(), "'vae'")) << p.status();
  EXPECT_TRUE(absl::StrContains(p.status().message(), "LatentImageDecoder")) << p.status();

  // And a malformed entry, a missing component folder, another pipeline class.
  index = ReadJson(dev / "model_index.json");
  index["vae"] = "AutoencoderKL";
  std::ofstream(root / "model_index.json", std::ios::trunc) << index.dump();
  p = FluxPipeline::FromPretrained(root.string());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
  EXPECT_TRUE(absl::StrContains(p.status().message(), "\"vae\"")) << p.status();
  index = ReadJson(dev / "model_index.json");
  index["_class_name"] = "FluxFillPipeline";
  std::ofstream(root / "model_index.json", std::ios::trunc) << index.dump();
  EXPECT_EQ(FluxPipeline::FromPretrained(root.string()).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(FluxPipeline::FromPretrained((root / "missing").string()).status().code(),
            absl::StatusCode::kNotFound);
}

// One file per component assembles the same pipeline as the folder: variant detected from the
// weights, the scheduler defaulting to that variant's config (FLUX.1-dev's here, which is also the
// folder's).
TEST(FluxPipelineTest, SingleFilesAssembleTheSamePipeline) {
  const fs::path dev = PipelineDir() / "dev";
  FluxSingleFiles files;
  files.transformer = (dev / "transformer" / "diffusion_pytorch_model.safetensors").string();
  // RoPE axes are not recorded in weights; take them from the folder's config.
  files.transformer_config_override = {
      {"axes_dims_rope", ReadJson(dev / "transformer" / "config.json")["axes_dims_rope"]}};
  // The VAE as a BFL/LDM single file (ae.safetensors of the same weights); GroupNorm groups are
  // not recorded in weights either.
  files.vae = (PipelineDir() / ".." / "vae" / "ae.safetensors").string();
  files.vae_config_override = {
      {"norm_num_groups", ReadJson(dev / "vae" / "config.json")["norm_num_groups"]}};
  auto single = FluxPipeline::FromSingleFiles(files);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ((*single)->variant(), "flux-dev");
  EXPECT_TRUE((*single)->components().scheduler.use_dynamic_shifting);
  auto folder = LoadOrDie(dev);
  ASSERT_NE(folder, nullptr);
  FluxPipelineRequest r = SmallRequest(*folder);
  auto a = (*single)->Generate(r);
  auto b = folder->Generate(r);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_TRUE(torch::equal(a->latents, b->latents));
  EXPECT_EQ(a->png, b->png);

  files.vae = (dev / "transformer" / "diffusion_pytorch_model.safetensors").string();
  auto bad = FluxPipeline::FromSingleFiles(files);
  EXPECT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "vae")) << bad.status();
}

}  // namespace
}  // namespace ds::flux
