#include "models/flux/pipeline.h"

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/image.h"
#include "handlers/registry.h"
#include "handlers/single_file.h"
#include "handlers/status.h"
#include "models/flux/latents.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// diffusers' FluxPipeline: default_sample_size (latent pixels of the default image side), the
// vae_scale_factor it assumes without a VAE, and the classes of its components.
constexpr int64_t kDefaultSampleSize = 128;
constexpr int64_t kDefaultVaeScaleFactor = 8;
constexpr char kPipelineClassName[] = "FluxPipeline";
constexpr char kSchedulerClassName[] = "FlowMatchEulerDiscreteScheduler";
// The class a VAE single file is resolved as (the single-file loader needs a class to probe
// bundled-component prefixes such as "vae."); looked up in the registry, never included.
constexpr char kVaeClassName[] = "AutoencoderKL";

std::string ShapeString(at::IntArrayRef sizes) {
  return absl::StrCat("[", absl::StrJoin(sizes, ", "), "]");
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The transformer as a LoraHost, with the LoRA handler its registry spec wires (none if the class
// is not registered or wires none).
std::shared_ptr<LoraHost> MakeHost(std::unique_ptr<DiffusionModel> model,
                                   const LoraHostOptions& options) {
  const LoraHandler* handler = nullptr;
  if (auto spec = ModelRegistry::Global().Find(model->class_name()); spec.ok()) {
    handler = (*spec)->lora;
  }
  return std::make_shared<LoraHost>(std::shared_ptr<DiffusionModel>(std::move(model)), handler,
                                    options);
}

// The model as a LatentImageDecoder sharing its ownership; INVALID_ARGUMENT naming the component
// when it is not one.
absl::StatusOr<std::shared_ptr<const LatentImageDecoder>> AsDecoder(
    std::unique_ptr<DiffusionModel> model, const std::string& component,
    const std::string& source) {
  const auto* decoder = dynamic_cast<const LatentImageDecoder*>(model.get());
  if (decoder == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "component '", component, "' (", model->class_name(), " from ", source,
        ") is not a latent image decoder (it does not implement LatentImageDecoder), so it "
        "cannot decode latents to images"));
  }
  std::shared_ptr<const DiffusionModel> owner(std::move(model));
  return std::shared_ptr<const LatentImageDecoder>(owner, decoder);
}

// A VAE from a diffusers folder (class from its config.json, or `class_name`) or a single file
// (with `override` replacing derived config fields).
absl::StatusOr<std::shared_ptr<const LatentImageDecoder>> LoadVae(const std::string& path,
                                                                  const ModelOptions& options,
                                                                  const std::string& class_name,
                                                                  const nlohmann::json& override) {
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat("vae: ", path, " does not exist"));
  }
  std::unique_ptr<DiffusionModel> model;
  if (fs::is_directory(path, ec)) {
    auto loaded = LoadModelFromFolder(path, options, class_name);
    if (!loaded.ok()) return Annotate(loaded.status(), "vae");
    model = std::move(loaded).value();
  } else {
    SingleFileOptions sf;
    sf.model = options;
    sf.model_class = class_name.empty() ? kVaeClassName : class_name;
    sf.config_override = override;
    auto loaded = LoadSingleFile(path, sf);
    if (!loaded.ok()) return Annotate(loaded.status(), "vae");
    model = std::move(loaded->model);
  }
  return AsDecoder(std::move(model), "vae", path);
}

absl::StatusOr<FlowMatchEulerConfig> LoadScheduler(const std::string& path) {
  auto config = LoadFlowMatchEulerConfig(path);
  if (!config.ok()) return Annotate(config.status(), "scheduler");
  return config;
}

// The scheduler config FluxPipeline ships for a transformer: FLUX.1-dev's (dynamic shifting) for
// guidance-distilled ones, FLUX.1-schnell's otherwise.
FlowMatchEulerConfig DefaultScheduler(const DiffusionModel& transformer) {
  const auto& c = transformer.config();
  const bool guidance = c.contains("guidance_embeds") && c["guidance_embeds"].is_boolean() &&
                        c["guidance_embeds"].get<bool>();
  return guidance ? FlowMatchEulerConfig::FluxDev() : FlowMatchEulerConfig::FluxSchnell();
}

