// Group offloading (diffusers' `enable_group_offload(offload_type="block_level")`): the model's
// repeated blocks are split into groups of `blocks_per_group` consecutive blocks, each group's
// weights are kept on an *offload device* and brought to the *onload (compute) device* just before
// the group runs, then sent back. Everything that is not in a repeated block (embedders, final
// norm and projection: diffusers' "unmatched" modules) stays on the onload device. Model-agnostic:
// this file finds the blocks by class name (the model's `_repeated_blocks`) and moves tensors; the
// model's forward brackets each block with GroupOffloadSession::Enter (see below).
//
// Groups (as diffusers forms them): each torch::nn::ModuleList whose every child is one of the
// repeated block classes (found in the module tree in registration order, not descending into a
// list once found) is one *block list*; its blocks are cut into groups of `blocks_per_group` in
// order, a group never spanning two lists. Block indices run over all lists in that order (Flux:
// transformer_blocks.0..N-1, then single_transformer_blocks.0..M-1 as N..N+M-1), which must be the
// order the forward runs them in.
//
// Offload devices:
//   * kDisk (CPU or CUDA compute): each group's parameters and buffers are written once to a file
//     in `offload_dir` (page-aligned, one file per group, unlinked as soon as it is mapped, so the
//     space is released when the model is destroyed and a crash leaves nothing behind) and mapped
//     MAP_SHARED; while a group is offloaded its parameters *are* views of that mapping (reads
//     outside a forward, e.g. LoraHost::Fuse reading base weights, see correct values), and after
//     writing the file its pages are dropped from the page cache (fdatasync, POSIX_FADV_DONTNEED).
//     Onload on a CPU device: the group's bytes are read (pread, no page of the mapping is touched)
//     into fresh anonymous memory (one mmap per group, returned to the system when the last tensor
//     using it dies) and the parameters are pointed at it; the file's page-cache pages are then
//     dropped again. Offload: the parameters are pointed back at the mapping and the mapping's pages
//     dropped from this process (MADV_DONTNEED; dirty pages of the shared mapping are kept by the
//     kernel, so nothing written is lost). Resident memory is therefore the unmatched modules, the
//     groups in use, and activations. Onload on CUDA: the mapped tensors are copied to the device
//     (tensor.to(device); pageable memory, so synchronous).
//   * kCpuMemory (CUDA compute only): the offloaded copy is a pinned CPU tensor and onload is
//     tensor.to(device, non_blocking=true) on the current stream. The offloaded copy stays resident
//     in CPU memory.
//
// Prefetch (kDisk on a CPU device): when a forward onloads group g, a background thread reads the
// file of group g+1 into the page cache (readahead(2)) while group g computes, so its onload copies
// from memory instead of waiting for the disk. The page cache is not this process's resident memory
// and is dropped again after the onload. On CUDA diffusers overlaps the next group's host-to-device
// copy on a side stream (c10::cuda::CUDAStream + an event the compute stream waits on); this
// LibTorch is CPU-only (no libc10_cuda), so that cannot be compiled here and `prefetch` with a
// CUDA onload device is refused (UNIMPLEMENTED) instead of being silently ignored; a CUDA build would
// add that stream, issue the next group's non_blocking copies on it from Enter, and record/wait an
// event before the group runs.
//
// Concurrency: forwards run concurrently (DiffusionModel::Forward is const). Each group's
// residency is reference-counted under the group's own mutex: the first forward entering a group
// onloads it (others entering it meanwhile wait), the last one leaving offloads it, so a
// parameter's data never changes while a forward reads it. Forwards in different groups proceed in
// parallel (each group in use is resident once).
//
// Exclusive operations (loading weights, LoraHost::Fuse/Unfuse; they already require that no
// forward runs): with no forward running every group is offloaded, and
//   * an in-place write to a parameter (tensor.copy_) writes the shared mapping, i.e. the
//     offloaded copy itself: later onloads read the new values;
//   * replacing a parameter's data (tensor.set_data, as LoraHost::Fuse does with fused weights)
//     takes that parameter out of offloading: onload/offload move only parameters that still hold
//     their offloaded tensor (compared by data pointer), so the replacement stays resident as its
//     owner left it and is used as is. Setting the offloaded tensor back (LoraHost::Unfuse restores
//     the pristine tensors, which are views of the mapping) brings it under offloading again.
// A fused model therefore computes exactly what the resident fused model computes; the fused
// weights themselves are resident.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ds {

enum class GroupOffloadTarget {
  kDisk,       // memory-mapped files in GroupOffloadingOptions::offload_dir (CPU or CUDA compute)
  kCpuMemory,  // pinned CPU memory (CUDA compute only)
};

// "disk" (also "") and "cpu"; INVALID_ARGUMENT naming the value and the choices otherwise.
absl::StatusOr<GroupOffloadTarget> ParseGroupOffloadTarget(absl::string_view name);
// "disk" or "cpu".
std::string GroupOffloadTargetName(GroupOffloadTarget target);

struct GroupOffloadingOptions {
  // Consecutive blocks per group (diffusers' num_blocks_per_group), >= 1. More blocks per group:
  // fewer, larger transfers and a higher resident peak (one group).
  int64_t blocks_per_group = 1;
  GroupOffloadTarget target = GroupOffloadTarget::kDisk;
  // Read the next group ahead while one runs (see the file comment). CPU onload device only.
  bool prefetch = true;
  // kDisk: an existing writable folder for the group files (diffusers' offload_to_disk_path);
  // "" = $TMPDIR, else /tmp. Needs free space for the offloaded bytes.
  std::string offload_dir;
};

