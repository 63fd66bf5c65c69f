// THE one place that declares FluxTransformer2DModel: names, structural facts, wired capability
// handlers and the factory. Everything the metadata table shows is derived from this spec.
#include "models/flux/spec.h"

#include "absl/strings/str_cat.h"
#include "handlers/registry.h"
#include "handlers/status.h"
#include "models/flux/demo_weights.h"
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
  spec.structure.skip_layerwise_casting_patterns = SkipLayerwiseCastingPatterns();
  // The factory honours ModelOptions::storage_dtype (FluxTransformer::Create).
  spec.layerwise_casting = true;
  // The forward moves activations to each block's device (device maps, handlers/device_map.h).
  spec.device_map = true;
  // The forward enters each double and single block through a GroupOffloadSession
  // (FluxInputs::offload): the loaders honour ModelOptions::group_offloading.
  spec.group_offloading = true;
  // Capabilities wired (rows derived from the handlers): single-file loading and LoRA formats.
  spec.weight_mapping = &FluxWeightMappingHandler();
  spec.lora = &FluxLoraHandler();
  // The per-model IP-Adapter mixin (ip_adapter.h): wiring it is what makes the
  // `_supports_ip_adapter` row appear.
  spec.ip_adapter = &FluxIPAdapterHandler();
  // FirstBlockCache, implemented by the transformer's forward (FluxInputs::cache): wiring it is
  // what makes the `_supports_cache` row appear and pipelines accept `cache` requests.
  spec.cache = &FluxCacheHandler();
  spec.factory = [](const nlohmann::json& config, const ModelOptions& options) {
    return CreateFluxTransformer(config, options);
  };
  return spec;
}

DS_REGISTER_MODEL(MakeFluxSpec());

// flux-tiny: the server's embedded demo pipeline, trained by tools/train (train-flux-tiny) on
// synthetic scenes: one shape (circle, square, triangle, cross, star) in one of six pure colours on
// a background of another, captioned "a {colour} {shape} on a {colour} background". A
// FLUX.1-dev-architecture transformer (double- and single-stream blocks, guidance embedding), a
// FLUX-style AutoencoderKL (no quant convs; 3 levels: 32×32 RGB <-> 8×8×4 latents) and FLUX.1's
// two text encoders in miniature (a CLIPTextModel for the pooled vector, a gated-GELU
// T5EncoderModel for the sequence, each 32 wide as the transformer's pooled_projection_dim /
// joint_attention_dim) with tokenizers generated from the caption vocabulary, both limited to 16
// tokens (the captions' length; the pipeline pads T5 to at most the tokenizer's
// model_max_length). FLUX.1-dev's scheduler config.
//
// The recipe lists the architecture; the trained weights and the latent scaling/shift factors come
// from models/flux/demo/flux-tiny/, a diffusers pipeline folder the training tool writes (and that
// the build embeds, see demo_weights.h). FluxTinyDemoArchitecture() is the recipe without them
// (random weights), which is what the training tool starts from.

const std::vector<std::string>& FluxTinyShapes() {
  static const auto* kShapes =
      new std::vector<std::string>{"circle", "square", "triangle", "cross", "star"};
  return *kShapes;
}
const std::vector<std::string>& FluxTinyColours() {
  static const auto* kColours =
      new std::vector<std::string>{"red", "green", "blue", "yellow", "black", "white"};
  return *kColours;
}

std::string FluxTinyCaption(const std::string& colour, const std::string& shape,
                            const std::string& background) {
  return absl::StrCat("a ", colour, " ", shape, " on a ", background, " background");
}

