#include "handlers/block_cache.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {

const std::vector<std::string>& KnownBlockCacheTypes() {
  static const std::vector<std::string>* const kTypes =
      new std::vector<std::string>{kFirstBlockCacheType, kTaylorSeerCacheType};
  return *kTypes;
}

absl::Status ValidateBlockCacheConfig(const BlockCacheConfig& config,
                                      const std::vector<std::string>& supported) {
  const std::vector<std::string>& known = KnownBlockCacheTypes();
  if (config.type.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache.type: required (one of: ", absl::StrJoin(known, ", "), ")"));
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
  if (config.type == kFirstBlockCacheType &&
      (!std::isfinite(config.threshold) || config.threshold < 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cache.threshold: must be finite and >= 0, got ", config.threshold));
  }
  if (config.type == kTaylorSeerCacheType) {
    if (config.cache_interval < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("cache.cache_interval: must be >= 1, got ", config.cache_interval));
    }
    if (config.disable_cache_before_step < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cache.disable_cache_before_step: must be >= 0, got ", config.disable_cache_before_step));
    }
    if (config.disable_cache_after_step.has_value() && *config.disable_cache_after_step < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cache.disable_cache_after_step: must be >= 0, got ", *config.disable_cache_after_step));
    }
    if (config.max_order < 0 || config.max_order > kTaylorSeerMaxOrderLimit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cache.max_order: must be in 0..", kTaylorSeerMaxOrderLimit, ", got ", config.max_order));
    }
    RETURN_IF_ERROR(TaylorFactorsDtype(config.taylor_factors_dtype).status());
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::ScalarType> TaylorFactorsDtype(absl::string_view name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kHalf;
  if (name == "float32") return torch::kFloat;
  return absl::InvalidArgumentError(absl::StrCat("cache.taylor_factors_dtype: unknown dtype '",
                                                 name, "' (bfloat16, float16 or float32)"));
}

bool TaylorSeerShouldCompute(const BlockCacheConfig& config, int64_t step) {
  const bool warmup = step < config.disable_cache_before_step;
  // Python's (x % n == 0) for n >= 1 is divisibility, which C++'s % tests alike for negative x.
  const bool interval = (step - config.disable_cache_before_step - 1) % config.cache_interval == 0;
  const bool cooldown =
      config.disable_cache_after_step.has_value() && step >= *config.disable_cache_after_step;
  return warmup || interval || cooldown;
}

absl::StatusOr<std::unique_ptr<BlockCacheState>> CreateBlockCacheState(
    const BlockCacheConfig& config) {
  RETURN_IF_ERROR(ValidateBlockCacheConfig(config, KnownBlockCacheTypes()));
  if (config.type == kTaylorSeerCacheType) return std::make_unique<TaylorSeerState>(config);
  return std::make_unique<FirstBlockCacheState>(config.threshold);
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

// ---------------------------------------------------------------------------------------------
// TaylorSeer

namespace {

bool ReducedPrecision(torch::ScalarType t) { return t == torch::kBFloat16 || t == torch::kHalf; }

// One elementwise operation in `dtype` as PyTorch computes it: directly for float32/float64; for
// bfloat16/float16 in float32, rounded to `dtype` (what the native kernels do, on every device).
template <typename Op>
torch::Tensor InDtype(torch::ScalarType dtype, Op op, const torch::Tensor& a) {
  if (!ReducedPrecision(dtype)) return op(a.to(dtype));
  return op(a.to(torch::kFloat)).to(dtype);
}
template <typename Op>
torch::Tensor InDtype(torch::ScalarType dtype, Op op, const torch::Tensor& a,
                      const torch::Tensor& b) {
  if (!ReducedPrecision(dtype)) return op(a.to(dtype), b.to(dtype));
  return op(a.to(torch::kFloat), b.to(torch::kFloat)).to(dtype);
}

}  // namespace

TaylorSeerState::TaylorSeerState(const BlockCacheConfig& config)
    : config_(config), factors_dtype_(TaylorFactorsDtype(config.taylor_factors_dtype).value()) {}

bool TaylorSeerState::BeginForward() {
  const int64_t step = next_step_.value_or(current_step_ + 1);
  next_step_.reset();
  TORCH_CHECK(step > current_step_, "TaylorSeer: step ", step,
              " does not follow the previous forward's step ", current_step_);
  current_step_ = step;
  computing_ = TaylorSeerShouldCompute(config_, step);
  // A forward can only predict once there is something to predict from; diffusers raises then.
  if (!computing_ && slots_.empty()) computing_ = true;
  ++(computing_ ? computed_ : skipped_);
  return computing_;
}

void TaylorSeerState::Update(int64_t slot, const std::vector<torch::Tensor>& outputs) {
  TORCH_CHECK(!outputs.empty(), "TaylorSeer: no outputs to update slot ", slot, " with");
  c10::InferenceMode inference;
  Slot& s = slots_[slot];
  const bool first = !s.last_update_step.has_value();
  const int64_t delta = first ? 0 : current_step_ - *s.last_update_step;
  TORCH_CHECK(first || delta != 0, "TaylorSeer: delta step cannot be zero (slot ", slot, ")");
  std::vector<std::vector<torch::Tensor>> factors(outputs.size());
  std::vector<torch::ScalarType> dtypes;
  for (size_t i = 0; i < outputs.size(); ++i) {
    const torch::Tensor& features = outputs[i];
    TORCH_CHECK(features.defined(), "TaylorSeer: output ", i, " of slot ", slot, " is undefined");
    const torch::ScalarType dtype = features.scalar_type();
    dtypes.push_back(dtype);
    std::vector<torch::Tensor> fresh = {features};
    if (!first && i < s.factors.size()) {
      const std::vector<torch::Tensor>& prev = s.factors[i];
      for (int64_t j = 0; j < config_.max_order && j < static_cast<int64_t>(prev.size()); ++j) {
        fresh.push_back(InDtype(
            dtype, [delta](const torch::Tensor& d) { return d / delta; },
            InDtype(
                dtype, [](const torch::Tensor& a, const torch::Tensor& b) { return a - b; },
                fresh[j], prev[j].to(dtype))));
      }
    }
    for (torch::Tensor& f : fresh) {
      // Order 0 is the caller's tensor: store a copy it cannot change under us.
      f = f.scalar_type() == factors_dtype_ ? f.clone() : f.to(factors_dtype_);
    }
    factors[i] = std::move(fresh);
  }
  s.factors = std::move(factors);
  s.dtypes = std::move(dtypes);
  s.last_update_step = current_step_;
}

std::vector<torch::Tensor> TaylorSeerState::Predict(int64_t slot) const {
  const auto it = slots_.find(slot);
  TORCH_CHECK(it != slots_.end() && it->second.last_update_step.has_value(),
              "TaylorSeer: cannot predict slot ", slot, " without a prior update");
  const Slot& s = it->second;
  c10::InferenceMode inference;
  const double offset = static_cast<double>(current_step_ - *s.last_update_step);
  const size_t orders = s.factors[0].size();
  std::vector<torch::Tensor> outputs;
  for (size_t i = 0; i < s.factors.size(); ++i) {
    const torch::ScalarType dtype = s.dtypes[i];
    torch::Tensor out = torch::zeros_like(s.factors[i][0], dtype);
    double factorial = 1;
    for (size_t k = 0; k < orders && k < s.factors[i].size(); ++k) {
      if (k > 0) factorial *= static_cast<double>(k);
      // Python: (step_offset ** order) / math.factorial(order), a float.
      const double coeff = std::pow(offset, static_cast<double>(k)) / factorial;
      const torch::Tensor term = InDtype(
          dtype, [coeff](const torch::Tensor& f) { return f * coeff; }, s.factors[i][k].to(dtype));
      out = InDtype(
          dtype, [](const torch::Tensor& a, const torch::Tensor& b) { return a + b; }, out, term);
    }
    outputs.push_back(std::move(out));
  }
  return outputs;
}

std::vector<torch::Tensor> TaylorSeerState::factors(int64_t slot, size_t output) const {
  const auto it = slots_.find(slot);
  if (it == slots_.end() || output >= it->second.factors.size()) return {};
  return it->second.factors[output];
}

std::optional<int64_t> TaylorSeerState::last_update_step(int64_t slot) const {
  const auto it = slots_.find(slot);
  if (it == slots_.end()) return std::nullopt;
  return it->second.last_update_step;
}

}  // namespace ds
