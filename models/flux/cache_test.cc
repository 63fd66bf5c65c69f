// FirstBlockCache in the Flux transformer and pipeline: threshold 0 is the uncached forward /
// pipeline bit for bit, a skipped forward is exactly "head block + cached tail residuals", one state
// per guidance branch, no interference between concurrent requests, precise errors, and the
// `_supports_cache` metadata row from the wiring.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "handlers/block_cache.h"
#include "handlers/lora_host.h"
#include "handlers/pipeline.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/flux/pipeline.h"
#include "models/flux/spec.h"
#include "models/flux/transformer.h"
#include "testing/flux_step_util.h"

namespace ds::flux {
namespace {

using ::testing::HasSubstr;

// Small but with several blocks of each kind, so that "remaining blocks" spans both kinds.
nlohmann::json Config(int64_t num_layers, int64_t num_single_layers) {
  return {{"patch_size", 1},
          {"in_channels", 16},
          {"num_layers", num_layers},
          {"num_single_layers", num_single_layers},
          {"attention_head_dim", 16},
          {"num_attention_heads", 2},
          {"joint_attention_dim", 32},
          {"pooled_projection_dim", 24},
          {"guidance_embeds", true},
          {"axes_dims_rope", {4, 6, 6}}};
}

std::unique_ptr<FluxTransformer> MakeModel(const nlohmann::json& config,
                                           torch::Dtype dtype = torch::kFloat32) {
  return test::RandomFluxTransformer(config, dtype, 11);
}

// The inputs of denoising step `step` of a fake trajectory: the latents drift a little and the
// timestep falls, as in a sampler.
TensorMap StepInputs(const FluxConfig& cfg, int step) {
  return test::TrajectoryStepInputs(cfg, step, 0.1);
}

absl::StatusOr<torch::Tensor> CachedForward(const FluxTransformer& model, const TensorMap& in,
                                            FirstBlockCacheState* cache,
                                            Intermediates* intermediates = nullptr) {
  FluxTransformer::ForwardExtras extras;
  extras.cache = cache;
  extras.intermediates = intermediates;
  return model.ForwardWithExtras(in, nullptr, extras);
}

std::string LastBlock(const FluxConfig& cfg) {
  return cfg.num_single_layers > 0
             ? absl::StrCat("single_transformer_blocks.", cfg.num_single_layers - 1)
             : absl::StrCat("transformer_blocks.", cfg.num_layers - 1);
}

std::string HeadBlock(const FluxConfig& cfg) {
  return cfg.num_layers > 0 ? "transformer_blocks.0" : "single_transformer_blocks.0";
}

// ---------------------------------------------------------------------------------------------
// Transformer

TEST(FluxFirstBlockCacheTest, ThresholdZeroIsTheUncachedForwardBitForBit) {
  for (const auto& [layers, singles] : {std::pair<int64_t, int64_t>{2, 2}, {0, 3}, {3, 0}}) {
    for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16}) {
      auto model = MakeModel(Config(layers, singles), dtype);
      ASSERT_NE(model, nullptr);
      FirstBlockCacheState state(0.0);
      for (int step = 0; step < 5; ++step) {
        const TensorMap in = StepInputs(model->flux_config(), step);
        auto plain = model->Forward(in);
        auto cached = CachedForward(*model, in, &state);
        ASSERT_TRUE(plain.ok() && cached.ok()) << plain.status() << cached.status();
        EXPECT_TRUE(cached->equal(*plain)) << layers << "+" << singles << " " << dtype << " step "
                                           << step;
      }
      EXPECT_EQ(state.computed(), 5);
      EXPECT_EQ(state.skipped(), 0);
      ASSERT_EQ(state.changes().size(), 4u);
      for (double change : state.changes()) EXPECT_GT(change, 0.0);
      // No extras at all: Forward().
      const TensorMap in = StepInputs(model->flux_config(), 0);
      auto plain = model->Forward(in);
      auto none = model->ForwardWithExtras(in, nullptr, {});
      ASSERT_TRUE(plain.ok() && none.ok());
      EXPECT_TRUE(none->equal(*plain));
    }
  }
}