// One model_index.json entry: [library, class] (both null for an absent component).
struct IndexEntry {
  bool present = false;
  std::string library;
  std::string class_name;
};

absl::StatusOr<IndexEntry> ParseIndexEntry(const std::string& index_path, const std::string& key,
                                           const nlohmann::json& value) {
  auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": \"", key,
                     "\" must be [library, class] (strings) or [null, null], got ", value.dump()));
  };
  if (!value.is_array() || value.size() != 2) return bad();
  if (value[0].is_null() && value[1].is_null()) return IndexEntry{};
  if (!value[1].is_string() || !(value[0].is_string() || value[0].is_null())) return bad();
  IndexEntry e;
  e.present = true;
  e.library = value[0].is_string() ? value[0].get<std::string>() : "";
  e.class_name = value[1].get<std::string>();
  return e;
}

// Checks and normalizes a [P, L, D] / [L, D] embedding to 3-D.
absl::StatusOr<torch::Tensor> SequenceEmbeds(const char* name, const torch::Tensor& t,
                                             int64_t width, const char* width_field) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(name, " is required"));
  if (!t.is_floating_point()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be floating-point, got ",
                                                   std::string(c10::toString(t.scalar_type()))));
  }
  if (t.dim() != 2 && t.dim() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be [batch, tokens, ", width_field,
                                                   "] or [tokens, ", width_field, "], got shape ",
                                                   ShapeString(t.sizes())));
  }
  const torch::Tensor t3 = t.dim() == 2 ? t.unsqueeze(0) : t;
  if (t3.size(0) < 1 || t3.size(1) < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " is empty (shape ", ShapeString(t.sizes()), ")"));
  }
  if (t3.size(2) != width) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has width ", t3.size(2),
                                                   "; this transformer's ", width_field, " is ",
                                                   width, " (shape ", ShapeString(t.sizes()), ")"));
  }
  return t3;
}

// Checks and normalizes a [P, D] / [D] pooled embedding to 2-D.
absl::StatusOr<torch::Tensor> PooledEmbeds(const char* name, const torch::Tensor& t, int64_t width,
                                           const char* width_field) {
  if (!t.defined()) return absl::InvalidArgumentError(absl::StrCat(name, " is required"));
  if (!t.is_floating_point()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be floating-point, got ",
                                                   std::string(c10::toString(t.scalar_type()))));
  }
  if (t.dim() != 1 && t.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be [batch, ", width_field, "] or [",
                                                   width_field, "], got shape ",
                                                   ShapeString(t.sizes())));
  }
  const torch::Tensor t2 = t.dim() == 1 ? t.unsqueeze(0) : t;
  if (t2.size(0) < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " is empty (shape ", ShapeString(t.sizes()), ")"));
  }
  if (t2.size(1) != width) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has width ", t2.size(1),
                                                   "; this transformer's ", width_field, " is ",
                                                   width, " (shape ", ShapeString(t.sizes()), ")"));
  }
  return t2;
}

absl::Status CheckFinite(const char* name, double value) {
  if (std::isfinite(value)) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " must be finite, got ", value));
}

}  // namespace

