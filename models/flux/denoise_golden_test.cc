// The whole Flux denoising loop (DenoiseFlowMatchEuler + FlowMatchEulerScheduler + the transformer
// loaded from a diffusers folder through the registry) against diffusers' FluxPipeline on every
// case of $DS_GOLDEN_DIR/pipeline/flux_pipeline/ (see ../shared/golden/README.md): the schedule
// bit for bit, what the transformer receives each step (timestep t/1000 and guidance, bit for bit),
// and the noise prediction, the latents after every step and the final packed/unpacked latents
// within the README's float tolerance |ours - golden| <= 1e-4 + 1e-4 |golden|. The case's
// scheduler config is the one cases.json names (scheduler_config_file). True CFG (negative
// embeddings, true_cfg_scale) is applied the way FluxPipeline does it, inside a model wrapper.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "handlers/flow_match.h"
#include "handlers/flow_match_scheduler.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "models/flux/latents.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::CaseNames;
using ::ds::test::PipelineDir;
using ::ds::test::ReadJson;
using ::ds::test::WithinTolerance;
namespace fs = std::filesystem;


double MaxAbsDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// Forwards to the real transformer and records what it is given and returns; with `negative`
// inputs (true CFG) it runs the negative pass too and returns FluxPipeline's combination
// neg + true_cfg_scale * (pos - neg).
class RecordingModel final : public DiffusionModel {
 public:
  RecordingModel(std::shared_ptr<DiffusionModel> inner, TensorMap negative, double true_cfg_scale)
      : inner_(std::move(inner)), negative_(std::move(negative)), scale_(true_cfg_scale) {}

  const std::string& class_name() const override { return inner_->class_name(); }
  const nlohmann::json& config() const override { return inner_->config(); }
  const ModelOptions& options() const override { return inner_->options(); }
  torch::nn::Module& module() override { return inner_->module(); }
  const torch::nn::Module& module() const override {
    return static_cast<const DiffusionModel&>(*inner_).module();
  }
  std::vector<std::string> required_inputs() const override { return inner_->required_inputs(); }
  std::vector<std::string> optional_inputs() const override { return inner_->optional_inputs(); }

  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const LoraContext* lora) const override {
    timesteps.push_back(inputs.at("timestep").clone());
    if (auto it = inputs.find("guidance"); it != inputs.end()) guidance.push_back(it->second);
    absl::StatusOr<torch::Tensor> pos = inner_->Forward(inputs, lora);
    if (!pos.ok()) return pos;
    noise_pred.push_back(pos->clone());
    if (negative_.empty()) return pos;
    TensorMap neg_inputs = inputs;
    for (const auto& [name, t] : negative_) neg_inputs[name] = t;
    absl::StatusOr<torch::Tensor> neg = inner_->Forward(neg_inputs, lora);
    if (!neg.ok()) return neg;
    neg_noise_pred.push_back(neg->clone());
    return *neg + scale_ * (*pos - *neg);
  }

  mutable std::vector<torch::Tensor> timesteps, guidance, noise_pred, neg_noise_pred;

 private:
  std::shared_ptr<DiffusionModel> inner_;
  TensorMap negative_;
  double scale_;
};

class FluxDenoiseGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(FluxDenoiseDiscoveryTest, FindsCases) {
  EXPECT_FALSE(CaseNames().empty()) << "no cases in " << PipelineDir() / "cases.json";
}

