// Single-file loading end to end (handlers/single_file + the Flux handler) on the golden
// single-file fixtures: detection, bitwise conversion, zero copy, forward parity, round trip, and
// bad input.
#include "handlers/single_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

struct Case {
  std::string name;
  fs::path dir;
  nlohmann::json golden;  // config.json of the case
};

std::vector<Case> Cases() {
  std::vector<Case> out;
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    if (!fs::exists(e.path() / "original.safetensors")) continue;
    auto cfg = ReadJsonFile((e.path() / "config.json").string());
    EXPECT_TRUE(cfg.ok());
    out.push_back({e.path().filename().string(), e.path(), cfg.ok() ? *cfg : nlohmann::json()});
  }
  std::sort(out.begin(), out.end(), [](const Case& a, const Case& b) { return a.name < b.name; });
  return out;
}

// RoPE axes are not recorded in weights: pass the reference's, as a user passes a config.
SingleFileOptions OptionsFor(const Case& c) {
  SingleFileOptions o;
  o.config_override = {{"axes_dims_rope", c.golden["model_config"]["axes_dims_rope"]}};
  return o;
}

TensorMap Load(const std::string& path) {
  auto f = SafetensorsFile::Open(path);
  EXPECT_TRUE(f.ok()) << f.status();
  auto all = (*f)->GetAll();
  EXPECT_TRUE(all.ok());
  return *all;
}

void ExpectBitwiseEqual(const TensorMap& a, const TensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : b) {
    auto it = a.find(k);
    ASSERT_NE(it, a.end()) << k;
    EXPECT_TRUE(it->second.sizes() == t.sizes() && torch::equal(it->second, t)) << k;
  }
}

TEST(SingleFileTest, EveryGoldenVariantLoadsBitwiseAndDetectsItsVariant) {
  const auto cases = Cases();
  ASSERT_GE(cases.size(), 4u);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto loaded = LoadSingleFile((c.dir / "original.safetensors").string(), OptionsFor(c));
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    const SingleFileReport& r = loaded->report;
    EXPECT_EQ(r.model_class, "FluxTransformer2DModel");
    EXPECT_EQ(r.variant, c.golden["detected_model_type"].get<std::string>());
    EXPECT_EQ(r.prefix, c.golden["key_prefix"].get<std::string>());
    EXPECT_TRUE(r.ignored.empty());
    ExpectBitwiseEqual(NamedTensors(loaded->model->module()),
                       Load((c.dir / "converted.safetensors").string()));
    // Everything but the two half-swapped final-modulation tensors is a view of the file.
    EXPECT_EQ(r.tensors_zero_copy, r.tensors_mapped - 2);
    EXPECT_GT(r.bytes, 0u);
  }
}

TEST(SingleFileTest, LoadedModelsReproduceTheGoldenForward) {
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    const fs::path io = c.dir / "io.safetensors";
    if (!fs::exists(io)) continue;
    auto loaded = LoadSingleFile((c.dir / "original.safetensors").string(), OptionsFor(c));
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    TensorMap io_tensors = Load(io.string());
    TensorMap inputs;
    for (const auto& n : loaded->model->required_inputs()) inputs[n] = io_tensors.at(n);
    for (const auto& n : loaded->model->optional_inputs()) {
      if (io_tensors.count(n)) inputs[n] = io_tensors.at(n);
    }
    auto out = loaded->model->Forward(inputs);
    ASSERT_TRUE(out.ok()) << out.status();
    const torch::Tensor& golden = io_tensors.at("output");
    EXPECT_LE((*out - golden).abs().max().item<double>(), 1e-4 * golden.abs().max().item<double>());
  }
}

TEST(SingleFileTest, ConvertWritesAFolderThatLoadsAndRoundTripsExactly) {
  TempDir tmp;
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    const std::string out = tmp.File(c.name);
    auto report = ConvertSingleFile((c.dir / "original.safetensors").string(), out, OptionsFor(c));
    ASSERT_TRUE(report.ok()) << report.status();
    ExpectBitwiseEqual(Load(out + "/diffusion_pytorch_model.safetensors"),
                       Load((c.dir / "converted.safetensors").string()));
    auto model = LoadModelFromFolder(out, ModelOptions{});
    ASSERT_TRUE(model.ok()) << model.status();

    // diffusers -> original restores the original tensors bit for bit.
    auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
    ASSERT_TRUE(spec.ok() && (*spec)->weight_mapping != nullptr);
    const TensorMap converted = Load((c.dir / "converted.safetensors").string());
    KeyShapes shapes;
    for (const auto& [k, t] : converted) shapes[k] = t.sizes().vec();
    auto back = (*spec)->weight_mapping->PlanFromDiffusers(shapes);
    ASSERT_TRUE(back.ok()) << back.status();
    auto original = ExecuteMappingPlan(*back, converted);
    ASSERT_TRUE(original.ok());
    TensorMap expected;
    const std::string prefix = c.golden["key_prefix"].get<std::string>();
    for (const auto& [k, t] : Load((c.dir / "original.safetensors").string())) {
      expected[k.substr(prefix.size())] = t;
    }
    ExpectBitwiseEqual(*original, expected);
  }
}

