// Group offloading on FluxTransformer2DModel: the forward enters every double and single block
// through the model's offloader, so an offloaded model computes bit for bit what the resident one
// computes (float32, bfloat16 layerwise-cast storage, unfused and fused LoRAs, concurrent
// requests), through both loaders, with every group offloaded again after each forward; the
// `_supports_group_offloading` row comes from the wiring.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "handlers/group_offloading.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "models/flux/spec.h"
#include "models/flux/transformer.h"
#include "testing/lora_util.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::ds::test::TempDir;
using ::testing::HasSubstr;

constexpr int64_t kDouble = 3, kSingle = 4;

nlohmann::json Config() {
  return {{"patch_size", 1},           {"in_channels", 16},
          {"num_layers", kDouble},     {"num_single_layers", kSingle},
          {"attention_head_dim", 16},  {"num_attention_heads", 2},
          {"joint_attention_dim", 32}, {"pooled_projection_dim", 24},
          {"guidance_embeds", true},   {"axes_dims_rope", {4, 6, 6}}};
}

const ModelSpec& Spec() { return **ModelRegistry::Global().Find("flux"); }

GroupOffloadingOptions Offloading(int64_t blocks_per_group, bool prefetch = true) {
  GroupOffloadingOptions o;
  o.blocks_per_group = blocks_per_group;
  o.prefetch = prefetch;
  return o;
}

// A random-weight model (same weights for the same seed), offloaded when `offloading` is set.
std::shared_ptr<DiffusionModel> MakeModel(std::optional<GroupOffloadingOptions> offloading,
                                          std::optional<torch::Dtype> storage = std::nullopt) {
  ModelOptions options;
  options.storage_dtype = storage;
  options.group_offloading = offloading;
  auto model = FluxTransformer::Create(Config(), options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), 11);
  absl::Status applied = ApplyGroupOffloading(Spec(), **model);
  EXPECT_TRUE(applied.ok()) << applied;
  return std::shared_ptr<DiffusionModel>(std::move(model).value());
}

TensorMap Inputs(int64_t seed) {
  torch::manual_seed(seed);
  TensorMap in;
  const int64_t img = 12, txt = 6;
  in["hidden_states"] = torch::randn({1, img, 16});
  in["encoder_hidden_states"] = torch::randn({1, txt, 32});
  in["pooled_projections"] = torch::randn({1, 24});
  in["timestep"] = torch::rand({1});
  torch::Tensor ids = torch::zeros({img, 3});
  for (int64_t i = 0; i < img; ++i) {
    ids[i][1] = static_cast<float>(i / 4);
    ids[i][2] = static_cast<float>(i % 4);
  }
  in["img_ids"] = ids;
  in["txt_ids"] = torch::zeros({txt, 3});
  in["guidance"] = torch::full({1}, 3.5);
  return in;
}

torch::Tensor Forward(const DiffusionModel& model, const TensorMap& inputs,
                      const LoraContext* lora = nullptr) {
  auto out = model.Forward(inputs, lora);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : torch::Tensor();
}

void ExpectAllOffloaded(const DiffusionModel& model) {
  const GroupOffloader* offloader = model.group_offloader();
  ASSERT_NE(offloader, nullptr);
  const GroupOffloadingStats s = offloader->stats();
  EXPECT_EQ(s.resident_groups, 0);
  EXPECT_EQ(s.resident_bytes, 0);
  EXPECT_EQ(s.onloads, s.offloads);
  auto cached = offloader->PageCacheBytes();
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_EQ(*cached, 0);
}

TEST(FluxGroupOffloadingTest, BlocksAreGroupedInForwardOrder) {
  auto model = MakeModel(Offloading(2));
  ASSERT_NE(model, nullptr);
  const GroupOffloader* offloader = model->group_offloader();
  ASSERT_NE(offloader, nullptr);
  std::vector<std::string> expected;
  for (int64_t i = 0; i < kDouble; ++i) expected.push_back(absl::StrCat("transformer_blocks.", i));
  for (int64_t i = 0; i < kSingle; ++i) {
    expected.push_back(absl::StrCat("single_transformer_blocks.", i));
  }
  EXPECT_EQ(offloader->block_names(), expected);
  // Groups of 2 within each list: {0,1} {2} | {3,4} {5,6}.
  EXPECT_EQ(offloader->num_groups(), 4);
  EXPECT_EQ(offloader->group_of(2), 1);
  EXPECT_EQ(offloader->group_of(3), 2);
  // Everything in the blocks is offloaded; the rest (embedders, norm_out, proj_out) is not.
  int64_t block_bytes = 0;
  for (const auto& [name, t] : NamedTensors(model->module())) {
    if (name.rfind("transformer_blocks.", 0) == 0 || name.rfind("single_transformer_blocks.", 0) == 0) {
      block_bytes += t.numel() * t.element_size();
    }
  }
  EXPECT_EQ(offloader->stats().offloaded_bytes, block_bytes);
}

