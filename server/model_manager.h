// ModelManager: the server's named model instances.
//
// An instance is immutable once published (a ModelInstance behind a shared_ptr; its LoraHost is
// itself thread-safe for adapters). A request takes a snapshot (InstancePtr) when it starts and
// keeps using exactly that instance until it ends, whatever happens to the name meanwhile:
//   - Load with `replace` builds the new instance completely (no lock held) and only then swaps
//     the name to it under a short lock; until that moment the old instance keeps serving. A
//     failed replacement leaves the old one serving.
//   - Unload removes the name at once; the instance is destroyed (and its memory freed) when the
//     last request holding it ends. Until then List() shows it as UNLOADING.
// Names move through LOADING (first load in progress; not servable) -> READY, or -> FAILED (the
// load failed and there was nothing to keep serving; the reason is kept until the name is loaded
// again or unloaded).
//
// Models are found only through ds::ModelRegistry (the server never includes models/).
//
// Thread-safety: every method is thread-safe. Loads run on the caller's thread with no lock held,
// so lookups and requests on other names are never blocked by a slow load.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/lora_host.h"
#include "handlers/pipeline.h"
#include "handlers/registry.h"

namespace ds::server {

enum class InstanceState { kLoading, kReady, kUnloading, kFailed };

// A published model instance. Immutable; share it as InstancePtr.
struct ModelInstance {
  std::string name;
  const ModelSpec* spec = nullptr;  // the registry entry of its class (static lifetime)
  std::shared_ptr<LoraHost> host;   // owns the model; thread-safe
  // Set for an instance loaded from a diffusers pipeline folder (model_index.json): the pipeline,
  // whose transformer_host() `host` is (host shares the pipeline's ownership). Null for a bare
  // model instance.
  std::shared_ptr<const DiffusionPipeline> pipeline;
  std::string source;               // "embedded" or the resolved server-side path
  std::string sha256;               // of the weights' bytes ("" when embedded)
  std::string variant;              // detected checkpoint variant ("flux-dev", ...) or ""
  std::string report;               // the load report (human-readable)
  std::string dtype;                // "float32", "bfloat16", "float16"
  std::string device;               // "cpu", "cuda:0"
  // Layerwise casting: the storage dtype of its cast weights ("bfloat16", "float16"), "" = none.
  std::string storage_dtype;
  // With a device map: where its weights are (ds::DevicePlacementSummary); "" without.
  std::string device_map;
  int64_t parameter_bytes = 0;      // bytes its parameters and buffers really hold
  // The demo recipe it was built from (LoadDemo; the registry's, static lifetime), or null.
  const DemoPipelineRecipe* demo = nullptr;

  const DiffusionModel& model() const { return host->model(); }
};
using InstancePtr = std::shared_ptr<const ModelInstance>;

// One row of List().
struct InstanceStatus {
  std::string name;
  InstanceState state = InstanceState::kLoading;
  std::string reason;    // FAILED: why; LOADING (also a replacement in progress): what
  InstancePtr instance;  // null while LOADING or FAILED
};

struct LoadModelRequest {
  std::string name;  // [A-Za-z0-9._-], 1..128 characters
  // A resolved path (the caller confines it to its root): a diffusers pipeline folder (has
  // model_index.json; loaded through ds::PipelineRegistry by its "_class_name" as a pipeline
  // instance), a diffusers model folder (config.json + weights, or a folder with transformer/) or
  // one .safetensors single file.
  std::string path;
  // Single files only: config fields overriding the ones derived from the weights (an object, or
  // null for none).
  nlohmann::json config_override;
  std::string dtype = "float32";  // "float32", "bfloat16", "float16"
  std::string device = "cpu";     // "cpu", "cuda", "cuda:N"
  bool replace = false;
  // Layerwise casting (handlers/layerwise_casting.h): "" = none, "bfloat16" / "float16" = the
  // storage dtype (narrower than `dtype`). For a pipeline folder it applies to the transformer
  // (the other components stay resident in `dtype`); so do device_map and group_offloading.
  std::string storage_dtype;
  // With storage_dtype: replacement skip patterns; empty = the defaults plus the model's.
  std::vector<std::string> layerwise_casting_skip_patterns;
  // Device map (ds::ParseDeviceMapRequest): "", "sequential" with max_memory_bytes, or an explicit
  // JSON object.
  std::string device_map;
  std::map<std::string, int64_t> max_memory_bytes;
  // Group offloading (handlers/group_offloading.h); unset = none (UNIMPLEMENTED for a model class
  // without support).
  std::optional<GroupOffloadingOptions> group_offloading;
  // Set by LoadDemo: the registry's recipe the folder was written from (static lifetime).
  const DemoPipelineRecipe* demo = nullptr;
};

struct LoadModelResult {
  InstancePtr instance;
  std::string report;
  double seconds = 0;
  bool replaced = false;
};

struct ModelManagerOptions {
  LoraHostOptions lora;  // for every instance's adapter store
  PipelineOptions pipeline;  // request limits of pipeline instances
  // Where disk group offloading writes its files when a load does not say
  // (GroupOffloadingOptions::offload_dir); empty: $TMPDIR, else /tmp.
  std::string offload_dir;
};

// The embedded default model: a tiny FluxTransformer2DModel config (diffusers config.json) whose
// weights are InitRandomWeights(seed kEmbeddedSeed). It runs in milliseconds on a CPU: a demo and
// test model, not one that makes images.
const nlohmann::json& EmbeddedDefaultConfig();
inline constexpr char kEmbeddedFamily[] = "flux";
inline constexpr uint64_t kEmbeddedSeed = 0;
inline constexpr char kDefaultInstanceName[] = "default";

// "float32" / "bfloat16" / "float16" ("" = float32). INVALID_ARGUMENT naming the choices.
absl::StatusOr<torch::Dtype> ParseModelDtype(const std::string& name);
std::string DtypeName(torch::Dtype dtype);

// OK, or INVALID_ARGUMENT unless `name` has 1..128 characters of [A-Za-z0-9._-].
absl::Status ValidateInstanceName(const std::string& name);

class ModelManager {
 public:
  // Called with (name, serving) whenever a name starts (READY) or stops (unloaded, FAILED)
  // serving, while the manager's lock is held (so notifications arrive in order); it must not
  // call back into the ModelManager.
  using ServingListener = std::function<void(const std::string& name, bool serving)>;

