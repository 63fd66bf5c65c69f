// Model-agnostic single-file loading (the design proposal's `from_single_file`): open (mmap),
// strip known prefixes, set bundled components aside, ask every registered model's
// WeightMappingHandler whether the file is its format and which variant, build the model with the
// derived config, map keys, load strictly, report.
//
// Zero copy: a target tensor that maps 1:1 (or is a row slice) of a source tensor with the model's
// dtype on CPU becomes the module's parameter storage itself (a view of the private file mapping);
// only tensors that must be rearranged (concatenated, half-swapped) or converted are materialized.
//
// Thread-safety: the functions are reentrant; each call owns what it builds.
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/model.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/weight_mapping.h"

namespace ds {

struct SingleFileOptions {
  ModelOptions model;
  // Resolve only this registered model ("" = ask every registered model's handler).
  std::string model_class;
  // Config fields that replace the derived ones (e.g. axes_dims_rope, which weights do not
  // record). An object or null.
  nlohmann::json config_override;
  // Reject NaN/Inf weights (reads every tensor once).
  bool validate_finite = false;
};

struct SingleFileReport {
  std::string path;
  std::string model_class;  // e.g. "FluxTransformer2DModel"
  std::string variant;      // e.g. "flux-dev"
  bool diffusers_naming = false;
  std::string prefix;                          // stripped key prefix ("" when none)
  std::vector<std::string> markers;            // what decided the detection
  nlohmann::json config;                       // the config the model is built with
  std::vector<std::string> assumed;            // config fields not derivable from the weights
  int64_t tensors_mapped = 0;                  // target tensors produced
  int64_t tensors_zero_copy = 0;               // of which are views of the file mapping
  uint64_t bytes = 0;                          // bytes of the mapped target tensors
  std::map<std::string, std::string> ignored;  // file key -> why it was left out
  double seconds = 0;                          // wall time of the call
  std::string ToString() const;
  nlohmann::json ToJson() const;
};

// The outcome of probing a file: which model, the plan, and the report so far (no tensor data is
// read).
struct SingleFileInspection {
  const ModelSpec* spec = nullptr;
  WeightMappingDetection detection;
  SingleFileKeys keys;
  MappingPlan plan;
  SingleFileReport report;
};

// Reads only the header. When no registered model recognises the file's own keys, models that
// checkpoints bundle as components are probed on the keys under their prefixes (see
// WeightMappingHandler::ComponentPrefixes). NOT_FOUND for a missing file; INVALID_ARGUMENT for a
// corrupt header, no or
// several matching models (listing the candidates and the marker keys found), or a file that is
// the detected model's format but inconsistent (the key at fault named).
absl::StatusOr<SingleFileInspection> InspectSingleFile(const std::string& path,
                                                       const SingleFileOptions& options = {});

// Executes a plan over source tensors (keys as in the plan's sources). kCopy/kRows give views.
// INVALID_ARGUMENT naming the source key when a recipe cannot be applied.
absl::StatusOr<TensorMap> ExecuteMappingPlan(const MappingPlan& plan, const TensorMap& sources);

struct LoadedSingleFile {
  std::unique_ptr<DiffusionModel> model;
  SingleFileReport report;
};

// Detects, builds and strictly loads the model. Errors as InspectSingleFile, plus INVALID_ARGUMENT
// for shape mismatches against the built model (naming the target key, its source key, expected and
// got) and for NaN/Inf when options.validate_finite. Nothing half-loaded is ever returned.
absl::StatusOr<LoadedSingleFile> LoadSingleFile(const std::string& path,
                                                const SingleFileOptions& options = {});

// Converts a single file to a diffusers-format folder: OUT_DIR/config.json and
// OUT_DIR/diffusion_pytorch_model.safetensors (written atomically).
absl::StatusOr<SingleFileReport> ConvertSingleFile(const std::string& path,
                                                   const std::string& out_dir,
                                                   const SingleFileOptions& options = {});

}  // namespace ds
