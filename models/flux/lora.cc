#include "models/flux/lora.h"

#include <algorithm>
#include <cctype>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "handlers/status.h"

namespace ds::flux {
namespace {

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string Underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// How a source module's output rows map onto diffusers modules.
enum class Split {
  kNone,     // one target
  kThirds,   // q, k, v: equal thirds
  kLinear1,  // single-block linear1: q, k, v of the input width D, then the MLP rows
};

struct TargetSpec {
  std::vector<std::string> modules;  // relative to the block prefix (or global names)
  Split split = Split::kNone;
  // final_layer.adaLN_modulation.1 emits (shift, scale); diffusers' norm_out.linear emits
  // (scale, shift).
  bool swap_scale_shift = false;
};

using SpecTable = std::vector<std::pair<std::string, TargetSpec>>;

// BFL module (relative to `double_blocks.<i>.`) -> diffusers (relative to
// `transformer_blocks.<i>.`).
const SpecTable& DoubleBlockSpecs() {
  static const auto* kTable = new SpecTable{
      {"img_attn.qkv", {{"attn.to_q", "attn.to_k", "attn.to_v"}, Split::kThirds}},
      {"txt_attn.qkv", {{"attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"}, Split::kThirds}},
      {"img_attn.proj", {{"attn.to_out.0"}}},
      {"txt_attn.proj", {{"attn.to_add_out"}}},
      {"img_mlp.0", {{"ff.net.0.proj"}}},
      {"img_mlp.2", {{"ff.net.2"}}},
      {"txt_mlp.0", {{"ff_context.net.0.proj"}}},
      {"txt_mlp.2", {{"ff_context.net.2"}}},
      {"img_mod.lin", {{"norm1.linear"}}},
      {"txt_mod.lin", {{"norm1_context.linear"}}},
  };
  return *kTable;
}

// BFL (relative to `single_blocks.<i>.`) -> diffusers (relative to
// `single_transformer_blocks.<i>.`).
const SpecTable& SingleBlockSpecs() {
  static const auto* kTable = new SpecTable{
      {"linear1", {{"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}, Split::kLinear1}},
      {"linear2", {{"proj_out"}}},
      {"modulation.lin", {{"norm.linear"}}},
  };
  return *kTable;
}

const SpecTable& GlobalSpecs() {
  static const auto* kTable = new SpecTable{
      {"img_in", {{"x_embedder"}}},
      {"txt_in", {{"context_embedder"}}},
      {"time_in.in_layer", {{"time_text_embed.timestep_embedder.linear_1"}}},
      {"time_in.out_layer", {{"time_text_embed.timestep_embedder.linear_2"}}},
      {"vector_in.in_layer", {{"time_text_embed.text_embedder.linear_1"}}},
      {"vector_in.out_layer", {{"time_text_embed.text_embedder.linear_2"}}},
      {"guidance_in.in_layer", {{"time_text_embed.guidance_embedder.linear_1"}}},
      {"guidance_in.out_layer", {{"time_text_embed.guidance_embedder.linear_2"}}},
      {"final_layer.linear", {{"proj_out"}}},
      {"final_layer.adaLN_modulation.1", {{"norm_out.linear"}, Split::kNone, true}},
  };
  return *kTable;
}

// BFL Control LoRA parameters that replace whole diffusers parameters (RMSNorm scales).
using OverlayTable = std::vector<std::pair<std::string, std::string>>;
const OverlayTable& DoubleBlockOverlays() {
  static const auto* kTable = new OverlayTable{
      {"img_attn.norm.query_norm.scale", "attn.norm_q.weight"},
      {"img_attn.norm.key_norm.scale", "attn.norm_k.weight"},
      {"txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"},
      {"txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"},
  };
  return *kTable;
}
const OverlayTable& SingleBlockOverlays() {
  static const auto* kTable = new OverlayTable{
      {"norm.query_norm.scale", "attn.norm_q.weight"},
      {"norm.key_norm.scale", "attn.norm_k.weight"},
  };
  return *kTable;
}

constexpr char kBflDouble[] = "double_blocks";
constexpr char kBflSingle[] = "single_blocks";
constexpr char kDiffusersDouble[] = "transformer_blocks";
constexpr char kDiffusersSingle[] = "single_transformer_blocks";

constexpr char kDiffusersPrefix[] = "transformer.";
constexpr char kKontextPrefix[] = "base_model.model.";
constexpr char kComfyPrefix[] = "diffusion_model.";
constexpr char kKohyaUnetPrefix[] = "lora_unet_";
constexpr char kKohyaMixturePrefix[] = "lora_transformer_";

// "<block>" + sep + digits + sep + rest -> (index, rest).
std::optional<std::pair<std::string, std::string>> SplitBlock(const std::string& name,
                                                              const std::string& block, char sep) {
  const std::string head = block + sep;
  if (!StartsWith(name, head)) return std::nullopt;
  std::size_t pos = head.size();
  std::size_t end = pos;
  while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
  if (end == pos || end >= name.size() || name[end] != sep) return std::nullopt;
  return std::make_pair(name.substr(pos, end - pos), name.substr(end + 1));
}

struct Resolved {
  std::vector<std::string> modules;  // full diffusers module names
  Split split = Split::kNone;
  bool swap_scale_shift = false;
};

Resolved Prefixed(const TargetSpec& spec, const std::string& prefix) {
  Resolved r{{}, spec.split, spec.swap_scale_shift};
  for (const std::string& m : spec.modules) r.modules.push_back(prefix + m);
  return r;
}

// Looks `rest` up in `table`, comparing underscored names when `underscored`.
const TargetSpec* Lookup(const SpecTable& table, const std::string& rest, bool underscored) {
  for (const auto& [name, spec] : table) {
    if ((underscored ? Underscored(name) : name) == rest) return &spec;
  }
  return nullptr;
}

// A BFL module name (dotted, or with every '.' written as '_' as kohya does) -> diffusers targets.
std::optional<Resolved> ResolveBfl(const std::string& name, bool underscored) {
  const char sep = underscored ? '_' : '.';
  if (auto block = SplitBlock(name, kBflDouble, sep)) {
    if (const TargetSpec* spec = Lookup(DoubleBlockSpecs(), block->second, underscored)) {
      return Prefixed(*spec, absl::StrCat(kDiffusersDouble, ".", block->first, "."));
    }
    return std::nullopt;
  }
  if (auto block = SplitBlock(name, kBflSingle, sep)) {
    if (const TargetSpec* spec = Lookup(SingleBlockSpecs(), block->second, underscored)) {
      return Prefixed(*spec, absl::StrCat(kDiffusersSingle, ".", block->first, "."));
    }
    return std::nullopt;
  }
  if (const TargetSpec* spec = Lookup(GlobalSpecs(), name, underscored)) return Prefixed(*spec, "");
  return std::nullopt;
}

// A diffusers module name with every '.' written as '_' (kohya "mixture") -> the module. The
// vocabulary is the set of targets of the BFL tables.
std::optional<Resolved> ResolveUnderscoredDiffusers(const std::string& name) {
  auto find = [](const SpecTable& table, const std::string& rest) -> std::optional<std::string> {
    for (const auto& [bfl, spec] : table) {
      for (const std::string& m : spec.modules) {
        if (Underscored(m) == rest) return m;
      }
    }
    return std::nullopt;
  };
  if (auto block = SplitBlock(name, kDiffusersSingle, '_')) {
    if (auto m = find(SingleBlockSpecs(), block->second)) {
      return Resolved{{absl::StrCat(kDiffusersSingle, ".", block->first, ".", *m)}};
    }
    return std::nullopt;
  }
  if (auto block = SplitBlock(name, kDiffusersDouble, '_')) {
    if (auto m = find(DoubleBlockSpecs(), block->second)) {
      return Resolved{{absl::StrCat(kDiffusersDouble, ".", block->first, ".", *m)}};
    }
    return std::nullopt;
  }
  // The mixture's norm_out_linear already is diffusers' norm_out.linear ((scale, shift) order):
  // no swap.
  if (auto m = find(GlobalSpecs(), name)) return Resolved{{*m}};
  return std::nullopt;
}

// A BFL parameter that is a whole-parameter overlay -> its diffusers name.
std::optional<std::string> ResolveBflOverlay(const std::string& name) {
  auto find = [](const OverlayTable& table, const std::string& rest) -> std::optional<std::string> {
    for (const auto& [bfl, diffusers] : table) {
      if (bfl == rest) return diffusers;
    }
    return std::nullopt;
  };
  if (auto block = SplitBlock(name, kBflDouble, '.')) {
    if (auto p = find(DoubleBlockOverlays(), block->second)) {
      return absl::StrCat(kDiffusersDouble, ".", block->first, ".", *p);
    }
  }
  if (auto block = SplitBlock(name, kBflSingle, '.')) {
    if (auto p = find(SingleBlockOverlays(), block->second)) {
      return absl::StrCat(kDiffusersSingle, ".", block->first, ".", *p);
    }
  }
  return std::nullopt;
}

std::string FileKey(const LoraKeys& keys, const std::string& key) {
  auto it = keys.source.find(key);
  return it == keys.source.end() ? key : it->second;
}

const std::vector<int64_t>& ShapeOf(const LoraKeys& keys, const std::string& key) {
  static const std::vector<int64_t>* kNone = new std::vector<int64_t>();
  auto it = keys.shapes.find(key);
  return it == keys.shapes.end() ? *kNone : it->second;
}

// Plans the modules of one source LoRA module. Every format states (or implies) alpha/r: an
// `.alpha` key gives alpha, its absence means alpha = r (scale 1). This holds for kohya's
// final-layer modules too, whose alpha diffusers discards (deliberate difference 3).
absl::Status EmitGroup(const LoraKeys& keys, const LoraKeyGroup& g, const Resolved& target,
                       LoraPlan& plan) {
  const std::vector<int64_t>& down = ShapeOf(keys, g.down);
  const std::vector<int64_t>& up = ShapeOf(keys, g.up);
  const int64_t rank = down.empty() ? 0 : down[0];
  const int64_t out = up.empty() ? 0 : up[0];
  double alpha = static_cast<double>(rank);
  if (!g.alpha.empty()) {
    auto it = keys.scalars.find(g.alpha);
    if (it == keys.scalars.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", FileKey(keys, g.alpha), "' must hold a single number"));
    }
    alpha = it->second;
  }
  std::vector<int64_t> rows;
  switch (target.split) {
    case Split::kNone:
      rows = {out};
      break;
    case Split::kThirds:
      if (out <= 0 || out % 3 != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("'", FileKey(keys, g.up), "' has ", out,
                         " rows, which do not split into three equal q, k, v parts"));
      }
      rows = {out / 3, out / 3, out / 3};
      break;
    case Split::kLinear1: {
      const int64_t width = down.size() == 2 ? down[1] : 0;
      if (width <= 0 || out <= 3 * width) {
        return absl::InvalidArgumentError(absl::StrCat(
            "'", FileKey(keys, g.up), "' has ", out,
            " rows, but a single-block linear1 LoRA needs ", "3 x ", width,
            " (q, k, v at the input width of '", FileKey(keys, g.down), "') plus the MLP rows"));
      }
      rows = {width, width, width, out - 3 * width};
      break;
    }
  }
  const int n = static_cast<int>(rows.size());
  int64_t begin = 0;
  for (int j = 0; j < n; ++j) {
    LoraModulePlan m;
    m.module = target.modules[j];
    m.down.key = g.down;
    m.down_bias.key = g.down_bias;
    m.up.key = g.up;
    m.up_bias.key = g.up_bias;
    if (n > 1) {
      m.up.row_begin = m.up_bias.row_begin = begin;
      m.up.row_count = m.up_bias.row_count = rows[j];
      m.fused_index = j;
      m.fused_count = n;
    }
    // Deliberate difference 2: only lora_B (and its bias) carries the output order; swapping
    // lora_A as diffusers' BFL path does permutes the rank dimension of one factor only.
    m.up.swap_row_halves = m.up_bias.swap_row_halves = target.swap_scale_shift;
    m.alpha = alpha;
    m.alpha_key = g.alpha;
    m.source_rank = rank;
    m.scale = rank > 0 ? alpha / static_cast<double>(rank) : 0.0;
    // A Control LoRA's img_in reads the noise and the control latents: wider than the base model.
    m.input_expandable = m.module == "x_embedder";
    plan.modules.push_back(std::move(m));
    begin += rows[j];
  }
  return absl::OkStatus();
}

void MarkUnused(const LoraKeyGroup& g, const std::string& reason, LoraPlan& plan) {
  for (const std::string* k : {&g.down, &g.up, &g.down_bias, &g.up_bias, &g.alpha}) {
    if (!k->empty()) plan.unused[*k] = reason;
  }
}

bool IsTextEncoderKey(const std::string& key) {
  return StartsWith(key, "lora_te_") || StartsWith(key, "lora_te1_") ||
         StartsWith(key, "lora_te2_") || StartsWith(key, "text_encoders.") ||
         StartsWith(key, "text_encoder.") || StartsWith(key, "text_encoder_2.");
}

constexpr char kTextEncoderReason[] =
    "text-encoder LoRA weights (this handler converts the transformer only)";

std::string OtherKeyReason(const std::string& key) {
  if (IsTextEncoderKey(key)) return kTextEncoderReason;
  if (absl::EndsWith(key, ".diff_b")) return "bias difference (diff_b) is not supported";
  if (absl::EndsWith(key, ".diff")) return "full weight difference (diff) is not supported";
  if (absl::StrContains(key, "dora_scale") || absl::StrContains(key, "lora_magnitude_vector")) {
    return "DoRA magnitude (DoRA is not supported)";
  }
  return "not a LoRA tensor of a Flux module";
}

void AddGroupingLeftovers(const LoraKeyGroups& groups, LoraPlan& plan) {
  for (const std::string& key : groups.other) plan.unused[key] = OtherKeyReason(key);
  for (const auto& [key, reason] : groups.incomplete) plan.unused[key] = reason;
}

// ---------------------------------------------------------------------------------------------
// Format front ends.

absl::StatusOr<LoraPlan> PlanDiffusers(const LoraKeys& keys) {
  const bool prefixed = std::any_of(keys.shapes.begin(), keys.shapes.end(), [](const auto& kv) {
    return StartsWith(kv.first, kDiffusersPrefix);
  });
  const std::string prefix = prefixed ? kDiffusersPrefix : "";
  ASSIGN_OR_RETURN(LoraPlan plan, PlanPeftLora(keys, prefix, kDiffusersPrefix));
  for (LoraModulePlan& m : plan.modules) m.input_expandable = m.module == "x_embedder";
  // diffusers saves a Control LoRA's q/k norm scales as plain parameters next to the LoRA keys
  // (and loads every such "norm_*" key as a replacement): overlays here.
  static const char* const kNormSuffixes[] = {".norm_q.weight", ".norm_k.weight",
                                              ".norm_added_q.weight", ".norm_added_k.weight"};
  for (auto it = plan.unused.begin(); it != plan.unused.end();) {
    const std::string& key = it->first;
    const bool norm = StartsWith(key, prefix) &&
                      std::any_of(std::begin(kNormSuffixes), std::end(kNormSuffixes),
                                  [&](const char* s) { return absl::EndsWith(key, s); });
    if (norm) {
      plan.overlays.push_back(LoraOverlayPlan{key.substr(prefix.size()), key});
      it = plan.unused.erase(it);
    } else {
      ++it;
    }
  }
  return plan;
}

// BFL names under `prefix` (bfl: none; kontext: "base_model.model."). fal's Kontext converter in
// diffusers tests some bias keys without the prefix and so never converts them; here every lora_B
// and lora_A bias is used.
absl::StatusOr<LoraPlan> PlanBflNames(const LoraKeys& keys, const std::string& prefix) {
  LoraPlan plan;
  const LoraKeyGroups groups = GroupLoraKeys(keys.shapes, prefix);
  for (const std::string& key : groups.outside) {
    plan.unused[key] = IsTextEncoderKey(key) ? std::string(kTextEncoderReason)
                                             : absl::StrCat("outside the '", prefix, "' prefix");
  }
  for (const std::string& key : groups.other) {
    if (auto param = ResolveBflOverlay(key.substr(prefix.size()))) {
      plan.overlays.push_back(LoraOverlayPlan{*param, key});
    } else {
      plan.unused[key] = OtherKeyReason(key);
    }
  }
  for (const auto& [key, reason] : groups.incomplete) plan.unused[key] = reason;
  for (const auto& [stub, g] : groups.groups) {
    if (auto target = ResolveBfl(stub, /*underscored=*/false)) {
      RETURN_IF_ERROR(EmitGroup(keys, g, *target, plan));
    } else {
      MarkUnused(g, absl::StrCat("'", stub, "' is not a Flux module"), plan);
    }
  }
  return plan;
}

absl::StatusOr<LoraPlan> PlanBfl(const LoraKeys& keys) { return PlanBflNames(keys, ""); }

absl::StatusOr<LoraPlan> PlanKontext(const LoraKeys& keys) {
  return PlanBflNames(keys, kKontextPrefix);
}

// sd-scripts `lora_unet_<bfl_name>` (dots written as '_', though some files keep a few dots) and
// ComfyUI's `diffusion_model.<bfl.name>` both name BFL modules; the "mixture" spelling
// `lora_transformer_<diffusers_name>` names diffusers modules. Every module keeps its alpha/r and
// every module is applied, including img_in/txt_in/time_in/vector_in/guidance_in/final_layer,
// which diffusers drops (deliberate difference 1).
absl::StatusOr<LoraPlan> PlanKohya(const LoraKeys& keys) {
  LoraPlan plan;
  const LoraKeyGroups groups = GroupLoraKeys(keys.shapes);
  AddGroupingLeftovers(groups, plan);
  // ComfyUI saves Control LoRAs in this spelling too: their q/k norm scales are overlays.
  for (const std::string& key : groups.other) {
    if (!StartsWith(key, kComfyPrefix)) continue;
    if (auto param = ResolveBflOverlay(key.substr(std::string(kComfyPrefix).size()))) {
      plan.unused.erase(key);
      plan.overlays.push_back(LoraOverlayPlan{*param, key});
    }
  }
  for (const auto& [stub, g] : groups.groups) {
    std::optional<Resolved> target;
    if (IsTextEncoderKey(stub)) {
      MarkUnused(g, kTextEncoderReason, plan);
      continue;
    }
    if (StartsWith(stub, kKohyaMixturePrefix)) {
      target = ResolveUnderscoredDiffusers(
          Underscored(stub.substr(std::string(kKohyaMixturePrefix).size())));
    } else if (StartsWith(stub, kKohyaUnetPrefix)) {
      target = ResolveBfl(Underscored(stub.substr(std::string(kKohyaUnetPrefix).size())),
                          /*underscored=*/true);
    } else if (StartsWith(stub, kComfyPrefix)) {
      target = ResolveBfl(Underscored(stub.substr(std::string(kComfyPrefix).size())),
                          /*underscored=*/true);
    }
    if (target.has_value()) {
      RETURN_IF_ERROR(EmitGroup(keys, g, *target, plan));
    } else {
      MarkUnused(g, absl::StrCat("'", stub, "' is not a kohya name of a Flux module"), plan);
    }
  }
  return plan;
}

// XLabs: `lora1` is the image stream, `lora2` the text stream. The single-block qkv_lora covers q,
// k, v only (no MLP rows) and proj_lora the block's output projection.
absl::StatusOr<LoraPlan> PlanXlabs(const LoraKeys& keys) {
  static const auto* kDouble = new std::vector<std::pair<std::string, std::string>>{
      {"proj_lora1", "img_attn.proj"},
      {"proj_lora2", "txt_attn.proj"},
      {"qkv_lora1", "img_attn.qkv"},
      {"qkv_lora2", "txt_attn.qkv"},
  };
  LoraPlan plan;
  const LoraKeyGroups groups = GroupLoraKeys(keys.shapes);
  AddGroupingLeftovers(groups, plan);
  for (const auto& [stub, g] : groups.groups) {
    const std::string name =
        StartsWith(stub, kComfyPrefix) ? stub.substr(std::string(kComfyPrefix).size()) : stub;
    std::optional<Resolved> target;
    if (auto block = SplitBlock(name, kBflDouble, '.');
        block && StartsWith(block->second, "processor.")) {
      const std::string lora = block->second.substr(std::string("processor.").size());
      for (const auto& [xlabs, bfl] : *kDouble) {
        if (lora == xlabs) {
          target = ResolveBfl(absl::StrCat(kBflDouble, ".", block->first, ".", bfl), false);
        }
      }
    } else if (auto block = SplitBlock(name, kBflSingle, '.');
               block && StartsWith(block->second, "processor.")) {
      const std::string lora = block->second.substr(std::string("processor.").size());
      const std::string prefix = absl::StrCat(kDiffusersSingle, ".", block->first, ".");
      if (lora == "qkv_lora") {
        target = Resolved{{prefix + "attn.to_q", prefix + "attn.to_k", prefix + "attn.to_v"},
                          Split::kThirds};
      } else if (lora == "proj_lora") {
        target = Resolved{{prefix + "proj_out"}};
      }
    }
    if (target.has_value()) {
      RETURN_IF_ERROR(EmitGroup(keys, g, *target, plan));
    } else {
      MarkUnused(g, absl::StrCat("'", stub, "' is not an XLabs name of a Flux module"), plan);
    }
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// The detection table: the first format with a matching key wins. Markers are key prefixes (or the
// XLabs processor infix), so one format's keys cannot carry another's marker by accident; the
// order still matters where prefixes overlap: XLabs keys may carry ComfyUI's "diffusion_model."
// (so xlabs precedes kohya), and kontext precedes bfl (deliberate difference 4: diffusers' PR
// checks the substring "double_blocks.0.img_mod.lin.lora_A" first, which Kontext keys contain).

struct FormatEntry {
  const char* name;
  bool foreign;  // listed by FormatNames() (the `_lora` metadata row)
  bool (*matches)(const std::string& key);
  absl::StatusOr<LoraPlan> (*plan)(const LoraKeys& keys);
};

bool IsDiffusersKey(const std::string& key) {
  static const auto* kTopLevel = new std::vector<std::string>{kDiffusersPrefix,
                                                              "transformer_blocks.",
                                                              "single_transformer_blocks.",
                                                              "x_embedder.",
                                                              "context_embedder.",
                                                              "time_text_embed.",
                                                              "norm_out.",
                                                              "proj_out."};
  // A diffusers module name alone is not a LoRA (a model's own state dict has those too): the key
  // must also carry a LoRA tensor suffix.
  const bool lora_tensor = key.find(".lora_A.") != std::string::npos ||
                           key.find(".lora_B.") != std::string::npos;
  return lora_tensor && std::any_of(kTopLevel->begin(), kTopLevel->end(),
                                    [&](const std::string& p) { return StartsWith(key, p); });
}

bool IsXlabsKey(const std::string& key) {
  return absl::StrContains(key, ".processor.qkv_lora") ||
         absl::StrContains(key, ".processor.proj_lora");
}

bool IsKohyaKey(const std::string& key) {
  return StartsWith(key, kKohyaUnetPrefix) || StartsWith(key, kKohyaMixturePrefix) ||
         StartsWith(key, kComfyPrefix) || StartsWith(key, "lora_te_") ||
         StartsWith(key, "lora_te1_") || StartsWith(key, "lora_te2_");
}

bool IsKontextKey(const std::string& key) { return StartsWith(key, kKontextPrefix); }

bool IsBflKey(const std::string& key) {
  static const auto* kTopLevel = new std::vector<std::string>{
      "double_blocks.", "single_blocks.", "img_in.",      "txt_in.",
      "time_in.",       "vector_in.",     "guidance_in.", "final_layer."};
  return std::any_of(kTopLevel->begin(), kTopLevel->end(),
                     [&](const std::string& p) { return StartsWith(key, p); });
}

// The native format is checked first: a file with any "transformer." key is a (possibly mixed)
// diffusers/PEFT LoRA, as diffusers treats it. It is accepted by every model through the shared
// PEFT rules and is not a foreign format, so the `_lora` row (diffusers: "Foreign LoRA formats
// this model converts to diffusers naming on load") does not list it.
const std::vector<FormatEntry>& Formats() {
  static const auto* kFormats = new std::vector<FormatEntry>{
      {kDiffusersLoraFormat, false, IsDiffusersKey, PlanDiffusers},
      {"xlabs", true, IsXlabsKey, PlanXlabs},
      {"kohya", true, IsKohyaKey, PlanKohya},
      {"kontext", true, IsKontextKey, PlanKontext},
      {"bfl", true, IsBflKey, PlanBfl},
  };
  return *kFormats;
}

}  // namespace

std::vector<BflLinearModule> BflBlockLinearModules(int64_t num_double, int64_t num_single) {
  std::vector<BflLinearModule> out;
  auto add = [&](const SpecTable& table, const char* bfl_block, const char* diffusers_block,
                 int64_t index) {
    for (const auto& [bfl, spec] : table) {
      BflLinearModule m;
      m.bfl = absl::StrCat(bfl_block, ".", index, ".", bfl);
      m.kohya = absl::StrCat(kKohyaUnetPrefix, Underscored(m.bfl));
      for (const std::string& d : spec.modules) {
        m.diffusers.push_back(absl::StrCat(diffusers_block, ".", index, ".", d));
      }
      out.push_back(std::move(m));
    }
  };
  for (int64_t i = 0; i < num_double; ++i) add(DoubleBlockSpecs(), kBflDouble, kDiffusersDouble, i);
  for (int64_t i = 0; i < num_single; ++i) add(SingleBlockSpecs(), kBflSingle, kDiffusersSingle, i);
  return out;
}

std::vector<std::string> FluxLora::FormatNames() const {
  std::vector<std::string> names;
  for (const FormatEntry& f : Formats()) {
    if (f.foreign) names.push_back(f.name);
  }
  return names;
}

std::optional<std::string> FluxLora::DetectFormat(const KeyShapes& keys) const {
  for (const FormatEntry& f : Formats()) {
    for (const auto& [key, shape] : keys) {
      if (f.matches(key)) return std::string(f.name);
    }
  }
  return std::nullopt;
}

absl::StatusOr<LoraPlan> FluxLora::PlanConversion(const LoraKeys& keys,
                                                  const std::string& format) const {
  for (const FormatEntry& f : Formats()) {
    if (format == f.name) return f.plan(keys);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("the Flux LoRA handler does not convert format '", format, "'"));
}

const FluxLora& FluxLoraHandler() {
  static const FluxLora* kHandler = new FluxLora();
  return *kHandler;
}

}  // namespace ds::flux