TEST(SingleFileTest, DiffusersNamedSingleFilesLoadToo) {
  const auto cases = Cases();
  ASSERT_FALSE(cases.empty());
  const Case& c = cases.front();
  auto loaded = LoadSingleFile((c.dir / "converted.safetensors").string(), OptionsFor(c));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(loaded->report.diffusers_naming);
  EXPECT_EQ(loaded->report.tensors_zero_copy, loaded->report.tensors_mapped);
}

// Writes `tensors` (with the given key changes) to a new file.
std::string Rewrite(const TempDir& tmp, const std::string& name, TensorMap tensors) {
  const std::string path = tmp.File(name);
  EXPECT_TRUE(WriteSafetensors(path, tensors).ok());
  return path;
}

TensorMap FirstOriginal(const Case& c) {
  const std::string prefix = c.golden["key_prefix"].get<std::string>();
  TensorMap out;
  for (const auto& [k, t] : Load((c.dir / "original.safetensors").string())) {
    out[k.substr(prefix.size())] = t.clone();
  }
  return out;
}

TEST(SingleFileTest, BundledComponentsAreReportedNotLoaded) {
  TempDir tmp;
  const Case c = Cases().front();
  TensorMap t;
  for (auto& [k, v] : FirstOriginal(c)) t["model.diffusion_model." + k] = v;
  t["vae.decoder.conv_in.weight"] = torch::ones({2, 2});
  t["text_encoders.t5xxl.transformer.shared.weight"] = torch::ones({3, 2});
  auto loaded = LoadSingleFile(Rewrite(tmp, "bundled.safetensors", t), OptionsFor(c));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->report.ignored.size(), 2u);
  EXPECT_EQ(loaded->report.ignored.at("vae.decoder.conv_in.weight"), "bundled VAE");
  EXPECT_THAT(loaded->report.ToString(),
              HasSubstr("text_encoders.t5xxl.transformer.shared.weight"));
}

TEST(SingleFileTest, UnknownFormatListsCandidatesAndMarkers) {
  TempDir tmp;
  auto r = LoadSingleFile(Rewrite(tmp, "other.safetensors", {{"encoder.w", torch::ones({2})}}));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("no registered model recognises"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("FluxTransformer2DModel"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("encoder.w"));
}

TEST(SingleFileTest, MissingKeyIsNamed) {
  TempDir tmp;
  const Case c = Cases().front();
  TensorMap t = FirstOriginal(c);
  t.erase("single_blocks.0.linear2.bias");
  auto r = LoadSingleFile(Rewrite(tmp, "missing.safetensors", t), OptionsFor(c));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("single_blocks.0.linear2.bias"));
}

TEST(SingleFileTest, ShapeContradictingTheConfigNamesKeyExpectedAndGot) {
  TempDir tmp;
  const Case c = Cases().front();
  TensorMap t = FirstOriginal(c);
  auto& w = t["double_blocks.0.img_mlp.2.weight"];
  w = torch::zeros({w.size(0), w.size(1) + 1});
  auto r = LoadSingleFile(Rewrite(tmp, "shape.safetensors", t), OptionsFor(c));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr("double_blocks.0.img_mlp.2.weight"));
  EXPECT_THAT(msg, HasSubstr("expected"));
  EXPECT_THAT(msg, HasSubstr("got"));
}

TEST(SingleFileTest, NonFiniteWeightsAreRejectedOnRequest) {
  TempDir tmp;
  const Case c = Cases().front();
  TensorMap t = FirstOriginal(c);
  t["txt_in.weight"][0][0] = std::nan("");
  const std::string path = Rewrite(tmp, "nan.safetensors", t);
  SingleFileOptions o = OptionsFor(c);
  EXPECT_TRUE(LoadSingleFile(path, o).ok());  // not asked to validate
  o.validate_finite = true;
  auto r = LoadSingleFile(path, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("txt_in.weight"));
}

TEST(SingleFileTest, CorruptAndTruncatedFiles) {
  TempDir tmp;
  const Case c = Cases().front();
  const std::string good = Rewrite(tmp, "good.safetensors", FirstOriginal(c));
  std::string bytes;
  {
    std::ifstream in(good, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const std::string truncated = tmp.File("truncated.safetensors");
  std::ofstream(truncated, std::ios::binary).write(bytes.data(), bytes.size() / 2);
  auto r = LoadSingleFile(truncated, OptionsFor(c));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("truncated.safetensors"));

  std::string corrupt = bytes;
  corrupt[10] = '\x01';  // inside the JSON header
  const std::string corrupt_path = tmp.File("corrupt.safetensors");
  std::ofstream(corrupt_path, std::ios::binary).write(corrupt.data(), corrupt.size());
  EXPECT_EQ(LoadSingleFile(corrupt_path, OptionsFor(c)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadSingleFile(tmp.File("absent.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ds
