// TaylorSeer in the Flux transformer and pipeline: cache_interval 1 is the uncached forward /
// pipeline bit for bit, computed steps are the plain forward, predicted steps use exactly the
// Taylor prediction from the hooked outputs of the computed steps (attention outputs by default,
// the model output in lite mode), one state per guidance branch, no interference between
// concurrent requests, precise errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "handlers/block_cache.h"
#include "handlers/lora_host.h"
#include "handlers/pipeline.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/flux/pipeline.h"
#include "models/flux/transformer.h"
#include "testing/flux_step_util.h"

namespace ds::flux {
namespace {

using ::testing::HasSubstr;

nlohmann::json Config(int64_t num_layers, int64_t num_single_layers) {
  return {{"patch_size", 1},           {"in_channels", 16},
          {"num_layers", num_layers},  {"num_single_layers", num_single_layers},
          {"attention_head_dim", 16},  {"num_attention_heads", 2},
          {"joint_attention_dim", 32}, {"pooled_projection_dim", 24},
          {"guidance_embeds", true},   {"axes_dims_rope", {4, 6, 6}}};
}

std::unique_ptr<FluxTransformer> MakeModel(const nlohmann::json& config,
                                           torch::Dtype dtype = torch::kFloat32) {
  return test::RandomFluxTransformer(config, dtype, 13);
}

// The inputs of denoising step `step` of a fake trajectory (latents drift, timestep falls).
TensorMap StepInputs(const FluxConfig& cfg, int step) {
  return test::TrajectoryStepInputs(cfg, step, 0.05);
}

BlockCacheConfig Taylor(int64_t interval, const std::string& factors_dtype = "bfloat16",
                        bool lite = false) {
  BlockCacheConfig c;
  c.type = kTaylorSeerCacheType;
  c.cache_interval = interval;
  c.taylor_factors_dtype = factors_dtype;
  c.use_lite_mode = lite;
  return c;
}

absl::StatusOr<torch::Tensor> CachedForward(const FluxTransformer& model, const TensorMap& in,
                                            BlockCacheState* cache,
                                            Intermediates* intermediates = nullptr) {
  FluxTransformer::ForwardExtras extras;
  extras.cache = cache;
  extras.intermediates = intermediates;
  return model.ForwardWithExtras(in, nullptr, extras);
}

// The hooked attention outputs of a forward, as captured: per block slot, its outputs.
std::map<int64_t, std::vector<torch::Tensor>> Hooked(const FluxConfig& cfg,
                                                     const Intermediates& seen) {
  std::map<int64_t, std::vector<torch::Tensor>> out;
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    const std::string name = absl::StrCat("transformer_blocks.", i, ".attn.");
    out[i] = {seen.at(name + "0"), seen.at(name + "1")};
  }
  for (int64_t j = 0; j < cfg.num_single_layers; ++j) {
    out[cfg.num_layers + j] = {seen.at(absl::StrCat("single_transformer_blocks.", j, ".attn"))};
  }
  return out;
}

// diffusers' TaylorSeer (max_order 1) evaluated with the model dtype's own LibTorch kernels from
// the hooked outputs of the updates (`updates`: step -> that step's outputs): the factors of the
// last update (order 1 from the stored factors of the one before), then the prediction at `step`.
torch::Tensor Expected(const std::vector<std::pair<int64_t, torch::Tensor>>& updates,
                       torch::ScalarType factors_dtype, int64_t step) {
  torch::Tensor f0, f1;
  int64_t last = -1;
  for (const auto& [at, x] : updates) {
    if (last < 0) {
      f0 = x.to(factors_dtype);
    } else {
      const torch::Tensor slope = (x - f0.to(x.scalar_type())) / (at - last);
      f1 = slope.to(factors_dtype);
      f0 = x.to(factors_dtype);
    }
    last = at;
  }
  const torch::ScalarType dtype = updates.back().second.scalar_type();
  torch::Tensor out = torch::zeros_like(f0, dtype) + f0.to(dtype) * 1.0;
  if (f1.defined()) out = out + f1.to(dtype) * static_cast<double>(step - last);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Transformer

TEST(FluxTaylorSeerTest, IntervalOneIsTheUncachedForwardBitForBit) {
  for (const auto& [layers, singles] : {std::pair<int64_t, int64_t>{2, 2}, {0, 3}, {3, 0}}) {
    for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16}) {
      for (bool lite : {false, true}) {
        auto model = MakeModel(Config(layers, singles), dtype);
        ASSERT_NE(model, nullptr);
        TaylorSeerState state(Taylor(1, "bfloat16", lite));
        for (int step = 0; step < 6; ++step) {
          const TensorMap in = StepInputs(model->flux_config(), step);
          auto plain = model->Forward(in);
          auto cached = CachedForward(*model, in, &state);
          ASSERT_TRUE(plain.ok() && cached.ok()) << plain.status() << cached.status();
          EXPECT_TRUE(cached->equal(*plain))
              << layers << "+" << singles << " " << dtype << " lite " << lite << " step " << step;
        }
        EXPECT_EQ(state.computed(), 6);
        EXPECT_EQ(state.skipped(), 0);
      }
    }
  }
}

