// A process-wide memory budget for LibTorch's CPU tensors: an allocation that would take the
// counted bytes past the budget throws ds::MemoryBudgetExceeded (a std::bad_alloc) instead of
// letting the process grow until the kernel's OOM killer ends it. TorchCall (status.h) turns it
// into RESOURCE_EXHAUSTED, also when LibTorch rethrew it as a c10::Error (its message carries
// ds::kMemoryBudgetMarker), so the request that ran over fails and the process keeps serving.
//
// What is counted: the bytes of every storage that LibTorch allocates on the CPU through
// c10::GetCPUAllocator() after InstallCpuMemoryBudget() — tensor data, including temporaries
// inside operators and parallel regions — from allocation until that storage is freed. The
// requested size is counted (not the allocator's rounding or alignment padding).
// Not counted: storages allocated before installation (they are freed through their original
// deleter and never subtracted), memory-mapped safetensors views (handlers/safetensors.h: their
// pages belong to the page cache), tensors made with from_blob over foreign memory, gRPC and
// protobuf buffers, PNG/JPEG codec buffers, oneDNN/OpenMP scratch memory, allocator caches and
// ordinary C++ heap objects. The budget therefore bounds tensor memory, not RSS; size it below the
// container's limit by a margin for the rest (the server's --memory_budget_bytes says how).
//
// Each counted DataPtr keeps the inner allocator's data pointer and has it as its context too (so
// LibTorch's raw_allocate / raw_deallocate work; oneDNN convolutions use them); a sharded table
// keyed by that pointer holds the inner allocation and its size until the deleter runs.
//
// Thread-safety: every function here may be called from any thread at any time; the counters are
// atomics (an allocation reserves its bytes with a compare-and-swap, so concurrent allocations
// never overshoot the budget together).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>

#include "absl/status/status.h"

namespace ds {

// Thrown by the budgeted allocator when an allocation would exceed the budget. what() names the
// requested bytes, the bytes in use and the budget, and contains ds::kMemoryBudgetMarker.
// Copying never throws (the message lives in a fixed buffer).
class MemoryBudgetExceeded : public std::bad_alloc {
 public:
  MemoryBudgetExceeded(int64_t requested_bytes, int64_t in_use_bytes, int64_t budget_bytes);
  const char* what() const noexcept override { return message_; }
  int64_t requested_bytes() const { return requested_bytes_; }
  int64_t in_use_bytes() const { return in_use_bytes_; }
  int64_t budget_bytes() const { return budget_bytes_; }

 private:
  int64_t requested_bytes_;
  int64_t in_use_bytes_;
  int64_t budget_bytes_;
  char message_[192];
};

// The budgeted allocator's counters (a snapshot; each field is read atomically on its own).
struct MemoryBudgetStats {
  bool installed = false;
  // <= 0: unlimited (still counted).
  int64_t budget_bytes = 0;
  // Bytes of live counted storages, and the most there ever were at once (since installation or
  // ResetCpuMemoryBudgetPeak()).
  int64_t in_use_bytes = 0;
  int64_t peak_bytes = 0;
  // Allocations made through the budget, and those it refused.
  int64_t allocations = 0;
  int64_t refusals = 0;
};

// The priority the budgeted allocator registers with (c10::SetCPUAllocator): above LibTorch's
// default CPU allocator (0).
inline constexpr uint8_t kMemoryBudgetAllocatorPriority = 100;

// Installs the budgeted allocator as LibTorch's CPU allocator (once per process: it wraps the
// allocator current at the first call, which keeps doing the allocating) and sets the budget to
// `bytes`; <= 0 = unlimited. Later calls only change the budget (lowering it below the bytes in
// use refuses new allocations until enough are freed; nothing already allocated is touched).
// The wrapper stays installed for the life of the process.
// FAILED_PRECONDITION if another allocator registered with a higher priority holds the slot.
absl::Status InstallCpuMemoryBudget(int64_t bytes);

// The counters now (installed = false and zeros before InstallCpuMemoryBudget).
MemoryBudgetStats GetCpuMemoryBudgetStats();

// Sets the peak to the bytes in use now (for measuring one phase).
void ResetCpuMemoryBudgetPeak();

}  // namespace ds
