// Reproduces diffusers' FluxTransformer2DModel forward on every case under $DS_GOLDEN_DIR/flux/
// (see ../shared/golden/README.md): output and intermediates within 1e-4 × max|golden|.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/transformer.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;

namespace fs = std::filesystem;

constexpr double kRelativeTolerance = 1e-4;
constexpr char kIntermediatePrefix[] = "intermediate/";

// Every folder under <golden>/flux/ that holds a forward case.
std::vector<std::string> DiscoverCases() {
  std::vector<std::string> cases;
  const fs::path root = fs::path(GoldenDir()) / "flux";
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (entry.is_directory() && fs::exists(entry.path() / "io.safetensors") &&
        fs::exists(entry.path() / "transformer")) {
      cases.push_back(entry.path().filename().string());
    }
  }
  std::sort(cases.begin(), cases.end());
  return cases;
}

struct Comparison {
  double max_abs_diff = 0;
  double max_abs_golden = 0;
  bool ok() const { return max_abs_diff <= kRelativeTolerance * max_abs_golden; }
  std::string ToString() const {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "max|ours - golden| = %.3g, tolerance = %.3g (%.3g relative)",
                  max_abs_diff, kRelativeTolerance * max_abs_golden,
                  max_abs_diff / std::max(max_abs_golden, 1e-30));
    return buf;
  }
};

Comparison Compare(const torch::Tensor& ours, const torch::Tensor& golden) {
  const torch::Tensor a = ours.to(torch::kDouble), b = golden.to(torch::kDouble);
  return {(a - b).abs().max().item<double>(), b.abs().max().item<double>()};
}

class FluxGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(FluxGoldenDiscoveryTest, FindsCases) {
  EXPECT_FALSE(DiscoverCases().empty()) << "no cases under " << GoldenDir() << "/flux";
}

TEST_P(FluxGoldenTest, ForwardMatchesDiffusers) {
  const fs::path dir = fs::path(GoldenDir()) / "flux" / GetParam();
  auto folder = OpenModelFolder((dir / "transformer").string());
  ASSERT_TRUE(folder.ok()) << folder.status();
  auto model = FluxTransformer::Create(folder->config, ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  // The module's parameter names are exactly the diffusers state dict's keys.
  const StateDictReport keys = CheckStateDict((*model)->module(), folder->weights);
  ASSERT_TRUE(keys.ok()) << keys.ToString();
  ASSERT_TRUE(LoadStateDict((*model)->module(), folder->weights, folder->dir).ok());

  auto io_file = SafetensorsFile::Open((dir / "io.safetensors").string());
  ASSERT_TRUE(io_file.ok()) << io_file.status();
  auto io = (*io_file)->GetAll();
  ASSERT_TRUE(io.ok()) << io.status();
  TensorMap inputs;
  for (const auto& [name, t] : *io) {
    if (name != "output" && name.rfind(kIntermediatePrefix, 0) != 0) inputs[name] = t;
  }

  Intermediates ours;
  auto out = (*model)->ForwardWithIntermediates(inputs, &ours);
  ASSERT_TRUE(out.ok()) << out.status();
  const torch::Tensor& golden = io->at("output");
  ASSERT_EQ(out->sizes(), golden.sizes());
  const Comparison result = Compare(*out, golden);
  EXPECT_TRUE(result.ok()) << "output: " << result.ToString();
  std::cout << GetParam() << ": output " << result.ToString() << "\n";

  // Intermediates locate a mismatch; these must exist in every case.
  std::vector<std::string> required = {"x_embedder", "context_embedder", "time_text_embed",
                                       "pos_embed.0", "pos_embed.1"};
  const FluxConfig& cfg = (*model)->flux_config();
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    for (const char* part : {".0", ".1"}) {
      required.push_back("transformer_blocks." + std::to_string(i) + part);
    }
  }
  for (int64_t i = 0; i < cfg.num_single_layers; ++i) {
    for (const char* part : {".0", ".1"}) {
      required.push_back("single_transformer_blocks." + std::to_string(i) + part);
    }
  }
  for (const auto& name : required) {
    EXPECT_TRUE(io->count(kIntermediatePrefix + name)) << "golden lacks " << name;
    EXPECT_TRUE(ours.count(name)) << "forward did not capture " << name;
  }
  int compared = 0;
  for (const auto& [key, golden_t] : *io) {
    if (key.rfind(kIntermediatePrefix, 0) != 0) continue;
    const std::string name = key.substr(sizeof(kIntermediatePrefix) - 1);
    auto it = ours.find(name);
    if (it == ours.end()) continue;
    ++compared;
    ASSERT_EQ(it->second.sizes(), golden_t.sizes()) << name;
    const Comparison c = Compare(it->second, golden_t);
    EXPECT_TRUE(c.ok()) << name << ": " << c.ToString();
  }
  EXPECT_GE(compared, static_cast<int>(required.size()));
}

INSTANTIATE_TEST_SUITE_P(Cases, FluxGoldenTest, ::testing::ValuesIn(DiscoverCases()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxGoldenTest);

}  // namespace
}  // namespace ds::flux