// Default mode: every computed step is the plain forward bit for bit, and on every predicted step
// each block's attention outputs are exactly diffusers' first-order prediction from the attention
// outputs the computed steps produced (taken from plain forwards), in the model dtype's
// arithmetic; the rest of the block runs on them.
TEST(FluxTaylorSeerTest, PredictedStepsUseTheTaylorPredictionOfTheAttentionOutputs) {
  for (const auto& [layers, singles] : {std::pair<int64_t, int64_t>{2, 2}, {0, 2}, {2, 0}}) {
    for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16}) {
      for (const std::string factors : {"float32", "bfloat16"}) {
        auto model = MakeModel(Config(layers, singles), dtype);
        ASSERT_NE(model, nullptr);
        const FluxConfig& cfg = model->flux_config();
        const BlockCacheConfig config = Taylor(3, factors);
        TaylorSeerState state(config);
        const torch::ScalarType fdtype = state.factors_dtype();
        // slot -> output -> (step, plain hooked output) of the computed steps.
        std::map<int64_t, std::vector<std::vector<std::pair<int64_t, torch::Tensor>>>> updates;
        int predicted = 0;
        for (int step = 0; step < 9; ++step) {
          const TensorMap in = StepInputs(cfg, step);
          Intermediates plain_seen, seen;
          auto plain = model->ForwardWithIntermediates(in, &plain_seen);
          auto cached = CachedForward(*model, in, &state, &seen);
          ASSERT_TRUE(plain.ok() && cached.ok()) << plain.status() << cached.status();
          const std::string where = absl::StrCat(layers, "+", singles, " ", c10::toString(dtype),
                                                 " factors ", factors, " step ", step);
          ASSERT_EQ(state.current_step(), step);
          const auto hooked = Hooked(cfg, seen);
          if (TaylorSeerShouldCompute(config, step)) {
            EXPECT_TRUE(cached->equal(*plain)) << where;
            for (const auto& [slot, outs] : Hooked(cfg, plain_seen)) {
              updates[slot].resize(outs.size());
              for (size_t o = 0; o < outs.size(); ++o) updates[slot][o].push_back({step, outs[o]});
            }
            continue;
          }
          ++predicted;
          for (const auto& [slot, outs] : hooked) {
            for (size_t o = 0; o < outs.size(); ++o) {
              const torch::Tensor expected = Expected(updates.at(slot)[o], fdtype, step);
              EXPECT_TRUE(outs[o].equal(expected)) << where << " slot " << slot << " output " << o;
            }
          }
          // The prediction is not the plain forward's attention, and the output differs.
          EXPECT_FALSE(hooked.begin()->second[0].equal(Hooked(cfg, plain_seen).begin()->second[0]))
              << where;
          EXPECT_FALSE(cached->equal(*plain)) << where;
          EXPECT_TRUE(torch::isfinite(*cached).all().item<bool>()) << where;
          // The non-hooked parts still ran (the modulation of every block is captured).
          EXPECT_TRUE(seen.count(cfg.num_layers > 0 ? "transformer_blocks.0.norm1.1"
                                                    : "single_transformer_blocks.0.norm.1"));
        }
        // interval 3, warm-up 3, 9 steps: 3 and 5, 6, 8 predicted.
        EXPECT_EQ(predicted, state.skipped());
        EXPECT_EQ(state.skipped(), 4);
        EXPECT_EQ(state.computed(), 5);
      }
    }
  }
}

