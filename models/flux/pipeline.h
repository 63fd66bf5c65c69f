// FluxPipeline: text-to-image generation with a Flux transformer, exactly as diffusers'
// FluxPipeline.__call__ (pipeline_flux.py, main at 58eb52c) runs it from text prompts or prompt
// embeddings:
//
//   1. check inputs; height and width must be multiples of 2 * vae_scale_factor (diffusers warns
//      and rounds down; we refuse with INVALID_ARGUMENT naming the nearest valid sizes);
//   2. text prompts (encode_prompt): pooled_prompt_embeds = text_encoder(tokenizer(prompt,
//      padding max_length = tokenizer.model_max_length (77), truncation)).pooler_output;
//      prompt_embeds = text_encoder_2(tokenizer_2(prompt_2 (default prompt), padding max_length =
//      min(max_sequence_length, tokenizer_2.model_max_length), truncation)) last hidden state
//      (FLUX.1's T5 tokenizer allows 512, the limit, so this is diffusers' max_sequence_length;
//      a smaller model such as the synthetic flux-tiny demo, trained on 16 tokens, never gets
//      longer sequences), with NO attention mask (as FluxPipeline); negative prompts likewise, only when true CFG runs. Each prompt is encoded
//      on its own (batch 1), so a cached encoding is bit-identical to a fresh one; encodings are
//      kept in a bounded LRU (PipelineOptions::prompt_cache_entries);
//      embeddings to the transformer's dtype and device; text ids zeros [L, 3];
//   3. latents: the given noise, or seeded Gaussian noise [B, C, 2(H/2s), 2(W/2s)] (B = prompts x
//      num_images_per_prompt, C = in_channels / 4), packed 2x2 into [B, N, 4C]; image ids;
//   4. sigmas linspace(1, 1/N, N) (or the caller's), mu = calculate_shift(N tokens),
//      scheduler.set_timesteps(sigmas, mu);
//   5. guidance = full([1], guidance_scale, float32).expand(B) only when the transformer has
//      guidance_embeds (otherwise accepted, ignored and reported as not applied, as diffusers
//      ignores it);
//   5b. IP-Adapter image prompts (request.ip_adapters, adapters loaded with LoadIPAdapter):
//      image_embeds = image_encoder(feature_extractor(image)).image_embeds once per request
//      (or the caller's image_embeds), passed to every step with each adapter's scale; for true
//      CFG the negative pass gets negative_image (default: a black image, as diffusers);
//   6. per step: timestep = t.expand(B).to(dtype) / 1000; v = transformer(...); with true CFG
//      (true_cfg_scale > 1 and negative embeddings) v = v_neg + true_cfg_scale * (v - v_neg);
//      latents = scheduler.step(v, t, latents);
//   7. unpack, z = latents / scaling_factor + shift_factor, image = vae.decode(z),
//      postprocess to [0, 1] (VaeImageProcessor "pt"), PNG on request.
//
// Components: the transformer (held by a LoraHost so requests apply adapter stacks unfused), the
// VAE (reached only through handlers/image_decoder.h's LatentImageDecoder), the CLIP and T5 text
// encoders (reached only through handlers/text_encoder.h's TextEncoder: this folder never includes
// another model folder) with their tokenizers (handlers/tokenizers), and the scheduler config (a
// value). Without the text encoders (or with load_text_encoders = false, as
// FluxPipeline.from_pretrained(text_encoder=None, ...)) requests carry prompt embeddings.
// Components are shared_ptrs, so pipelines can share identical ones (pass them in
// FluxPipelineLoadOptions or FluxPipelineComponents).
//
// Thread-safety: a FluxPipeline is immutable after creation apart from its prompt cache and its
// IP-Adapter store, which are internally synchronized (a request holds the adapters it started
// with); Generate() may run concurrently from many threads (each call builds
// its own scheduler; the transformer, VAE, tokenizers and text encoders are only read). Adapter
// loading/fusing on the shared LoraHost is safe meanwhile (see lora_host.h).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/flow_match.h"
#include "handlers/flow_match_scheduler.h"
#include "handlers/image_decoder.h"
#include "handlers/image_encoder.h"
#include "handlers/image_processing.h"
#include "handlers/lora_host.h"
#include "handlers/model.h"
#include "handlers/pipeline.h"
#include "handlers/prompt_cache.h"
#include "handlers/text_encoder.h"
#include "handlers/tokenizers/tokenizer.h"
#include "models/flux/config.h"
#include "models/flux/ip_adapter.h"

