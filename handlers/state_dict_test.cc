#include "handlers/state_dict.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "handlers/safetensors.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A small module with nested names, a bias-free layer and a buffer:
//   a.weight [2,3], a.bias [2], b.inner.weight [4,2], b.running [4]
struct InnerImpl : torch::nn::Module {
  InnerImpl() {
    inner = register_module("inner", torch::nn::Linear(torch::nn::LinearOptions(2, 4).bias(false)));
    running = register_buffer("running", torch::zeros({4}));
  }
  torch::nn::Linear inner{nullptr};
  torch::Tensor running;
};
TORCH_MODULE(Inner);

struct NetImpl : torch::nn::Module {
  NetImpl() {
    a = register_module("a", torch::nn::Linear(3, 2));
    b = register_module("b", Inner());
  }
  torch::nn::Linear a{nullptr};
  Inner b{nullptr};
};
TORCH_MODULE(Net);

TensorMap FullStateDict(torch::Dtype dtype = torch::kFloat32) {
  TensorMap sd;
  sd["a.weight"] = torch::arange(6, torch::kFloat64).reshape({2, 3}).to(dtype);
  sd["a.bias"] = torch::tensor({10.0, 20.0}).to(dtype);
  sd["b.inner.weight"] = torch::arange(8, torch::kFloat64).reshape({4, 2}).to(dtype) * 0.5;
  sd["b.running"] = torch::tensor({1.0, 2.0, 3.0, 4.0}).to(dtype);
  return sd;
}

TensorMap Snapshot(const torch::nn::Module& m) {
  TensorMap out;
  for (const auto& [name, t] : NamedTensors(m)) out[name] = t.detach().clone();
  return out;
}

void ExpectSame(const TensorMap& a, const TensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    EXPECT_TRUE(torch::equal(t, b.at(name))) << name;
  }
}

// A fresh directory under the test temp dir.
std::string TempDir(const std::string& name) {
  fs::path dir = fs::path(::testing::TempDir()) /
                 ("state_dict_test_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteText(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
}

TEST(StateDictTest, NamedTensorsUsesDottedNames) {
  Net net;
  std::vector<std::string> names;
  for (const auto& [name, t] : NamedTensors(*net)) names.push_back(name);
  EXPECT_THAT(names, ElementsAre("a.bias", "a.weight", "b.inner.weight", "b.running"));
}

TEST(StateDictTest, CheckReportsMissingUnexpectedAndShapeByName) {
  Net net;
  TensorMap sd = FullStateDict();
  sd.erase("a.bias");
  sd["a.extra"] = torch::zeros({1});
  sd["b.inner.weight"] = torch::zeros({2, 4});
  StateDictReport report = CheckStateDict(*net, sd);
  EXPECT_FALSE(report.ok());
  EXPECT_THAT(report.missing, ElementsAre("a.bias"));
  EXPECT_THAT(report.unexpected, ElementsAre("a.extra"));
  EXPECT_THAT(report.shape_mismatch,
              ElementsAre("b.inner.weight: module [4, 2] vs checkpoint [2, 4]"));
  EXPECT_THAT(report.ToString(), HasSubstr("a.bias"));
  EXPECT_THAT(report.ToString(), HasSubstr("a.extra"));

  EXPECT_TRUE(CheckStateDict(*net, FullStateDict()).ok());
  EXPECT_EQ(CheckStateDict(*net, FullStateDict()).ToString(), "");
}

TEST(StateDictTest, LoadCopiesValues) {
  Net net;
  ASSERT_TRUE(LoadStateDict(*net, FullStateDict()).ok());
  ExpectSame(Snapshot(*net), FullStateDict());
}

TEST(StateDictTest, FailedLoadLeavesModuleUntouchedAndNamesKeys) {
  Net net;
  const TensorMap before = Snapshot(*net);
  TensorMap sd = FullStateDict();
  sd.erase("b.running");
  sd["zzz"] = torch::zeros({3});
  sd["a.weight"] = torch::zeros({3, 2});
  StateDictReport report;
  absl::Status s = LoadStateDict(*net, sd, "ckpt.safetensors", &report);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("ckpt.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("b.running"));
  EXPECT_THAT(s.message(), HasSubstr("zzz"));
  EXPECT_THAT(s.message(), HasSubstr("a.weight: module [2, 3] vs checkpoint [3, 2]"));
  EXPECT_THAT(report.missing, ElementsAre("b.running"));
  EXPECT_THAT(report.unexpected, ElementsAre("zzz"));
  ExpectSame(Snapshot(*net), before);
}

TEST(StateDictTest, IncompatibleDtypeIsRejectedBeforeCopying) {
  Net net;
  const TensorMap before = Snapshot(*net);
  TensorMap sd = FullStateDict();
  sd["b.inner.weight"] = torch::zeros({4, 2}, torch::kInt64);
  absl::Status s = LoadStateDict(*net, sd);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("b.inner.weight"));
  ExpectSame(Snapshot(*net), before);
}

TEST(StateDictTest, FailingCopyRestoresOldValues) {
  Net net;
  const TensorMap before = Snapshot(*net);
  TensorMap sd = FullStateDict();
  // A meta tensor passes every check (name, shape, dtype) but cannot be copied from. It is the
  // last key in name order, so the other three tensors have already been overwritten when it fails.
  sd["b.running"] = torch::empty({4}, torch::TensorOptions().device(torch::kMeta));
  absl::Status s = LoadStateDict(*net, sd, "meta");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("b.running"));
  ExpectSame(Snapshot(*net), before);
}

