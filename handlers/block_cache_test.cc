// The block caches' model-agnostic parts: FirstBlockCache's relative-L1 decision rule on
// synthetic residuals, TaylorSeer's schedule, factor update and prediction on synthetic sequences,
// config validation, and the `_supports_cache` metadata row derived from the wiring.
#include "handlers/block_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <set>

#include "handlers/registry.h"

namespace ds {
namespace {

using ::testing::HasSubstr;

// mean(|a - b|) / mean(|b|) in double, element by element (the definition, independently of
// LibTorch's reductions).
double Definition(const torch::Tensor& a, const torch::Tensor& b) {
  const torch::Tensor fa = a.to(torch::kDouble).flatten(), fb = b.to(torch::kDouble).flatten();
  double num = 0, den = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) {
    num += std::abs(fa[i].item<double>() - fb[i].item<double>());
    den += std::abs(fb[i].item<double>());
  }
  return num / den;
}

TEST(RelativeL1ChangeTest, MatchesTheDefinitionInFloat32) {
  torch::manual_seed(1);
  const torch::Tensor prev = torch::randn({2, 7, 5});
  const torch::Tensor cur = prev + 0.1 * torch::randn({2, 7, 5});
  EXPECT_NEAR(RelativeL1Change(cur, prev), Definition(cur, prev), 1e-6);
  EXPECT_EQ(RelativeL1Change(prev, prev), 0.0);
  // Scale invariant: both residuals scaled alike give the same change.
  EXPECT_NEAR(RelativeL1Change(cur * 8, prev * 8), RelativeL1Change(cur, prev), 1e-6);
}

TEST(RelativeL1ChangeTest, ReducedPrecisionRoundsLikeNativeKernels) {
  torch::manual_seed(2);
  for (torch::ScalarType dtype : {torch::kBFloat16}) {
    const torch::Tensor prev = torch::randn({3, 16, 8}).to(dtype);
    const torch::Tensor cur = (prev.to(torch::kFloat) + 0.05 * torch::randn({3, 16, 8})).to(dtype);
    // What PyTorch itself computes in that dtype (diffusers' expression).
    const double native =
        ((cur - prev).abs().mean() / prev.abs().mean()).to(torch::kDouble).item<double>();
    EXPECT_EQ(RelativeL1Change(cur, prev), native) << dtype;
    EXPECT_NEAR(RelativeL1Change(cur, prev), Definition(cur, prev), 1e-2) << dtype;
  }
}

TEST(RelativeL1ChangeTest, ZeroOverZeroIsNaNAndMismatchedShapesThrow) {
  const torch::Tensor z = torch::zeros({4});
  EXPECT_TRUE(std::isnan(RelativeL1Change(z, z)));
  EXPECT_TRUE(std::isinf(RelativeL1Change(torch::ones({4}), z)));
  EXPECT_THROW(RelativeL1Change(torch::ones({4}), torch::ones({5})), c10::Error);
  EXPECT_THROW(RelativeL1Change(torch::ones({4}), torch::ones({4}, torch::kDouble)), c10::Error);
}

class FirstBlockCacheStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(3);
    r0_ = torch::randn({1, 12, 6});
    tail_ = {torch::randn({1, 12, 6}), torch::randn({1, 4, 6})};
  }
  // r0_ plus a perturbation of relative L1 size about `relative`.
  torch::Tensor Perturbed(double relative, uint64_t seed) const {
    torch::manual_seed(seed);
    const torch::Tensor noise = torch::randn(r0_.sizes()).sign();
    return r0_ + relative * r0_.abs().mean() * noise;
  }
  torch::Tensor r0_;
  std::vector<torch::Tensor> tail_;
};

TEST_F(FirstBlockCacheStateTest, FirstForwardComputesIdenticalSkipsBigChangeComputes) {
  FirstBlockCacheState state(kFirstBlockCacheDefaultThreshold);
  EXPECT_TRUE(state.tail_residuals().empty());
  EXPECT_TRUE(state.ShouldComputeRemaining(r0_));  // nothing cached yet
  EXPECT_TRUE(state.changes().empty());
  state.StoreComputed(r0_, tail_);
  ASSERT_EQ(state.tail_residuals().size(), 2u);
  EXPECT_TRUE(state.tail_residuals()[1].equal(tail_[1]));

  EXPECT_FALSE(state.ShouldComputeRemaining(r0_.clone()));  // identical: change 0
  EXPECT_EQ(state.changes().back(), 0.0);
  const torch::Tensor big = Perturbed(0.5, 10);
  EXPECT_TRUE(state.ShouldComputeRemaining(big));
  EXPECT_NEAR(state.changes().back(), Definition(big, r0_), 1e-6);
  EXPECT_GT(state.changes().back(), kFirstBlockCacheDefaultThreshold);
  EXPECT_EQ(state.skipped(), 1);
  EXPECT_EQ(state.computed(), 1);
}

