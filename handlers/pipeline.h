// DiffusionPipeline: the model-agnostic face of a text-to-image pipeline (diffusers' *Pipeline
// classes) as the server and tools use it, and the PipelineRegistry through which a diffusers
// pipeline folder is loaded by its model_index.json "_class_name".
//
// A model folder implements DiffusionPipeline (e.g. models/flux/pipeline.h's FluxPipeline) and
// registers a PipelineSpec from its spec.cc (DS_REGISTER_PIPELINE); callers never include the
// model folder: they call LoadPipelineFromFolder and talk to the returned DiffusionPipeline.
//
// Thread-safety: a DiffusionPipeline is immutable after creation; Generate() may run concurrently
// from many threads. Adapter loading on transformer_host() is safe meanwhile (see lora_host.h).
// Registration happens during static initialization; lookups are read-only afterwards.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/block_cache.h"
#include "handlers/demo_pipeline.h"
#include "handlers/flow_match.h"
#include "handlers/lora_host.h"
#include "handlers/model.h"

namespace ds {

// Limits a pipeline enforces on requests (a request over one is INVALID_ARGUMENT).
struct PipelineOptions {
  // Largest num_inference_steps (or number of caller sigmas).
  int64_t max_inference_steps = 1000;
  // Largest batch (prompts x num_images_per_prompt).
  int64_t max_batch = 16;
  // Largest height and width, pixels.
  int64_t max_image_side = 4096;
  // Encoded prompts kept per (text encoder, prompt text, max length) so that repeated prompts
  // skip the text encoders (a bounded LRU inside the pipeline, see prompt_cache_stats()); 0 = no
  // cache. Each entry holds one prompt's encoder output on the encoder's device (FLUX.1's T5-XXL:
  // 512 x 4096 values, 4 MiB in bfloat16).
  int64_t prompt_cache_entries = 256;
  // Largest total size of the cached tensors, bytes; least recently used entries are dropped
  // first, and an entry larger than this is not cached. 0 = bounded by the entry count only.
  int64_t prompt_cache_max_bytes = int64_t{512} << 20;
};

// Counters of a pipeline's prompt-embedding cache (all zero for pipelines without one).
struct PromptCacheStats {
  int64_t hits = 0;       // lookups answered from the cache, since creation
  int64_t misses = 0;     // lookups that ran the text encoder, since creation
  int64_t evictions = 0;  // entries dropped for room, since creation
  int64_t entries = 0;    // entries held now
  int64_t bytes = 0;      // bytes of tensors held now
  int64_t capacity_entries = 0;  // PipelineOptions::prompt_cache_entries (0 = no cache)
};

// IP-Adapters (image prompts) held by a pipeline whose denoiser has an IP-Adapter mixin
// (limits().supports_ip_adapter; models/flux/ip_adapter.h): loaded once by name, then named by
// requests with an image (or precomputed image embeddings) and a scale.

struct IPAdapterLoadOptions {
  // A transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors) that
  // turns request images into image embeddings ("" = the pipeline's own `image_encoder/`
  // component, if it has one; otherwise requests naming the adapter must carry image_embeds).
  // Its images are preprocessed with the pipeline's `feature_extractor/` when it has one, else
  // with CLIPImageProcessor(size = crop = the encoder's image_size), as diffusers'
  // load_ip_adapter builds it. Encoders are shared by the adapters that name the same folder.
  std::string image_encoder_path;
  // Replace an adapter of the same name (requests already using the old one finish with it);
  // otherwise a taken name is ALREADY_EXISTS.
  bool replace = false;
  // What IPAdapterInfo::path / image_encoder report (e.g. the client's root-relative paths);
  // "" = the paths themselves.
  std::string source;
  std::string image_encoder_source;
};

struct IPAdapterInfo {
  std::string name;
  std::string path;    // the adapter file
  std::string format;  // the weight layout ("xlabs", "diffusers")
  int64_t num_tokens = 0;       // image tokens per image
  int64_t image_embed_dim = 0;  // width of the image embeddings it takes
  int64_t num_layers = 0;       // attention layers it conditions
  int64_t memory_bytes = 0;     // its weights (the image encoder not included)
  // The image encoder's folder (or "image_encoder" for the pipeline's own component; "" = none:
  // requests give image_embeds).
  std::string image_encoder;
  int64_t image_size = 0;       // the encoder's input size (0 without an encoder)
};

// One adapter's part of a request.
struct IPAdapterRequestInput {
  std::string name;  // a loaded adapter
  // Exactly one of: an RGB image [H, W, 3] uint8 (handlers/image_processing.h DecodeImageToRgb),
  // encoded by the adapter's image encoder, or image embeddings [E] (one image), [B or 1, E] (the
  // image encoder's output) or [B or 1, N_img, E] (E = the adapter's image_embed_dim; N_img images
  // add one token group each); batch-1 embeddings apply to every image of the request.
  torch::Tensor image;
  torch::Tensor image_embeds;
  // One scale for every conditioned layer, or one per layer (diffusers' set_ip_adapter_scale with
  // a float or a list); finite. All zero: the adapter changes nothing (bit for bit).
  std::vector<double> scales = {1.0};
  // For true CFG's negative pass (optional, at most one): as diffusers' negative_ip_adapter_image
  // (default: an all-black image of the request's size, as diffusers uses).
  torch::Tensor negative_image;
  torch::Tensor negative_image_embeds;
};

// One generation request. Tensors may be on any device and of any floating dtype; the pipeline
// moves them to its transformer's dtype and device.
struct PipelineRequest {
  // Text prompts, one per prompt (P = prompt.size()), encoded by the pipeline's text encoders
  // (limits().accepts_text_prompt); "" is a valid (empty) prompt. Empty vector: the request
  // carries prompt_embeds instead; giving both is INVALID_ARGUMENT (as diffusers).
  std::vector<std::string> prompt;
  // Prompts for the second text encoder (Flux: T5), same count as `prompt`; empty = `prompt`.
  std::vector<std::string> prompt_2;
  // Negative prompts for true classifier-free guidance (1 or P of them; instead of
  // negative_prompt_embeds), and for the second encoder (empty = negative_prompt). Encoded only
  // when true CFG runs (true_cfg_scale > 1), as diffusers does.
  std::vector<std::string> negative_prompt;
  std::vector<std::string> negative_prompt_2;
  // Token length the sequence text encoder (Flux: T5) pads and truncates prompts to; in
  // [1, limits().max_sequence_length_limit]; a pipeline may pad to fewer when its tokenizer's
  // model_max_length is smaller (Flux).
  int64_t max_sequence_length = 512;
  // [P, L, D] or [L, D] (P = 1), D = the transformer's text-embedding width.
  torch::Tensor prompt_embeds;
  // [P, D_pooled] or [D_pooled]; may stay undefined for pipelines whose transformer takes no
  // pooled embedding (limits().needs_pooled_prompt_embeds == false).
  torch::Tensor pooled_prompt_embeds;
  // Optional, both or neither: shaped like the positive ones (own L; batch P or 1).
  torch::Tensor negative_prompt_embeds;
  torch::Tensor negative_pooled_prompt_embeds;
  // True classifier-free guidance runs when true_cfg_scale > 1 and negative embeddings are given.
  double true_cfg_scale = 1.0;
  // Pixels; 0 = the pipeline's default (limits().default_height / default_width).
  int64_t height = 0;
  int64_t width = 0;
  int64_t num_images_per_prompt = 1;
  // The initial noise, unpacked [P * num_images_per_prompt, C, h, w] (see
  // limits().latent_channels / image_size_multiple); when undefined, noise is drawn from `seed`
  // (CPU float32 generator), or from a fresh random seed when `seed` is unset (reported in the
  // result).
  torch::Tensor latents;
  std::optional<uint64_t> seed;
  int64_t num_inference_steps = 28;
  // Caller sigmas (their count is the number of steps; num_inference_steps is then ignored).
  std::optional<std::vector<double>> sigmas;
  // Distilled guidance (only applied by transformers with a guidance embedding; otherwise
  // accepted, ignored and reported as not applied, as diffusers does).
  double guidance_scale = 3.5;
  // The request's adapter snapshot (transformer_host().Snapshot(...)); null: none.
  AdapterStackPtr adapters;
  // Image prompts through loaded IP-Adapters (several add up); empty: none.
  std::vector<IPAdapterRequestInput> ip_adapters;
  // Decode the latents to images (needs a VAE), and encode them as PNG (needs decode).
  bool decode = true;
  bool png = false;
  // Step caching (block_cache.h; a type in limits().cache_types): e.g. FirstBlockCache skips the
  // transformer's blocks after the first when the first block's residual changed by at most
  // `threshold` since they last ran; TaylorSeer predicts hooked modules' outputs on a fixed
  // schedule of steps. The pipeline keeps one state per request and per guidance branch, never
  // shared, and gives it the denoising step index (BlockCacheState::SetStep). Unset: no caching.
  std::optional<BlockCacheConfig> cache;
};

struct PipelineResult {
  // Final latents, unpacked [B, C, h, w] (the transformer's dtype and device), before the VAE's
  // scaling.
  torch::Tensor latents;
  // Decoded images [B, 3, H, W], float32 on the CPU, in [0, 1]; undefined unless decoded.
  torch::Tensor image;
  // One 8-bit RGB PNG per image (round-half-to-even of image * 255), when requested.
  std::vector<std::string> png;
  std::optional<uint64_t> seed;  // the seed the noise came from (unset for given latents)
  int64_t steps = 0;
  std::vector<float> sigmas;     // steps + 1 values
  std::vector<float> timesteps;  // steps values
  double guidance_scale = 0;
  bool guidance_applied = false;  // the transformer has a guidance embedding
  bool true_cfg_applied = false;
  double denoise_seconds = 0;
  double decode_seconds = 0;  // VAE decode and postprocessing (PNG included)