absl::StatusOr<std::unique_ptr<FluxPipeline>> FluxPipeline::Create(
    FluxPipelineComponents components, const FluxPipelineOptions& options) {
  if (options.max_inference_steps < 1 || options.max_batch < 1 || options.max_image_side < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FluxPipelineOptions: max_inference_steps, max_batch and max_image_side must be >= 1, got ",
        options.max_inference_steps, ", ", options.max_batch, ", ", options.max_image_side));
  }
  if (components.transformer == nullptr) {
    return absl::InvalidArgumentError("component 'transformer' is required");
  }
  const DiffusionModel& model = components.transformer->model();
  if (model.class_name() != kFluxClassName) {
    return absl::InvalidArgumentError(absl::StrCat("component 'transformer' is a ",
                                                   model.class_name(), "; FluxPipeline needs a ",
                                                   kFluxClassName));
  }
  auto config = FluxConfig::FromJson(model.config());
  if (!config.ok()) return Annotate(config.status(), "transformer config");
  if (config->patch_size != 1 || config->in_channels % 4 != 0 ||
      config->resolved_out_channels() != config->in_channels) {
    return absl::InvalidArgumentError(absl::StrCat(
        "component 'transformer': FluxPipeline needs patch_size 1 and out_channels == in_channels, "
        "a multiple of 4 (2x2-packed latents); got patch_size ",
        config->patch_size, ", in_channels ", config->in_channels, ", out_channels ",
        config->resolved_out_channels()));
  }
  int64_t vae_scale_factor = kDefaultVaeScaleFactor;
  if (components.vae != nullptr) {
    if (components.vae->latent_channels() * 4 != config->in_channels) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component 'transformer' takes in_channels ", config->in_channels, " = 4 x ",
          config->in_channels / 4, " latent channels but the vae's latent_channels is ",
          components.vae->latent_channels(),
          " (a Fill/Depth/Kontext transformer with widened inputs needs its own pipeline)"));
    }
    vae_scale_factor = components.vae->spatial_scale_factor();
    if (vae_scale_factor < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("component 'vae' has scale factor ", vae_scale_factor));
    }
  }
  {
    auto scheduler = FlowMatchEulerScheduler::Create(components.scheduler);
    if (!scheduler.ok()) return Annotate(scheduler.status(), "scheduler");
  }
  if (components.variant.empty()) {
    components.variant = config->guidance_embeds ? "flux-dev" : "flux-schnell";
  }
  return std::unique_ptr<FluxPipeline>(
      new FluxPipeline(std::move(components), *std::move(config), options, vae_scale_factor));
}

const std::string& FluxPipeline::class_name() const {
  static const std::string* const kName = new std::string(kPipelineClassName);
  return *kName;
}

PipelineLimits FluxPipeline::limits() const {
  PipelineLimits l;
  l.options = options_;
  l.image_size_multiple = 2 * vae_scale_factor_;
  l.default_height = kDefaultSampleSize * vae_scale_factor_;
  l.default_width = kDefaultSampleSize * vae_scale_factor_;
  const PipelineRequest defaults;
  l.default_inference_steps = defaults.num_inference_steps;
  l.default_guidance_scale = defaults.guidance_scale;
  l.guidance_embeds = transformer_config_.guidance_embeds;
  l.prompt_embeds_dim = transformer_config_.joint_attention_dim;
  l.pooled_prompt_embeds_dim = transformer_config_.pooled_projection_dim;
  l.needs_pooled_prompt_embeds = true;
  l.latent_channels = num_channels_latents();
  l.can_decode = components_.vae != nullptr;
  return l;
}

PipelineDescription FluxPipeline::describe() const {
  PipelineDescription d;
  d.classes["transformer"] = components_.transformer->model().class_name();
  if (components_.vae != nullptr) {
    // Decoders are loaded as registry models; the cross-cast finds their class name.
    const auto* model = dynamic_cast<const DiffusionModel*>(components_.vae.get());
    d.classes["vae"] = model != nullptr ? model->class_name() : "LatentImageDecoder";
  }
  d.classes["scheduler"] = kSchedulerClassName;
  d.sources = components_.sources;
  d.not_loaded = components_.not_loaded;
  d.variant = components_.variant;
  return d;
}