TEST_F(FirstBlockCacheStateTest, ComparesWithTheLastComputedForwardNotTheLastSkippedOne) {
  const double threshold = 0.1;
  FirstBlockCacheState state(threshold);
  ASSERT_TRUE(state.ShouldComputeRemaining(r0_));
  state.StoreComputed(r0_, tail_);
  // r1 is within the threshold of r0: skipped, and r0 stays the reference.
  const torch::Tensor r1 = Perturbed(0.07, 11);
  ASSERT_LT(Definition(r1, r0_), threshold);
  EXPECT_FALSE(state.ShouldComputeRemaining(r1));
  EXPECT_TRUE(state.head_residual().equal(r0_));
  // r2 drifts further the same way: close to r1, but over the threshold from r0.
  const torch::Tensor r2 = r0_ + 2 * (r1 - r0_);
  ASSERT_LT(Definition(r2, r1), threshold);
  ASSERT_GT(Definition(r2, r0_), threshold);
  EXPECT_TRUE(state.ShouldComputeRemaining(r2));
  state.StoreComputed(r2, tail_);
  EXPECT_TRUE(state.head_residual().equal(r2));
  EXPECT_EQ(state.computed(), 2);
  EXPECT_EQ(state.skipped(), 1);
  EXPECT_EQ(state.changes().size(), 2u);
}

TEST_F(FirstBlockCacheStateTest, ThresholdZeroNeverSkipsAChangedResidual) {
  FirstBlockCacheState state(0.0);
  ASSERT_TRUE(state.ShouldComputeRemaining(r0_));
  state.StoreComputed(r0_, tail_);
  torch::Tensor r = r0_;
  for (int i = 0; i < 5; ++i) {
    // The smallest possible change: one element moved by one float32 ulp.
    r = r.clone();
    r.view({-1})[i] = std::nextafter(r.view({-1})[i].item<float>(), 1e9f);
    EXPECT_TRUE(state.ShouldComputeRemaining(r)) << i;
    EXPECT_GT(state.changes().back(), 0.0);
    state.StoreComputed(r, tail_);
  }
  EXPECT_EQ(state.skipped(), 0);
  EXPECT_EQ(state.computed(), 6);
}

TEST_F(FirstBlockCacheStateTest, HugeThresholdSkipsEverythingAfterTheFirstForward) {
  FirstBlockCacheState state(1e30);
  ASSERT_TRUE(state.ShouldComputeRemaining(r0_));
  state.StoreComputed(r0_, tail_);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(state.ShouldComputeRemaining(Perturbed(3.0, 20 + i)));
  EXPECT_EQ(state.skipped(), 4);
  EXPECT_EQ(state.computed(), 1);
}

TEST_F(FirstBlockCacheStateTest, AllZeroResidualsSkipAsDiffusersDoesAndNewShapesCompute) {
  FirstBlockCacheState state(0.0);
  const torch::Tensor zero = torch::zeros_like(r0_);
  ASSERT_TRUE(state.ShouldComputeRemaining(zero));
  state.StoreComputed(zero, tail_);
  // 0/0 = NaN, and NaN > threshold is false: diffusers skips.
  EXPECT_FALSE(state.ShouldComputeRemaining(zero));
  EXPECT_TRUE(std::isnan(state.changes().back()));
  // A residual of another shape cannot be compared: compute.
  EXPECT_TRUE(state.ShouldComputeRemaining(torch::zeros({1, 13, 6})));
}

TEST(ValidateBlockCacheConfigTest, PreciseErrors) {
  const std::vector<std::string> supported = {kFirstBlockCacheType};
  EXPECT_TRUE(ValidateBlockCacheConfig({}, supported).ok());
  EXPECT_TRUE(ValidateBlockCacheConfig({kFirstBlockCacheType, 0.0}, supported).ok());

  absl::Status s = ValidateBlockCacheConfig({"teacache", 0.1}, supported);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("cache.type"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("teacache"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(kFirstBlockCacheType));
  s = ValidateBlockCacheConfig({"", 0.1}, supported);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("cache.type"));
  for (double bad : {-0.01, std::nan(""), std::numeric_limits<double>::infinity()}) {
    s = ValidateBlockCacheConfig({kFirstBlockCacheType, bad}, supported);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("cache.threshold")) << bad;
  }
  // A known type the model does not implement.
  s = ValidateBlockCacheConfig({}, {});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("cache.type"));
}

