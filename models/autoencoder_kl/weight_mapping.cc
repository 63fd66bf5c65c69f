#include "models/autoencoder_kl/weight_mapping.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"
#include "models/autoencoder_kl/config.h"

namespace ds::autoencoder_kl {
namespace {

using Shape = std::vector<int64_t>;

constexpr char kConvIn[] = "decoder.conv_in.weight";
constexpr char kOriginalMid[] = "decoder.mid.block_1.conv1.weight";
constexpr char kDiffusersMid[] = "decoder.mid_block.resnets.0.conv1.weight";

constexpr char kFluxVariant[] = "flux-vae";
constexpr char kLdmVariant[] = "ldm-vae";

std::string ShapeString(const Shape& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// Probe keys of one naming (diffusers level/resnet indices in, the naming's key out).
struct Naming {
  bool original;
  std::string EncoderResnet(int64_t level, int64_t j) const {
    return original ? absl::StrCat("encoder.down.", level, ".block.", j, ".conv1.weight")
                    : absl::StrCat("encoder.down_blocks.", level, ".resnets.", j, ".conv1.weight");
  }
  std::string AttentionQ(const char* side) const {
    return original ? absl::StrCat(side, ".mid.attn_1.q.weight")
                    : absl::StrCat(side, ".mid_block.attentions.0.to_q.weight");
  }
  const char* name() const { return original ? "original-format" : "diffusers-format"; }
};

absl::StatusOr<Shape> Need(const KeyShapes& keys, const std::string& key, std::size_t rank) {
  auto it = keys.find(key);
  if (it == keys.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AutoencoderKL checkpoint is missing key '", key, "'"));
  }
  if (it->second.size() != rank) {
    return absl::InvalidArgumentError(absl::StrCat("key '", key, "': expected a ", rank,
                                                   "-D tensor, got ", ShapeString(it->second)));
  }
  return it->second;
}

// The config the weights determine; the fields they do not record take the variant's values.
absl::StatusOr<AutoencoderKLConfig> Derive(const KeyShapes& keys, const Naming& n) {
  AutoencoderKLConfig c;
  ASSIGN_OR_RETURN(Shape conv_in, Need(keys, "encoder.conv_in.weight", 4));
  c.in_channels = conv_in[1];
  c.block_out_channels.clear();
  // Levels: encoder levels with a first resnet; each level's width from its first conv.
  // (The bounds only stop runaway loops; Validate() below rejects such counts by name.)
  while (keys.count(n.EncoderResnet(c.num_levels(), 0)) > 0 && c.num_levels() <= 64) {
    ASSIGN_OR_RETURN(Shape conv1, Need(keys, n.EncoderResnet(c.num_levels(), 0), 4));
    c.block_out_channels.push_back(conv1[0]);
  }
  if (c.block_out_channels.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AutoencoderKL checkpoint is missing key '", n.EncoderResnet(0, 0), "'"));
  }
  c.layers_per_block = 0;
  while (keys.count(n.EncoderResnet(0, c.layers_per_block)) > 0 &&
         c.layers_per_block <= (int64_t{1} << 20)) {
    ++c.layers_per_block;
  }
  ASSIGN_OR_RETURN(Shape dec_in, Need(keys, "decoder.conv_in.weight", 4));
  c.latent_channels = dec_in[1];
  ASSIGN_OR_RETURN(Shape enc_out, Need(keys, "encoder.conv_out.weight", 4));
  if (enc_out[0] != 2 * c.latent_channels) {
    return absl::InvalidArgumentError(
        absl::StrCat("key 'encoder.conv_out.weight' ", ShapeString(enc_out),
                     ": expected 2 x latent_channels = ", 2 * c.latent_channels,
                     " output channels (mean and logvar; latent_channels from "
                     "'decoder.conv_in.weight')"));
  }
  ASSIGN_OR_RETURN(Shape dec_out, Need(keys, "decoder.conv_out.weight", 4));
  c.out_channels = dec_out[0];
  const bool enc_attn = keys.count(n.AttentionQ("encoder")) > 0;
  const bool dec_attn = keys.count(n.AttentionQ("decoder")) > 0;
  if (enc_attn != dec_attn) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AutoencoderKL checkpoint has '", n.AttentionQ(enc_attn ? "encoder" : "decoder"),
        "' but not '", n.AttentionQ(enc_attn ? "decoder" : "encoder"),
        "' (mid_block_add_attention applies to both mid blocks)"));
  }
  c.mid_block_add_attention = enc_attn;
  c.use_quant_conv = keys.count("quant_conv.weight") > 0;
  c.use_post_quant_conv = keys.count("post_quant_conv.weight") > 0;
  c.down_block_types.assign(c.block_out_channels.size(), kDownEncoderBlock2D);
  c.up_block_types.assign(c.block_out_channels.size(), kUpDecoderBlock2D);
  if (c.latent_channels == 16 && !c.use_quant_conv && !c.use_post_quant_conv) {
    // FLUX.1's vae/config.json.
    c.scaling_factor = 0.3611;
    c.shift_factor = 0.1159;
    c.sample_size = {1024};
  }
  // Structure only: the group count is not in the weights (a caller's config supplies it).
  AutoencoderKLConfig structure = c;
  structure.norm_num_groups = 1;
  RETURN_IF_ERROR(Annotate(structure.Validate(),
                           absl::StrCat("derived from a ", n.name(), " AutoencoderKL checkpoint")));
  return c;
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
  return absl::InvalidArgumentError(
      absl::StrCat("unexpected keys in a ", std::string(naming),
                   " AutoencoderKL checkpoint: ", absl::StrJoin(extra, ", ")));
}