// With a threshold nothing reaches, every forward after the first skips: its streams are exactly
// the head block's outputs plus the tail residuals the first forward stored, and only the head
// block runs.
TEST(FluxFirstBlockCacheTest, SkippedForwardIsHeadBlockPlusCachedResidualExactly) {
  for (const auto& [layers, singles] : {std::pair<int64_t, int64_t>{2, 2}, {0, 3}, {3, 0}}) {
    auto model = MakeModel(Config(layers, singles));
    ASSERT_NE(model, nullptr);
    const FluxConfig& cfg = model->flux_config();
    FirstBlockCacheState state(std::numeric_limits<double>::max());

    Intermediates first;
    const TensorMap in0 = StepInputs(cfg, 0);
    auto out0 = CachedForward(*model, in0, &state, &first);
    ASSERT_TRUE(out0.ok()) << out0.status();
    EXPECT_TRUE(out0->equal(*model->Forward(in0)));
    ASSERT_EQ(state.computed(), 1);
    ASSERT_EQ(state.tail_residuals().size(), 2u);
    // A computed forward reports the streams after the last block, and the tail residual is what
    // the blocks after the head added.
    const std::string last = LastBlock(cfg), head = HeadBlock(cfg);
    EXPECT_TRUE(first.at("cache.1").equal(first.at(last + ".1")));
    EXPECT_TRUE(state.tail_residuals()[0].equal(first.at(last + ".1") - first.at(head + ".1")));
    EXPECT_TRUE(state.tail_residuals()[1].equal(first.at(last + ".0") - first.at(head + ".0")));
    const std::vector<torch::Tensor> tail = {state.tail_residuals()[0].clone(),
                                             state.tail_residuals()[1].clone()};

    for (int step = 1; step < 4; ++step) {
      Intermediates seen;
      const TensorMap in = StepInputs(cfg, step);
      auto out = CachedForward(*model, in, &state, &seen);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(state.skipped(), step);
      EXPECT_EQ(state.computed(), 1);
      EXPECT_TRUE(seen.at("cache.1").equal(seen.at(head + ".1") + tail[0])) << step;
      EXPECT_TRUE(seen.at("cache.0").equal(seen.at(head + ".0") + tail[1])) << step;
      // Only the head block ran.
      for (const auto& [key, t] : seen) {
        const bool block = absl::StartsWith(key, "transformer_blocks.") ||
                           absl::StartsWith(key, "single_transformer_blocks.");
        if (block) {
          EXPECT_TRUE(absl::StartsWith(key, head + ".")) << key;
        }
      }
      // ... and the result is not the uncached one (the other blocks matter in this model).
      EXPECT_FALSE(out->equal(*model->Forward(in)));
      EXPECT_TRUE(torch::isfinite(*out).all().item<bool>());
    }
  }
}

// When the blocks after the head add nothing (their gates are zero, so each returns its input
// exactly), the cached residual is exactly zero and a skipped forward must equal the uncached
// one bit for bit: the head block's output goes through norm_out / proj_out as the full forward's
// does.
TEST(FluxFirstBlockCacheTest, SkippedForwardFeedsTheOutputLayersLikeTheFullForward) {
  auto model = MakeModel(Config(2, 2));
  ASSERT_NE(model, nullptr);
  const FluxConfig& cfg = model->flux_config();
  const int64_t dim = cfg.inner_dim();
  {
    torch::NoGradGuard no_grad;
    // AdaLayerNormZero chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp;
    // AdaLayerNormZeroSingle: shift, scale, gate.
    auto zero_rows = [&](LinearImpl& l, int64_t chunk) {
      l.weight.narrow(0, chunk * dim, dim).zero_();
      l.bias.narrow(0, chunk * dim, dim).zero_();
    };
    for (size_t i = 1; i < model->transformer()->blocks.size(); ++i) {
      auto& b = *model->transformer()->blocks[i];
      for (LinearImpl* l : {b.norm1->linear.get(), b.norm1_context->linear.get()}) {
        zero_rows(*l, 2);
        zero_rows(*l, 5);
      }
    }
    for (auto& b : model->transformer()->single_blocks) zero_rows(*b->norm->linear, 2);
  }
  FirstBlockCacheState state(std::numeric_limits<double>::max());
  for (int step = 0; step < 4; ++step) {
    const TensorMap in = StepInputs(cfg, step);
    auto cached = CachedForward(*model, in, &state);
    auto plain = model->Forward(in);
    ASSERT_TRUE(cached.ok() && plain.ok());
    EXPECT_TRUE(cached->equal(*plain)) << step;
    if (step == 0) {
      EXPECT_EQ(state.tail_residuals()[0].abs().max().item<float>(), 0.0f);
    }
  }
  EXPECT_EQ(state.skipped(), 3);
}