TEST(StateDictTest, ConvertsDtypeToEachParameter) {
  Net net;
  // Double -> float.
  ASSERT_TRUE(LoadStateDict(*net, FullStateDict(torch::kFloat64)).ok());
  ExpectSame(Snapshot(*net), FullStateDict(torch::kFloat32));
  // Float -> bfloat16 parameters (the values are exactly representable).
  net->to(torch::kBFloat16);
  ASSERT_TRUE(LoadStateDict(*net, FullStateDict(torch::kFloat32)).ok());
  for (const auto& [name, t] : NamedTensors(*net)) {
    EXPECT_EQ(t.scalar_type(), torch::kBFloat16) << name;
    EXPECT_TRUE(torch::equal(t.to(torch::kFloat32), FullStateDict().at(name))) << name;
  }
  // Half checkpoint -> bfloat16 module.
  ASSERT_TRUE(LoadStateDict(*net, FullStateDict(torch::kFloat16)).ok());
  EXPECT_TRUE(torch::equal(net->a->bias.to(torch::kFloat32), torch::tensor({10.0f, 20.0f})));
}

// InitRandomWeights: every weight of rank >= 2 and its bias within 1/sqrt(fan_in) (fan_in =
// numel / rows, so a conv kernel counts in x kh x kw), norm scales around 1, deterministic.
TEST(StateDictTest, InitRandomWeightsScalesByFanIn) {
  struct Net : torch::nn::Module {
    Net() {
      conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 4, 3)));
      linear = register_module("linear", torch::nn::Linear(12, 5));
      norm = register_module("norm", torch::nn::GroupNorm(2, 4));
    }
    torch::nn::Conv2d conv{nullptr};
    torch::nn::Linear linear{nullptr};
    torch::nn::GroupNorm norm{nullptr};
  };
  Net a, b;
  InitRandomWeights(a, 3);
  InitRandomWeights(b, 3);
  for (const auto& [name, t] : NamedTensors(a)) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(torch::equal(t, NamedTensors(b).at(name)));
  }
  auto max_abs = [](const torch::Tensor& t) { return t.abs().max().item<double>(); };
  const double conv_bound = 1.0 / std::sqrt(8.0 * 3 * 3);
  EXPECT_LE(max_abs(a.conv->weight), conv_bound);
  EXPECT_GT(max_abs(a.conv->weight), 0.5 * conv_bound);
  EXPECT_LE(max_abs(a.conv->bias), conv_bound);
  EXPECT_LE(max_abs(a.linear->weight), 1.0 / std::sqrt(12.0));
  EXPECT_GT(max_abs(a.linear->weight), 0.5 / std::sqrt(12.0));
  EXPECT_LE(max_abs(a.norm->weight - 1.0), 0.1 + 1e-6);
}

