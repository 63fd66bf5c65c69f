#include "handlers/registry.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/device_map.h"
#include "handlers/layerwise_casting.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds {
namespace {

std::vector<std::string> Sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

std::vector<std::string> AllNames(const ModelSpec& spec) {
  std::vector<std::string> names = {spec.name, spec.class_name};
  names.insert(names.end(), spec.aliases.begin(), spec.aliases.end());
  return names;
}

}  // namespace

ModelMetadata BuildModelMetadata(const ModelSpec& spec) {
  std::vector<FeatureRow> rows;
  auto add = [&rows](std::string_view attribute, FeatureValue value) {
    // Every attribute used here is in the catalogue; a failure would be a programming error.
    auto row = MakeFeatureRow(attribute, std::move(value));
    if (row.ok()) rows.push_back(*std::move(row));
  };
  const ModelStructure& s = spec.structure;
  // Structural facts keep the model's declared order (as diffusers displays them).
  add("_no_split_modules", s.no_split_modules);
  add("_keep_in_fp32_modules", s.keep_in_fp32_modules);
  add("_skip_layerwise_casting_patterns", s.skip_layerwise_casting_patterns);
  add("_repeated_blocks", s.repeated_blocks);
  // Capability rows exist only when the handler is wired, derived from what it registers.
  if (spec.weight_mapping != nullptr) {
    add("_weight_mapping", Sorted(spec.weight_mapping->VariantNames()));
  }
  if (spec.lora != nullptr) add("_lora", Sorted(spec.lora->FormatNames()));
  if (spec.ip_adapter != nullptr) add("_supports_ip_adapter", true);
  if (spec.cache != nullptr && !spec.cache->CacheTypes().empty()) add("_supports_cache", true);
  if (spec.group_offloading) add("_supports_group_offloading", true);
  return ModelMetadata(spec.class_name, std::move(rows));
}

absl::Status CheckLayerwiseCastingSupported(const ModelSpec& spec, const ModelOptions& options) {
  if (!options.storage_dtype.has_value()) return absl::OkStatus();
  if (!spec.layerwise_casting) {
    return absl::UnimplementedError(absl::StrCat(
        spec.class_name, " does not support layerwise casting (storage dtype ",
        StorageDtypeName(options.storage_dtype), "); load it without a storage dtype"));
  }
  RETURN_IF_ERROR(ValidateStorageDtype(options));
  if (options.layerwise_casting_skip_patterns.has_value()) {
    RETURN_IF_ERROR(ValidateSkipPatterns(*options.layerwise_casting_skip_patterns));
  }
  return absl::OkStatus();
}

absl::Status CheckGroupOffloadingSupported(const ModelSpec& spec, const ModelOptions& options) {
  if (!options.group_offloading.has_value()) return absl::OkStatus();
  if (!spec.group_offloading) {
    return absl::UnimplementedError(absl::StrCat(
        spec.class_name, " does not support group offloading; load it without group_offload"));
  }
  return ValidateGroupOffloadingOptions(*options.group_offloading, options.device);
}

absl::Status ApplyGroupOffloading(const ModelSpec& spec, DiffusionModel& model) {
  const ModelOptions& options = model.options();
  if (!options.group_offloading.has_value()) return absl::OkStatus();
  RETURN_IF_ERROR(CheckGroupOffloadingSupported(spec, options));
  ASSIGN_OR_RETURN(std::shared_ptr<GroupOffloader> offloader,
                   GroupOffloader::Apply(model.module(), spec.structure.repeated_blocks,
                                         *options.group_offloading, options.device));
  model.set_group_offloader(std::move(offloader));
  return absl::OkStatus();
}

absl::Status CheckDeviceMapSupported(const ModelSpec& spec, const ModelOptions& options) {
  if (!options.device_map.enabled()) return absl::OkStatus();
  if (!spec.device_map) {
    return absl::UnimplementedError(absl::StrCat(
        spec.class_name, " does not support device maps; load it without device_map"));
  }
  if (options.group_offloading.has_value()) {
    return absl::UnimplementedError(
        "device_map and group offloading cannot be combined (both decide where the blocks live)");
  }
  if (options.device_map.strategy != "sequential" && options.device_map.strategy != "explicit") {
    return absl::InvalidArgumentError(absl::StrCat("device_map '", options.device_map.strategy,
                                                   "' is not one of sequential, explicit"));
  }
  if (options.device_map.strategy == "sequential") {
    RETURN_IF_ERROR(ValidateDeviceBudgets(options.device_map.budgets));
  }
  return absl::OkStatus();
}

absl::Status ApplyModelDeviceMap(const ModelSpec& spec, DiffusionModel& model) {
  const ModelOptions& options = model.options();
  if (!options.device_map.enabled()) return absl::OkStatus();
  RETURN_IF_ERROR(CheckDeviceMapSupported(spec, options));
  ASSIGN_OR_RETURN(DeviceMap map, ComputeDeviceMap(model.module(), spec.structure.no_split_modules,
                                                   options.device_map));
  return ApplyDeviceMap(model.module(), map);
}

