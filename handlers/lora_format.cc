#include "handlers/lora_format.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <regex>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "handlers/digest.h"
#include "handlers/status.h"
#include "handlers/tensor_checks.h"

namespace ds {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kMaxListedProblems = 40;
constexpr int kSampleKeys = 6;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string ShapeString(const torch::Tensor& t) {
  if (!t.defined()) return "(none)";
  return ShapeString(t.sizes().vec());
}

std::string FormatDouble(double v) { return absl::StrFormat("%g", v); }

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// Python's str.replace: every non-overlapping occurrence, left to right.
void ReplaceAll(std::string& s, const std::string& from, const std::string& to) {
  std::size_t pos = 0;
  while ((pos = s.find(from, pos)) != std::string::npos) {
    s.replace(pos, from.size(), to);
    pos += to.size();
  }
}

// Joins lines, at most kMaxListedProblems of them.
std::string JoinLimited(const std::vector<std::string>& lines) {
  std::vector<std::string> shown(
      lines.begin(), lines.begin() + std::min<std::size_t>(lines.size(), kMaxListedProblems));
  std::string out = absl::StrJoin(shown, "\n  ");
  if (lines.size() > shown.size()) {
    absl::StrAppend(&out, "\n  ... and ", lines.size() - shown.size(), " more");
  }
  return out;
}

std::string FileKey(const LoraKeys& keys, const std::string& normalized) {
  auto it = keys.source.find(normalized);
  return it == keys.source.end() ? normalized : it->second;
}

std::string LoraName(const std::string& path) {
  return path.empty() ? std::string("LoRA") : absl::StrCat("LoRA '", path, "'");
}

// ---------------------------------------------------------------------------------------------
// PEFT LoraConfig, as far as scaling goes.

struct PeftPattern {
  std::string pattern;
  std::regex regex;
  double value = 0;
};

struct PeftConfig {
  int64_t r = 8;  // PEFT's LoraConfig defaults
  double lora_alpha = 8;
  bool use_rslora = false;
  std::vector<PeftPattern> rank_pattern;
  std::vector<PeftPattern> alpha_pattern;
};

bool IsLoraConfigField(const std::string& name) {
  static const std::set<std::string>* kFields = new std::set<std::string>{
      "r",          "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
      "use_rslora", "use_dora",   "lora_bias"};
  return kFields->count(name) > 0;
}

absl::StatusOr<std::vector<PeftPattern>> ParsePatterns(const nlohmann::ordered_json& j,
                                                       const std::string& field,
                                                       bool integer_values) {
  std::vector<PeftPattern> out;
  if (j.is_null()) return out;
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kLoraAdapterMetadataKey, ": '", field, "' must be an object"));
  }
  for (const auto& [pattern, value] : j.items()) {
    if (!value.is_number() || (integer_values && !value.is_number_integer())) {
      return absl::InvalidArgumentError(absl::StrCat(kLoraAdapterMetadataKey, ": '", field,
                                                     "' entry '", pattern, "' must be ",
                                                     integer_values ? "an integer" : "a number"));
    }
    PeftPattern p;
    p.pattern = pattern;
    p.value = value.get<double>();
    try {
      // PEFT's get_pattern_key: re.match(rf"(.*\.)?({pattern})$", module).
      p.regex = std::regex(absl::StrCat("(.*\\.)?(", pattern, ")"), std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(absl::StrCat(kLoraAdapterMetadataKey, ": '", field,
                                                     "' pattern '", pattern,
                                                     "' is not a valid regular expression"));
    }
    out.push_back(std::move(p));
  }
  return out;
}

const PeftPattern* MatchPattern(const std::vector<PeftPattern>& patterns,
                                const std::string& module) {
  for (const PeftPattern& p : patterns) {
    if (std::regex_match(module, p.regex)) return &p;
  }
  return nullptr;
}

// The LoraConfig fields for the model under `prefix` (see PlanPeftLora); nullopt when the
// metadata holds none.
absl::StatusOr<std::optional<PeftConfig>> ParsePeftConfig(const nlohmann::ordered_json& metadata,
                                                          const std::string& prefix) {
  if (metadata.is_null()) return std::nullopt;
  nlohmann::ordered_json fields = nlohmann::ordered_json::object();
  if (!prefix.empty()) {
    for (const auto& [k, v] : metadata.items()) {
      if (StartsWith(k, prefix)) fields[k.substr(prefix.size())] = v;
    }
  }
  if (fields.empty()) {
    for (const auto& [k, v] : metadata.items()) {
      if (IsLoraConfigField(k)) fields[k] = v;
    }
  }
  if (fields.empty()) return std::nullopt;

  PeftConfig config;
  if (fields.contains("use_dora") && fields["use_dora"].is_boolean() &&
      fields["use_dora"].get<bool>()) {
    return absl::UnimplementedError(absl::StrCat(
        kLoraAdapterMetadataKey, " declares use_dora: DoRA adapters are not supported"));
  }
  if (fields.contains("r")) {
    const auto& r = fields["r"];
    if (!r.is_number_integer() || r.get<int64_t>() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          kLoraAdapterMetadataKey, ": 'r' must be a positive integer, got ", r.dump()));
    }
    config.r = r.get<int64_t>();
  }
  if (fields.contains("lora_alpha")) {
    const auto& a = fields["lora_alpha"];
    if (!a.is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kLoraAdapterMetadataKey, ": 'lora_alpha' must be a number, got ", a.dump()));
    }
    config.lora_alpha = a.get<double>();
  }
  if (fields.contains("use_rslora")) {
    if (!fields["use_rslora"].is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kLoraAdapterMetadataKey, ": 'use_rslora' must be a boolean"));
    }
    config.use_rslora = fields["use_rslora"].get<bool>();
  }
  ASSIGN_OR_RETURN(config.rank_pattern,
                   ParsePatterns(fields.value("rank_pattern", nlohmann::ordered_json()),
                                 "rank_pattern", /*integer_values=*/true));
  ASSIGN_OR_RETURN(config.alpha_pattern,
                   ParsePatterns(fields.value("alpha_pattern", nlohmann::ordered_json()),
                                 "alpha_pattern", /*integer_values=*/false));
  return config;
}

