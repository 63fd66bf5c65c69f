// The CPU memory budget: counting of LibTorch CPU storages, refusal past the budget (a
// MemoryBudgetExceeded naming the numbers), the peak, budget changes, concurrent allocation and
// freeing from many threads, and TorchCall's mapping to RESOURCE_EXHAUSTED both for a direct
// allocation and for one inside a parallel region (where LibTorch may rethrow it as c10::Error).
//
// The budget is process-wide and stays installed, so every test sets it relative to the bytes in
// use when it starts.
#include "handlers/memory_budget.h"

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "handlers/status.h"

namespace ds {
namespace {

using ::testing::HasSubstr;

// Allocated during static initialization, before any test installs the budget.
torch::Tensor g_allocated_before_install = torch::ones({4096}, torch::kFloat32);

constexpr int64_t kMiB = int64_t{1} << 20;

int64_t InUse() { return GetCpuMemoryBudgetStats().in_use_bytes; }

// Installs the budget as `headroom` bytes above what is in use now (<= 0: unlimited).
void BudgetAboveNow(int64_t headroom) {
  ASSERT_TRUE(InstallCpuMemoryBudget(0).ok());
  ASSERT_TRUE(InstallCpuMemoryBudget(headroom > 0 ? InUse() + headroom : 0).ok());
}

class MemoryBudgetTest : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(InstallCpuMemoryBudget(0).ok()); }
};

TEST_F(MemoryBudgetTest, CountsLiveStorageBytes) {
  BudgetAboveNow(0);
  const MemoryBudgetStats before = GetCpuMemoryBudgetStats();
  EXPECT_TRUE(before.installed);
  EXPECT_LE(before.budget_bytes, 0);

  torch::Tensor a = torch::empty({1000}, torch::kFloat32);
  EXPECT_EQ(InUse(), before.in_use_bytes + 4000);
  torch::Tensor b = torch::empty({10, 10}, torch::kFloat64);
  EXPECT_EQ(InUse(), before.in_use_bytes + 4800);
  // A view shares its storage: nothing new.
  torch::Tensor view = a.slice(0, 0, 10);
  EXPECT_EQ(InUse(), before.in_use_bytes + 4800);
  EXPECT_EQ(GetCpuMemoryBudgetStats().allocations, before.allocations + 2);

  // The data pointer is the inner allocator's, usable as any tensor's.
  a.fill_(2.0f);
  EXPECT_EQ(view.sum().item<float>(), 20.0f);

  a.reset();
  EXPECT_EQ(InUse(), before.in_use_bytes + 4800);  // the view keeps the storage alive
  view.reset();
  EXPECT_EQ(InUse(), before.in_use_bytes + 800);
  b.reset();
  EXPECT_EQ(InUse(), before.in_use_bytes);

  // A storage allocated before installation is freed through its own deleter, not subtracted
  // (once per process: --gtest_repeat runs find it freed).
  if (g_allocated_before_install.defined()) {
    g_allocated_before_install.reset();
    EXPECT_EQ(InUse(), before.in_use_bytes);
  }
}

TEST_F(MemoryBudgetTest, RefusesPastTheBudgetAndNamesTheNumbers) {
  BudgetAboveNow(kMiB);
  const MemoryBudgetStats before = GetCpuMemoryBudgetStats();

  torch::Tensor fits = torch::empty({kMiB / 8}, torch::kFloat32);  // half a MiB
  const int64_t in_use = InUse();
  EXPECT_EQ(in_use, before.in_use_bytes + kMiB / 2);
  try {
    torch::Tensor too_big = torch::empty({kMiB / 4}, torch::kFloat32);  // one MiB more
    FAIL() << "allocation past the budget succeeded";
  } catch (const MemoryBudgetExceeded& e) {
    EXPECT_EQ(e.requested_bytes(), kMiB);
    EXPECT_EQ(e.in_use_bytes(), in_use);
    EXPECT_EQ(e.budget_bytes(), before.budget_bytes);
    const std::string what = e.what();
    EXPECT_THAT(what, HasSubstr(kMemoryBudgetMarker));
    EXPECT_THAT(what, HasSubstr(absl::StrCat(kMiB, " bytes refused")));
    EXPECT_THAT(what, HasSubstr(absl::StrCat(in_use, " bytes in use")));
    EXPECT_THAT(what, HasSubstr(absl::StrCat("budget ", before.budget_bytes, " bytes")));
  }
  // Also catchable as std::bad_alloc.
  EXPECT_THROW(torch::empty({kMiB / 4}, torch::kFloat32), std::bad_alloc);
  const MemoryBudgetStats after = GetCpuMemoryBudgetStats();
  EXPECT_EQ(after.refusals, before.refusals + 2);
  EXPECT_EQ(after.in_use_bytes, in_use);  // a refusal holds nothing

  // What still fits is allocated.
  torch::Tensor small = torch::zeros({1024}, torch::kFloat32);
  EXPECT_EQ(small.sum().item<float>(), 0.0f);
  fits.reset();
  small.reset();
  EXPECT_EQ(InUse(), before.in_use_bytes);
  // After freeing, the larger allocation fits.
  torch::Tensor now_fits = torch::empty({kMiB / 4 - 1024}, torch::kFloat32);
  EXPECT_TRUE(now_fits.defined());
}

