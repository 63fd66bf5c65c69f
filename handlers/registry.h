// The model registry: each model folder registers a ModelSpec from a static initializer
// (DS_REGISTER_MODEL in its spec.cc); the server and tools find models only through here.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/capabilities.h"
#include "handlers/model.h"
#include "handlers/model_metadata.h"

namespace ds {

// Structural declarations: facts about the model's module tree (not capabilities).
struct ModelStructure {
  std::vector<std::string> no_split_modules;                 // `_no_split_modules`
  std::vector<std::string> keep_in_fp32_modules;             // `_keep_in_fp32_modules`
  std::vector<std::string> skip_layerwise_casting_patterns;  // `_skip_layerwise_casting_patterns`
  std::vector<std::string> repeated_blocks;                  // `_repeated_blocks`
};

// Builds a model from a diffusers config.json (missing keys take the model's defaults) with
// placeholder weights (whatever its constructors create; not meaningful: load a state dict, or call
// InitRandomWeights from state_dict.h for a demo/test model). INVALID_ARGUMENT naming the field
// for a bad config.
using ModelFactory = std::function<absl::StatusOr<std::unique_ptr<DiffusionModel>>(
    const nlohmann::json& config, const ModelOptions& options)>;

struct ModelSpec {
  std::string name;                  // registry name, e.g. "flux"
  std::string class_name;            // diffusers class name, e.g. "FluxTransformer2DModel"
  std::vector<std::string> aliases;  // other accepted names
  std::string description;           // one line for listings
  ModelStructure structure;
  ModelFactory factory;
  // Wired capability handlers (non-owning; static objects of the model folder). nullptr = the
  // capability is not wired and its metadata row is absent.
  const LoraHandler* lora = nullptr;
  const WeightMappingHandler* weight_mapping = nullptr;
  // The IP-Adapter mixin (ip_adapter_handler.h); wired = the `_supports_ip_adapter` row.
  const IPAdapterHandler* ip_adapter = nullptr;
  // The step caches its forward implements (block_cache.h); wired = the `_supports_cache` row.
  const CacheHandler* cache = nullptr;
  // Applied by LoadModelFromFolder to a folder's state dict before the strict load, for what the
  // reference library accepts besides the module's own names: a tied weight stored under either
  // name, keys it ignores on load (transformers' _keys_to_ignore_on_load_unexpected). Must only
  // rename or drop entries (no data change); an error names the key. Empty: loaded as is.
  std::function<absl::StatusOr<TensorMap>(TensorMap state_dict)> adapt_state_dict;
  // Whether the factory honours ModelOptions::storage_dtype (layerwise casting: it stores the
  // parameters handlers/layerwise_casting.h selects under the structure's skip patterns in the
  // storage dtype, and its forward upcasts them one layer at a time). False: the loaders refuse a
  // storage dtype with UNIMPLEMENTED (see CheckLayerwiseCastingSupported).
  bool layerwise_casting = false;
  // Whether the model's forward brackets each of its repeated blocks (structure.repeated_blocks,
  // in forward order) with a GroupOffloadSession over DiffusionModel::group_offloader()
  // (handlers/group_offloading.h). True: the loaders honour ModelOptions::group_offloading and the
  // `_supports_group_offloading` row appears. False: they refuse it with UNIMPLEMENTED.
  bool group_offloading = false;
  // Whether the model's forward moves its activations to the device of each part it runs
  // (handlers/device_map.h), so its modules may be spread over devices. True: the loaders honour
  // ModelOptions::device_map. False: they refuse it with UNIMPLEMENTED.
  bool device_map = false;
};

// OK when `options` has no storage dtype, or `spec` supports layerwise casting and the storage
// dtype and skip patterns are valid (handlers/layerwise_casting.h); UNIMPLEMENTED naming the class
// for a model without support; INVALID_ARGUMENT for a bad storage dtype or pattern.
absl::Status CheckLayerwiseCastingSupported(const ModelSpec& spec, const ModelOptions& options);

// OK when `options` has no group offloading, or `spec` supports it and the options are valid for
// `options.device` (ValidateGroupOffloadingOptions); UNIMPLEMENTED naming the class for a model
// without support; otherwise ValidateGroupOffloadingOptions' errors.
absl::Status CheckGroupOffloadingSupported(const ModelSpec& spec, const ModelOptions& options);

// Applies `model.options().group_offloading` (if set) to a model whose weights are loaded: groups
// the spec's repeated blocks (GroupOffloader::Apply) and installs the offloader on the model. The
// loaders call it last. Errors as CheckGroupOffloadingSupported and GroupOffloader::Apply. Needs
// exclusive access to the model.
absl::Status ApplyGroupOffloading(const ModelSpec& spec, DiffusionModel& model);

// OK when `options` has no device map, or `spec` supports one (ModelSpec::device_map) and no group
// offloading is asked for with it; UNIMPLEMENTED naming the class for a model without support;
// INVALID_ARGUMENT for a device map together with group offloading or with an unknown strategy.
absl::Status CheckDeviceMapSupported(const ModelSpec& spec, const ModelOptions& options);

// Applies `model.options().device_map` (if set) to a model whose weights are loaded: computes the
// map over its module with the spec's `_no_split_modules` (ComputeDeviceMap) and moves the
// tensors (ApplyDeviceMap). The loaders call it once the weights are in. Errors as
// CheckDeviceMapSupported, ComputeDeviceMap and ApplyDeviceMap. Needs exclusive access.
absl::Status ApplyModelDeviceMap(const ModelSpec& spec, DiffusionModel& model);

// The metadata table of a spec, derived from its structure and wired handlers (lists sorted).
ModelMetadata BuildModelMetadata(const ModelSpec& spec);

// Thread-safety: registration happens during static initialization (single-threaded); lookups are
// read-only afterwards and safe from any thread.
class ModelRegistry {
 public:
  static ModelRegistry& Global();

