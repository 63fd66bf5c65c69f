#include "handlers/demo_pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "handlers/digest.h"
#include "handlers/model.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

bool SafeName(const std::string& name) {
  if (name.empty() || name.size() > 128 || name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::Status ErrnoStatus(const std::string& what, int err) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc | std::ios::binary);
  out << text;
  out.flush();
  if (!out) return ErrnoStatus(absl::StrCat("writing ", path), errno);
  return absl::OkStatus();
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return ErrnoStatus(absl::StrCat("creating ", dir), ec.value());
  return absl::OkStatus();
}

// An exclusive flock held for the object's lifetime.
class FileLock {
 public:
  static absl::StatusOr<FileLock> Acquire(const std::string& path) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoStatus(absl::StrCat("opening lock ", path), errno);
    while (flock(fd, LOCK_EX) != 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      return ErrnoStatus(absl::StrCat("locking ", path), err);
    }
    return FileLock(fd);
  }
  FileLock(FileLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  FileLock& operator=(FileLock&&) = delete;
  ~FileLock() {
    if (fd_ >= 0) close(fd_);  // releases the lock
  }

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

absl::Status ValidateRecipe(const DemoPipelineRecipe& recipe) {
  if (!SafeName(recipe.name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "demo pipeline name '", recipe.name, "' must be 1..128 characters of [A-Za-z0-9._-]"));
  }
  if (recipe.pipeline_class.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo pipeline '", recipe.name, "': pipeline_class is empty"));
  }
  if (recipe.components.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo pipeline '", recipe.name, "' has no components"));
  }
  std::set<std::string> names, files;
  for (const DemoComponent& c : recipe.components) {
    if (!SafeName(c.name) || c.name == "scheduler" || c.name == "single_file") {
      return absl::InvalidArgumentError(
          absl::StrCat("demo pipeline '", recipe.name, "': bad component name '", c.name, "'"));
    }
    if (!names.insert(c.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("demo pipeline '", recipe.name, "': duplicate component '", c.name, "'"));
    }
    if (!c.single_file.empty() && (!SafeName(c.single_file) || !files.insert(c.single_file).second)) {
      return absl::InvalidArgumentError(absl::StrCat("demo pipeline '", recipe.name,
                                                     "': bad or duplicate single file name '",
                                                     c.single_file, "' of '", c.name, "'"));
    }
    if (!c.config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "demo pipeline '", recipe.name, "': component '", c.name, "' config is not an object"));
    }
  }
  for (const std::string& absent : recipe.absent_components) {
    if (!SafeName(absent) || names.count(absent) > 0 || absent == "scheduler") {
      return absl::InvalidArgumentError(absl::StrCat(
          "demo pipeline '", recipe.name, "': bad absent component '", absent, "'"));
    }
  }
  if (!recipe.scheduler_config.is_null() &&
      (!recipe.scheduler_config.is_object() || !recipe.scheduler_config.contains("_class_name") ||
       !recipe.scheduler_config["_class_name"].is_string())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "demo pipeline '", recipe.name, "': scheduler_config needs a string \"_class_name\""));
  }
  return absl::OkStatus();
}

// Relative path -> SHA-256 of every regular file under `dir` except the manifest.
absl::StatusOr<std::map<std::string, std::string>> HashTree(const std::string& dir) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file()) continue;
    const std::string rel = fs::relative(it->path(), dir).string();
    if (rel == "manifest.json") continue;
    ASSIGN_OR_RETURN(out[rel], Sha256File(it->path().string()));
  }
  if (ec) return ErrnoStatus(absl::StrCat("listing ", dir), ec.value());
  return out;
}

// Whether `dir` holds a complete copy of the recipe (manifest digest and every file's hash).
bool VerifiedCopy(const std::string& dir, const std::string& recipe_digest) {
  auto manifest = ReadJsonFile(dir + "/manifest.json");
  if (!manifest.ok() || !manifest->is_object()) return false;
  if (manifest->value("recipe_sha256", "") != recipe_digest) return false;
  if (!manifest->contains("files") || !(*manifest)["files"].is_object()) return false;
  auto files = HashTree(dir);
  if (!files.ok()) return false;
  std::map<std::string, std::string> recorded;
  for (const auto& [k, v] : (*manifest)["files"].items()) {
    if (!v.is_string()) return false;
    recorded[k] = v.get<std::string>();
  }
  return recorded == *files;
}