namespace ds::flux {

// Limits a pipeline enforces on requests (handlers/pipeline.h).
using FluxPipelineOptions = PipelineOptions;

// What a pipeline is built from.
struct FluxPipelineComponents {
  // Required: the transformer (a FluxTransformer2DModel) with its adapter store.
  std::shared_ptr<LoraHost> transformer;
  // Optional: the VAE. Null: Generate returns latents only (decode requests are
  // FAILED_PRECONDITION) and the latent geometry uses FluxPipeline's default vae_scale_factor 8.
  std::shared_ptr<const LatentImageDecoder> vae;
  // Optional, each encoder with its tokenizer (both or neither): the CLIP text encoder whose
  // pooled output is pooled_prompt_embeds (CLIPTextModel's pooler_output; width
  // pooled_projection_dim) and the T5 encoder whose last hidden state is prompt_embeds (width
  // joint_attention_dim). Text prompts need all four.
  std::shared_ptr<const tokenizers::Tokenizer> tokenizer;
  std::shared_ptr<const TextEncoder> text_encoder;
  std::shared_ptr<const tokenizers::Tokenizer> tokenizer_2;
  std::shared_ptr<const TextEncoder> text_encoder_2;
  FlowMatchEulerConfig scheduler;
  // Optional: the image encoder IP-Adapters use by default (model_index.json's `image_encoder`,
  // e.g. CLIPVisionModelWithProjection, reached through handlers/image_encoder.h) and its
  // preprocessing (`feature_extractor/preprocessor_config.json`; unset: CLIPImageProcessor sized
  // to the encoder, as diffusers' load_ip_adapter builds it).
  std::shared_ptr<const ImageEncoder> image_encoder;
  std::optional<ClipImageProcessorConfig> feature_extractor;
  // Components listed by the source but not loaded: name -> why (e.g. "image_encoder" ->
  // "CLIPVisionModelWithProjection (transformers): this component is not supported yet").
  std::map<std::string, std::string> not_loaded;
  // Where each loaded component came from (name -> folder or file), for reports.
  std::map<std::string, std::string> sources;
  // "flux-dev" / "flux-schnell" / ...: from single-file detection, or derived from the
  // transformer config for folders (guidance_embeds: "flux-dev", otherwise "flux-schnell").
  std::string variant;
};

// How to assemble a pipeline from files.
struct FluxPipelineLoadOptions {
  ModelOptions model;  // dtype and device of the transformer and the VAE
  FluxPipelineOptions pipeline;
  LoraHostOptions lora;  // the transformer's adapter store (when it is loaded here)
  // Components to use instead of loading them (sharing between pipelines). When set, the source's
  // entry for that component is not read.
  std::shared_ptr<LoraHost> transformer;
  std::shared_ptr<const LatentImageDecoder> vae;
  std::shared_ptr<const tokenizers::Tokenizer> tokenizer;
  std::shared_ptr<const TextEncoder> text_encoder;
  std::shared_ptr<const tokenizers::Tokenizer> tokenizer_2;
  std::shared_ptr<const TextEncoder> text_encoder_2;
  // false: the source's text encoders and tokenizers are not loaded (reported in not_loaded(), as
  // from_pretrained(text_encoder=None, tokenizer=None, ...)); requests then carry embeddings.
  // Shared components given above are used either way.
  bool load_text_encoders = true;
  // Overrides: a VAE folder (diffusers) or single file (diffusers or BFL/LDM naming), and a
  // scheduler_config.json file or a folder holding one. Empty: from the source.
  std::string vae_path;
  std::string scheduler_config_path;
};

// The single files of FluxPipeline::FromSingleFiles.
struct FluxSingleFiles {
  // Required: the transformer checkpoint (BFL or diffusers naming; ComfyUI prefixes resolved),
  // loaded by the shared single-file loader as FluxTransformer2DModel.
  std::string transformer;
  // Config fields the weights do not record (e.g. {"axes_dims_rope": [...]} for head dims other
  // than 128); null or an object.
  nlohmann::json transformer_config_override;
  // Optional: the VAE (ae.safetensors, BFL/LDM or diffusers naming) or a diffusers VAE folder.
  // Empty: no VAE (latents only), unless FluxPipelineLoadOptions::vae(_path) gives one.
  std::string vae;
  // Config fields a VAE single file does not record (e.g. {"norm_num_groups": 32},
  // "scaling_factor"); null or an object. Ignored for a VAE folder.
  nlohmann::json vae_config_override;
  // Optional scheduler_config.json (file or folder). Empty: FLUX.1-dev's config for guidance-
  // distilled variants (dev, fill, depth), FLUX.1-schnell's otherwise.
  std::string scheduler_config;
  // Optional text encoders: a single file (transformers naming, bare or under ComfyUI's /
  // SD's component prefixes, e.g. clip_l.safetensors, t5xxl_fp16.safetensors) loaded as
  // CLIPTextModel / T5EncoderModel, or a transformers folder; with config fields the weights do
  // not record (null or an object). Each needs its tokenizer folder (tokenizer/ with vocab.json +
  // merges.txt; tokenizer_2/ with spiece.model). Empty: none (unless given in the load options).
  std::string text_encoder;
  nlohmann::json text_encoder_config_override;
  std::string tokenizer;
  std::string text_encoder_2;
  nlohmann::json text_encoder_2_config_override;
  std::string tokenizer_2;
};

// One generation request (FluxPipeline.__call__'s arguments) and its result: the model-agnostic
// types of handlers/pipeline.h. For Flux, `latents` (the noise) is [B, in_channels / 4,
// 2(H/2s), 2(W/2s)] and `on_latents` sees packed latents [B, tokens, in_channels].
using FluxPipelineRequest = PipelineRequest;
using FluxPipelineResult = PipelineResult;

class FluxPipeline : public DiffusionPipeline {
 public:
  // Validates and assembles: INVALID_ARGUMENT when the transformer is missing or not a
  // FluxTransformer2DModel, when its in_channels is not 4 x the VAE's latent_channels (a Fill or
  // Depth transformer needs its own pipeline), when a text encoder comes without its tokenizer (or
  // the reverse) or text_encoder_2's hidden_size is not joint_attention_dim, or for a bad
  // scheduler config or options (naming the field); UNIMPLEMENTED for scheduler settings the
  // scheduler does not implement.
  static absl::StatusOr<std::unique_ptr<FluxPipeline>> Create(
      FluxPipelineComponents components, const FluxPipelineOptions& options = {});