  // Text prompts (PipelineRequest::prompt and friends) whose tokens did not fit: the tokenizer
  // dropped the tail, as diffusers does (it only logs a warning).
  struct PromptTruncation {
    std::string field;      // "prompt", "prompt_2", "negative_prompt" or "negative_prompt_2"
    int64_t index = 0;      // which prompt of that field
    std::string component;  // the tokenizer component, e.g. "tokenizer" (CLIP), "tokenizer_2" (T5)
    int64_t tokens = 0;     // the prompt's length in tokens (special tokens included), untruncated
    int64_t max_length = 0;  // the length it was cut to
  };
  std::vector<PromptTruncation> truncated_prompts;
  // Human-readable notes about the request (truncated prompts, ignored negative prompts, ...).
  std::vector<std::string> warnings;
  // Text encoding of this request: seconds (tokenizers + encoders, cache lookups included) and
  // the prompt-cache lookups it made.
  double encode_seconds = 0;
  int64_t prompt_cache_hits = 0;
  int64_t prompt_cache_misses = 0;
  // Image prompts: seconds spent preprocessing and encoding request images (0 without images).
  double image_encode_seconds = 0;
  // Step caching (PipelineRequest::cache): transformer forwards that ran every block and that
  // skipped work (FirstBlockCache: the blocks after the first; TaylorSeer: predicted the hooked
  // modules), summed over guidance branches (with true CFG a step counts once per branch). Both 0
  // without caching.
  int64_t cache_computed_steps = 0;
  int64_t cache_skipped_steps = 0;
};

// A pipeline's encoding of text prompts (what its text encoders give the denoiser).
struct PromptEncoding {
  // [P, L, D]: the sequence embedding (Flux: T5's last hidden state).
  torch::Tensor prompt_embeds;
  // [P, D_pooled]: the pooled embedding (Flux: CLIP's pooler output); undefined for pipelines
  // without one.
  torch::Tensor pooled_prompt_embeds;
};

// What a pipeline accepts and what it assumes when a request leaves a field at its default.
struct PipelineLimits {
  PipelineOptions options;
  // Height and width must be multiples of this (2 x the VAE scale factor for Flux).
  int64_t image_size_multiple = 1;
  int64_t default_height = 0;
  int64_t default_width = 0;
  int64_t default_inference_steps = 28;
  double default_guidance_scale = 3.5;
  // Whether guidance_scale reaches the transformer (guidance-distilled variants).
  bool guidance_embeds = false;
  // Widths of the embeddings requests carry (last dimension of prompt_embeds / pooled).
  int64_t prompt_embeds_dim = 0;
  int64_t pooled_prompt_embeds_dim = 0;
  bool needs_pooled_prompt_embeds = true;
  // Channels of the unpacked noise (PipelineRequest::latents).
  int64_t latent_channels = 0;
  // Whether the pipeline can decode to images (has a VAE).
  bool can_decode = false;
  // Whether requests may carry text prompts (the pipeline has its text encoders and tokenizers).
  bool accepts_text_prompt = false;
  // Largest PipelineRequest::max_sequence_length (Flux: 512); 0 when the pipeline has no
  // sequence text encoder setting.
  int64_t max_sequence_length_limit = 0;
  // Whether the pipeline takes IP-Adapters (LoadIPAdapter, PipelineRequest::ip_adapters).
  bool supports_ip_adapter = false;
  // The PipelineRequest::cache types its denoiser implements (empty: none).
  std::vector<std::string> cache_types;
};

// The pipeline's components as a report shows them.
struct PipelineDescription {
  // Component name -> class name, for the loaded components (e.g. "transformer" ->
  // "FluxTransformer2DModel", "scheduler" -> "FlowMatchEulerDiscreteScheduler").
  std::map<std::string, std::string> classes;
  // Component name -> where it came from (folder, file, "shared" or "default").
  std::map<std::string, std::string> sources;
  // Components the source lists but the pipeline did not load: name -> why.
  std::map<std::string, std::string> not_loaded;
  // Checkpoint variant ("flux-dev", "flux-schnell", ...), or "".
  std::string variant;
};

class DiffusionPipeline {
 public:
  virtual ~DiffusionPipeline() = default;

