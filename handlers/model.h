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
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/lora_context.h"
#include "handlers/safetensors.h"

namespace ds {

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
  std::optional<torch::Dtype> storage_dtype;
  // With `storage_dtype`: replaces the skip patterns (regular expressions searched in each module
  // name and its ancestors' names; diffusers' `skip_modules_pattern`). Unset (default): diffusers'
  // defaults plus the model's `_keep_in_fp32_modules` and `_skip_layerwise_casting_patterns`.
  std::optional<std::vector<std::string>> layerwise_casting_skip_patterns;
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
