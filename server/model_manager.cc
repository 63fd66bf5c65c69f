#include "server/model_manager.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "handlers/demo_pipeline.h"
#include "handlers/device_map.h"
#include "handlers/digest.h"
#include "handlers/group_offloading.h"
#include "handlers/layerwise_casting.h"
#include "handlers/mapping_guard.h"
#include "handlers/pipeline.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds::server {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxNameLength = 128;

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs a model build; an exception that escaped it (e.g. a memory budget refusal from a LibTorch
// call outside TorchCall) becomes its status, so FinishLoad always runs and the name never stays
// LOADING (RESOURCE_EXHAUSTED for an allocation, see TorchCall).
template <typename Build>
absl::StatusOr<ModelInstance> BuildCatching(const std::string& context, Build& build) {
  // Every file the build maps is checked for truncation or in-place changes before the instance
  // can be committed, also when the build failed (a torn file is DATA_LOSS, whatever its bytes
  // made the loaders say).
  MappedReadScope reads;
  absl::StatusOr<ModelInstance> built = absl::InternalError("not built");
  const absl::Status thrown = TorchCallVoid(context, [&] { built = build(); });
  RETURN_IF_ERROR(reads.Check());
  if (!thrown.ok()) return thrown;
  return built;
}

absl::StatusOr<torch::Device> ParseDevice(const std::string& name) {
  const std::string spelled = name.empty() ? "cpu" : name;
  return TorchCall(
      absl::StrCat("device '", spelled, "' (cpu, cuda, cuda:N)"),
      [&] { return torch::Device(spelled); }, absl::StatusCode::kInvalidArgument);
}

// Digest of the weights a model was loaded from: the file's SHA-256 for a single file; for a
// folder, the SHA-256 of the lines "<file name> <sha256>\n" over its *.safetensors files in name
// order (the file's own digest when there is exactly one).
absl::StatusOr<std::string> WeightsDigest(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return Sha256File(path);
  fs::path dir = path;
  if (!fs::exists(dir / "config.json", ec) && fs::exists(dir / "transformer" / "config.json", ec)) {
    dir /= "transformer";
  }
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".safetensors") files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  if (files.size() == 1) return Sha256File(files[0]);
  std::string lines;
  for (const std::string& f : files) {
    ASSIGN_OR_RETURN(std::string digest, Sha256File(f));
    absl::StrAppend(&lines, fs::path(f).filename().string(), " ", digest, "\n");
  }
  return Sha256Hex(lines.data(), lines.size());
}

// Wraps a built model as an instance (everything but the provenance fields).
absl::StatusOr<ModelInstance> MakeInstance(const std::string& name,
                                           std::unique_ptr<DiffusionModel> model,
                                           const LoraHostOptions& lora_options) {
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(model->class_name()));
  ModelInstance instance;
  instance.name = name;
  instance.spec = spec;
  instance.dtype = DtypeName(model->options().dtype);
  instance.device = model->options().device.str();
  instance.storage_dtype = StorageDtypeName(model->options());
  if (model->options().device_map.enabled()) {
    instance.device_map = DevicePlacementSummary(model->module());
  }
  for (const auto& [key, t] : NamedTensors(model->module())) {
    instance.parameter_bytes += static_cast<int64_t>(t.numel() * t.element_size());
  }
  instance.host = std::make_shared<LoraHost>(std::shared_ptr<DiffusionModel>(std::move(model)),
                                             spec->lora, lora_options);
  return instance;
}

// Wraps a loaded pipeline as an instance: `host` is its transformer's LoraHost, sharing the
// pipeline's ownership; the spec is its transformer's registry entry.
absl::StatusOr<ModelInstance> MakePipelineInstance(
    const std::string& name, const std::shared_ptr<const DiffusionPipeline>& pipeline) {
  LoraHost& host = pipeline->transformer_host();
  const DiffusionModel& model = host.model();
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(model.class_name()));
  ModelInstance instance;
  instance.name = name;
  instance.spec = spec;
  instance.pipeline = pipeline;
  instance.host = std::shared_ptr<LoraHost>(pipeline, &host);
  instance.dtype = DtypeName(model.options().dtype);
  instance.device = model.options().device.str();
  instance.storage_dtype = StorageDtypeName(model.options());
  if (model.options().device_map.enabled()) {
    instance.device_map = DevicePlacementSummary(model.module());
  }
  instance.variant = pipeline->describe().variant;
  for (const auto& [key, t] : NamedTensors(model.module())) {
    instance.parameter_bytes += static_cast<int64_t>(t.numel() * t.element_size());
  }
  return instance;
}