  // The diffusers pipeline class name ("FluxPipeline").
  virtual const std::string& class_name() const = 0;

  // The denoiser with its adapter store: adapters loaded here are what requests snapshot. Lives as
  // long as the pipeline (it may be shared with other pipelines).
  virtual LoraHost& transformer_host() const = 0;

  // Runs the request. `on_step` (may be empty) is called with (0, N) before the first step and
  // (i, N) after step i; a non-OK status from it stops the run and is returned unchanged
  // (cancellation, deadlines). `on_latents` (may be empty) sees the latents after each step in the
  // pipeline's internal layout. INVALID_ARGUMENT naming the field for a bad request (see the
  // implementation's header for the list); FAILED_PRECONDITION for decode without a VAE; ABORTED
  // for a stale adapter snapshot; INTERNAL if LibTorch fails.
  virtual absl::StatusOr<PipelineResult> Generate(
      const PipelineRequest& request, const DenoiseStepCallback& on_step = {},
      const DenoiseLatentsObserver& on_latents = {}) const = 0;

  virtual PipelineLimits limits() const = 0;
  virtual PipelineDescription describe() const = 0;

  // Encodes text prompts exactly as Generate does for PipelineRequest::prompt / prompt_2 /
  // max_sequence_length (through the prompt cache), in the encoders' dtype and device.
  // Truncations, warnings, cache counters and encode_seconds are added to `report` (may be null);
  // `field` names the prompts in errors and reports ("prompt" or "negative_prompt").
  // FAILED_PRECONDITION when the pipeline has no text encoders (limits().accepts_text_prompt);
  // INVALID_ARGUMENT as Generate's for the text fields. The default: FAILED_PRECONDITION.
  virtual absl::StatusOr<PromptEncoding> EncodePrompt(const std::vector<std::string>& prompt,
                                                      const std::vector<std::string>& prompt_2,
                                                      int64_t max_sequence_length,
                                                      const std::string& field = "prompt",
                                                      PipelineResult* report = nullptr) const;

