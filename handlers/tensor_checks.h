// Value checks on tensors that must be cheap enough for every load path.
//
// Thread-safety: reentrant.
#pragma once

#include <torch/types.h>

#include "absl/status/statusor.h"

namespace ds {

// Whether every element of `t` is finite (no NaN, no ±Inf). Non-floating tensors are finite.
// On the CPU one pass over the exponent bits with no temporaries besides a contiguous copy of a
// strided view (LibTorch's isfinite(t).all() allocates several full-size temporaries and is ~10×
// slower); elsewhere LibTorch's check. INTERNAL if LibTorch fails.
absl::StatusOr<bool> AllFinite(const torch::Tensor& t);

}  // namespace ds