  // FluxPipeline.from_pretrained(folder): reads model_index.json (every non-"_" key is a component
  // [library, class] or [null, null]); loads `transformer/` (its class looked up in the registry,
  // must be FluxTransformer2DModel) with the registry's LoRA handler for it, `vae/` through the
  // registry by its class name (must implement LatentImageDecoder), and
  // `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler), `text_encoder/` and
  // `text_encoder_2/` through the registry by their class names (must implement TextEncoder) and
  // `tokenizer/`, `tokenizer_2/` with tokenizers::LoadTokenizerFromFolder (unless
  // load_text_encoders is false). Components listed as null are absent; other listed components
  // (image_encoder, feature_extractor, ...) are reported in not_loaded().
  // A missing or null vae / scheduler entry: no VAE / the variant's default scheduler config.
  // NOT_FOUND for a missing folder, model_index.json or component subfolder (named);
  // INVALID_ARGUMENT for malformed model_index.json (naming the key), a component whose class is
  // not what the pipeline needs (naming it), or load errors of the components (annotated with the
  // component); UNIMPLEMENTED for a "_class_name" other than FluxPipeline or an unknown scheduler
  // class.
  static absl::StatusOr<std::unique_ptr<FluxPipeline>> FromPretrained(
      const std::string& folder, const FluxPipelineLoadOptions& options = {});

