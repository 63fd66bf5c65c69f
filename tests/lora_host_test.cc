// LoraHost end to end on the registered Flux model: applied adapters (unfused and fused) against
// the golden intended_forward outputs, bit-exact unfuse, per-request stacks, the adapter store
// (names, digests, budget, LRU, pinning, replace, unload while in use) and precise errors that
// leave the store and the model unchanged.
#include "handlers/lora_host.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "handlers/digest.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "testing/lora_golden.h"
#include "testing/lora_util.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::ds::test::TempDir;
using ::testing::HasSubstr;

constexpr double kAppliedTolerance = 1e-5;  // golden README: fused/applied LoRA outputs

fs::path LoraGolden() { return test::LoraGoldenDir(); }

// Every golden LoRA case with an intended_forward output.
std::vector<std::string> DiscoverCases() {
  std::vector<std::string> cases;
  for (const std::string& c : test::LoraGoldenCases()) {
    if (fs::exists(LoraGolden() / c / "intended_forward.safetensors")) cases.push_back(c);
  }
  return cases;
}

std::shared_ptr<DiffusionModel> LoadBase() {
  auto model = LoadModelFromFolder((LoraGolden() / "base_model_dir").string(), ModelOptions{});
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::shared_ptr<DiffusionModel>(std::move(*model)) : nullptr;
}

const LoraHandler* HandlerFor(const DiffusionModel& model) {
  auto spec = ModelRegistry::Global().Find(model.class_name());
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? (*spec)->lora : nullptr;
}

// The forward inputs of a golden case (every tensor but "output").
TensorMap Inputs(const fs::path& forward_file) {
  auto all = LoadSafetensorsWeights(forward_file.string());
  EXPECT_TRUE(all.ok()) << all.status();
  TensorMap in = *all;
  in.erase("output");
  return in;
}

torch::Tensor GoldenOutput(const fs::path& file) {
  auto all = LoadSafetensorsWeights(file.string());
  EXPECT_TRUE(all.ok()) << all.status();
  return all->at("output");
}

