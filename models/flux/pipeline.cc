#include "models/flux/pipeline.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <tuple>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/image.h"
#include "handlers/mapping_guard.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/tensor_checks.h"
#include "handlers/status.h"
#include "models/flux/latents.h"
#include "models/flux/transformer.h"

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
// The text encoders single files are resolved as (FluxPipeline's text_encoder / text_encoder_2).
constexpr char kClipTextClassName[] = "CLIPTextModel";
constexpr char kT5EncoderClassName[] = "T5EncoderModel";
// diffusers' FluxPipeline.check_inputs: "max_sequence_length cannot be greater than 512".
constexpr int64_t kMaxSequenceLengthLimit = 512;
// FluxPipeline.tokenizer_max_length when the CLIP tokenizer records no model_max_length.
constexpr int64_t kDefaultClipMaxLength = 77;

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

// The options a component other than the transformer is loaded with: the pipeline's dtype and
// device, without the transformer's storage options (storage dtype and skip patterns, device map,
// group offloading). The denoiser holds most of the weights and runs once per step; the VAE, text
// and image encoders are registered without those features (their specs do not wire them, so their
// loaders would refuse them) and stay resident in the compute dtype.
ModelOptions ResidentComponentOptions(const ModelOptions& requested) {
  ModelOptions options = requested;
  options.storage_dtype.reset();
  options.layerwise_casting_skip_patterns.reset();
  options.device_map = DeviceMapOptions{};
  options.group_offloading.reset();
  return options;
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
                                                                  const ModelOptions& requested,
                                                                  const std::string& class_name,
                                                                  const nlohmann::json& override) {
  const ModelOptions options = ResidentComponentOptions(requested);
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

// The model as a TextEncoder sharing its ownership; INVALID_ARGUMENT naming the component when it
// is not one.
absl::StatusOr<std::shared_ptr<const TextEncoder>> AsTextEncoder(
    std::unique_ptr<DiffusionModel> model, const std::string& component,
    const std::string& source) {
  const auto* encoder = dynamic_cast<const TextEncoder*>(model.get());
  if (encoder == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "component '", component, "' (", model->class_name(), " from ", source,
        ") is not a text encoder (it does not implement TextEncoder), so it cannot encode "
        "prompts"));
  }
  std::shared_ptr<const DiffusionModel> owner(std::move(model));
  return std::shared_ptr<const TextEncoder>(owner, encoder);
}

// A text encoder from a transformers folder (class from `class_name`, else its config.json) or a
// single file resolved as `class_name` (with `override` replacing derived config fields).
absl::StatusOr<std::shared_ptr<const TextEncoder>> LoadTextEncoder(
    const std::string& component, const std::string& path, const ModelOptions& requested,
    const std::string& class_name, const nlohmann::json& override) {
  const ModelOptions options = ResidentComponentOptions(requested);
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(component, ": ", path, " does not exist"));
  }
  std::unique_ptr<DiffusionModel> model;
  if (fs::is_directory(path, ec)) {
    auto loaded = LoadModelFromFolder(path, options, class_name);
    if (!loaded.ok()) return Annotate(loaded.status(), component);
    model = std::move(loaded).value();
  } else {
    SingleFileOptions sf;
    sf.model = options;
    sf.model_class = class_name;
    sf.config_override = override;
    auto loaded = LoadSingleFile(path, sf);
    if (!loaded.ok()) return Annotate(loaded.status(), component);
    model = std::move(loaded->model);
  }
  return AsTextEncoder(std::move(model), component, path);
}

// An image encoder from a transformers folder (class from `class_name`, else its config.json),
// sharing the model's ownership; INVALID_ARGUMENT naming `what` when the class is not one.
absl::StatusOr<std::shared_ptr<const ImageEncoder>> LoadImageEncoder(const std::string& what,
                                                                    const std::string& path,
                                                                    const ModelOptions& requested,
                                                                    const std::string& class_name) {
  const ModelOptions options = ResidentComponentOptions(requested);
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat(what, ": folder ", path, " does not exist"));
  }
  auto loaded = LoadModelFromFolder(path, options, class_name);
  if (!loaded.ok()) return Annotate(loaded.status(), what);
  std::unique_ptr<DiffusionModel> model = std::move(loaded).value();
  const auto* encoder = dynamic_cast<const ImageEncoder*>(model.get());
  if (encoder == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " (", model->class_name(), " from ", path,
        ") is not an image encoder (it does not implement ImageEncoder), so it cannot encode "
        "images"));
  }
  std::shared_ptr<const DiffusionModel> owner(std::move(model));
  return std::shared_ptr<const ImageEncoder>(owner, encoder);
}

absl::StatusOr<std::shared_ptr<const tokenizers::Tokenizer>> LoadTokenizer(
    const std::string& component, const std::string& path) {
  auto loaded = tokenizers::LoadTokenizerFromFolder(path);
  if (!loaded.ok()) return Annotate(loaded.status(), component);
  return std::shared_ptr<const tokenizers::Tokenizer>(std::move(loaded).value());
}

