// Demo pipelines: tiny pipelines with deterministic random weights that a model folder declares
// (PipelineSpec::demos) and that are written to real files — a diffusers pipeline folder plus the
// original-format single files of every component whose model has a single-file handler — so that
// the server's embedded default and the tests load them through the real loading code.
//
// Model-agnostic: a recipe names its components by registry class name with their config.json;
// WriteDemoPipeline builds each through the ModelRegistry, fills it with InitRandomWeights, saves
// the state dict, and asks the model's WeightMappingHandler for the reverse mapping
// (PlanFromDiffusers) to write the single file.
//
// Layout written under `<root>/<recipe.name>/`:
//   pipeline/model_index.json, pipeline/scheduler/scheduler_config.json,
//   pipeline/<component>/{config.json, diffusion_pytorch_model.safetensors}
//   single_file/<component single_file name>            (e.g. flux-tiny.safetensors, ae.safetensors)
//   example_inputs.safetensors                           (when the recipe lists example inputs)
//   manifest.json   (written last: the recipe's digest and every file's SHA-256)
//
// Thread- and process-safety: WriteDemoPipeline takes an exclusive flock on
// `<root>/.<name>.lock`, builds into a fresh temporary folder and renames it into place, so
// concurrent callers (threads or server processes sharing `root`) never see a partial folder.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ds {

struct DemoComponent {
  std::string name;        // the model_index.json key: "transformer", "vae", ...
  std::string class_name;  // registry class name: "FluxTransformer2DModel", "AutoencoderKL"
  nlohmann::json config;   // the component's config.json (without _class_name)
  // File name under single_file/ for the original-format single file; "" = none.
  std::string single_file;
};

struct DemoPipelineRecipe {
  std::string name;            // folder and instance name, e.g. "flux-tiny"
  std::string pipeline_class;  // model_index.json "_class_name", e.g. "FluxPipeline"
  std::string description;     // one line for listings
  std::vector<DemoComponent> components;
  // scheduler/scheduler_config.json (with its "_class_name"); null = no scheduler entry.
  nlohmann::json scheduler_config;
  // model_index.json entries written as [null, null] (components the pipeline class lists but
  // the demo does not have, e.g. text encoders).
  std::vector<std::string> absent_components;
  uint64_t seed = 0;  // component i is initialized with InitRandomWeights(seed + i)
  // Request tensors written to example_inputs.safetensors, drawn from N(0, 1) with `seed` (e.g.
  // prompt_embeds for a pipeline without text encoders), so the demo can be run at once.
  std::vector<std::pair<std::string, std::vector<int64_t>>> example_inputs;
};

struct DemoPipelineFiles {
  std::string dir;                                  // <root>/<name>
  std::string pipeline_dir;                         // <root>/<name>/pipeline
  std::map<std::string, std::string> single_files;  // component name -> path
  std::string example_inputs;                       // path; "" when the recipe lists none
  bool written = false;  // false: an existing, verified copy was reused
  double seconds = 0;
};

// The canonical JSON of a recipe (what manifest.json records the digest of).
nlohmann::json DemoRecipeJson(const DemoPipelineRecipe& recipe);

// Makes sure `<root>/<recipe.name>` holds the recipe's files: reuses an existing copy whose
// manifest records the same recipe digest and whose files all have the recorded SHA-256;
// otherwise (first run, another recipe, a missing or modified file) writes it anew. Creates
// `root` if needed. INVALID_ARGUMENT for a recipe with an empty or unsafe name (not
// [A-Za-z0-9._-]+), no components, a duplicate component, or an unknown component class (naming
// it); the model's own errors for a bad config (annotated with the component); INTERNAL / the
// filesystem's errors naming the path for I/O failures (e.g. PERMISSION_DENIED for an unwritable
// root).
absl::StatusOr<DemoPipelineFiles> WriteDemoPipeline(const DemoPipelineRecipe& recipe,
                                                    const std::string& root);

}  // namespace ds
