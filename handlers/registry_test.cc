#include "handlers/registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace ds {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using List = std::vector<std::string>;

class FakeLora : public LoraHandler {
 public:
  explicit FakeLora(List formats) : formats_(std::move(formats)) {}
  List FormatNames() const override { return formats_; }
  std::optional<std::string> DetectFormat(const KeyShapes&) const override { return std::nullopt; }
  absl::StatusOr<LoraPlan> PlanConversion(const LoraKeys&, const std::string&) const override {
    return LoraPlan{};
  }

 private:
  List formats_;
};

class FakeMapping : public WeightMappingHandler {
 public:
  explicit FakeMapping(List variants) : variants_(std::move(variants)) {}
  List VariantNames() const override { return variants_; }
  List MarkerKeys() const override { return {}; }
  absl::StatusOr<std::optional<WeightMappingDetection>> Detect(const KeyShapes&) const override {
    return std::nullopt;
  }
  absl::StatusOr<MappingPlan> PlanToDiffusers(const KeyShapes&,
                                              const WeightMappingDetection&) const override {
    return MappingPlan{};
  }
  absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes&) const override {
    return MappingPlan{};
  }

 private:
  List variants_;
};

ModelSpec Spec(std::string name, std::string cls) {
  ModelSpec s;
  s.name = std::move(name);
  s.class_name = std::move(cls);
  s.factory = [](const nlohmann::json&,
                 const ModelOptions&) -> absl::StatusOr<std::unique_ptr<DiffusionModel>> {
    return absl::UnimplementedError("test spec builds nothing");
  };
  return s;
}

TEST(BuildModelMetadataTest, CapabilityRowsFollowTheWiredHandlers) {
  ModelSpec spec = Spec("m", "M");
  spec.structure.repeated_blocks = {"Block"};
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_lora"));
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_weight_mapping"));

  FakeLora lora({"xlabs", "kohya"});
  spec.lora = &lora;
  auto row = BuildModelMetadata(spec).Get("_lora");
  ASSERT_TRUE(row.ok());
  EXPECT_THAT(std::get<List>(*row), ElementsAre("kohya", "xlabs"));  // sorted

  FakeLora other({"bfl"});
  spec.lora = &other;
  EXPECT_EQ(BuildModelMetadata(spec).Find("_lora")->display, "bfl");

  FakeLora none({});
  spec.lora = &none;  // a handler that registers no format shows no row
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_lora"));

  FakeMapping mapping({"v2", "v1"});
  spec.weight_mapping = &mapping;
  EXPECT_EQ(BuildModelMetadata(spec).Find("_weight_mapping")->display, "v1, v2");
}

TEST(BuildModelMetadataTest, StructuralRows) {
  ModelSpec spec = Spec("m", "M");
  spec.structure.no_split_modules = {"B", "A"};
  spec.structure.skip_layerwise_casting_patterns = {"pos_embed", "norm"};
  ModelMetadata m = BuildModelMetadata(spec);
  EXPECT_EQ(m.class_name(), "M");
  EXPECT_EQ(m.Find("_no_split_modules")->display, "B, A");  // declared order kept
  EXPECT_EQ(m.Find("_skip_layerwise_casting_patterns")->display, "pos_embed, norm");
  EXPECT_FALSE(m.contains("_repeated_blocks"));
}

TEST(ModelRegistryTest, RegisterAndFind) {
  ModelRegistry r;
  ModelSpec a = Spec("alpha", "AlphaModel");
  a.aliases = {"a"};
  ASSERT_TRUE(r.Register(std::move(a)).ok());
  ASSERT_TRUE(r.Register(Spec("beta", "BetaModel")).ok());
  for (std::string_view n : {"alpha", "AlphaModel", "a", "ALPHAMODEL"}) {
    auto s = r.Find(n);
    ASSERT_TRUE(s.ok()) << n;
    EXPECT_EQ((*s)->name, "alpha");
  }
  auto missing = r.Find("gamma");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("AlphaModel"));
  auto list = r.List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0]->name, "alpha");
  EXPECT_EQ(list[1]->name, "beta");
}

TEST(ModelRegistryTest, RejectsCollisionsAndIncompleteSpecs) {
  ModelRegistry r;
  ASSERT_TRUE(r.Register(Spec("alpha", "AlphaModel")).ok());
  EXPECT_EQ(r.Register(Spec("Alpha", "Other")).code(), absl::StatusCode::kAlreadyExists);
  ModelSpec alias_clash = Spec("gamma", "GammaModel");
  alias_clash.aliases = {"alphamodel"};
  EXPECT_EQ(r.Register(std::move(alias_clash)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.Register(Spec("", "X")).code(), absl::StatusCode::kInvalidArgument);
  ModelSpec no_factory = Spec("delta", "DeltaModel");
  no_factory.factory = nullptr;
  EXPECT_EQ(r.Register(std::move(no_factory)).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds

namespace ds {
namespace {

TEST(BuildModelMetadataTest, GroupOffloadingRowFromTheWiring) {
  ModelSpec spec;
  spec.name = "m";
  spec.class_name = "M";
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_supports_group_offloading"));
  ModelOptions options;
  EXPECT_TRUE(CheckGroupOffloadingSupported(spec, options).ok());  // not asked for: fine
  options.group_offloading = GroupOffloadingOptions{};
  const absl::Status refused = CheckGroupOffloadingSupported(spec, options);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(std::string(refused.message()).find("M does not support group offloading"),
            std::string::npos)
      << refused;

  spec.group_offloading = true;
  auto row = BuildModelMetadata(spec).Get("_supports_group_offloading");
  ASSERT_TRUE(row.ok());
  EXPECT_TRUE(std::get<bool>(*row));
  EXPECT_TRUE(CheckGroupOffloadingSupported(spec, options).ok());
  options.group_offloading->blocks_per_group = 0;
  EXPECT_EQ(CheckGroupOffloadingSupported(spec, options).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds
