// Single-file weight mapping: the interface a model folder implements (WeightMappingHandler) and
// the pure, LibTorch-free plan types the shared single-file loader (single_file.h) executes.
//
// A handler only looks at key names and shapes (the safetensors header), never at tensor data, so
// detection and planning are cheap, testable without tensors, and fuzzable. Executing a plan is
// data movement only: kCopy and kRows produce views of the source (zero copy); kConcatRows and
// kSwapHalves allocate the target once.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ds {

// Key -> shape, as read from a checkpoint header (after prefix stripping).
using KeyShapes = std::map<std::string, std::vector<int64_t>>;

// How one target tensor is made from source tensors. Rows are along dim 0.
struct TensorRecipe {
  enum class Op {
    kCopy,        // target = sources[0]
    kRows,        // target = sources[0][row_begin : row_begin + row_count]
    kConcatRows,  // target = cat(sources, dim 0)
    kSwapHalves,  // target = cat(second half, first half) of sources[0] along dim 0
    kReshape,     // target = sources[0] viewed as `shape` (same element count; e.g. a 1x1 conv
                  // weight [C, C, 1, 1] as a linear weight [C, C])
  };
  Op op = Op::kCopy;
  std::vector<std::string> sources;
  int64_t row_begin = 0;
  int64_t row_count = 0;
  std::vector<int64_t> shape;  // kReshape only
};

// Target key -> recipe.
using MappingPlan = std::map<std::string, TensorRecipe>;

// The shape `recipe` produces from `sources`. INVALID_ARGUMENT naming the source key when a source
// is missing or the shapes do not allow the operation.
absl::StatusOr<std::vector<int64_t>> PlannedShape(const TensorRecipe& recipe,
                                                  const KeyShapes& sources);

// The keys of a single file, split into the model's own keys (known prefixes stripped) and the
// keys of bundled components (text encoders, VAE, ...) that a transformer load leaves out.
struct SingleFileKeys {
  KeyShapes model_keys;                        // stripped key -> shape
  std::map<std::string, std::string> source;   // stripped key -> key in the file
  std::string prefix;                          // the stripped prefix ("" when none)
  std::map<std::string, std::string> bundled;  // key in the file -> reason it is left out
};

// Prefixes that wrap a diffusion model's own keys in single files (ComfyUI / original releases).
const std::vector<std::string>& KnownModelPrefixes();

// Splits `keys`: when some keys carry a known model prefix, those are the model's (prefix
// stripped) and every other key is bundled; otherwise keys under a known bundled-component prefix
// (`vae.`, `first_stage_model.`, `text_encoders.`, `cond_stage_model.`, `conditioner.`, ...) are
// bundled and the rest are the model's.
SingleFileKeys SplitSingleFileKeys(const KeyShapes& keys);

// Splits `keys` for a model that single files bundle under `prefix` (e.g. a VAE under "vae." or
// "first_stage_model."): keys under `prefix` are the model's (prefix stripped), every other key is
// bundled (its bundled-component reason, or "outside the component prefix '<prefix>'").
SingleFileKeys SplitComponentKeys(const KeyShapes& keys, const std::string& prefix);

// What a handler recognised in a checkpoint.
struct WeightMappingDetection {
  std::string variant;               // e.g. "flux-dev"
  bool diffusers_naming = false;     // keys already in diffusers naming (no conversion needed)
  std::vector<std::string> markers;  // the marker keys that decided it
  // The model config derived from the weights (every field the model's config.json has). Fields
  // that cannot be derived from weights hold the variant's defaults and are listed in `assumed`.
  nlohmann::json config;
  std::vector<std::string> assumed;
  // Keys (as given to Detect) the plan leaves out on purpose, with the reason (e.g. a buffer the
  // reference library no longer loads, a tied duplicate); reported as ignored by the loader.
  std::map<std::string, std::string> ignored;
};

// The per-model single-file handler. Implementations are immutable and thread-safe.
class WeightMappingHandler {
 public:
  virtual ~WeightMappingHandler() = default;

  // Names of the variants whose config it resolves from a single file (e.g. "flux-dev"), any order.
  virtual std::vector<std::string> VariantNames() const = 0;

  // Keys whose presence identifies this model's format (either naming), for error reports.
  virtual std::vector<std::string> MarkerKeys() const = 0;

  // Probes `keys` (prefixes already stripped, bundled components removed). std::nullopt: not this
  // model. INVALID_ARGUMENT: it is this model's format but inconsistent (missing key needed to
  // derive the config, contradictory shapes), naming the key.
  virtual absl::StatusOr<std::optional<WeightMappingDetection>> Detect(
      const KeyShapes& keys) const = 0;

  // Plans the conversion of a detected original-format checkpoint to diffusers naming. Every source
  // key must be used: INVALID_ARGUMENT names a missing required key, an unexpected key, or a shape
  // contradicting the derived config (key, expected, got).
  virtual absl::StatusOr<MappingPlan> PlanToDiffusers(
      const KeyShapes& keys, const WeightMappingDetection& detection) const = 0;

  // Plans the reverse conversion (diffusers naming -> original), which round-trips exactly.
  virtual absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes& keys) const = 0;

  // Prefixes under which checkpoints bundle this model as a component of another (a VAE under
  // "vae." / "first_stage_model."). The single-file loader probes the keys under such a prefix
  // (stripped) when the file is asked for as this model, or when every key of the file carries the
  // prefix; never otherwise, so an all-in-one checkpoint still resolves to its main model.
  // Default: none.
  virtual std::vector<std::string> ComponentPrefixes() const { return {}; }
};

}  // namespace ds