int64_t RankOf(const KeyShapes& shapes, const std::string& key) {
  auto it = shapes.find(key);
  if (it == shapes.end() || it->second.empty()) return 0;
  return it->second[0];
}

std::string UnusedReason(const std::string& key) {
  if (absl::StrContains(key, "lora_magnitude_vector") || absl::StrContains(key, "dora_scale")) {
    return "DoRA magnitude (DoRA is not supported)";
  }
  if (absl::StrContains(key, "lora_embedding_"))
    return "LoRA of an embedding layer (not supported)";
  return "not a LoRA tensor (no lora_A / lora_B / alpha suffix)";
}

// ---------------------------------------------------------------------------------------------
// Plan execution.

absl::StatusOr<torch::Tensor> TensorFor(const LoraKeys& keys, const TensorMap& tensors,
                                        const std::string& key) {
  const std::string file_key = FileKey(keys, key);
  auto it = tensors.find(file_key);
  if (it == tensors.end() || !it->second.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the plan uses '", file_key, "', which the LoRA does not contain"));
  }
  return it->second;
}

absl::StatusOr<torch::Tensor> ApplySlice(const LoraSlice& slice, const torch::Tensor& t,
                                         const std::string& file_key) {
  const bool rows = slice.row_begin != 0 || slice.row_count != -1 || slice.swap_row_halves;
  const bool cols = slice.col_begin != 0 || slice.col_count != -1;
  if ((rows && t.dim() < 1) || (cols && t.dim() != 2)) {
    return absl::InvalidArgumentError(absl::StrCat("cannot slice '", file_key, "' of shape ",
                                                   ShapeString(t), " as the format requires"));
  }
  auto narrow = [&](const torch::Tensor& x, int64_t dim, int64_t begin,
                    int64_t count) -> absl::StatusOr<torch::Tensor> {
    const int64_t size = x.size(dim);
    const int64_t n = count < 0 ? size - begin : count;
    if (begin < 0 || n < 0 || begin + n > size) {
      return absl::InvalidArgumentError(absl::StrCat("'", file_key, "' of shape ", ShapeString(t),
                                                     " has no ", dim == 0 ? "rows " : "columns ",
                                                     begin, "..", begin + n - 1));
    }
    return n == size ? x : x.narrow(dim, begin, n);
  };
  torch::Tensor out = t;
  if (rows) {
    ASSIGN_OR_RETURN(out, narrow(out, 0, slice.row_begin, slice.row_count));
  }
  if (cols) {
    ASSIGN_OR_RETURN(out, narrow(out, 1, slice.col_begin, slice.col_count));
  }
  if (slice.swap_row_halves) {
    if (out.size(0) % 2 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot swap the halves of '", file_key,
                                                     "': it has an odd number of rows (",
                                                     out.size(0), ")"));
    }
    const int64_t half = out.size(0) / 2;
    ASSIGN_OR_RETURN(out, TorchCall(absl::StrCat("swapping the halves of ", file_key), [&] {
                       return torch::cat({out.narrow(0, half, half), out.narrow(0, 0, half)}, 0);
                     }));
  }
  return out;
}

// Resolved [begin, count) of a row slice over `size` rows.
std::pair<int64_t, int64_t> RowRange(const LoraSlice& s, int64_t size) {
  return {s.row_begin, s.row_count < 0 ? size - s.row_begin : s.row_count};
}