// The human-readable part of a pipeline's load report: class, components, limits.
std::string PipelineReport(const DiffusionPipeline& pipeline) {
  const PipelineDescription d = pipeline.describe();
  const PipelineLimits l = pipeline.limits();
  std::string out = absl::StrCat("  class: ", pipeline.class_name(), "\n  variant: ",
                                 d.variant.empty() ? "unknown" : d.variant, "\n");
  for (const auto& [name, class_name] : d.classes) {
    auto source = d.sources.find(name);
    absl::StrAppend(&out, "  ", name, ": ", class_name, " from ",
                    source == d.sources.end() ? "?" : source->second, "\n");
  }
  for (const auto& [name, why] : d.not_loaded) {
    absl::StrAppend(&out, "  ", name, ": not loaded (", why, ")\n");
  }
  absl::StrAppend(&out, "  sizes: multiples of ", l.image_size_multiple, ", default ",
                  l.default_width, "x", l.default_height, ", at most ", l.options.max_image_side,
                  " per side\n");
  return out;
}

}  // namespace

const nlohmann::json& EmbeddedDefaultConfig() {
  static const nlohmann::json* const kConfig = new nlohmann::json(nlohmann::json::parse(R"json({
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": null,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": true,
    "axes_dims_rope": [4, 6, 6]
  })json"));
  return *kConfig;
}

absl::StatusOr<torch::Dtype> ParseModelDtype(const std::string& name) {
  if (name.empty() || name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype '", name, "' is not one of float32, bfloat16, float16"));
}

std::string DtypeName(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kFloat32:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    default:
      return c10::toString(dtype);
  }
}

absl::Status ValidateInstanceName(const std::string& name) {
  if (name.empty() || name.size() > kMaxNameLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model instance name must have 1 to ", kMaxNameLength, " characters, got ", name.size()));
  }
  for (char ch : name) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model instance name '", name, "' may only contain letters, digits, '.', '_', '-'"));
    }
  }
  return absl::OkStatus();
}

ModelManager::ModelManager(ModelManagerOptions options) : options_(std::move(options)) {}

void ModelManager::SetServingListener(ServingListener listener) {
  std::lock_guard lock(mu_);
  listener_ = std::move(listener);
}

absl::Status ModelManager::BeginLoad(const std::string& name, bool replace,
                                     const std::string& what) {
  RETURN_IF_ERROR(ValidateInstanceName(name));
  std::lock_guard lock(mu_);
  auto it = entries_.find(name);
  if (it != entries_.end()) {
    if (it->second.loading) {
      return absl::UnavailableError(
          absl::StrCat("model instance '", name, "' is being loaded; retry when it is READY"));
    }
    if (it->second.instance != nullptr && !replace) {
      return absl::AlreadyExistsError(
          absl::StrCat("model instance '", name, "' exists; unload it first or load with replace"));
    }
  }
  Entry& e = entries_[name];
  e.loading = true;
  e.reason = what;
  return absl::OkStatus();
}

absl::StatusOr<LoadModelResult> ModelManager::FinishLoad(const std::string& name,
                                                         absl::StatusOr<ModelInstance> built,
                                                         double seconds) {
  std::lock_guard lock(mu_);
  Entry& e = entries_[name];
  e.loading = false;
  if (!built.ok()) {
    if (e.instance == nullptr) {
      e.reason = std::string(built.status().message());
      if (listener_) listener_(name, false);
    } else {
      e.reason.clear();  // the old instance keeps serving
    }
    return built.status();
  }
  LoadModelResult result;
  result.replaced = e.instance != nullptr;
  result.report = built->report;
  result.seconds = seconds;
  result.instance = std::make_shared<const ModelInstance>(*std::move(built));
  if (e.instance != nullptr) RetireLocked(std::move(e.instance));
  e.instance = result.instance;
  e.reason.clear();
  if (listener_) listener_(name, true);
  return result;
}

void ModelManager::RetireLocked(InstancePtr instance) {
  // Only worth tracking while someone besides us holds it.
  if (instance.use_count() > 1) retired_.push_back(instance);
}