TensorRecipe Recipe(const std::string& source, const Shape& from, const Shape& to) {
  TensorRecipe r{TensorRecipe::Op::kCopy, {source}};
  if (from != to) {
    r.op = TensorRecipe::Op::kReshape;
    r.shape = to;
  }
  return r;
}

}  // namespace

std::vector<std::string> VaeWeightMapping::VariantNames() const {
  return {kFluxVariant, kLdmVariant};
}

std::vector<std::string> VaeWeightMapping::MarkerKeys() const {
  return {kConvIn, kOriginalMid, kDiffusersMid};
}

std::vector<std::string> VaeWeightMapping::ComponentPrefixes() const {
  return {"vae.", "first_stage_model."};
}

absl::StatusOr<std::optional<WeightMappingDetection>> VaeWeightMapping::Detect(
    const KeyShapes& keys) const {
  if (!keys.count(kConvIn)) return std::nullopt;
  WeightMappingDetection det;
  const bool original = keys.count(kOriginalMid) > 0;
  if (!original && !keys.count(kDiffusersMid)) return std::nullopt;
  det.diffusers_naming = !original;
  det.markers = {kConvIn, original ? kOriginalMid : kDiffusersMid};
  ASSIGN_OR_RETURN(AutoencoderKLConfig c, Derive(keys, Naming{original}));
  const bool flux = c.latent_channels == 16 && !c.use_quant_conv && !c.use_post_quant_conv;
  det.variant = flux ? kFluxVariant : kLdmVariant;
  det.markers.push_back(absl::StrCat("latent_channels ", c.latent_channels));
  det.markers.push_back(c.use_quant_conv || c.use_post_quant_conv ? "quant convs present"
                                                                  : "no quant convs");
  det.config = c.ToJson();
  det.assumed = {"norm_num_groups", "act_fn",       "scaling_factor", "shift_factor",
                 "sample_size",     "latents_mean", "latents_std",    "force_upcast"};
  return det;
}

absl::StatusOr<MappingPlan> VaeWeightMapping::PlanToDiffusers(
    const KeyShapes& keys, const WeightMappingDetection& detection) const {
  MappingPlan plan;
  if (detection.diffusers_naming) {
    for (const auto& [k, shape] : keys) plan[k] = TensorRecipe{TensorRecipe::Op::kCopy, {k}};
    return plan;
  }
  ASSIGN_OR_RETURN(AutoencoderKLConfig c, Derive(keys, Naming{true}));
  std::set<std::string> used;
  for (const VaeParameter& p : VaeParameters(c)) {
    auto it = keys.find(p.original);
    if (it == keys.end()) {
      return absl::InvalidArgumentError(absl::StrCat("AutoencoderKL checkpoint is missing key '",
                                                     p.original, "' (-> '", p.diffusers, "')"));
    }
    used.insert(p.original);
    // Some LDM checkpoints already store the attention projections as linear weights.
    if (it->second != p.original_shape && it->second != p.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("key '", p.original, "': expected ", ShapeString(p.original_shape), ", got ",
                       ShapeString(it->second), " (block_out_channels [",
                       absl::StrJoin(c.block_out_channels, ", "), "], latent_channels ",
                       c.latent_channels, ")"));
    }
    plan[p.diffusers] = Recipe(p.original, it->second, p.shape);
  }
  RETURN_IF_ERROR(Unused(keys, used, "original-format"));
  return plan;
}

absl::StatusOr<MappingPlan> VaeWeightMapping::PlanFromDiffusers(const KeyShapes& keys) const {
  ASSIGN_OR_RETURN(AutoencoderKLConfig c, Derive(keys, Naming{false}));
  MappingPlan plan;
  std::set<std::string> used;
  for (const VaeParameter& p : VaeParameters(c)) {
    auto it = keys.find(p.diffusers);
    if (it == keys.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("diffusers AutoencoderKL state dict is missing key '", p.diffusers, "'"));
    }
    if (it->second != p.shape) {
      return absl::InvalidArgumentError(absl::StrCat("key '", p.diffusers, "': expected ",
                                                     ShapeString(p.shape), ", got ",
                                                     ShapeString(it->second)));
    }
    used.insert(p.diffusers);
    plan[p.original] = Recipe(p.diffusers, p.shape, p.original_shape);
  }
  RETURN_IF_ERROR(Unused(keys, used, "diffusers-format"));
  return plan;
}

const VaeWeightMapping& VaeWeightMappingHandler() {
  static const VaeWeightMapping* handler = new VaeWeightMapping();
  return *handler;
}

}  // namespace ds::autoencoder_kl
