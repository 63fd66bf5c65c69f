// Device maps (accelerate's `device_map`, diffusers' `_no_split_modules`): which device each part
// of a model lives on when one device cannot hold it. Model-agnostic: a map is computed over the
// module tree and applied by moving parameters and buffers; a model whose forward moves its
// activations to each part's device (ModelSpec::device_map) can then run across devices.
//
// Sequential strategy (accelerate's infer_auto_device_map with its "sequential" fill): the units
// are the root's own tensors and children, in registration order (the order of the forward for
// models registered that way, as Flux is). Each unit goes to the current device when its bytes
// (parameters and buffers, numel × element size; what ParameterBytes counts, so 8-bit storage
// counts its codes and scales) fit in what is left of that device's budget. Otherwise a unit with
// children whose class is not in `no_split_modules` is replaced by its own tensors and children
// (recursively, in order); a unit that cannot be split (a leaf, or a no-split class such as
// FluxTransformerBlock) closes the current device and moves on to the next one. A unit that fits
// nowhere is RESOURCE_EXHAUSTED naming it. Unlike accelerate no space is reserved for offloading
// or activations: budgets are weight bytes only.
//
// Explicit strategy: module (or tensor) names -> devices; each tensor goes where its longest
// matching name (equal, or a dotted prefix; "" matches everything) says. Every tensor must be
// covered, and the tensors of a module whose class is in `no_split_modules` must all land on one
// device.
//
// Thread-safety: the functions are reentrant; ApplyDeviceMap needs exclusive access to the module.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "handlers/model.h"

namespace ds {

// One placed unit: a module or a single tensor (a parameter or buffer that is not inside a placed
// module, e.g. a split module's own parameters).
struct DevicePlacement {
  std::string name;         // dotted module or tensor name ("" = the whole model)
  size_t device_index = 0;  // index into DeviceMap::devices
  int64_t bytes = 0;        // bytes of the tensors it places
  bool tensor = false;      // whether `name` is a tensor rather than a module
};

struct DeviceMap {
  // The devices placements refer to: for the sequential strategy the budget entries in order (a
  // device may repeat), for the explicit one the distinct devices in order of first use.
  std::vector<torch::Device> devices;
  std::vector<int64_t> budgets;     // sequential: each entry's budget; explicit: empty
  std::vector<int64_t> used_bytes;  // per entry of `devices`
  // In registration order; together they cover every parameter and buffer exactly once.
  std::vector<DevicePlacement> placements;

  // The device entry of a dotted tensor name (the placement with the longest matching name), or -1
  // when no placement covers it.
  int64_t DeviceIndexOf(const std::string& tensor_name) const;
  // One line per device entry: "cpu#0 1.2 MiB of 2.0 MiB: time_text_embed, ...,
  // transformer_blocks.0" (runs of consecutive block indices are written a..b).
  std::string Summary() const;
};

// The class name of a module as diffusers spells it: LibTorch's demangled type name without
// namespace and "Impl" suffix ("ds::flux::FluxTransformerBlockImpl" -> "FluxTransformerBlock").
std::string ModuleClassNameOf(const torch::nn::Module& module);

// "cpu", "cuda", "cuda:N". INVALID_ARGUMENT naming the string for anything else; UNIMPLEMENTED
// for a CUDA device when LibTorch or the machine has no CUDA, or N >= the device count.
absl::StatusOr<torch::Device> ParseMapDevice(absl::string_view name);

// Checks the devices and budgets of a sequential map: INVALID_ARGUMENT for no entries, a negative
// budget or a device type other than cpu/cuda (naming the entry); UNIMPLEMENTED for CUDA without
// CUDA (or an index beyond the device count).
absl::Status ValidateDeviceBudgets(const std::vector<std::pair<torch::Device, int64_t>>& budgets);

// The sequential strategy (see the top of this file). Errors: ValidateDeviceBudgets's, and
// RESOURCE_EXHAUSTED naming the first unit that fits on no remaining device (its class, bytes,
// and whether it is a no-split module).
absl::StatusOr<DeviceMap> InferSequentialDeviceMap(
    const torch::nn::Module& module, const std::vector<std::string>& no_split_modules,
    const std::vector<std::pair<torch::Device, int64_t>>& budgets);

// The explicit strategy. INVALID_ARGUMENT naming the entry for a name that is neither a module nor
// a tensor of `module` or appears twice, naming the first tensor no entry covers, or naming a
// no-split module whose tensors the entries spread over several devices; UNIMPLEMENTED for CUDA
// without CUDA.
absl::StatusOr<DeviceMap> ExplicitDeviceMap(
    const torch::nn::Module& module, const std::vector<std::string>& no_split_modules,
    const std::vector<std::pair<std::string, torch::Device>>& placement);

// Dispatches on options.strategy ("sequential" or "explicit"). INVALID_ARGUMENT for another
// strategy; otherwise the strategy's errors.
absl::StatusOr<DeviceMap> ComputeDeviceMap(const torch::nn::Module& module,
                                           const std::vector<std::string>& no_split_modules,
                                           const DeviceMapOptions& options);

// The device map of a request (the API's LoadSingleFileRequest.device_map and
// max_memory_bytes): "" = none (both empty); "sequential" with `max_memory_bytes` device -> bytes
// (ordered cuda by index, then cpu); or a JSON object {"module": "device", ...} = explicit.
// INVALID_ARGUMENT naming the field ("device_map" / "max_memory_bytes") for an unknown value, bad
// JSON, a bad device string or budget, sequential without budgets, or budgets without sequential;
// UNIMPLEMENTED for CUDA without CUDA.
absl::StatusOr<DeviceMapOptions> ParseDeviceMapRequest(
    absl::string_view device_map, const std::map<std::string, int64_t>& max_memory_bytes);

// Moves every parameter and buffer of `module` to its placement's device in place (the tensor
// objects stay the same: set_data, as Module::to does). INVALID_ARGUMENT naming a tensor the map
// does not cover (a map of another module); RESOURCE_EXHAUSTED when a device runs out of memory;
// INTERNAL for other LibTorch failures (the module may then be partly moved: discard it).
absl::Status ApplyDeviceMap(torch::nn::Module& module, const DeviceMap& map);

// Where the tensors of `module` are, by device, in registration order of first use: "cpu 12.3 MiB
// (412 tensors); cuda:0 40.0 MiB (900 tensors)".
std::string DevicePlacementSummary(const torch::nn::Module& module);

}  // namespace ds