// Rewrites the members of fused groups whose B is block-diagonal into the rank-split form.
absl::Status UseBlockDiagonalSplits(const LoraKeys& keys, const TensorMap& tensors,
                                    std::vector<LoraModulePlan>& modules) {
  std::map<std::string, std::vector<LoraModulePlan*>> groups;
  for (LoraModulePlan& m : modules) {
    if (m.fused_count >= 2) groups[m.up.key].push_back(&m);
  }
  for (auto& [up_key, members] : groups) {
    const int n = members.front()->fused_count;
    std::vector<LoraModulePlan*> by_index(n, nullptr);
    bool complete = static_cast<int>(members.size()) == n;
    for (LoraModulePlan* m : members) {
      complete = complete && m->fused_count == n && m->fused_index >= 0 && m->fused_index < n &&
                 by_index[m->fused_index] == nullptr && m->down.key == members.front()->down.key &&
                 m->down.row_begin == 0 && m->down.row_count == -1 && m->up.col_begin == 0 &&
                 m->up.col_count == -1 && !m->up.swap_row_halves;
      if (complete) by_index[m->fused_index] = m;
    }
    if (!complete) continue;
    ASSIGN_OR_RETURN(torch::Tensor down, TensorFor(keys, tensors, members.front()->down.key));
    ASSIGN_OR_RETURN(torch::Tensor up, TensorFor(keys, tensors, up_key));
    if (down.dim() != 2 || up.dim() != 2 || up.size(1) != down.size(0)) continue;
    const int64_t rank = down.size(0);
    if (rank == 0 || rank % n != 0) continue;
    const int64_t part = rank / n;
    bool block_diagonal = true;
    for (int j = 0; j < n && block_diagonal; ++j) {
      auto [begin, count] = RowRange(by_index[j]->up, up.size(0));
      if (begin < 0 || count < 0 || begin + count > up.size(0)) {
        block_diagonal = false;
        break;
      }
      // Exact: every nonzero of these rows lies in the diagonal block.
      ASSIGN_OR_RETURN(bool diagonal, TorchCall("checking for a block-diagonal lora_B", [&, begin = begin, count = count] {
                         torch::Tensor r = up.narrow(0, begin, count);
                         return torch::count_nonzero(r).item<int64_t>() ==
                                torch::count_nonzero(r.narrow(1, j * part, part)).item<int64_t>();
                       }));
      block_diagonal = diagonal;
    }
    if (!block_diagonal) continue;
    for (int j = 0; j < n; ++j) {
      LoraModulePlan& m = *by_index[j];
      m.down.row_begin = j * part;
      m.down.row_count = part;
      m.up.col_begin = j * part;
      m.up.col_count = part;
      if (m.down_bias.present()) {
        m.down_bias.row_begin = j * part;
        m.down_bias.row_count = part;
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraModule> ExecuteModule(const LoraModulePlan& plan, const LoraKeys& keys,
                                         const TensorMap& tensors) {
  LoraModule m;
  m.module = plan.module;
  m.scale = plan.scale;
  m.alpha = plan.alpha;
  m.source_rank = plan.source_rank;
  m.input_expandable = plan.input_expandable;
  auto load = [&](const LoraSlice& slice) -> absl::StatusOr<torch::Tensor> {
    ASSIGN_OR_RETURN(torch::Tensor t, TensorFor(keys, tensors, slice.key));
    m.sources.push_back(FileKey(keys, slice.key));
    return ApplySlice(slice, t, FileKey(keys, slice.key));
  };
  if (!plan.down.present() || !plan.up.present()) {
    return absl::InvalidArgumentError(
        absl::StrCat("module ", plan.module, ": the plan names no lora_A or no lora_B"));
  }
  ASSIGN_OR_RETURN(m.down, load(plan.down));
  ASSIGN_OR_RETURN(m.up, load(plan.up));
  if (plan.up_bias.present()) {
    ASSIGN_OR_RETURN(m.bias, load(plan.up_bias));
  }
  if (plan.down_bias.present()) {
    ASSIGN_OR_RETURN(torch::Tensor a_bias, load(plan.down_bias));
    // B (A x + a) + b = B A x + (B a + b): the lora_A bias becomes part of the lora_B bias.
    ASSIGN_OR_RETURN(m.bias,
                     TorchCall(
                         absl::StrCat("module ", plan.module, ": folding lora_A bias ",
                                      FileKey(keys, plan.down_bias.key), " ", ShapeString(a_bias),
                                      " through lora_B ", ShapeString(m.up)),
                         [&] {
                           torch::Tensor folded =
                               torch::mv(m.up.to(torch::kFloat32), a_bias.to(torch::kFloat32));
                           if (m.bias.defined()) folded = folded + m.bias.to(torch::kFloat32);
                           return folded.to(m.up.scalar_type());
                         },
                         absl::StatusCode::kInvalidArgument));
  }
  if (!plan.alpha_key.empty()) m.sources.push_back(FileKey(keys, plan.alpha_key));
  return m;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string NormalizeLoraSuffix(std::string key) {
  static const std::pair<const char*, const char*> kRules[] = {
      {".lora_down.weight", ".lora_A.weight"},
      {".lora_up.weight", ".lora_B.weight"},
      {".down.weight", ".lora_A.weight"},
      {".up.weight", ".lora_B.weight"},
  };
  for (const auto& [from, to] : kRules) ReplaceAll(key, from, to);
  return key;
}

absl::StatusOr<LoraKeys> MakeLoraKeys(const TensorMap& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  LoraKeys out;
  for (const auto& [key, tensor] : tensors) {
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("LoRA tensor '", key, "' is undefined"));
    }
    std::string normalized = NormalizeLoraSuffix(key);
    if (auto it = out.source.find(normalized); it != out.source.end()) {
      return absl::InvalidArgumentError(absl::StrCat("LoRA keys '", it->second, "' and '", key,
                                                     "' both mean '", normalized, "'"));
    }
    out.source[normalized] = key;
    out.shapes[normalized] = tensor.sizes().vec();
    if (tensor.numel() == 1) {
      ASSIGN_OR_RETURN(out.scalars[normalized], TorchCall(absl::StrCat("reading ", key), [&tensor = tensor] {
                         return tensor.to(torch::kFloat64).item<double>();
                       }));
    }
  }
  if (auto it = metadata.find(kLoraAdapterMetadataKey); it != metadata.end()) {
    out.adapter_metadata =
        nlohmann::ordered_json::parse(it->second, nullptr, /*allow_exceptions=*/false);
    if (out.adapter_metadata.is_discarded() || !out.adapter_metadata.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors metadata '", kLoraAdapterMetadataKey, "' is not a JSON object"));
    }
  }
  return out;
}

LoraKeyGroups GroupLoraKeys(const KeyShapes& keys, const std::string& prefix) {
  static const std::pair<const char*, std::string LoraKeyGroup::*> kSuffixes[] = {
      {".lora_A.weight", &LoraKeyGroup::down},    {".lora_B.weight", &LoraKeyGroup::up},
      {".lora_A.bias", &LoraKeyGroup::down_bias}, {".lora_B.bias", &LoraKeyGroup::up_bias},
      {".alpha", &LoraKeyGroup::alpha},
  };
  LoraKeyGroups out;
  std::map<std::string, LoraKeyGroup> all;
  for (const auto& [key, shape] : keys) {
    if (!StartsWith(key, prefix)) {
      out.outside.push_back(key);
      continue;
    }
    const std::string rest = key.substr(prefix.size());
    bool grouped = false;
    for (const auto& [suffix, field] : kSuffixes) {
      if (absl::EndsWith(rest, suffix) && rest.size() > std::strlen(suffix)) {
        all[rest.substr(0, rest.size() - std::strlen(suffix))].*field = key;
        grouped = true;
        break;
      }
    }
    if (!grouped) out.other.push_back(key);
  }
  for (auto& [stub, g] : all) {
    if (!g.down.empty() && !g.up.empty()) {
      out.groups[stub] = g;
      continue;
    }
    const std::string missing = g.down.empty() && g.up.empty() ? "lora_A and lora_B"
                                : g.down.empty()               ? "lora_A"
                                                               : "lora_B";
    for (const std::string* k : {&g.down, &g.up, &g.down_bias, &g.up_bias, &g.alpha}) {
      if (!k->empty()) out.incomplete[*k] = absl::StrCat("module '", stub, "' has no ", missing);
    }
  }
  return out;
}

absl::StatusOr<LoraPlan> PlanPeftLora(const LoraKeys& keys, const std::string& prefix) {
  return PlanPeftLora(keys, prefix, prefix);
}

absl::StatusOr<LoraPlan> PlanPeftLora(const LoraKeys& keys, const std::string& prefix,
                                      const std::string& metadata_prefix) {
  LoraPlan plan;
  ASSIGN_OR_RETURN(std::optional<PeftConfig> config,
                   ParsePeftConfig(keys.adapter_metadata, metadata_prefix));
  const LoraKeyGroups grouped = GroupLoraKeys(keys.shapes, prefix);
  for (const std::string& key : grouped.outside) {
    plan.unused[key] = StartsWith(key, "text_encoder")
                           ? "text-encoder LoRA weights (not part of this model)"
                           : absl::StrCat("outside the '", prefix, "' prefix of this model's keys");
  }
  for (const std::string& key : grouped.other) plan.unused[key] = UnusedReason(key);
  for (const auto& [key, reason] : grouped.incomplete) plan.unused[key] = reason;

  for (const auto& [module, g] : grouped.groups) {
    LoraModulePlan m;
    m.module = module;
    m.down.key = g.down;
    m.up.key = g.up;
    m.up_bias.key = g.up_bias;
    m.down_bias.key = g.down_bias;
    m.alpha_key = g.alpha;
    const int64_t rank = RankOf(keys.shapes, g.down);
    m.source_rank = rank;
    std::optional<double> alpha_value;
    if (!g.alpha.empty()) {
      auto it = keys.scalars.find(g.alpha);
      if (it == keys.scalars.end()) {
        return absl::InvalidArgumentError(absl::StrCat("'", FileKey(keys, g.alpha),
                                                       "' must hold one number, has shape ",
                                                       ShapeString(keys.shapes.at(g.alpha))));
      }
      alpha_value = it->second;
    }
    if (config.has_value()) {
      const PeftPattern* rp = MatchPattern(config->rank_pattern, module);
      const int64_t r = rp != nullptr ? static_cast<int64_t>(rp->value) : config->r;
      const PeftPattern* ap = MatchPattern(config->alpha_pattern, module);
      const double alpha = ap != nullptr ? ap->value : config->lora_alpha;
      if (r != rank) {
        return absl::InvalidArgumentError(absl::StrCat(
            kLoraAdapterMetadataKey, " gives module ", module, " rank ", r,
            rp != nullptr ? absl::StrCat(" (rank_pattern '", rp->pattern, "')") : std::string(),
            ", but '", FileKey(keys, g.down), "' has shape ", ShapeString(keys.shapes.at(g.down))));
      }
      if (alpha_value.has_value() &&
          std::abs(*alpha_value - alpha) > 1e-6 * std::max(1.0, std::abs(alpha))) {
        return absl::InvalidArgumentError(
            absl::StrCat("'", FileKey(keys, g.alpha), "' = ", FormatDouble(*alpha_value),
                         " contradicts ", kLoraAdapterMetadataKey, ", which gives module ", module,
                         " lora_alpha ", FormatDouble(alpha)));
      }
      m.alpha = alpha;
      m.scale = r > 0 ? alpha / (config->use_rslora ? std::sqrt(static_cast<double>(r))
                                                    : static_cast<double>(r))
                      : 0.0;
    } else {
      m.alpha = alpha_value.value_or(static_cast<double>(rank));
      m.scale = rank > 0 ? m.alpha / static_cast<double>(rank) : 0.0;
    }
    plan.modules.push_back(std::move(m));
  }
  return plan;
}

absl::StatusOr<LoraPlan> PlanLoraConversion(const LoraHandler& handler, const LoraKeys& keys) {
  if (keys.shapes.empty()) return absl::InvalidArgumentError("the LoRA holds no tensors");
  std::optional<std::string> format = handler.DetectFormat(keys.shapes);
  if (!format.has_value()) {
    std::vector<std::string> formats = handler.FormatNames();
    std::sort(formats.begin(), formats.end());
    formats.push_back(kDiffusersLoraFormat);
    std::vector<std::string> samples;
    for (const auto& [normalized, file_key] : keys.source) {
      if (static_cast<int>(samples.size()) == kSampleKeys) break;
      samples.push_back(absl::StrCat("'", file_key, "'"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unknown LoRA format: no key matches a format this model converts (",
                     absl::StrJoin(formats, ", "), "); sample keys (", samples.size(), " of ",
                     keys.source.size(), "): ", absl::StrJoin(samples, ", ")));
  }
  ASSIGN_OR_RETURN(LoraPlan plan, handler.PlanConversion(keys, *format));
  plan.format = *format;

  std::set<std::string> referenced;
  auto reference = [&](const std::string& key) -> absl::Status {
    if (key.empty()) return absl::OkStatus();
    if (keys.shapes.count(key) == 0 || plan.unused.count(key) > 0) {
      return absl::InternalError(absl::StrCat("the ", *format, " plan uses key '", key,
                                              "', which is absent or also listed as unused"));
    }
    referenced.insert(key);
    return absl::OkStatus();
  };
  for (const LoraModulePlan& m : plan.modules) {
    for (const std::string* k :
         {&m.down.key, &m.up.key, &m.up_bias.key, &m.down_bias.key, &m.alpha_key}) {
      RETURN_IF_ERROR(reference(*k));
    }
  }
  for (const LoraOverlayPlan& o : plan.overlays) RETURN_IF_ERROR(reference(o.key));
  for (const auto& [key, shape] : keys.shapes) {
    if (referenced.count(key) == 0 && plan.unused.count(key) == 0) {
      plan.unused[key] = absl::StrCat("not used by the ", *format, " conversion");
    }
  }
  return plan;
}

absl::StatusOr<ConvertedLora> ExecuteLoraPlan(const LoraPlan& plan, const LoraKeys& keys,
                                              const TensorMap& tensors) {
  ConvertedLora out;
  out.format = plan.format;
  std::vector<LoraModulePlan> modules = plan.modules;
  RETURN_IF_ERROR(UseBlockDiagonalSplits(keys, tensors, modules));
  for (const LoraModulePlan& m : modules) {
    ASSIGN_OR_RETURN(LoraModule module, ExecuteModule(m, keys, tensors));
    out.modules.push_back(std::move(module));
  }
  for (const LoraOverlayPlan& o : plan.overlays) {
    ASSIGN_OR_RETURN(torch::Tensor value, TensorFor(keys, tensors, o.key));
    out.overlays.push_back(LoraOverlay{o.param, value, FileKey(keys, o.key)});
  }
  std::stable_sort(out.modules.begin(), out.modules.end(),
                   [](const LoraModule& a, const LoraModule& b) { return a.module < b.module; });
  std::stable_sort(out.overlays.begin(), out.overlays.end(),
                   [](const LoraOverlay& a, const LoraOverlay& b) { return a.param < b.param; });
  for (const auto& [key, reason] : plan.unused) out.unused[FileKey(keys, key)] = reason;
  return out;
}

absl::StatusOr<ConvertedLora> ConvertLora(const TensorMap& tensors,
                                          const std::map<std::string, std::string>& metadata,
                                          const LoraHandler& handler) {
  const auto start = Clock::now();
  ASSIGN_OR_RETURN(LoraKeys keys, MakeLoraKeys(tensors, metadata));
  ASSIGN_OR_RETURN(LoraPlan plan, PlanLoraConversion(handler, keys));
  ASSIGN_OR_RETURN(ConvertedLora out, ExecuteLoraPlan(plan, keys, tensors));
  out.metadata = metadata;
  out.convert_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return out;
}

namespace {

// Digests remembered by file identity (SafetensorsFile::identity()), so reloading an unchanged
// file (hot-swap churn, eviction and reload) does not hash it again (see PendingDigest).
class DigestCache {
 public:
  static DigestCache& Global() {
    static DigestCache* cache = new DigestCache();
    return *cache;
  }
  std::optional<std::string> Find(const std::string& identity) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = digests_.find(identity);
    if (it == digests_.end()) return std::nullopt;
    return it->second;
  }
  void Insert(const std::string& identity, const std::string& digest) {
    std::lock_guard<std::mutex> lock(mu_);
    if (digests_.size() >= kCapacity) digests_.clear();  // bounded; a miss only costs a hash
    digests_[identity] = digest;
  }

 private:
  static constexpr size_t kCapacity = 4096;
  std::mutex mu_;
  std::unordered_map<std::string, std::string> digests_;
};

// Converts an opened file (no digest; callers run a PendingDigest alongside).
absl::StatusOr<ConvertedLora> ConvertOpenedLora(const std::shared_ptr<const SafetensorsFile>& file,
                                                const LoraHandler& handler,
                                                Clock::time_point start) {
  ASSIGN_OR_RETURN(TensorMap tensors, file->GetAll());
  auto converted = ConvertLora(tensors, file->metadata(), handler);
  if (!converted.ok()) return Annotate(converted.status(), LoraName(file->path()));
  converted->path = file->path();
  converted->file_bytes = static_cast<int64_t>(file->mapped_bytes().size());
  converted->convert_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return converted;
}

}  // namespace

PendingDigest::PendingDigest(std::shared_ptr<const SafetensorsFile> file) : file_(std::move(file)) {
  if (std::optional<std::string> known = DigestCache::Global().Find(file_->identity())) {
    digest_ = *known;
    return;
  }
  thread_ = std::thread([this] {
    const std::string_view bytes = file_->mapped_bytes();
    digest_ = Sha256Hex(bytes.data(), bytes.size());
    DigestCache::Global().Insert(file_->identity(), digest_);
  });
}

PendingDigest::~PendingDigest() {
  if (thread_.joinable()) thread_.join();
}

std::string PendingDigest::Join() {
  if (thread_.joinable()) thread_.join();
  return digest_;
}

absl::StatusOr<ConvertedLora> ConvertLoraFile(const std::string& path, const LoraHandler& handler) {
  const auto start = Clock::now();
  ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file, SafetensorsFile::Open(path));
  PendingDigest digest(file);
  ASSIGN_OR_RETURN(ConvertedLora converted, ConvertOpenedLora(file, handler, start));
  converted.sha256 = digest.Join();
  converted.convert_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return converted;
}

int64_t ConvertedLora::TensorBytes() const {
  std::set<const void*> seen;
  int64_t total = 0;
  auto add = [&](const torch::Tensor& t) {
    if (!t.defined() || !t.has_storage()) return;
    const c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
    if (seen.insert(impl).second) total += static_cast<int64_t>(t.storage().nbytes());
  };
  for (const LoraModule& m : modules) {
    add(m.down);
    add(m.up);
    add(m.bias);
  }
  for (const LoraOverlay& o : overlays) add(o.value);
  return total;
}

absl::StatusOr<TensorMap> ConvertedLora::ToDiffusersStateDict(const std::string& prefix) const {
  return TorchCall("building the diffusers LoRA state dict", [&] {
    TensorMap out;
    for (const LoraModule& m : modules) {
      const std::string base = absl::StrCat(prefix, m.module);
      out[base + ".lora_A.weight"] = m.down.contiguous();
      out[base + ".lora_B.weight"] = (m.up * m.scale).contiguous();
      if (m.bias.defined()) out[base + ".lora_B.bias"] = (m.bias * m.scale).contiguous();
    }
    for (const LoraOverlay& o : overlays) out[prefix + o.param] = o.value.contiguous();
    return out;
  });
}

// ---------------------------------------------------------------------------------------------

KeyShapes ParameterShapes(const TensorMap& params) {
  KeyShapes out;
  for (const auto& [name, t] : params) {
    if (t.defined()) out[name] = t.sizes().vec();
  }
  return out;
}

absl::StatusOr<LoraReport> ValidateLora(const ConvertedLora& lora, const KeyShapes& params,
                                        const LoraLoadOptions& options) {
  const auto start = Clock::now();
  LoraReport report;
  report.path = lora.path;
  report.format = lora.format;
  report.file_bytes = lora.file_bytes;
  report.sha256 = lora.sha256;
  report.tensor_bytes = lora.TensorBytes();
  std::vector<std::string> problems;

  auto finite = [&](const torch::Tensor& t, const std::string& what) -> absl::Status {
    if (!options.check_finite || !t.defined() || t.numel() == 0) return absl::OkStatus();
    ASSIGN_OR_RETURN(bool ok, AllFinite(t));
    if (!ok) problems.push_back(absl::StrCat(what, " contains NaN or Inf values"));
    return absl::OkStatus();
  };

  std::map<std::string, const LoraModule*> seen;
  for (const LoraModule& m : lora.modules) {
    const std::string sources = absl::StrJoin(m.sources, ", ");
    if (auto [it, inserted] = seen.emplace(m.module, &m); !inserted) {
      problems.push_back(absl::StrCat("module ", m.module, ": targeted twice (from ",
                                      absl::StrJoin(it->second->sources, ", "), " and from ",
                                      sources, ")"));
      continue;
    }
    const std::string got =
        absl::StrCat("lora_A ", ShapeString(m.down), " and lora_B ", ShapeString(m.up));
    if (!m.down.defined() || !m.up.defined() || m.down.dim() != 2 || m.up.dim() != 2) {
      problems.push_back(
          absl::StrCat("module ", m.module, ": lora_A and lora_B must be matrices, got ", got));
      continue;
    }
    const int64_t rank = m.down.size(0);
    if (rank == 0 || m.up.size(1) == 0) {
      problems.push_back(absl::StrCat("module ", m.module, ": rank 0 (", got, ")"));
      continue;
    }
    if (m.up.size(1) != rank) {
      problems.push_back(absl::StrCat(
          "module ", m.module, ": lora_A and lora_B ranks disagree: lora_A ", ShapeString(m.down),
          " has rank ", rank, ", lora_B ", ShapeString(m.up), " has rank ", m.up.size(1)));
      continue;
    }
    auto param = params.find(m.module + ".weight");
    if (param == params.end()) {
      report.unmatched[m.module] = absl::StrCat("target module without a parameter '", m.module,
                                                ".weight' in the model (from ", sources, ")");
      continue;
    }
    const std::vector<int64_t>& w = param->second;
    if (w.size() != 2) {
      problems.push_back(absl::StrCat("module ", m.module, ": the model's weight ", ShapeString(w),
                                      " is not a matrix, but the LoRA has ", got));
      continue;
    }
    const int64_t out = w[0];
    const int64_t in = w[1];
    const int64_t lora_in = m.down.size(1);
    const bool widens = m.input_expandable && lora_in > in;
    if (m.up.size(0) != out || (lora_in != in && !widens)) {
      problems.push_back(absl::StrCat("module ", m.module, ": the model's weight is ",
                                      ShapeString(w), ", so expected lora_A [", rank, ", ", in, "]",
                                      m.input_expandable ? " (or wider)" : "", " and lora_B [", out,
                                      ", ", rank, "], got ", got));
      continue;
    }
    if (m.bias.defined() && (m.bias.dim() != 1 || m.bias.size(0) != out)) {
      problems.push_back(absl::StrCat("module ", m.module, ": expected lora_B bias [", out,
                                      "], got ", ShapeString(m.bias)));
      continue;
    }
    if (!std::isfinite(m.scale)) {
      problems.push_back(absl::StrCat("module ", m.module, ": scale ", FormatDouble(m.scale),
                                      " (alpha ", FormatDouble(m.alpha), ") is not finite"));
      continue;
    }
    RETURN_IF_ERROR(finite(m.down, absl::StrCat("module ", m.module, ": lora_A")));
    RETURN_IF_ERROR(finite(m.up, absl::StrCat("module ", m.module, ": lora_B")));
    RETURN_IF_ERROR(finite(m.bias, absl::StrCat("module ", m.module, ": lora_B bias")));
    if (widens) {
      report.expansions.push_back(LoraInputExpansion{m.module, w, {out, lora_in}});
    }
    LoraModuleReport r;
    r.module = m.module;
    r.rank = rank;
    r.alpha = m.alpha;
    r.source_rank = m.source_rank;
    r.scale = m.scale;
    r.down_shape = m.down.sizes().vec();
    r.up_shape = m.up.sizes().vec();
    r.bias = m.bias.defined();
    r.sources = m.sources;
    report.modules.push_back(std::move(r));
  }

  std::set<std::string> overlay_params;
  for (const LoraOverlay& o : lora.overlays) {
    if (!overlay_params.insert(o.param).second) {
      problems.push_back(absl::StrCat("parameter ", o.param, ": replaced twice (", o.source, ")"));
      continue;
    }
    auto param = params.find(o.param);
    if (param == params.end()) {
      report.unmatched[o.param] =
          absl::StrCat("replacement for a parameter the model lacks (from ", o.source, ")");
      continue;
    }
    if (!o.value.defined() || o.value.sizes().vec() != param->second) {
      problems.push_back(absl::StrCat("parameter ", o.param, ": the model's is ",
                                      ShapeString(param->second), ", got ", ShapeString(o.value),
                                      " from ", o.source));
      continue;
    }
    RETURN_IF_ERROR(finite(o.value, absl::StrCat("parameter ", o.param, " (from ", o.source, ")")));
    report.overlays.push_back(o.param);
  }
  for (const auto& [key, reason] : lora.unused) report.unmatched[key] = reason;

  const std::string name = LoraName(lora.path);
  if (!problems.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " (format ", lora.format, ") does not fit the model:\n  ", JoinLimited(problems)));
  }
  std::vector<std::string> unmatched;
  for (const auto& [key, reason] : report.unmatched) {
    unmatched.push_back(absl::StrCat(key, ": ", reason));
  }
  if (report.modules.empty() && report.overlays.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " (format ", lora.format, ") matches nothing in this model",
        unmatched.empty() ? std::string() : absl::StrCat(":\n  ", JoinLimited(unmatched))));
  }
  if (!options.allow_partial && !unmatched.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, " (format ", lora.format, "): ", unmatched.size(),
        " unmatched keys or targets (allow_partial loads the rest and reports them):\n  ",
        JoinLimited(unmatched)));
  }
  std::sort(report.overlays.begin(), report.overlays.end());
  report.seconds =
      lora.convert_seconds + std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

