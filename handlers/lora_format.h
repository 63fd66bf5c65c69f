// LoRA conversion: the model-agnostic steps every LoRA goes through, and the interface a model
// folder implements for its foreign formats (LoraHandler).
//
//   read (zero-copy) -> normalize suffixes -> detect format (handler) -> plan (handler, pure) ->
//   execute the plan (tensors move here) -> validate against the model's parameter shapes -> report
//
// Planning is pure: a handler sees key names, shapes, the values of one-element tensors (alphas)
// and the safetensors metadata, never tensor data, and returns a LoraPlan that names source slices.
// Executing a plan produces views of the file's mapping wherever it can (a plain or row/column
// slice); only a scale/shift swap or a folded lora_A bias allocates.
//
// Semantics of a converted LoRA (PEFT's): for every target module with weight W [out, in],
//   W' = W + scale · up · down        (up = B [out, r], down = A [r, in])
//   b' = b + scale · bias             (when the LoRA carries a lora_B bias [out])
// with `scale` = alpha / r per module as the source format means it (PEFT rank/alpha patterns and
// `lora_adapter_metadata`, `.alpha` keys, kohya alphas; a missing alpha means alpha = r). Overlays
// replace a whole parameter (BFL Control LoRA q/k norm scales). A module whose `input_expandable`
// flag is set may have a wider input than the model's weight (BFL Control LoRA `img_in`): the
// attach step widens the base weight with zero columns, as diffusers does (LoraReport::expansions).
//
// Status codes: NOT_FOUND for a missing file; INVALID_ARGUMENT for everything wrong with a LoRA
// (unknown format, inconsistent keys or shapes, a mismatch with the model, NaN/Inf, unmatched keys
// without allow_partial, bad `lora_adapter_metadata`); UNIMPLEMENTED for valid LoRA features this
// server does not support (DoRA); INTERNAL when LibTorch fails.
//
// Thread-safety: every function here is reentrant; LoraHandler implementations are immutable and
// thread-safe; a ConvertedLora is immutable once built and may be shared across threads.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/safetensors.h"
#include "handlers/weight_mapping.h"  // KeyShapes

namespace ds {

// The name of diffusers/PEFT naming (keys `<module>.lora_A.weight` / `.lora_B.weight`), which every
// model accepts through the shared machinery (PlanPeftLora); handlers return it from DetectFormat.
inline constexpr char kDiffusersLoraFormat[] = "diffusers";

// The safetensors metadata entry in which diffusers stores the PEFT LoraConfig as JSON.
inline constexpr char kLoraAdapterMetadataKey[] = "lora_adapter_metadata";

// ---------------------------------------------------------------------------------------------
// Suffix normalization and the pure view of a LoRA file.

// diffusers' `_normalize_lora_suffixes` for one key: the substring replacements
// ".lora_down.weight" -> ".lora_A.weight", ".lora_up.weight" -> ".lora_B.weight",
// ".down.weight" -> ".lora_A.weight", ".up.weight" -> ".lora_B.weight", in that order, every
// occurrence.
std::string NormalizeLoraSuffix(std::string key);

// What a handler sees of a LoRA: names, shapes and the few values planning needs.
struct LoraKeys {
  KeyShapes shapes;                           // normalized key -> shape
  std::map<std::string, std::string> source;  // normalized key -> key in the file
  // normalized key -> value of every one-element tensor (alphas), converted to double.
  std::map<std::string, double> scalars;
  // The file's `lora_adapter_metadata` entry, parsed (null when absent), key order kept because
  // PEFT matches rank/alpha patterns in insertion order.
  nlohmann::ordered_json adapter_metadata;
};

// Builds the handler's view of `tensors` (keyed as in the file) and the file's metadata. Reads the
// value of every one-element tensor. INVALID_ARGUMENT when two keys normalize to the same name
// (naming both) or `lora_adapter_metadata` is not a JSON object; INTERNAL if LibTorch fails.
absl::StatusOr<LoraKeys> MakeLoraKeys(const TensorMap& tensors,
                                      const std::map<std::string, std::string>& metadata);

// ---------------------------------------------------------------------------------------------
// Plans: what a handler returns. Pure data; keys are normalized keys of LoraKeys.

// A slice of one source tensor: rows [row_begin, row_begin + row_count) and, for 2-D tensors,
// columns [col_begin, col_begin + col_count); a count of -1 means "to the end". With
// swap_row_halves the two halves of the (sliced) rows are exchanged afterwards.
struct LoraSlice {
  std::string key;  // empty: no tensor
  int64_t row_begin = 0;
  int64_t row_count = -1;
  int64_t col_begin = 0;
  int64_t col_count = -1;
  bool swap_row_halves = false;
  bool present() const { return !key.empty(); }
};

// One target module of the model.
struct LoraModulePlan {
  // The diffusers module name without the model prefix ("transformer_blocks.0.attn.to_q").
  std::string module;
  LoraSlice down;           // -> A [r, in]
  LoraSlice up;             // -> B [out, r]
  LoraSlice up_bias;        // -> lora_B bias [out] (optional)
  LoraSlice down_bias;      // lora_A bias [r] (optional): folded into the bias as up · down_bias
  double scale = 1.0;       // effective delta = scale · B · A (and scale · bias)
  double alpha = 0;         // the alpha the format states (or implies) for the source tensors
  int64_t source_rank = 0;  // rank of the source tensors alpha refers to
  std::string alpha_key;    // the key alpha was read from ("" if implied)
  bool input_expandable = false;  // see the header comment
  // A fused source module (qkv, linear1) split along the output rows into `fused_count` modules
  // that share `up.key`; this is piece `fused_index`. When the source B is block-diagonal over the
  // pieces (kohya "sparse" qkv) and the rank divides evenly, the executor uses the equivalent
  // rank-split form (A_j = rows j of A, B_j = diagonal block j) instead of replicating A.
  int fused_index = 0;
  int fused_count = 0;
};

// A full parameter replacement (not a LoRA): the parameter `param` takes the value of `key`.
struct LoraOverlayPlan {
  std::string param;  // diffusers parameter name without the model prefix
  std::string key;
};

struct LoraPlan {
  std::string format;  // set by the shared machinery to what DetectFormat returned
  std::vector<LoraModulePlan> modules;
  std::vector<LoraOverlayPlan> overlays;
  std::map<std::string, std::string> unused;  // normalized key -> why it is not used
};

// ---------------------------------------------------------------------------------------------
// The per-model handler.

class LoraHandler {
 public:
  virtual ~LoraHandler() = default;

