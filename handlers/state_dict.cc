#include "handlers/state_dict.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

bool IsFile(const fs::path& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

// A checkpoint value can be converted into a module tensor when both are floating point, both are
// integral/bool, or the dtypes are equal. Anything else (complex -> real, float -> int, ...) would
// silently lose information in copy_().
bool ConvertibleDtype(torch::ScalarType from, torch::ScalarType to) {
  if (from == to) return true;
  const bool from_float = c10::isFloatingType(from);
  const bool to_float = c10::isFloatingType(to);
  if (from_float && to_float) return true;
  const bool from_int = c10::isIntegralType(from, /*includeBool=*/true);
  const bool to_int = c10::isIntegralType(to, /*includeBool=*/true);
  return from_int && to_int;
}

// The weight files of a model folder, in the order diffusers / transformers look for them.
constexpr const char* kWeightFiles[] = {
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
};

// The first weight file present in `dir`, or "" if none.
std::string FindWeightFile(const fs::path& dir) {
  for (const char* name : kWeightFiles) {
    if (IsFile(dir / name)) return (dir / name).string();
  }
  return "";
}

}  // namespace

std::string StateDictReport::ToString() const {
  if (ok()) return "";
  std::string out;
  auto section = [&out](absl::string_view title, const std::vector<std::string>& names) {
    if (names.empty()) return;
    absl::StrAppend(&out, out.empty() ? "" : "\n", title, " (", names.size(), "):");
    for (const auto& name : names) absl::StrAppend(&out, "\n  ", name);
  };
  section("missing keys", missing);
  section("unexpected keys", unexpected);
  section("shape mismatches", shape_mismatch);
  return out;
}

TensorMap NamedTensors(const torch::nn::Module& module) {
  TensorMap out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    out.emplace(item.key(), item.value());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    out.emplace(item.key(), item.value());
  }
  return out;
}

void InitRandomWeights(torch::nn::Module& module, uint64_t seed) {
  torch::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::map<std::string, torch::Tensor> params;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    params.emplace(item.key(), item.value());
  }
  // A weight of rank >= 2 (a matrix, or a convolution kernel [out, in, k...]) has fan-in
  // numel / out, as torch.nn.Linear / ConvNd count it.
  auto weight_fan_in = [](const torch::Tensor& w) -> int64_t {
    return w.dim() >= 2 && w.size(0) > 0 ? w.numel() / w.size(0) : 0;
  };
  auto fan_in_of = [&](const std::string& name) -> int64_t {
    // "<prefix>.bias" takes the fan-in of "<prefix>.weight" when that has rank >= 2.
    const std::string suffix = ".bias";
    if (name.size() < suffix.size() ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      return 0;
    }
    auto it = params.find(name.substr(0, name.size() - suffix.size()) + ".weight");
    return it != params.end() ? weight_fan_in(it->second) : 0;
  };
  for (auto& [name, p] : params) {
    torch::Tensor v = torch::empty(p.sizes(), torch::kFloat);
    int64_t fan_in = p.dim() >= 2 ? weight_fan_in(p) : fan_in_of(name);
    if (fan_in > 0) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      v.uniform_(-bound, bound, gen);
    } else {
      v.uniform_(0.9, 1.1, gen);
    }
    p.detach().copy_(v);
  }
}

StateDictReport CheckStateDict(const torch::nn::Module& module, const TensorMap& state_dict) {
  StateDictReport report;
  const TensorMap own = NamedTensors(module);
  // Both maps are sorted by name, so the lists come out sorted.
  for (const auto& [name, tensor] : own) {
    auto it = state_dict.find(name);
    if (it == state_dict.end()) {
      report.missing.push_back(name);
    } else if (!it->second.defined() || it->second.sizes() != tensor.sizes()) {
      report.shape_mismatch.push_back(absl::StrCat(
          name, ": module ", ShapeString(tensor), " vs checkpoint ",
          it->second.defined() ? ShapeString(it->second) : std::string("(undefined tensor)")));
    }
  }
  for (const auto& [name, tensor] : state_dict) {
    if (own.find(name) == own.end()) report.unexpected.push_back(name);
  }
  return report;
}