double Relative(const torch::Tensor& ours, const torch::Tensor& golden) {
  const torch::Tensor a = ours.to(torch::kDouble), b = golden.to(torch::kDouble);
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

bool BitEqual(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && torch::equal(a, b);
}

// Deep copies of the model's parameters.
TensorMap CopyParams(const DiffusionModel& model) {
  TensorMap out;
  for (const auto& [name, t] : NamedTensors(model.module())) out[name] = t.clone();
  return out;
}

void ExpectParamsEqual(const DiffusionModel& model, const TensorMap& expected) {
  const TensorMap now = NamedTensors(model.module());
  ASSERT_EQ(now.size(), expected.size());
  for (const auto& [name, t] : expected) {
    ASSERT_TRUE(now.count(name)) << name;
    EXPECT_TRUE(BitEqual(now.at(name), t)) << name << " changed";
  }
}

class LoraGoldenApplyTest : public ::testing::TestWithParam<std::string> {};

TEST(LoraGoldenApplyDiscoveryTest, FindsCases) {
  EXPECT_FALSE(DiscoverCases().empty()) << "no LoRA cases under " << LoraGolden();
}

// The adapter applied per request (unfused) and fused reproduces the output the source format
// means (intended_forward); unfusing restores every parameter bit for bit.
TEST_P(LoraGoldenApplyTest, UnfusedAndFusedMatchIntendedForwardAndUnfuseIsBitExact) {
  const fs::path dir = LoraGolden() / GetParam();
  std::shared_ptr<DiffusionModel> model = LoadBase();
  ASSERT_NE(model, nullptr);
  LoraHost host(model, HandlerFor(*model));
  ASSERT_TRUE(host.supports_lora());
  const TensorMap pristine = CopyParams(*model);

  auto loaded = host.Load("style", (dir / "input.safetensors").string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->report.sha256.size(), 64u);
  const TensorMap inputs = Inputs(dir / "forward.safetensors");
  const torch::Tensor intended = GoldenOutput(dir / "intended_forward.safetensors");

  auto stack = host.Snapshot({{"style", 1.0}});
  ASSERT_TRUE(stack.ok()) << stack.status();
  auto unfused = host.Forward(inputs, stack->get());
  ASSERT_TRUE(unfused.ok()) << unfused.status();
  EXPECT_LE(Relative(*unfused, intended), kAppliedTolerance) << "unfused";
  ExpectParamsEqual(*model, pristine);  // unfused application never writes the base

  // The base without adapters (input-widening LoRAs take wider inputs, so only compare when the
  // inputs fit the base model).
  const bool widened = !loaded->report.expansions.empty();
  torch::Tensor base_out;
  if (!widened) {
    auto base = host.Forward(inputs);
    ASSERT_TRUE(base.ok()) << base.status();
    base_out = *base;
    EXPECT_GT(Relative(*unfused, base_out), 1e-4) << "the adapter changes nothing";
  }

  ASSERT_TRUE(host.Fuse({{"style", 1.0}}).ok());
  auto fused = host.Forward(inputs);
  ASSERT_TRUE(fused.ok()) << fused.status();
  EXPECT_LE(Relative(*fused, intended), kAppliedTolerance) << "fused";
  // A request naming a fused adapter would apply it twice.
  auto twice = host.Snapshot({{"style", 1.0}});
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kFailedPrecondition);
  // A snapshot taken before the fuse is refused instead of applied on top of the fused weights.
  auto stale = host.Forward(inputs, stack->get());
  EXPECT_EQ(stale.status().code(), absl::StatusCode::kAborted) << stale.status();
  EXPECT_EQ(host.Unload("style").code(), absl::StatusCode::kFailedPrecondition);

  ASSERT_TRUE(host.Unfuse().ok());
  ExpectParamsEqual(*model, pristine);
  EXPECT_EQ(host.fused_extra_bytes(), 0);
  if (!widened) {
    auto again = host.Forward(inputs);
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(BitEqual(*again, base_out));
  } else {
    // Back to the base width: the widened inputs are refused again, naming the input.
    auto refused = host.Forward(inputs);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(refused.status().message()), HasSubstr("hidden_states"));
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, LoraGoldenApplyTest, ::testing::ValuesIn(DiscoverCases()),
                         [](const auto& info) { return test::CaseTestName(info.param); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(LoraGoldenApplyTest);

// ---------------------------------------------------------------------------------------------
// Stacks, weights, store semantics on synthetic adapters.

class LoraHostTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = LoadBase();
    ASSERT_NE(model_, nullptr);
    params_ = NamedTensors(model_->module());
    inputs_ = Inputs(LoraGolden() / "diffusers" / "forward.safetensors");
  }
  // Writes a synthetic diffusers LoRA on every linear module and returns its path.
  std::string WriteLora(const std::string& name, int64_t rank, uint64_t seed,
                        const std::vector<std::string>& modules = {}) {
    const std::string path = dir_.File(name + ".safetensors");
    TensorMap lora = test::MakeDiffusersLora(
        params_, modules.empty() ? test::LinearModules(params_) : modules, rank, seed);
    EXPECT_TRUE(WriteSafetensors(path, lora).ok());
    return path;
  }
  torch::Tensor Run(LoraHost& host, const std::vector<AdapterRequest>& adapters) {
    auto stack = host.Snapshot(adapters);
    EXPECT_TRUE(stack.ok()) << stack.status();
    auto out = host.Forward(inputs_, stack.ok() ? stack->get() : nullptr);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *out : torch::Tensor();
  }

  TempDir dir_;
  std::shared_ptr<DiffusionModel> model_;
  TensorMap params_;
  TensorMap inputs_;
};

