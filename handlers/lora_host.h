// LoraHost: a served model with its LoRA adapters — the adapter store (named, immutable,
// content-addressed adapters under a memory budget), per-request adapter stacks, and optional
// fusing. Model-agnostic: it reaches the model only through ds::DiffusionModel and its
// ds::LoraHandler.
//
// How adapters apply. Unfused (the default): a request takes a snapshot of the adapters it names
// (an AdapterStack, shared pointers to immutable adapters) and the model computes
// y = W x + Σ_i w_i · s_i · B_i (A_i x) for it (see lora_context.h); base weights never change, so
// there is nothing to drift. Fused: Fuse() computes W' = W + Σ w_i s_i B_i A_i (in float32, rounded
// once) from the pristine base and swaps it in; Unfuse() swaps the pristine tensors back, bit for
// bit (never by subtracting). Control-LoRA overlays (replaced parameters) and input-widening
// adapters follow the same two paths; Unfuse restores the original tensors and shapes.
//
// Hot swap. Load converts and validates a file with no lock the request path needs, then inserts
// the adapter under a short store lock. Load (also replacing a name), Unload and eviction only
// change the store's name table: a request that already took its snapshot keeps using exactly the
// adapters it started with, and their memory is freed when the last snapshot holding them ends.
// Fuse/Unfuse swap base tensors under an exclusive lock that waits for running forwards (they hold
// it shared), so a forward sees either the old or the new base, never a mix.
//
// Memory budget: the tensor bytes of the adapters in the store (in the model dtype) stay within
// LoraHostOptions::memory_budget_bytes. Loading over budget evicts unpinned adapters that no
// request or fused set uses, least recently used first; if that cannot make room the load is
// RESOURCE_EXHAUSTED and nothing changes. Adapters already unloaded/replaced but still held by
// running requests are counted separately (retired_bytes) until those requests end.
//
// Status codes: INVALID_ARGUMENT for a bad adapter name, a bad LoRA (see lora_format.h), a bad
// weight or a contradictory stack; NOT_FOUND for a missing file or an unknown adapter name;
// ALREADY_EXISTS for a taken name without `replace`; RESOURCE_EXHAUSTED over the file size limit or
// the memory budget; FAILED_PRECONDITION for unloading a fused adapter or naming a fused adapter in
// a request; UNIMPLEMENTED when the model wires no LoRA handler; INTERNAL if LibTorch fails.
//
// Thread-safety: every method is thread-safe. Forward may run from any number of threads while
// adapters are loaded, replaced, unloaded, pinned or fused.
#pragma once

#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/lora_context.h"
#include "handlers/lora_format.h"
#include "handlers/model.h"