namespace {

// Every caption of the vocabulary, one per line: the tokenizers' training text.
std::string FluxTinyCorpus() {
  std::string corpus;
  for (const std::string& shape : FluxTinyShapes()) {
    for (const std::string& colour : FluxTinyColours()) {
      for (const std::string& background : FluxTinyColours()) {
        if (background == colour) continue;
        absl::StrAppend(&corpus, FluxTinyCaption(colour, shape, background), "\n");
      }
    }
  }
  return corpus;
}

// Vocabulary sizes of the tokenizers (= the encoders' token-embedding rows). CLIP: 512 byte
// symbols + 50 merges (the caption words need 52) + 2 special tokens; T5: 32 SentencePiece pieces
// (at most 34 fit)
// + 100 sentinels.
constexpr int64_t kFluxTinyClipVocab = 564;
constexpr int64_t kFluxTinyT5Extra = 100;
constexpr int64_t kFluxTinyT5Vocab = 32 + kFluxTinyT5Extra;
constexpr int64_t kFluxTinyMaxTokens = 16;

}  // namespace

DemoPipelineRecipe FluxTinyDemoArchitecture() {
  DemoPipelineRecipe demo;
  demo.name = "flux-tiny";
  demo.pipeline_class = "FluxPipeline";
  demo.description =
      "SYNTHETIC DEMO, not FLUX.1: a tiny FLUX.1-dev-architecture pipeline trained from scratch "
      "on 32x32 synthetic scenes, 'a {colour} {shape} on a {colour} background' (shapes: circle, "
      "square, triangle, cross, star; colours: red, green, blue, yellow, black, white); "
      "transformer 2+2 blocks, 4 heads x 16; AutoencoderKL 3 levels, 4 latent channels; CLIP and "
      "T5 text encoders 2 layers x 32 wide";
  demo.seed = 2024;
  DemoComponent transformer;
  transformer.name = "transformer";
  transformer.class_name = "FluxTransformer2DModel";
  transformer.config = {
      {"patch_size", 1},          {"in_channels", 16},          {"out_channels", nullptr},
      {"num_layers", 2},          {"num_single_layers", 2},     {"attention_head_dim", 16},
      {"num_attention_heads", 4}, {"joint_attention_dim", 32},  {"pooled_projection_dim", 32},
      {"guidance_embeds", true},  {"axes_dims_rope", {4, 6, 6}}};
  transformer.single_file = "flux-tiny.safetensors";  // BFL naming
  DemoComponent vae;
  vae.name = "vae";
  vae.class_name = "AutoencoderKL";
  vae.config = {
      {"in_channels", 3},
      {"out_channels", 3},
      {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}},
      {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"}},
      {"block_out_channels", {16, 32, 32}},
      {"layers_per_block", 1},
      {"act_fn", "silu"},
      {"latent_channels", 4},
      {"norm_num_groups", 8},
      {"sample_size", 32},
      {"scaling_factor", 1.0},
      {"shift_factor", 0.0},
      {"latents_mean", nullptr},
      {"latents_std", nullptr},
      {"force_upcast", true},
      {"use_quant_conv", false},
      {"use_post_quant_conv", false},
      {"mid_block_add_attention", true}};
  vae.single_file = "ae.safetensors";  // BFL/LDM naming
  DemoComponent clip;
  clip.name = "text_encoder";
  clip.class_name = "CLIPTextModel";
  clip.library = "transformers";
  clip.config = {{"model_type", "clip_text_model"},
                 {"vocab_size", kFluxTinyClipVocab},
                 {"hidden_size", 32},  // = the transformer's pooled_projection_dim
                 {"intermediate_size", 64},
                 {"projection_dim", 32},
                 {"num_hidden_layers", 2},
                 {"num_attention_heads", 4},
                 {"max_position_embeddings", kFluxTinyMaxTokens},
                 {"hidden_act", "quick_gelu"},
                 {"layer_norm_eps", 1e-5},
                 {"attention_dropout", 0.0},
                 {"initializer_range", 0.02},
                 {"initializer_factor", 1.0},
                 {"pad_token_id", 1},
                 {"bos_token_id", kFluxTinyClipVocab - 2},  // <|startoftext|>
                 {"eos_token_id", kFluxTinyClipVocab - 1},  // <|endoftext|>
                 {"torch_dtype", "float32"}};
  DemoComponent t5;
  t5.name = "text_encoder_2";
  t5.class_name = "T5EncoderModel";
  t5.library = "transformers";
  t5.config = {{"model_type", "t5"},
               {"vocab_size", kFluxTinyT5Vocab},
               {"d_model", 32},  // = the transformer's joint_attention_dim
               {"d_kv", 8},
               {"d_ff", 64},
               {"num_layers", 2},
               {"num_decoder_layers", 2},
               {"num_heads", 4},
               {"relative_attention_num_buckets", 32},
               {"relative_attention_max_distance", 128},
               {"dropout_rate", 0.0},
               {"layer_norm_epsilon", 1e-6},
               {"initializer_factor", 1.0},
               {"feed_forward_proj", "gated-gelu"},
               {"dense_act_fn", "gelu_new"},
               {"is_gated_act", true},
               {"is_encoder_decoder", true},
               {"tie_word_embeddings", false},
               {"pad_token_id", 0},
               {"eos_token_id", 1},
               {"decoder_start_token_id", 0},
               {"torch_dtype", "float32"}};
  demo.components = {transformer, vae, clip, t5};
  DemoTokenizer clip_tokenizer;
  clip_tokenizer.name = "tokenizer";
  clip_tokenizer.kind = DemoTokenizerKind::kClipBpe;
  clip_tokenizer.vocab_size = kFluxTinyClipVocab;
  clip_tokenizer.model_max_length = kFluxTinyMaxTokens;
  clip_tokenizer.encoder = "text_encoder";
  clip_tokenizer.corpus = FluxTinyCorpus();
  DemoTokenizer t5_tokenizer;
  t5_tokenizer.name = "tokenizer_2";
  t5_tokenizer.kind = DemoTokenizerKind::kT5SentencePiece;
  t5_tokenizer.vocab_size = kFluxTinyT5Vocab;
  t5_tokenizer.extra_ids = kFluxTinyT5Extra;
  t5_tokenizer.model_max_length = kFluxTinyMaxTokens;
  t5_tokenizer.encoder = "text_encoder_2";
  t5_tokenizer.corpus = FluxTinyCorpus();
  demo.tokenizers = {clip_tokenizer, t5_tokenizer};
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
  // Stand-ins for the text encoders' outputs (16 tokens of T5 width, CLIP's pooled width), for
  // requests that bring their own embeddings.
  demo.example_inputs = {{"prompt_embeds", {kFluxTinyMaxTokens, 32}},
                         {"pooled_prompt_embeds", {32}}};
  demo.absent_components = {"image_encoder", "feature_extractor"};
  demo.prompt_template = "a {colour} {shape} on a {background} background";
  demo.vocabulary = {"a", "on", "background"};
  for (const std::string& w : FluxTinyShapes()) demo.vocabulary.push_back(w);
  for (const std::string& w : FluxTinyColours()) demo.vocabulary.push_back(w);
  return demo;
}