// Lite mode: a predicted step returns the first-order prediction of the model output itself and
// runs no block.
TEST(FluxTaylorSeerTest, LiteModePredictsTheOutputAndRunsNoBlock) {
  for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto model = MakeModel(Config(2, 2), dtype);
    ASSERT_NE(model, nullptr);
    const BlockCacheConfig config = Taylor(2, "float32", /*lite=*/true);
    TaylorSeerState state(config);
    std::vector<std::pair<int64_t, torch::Tensor>> updates;
    for (int step = 0; step < 8; ++step) {
      const TensorMap in = StepInputs(model->flux_config(), step);
      Intermediates seen;
      auto plain = model->Forward(in);
      auto cached = CachedForward(*model, in, &state, &seen);
      ASSERT_TRUE(plain.ok() && cached.ok()) << plain.status() << cached.status();
      if (TaylorSeerShouldCompute(config, step)) {
        EXPECT_TRUE(cached->equal(*plain)) << dtype << " step " << step;
        updates.push_back({step, *plain});
        continue;
      }
      EXPECT_TRUE(cached->equal(Expected(updates, torch::kFloat, step))) << dtype << " " << step;
      EXPECT_FALSE(cached->equal(*plain));
      for (const auto& [key, t] : seen) {
        EXPECT_FALSE(absl::StrContains(key, "blocks.")) << key;
      }
    }
    EXPECT_GT(state.skipped(), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Pipeline

class FluxPipelineTaylorSeerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    auto pipeline = test::TransformerOnlyFluxPipeline(Config(2, 2), 3);
    ASSERT_TRUE(pipeline.ok()) << pipeline.status();
    pipeline_ = std::move(pipeline).value();
  }

  PipelineRequest Request(uint64_t seed, std::optional<BlockCacheConfig> cache) const {
    PipelineRequest r = test::SmallPipelineRequest(*pipeline_, seed, kSteps);
    r.cache = std::move(cache);
    return r;
  }

  PipelineResult Generate(const PipelineRequest& r) const {
    auto out = pipeline_->Generate(r);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *std::move(out) : PipelineResult{};
  }

  static int64_t ScheduledComputes(const BlockCacheConfig& c) {
    int64_t n = 0;
    for (int64_t step = 0; step < kSteps; ++step) n += TaylorSeerShouldCompute(c, step) ? 1 : 0;
    return n;
  }

  static constexpr int64_t kSteps = 10;
  std::unique_ptr<FluxPipeline> pipeline_;
};

TEST_F(FluxPipelineTaylorSeerTest, LimitsListTaylorSeer) {
  EXPECT_THAT(pipeline_->limits().cache_types,
              ::testing::Contains(std::string(kTaylorSeerCacheType)));
}

TEST_F(FluxPipelineTaylorSeerTest, IntervalOneIsTheUncachedPipelineBitForBit) {
  const PipelineResult plain = Generate(Request(1, std::nullopt));
  for (bool lite : {false, true}) {
    const PipelineResult one = Generate(Request(1, Taylor(1, "bfloat16", lite)));
    ASSERT_TRUE(plain.latents.defined() && one.latents.defined());
    EXPECT_TRUE(one.latents.equal(plain.latents)) << lite;
    EXPECT_EQ(one.cache_computed_steps, kSteps);
    EXPECT_EQ(one.cache_skipped_steps, 0);
  }
}