TEST_F(LoraHostTest, StackOfWeightedAdaptersEqualsFusingThem) {
  LoraHost host(model_, HandlerFor(*model_));
  ASSERT_TRUE(host.Load("a", WriteLora("a", 4, 1)).ok());
  ASSERT_TRUE(host.Load("b", WriteLora("b", 8, 2)).ok());
  const torch::Tensor base = Run(host, {});
  const torch::Tensor a = Run(host, {{"a", 1.0}});
  const torch::Tensor stacked = Run(host, {{"a", 0.7}, {"b", -1.3}});
  EXPECT_GT(Relative(a, base), 1e-4);
  EXPECT_GT(Relative(stacked, a), 1e-4);
  // Weight 0 is the base model.
  EXPECT_LE(Relative(Run(host, {{"a", 0.0}}), base), 1e-7);
  // Order within a stack does not matter beyond rounding.
  EXPECT_LE(Relative(Run(host, {{"b", -1.3}, {"a", 0.7}}), stacked), 1e-6);
  ASSERT_TRUE(host.Fuse({{"a", 0.7}, {"b", -1.3}}).ok());
  auto fused = host.Forward(inputs_);
  ASSERT_TRUE(fused.ok());
  EXPECT_LE(Relative(*fused, stacked), 1e-5);
  // Adapters not fused still stack on top of the fused base... here none are left, so the
  // empty stack is the fused model.
  EXPECT_TRUE(BitEqual(Run(host, {}), *fused));
  ASSERT_TRUE(host.Unfuse().ok());
  EXPECT_TRUE(BitEqual(Run(host, {}), base));
}

TEST_F(LoraHostTest, RefitFusedSetFromPristineBaseNeverDrifts) {
  LoraHost host(model_, HandlerFor(*model_));
  const TensorMap pristine = CopyParams(*model_);
  ASSERT_TRUE(host.Load("a", WriteLora("a", 4, 1)).ok());
  ASSERT_TRUE(host.Load("b", WriteLora("b", 4, 2)).ok());
  ASSERT_TRUE(host.Fuse({{"a", 1.0}}).ok());
  const TensorMap fused_a = CopyParams(*model_);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(host.Fuse({{"b", 1.0 + i}}).ok());
    ASSERT_TRUE(host.Fuse({{"a", 1.0}}).ok());
  }
  ExpectParamsEqual(*model_, fused_a);  // recomputed from the pristine base: identical bits
  ASSERT_TRUE(host.Unfuse().ok());
  ExpectParamsEqual(*model_, pristine);
}

TEST_F(LoraHostTest, ReplaceKeepsRunningSnapshotsOnTheOldAdapter) {
  LoraHost host(model_, HandlerFor(*model_));
  ASSERT_TRUE(host.Load("style", WriteLora("v1", 4, 1)).ok());
  auto old_stack = host.Snapshot({{"style", 1.0}});
  ASSERT_TRUE(old_stack.ok());
  const torch::Tensor v1 = *host.Forward(inputs_, old_stack->get());
  const std::string v1_digest = (*old_stack)->adapters[0].adapter->sha256;

  EXPECT_EQ(host.Load("style", WriteLora("v2", 4, 2)).status().code(),
            absl::StatusCode::kAlreadyExists);
  auto replaced = host.Load("style", dir_.File("v2.safetensors"), {.replace = true});
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_TRUE(replaced->replaced);
  EXPECT_NE(replaced->report.sha256, v1_digest);
  // The old snapshot still computes v1; memory of v1 is retired, not freed, while it is held.
  EXPECT_TRUE(BitEqual(*host.Forward(inputs_, old_stack->get()), v1));
  EXPECT_GT(host.retired_bytes(), 0);
  EXPECT_GT(Relative(Run(host, {{"style", 1.0}}), v1), 1e-4);
  old_stack->reset();
  EXPECT_EQ(host.retired_bytes(), 0);
}

