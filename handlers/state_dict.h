// Strict state-dict loading into LibTorch modules, and diffusers-format model folders.
#pragma once

#include <torch/nn/module.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/safetensors.h"

namespace ds {

// What a strict load found wrong (all lists sorted by name).
struct StateDictReport {
  std::vector<std::string> missing;         // in the module, not in the state dict
  std::vector<std::string> unexpected;      // in the state dict, not in the module
  std::vector<std::string> shape_mismatch;  // "name: module [a, b] vs checkpoint [c, d]"
  bool ok() const { return missing.empty() && unexpected.empty() && shape_mismatch.empty(); }
  std::string ToString() const;  // a readable multi-line summary ("" when ok)
};

// The module's parameters and buffers by their dotted names (the diffusers naming).
TensorMap NamedTensors(const torch::nn::Module& module);

// Checks `state_dict` against `module` without changing anything.
StateDictReport CheckStateDict(const torch::nn::Module& module, const TensorMap& state_dict);

// Loads `state_dict` into `module` strictly: every parameter/buffer must be present with the same
// shape and no extra key may exist. Values are copied with conversion to each parameter's own
// dtype and device. On any problem returns INVALID_ARGUMENT listing the missing, unexpected and
// shape-mismatched keys by name (`source` prefixes the message) and leaves the module exactly as it
// was (nothing is copied before everything has been validated; a failing copy restores the old
// values). If `report` is non-null it receives the findings.
// Thread-safety: the caller must ensure no one else uses `module` during the call.
absl::Status LoadStateDict(torch::nn::Module& module, const TensorMap& state_dict,
                           std::string_view source = "state dict",
                           StateDictReport* report = nullptr);

// Fills every parameter of `module` deterministically from `seed`, independent of its dtype and
// device (values are drawn in float32 on the CPU in name order, then converted): weights of rank
// >= 2 (matrices, convolution kernels) and their biases ~ U(-1/√fan_in, 1/√fan_in) with fan_in =
// numel / rows, like torch.nn.Linear's and ConvNd's default initialization; other parameters
// without such a ".weight" sibling (norm scales, embeddings of rank 1) ~ 1 + U(-0.1, 0.1). Model-agnostic; for tests,
// benchmarks and the server's embedded demo model (real weights come from a state dict). Needs
// exclusive access to the module. LibTorch errors propagate as exceptions (call it inside
// TorchCall where they must not escape).
void InitRandomWeights(torch::nn::Module& module, uint64_t seed);

// Reads a JSON file. NOT_FOUND if absent; INVALID_ARGUMENT (with file and parse position) if
// invalid.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);

// A diffusers-format model folder: `config.json` plus `diffusion_pytorch_model.safetensors`, or
// `diffusion_pytorch_model.safetensors.index.json` with its shards (also `model.safetensors[...]`,
// as transformers names them).
struct ModelFolder {
  std::string dir;        // the folder the files were found in
  nlohmann::json config;  // parsed config.json
  TensorMap weights;      // zero-copy views over the mapped files
};

// Opens `dir` as a model folder. If `dir` has no config.json but has a `subfolder` (e.g. a pipeline
// root with "transformer/"), that subfolder is used. NOT_FOUND if neither has the files;
// INVALID_ARGUMENT for invalid files.
absl::StatusOr<ModelFolder> OpenModelFolder(const std::string& dir,
                                            const std::string& subfolder = "transformer");

}  // namespace ds