ModelRegistry& ModelRegistry::Global() {
  static ModelRegistry* registry = new ModelRegistry();
  return *registry;
}

absl::Status ModelRegistry::Register(ModelSpec spec) {
  if (spec.name.empty() || spec.class_name.empty()) {
    return absl::InvalidArgumentError("model spec needs a name and a class name");
  }
  if (!spec.factory) {
    return absl::InvalidArgumentError(absl::StrCat("model spec '", spec.name, "' has no factory"));
  }
  for (const auto& existing : specs_) {
    for (const std::string& a : AllNames(*existing)) {
      for (const std::string& b : AllNames(spec)) {
        if (absl::AsciiStrToLower(a) == absl::AsciiStrToLower(b)) {
          return absl::AlreadyExistsError(absl::StrCat("model name '", b, "' of '", spec.name,
                                                       "' is already used by '", existing->name,
                                                       "'"));
        }
      }
    }
  }
  specs_.push_back(std::make_unique<ModelSpec>(std::move(spec)));
  return absl::OkStatus();
}

absl::StatusOr<const ModelSpec*> ModelRegistry::Find(std::string_view name) const {
  for (const auto& spec : specs_) {
    for (const std::string& n : AllNames(*spec)) {
      if (n == name) return spec.get();
    }
  }
  const std::string lower = absl::AsciiStrToLower(std::string(name));
  for (const auto& spec : specs_) {
    for (const std::string& n : AllNames(*spec)) {
      if (absl::AsciiStrToLower(n) == lower) return spec.get();
    }
  }
  std::vector<std::string> known;
  for (const ModelSpec* s : List())
    known.push_back(absl::StrCat(s->class_name, " (", s->name, ")"));
  return absl::NotFoundError(absl::StrCat("no registered model named '", std::string(name),
                                          "'; registered: ", absl::StrJoin(known, ", ")));
}

std::vector<const ModelSpec*> ModelRegistry::List() const {
  std::vector<const ModelSpec*> out;
  for (const auto& spec : specs_) out.push_back(spec.get());
  std::sort(out.begin(), out.end(),
            [](const ModelSpec* a, const ModelSpec* b) { return a->name < b->name; });
  return out;
}

ModelRegistrar::ModelRegistrar(ModelSpec spec) {
  const std::string name = spec.name;
  absl::Status s = ModelRegistry::Global().Register(std::move(spec));
  if (!s.ok()) {
    std::fprintf(stderr, "fatal: registering model '%s': %s\n", name.c_str(),
                 std::string(s.message()).c_str());
    std::abort();
  }
}

absl::StatusOr<std::unique_ptr<DiffusionModel>> LoadModelFromFolder(const std::string& dir,
                                                                    const ModelOptions& options,
                                                                    std::string_view class_name) {
  ASSIGN_OR_RETURN(ModelFolder folder, OpenModelFolder(dir));
  std::string resolved(class_name);
  if (resolved.empty()) {
    auto it = folder.config.find("_class_name");
    // transformers' config.json names the class in "architectures" instead.
    auto arch = folder.config.find("architectures");
    if (it != folder.config.end() && it->is_string()) {
      resolved = it->get<std::string>();
    } else if (it == folder.config.end() && arch != folder.config.end() && arch->is_array() &&
               !arch->empty() && arch->front().is_string()) {
      resolved = arch->front().get<std::string>();
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(folder.dir,
                       "/config.json: no \"_class_name\" string (nor transformers' "
                       "\"architectures\" list); name the model class explicitly"));
    }
  }
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(resolved));
  RETURN_IF_ERROR(Annotate(CheckLayerwiseCastingSupported(*spec, options), folder.dir));
  RETURN_IF_ERROR(Annotate(CheckGroupOffloadingSupported(*spec, options), folder.dir));
  RETURN_IF_ERROR(Annotate(CheckDeviceMapSupported(*spec, options), folder.dir));
  auto model = spec->factory(folder.config, options);
  if (!model.ok()) return Annotate(model.status(), absl::StrCat(folder.dir, "/config.json"));
  if (spec->adapt_state_dict) {
    auto adapted = spec->adapt_state_dict(std::move(folder.weights));
    if (!adapted.ok()) return Annotate(adapted.status(), folder.dir);
    folder.weights = std::move(adapted).value();
  }
  // 8-bit layerwise casting: quantize the checkpoint's weights into the module's storage form.
  auto stored = ToStorageForm((*model)->module(), std::move(folder.weights), options.float8_format);
  if (!stored.ok()) return Annotate(stored.status(), folder.dir);
  folder.weights = *std::move(stored);
  RETURN_IF_ERROR(LoadStateDict((*model)->module(), folder.weights, folder.dir));
  folder.weights.clear();  // with group offloading, the loaded copies must not stay alive
  RETURN_IF_ERROR(Annotate(ApplyGroupOffloading(*spec, **model), folder.dir));
  RETURN_IF_ERROR(Annotate(ApplyModelDeviceMap(*spec, **model), folder.dir));
  return std::move(model).value();
}

}  // namespace ds
