#include "models/flux/weight_mapping.h"

#include <algorithm>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "handlers/status.h"

namespace ds::flux {
namespace {

using Shape = std::vector<int64_t>;

// Keys of the other BFL-family transformers that also carry double/single blocks; they are checked
// first (as diffusers does) so such files are never mistaken for FLUX.1.
constexpr const char* kForeignMarkers[] = {
    "single_stream_modulation.lin.weight",    // FLUX.2
    "distilled_guidance_layer.in_proj.bias",  // Chroma
};
constexpr const char* kOriginalMarkers[] = {
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "time_in.in_layer.weight",
    "double_blocks.0.img_mod.lin.weight",
};
constexpr const char* kDiffusersMarkers[] = {
    "x_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
};

// Probe keys in one naming, enough to derive the config.
struct Naming {
  const char* x_embedder;  // [D, in_channels]
  const char* proj_out;    // [out_channels, D]
  const char* context;     // [D, joint_attention_dim]
  const char* pooled;      // [D, pooled_projection_dim]
  const char* guidance;    // present iff guidance_embeds
  const char* double_prefix;
  const char* single_prefix;
  const char* double_q_norm;  // relative to "<double_prefix><i>."
  const char* single_q_norm;  // relative to "<single_prefix><i>."
  const char* double_mlp_in;  // [mlp, D]
  const char* single_mlp_in;  // rows: 3D + mlp (original) or mlp (diffusers)
  bool mlp_in_fused;          // single_mlp_in holds q,k,v and mlp rows
};

constexpr Naming kOriginal = {"img_in.weight",
                              "final_layer.linear.weight",
                              "txt_in.weight",
                              "vector_in.in_layer.weight",
                              "guidance_in.in_layer.weight",
                              "double_blocks.",
                              "single_blocks.",
                              "img_attn.norm.query_norm.scale",
                              "norm.query_norm.scale",
                              "img_mlp.0.weight",
                              "linear1.weight",
                              true};
constexpr Naming kDiffusers = {"x_embedder.weight",
                               "proj_out.weight",
                               "context_embedder.weight",
                               "time_text_embed.text_embedder.linear_1.weight",
                               "time_text_embed.guidance_embedder.linear_1.weight",
                               "transformer_blocks.",
                               "single_transformer_blocks.",
                               "attn.norm_q.weight",
                               "attn.norm_q.weight",
                               "ff.net.0.proj.weight",
                               "proj_mlp.weight",
                               false};

struct Structure {
  int64_t inner_dim = 0;
  int64_t head_dim = 0;
  int64_t mlp_dim = 0;
  int64_t num_layers = 0;
  int64_t num_single_layers = 0;
  bool guidance = false;
};

std::string ShapeString(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

absl::StatusOr<Shape> Need(const KeyShapes& keys, const std::string& key, std::size_t rank) {
  auto it = keys.find(key);
  if (it == keys.end()) {
    return absl::InvalidArgumentError(absl::StrCat("Flux checkpoint is missing key '", key, "'"));
  }
  if (it->second.size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': expected a ", rank,
                                                   "-D tensor, got ", ShapeString(it->second)));
  }
  return it->second;
}

// Number of blocks: highest "<prefix><i>." index + 1 (0 when there are none).
int64_t CountBlocks(const KeyShapes& keys, const std::string& prefix) {
  int64_t count = 0;
  for (auto it = keys.lower_bound(prefix); it != keys.end(); ++it) {
    if (it->first.compare(0, prefix.size(), prefix) != 0) break;
    const std::string rest = it->first.substr(prefix.size());
    int64_t i = 0;
    if (absl::SimpleAtoi(rest.substr(0, rest.find('.')), &i) && i >= 0 && i < (1 << 20)) {
      count = std::max(count, i + 1);
    }
  }
  return count;
}

bool HasAny(const KeyShapes& keys, const char* const* begin, const char* const* end,
            std::vector<std::string>* found) {
  bool any = false;
  for (auto p = begin; p != end; ++p) {
    if (keys.count(*p)) {
      any = true;
      if (found != nullptr) found->push_back(*p);
    }
  }
  return any;
}

// FLUX.1 uses (16, 56, 56) for head dim 128. For other head dims the weights do not say; this
// splits in the same proportions (even sizes summing to the head dim) and the caller is told.
std::vector<int64_t> DefaultAxes(int64_t head_dim) {
  int64_t a = std::max<int64_t>(2, 2 * ((head_dim + 8) / 16));
  const int64_t rest = head_dim - a;
  const int64_t b = 2 * (rest / 4);
  return {a, b, rest - b};
}

absl::StatusOr<std::pair<Structure, nlohmann::json>> Derive(const KeyShapes& keys,
                                                            const Naming& n) {
  Structure s;
  ASSIGN_OR_RETURN(Shape x, Need(keys, n.x_embedder, 2));
  ASSIGN_OR_RETURN(Shape out, Need(keys, n.proj_out, 2));
  ASSIGN_OR_RETURN(Shape ctx, Need(keys, n.context, 2));
  ASSIGN_OR_RETURN(Shape pooled, Need(keys, n.pooled, 2));
  s.inner_dim = x[0];
  s.guidance = keys.count(n.guidance) > 0;
  s.num_layers = CountBlocks(keys, n.double_prefix);
  s.num_single_layers = CountBlocks(keys, n.single_prefix);
  if (s.num_layers == 0 && s.num_single_layers == 0) {
    return absl::InvalidArgumentError("Flux checkpoint has no transformer blocks");
  }
  // Head dim from the first block's q-norm scale; MLP width from the first block's MLP input.
  Shape qn, mlp;
  if (s.num_layers > 0) {
    const std::string p = absl::StrCat(n.double_prefix, 0, ".");
    ASSIGN_OR_RETURN(qn, Need(keys, p + n.double_q_norm, 1));
    ASSIGN_OR_RETURN(mlp, Need(keys, p + n.double_mlp_in, 2));
    s.mlp_dim = mlp[0];
  } else {
    const std::string p = absl::StrCat(n.single_prefix, 0, ".");
    ASSIGN_OR_RETURN(qn, Need(keys, p + n.single_q_norm, 1));
    ASSIGN_OR_RETURN(mlp, Need(keys, p + n.single_mlp_in, 2));
    s.mlp_dim = n.mlp_in_fused ? mlp[0] - 3 * s.inner_dim : mlp[0];
  }
  s.head_dim = qn[0];
  if (s.inner_dim <= 0 || s.head_dim <= 0 || s.inner_dim % s.head_dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "key '", n.x_embedder, "': inner dim ", s.inner_dim,
        " is not a multiple of the attention head dim ", s.head_dim, " (from the q-norm scale)"));
  }
  if (s.mlp_dim != 4 * s.inner_dim) {
    return absl::InvalidArgumentError(absl::StrCat("MLP width ", s.mlp_dim,
                                                   " is not 4 x inner dim ", s.inner_dim,
                                                   " (FluxTransformer2DModel's ratio)"));
  }
  nlohmann::json config = {
      {"_class_name", "FluxTransformer2DModel"},
      {"patch_size", 1},
      {"in_channels", x[1]},
      {"out_channels", out[0]},
      {"num_layers", s.num_layers},
      {"num_single_layers", s.num_single_layers},
      {"attention_head_dim", s.head_dim},
      {"num_attention_heads", s.inner_dim / s.head_dim},
      {"joint_attention_dim", ctx[1]},
      {"pooled_projection_dim", pooled[1]},
      {"guidance_embeds", s.guidance},
      {"axes_dims_rope", DefaultAxes(s.head_dim)},
  };
  return std::make_pair(s, config);
}