  // IP-Adapters (limits().supports_ip_adapter). Thread-safe, and const like the prompt cache: the
  // adapter store is internally synchronized state that never changes the pipeline's weights;
  // loading or unloading never disturbs running requests (they hold what they started with).
  // LoadIPAdapter: reads the adapter file at `path` and (when named) the image encoder, checks
  // them against the denoiser and each other, and stores the adapter as `name`
  // ([A-Za-z0-9._-], 1..128). UNIMPLEMENTED for pipelines without IP-Adapter support;
  // INVALID_ARGUMENT for a bad name, an adapter for another model (naming the key and shapes), an
  // encoder whose embedding width differs from the adapter's; NOT_FOUND for a missing file or
  // folder; ALREADY_EXISTS for a taken name without `replace`. On error nothing changes.
  virtual absl::StatusOr<IPAdapterInfo> LoadIPAdapter(const std::string& name,
                                                      const std::string& path,
                                                      const IPAdapterLoadOptions& options) const;
  // NOT_FOUND for an unknown name (UNIMPLEMENTED without support).
  virtual absl::Status UnloadIPAdapter(const std::string& name) const;
  // The loaded adapters, sorted by name.
  virtual std::vector<IPAdapterInfo> ListIPAdapters() const { return {}; }

  // The prompt-embedding cache's counters (PipelineOptions::prompt_cache_entries); all zero for
  // pipelines without one. Thread-safe.
  virtual PromptCacheStats prompt_cache_stats() const { return {}; }
};

// How to load a pipeline folder.
struct PipelineLoadOptions {
  ModelOptions model;  // dtype and device of the components
  PipelineOptions pipeline;
  LoraHostOptions lora;  // the transformer's adapter store
};

// Loads a diffusers pipeline folder (model_index.json + component subfolders) as the spec's
// pipeline class. Errors as LoadPipelineFromFolder.
using PipelineFactory = std::function<absl::StatusOr<std::unique_ptr<DiffusionPipeline>>(
    const std::string& folder, const PipelineLoadOptions& options)>;

struct PipelineSpec {
  std::string class_name;   // diffusers pipeline class name, model_index.json's "_class_name"
  std::string description;  // one line for listings
  PipelineFactory from_pretrained;
  // Tiny demo pipelines of this class with random weights (handlers/demo_pipeline.h), written to
  // real files and loaded through from_pretrained; names are unique across the registry.
  std::vector<DemoPipelineRecipe> demos;
};

class PipelineRegistry {
 public:
  static PipelineRegistry& Global();