  // Names of the foreign formats this model converts (e.g. "kohya", "xlabs"), any order; the
  // `_lora` metadata row lists them. kDiffusersLoraFormat is not foreign and is not listed.
  virtual std::vector<std::string> FormatNames() const = 0;

  // The format of a LoRA from its normalized key names and shapes: one of FormatNames(),
  // kDiffusersLoraFormat, or std::nullopt when the keys are in no format this handler knows.
  virtual std::optional<std::string> DetectFormat(const KeyShapes& keys) const = 0;

  // Plans the conversion of `keys` in `format` (a value DetectFormat returned) to target modules in
  // diffusers naming. Every key is either used by a module/overlay plan, read as an alpha, or
  // listed in `unused` with a reason (the shared machinery lists any key left over). Inner
  // dimensions and layer counts come from the shapes, never from constants. INVALID_ARGUMENT
  // naming the key when the keys are in the format but inconsistent (a fused output that does not
  // split); UNIMPLEMENTED for unsupported features.
  virtual absl::StatusOr<LoraPlan> PlanConversion(const LoraKeys& keys,
                                                  const std::string& format) const = 0;
};

// ---------------------------------------------------------------------------------------------
// Shared helpers handlers build on (pure).

// The LoRA tensors of one source module, by normalized key ("" when absent).
struct LoraKeyGroup {
  std::string down;       // <stub>.lora_A.weight
  std::string up;         // <stub>.lora_B.weight
  std::string down_bias;  // <stub>.lora_A.bias
  std::string up_bias;    // <stub>.lora_B.bias
  std::string alpha;      // <stub>.alpha
};

struct LoraKeyGroups {
  std::map<std::string, LoraKeyGroup> groups;     // stub (prefix stripped) -> complete group
  std::vector<std::string> other;                 // keys under the prefix without a LoRA suffix
  std::vector<std::string> outside;               // keys not under the prefix
  std::map<std::string, std::string> incomplete;  // key -> reason (lora_A without lora_B, ...)
};

// Groups keys `<prefix><stub><suffix>` by stub, for the suffixes of LoraKeyGroup.
LoraKeyGroups GroupLoraKeys(const KeyShapes& keys, const std::string& prefix = "");

// Plans a LoRA in diffusers/PEFT naming: `<prefix><module>.lora_A.weight`, `.lora_B.weight`,
// optional `.lora_B.bias` and `.alpha`. Scale per module, as PEFT computes it:
//   - with `lora_adapter_metadata` (the entries under `prefix`, stripped, or the top-level
//   LoraConfig
//     fields when none are prefixed): r and lora_alpha (PEFT defaults 8 and 8), rank_pattern /
//     alpha_pattern matched like PEFT's get_pattern_key (regex `(.*\.)?(<pattern>)`, first match in
//     file order), use_rslora (alpha / sqrt(r)); a module whose tensors have another rank than the
//     config says is INVALID_ARGUMENT, as is an `.alpha` key contradicting it; use_dora is
//     UNIMPLEMENTED;
//   - otherwise alpha = the module's `.alpha` value, or r when it has none; scale = alpha / r.
// Keys outside `prefix` and keys without a LoRA suffix are listed as unused with a reason.
// `metadata_prefix` selects the metadata entries (diffusers writes "transformer.r", ...); the
// two-argument form uses `prefix` for both.
absl::StatusOr<LoraPlan> PlanPeftLora(const LoraKeys& keys, const std::string& prefix,
                                      const std::string& metadata_prefix);
absl::StatusOr<LoraPlan> PlanPeftLora(const LoraKeys& keys, const std::string& prefix);

// Detects the format with `handler` and plans the conversion; fills plan.format and lists every
// key the plan leaves unreferenced as unused. INVALID_ARGUMENT for an empty LoRA or an unknown
// format (listing the handler's formats and sample keys as they appear in the file).
absl::StatusOr<LoraPlan> PlanLoraConversion(const LoraHandler& handler, const LoraKeys& keys);

// ---------------------------------------------------------------------------------------------
// Converted LoRAs (tensors).

struct LoraModule {
  std::string module;
  torch::Tensor down;  // A [r, in]; a view of the file where possible (may be non-contiguous)
  torch::Tensor up;    // B [out, r]
  torch::Tensor bias;  // lora_B bias [out], or undefined
  double scale = 1.0;
  double alpha = 0;         // as stated by the source (see LoraModulePlan)
  int64_t source_rank = 0;  // rank alpha refers to (rank() differs for a block-diagonal split)
  bool input_expandable = false;
  std::vector<std::string> sources;  // the keys in the file this module was made from
  int64_t rank() const { return down.defined() && down.dim() > 0 ? down.size(0) : 0; }
};

struct LoraOverlay {
  std::string param;
  torch::Tensor value;
  std::string source;  // key in the file
};

// A LoRA converted to diffusers naming. Owns its tensors; views keep the file mapping alive.
struct ConvertedLora {
  std::string path;                             // "" when not read from a file
  std::string format;                           // detected format
  std::vector<LoraModule> modules;              // sorted by module name
  std::vector<LoraOverlay> overlays;            // sorted by parameter name
  std::map<std::string, std::string> unused;    // key in the file -> reason it is not used
  std::map<std::string, std::string> metadata;  // the file's __metadata__
  int64_t file_bytes = 0;                       // size of the file (0 when not from a file)
  std::string sha256;                           // hex SHA-256 of the file bytes ("" without one)
  double convert_seconds = 0;                   // wall time of read + conversion
  // Bytes of the distinct tensor storage the modules and overlays hold.
  int64_t TensorBytes() const;
  // The converted adapter as a diffusers/PEFT state dict: `<prefix><module>.lora_A.weight`,
  // `.lora_B.weight`, `.lora_B.bias`, overlays as `<prefix><param>`, with the scale folded into
  // lora_B (and its bias) so that loading it with lora_alpha = r reproduces the same deltas.
  absl::StatusOr<TensorMap> ToDiffusersStateDict(const std::string& prefix) const;
};

// Executes `plan` over `tensors` (keyed as in the file, `keys` built from them). INVALID_ARGUMENT
// naming the key for a slice outside its tensor or a swap of an odd number of rows, or a module
// planned twice; INTERNAL if LibTorch fails.
absl::StatusOr<ConvertedLora> ExecuteLoraPlan(const LoraPlan& plan, const LoraKeys& keys,
                                              const TensorMap& tensors);

// MakeLoraKeys + PlanLoraConversion + ExecuteLoraPlan.
absl::StatusOr<ConvertedLora> ConvertLora(const TensorMap& tensors,
                                          const std::map<std::string, std::string>& metadata,
                                          const LoraHandler& handler);

// Maps `path` (zero-copy) and converts it. NOT_FOUND if absent; otherwise as ConvertLora.
absl::StatusOr<ConvertedLora> ConvertLoraFile(const std::string& path, const LoraHandler& handler);

// ---------------------------------------------------------------------------------------------
// Validation against a model and the load report.

struct LoraLoadOptions {
  // Accept keys the conversion could not use and target modules/parameters the model lacks; they
  // are dropped and listed in the report. Default: any of them is INVALID_ARGUMENT.
  bool allow_partial = false;
  // Scan every tensor for NaN/Inf (INVALID_ARGUMENT naming the module). A caller that copies the
  // tensors anyway (LoraHost) turns this off and checks each copy while it is still in cache,
  // which saves a full pass over the file.
  bool check_finite = true;
};

// A module whose input width the LoRA widens (base weight padded with zero columns).
struct LoraInputExpansion {
  std::string module;
  std::vector<int64_t> old_shape;  // the model's weight [out, in]
  std::vector<int64_t> new_shape;  // [out, in'] with in' > in
};

struct LoraModuleReport {
  std::string module;
  int64_t rank = 0;
  double alpha = 0;
  int64_t source_rank = 0;
  double scale = 0;
  std::vector<int64_t> down_shape;
  std::vector<int64_t> up_shape;
  bool bias = false;
  std::vector<std::string> sources;
};

struct LoraReport {
  std::string path;
  std::string format;
  std::vector<LoraModuleReport> modules;  // matched target modules, sorted
  std::vector<std::string> overlays;      // parameters replaced, sorted
  std::vector<LoraInputExpansion> expansions;
  std::map<std::string, std::string> unmatched;  // key in the file or target -> reason
  int64_t file_bytes = 0;
  std::string sha256;  // of the file bytes: the adapter's content address
  int64_t tensor_bytes = 0;
  double seconds = 0;  // read + convert + validate

