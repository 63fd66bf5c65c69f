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
// float32 compute), and 8-bit floats.
//
// 8-bit float storage (storage dtype torch::kByte, ModelOptions::float8_format): LibTorch 1.13 has
// no float8 dtype, so each selected weight (a parameter of rank >= 2; biases and other rank-1
// parameters of the selected layers stay in the compute dtype, they are a negligible share of the
// bytes and would only add error) is stored as uint8 codes of the OCP FP8 format (E4M3FN: bias 7,
// max 448, subnormals down to 2^-9, no infinities, NaN = 0x7f/0xff; E5M2: bias 15, max 57344,
// IEEE-style infinities 0x7c/0xfc and NaNs) together with a float32 scale per output row
// (dimension 0), registered as a buffer named "<parameter>_scale" on the parameter's module:
//   scale[r] = max_j |w[r, j]| / format max   (1 for an all-zero row),
//   code[r, j] = encode(w[r, j] / scale[r]),  round to nearest, ties to even, saturating,
//   w'[r, j] = decode(code[r, j]) x scale[r]  (float32; decode is a 256-entry table lookup).
// This is the per-channel absmax scaling common fp8 weight quantizers use: a row's largest weight
// maps to the format's largest value, so no code saturates and each row uses the whole range.
// Per-row rather than per-tensor scales cost 4 bytes a row (≈ 0.1% of a 3072-wide row) and keep
// rows with small weights from falling into the subnormals. A model forward upcasts per layer to
// w' in the compute dtype (DequantizeFloat8). State dicts of such a module (NamedTensors) hold the
// codes (uint8) and the "<parameter>_scale" tensors; ToStorageForm turns a floating-point
// checkpoint into that form (the loaders call it), and such a state dict loads back as is.
// ParameterBytes counts codes and scales. LoRA fusing (LoraHost::Fuse) decodes, adds the delta in
// float32 and re-encodes with fresh scales; Unfuse restores codes and scales bit for bit.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"

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

// "bfloat16"/"bf16", "float16"/"fp16"/"half", and the 8-bit floats "float8_e4m3fn"/"fp8" and
// "float8_e5m2" (torch::kByte: the format is ParseFloat8Format's; SetStorageDtype sets both)
// (case-sensitive); "" = no storage dtype (nullopt). INVALID_ARGUMENT naming the value and the
// choices otherwise.
absl::StatusOr<std::optional<torch::Dtype>> ParseStorageDtype(absl::string_view name);

// The 8-bit format of a storage dtype name: "float8_e4m3fn"/"fp8" -> kE4M3FN, "float8_e5m2" ->
// kE5M2; nullopt for any other name.
std::optional<Float8Format> ParseFloat8Format(absl::string_view name);

// Parses `name` as ParseStorageDtype does and sets options.storage_dtype (and float8_format for
// an 8-bit name). INVALID_ARGUMENT as ParseStorageDtype; `options` is unchanged then.
absl::Status SetStorageDtype(absl::string_view name, ModelOptions& options);

// "bfloat16", "float16", "uint8" (8-bit float codes, format not known here), or "" for nullopt.
std::string StorageDtypeName(const std::optional<torch::Dtype>& dtype);
// The storage dtype of `options` as ParseStorageDtype spells it: "bfloat16", "float16",
// "float8_e4m3fn", "float8_e5m2", or "" for none.
std::string StorageDtypeName(const ModelOptions& options);

// OK when `options.storage_dtype` is unset, or bfloat16/float16/uint8 (8-bit floats) and narrower
// than `options.dtype`; INVALID_ARGUMENT naming both dtypes otherwise (e.g. bfloat16 storage with
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
// ModelOptions::uninitialized_parameters). Storage torch::kByte = 8-bit floats of `float8_format`:
// only the selected parameters of rank >= 2 are converted (quantized as described at the top;
// INVALID_ARGUMENT naming a parameter with NaN/Inf values), each getting its "<name>_scale"
// buffer. Returns the names converted. INVALID_ARGUMENT for a bad pattern or a storage dtype that
// is neither floating nor kByte; INTERNAL if LibTorch fails. Needs exclusive access to `module`.
absl::StatusOr<std::vector<std::string>> ApplyLayerwiseCasting(
    torch::nn::Module& module, torch::Dtype storage, const std::vector<std::string>& patterns,
    bool uninitialized = false, Float8Format float8_format = Float8Format::kE4M3FN);

