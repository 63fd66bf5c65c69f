// The optional start-up config (--config): models and adapters to load when the server starts.
//
//   {
//     "models": [
//       {"name": "flux-dev", "path": "flux1-dev.safetensors", "dtype": "bfloat16",
//        "device": "cpu", "config": {"axes_dims_rope": [16, 56, 56]}},
//       {"name": "default", "embedded": true}
//     ],
//     "adapters": [
//       {"model": "flux-dev", "name": "style", "path": "loras/style.safetensors", "pin": true,
//        "weight": 0.8}
//     ]
//   }
//
// models[]: name (required); path (a single file or diffusers folder) or "embedded": true (the
// embedded demo model); dtype ("float32" default), device ("cpu" default), config (single files:
// config fields overriding the derived ones). adapters[]: model, name, path (required); pin
// (default false); weight (optional): when given, the adapter is fused into the model with this
// weight after all adapters are loaded (every request then gets it without naming it).
// Relative paths are resolved against --model_root / --adapter_root when set, else against the
// config file's folder. The file is the operator's, so its paths are not confined to the roots.
//
// Reentrant; Preload is as thread-safe as ModelManager.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/model_manager.h"

namespace ds::server {

class Metrics;

struct PreloadModel {
  std::string name;
  std::string path;  // resolved; empty when embedded
  bool embedded = false;
  std::string dtype = "float32";
  std::string device = "cpu";
  nlohmann::json config;  // null or an object
};

struct PreloadAdapter {
  std::string model;
  std::string name;
  std::string path;  // resolved
  bool pin = false;
  std::optional<double> weight;  // fuse with this weight
};

struct PreloadConfig {
  std::vector<PreloadModel> models;
  std::vector<PreloadAdapter> adapters;
};

// Parses the config. `model_dir` / `adapter_dir` resolve relative paths. INVALID_ARGUMENT naming
// the entry and key for anything malformed (unknown keys included, so typos do not pass silently).
absl::StatusOr<PreloadConfig> ParsePreloadConfig(const nlohmann::json& json,
                                                 const std::string& model_dir,
                                                 const std::string& adapter_dir);

// Reads and parses `path` (see ParsePreloadConfig; roots as in the header comment). NOT_FOUND for
// a missing file; INVALID_ARGUMENT for invalid JSON.
absl::StatusOr<PreloadConfig> ReadPreloadConfig(const std::string& path,
                                                const std::string& model_root,
                                                const std::string& adapter_root);

// Loads every model, then every adapter, then fuses the weighted adapters per model. A failure
// does not stop the others (a failed model shows as FAILED in ListModels); returns OK or the
// first error annotated with the entry. `metrics` may be null.
absl::Status Preload(const PreloadConfig& config, ModelManager& models, Metrics* metrics);

}  // namespace ds::server