absl::StatusOr<LoadedLora> LoadLoraHashing(const std::string& path, const LoraHandler& handler,
                                           const KeyShapes& params, const LoraLoadOptions& options,
                                           std::unique_ptr<PendingDigest>* digest) {
  const auto start = Clock::now();
  LoadedLora out;
  ASSIGN_OR_RETURN(std::shared_ptr<const SafetensorsFile> file, SafetensorsFile::Open(path));
  // The digest is computed while the file is converted and validated (and, for the caller, while
  // it copies the tensors).
  auto pending = std::make_unique<PendingDigest>(file);
  ASSIGN_OR_RETURN(out.lora, ConvertOpenedLora(file, handler, start));
  ASSIGN_OR_RETURN(out.report, ValidateLora(out.lora, params, options));
  std::set<std::string> matched;
  for (const LoraModuleReport& m : out.report.modules) matched.insert(m.module);
  std::set<std::string> replaced(out.report.overlays.begin(), out.report.overlays.end());
  auto& modules = out.lora.modules;
  modules.erase(std::remove_if(modules.begin(), modules.end(),
                               [&](const LoraModule& m) { return matched.count(m.module) == 0; }),
                modules.end());
  auto& overlays = out.lora.overlays;
  overlays.erase(std::remove_if(overlays.begin(), overlays.end(),
                                [&](const LoraOverlay& o) { return replaced.count(o.param) == 0; }),
                 overlays.end());
  out.report.tensor_bytes = out.lora.TensorBytes();
  out.report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  *digest = std::move(pending);
  return out;
}