  std::map<int64_t, int> RankHistogram() const;  // rank -> number of modules
  std::string ToString() const;                  // human-readable, multi-line
  nlohmann::json ToJson() const;
};

// The shapes of a model's parameters (e.g. of ds::NamedTensors(module)).
KeyShapes ParameterShapes(const TensorMap& params);

// Checks `lora` against the model parameters `params` (diffusers names without prefix). Every
// module needs a parameter "<module>.weight" of shape [out, in] with A [r, in] (or a wider in for
// an input_expandable module) and B [out, r], r > 0, a bias of [out], finite values and a finite
// scale, and appears once; every overlay needs an existing parameter of the same shape and finite
// values (the finiteness scans only with options.check_finite). Problems are collected into one INVALID_ARGUMENT naming each module with expected and
// got shapes. Unused keys and targets the model lacks are INVALID_ARGUMENT listing them unless
// options.allow_partial, which records them in the report's `unmatched`; a LoRA that matches
// nothing is INVALID_ARGUMENT either way. Does not change `lora`.
absl::StatusOr<LoraReport> ValidateLora(const ConvertedLora& lora, const KeyShapes& params,
                                        const LoraLoadOptions& options = {});

// A LoRA ready to attach: only what matched the model, and its report.
struct LoadedLora {
  ConvertedLora lora;
  LoraReport report;
};

// ConvertLoraFile + ValidateLora, dropping unmatched targets (allow_partial); the report's
// `seconds` covers all of it.
absl::StatusOr<LoadedLora> LoadLora(const std::string& path, const LoraHandler& handler,
                                    const KeyShapes& params, const LoraLoadOptions& options = {});

// The SHA-256 of a mapped file, computed on its own thread from construction on (the slowest
// single step of a load: ~1.5-2 GB/s against ~4-5 GB/s page-cache reads), or taken at once from a
// process-wide cache keyed by the file's identity (SafetensorsFile::identity()), so reloading an
// unchanged file does not hash it again. Join() waits for it; the destructor joins too, so no
// exit path leaves the thread running. Holds the mapping until then. Not copyable or movable
// (hold it in a unique_ptr); Join() from one thread.
class PendingDigest {
 public:
  explicit PendingDigest(std::shared_ptr<const SafetensorsFile> file);
  ~PendingDigest();
  PendingDigest(const PendingDigest&) = delete;
  PendingDigest& operator=(const PendingDigest&) = delete;
  std::string Join();

 private:
  std::shared_ptr<const SafetensorsFile> file_;
  std::string digest_;
  std::thread thread_;
};

// As LoadLora, but returns while the file may still be being hashed: `*digest` (set on success)
// yields the SHA-256, and `lora.sha256` / `report.sha256` are empty until the caller fills them.
// Lets a caller copy the tensors (LoraHost) while the file is hashed.
absl::StatusOr<LoadedLora> LoadLoraHashing(const std::string& path, const LoraHandler& handler,
                                           const KeyShapes& params, const LoraLoadOptions& options,
                                           std::unique_ptr<PendingDigest>* digest);

}  // namespace ds
