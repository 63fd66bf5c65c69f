#include "models/clip/weight_mapping.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"
#include "models/clip/config.h"

namespace ds::clip {
namespace {

using Shape = std::vector<int64_t>;

constexpr char kTextModel[] = "text_model.";
constexpr char kTokenEmbedding[] = "text_model.embeddings.token_embedding.weight";
constexpr char kLegacyTokenEmbedding[] = "embeddings.token_embedding.weight";

constexpr char kClipLVariant[] = "clip-l";
constexpr char kClipTextVariant[] = "clip-text";

std::string ShapeString(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// Keys the plan leaves out, with the reason (names in transformers naming).
const std::map<std::string, std::string>& IgnorableKeys() {
  static const auto* kKeys = new std::map<std::string, std::string>{
      {"text_model.embeddings.position_ids",
       "position ids buffer of older transformers releases (always arange)"},
      {"text_projection.weight", "text projection (CLIPTextModelWithProjection); CLIPTextModel "
                                 "has none"},
      {"logit_scale", "CLIPModel's contrastive logit scale"},
  };
  return *kKeys;
}

// The key of transformers-naming `name` in a checkpoint of the given naming.
std::string Source(const std::string& name, bool legacy) {
  if (legacy && absl::StartsWith(name, kTextModel)) return name.substr(sizeof(kTextModel) - 1);
  return name;
}

absl::StatusOr<Shape> Need(const KeyShapes& keys, const std::string& key, std::size_t rank) {
  auto it = keys.find(key);
  if (it == keys.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPTextModel checkpoint is missing key '", key, "'"));
  }
  if (it->second.size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': expected a ", rank,
                                                   "-D tensor, got ", ShapeString(it->second)));
  }
  return it->second;
}

// The config the weights determine; the fields they do not record take CLIP-L's values.
absl::StatusOr<CLIPTextConfig> Derive(const KeyShapes& keys, bool legacy) {
  CLIPTextConfig c;
  ASSIGN_OR_RETURN(Shape tok, Need(keys, Source(kTokenEmbedding, legacy), 2));
  c.vocab_size = tok[0];
  c.hidden_size = tok[1];
  ASSIGN_OR_RETURN(Shape pos,
                   Need(keys, Source("text_model.embeddings.position_embedding.weight", legacy), 2));
  c.max_position_embeddings = pos[0];
  auto layer_key = [&](int64_t i, const char* rest) {
    return Source(absl::StrCat("text_model.encoder.layers.", i, ".", rest), legacy);
  };
  c.num_hidden_layers = 0;
  // (The bound only stops runaway loops.)
  while (keys.count(layer_key(c.num_hidden_layers, "self_attn.q_proj.weight")) > 0 &&
         c.num_hidden_layers <= (int64_t{1} << 20)) {
    ++c.num_hidden_layers;
  }
  if (c.num_hidden_layers == 0) {
    return absl::InvalidArgumentError(absl::StrCat("CLIPTextModel checkpoint is missing key '",
                                                   layer_key(0, "self_attn.q_proj.weight"), "'"));
  }
  ASSIGN_OR_RETURN(Shape fc1, Need(keys, layer_key(0, "mlp.fc1.weight"), 2));
  c.intermediate_size = fc1[0];
  if (auto it = keys.find("text_projection.weight"); it != keys.end() && it->second.size() == 2) {
    c.projection_dim = it->second[0];
  } else {
    c.projection_dim = c.hidden_size;
  }
  c.num_attention_heads = c.hidden_size % 64 == 0 ? c.hidden_size / 64 : 1;
  c.hidden_act = "quick_gelu";
  c.layer_norm_eps = 1e-5;
  c.bos_token_id = 0;
  c.eos_token_id = 2;
  c.pad_token_id = 1;
  RETURN_IF_ERROR(Annotate(c.Validate(), "derived from a CLIPTextModel checkpoint"));
  return c;
}

absl::StatusOr<MappingPlan> Plan(const KeyShapes& keys, bool legacy) {
  ASSIGN_OR_RETURN(CLIPTextConfig c, Derive(keys, legacy));
  MappingPlan plan;
  std::set<std::string> used;
  for (const ClipParameter& p : ClipTextParameters(c, /*with_projection=*/false)) {
    const std::string source = Source(p.name, legacy);
    auto it = keys.find(source);
    if (it == keys.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("CLIPTextModel checkpoint is missing key '", source, "'"));
    }
    if (it->second != p.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key '", source, "': expected ", ShapeString(p.shape), ", got ",
          ShapeString(it->second), " (hidden_size ", c.hidden_size, ", intermediate_size ",
          c.intermediate_size, ", from '", Source(kTokenEmbedding, legacy), "' and the first "
          "layer's mlp.fc1)"));
    }
    used.insert(source);
    plan[p.name] = TensorRecipe{TensorRecipe::Op::kCopy, {source}};
  }
  std::vector<std::string> extra;
  for (const auto& [k, shape] : keys) {
    if (used.count(k)) continue;
    const std::string canonical =
        legacy && !IgnorableKeys().count(k) ? absl::StrCat(kTextModel, k) : k;
    if (IgnorableKeys().count(canonical) || IgnorableKeys().count(k)) continue;
    extra.push_back(k);
  }
  if (!extra.empty()) {
    if (extra.size() > 10) {
      const std::size_t more = extra.size() - 10;
      extra.resize(10);
      extra.push_back(absl::StrCat("... (", more, " more)"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected keys in a CLIPTextModel checkpoint: ", absl::StrJoin(extra, ", ")));
  }
  return plan;
}

}  // namespace

std::vector<std::string> ClipTextWeightMapping::VariantNames() const {
  return {kClipLVariant, kClipTextVariant};
}

std::vector<std::string> ClipTextWeightMapping::MarkerKeys() const {
  return {kTokenEmbedding, kLegacyTokenEmbedding};
}

std::vector<std::string> ClipTextWeightMapping::ComponentPrefixes() const {
  return {"text_encoders.clip_l.transformer.", "cond_stage_model.transformer."};
}

absl::StatusOr<std::optional<WeightMappingDetection>> ClipTextWeightMapping::Detect(
    const KeyShapes& keys) const {
  const bool current = keys.count(kTokenEmbedding) > 0;
  const bool legacy = !current && keys.count(kLegacyTokenEmbedding) > 0;
  if (!current && !legacy) return std::nullopt;
  ASSIGN_OR_RETURN(CLIPTextConfig c, Derive(keys, legacy));
  WeightMappingDetection det;
  det.diffusers_naming = current;  // transformers naming: loads without renaming
  det.markers = {current ? kTokenEmbedding : kLegacyTokenEmbedding,
                 absl::StrCat("hidden_size ", c.hidden_size, ", ", c.num_hidden_layers, " layers")};
  const bool clip_l = c.hidden_size == 768 && c.num_hidden_layers == 12 &&
                      c.intermediate_size == 3072 && c.vocab_size == 49408;
  det.variant = clip_l ? kClipLVariant : kClipTextVariant;
  det.config = c.ToJson();
  det.assumed = {"num_attention_heads", "hidden_act",   "layer_norm_eps",
                 "bos_token_id",        "eos_token_id", "pad_token_id"};
  if (!keys.count("text_projection.weight")) det.assumed.push_back("projection_dim");
  for (const auto& [key, why] : IgnorableKeys()) {
    const std::string source = key == "text_model.embeddings.position_ids" ? Source(key, legacy)
                                                                          : key;
    if (keys.count(source)) det.ignored[source] = why;
  }
  return det;
}

absl::StatusOr<MappingPlan> ClipTextWeightMapping::PlanToDiffusers(
    const KeyShapes& keys, const WeightMappingDetection& detection) const {
  return Plan(keys, /*legacy=*/!detection.diffusers_naming);
}

absl::StatusOr<MappingPlan> ClipTextWeightMapping::PlanFromDiffusers(const KeyShapes& keys) const {
  return Plan(keys, /*legacy=*/false);
}

const ClipTextWeightMapping& ClipTextWeightMappingHandler() {
  static const ClipTextWeightMapping* handler = new ClipTextWeightMapping();
  return *handler;
}

}  // namespace ds::clip