absl::StatusOr<LoadModelResult> ModelManager::LoadEmbedded(const std::string& name, bool replace) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(BeginLoad(name, replace, "loading the embedded default model"));
  auto build = [&]() -> absl::StatusOr<ModelInstance> {
    ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(kEmbeddedFamily));
    ASSIGN_OR_RETURN(std::unique_ptr<DiffusionModel> model,
                     spec->factory(EmbeddedDefaultConfig(), ModelOptions{}));
    RETURN_IF_ERROR(TorchCallVoid("initializing the embedded model's weights",
                                  [&] { InitRandomWeights(model->module(), kEmbeddedSeed); }));
    ASSIGN_OR_RETURN(ModelInstance instance, MakeInstance(name, std::move(model), options_.lora));
    instance.source = "embedded";
    instance.report = absl::StrCat("embedded ", spec->class_name, " (", kEmbeddedFamily,
                                   "), deterministic random weights (seed ", kEmbeddedSeed,
                                   "), config ", EmbeddedDefaultConfig().dump());
    return instance;
  };
  absl::StatusOr<ModelInstance> built = BuildCatching("loading the embedded default model", build);
  return FinishLoad(name, std::move(built), SecondsSince(start));
}

absl::StatusOr<LoadModelResult> ModelManager::LoadDemo(const std::string& demo,
                                                       const std::string& root,
                                                       const std::string& name, bool replace) {
  RETURN_IF_ERROR(ValidateInstanceName(name));
  ASSIGN_OR_RETURN(const DemoPipelineRecipe* recipe, PipelineRegistry::Global().FindDemo(demo));
  ASSIGN_OR_RETURN(DemoPipelineFiles files, WriteDemoPipeline(*recipe, root));
  LoadModelRequest request;
  request.name = name;
  request.path = files.pipeline_dir;
  request.replace = replace;
  request.demo = recipe;
  ASSIGN_OR_RETURN(LoadModelResult result, Load(request));
  std::string note = absl::StrCat("demo pipeline ", recipe->name, " (", recipe->description,
                                  "): files ", files.written ? "written to " : "reused from ",
                                  files.dir, " in ", absl::StrFormat("%.3f", files.seconds), " s");
  for (const auto& [component, path] : files.single_files) {
    absl::StrAppend(&note, "\n  single file of ", component, ": ", path);
  }
  if (!files.example_inputs.empty()) {
    absl::StrAppend(&note, "\n  example request tensors: ", files.example_inputs);
  }
  result.report = absl::StrCat(note, "\n", result.report);
  result.seconds += files.seconds;
  return result;
}

absl::StatusOr<LoadModelResult> ModelManager::Load(const LoadModelRequest& request) {
  const auto start = std::chrono::steady_clock::now();
  // Cheap argument checks first, so a bad request never marks the name LOADING.
  RETURN_IF_ERROR(ValidateInstanceName(request.name));
  ASSIGN_OR_RETURN(torch::Dtype dtype, ParseModelDtype(request.dtype));
  ASSIGN_OR_RETURN(torch::Device device, ParseDevice(request.device));
  ModelOptions cast_options;
  cast_options.dtype = dtype;
  RETURN_IF_ERROR(Annotate(SetStorageDtype(request.storage_dtype, cast_options), "storage_dtype"));
  const std::optional<torch::Dtype> storage_dtype = cast_options.storage_dtype;
  ASSIGN_OR_RETURN(cast_options.device_map,
                   ParseDeviceMapRequest(request.device_map, request.max_memory_bytes));
  if (storage_dtype.has_value() && !request.layerwise_casting_skip_patterns.empty()) {
    cast_options.layerwise_casting_skip_patterns = request.layerwise_casting_skip_patterns;
  }
  RETURN_IF_ERROR(Annotate(ValidateStorageDtype(cast_options), "storage_dtype"));
  if (cast_options.layerwise_casting_skip_patterns.has_value()) {
    RETURN_IF_ERROR(Annotate(ValidateSkipPatterns(*cast_options.layerwise_casting_skip_patterns),
                             "layerwise_casting_skip_patterns"));
  }
  if (!request.config_override.is_null() && !request.config_override.is_object()) {
    return absl::InvalidArgumentError("config override must be a JSON object");
  }
  std::error_code ec;
  const bool is_dir = fs::is_directory(request.path, ec);
  if (!is_dir && !fs::exists(request.path, ec)) {
    return absl::NotFoundError(absl::StrCat("model path ", request.path, " does not exist"));
  }
  if (is_dir && !request.config_override.is_null()) {
    return absl::InvalidArgumentError(
        "a config override applies to single files only (a model folder has its config.json)");
  }
  if (request.group_offloading.has_value()) {
    RETURN_IF_ERROR(Annotate(ValidateGroupOffloadingOptions(*request.group_offloading, device),
                             "group_offload"));
    cast_options.group_offloading = request.group_offloading;
    if (cast_options.group_offloading->offload_dir.empty()) {
      cast_options.group_offloading->offload_dir = options_.offload_dir;
    }
  }
  RETURN_IF_ERROR(BeginLoad(request.name, request.replace, absl::StrCat("loading ", request.path)));
  auto build = [&]() -> absl::StatusOr<ModelInstance> {
    ModelOptions model_options = cast_options;
    model_options.device = device;
    std::unique_ptr<DiffusionModel> model;
    std::string report, variant;
    if (is_dir && IsPipelineFolder(request.path)) {
      PipelineLoadOptions pipeline_options;
      pipeline_options.model = model_options;
      pipeline_options.pipeline = options_.pipeline;
      pipeline_options.lora = options_.lora;
      ASSIGN_OR_RETURN(std::unique_ptr<DiffusionPipeline> loaded,
                       LoadPipelineFromFolder(request.path, pipeline_options));
      std::shared_ptr<const DiffusionPipeline> pipeline(std::move(loaded));
      ASSIGN_OR_RETURN(ModelInstance instance, MakePipelineInstance(request.name, pipeline));
      ASSIGN_OR_RETURN(instance.sha256, WeightsDigest(request.path));
      instance.source = request.path;
      instance.report = absl::StrCat("diffusers pipeline folder ", request.path, "\n",
                                     PipelineReport(*pipeline));
      instance.demo = request.demo;
      return instance;
    }
    if (is_dir) {
      ASSIGN_OR_RETURN(model, LoadModelFromFolder(request.path, model_options));
      report =
          absl::StrCat("diffusers model folder ", request.path, "\n  class: ", model->class_name(),
                       "\n  config: ", model->config().dump(), "\n");
    } else {
      SingleFileOptions options;
      options.model = model_options;
      options.config_override = request.config_override;
      ASSIGN_OR_RETURN(LoadedSingleFile loaded, LoadSingleFile(request.path, options));
      model = std::move(loaded.model);
      report = loaded.report.ToString();
      variant = loaded.report.variant;
    }
    ASSIGN_OR_RETURN(std::string digest, WeightsDigest(request.path));
    ASSIGN_OR_RETURN(ModelInstance instance,
                     MakeInstance(request.name, std::move(model), options_.lora));
    instance.source = request.path;
    instance.sha256 = std::move(digest);
    instance.variant = std::move(variant);
    instance.report = std::move(report);
    instance.demo = request.demo;
    return instance;
  };
  absl::StatusOr<ModelInstance> built =
      BuildCatching(absl::StrCat("loading ", request.path), build);
  return FinishLoad(request.name, std::move(built), SecondsSince(start));
}

