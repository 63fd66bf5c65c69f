// Device maps on FluxTransformer2DModel (handlers/device_map.h), on the CPU device: two "cpu"
// entries with byte budgets stand for two devices, so the placement really splits while the
// forward stays checkable bit for bit.
#include "handlers/device_map.h"

#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "handlers/layerwise_casting.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "models/flux/transformer.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;

using Budgets = std::vector<std::pair<torch::Device, int64_t>>;

fs::path Case() { return fs::path(GoldenDir()) / "flux" / "flux_small_b2"; }

const std::vector<std::string>& NoSplit() {
  static const auto* const kNames = [] {
    auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
    return new std::vector<std::string>(spec.ok() ? (*spec)->structure.no_split_modules
                                                  : std::vector<std::string>{});
  }();
  return *kNames;
}

int64_t Bytes(const torch::nn::Module& m) {
  int64_t total = 0;
  for (const auto& [k, t] : NamedTensors(m)) total += t.numel() * t.element_size();
  return total;
}

TensorMap Inputs() {
  auto all = LoadSafetensorsWeights((Case() / "io.safetensors").string());
  EXPECT_TRUE(all.ok()) << all.status();
  TensorMap in;
  for (const auto& [k, v] : *all) {
    if (k != "output" && k.rfind("intermediate/", 0) != 0) in.emplace(k, v);
  }
  return in;
}

// Budgets that end the first entry halfway through the second double block: everything before it
// plus one and a half blocks (from the model's own sizes, so any config works).
Budgets SplitBudgets(const FluxTransformer2DModelImpl& m) {
  const int64_t before =
      Bytes(*m.time_text_embed) + Bytes(*m.context_embedder) + Bytes(*m.x_embedder);
  const int64_t block = Bytes(*m.blocks.at(0));
  return {{torch::kCPU, before + block + block / 2}, {torch::kCPU, Bytes(m)}};
}

// The device entries the tensors under `name` were placed on.
std::set<int64_t> EntriesOf(const torch::nn::Module& root, const DeviceMap& map,
                            const std::string& name) {
  std::set<int64_t> out;
  for (const auto& [k, t] : NamedTensors(root)) {
    if (k.rfind(name + ".", 0) == 0) out.insert(map.DeviceIndexOf(k));
  }
  return out;
}

TEST(FluxDeviceMapTest, NoSplitModulesAreTheBlocks) {
  const std::set<std::string> names(NoSplit().begin(), NoSplit().end());
  EXPECT_TRUE(names.count(ModuleClassName<FluxTransformerBlockImpl>()));
  EXPECT_TRUE(names.count(ModuleClassName<FluxSingleTransformerBlockImpl>()));
}

