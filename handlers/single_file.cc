#include "handlers/single_file.h"

#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/layerwise_casting.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/tensor_checks.h"

namespace ds {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string Shape(c10::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

// The file key a target tensor comes from (for error messages).
std::string SourcesOf(const SingleFileInspection& in, const std::string& target) {
  auto it = in.plan.find(target);
  if (it == in.plan.end()) return "?";
  std::vector<std::string> keys;
  for (const auto& s : it->second.sources) {
    auto src = in.keys.source.find(s);
    keys.push_back(src == in.keys.source.end() ? s : src->second);
  }
  return absl::StrJoin(keys, " + ");
}

// Whether a recipe's target is a view of its source (no copy).
bool IsView(TensorRecipe::Op op) {
  return op == TensorRecipe::Op::kCopy || op == TensorRecipe::Op::kRows ||
         op == TensorRecipe::Op::kReshape;
}

}  // namespace

std::string SingleFileReport::ToString() const {
  std::string out = absl::StrCat(
      "file:        ", path, "\n", "model:       ", model_class, "\n", "variant:     ", variant,
      "\n", "naming:      ", diffusers_naming ? "diffusers" : "original", "\n");
  absl::StrAppend(&out, "prefix:      ", prefix.empty() ? "(none)" : prefix, "\n");
  absl::StrAppend(&out, "detected by: ", absl::StrJoin(markers, "; "), "\n");
  absl::StrAppend(&out, "config:      ", config.dump(), "\n");
  if (!assumed.empty()) {
    absl::StrAppend(&out, "assumed:     ", absl::StrJoin(assumed, ", "),
                    " (not recorded in the weights; override with a config)\n");
  }
  absl::StrAppend(&out, "tensors:     ", tensors_mapped, " mapped (", tensors_zero_copy,
                  " zero-copy), ", bytes, " bytes\n");
  absl::StrAppend(&out, "ignored:     ", ignored.size(), ignored.empty() ? "\n" : ":\n");
  for (const auto& [key, why] : ignored) absl::StrAppend(&out, "  ", key, "  (", why, ")\n");
  absl::StrAppend(&out, "seconds:     ", seconds, "\n");
  return out;
}

nlohmann::json SingleFileReport::ToJson() const {
  return {{"path", path},
          {"model_class", model_class},
          {"variant", variant},
          {"diffusers_naming", diffusers_naming},
          {"prefix", prefix},
          {"markers", markers},
          {"config", config},
          {"assumed", assumed},
          {"tensors_mapped", tensors_mapped},
          {"tensors_zero_copy", tensors_zero_copy},
          {"bytes", bytes},
          {"ignored", ignored},
          {"seconds", seconds}};
}

absl::StatusOr<SingleFileInspection> InspectSingleFile(const std::string& path,
                                                       const SingleFileOptions& options) {
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  KeyShapes shapes;
  for (const auto& t : file->header().tensors) shapes[t.name] = t.shape;

  SingleFileInspection in;
  in.keys = SplitSingleFileKeys(shapes);

  std::vector<const ModelSpec*> candidates;
  for (const ModelSpec* spec : ModelRegistry::Global().List()) {
    if (spec->weight_mapping == nullptr) continue;
    if (!options.model_class.empty()) {
      auto wanted = ModelRegistry::Global().Find(options.model_class);
      if (!wanted.ok()) return wanted.status();
      if (*wanted != spec) continue;
    }
    candidates.push_back(spec);
  }

  std::vector<std::pair<const ModelSpec*, WeightMappingDetection>> matches;
  for (const ModelSpec* spec : candidates) {
    auto det = spec->weight_mapping->Detect(in.keys.model_keys);
    if (!det.ok()) {
      return Annotate(det.status(), absl::StrCat(path, " (", spec->class_name, " format)"));
    }
    if (det->has_value()) matches.emplace_back(spec, **det);
  }
  // Models that checkpoints bundle as components (a VAE under "vae."): probed on the keys under
  // their prefix only when nothing matched and the file is asked for as that model or consists of
  // that component alone (see WeightMappingHandler::ComponentPrefixes).
  if (matches.empty()) {
    for (const ModelSpec* spec : candidates) {
      for (const std::string& prefix : spec->weight_mapping->ComponentPrefixes()) {
        SingleFileKeys component = SplitComponentKeys(shapes, prefix);
        if (component.model_keys.empty()) continue;
        if (options.model_class.empty() && !component.bundled.empty()) continue;
        auto det = spec->weight_mapping->Detect(component.model_keys);
        if (!det.ok()) {
          return Annotate(det.status(), absl::StrCat(path, " (", spec->class_name,
                                                     " format under '", prefix, "')"));
        }
        if (det->has_value()) {
          matches.emplace_back(spec, **det);
          in.keys = std::move(component);
          break;
        }
      }
    }
  }
  if (matches.size() != 1) {
    std::vector<std::string> described, found;
    for (const ModelSpec* spec : candidates) {
      described.push_back(absl::StrCat(
          spec->class_name, " (markers: ", absl::StrJoin(spec->weight_mapping->MarkerKeys(), ", "),
          ")"));
      for (const auto& m : spec->weight_mapping->MarkerKeys()) {
        if (in.keys.model_keys.count(m)) found.push_back(m);
      }
    }
    std::vector<std::string> sample;
    for (const auto& [k, s] : in.keys.model_keys) {
      if (sample.size() == 5) break;
      sample.push_back(k);
    }
    std::vector<std::string> matched;
    for (const auto& [spec, det] : matches) {
      matched.push_back(absl::StrCat(spec->class_name, " ", det.variant));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ",
        matches.empty() ? "no registered model recognises this file"
                        : absl::StrCat("ambiguous: ", absl::StrJoin(matched, ", "), " all match"),
        "; candidates: ", described.empty() ? "(none)" : absl::StrJoin(described, "; "),
        "; marker keys found: ", found.empty() ? "(none)" : absl::StrJoin(found, ", "),
        "; first keys: ", absl::StrJoin(sample, ", ")));
  }
  in.spec = matches[0].first;
  in.detection = std::move(matches[0].second);