TEST_P(FluxDenoiseGoldenTest, MatchesFluxPipeline) {
  const nlohmann::json spec = ReadJson(PipelineDir() / "cases.json")["cases"][GetParam()];
  auto file = SafetensorsFile::Open((PipelineDir() / spec["file"].get<std::string>()).string());
  ASSERT_TRUE(file.ok()) << file.status();
  auto get = [&](const std::string& key) {
    auto t = (*file)->Get(key);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : torch::Tensor();
  };

  // The scheduler this case used, set as FluxPipeline sets it.
  auto config = LoadFlowMatchEulerConfig(
      (PipelineDir() / spec["scheduler_config_file"].get<std::string>()).string());
  ASSERT_TRUE(config.ok()) << config.status();
  auto scheduler = FlowMatchEulerScheduler::Create(*config);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  const torch::Tensor latents = get("inputs/latents_packed");
  const int64_t n = spec["num_inference_steps"].get<int64_t>();
  ASSERT_TRUE(scheduler->SetTimestepsLikeFluxPipeline(n, latents.size(1)).ok());
  const torch::Tensor golden_sigmas = get("sigmas"), golden_timesteps = get("timesteps");
  EXPECT_TRUE(torch::equal(torch::tensor(scheduler->sigmas()), golden_sigmas))
      << torch::tensor(scheduler->sigmas()) << golden_sigmas;
  EXPECT_TRUE(torch::equal(torch::tensor(scheduler->timesteps()), golden_timesteps))
      << torch::tensor(scheduler->timesteps()) << golden_timesteps;

  // The transformer, loaded from the pipeline's diffusers folder through the registry.
  const fs::path folder = PipelineDir() / spec["pipeline_folder"].get<std::string>();
  auto loaded = LoadModelFromFolder((folder / "transformer").string(), ModelOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::shared_ptr<DiffusionModel> transformer = std::move(*loaded);

  // FluxPipeline's forward inputs. Batch-1 embeddings with more images are repeated (diffusers
  // broadcasts them; the fixture records that repeating is bit-identical).
  const int64_t batch = latents.size(0);
  auto repeat = [&](const torch::Tensor& t) {
    if (t.size(0) == batch) return t;
    std::vector<int64_t> reps(static_cast<size_t>(t.dim()), 1);
    reps[0] = batch / t.size(0);
    return t.repeat(reps);
  };
  TensorMap inputs = {
      {"encoder_hidden_states", repeat(get("transformer_in/encoder_hidden_states"))},
      {"pooled_projections", repeat(get("transformer_in/pooled_projections"))},
      {"img_ids", get("ids/img_ids")},
      {"txt_ids", get("ids/txt_ids")},
  };
  const bool guidance_embeds = spec["guidance_embeds"].get<bool>();
  if (guidance_embeds) {
    inputs["guidance"] =
        torch::full({1}, spec["guidance_scale"].get<double>(), torch::kFloat32).expand({batch});
  }
  TensorMap negative;
  double true_cfg_scale = 0;
  const nlohmann::json& extra = spec["extra_call_kwargs"];
  if (extra.contains("true_cfg_scale")) {
    true_cfg_scale = extra["true_cfg_scale"].get<double>();
    negative["encoder_hidden_states"] = repeat(get("inputs/negative_prompt_embeds"));
    negative["pooled_projections"] = repeat(get("inputs/negative_pooled_prompt_embeds"));
  }
  auto recorder = std::make_shared<RecordingModel>(transformer, negative, true_cfg_scale);
  LoraHost host(recorder, /*handler=*/nullptr);

  std::vector<torch::Tensor> after_step;
  auto out = DenoiseFlowMatchEuler(host, inputs, latents, *scheduler, nullptr, nullptr,
                                   [&](int, const torch::Tensor& x) { after_step.push_back(x); });
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(static_cast<int64_t>(after_step.size()), n);
  ASSERT_EQ(static_cast<int64_t>(recorder->timesteps.size()), n);

  double worst_latents = 0, worst_pred = 0;
  for (int64_t i = 0; i < n; ++i) {
    SCOPED_TRACE("step " + std::to_string(i));
    const std::string step = "step/" + std::to_string(i) + "/";
    EXPECT_EQ(get(step + "t").item<float>(), scheduler->timesteps()[static_cast<size_t>(i)]);
    EXPECT_TRUE(
        torch::equal(recorder->timesteps[static_cast<size_t>(i)], get(step + "timestep_in")))
        << recorder->timesteps[static_cast<size_t>(i)] << get(step + "timestep_in");
    if (guidance_embeds) {
      ASSERT_EQ(static_cast<int64_t>(recorder->guidance.size()), n);
      EXPECT_TRUE(
          torch::equal(recorder->guidance[static_cast<size_t>(i)], get(step + "guidance_in")));
    } else {
      EXPECT_TRUE(recorder->guidance.empty());
      EXPECT_FALSE((*file)->contains(step + "guidance_in"));
    }
    EXPECT_TRUE(
        WithinTolerance(recorder->noise_pred[static_cast<size_t>(i)], get(step + "noise_pred")));
    worst_pred = std::max(worst_pred, MaxAbsDiff(recorder->noise_pred[static_cast<size_t>(i)],
                                                 get(step + "noise_pred")));
    if (!negative.empty()) {
      EXPECT_TRUE(WithinTolerance(recorder->neg_noise_pred[static_cast<size_t>(i)],
                                  get(step + "neg_noise_pred")));
    }
    EXPECT_TRUE(WithinTolerance(after_step[static_cast<size_t>(i)], get(step + "latents")));
    worst_latents = std::max(worst_latents,
                             MaxAbsDiff(after_step[static_cast<size_t>(i)], get(step + "latents")));
  }
  EXPECT_TRUE(WithinTolerance(*out, get("final/latents_packed")));

  // Unpacked as FluxPipeline does before the VAE.
  const nlohmann::json vae_config = ReadJson(folder / "vae" / "config.json");
  auto scale = VaeScaleFactor(vae_config);
  ASSERT_TRUE(scale.ok()) << scale.status();
  auto unpacked =
      UnpackLatents(*out, spec["height"].get<int64_t>(), spec["width"].get<int64_t>(), *scale);
  ASSERT_TRUE(unpacked.ok()) << unpacked.status();
  EXPECT_TRUE(WithinTolerance(*unpacked, get("final/latents_unpacked")));
  std::cout << GetParam() << ": max |noise_pred diff| " << worst_pred << ", max |latents diff| "
            << worst_latents << ", final " << MaxAbsDiff(*out, get("final/latents_packed")) << "\n";
}

INSTANTIATE_TEST_SUITE_P(Cases, FluxDenoiseGoldenTest, ::testing::ValuesIn(CaseNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxDenoiseGoldenTest);

}  // namespace
}  // namespace ds::flux