  // Assembles a pipeline from one file per component (see FluxSingleFiles). Errors of the
  // single-file loader annotated with the component; otherwise as Create.
  static absl::StatusOr<std::unique_ptr<FluxPipeline>> FromSingleFiles(
      const FluxSingleFiles& files, const FluxPipelineLoadOptions& options = {});

  // Runs the request (see the file comment). `on_step` (may be empty) is called with (0, N) before
  // the first step and (i, N) after step i; a non-OK status from it stops the run and is returned
  // unchanged (cancellation, deadlines). `on_latents` (may be empty) sees the packed latents after
  // each step.
  // INVALID_ARGUMENT naming the field: prompt together with prompt_embeds (or negative_prompt with
  // negative_prompt_embeds), prompt_2 without prompt or of another count, negative_prompt(_2)
  // counts other than 1 or the prompts', max_sequence_length outside [1, 512], text that is not
  // UTF-8; FAILED_PRECONDITION for text prompts on a pipeline without its text encoders and
  // tokenizers (naming the missing ones); INVALID_ARGUMENT naming the field:
  // embeddings missing, not floating, of the wrong rank, batch
  // or width (naming joint_attention_dim / pooled_projection_dim), only one of the negative pair, a
  // size ValidateImageSize rejects (with the nearest valid sizes) or over max_image_side,
  // num_images_per_prompt < 1 or a batch over max_batch, steps (or sigmas) outside
  // [1, max_inference_steps], non-finite guidance_scale / true_cfg_scale / sigmas, given latents of
  // the wrong shape (naming the expected one), png without decode; FAILED_PRECONDITION for decode
  // without a VAE; ABORTED for a stale adapter snapshot; INTERNAL if LibTorch fails. A `cache`
  // config is checked by ValidateBlockCacheConfig (INVALID_ARGUMENT naming cache.type /
  // cache.threshold / the TaylorSeer field; UNIMPLEMENTED for a type the transformer does not
  // implement); the cache then runs with one state for the conditional and one for the true-CFG
  // negative pass, each told the denoising step index before its forward (TaylorSeer's schedule).
  absl::StatusOr<FluxPipelineResult> Generate(
      const FluxPipelineRequest& request, const DenoiseStepCallback& on_step = {},
      const DenoiseLatentsObserver& on_latents = {}) const override;

  // "FluxPipeline".
  const std::string& class_name() const override;
  LoraHost& transformer_host() const override { return *components_.transformer; }
  // Defaults: FluxPipeline's (128 * vae_scale_factor pixels, 28 steps, guidance 3.5).
  PipelineLimits limits() const override;
  PipelineDescription describe() const override;
  PromptCacheStats prompt_cache_stats() const override { return prompt_cache_->stats(); }

  // IP-Adapters (models/flux/ip_adapter.h), see handlers/pipeline.h. The adapter is loaded in the
  // transformer's dtype and on its device, checked against its config (an adapter for another
  // width is INVALID_ARGUMENT naming the key and shapes); the image encoder comes from
  // `options.image_encoder_path` (a folder loaded through the registry, which must implement
  // ImageEncoder; folders are shared between adapters while loaded), else the pipeline's
  // `image_encoder` component, else none. INVALID_ARGUMENT when the encoder's image_embed_dim is
  // not the adapter's.
  absl::StatusOr<IPAdapterInfo> LoadIPAdapter(const std::string& name, const std::string& path,
                                              const IPAdapterLoadOptions& options) const override;
  absl::Status UnloadIPAdapter(const std::string& name) const override;
  std::vector<IPAdapterInfo> ListIPAdapters() const override;

