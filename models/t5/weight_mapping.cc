#include "models/t5/weight_mapping.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"
#include "models/t5/config.h"

namespace ds::t5 {
namespace {

using Shape = std::vector<int64_t>;

constexpr char kShared[] = "shared.weight";
constexpr char kEmbedTokens[] = "encoder.embed_tokens.weight";
constexpr char kQuery0[] = "encoder.block.0.layer.0.SelfAttention.q.weight";
constexpr char kBias0[] = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

constexpr char kGatedVariant[] = "t5-v1.1";
constexpr char kReluVariant[] = "t5-v1.0";

std::string ShapeString(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

absl::StatusOr<Shape> Need(const KeyShapes& keys, const std::string& key, std::size_t rank) {
  auto it = keys.find(key);
  if (it == keys.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("T5EncoderModel checkpoint is missing key '", key, "'"));
  }
  if (it->second.size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': expected a ", rank,
                                                   "-D tensor, got ", ShapeString(it->second)));
  }
  return it->second;
}

// The stored token-embedding key: shared.weight when present, else encoder.embed_tokens.weight.
std::string EmbeddingKey(const KeyShapes& keys) {
  return keys.count(kShared) ? kShared : kEmbedTokens;
}

// Why a key outside the encoder's own is left out ("" = it is not ignorable).
std::string IgnoreReason(const KeyShapes& keys, const std::string& key) {
  if (key == kEmbedTokens && keys.count(kShared)) return "tied to shared.weight";
  if (absl::StartsWith(key, "decoder.")) return "T5 decoder (T5EncoderModel ignores it)";
  if (key == "lm_head.weight") return "T5 language-model head (not part of the encoder)";
  return "";
}

absl::StatusOr<T5Config> Derive(const KeyShapes& keys) {
  T5Config c;
  ASSIGN_OR_RETURN(Shape embedding, Need(keys, EmbeddingKey(keys), 2));
  c.vocab_size = embedding[0];
  c.d_model = embedding[1];
  ASSIGN_OR_RETURN(Shape bias, Need(keys, kBias0, 2));
  c.relative_attention_num_buckets = bias[0];
  c.num_heads = bias[1];
  ASSIGN_OR_RETURN(Shape q, Need(keys, kQuery0, 2));
  if (c.num_heads <= 0 || q[0] % c.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", kQuery0, "' ", ShapeString(q), ": ", q[0], " rows are not a multiple of ",
        c.num_heads, " heads (from '", kBias0, "' ", ShapeString(bias), ")"));
  }
  c.d_kv = q[0] / c.num_heads;
  c.num_layers = 0;
  while (keys.count(absl::StrCat("encoder.block.", c.num_layers, ".layer.0.SelfAttention.q.weight")) >
             0 &&
         c.num_layers <= (int64_t{1} << 20)) {
    ++c.num_layers;
  }
  const std::string gated_key = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight";
  c.is_gated_act = keys.count(gated_key) > 0;
  ASSIGN_OR_RETURN(Shape wi,
                   Need(keys,
                        c.is_gated_act ? gated_key : "encoder.block.0.layer.1.DenseReluDense.wi.weight",
                        2));
  c.d_ff = wi[0];
  c.feed_forward_proj = c.is_gated_act ? "gated-gelu" : "relu";
  c.dense_act_fn = c.is_gated_act ? "gelu_new" : "relu";
  c.dropout_rate = 0.0;
  RETURN_IF_ERROR(Annotate(c.Validate(), "derived from a T5EncoderModel checkpoint"));
  return c;
}

absl::StatusOr<MappingPlan> Plan(const KeyShapes& keys) {
  ASSIGN_OR_RETURN(T5Config c, Derive(keys));
  MappingPlan plan;
  std::set<std::string> used;
  for (const T5Parameter& p : T5EncoderParameters(c)) {
    const std::string source = p.name == kShared ? EmbeddingKey(keys) : p.name;
    auto it = keys.find(source);
    if (it == keys.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("T5EncoderModel checkpoint is missing key '", source, "'"));
    }
    if (it->second != p.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "key '", source, "': expected ", ShapeString(p.shape), ", got ",
          ShapeString(it->second), " (d_model ", c.d_model, ", ", c.num_heads, " heads of ",
          c.d_kv, ", d_ff ", c.d_ff, ")"));
    }
    used.insert(source);
    plan[p.name] = TensorRecipe{TensorRecipe::Op::kCopy, {source}};
  }
  if (keys.count(kShared) && keys.count(kEmbedTokens) && keys.at(kShared) != keys.at(kEmbedTokens)) {
    return absl::InvalidArgumentError(
        absl::StrCat("T5EncoderModel checkpoint: '", kEmbedTokens, "' ",
                     ShapeString(keys.at(kEmbedTokens)), " and '", kShared, "' ",
                     ShapeString(keys.at(kShared)), " are tied but differ in shape"));
  }
  std::vector<std::string> extra;
  for (const auto& [k, shape] : keys) {
    if (!used.count(k) && IgnoreReason(keys, k).empty()) extra.push_back(k);
  }
  if (!extra.empty()) {
    if (extra.size() > 10) {
      const std::size_t more = extra.size() - 10;
      extra.resize(10);
      extra.push_back(absl::StrCat("... (", more, " more)"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "unexpected keys in a T5EncoderModel checkpoint: ", absl::StrJoin(extra, ", ")));
  }
  return plan;
}

}  // namespace

std::vector<std::string> T5WeightMapping::VariantNames() const {
  return {kGatedVariant, kReluVariant};
}

std::vector<std::string> T5WeightMapping::MarkerKeys() const { return {kQuery0, kBias0}; }

std::vector<std::string> T5WeightMapping::ComponentPrefixes() const {
  return {"text_encoders.t5xxl.transformer."};
}

absl::StatusOr<std::optional<WeightMappingDetection>> T5WeightMapping::Detect(
    const KeyShapes& keys) const {
  if (!keys.count(kQuery0) || !keys.count(kBias0) ||
      (!keys.count(kShared) && !keys.count(kEmbedTokens))) {
    return std::nullopt;
  }
  ASSIGN_OR_RETURN(T5Config c, Derive(keys));
  WeightMappingDetection det;
  det.diffusers_naming = true;  // transformers naming: loads without renaming
  det.variant = c.is_gated_act ? kGatedVariant : kReluVariant;
  det.markers = {kQuery0, kBias0, EmbeddingKey(keys),
                 absl::StrCat("d_model ", c.d_model, ", ", c.num_layers, " layers, ",
                              c.is_gated_act ? "gated feed-forward" : "wi feed-forward")};
  det.config = c.ToJson();
  det.assumed = {"feed_forward_proj", "dense_act_fn", "relative_attention_max_distance",
                 "layer_norm_epsilon"};
  for (const auto& [k, shape] : keys) {
    const std::string why = IgnoreReason(keys, k);
    if (!why.empty()) det.ignored[k] = why;
  }
  return det;
}

absl::StatusOr<MappingPlan> T5WeightMapping::PlanToDiffusers(
    const KeyShapes& keys, const WeightMappingDetection& /*detection*/) const {
  return Plan(keys);
}

absl::StatusOr<MappingPlan> T5WeightMapping::PlanFromDiffusers(const KeyShapes& keys) const {
  return Plan(keys);
}

const T5WeightMapping& T5WeightMappingHandler() {
  static const T5WeightMapping* handler = new T5WeightMapping();
  return *handler;
}

}  // namespace ds::t5