std::string TokenizerClassName(const tokenizers::Tokenizer& tokenizer) {
  const std::string kind = tokenizer.kind();
  if (kind == "clip") return "CLIPTokenizer";
  if (kind == "t5") return "T5Tokenizer";
  return kind;
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
  if (options.prompt_cache_entries < 0 || options.prompt_cache_max_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FluxPipelineOptions: prompt_cache_entries and prompt_cache_max_bytes must be >= 0, got ",
        options.prompt_cache_entries, ", ", options.prompt_cache_max_bytes));
  }
  if (components.transformer == nullptr) {
    return absl::InvalidArgumentError("component 'transformer' is required");
  }
  for (const auto& [encoder, tokenizer, encoder_name, tokenizer_name] :
       {std::tuple<bool, bool, const char*, const char*>{
            components.text_encoder != nullptr, components.tokenizer != nullptr, "text_encoder",
            "tokenizer"},
        {components.text_encoder_2 != nullptr, components.tokenizer_2 != nullptr,
         "text_encoder_2", "tokenizer_2"}}) {
    if (encoder != tokenizer) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component '", encoder ? encoder_name : tokenizer_name, "' is given without '",
          encoder ? tokenizer_name : encoder_name,
          "': a text encoder needs its tokenizer (and the reverse)"));
    }
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
  if (components.text_encoder_2 != nullptr &&
      components.text_encoder_2->hidden_size() != config->joint_attention_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "component 'text_encoder_2' has hidden size ", components.text_encoder_2->hidden_size(),
        " but the transformer's joint_attention_dim is ", config->joint_attention_dim));
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
  l.accepts_text_prompt = components_.text_encoder != nullptr &&
                          components_.text_encoder_2 != nullptr &&
                          components_.tokenizer != nullptr && components_.tokenizer_2 != nullptr;
  l.max_sequence_length_limit = kMaxSequenceLengthLimit;
  // The transformer's IP-Adapter mixin is what the pipeline drives: supported when the registry
  // spec of its class wires one (the `_supports_ip_adapter` row).
  auto spec = ModelRegistry::Global().Find(components_.transformer->model().class_name());
  l.supports_ip_adapter = spec.ok() && (*spec)->ip_adapter != nullptr;
  // Likewise the step caches its forward implements (the `_supports_cache` row).
  if (spec.ok() && (*spec)->cache != nullptr) l.cache_types = (*spec)->cache->CacheTypes();
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
  for (const auto& [name, encoder] :
       {std::pair<const char*, const TextEncoder*>{"text_encoder", components_.text_encoder.get()},
        {"text_encoder_2", components_.text_encoder_2.get()}}) {
    if (encoder == nullptr) continue;
    const auto* model = dynamic_cast<const DiffusionModel*>(encoder);
    d.classes[name] = model != nullptr ? model->class_name() : "TextEncoder";
  }
  if (components_.tokenizer != nullptr) {
    d.classes["tokenizer"] = TokenizerClassName(*components_.tokenizer);
  }
  if (components_.tokenizer_2 != nullptr) {
    d.classes["tokenizer_2"] = TokenizerClassName(*components_.tokenizer_2);
  }
  if (components_.image_encoder != nullptr) {
    const auto* model = dynamic_cast<const DiffusionModel*>(components_.image_encoder.get());
    d.classes["image_encoder"] = model != nullptr ? model->class_name() : "ImageEncoder";
  }
  if (components_.feature_extractor.has_value()) {
    d.classes["feature_extractor"] = "CLIPImageProcessor";
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
    const bool text = key == "text_encoder" || key == "text_encoder_2" || key == "tokenizer" ||
                      key == "tokenizer_2";
    if (key == "transformer" || key == "vae" || key == "scheduler" || key == "image_encoder" ||
        key == "feature_extractor" || (text && options.load_text_encoders)) {
      entries[key] = e;
    } else {
      c.not_loaded[key] = absl::StrCat(
          e.class_name, " (", e.library.empty() ? "no library" : e.library, "): ",
          text ? "not loaded (load_text_encoders = false); requests carry prompt_embeds and "
                 "pooled_prompt_embeds"
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

  // Text encoders and tokenizers: shared ones first, then the folder's.
  for (const auto& [key, target, shared] :
       {std::tuple<const char*, std::shared_ptr<const TextEncoder>*,
                   const std::shared_ptr<const TextEncoder>*>{"text_encoder", &c.text_encoder,
                                                               &options.text_encoder},
        {"text_encoder_2", &c.text_encoder_2, &options.text_encoder_2}}) {
    if (*shared != nullptr) {
      *target = *shared;
      c.sources[key] = "shared";
    } else if (auto it = entries.find(key); it != entries.end()) {
      const std::string dir = subfolder(key);
      std::error_code dir_ec;
      if (!fs::is_directory(dir, dir_ec)) {
        return absl::NotFoundError(absl::StrCat(index_path, " lists component '", key, "' (",
                                                it->second.class_name, ") but ", dir,
                                                " does not exist"));
      }
      ASSIGN_OR_RETURN(*target, LoadTextEncoder(key, dir, options.model, it->second.class_name,
                                                nullptr));
      c.sources[key] = dir;
    }
  }
  for (const auto& [key, target, shared] :
       {std::tuple<const char*, std::shared_ptr<const tokenizers::Tokenizer>*,
                   const std::shared_ptr<const tokenizers::Tokenizer>*>{
            "tokenizer", &c.tokenizer, &options.tokenizer},
        {"tokenizer_2", &c.tokenizer_2, &options.tokenizer_2}}) {
    if (*shared != nullptr) {
      *target = *shared;
      c.sources[key] = "shared";
    } else if (entries.count(key) != 0) {
      ASSIGN_OR_RETURN(*target, LoadTokenizer(key, subfolder(key)));
      c.sources[key] = subfolder(key);
    }
  }

  // The image encoder of IP-Adapters and its preprocessing.
  if (auto it = entries.find("image_encoder"); it != entries.end()) {
    ASSIGN_OR_RETURN(c.image_encoder,
                     LoadImageEncoder("component 'image_encoder'", subfolder("image_encoder"),
                                      options.model, it->second.class_name));
    c.sources["image_encoder"] = subfolder("image_encoder");
  }
  if (entries.count("feature_extractor") != 0) {
    const std::string file = (root / "feature_extractor" / "preprocessor_config.json").string();
    auto processor = ClipImageProcessorConfig::FromFile(file);
    if (!processor.ok()) return Annotate(processor.status(), "component 'feature_extractor'");
    c.feature_extractor = *processor;
    c.sources["feature_extractor"] = subfolder("feature_extractor");
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

  // Text encoders (shared ones first) and their tokenizer folders.
  for (const auto& [key, target, shared, path, class_name, override] :
       {std::tuple<const char*, std::shared_ptr<const TextEncoder>*,
                   const std::shared_ptr<const TextEncoder>*, const std::string*, const char*,
                   const nlohmann::json*>{"text_encoder", &c.text_encoder, &options.text_encoder,
                                          &files.text_encoder, kClipTextClassName,
                                          &files.text_encoder_config_override},
        {"text_encoder_2", &c.text_encoder_2, &options.text_encoder_2, &files.text_encoder_2,
         kT5EncoderClassName, &files.text_encoder_2_config_override}}) {
    if (*shared != nullptr) {
      *target = *shared;
      c.sources[key] = "shared";
    } else if (!path->empty()) {
      ASSIGN_OR_RETURN(*target, LoadTextEncoder(key, *path, options.model, class_name, *override));
      c.sources[key] = *path;
    }
  }
  for (const auto& [key, target, shared, path] :
       {std::tuple<const char*, std::shared_ptr<const tokenizers::Tokenizer>*,
                   const std::shared_ptr<const tokenizers::Tokenizer>*, const std::string*>{
            "tokenizer", &c.tokenizer, &options.tokenizer, &files.tokenizer},
        {"tokenizer_2", &c.tokenizer_2, &options.tokenizer_2, &files.tokenizer_2}}) {
    if (*shared != nullptr) {
      *target = *shared;
      c.sources[key] = "shared";
    } else if (!path->empty()) {
      ASSIGN_OR_RETURN(*target, LoadTokenizer(key, *path));
      c.sources[key] = *path;
    }
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

absl::StatusOr<CachedPromptEncoding> FluxPipeline::EncodeOne(
    const std::string& component, const tokenizers::Tokenizer& tokenizer,
    const TextEncoder& encoder, const std::string& text, int64_t max_length, bool pooled,
    PipelineResult* report) const {
  const PromptCacheKey key{component, text, max_length};
  if (std::optional<CachedPromptEncoding> hit = prompt_cache_->Lookup(key); hit.has_value()) {
    if (report != nullptr) ++report->prompt_cache_hits;
    return *std::move(hit);
  }
  if (report != nullptr) ++report->prompt_cache_misses;
  tokenizers::TokenizerOptions topts;
  topts.max_length = max_length;
  topts.pad_to_max_length = true;
  topts.truncate = true;
  auto tokens = tokenizer.Encode(text, topts);
  if (!tokens.ok()) return Annotate(tokens.status(), absl::StrCat("tokenizer of ", component));
  ASSIGN_OR_RETURN(torch::Tensor ids, TorchCall("token ids", [&] {
                     return torch::tensor(tokens->ids, torch::kInt64).unsqueeze(0);
                   }));
  // FluxPipeline passes no attention mask to either encoder (padding is attended to).
  auto out = encoder.EncodeTokens(ids, torch::Tensor());
  if (!out.ok()) return Annotate(out.status(), component);
  CachedPromptEncoding encoding;
  encoding.truncated = tokens->truncated;
  encoding.untruncated_length = tokens->untruncated_length;
  if (pooled) {
    if (!out->pooled.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "component '", component,
          "' has no pooled output (FluxPipeline takes pooled_prompt_embeds from it)"));
    }
    encoding.embeds = out->pooled[0];
  } else {
    encoding.embeds = out->last_hidden_state[0];
  }
  prompt_cache_->Insert(key, encoding);
  return encoding;
}

absl::StatusOr<PromptEncoding> FluxPipeline::EncodePrompt(
    const std::vector<std::string>& prompt, const std::vector<std::string>& prompt_2,
    int64_t max_sequence_length, const std::string& field, PipelineResult* report) const {
  const auto start = Clock::now();
  const std::string field_2 = absl::StrCat(field, "_2");
  std::vector<std::string> missing;
  for (const auto& [name, present] :
       {std::pair<const char*, bool>{"tokenizer", components_.tokenizer != nullptr},
        {"text_encoder", components_.text_encoder != nullptr},
        {"tokenizer_2", components_.tokenizer_2 != nullptr},
        {"text_encoder_2", components_.text_encoder_2 != nullptr}}) {
    if (!present) missing.push_back(name);
  }
  if (!missing.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "this pipeline cannot encode text (", field, " given): it has no ",
        absl::StrJoin(missing, ", "), " component(s); send ", field,
        "_embeds and pooled embeddings instead, or load a pipeline folder with its text encoders"));
  }
  if (prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is empty (no prompts)"));
  }
  if (!prompt_2.empty() && prompt_2.size() != prompt.size()) {
    return absl::InvalidArgumentError(absl::StrCat(field_2, " has ", prompt_2.size(),
                                                   " prompt(s) but ", field, " has ",
                                                   prompt.size(), "; give one per prompt or none"));
  }
  if (max_sequence_length < 1 || max_sequence_length > kMaxSequenceLengthLimit) {
    return absl::InvalidArgumentError(absl::StrCat("max_sequence_length must be in [1, ",
                                                   kMaxSequenceLengthLimit, "], got ",
                                                   max_sequence_length));
  }
  // FluxPipeline.tokenizer_max_length: the CLIP tokenizer's model_max_length (77).
  int64_t clip_length = components_.tokenizer->model_max_length();
  if (clip_length == tokenizers::kUnboundedLength) {
    clip_length = components_.text_encoder->max_position_embeddings() > 0
                      ? components_.text_encoder->max_position_embeddings()
                      : kDefaultClipMaxLength;
  }
  // The T5 sequence: max_sequence_length tokens, at most the tokenizer's model_max_length (512
  // for FLUX.1's, so the same as diffusers there; a smaller model, such as the synthetic
  // flux-tiny demo trained on 16 tokens, is never given longer sequences than it knows).
  max_sequence_length = std::min(max_sequence_length, components_.tokenizer_2->model_max_length());
  const std::vector<std::string>& t5_prompts = prompt_2.empty() ? prompt : prompt_2;
  std::vector<torch::Tensor> pooled, sequence;
  auto note = [&](const CachedPromptEncoding& e, const std::string& which, size_t index,
                  const char* component, int64_t max_length) {
    if (!e.truncated || report == nullptr) return;
    PipelineResult::PromptTruncation t;
    t.field = which;
    t.index = static_cast<int64_t>(index);
    t.component = component;
    t.tokens = e.untruncated_length;
    t.max_length = max_length;
    report->truncated_prompts.push_back(t);
    report->warnings.push_back(absl::StrCat(
        which, "[", index, "] has ", e.untruncated_length, " tokens in ", component,
        " and was truncated to ", max_length, " (",
        std::string(component) == "tokenizer" ? "CLIP's limit" : "max_sequence_length", ")"));
  };
  for (size_t i = 0; i < prompt.size(); ++i) {
    auto clip = EncodeOne("text_encoder", *components_.tokenizer, *components_.text_encoder,
                          prompt[i], clip_length, /*pooled=*/true, report);
    if (!clip.ok()) return Annotate(clip.status(), absl::StrCat(field, "[", i, "]"));
    note(*clip, field, i, "tokenizer", clip_length);
    pooled.push_back(clip->embeds);
  }
  for (size_t i = 0; i < t5_prompts.size(); ++i) {
    const std::string& which = prompt_2.empty() ? field : field_2;
    auto t5 = EncodeOne("text_encoder_2", *components_.tokenizer_2, *components_.text_encoder_2,
                        t5_prompts[i], max_sequence_length, /*pooled=*/false, report);
    if (!t5.ok()) return Annotate(t5.status(), absl::StrCat(which, "[", i, "]"));
    note(*t5, which, i, "tokenizer_2", max_sequence_length);
    sequence.push_back(t5->embeds);
  }
  EncodedPrompts out;
  ASSIGN_OR_RETURN(out.pooled_prompt_embeds,
                   TorchCall("stacking pooled_prompt_embeds", [&] { return torch::stack(pooled); }));
  ASSIGN_OR_RETURN(out.prompt_embeds,
                   TorchCall("stacking prompt_embeds", [&] { return torch::stack(sequence); }));
  if (report != nullptr) report->encode_seconds += SecondsSince(start);
  return out;
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
  // Text fields first (diffusers' check_inputs), so that a bad request never runs the encoders.
  FluxPipelineResult result;
  const bool text_prompt = !request.prompt.empty();
  const bool negative_text = !request.negative_prompt.empty();
  if (text_prompt &&
      (request.prompt_embeds.defined() || request.pooled_prompt_embeds.defined())) {
    return absl::InvalidArgumentError(
        "prompt and prompt_embeds / pooled_prompt_embeds are both given; give only one of them");
  }
  if (!text_prompt && !request.prompt_2.empty()) {
    return absl::InvalidArgumentError(
        "prompt_2 is given without prompt (it cannot go with prompt_embeds)");
  }
  if (negative_text && (request.negative_prompt_embeds.defined() ||
                        request.negative_pooled_prompt_embeds.defined())) {
    return absl::InvalidArgumentError(
        "negative_prompt and negative_prompt_embeds / negative_pooled_prompt_embeds are both "
        "given; give only one of them");
  }
  if (!negative_text && !request.negative_prompt_2.empty()) {
    return absl::InvalidArgumentError(
        "negative_prompt_2 is given without negative_prompt (it cannot go with "
        "negative_prompt_embeds)");
  }
  if (request.max_sequence_length < 1 || request.max_sequence_length > kMaxSequenceLengthLimit) {
    return absl::InvalidArgumentError(absl::StrCat("max_sequence_length must be in [1, ",
                                                   kMaxSequenceLengthLimit, "], got ",
                                                   request.max_sequence_length));
  }
  RETURN_IF_ERROR(CheckFinite("guidance_scale", request.guidance_scale));
  RETURN_IF_ERROR(CheckFinite("true_cfg_scale", request.true_cfg_scale));
  if (request.num_images_per_prompt < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_images_per_prompt must be >= 1, got ", request.num_images_per_prompt));
  }
  if (request.cache.has_value()) {
    RETURN_IF_ERROR(ValidateBlockCacheConfig(*request.cache, limits().cache_types));
  }
  const int64_t steps = request.sigmas.has_value() ? static_cast<int64_t>(request.sigmas->size())
                                                   : request.num_inference_steps;
  if (steps < 1 || steps > options_.max_inference_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.sigmas.has_value() ? "the number of sigmas" : "num_inference_steps",
                     " must be in [1, ", options_.max_inference_steps, "], got ", steps));
  }
  if (text_prompt && (request.num_images_per_prompt > options_.max_batch ||
                      static_cast<int64_t>(request.prompt.size()) * request.num_images_per_prompt >
                          options_.max_batch)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch ", request.prompt.size(), " prompt(s) x num_images_per_prompt ",
        request.num_images_per_prompt, " exceeds this pipeline's max_batch ", options_.max_batch));
  }
  if (!text_prompt && !request.prompt_embeds.defined()) {
    return absl::InvalidArgumentError(
        "prompt or prompt_embeds is required (neither is given)");
  }
  torch::Tensor prompt_embeds_in = request.prompt_embeds;
  torch::Tensor pooled_in = request.pooled_prompt_embeds;
  if (text_prompt) {
    ASSIGN_OR_RETURN(EncodedPrompts encoded,
                     EncodePrompt(request.prompt, request.prompt_2, request.max_sequence_length,
                                  "prompt", &result));
    prompt_embeds_in = encoded.prompt_embeds;
    pooled_in = encoded.pooled_prompt_embeds;
  }
  ASSIGN_OR_RETURN(torch::Tensor prompt_embeds,
                   SequenceEmbeds("prompt_embeds", prompt_embeds_in, cfg.joint_attention_dim,
                                  "joint_attention_dim"));
  ASSIGN_OR_RETURN(torch::Tensor pooled,
                   PooledEmbeds("pooled_prompt_embeds", pooled_in, cfg.pooled_projection_dim,
                                "pooled_projection_dim"));
  const int64_t prompts = prompt_embeds.size(0);
  if (pooled.size(0) != prompts) {
    return absl::InvalidArgumentError(absl::StrCat("pooled_prompt_embeds has batch ",
                                                   pooled.size(0), " but prompt_embeds has batch ",
                                                   prompts));
  }
  const bool negative_embeds_given =
      request.negative_prompt_embeds.defined() || request.negative_pooled_prompt_embeds.defined();
  if (negative_embeds_given && !(request.negative_prompt_embeds.defined() &&
                                 request.negative_pooled_prompt_embeds.defined())) {
    return absl::InvalidArgumentError(
        "negative_prompt_embeds and negative_pooled_prompt_embeds must be given together");
  }
  const bool has_negative = negative_embeds_given || negative_text;
  // FluxPipeline: do_true_cfg = true_cfg_scale > 1 and has_neg_prompt; the negative prompt is
  // encoded only then.
  const bool do_true_cfg = has_negative && request.true_cfg_scale > 1.0;
  if (negative_text && !do_true_cfg) {
    result.warnings.push_back(absl::StrCat(
        "negative_prompt is ignored: true classifier-free guidance needs true_cfg_scale > 1 (got ",
        request.true_cfg_scale, ")"));
  }
  if (negative_text && do_true_cfg) {
    const int64_t n = static_cast<int64_t>(request.negative_prompt.size());
    if (n != 1 && n != prompts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "negative_prompt has ", n, " prompt(s); expected 1 or the number of prompts, ", prompts));
    }
  }
  torch::Tensor negative_embeds, negative_pooled;
  if (negative_embeds_given || (negative_text && do_true_cfg)) {
    torch::Tensor negative_embeds_in = request.negative_prompt_embeds;
    torch::Tensor negative_pooled_in = request.negative_pooled_prompt_embeds;
    if (negative_text) {
      ASSIGN_OR_RETURN(EncodedPrompts encoded,
                       EncodePrompt(request.negative_prompt, request.negative_prompt_2,
                                    request.max_sequence_length, "negative_prompt", &result));
      negative_embeds_in = encoded.prompt_embeds;
      negative_pooled_in = encoded.pooled_prompt_embeds;
    }
    ASSIGN_OR_RETURN(negative_embeds,
                     SequenceEmbeds("negative_prompt_embeds", negative_embeds_in,
                                    cfg.joint_attention_dim, "joint_attention_dim"));
    ASSIGN_OR_RETURN(negative_pooled,
                     PooledEmbeds("negative_pooled_prompt_embeds", negative_pooled_in,
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
  if (request.num_images_per_prompt > options_.max_batch ||
      prompts * request.num_images_per_prompt > options_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch ", prompts, " prompt(s) x num_images_per_prompt ", request.num_images_per_prompt,
        " exceeds this pipeline's max_batch ", options_.max_batch));
  }
  const int64_t batch = prompts * request.num_images_per_prompt;

  // IP-Adapter image prompts (diffusers' prepare_ip_adapter_image_embeds), encoded once per
  // request; the negative pass gets its own (a black image by default) only when true CFG runs.
  FluxIPAdapterConditioning ip, negative_ip;
  if (!request.ip_adapters.empty()) {
    ASSIGN_OR_RETURN(ip, PrepareIPAdapters(request, height, width, batch, /*negative=*/false,
                                           &result));
    if (do_true_cfg) {
      ASSIGN_OR_RETURN(negative_ip, PrepareIPAdapters(request, height, width, batch,
                                                      /*negative=*/true, &result));
    }
  }
  // Step caching: one state per guidance branch (diffusers' cache_context("cond") and
  // ("uncond")), living only as long as this request.
  std::unique_ptr<BlockCacheState> cache_cond, cache_uncond;
  if (request.cache.has_value()) {
    ASSIGN_OR_RETURN(cache_cond, CreateBlockCacheState(*request.cache));
    if (do_true_cfg) {
      ASSIGN_OR_RETURN(cache_uncond, CreateBlockCacheState(*request.cache));
    }
  }
  // One transformer forward under the request's LoRA snapshot, with IP-Adapter conditioning when
  // any adapter has a non-zero scale and the branch's cache state when caching (otherwise exactly
  // the plain forward).
  auto transformer_forward = [&](const TensorMap& in, const FluxIPAdapterConditioning& cond,
                                 BlockCacheState* cache) -> absl::StatusOr<torch::Tensor> {
    if (!cond.active() && cache == nullptr) return host.Forward(in, request.adapters.get());
    return host.ForwardWith(
        request.adapters.get(),
        [&](const DiffusionModel& model, const LoraContext* lora) -> absl::StatusOr<torch::Tensor> {
          const auto* flux = dynamic_cast<const FluxTransformer*>(&model);
          if (flux == nullptr) {
            return absl::InternalError(absl::StrCat("the transformer (", model.class_name(),
                                                    ") has no IP-Adapter / cache forward"));
          }
          FluxTransformer::ForwardExtras extras;
          if (cond.active()) extras.ip_adapter = &cond;
          extras.cache = cache;
          return flux->ForwardWithExtras(in, lora, extras);
        });
  };

  // 2-3. Latents (noise), ids, embeddings on the model's dtype and device.
  ASSIGN_OR_RETURN(const std::vector<int64_t> latent_shape,
                   LatentShape(batch, num_channels_latents(), height, width, s));
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
    // The step index TaylorSeer's schedule counts (each branch's state sees every step once).
    for (BlockCacheState* cache : {cache_cond.get(), cache_uncond.get()}) {
      if (cache != nullptr) cache->SetStep(i);
    }
    ASSIGN_OR_RETURN(torch::Tensor v, transformer_forward(inputs, ip, cache_cond.get()));
    if (do_true_cfg) {
      negative_inputs["hidden_states"] = x;
      negative_inputs["timestep"] = timestep;
      ASSIGN_OR_RETURN(torch::Tensor v_neg,
                       transformer_forward(negative_inputs, negative_ip, cache_uncond.get()));
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
  for (const BlockCacheState* cache : {cache_cond.get(), cache_uncond.get()}) {
    if (cache == nullptr) continue;
    result.cache_computed_steps += cache->computed();
    result.cache_skipped_steps += cache->skipped();
  }
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

// ---------------------------------------------------------------------------------------------
// IP-Adapters

absl::StatusOr<IPAdapterInfo> FluxPipeline::LoadIPAdapter(const std::string& name,
                                                          const std::string& path,
                                                          const IPAdapterLoadOptions& options) const {
  RETURN_IF_ERROR(ValidateAdapterName(name));
  if (!limits().supports_ip_adapter) {
    return absl::UnimplementedError(
        absl::StrCat(components_.transformer->model().class_name(),
                     " has no IP-Adapter support wired in this build"));
  }
  {
    std::lock_guard lock(ip_mu_);
    if (!options.replace && ip_adapters_.count(name) != 0) {
      return absl::AlreadyExistsError(absl::StrCat(
          "IP-Adapter '", name, "' is already loaded (set replace to replace it)"));
    }
  }
  const ModelOptions& mo = components_.transformer->model().options();
  // The adapter and encoder files must not have been truncated or rewritten while read (checked
  // before the adapter is registered).
  MappedReadScope reads;
  ASSIGN_OR_RETURN(FluxIPAdapterPtr adapter,
                   FluxIPAdapter::Load(path, transformer_config_, mo.dtype, mo.device));

  auto entry = std::make_shared<IPAdapterEntry>();
  entry->adapter = adapter;
  std::string encoder_key;
  if (!options.image_encoder_path.empty()) {
    std::error_code ec;
    encoder_key = fs::weakly_canonical(options.image_encoder_path, ec).string();
    if (ec) encoder_key = options.image_encoder_path;
    {
      std::lock_guard lock(ip_mu_);
      if (auto it = image_encoders_.find(encoder_key); it != image_encoders_.end()) {
        entry->encoder = it->second.lock();
      }
    }
    if (entry->encoder == nullptr) {
      ASSIGN_OR_RETURN(entry->encoder, LoadImageEncoder("image encoder",
                                                        options.image_encoder_path, mo, ""));
    }
    entry->info.image_encoder = options.image_encoder_source.empty()
                                    ? options.image_encoder_path
                                    : options.image_encoder_source;
  } else if (components_.image_encoder != nullptr) {
    entry->encoder = components_.image_encoder;
    entry->info.image_encoder = "image_encoder";  // the pipeline's component
  }
  if (entry->encoder != nullptr) {
    if (entry->encoder->image_embed_dim() != adapter->image_embed_dim()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the image encoder ", entry->info.image_encoder, " gives image_embeds of width ",
          entry->encoder->image_embed_dim(), " but the IP-Adapter ", path,
          " takes image embeddings of width ", adapter->image_embed_dim(),
          " (its image projection's input); use the image encoder it was trained with"));
    }
    // diffusers: the pipeline's feature_extractor, else CLIPImageProcessor(size = crop_size =
    // image_encoder.config.image_size).
    entry->processor = components_.feature_extractor.value_or(
        ClipImageProcessorConfig::ForImageSize(entry->encoder->image_size()));
    entry->info.image_size = entry->encoder->image_size();
  }
  entry->info.name = name;
  entry->info.path = options.source.empty() ? path : options.source;
  entry->info.format = adapter->format();
  entry->info.num_tokens = adapter->num_tokens();
  entry->info.image_embed_dim = adapter->image_embed_dim();
  entry->info.num_layers = adapter->num_layers();
  entry->info.memory_bytes = adapter->memory_bytes();
  RETURN_IF_ERROR(reads.Check());
  const IPAdapterInfo info = entry->info;

  std::lock_guard lock(ip_mu_);
  if (!options.replace && ip_adapters_.count(name) != 0) {
    return absl::AlreadyExistsError(absl::StrCat(
        "IP-Adapter '", name, "' is already loaded (set replace to replace it)"));
  }
  if (!encoder_key.empty()) image_encoders_[encoder_key] = entry->encoder;
  ip_adapters_[name] = std::move(entry);
  for (auto it = image_encoders_.begin(); it != image_encoders_.end();) {
    it = it->second.expired() ? image_encoders_.erase(it) : std::next(it);
  }
  return info;
}