TEST(FluxFirstBlockCacheTest, ASingleBlockModelIgnoresTheState) {
  auto model = MakeModel(Config(1, 0));
  ASSERT_NE(model, nullptr);
  FirstBlockCacheState state(std::numeric_limits<double>::max());
  for (int step = 0; step < 3; ++step) {
    const TensorMap in = StepInputs(model->flux_config(), step);
    auto cached = CachedForward(*model, in, &state);
    ASSERT_TRUE(cached.ok());
    EXPECT_TRUE(cached->equal(*model->Forward(in)));
  }
  EXPECT_EQ(state.computed() + state.skipped(), 0);
}

// ---------------------------------------------------------------------------------------------
// Pipeline

class FluxPipelineCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    auto pipeline = test::TransformerOnlyFluxPipeline(Config(2, 2), 3);
    ASSERT_TRUE(pipeline.ok()) << pipeline.status();
    pipeline_ = std::move(pipeline).value();
  }

  PipelineRequest Request(uint64_t seed, std::optional<double> threshold) const {
    PipelineRequest r = test::SmallPipelineRequest(*pipeline_, seed, kSteps);
    if (threshold.has_value()) r.cache = BlockCacheConfig{kFirstBlockCacheType, *threshold};
    return r;
  }

  PipelineResult Generate(const PipelineRequest& r) const {
    auto out = pipeline_->Generate(r);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *std::move(out) : PipelineResult{};
  }

  // A threshold at which this pipeline skips some steps but not all (found by trying).
  std::optional<double> MixedThreshold() const {
    for (double t : {0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2}) {
      const PipelineResult out = Generate(Request(1, t));
      if (out.cache_skipped_steps > 0 && out.cache_skipped_steps < kSteps - 1) return t;
    }
    return std::nullopt;
  }

  static constexpr int64_t kSteps = 8;
  std::unique_ptr<FluxPipeline> pipeline_;
};

TEST_F(FluxPipelineCacheTest, LimitsListFirstBlockCache) {
  EXPECT_EQ(pipeline_->limits().cache_types,
            (std::vector<std::string>{kFirstBlockCacheType, kTaylorSeerCacheType}));
}

TEST_F(FluxPipelineCacheTest, ThresholdZeroIsTheUncachedPipelineBitForBit) {
  const PipelineResult plain = Generate(Request(1, std::nullopt));
  const PipelineResult zero = Generate(Request(1, 0.0));
  ASSERT_TRUE(plain.latents.defined() && zero.latents.defined());
  EXPECT_TRUE(zero.latents.equal(plain.latents));
  EXPECT_EQ(zero.cache_computed_steps, kSteps);
  EXPECT_EQ(zero.cache_skipped_steps, 0);
  EXPECT_EQ(plain.cache_computed_steps + plain.cache_skipped_steps, 0);
}