  SingleFileReport& r = in.report;
  r.path = path;
  r.model_class = in.spec->class_name;
  r.variant = in.detection.variant;
  r.diffusers_naming = in.detection.diffusers_naming;
  r.prefix = in.keys.prefix;
  r.markers = in.detection.markers;
  r.config = in.detection.config;
  r.assumed = in.detection.assumed;
  if (!options.config_override.is_null()) {
    if (!options.config_override.is_object()) {
      return absl::InvalidArgumentError("config override must be a JSON object");
    }
    for (const auto& [field, value] : options.config_override.items()) {
      r.config[field] = value;
      r.assumed.erase(std::remove(r.assumed.begin(), r.assumed.end(), field), r.assumed.end());
    }
  }
  r.ignored = in.keys.bundled;
  for (const auto& [key, why] : in.detection.ignored) {
    auto source = in.keys.source.find(key);
    r.ignored[source == in.keys.source.end() ? key : source->second] = why;
  }

  auto plan = in.spec->weight_mapping->PlanToDiffusers(in.keys.model_keys, in.detection);
  if (!plan.ok()) return Annotate(plan.status(), path);
  in.plan = *std::move(plan);
  for (const auto& [target, recipe] : in.plan) {
    auto shape = PlannedShape(recipe, in.keys.model_keys);
    if (!shape.ok()) return Annotate(shape.status(), path);
  }
  r.tensors_mapped = static_cast<int64_t>(in.plan.size());
  // Planned figures (a load replaces them with what it actually did): views of the file, and the
  // bytes of the source tensors the plan reads.
  std::map<std::string, uint64_t> source_bytes;
  for (const auto& t : file->header().tensors) source_bytes[t.name] = t.end - t.begin;
  std::set<std::string> read;
  for (const auto& [target, recipe] : in.plan) {
    r.tensors_zero_copy += IsView(recipe.op);
    for (const auto& s : recipe.sources) {
      if (read.insert(s).second) r.bytes += source_bytes[in.keys.source.at(s)];
    }
  }
  r.seconds = Since(t0);
  return in;
}