// ---------------------------------------------------------------------------------------------
// TaylorSeer

BlockCacheConfig TaylorConfig(int64_t max_order = kTaylorSeerDefaultMaxOrder,
                              const std::string& factors_dtype = "float32") {
  BlockCacheConfig c;
  c.type = kTaylorSeerCacheType;
  c.max_order = max_order;
  c.taylor_factors_dtype = factors_dtype;
  return c;
}

TEST(TaylorSeerScheduleTest, FollowsDiffusersRule) {
  BlockCacheConfig c = TaylorConfig();
  ASSERT_EQ(c.cache_interval, 5);
  ASSERT_EQ(c.disable_cache_before_step, 3);
  // Warm-up computes; the step right after it predicts (Python: (3 - 3 - 1) % 5 == 4).
  for (int64_t step = 0; step < 3; ++step) EXPECT_TRUE(TaylorSeerShouldCompute(c, step)) << step;
  EXPECT_FALSE(TaylorSeerShouldCompute(c, 3));
  // Then one computed step every cache_interval: 4, 9, 14, ...
  for (int64_t step = 4; step < 60; ++step) {
    EXPECT_EQ(TaylorSeerShouldCompute(c, step), (step - 4) % 5 == 0) << step;
  }
  // Interval 1 computes every step (the uncached forward).
  c.cache_interval = 1;
  for (int64_t step = 0; step < 40; ++step) EXPECT_TRUE(TaylorSeerShouldCompute(c, step));
  // A cool-down computes from its step on.
  c.cache_interval = 3;
  c.disable_cache_after_step = 12;
  int predicted = 0;
  for (int64_t step = 0; step < 30; ++step) {
    if (step >= 12) {
      EXPECT_TRUE(TaylorSeerShouldCompute(c, step)) << step;
    }
    predicted += TaylorSeerShouldCompute(c, step) ? 0 : 1;
  }
  EXPECT_GT(predicted, 0);
  // No warm-up: step 0 falls on the interval rule only (-1 divisible by 1 only).
  c = TaylorConfig();
  c.disable_cache_before_step = 0;
  EXPECT_FALSE(TaylorSeerShouldCompute(c, 0));
  EXPECT_TRUE(TaylorSeerShouldCompute(c, 1));
  c.cache_interval = 1;
  EXPECT_TRUE(TaylorSeerShouldCompute(c, 0));
}

// Runs `state` over steps 0 .. steps - 1 on the sequence f(step) (one output, slot 0): computed
// steps update, predicted steps are checked by `check(step, predicted)`.
void RunSequence(TaylorSeerState& state, int64_t steps,
                 const std::function<torch::Tensor(int64_t)>& f,
                 const std::function<void(int64_t, const torch::Tensor&)>& check) {
  for (int64_t step = 0; step < steps; ++step) {
    state.SetStep(step);
    if (state.BeginForward()) {
      state.Update(0, {f(step)});
    } else {
      const std::vector<torch::Tensor> p = state.Predict(0);
      ASSERT_EQ(p.size(), 1u);
      check(step, p[0]);
    }
  }
}

