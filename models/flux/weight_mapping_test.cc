// The Flux single-file handler against the golden single-file fixtures, on key names and shapes
// only (no tensor data is read here; bitwise conversion is checked in handlers' single_file_test).
#include "models/flux/weight_mapping.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "handlers/safetensors_format.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

KeyShapes HeaderShapes(const fs::path& p) {
  const std::string bytes = ReadFile(p);
  auto header = safetensors::ParseHeader(bytes, bytes.size(), p.string());
  EXPECT_TRUE(header.ok()) << header.status();
  KeyShapes out;
  if (header.ok()) {
    for (const auto& t : header->tensors) out[t.name] = t.shape;
  }
  return out;
}

struct Case {
  std::string name;
  fs::path dir;
};

std::vector<Case> Cases() {
  std::vector<Case> out;
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  if (!fs::is_directory(root)) return out;
  for (const auto& e : fs::directory_iterator(root)) {
    if (fs::exists(e.path() / "original.safetensors")) {
      out.push_back({e.path().filename().string(), e.path()});
    }
  }
  std::sort(out.begin(), out.end(), [](const Case& a, const Case& b) { return a.name < b.name; });
  return out;
}

nlohmann::json Json(const fs::path& p) { return nlohmann::json::parse(ReadFile(p)); }

TEST(FluxWeightMappingTest, GoldenFixturesExist) { EXPECT_GE(Cases().size(), 4u); }

TEST(FluxWeightMappingTest, DetectsEveryGoldenVariantAndDerivesItsConfig) {
  const auto expected = Json(fs::path(GoldenDir()) / "single_file" / "detections.json")["expected"];
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    const nlohmann::json golden = Json(c.dir / "config.json");
    SingleFileKeys split = SplitSingleFileKeys(HeaderShapes(c.dir / "original.safetensors"));
    EXPECT_EQ(split.prefix, golden["key_prefix"].get<std::string>());
    EXPECT_TRUE(split.bundled.empty());
    auto det = FluxWeightMappingHandler().Detect(split.model_keys);
    ASSERT_TRUE(det.ok()) << det.status();
    ASSERT_TRUE(det->has_value());
    const WeightMappingDetection& d = **det;
    EXPECT_FALSE(d.diffusers_naming);
    EXPECT_EQ(d.variant, expected[c.name].get<std::string>());
    // Every config field the weights determine must equal the reference config.
    const nlohmann::json& ref = golden["model_config"];
    for (const auto& [field, value] : ref.items()) {
      if (field == "axes_dims_rope") continue;  // not recorded in weights; listed as assumed
      EXPECT_EQ(d.config[field], value) << field;
    }
    const int64_t out = ref.contains("out_channels") && !ref["out_channels"].is_null()
                            ? ref["out_channels"].get<int64_t>()
                            : ref["in_channels"].get<int64_t>();
    EXPECT_EQ(d.config["out_channels"].get<int64_t>(), out);
    EXPECT_THAT(d.assumed, ::testing::Contains("axes_dims_rope"));
  }
}

TEST(FluxWeightMappingTest, PlanProducesExactlyTheDiffusersKeysAndShapes) {
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    const KeyShapes converted = HeaderShapes(c.dir / "converted.safetensors");
    SingleFileKeys split = SplitSingleFileKeys(HeaderShapes(c.dir / "original.safetensors"));
    auto det = FluxWeightMappingHandler().Detect(split.model_keys);
    ASSERT_TRUE(det.ok() && det->has_value());
    auto plan = FluxWeightMappingHandler().PlanToDiffusers(split.model_keys, **det);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(plan->size(), converted.size());
    for (const auto& [key, recipe] : *plan) {
      auto it = converted.find(key);
      ASSERT_NE(it, converted.end()) << key;
      auto shape = PlannedShape(recipe, split.model_keys);
      ASSERT_TRUE(shape.ok()) << shape.status();
      EXPECT_EQ(*shape, it->second) << key;
    }
  }
}

