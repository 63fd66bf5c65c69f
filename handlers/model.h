// The model-agnostic interface every model family implements, and the options to build one.
#pragma once

#include <c10/util/Type.h>
#include <torch/nn/module.h>
#include <torch/torch.h>
#include <torch/types.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/group_offloading.h"
#include "handlers/lora_context.h"
#include "handlers/safetensors.h"

namespace ds {

// The 8-bit float formats of layerwise casting's 8-bit storage (OCP FP8; LibTorch 1.13 has no
// float8 dtype, so the codes are stored as uint8, see handlers/layerwise_casting.h).
enum class Float8Format {
  kE4M3FN,  // "float8_e4m3fn": 4 exponent bits (bias 7), 3 mantissa bits, max 448, no infinities
  kE5M2,    // "float8_e5m2": 5 exponent bits (bias 15), 2 mantissa bits, max 57344
};

// How to place a model's modules on several devices (handlers/device_map.h; accelerate's
// device_map). Honoured only by models whose spec sets ModelSpec::device_map.
struct DeviceMapOptions {
  // "" (default): no map, everything on ModelOptions::device. "sequential": modules in registration
  // order fill `budgets` one device after the other (accelerate's infer_auto_device_map), a module
  // whose class is in the model's `_no_split_modules` never split across devices. "explicit":
  // `placement` says where each module goes.
  std::string strategy;
  // "sequential": the devices in fill order, each with its budget in bytes of parameters and
  // buffers. A device may appear more than once (each entry is filled separately).
  std::vector<std::pair<torch::Device, int64_t>> budgets;
  // "explicit": dotted module name ("" = the whole model) -> device; each tensor goes where its
  // longest matching name says.
  std::vector<std::pair<std::string, torch::Device>> placement;
  bool enabled() const { return !strategy.empty(); }
};

// How to build a model instance.
struct ModelOptions {
  // Compute dtype, and storage dtype of the weights unless `storage_dtype` is set:
  // torch::kFloat32 (default), kBFloat16 or kFloat16.
  torch::Dtype dtype = torch::kFloat32;
  // Device to place the weights on: CPU (default) or CUDA ("cuda:0").
  torch::Device device = torch::kCPU;
  // Allocate parameters without initializing them (no memory is touched). Only for loaders that
  // then assign or copy every parameter (single-file loading); a model used without that holds
  // garbage.
  bool uninitialized_parameters = false;
  // Layerwise casting (handlers/layerwise_casting.h; diffusers' enable_layerwise_casting): when
  // set (kBFloat16 or kFloat16, narrower than `dtype`), the weights and biases of the model's
  // Linear/Conv/Embedding layers not matching the skip patterns are stored in this dtype and
  // upcast to `dtype` one layer at a time while that layer runs; everything else (skipped layers,
  // norm scales, LoRA adapters) stays in `dtype`. Outputs then equal those of the model computed in
  // `dtype` with those weights rounded to `storage_dtype`. Only models whose spec sets
  // ModelSpec::layerwise_casting honour it; the loaders refuse it (UNIMPLEMENTED) for others.
  // Unset (default): every weight is stored in `dtype`.
  //
  // torch::kByte selects 8-bit float storage: the weights (rank >= 2 parameters) of the selected
  // layers are stored as OCP FP8 codes in `float8_format` (uint8) with a float32 scale per output
  // row (a buffer "<parameter>_scale" beside the parameter); their biases stay in `dtype`. Outputs
  // then equal those of the model computed in `dtype` with each such weight replaced by
  // decode(code) x scale (handlers/layerwise_casting.h).
  std::optional<torch::Dtype> storage_dtype;
  // With storage_dtype torch::kByte: the 8-bit float format of the codes.
  Float8Format float8_format = Float8Format::kE4M3FN;
  // With `storage_dtype`: replaces the skip patterns (regular expressions searched in each module
  // name and its ancestors' names; diffusers' `skip_modules_pattern`). Unset (default): diffusers'
  // defaults plus the model's `_keep_in_fp32_modules` and `_skip_layerwise_casting_patterns`.
  std::optional<std::vector<std::string>> layerwise_casting_skip_patterns;
  // Multi-device placement applied by the loaders after the weights are loaded (see
  // DeviceMapOptions). `device` stays the device inputs are taken to and outputs returned on.
  DeviceMapOptions device_map;
  // Group offloading (handlers/group_offloading.h; diffusers' enable_group_offload with
  // offload_type="block_level"): when set, the loaders (LoadModelFromFolder, LoadSingleFile) move
  // the model's repeated blocks, in groups of `blocks_per_group`, to the offload device once the
  // weights are loaded (ApplyGroupOffloading in registry.h), and its forward brings each group back
  // only while it runs. Outputs are bit for bit those of the resident model. Only models whose spec
  // sets ModelSpec::group_offloading honour it; the loaders refuse it (UNIMPLEMENTED) for others.
  // Unset (default): every weight stays on `device`.
  std::optional<GroupOffloadingOptions> group_offloading;
};

// How module constructors on this thread allocate parameters (see NewParameter).
class ScopedUninitializedParameters {
 public:
  explicit ScopedUninitializedParameters(bool enable) : previous_(Flag()) { Flag() = enable; }
  ~ScopedUninitializedParameters() { Flag() = previous_; }
  ScopedUninitializedParameters(const ScopedUninitializedParameters&) = delete;
  ScopedUninitializedParameters& operator=(const ScopedUninitializedParameters&) = delete;
  static bool Active() { return Flag(); }

