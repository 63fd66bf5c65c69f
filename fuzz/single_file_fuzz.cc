// libFuzzer target: single-file checkpoint detection and weight mapping (handlers/single_file.h,
// handlers/weight_mapping.h) over every registered model's WeightMappingHandler (Flux transformer,
// AutoencoderKL, CLIP text, T5 encoder), as LoadSingleFile runs on a user's checkpoint.
//
// Input: a checkpoint in the TensorListInput text form (fuzz/fuzz_util.h): lines
//   <key> TAB <shape "16,4"> [TAB <dtype> [TAB <value>]]   and   @<metadata key>=<value>,
// at most 2^16 elements in all. The harness builds the safetensors file in memory (a memfd) and
// runs:
//   SplitSingleFileKeys + every handler's Detect on the keys (pure), and for a detection
//   PlanToDiffusers and PlannedShape;
//   InspectSingleFile(path) (the loader's probe: prefixes, bundled components, component models);
//   for an inspected file: ExecuteMappingPlan over the file's tensors, then the reverse plan
//   (PlanFromDiffusers) of the mapped keys, then LoadSingleFile (builds the model and loads it
//   strictly; the model is at most the input's 2^16 elements, since every parameter must be in
//   the file).
// Any absl::Status error is fine. Findings: crashes, sanitizer reports, uncaught exceptions and
// broken invariants (Require): an error code other than the documented INVALID_ARGUMENT (INTERNAL
// for LibTorch failures), an executed tensor whose shape differs from the planned one, a mapped
// checkpoint that the handler cannot plan back to its original naming, or a reverse plan that
// disagrees with the original shapes.
//
// Seeds: DS_FUZZ_WRITE_SEEDS=<dir> single_file_fuzz_replay writes fuzz/corpus/single_file/: the
// original-naming keys of tiny models of every registered class (from their handlers'
// PlanFromDiffusers), prefixed and bundled layouts, diffusers naming, and near-valid variants.
#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/weight_mapping.h"

