#include "handlers/tensor_checks.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace ds {
namespace {

TEST(AllFiniteTest, AgreesWithIsfiniteForEveryFloatingDtypeAndPosition) {
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kBFloat16, torch::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    // Sizes around the block boundary; a bad value at the start, middle and end.
    for (int64_t n : {1, 7, 1023, 1024, 1025, 5000}) {
      torch::Tensor t = torch::randn({n}).to(dtype);
      EXPECT_TRUE(*AllFinite(t));
      for (double bad : {std::nan(""), double{INFINITY}, -double{INFINITY}}) {
        for (int64_t at : {int64_t{0}, n / 2, n - 1}) {
          torch::Tensor u = t.clone();
          u.index_put_({at}, bad);
          EXPECT_FALSE(*AllFinite(u)) << "n=" << n << " at=" << at << " value=" << bad;
        }
      }
    }
  }
  // Largest finite values and subnormals are finite.
  EXPECT_TRUE(*AllFinite(torch::tensor({65504.0, -65504.0, 6e-8}, torch::kHalf)));
  EXPECT_TRUE(*AllFinite(torch::tensor({3.0e38, 1e-45}, torch::kFloat)));
}

TEST(AllFiniteTest, StridedViewsAndNonFloatingTensors) {
  torch::Tensor m = torch::randn({64, 32});
  m.index_put_({5, 20}, std::nan(""));
  EXPECT_TRUE(*AllFinite(m.narrow(1, 0, 16)));   // strided view without the NaN
  EXPECT_FALSE(*AllFinite(m.narrow(1, 16, 16)));  // strided view with it
  EXPECT_FALSE(*AllFinite(m.t()));
  EXPECT_TRUE(*AllFinite(torch::arange(10)));
  EXPECT_TRUE(*AllFinite(torch::Tensor()));
  EXPECT_TRUE(*AllFinite(torch::empty({0}, torch::kFloat)));
}

}  // namespace
}  // namespace ds
