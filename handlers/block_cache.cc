#include "handlers/block_cache.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ds {

const std::vector<std::string>& KnownBlockCacheTypes() {
  static const std::vector<std::string>* const kTypes =
      new std::vector<std::string>{kFirstBlockCacheType};
  return *kTypes;
}

absl::Status ValidateBlockCacheConfig(const BlockCacheConfig& config,
                                      const std::vector<std::string>& supported) {
  const std::vector<std::string>& known = KnownBlockCacheTypes();
  if (config.type.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("cache.type: required (one of: ",
                                                   absl::StrJoin(known, ", "), ")"));
  }
  if (std::find(known.begin(), known.end(), config.type) == known.end()) {
    return absl::InvalidArgumentError(absl::StrCat("cache.type: unknown cache type '", config.type,
                                                   "' (known: ", absl::StrJoin(known, ", "), ")"));
  }
  if (std::find(supported.begin(), supported.end(), config.type) == supported.end()) {
    return absl::UnimplementedError(absl::StrCat(
        "cache.type: this model does not support '", config.type, "' (it supports: ",
        supported.empty() ? std::string("no cache types") : absl::StrJoin(supported, ", "), ")"));
  }
  if (!std::isfinite(config.threshold) || config.threshold < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cache.threshold: must be finite and >= 0, got ", config.threshold));
  }
  return absl::OkStatus();
}

double RelativeL1Change(const torch::Tensor& current, const torch::Tensor& previous) {
  TORCH_CHECK(current.sizes() == previous.sizes(), "head residual shape ", current.sizes(),
              " differs from the cached one ", previous.sizes());
  TORCH_CHECK(current.scalar_type() == previous.scalar_type(), "head residual dtype ",
              current.scalar_type(), " differs from the cached one ", previous.scalar_type());
  c10::InferenceMode inference;
  const torch::ScalarType dtype = current.scalar_type();
  if (dtype == torch::kFloat || dtype == torch::kDouble) {
    // diffusers: (r - r_prev).abs().mean() / r_prev.abs().mean(), then .item().
    const torch::Tensor num = (current - previous).abs().mean();
    const torch::Tensor den = previous.abs().mean();
    return (num / den).item<double>();
  }
  // Reduced precision: float32 arithmetic rounded to `dtype` after each operation, which is what
  // PyTorch's bfloat16/float16 kernels produce (means accumulate in float32).
  const auto round = [dtype](const torch::Tensor& t) { return t.to(dtype).to(torch::kFloat); };
  const torch::Tensor cur = current.to(torch::kFloat);
  const torch::Tensor prev = previous.to(torch::kFloat);
  const torch::Tensor num = round(round(cur - prev).abs().mean());
  const torch::Tensor den = round(prev.abs().mean());
  return round(num / den).item<double>();
}

bool FirstBlockCacheState::ShouldComputeRemaining(const torch::Tensor& head_residual) {
  if (!head_residual_.defined() || tail_residuals_.empty() ||
      head_residual_.sizes() != head_residual.sizes() ||
      head_residual_.scalar_type() != head_residual.scalar_type()) {
    return true;
  }
  const double change = RelativeL1Change(head_residual, head_residual_);
  changes_.push_back(change);
  // diffusers: should_compute = diff > threshold (so NaN skips).
  if (change > threshold_) return true;
  ++skipped_;
  return false;
}

void FirstBlockCacheState::StoreComputed(torch::Tensor head_residual,
                                         std::vector<torch::Tensor> tail_residuals) {
  head_residual_ = std::move(head_residual);
  tail_residuals_ = std::move(tail_residuals);
  ++computed_;
}

}  // namespace ds