namespace {

using ds::KeyShapes;
using ds::MappingPlan;
using ds::TensorMap;
using ds::fuzz::Require;
using ds::fuzz::TensorListInput;

bool InvalidOrInternal(const absl::Status& s) {
  return s.code() == absl::StatusCode::kInvalidArgument || s.code() == absl::StatusCode::kInternal;
}

void ProbeHandlers(const KeyShapes& shapes) {
  const ds::SingleFileKeys split = ds::SplitSingleFileKeys(shapes);
  for (const ds::ModelSpec* spec : ds::ModelRegistry::Global().List()) {
    if (spec->weight_mapping == nullptr) continue;
    const ds::WeightMappingHandler& h = *spec->weight_mapping;
    auto detected = h.Detect(split.model_keys);
    if (!detected.ok()) {
      Require(detected.status().code() == absl::StatusCode::kInvalidArgument,
              "Detect errors are INVALID_ARGUMENT");
      continue;
    }
    auto back = h.PlanFromDiffusers(split.model_keys);
    if (!back.ok()) Require(InvalidOrInternal(back.status()), "PlanFromDiffusers status code");
    if (!detected->has_value()) continue;
    auto plan = h.PlanToDiffusers(split.model_keys, **detected);
    if (!plan.ok()) {
      Require(plan.status().code() == absl::StatusCode::kInvalidArgument,
              "PlanToDiffusers errors are INVALID_ARGUMENT");
      continue;
    }
    for (const auto& entry : *plan) {
      auto shape = ds::PlannedShape(entry.second, split.model_keys);
      if (!shape.ok()) {
        Require(shape.status().code() == absl::StatusCode::kInvalidArgument,
                "PlannedShape errors are INVALID_ARGUMENT");
      }
    }
  }
}

// The nlohmann config override LoadSingleFile needs for RoPE axes the weights do not record.
nlohmann::json RopeOverride(const nlohmann::json& config) {
  if (!config.is_object() || !config.contains("attention_head_dim") ||
      !config["attention_head_dim"].is_number_integer()) {
    return nullptr;
  }
  const int64_t h = config["attention_head_dim"].get<int64_t>();
  if (h < 6 || h % 2 != 0) return nullptr;
  return {{"axes_dims_rope", {2, 2, h - 4}}};
}

void Run(const TensorListInput& input) {
  auto image = input.ToSafetensors();
  if (!image.ok()) return;
  const ds::fuzz::MemFile file(*image);
  auto opened = ds::SafetensorsFile::Open(file.path());
  Require(opened.ok(), "a serialized image opens");
  KeyShapes shapes;
  for (const auto& t : (*opened)->header().tensors) shapes[t.name] = t.shape;
  ProbeHandlers(shapes);

  auto inspected = ds::InspectSingleFile(file.path());
  if (!inspected.ok()) {
    Require(inspected.status().code() == absl::StatusCode::kInvalidArgument,
            "InspectSingleFile errors are INVALID_ARGUMENT");
    return;
  }
  Require(inspected->spec != nullptr && inspected->spec->weight_mapping != nullptr,
          "an inspection names a model with a handler");
  TensorMap sources;
  for (const auto& entry : inspected->plan) {
    for (const std::string& key : entry.second.sources) {
      auto in_file = inspected->keys.source.find(key);
      Require(in_file != inspected->keys.source.end(), "a planned source is a key of the file");
      auto t = (*opened)->Get(in_file->second);
      if (!t.ok()) return;  // INTERNAL for an F8 copy that LibTorch refuses: not this target's
      sources[key] = *t;
    }
  }
  auto mapped = ds::ExecuteMappingPlan(inspected->plan, sources);
  if (!mapped.ok()) {
    Require(InvalidOrInternal(mapped.status()), "ExecuteMappingPlan status code");
    return;
  }
  KeyShapes mapped_shapes;
  for (const auto& entry : inspected->plan) {
    auto planned = ds::PlannedShape(entry.second, inspected->keys.model_keys);
    Require(planned.ok(), "an inspected plan has planned shapes");
    auto it = mapped->find(entry.first);
    Require(it != mapped->end(), "every planned target is produced");
    Require(it->second.sizes().vec() == *planned, "executed shape == planned shape");
    mapped_shapes[entry.first] = *planned;
  }

  // Back to the original naming: every original key the reverse plan names has its shape. Only
  // for an original-format file: a diffusers-named one maps 1:1 without a completeness check
  // (LoadSingleFile's strict load checks it), so its keys may not form a whole model.
  if (!inspected->detection.diffusers_naming) {
    auto back = inspected->spec->weight_mapping->PlanFromDiffusers(mapped_shapes);
    Require(back.ok(), "a mapped checkpoint plans back to its original naming");
    for (const auto& entry : *back) {
      auto shape = ds::PlannedShape(entry.second, mapped_shapes);
      Require(shape.ok(), "the reverse plan has planned shapes");
      auto original = inspected->keys.model_keys.find(entry.first);
      if (original != inspected->keys.model_keys.end()) {
        Require(original->second == *shape, "the reverse plan restores the original shapes");
      }
    }
  }

  ds::SingleFileOptions options;
  options.config_override = RopeOverride(inspected->report.config);
  auto loaded = ds::LoadSingleFile(file.path(), options);
  if (!loaded.ok()) {
    Require(InvalidOrInternal(loaded.status()), "LoadSingleFile status code");
  } else {
    Require(loaded->model != nullptr, "a loaded single file has a model");
    Require(loaded->report.model_class == inspected->report.model_class,
            "the load agrees with the inspection");
  }
}

// ---------------------------------------------------------------------------------------------
// Seeds.

// The original-naming shapes of a tiny model of `class_name` built with `config`.
std::optional<KeyShapes> OriginalShapes(const std::string& class_name, const nlohmann::json& config,
                                        KeyShapes* diffusers) {
  auto spec = ds::ModelRegistry::Global().Find(class_name);
  if (!spec.ok() || (*spec)->weight_mapping == nullptr) return std::nullopt;
  auto model = (*spec)->factory(config, ds::ModelOptions{});
  if (!model.ok()) {
    std::fprintf(stderr, "seed model %s: %s\n", class_name.c_str(),
                 model.status().ToString().c_str());
    return std::nullopt;
  }
  KeyShapes shapes;
  for (const auto& entry : ds::NamedTensors((*model)->module())) {
    shapes[entry.first] = entry.second.sizes().vec();
  }
  auto plan = (*spec)->weight_mapping->PlanFromDiffusers(shapes);
  if (!plan.ok()) {
    std::fprintf(stderr, "seed plan %s: %s\n", class_name.c_str(),
                 plan.status().ToString().c_str());
    return std::nullopt;
  }
  KeyShapes out;
  for (const auto& entry : *plan) {
    auto shape = ds::PlannedShape(entry.second, shapes);
    Require(shape.ok(), "seed plan shapes");
    out[entry.first] = *shape;
  }
  if (diffusers != nullptr) *diffusers = shapes;
  return out;
}

std::string Text(const KeyShapes& shapes, const std::string& prefix = "",
                 const std::string& dtype = "") {
  std::string s;
  for (const auto& entry : shapes)
    s += TensorListInput::Line(prefix + entry.first, entry.second, dtype);
  return s;
}

void WriteSeeds(ds::fuzz::SeedWriter& w) {
  const nlohmann::json flux = {{"num_layers", 1},
                               {"num_single_layers", 1},
                               {"attention_head_dim", 8},
                               {"num_attention_heads", 2},
                               {"in_channels", 4},
                               {"joint_attention_dim", 8},
                               {"pooled_projection_dim", 8},
                               {"guidance_embeds", true},
                               {"axes_dims_rope", {2, 2, 4}}};
  KeyShapes flux_diffusers;
  auto bfl = OriginalShapes("FluxTransformer2DModel", flux, &flux_diffusers);
  Require(bfl.has_value(), "the tiny Flux seed model builds");
  w.Write("flux_bfl.txt", Text(*bfl));
  w.Write("flux_bfl_bf16.txt", Text(*bfl, "", "BF16"));
  w.Write("flux_diffusers.txt", Text(flux_diffusers));
  w.Write("flux_diffusers_prefixed.txt", Text(flux_diffusers, "model.diffusion_model."));
  nlohmann::json schnell_cfg = flux;
  schnell_cfg["guidance_embeds"] = false;
  if (auto schnell = OriginalShapes("FluxTransformer2DModel", schnell_cfg, nullptr)) {
    w.Write("flux_schnell.txt", Text(*schnell));
  }
  nlohmann::json fill_cfg = flux;
  fill_cfg["in_channels"] = 12;
  fill_cfg["out_channels"] = 4;
  if (auto fill = OriginalShapes("FluxTransformer2DModel", fill_cfg, nullptr)) {
    w.Write("flux_fill_like.txt", Text(*fill));
  }

  const nlohmann::json vae = {{"_class_name", "AutoencoderKL"},
                              {"block_out_channels", {4, 8}},
                              {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
                              {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
                              {"layers_per_block", 1},
                              {"latent_channels", 4},
                              {"norm_num_groups", 4},
                              {"in_channels", 3},
                              {"out_channels", 3},
                              {"use_quant_conv", false},
                              {"use_post_quant_conv", false}};
  auto ae = OriginalShapes("AutoencoderKL", vae, nullptr);
  if (ae) {
    w.Write("vae_original.txt", Text(*ae));
    w.Write("vae_first_stage.txt", Text(*ae, "first_stage_model."));
  }
  const nlohmann::json clip = {{"architectures", {"CLIPTextModel"}},
                               {"hidden_size", 16},
                               {"intermediate_size", 32},
                               {"num_attention_heads", 2},
                               {"num_hidden_layers", 1},
                               {"max_position_embeddings", 8},
                               {"projection_dim", 16},
                               {"vocab_size", 48}};
  auto clip_keys = OriginalShapes("CLIPTextModel", clip, nullptr);
  if (clip_keys) w.Write("clip_original.txt", Text(*clip_keys));
  const nlohmann::json t5 = {{"architectures", {"T5EncoderModel"}},
                             {"d_model", 16},
                             {"d_ff", 32},
                             {"d_kv", 8},
                             {"num_heads", 2},
                             {"num_layers", 1},
                             {"feed_forward_proj", "gated-gelu"},
                             {"vocab_size", 48}};
  auto t5_keys = OriginalShapes("T5EncoderModel", t5, nullptr);
  if (t5_keys) w.Write("t5_original.txt", Text(*t5_keys));

  // An all-in-one checkpoint: the transformer under model.diffusion_model. plus bundled parts.
  std::string bundled = Text(*bfl, "model.diffusion_model.");
  if (ae) bundled += Text(*ae, "vae.");
  if (clip_keys) bundled += Text(*clip_keys, "text_encoders.clip_l.");
  w.Write("flux_all_in_one.txt", bundled);

  // Near-valid variants of the BFL file.
  KeyShapes missing = *bfl;
  missing.erase(missing.begin());
  w.Write("bad_flux_missing_key.txt", Text(missing));
  KeyShapes extra = *bfl;
  extra["double_blocks.0.img_attn.gizmo.weight"] = {4, 4};
  w.Write("bad_flux_extra_key.txt", Text(extra));
  KeyShapes wrong = *bfl;
  for (auto& entry : wrong) {
    if (entry.second.size() == 2) {
      entry.second[0] += 1;
      break;
    }
  }
  w.Write("bad_flux_shape.txt", Text(wrong));
  KeyShapes gap = *bfl;
  gap["double_blocks.3.img_attn.qkv.weight"] = {48, 16};
  w.Write("bad_flux_block_gap.txt", Text(gap));
  KeyShapes odd = *bfl;
  odd["final_layer.adaLN_modulation.1.weight"] = {31, 16};
  odd["final_layer.adaLN_modulation.1.bias"] = {31};
  w.Write("bad_flux_odd_modulation.txt", Text(odd));
  w.Write("bad_unknown.txt", "encoder.w\t2\n");
  w.Write("bad_ambiguous_prefix.txt", Text(*bfl, "model.diffusion_model.") + Text(*bfl));
  w.Finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (auto seeds = ds::fuzz::SeedWriter::FromEnv()) WriteSeeds(*seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  auto input = TensorListInput::Decode(std::string_view(reinterpret_cast<const char*>(data), size));
  if (input.has_value()) Run(*input);
  return 0;
}