// Digests are cached by file identity; rewriting a file, in place or by rename, is seen.
TEST_F(LoraHostTest, DigestFollowsTheFileContent) {
  LoraHost host(model_, HandlerFor(*model_));
  const std::string path = WriteLora("d", 4, 1);
  auto first = host.Load("d", path);
  ASSERT_TRUE(first.ok());
  const std::string bytes1 = test::ReadFileBytes(path);
  EXPECT_EQ(first->report.sha256, Sha256Hex(bytes1.data(), bytes1.size()));
  auto again = host.Load("d", path, {.replace = true});  // unchanged: same digest (cached)
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->report.sha256, first->report.sha256);
  // Rewritten by rename (new inode).
  ASSERT_TRUE(WriteSafetensors(path, test::MakeDiffusersLora(params_, test::LinearModules(params_),
                                                             4, 2))
                  .ok());
  auto renamed = host.Load("d", path, {.replace = true});
  ASSERT_TRUE(renamed.ok());
  const std::string bytes2 = test::ReadFileBytes(path);
  EXPECT_EQ(renamed->report.sha256, Sha256Hex(bytes2.data(), bytes2.size()));
  EXPECT_NE(renamed->report.sha256, first->report.sha256);
  // Rewritten in place (same inode, same size).
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes1.data(), static_cast<std::streamsize>(bytes1.size()));
  }
  auto in_place = host.Load("d", path, {.replace = true});
  ASSERT_TRUE(in_place.ok());
  EXPECT_EQ(in_place->report.sha256, first->report.sha256);
}

TEST_F(LoraHostTest, UnloadWhileInUseFreesWhenTheRequestEnds) {
  LoraHost host(model_, HandlerFor(*model_));
  ASSERT_TRUE(host.Load("a", WriteLora("a", 4, 1)).ok());
  auto stack = host.Snapshot({{"a", 1.0}});
  ASSERT_TRUE(stack.ok());
  std::weak_ptr<const LoraAdapter> weak = (*stack)->adapters[0].adapter;
  EXPECT_EQ(host.Info("a")->users, 1);
  ASSERT_TRUE(host.Unload("a").ok());
  EXPECT_EQ(host.adapter_count(), 0u);
  EXPECT_EQ(host.memory_used_bytes(), 0);
  EXPECT_FALSE(weak.expired());
  EXPECT_TRUE(host.Forward(inputs_, stack->get()).ok());
  stack->reset();
  EXPECT_TRUE(weak.expired());
  EXPECT_EQ(host.Unload("a").code(), absl::StatusCode::kNotFound);
  auto unknown = host.Snapshot({{"a", 1.0}});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("'a'"));
}

TEST_F(LoraHostTest, BudgetEvictsLeastRecentlyUsedIdleUnpinnedAdapters) {
  const std::string p1 = WriteLora("one", 4, 1), p2 = WriteLora("two", 4, 2),
                    p3 = WriteLora("three", 4, 3);
  int64_t each = 0;
  {
    LoraHost probe(model_, HandlerFor(*model_));
    auto r = probe.Load("x", p1);
    ASSERT_TRUE(r.ok());
    each = r->bytes;
  }
  ASSERT_GT(each, 0);
  LoraHost host(model_, HandlerFor(*model_), {.memory_budget_bytes = 2 * each + each / 2});
  ASSERT_TRUE(host.Load("one", p1).ok());
  ASSERT_TRUE(host.Load("two", p2).ok());
  Run(host, {{"one", 1.0}});  // "two" is now the least recently used
  auto third = host.Load("three", p3);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->evicted, std::vector<std::string>{"two"});
  EXPECT_LE(host.memory_used_bytes(), 2 * each + each / 2);

  // Pinned and in-use adapters are never evicted: with both held, a load does not fit.
  ASSERT_TRUE(host.SetPinned("one", true).ok());
  auto held = host.Snapshot({{"three", 1.0}});
  ASSERT_TRUE(held.ok());
  const auto before = host.List();
  auto refused = host.Load("four", p2);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("pinned: one"));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("three"));
  const auto after = host.List();
  ASSERT_EQ(after.size(), before.size());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i].name, before[i].name);
  // Once the request ends, "three" is idle and gets evicted.
  held->reset();
  auto fits = host.Load("four", p2);
  ASSERT_TRUE(fits.ok()) << fits.status();
  EXPECT_EQ(fits->evicted, std::vector<std::string>{"three"});
}

