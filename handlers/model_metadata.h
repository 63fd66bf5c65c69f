// ModelMetadata: the table of a model's feature attributes (the design proposal's metadata()).
//
// Rows are keyed by the diffusers class-attribute names (`_lora`, `_weight_mapping`,
// `_no_split_modules`, ...). Each row has a typed value, the display string, a one-line description
// and a docs link. Rows are never typed by hand for a model: BuildModelMetadata() (registry.h)
// derives them from the model's spec and wired handlers, using the attribute catalogue below for
// the descriptions and links.
//
// Pure (no LibTorch). Immutable after construction; safe to share across threads.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace ds {

// A feature value: a flag, or a list of names (formats, variants, block classes, patterns).
using FeatureValue = std::variant<bool, std::vector<std::string>>;

// "True"/"False" for flags, comma-joined for lists (the design proposal's display format).
std::string DisplayFeatureValue(const FeatureValue& value);
// A value is shown only when truthy: true, or a non-empty list.
bool IsTruthy(const FeatureValue& value);

struct FeatureRow {
  std::string attribute;    // "_lora"
  FeatureValue value;       // {"bfl", "kohya", ...}
  std::string display;      // "bfl, kohya, ..."
  std::string description;  // one line
  std::string docs_link;    // absolute URL, may be empty
};

// Catalogue entry of a known feature attribute.
struct FeatureAttribute {
  std::string_view attribute;
  std::string_view description;
  std::string_view docs_path;  // appended to kDocsBase; empty for none
};

inline constexpr std::string_view kDocsBase = "https://huggingface.co/docs/diffusers/main/en";

// The known attributes, in the order rows are shown.
const std::vector<FeatureAttribute>& FeatureCatalog();

// Builds a row for a catalogued attribute. INVALID_ARGUMENT for an attribute not in the catalogue.
absl::StatusOr<FeatureRow> MakeFeatureRow(std::string_view attribute, FeatureValue value);

class ModelMetadata {
 public:
  // `rows` are kept in catalogue order; rows whose value is not truthy are dropped.
  ModelMetadata(std::string class_name, std::vector<FeatureRow> rows);

  const std::string& class_name() const { return class_name_; }
  const std::vector<FeatureRow>& rows() const { return rows_; }
  std::size_t size() const { return rows_.size(); }

  std::vector<std::string> keys() const;
  std::vector<FeatureValue> values() const;
  std::vector<std::pair<std::string, FeatureValue>> items() const;
  bool contains(std::string_view attribute) const;
  // nullptr when absent.
  const FeatureRow* Find(std::string_view attribute) const;
  // NOT_FOUND naming the attribute and the class when absent.
  absl::StatusOr<FeatureValue> Get(std::string_view attribute) const;

  // The table: a title line "<class> feature attributes", a rule of '─', one aligned line per row.
  // `verbose` adds the description and "See <link>" under each row, with a blank line between rows.
  // With no rows: "<class>: no feature attributes declared".
  std::string Render(bool verbose = false) const;

 private:
  std::string class_name_;
  std::vector<FeatureRow> rows_;
};

}  // namespace ds