TEST_F(FluxPipelineCacheTest, HighThresholdSkipsEveryStepAfterTheFirst) {
  const PipelineResult plain = Generate(Request(1, std::nullopt));
  const PipelineResult all = Generate(Request(1, 1e9));
  EXPECT_EQ(all.cache_computed_steps, 1);
  EXPECT_EQ(all.cache_skipped_steps, kSteps - 1);
  ASSERT_TRUE(all.latents.defined());
  EXPECT_TRUE(torch::isfinite(all.latents).all().item<bool>());
  EXPECT_FALSE(all.latents.equal(plain.latents));
  // The default threshold: every step is either computed or skipped.
  const PipelineResult def = Generate(Request(1, kFirstBlockCacheDefaultThreshold));
  EXPECT_EQ(def.cache_computed_steps + def.cache_skipped_steps, kSteps);
  EXPECT_GE(def.cache_computed_steps, 1);
}

// True CFG with the negative embeddings equal to the positive ones predicts exactly what the
// conditional pass predicts; with one cache state per branch, each branch makes the same decisions
// as the conditional-only run, so the latents are the same and every count doubles. (A state
// shared by both branches would compare the negative pass with the positive pass's residual of the
// same step, skip it, and change the counts.)
TEST_F(FluxPipelineCacheTest, OneStatePerGuidanceBranch) {
  const std::optional<double> threshold = MixedThreshold();
  ASSERT_TRUE(threshold.has_value()) << "no threshold skips some but not all steps";
  const PipelineResult cond = Generate(Request(1, *threshold));
  PipelineRequest cfg = Request(1, *threshold);
  cfg.negative_prompt_embeds = cfg.prompt_embeds;
  cfg.negative_pooled_prompt_embeds = cfg.pooled_prompt_embeds;
  cfg.true_cfg_scale = 2.0;
  const PipelineResult both = Generate(cfg);
  EXPECT_TRUE(both.true_cfg_applied);
  EXPECT_TRUE(both.latents.equal(cond.latents));
  EXPECT_EQ(both.cache_skipped_steps, 2 * cond.cache_skipped_steps);
  EXPECT_EQ(both.cache_computed_steps, 2 * cond.cache_computed_steps);
}

// Concurrent requests with different seeds and thresholds give exactly what each gives alone.
TEST_F(FluxPipelineCacheTest, ConcurrentRequestsDoNotShareState) {
  const std::optional<double> mixed = MixedThreshold();
  ASSERT_TRUE(mixed.has_value());
  const std::vector<PipelineRequest> requests = {Request(1, *mixed), Request(2, 1e9),
                                                 Request(3, 0.0), Request(1, 1e9)};
  std::vector<PipelineResult> alone;
  for (const PipelineRequest& r : requests) alone.push_back(Generate(r));
  for (int round = 0; round < 2; ++round) {
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
}

TEST_F(FluxPipelineCacheTest, BadConfigsGetPreciseErrors) {
  PipelineRequest r = Request(1, 0.1);
  r.cache->type = "teacache";
  auto out = pipeline_->Generate(r);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(out.status().message()), HasSubstr("cache.type"));
  for (double bad : {-1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    r = Request(1, bad);
    out = pipeline_->Generate(r);
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(out.status().message()), HasSubstr("cache.threshold")) << bad;
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata

TEST(FluxCacheMetadataTest, SupportsCacheRowFromTheWiring) {
  const ModelSpec spec = MakeFluxSpec();
  ASSERT_NE(spec.cache, nullptr);
  EXPECT_EQ(spec.cache->CacheTypes(),
            (std::vector<std::string>{kFirstBlockCacheType, kTaylorSeerCacheType}));
  EXPECT_EQ(spec.cache->BlockStreams().front(), "hidden_states");
  const ModelMetadata meta = BuildModelMetadata(spec);
  EXPECT_TRUE(meta.contains("_supports_cache"));
  EXPECT_THAT(meta.Render(), HasSubstr("_supports_cache"));
  // Models that wire no cache have no row.
  int without = 0;
  for (const ModelSpec* other : ModelRegistry::Global().List()) {
    if (other->cache != nullptr) continue;
    ++without;
    EXPECT_FALSE(BuildModelMetadata(*other).contains("_supports_cache")) << other->name;
  }
  EXPECT_GT(without, 0);
}

}  // namespace
}  // namespace ds::flux