  // INVALID_ARGUMENT for an empty class name or factory, or a demo whose pipeline_class is not the
  // spec's; ALREADY_EXISTS for a duplicate class or demo name.
  absl::Status Register(PipelineSpec spec);

  // By class name (exact). NOT_FOUND listing the registered pipeline classes otherwise.
  absl::StatusOr<const PipelineSpec*> Find(std::string_view class_name) const;

  // The demo recipe named `name` (exact) from any registered spec. NOT_FOUND listing the demo
  // names otherwise.
  absl::StatusOr<const DemoPipelineRecipe*> FindDemo(std::string_view name) const;

  // Every registered spec, sorted by class name.
  std::vector<const PipelineSpec*> List() const;

 private:
  std::vector<std::unique_ptr<PipelineSpec>> specs_;
};

// Registers at static-initialization time; aborts with a message if registration fails.
struct PipelineRegistrar {
  explicit PipelineRegistrar(PipelineSpec spec);
};

#define DS_REGISTER_PIPELINE_CONCAT_INNER_(a, b) a##b
#define DS_REGISTER_PIPELINE_CONCAT_(a, b) DS_REGISTER_PIPELINE_CONCAT_INNER_(a, b)
// Usage in a model folder's spec.cc: DS_REGISTER_PIPELINE(MakeFluxPipelineSpec());
#define DS_REGISTER_PIPELINE(spec_expr)                                                  \
  static const ::ds::PipelineRegistrar DS_REGISTER_PIPELINE_CONCAT_(ds_pipeline_registrar_, \
                                                                    __LINE__)(spec_expr)

// Whether `path` is a folder holding a model_index.json (a diffusers pipeline folder).
bool IsPipelineFolder(const std::string& path);

// Reads `folder`/model_index.json's "_class_name", finds it in the PipelineRegistry and loads the
// folder with its factory. NOT_FOUND for a missing folder or model_index.json; INVALID_ARGUMENT for
// a model_index.json that is not a JSON object or lacks a string "_class_name"; UNIMPLEMENTED for
// an unregistered pipeline class (listing the registered ones); otherwise the factory's errors.
absl::StatusOr<std::unique_ptr<DiffusionPipeline>> LoadPipelineFromFolder(
    const std::string& folder, const PipelineLoadOptions& options);

}  // namespace ds
