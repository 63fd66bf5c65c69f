#include "handlers/device_map.h"

#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds {
namespace {

using ModulePtr = std::shared_ptr<torch::nn::Module>;

int64_t TensorBytes(const torch::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size()) : 0;
}

int64_t ModuleBytes(const torch::nn::Module& m) {
  int64_t total = 0;
  for (const auto& [name, t] : NamedTensors(m)) total += TensorBytes(t);
  return total;
}

std::string Join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : absl::StrCat(prefix, ".", name);
}

// Whether `name` is `prefix` or below it in dotted naming ("" is above everything).
bool Covers(const std::string& prefix, const std::string& name) {
  if (prefix.empty() || prefix == name) return true;
  return name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
         name[prefix.size()] == '.';
}

std::string MiB(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

absl::Status CheckDevice(const torch::Device& d, absl::string_view what) {
  if (!d.is_cpu() && !d.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": device ", d.str(), " is not supported (cpu or cuda)"));
  }
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) {
      return absl::UnimplementedError(absl::StrCat(
          what, ": ", d.str(), " requested but CUDA is not available (LibTorch build or machine)"));
    }
    if (d.has_index() && d.index() >= static_cast<int64_t>(torch::cuda::device_count())) {
      return absl::UnimplementedError(absl::StrCat(what, ": ", d.str(), " requested but only ",
                                                   torch::cuda::device_count(),
                                                   " CUDA devices are present"));
    }
  }
  return absl::OkStatus();
}

// A unit of the sequential fill: a module (with its dotted name) or one tensor.
struct Unit {
  std::string name;
  ModulePtr module;  // null for a tensor
  int64_t bytes = 0;
};

// The own tensors (parameters, then buffers) and children of `m`, as units, in registration order.
std::vector<Unit> Expand(const torch::nn::Module& m, const std::string& prefix) {
  std::vector<Unit> out;
  for (const auto& p : m.named_parameters(/*recurse=*/false)) {
    out.push_back({Join(prefix, p.key()), nullptr, TensorBytes(p.value())});
  }
  for (const auto& b : m.named_buffers(/*recurse=*/false)) {
    out.push_back({Join(prefix, b.key()), nullptr, TensorBytes(b.value())});
  }
  for (const auto& c : m.named_children()) {
    out.push_back({Join(prefix, c.key()), c.value(), ModuleBytes(*c.value())});
  }
  return out;
}

// "transformer_blocks.7" -> ("transformer_blocks", 7); false when the last part is not a number.
bool IndexedName(const std::string& name, std::string* prefix, int64_t* index) {
  const size_t dot = name.rfind('.');
  if (dot == std::string::npos) return false;
  if (!absl::SimpleAtoi(name.substr(dot + 1), index)) return false;
  *prefix = name.substr(0, dot);
  return true;
}

}  // namespace

std::string ModuleClassNameOf(const torch::nn::Module& module) {
  std::string name = module.name();
  if (auto pos = name.rfind("::"); pos != std::string::npos) name = name.substr(pos + 2);
  constexpr absl::string_view kImpl = "Impl";
  if (name.size() > kImpl.size() &&
      name.compare(name.size() - kImpl.size(), kImpl.size(), kImpl.data()) == 0) {
    name.resize(name.size() - kImpl.size());
  }
  return name;
}

absl::StatusOr<torch::Device> ParseMapDevice(absl::string_view name) {
  const std::string s(name);
  const bool cuda = s == "cuda" || s.rfind("cuda:", 0) == 0;
  if (s != "cpu" && !cuda) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", s, "' is not one of cpu, cuda, cuda:N"));
  }
  if (cuda && s.size() > 5) {
    int64_t index = -1;
    if (!absl::SimpleAtoi(s.substr(5), &index) || index < 0 || index > 255) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", s, "': the CUDA index must be a number 0..255"));
    }
  }
  torch::Device device = cuda ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  if (cuda && s.size() > 5) {
    int64_t index = 0;
    (void)absl::SimpleAtoi(s.substr(5), &index);  // checked above
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  RETURN_IF_ERROR(CheckDevice(device, absl::StrCat("device '", s, "'")));
  return device;
}