// Builds, initializes and writes one component into `<pipeline_dir>/<name>/` and its single file.
absl::Status WriteComponent(const DemoPipelineRecipe& recipe, size_t index,
                            const std::string& pipeline_dir, const std::string& single_dir) {
  const DemoComponent& c = recipe.components[index];
  const std::string where = absl::StrCat("demo pipeline '", recipe.name, "' component '", c.name,
                                         "' (", c.class_name, ")");
  auto spec_or = ModelRegistry::Global().Find(c.class_name);
  if (!spec_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", spec_or.status().message()));
  }
  const ModelSpec* spec = *spec_or;
  nlohmann::json config = c.config;
  config["_class_name"] = spec->class_name;
  auto model_or = spec->factory(config, ModelOptions{});
  if (!model_or.ok()) return Annotate(model_or.status(), where);
  std::unique_ptr<DiffusionModel> model = *std::move(model_or);
  RETURN_IF_ERROR(TorchCallVoid(absl::StrCat(where, ": initializing weights"), [&] {
    InitRandomWeights(model->module(), recipe.seed + index);
  }));
  const TensorMap weights = NamedTensors(model->module());
  const std::string dir = absl::StrCat(pipeline_dir, "/", c.name);
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(WriteText(dir + "/config.json", config.dump(2) + "\n"));
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"source", absl::StrCat("diffusion-server demo pipeline ", recipe.name, ", random weights "
                              "(InitRandomWeights seed ", recipe.seed + index, ")")}};
  RETURN_IF_ERROR(WriteSafetensors(dir + "/diffusion_pytorch_model.safetensors", weights, metadata));
  if (c.single_file.empty()) return absl::OkStatus();
  if (spec->weight_mapping == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": single_file '", c.single_file, "' asked for, but ",
                     spec->class_name, " has no single-file (weight mapping) handler"));
  }
  KeyShapes shapes;
  for (const auto& [k, t] : weights) shapes[k] = t.sizes().vec();
  auto plan = spec->weight_mapping->PlanFromDiffusers(shapes);
  if (!plan.ok()) return Annotate(plan.status(), absl::StrCat(where, ": reverse mapping"));
  auto original = ExecuteMappingPlan(*plan, weights);
  if (!original.ok()) return Annotate(original.status(), absl::StrCat(where, ": reverse mapping"));
  return WriteSafetensors(absl::StrCat(single_dir, "/", c.single_file), *original, metadata);
}