TEST_F(LoraHostTest, BadInputIsAPreciseErrorAndChangesNothing) {
  LoraHost host(model_, HandlerFor(*model_), {.max_file_bytes = 1 << 20});
  ASSERT_TRUE(host.Load("good", WriteLora("good", 4, 1)).ok());
  const TensorMap pristine = CopyParams(*model_);
  const std::vector<AdapterInfo> before = host.List();
  const int64_t used = host.memory_used_bytes();
  auto unchanged = [&] {
    const auto now = host.List();
    ASSERT_EQ(now.size(), before.size());
    for (size_t i = 0; i < now.size(); ++i) {
      EXPECT_EQ(now[i].name, before[i].name);
      EXPECT_EQ(now[i].sha256, before[i].sha256);
    }
    EXPECT_EQ(host.memory_used_bytes(), used);
    ExpectParamsEqual(*model_, pristine);
  };
  auto expect_error = [&](const std::string& name, const std::string& path,
                          absl::StatusCode code, const std::vector<std::string>& mentions) {
    auto r = host.Load(name, path);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.status().code(), code) << r.status();
    for (const std::string& m : mentions) {
      EXPECT_THAT(std::string(r.status().message()), HasSubstr(m)) << name;
    }
    unchanged();
  };
  const std::string module = test::LinearModules(params_).front();
  auto write = [&](const std::string& file, const TensorMap& t) {
    EXPECT_TRUE(WriteSafetensors(dir_.File(file), t).ok());
    return dir_.File(file);
  };
  TensorMap base = test::MakeDiffusersLora(params_, {module}, 4, 7);
  const std::string a = "transformer." + module + ".lora_A.weight";
  const std::string b = "transformer." + module + ".lora_B.weight";

  // Unknown format: the model's own weights are not a LoRA; sample keys are shown.
  expect_error("unknown", (LoraGolden() / "base_model.safetensors").string(),
               absl::StatusCode::kInvalidArgument,
               {"unknown LoRA format", "sample keys", "proj_out.weight"});
  // Another width: lora_A's input does not match the module.
  TensorMap wide = base;
  wide[a] = torch::zeros({4, params_.at(module + ".weight").size(1) + 3});
  expect_error("wide", write("wide.safetensors", wide), absl::StatusCode::kInvalidArgument,
               {module});
  // Rank 0.
  TensorMap rank0 = base;
  rank0[a] = torch::zeros({0, params_.at(module + ".weight").size(1)});
  rank0[b] = torch::zeros({params_.at(module + ".weight").size(0), 0});
  expect_error("rank0", write("rank0.safetensors", rank0), absl::StatusCode::kInvalidArgument,
               {module});
  // A/B rank disagreement.
  TensorMap ranks = base;
  ranks[b] = torch::zeros({params_.at(module + ".weight").size(0), 5});
  expect_error("ranks", write("ranks.safetensors", ranks), absl::StatusCode::kInvalidArgument,
               {module});
  // NaN / Inf.
  TensorMap nan = base;
  nan[a] = nan[a].clone();
  nan[a].index_put_({0, 0}, std::nan(""));
  expect_error("nan", write("nan.safetensors", nan), absl::StatusCode::kInvalidArgument, {module});
  TensorMap inf = base;
  inf[b] = inf[b].clone();
  inf[b].index_put_({1, 1}, INFINITY);
  expect_error("inf", write("inf.safetensors", inf), absl::StatusCode::kInvalidArgument, {module});
  // A LoRA for another model (a module this model lacks) without allow_partial.
  TensorMap other = base;
  other["transformer.down_blocks.0.attn.to_q.lora_A.weight"] = torch::zeros({4, 8});
  other["transformer.down_blocks.0.attn.to_q.lora_B.weight"] = torch::zeros({8, 4});
  expect_error("other", write("other.safetensors", other), absl::StatusCode::kInvalidArgument,
               {"down_blocks.0.attn.to_q"});
  // Duplicate name without replace.
  expect_error("good", write("dup.safetensors", base), absl::StatusCode::kAlreadyExists, {"good"});
  // Bad names, missing files, over the size limit.
  expect_error("bad/name", write("n.safetensors", base), absl::StatusCode::kInvalidArgument,
               {"bad/name"});
  expect_error("", write("n.safetensors", base), absl::StatusCode::kInvalidArgument, {"name"});
  expect_error("missing", dir_.File("nope.safetensors"), absl::StatusCode::kNotFound,
               {"nope.safetensors"});
  expect_error("big", WriteLora("big", 4096, 3), absl::StatusCode::kResourceExhausted,
               {"big.safetensors", "limit"});
  // A format hint that detection contradicts.
  auto hinted = host.Load("hinted", dir_.File("n.safetensors"), {.format_hint = "kohya"});
  EXPECT_EQ(hinted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(hinted.status().message()), HasSubstr("'diffusers'"));
  unchanged();
  // Unload of an unknown name.
  EXPECT_EQ(host.Unload("nobody").code(), absl::StatusCode::kNotFound);
  unchanged();
  // Stacks: a name twice, a non-finite weight.
  EXPECT_EQ(host.Snapshot({{"good", 1}, {"good", 2}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(host.Snapshot({{"good", std::nan("")}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(host.Fuse({{"good", INFINITY}}).code(), absl::StatusCode::kInvalidArgument);
  unchanged();
  // allow_partial accepts the partial match and reports what it dropped.
  auto partial = host.Load("partial", dir_.File("other.safetensors"), {.allow_partial = true});
  ASSERT_TRUE(partial.ok()) << partial.status();
  EXPECT_EQ(partial->report.modules.size(), 1u);
  EXPECT_FALSE(partial->report.unmatched.empty());
}

TEST_F(LoraHostTest, StackedOverlaysMustAgree) {
  const fs::path control = LoraGolden() / "bfl_control" / "input.safetensors";
  if (!fs::exists(control)) GTEST_SKIP() << "no bfl_control fixture";
  LoraHost host(model_, HandlerFor(*model_));
  ASSERT_TRUE(host.Load("a", control.string()).ok());
  ASSERT_TRUE(host.Load("same", control.string()).ok());
  ASSERT_FALSE((*host.Get("a"))->overlays.empty());
  // The same replacement twice is fine.
  EXPECT_TRUE(host.Snapshot({{"a", 1.0}, {"same", 0.5}}).ok());
  // A different replacement of the same parameter is a contradiction.
  auto tensors = LoadSafetensorsWeights(control.string());
  ASSERT_TRUE(tensors.ok());
  std::string changed;
  for (auto& [key, t] : *tensors) {
    if (key.find("norm") != std::string::npos && t.dim() == 1) {
      t = t * 2;
      changed = key;
    }
  }
  ASSERT_FALSE(changed.empty());
  const std::string other = dir_.File("other_control.safetensors");
  ASSERT_TRUE(WriteSafetensors(other, *tensors).ok());
  ASSERT_TRUE(host.Load("b", other).ok());
  auto conflict = host.Snapshot({{"a", 1.0}, {"b", 1.0}});
  EXPECT_EQ(conflict.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(conflict.status().message()), HasSubstr("different values"));
}

TEST(LoraHostNoHandlerTest, ModelsWithoutLoraSayUnimplemented) {
  std::shared_ptr<DiffusionModel> model = LoadBase();
  ASSERT_NE(model, nullptr);
  LoraHost host(model, nullptr);
  EXPECT_FALSE(host.supports_lora());
  EXPECT_EQ(host.Load("a", "/nonexistent").status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(host.Snapshot({{"a", 1}}).status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(host.Snapshot({}).ok());
}

}  // namespace
}  // namespace ds