absl::StatusOr<Structure> StructureOf(const KeyShapes& keys, const Naming& n) {
  ASSIGN_OR_RETURN(auto derived, Derive(keys, n));
  return derived.first;
}

// One module of the original layout and the diffusers module(s) it becomes.
enum class Kind { kCopy, kSplit, kSwap };
struct Rule {
  std::string original;
  std::vector<std::string> diffusers;
  Kind kind = Kind::kCopy;
  bool norm = false;                // parameter "scale" (original) / "weight" (diffusers), no bias
  std::vector<int64_t> split_rows;  // kSplit: rows per target
};

std::vector<Rule> Rules(const Structure& s) {
  const int64_t d = s.inner_dim;
  std::vector<Rule> r = {
      {"time_in.in_layer", {"time_text_embed.timestep_embedder.linear_1"}},
      {"time_in.out_layer", {"time_text_embed.timestep_embedder.linear_2"}},
      {"vector_in.in_layer", {"time_text_embed.text_embedder.linear_1"}},
      {"vector_in.out_layer", {"time_text_embed.text_embedder.linear_2"}},
      {"txt_in", {"context_embedder"}},
      {"img_in", {"x_embedder"}},
      {"final_layer.linear", {"proj_out"}},
      // BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale,
      // shift).
      {"final_layer.adaLN_modulation.1", {"norm_out.linear"}, Kind::kSwap},
  };
  if (s.guidance) {
    r.push_back({"guidance_in.in_layer", {"time_text_embed.guidance_embedder.linear_1"}});
    r.push_back({"guidance_in.out_layer", {"time_text_embed.guidance_embedder.linear_2"}});
  }
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const std::string o = absl::StrCat("double_blocks.", i, ".");
    const std::string t = absl::StrCat("transformer_blocks.", i, ".");
    r.push_back({o + "img_mod.lin", {t + "norm1.linear"}});
    r.push_back({o + "txt_mod.lin", {t + "norm1_context.linear"}});
    r.push_back({o + "img_attn.qkv",
                 {t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"},
                 Kind::kSplit,
                 false,
                 {d, d, d}});
    r.push_back({o + "txt_attn.qkv",
                 {t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"},
                 Kind::kSplit,
                 false,
                 {d, d, d}});
    r.push_back({o + "img_attn.norm.query_norm", {t + "attn.norm_q"}, Kind::kCopy, true});
    r.push_back({o + "img_attn.norm.key_norm", {t + "attn.norm_k"}, Kind::kCopy, true});
    r.push_back({o + "txt_attn.norm.query_norm", {t + "attn.norm_added_q"}, Kind::kCopy, true});
    r.push_back({o + "txt_attn.norm.key_norm", {t + "attn.norm_added_k"}, Kind::kCopy, true});
    r.push_back({o + "img_mlp.0", {t + "ff.net.0.proj"}});
    r.push_back({o + "img_mlp.2", {t + "ff.net.2"}});
    r.push_back({o + "txt_mlp.0", {t + "ff_context.net.0.proj"}});
    r.push_back({o + "txt_mlp.2", {t + "ff_context.net.2"}});
    r.push_back({o + "img_attn.proj", {t + "attn.to_out.0"}});
    r.push_back({o + "txt_attn.proj", {t + "attn.to_add_out"}});
  }
  for (int64_t i = 0; i < s.num_single_layers; ++i) {
    const std::string o = absl::StrCat("single_blocks.", i, ".");
    const std::string t = absl::StrCat("single_transformer_blocks.", i, ".");
    r.push_back({o + "modulation.lin", {t + "norm.linear"}});
    r.push_back({o + "linear1",
                 {t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"},
                 Kind::kSplit,
                 false,
                 {d, d, d, s.mlp_dim}});
    r.push_back({o + "norm.query_norm", {t + "attn.norm_q"}, Kind::kCopy, true});
    r.push_back({o + "norm.key_norm", {t + "attn.norm_k"}, Kind::kCopy, true});
    r.push_back({o + "linear2", {t + "proj_out"}});
  }
  return r;
}

// (original suffix, diffusers suffix) of a rule's parameters.
std::vector<std::pair<std::string, std::string>> Params(const Rule& rule) {
  if (rule.norm) return {{".scale", ".weight"}};
  return {{".weight", ".weight"}, {".bias", ".bias"}};
}

absl::Status Unused(const KeyShapes& keys, const std::set<std::string>& used,
                    std::string_view naming) {
  std::vector<std::string> extra;
  for (const auto& [k, shape] : keys) {
    if (!used.count(k)) extra.push_back(k);
  }
  if (extra.empty()) return absl::OkStatus();
  if (extra.size() > 10) {
    const std::size_t more = extra.size() - 10;
    extra.resize(10);
    extra.push_back(absl::StrCat("... (", more, " more)"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unexpected keys in a ", std::string(naming),
                                                 " Flux checkpoint: ", absl::StrJoin(extra, ", ")));
}

}  // namespace

std::vector<std::string> FluxWeightMapping::VariantNames() const {
  return {"flux-dev", "flux-schnell", "flux-fill", "flux-depth"};
}

std::vector<std::string> FluxWeightMapping::MarkerKeys() const {
  std::vector<std::string> out(std::begin(kOriginalMarkers), std::end(kOriginalMarkers));
  out.insert(out.end(), std::begin(kDiffusersMarkers), std::end(kDiffusersMarkers));
  return out;
}

absl::StatusOr<std::optional<WeightMappingDetection>> FluxWeightMapping::Detect(
    const KeyShapes& keys) const {
  if (HasAny(keys, std::begin(kForeignMarkers), std::end(kForeignMarkers), nullptr)) {
    return std::nullopt;
  }
  WeightMappingDetection det;
  const bool original =
      HasAny(keys, std::begin(kOriginalMarkers), std::end(kOriginalMarkers), &det.markers);
  if (!original) {
    // Diffusers naming: both markers, and not another diffusers transformer (SD3 has
    // pos_embed.proj).
    if (!HasAny(keys, std::begin(kDiffusersMarkers), std::end(kDiffusersMarkers), &det.markers) ||
        det.markers.size() != std::size(kDiffusersMarkers) || keys.count("pos_embed.proj.weight")) {
      return std::nullopt;
    }
    det.diffusers_naming = true;
  }
  ASSIGN_OR_RETURN(auto derived, Derive(keys, original ? kOriginal : kDiffusers));
  det.config = std::move(derived.second);
  const Structure& s = derived.first;
  const int64_t in_channels = det.config["in_channels"].get<int64_t>();
  if (!s.guidance) {
    det.variant = "flux-schnell";
  } else if (in_channels == 384) {
    det.variant = "flux-fill";  // 64 noise + 64 masked-image latents + 256 mask channels
  } else if (in_channels == 128) {
    det.variant = "flux-depth";  // 64 noise + 64 control latents (Canny has the same shapes)
  } else {
    det.variant = "flux-dev";
  }
  det.markers.push_back(s.guidance ? "guidance embedder present" : "no guidance embedder");
  det.markers.push_back(absl::StrCat("in_channels ", in_channels));
  det.assumed = {"patch_size", "axes_dims_rope"};
  return det;
}

absl::StatusOr<MappingPlan> FluxWeightMapping::PlanToDiffusers(
    const KeyShapes& keys, const WeightMappingDetection& detection) const {
  MappingPlan plan;
  if (detection.diffusers_naming) {
    for (const auto& [k, shape] : keys) plan[k] = TensorRecipe{TensorRecipe::Op::kCopy, {k}};
    return plan;
  }
  ASSIGN_OR_RETURN(Structure s, StructureOf(keys, kOriginal));
  std::set<std::string> used;
  for (const Rule& rule : Rules(s)) {
    for (const auto& [osuffix, dsuffix] : Params(rule)) {
      const std::string src = rule.original + osuffix;
      auto it = keys.find(src);
      if (it == keys.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("Flux checkpoint is missing key '", src, "'"));
      }
      used.insert(src);
      const Shape& shape = it->second;
      switch (rule.kind) {
        case Kind::kCopy:
          plan[rule.diffusers[0] + dsuffix] = {TensorRecipe::Op::kCopy, {src}};
          break;
        case Kind::kSwap:
          plan[rule.diffusers[0] + dsuffix] = {TensorRecipe::Op::kSwapHalves, {src}};
          break;
        case Kind::kSplit: {
          int64_t total = 0;
          for (int64_t rows : rule.split_rows) total += rows;
          if (shape.empty() || shape[0] != total) {
            return absl::InvalidArgumentError(
                absl::StrCat("key '", src, "': expected ", total, " rows (split ",
                             absl::StrJoin(rule.split_rows, " + "), " for inner dim ", s.inner_dim,
                             "), got ", ShapeString(shape)));
          }
          int64_t begin = 0;
          for (std::size_t j = 0; j < rule.diffusers.size(); ++j) {
            plan[rule.diffusers[j] + dsuffix] = {
                TensorRecipe::Op::kRows, {src}, begin, rule.split_rows[j]};
            begin += rule.split_rows[j];
          }
          break;
        }
      }
    }
  }
  RETURN_IF_ERROR(Unused(keys, used, "BFL-format"));
  return plan;
}

absl::StatusOr<MappingPlan> FluxWeightMapping::PlanFromDiffusers(const KeyShapes& keys) const {
  ASSIGN_OR_RETURN(Structure s, StructureOf(keys, kDiffusers));
  MappingPlan plan;
  std::set<std::string> used;
  for (const Rule& rule : Rules(s)) {
    for (const auto& [osuffix, dsuffix] : Params(rule)) {
      std::vector<std::string> sources;
      for (const std::string& t : rule.diffusers) {
        const std::string key = t + dsuffix;
        if (!keys.count(key)) {
          return absl::InvalidArgumentError(
              absl::StrCat("diffusers Flux state dict is missing key '", key, "'"));
        }
        used.insert(key);
        sources.push_back(key);
      }
      TensorRecipe recipe{TensorRecipe::Op::kCopy, sources};
      if (rule.kind == Kind::kSplit) recipe.op = TensorRecipe::Op::kConcatRows;
      if (rule.kind == Kind::kSwap) recipe.op = TensorRecipe::Op::kSwapHalves;
      plan[rule.original + osuffix] = std::move(recipe);
    }
  }
  RETURN_IF_ERROR(Unused(keys, used, "diffusers-format"));
  return plan;
}

const FluxWeightMapping& FluxWeightMappingHandler() {
  static const FluxWeightMapping* handler = new FluxWeightMapping();
  return *handler;
}

}  // namespace ds::flux