absl::StatusOr<TensorMap> ExecuteMappingPlan(const MappingPlan& plan, const TensorMap& sources) {
  TensorMap out;
  for (const auto& [target, recipe] : plan) {
    std::vector<torch::Tensor> src;
    for (const std::string& key : recipe.sources) {
      auto it = sources.find(key);
      if (it == sources.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("mapping '", target, "': source tensor '", key, "' is missing"));
      }
      src.push_back(it->second);
    }
    if (src.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("mapping '", target, "' has no source"));
    }
    const std::string context = absl::StrCat("mapping '", recipe.sources[0], "' to '", target, "'");
    ASSIGN_OR_RETURN(out[target],
                     TorchCall(
                         context,
                         [&, &recipe = recipe]() -> torch::Tensor {
                           const torch::Tensor& s = src[0];
                           switch (recipe.op) {
                             case TensorRecipe::Op::kCopy:
                               return s;
                             case TensorRecipe::Op::kRows:
                               return s.narrow(0, recipe.row_begin, recipe.row_count);
                             case TensorRecipe::Op::kConcatRows:
                               return torch::cat(src, 0);
                             case TensorRecipe::Op::kReshape:
                               return s.reshape(recipe.shape);
                             case TensorRecipe::Op::kSwapHalves: {
                               TORCH_CHECK(s.dim() > 0 && s.size(0) % 2 == 0, "odd row count ",
                                           s.size(0));
                               const int64_t h = s.size(0) / 2;
                               return torch::cat({s.narrow(0, h, h), s.narrow(0, 0, h)}, 0);
                             }
                           }
                           TORCH_CHECK(false, "unknown recipe op");
                           return s;
                         },
                         absl::StatusCode::kInvalidArgument));
  }
  return out;
}

namespace {

// Reads the plan's source tensors (views over the mapping) and executes the plan.
absl::StatusOr<TensorMap> MapTensors(const SingleFileInspection& in) {
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(in.report.path));
  TensorMap sources;
  for (const auto& [target, recipe] : in.plan) {
    for (const std::string& key : recipe.sources) {
      if (sources.count(key)) continue;
      ASSIGN_OR_RETURN(sources[key], file->Get(in.keys.source.at(key)));
    }
  }
  return ExecuteMappingPlan(in.plan, sources);
}

}  // namespace

