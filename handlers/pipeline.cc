#include "handlers/pipeline.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ds {

namespace fs = std::filesystem;

absl::StatusOr<PromptEncoding> DiffusionPipeline::EncodePrompt(
    const std::vector<std::string>& /*prompt*/, const std::vector<std::string>& /*prompt_2*/,
    int64_t /*max_sequence_length*/, const std::string& field, PipelineResult* /*report*/) const {
  return absl::FailedPreconditionError(absl::StrCat(
      class_name(), " has no text encoders: `", field, "` cannot be encoded; send embeddings"));
}

absl::StatusOr<IPAdapterInfo> DiffusionPipeline::LoadIPAdapter(
    const std::string& /*name*/, const std::string& /*path*/,
    const IPAdapterLoadOptions& /*options*/) const {
  return absl::UnimplementedError(absl::StrCat(class_name(), " does not support IP-Adapters"));
}

absl::Status DiffusionPipeline::UnloadIPAdapter(const std::string& /*name*/) const {
  return absl::UnimplementedError(absl::StrCat(class_name(), " does not support IP-Adapters"));
}

PipelineRegistry& PipelineRegistry::Global() {
  static PipelineRegistry* registry = new PipelineRegistry();
  return *registry;
}

absl::Status PipelineRegistry::Register(PipelineSpec spec) {
  if (spec.class_name.empty() || !spec.from_pretrained) {
    return absl::InvalidArgumentError(
        absl::StrCat("pipeline spec '", spec.class_name, "' needs a class name and a factory"));
  }
  for (const auto& existing : specs_) {
    if (existing->class_name == spec.class_name) {
      return absl::AlreadyExistsError(
          absl::StrCat("pipeline class '", spec.class_name, "' is already registered"));
    }
  }
  for (size_t i = 0; i < spec.demos.size(); ++i) {
    const DemoPipelineRecipe& demo = spec.demos[i];
    if (demo.pipeline_class != spec.class_name) {
      return absl::InvalidArgumentError(absl::StrCat("demo '", demo.name, "' of pipeline class '",
                                                     spec.class_name, "' names pipeline_class '",
                                                     demo.pipeline_class, "'"));
    }
    bool duplicate = FindDemo(demo.name).ok();
    for (size_t j = 0; j < i; ++j) duplicate |= spec.demos[j].name == demo.name;
    if (duplicate) {
      return absl::AlreadyExistsError(
          absl::StrCat("demo pipeline '", demo.name, "' is already registered"));
    }
  }
  specs_.push_back(std::make_unique<PipelineSpec>(std::move(spec)));
  return absl::OkStatus();
}

absl::StatusOr<const PipelineSpec*> PipelineRegistry::Find(std::string_view class_name) const {
  for (const auto& spec : specs_) {
    if (spec->class_name == class_name) return spec.get();
  }
  std::vector<std::string> known;
  for (const PipelineSpec* spec : List()) known.push_back(spec->class_name);
  return absl::NotFoundError(absl::StrCat("no registered pipeline class '", std::string(class_name),
                                          "'; registered: ",
                                          known.empty() ? "none" : absl::StrJoin(known, ", ")));
}

absl::StatusOr<const DemoPipelineRecipe*> PipelineRegistry::FindDemo(
    std::string_view name) const {
  std::vector<std::string> known;
  for (const PipelineSpec* spec : List()) {
    for (const DemoPipelineRecipe& demo : spec->demos) {
      if (demo.name == name) return &demo;
      known.push_back(demo.name);
    }
  }
  return absl::NotFoundError(absl::StrCat("no demo pipeline '", std::string(name),
                                          "'; registered: ",
                                          known.empty() ? "none" : absl::StrJoin(known, ", ")));
}

std::vector<const PipelineSpec*> PipelineRegistry::List() const {
  std::vector<const PipelineSpec*> out;
  for (const auto& spec : specs_) out.push_back(spec.get());
  std::sort(out.begin(), out.end(), [](const PipelineSpec* a, const PipelineSpec* b) {
    return a->class_name < b->class_name;
  });
  return out;
}

PipelineRegistrar::PipelineRegistrar(PipelineSpec spec) {
  const std::string name = spec.class_name;
  absl::Status s = PipelineRegistry::Global().Register(std::move(spec));
  if (!s.ok()) {
    std::fprintf(stderr, "fatal: registering pipeline '%s': %s\n", name.c_str(),
                 std::string(s.message()).c_str());
    std::abort();
  }
}

bool IsPipelineFolder(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::is_regular_file(fs::path(path) / "model_index.json", ec);
}

absl::StatusOr<std::unique_ptr<DiffusionPipeline>> LoadPipelineFromFolder(
    const std::string& folder, const PipelineLoadOptions& options) {
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(absl::StrCat("pipeline folder ", folder, " does not exist"));
  }
  const std::string index_path = (fs::path(folder) / "model_index.json").string();
  if (!fs::is_regular_file(index_path, ec)) {
    return absl::NotFoundError(absl::StrCat(index_path, " does not exist"));
  }
  nlohmann::json index;
  {
    std::ifstream in(index_path);
    index = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  }
  if (!index.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, " is not a JSON object"));
  }
  auto it = index.find("_class_name");
  if (it == index.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": \"_class_name\" is missing or not a string"));
  }
  const std::string class_name = it->get<std::string>();
  auto spec = PipelineRegistry::Global().Find(class_name);
  if (!spec.ok()) {
    return absl::UnimplementedError(absl::StrCat(index_path, ": ", spec.status().message()));
  }
  return (*spec)->from_pretrained(folder, options);
}

}  // namespace ds