// A quantity exactly linear in the step index is predicted exactly for every max_order >= 1, over
// the uneven gaps of the default schedule (updates at 0, 1, 2, 4, 9, ...: deltas 1, 1, 2, 5). Small
// integers keep every float32 operation exact, so equality is the test.
TEST(TaylorSeerStateTest, LinearSequencesArePredictedExactly) {
  torch::manual_seed(4);
  const torch::Tensor a = torch::randint(-50, 50, {3, 5}).to(torch::kFloat);
  const torch::Tensor b = torch::randint(-8, 8, {3, 5}).to(torch::kFloat);
  for (int64_t order : {1, 2, 3}) {
    TaylorSeerState state(TaylorConfig(order));
    int checked = 0;
    RunSequence(
        state, 28, [&](int64_t t) { return a + b * static_cast<double>(t); },
        [&](int64_t t, const torch::Tensor& p) {
          EXPECT_TRUE(p.equal(a + b * static_cast<double>(t)))
              << "order " << order << " step " << t;
          ++checked;
        });
    EXPECT_EQ(checked, state.skipped());
    EXPECT_EQ(state.skipped(), 20);  // 28 steps, updates at 0, 1, 2, 4, 9, 14, 19, 24
    EXPECT_EQ(state.computed(), 8);
    // Orders stored: capped at max_order + 1.
    EXPECT_EQ(state.factors(0, 0).size(), static_cast<size_t>(order + 1));
    // Order 1 is the slope, higher orders of a line vanish.
    EXPECT_TRUE(state.factors(0, 0)[1].equal(b));
    for (int64_t k = 2; k <= order; ++k) {
      EXPECT_EQ(state.factors(0, 0)[k].abs().max().item<float>(), 0.0f) << k;
    }
  }
  // Order 0 holds the last computed value; a line is then not predicted exactly.
  TaylorSeerState hold(TaylorConfig(0));
  RunSequence(
      hold, 12, [&](int64_t t) { return a + b * static_cast<double>(t); },
      [&](int64_t t, const torch::Tensor& p) {
        const int64_t last = *hold.last_update_step(0);
        EXPECT_LT(last, t);
        EXPECT_TRUE(p.equal(a + b * static_cast<double>(last))) << t;
      });
  EXPECT_GT(hold.skipped(), 0);
}

// A quadratic is not exact: the factors are backward differences. With three updates one step
// apart (the warm-up 0, 1, 2) and a prediction s steps later, the prediction of c·t² is
// c·(t + s)² - c·Δ·s (Δ = 1), as expanding the update and prediction formulas gives.
TEST(TaylorSeerStateTest, QuadraticSecondOrderHasTheBackwardDifferenceBias) {
  torch::manual_seed(5);
  const torch::Tensor c = torch::randint(-9, 9, {4}).to(torch::kFloat);
  TaylorSeerState state(TaylorConfig(2));
  int checked = 0;
  RunSequence(
      state, 4, [&](int64_t t) { return c * static_cast<double>(t * t); },
      [&](int64_t t, const torch::Tensor& p) {
        ASSERT_EQ(t, 3);
        const int64_t last = 2, s = t - last;
        EXPECT_TRUE(
            p.equal(c * static_cast<double>((last + s) * (last + s)) - c * static_cast<double>(s)));
        ++checked;
      });
  EXPECT_EQ(checked, 1);
}