  explicit ModelManager(ModelManagerOptions options = {});
  ModelManager(const ModelManager&) = delete;
  ModelManager& operator=(const ModelManager&) = delete;

  // Set before any load.
  void SetServingListener(ServingListener listener);

  // Builds the embedded default (see EmbeddedDefaultConfig) as `name`. Errors as Load.
  absl::StatusOr<LoadModelResult> LoadEmbedded(const std::string& name = kDefaultInstanceName,
                                               bool replace = false);

  // Writes the registered demo pipeline `demo` (handlers/demo_pipeline.h; e.g. "flux-tiny") under
  // `root` on first use (reusing a verified copy afterwards) and loads its diffusers folder through
  // Load as `name`; the report says where the files are and whether they were written. NOT_FOUND
  // for an unknown demo (listing the registered ones); WriteDemoPipeline's errors (e.g.
  // PERMISSION_DENIED for an unwritable root); otherwise as Load.
  absl::StatusOr<LoadModelResult> LoadDemo(const std::string& demo, const std::string& root,
                                           const std::string& name, bool replace = false);

  // Loads `request.path` as `request.name`. INVALID_ARGUMENT for a bad name, dtype, storage dtype
  // (unknown, or not narrower than dtype), skip pattern or device, a
  // config override given for a folder, or a checkpoint that does not load (see single_file.h,
  // LoadModelFromFolder, LoadPipelineFromFolder); NOT_FOUND for a missing path or an unregistered
  // class; UNIMPLEMENTED for an unregistered pipeline class; ALREADY_EXISTS
  // when the name serves and !replace; UNAVAILABLE while another load of the name is in progress;
  // UNIMPLEMENTED for an unavailable device (CUDA), and for a storage dtype, device map or group
  // offloading on a model class (a pipeline's transformer class) without it; INTERNAL if LibTorch
  // fails.
  absl::StatusOr<LoadModelResult> Load(const LoadModelRequest& request);

  // Removes `name` (see the header comment). NOT_FOUND for an unknown name; UNAVAILABLE while it
  // is being loaded.
  absl::Status Unload(const std::string& name);

  // The serving instance of `name`. NOT_FOUND for an unknown name (listing the known ones);
  // UNAVAILABLE while its first load is in progress; FAILED_PRECONDITION when it FAILED (with the
  // reason).
  absl::StatusOr<InstancePtr> Get(const std::string& name) const;

  // Every name (sorted), then the UNLOADING instances still held by requests.
  std::vector<InstanceStatus> List() const;

  // Names of READY instances, sorted.
  std::vector<std::string> ReadyNames() const;

 private:
  struct Entry {
    InstancePtr instance;  // serving (null while first loading or FAILED)
    bool loading = false;
    std::string reason;  // FAILED: why; loading: what
  };

  // Marks `name` as loading. Errors as Load (ALREADY_EXISTS, UNAVAILABLE).
  absl::Status BeginLoad(const std::string& name, bool replace, const std::string& what);
  // Publishes the outcome of a load begun with BeginLoad.
  absl::StatusOr<LoadModelResult> FinishLoad(const std::string& name,
                                             absl::StatusOr<ModelInstance> built, double seconds);
  void RetireLocked(InstancePtr instance) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ModelManagerOptions options_;
  ServingListener listener_;

  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  // Unloaded or replaced instances, alive while requests hold them.
  mutable std::vector<std::weak_ptr<const ModelInstance>> retired_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ds::server