absl::Status WriteTree(const DemoPipelineRecipe& recipe, const std::string& dir,
                       const std::string& recipe_digest) {
  const std::string pipeline_dir = dir + "/pipeline";
  const std::string single_dir = dir + "/single_file";
  RETURN_IF_ERROR(MakeDirs(pipeline_dir));
  RETURN_IF_ERROR(MakeDirs(single_dir));
  nlohmann::json index = {{"_class_name", recipe.pipeline_class},
                          {"_diffusers_version", "0.33.0"}};
  for (const DemoComponent& c : recipe.components) {
    RETURN_IF_ERROR(WriteComponent(recipe, &c - recipe.components.data(), pipeline_dir, single_dir));
    index[c.name] = {"diffusers", c.class_name};
  }
  for (const std::string& absent : recipe.absent_components) {
    index[absent] = {nullptr, nullptr};
  }
  if (!recipe.scheduler_config.is_null()) {
    RETURN_IF_ERROR(MakeDirs(pipeline_dir + "/scheduler"));
    RETURN_IF_ERROR(WriteText(pipeline_dir + "/scheduler/scheduler_config.json",
                              recipe.scheduler_config.dump(2) + "\n"));
    index["scheduler"] = {"diffusers", recipe.scheduler_config["_class_name"]};
  }
  RETURN_IF_ERROR(WriteText(pipeline_dir + "/model_index.json", index.dump(2) + "\n"));
  if (!recipe.example_inputs.empty()) {
    std::vector<std::pair<std::string, torch::Tensor>> inputs;
    RETURN_IF_ERROR(TorchCallVoid("drawing the example inputs", [&] {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(recipe.seed);
      for (const auto& [name, shape] : recipe.example_inputs) {
        inputs.emplace_back(name, at::randn(shape, gen, torch::kFloat32));
      }
    }, absl::StatusCode::kInvalidArgument));
    RETURN_IF_ERROR(WriteSafetensors(
        dir + "/example_inputs.safetensors", inputs,
        {{"source", absl::StrCat("diffusion-server demo pipeline ", recipe.name,
                                 ": random example request tensors (seed ", recipe.seed, ")")}}));
  }
  ASSIGN_OR_RETURN(auto files, HashTree(dir));
  nlohmann::json manifest = {{"name", recipe.name},
                             {"description", recipe.description},
                             {"recipe_sha256", recipe_digest},
                             {"recipe", DemoRecipeJson(recipe)},
                             {"files", files}};
  return WriteText(dir + "/manifest.json", manifest.dump(2) + "\n");
}

}  // namespace

nlohmann::json DemoRecipeJson(const DemoPipelineRecipe& recipe) {
  nlohmann::json components = nlohmann::json::array();
  for (const DemoComponent& c : recipe.components) {
    components.push_back({{"name", c.name},
                          {"class_name", c.class_name},
                          {"config", c.config},
                          {"single_file", c.single_file}});
  }
  return {{"name", recipe.name},
          {"pipeline_class", recipe.pipeline_class},
          {"components", components},
          {"scheduler_config", recipe.scheduler_config},
          {"absent_components", recipe.absent_components},
          {"seed", recipe.seed},
          {"example_inputs", recipe.example_inputs},
          // Weights depend on the initializer too: bump when InitRandomWeights changes.
          {"initializer", "InitRandomWeights/2"}};
}

absl::StatusOr<DemoPipelineFiles> WriteDemoPipeline(const DemoPipelineRecipe& recipe,
                                                    const std::string& root) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(ValidateRecipe(recipe));
  const std::string recipe_json = DemoRecipeJson(recipe).dump();
  const std::string digest = Sha256Hex(recipe_json.data(), recipe_json.size());
  RETURN_IF_ERROR(MakeDirs(root));
  ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(absl::StrCat(root, "/.", recipe.name, ".lock")));

  DemoPipelineFiles files;
  files.dir = absl::StrCat(root, "/", recipe.name);
  files.pipeline_dir = files.dir + "/pipeline";
  for (const DemoComponent& c : recipe.components) {
    if (!c.single_file.empty()) {
      files.single_files[c.name] = absl::StrCat(files.dir, "/single_file/", c.single_file);
    }
  }
  if (!recipe.example_inputs.empty()) files.example_inputs = files.dir + "/example_inputs.safetensors";
  if (!VerifiedCopy(files.dir, digest)) {
    const std::string tmp = absl::StrCat(root, "/.", recipe.name, ".tmp.", getpid());
    std::error_code ec;
    fs::remove_all(tmp, ec);
    absl::Status written = WriteTree(recipe, tmp, digest);
    if (written.ok()) {
      // Under the lock nobody else writes `dir`; readers of an older copy keep their open files.
      fs::remove_all(files.dir, ec);
      if (ec) written = ErrnoStatus(absl::StrCat("removing the old ", files.dir), ec.value());
    }
    if (written.ok()) {
      fs::rename(tmp, files.dir, ec);
      if (ec) written = ErrnoStatus(absl::StrCat("renaming ", tmp, " to ", files.dir), ec.value());
    }
    if (!written.ok()) {
      fs::remove_all(tmp, ec);
      return written;
    }
    files.written = true;
  }
  files.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return files;
}

}  // namespace ds