TEST_F(MemoryBudgetTest, TracksThePeak) {
  BudgetAboveNow(0);
  ResetCpuMemoryBudgetPeak();
  const int64_t base = InUse();
  EXPECT_EQ(GetCpuMemoryBudgetStats().peak_bytes, base);
  {
    torch::Tensor a = torch::empty({kMiB}, torch::kUInt8);
    torch::Tensor b = torch::empty({2 * kMiB}, torch::kUInt8);
    EXPECT_EQ(GetCpuMemoryBudgetStats().peak_bytes, base + 3 * kMiB);
  }
  torch::Tensor c = torch::empty({kMiB}, torch::kUInt8);
  const MemoryBudgetStats s = GetCpuMemoryBudgetStats();
  EXPECT_EQ(s.in_use_bytes, base + kMiB);
  EXPECT_EQ(s.peak_bytes, base + 3 * kMiB);
  ResetCpuMemoryBudgetPeak();
  EXPECT_EQ(GetCpuMemoryBudgetStats().peak_bytes, base + kMiB);
}

TEST_F(MemoryBudgetTest, BudgetCanChangeWhileInstalled) {
  BudgetAboveNow(0);
  torch::Tensor held = torch::empty({kMiB}, torch::kUInt8);
  // Below what is in use: new allocations are refused, the held one is untouched.
  ASSERT_TRUE(InstallCpuMemoryBudget(InUse() - kMiB / 2).ok());
  EXPECT_THROW(torch::empty({16}, torch::kUInt8), MemoryBudgetExceeded);
  held.fill_(7);
  EXPECT_EQ(held[12345].item<uint8_t>(), 7);
  held.reset();
  EXPECT_NO_THROW(torch::empty({16}, torch::kUInt8));
  // Unlimited again.
  ASSERT_TRUE(InstallCpuMemoryBudget(-1).ok());
  EXPECT_LE(GetCpuMemoryBudgetStats().budget_bytes, 0);
  EXPECT_NO_THROW(torch::empty({4 * kMiB}, torch::kUInt8));
}

// oneDNN (e.g. mkldnn convolutions) uses raw_allocate / raw_deallocate, which need a DataPtr whose
// context is its data pointer.
TEST_F(MemoryBudgetTest, RawAllocateAndDeallocateAreCounted) {
  BudgetAboveNow(kMiB);
  const int64_t base = InUse();
  c10::Allocator* allocator = c10::GetCPUAllocator();
  void* p = allocator->raw_allocate(4096);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(InUse(), base + 4096);
  allocator->raw_deallocate(p);
  EXPECT_EQ(InUse(), base);
  EXPECT_THROW(allocator->raw_allocate(2 * kMiB), MemoryBudgetExceeded);
  // A convolution (oneDNN path on this build) under the budget.
  torch::Tensor y = torch::conv2d(torch::ones({1, 3, 32, 32}), torch::ones({8, 3, 3, 3}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{1, 8, 30, 30}));
  EXPECT_FLOAT_EQ(y[0][0][0][0].item<float>(), 27.0f);
}

