// The Flux spec: self-registration, and metadata rows that agree with the code.
#include "models/flux/spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>

#include "handlers/registry.h"

namespace ds::flux {
namespace {

using ::testing::HasSubstr;

// A tiny config: the metadata facts must not depend on sizes.
nlohmann::json TinyConfig() {
  return {{"in_channels", 4},           {"num_layers", 2},
          {"num_single_layers", 1},     {"attention_head_dim", 8},
          {"num_attention_heads", 2},   {"joint_attention_dim", 12},
          {"pooled_projection_dim", 6}, {"axes_dims_rope", {2, 2, 4}}};
}

// "ds::flux::FluxTransformerBlockImpl" -> "FluxTransformerBlock"
std::string Short(std::string name) {
  if (auto p = name.rfind("::"); p != std::string::npos) name = name.substr(p + 2);
  if (name.size() > 4 && name.substr(name.size() - 4) == "Impl") name.resize(name.size() - 4);
  return name;
}

TEST(FluxSpecTest, RegisteredFromItsOwnFolder) {
  for (std::string_view n : {"flux", "FluxTransformer2DModel", "flux-transformer"}) {
    auto spec = ModelRegistry::Global().Find(n);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ((*spec)->class_name, "FluxTransformer2DModel");
  }
}

TEST(FluxSpecTest, BlockRowsNameTheRealBlockClasses) {
  const ModelSpec spec = MakeFluxSpec();
  auto model = spec.factory(TinyConfig(), ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  std::multiset<std::string> classes;
  for (const auto& item : (*model)->module().named_modules()) {
    classes.insert(Short(item.value()->name()));
  }
  ASSERT_FALSE(spec.structure.repeated_blocks.empty());
  for (const auto& block : spec.structure.repeated_blocks) {
    EXPECT_GT(classes.count(block), 0u) << block << " is not a module class of the model";
  }
  EXPECT_EQ(classes.count(spec.structure.repeated_blocks[0]), 2u);  // num_layers
  EXPECT_EQ(classes.count(spec.structure.repeated_blocks[1]), 1u);  // num_single_layers
  for (const auto& block : spec.structure.no_split_modules) {
    EXPECT_GT(classes.count(block), 0u) << block;
  }
}

TEST(FluxSpecTest, SkipCastingPatternsMatchParameters) {
  // Every declared pattern must select at least one module of the real model, or it says nothing.
  const ModelSpec spec = MakeFluxSpec();
  auto model = spec.factory(TinyConfig(), ModelOptions{});
  ASSERT_TRUE(model.ok());
  for (const auto& pattern : spec.structure.skip_layerwise_casting_patterns) {
    bool found = false;
    for (const auto& item : (*model)->module().named_modules()) {
      found |= item.key().find(pattern) != std::string::npos;
    }
    EXPECT_TRUE(found) << pattern;
  }
}

TEST(FluxSpecTest, MetadataIsDerivedFromTheSpec) {
  const ModelSpec spec = MakeFluxSpec();
  const ModelMetadata meta = BuildModelMetadata(spec);
  EXPECT_EQ(meta.class_name(), "FluxTransformer2DModel");
  EXPECT_EQ(meta.contains("_lora"), spec.lora != nullptr);
  EXPECT_EQ(meta.contains("_weight_mapping"), spec.weight_mapping != nullptr);
  EXPECT_TRUE(meta.contains("_repeated_blocks"));
  EXPECT_TRUE(meta.contains("_no_split_modules"));
  EXPECT_TRUE(meta.contains("_skip_layerwise_casting_patterns"));
  EXPECT_FALSE(meta.contains("_supports_gradient_checkpointing"));
  EXPECT_THAT(meta.Render(), HasSubstr("FluxTransformer2DModel feature attributes"));
}

class OneFormat : public LoraHandler {
 public:
  std::vector<std::string> FormatNames() const override { return {"only-this"}; }
  std::optional<std::string> DetectFormat(const KeyShapes&) const override { return std::nullopt; }
  absl::StatusOr<LoraPlan> PlanConversion(const LoraKeys&, const std::string&) const override {
    return LoraPlan{};
  }
};

TEST(FluxSpecTest, WiringAHandlerChangesTheRow) {
  ModelSpec spec = MakeFluxSpec();
  static const OneFormat handler;
  spec.lora = &handler;
  EXPECT_EQ(BuildModelMetadata(spec).Find("_lora")->display, "only-this");
}

TEST(FluxSpecTest, FactoryRejectsBadConfig) {
  const ModelSpec spec = MakeFluxSpec();
  nlohmann::json bad = TinyConfig();
  bad["num_attention_heads"] = 0;
  auto model = spec.factory(bad, ModelOptions{});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("num_attention_heads"));
}

}  // namespace
}  // namespace ds::flux
