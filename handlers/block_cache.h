// Step caching across denoising steps (diffusers' hooks/first_block_cache.py and
// hooks/taylorseer_cache.py), model-agnostic.
//
// FirstBlockCache: a transformer whose body is a sequence of repeated blocks runs only its first
// ("head") block at every step. When the head block's residual (its output minus its input on
// the hidden_states stream) changed little since the last step that ran every block, the
// remaining blocks are skipped and their cached residual (what they added to each stream the
// blocks return, the last time they ran) is added to the head block's output instead.
//
// TaylorSeer (https://huggingface.co/papers/2503.06923; diffusers' TaylorSeerCacheConfig): on a
// fixed schedule of steps (warm-up, then one computed step every `cache_interval`), the hooked
// modules run and their outputs update per-module Taylor factors (finite differences over the
// step index); on the other steps the hooked modules do not run and their outputs are predicted
// from the factors by a truncated Taylor series in the step offset. Which modules are hooked is the
// model's (diffusers' default: every attention module of the repeated blocks; its "lite" mode:
// the final output projection, with the blocks not run at all). We offer diffusers' config fields
// except the regex module selectors (skip_predict_identifiers / cache_identifiers), which name
// modules of a PyTorch module tree a model here need not have; `use_lite_mode` selects diffusers'
// other predefined selection.
//
// The pieces:
//   * BlockCacheConfig: what a request asks for (type and parameters), checked by
//     ValidateBlockCacheConfig against the types the model implements.
//   * CacheHandler: the model's wiring (ModelSpec::cache, registry.h). A model opts in by
//     implementing the cache in its forward and putting a handler in its spec; that is what makes
//     the `_supports_cache` metadata row appear and what pipelines report as supported types.
//   * BlockCacheState (FirstBlockCacheState, TaylorSeerState): the per-request, per-branch state
//     the model's forward consults and updates. A pipeline creates one per request and per
//     classifier-free-guidance branch (CreateBlockCacheState; diffusers' cache_context("cond") /
//     ("uncond")), so nothing is ever shared between requests or branches, and drops it when the
//     request ends (diffusers' reset_stateful_hooks). The forward finds the type it implements
//     with dynamic_cast.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ds {

// The type name of FirstBlockCache in requests and limits.
inline constexpr char kFirstBlockCacheType[] = "first_block_cache";
// diffusers' FirstBlockCacheConfig.threshold default.
inline constexpr double kFirstBlockCacheDefaultThreshold = 0.05;

// The type name of TaylorSeer in requests and limits (diffusers' hook name).
inline constexpr char kTaylorSeerCacheType[] = "taylorseer_cache";
// diffusers' TaylorSeerCacheConfig defaults.
inline constexpr int64_t kTaylorSeerDefaultCacheInterval = 5;
inline constexpr int64_t kTaylorSeerDefaultDisableCacheBeforeStep = 3;
inline constexpr int64_t kTaylorSeerDefaultMaxOrder = 1;
inline constexpr char kTaylorSeerDefaultFactorsDtype[] = "bfloat16";
// Our bound on max_order (diffusers has none): every order keeps one copy of every hooked output.
inline constexpr int64_t kTaylorSeerMaxOrderLimit = 8;

// The cache types this machinery implements (a model supports the ones its handler lists).
const std::vector<std::string>& KnownBlockCacheTypes();

// A request's cache settings (PipelineRequest::cache). Fields of the other type are ignored.
struct BlockCacheConfig {
  // One of KnownBlockCacheTypes(): "first_block_cache", "taylorseer_cache".
  std::string type = kFirstBlockCacheType;
  // FirstBlockCache: the remaining blocks run when the relative L1 change of the head block's
  // residual exceeds this (see FirstBlockCacheState); finite and >= 0. Higher skips more.
  double threshold = kFirstBlockCacheDefaultThreshold;