  // Text prompts as diffusers' FluxPipeline.encode_prompt computes them (see the file comment):
  // prompt_embeds [P, max_sequence_length, joint_attention_dim] and pooled_prompt_embeds
  // [P, pooled_projection_dim] in the encoders' dtype and device, through the prompt cache;
  // truncations, warnings, cache counters and encode_seconds are added to `report` (may be null).
  // `field` names the prompts in errors and reports ("prompt" or "negative_prompt"). Errors as
  // Generate's for the text fields.
  using EncodedPrompts = PromptEncoding;
  absl::StatusOr<PromptEncoding> EncodePrompt(const std::vector<std::string>& prompt,
                                              const std::vector<std::string>& prompt_2,
                                              int64_t max_sequence_length,
                                              const std::string& field = "prompt",
                                              PipelineResult* report = nullptr) const override;

  const FluxPipelineComponents& components() const { return components_; }
  const FluxConfig& transformer_config() const { return transformer_config_; }
  const std::map<std::string, std::string>& not_loaded() const { return components_.not_loaded; }
  const std::string& variant() const { return components_.variant; }
  const FluxPipelineOptions& options() const { return options_; }
  // 2 ** (levels - 1) of the VAE (8 without a VAE, as FluxPipeline).
  int64_t vae_scale_factor() const { return vae_scale_factor_; }
  // Latent channels the transformer works in: in_channels / 4.
  int64_t num_channels_latents() const { return transformer_config_.in_channels / 4; }

 private:
  FluxPipeline(FluxPipelineComponents components, FluxConfig config,
               const FluxPipelineOptions& options, int64_t vae_scale_factor)
      : components_(std::move(components)),
        transformer_config_(std::move(config)),
        options_(options),
        vae_scale_factor_(vae_scale_factor),
        prompt_cache_(std::make_unique<PromptEmbeddingCache>(options.prompt_cache_entries,
                                                             options.prompt_cache_max_bytes)) {}

  // One prompt through one tokenizer + encoder (or the cache): the pooled output [D] when
  // `pooled`, else the last hidden state [L, D].
  absl::StatusOr<CachedPromptEncoding> EncodeOne(const std::string& component,
                                                 const tokenizers::Tokenizer& tokenizer,
                                                 const TextEncoder& encoder,
                                                 const std::string& text, int64_t max_length,
                                                 bool pooled, PipelineResult* report) const;

  // The IP-Adapter conditioning of a request (positive or, for true CFG, negative), with
  // diffusers' prepare_ip_adapter_image_embeds semantics; INVALID_ARGUMENT / NOT_FOUND /
  // FAILED_PRECONDITION naming `ip_adapters[i]` and the field. Adds image-encoding time to
  // `report`.
  struct IPAdapterEntry {
    FluxIPAdapterPtr adapter;
    std::shared_ptr<const ImageEncoder> encoder;  // may be null: image_embeds only
    ClipImageProcessorConfig processor;
    IPAdapterInfo info;
  };
  absl::StatusOr<FluxIPAdapterConditioning> PrepareIPAdapters(const PipelineRequest& request,
                                                              int64_t height, int64_t width,
                                                              int64_t batch, bool negative,
                                                              PipelineResult* report) const;

  FluxPipelineComponents components_;
  FluxConfig transformer_config_;
  FluxPipelineOptions options_;
  int64_t vae_scale_factor_;
  std::unique_ptr<PromptEmbeddingCache> prompt_cache_;  // never null

  mutable std::mutex ip_mu_;
  mutable std::map<std::string, std::shared_ptr<const IPAdapterEntry>> ip_adapters_;  // guarded by ip_mu_
  // Image encoders loaded by LoadIPAdapter, by folder, while some adapter uses them.
  mutable std::map<std::string, std::weak_ptr<const ImageEncoder>> image_encoders_;  // guarded by ip_mu_
};

}  // namespace ds::flux
