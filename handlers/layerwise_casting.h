// Layerwise casting (diffusers' `enable_layerwise_casting`): weights stored in a low-precision
// *storage* dtype, each layer's weights upcast to the *compute* dtype (ModelOptions::dtype) only
// while that layer runs. Model-agnostic: this file decides which parameters are stored low and
// converts them; a model that supports it (ModelSpec::layerwise_casting) builds through
// ApplyLayerwiseCasting and upcasts per layer in its forward.
//
// Which parameters are cast, as diffusers decides it (hooks/layerwise_casting.py, main at 58eb52c):
//   * only the parameters (weight, bias) of layers whose class is one of torch.nn's Linear,
//     Conv1d/2d/3d, ConvTranspose1d/2d/3d or Embedding (a LibTorch module counts when its class
//     name without namespace and "Impl" suffix is one of those, e.g. ds::flux::LinearImpl);
//     normalization scales and any other parameters stay in the compute dtype;
//   * a layer is skipped when a skip pattern matches (std::regex ECMAScript search, as Python's
//     re.search) its dotted module name or the name of any module above it (diffusers stops
//     descending at the first match);
//   * the skip patterns are diffusers' DEFAULT_SKIP_MODULES_PATTERN ("pos_embed", "patch_embed",
//     "norm", "^proj_in$", "^proj_out$") plus the model's `_keep_in_fp32_modules` and
//     `_skip_layerwise_casting_patterns`, unless ModelOptions::layerwise_casting_skip_patterns
//     replaces them (diffusers' `skip_modules_pattern` argument).
// LoRA adapters are never stored low (diffusers skips PEFT layers): their tensors stay in the
// compute dtype (handlers/lora_host.h).
//
// Storage dtypes: bfloat16 and float16, strictly narrower than the compute dtype (so only with
// float32 compute). 8-bit float storage is not offered.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "handlers/model.h"

namespace ds {

// diffusers' DEFAULT_SKIP_MODULES_PATTERN, in its order.
const std::vector<std::string>& DefaultLayerwiseCastingSkipPatterns();

// The skip patterns of a model: ModelOptions::layerwise_casting_skip_patterns when set, else the
// defaults followed by `keep_in_fp32_modules` and `model_patterns` (duplicates dropped).
std::vector<std::string> LayerwiseCastingSkipPatterns(
    const ModelOptions& options, const std::vector<std::string>& model_patterns,
    const std::vector<std::string>& keep_in_fp32_modules = {});

// Whether a module class name (as torch::nn::Module::name() spells it, e.g.
// "ds::flux::LinearImpl" or "torch::nn::Conv2dImpl") is one of the layer classes diffusers casts.
bool IsLayerwiseCastableClass(absl::string_view class_name);

// "bfloat16"/"bf16" and "float16"/"fp16"/"half" (case-sensitive); "" = no storage dtype
// (nullopt). INVALID_ARGUMENT naming the value and the choices otherwise (e.g. "float8_e4m3fn":
// not offered).
absl::StatusOr<std::optional<torch::Dtype>> ParseStorageDtype(absl::string_view name);

// "bfloat16", "float16", or "" for nullopt.
std::string StorageDtypeName(const std::optional<torch::Dtype>& dtype);

// OK when `options.storage_dtype` is unset, or bfloat16/float16 and narrower than
// `options.dtype`; INVALID_ARGUMENT naming both dtypes otherwise (e.g. bfloat16 storage with
// bfloat16 or float16 compute).
absl::Status ValidateStorageDtype(const ModelOptions& options);

// Compiles `patterns`. INVALID_ARGUMENT naming the first pattern that is not a valid regular
// expression.
absl::Status ValidateSkipPatterns(const std::vector<std::string>& patterns);

// The names (dotted, sorted) of the parameters of `module` that layerwise casting stores in the
// storage dtype under `patterns`. INVALID_ARGUMENT for a bad pattern.
absl::StatusOr<std::vector<std::string>> LayerwiseCastParameterNames(
    const torch::nn::Module& module, const std::vector<std::string>& patterns);

// Converts every parameter LayerwiseCastParameterNames selects to `storage` in place (the
// parameter objects stay the same, their data is replaced, so references into the module remain
// valid); others are left as they are. With `uninitialized` the new storage is allocated without
// copying values (for loaders that then assign every parameter; see
// ModelOptions::uninitialized_parameters). Returns the names converted. INVALID_ARGUMENT for a bad
// pattern or a non-floating storage dtype; INTERNAL if LibTorch fails. Needs exclusive access to
// `module`.
absl::StatusOr<std::vector<std::string>> ApplyLayerwiseCasting(
    torch::nn::Module& module, torch::Dtype storage, const std::vector<std::string>& patterns,
    bool uninitialized = false);

// Bytes held by the parameters and buffers of `module` (numel × element size each): the resident
// weight memory.
int64_t ParameterBytes(const torch::nn::Module& module);

}  // namespace ds
