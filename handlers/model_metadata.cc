#include "handlers/model_metadata.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ds {
namespace {

// Number of Unicode code points in a UTF-8 string (for column alignment).
std::size_t Utf8Width(std::string_view s) {
  return static_cast<std::size_t>(
      std::count_if(s.begin(), s.end(), [](char c) { return (c & 0xC0) != 0x80; }));
}

std::size_t CatalogIndex(std::string_view attribute) {
  const auto& catalog = FeatureCatalog();
  for (std::size_t i = 0; i < catalog.size(); ++i) {
    if (catalog[i].attribute == attribute) return i;
  }
  return catalog.size();
}

}  // namespace

std::string DisplayFeatureValue(const FeatureValue& value) {
  if (const bool* b = std::get_if<bool>(&value)) return *b ? "True" : "False";
  return absl::StrJoin(std::get<std::vector<std::string>>(value), ", ");
}

bool IsTruthy(const FeatureValue& value) {
  if (const bool* b = std::get_if<bool>(&value)) return *b;
  return !std::get<std::vector<std::string>>(value).empty();
}

const std::vector<FeatureAttribute>& FeatureCatalog() {
  // Descriptions and docs paths follow diffusers' ModelMetadata (design proposal). Training-only
  // and multi-GPU rows (gradient checkpointing, context parallelism) are deliberately absent: this
  // service does not offer them.
  static const std::vector<FeatureAttribute> kCatalog = {
      {"_supports_group_offloading",
       "Stage parameter groups on CPU/disk and stream them to the accelerator for inference.",
       "/optimization/memory#group-offloading"},
      {"_no_split_modules",
       "Block class names that must stay on a single device under `device_map='auto'` sharding.",
       "/training/distributed_inference#device-map"},
      {"_keep_in_fp32_modules",
       "Submodule name patterns that remain in fp32 even when the model is cast to fp16/bf16.",
       "/optimization/fp16#mixed-precision"},
      {"_skip_layerwise_casting_patterns",
       "Parameter name substrings excluded from layerwise dtype casting (embeddings, norms, ...).",
       "/optimization/memory#layerwise-casting"},
      {"_repeated_blocks",
       "Block class names safe to `torch.compile` once and reuse — enables "
       "`compile_repeated_blocks`.",
       "/optimization/torch2.0"},
      {"_weight_mapping",
       "Auto-resolvable configs for `from_single_file(path)` (no `config=` argument required).",
       "/api/loaders/single_file"},
      {"_lora", "Foreign LoRA formats this model converts to diffusers naming on load.",
       "/training/lora"},
      {"_supports_cache",
       "Supports caching techniques (PAB / FasterCache / FirstBlockCache) via `enable_cache`.",
       "/optimization/cache"},
      {"_supports_ip_adapter", "Supports loading IP-Adapter weights (image-conditioning adapters).",
       "/using-diffusers/ip_adapter"},
  };
  return kCatalog;
}

absl::StatusOr<FeatureRow> MakeFeatureRow(std::string_view attribute, FeatureValue value) {
  const std::size_t i = CatalogIndex(attribute);
  if (i == FeatureCatalog().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown feature attribute '", std::string(attribute), "'"));
  }
  const FeatureAttribute& a = FeatureCatalog()[i];
  FeatureRow row;
  row.attribute = std::string(a.attribute);
  row.display = DisplayFeatureValue(value);
  row.value = std::move(value);
  row.description = std::string(a.description);
  row.docs_link = a.docs_path.empty() ? "" : std::string(kDocsBase) + std::string(a.docs_path);
  return row;
}

ModelMetadata::ModelMetadata(std::string class_name, std::vector<FeatureRow> rows)
    : class_name_(std::move(class_name)) {
  for (auto& row : rows) {
    if (IsTruthy(row.value)) rows_.push_back(std::move(row));
  }
  std::stable_sort(rows_.begin(), rows_.end(), [](const FeatureRow& a, const FeatureRow& b) {
    return CatalogIndex(a.attribute) < CatalogIndex(b.attribute);
  });
}

std::vector<std::string> ModelMetadata::keys() const {
  std::vector<std::string> out;
  for (const auto& r : rows_) out.push_back(r.attribute);
  return out;
}

std::vector<FeatureValue> ModelMetadata::values() const {
  std::vector<FeatureValue> out;
  for (const auto& r : rows_) out.push_back(r.value);
  return out;
}

std::vector<std::pair<std::string, FeatureValue>> ModelMetadata::items() const {
  std::vector<std::pair<std::string, FeatureValue>> out;
  for (const auto& r : rows_) out.emplace_back(r.attribute, r.value);
  return out;
}

bool ModelMetadata::contains(std::string_view attribute) const {
  return Find(attribute) != nullptr;
}

const FeatureRow* ModelMetadata::Find(std::string_view attribute) const {
  for (const auto& r : rows_) {
    if (r.attribute == attribute) return &r;
  }
  return nullptr;
}

absl::StatusOr<FeatureValue> ModelMetadata::Get(std::string_view attribute) const {
  if (const FeatureRow* r = Find(attribute)) return r->value;
  return absl::NotFoundError(
      absl::StrCat(class_name_, " has no feature attribute '", std::string(attribute), "'"));
}

std::string ModelMetadata::Render(bool verbose) const {
  if (rows_.empty()) return absl::StrCat(class_name_, ": no feature attributes declared");
  const std::string title = absl::StrCat(class_name_, " feature attributes");
  std::size_t attr_w = 0;
  std::size_t display_w = 0;
  for (const auto& r : rows_) {
    attr_w = std::max(attr_w, Utf8Width(r.attribute));
    display_w = std::max(display_w, Utf8Width(r.display));
  }
  const std::size_t rule_w = std::max(Utf8Width(title), attr_w + 2 + display_w);
  std::string out = absl::StrCat(title, "\n");
  for (std::size_t i = 0; i < rule_w; ++i) out += "─";
  out += "\n";
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    const FeatureRow& r = rows_[i];
    absl::StrAppend(&out, "  ", r.attribute, std::string(attr_w - Utf8Width(r.attribute), ' '),
                    "  ", r.display, "\n");
    if (verbose) {
      if (!r.description.empty()) absl::StrAppend(&out, "      ", r.description, "\n");
      if (!r.docs_link.empty()) absl::StrAppend(&out, "      See ", r.docs_link, "\n");
      if (i + 1 < rows_.size()) out += "\n";
    }
  }
  return out;
}

}  // namespace ds