namespace ds {

// A loaded adapter: immutable once built; shared by the store, request snapshots and the fused
// set.
struct LoraAdapter {
  std::string name;
  std::string sha256;  // of the file bytes
  std::string path;
  std::string format;
  LoraReport report;                  // of its load
  std::vector<LoraModule> modules;    // matched modules, tensors in the model dtype and device
  std::vector<LoraOverlay> overlays;  // matched overlays, likewise
  int64_t bytes = 0;                  // tensor bytes held
  // The weight a request that names it without one applies (AdapterLoadOptions::default_weight).
  double default_weight = 1.0;
};
using LoraAdapterPtr = std::shared_ptr<const LoraAdapter>;

// One adapter of a request, and its weight (diffusers' set_adapters weight; 1 = as trained).
// Unset: the adapter's default_weight (1 unless it was loaded with another).
struct AdapterRequest {
  std::string name;
  std::optional<double> weight;
};

// A request's snapshot: the adapters it uses and the context the model's forward reads. Immutable;
// holding it keeps its adapters alive.
struct AdapterStack {
  struct Use {
    LoraAdapterPtr adapter;
    double weight = 1.0;
  };
  std::vector<Use> adapters;
  LoraContext context;
  bool empty() const { return adapters.empty(); }
};
using AdapterStackPtr = std::shared_ptr<const AdapterStack>;

struct LoraHostOptions {
  int64_t memory_budget_bytes = int64_t{4} << 30;  // adapter tensor bytes in the store
  int64_t max_file_bytes = int64_t{2} << 30;       // larger LoRA files are refused
};

struct AdapterLoadOptions {
  bool allow_partial = false;  // see LoraLoadOptions
  bool replace = false;        // replace an adapter of the same name
  bool pin = false;            // never evict it
  // When non-empty, the detected format must be this one (INVALID_ARGUMENT otherwise).
  std::string format_hint;
  // Recorded as the adapter's `path` instead of the file path when non-empty (e.g. "inline" for
  // bytes a client sent, written to a temporary file that is removed after loading).
  std::string source;
  // The weight requests get when they name the adapter without one; finite (INVALID_ARGUMENT
  // otherwise).
  double default_weight = 1.0;
};

// A copy of a LoRA tensor `t` in the model's dtype and device that owns its memory (never a view
// of the file), checked for NaN/Inf while the copy is still in cache: one pass over the file's
// bytes instead of a copy plus a separate scan. A same-dtype CPU copy is a plain memcpy on the
// calling thread (no intra-op thread pool, which stalls under contention). `what` names the tensor
// in errors. INVALID_ARGUMENT "<what> contains NaN or Inf values" when the source holds NaN/Inf,
// or "<what>: a value overflows the model dtype ..." when a finite value does not fit it (e.g.
// > 65504 into float16); INTERNAL if LibTorch fails. An undefined `t` is returned as is.
absl::StatusOr<torch::Tensor> CopyLoraTensor(const torch::Tensor& t, const ModelOptions& options,
                                             const std::string& what);

struct AdapterLoadResult {
  LoraReport report;
  int64_t bytes = 0;                 // tensor bytes the adapter holds
  bool replaced = false;             // an adapter of that name was replaced
  std::vector<std::string> evicted;  // names evicted to make room
};

struct AdapterInfo {
  std::string name;
  std::string sha256;
  std::string path;
  std::string format;
  int64_t bytes = 0;
  int64_t modules = 0;
  bool pinned = false;
  bool fused = false;
  double default_weight = 1.0;
  // Requests and fused sets holding it besides the store (a snapshot count, racy by nature).
  int64_t users = 0;
  uint64_t last_used = 0;  // logical clock of its last load or snapshot (larger = more recent)
};

// A shared mutex on which a waiting writer holds back new readers. (glibc's rwlock prefers
// readers, so a steady stream of overlapping forwards could otherwise starve Fuse forever.)
// Meets the standard SharedMutex requirements (std::shared_lock / std::unique_lock).
class WriterPreferringSharedMutex {
 public:
  void lock() {
    gate_.lock();
    rw_.lock();
  }
  void unlock() {
    rw_.unlock();
    gate_.unlock();
  }
  void lock_shared() {
    gate_.lock();
    gate_.unlock();
    rw_.lock_shared();
  }
  void unlock_shared() { rw_.unlock_shared(); }

 private:
  std::mutex gate_;
  std::shared_mutex rw_;
};

// OK for 1..128 characters of [A-Za-z0-9._-] (adapter names: LoRAs, IP-Adapters);
// INVALID_ARGUMENT naming the problem otherwise.
absl::Status ValidateAdapterName(const std::string& name);

class LoraHost {
 public:
  // `model` must not be used by others while the host lives (the host swaps its parameters when
  // fusing); `handler` (nullable: no LoRA support) must outlive the host.
  LoraHost(std::shared_ptr<DiffusionModel> model, const LoraHandler* handler,
           LoraHostOptions options = {});
  ~LoraHost();
  LoraHost(const LoraHost&) = delete;
  LoraHost& operator=(const LoraHost&) = delete;

  const DiffusionModel& model() const { return *model_; }
  bool supports_lora() const { return handler_ != nullptr; }
  const LoraHostOptions& options() const { return options_; }

  // Reads, converts and validates the LoRA at `path` and stores it as `name` ([A-Za-z0-9._-],
  // 1..128 characters).
  absl::StatusOr<AdapterLoadResult> Load(const std::string& name, const std::string& path,
                                         const AdapterLoadOptions& options = {});

  // Removes `name` from the store. Requests already using it finish with it; its memory is freed
  // when they end. NOT_FOUND for an unknown name; FAILED_PRECONDITION while it is fused.
  absl::Status Unload(const std::string& name);

  // Sets whether `name` may be evicted. NOT_FOUND for an unknown name.
  absl::Status SetPinned(const std::string& name, bool pinned);

  // The stored adapters, sorted by name.
  std::vector<AdapterInfo> List() const;
  absl::StatusOr<AdapterInfo> Info(const std::string& name) const;
  absl::StatusOr<LoraAdapterPtr> Get(const std::string& name) const;

