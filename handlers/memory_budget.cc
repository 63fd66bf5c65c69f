#include "handlers/memory_budget.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "handlers/status.h"

namespace ds {

MemoryBudgetExceeded::MemoryBudgetExceeded(int64_t requested_bytes, int64_t in_use_bytes,
                                           int64_t budget_bytes)
    : requested_bytes_(requested_bytes), in_use_bytes_(in_use_bytes), budget_bytes_(budget_bytes) {
  std::snprintf(message_, sizeof(message_),
                "%s CPU tensor allocation of %" PRId64 " bytes refused: %" PRId64
                " bytes in use, budget %" PRId64 " bytes",
                kMemoryBudgetMarker, requested_bytes, in_use_bytes, budget_bytes);
}

namespace {

// The process-wide counters.
struct BudgetState {
  std::atomic<int64_t> budget{0};
  std::atomic<int64_t> in_use{0};
  std::atomic<int64_t> peak{0};
  std::atomic<int64_t> allocations{0};
  std::atomic<int64_t> refusals{0};
  std::atomic<bool> installed{false};

  // Reserves `n` bytes or throws MemoryBudgetExceeded.
  void Reserve(int64_t n) {
    int64_t used = in_use.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t limit = budget.load(std::memory_order_relaxed);
      if (limit > 0 && (n > limit || used > limit - n)) {
        refusals.fetch_add(1, std::memory_order_relaxed);
        throw MemoryBudgetExceeded(n, used, limit);
      }
      if (in_use.compare_exchange_weak(used, used + n, std::memory_order_relaxed)) break;
    }
    allocations.fetch_add(1, std::memory_order_relaxed);
    const int64_t now = used + n;
    int64_t high = peak.load(std::memory_order_relaxed);
    while (now > high && !peak.compare_exchange_weak(high, now, std::memory_order_relaxed)) {
    }
  }
  void Release(int64_t n) { in_use.fetch_sub(n, std::memory_order_relaxed); }
};

BudgetState& State() {
  static BudgetState* state = new BudgetState();  // never destroyed: deleters may run at exit
  return *state;
}

// The live counted allocations by data pointer: each owns its inner allocation and bytes. The
// DataPtr handed out has context == data (so LibTorch's raw_allocate / raw_deallocate work, which
// oneDNN convolutions use), and its deleter finds the entry here. Sharded to keep lock contention
// low between threads.
struct Counted {
  c10::DataPtr inner;
  int64_t bytes = 0;
};
struct Shard {
  std::mutex mu;
  absl::flat_hash_map<void*, Counted> live;
};
constexpr size_t kShards = 64;

Shard& ShardFor(void* data) {
  static auto* shards = new Shard[kShards];  // never destroyed: deleters may run at exit
  const auto bits = reinterpret_cast<uintptr_t>(data);
  return shards[(bits >> 6) % kShards];
}

void DeleteCounted(void* data) {
  if (data == nullptr) return;
  Counted counted;
  {
    Shard& shard = ShardFor(data);
    std::lock_guard lock(shard.mu);
    auto it = shard.live.find(data);
    if (it == shard.live.end()) return;  // not ours (cannot happen for a DataPtr we made)
    counted = std::move(it->second);
    shard.live.erase(it);
  }
  counted.inner.clear();  // frees through the inner allocator's deleter, outside the lock
  State().Release(counted.bytes);
}

// Wraps the CPU allocator that was current at installation; the data pointers it returns are the
// inner allocator's.
class BudgetedCpuAllocator final : public c10::Allocator {
 public:
  explicit BudgetedCpuAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) const override {
    if (n == 0) return inner_->allocate(0);
    const int64_t bytes = static_cast<int64_t>(n);
    BudgetState& state = State();
    state.Reserve(bytes);
    void* data = nullptr;
    c10::Device device(c10::DeviceType::CPU);
    try {
      c10::DataPtr inner = inner_->allocate(n);
      data = inner.get();
      device = inner.device();
      Shard& shard = ShardFor(data);
      std::lock_guard lock(shard.mu);
      shard.live.insert_or_assign(data, Counted{std::move(inner), bytes});
    } catch (...) {
      state.Release(bytes);
      throw;
    }
    return c10::DataPtr(data, data, &DeleteCounted, device);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &DeleteCounted; }

 private:
  c10::Allocator* inner_;
};

std::mutex& InstallMutex() {
  static auto* mu = new std::mutex();
  return *mu;
}

}  // namespace

absl::Status InstallCpuMemoryBudget(int64_t bytes) {
  BudgetState& state = State();
  std::lock_guard lock(InstallMutex());
  state.budget.store(bytes, std::memory_order_relaxed);
  if (state.installed.load()) return absl::OkStatus();
  c10::Allocator* current = c10::GetCPUAllocator();
  // Owned by LibTorch's allocator table from here on (never freed: storages keep pointers to it).
  auto* budgeted = new BudgetedCpuAllocator(current);
  c10::SetCPUAllocator(budgeted, kMemoryBudgetAllocatorPriority);
  if (c10::GetCPUAllocator() != budgeted) {
    delete budgeted;
    return absl::FailedPreconditionError(
        absl::StrCat("the CPU memory budget could not be installed: another CPU allocator "
                     "registered with a priority above ",
                     static_cast<int>(kMemoryBudgetAllocatorPriority)));
  }
  state.installed.store(true);
  return absl::OkStatus();
}

MemoryBudgetStats GetCpuMemoryBudgetStats() {
  const BudgetState& state = State();
  MemoryBudgetStats s;
  s.installed = state.installed.load();
  s.budget_bytes = state.budget.load(std::memory_order_relaxed);
  s.in_use_bytes = state.in_use.load(std::memory_order_relaxed);
  s.peak_bytes = state.peak.load(std::memory_order_relaxed);
  s.allocations = state.allocations.load(std::memory_order_relaxed);
  s.refusals = state.refusals.load(std::memory_order_relaxed);
  return s;
}

void ResetCpuMemoryBudgetPeak() {
  BudgetState& state = State();
  state.peak.store(state.in_use.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

}  // namespace ds