TEST(FluxGroupOffloadingTest, OffloadedForwardEqualsResident) {
  for (std::optional<torch::Dtype> storage : {std::optional<torch::Dtype>(),
                                              std::optional<torch::Dtype>(torch::kBFloat16)}) {
    SCOPED_TRACE(storage.has_value() ? "bfloat16 storage" : "float32");
    auto resident = MakeModel(std::nullopt, storage);
    ASSERT_NE(resident, nullptr);
    const TensorMap in = Inputs(3);
    const torch::Tensor expected = Forward(*resident, in);
    for (int64_t k : {1, 3}) {
      for (bool prefetch : {false, true}) {
        SCOPED_TRACE(absl::StrCat("blocks_per_group ", k, " prefetch ", prefetch));
        auto offloaded = MakeModel(Offloading(k, prefetch), storage);
        ASSERT_NE(offloaded, nullptr);
        EXPECT_TRUE(torch::equal(Forward(*offloaded, in), expected));
        EXPECT_TRUE(torch::equal(Forward(*offloaded, in), expected));
        ExpectAllOffloaded(*offloaded);
        const GroupOffloadingStats s = offloaded->group_offloader()->stats();
        EXPECT_EQ(s.onloads, 2 * s.groups);  // each group once per forward
      }
    }
  }
}

TEST(FluxGroupOffloadingTest, LoRAUnfusedAndFusedMatchResident) {
  TempDir dir;
  auto resident = MakeModel(std::nullopt);
  auto offloaded = MakeModel(Offloading(2));
  ASSERT_NE(resident, nullptr);
  ASSERT_NE(offloaded, nullptr);
  // A LoRA on linears inside blocks (offloaded) and outside them (resident).
  const TensorMap params = NamedTensors(resident->module());
  const std::vector<std::string> modules = {"transformer_blocks.0.attn.to_q",
                                            "transformer_blocks.2.ff.net.2",
                                            "single_transformer_blocks.1.proj_mlp", "x_embedder"};
  const std::string path = dir.File("lora.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, test::MakeDiffusersLora(params, modules, 4, 9)).ok());
  LoraHost resident_host(resident, Spec().lora);
  LoraHost offloaded_host(offloaded, Spec().lora);
  ASSERT_TRUE(resident_host.Load("a", path).ok());
  ASSERT_TRUE(offloaded_host.Load("a", path).ok());
  const TensorMap in = Inputs(4);
  const torch::Tensor plain = Forward(*resident, in);

  // Unfused: the request's context.
  auto rs = resident_host.Snapshot({{"a", 0.7}});
  auto os = offloaded_host.Snapshot({{"a", 0.7}});
  ASSERT_TRUE(rs.ok() && os.ok());
  auto r = resident_host.Forward(in, rs->get());
  auto o = offloaded_host.Forward(in, os->get());
  ASSERT_TRUE(r.ok() && o.ok());
  EXPECT_TRUE(torch::equal(*o, *r));
  EXPECT_FALSE(torch::equal(*o, plain));
  ExpectAllOffloaded(*offloaded);

  // Fused into the weights: the fused tensors replace the offloaded ones and stay resident.
  ASSERT_TRUE(resident_host.Fuse({{"a", 0.7}}).ok());
  ASSERT_TRUE(offloaded_host.Fuse({{"a", 0.7}}).ok());
  r = resident_host.Forward(in, nullptr);
  o = offloaded_host.Forward(in, nullptr);
  ASSERT_TRUE(r.ok() && o.ok());
  EXPECT_TRUE(torch::equal(*o, *r));
  EXPECT_FALSE(torch::equal(*o, plain));
  EXPECT_EQ(offloaded->group_offloader()->stats().resident_groups, 0);

  // Unfused again: the pristine (offloaded) tensors are back and the output is the plain one.
  ASSERT_TRUE(offloaded_host.Unfuse().ok());
  o = offloaded_host.Forward(in, nullptr);
  ASSERT_TRUE(o.ok());
  EXPECT_TRUE(torch::equal(*o, plain));
  ExpectAllOffloaded(*offloaded);
}

TEST(FluxGroupOffloadingTest, ConcurrentForwardsKeepTheirSoloResults) {
  auto resident = MakeModel(std::nullopt);
  auto offloaded = MakeModel(Offloading(1));
  ASSERT_NE(resident, nullptr);
  ASSERT_NE(offloaded, nullptr);
  std::vector<TensorMap> inputs;
  std::vector<torch::Tensor> expected;
  for (int64_t t = 0; t < 4; ++t) {
    inputs.push_back(Inputs(20 + t));
    expected.push_back(Forward(*resident, inputs.back()));
  }
  std::vector<std::vector<torch::Tensor>> outs(4);
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 5; ++r) outs[t].push_back(Forward(*offloaded, inputs[t]));
    });
  }
  for (auto& th : threads) th.join();
  for (int64_t t = 0; t < 4; ++t) {
    ASSERT_EQ(outs[t].size(), 5u);
    for (const torch::Tensor& o : outs[t]) EXPECT_TRUE(torch::equal(o, expected[t]));
  }
  ExpectAllOffloaded(*offloaded);
}