absl::Status ModelManager::Unload(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat("no model instance '", name, "'"));
  }
  if (it->second.loading) {
    return absl::UnavailableError(
        absl::StrCat("model instance '", name, "' is being loaded; unload it when it is READY"));
  }
  const bool was_serving = it->second.instance != nullptr;
  if (was_serving) RetireLocked(std::move(it->second.instance));
  entries_.erase(it);
  if (was_serving && listener_) listener_(name, false);
  return absl::OkStatus();
}

absl::StatusOr<InstancePtr> ModelManager::Get(const std::string& name) const {
  std::lock_guard lock(mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    std::vector<std::string> names;
    for (const auto& [n, e] : entries_) names.push_back(n);
    return absl::NotFoundError(
        absl::StrCat("no model instance '", name,
                     "' (instances: ", names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
  }
  const Entry& e = it->second;
  if (e.instance != nullptr) return e.instance;
  if (e.loading) {
    return absl::UnavailableError(
        absl::StrCat("model instance '", name, "' is LOADING; retry when it is READY"));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("model instance '", name, "' FAILED to load: ", e.reason));
}

std::vector<InstanceStatus> ModelManager::List() const {
  std::lock_guard lock(mu_);
  std::vector<InstanceStatus> out;
  for (const auto& [name, e] : entries_) {
    InstanceStatus s;
    s.name = name;
    s.instance = e.instance;
    s.reason = e.reason;
    if (e.instance != nullptr) {
      s.state = InstanceState::kReady;
    } else {
      s.state = e.loading ? InstanceState::kLoading : InstanceState::kFailed;
    }
    out.push_back(std::move(s));
  }
  // Retired instances still held by running requests; forget the ones that are gone.
  std::vector<std::weak_ptr<const ModelInstance>> alive;
  for (const auto& weak : retired_) {
    if (InstancePtr p = weak.lock()) {
      InstanceStatus s;
      s.name = p->name;
      s.state = InstanceState::kUnloading;
      s.reason = "finishing the requests that hold it";
      s.instance = p;
      out.push_back(std::move(s));
      alive.push_back(weak);
    }
  }
  retired_ = std::move(alive);
  return out;
}

std::vector<std::string> ModelManager::ReadyNames() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) {
    if (e.instance != nullptr) out.push_back(name);
  }
  return out;
}

}  // namespace ds::server