absl::StatusOr<std::unique_ptr<FluxPipeline>> FluxPipeline::FromPretrained(
    const std::string& folder, const FluxPipelineLoadOptions& options) {
  const fs::path root(folder);
  const std::string index_path = (root / "model_index.json").string();
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat("pipeline folder ", folder, " does not exist"));
  }
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
  if (auto it = index.find("_class_name"); it != index.end()) {
    if (!it->is_string() || it->get<std::string>() != kPipelineClassName) {
      return absl::UnimplementedError(absl::StrCat(index_path, ": \"_class_name\" is ", it->dump(),
                                                   "; only ", kPipelineClassName,
                                                   " folders are supported"));
    }
  }

  FluxPipelineComponents c;
  std::map<std::string, IndexEntry> entries;
  for (const auto& [key, value] : index.items()) {
    if (key.empty() || key[0] == '_') continue;
    ASSIGN_OR_RETURN(IndexEntry e, ParseIndexEntry(index_path, key, value));
    if (!e.present) continue;
    if (key == "transformer" || key == "vae" || key == "scheduler") {
      entries[key] = e;
    } else {
      const bool text = key.rfind("text_encoder", 0) == 0 || key.rfind("tokenizer", 0) == 0;
      c.not_loaded[key] =
          absl::StrCat(e.class_name, " (", e.library.empty() ? "no library" : e.library, "): ",
                       text ? "text encoders and tokenizers are not supported yet; requests carry "
                              "prompt_embeds and pooled_prompt_embeds"
                            : "this component is not supported yet");
    }
  }
  auto subfolder = [&](const std::string& key) { return (root / key).string(); };

  // Transformer.
  if (options.transformer != nullptr) {
    c.transformer = options.transformer;
    c.sources["transformer"] = "shared";
  } else {
    auto it = entries.find("transformer");
    if (it == entries.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": no \"transformer\" component is listed"));
    }
    if (it->second.class_name != kFluxClassName) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": component 'transformer' is ",
                                                     it->second.class_name, "; FluxPipeline needs ",
                                                     kFluxClassName));
    }
    auto loaded =
        LoadModelFromFolder(subfolder("transformer"), options.model, it->second.class_name);
    if (!loaded.ok()) return Annotate(loaded.status(), "transformer");
    c.transformer = MakeHost(std::move(loaded).value(), options.lora);
    c.sources["transformer"] = subfolder("transformer");
  }

  // VAE.
  if (options.vae != nullptr) {
    c.vae = options.vae;
    c.sources["vae"] = "shared";
  } else if (!options.vae_path.empty()) {
    ASSIGN_OR_RETURN(c.vae, LoadVae(options.vae_path, options.model, "", nullptr));
    c.sources["vae"] = options.vae_path;
  } else if (auto it = entries.find("vae"); it != entries.end()) {
    ASSIGN_OR_RETURN(c.vae,
                     LoadVae(subfolder("vae"), options.model, it->second.class_name, nullptr));
    c.sources["vae"] = subfolder("vae");
  }

  // Scheduler config.
  if (!options.scheduler_config_path.empty()) {
    ASSIGN_OR_RETURN(c.scheduler, LoadScheduler(options.scheduler_config_path));
    c.sources["scheduler"] = options.scheduler_config_path;
  } else if (auto it = entries.find("scheduler"); it != entries.end()) {
    if (it->second.class_name != kSchedulerClassName) {
      return absl::UnimplementedError(absl::StrCat(index_path, ": component 'scheduler' is ",
                                                   it->second.class_name, "; only ",
                                                   kSchedulerClassName, " is implemented"));
    }
    ASSIGN_OR_RETURN(c.scheduler, LoadScheduler(subfolder("scheduler")));
    c.sources["scheduler"] = subfolder("scheduler");
  } else {
    c.scheduler = DefaultScheduler(c.transformer->model());
    c.sources["scheduler"] = "default";
  }
  return Create(std::move(c), options.pipeline);
}

absl::StatusOr<std::unique_ptr<FluxPipeline>> FluxPipeline::FromSingleFiles(
    const FluxSingleFiles& files, const FluxPipelineLoadOptions& options) {
  FluxPipelineComponents c;
  if (options.transformer != nullptr) {
    c.transformer = options.transformer;
    c.sources["transformer"] = "shared";
  } else {
    if (files.transformer.empty()) {
      return absl::InvalidArgumentError("component 'transformer': no file given");
    }
    SingleFileOptions sf;
    sf.model = options.model;
    sf.model_class = kFluxClassName;
    sf.config_override = files.transformer_config_override;
    auto loaded = LoadSingleFile(files.transformer, sf);
    if (!loaded.ok()) return Annotate(loaded.status(), "transformer");
    c.variant = loaded->report.variant;
    c.transformer = MakeHost(std::move(loaded->model), options.lora);
    c.sources["transformer"] = files.transformer;
  }

  const std::string vae_path = !options.vae_path.empty() ? options.vae_path : files.vae;
  if (options.vae != nullptr) {
    c.vae = options.vae;
    c.sources["vae"] = "shared";
  } else if (!vae_path.empty()) {
    ASSIGN_OR_RETURN(c.vae, LoadVae(vae_path, options.model, "", files.vae_config_override));
    c.sources["vae"] = vae_path;
  }

  const std::string scheduler_path = !options.scheduler_config_path.empty()
                                         ? options.scheduler_config_path
                                         : files.scheduler_config;
  if (!scheduler_path.empty()) {
    ASSIGN_OR_RETURN(c.scheduler, LoadScheduler(scheduler_path));
    c.sources["scheduler"] = scheduler_path;
  } else {
    c.scheduler = DefaultScheduler(c.transformer->model());
    c.sources["scheduler"] = "default";
  }
  return Create(std::move(c), options.pipeline);
}