// OK, or INVALID_ARGUMENT naming the field (blocks_per_group < 1; kCpuMemory with a CPU onload
// device; an offload_dir that is not an existing directory) or UNIMPLEMENTED (prefetch with a CUDA
// onload device, see the file comment; a device that is neither CPU nor CUDA). Field names are
// those of the API's GroupOffloadConfig (blocks_per_group, prefetch, offload_to, offload_dir).
absl::Status ValidateGroupOffloadingOptions(const GroupOffloadingOptions& options,
                                            const torch::Device& onload_device);

// One line for reports: "blocks_per_group=2 offload_to=disk prefetch=on".
std::string DescribeGroupOffloading(const GroupOffloadingOptions& options);

struct GroupOffloadingStats {
  int64_t blocks = 0;
  int64_t groups = 0;
  std::vector<int64_t> group_bytes;  // tensor bytes of each group (numel × element size)
  int64_t offloaded_bytes = 0;       // sum of group_bytes
  int64_t resident_groups = 0;       // groups onloaded right now
  int64_t resident_bytes = 0;        // bytes of the groups onloaded right now (their onloaded copies)
  int64_t onloads = 0;               // since Apply
  int64_t offloads = 0;
  int64_t prefetches = 0;            // read-aheads completed by the prefetch thread
};

// The offloading state of one model. Created by Apply on a loaded module and owned by the model
// (ds::DiffusionModel::set_group_offloader); it keeps handles to the module's parameter tensors,
// so it may outlive the module object, and its mappings live as long as any tensor using them.
//
// Thread-safety: stats(), the accessors and GroupOffloadSession are safe from any number of
// threads. Apply and destruction need exclusive access to the module (no forward running).
class GroupOffloader {
 public:
  // Groups the repeated blocks of `module` (classes named like ModuleClassName, e.g.
  // "FluxTransformerBlock"; matched against each module's class without namespace and "Impl"),
  // moves each group to the offload device and leaves every group offloaded. `onload_device` is
  // where the model computes (ModelOptions::device). Errors: ValidateGroupOffloadingOptions'; 
  // INVALID_ARGUMENT when `repeated_blocks` is empty or the module has no ModuleList of those
  // classes (naming them); RESOURCE_EXHAUSTED when offload_dir lacks the free space (naming it and
  // both sizes) or a write fails with ENOSPC; INTERNAL naming the file for other I/O failures and
  // if LibTorch fails. On error the module is left as it was.
  static absl::StatusOr<std::shared_ptr<GroupOffloader>> Apply(
      torch::nn::Module& module, const std::vector<std::string>& repeated_blocks,
      const GroupOffloadingOptions& options, const torch::Device& onload_device);

  ~GroupOffloader();
  GroupOffloader(const GroupOffloader&) = delete;
  GroupOffloader& operator=(const GroupOffloader&) = delete;

  const GroupOffloadingOptions& options() const { return options_; }
  const torch::Device& onload_device() const { return onload_device_; }
  int64_t num_blocks() const { return static_cast<int64_t>(block_group_.size()); }
  int64_t num_groups() const { return static_cast<int64_t>(groups_.size()); }
  // The group of block `block_index` (0 <= block_index < num_blocks()).
  int64_t group_of(int64_t block_index) const { return block_group_.at(block_index); }
  // Dotted module names of the blocks in forward order ("transformer_blocks.0", ...).
  const std::vector<std::string>& block_names() const { return block_names_; }
  GroupOffloadingStats stats() const;

  // kDisk: bytes of the group files currently in the page cache (mincore over the mappings), or 0
  // for kCpuMemory. After a forward ends this is ~0 unless something read the offloaded tensors
  // outside a forward (the kernel may keep pages it was asked to drop only while they are dirty).
  // INTERNAL if mincore fails.
  absl::StatusOr<int64_t> PageCacheBytes() const;

 private:
  friend class GroupOffloadSession;
  struct Group;
  struct FileMapping;
  class Prefetcher;

  GroupOffloader(GroupOffloadingOptions options, torch::Device onload_device);
  // Reference-counted residency of group `g`. Throw c10::Error if LibTorch or a read fails.
  void Acquire(int64_t g) const;
  void Release(int64_t g) const;
  void Onload(Group& group) const;
  void Offload(Group& group) const;

  GroupOffloadingOptions options_;
  torch::Device onload_device_;
  std::vector<std::unique_ptr<Group>> groups_;
  std::vector<int64_t> block_group_;
  std::vector<std::string> block_names_;
  std::unique_ptr<Prefetcher> prefetcher_;  // null unless prefetching
  mutable std::atomic<int64_t> onloads_{0}, offloads_{0}, resident_groups_{0},
      resident_bytes_{0};
};

// The per-forward hook: a forward creates one (with its model's offloader, or nullptr when the
// model is not offloaded, which makes every call a no-op) and calls Enter(i) before running block
// i. The session holds at most one group: entering a block of another group releases the held
// group first, then acquires the new one (onloading it if no other forward holds it, and starting
// the prefetch of the next group); entering a block of the held group does nothing. The destructor
// releases the held group, so the group is offloaded when the last forward using it leaves, even
// when the forward throws.
//
// Enter throws c10::Error (like the LibTorch calls around it, so call it inside the forward's
// TorchCall) for a block index out of range or a failed onload (out of memory, a failed read).
// A session belongs to one forward on one thread.
class GroupOffloadSession {
 public:
  explicit GroupOffloadSession(const GroupOffloader* offloader) : offloader_(offloader) {}
  ~GroupOffloadSession();
  GroupOffloadSession(const GroupOffloadSession&) = delete;
  GroupOffloadSession& operator=(const GroupOffloadSession&) = delete;

  void Enter(int64_t block_index);
  // Releases the held group (if any) now.
  void Leave();

 private:
  const GroupOffloader* offloader_;
  int64_t held_ = -1;
};

}  // namespace ds