absl::StatusOr<LoadedLora> LoadLora(const std::string& path, const LoraHandler& handler,
                                    const KeyShapes& params, const LoraLoadOptions& options) {
  const auto start = Clock::now();
  std::unique_ptr<PendingDigest> digest;
  ASSIGN_OR_RETURN(LoadedLora out, LoadLoraHashing(path, handler, params, options, &digest));
  out.lora.sha256 = out.report.sha256 = digest->Join();
  out.report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return out;
}

// ---------------------------------------------------------------------------------------------

std::map<int64_t, int> LoraReport::RankHistogram() const {
  std::map<int64_t, int> out;
  for (const LoraModuleReport& m : modules) ++out[m.rank];
  return out;
}

std::string LoraReport::ToString() const {
  std::string s = absl::StrCat(
      path.empty() ? std::string("LoRA") : absl::StrCat("LoRA ", path), "\n  format ", format, ": ",
      modules.size(), " target modules, ", overlays.size(), " replaced parameters, ",
      expansions.size(), " widened inputs, ", unmatched.size(), " unmatched\n",
      absl::StrFormat("  %d bytes in the file, %d bytes of tensors, %.3f ms\n", file_bytes,
                      tensor_bytes, seconds * 1e3),
      sha256.empty() ? std::string() : absl::StrCat("  sha256 ", sha256, "\n"));
  std::vector<std::string> ranks;
  for (const auto& [rank, count] : RankHistogram()) {
    ranks.push_back(absl::StrCat(rank, " (", count, count == 1 ? " module)" : " modules)"));
  }
  absl::StrAppend(&s, "  ranks: ", ranks.empty() ? "-" : absl::StrJoin(ranks, ", "), "\n");
  std::size_t width = 0;
  for (const LoraModuleReport& m : modules) width = std::max(width, m.module.size());
  for (const LoraModuleReport& m : modules) {
    absl::StrAppend(
        &s, absl::StrFormat("  %-*s  rank %d  alpha %g/%d  scale %g  A %s  B %s%s  <- %s\n",
                            static_cast<int>(width), m.module, m.rank, m.alpha, m.source_rank,
                            m.scale, ShapeString(m.down_shape), ShapeString(m.up_shape),
                            m.bias ? " +bias" : "", absl::StrJoin(m.sources, ", ")));
  }
  for (const std::string& p : overlays) absl::StrAppend(&s, "  replaces ", p, "\n");
  for (const LoraInputExpansion& e : expansions) {
    absl::StrAppend(&s, "  widens ", e.module, " ", ShapeString(e.old_shape), " -> ",
                    ShapeString(e.new_shape), " (new input columns start at zero)\n");
  }
  for (const auto& [key, reason] : unmatched) {
    absl::StrAppend(&s, "  unmatched ", key, ": ", reason, "\n");
  }
  return s;
}