absl::StatusOr<FluxPipelineResult> FluxPipeline::Generate(
    const FluxPipelineRequest& request, const DenoiseStepCallback& on_step,
    const DenoiseLatentsObserver& on_latents) const {
  const FluxConfig& cfg = transformer_config_;
  const LoraHost& host = *components_.transformer;
  const ModelOptions& mo = host.model().options();
  const int64_t s = vae_scale_factor_;

  // 1. Inputs.
  if (request.png && !request.decode) {
    return absl::InvalidArgumentError("png needs decode (PNG bytes are made from decoded images)");
  }
  if (request.decode && components_.vae == nullptr) {
    return absl::FailedPreconditionError(
        "this pipeline has no vae component, so it cannot decode images; request latents only "
        "(decode = false)");
  }
  const int64_t height = request.height == 0 ? kDefaultSampleSize * s : request.height;
  const int64_t width = request.width == 0 ? kDefaultSampleSize * s : request.width;
  RETURN_IF_ERROR(ValidateImageSize(height, width, s));
  if (height > options_.max_image_side || width > options_.max_image_side) {
    return absl::InvalidArgumentError(absl::StrCat("image size ", height, "x", width,
                                                   " exceeds this pipeline's limit of ",
                                                   options_.max_image_side, " pixels per side"));
  }
  ASSIGN_OR_RETURN(torch::Tensor prompt_embeds,
                   SequenceEmbeds("prompt_embeds", request.prompt_embeds, cfg.joint_attention_dim,
                                  "joint_attention_dim"));
  ASSIGN_OR_RETURN(torch::Tensor pooled,
                   PooledEmbeds("pooled_prompt_embeds", request.pooled_prompt_embeds,
                                cfg.pooled_projection_dim, "pooled_projection_dim"));
  const int64_t prompts = prompt_embeds.size(0);
  if (pooled.size(0) != prompts) {
    return absl::InvalidArgumentError(absl::StrCat("pooled_prompt_embeds has batch ",
                                                   pooled.size(0), " but prompt_embeds has batch ",
                                                   prompts));
  }
  const bool has_negative =
      request.negative_prompt_embeds.defined() || request.negative_pooled_prompt_embeds.defined();
  if (has_negative && !(request.negative_prompt_embeds.defined() &&
                        request.negative_pooled_prompt_embeds.defined())) {
    return absl::InvalidArgumentError(
        "negative_prompt_embeds and negative_pooled_prompt_embeds must be given together");
  }
  torch::Tensor negative_embeds, negative_pooled;
  if (has_negative) {
    ASSIGN_OR_RETURN(negative_embeds,
                     SequenceEmbeds("negative_prompt_embeds", request.negative_prompt_embeds,
                                    cfg.joint_attention_dim, "joint_attention_dim"));
    ASSIGN_OR_RETURN(
        negative_pooled,
        PooledEmbeds("negative_pooled_prompt_embeds", request.negative_pooled_prompt_embeds,
                     cfg.pooled_projection_dim, "pooled_projection_dim"));
    for (const auto& [name, t] :
         {std::pair<const char*, const torch::Tensor*>{"negative_prompt_embeds", &negative_embeds},
          {"negative_pooled_prompt_embeds", &negative_pooled}}) {
      if (t->size(0) != prompts && t->size(0) != 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            name, " has batch ", t->size(0), "; expected 1 or prompt_embeds' batch ", prompts));
      }
    }
  }
  RETURN_IF_ERROR(CheckFinite("guidance_scale", request.guidance_scale));
  RETURN_IF_ERROR(CheckFinite("true_cfg_scale", request.true_cfg_scale));
  if (request.num_images_per_prompt < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_images_per_prompt must be >= 1, got ", request.num_images_per_prompt));
  }
  if (request.num_images_per_prompt > options_.max_batch ||
      prompts * request.num_images_per_prompt > options_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch ", prompts, " prompt(s) x num_images_per_prompt ", request.num_images_per_prompt,
        " exceeds this pipeline's max_batch ", options_.max_batch));
  }
  const int64_t batch = prompts * request.num_images_per_prompt;
  const int64_t steps = request.sigmas.has_value() ? static_cast<int64_t>(request.sigmas->size())
                                                   : request.num_inference_steps;
  if (steps < 1 || steps > options_.max_inference_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.sigmas.has_value() ? "the number of sigmas" : "num_inference_steps",
                     " must be in [1, ", options_.max_inference_steps, "], got ", steps));
  }
  const bool do_true_cfg = has_negative && request.true_cfg_scale > 1.0;

  // 2-3. Latents (noise), ids, embeddings on the model's dtype and device.
  ASSIGN_OR_RETURN(const std::vector<int64_t> latent_shape,
                   LatentShape(batch, num_channels_latents(), height, width, s));
  FluxPipelineResult result;
  torch::Tensor noise;
  if (request.latents.defined()) {
    if (!request.latents.is_floating_point() || request.latents.sizes() != latent_shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "latents has shape ", ShapeString(request.latents.sizes()), " (",
          std::string(c10::toString(request.latents.scalar_type())), "); expected floating ",
          ShapeString(latent_shape), " (batch ", batch, ", in_channels / 4, 2 * (height / ", 2 * s,
          "), 2 * (width / ", 2 * s, ")) unpacked noise"));
    }
    noise = request.latents;
  } else {
    uint64_t seed = 0;
    if (request.seed.has_value()) {
      seed = *request.seed;
    } else {
      std::random_device rd;
      seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    }
    result.seed = seed;
    ASSIGN_OR_RETURN(noise, SeededNoise(latent_shape, seed, mo.dtype, mo.device));
  }
  ASSIGN_OR_RETURN(torch::Tensor x,
                   TorchCall("preparing latents", [&] { return noise.to(mo.device, mo.dtype); }));
  ASSIGN_OR_RETURN(x, PackLatents(x));
  ASSIGN_OR_RETURN(x, TorchCall("packing latents", [&] { return x.contiguous(); }));
  const int64_t image_seq_len = x.size(1);
  ASSIGN_OR_RETURN(torch::Tensor img_ids,
                   LatentImageIds(latent_shape[2] / 2, latent_shape[3] / 2, mo.dtype, mo.device));
  ASSIGN_OR_RETURN(torch::Tensor txt_ids, TextIds(prompt_embeds.size(1), mo.dtype, mo.device));

  // Each prompt's embeddings repeated num_images_per_prompt times, prompt-major (diffusers'
  // repeat(1, n, 1).view(P * n, ...)); for one prompt this equals broadcasting them.
  auto to_batch = [&](const torch::Tensor& t) -> torch::Tensor {
    torch::Tensor out = t.to(mo.device, mo.dtype);
    if (out.size(0) == batch) return out.contiguous();
    return out.repeat_interleave(batch / out.size(0), 0).contiguous();
  };
  TensorMap inputs, negative_inputs;
  RETURN_IF_ERROR(TorchCall("preparing embeddings", [&] {
                    inputs["encoder_hidden_states"] = to_batch(prompt_embeds);
                    inputs["pooled_projections"] = to_batch(pooled);
                    inputs["img_ids"] = img_ids;
                    inputs["txt_ids"] = txt_ids;
                    if (cfg.guidance_embeds) {
                      // FluxPipeline: torch.full([1], guidance_scale, float32).expand(B).
                      inputs["guidance"] =
                          torch::full(
                              {1}, request.guidance_scale,
                              torch::TensorOptions().dtype(torch::kFloat32).device(mo.device))
                              .expand({batch});
                    }
                    if (do_true_cfg) {
                      negative_inputs = inputs;
                      negative_inputs["encoder_hidden_states"] = to_batch(negative_embeds);
                      negative_inputs["pooled_projections"] = to_batch(negative_pooled);
                      negative_inputs["txt_ids"] =
                          torch::zeros({negative_embeds.size(1), 3},
                                       torch::TensorOptions().dtype(mo.dtype).device(mo.device));
                    }
                    return 0;
                  }).status());

  // 4. Timesteps.
  ASSIGN_OR_RETURN(FlowMatchEulerScheduler scheduler,
                   FlowMatchEulerScheduler::Create(components_.scheduler));
  if (request.sigmas.has_value()) {
    std::optional<double> mu;
    if (components_.scheduler.use_dynamic_shifting) {
      ASSIGN_OR_RETURN(mu, CalculateShift(image_seq_len, components_.scheduler));
    }
    RETURN_IF_ERROR(Annotate(scheduler.SetTimesteps(steps, request.sigmas, mu), "sigmas"));
  } else {
    RETURN_IF_ERROR(scheduler.SetTimestepsLikeFluxPipeline(steps, image_seq_len));
  }

  // 5-6. Denoising loop.
  const auto denoise_start = Clock::now();
  const std::vector<float>& timesteps = scheduler.timesteps();
  const int total = static_cast<int>(steps);
  if (on_step) RETURN_IF_ERROR(on_step(0, total));
  for (int i = 0; i < total; ++i) {
    // t.expand(B).to(latents.dtype) / 1000, divided in the latents' dtype on the model's device.
    ASSIGN_OR_RETURN(torch::Tensor timestep, TorchCall("timestep", [&] {
                       return torch::full(
                                  {batch}, timesteps[static_cast<size_t>(i)],
                                  torch::TensorOptions().dtype(torch::kFloat32).device(mo.device))
                           .to(mo.dtype)
                           .div(1000);
                     }));
    inputs["hidden_states"] = x;
    inputs["timestep"] = timestep;
    ASSIGN_OR_RETURN(torch::Tensor v, host.Forward(inputs, request.adapters.get()));
    if (do_true_cfg) {
      negative_inputs["hidden_states"] = x;
      negative_inputs["timestep"] = timestep;
      ASSIGN_OR_RETURN(torch::Tensor v_neg, host.Forward(negative_inputs, request.adapters.get()));
      ASSIGN_OR_RETURN(
          v, TorchCall("true CFG", [&] { return v_neg + request.true_cfg_scale * (v - v_neg); }));
    }
    if (v.sizes() != x.sizes()) {
      return absl::InternalError(absl::StrCat("the transformer predicted shape ",
                                              ShapeString(v.sizes()), " for latents of shape ",
                                              ShapeString(x.sizes())));
    }
    ASSIGN_OR_RETURN(x, scheduler.Step(v, i, x));
    if (on_latents) on_latents(i, x);
    if (on_step) RETURN_IF_ERROR(on_step(i + 1, total));
  }
  inputs.clear();
  negative_inputs.clear();
  result.denoise_seconds = SecondsSince(denoise_start);
  ASSIGN_OR_RETURN(result.latents, UnpackLatents(x, height, width, s));
  result.steps = steps;
  result.sigmas = scheduler.sigmas();
  result.timesteps = timesteps;
  result.guidance_scale = request.guidance_scale;
  result.guidance_applied = cfg.guidance_embeds;
  result.true_cfg_applied = do_true_cfg;
  if (!request.decode) return result;

  // 7. Decode and postprocess.
  const auto decode_start = Clock::now();
  const LatentImageDecoder& vae = *components_.vae;
  ASSIGN_OR_RETURN(torch::Tensor z, TorchCall("scaling latents for the vae", [&] {
                     return result.latents / vae.latent_scaling_factor() +
                            vae.latent_shift_factor();
                   }));
  ASSIGN_OR_RETURN(torch::Tensor decoded, vae.DecodeLatents(z));
  ASSIGN_OR_RETURN(result.image, DenormalizeImages(decoded));
  if (request.png) {
    ASSIGN_OR_RETURN(torch::Tensor rgb, ImagesToUint8(result.image));
    for (int64_t b = 0; b < rgb.size(0); ++b) {
      ASSIGN_OR_RETURN(std::string png, EncodePng(rgb[b]));
      result.png.push_back(std::move(png));
    }
  }
  result.decode_seconds = SecondsSince(decode_start);
  return result;
}

}  // namespace ds::flux