TEST(FluxWeightMappingTest, ReversePlanRestoresTheOriginalKeysAndShapes) {
  for (const Case& c : Cases()) {
    SCOPED_TRACE(c.name);
    const KeyShapes converted = HeaderShapes(c.dir / "converted.safetensors");
    SingleFileKeys split = SplitSingleFileKeys(HeaderShapes(c.dir / "original.safetensors"));
    auto back = FluxWeightMappingHandler().PlanFromDiffusers(converted);
    ASSERT_TRUE(back.ok()) << back.status();
    ASSERT_EQ(back->size(), split.model_keys.size());
    for (const auto& [key, recipe] : *back) {
      auto it = split.model_keys.find(key);
      ASSERT_NE(it, split.model_keys.end()) << key;
      auto shape = PlannedShape(recipe, converted);
      ASSERT_TRUE(shape.ok()) << shape.status();
      EXPECT_EQ(*shape, it->second) << key;
    }
    // Diffusers-named files are recognised too, and map 1:1.
    auto det = FluxWeightMappingHandler().Detect(converted);
    ASSERT_TRUE(det.ok() && det->has_value());
    EXPECT_TRUE((*det)->diffusers_naming);
  }
}

KeyShapes FirstOriginal() {
  auto cases = Cases();
  if (cases.empty()) return {};
  return SplitSingleFileKeys(HeaderShapes(cases.front().dir / "original.safetensors")).model_keys;
}

TEST(FluxWeightMappingTest, MissingKeyIsNamed) {
  KeyShapes keys = FirstOriginal();
  ASSERT_FALSE(keys.empty());
  keys.erase("double_blocks.0.txt_mlp.2.bias");
  auto det = FluxWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = FluxWeightMappingHandler().PlanToDiffusers(keys, **det);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("double_blocks.0.txt_mlp.2.bias"));
}

TEST(FluxWeightMappingTest, ContradictingShapeIsNamedWithExpectedAndGot) {
  KeyShapes keys = FirstOriginal();
  ASSERT_FALSE(keys.empty());
  auto& qkv = keys["double_blocks.0.img_attn.qkv.weight"];
  qkv[0] += 2;
  auto det = FluxWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = FluxWeightMappingHandler().PlanToDiffusers(keys, **det);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plan.status().message()),
              HasSubstr("double_blocks.0.img_attn.qkv.weight"));
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("expected"));
}

TEST(FluxWeightMappingTest, UnexpectedKeyIsAnError) {
  KeyShapes keys = FirstOriginal();
  ASSERT_FALSE(keys.empty());
  keys["double_blocks.0.mystery.weight"] = {3};
  auto det = FluxWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = FluxWeightMappingHandler().PlanToDiffusers(keys, **det);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(plan.status().message()), HasSubstr("double_blocks.0.mystery.weight"));
}

TEST(FluxWeightMappingTest, ForeignAndUnrelatedFilesAreNotFlux) {
  KeyShapes keys = FirstOriginal();
  keys["single_stream_modulation.lin.weight"] = {6, 3};  // FLUX.2 marker wins
  auto det = FluxWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok());
  EXPECT_FALSE(det->has_value());
  auto none = FluxWeightMappingHandler().Detect({{"encoder.layers.0.weight", {4, 4}}});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST(FluxWeightMappingTest, BundledComponentsAreSetAside) {
  KeyShapes keys;
  for (const auto& [k, s] : FirstOriginal()) keys["model.diffusion_model." + k] = s;
  keys["vae.decoder.conv_in.weight"] = {4, 4, 3, 3};
  keys["text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight"] = {9, 4};
  SingleFileKeys split = SplitSingleFileKeys(keys);
  EXPECT_EQ(split.prefix, "model.diffusion_model.");
  EXPECT_EQ(split.bundled.size(), 2u);
  EXPECT_EQ(split.bundled["vae.decoder.conv_in.weight"], "bundled VAE");
  auto det = FluxWeightMappingHandler().Detect(split.model_keys);
  ASSERT_TRUE(det.ok() && det->has_value());
}

TEST(FluxWeightMappingTest, LayerCountsAndWidthsComeFromTheWeights) {
  // Drop the last double block's keys from a reverse-planned 2-block layout: counts follow.
  KeyShapes keys = FirstOriginal();
  ASSERT_FALSE(keys.empty());
  KeyShapes two = keys;
  for (const auto& [k, s] : keys) {
    if (k.rfind("double_blocks.0.", 0) == 0) two["double_blocks.1." + k.substr(16)] = s;
  }
  auto det = FluxWeightMappingHandler().Detect(two);
  ASSERT_TRUE(det.ok() && det->has_value());
  EXPECT_EQ((*det)->config["num_layers"].get<int>(), 2);
  auto plan = FluxWeightMappingHandler().PlanToDiffusers(two, **det);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->count("transformer_blocks.1.attn.to_q.weight"));
}

}  // namespace
}  // namespace ds::flux