  // TaylorSeer (diffusers' TaylorSeerCacheConfig; see TaylorSeerShouldCompute for the schedule).
  // Steps between full computations; >= 1 (1 computes every step: the uncached forward).
  int64_t cache_interval = kTaylorSeerDefaultCacheInterval;
  // Steps 0 .. this - 1 always compute (warm-up); >= 0.
  int64_t disable_cache_before_step = kTaylorSeerDefaultDisableCacheBeforeStep;
  // Steps >= this always compute; unset: no cool-down. >= 0.
  std::optional<int64_t> disable_cache_after_step;
  // Highest Taylor order; 0 .. kTaylorSeerMaxOrderLimit (0 repeats the last computed output).
  int64_t max_order = kTaylorSeerDefaultMaxOrder;
  // Storage dtype of the factors: "bfloat16" (diffusers' default), "float16" or "float32".
  std::string taylor_factors_dtype = kTaylorSeerDefaultFactorsDtype;
  // diffusers' use_lite_mode: predict the model's final output projection and skip the blocks
  // (instead of predicting each block's attention output).
  bool use_lite_mode = false;
};

// OK when `config` is usable on a model supporting `supported` (its CacheHandler's types).
// INVALID_ARGUMENT naming `cache.type` for an empty or unknown type (listing the known ones),
// naming `cache.threshold` for a NaN, infinite or negative threshold; for "taylorseer_cache" naming
// `cache.cache_interval` (< 1), `cache.disable_cache_before_step` (< 0),
// `cache.disable_cache_after_step` (< 0), `cache.max_order` (outside 0 .. kTaylorSeerMaxOrderLimit)
// or `cache.taylor_factors_dtype` (not one of the three names); UNIMPLEMENTED naming `cache.type`
// for a known type the model does not support (listing what it supports).
absl::Status ValidateBlockCacheConfig(const BlockCacheConfig& config,
                                      const std::vector<std::string>& supported);

// The dtype a taylor_factors_dtype name stands for; INVALID_ARGUMENT naming
// `cache.taylor_factors_dtype` for any other name.
absl::StatusOr<torch::ScalarType> TaylorFactorsDtype(absl::string_view name);

// diffusers' TaylorSeer schedule: whether the hooked modules run at 0-based step `step`:
//   step < disable_cache_before_step                                (warm-up)
//   or (step - disable_cache_before_step - 1) divisible by cache_interval
//   or (disable_cache_after_step set and step >= it)                (cool-down).
// So with the defaults (5, 3) steps 0, 1, 2, 4, 9, 14, ... compute and step 3 (right after the
// warm-up) is already predicted. `config` must be valid.
bool TaylorSeerShouldCompute(const BlockCacheConfig& config, int64_t step);

// How a model shows its cache support to the shared machinery. Handler objects are owned by their
// model folder (static lifetime), immutable and thread-safe.
class CacheHandler {
 public:
  virtual ~CacheHandler() = default;
  // The cache types the model's forward implements (a subset of KnownBlockCacheTypes()).
  virtual std::vector<std::string> CacheTypes() const = 0;
  // The streams the model's blocks return, in the order FirstBlockCacheState keeps their tail
  // residuals (Flux: "hidden_states", "encoder_hidden_states"); the first is the one whose head
  // residual decides.
  // The head block is the first of the model's repeated blocks (ModelStructure::repeated_blocks,
  // in forward order).
  virtual std::vector<std::string> BlockStreams() const = 0;
};

// The relative L1 change of a residual, as diffusers' FBCHeadBlockHook computes it:
//   mean(|current - previous|) / mean(|previous|)
// with the arithmetic in the tensors' dtype (float32/float64 directly; for bfloat16/float16 the
// difference, both means and the ratio are rounded to that dtype as PyTorch's reduced-precision
// kernels do, the means accumulated in float32). 0/0 is NaN, x/0 infinite. `current` and
// `previous` must have the same shape and dtype; throws c10::Error otherwise (call it where
// LibTorch exceptions are caught).
double RelativeL1Change(const torch::Tensor& current, const torch::Tensor& previous);

