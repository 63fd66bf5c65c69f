#include "handlers/model_metadata.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_split.h"

namespace ds {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using List = std::vector<std::string>;

FeatureRow Row(std::string_view attr, FeatureValue v) {
  auto r = MakeFeatureRow(attr, std::move(v));
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

ModelMetadata Sample() {
  // Given out of catalogue order on purpose.
  return ModelMetadata("FluxTransformer2DModel",
                       {Row("_lora", List{"bfl", "kohya"}),
                        Row("_no_split_modules", List{"FluxTransformerBlock", "FluxSingle"}),
                        Row("_supports_ip_adapter", true), Row("_supports_cache", false),
                        Row("_keep_in_fp32_modules", List{})});
}

TEST(ModelMetadataTest, KeepsTruthyRowsInCatalogOrder) {
  ModelMetadata m = Sample();
  EXPECT_THAT(m.keys(), ElementsAre("_no_split_modules", "_lora", "_supports_ip_adapter"));
  EXPECT_EQ(m.size(), 3u);
  EXPECT_TRUE(m.contains("_lora"));
  EXPECT_FALSE(m.contains("_supports_cache"));        // false flags are not shown
  EXPECT_FALSE(m.contains("_keep_in_fp32_modules"));  // empty lists are not shown
  EXPECT_EQ(m.Find("_nope"), nullptr);
}

TEST(ModelMetadataTest, TypedValuesAndItems) {
  ModelMetadata m = Sample();
  auto lora = m.Get("_lora");
  ASSERT_TRUE(lora.ok());
  EXPECT_THAT(std::get<List>(*lora), ElementsAre("bfl", "kohya"));
  auto ip = m.Get("_supports_ip_adapter");
  ASSERT_TRUE(ip.ok());
  EXPECT_TRUE(std::get<bool>(*ip));
  auto missing = m.Get("_supports_cache");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("FluxTransformer2DModel"));
  auto items = m.items();
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(items[1].first, "_lora");
  EXPECT_EQ(m.values().size(), 3u);
  EXPECT_EQ(m.Find("_lora")->display, "bfl, kohya");
  EXPECT_EQ(m.Find("_supports_ip_adapter")->display, "True");
  EXPECT_THAT(m.Find("_lora")->docs_link,
              HasSubstr("https://huggingface.co/docs/diffusers/main/en"));
}

TEST(ModelMetadataTest, UnknownAttributeIsRejected) {
  auto r = MakeFeatureRow("_made_up", true);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ModelMetadataTest, NoServiceForTrainingOnlyRows) {
  for (const auto& a : FeatureCatalog()) {
    EXPECT_NE(a.attribute, "_supports_gradient_checkpointing");
    EXPECT_NE(a.attribute, "_cp_plan");
  }
}

std::size_t Width(std::string_view s) {
  std::size_t n = 0;
  for (char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

TEST(ModelMetadataTest, RenderTable) {
  ModelMetadata m = Sample();
  std::vector<std::string> lines = absl::StrSplit(m.Render(), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u + m.size());
  EXPECT_EQ(lines[0], "FluxTransformer2DModel feature attributes");
  // Rule: '─' repeated max(title, attr_w + 2 + display_w) times.
  std::size_t attr_w = 0;
  std::size_t display_w = 0;
  for (const FeatureRow& r : m.rows()) {
    attr_w = std::max(attr_w, r.attribute.size());
    display_w = std::max(display_w, r.display.size());
  }
  EXPECT_EQ(attr_w, std::string("_supports_ip_adapter").size());
  EXPECT_EQ(Width(lines[1]), std::max(lines[0].size(), attr_w + 2 + display_w));
  EXPECT_EQ(lines[1].find_first_not_of("─"), std::string::npos);
  // Rows: two-space indent, attribute left-aligned to the widest, two spaces, display.
  for (std::size_t i = 0; i < m.size(); ++i) {
    const FeatureRow& r = m.rows()[i];
    const std::string& line = lines[2 + i];
    EXPECT_EQ(line.substr(0, 2 + r.attribute.size()), "  " + r.attribute);
    EXPECT_EQ(line.substr(2 + attr_w, 2), "  ");
    EXPECT_EQ(line.substr(4 + attr_w), r.display);
  }
}

TEST(ModelMetadataTest, RenderVerboseAddsDescriptionAndLink) {
  ModelMetadata m = Sample();
  std::vector<std::string> lines = absl::StrSplit(m.Render(true), '\n');
  // title, rule, then per row: row, description, link, blank (no blank after the last), trailing
  // "".
  ASSERT_EQ(lines.size(), 2u + 4 * m.size());
  for (std::size_t i = 0; i < m.size(); ++i) {
    const FeatureRow& r = m.rows()[i];
    EXPECT_EQ(lines[2 + 4 * i + 1], "      " + r.description);
    EXPECT_EQ(lines[2 + 4 * i + 2], "      See " + r.docs_link);
  }
}

TEST(ModelMetadataTest, RenderEmpty) {
  ModelMetadata m("Nothing", {Row("_supports_cache", false)});
  EXPECT_EQ(m.Render(), "Nothing: no feature attributes declared");
}

}  // namespace
}  // namespace ds