// Many threads allocate and free at once under a budget that some of them hit: every byte comes
// back, the peak never passes the budget (reservations are atomic), and each refusal is counted.
TEST_F(MemoryBudgetTest, ConcurrentAllocationAndFree) {
  constexpr int kThreads = 8;
  constexpr int kIterations = 400;
  const int64_t headroom = 4 * kMiB;
  BudgetAboveNow(headroom);
  ResetCpuMemoryBudgetPeak();
  const MemoryBudgetStats before = GetCpuMemoryBudgetStats();
  std::atomic<int64_t> refused{0};
  std::atomic<int64_t> allocated{0};
  std::atomic<int64_t> wrong_contents{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t + 1));
      std::uniform_int_distribution<int64_t> size(1, kMiB);
      std::vector<torch::Tensor> held;
      for (int i = 0; i < kIterations; ++i) {
        try {
          torch::Tensor x = torch::empty({size(rng)}, torch::kUInt8);
          x.fill_(static_cast<uint8_t>(t));
          if (x[0].item<uint8_t>() != t) wrong_contents.fetch_add(1);
          allocated.fetch_add(1);
          held.push_back(std::move(x));
        } catch (const MemoryBudgetExceeded&) {
          refused.fetch_add(1);
        }
        if (held.size() > 2 || (i % 3 == 0 && !held.empty())) held.erase(held.begin());
      }
    });
  }
  for (std::thread& th : threads) th.join();
  const MemoryBudgetStats after = GetCpuMemoryBudgetStats();
  EXPECT_EQ(wrong_contents.load(), 0);
  EXPECT_EQ(after.in_use_bytes, before.in_use_bytes);
  EXPECT_LE(after.peak_bytes, before.budget_bytes);
  EXPECT_GT(refused.load(), 0) << "the budget was never reached; the test proves nothing";
  EXPECT_GT(allocated.load(), 0);
  EXPECT_EQ(after.refusals - before.refusals, refused.load());
  // fill_ and item() allocate nothing; each successful empty() is one counted allocation, plus
  // the scalar tensors of x[0] (views: none).
  EXPECT_GE(after.allocations - before.allocations, allocated.load());
}

TEST_F(MemoryBudgetTest, TorchCallMapsADirectRefusalToResourceExhausted) {
  BudgetAboveNow(kMiB);
  auto r = TorchCall("making a big tensor", [] { return torch::empty({kMiB}, torch::kFloat32); });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("making a big tensor"));
  EXPECT_THAT(r.status().message(), HasSubstr(kMemoryBudgetMarker));
  // An operator's output over the budget as well.
  torch::Tensor a = torch::ones({256, 256}, torch::kFloat32);  // 256 KiB
  auto outer = TorchCall("outer product", [&] {
    return torch::einsum("ij,kl->ijkl", {a.slice(0, 0, 8), a.slice(0, 0, 8)});
  });
  EXPECT_EQ(outer.status().code(), absl::StatusCode::kResourceExhausted) << outer.status();
  // Other failures keep their code.
  auto bad = TorchCall("bad shapes", [&] { return torch::matmul(a, torch::ones({3, 3})); });
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInternal) << bad.status();
}

// An allocation inside at::parallel_for's workers: whatever LibTorch rethrows on the calling thread
// (the original exception or a c10::Error carrying its message) becomes RESOURCE_EXHAUSTED.
TEST_F(MemoryBudgetTest, TorchCallMapsARefusalInsideAParallelRegion) {
  const int threads_before = at::get_num_threads();
  at::set_num_threads(4);
  BudgetAboveNow(2 * kMiB);
  std::atomic<int> ran{0};
  auto r = TorchCall("parallel work", [&] {
    at::parallel_for(0, 64, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        ran.fetch_add(1);
        torch::Tensor scratch = torch::empty({kMiB}, torch::kFloat32);  // 4 MiB each
        scratch.zero_();
      }
    });
    return 0;
  });
  at::set_num_threads(threads_before);
  ASSERT_FALSE(r.ok());
  EXPECT_GT(ran.load(), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("parallel work"));

  // The rewrapped form itself: a c10::Error whose message carries the refusal.
  auto rewrapped = TorchCall("rewrapped", [] {
    try {
      torch::Tensor t = torch::empty({kMiB}, torch::kFloat32);
    } catch (const MemoryBudgetExceeded& e) {
      TORCH_CHECK(false, "worker failed: ", e.what());
    }
    return 0;
  });
  EXPECT_EQ(rewrapped.status().code(), absl::StatusCode::kResourceExhausted) << rewrapped.status();
  EXPECT_THAT(rewrapped.status().message(), HasSubstr("worker failed"));
}

}  // namespace
}  // namespace ds