// The cache state of one request's one guidance branch: a FirstBlockCacheState or a
// TaylorSeerState. Thread-safety: none; one state is used by one forward at a time (a request's
// branch runs its steps in order). Not copyable (a copy would share cached tensors across
// requests).
class BlockCacheState {
 public:
  virtual ~BlockCacheState() = default;
  BlockCacheState(const BlockCacheState&) = delete;
  BlockCacheState& operator=(const BlockCacheState&) = delete;

  // kFirstBlockCacheType or kTaylorSeerCacheType.
  virtual const char* type() const = 0;

  // The 0-based denoising step the next forward of this branch belongs to; the pipeline calls it
  // before each forward. TaylorSeer's schedule and Taylor offsets use it (without a call, a
  // forward is one step after the previous one, the first step 0: diffusers counts forwards);
  // FirstBlockCache does not.
  void SetStep(int64_t step) { next_step_ = step; }

  // Forwards that ran every block / that skipped (FirstBlockCache: the blocks after the first;
  // TaylorSeer: the hooked modules, predicted).
  int64_t computed() const { return computed_; }
  int64_t skipped() const { return skipped_; }

 protected:
  BlockCacheState() = default;
  std::optional<int64_t> next_step_;
  int64_t computed_ = 0;
  int64_t skipped_ = 0;
};

// A fresh state for `config` (one per request and guidance branch). INVALID_ARGUMENT /
// UNIMPLEMENTED as ValidateBlockCacheConfig against every known type.
absl::StatusOr<std::unique_ptr<BlockCacheState>> CreateBlockCacheState(
    const BlockCacheConfig& config);

// The FirstBlockCache state of one request's one guidance branch.
//
// Protocol, per forward of the model (the model's forward calls it):
//   1. run the head block; r = its output minus its input on the first stream;
//   2. if ShouldComputeRemaining(r) is false: add tail_residuals()[i] to the head block's output
//      on stream i and skip every other block;
//   3. otherwise run the remaining blocks and call StoreComputed(r, {final_i - head_output_i}).
// Decision (diffusers): the first forward, and any forward after which nothing was stored yet,
// computes; otherwise the remaining blocks run iff RelativeL1Change(r, r_last) > threshold, where
// r_last is the head residual of the last forward that ran every block (skipped forwards do not
// update it). So a comparison that is NaN (both residuals zero) skips, and threshold 0 skips only
// a head residual identical to the stored one. A residual of another shape than the stored one
// (not expected within a request) computes.
//
// Thread-safety and copying: as BlockCacheState.
class FirstBlockCacheState final : public BlockCacheState {
 public:
  // `threshold` must be finite and >= 0 (ValidateBlockCacheConfig).
  explicit FirstBlockCacheState(double threshold) : threshold_(threshold) {}
  const char* type() const override { return kFirstBlockCacheType; }

  // Step 2 of the protocol. Counts a skip when it returns false. Throws c10::Error as
  // RelativeL1Change.
  bool ShouldComputeRemaining(const torch::Tensor& head_residual);

  // Step 3: keeps `head_residual` (for the next decision) and the tail residuals, one per stream
  // of the model's CacheHandler::BlockStreams() (undefined tensors allowed for streams the model
  // does not need after the blocks). Counts a computed forward.
  void StoreComputed(torch::Tensor head_residual, std::vector<torch::Tensor> tail_residuals);

  // The tail residuals stored by the last StoreComputed (empty before the first).
  const std::vector<torch::Tensor>& tail_residuals() const { return tail_residuals_; }
  // The head residual the next decision compares with (undefined before the first StoreComputed).
  const torch::Tensor& head_residual() const { return head_residual_; }

  double threshold() const { return threshold_; }
  // The relative change of every decision that compared (in order; the first forward has none).
  const std::vector<double>& changes() const { return changes_; }

 private:
  double threshold_;
  torch::Tensor head_residual_;
  std::vector<torch::Tensor> tail_residuals_;
  std::vector<double> changes_;
};