  // INVALID_ARGUMENT for an empty name/class/factory; ALREADY_EXISTS if the name, class name or an
  // alias collides with a registered model.
  absl::Status Register(ModelSpec spec);

  // Finds by registry name, class name or alias (exact first, then case-insensitive). NOT_FOUND
  // listing the registered models otherwise.
  absl::StatusOr<const ModelSpec*> Find(std::string_view name) const;

  // Every registered spec, sorted by name.
  std::vector<const ModelSpec*> List() const;

 private:
  std::vector<std::unique_ptr<ModelSpec>> specs_;
};

// Registers `spec` with the global registry at static-initialization time; aborts with a message
// if registration fails (a programming error that must not ship).
struct ModelRegistrar {
  explicit ModelRegistrar(ModelSpec spec);
};

#define DS_REGISTER_MODEL_CONCAT_INNER_(a, b) a##b
#define DS_REGISTER_MODEL_CONCAT_(a, b) DS_REGISTER_MODEL_CONCAT_INNER_(a, b)
// Usage in a model folder's spec.cc: DS_REGISTER_MODEL(MakeFluxSpec());
#define DS_REGISTER_MODEL(spec_expr)                                               \
  static const ::ds::ModelRegistrar DS_REGISTER_MODEL_CONCAT_(ds_model_registrar_, \
                                                              __LINE__)(spec_expr)

// Loads a diffusers-format model folder (see OpenModelFolder in state_dict.h): reads config.json,
// resolves the model by its "_class_name" (a transformers config.json's "architectures"[0] when
// it has no "_class_name"; `class_name` when non-empty wins), builds it with `options`, applies
// the spec's adapt_state_dict and loads the weights strictly.
// NOT_FOUND for a missing folder or an unregistered class; INVALID_ARGUMENT for a bad config or a
// state dict that does not match (missing/unexpected/shape-mismatched keys by name).
absl::StatusOr<std::unique_ptr<DiffusionModel>> LoadModelFromFolder(
    const std::string& dir, const ModelOptions& options, std::string_view class_name = "");

}  // namespace ds