 private:
  static bool& Flag() {
    thread_local bool flag = false;
    return flag;
  }
  bool previous_;
};

// A new parameter tensor filled with `value`, or uninitialized inside a
// ScopedUninitializedParameters(true) scope. Module constructors use it for every parameter.
inline torch::Tensor NewParameter(at::IntArrayRef shape, const torch::TensorOptions& options,
                                  double value = 0.0) {
  if (ScopedUninitializedParameters::Active()) return torch::empty(shape, options);
  return torch::full(shape, value, options);
}

// A built model: a LibTorch module named exactly like the diffusers state dict, plus a forward
// over named tensors (the names of the reference implementation's forward arguments).
//
// Thread-safety: Forward() is const-correct for concurrent inference (it runs under
// torch::InferenceMode and does not mutate the module); loading weights is not and needs exclusive
// access.
class DiffusionModel {
 public:
  virtual ~DiffusionModel() = default;

  // The diffusers class name ("FluxTransformer2DModel").
  virtual const std::string& class_name() const = 0;
  // The config this instance was built from (normalized: every field present, as diffusers'
  // config.json would show it).
  virtual const nlohmann::json& config() const = 0;
  virtual const ModelOptions& options() const = 0;

  virtual torch::nn::Module& module() = 0;
  virtual const torch::nn::Module& module() const = 0;

  // Names of the forward inputs, required first then optional ones.
  virtual std::vector<std::string> required_inputs() const = 0;
  virtual std::vector<std::string> optional_inputs() const = 0;

  // Runs one forward pass with the unfused adapters of `lora` (nullptr or empty: none; see
  // lora_context.h). INVALID_ARGUMENT naming the input at fault for a missing input or a wrong
  // shape (an input-widening adapter in `lora` changes the accepted width); INTERNAL if LibTorch
  // fails. A model whose spec wires no LoRA handler never receives a non-empty context.
  virtual absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                                const LoraContext* lora) const = 0;
  // The forward pass without adapters.
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs) const {
    return Forward(inputs, nullptr);
  }

  // Group offloading state (handlers/group_offloading.h), installed by the loaders after the
  // weights are loaded (ApplyGroupOffloading in registry.h), before the model is shared; null =
  // not offloaded. The forward of a model whose spec sets ModelSpec::group_offloading brackets
  // each repeated block with a GroupOffloadSession over it. Setting it needs exclusive access.
  const GroupOffloader* group_offloader() const { return group_offloader_.get(); }
  void set_group_offloader(std::shared_ptr<GroupOffloader> offloader) {
    group_offloader_ = std::move(offloader);
  }

 private:
  std::shared_ptr<GroupOffloader> group_offloader_;
};

// The class name of a LibTorch module implementation type as diffusers spells it:
// `ds::flux::FluxTransformerBlockImpl` -> "FluxTransformerBlock". Lets specs name block classes
// from the types themselves instead of retyping strings.
template <typename ModuleImpl>
std::string ModuleClassName() {
  std::string name = c10::demangle(typeid(ModuleImpl).name());
  if (auto pos = name.rfind("::"); pos != std::string::npos) name = name.substr(pos + 2);
  constexpr std::string_view kImpl = "Impl";
  if (name.size() > kImpl.size() &&
      name.compare(name.size() - kImpl.size(), kImpl.size(), kImpl) == 0) {
    name.resize(name.size() - kImpl.size());
  }
  return name;
}

}  // namespace ds