absl::StatusOr<LoadedSingleFile> LoadSingleFile(const std::string& path,
                                                const SingleFileOptions& options) {
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(SingleFileInspection in, InspectSingleFile(path, options));
  // Every parameter is assigned or copied below (CheckStateDict guarantees full coverage), so the
  // model is built without touching memory for its own parameters.
  ModelOptions model_options = options.model;
  model_options.uninitialized_parameters = true;
  RETURN_IF_ERROR(Annotate(CheckLayerwiseCastingSupported(*in.spec, model_options), path));
  RETURN_IF_ERROR(Annotate(CheckGroupOffloadingSupported(*in.spec, model_options), path));
  RETURN_IF_ERROR(Annotate(CheckDeviceMapSupported(*in.spec, model_options), path));
  auto model = in.spec->factory(in.report.config, model_options);
  if (!model.ok()) return Annotate(model.status(), absl::StrCat(path, ": derived config"));
  ASSIGN_OR_RETURN(TensorMap targets, MapTensors(in));

  if (options.validate_finite) {
    for (const auto& [key, t] : targets) {
      ASSIGN_OR_RETURN(bool finite, AllFinite(t));
      if (!finite) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", SourcesOf(in, key),
                                                       "' (-> '", key, "') has NaN or Inf values"));
      }
    }
  }

  // Validate everything against the built model before touching it.
  torch::nn::Module& module = (*model)->module();
  // 8-bit layerwise casting: quantize the mapped weights into the module's storage form.
  auto stored = ToStorageForm(module, std::move(targets), model_options.float8_format);
  if (!stored.ok()) return Annotate(stored.status(), path);
  targets = *std::move(stored);
  const StateDictReport check = CheckStateDict(module, targets);
  if (!check.ok()) {
    std::vector<std::string> problems;
    const TensorMap named = NamedTensors(module);
    for (const auto& k : check.missing) problems.push_back(absl::StrCat("missing '", k, "'"));
    for (const auto& k : check.unexpected) {
      problems.push_back(absl::StrCat("unexpected '", k, "' (from '", SourcesOf(in, k), "')"));
    }
    for (const auto& [k, t] : targets) {
      auto it = named.find(k);
      if (it != named.end() && it->second.sizes() != t.sizes()) {
        problems.push_back(absl::StrCat("'", SourcesOf(in, k), "' -> '", k, "': expected ",
                                        Shape(it->second.sizes()), ", got ", Shape(t.sizes())));
      }
    }
    return absl::InvalidArgumentError(absl::StrCat(path, ": does not fit ", in.spec->class_name,
                                                   " ", in.report.config.dump(), ": ",
                                                   absl::StrJoin(problems, "; ")));
  }

  // Assign: same dtype on CPU -> the parameter becomes the mapped view (no copy); otherwise copy
  // with conversion. The model is new and private to this call, so a failure here discards it.
  int64_t zero_copy = 0;
  uint64_t bytes = 0;
  RETURN_IF_ERROR(TorchCallVoid(absl::StrCat(path, ": assigning weights"), [&] {
    torch::NoGradGuard no_grad;
    for (auto& item : module.named_parameters(/*recurse=*/true)) {
      const torch::Tensor& src = targets.at(item.key());
      torch::Tensor& dst = item.value();
      bytes += src.nbytes();
      if (src.scalar_type() == dst.scalar_type() && src.device() == dst.device() &&
          src.is_contiguous()) {
        dst.set_data(src);
        // Views of the file mapping count as zero copy; rearranged tensors were built once above.
        zero_copy += IsView(in.plan.at(item.key()).op);
      } else {
        dst.copy_(src);
      }
    }
    for (auto& item : module.named_buffers(/*recurse=*/true)) {
      const torch::Tensor& src = targets.at(item.key());
      bytes += src.nbytes();
      item.value().copy_(src);
    }
  }));
  targets.clear();  // with group offloading, the mapped sources must not stay alive
  RETURN_IF_ERROR(Annotate(ApplyGroupOffloading(*in.spec, **model), path));
  RETURN_IF_ERROR(Annotate(ApplyModelDeviceMap(*in.spec, **model), path));
  in.report.tensors_zero_copy = zero_copy;
  in.report.bytes = bytes;
  in.report.seconds = Since(t0);
  return LoadedSingleFile{*std::move(model), std::move(in.report)};
}

absl::StatusOr<SingleFileReport> ConvertSingleFile(const std::string& path,
                                                   const std::string& out_dir,
                                                   const SingleFileOptions& options) {
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(SingleFileInspection in, InspectSingleFile(path, options));
  ASSIGN_OR_RETURN(TensorMap targets, MapTensors(in));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("creating ", out_dir, ": ", ec.message()));
  }
  nlohmann::json config = in.report.config;
  config["_class_name"] = in.spec->class_name;
  const std::string config_path = out_dir + "/config.json";
  {
    std::ofstream out(config_path, std::ios::trunc);
    out << config.dump(2) << "\n";
    if (!out) return absl::InternalError(absl::StrCat("writing ", config_path));
  }
  for (const auto& [k, t] : targets) in.report.bytes += t.nbytes();
  RETURN_IF_ERROR(
      WriteSafetensors(out_dir + "/diffusion_pytorch_model.safetensors", targets,
                       {{"format", "pt"}, {"source", path}, {"variant", in.report.variant}}));
  in.report.seconds = Since(t0);
  return in.report;
}

}  // namespace ds
