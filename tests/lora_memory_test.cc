// Memory does not creep with adapter churn: 1,000 load/unload cycles of a 20 MB adapter (each
// used by a request snapshot in between) grow resident memory by less than 2 MiB.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "testing/lora_util.h"
#include "testing/proc_stats.h"
#include "testing/test_util.h"

namespace ds {
namespace {

int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

TEST(LoraMemoryTest, ThousandLoadUnloadCyclesOfA20MBAdapterDoNotGrowResidentMemory) {
  constexpr int kCycles = 1000;
  constexpr int kWarmup = 20;
  constexpr int64_t kAdapterBytes = 20 << 20;
  constexpr int64_t kAllowedGrowth = 2 << 20;

  auto spec = ModelRegistry::Global().Find("flux");
  ASSERT_TRUE(spec.ok()) << spec.status();
  // A model with realistic matrix shapes (width 256) so the adapter is many mid-size tensors.
  const nlohmann::json config = {{"num_layers", 2},           {"num_single_layers", 2},
                                 {"attention_head_dim", 64},  {"num_attention_heads", 4},
                                 {"joint_attention_dim", 256}, {"pooled_projection_dim", 128},
                                 {"in_channels", 16},         {"axes_dims_rope", {16, 24, 24}}};
  auto model = (*spec)->factory(config, ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  std::shared_ptr<DiffusionModel> shared(std::move(*model));
  LoraHost host(shared, (*spec)->lora);

  const TensorMap params = NamedTensors(shared->module());
  const std::vector<std::string> modules = test::LinearModules(params);
  const int64_t rank = test::RankForBytes(params, modules, kAdapterBytes);
  test::TempDir dir;
  const std::string path = dir.File("adapter.safetensors");
  {
    const TensorMap lora = test::MakeDiffusersLora(params, modules, rank, /*seed=*/1);
    ASSERT_GE(test::TensorBytes(lora), kAdapterBytes * 9 / 10);
    ASSERT_TRUE(WriteSafetensors(path, lora).ok());
  }

  auto cycle = [&] {
    auto loaded = host.Load("churn", path);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto stack = host.Snapshot({{"churn", 0.5}});
    ASSERT_TRUE(stack.ok()) << stack.status();
    ASSERT_TRUE(host.Unload("churn").ok());
  };
  for (int i = 0; i < kWarmup; ++i) cycle();
  const int64_t before = ResidentBytes();
  for (int i = 0; i < kCycles; ++i) {
    cycle();
    if (HasFatalFailure()) return;
  }
  const int64_t after = ResidentBytes();
  std::printf("resident: %.2f MiB before, %.2f MiB after %d cycles of a %.1f MiB adapter\n",
              before / 1048576.0, after / 1048576.0, kCycles, kAdapterBytes / 1048576.0);
  if (test::kSanitizerOwnsResidentMemory) {
    std::printf("sanitizer build: resident growth not bounded (the sanitizer's allocator)\n");
  } else {
    EXPECT_LT(after - before, kAllowedGrowth);
  }
  EXPECT_EQ(host.memory_used_bytes(), 0);
  EXPECT_EQ(host.retired_bytes(), 0);
}

}  // namespace
}  // namespace ds