TEST(FluxDeviceMapTest, SequentialNeverSplitsABlock) {
  auto model = LoadModelFromFolder((Case() / "transformer").string(), ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  auto* flux = dynamic_cast<FluxTransformer*>(model->get());
  ASSERT_NE(flux, nullptr);
  const FluxTransformer2DModelImpl& m = *flux->transformer();
  ASSERT_GE(m.blocks.size(), 2u) << "the case needs two double blocks";
  const Budgets budgets = SplitBudgets(m);
  auto map = InferSequentialDeviceMap(m, NoSplit(), budgets);
  ASSERT_TRUE(map.ok()) << map.status();
  std::printf("[device map] %s\n", map->Summary().c_str());
  EXPECT_GT(map->used_bytes[0], 0);
  EXPECT_GT(map->used_bytes[1], 0);
  EXPECT_LE(map->used_bytes[0], budgets[0].second);
  int64_t previous = 0;
  for (size_t i = 0; i < m.blocks.size(); ++i) {
    const auto entries = EntriesOf(m, *map, "transformer_blocks." + std::to_string(i));
    ASSERT_EQ(entries.size(), 1u) << "transformer_blocks." << i << " split:\n" << map->Summary();
    EXPECT_GE(*entries.begin(), previous) << "placement follows registration order";
    previous = *entries.begin();
  }
  for (size_t i = 0; i < m.single_blocks.size(); ++i) {
    const auto entries = EntriesOf(m, *map, "single_transformer_blocks." + std::to_string(i));
    ASSERT_EQ(entries.size(), 1u) << "single_transformer_blocks." << i;
  }
  EXPECT_EQ(*EntriesOf(m, *map, "transformer_blocks.0").begin(), 0);
  EXPECT_EQ(*EntriesOf(m, *map, "transformer_blocks.1").begin(), 1);
  // Without _no_split_modules the same budgets split the second block.
  auto split = InferSequentialDeviceMap(m, {}, budgets);
  ASSERT_TRUE(split.ok());
  EXPECT_EQ(EntriesOf(m, *split, "transformer_blocks.1").size(), 2u) << split->Summary();
}

// Loaded with a map: the forward equals the unmapped forward bit for bit (float32 and 8-bit
// storage), and the model is otherwise the same.
TEST(FluxDeviceMapTest, ForwardWithMapEqualsWithout) {
  auto plain = LoadModelFromFolder((Case() / "transformer").string(), ModelOptions{});
  ASSERT_TRUE(plain.ok()) << plain.status();
  const Budgets budgets =
      SplitBudgets(*dynamic_cast<FluxTransformer*>(plain->get())->transformer());
  const TensorMap in = Inputs();
  for (bool eight_bit : {false, true}) {
    SCOPED_TRACE(eight_bit ? "float8_e4m3fn storage" : "float32");
    ModelOptions base;
    if (eight_bit) base.storage_dtype = torch::kByte;
    ModelOptions mapped = base;
    mapped.device_map.strategy = "sequential";
    mapped.device_map.budgets = budgets;
    auto a = LoadModelFromFolder((Case() / "transformer").string(), base);
    auto b = LoadModelFromFolder((Case() / "transformer").string(), mapped);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    auto out_a = (*a)->Forward(in);
    auto out_b = (*b)->Forward(in);
    ASSERT_TRUE(out_a.ok() && out_b.ok()) << out_a.status() << out_b.status();
    EXPECT_TRUE(torch::equal(*out_a, *out_b));
    EXPECT_NE(DevicePlacementSummary((*b)->module()).find("cpu"), std::string::npos);
  }
}

TEST(FluxDeviceMapTest, LoaderErrors) {
  const std::string dir = (Case() / "transformer").string();
  // Budgets that hold no block: RESOURCE_EXHAUSTED naming the first block.
  ModelOptions tight;
  tight.device_map.strategy = "sequential";
  tight.device_map.budgets = {{torch::kCPU, 1024}, {torch::kCPU, 2048}};
  auto small = LoadModelFromFolder(dir, tight);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kResourceExhausted) << small.status();
  EXPECT_NE(small.status().message().find("does not fit"), std::string::npos) << small.status();
  // With room for everything before the blocks, the first block is the one named.
  auto built = LoadModelFromFolder(dir, ModelOptions{});
  ASSERT_TRUE(built.ok());
  const FluxTransformer2DModelImpl& m =
      *dynamic_cast<FluxTransformer*>(built->get())->transformer();
  const int64_t before =
      Bytes(*m.time_text_embed) + Bytes(*m.context_embedder) + Bytes(*m.x_embedder);
  tight.device_map.budgets = {{torch::kCPU, before}, {torch::kCPU, Bytes(*m.blocks[0]) - 1}};
  auto block = LoadModelFromFolder(dir, tight);
  EXPECT_EQ(block.status().code(), absl::StatusCode::kResourceExhausted) << block.status();
  EXPECT_NE(block.status().message().find("'transformer_blocks.0'"), std::string::npos)
      << block.status();
  EXPECT_NE(block.status().message().find("FluxTransformerBlock"), std::string::npos);

  ModelOptions negative;
  negative.device_map.strategy = "sequential";
  negative.device_map.budgets = {{torch::kCPU, -5}};
  EXPECT_EQ(LoadModelFromFolder(dir, negative).status().code(), absl::StatusCode::kInvalidArgument);
  ModelOptions unknown;
  unknown.device_map.strategy = "balanced";
  auto bad_strategy = LoadModelFromFolder(dir, unknown);
  EXPECT_EQ(bad_strategy.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_strategy.status().message().find("balanced"), std::string::npos);
  if (!torch::cuda::is_available()) {
    ModelOptions cuda;
    cuda.device_map.strategy = "sequential";
    cuda.device_map.budgets = {{torch::Device(torch::kCUDA, 0), int64_t{1} << 30}};
    auto refused = LoadModelFromFolder(dir, cuda);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented) << refused.status();
    EXPECT_NE(refused.status().message().find("cuda:0"), std::string::npos);
  }
  // A model family whose forward does not follow a map refuses it (the golden VAE folder).
  ModelOptions any;
  any.device_map.strategy = "sequential";
  any.device_map.budgets = {{torch::kCPU, int64_t{1} << 30}};
  const fs::path vae = fs::path(GoldenDir()) / "pipeline" / "vae" / "vae";
  auto unsupported = LoadModelFromFolder(vae.string(), any);
  EXPECT_EQ(unsupported.status().code(), absl::StatusCode::kUnimplemented) << unsupported.status();
  EXPECT_NE(unsupported.status().message().find("AutoencoderKL"), std::string::npos);
}

// The single-file loader applies the map too.
TEST(FluxDeviceMapTest, SingleFile) {
  const fs::path dir = fs::path(GoldenDir()) / "single_file" / "flux-dev";
  SingleFileOptions options;
  options.model.device_map.strategy = "sequential";
  options.model.device_map.budgets = {{torch::kCPU, int64_t{1} << 40}};
  auto mapped = LoadSingleFile((dir / "original.safetensors").string(), options);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  options.model.device_map.budgets = {{torch::kCPU, 64}};
  auto refused = LoadSingleFile((dir / "original.safetensors").string(), options);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
}

}  // namespace
}  // namespace ds::flux
