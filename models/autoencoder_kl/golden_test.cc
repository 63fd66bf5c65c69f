// Reproduces diffusers' AutoencoderKL on the fixtures under $DS_GOLDEN_DIR/pipeline/vae/ (see
// ../shared/golden/README.md): every decode case found in io.safetensors (sample and every recorded
// intermediate) and the encode case within 1e-4 × max|golden|, from the diffusers folder and from
// the BFL single file.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "models/autoencoder_kl/autoencoder_kl.h"
#include "testing/test_util.h"

namespace ds::autoencoder_kl {
namespace {

using ::ds::test::GoldenDir;
namespace fs = std::filesystem;

constexpr double kRelativeTolerance = 1e-4;

fs::path VaeDir() { return fs::path(GoldenDir()) / "pipeline" / "vae"; }

std::shared_ptr<const SafetensorsFile> Io() {
  auto f = SafetensorsFile::Open((VaeDir() / "io.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? *f : nullptr;
}

torch::Tensor Get(const SafetensorsFile& f, const std::string& key) {
  auto t = f.Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : torch::Tensor();
}

// The decode cases: every "decode/<case>/z" key.
std::vector<std::string> DecodeCases() {
  std::vector<std::string> out;
  auto io = Io();
  if (io == nullptr) return out;
  for (const std::string& name : io->names()) {
    if (absl::StartsWith(name, "decode/") && absl::EndsWith(name, "/z")) {
      out.push_back(name.substr(7, name.size() - 7 - 2));
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

struct Comparison {
  double max_abs_diff = 0;
  double max_abs_golden = 0;
  double tolerance(double relative) const { return relative * max_abs_golden; }
  std::string ToString() const {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "max|ours - golden| = %.3g (%.3g relative to max|golden|)",
                  max_abs_diff, max_abs_diff / std::max(max_abs_golden, 1e-30));
    return buf;
  }
};

Comparison Compare(const torch::Tensor& ours, const torch::Tensor& golden) {
  const torch::Tensor a = ours.to(torch::kCPU).to(torch::kDouble);
  const torch::Tensor b = golden.to(torch::kDouble);
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return {1e30, 0};
  return {(a - b).abs().max().item<double>(), b.abs().max().item<double>()};
}

std::unique_ptr<AutoencoderKLModel> LoadFolder(torch::Dtype dtype = torch::kFloat32) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = LoadAutoencoderKL((VaeDir() / "vae").string(), options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? *std::move(model) : nullptr;
}

TEST(AutoencoderKLGoldenTest, FindsDecodeCases) {
  EXPECT_FALSE(DecodeCases().empty()) << "no decode/<case>/z in " << VaeDir();
}

class DecodeCaseTest : public ::testing::TestWithParam<std::string> {};

TEST_P(DecodeCaseTest, DecodeAndIntermediatesMatchDiffusers) {
  auto io = Io();
  ASSERT_NE(io, nullptr);
  auto model = LoadFolder();
  ASSERT_NE(model, nullptr);
  const std::string prefix = "decode/" + GetParam() + "/";
  Intermediates captured;
  auto sample = model->Decode(Get(*io, prefix + "z"), &captured);
  ASSERT_TRUE(sample.ok()) << sample.status();
  const Comparison out = Compare(*sample, Get(*io, prefix + "sample"));
  EXPECT_LE(out.max_abs_diff, out.tolerance(kRelativeTolerance)) << "sample: " << out.ToString();
  std::cout << GetParam() << " sample: " << out.ToString() << "\n";
  int intermediates = 0;
  const std::string ip = prefix + "intermediate/";
  for (const std::string& key : io->names()) {
    if (!absl::StartsWith(key, ip)) continue;
    const std::string name = key.substr(ip.size());
    auto it = captured.find(name);
    ASSERT_NE(it, captured.end()) << "intermediate '" << name << "' was not captured";
    const Comparison c = Compare(it->second, Get(*io, key));
    EXPECT_LE(c.max_abs_diff, c.tolerance(kRelativeTolerance)) << name << ": " << c.ToString();
    ++intermediates;
  }
  EXPECT_GT(intermediates, 0);
}

INSTANTIATE_TEST_SUITE_P(Golden, DecodeCaseTest, ::testing::ValuesIn(DecodeCases()),
                         [](const auto& info) { return ds::test::CaseTestName(info.param); });

TEST(AutoencoderKLGoldenTest, EncodeMatchesDiffusers) {
  auto io = Io();
  ASSERT_NE(io, nullptr);
  auto model = LoadFolder();
  ASSERT_NE(model, nullptr);
  auto posterior = model->Encode(Get(*io, "encode/x"));
  ASSERT_TRUE(posterior.ok()) << posterior.status();
  for (const auto& [name, ours] : {std::pair<std::string, torch::Tensor>{"mean", posterior->mean},
                                   {"logvar", posterior->logvar}}) {
    const Comparison c = Compare(ours, Get(*io, "encode/" + name));
    EXPECT_LE(c.max_abs_diff, c.tolerance(kRelativeTolerance)) << name << ": " << c.ToString();
  }
  // forward(sample) = decode(encode(sample).mean), as diffusers' forward without sampling.
  auto forward = model->Forward({{"sample", Get(*io, "encode/x")}});
  ASSERT_TRUE(forward.ok()) << forward.status();
  auto decoded = model->Decode(posterior->mean);
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(torch::equal(*forward, *decoded));
}

// The BFL single file (bare and under each bundling prefix), loaded through the registry's
// single-file machinery with the folder's config for what weights do not record, decodes exactly
// like the diffusers folder.
TEST(AutoencoderKLGoldenTest, BflSingleFileDecodesLikeTheFolder) {
  auto io = Io();
  ASSERT_NE(io, nullptr);
  auto folder_model = LoadFolder();
  ASSERT_NE(folder_model, nullptr);
  auto ae = SafetensorsFile::Open((VaeDir() / "ae.safetensors").string());
  ASSERT_TRUE(ae.ok()) << ae.status();
  auto all = (*ae)->GetAll();
  ASSERT_TRUE(all.ok());
  auto config = ReadJsonFile((VaeDir() / "vae" / "config.json").string());
  ASSERT_TRUE(config.ok());
  ds::test::TempDir tmp;
  const std::string z_key = "decode/" + DecodeCases().front() + "/z";
  auto expected = folder_model->Decode(Get(*io, z_key));
  ASSERT_TRUE(expected.ok());
  for (const std::string prefix : {"", "vae.", "first_stage_model."}) {
    SCOPED_TRACE("prefix '" + prefix + "'");
    std::string path = (VaeDir() / "ae.safetensors").string();
    if (!prefix.empty()) {
      TensorMap renamed;
      for (const auto& [k, t] : *all) renamed[prefix + k] = t;
      path = tmp.File(prefix + "ae.safetensors");
      ASSERT_TRUE(WriteSafetensors(path, renamed).ok());
    }
    SingleFileOptions options;
    options.config_override = *config;
    auto loaded = LoadSingleFile(path, options);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->report.model_class, "AutoencoderKL");
    EXPECT_EQ(loaded->report.variant, "flux-vae");
    EXPECT_EQ(loaded->report.prefix, prefix);
    EXPECT_TRUE(loaded->report.ignored.empty());
    auto* vae = dynamic_cast<AutoencoderKLModel*>(loaded->model.get());
    ASSERT_NE(vae, nullptr);
    auto got = vae->Decode(Get(*io, z_key));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(torch::equal(*got, *expected));
  }
}

// bfloat16 / float16 weights (the same values, rounded) stay close to the float32 reference.
// Tolerances are relative to max|golden| and reflect the formats' precision through ~30 layers.
TEST(AutoencoderKLGoldenTest, LowPrecisionStaysCloseToFloat32) {
  auto io = Io();
  ASSERT_NE(io, nullptr);
  const std::string c = DecodeCases().front();
  const torch::Tensor golden = Get(*io, "decode/" + c + "/sample");
  for (auto [dtype, tolerance] :
       {std::pair<torch::Dtype, double>{torch::kBFloat16, 5e-2}, {torch::kFloat16, 5e-3}}) {
    auto model = LoadFolder(dtype);
    ASSERT_NE(model, nullptr);
    auto out = model->Decode(Get(*io, "decode/" + c + "/z"));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->scalar_type(), dtype);
    const Comparison cmp = Compare(*out, golden);
    EXPECT_LE(cmp.max_abs_diff, cmp.tolerance(tolerance))
        << c10::toString(dtype) << ": " << cmp.ToString();
    std::cout << c10::toString(dtype) << " decode " << c << ": " << cmp.ToString() << "\n";
  }
}

// Not a pass/fail check: prints the decode time of each golden case (for the closing report).
TEST(AutoencoderKLGoldenTest, ReportsDecodeTime) {
  auto io = Io();
  ASSERT_NE(io, nullptr);
  auto model = LoadFolder();
  ASSERT_NE(model, nullptr);
  for (const std::string& c : DecodeCases()) {
    const torch::Tensor z = Get(*io, "decode/" + c + "/z");
    ASSERT_TRUE(model->Decode(z).ok());  // warm-up
    std::vector<double> ms;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(model->Decode(z).ok());
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    std::cout << "decode " << c << " z " << z.sizes() << ": median " << ms[2] << " ms ("
              << at::get_num_threads() << " threads)\n";
  }
}

}  // namespace
}  // namespace ds::autoencoder_kl