DemoPipelineRecipe FluxTinyDemo() {
  DemoPipelineRecipe demo = FluxTinyDemoArchitecture();
  const FluxTinyEmbeddedFiles& files = FluxTinyEmbedded();
  for (DemoComponent& c : demo.components) {
    if (c.name == "transformer") c.weights = files.transformer;
    if (c.name == "text_encoder") c.weights = files.text_encoder;
    if (c.name == "text_encoder_2") c.weights = files.text_encoder_2;
    if (c.name == "vae") {
      c.weights = files.vae;
      // The latent statistics training measured (FluxTinyDemoArchitecture has 1 and 0).
      const nlohmann::json vae_config = nlohmann::json::parse(files.vae_config, nullptr, false);
      for (const char* key : {"scaling_factor", "shift_factor"}) {
        if (vae_config.is_object() && vae_config.contains(key)) c.config[key] = vae_config[key];
      }
    }
  }
  return demo;
}

PipelineSpec MakeFluxPipelineSpec() {
  PipelineSpec spec;
  spec.class_name = "FluxPipeline";
  spec.description =
      "FLUX.1 text-to-image (flow-matching Euler; transformer + AutoencoderKL; prompt embeddings)";
  spec.from_pretrained =
      [](const std::string& folder,
         const PipelineLoadOptions& options) -> absl::StatusOr<std::unique_ptr<DiffusionPipeline>> {
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
