// diffusion-cli end to end: describe prints the registry's metadata; forward reproduces the golden
// outputs through the files users pass it.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct Result {
  int exit_code = -1;
  std::string out;  // stdout and stderr together
};

Result RunCli(const std::string& args) {
  Result r;
  const std::string cmd = std::string(DS_CLI_PATH) + " " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) r.out.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

TEST(CliTest, DescribePrintsTheRegistryMetadata) {
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(spec.ok());
  Result r = RunCli("describe FluxTransformer2DModel --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out, BuildModelMetadata(**spec).Render(false));
  Result v = RunCli("describe flux --verbose --threads 1");
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_EQ(v.out, BuildModelMetadata(**spec).Render(true));
}

TEST(CliTest, DescribeList) {
  Result r = RunCli("describe --list --threads 1");
  EXPECT_EQ(r.exit_code, 0);
  for (const ModelSpec* spec : ModelRegistry::Global().List()) {
    EXPECT_THAT(r.out, HasSubstr(spec->class_name));
  }
}

TEST(CliTest, UnknownModelAndBadUsage) {
  Result r = RunCli("describe NoSuchModel --threads 1");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.out, HasSubstr("NoSuchModel"));
  EXPECT_EQ(RunCli("frobnicate").exit_code, 2);
  Result f = RunCli("forward --inputs x --output y --threads 1");
  EXPECT_EQ(f.exit_code, 1);
  EXPECT_THAT(f.out, HasSubstr("--model"));
  Result bad = RunCli("forward --model /nonexistent/dir --inputs x --output y --threads 1");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("/nonexistent/dir"));
}

TEST(CliTest, ForwardReproducesEveryGoldenCase) {
  const fs::path root = fs::path(GoldenDir()) / "flux";
  ASSERT_TRUE(fs::is_directory(root)) << root;
  TempDir tmp;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path io = entry.path() / "io.safetensors";
    if (!fs::exists(entry.path() / "transformer" / "config.json") || !fs::exists(io)) continue;
    ++cases;
    const std::string out = tmp.path() + "/" + entry.path().filename().string() + ".safetensors";
    Result r = RunCli("forward --model " + (entry.path() / "transformer").string() + " --inputs " +
                      io.string() + " --output " + out + " --repeat 2 --threads 1");
    ASSERT_EQ(r.exit_code, 0) << entry.path() << ": " << r.out;
    EXPECT_THAT(r.out, HasSubstr("median seconds per forward"));
    auto ours = SafetensorsFile::Open(out);
    auto golden = SafetensorsFile::Open(io.string());
    ASSERT_TRUE(ours.ok() && golden.ok());
    torch::Tensor a = *(*ours)->Get("output");
    torch::Tensor b = *(*golden)->Get("output");
    ASSERT_EQ(a.sizes(), b.sizes()) << entry.path();
    const double tol = 1e-4 * b.abs().max().item<double>();
    EXPECT_LE((a - b).abs().max().item<double>(), tol) << entry.path();
  }
  EXPECT_GT(cases, 0);
}

TEST(CliTest, InspectAndConvertSingleFiles) {
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  ASSERT_TRUE(fs::is_directory(root)) << root;
  TempDir tmp;
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    const fs::path original = entry.path() / "original.safetensors";
    if (!fs::exists(original)) continue;
    ++cases;
    auto golden = ReadJsonFile((entry.path() / "config.json").string());
    ASSERT_TRUE(golden.ok());
    const std::string variant = (*golden)["detected_model_type"].get<std::string>();
    Result r = RunCli("inspect " + original.string() + " --json --threads 1");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const nlohmann::json report = nlohmann::json::parse(r.out);
    EXPECT_EQ(report["variant"], variant) << entry.path();
    EXPECT_EQ(report["model_class"], "FluxTransformer2DModel");

    // convert, then run forward on the converted folder against the case's golden output.
    const std::string axes = (*golden)["model_config"]["axes_dims_rope"].dump();
    const std::string out_dir = tmp.File(entry.path().filename().string());
    Result c = RunCli("convert " + original.string() + " " + out_dir +
                      " --config '{\"axes_dims_rope\": " + axes + "}' --threads 1");
    ASSERT_EQ(c.exit_code, 0) << c.out;
    const fs::path io = entry.path() / "io.safetensors";
    if (!fs::exists(io)) continue;
    const std::string out = out_dir + "/out.safetensors";
    Result f = RunCli("forward --model " + out_dir + " --inputs " + io.string() + " --output " +
                      out + " --threads 1");
    ASSERT_EQ(f.exit_code, 0) << f.out;
    auto ours = SafetensorsFile::Open(out);
    auto want = SafetensorsFile::Open(io.string());
    ASSERT_TRUE(ours.ok() && want.ok());
    torch::Tensor a = *(*ours)->Get("output");
    torch::Tensor b = *(*want)->Get("output");
    EXPECT_LE((a - b).abs().max().item<double>(), 1e-4 * b.abs().max().item<double>());
  }
  EXPECT_GT(cases, 0);
  Result bad = RunCli("inspect " + tmp.File("absent.safetensors") + " --threads 1");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("NOT_FOUND"));
}

}  // namespace
}  // namespace ds
