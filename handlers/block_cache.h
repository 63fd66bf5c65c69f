// Step caching across denoising steps (diffusers' hooks/first_block_cache.py), model-agnostic.
//
// FirstBlockCache: a transformer whose body is a sequence of repeated blocks runs only its first
// ("head") block at every step. When the head block's residual (its output minus its input on
// the hidden_states stream) changed little since the last step that ran every block, the
// remaining blocks are skipped and their cached residual (what they added to each stream the
// blocks return, the last time they ran) is added to the head block's output instead.
//
// The pieces:
//   * BlockCacheConfig: what a request asks for (type and parameters), checked by
//     ValidateBlockCacheConfig against the types the model implements.
//   * CacheHandler: the model's wiring (ModelSpec::cache, registry.h). A model opts in by
//     implementing the cache in its forward and putting a handler in its spec; that is what makes
//     the `_supports_cache` metadata row appear and what pipelines report as supported types.
//   * FirstBlockCacheState: the per-request, per-branch state the model's forward consults and
//     updates. A pipeline creates one per request and per classifier-free-guidance branch
//     (diffusers' cache_context("cond") / ("uncond")), so nothing is ever shared between requests
//     or branches, and drops it when the request ends (diffusers' reset_stateful_hooks).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace ds {

// The type name of FirstBlockCache in requests and limits.
inline constexpr char kFirstBlockCacheType[] = "first_block_cache";
// diffusers' FirstBlockCacheConfig.threshold default.
inline constexpr double kFirstBlockCacheDefaultThreshold = 0.05;

// The cache types this machinery implements (a model supports the ones its handler lists).
const std::vector<std::string>& KnownBlockCacheTypes();

// A request's cache settings (PipelineRequest::cache).
struct BlockCacheConfig {
  // One of KnownBlockCacheTypes(): "first_block_cache".
  std::string type = kFirstBlockCacheType;
  // FirstBlockCache: the remaining blocks run when the relative L1 change of the head block's
  // residual exceeds this (see FirstBlockCacheState); finite and >= 0. Higher skips more.
  double threshold = kFirstBlockCacheDefaultThreshold;
};

// OK when `config` is usable on a model supporting `supported` (its CacheHandler's types).
// INVALID_ARGUMENT naming `cache.type` for an empty or unknown type (listing the known ones),
// naming `cache.threshold` for a NaN, infinite or negative threshold; UNIMPLEMENTED naming
// `cache.type` for a known type the model does not support (listing what it supports).
absl::Status ValidateBlockCacheConfig(const BlockCacheConfig& config,
                                      const std::vector<std::string>& supported);

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
// Thread-safety: none; one state is used by one forward at a time (a request's branch runs its
// steps in order). Not copyable (a copy would share cached tensors across requests).
class FirstBlockCacheState {
 public:
  // `threshold` must be finite and >= 0 (ValidateBlockCacheConfig).
  explicit FirstBlockCacheState(double threshold) : threshold_(threshold) {}
  FirstBlockCacheState(const FirstBlockCacheState&) = delete;
  FirstBlockCacheState& operator=(const FirstBlockCacheState&) = delete;

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
  // Forwards that ran every block / that skipped the remaining blocks.
  int64_t computed() const { return computed_; }
  int64_t skipped() const { return skipped_; }
  // The relative change of every decision that compared (in order; the first forward has none).
  const std::vector<double>& changes() const { return changes_; }

 private:
  double threshold_;
  torch::Tensor head_residual_;
  std::vector<torch::Tensor> tail_residuals_;
  int64_t computed_ = 0;
  int64_t skipped_ = 0;
  std::vector<double> changes_;
};

}  // namespace ds
