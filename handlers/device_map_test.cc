// Model-agnostic device-map tests on a toy module tree (CPU only: two "cpu" entries stand for two
// devices).
#include "handlers/device_map.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "handlers/state_dict.h"

namespace ds {
namespace {

struct PairImpl : torch::nn::Module {
  PairImpl() {
    a = register_module("a", torch::nn::Linear(8, 8));  // 288 bytes
    b = register_module("b", torch::nn::Linear(8, 8));
  }
  torch::nn::Linear a{nullptr}, b{nullptr};
};
TORCH_MODULE(Pair);

struct ToyImpl : torch::nn::Module {
  ToyImpl() {
    scale = register_parameter("scale", torch::ones({4}));      // 16 bytes
    embed = register_module("embed", torch::nn::Linear(4, 8));  // 160 bytes
    blocks = register_module("blocks", torch::nn::ModuleList(Pair(), Pair(), Pair()));
    out = register_module("out", torch::nn::Linear(8, 2));  // 72 bytes
  }
  torch::Tensor scale;
  torch::nn::Linear embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::Linear out{nullptr};
};
TORCH_MODULE(Toy);

constexpr int64_t kPair = 2 * (8 * 8 + 8) * 4;

using Budgets = std::vector<std::pair<torch::Device, int64_t>>;

TEST(DeviceMapTest, ClassNames) {
  Toy toy;
  EXPECT_EQ(ModuleClassNameOf(*toy->blocks[0]), "Pair");
  EXPECT_EQ(ModuleClassNameOf(*toy->embed), "Linear");
}

int64_t Bytes(const torch::nn::Module& m) {
  int64_t total = 0;
  for (const auto& [k, t] : NamedTensors(m)) total += t.numel() * t.element_size();
  return total;
}

// Properties every sequential map must have: every tensor covered by exactly the placement the
// map says, device entries non-decreasing in registration order, budgets respected, and each
// device's first unit (after the first device) one that did not fit on the device before.
void ExpectSequentialProperties(const torch::nn::Module& m, const DeviceMap& map,
                                const Budgets& budgets) {
  ASSERT_EQ(map.devices.size(), budgets.size());
  std::vector<int64_t> used(budgets.size(), 0);
  size_t last = 0;
  for (size_t i = 0; i < map.placements.size(); ++i) {
    const DevicePlacement& p = map.placements[i];
    EXPECT_GE(p.device_index, last) << p.name;
    if (p.device_index > last && i > 0) {
      EXPECT_GT(used[last] + p.bytes, budgets[last].second) << p.name << " would have fit";
    }
    last = p.device_index;
    used[p.device_index] += p.bytes;
  }
  int64_t total = 0;
  for (size_t d = 0; d < budgets.size(); ++d) {
    EXPECT_LE(used[d], budgets[d].second);
    EXPECT_EQ(used[d], map.used_bytes[d]);
    total += used[d];
  }
  EXPECT_EQ(total, Bytes(m));
  for (const auto& [name, t] : NamedTensors(m)) EXPECT_GE(map.DeviceIndexOf(name), 0) << name;
}

// The device entries the tensors of module `name` are placed on.
std::set<int64_t> EntriesOf(const torch::nn::Module& root, const DeviceMap& map,
                            const std::string& name) {
  std::set<int64_t> out;
  for (const auto& [k, t] : NamedTensors(root)) {
    if (k.rfind(name + ".", 0) == 0) out.insert(map.DeviceIndexOf(k));
  }
  return out;
}

TEST(DeviceMapTest, SequentialFillsInOrderAndKeepsNoSplitWhole) {
  Toy toy;
  const int64_t head = Bytes(*toy) - Bytes(*toy->blocks) - Bytes(*toy->out);  // scale + embed
  ASSERT_EQ(Bytes(*toy->blocks[0]), kPair);
  // Room for the head, one block and half of the next.
  const Budgets budgets = {{torch::kCPU, head + kPair + kPair / 2}, {torch::kCPU, 1 << 20}};
  auto split = InferSequentialDeviceMap(*toy, {}, budgets);
  ASSERT_TRUE(split.ok()) << split.status();
  ExpectSequentialProperties(*toy, *split, budgets);
  // Without _no_split_modules the second block is split across the two entries ...
  EXPECT_EQ(EntriesOf(*toy, *split, "blocks.1").size(), 2u) << split->Summary();

  auto whole = InferSequentialDeviceMap(*toy, {"Pair"}, budgets);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ExpectSequentialProperties(*toy, *whole, budgets);
  // ... with it every Pair stays on one entry, and the map still uses both entries.
  for (const char* b : {"blocks.0", "blocks.1", "blocks.2"}) {
    EXPECT_EQ(EntriesOf(*toy, *whole, b).size(), 1u) << b << "\n" << whole->Summary();
  }
  EXPECT_EQ(*EntriesOf(*toy, *whole, "blocks.0").begin(), 0);
  EXPECT_EQ(*EntriesOf(*toy, *whole, "blocks.1").begin(), 1);
  EXPECT_GT(whole->used_bytes[0], 0);
  EXPECT_GT(whole->used_bytes[1], 0);
  // The summary names both entries and collapses the run of blocks on the second.
  const std::string summary = whole->Summary();
  EXPECT_NE(summary.find("cpu#0"), std::string::npos) << summary;
  EXPECT_NE(summary.find("cpu#1"), std::string::npos) << summary;
  EXPECT_NE(summary.find("blocks.1..2"), std::string::npos) << summary;

  // Everything fits on the first entry: nothing goes to the second.
  auto roomy = InferSequentialDeviceMap(*toy, {"Pair"},
                                        {{torch::kCPU, Bytes(*toy)}, {torch::kCPU, 1 << 20}});
  ASSERT_TRUE(roomy.ok());
  EXPECT_EQ(roomy->used_bytes[0], Bytes(*toy));
  EXPECT_EQ(roomy->used_bytes[1], 0);
}

TEST(DeviceMapTest, Errors) {
  Toy toy;
  // A Pair fits on neither entry: RESOURCE_EXHAUSTED naming the first block.
  auto tight =
      InferSequentialDeviceMap(*toy, {"Pair"}, {{torch::kCPU, 200}, {torch::kCPU, kPair - 1}});
  EXPECT_EQ(tight.status().code(), absl::StatusCode::kResourceExhausted) << tight.status();
  EXPECT_NE(tight.status().message().find("'blocks.0'"), std::string::npos) << tight.status();
  EXPECT_NE(tight.status().message().find("Pair"), std::string::npos) << tight.status();
  // Splittable, it runs out at a leaf instead.
  auto leaf = InferSequentialDeviceMap(*toy, {}, {{torch::kCPU, 100}});
  EXPECT_EQ(leaf.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(leaf.status().message().find("'embed'"), std::string::npos) << leaf.status();

  EXPECT_EQ(InferSequentialDeviceMap(*toy, {}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto negative = InferSequentialDeviceMap(*toy, {}, {{torch::kCPU, 10}, {torch::kCPU, -1}});
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(negative.status().message().find("entry 1"), std::string::npos) << negative.status();
  EXPECT_EQ(ParseMapDevice("tpu").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseMapDevice("cuda:x").status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(ParseMapDevice("cpu").ok());
  if (!torch::cuda::is_available()) {
    auto cuda = InferSequentialDeviceMap(*toy, {}, {{torch::Device(torch::kCUDA, 0), 1 << 20}});
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnimplemented) << cuda.status();
    EXPECT_EQ(ParseMapDevice("cuda:0").status().code(), absl::StatusCode::kUnimplemented);
  }
}

TEST(DeviceMapTest, ExplicitMaps) {
  Toy toy;
  auto map = ExplicitDeviceMap(*toy, {"Pair"}, {{"", torch::kCPU}, {"blocks.1", torch::kCPU}});
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(map->used_bytes[0], Bytes(*toy));
  EXPECT_EQ(map->placements[1].bytes, kPair);
  auto unknown = ExplicitDeviceMap(*toy, {}, {{"blocks.7", torch::kCPU}});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("blocks.7"), std::string::npos);
  auto uncovered = ExplicitDeviceMap(*toy, {}, {{"blocks", torch::kCPU}});
  EXPECT_EQ(uncovered.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(uncovered.status().message().find("not covered"), std::string::npos);
  auto twice = ExplicitDeviceMap(*toy, {}, {{"", torch::kCPU}, {"", torch::kCPU}});
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  if (torch::cuda::is_available()) {
    auto spread = ExplicitDeviceMap(*toy, {"Pair"},
                                    {{"", torch::kCPU}, {"blocks.1.a", torch::Device("cuda:0")}});
    EXPECT_EQ(spread.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(spread.status().message().find("'blocks.1'"), std::string::npos) << spread.status();
  }
}

TEST(DeviceMapTest, ApplyKeepsTensorsAndValues) {
  Toy toy;
  std::map<std::string, torch::Tensor> before;
  for (const auto& [k, t] : NamedTensors(*toy)) before[k] = t.clone();
  const Budgets budgets = {{torch::kCPU, 300}, {torch::kCPU, 1 << 20}};
  auto map = InferSequentialDeviceMap(*toy, {"Pair"}, budgets);
  ASSERT_TRUE(map.ok());
  const torch::Tensor handle = toy->blocks[2]->as<PairImpl>()->a->weight;
  ASSERT_TRUE(ApplyDeviceMap(*toy, *map).ok());
  for (const auto& [k, t] : NamedTensors(*toy)) {
    EXPECT_TRUE(t.device().is_cpu());
    EXPECT_TRUE(torch::equal(t, before.at(k))) << k;
  }
  EXPECT_TRUE(handle.is_same(toy->blocks[2]->as<PairImpl>()->a->weight));
  EXPECT_NE(DevicePlacementSummary(*toy).find("cpu"), std::string::npos);
  // A map of another module does not cover this one's tensors.
  torch::nn::Linear other(2, 2);
  auto other_map = InferSequentialDeviceMap(*other, {}, budgets);
  ASSERT_TRUE(other_map.ok());
  const absl::Status s = ApplyDeviceMap(*toy, *other_map);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

}  // namespace
}  // namespace ds