absl::Status LoadStateDict(torch::nn::Module& module, const TensorMap& state_dict,
                           std::string_view source_view, StateDictReport* report) {
  const absl::string_view source(source_view.data(), source_view.size());
  StateDictReport found = CheckStateDict(module, state_dict);
  if (report != nullptr) *report = found;
  if (!found.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": state dict does not match the module\n", found.ToString()));
  }
  const TensorMap own = NamedTensors(module);
  std::vector<std::string> bad_dtypes;
  for (const auto& [name, dst] : own) {
    const torch::Tensor& src = state_dict.at(name);
    if (!ConvertibleDtype(src.scalar_type(), dst.scalar_type())) {
      bad_dtypes.push_back(absl::StrCat(name, ": checkpoint ", c10::toString(src.scalar_type()),
                                        " cannot be converted to module ",
                                        c10::toString(dst.scalar_type())));
    }
  }
  if (!bad_dtypes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": incompatible dtypes\n  ", absl::StrJoin(bad_dtypes, "\n  ")));
  }

  // Everything is validated; copy. A CPU-to-CPU copy between strided tensors with storage cannot
  // fail (it allocates nothing), so the common case copies straight in. Any other copy (a device
  // involved, an exotic source) may fail part-way; restoring then needs the old values, so each
  // destination is backed up (on its own device) just before it is overwritten, and the backups
  // are dropped once every copy has succeeded.
  bool may_fail = false;
  for (const auto& [name, dst] : own) {
    const torch::Tensor& src = state_dict.at(name);
    if (!src.device().is_cpu() || !dst.device().is_cpu() || src.layout() != torch::kStrided ||
        !src.has_storage() || src.is_quantized() || dst.is_quantized()) {
      may_fail = true;
    }
  }
  torch::NoGradGuard no_grad;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> backups;  // (destination, old value)
  if (may_fail) backups.reserve(own.size());
  std::string current;
  absl::Status status = TorchCallVoid("copy", [&]() {
    for (const auto& [name, dst] : own) {
      current = name;
      torch::Tensor target = dst.detach();  // shares the module's storage
      if (may_fail) backups.emplace_back(target, target.clone());
      target.copy_(state_dict.at(name));
    }
  });
  if (status.ok()) return status;
  for (auto& [target, old] : backups) {
    // Same dtype, shape and device as the backup: a plain memcpy.
    target.copy_(old);
  }
  return absl::InternalError(absl::StrCat(
      source, ": copying '", current, "' failed, ",
      may_fail ? "module restored" : "module may be partially updated", ": ", status.message()));
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return absl::InternalError(absl::StrCat(path, ": read error"));
  try {
    return nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::parse_error& e) {
    // e.what() names the byte position of the error.
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid JSON: ", e.what()));
  }
}

absl::StatusOr<ModelFolder> OpenModelFolder(const std::string& dir, const std::string& subfolder) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such directory"));
  }
  // Prefer `dir` itself when it has a config.json; otherwise look into the subfolder.
  fs::path folder = dir;
  if (!IsFile(folder / "config.json") && !subfolder.empty() &&
      IsFile(fs::path(dir) / subfolder / "config.json")) {
    folder = fs::path(dir) / subfolder;
  }
  if (!IsFile(folder / "config.json")) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": not a model folder (no config.json",
                     subfolder.empty() ? "" : absl::StrCat(" here or in '", subfolder, "/'"), ")"));
  }
  const std::string weights = FindWeightFile(folder);
  if (weights.empty()) {
    return absl::NotFoundError(absl::StrCat(folder.string(), ": no weights (looked for ",
                                            absl::StrJoin(kWeightFiles, ", "), ")"));
  }
  ModelFolder out;
  out.dir = folder.string();
  ASSIGN_OR_RETURN(out.config, ReadJsonFile((folder / "config.json").string()));
  if (!out.config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat((folder / "config.json").string(), ": not a JSON object"));
  }
  ASSIGN_OR_RETURN(out.weights, LoadSafetensorsWeights(weights));
  return out;
}

}  // namespace ds