absl::Status ValidateDeviceBudgets(const std::vector<std::pair<torch::Device, int64_t>>& budgets) {
  if (budgets.empty()) {
    return absl::InvalidArgumentError(
        "device map: no devices (give at least one device with its byte budget)");
  }
  for (size_t i = 0; i < budgets.size(); ++i) {
    const auto& [device, bytes] = budgets[i];
    const std::string what = absl::StrCat("device map entry ", i, " (", device.str(), ")");
    if (bytes < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": budget must be >= 0 bytes, got ", bytes));
    }
    RETURN_IF_ERROR(CheckDevice(device, what));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceMap> InferSequentialDeviceMap(
    const torch::nn::Module& module, const std::vector<std::string>& no_split_modules,
    const std::vector<std::pair<torch::Device, int64_t>>& budgets) {
  RETURN_IF_ERROR(ValidateDeviceBudgets(budgets));
  const std::set<std::string> no_split(no_split_modules.begin(), no_split_modules.end());
  DeviceMap map;
  for (const auto& [device, bytes] : budgets) {
    map.devices.push_back(device);
    map.budgets.push_back(bytes);
    map.used_bytes.push_back(0);
  }
  std::vector<Unit> top = Expand(module, "");
  std::deque<Unit> queue(top.begin(), top.end());
  size_t dev = 0;
  while (!queue.empty()) {
    Unit u = std::move(queue.front());
    queue.pop_front();
    if (map.used_bytes[dev] + u.bytes <= map.budgets[dev]) {
      map.used_bytes[dev] += u.bytes;
      map.placements.push_back({u.name, dev, u.bytes, u.module == nullptr});
      continue;
    }
    const std::string cls = u.module != nullptr ? ModuleClassNameOf(*u.module) : "";
    const bool splittable =
        u.module != nullptr && !u.module->children().empty() && no_split.count(cls) == 0;
    if (splittable) {
      std::vector<Unit> parts = Expand(*u.module, u.name);
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) queue.push_front(std::move(*it));
      continue;
    }
    if (dev + 1 < map.devices.size()) {
      ++dev;
      queue.push_front(std::move(u));
      continue;
    }
    const std::string kind =
        u.module == nullptr
            ? "tensor"
            : absl::StrCat(cls, no_split.count(cls) ? " (in _no_split_modules: kept whole)"
                                                    : " (a leaf module)");
    return absl::ResourceExhaustedError(
        absl::StrCat("device map: '", u.name, "' (", kind, ", ", u.bytes,
                     " bytes) does not fit: the last device ", map.devices[dev].str(), " (entry ",
                     dev, ") has ", map.budgets[dev] - map.used_bytes[dev], " of its ",
                     map.budgets[dev], " bytes left and no device follows"));
  }
  return map;
}

