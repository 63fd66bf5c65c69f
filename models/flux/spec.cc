// THE one place that declares FluxTransformer2DModel: names, structural facts, wired capability
// handlers and the factory. Everything the metadata table shows is derived from this spec.
#include "models/flux/spec.h"

#include "handlers/registry.h"
#include "handlers/status.h"
#include "models/flux/ip_adapter.h"
#include "models/flux/lora.h"
#include "models/flux/pipeline.h"
#include "models/flux/transformer.h"
#include "models/flux/weight_mapping.h"

namespace ds::flux {

ModelSpec MakeFluxSpec() {
  ModelSpec spec;
  spec.name = "flux";
  spec.class_name = "FluxTransformer2DModel";
  spec.aliases = {"flux-transformer", "FluxTransformer"};
  spec.description = "FLUX.1 rectified-flow transformer (double- and single-stream MMDiT blocks)";
  const std::vector<std::string> blocks = {ModuleClassName<FluxTransformerBlockImpl>(),
                                           ModuleClassName<FluxSingleTransformerBlockImpl>()};
  spec.structure.no_split_modules = blocks;
  spec.structure.repeated_blocks = blocks;
  // Module-name substrings whose weights stay in the compute dtype under layerwise casting.
  spec.structure.skip_layerwise_casting_patterns = {"pos_embed", "norm"};
  // Capabilities wired (rows derived from the handlers): single-file loading and LoRA formats.
  spec.weight_mapping = &FluxWeightMappingHandler();
  spec.lora = &FluxLoraHandler();
  // The per-model IP-Adapter mixin (ip_adapter.h): wiring it is what makes the
  // `_supports_ip_adapter` row appear.
  spec.ip_adapter = &FluxIPAdapterHandler();
  spec.factory = [](const nlohmann::json& config, const ModelOptions& options) {
    return CreateFluxTransformer(config, options);
  };
  return spec;
}

DS_REGISTER_MODEL(MakeFluxSpec());

// flux-tiny: the server's embedded demo pipeline. A FLUX.1-dev-architecture transformer (double-
// and single-stream blocks, guidance embedding) and a FLUX-style AutoencoderKL (no quant convs,
// scaling/shift factors of FLUX.1) small enough to generate a 256x256 image in about a second on a
// CPU, with FLUX.1-dev's scheduler config. Random weights: its images are noise.
DemoPipelineRecipe FluxTinyDemo() {
  DemoPipelineRecipe demo;
  demo.name = "flux-tiny";
  demo.pipeline_class = "FluxPipeline";
  demo.description =
      "tiny FLUX.1-dev-architecture pipeline with random weights (images are noise): transformer "
      "1+1 blocks, 2 heads x 16; AutoencoderKL 2 levels, 4 latent channels; prompt embeddings";
  demo.seed = 2024;
  DemoComponent transformer;
  transformer.name = "transformer";
  transformer.class_name = "FluxTransformer2DModel";
  transformer.config = {{"patch_size", 1},          {"in_channels", 16},
                        {"out_channels", nullptr},  {"num_layers", 1},
                        {"num_single_layers", 1},   {"attention_head_dim", 16},
                        {"num_attention_heads", 2}, {"joint_attention_dim", 32},
                        {"pooled_projection_dim", 32}, {"guidance_embeds", true},
                        {"axes_dims_rope", {4, 6, 6}}};
  transformer.single_file = "flux-tiny.safetensors";  // BFL naming
  DemoComponent vae;
  vae.name = "vae";
  vae.class_name = "AutoencoderKL";
  vae.config = {{"in_channels", 3},
                {"out_channels", 3},
                {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
                {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
                {"block_out_channels", {16, 32}},
                {"layers_per_block", 1},
                {"act_fn", "silu"},
                {"latent_channels", 4},
                {"norm_num_groups", 8},
                {"sample_size", 64},
                {"scaling_factor", 0.3611},
                {"shift_factor", 0.1159},
                {"latents_mean", nullptr},
                {"latents_std", nullptr},
                {"force_upcast", true},
                {"use_quant_conv", false},
                {"use_post_quant_conv", false},
                {"mid_block_add_attention", true}};
  vae.single_file = "ae.safetensors";  // BFL/LDM naming
  demo.components = {transformer, vae};
  demo.scheduler_config = {{"_class_name", "FlowMatchEulerDiscreteScheduler"},
                           {"base_image_seq_len", 256},
                           {"base_shift", 0.5},
                           {"invert_sigmas", false},
                           {"max_image_seq_len", 4096},
                           {"max_shift", 1.15},
                           {"num_train_timesteps", 1000},
                           {"shift", 3.0},
                           {"shift_terminal", nullptr},
                           {"stochastic_sampling", false},
                           {"time_shift_type", "exponential"},
                           {"use_beta_sigmas", false},
                           {"use_dynamic_shifting", true},
                           {"use_exponential_sigmas", false},
                           {"use_karras_sigmas", false}};
  // Stand-ins for the text encoders' outputs (8 tokens of T5 width, CLIP's pooled width).
  demo.example_inputs = {{"prompt_embeds", {8, 32}}, {"pooled_prompt_embeds", {32}}};
  demo.absent_components = {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                            "image_encoder", "feature_extractor"};
  return demo;
}

PipelineSpec MakeFluxPipelineSpec() {
  PipelineSpec spec;
  spec.class_name = "FluxPipeline";
  spec.description =
      "FLUX.1 text-to-image (flow-matching Euler; transformer + AutoencoderKL; prompt embeddings)";
  spec.from_pretrained = [](const std::string& folder, const PipelineLoadOptions& options)
      -> absl::StatusOr<std::unique_ptr<DiffusionPipeline>> {
    FluxPipelineLoadOptions flux_options;
    flux_options.model = options.model;
    flux_options.pipeline = options.pipeline;
    flux_options.lora = options.lora;
    ASSIGN_OR_RETURN(std::unique_ptr<FluxPipeline> pipeline,
                     FluxPipeline::FromPretrained(folder, flux_options));
    return std::unique_ptr<DiffusionPipeline>(std::move(pipeline));
  };
  spec.demos = {FluxTinyDemo()};
  return spec;
}

DS_REGISTER_PIPELINE(MakeFluxPipelineSpec());

}  // namespace ds::flux