// The pipeline's step index drives the schedule: the counts are the schedule's, and the result
// differs from the uncached one but stays finite.
TEST_F(FluxPipelineTaylorSeerTest, DefaultsSkipOnTheSchedule) {
  const PipelineResult plain = Generate(Request(1, std::nullopt));
  for (bool lite : {false, true}) {
    BlockCacheConfig config = Taylor(kTaylorSeerDefaultCacheInterval, "bfloat16", lite);
    const PipelineResult cached = Generate(Request(1, config));
    EXPECT_EQ(cached.cache_computed_steps, ScheduledComputes(config)) << lite;
    EXPECT_EQ(cached.cache_skipped_steps, kSteps - ScheduledComputes(config)) << lite;
    EXPECT_GT(cached.cache_skipped_steps, 0);
    ASSERT_TRUE(cached.latents.defined());
    EXPECT_TRUE(torch::isfinite(cached.latents).all().item<bool>());
    EXPECT_FALSE(cached.latents.equal(plain.latents));
    // A cool-down from step 4 on computes every later step.
    config.disable_cache_after_step = 4;
    const PipelineResult cool = Generate(Request(1, config));
    EXPECT_EQ(cool.cache_computed_steps, ScheduledComputes(config));
    EXPECT_GT(cool.cache_computed_steps, cached.cache_computed_steps);
  }
}

// True CFG with the negative embeddings equal to the positive ones: with one state per branch,
// each branch predicts exactly what the conditional-only run predicts, so the latents are the
// same and the counts double. (One state for both would see every step twice and fail.)
TEST_F(FluxPipelineTaylorSeerTest, OneStatePerGuidanceBranch) {
  for (bool lite : {false, true}) {
    const BlockCacheConfig config = Taylor(2, "bfloat16", lite);
    const PipelineResult cond = Generate(Request(1, config));
    PipelineRequest both_request = Request(1, config);
    both_request.negative_prompt_embeds = both_request.prompt_embeds;
    both_request.negative_pooled_prompt_embeds = both_request.pooled_prompt_embeds;
    both_request.true_cfg_scale = 2.0;
    const PipelineResult both = Generate(both_request);
    EXPECT_TRUE(both.true_cfg_applied);
    EXPECT_TRUE(both.latents.equal(cond.latents)) << lite;
    EXPECT_GT(cond.cache_skipped_steps, 0);
    EXPECT_EQ(both.cache_skipped_steps, 2 * cond.cache_skipped_steps);
    EXPECT_EQ(both.cache_computed_steps, 2 * cond.cache_computed_steps);
  }
}

// Concurrent requests with different seeds and settings give exactly what each gives alone.
TEST_F(FluxPipelineTaylorSeerTest, ConcurrentRequestsDoNotShareState) {
  BlockCacheConfig second = Taylor(2, "float32");
  second.max_order = 2;
  BlockCacheConfig fbc;
  fbc.threshold = 0.2;
  const std::vector<PipelineRequest> requests = {
      Request(1, Taylor(kTaylorSeerDefaultCacheInterval)), Request(2, second),
      Request(3, Taylor(3, "bfloat16", true)), Request(1, fbc), Request(1, std::nullopt)};
  std::vector<PipelineResult> alone;
  for (const PipelineRequest& r : requests) alone.push_back(Generate(r));
  std::vector<PipelineResult> together(requests.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < requests.size(); ++i) {
    threads.emplace_back([&, i] { together[i] = Generate(requests[i]); });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(together[i].latents.defined()) << i;
    EXPECT_TRUE(together[i].latents.equal(alone[i].latents)) << i;
    EXPECT_EQ(together[i].cache_skipped_steps, alone[i].cache_skipped_steps) << i;
    EXPECT_EQ(together[i].cache_computed_steps, alone[i].cache_computed_steps) << i;
  }
}

TEST_F(FluxPipelineTaylorSeerTest, BadConfigsGetPreciseErrors) {
  BlockCacheConfig c = Taylor(0);
  auto out = pipeline_->Generate(Request(1, c));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("cache.cache_interval"));
  c = Taylor(5);
  c.max_order = -1;
  out = pipeline_->Generate(Request(1, c));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("cache.max_order"));
  c = Taylor(5, "int8");
  out = pipeline_->Generate(Request(1, c));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("cache.taylor_factors_dtype"));
}

}  // namespace
}  // namespace ds::flux