  // A request's snapshot of `adapters` (empty: the base model). NOT_FOUND naming an unknown
  // adapter; INVALID_ARGUMENT for a name given twice, a non-finite weight, or two adapters
  // replacing the same parameter; FAILED_PRECONDITION for a fused adapter (the base has it).
  absl::StatusOr<AdapterStackPtr> Snapshot(const std::vector<AdapterRequest>& adapters) const;

  // One forward pass with `stack` (nullptr or empty: none) applied unfused. ABORTED when an
  // adapter of the stack was fused after the snapshot was taken (it would apply twice; take a new
  // snapshot).
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const AdapterStack* stack = nullptr) const;

  // Runs `forward` with the model and the unfused adapters of `stack` (nullptr when `stack` is
  // null or empty) under the same lock and stale-snapshot check as Forward(), for forwards that
  // take more than named tensors (a pipeline passing per-request conditioning, e.g. an
  // IP-Adapter, to its own model class). `forward` must only read the model. ABORTED as Forward();
  // otherwise whatever `forward` returns.
  using ModelForward = std::function<absl::StatusOr<torch::Tensor>(const DiffusionModel& model,
                                                                   const LoraContext* lora)>;
  absl::StatusOr<torch::Tensor> ForwardWith(const AdapterStack* stack,
                                            const ModelForward& forward) const;

  // Makes `adapters` (with weights) the fused set, replacing any previous one; an empty list is
  // Unfuse(). Errors as for Snapshot; nothing changes on error.
  absl::Status Fuse(const std::vector<AdapterRequest>& adapters);
  // Restores the pristine base weights bit for bit. OK when nothing is fused.
  absl::Status Unfuse();
  std::vector<AdapterRequest> fused() const;

  int64_t memory_used_bytes() const;     // adapters in the store
  int64_t retired_bytes() const;         // unloaded/replaced adapters still held by requests
  int64_t fused_extra_bytes() const;     // memory of fused weights beside the pristine base
  size_t adapter_count() const;

 private:
  struct Entry {
    LoraAdapterPtr adapter;
    bool pinned = false;
    mutable std::atomic<uint64_t> last_used{0};
  };

  absl::StatusOr<LoraAdapterPtr> Prepare(const std::string& name, const std::string& path,
                                         const AdapterLoadOptions& options) const;
  absl::StatusOr<AdapterStackPtr> SnapshotLocked(const std::vector<AdapterRequest>& adapters,
                                                 bool for_fuse) const
      ABSL_SHARED_LOCKS_REQUIRED(store_mu_);
  AdapterInfo InfoLocked(const std::string& name, const Entry& e) const
      ABSL_SHARED_LOCKS_REQUIRED(store_mu_);
  void PruneRetiredLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(store_mu_);

  const std::shared_ptr<DiffusionModel> model_;
  const LoraHandler* const handler_;
  const LoraHostOptions options_;
  // The model's parameters (handles sharing the live tensors) and their pristine shapes.
  std::map<std::string, torch::Tensor> params_;
  KeyShapes param_shapes_;

  mutable std::atomic<uint64_t> clock_{0};

  mutable std::shared_mutex store_mu_;
  std::map<std::string, std::unique_ptr<Entry>> store_ ABSL_GUARDED_BY(store_mu_);
  int64_t used_bytes_ ABSL_GUARDED_BY(store_mu_) = 0;
  mutable std::vector<std::weak_ptr<const LoraAdapter>> retired_ ABSL_GUARDED_BY(store_mu_);

  // Fuse/Unfuse run one at a time (fuse_mu_); the swap of base tensors happens under weights_mu_
  // held exclusively, while every forward holds it shared.
  mutable std::mutex fuse_mu_;
  mutable WriterPreferringSharedMutex weights_mu_;
  // The fused set as the store sees it (claimed when a Fuse starts: such adapters cannot be
  // unloaded or replaced) ...
  std::vector<AdapterStack::Use> fused_ ABSL_GUARDED_BY(store_mu_);
  // ... and as the weights hold it (what forwards check their stacks against).
  std::vector<AdapterStack::Use> fused_in_weights_ ABSL_GUARDED_BY(weights_mu_);
  std::map<std::string, torch::Tensor> pristine_ ABSL_GUARDED_BY(fuse_mu_);
  std::atomic<int64_t> fused_extra_bytes_{0};
};

}  // namespace ds