absl::StatusOr<DeviceMap> ExplicitDeviceMap(
    const torch::nn::Module& module, const std::vector<std::string>& no_split_modules,
    const std::vector<std::pair<std::string, torch::Device>>& placement) {
  if (placement.empty()) return absl::InvalidArgumentError("device map: no entries");
  const TensorMap tensors = NamedTensors(module);
  std::map<std::string, ModulePtr> modules;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    modules.emplace(item.key(), item.value());
  }
  DeviceMap map;
  std::set<std::string> seen;
  std::vector<size_t> entry_device;
  for (const auto& [name, device] : placement) {
    const std::string what = absl::StrCat("device map entry '", name, "'");
    if (!name.empty() && modules.count(name) == 0 && tensors.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": no such module or tensor in the model"));
    }
    if (!seen.insert(name).second) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": given twice"));
    }
    RETURN_IF_ERROR(CheckDevice(device, what));
    auto it = std::find(map.devices.begin(), map.devices.end(), device);
    if (it == map.devices.end()) {
      map.devices.push_back(device);
      map.used_bytes.push_back(0);
      it = map.devices.end() - 1;
    }
    entry_device.push_back(static_cast<size_t>(it - map.devices.begin()));
  }
  // Each tensor's entry: the longest covering name.
  std::vector<int64_t> entry_bytes(placement.size(), 0);
  std::map<std::string, size_t> device_of;
  for (const auto& [tname, t] : tensors) {
    int64_t best = -1;
    for (size_t i = 0; i < placement.size(); ++i) {
      if (Covers(placement[i].first, tname) &&
          (best < 0 || placement[i].first.size() > placement[best].first.size())) {
        best = static_cast<int64_t>(i);
      }
    }
    if (best < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device map: tensor '", tname, "' is not covered by any entry"));
    }
    entry_bytes[best] += TensorBytes(t);
    map.used_bytes[entry_device[best]] += TensorBytes(t);
    device_of[tname] = entry_device[best];
  }
  const std::set<std::string> no_split(no_split_modules.begin(), no_split_modules.end());
  for (const auto& [mname, m] : modules) {
    if (no_split.count(ModuleClassNameOf(*m)) == 0) continue;
    std::set<size_t> used;
    for (const auto& [tname, d] : device_of) {
      if (Covers(mname, tname)) used.insert(d);
    }
    if (used.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "device map: '", mname, "' is a ", ModuleClassNameOf(*m),
          " (in _no_split_modules) and must stay on one device, but the entries spread it over ",
          used.size(), " devices"));
    }
  }
  for (size_t i = 0; i < placement.size(); ++i) {
    map.placements.push_back({placement[i].first, entry_device[i], entry_bytes[i],
                              tensors.count(placement[i].first) > 0});
  }
  return map;
}

absl::StatusOr<DeviceMapOptions> ParseDeviceMapRequest(
    absl::string_view device_map, const std::map<std::string, int64_t>& max_memory_bytes) {
  DeviceMapOptions out;
  if (device_map.empty()) {
    if (!max_memory_bytes.empty()) {
      return absl::InvalidArgumentError("max_memory_bytes: only with device_map \"sequential\"");
    }
    return out;
  }
  if (device_map == "sequential") {
    if (max_memory_bytes.empty()) {
      return absl::InvalidArgumentError(
          "device_map \"sequential\" needs max_memory_bytes (device -> byte budget)");
    }
    for (const auto& [name, bytes] : max_memory_bytes) {
      auto device = ParseMapDevice(name);
      if (!device.ok()) return Annotate(device.status(), "max_memory_bytes");
      out.budgets.emplace_back(*device, bytes);
    }
    // CUDA devices by index first, then the CPU (accelerate's order).
    std::stable_sort(out.budgets.begin(), out.budgets.end(), [](const auto& a, const auto& b) {
      const int ka = a.first.is_cuda() ? 0 : 1, kb = b.first.is_cuda() ? 0 : 1;
      if (ka != kb) return ka < kb;
      return std::max<int>(a.first.index(), 0) < std::max<int>(b.first.index(), 0);
    });
    out.strategy = "sequential";
    RETURN_IF_ERROR(Annotate(ValidateDeviceBudgets(out.budgets), "max_memory_bytes"));
    return out;
  }
  if (!max_memory_bytes.empty()) {
    return absl::InvalidArgumentError("max_memory_bytes: only with device_map \"sequential\"");
  }
  const nlohmann::json j = nlohmann::json::parse(device_map.begin(), device_map.end(), nullptr,
                                                 /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || j.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "device_map '", device_map,
        "' is not \"sequential\" nor a non-empty JSON object {\"module\": \"device\", ...}"));
  }
  for (const auto& [name, value] : j.items()) {
    if (!value.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device_map entry '", name, "': the device must be a string"));
    }
    auto device = ParseMapDevice(value.get<std::string>());
    if (!device.ok()) {
      return Annotate(device.status(), absl::StrCat("device_map entry '", name, "'"));
    }
    out.placement.emplace_back(name, *device);
  }
  out.strategy = "explicit";
  return out;
}

absl::StatusOr<DeviceMap> ComputeDeviceMap(const torch::nn::Module& module,
                                           const std::vector<std::string>& no_split_modules,
                                           const DeviceMapOptions& options) {
  if (options.strategy == "sequential") {
    return InferSequentialDeviceMap(module, no_split_modules, options.budgets);
  }
  if (options.strategy == "explicit") {
    return ExplicitDeviceMap(module, no_split_modules, options.placement);
  }
  return absl::InvalidArgumentError(absl::StrCat("device map strategy '", options.strategy,
                                                 "' is not one of sequential, explicit"));
}

