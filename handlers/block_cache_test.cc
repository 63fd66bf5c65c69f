// FirstBlockCache's model-agnostic parts: the relative-L1 decision rule on synthetic residuals,
// config validation, and the `_supports_cache` metadata row derived from the wiring.
#include "handlers/block_cache.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

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