TEST(FluxGroupOffloadingTest, LoadersApplyIt) {
  // A model folder (golden fixture) ...
  const fs::path folder = fs::path(GoldenDir()) / "flux" / "flux_small_b2";
  auto io = LoadSafetensorsWeights((folder / "io.safetensors").string());
  ASSERT_TRUE(io.ok()) << io.status();
  TensorMap in;
  for (const auto& [k, v] : *io) {
    if (k != "output" && k.rfind("intermediate/", 0) != 0) in.emplace(k, v);
  }
  ModelOptions options;
  auto resident = LoadModelFromFolder((folder / "transformer").string(), options);
  ASSERT_TRUE(resident.ok()) << resident.status();
  options.group_offloading = Offloading(1);
  auto offloaded = LoadModelFromFolder((folder / "transformer").string(), options);
  ASSERT_TRUE(offloaded.ok()) << offloaded.status();
  ASSERT_NE((*offloaded)->group_offloader(), nullptr);
  EXPECT_TRUE(torch::equal(Forward(**offloaded, in), Forward(**resident, in)));
  ExpectAllOffloaded(**offloaded);

  // ... and a single file.
  const std::string file = (fs::path(GoldenDir()) / "single_file" / "flux-dev" / "original.safetensors").string();
  SingleFileOptions sf;
  auto plain = LoadSingleFile(file, sf);
  ASSERT_TRUE(plain.ok()) << plain.status();
  sf.model.group_offloading = Offloading(2);
  auto loaded = LoadSingleFile(file, sf);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_NE(loaded->model->group_offloader(), nullptr);
  auto sf_io = LoadSafetensorsWeights(
      (fs::path(GoldenDir()) / "single_file" / "flux-dev" / "io.safetensors").string());
  ASSERT_TRUE(sf_io.ok()) << sf_io.status();
  TensorMap sf_in;
  for (const auto& [k, v] : *sf_io) {
    if (k != "output" && k.rfind("intermediate/", 0) != 0) sf_in.emplace(k, v);
  }
  EXPECT_TRUE(torch::equal(Forward(*loaded->model, sf_in), Forward(*plain->model, sf_in)));
  ExpectAllOffloaded(*loaded->model);

  // Bad options are refused before anything is built, naming the field.
  options.group_offloading = Offloading(0);
  auto bad = LoadModelFromFolder((folder / "transformer").string(), options);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("blocks_per_group"));
}

TEST(FluxGroupOffloadingTest, MetadataRowFromTheWiring) {
  const ModelMetadata m = BuildModelMetadata(Spec());
  ASSERT_TRUE(m.contains("_supports_group_offloading"));
  ModelSpec unwired = Spec();
  unwired.group_offloading = false;
  EXPECT_FALSE(BuildModelMetadata(unwired).contains("_supports_group_offloading"));
  ModelOptions options;
  options.group_offloading = Offloading(1);
  const absl::Status refused = CheckGroupOffloadingSupported(unwired, options);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("FluxTransformer2DModel"));
}

}  // namespace
}  // namespace ds::flux