// ---------------------------------------------------------------------------------------------
// 8-bit float codec (OCP FP8) and per-row quantization.

// "float8_e4m3fn" / "float8_e5m2".
const char* Float8FormatName(Float8Format format);
// The largest finite value: 448 (E4M3FN), 57344 (E5M2).
float Float8Max(Float8Format format);
// The value of every code (index = code): NaN for NaN codes, ±infinity for E5M2's 0x7c/0xfc.
const std::array<float, 256>& Float8Table(Float8Format format);
// Encodes `x`: the nearest representable value (ties to the even code, i.e. mantissa LSB 0),
// saturating: finite values beyond the largest finite value and infinities give ±max (OCP's
// saturating conversion); NaN gives 0x7f (0xff with the sign bit set). -0.0 gives 0x80.
uint8_t EncodeFloat8(float x, Float8Format format);
inline float DecodeFloat8(uint8_t code, Float8Format format) { return Float8Table(format)[code]; }

// Codes and per-row scales of a quantized tensor (see the top of this file).
struct Float8Tensor {
  torch::Tensor codes;  // uint8, the source's shape and device
  torch::Tensor scale;  // float32 [rows = source.size(0)], same device
};
// Quantizes a floating tensor of rank >= 1 per row (dimension 0). INVALID_ARGUMENT naming `what`
// for a non-floating tensor, rank 0, or NaN/Inf values; INTERNAL if LibTorch fails.
absl::StatusOr<Float8Tensor> QuantizeFloat8(const torch::Tensor& values, Float8Format format,
                                            absl::string_view what = "tensor");
// decode(codes) x scale[row] computed in float32, returned in `dtype` on the codes' device (CPU:
// a table-lookup loop over rows in parallel; elsewhere an index_select of the table). For use
// inside model forwards: throws c10::Error on mismatched shapes/dtypes.
torch::Tensor DequantizeFloat8(const torch::Tensor& codes, const torch::Tensor& scale,
                               Float8Format format, torch::Dtype dtype = torch::kFloat);

// The name of the scale buffer of an 8-bit stored parameter: "<parameter>_scale".
std::string Float8ScaleName(const std::string& parameter);
// The 8-bit stored parameters of `module` (uint8 parameters with a "<name>_scale" buffer beside
// them): dotted parameter name -> dotted scale buffer name.
std::map<std::string, std::string> Float8StoredParameters(const torch::nn::Module& module);

// Converts a state dict named like `module` (a floating-point checkpoint) into the module's
// storage form: each 8-bit stored parameter present with a floating dtype is quantized into codes
// and its "<name>_scale" entry (`float8_format`). Entries already in storage form (uint8 codes
// with their scale) and every other entry pass through unchanged (zero-copy views stay views), so
// the strict LoadStateDict / CheckStateDict then report missing, unexpected or mis-shaped keys as
// usual. A module without 8-bit storage returns `state_dict` as is. INVALID_ARGUMENT naming the key
// for NaN/Inf values, a uint8 entry without its scale, or a non-floating, non-uint8 entry for an
// 8-bit parameter; INTERNAL if LibTorch fails.
absl::StatusOr<TensorMap> ToStorageForm(const torch::nn::Module& module, TensorMap state_dict,
                                        Float8Format float8_format);

// Bytes held by the parameters and buffers of `module` (numel × element size each): the resident
// weight memory (with 8-bit storage: codes and their scales).
int64_t ParameterBytes(const torch::nn::Module& module);

}  // namespace ds
