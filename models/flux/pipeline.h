// FluxPipeline: text-to-image generation with a Flux transformer, exactly as diffusers'
// FluxPipeline.__call__ (pipeline_flux.py, main at 58eb52c) runs it when given prompt embeddings:
//
//   1. check inputs; height and width must be multiples of 2 * vae_scale_factor (diffusers warns
//   and
//      rounds down; we refuse with INVALID_ARGUMENT naming the nearest valid sizes);
//   2. embeddings to the transformer's dtype and device; text ids zeros [L, 3];
//   3. latents: the given noise, or seeded Gaussian noise [B, C, 2(H/2s), 2(W/2s)] (B = prompts x
//      num_images_per_prompt, C = in_channels / 4), packed 2x2 into [B, N, 4C]; image ids;
//   4. sigmas linspace(1, 1/N, N) (or the caller's), mu = calculate_shift(N tokens),
//      scheduler.set_timesteps(sigmas, mu);
//   5. guidance = full([1], guidance_scale, float32).expand(B) only when the transformer has
//      guidance_embeds (otherwise accepted, ignored and reported as not applied, as diffusers
//      ignores it);
//   6. per step: timestep = t.expand(B).to(dtype) / 1000; v = transformer(...); with true CFG
//      (true_cfg_scale > 1 and negative embeddings) v = v_neg + true_cfg_scale * (v - v_neg);
//      latents = scheduler.step(v, t, latents);
//   7. unpack, z = latents / scaling_factor + shift_factor, image = vae.decode(z),
//      postprocess to [0, 1] (VaeImageProcessor "pt"), PNG on request.
//
// Components: the transformer (held by a LoraHost so requests apply adapter stacks unfused), the
// VAE (reached only through handlers/image_decoder.h's LatentImageDecoder: this folder never
// includes another model folder) and the scheduler config (a value). Text encoders and tokenizers
// are not supported yet: a pipeline folder that lists them loads without them (reported in
// not_loaded(), as FluxPipeline.from_pretrained(text_encoder=None, ...) does) and requests carry
// prompt embeddings. Components are shared_ptrs, so pipelines can share identical ones (pass them
// in FluxPipelineLoadOptions or FluxPipelineComponents).
//
// Thread-safety: a FluxPipeline is immutable after creation; Generate() may run concurrently from
// many threads (each call builds its own scheduler; the transformer and VAE are only read).
// Adapter loading/fusing on the shared LoraHost is safe meanwhile (see lora_host.h).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/flow_match.h"
#include "handlers/flow_match_scheduler.h"
#include "handlers/image_decoder.h"
#include "handlers/lora_host.h"
#include "handlers/model.h"
#include "handlers/pipeline.h"
#include "models/flux/config.h"

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
  FlowMatchEulerConfig scheduler;
  // Components listed by the source but not loaded: name -> why (e.g. "text_encoder" ->
  // "CLIPTextModel (transformers): text encoders are not supported yet; requests carry
  // prompt_embeds").
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
  // Depth transformer needs its own pipeline), or for a bad scheduler config or options (naming the
  // field); UNIMPLEMENTED for scheduler settings the scheduler does not implement.
  static absl::StatusOr<std::unique_ptr<FluxPipeline>> Create(
      FluxPipelineComponents components, const FluxPipelineOptions& options = {});

  // FluxPipeline.from_pretrained(folder): reads model_index.json (every non-"_" key is a component
  // [library, class] or [null, null]); loads `transformer/` (its class looked up in the registry,
  // must be FluxTransformer2DModel) with the registry's LoRA handler for it, `vae/` through the
  // registry by its class name (must implement LatentImageDecoder), and
  // `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler). Components listed as null
  // are absent; text encoders, tokenizers and other listed components are reported in not_loaded().
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
  // INVALID_ARGUMENT naming the field: embeddings missing, not floating, of the wrong rank, batch
  // or width (naming joint_attention_dim / pooled_projection_dim), only one of the negative pair, a
  // size ValidateImageSize rejects (with the nearest valid sizes) or over max_image_side,
  // num_images_per_prompt < 1 or a batch over max_batch, steps (or sigmas) outside
  // [1, max_inference_steps], non-finite guidance_scale / true_cfg_scale / sigmas, given latents of
  // the wrong shape (naming the expected one), png without decode; FAILED_PRECONDITION for decode
  // without a VAE; ABORTED for a stale adapter snapshot; INTERNAL if LibTorch fails.
  absl::StatusOr<FluxPipelineResult> Generate(
      const FluxPipelineRequest& request, const DenoiseStepCallback& on_step = {},
      const DenoiseLatentsObserver& on_latents = {}) const override;

  // "FluxPipeline".
  const std::string& class_name() const override;
  LoraHost& transformer_host() const override { return *components_.transformer; }
  // Defaults: FluxPipeline's (128 * vae_scale_factor pixels, 28 steps, guidance 3.5).
  PipelineLimits limits() const override;
  PipelineDescription describe() const override;

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
        vae_scale_factor_(vae_scale_factor) {}

  FluxPipelineComponents components_;
  FluxConfig transformer_config_;
  FluxPipelineOptions options_;
  int64_t vae_scale_factor_;
};

}  // namespace ds::flux