TEST(StateDictTest, ReadJsonFileErrors) {
  const std::string dir = TempDir("json");
  EXPECT_EQ(ReadJsonFile(dir + "/absent.json").status().code(), absl::StatusCode::kNotFound);
  WriteText(fs::path(dir) / "bad.json", "{\"a\": 1,\n \"b\": }");
  auto bad = ReadJsonFile(dir + "/bad.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("bad.json"));
  WriteText(fs::path(dir) / "good.json", "{\"a\": [1, 2]}");
  auto good = ReadJsonFile(dir + "/good.json");
  ASSERT_TRUE(good.ok()) << good.status();
  EXPECT_EQ((*good)["a"][1], 2);
}

TEST(StateDictTest, ModelFolderDirectAndSubfolder) {
  const std::string root = TempDir("folder");
  const fs::path sub = fs::path(root) / "transformer";
  fs::create_directories(sub);
  WriteText(sub / "config.json", "{\"_class_name\": \"X\", \"n\": 3}");
  ASSERT_TRUE(
      WriteSafetensors((sub / "diffusion_pytorch_model.safetensors").string(), FullStateDict())
          .ok());
  WriteText(fs::path(root) / "model_index.json", "{}");

  for (const std::string& dir : {sub.string(), root}) {
    auto folder = OpenModelFolder(dir);
    ASSERT_TRUE(folder.ok()) << dir << ": " << folder.status();
    EXPECT_EQ(fs::path(folder->dir), sub);
    EXPECT_EQ(folder->config["n"], 3);
    ExpectSame(folder->weights, FullStateDict());
    Net net;
    EXPECT_TRUE(LoadStateDict(*net, folder->weights).ok());
  }
  // Another subfolder name does not exist.
  EXPECT_EQ(OpenModelFolder(root, "unet").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(OpenModelFolder(root + "/nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(StateDictTest, ModelFolderWithoutWeightsIsNotFound) {
  const std::string dir = TempDir("noweights");
  WriteText(fs::path(dir) / "config.json", "{}");
  auto folder = OpenModelFolder(dir);
  EXPECT_EQ(folder.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(folder.status().message(), HasSubstr("diffusion_pytorch_model.safetensors"));
}

TEST(StateDictTest, ModelFolderInvalidConfig) {
  const std::string dir = TempDir("badconfig");
  WriteText(fs::path(dir) / "config.json", "[1, 2");
  ASSERT_TRUE(
      WriteSafetensors((fs::path(dir) / "model.safetensors").string(), FullStateDict()).ok());
  EXPECT_EQ(OpenModelFolder(dir).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(StateDictTest, ShardedModelFolder) {
  for (const std::string prefix : {"diffusion_pytorch_model", "model"}) {
    const std::string dir = TempDir("sharded_" + prefix);
    const TensorMap sd = FullStateDict();
    TensorMap shard1, shard2;
    nlohmann::json weight_map = nlohmann::json::object();
    const std::string name1 = prefix + "-00001-of-00002.safetensors";
    const std::string name2 = prefix + "-00002-of-00002.safetensors";
    for (const auto& [name, t] : sd) {
      const bool first = name.rfind("a.", 0) == 0;
      (first ? shard1 : shard2)[name] = t;
      weight_map[name] = first ? name1 : name2;
    }
    ASSERT_TRUE(WriteSafetensors((fs::path(dir) / name1).string(), shard1).ok());
    ASSERT_TRUE(WriteSafetensors((fs::path(dir) / name2).string(), shard2).ok());
    nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}};
    WriteText(fs::path(dir) / (prefix + ".safetensors.index.json"), index.dump(2));
    WriteText(fs::path(dir) / "config.json", "{\"sharded\": true}");

    auto folder = OpenModelFolder(dir);
    ASSERT_TRUE(folder.ok()) << prefix << ": " << folder.status();
    EXPECT_EQ(folder->config["sharded"], true);
    ExpectSame(folder->weights, sd);
    Net net;
    ASSERT_TRUE(LoadStateDict(*net, folder->weights).ok());
    ExpectSame(Snapshot(*net), sd);
  }
}

TEST(StateDictTest, EmptyReportIsOk) {
  StateDictReport r;
  EXPECT_TRUE(r.ok());
  EXPECT_THAT(r.ToString(), IsEmpty());
}

}  // namespace
}  // namespace ds