// The update and prediction against the documented recursion evaluated element by element in
// double (random values, random increasing steps, every order).
TEST(TaylorSeerStateTest, MatchesTheRecursionInDouble) {
  torch::manual_seed(6);
  for (int64_t order : {0, 1, 2, 4}) {
    BlockCacheConfig config = TaylorConfig(order);
    TaylorSeerState state(config);
    std::vector<std::vector<double>> ref;  // ref[k][element]
    int64_t last = -1;
    const int64_t n = 6;
    int64_t step = 0;
    for (int round = 0; round < 6; ++round) {
      step += 1 + round % 3;
      state.SetStep(step);
      state.BeginForward();
      const torch::Tensor x = torch::randn({n});
      state.Update(7, {x});
      std::vector<std::vector<double>> fresh = {{}};
      for (int64_t i = 0; i < n; ++i) fresh[0].push_back(x[i].item<float>());
      if (last >= 0) {
        for (size_t j = 0; j < static_cast<size_t>(order) && j < ref.size(); ++j) {
          std::vector<double> next;
          for (int64_t i = 0; i < n; ++i) {
            next.push_back((fresh[j][i] - ref[j][i]) / static_cast<double>(step - last));
          }
          fresh.push_back(next);
        }
      }
      ref = fresh;
      last = step;
      ASSERT_EQ(state.factors(7, 0).size(), ref.size());
      ASSERT_EQ(*state.last_update_step(7), step);
    }
    // Two predictions after the last update, 1 and 3 steps ahead of it.
    for (int64_t ahead : {1, 3}) {
      state.SetStep(last + ahead);
      state.BeginForward();
      const torch::Tensor p = state.Predict(7)[0];
      double fact = 1;
      std::vector<double> expected(n, 0.0);
      for (size_t k = 0; k < ref.size(); ++k) {
        if (k > 0) fact *= static_cast<double>(k);
        for (int64_t i = 0; i < n; ++i) {
          expected[i] += ref[k][i] * std::pow(static_cast<double>(ahead), k) / fact;
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        EXPECT_NEAR(p[i].item<float>(), expected[i], 1e-4 * (1 + std::abs(expected[i])))
            << "order " << order << " ahead " << ahead << " element " << i;
      }
    }
  }
}

// Factors are stored in taylor_factors_dtype (diffusers' default bfloat16 rounds them), and the
// arithmetic on bfloat16 outputs is what PyTorch's bfloat16 kernels produce.
TEST(TaylorSeerStateTest, FactorDtypeAndReducedPrecisionArithmetic) {
  torch::manual_seed(7);
  const torch::Tensor x0 = torch::randn({2, 9}), x1 = torch::randn({2, 9});
  {
    TaylorSeerState state(TaylorConfig(0, kTaylorSeerDefaultFactorsDtype));
    EXPECT_EQ(state.factors_dtype(), torch::kBFloat16);
    state.BeginForward();
    state.Update(0, {x0});
    EXPECT_EQ(state.factors(0, 0)[0].scalar_type(), torch::kBFloat16);
    state.SetStep(3);
    ASSERT_FALSE(state.BeginForward());
    const torch::Tensor p = state.Predict(0)[0];
    EXPECT_EQ(p.scalar_type(), torch::kFloat);  // the output's dtype
    EXPECT_TRUE(p.equal(x0.to(torch::kBFloat16).to(torch::kFloat)));
  }
  {
    // bfloat16 outputs, float32 factors, max_order 1, delta 2, predicted 3 steps later.
    const torch::Tensor b0 = x0.to(torch::kBFloat16), b1 = x1.to(torch::kBFloat16);
    TaylorSeerState state(TaylorConfig(1, "float32"));
    state.SetStep(0);
    state.BeginForward();
    state.Update(0, {b0});
    state.SetStep(2);
    state.BeginForward();
    state.Update(0, {b1});
    const torch::Tensor slope = (b1 - b0) / 2;  // native bfloat16 kernels
    EXPECT_TRUE(state.factors(0, 0)[1].equal(slope.to(torch::kFloat)));
    state.SetStep(5);
    ASSERT_FALSE(state.BeginForward());
    const torch::Tensor p = state.Predict(0)[0];
    ASSERT_EQ(p.scalar_type(), torch::kBFloat16);
    const torch::Tensor expected =
        (torch::zeros_like(b1) + b1 * 1.0) + slope * 3.0;  // out = out + f_k * coeff_k
    EXPECT_TRUE(p.equal(expected));
  }
}

TEST(TaylorSeerStateTest, SlotsOutputsCountersAndErrors) {
  torch::manual_seed(8);
  TaylorSeerState state(TaylorConfig(1));
  EXPECT_STREQ(state.type(), kTaylorSeerCacheType);
  EXPECT_EQ(state.current_step(), -1);
  // Without SetStep forwards count steps 0, 1, 2, ... as diffusers does.
  std::map<int64_t, std::vector<torch::Tensor>> seen;
  for (int64_t step = 0; step < 3; ++step) {
    ASSERT_TRUE(state.BeginForward());
    EXPECT_EQ(state.current_step(), step);
    state.Update(0, {torch::full({2}, step), torch::full({3}, 2 * step)});
    state.Update(1, {torch::full({4}, -step)});
  }
  ASSERT_FALSE(state.BeginForward());  // step 3
  const std::vector<torch::Tensor> p0 = state.Predict(0), p1 = state.Predict(1);
  ASSERT_EQ(p0.size(), 2u);
  ASSERT_EQ(p1.size(), 1u);
  EXPECT_TRUE(p0[0].equal(torch::full({2}, 3)));
  EXPECT_TRUE(p0[1].equal(torch::full({3}, 6)));
  EXPECT_TRUE(p1[0].equal(torch::full({4}, -3)));
  EXPECT_EQ(state.computed(), 3);
  EXPECT_EQ(state.skipped(), 1);
  EXPECT_THROW(state.Predict(2), c10::Error);  // never updated
  EXPECT_THROW(state.Update(0, {}), c10::Error);
  state.SetStep(3);  // not after the previous step
  EXPECT_THROW(state.BeginForward(), c10::Error);

  // Nothing to predict from yet: the first forward computes even off the schedule.
  BlockCacheConfig c = TaylorConfig();
  c.disable_cache_before_step = 0;
  TaylorSeerState fresh(c);
  ASSERT_FALSE(TaylorSeerShouldCompute(c, 0));
  EXPECT_TRUE(fresh.BeginForward());
}

TEST(TaylorSeerStateTest, CreateBlockCacheStatePicksTheType) {
  auto fbc = CreateBlockCacheState({});
  ASSERT_TRUE(fbc.ok()) << fbc.status();
  EXPECT_NE(dynamic_cast<FirstBlockCacheState*>(fbc->get()), nullptr);
  auto ts = CreateBlockCacheState(TaylorConfig(2, "float16"));
  ASSERT_TRUE(ts.ok()) << ts.status();
  auto* state = dynamic_cast<TaylorSeerState*>(ts->get());
  ASSERT_NE(state, nullptr);
  EXPECT_EQ(state->config().max_order, 2);
  EXPECT_EQ(state->factors_dtype(), torch::kHalf);
  BlockCacheConfig bad = TaylorConfig();
  bad.cache_interval = 0;
  EXPECT_EQ(CreateBlockCacheState(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ValidateBlockCacheConfigTest, TaylorSeerFieldsNamed) {
  const std::vector<std::string> both = {kFirstBlockCacheType, kTaylorSeerCacheType};
  EXPECT_TRUE(ValidateBlockCacheConfig(TaylorConfig(), both).ok());
  // FirstBlockCache's threshold does not concern TaylorSeer.
  BlockCacheConfig c = TaylorConfig();
  c.threshold = -1;
  EXPECT_TRUE(ValidateBlockCacheConfig(c, both).ok());
  const std::vector<std::pair<std::string, std::function<void(BlockCacheConfig&)>>> cases = {
      {"cache.cache_interval", [](BlockCacheConfig& x) { x.cache_interval = 0; }},
      {"cache.cache_interval", [](BlockCacheConfig& x) { x.cache_interval = -3; }},
      {"cache.disable_cache_before_step",
       [](BlockCacheConfig& x) { x.disable_cache_before_step = -1; }},
      {"cache.disable_cache_after_step",
       [](BlockCacheConfig& x) { x.disable_cache_after_step = -1; }},
      {"cache.max_order", [](BlockCacheConfig& x) { x.max_order = -1; }},
      {"cache.max_order", [](BlockCacheConfig& x) { x.max_order = kTaylorSeerMaxOrderLimit + 1; }},
      {"cache.taylor_factors_dtype", [](BlockCacheConfig& x) { x.taylor_factors_dtype = "fp8"; }},
      {"cache.taylor_factors_dtype", [](BlockCacheConfig& x) { x.taylor_factors_dtype = ""; }},
  };
  for (const auto& [field, mutate] : cases) {
    BlockCacheConfig x = TaylorConfig();
    mutate(x);
    const absl::Status s = ValidateBlockCacheConfig(x, both);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(field));
  }
  BlockCacheConfig limits = TaylorConfig(kTaylorSeerMaxOrderLimit);
  limits.cache_interval = 1;
  limits.disable_cache_before_step = 0;
  limits.disable_cache_after_step = 0;
  EXPECT_TRUE(ValidateBlockCacheConfig(limits, both).ok());
  // A model with only FirstBlockCache.
  const absl::Status s = ValidateBlockCacheConfig(TaylorConfig(), {kFirstBlockCacheType});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(s.message()), HasSubstr("cache.type"));
  EXPECT_THAT(KnownBlockCacheTypes(), ::testing::Contains(std::string(kTaylorSeerCacheType)));
}

class FakeCache : public CacheHandler {
 public:
  explicit FakeCache(std::vector<std::string> types) : types_(std::move(types)) {}
  std::vector<std::string> CacheTypes() const override { return types_; }
  std::vector<std::string> BlockStreams() const override { return {"hidden_states"}; }

 private:
  std::vector<std::string> types_;
};

TEST(BlockCacheMetadataTest, SupportsCacheRowOnlyWhenWired) {
  ModelSpec spec;
  spec.name = "m";
  spec.class_name = "M";
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_supports_cache"));
  const FakeCache none({});
  spec.cache = &none;
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_supports_cache"));
  const FakeCache fbc({kFirstBlockCacheType});
  spec.cache = &fbc;
  const ModelMetadata m = BuildModelMetadata(spec);
  ASSERT_TRUE(m.contains("_supports_cache"));
  auto value = m.Get("_supports_cache");
  ASSERT_TRUE(value.ok()) << value.status();
  EXPECT_EQ(DisplayFeatureValue(*value), "True");
}

}  // namespace
}  // namespace ds