int64_t DeviceMap::DeviceIndexOf(const std::string& tensor_name) const {
  int64_t best = -1;
  size_t best_len = 0;
  for (const DevicePlacement& p : placements) {
    if (Covers(p.name, tensor_name) && (best < 0 || p.name.size() >= best_len)) {
      best = static_cast<int64_t>(p.device_index);
      best_len = p.name.size();
    }
  }
  return best;
}

std::string DeviceMap::Summary() const {
  std::vector<std::string> lines;
  for (size_t d = 0; d < devices.size(); ++d) {
    std::vector<std::string> names;
    // Runs of "<prefix>.<i>", "<prefix>.<i+1>", ... are written "<prefix>.<i>..<j>".
    std::string run_prefix;
    int64_t run_first = 0, run_last = -2;
    auto flush = [&] {
      if (run_last < run_first) return;
      names.push_back(run_first == run_last
                          ? absl::StrCat(run_prefix, ".", run_first)
                          : absl::StrCat(run_prefix, ".", run_first, "..", run_last));
      run_last = run_first - 1;
    };
    for (const DevicePlacement& p : placements) {
      if (p.device_index != d) continue;
      std::string prefix;
      int64_t index = 0;
      if (IndexedName(p.name, &prefix, &index)) {
        if (prefix == run_prefix && index == run_last + 1 && run_last >= run_first) {
          run_last = index;
          continue;
        }
        flush();
        run_prefix = prefix;
        run_first = run_last = index;
        continue;
      }
      flush();
      names.push_back(p.name.empty() ? "(whole model)" : p.name);
    }
    flush();
    std::string head = absl::StrCat(devices[d].str(), "#", d, " ", MiB(used_bytes[d]));
    if (d < budgets.size()) absl::StrAppend(&head, " of ", MiB(budgets[d]));
    lines.push_back(
        absl::StrCat(head, ": ", names.empty() ? "(nothing)" : absl::StrJoin(names, ", ")));
  }
  return absl::StrJoin(lines, "\n");
}

absl::Status ApplyDeviceMap(torch::nn::Module& module, const DeviceMap& map) {
  TensorMap tensors = NamedTensors(module);
  std::vector<std::pair<torch::Tensor, torch::Device>> moves;
  for (const auto& [name, t] : tensors) {
    const int64_t d = map.DeviceIndexOf(name);
    if (d < 0 || static_cast<size_t>(d) >= map.devices.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("device map does not cover tensor '", name, "' (a map of another model?)"));
    }
    if (t.device() != map.devices[d]) moves.emplace_back(t, map.devices[d]);
  }
  std::string current;
  absl::Status s = TorchCallVoid("applying the device map", [&] {
    torch::NoGradGuard no_grad;
    for (auto& [t, device] : moves) {
      current = device.str();
      t.set_data(t.to(device));
    }
  });
  if (s.ok()) return s;
  if (s.message().find("out of memory") != absl::string_view::npos) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device map: ", current, " ran out of memory: ", s.message()));
  }
  return s;
}

std::string DevicePlacementSummary(const torch::nn::Module& module) {
  std::vector<torch::Device> order;
  std::map<std::string, std::pair<int64_t, int64_t>> per;  // device -> (bytes, tensors)
  // Registration order (NamedTensors is sorted by name).
  auto add = [&](const torch::Tensor& t) {
    const std::string key = t.device().str();
    if (per.count(key) == 0) order.push_back(t.device());
    per[key].first += TensorBytes(t);
    per[key].second += 1;
  };
  for (const auto& p : module.parameters(/*recurse=*/true)) add(p);
  for (const auto& b : module.buffers(/*recurse=*/true)) add(b);
  std::vector<std::string> parts;
  for (const torch::Device& d : order) {
    const auto& [bytes, count] = per[d.str()];
    parts.push_back(absl::StrCat(d.str(), " ", MiB(bytes), " (", count, " tensors)"));
  }
  return absl::StrJoin(parts, "; ");
}

}  // namespace ds