// The TaylorSeer state of one request's one guidance branch (diffusers' TaylorSeerState, one per
// hooked module there; here one object holds every hooked module of the branch, keyed by a slot
// number the model assigns, since all of them share the step and the schedule).
//
// Protocol, per forward of the model:
//   1. compute = BeginForward() (advances the step, applies TaylorSeerShouldCompute, counts);
//   2. compute: run each hooked module and call Update(slot, its outputs);
//      otherwise: do not run the hooked modules; use Predict(slot) as their outputs.
// Update (diffusers' TaylorSeerState.update), for each output i with F = its dtype:
//   factor_0 = output; on any update after the first, with d = step - last update's step,
//   factor_{j+1} = (factor_j - stored_j.to(F)) / d for j = 0 .. max_order - 1 while stored_j
//   exists (factor_j being this update's, unrounded), each op in F; every factor is then stored
//   in taylor_factors_dtype. So the k-th update keeps orders 0 .. min(k - 1, max_order).
// Predict (diffusers' TaylorSeerState.predict), with s = step - last update's step:
//   out = zeros (dtype F); out = out + factor_k.to(F) * (s^k / k!) for k = 0, 1, ..., in that
//   order, each op in F (the coefficient a double, used as PyTorch uses a Python float).
// bfloat16/float16 arithmetic is float32 arithmetic rounded to that dtype after each operation, as
// PyTorch's kernels compute. An output that is exactly linear in the step index is predicted
// exactly (up to that rounding) for max_order >= 1.
//
// Memory: up to max_order + 1 tensors per hooked output (diffusers keeps the same).
// Thread-safety and copying: as BlockCacheState.
class TaylorSeerState final : public BlockCacheState {
 public:
  // `config` must be a valid "taylorseer_cache" config (ValidateBlockCacheConfig).
  explicit TaylorSeerState(const BlockCacheConfig& config);
  const char* type() const override { return kTaylorSeerCacheType; }

  // Step 1: the forward's step is the one given by SetStep since the last forward, or the previous
  // step + 1 (the first forward: 0). Returns whether the hooked modules run
  // (TaylorSeerShouldCompute, or nothing updated yet: diffusers raises there, e.g. at step 0 with
  // disable_cache_before_step 0, we compute) and counts the forward as computed or skipped.
  // Throws c10::Error for a step not after the previous forward's.
  bool BeginForward();
  // The last BeginForward's step (-1 before the first) and decision.
  int64_t current_step() const { return current_step_; }
  bool computing() const { return computing_; }

  // Step 2 on a computing forward: hooked module `slot` (>= 0, stable across forwards) returned
  // `outputs` (defined tensors, the same count and shapes every forward). Throws c10::Error for an
  // empty list or an undefined tensor.
  void Update(int64_t slot, const std::vector<torch::Tensor>& outputs);
  // Step 2 on a predicting forward: the outputs predicted for `slot` at current_step(), one per
  // updated output, in its dtype and device. Throws c10::Error when `slot` was never updated.
  std::vector<torch::Tensor> Predict(int64_t slot) const;

  // The stored factors of `slot`'s output `output` (orders 0, 1, ...; taylor_factors_dtype); empty
  // when none. The step of `slot`'s last Update (unset before the first).
  std::vector<torch::Tensor> factors(int64_t slot, size_t output) const;
  std::optional<int64_t> last_update_step(int64_t slot) const;

  const BlockCacheConfig& config() const { return config_; }
  bool use_lite_mode() const { return config_.use_lite_mode; }
  torch::ScalarType factors_dtype() const { return factors_dtype_; }

 private:
  struct Slot {
    std::vector<std::vector<torch::Tensor>> factors;  // [output][order]
    std::vector<torch::ScalarType> dtypes;            // each output's dtype
    std::optional<int64_t> last_update_step;
  };
  BlockCacheConfig config_;
  torch::ScalarType factors_dtype_;
  int64_t current_step_ = -1;
  bool computing_ = true;
  std::map<int64_t, Slot> slots_;
};

}  // namespace ds
