// Tiny random Flux transformers and the inputs of a fake denoising trajectory, for the step-cache
// tests (header-only; never used by the server).
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <utility>

#include "handlers/flow_match_scheduler.h"
#include "handlers/lora_host.h"
#include "handlers/model.h"
#include "handlers/pipeline.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/config.h"
#include "models/flux/pipeline.h"
#include "models/flux/transformer.h"

namespace ds::test {

// A FluxTransformer of `config` in `dtype` with random weights (InitRandomWeights(seed)); null
// (and a test failure) when the config is refused.
inline std::unique_ptr<flux::FluxTransformer> RandomFluxTransformer(const nlohmann::json& config,
                                                                    torch::Dtype dtype,
                                                                    uint64_t seed) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = flux::FluxTransformer::Create(config, options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), seed);
  return std::move(model).value();
}

// The inputs of denoising step `step` of a fake trajectory, as a sampler would give them: 12
// image tokens on a 3x4 grid drifting by 0.05 per step, 6 text tokens, the timestep falling from
// 1 by `timestep_decrement` per step, guidance 3.5. The same for every call with the same step.
inline TensorMap TrajectoryStepInputs(const flux::FluxConfig& cfg, int step,
                                      double timestep_decrement) {
  torch::manual_seed(5);
  TensorMap in;
  const int64_t img = 12, txt = 6;
  in["hidden_states"] = torch::randn({1, img, cfg.in_channels});
  in["encoder_hidden_states"] = torch::randn({1, txt, cfg.joint_attention_dim});
  in["pooled_projections"] = torch::randn({1, cfg.pooled_projection_dim});
  const torch::Tensor drift = torch::randn({1, img, cfg.in_channels});
  in["hidden_states"] = in["hidden_states"] + 0.05 * step * drift;
  in["timestep"] = torch::full({1}, 1.0 - timestep_decrement * step);
  torch::Tensor ids = torch::zeros({img, 3});
  for (int64_t i = 0; i < img; ++i) {
    ids[i][1] = static_cast<float>(i / 4);
    ids[i][2] = static_cast<float>(i % 4);
  }
  in["img_ids"] = ids;
  in["txt_ids"] = torch::zeros({txt, 3});
  in["guidance"] = torch::full({1}, 3.5);
  return in;
}

// A FluxPipeline of just a random transformer of `config` (InitRandomWeights(seed)) and
// FLUX.1-dev's scheduler: latents only, requests give prompt embeddings.
inline absl::StatusOr<std::unique_ptr<flux::FluxPipeline>> TransformerOnlyFluxPipeline(
    const nlohmann::json& config, uint64_t seed) {
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  if (!spec.ok()) return spec.status();
  auto transformer = (*spec)->factory(config, ModelOptions{});
  if (!transformer.ok()) return transformer.status();
  InitRandomWeights((*transformer)->module(), seed);
  flux::FluxPipelineComponents components;
  components.transformer = std::make_shared<LoraHost>(
      std::shared_ptr<DiffusionModel>(std::move(transformer).value()), (*spec)->lora);
  components.scheduler = FlowMatchEulerConfig::FluxDev();
  return flux::FluxPipeline::Create(components);
}

// A latents-only request for such a pipeline: 6 prompt tokens (seeded 17), an image two size
// multiples high and three wide, `steps` steps, noise from `seed`.
inline PipelineRequest SmallPipelineRequest(const flux::FluxPipeline& pipeline, uint64_t seed,
                                            int64_t steps) {
  const PipelineLimits l = pipeline.limits();
  torch::manual_seed(17);
  PipelineRequest r;
  r.prompt_embeds = torch::randn({6, l.prompt_embeds_dim});
  r.pooled_prompt_embeds = torch::randn({l.pooled_prompt_embeds_dim});
  r.height = 2 * l.image_size_multiple;
  r.width = 3 * l.image_size_multiple;
  r.num_inference_steps = steps;
  r.seed = seed;
  r.decode = false;
  return r;
}

}  // namespace ds::test
