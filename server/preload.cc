#include "server/preload.h"

#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "server/metrics.h"

namespace ds::server {
namespace {

namespace fs = std::filesystem;

std::string Resolve(const std::string& path, const std::string& dir) {
  if (path.empty() || fs::path(path).is_absolute() || dir.empty()) return path;
  return (fs::path(dir) / path).lexically_normal().string();
}

absl::Status CheckKeys(const nlohmann::json& obj, const std::string& where,
                       const std::set<std::string>& allowed) {
  if (!obj.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": not an object"));
  for (const auto& [key, value] : obj.items()) {
    if (allowed.count(key) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown key '", key, "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, const std::string& where,
                                      const char* key, bool required, std::string fallback = "") {
  if (!obj.contains(key)) {
    if (required) return absl::InvalidArgumentError(absl::StrCat(where, ".", key, ": required"));
    return fallback;
  }
  if (!obj[key].is_string() || obj[key].get<std::string>().empty()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".", key, ": a non-empty string"));
  }
  return obj[key].get<std::string>();
}

absl::StatusOr<bool> GetBool(const nlohmann::json& obj, const std::string& where, const char* key) {
  if (!obj.contains(key)) return false;
  if (!obj[key].is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ".", key, ": true or false"));
  }
  return obj[key].get<bool>();
}

}  // namespace

absl::StatusOr<PreloadConfig> ParsePreloadConfig(const nlohmann::json& json,
                                                 const std::string& model_dir,
                                                 const std::string& adapter_dir) {
  RETURN_IF_ERROR(CheckKeys(json, "config", {"models", "adapters"}));
  PreloadConfig config;
  for (const char* section : {"models", "adapters"}) {
    if (json.contains(section) && !json[section].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat("config.", section, ": an array"));
    }
  }
  if (json.contains("models")) {
    for (size_t i = 0; i < json["models"].size(); ++i) {
      const nlohmann::json& m = json["models"][i];
      const std::string where = absl::StrCat("models[", i, "]");
      RETURN_IF_ERROR(
          CheckKeys(m, where, {"name", "path", "embedded", "dtype", "device", "config"}));
      PreloadModel model;
      ASSIGN_OR_RETURN(model.name, GetString(m, where, "name", true));
      ASSIGN_OR_RETURN(model.embedded, GetBool(m, where, "embedded"));
      ASSIGN_OR_RETURN(std::string path, GetString(m, where, "path", !model.embedded));
      if (model.embedded && !path.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": give either path or \"embedded\": true"));
      }
      model.path = Resolve(path, model_dir);
      ASSIGN_OR_RETURN(model.dtype, GetString(m, where, "dtype", false, "float32"));
      ASSIGN_OR_RETURN(model.device, GetString(m, where, "device", false, "cpu"));
      if (m.contains("config")) {
        if (!m["config"].is_object()) {
          return absl::InvalidArgumentError(absl::StrCat(where, ".config: an object"));
        }
        model.config = m["config"];
      }
      config.models.push_back(std::move(model));
    }
  }
  if (json.contains("adapters")) {
    for (size_t i = 0; i < json["adapters"].size(); ++i) {
      const nlohmann::json& a = json["adapters"][i];
      const std::string where = absl::StrCat("adapters[", i, "]");
      RETURN_IF_ERROR(CheckKeys(a, where, {"model", "name", "path", "pin", "weight"}));
      PreloadAdapter adapter;
      ASSIGN_OR_RETURN(adapter.model, GetString(a, where, "model", true));
      ASSIGN_OR_RETURN(adapter.name, GetString(a, where, "name", true));
      ASSIGN_OR_RETURN(std::string path, GetString(a, where, "path", true));
      adapter.path = Resolve(path, adapter_dir);
      ASSIGN_OR_RETURN(adapter.pin, GetBool(a, where, "pin"));
      if (a.contains("weight")) {
        if (!a["weight"].is_number()) {
          return absl::InvalidArgumentError(absl::StrCat(where, ".weight: a number"));
        }
        adapter.weight = a["weight"].get<double>();
      }
      config.adapters.push_back(std::move(adapter));
    }
  }
  return config;
}

absl::StatusOr<PreloadConfig> ReadPreloadConfig(const std::string& path,
                                                const std::string& model_root,
                                                const std::string& adapter_root) {
  ASSIGN_OR_RETURN(nlohmann::json json, ReadJsonFile(path));
  const std::string dir = fs::absolute(fs::path(path)).parent_path().string();
  absl::StatusOr<PreloadConfig> config = ParsePreloadConfig(
      json, model_root.empty() ? dir : model_root, adapter_root.empty() ? dir : adapter_root);
  if (!config.ok()) return Annotate(config.status(), path);
  return config;
}

absl::Status Preload(const PreloadConfig& config, ModelManager& models, Metrics* metrics) {
  absl::Status first;
  auto note = [&](const absl::Status& s, const std::string& what) {
    if (!s.ok() && first.ok()) first = Annotate(s, what);
  };
  for (const PreloadModel& m : config.models) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<LoadModelResult> r;
    if (m.embedded) {
      r = models.LoadEmbedded(m.name);
    } else {
      LoadModelRequest request;
      request.name = m.name;
      request.path = m.path;
      request.dtype = m.dtype;
      request.device = m.device;
      request.config_override = m.config;
      r = models.Load(request);
    }
    if (metrics != nullptr) {
      metrics->ObserveModelLoad(
          m.name, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    note(r.status(), absl::StrCat("model '", m.name, "'"));
  }
  std::map<std::string, std::vector<AdapterRequest>> fuse;
  for (const PreloadAdapter& a : config.adapters) {
    const std::string what = absl::StrCat("adapter '", a.name, "' of model '", a.model, "'");
    absl::StatusOr<InstancePtr> inst = models.Get(a.model);
    if (!inst.ok()) {
      note(inst.status(), what);
      continue;
    }
    AdapterLoadOptions options;
    options.pin = a.pin;
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<AdapterLoadResult> r = (*inst)->host->Load(a.name, a.path, options);
    if (metrics != nullptr) {
      metrics->ObserveAdapterLoad(
          a.model, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      metrics->SetAdapters(a.model, static_cast<int64_t>((*inst)->host->adapter_count()),
                           (*inst)->host->memory_used_bytes());
    }
    note(r.status(), what);
    if (r.ok() && a.weight.has_value()) fuse[a.model].push_back({a.name, *a.weight});
  }
  for (const auto& [model, adapters] : fuse) {
    absl::StatusOr<InstancePtr> inst = models.Get(model);
    if (!inst.ok()) continue;
    note((*inst)->host->Fuse(adapters), absl::StrCat("fusing the adapters of model '", model, "'"));
  }
  return first;
}

}  // namespace ds::server