absl::Status FluxPipeline::UnloadIPAdapter(const std::string& name) const {
  std::lock_guard lock(ip_mu_);
  if (ip_adapters_.erase(name) == 0) {
    return absl::NotFoundError(absl::StrCat("IP-Adapter '", name, "' is not loaded"));
  }
  for (auto it = image_encoders_.begin(); it != image_encoders_.end();) {
    it = it->second.expired() ? image_encoders_.erase(it) : std::next(it);
  }
  return absl::OkStatus();
}

std::vector<IPAdapterInfo> FluxPipeline::ListIPAdapters() const {
  std::lock_guard lock(ip_mu_);
  std::vector<IPAdapterInfo> out;
  for (const auto& [name, entry] : ip_adapters_) out.push_back(entry->info);
  return out;
}

absl::StatusOr<FluxIPAdapterConditioning> FluxPipeline::PrepareIPAdapters(
    const PipelineRequest& request, int64_t height, int64_t width, int64_t batch, bool negative,
    PipelineResult* report) const {
  const auto start = Clock::now();
  bool encoded_any = false;
  FluxIPAdapterConditioning conditioning;
  for (size_t i = 0; i < request.ip_adapters.size(); ++i) {
    const IPAdapterRequestInput& in = request.ip_adapters[i];
    const std::string field = absl::StrCat("ip_adapters[", i, "]");
    std::shared_ptr<const IPAdapterEntry> entry;
    {
      std::lock_guard lock(ip_mu_);
      if (auto it = ip_adapters_.find(in.name); it != ip_adapters_.end()) entry = it->second;
      if (entry == nullptr) {
        std::vector<std::string> names;
        for (const auto& [name, e] : ip_adapters_) names.push_back(name);
        return absl::NotFoundError(absl::StrCat(
            field, ".name: IP-Adapter '", in.name, "' is not loaded (loaded: ",
            names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
      }
    }
    for (const auto& [image, embeds, prefix] :
         {std::tuple<const torch::Tensor*, const torch::Tensor*, const char*>{
              &in.image, &in.image_embeds, ""},
          {&in.negative_image, &in.negative_image_embeds, "negative_"}}) {
      if (image->defined() && embeds->defined()) {
        return absl::InvalidArgumentError(absl::StrCat(field, ": ", prefix, "image and ", prefix,
                                                       "image_embeds are both given; give one"));
      }
    }
    const bool has_positive = in.image.defined() || in.image_embeds.defined();
    const bool has_negative = in.negative_image.defined() || in.negative_image_embeds.defined();
    if (!has_positive && !has_negative) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": needs an image or image_embeds (the image prompt)"));
    }
    torch::Tensor image = negative ? in.negative_image : in.image;
    torch::Tensor embeds = negative ? in.negative_image_embeds : in.image_embeds;
    if (!image.defined() && !embeds.defined()) {
      // diffusers: the missing side of the pair is np.zeros((width, height, 3), uint8), a black
      // image (of width rows and height columns, as diffusers writes it).
      ASSIGN_OR_RETURN(image, TorchCall("black IP-Adapter image", [&] {
                         return torch::zeros({width, height, 3}, torch::kUInt8);
                       }));
    }
    const std::string which = absl::StrCat(field, negative ? ".negative_" : ".");
    if (image.defined()) {
      if (entry->encoder == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            which, "image: IP-Adapter '", in.name,
            "' was loaded without an image encoder (and the pipeline has no image_encoder "
            "component); send image_embeds or load it with an image encoder"));
      }
      auto pixels = ClipPixelValues(image.cpu(), entry->processor);
      if (!pixels.ok()) return Annotate(pixels.status(), which + "image");
      auto encoded = entry->encoder->EncodeImages(*pixels);
      if (!encoded.ok()) return Annotate(encoded.status(), which + "image");
      embeds = *encoded;  // [1, E]: one image for the whole batch (diffusers concatenates copies)
      encoded_any = true;
    } else {
      if (!embeds.is_floating_point() || embeds.dim() < 1 || embeds.dim() > 3) {
        return absl::InvalidArgumentError(absl::StrCat(
            which, "image_embeds: expected floating [E], [B or 1, E] or [B or 1, N_img, E], got ",
            std::string(c10::toString(embeds.scalar_type())), " ", ShapeString(embeds.sizes())));
      }
      ASSIGN_OR_RETURN(bool finite, AllFinite(embeds));
      if (!finite) {
        return absl::InvalidArgumentError(
            absl::StrCat(which, "image_embeds: contains NaN or infinite values"));
      }
      if (embeds.dim() == 1) embeds = embeds.view({1, embeds.size(0)});
    }
    const FluxIPAdapter& adapter = *entry->adapter;
    ASSIGN_OR_RETURN(torch::Tensor e, TorchCall("IP-Adapter image embeddings", [&] {
                       return embeds.to(adapter.device(), adapter.dtype());
                     }));
    FluxIPAdapterInput input;
    input.adapter = entry->adapter;
    input.image_embeds = e;
    input.scales = in.scales;
    conditioning.adapters.push_back(std::move(input));
  }
  absl::Status valid = ValidateIPAdapterConditioning(conditioning, transformer_config_, batch);
  if (!valid.ok()) {
    return Annotate(valid, negative ? "ip_adapters (negative pass)" : "ip_adapters");
  }
  if (encoded_any && report != nullptr) report->image_encode_seconds += SecondsSince(start);
  return conditioning;
}

}  // namespace ds::flux
