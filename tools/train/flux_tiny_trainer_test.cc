// The training tool end to end at a few steps per stage: every output is written, loads through
// the real loaders (the pipeline folder as the server loads it, the LoRA as kohya with every key
// applied, the classifier), and training really moves the weights away from their initialization.
#include "tools/train/flux_tiny_trainer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "handlers/pipeline.h"
#include "handlers/safetensors.h"
#include "models/flux/pipeline.h"
#include "testing/test_util.h"
#include "tools/train/classifier.h"

namespace ds::train {
namespace {

namespace fs = std::filesystem;

TEST(FluxTinyTrainerTest, TrainsEveryStageAndWritesLoadableOutputs) {
  test::TempDir tmp;
  FluxTinyTrainOptions o;
  o.out_dir = tmp.path();
  o.scenes_per_combination = 1;
  o.vae_steps = 3;
  o.vae_batch = 4;
  o.denoiser_steps = 3;
  o.denoiser_batch = 4;
  o.lora_steps = 3;
  o.lora_batch = 4;
  o.classifier_steps = 2;
  int lines = 0;
  o.log = [&](const std::string&) { ++lines; };
  o.log_every = 1;
  auto report = TrainFluxTiny(o);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GE(lines, 3 + 3 + 3 + 2);
  for (const char* stage : {"vae", "denoiser", "lora", "classifier"}) {
    ASSERT_TRUE(report->contains(stage)) << stage;
    EXPECT_GT((*report)[stage]["seconds"].get<double>(), 0) << stage;
  }
  const double scale = (*report)["vae"]["scaling_factor"].get<double>();
  EXPECT_TRUE(std::isfinite(scale) && scale > 0);
  EXPECT_TRUE(fs::exists(fs::path(tmp.path()) / "training-report.json"));

  // The pipeline folder loads as the server loads one, with the measured VAE factors.
  auto pipeline = flux::FluxPipeline::FromPretrained((fs::path(tmp.path()) / "flux-tiny").string());
  ASSERT_TRUE(pipeline.ok()) << pipeline.status();
  // Weights are float16 files.
  auto weights = SafetensorsFile::Open(
      (fs::path(tmp.path()) / "flux-tiny/transformer/diffusion_pytorch_model.safetensors")
          .string());
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto proj = (*weights)->Get("proj_out.weight");
  ASSERT_TRUE(proj.ok());
  EXPECT_EQ(proj->scalar_type(), torch::kHalf);
  // proj_out starts at zero (adaLN-Zero) and moved.
  EXPECT_GT(proj->abs().max().item<double>(), 0);

  // The LoRA: kohya naming, every key applied.
  auto lora = (*pipeline)->transformer_host().Load(
      "stars", (fs::path(tmp.path()) / "flux-tiny-stars.safetensors").string());
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->report.format, "kohya");
  EXPECT_TRUE(lora->report.unmatched.empty()) << lora->report.ToString();
  EXPECT_FALSE(lora->report.modules.empty());

  auto classifier =
      ShapeClassifier::Load((fs::path(tmp.path()) / "shape-classifier.safetensors").string());
  EXPECT_TRUE(classifier.ok()) << classifier.status();
}

TEST(FluxTinyTrainerTest, BadOptionsNameTheField) {
  FluxTinyTrainOptions o;
  o.out_dir = "/nonexistent-unused";
  o.denoiser_steps = 0;
  auto r = TrainFluxTiny(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("denoiser_steps"), std::string::npos) << r.status();
  o.denoiser_steps = 1;
  o.side = 20;
  r = TrainFluxTiny(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("side"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace ds::train