nlohmann::json LoraReport::ToJson() const {
  nlohmann::json j;
  j["path"] = path;
  j["format"] = format;
  j["modules"] = nlohmann::json::array();
  for (const LoraModuleReport& m : modules) {
    j["modules"].push_back({{"module", m.module},
                            {"rank", m.rank},
                            {"alpha", m.alpha},
                            {"source_rank", m.source_rank},
                            {"scale", m.scale},
                            {"lora_A", m.down_shape},
                            {"lora_B", m.up_shape},
                            {"bias", m.bias},
                            {"sources", m.sources}});
  }
  j["overlays"] = overlays;
  j["expanded_modules"] = nlohmann::json::array();
  for (const LoraInputExpansion& e : expansions) {
    j["expanded_modules"].push_back(
        {{"module", e.module}, {"old_shape", e.old_shape}, {"new_shape", e.new_shape}});
  }
  j["unmatched"] = unmatched;
  nlohmann::json ranks = nlohmann::json::object();
  for (const auto& [rank, count] : RankHistogram()) ranks[std::to_string(rank)] = count;
  j["ranks"] = ranks;
  j["file_bytes"] = file_bytes;
  j["sha256"] = sha256;
  j["tensor_bytes"] = tensor_bytes;
  j["seconds"] = seconds;
  return j;
}

}  // namespace ds
