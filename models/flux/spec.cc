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

// flux-tiny: the server's embedded demo pipeline. A FLUX.1-dev-architecture transformer (double-
// and single-stream blocks, guidance embedding), a FLUX-style AutoencoderKL (no quant convs,
// scaling/shift factors of FLUX.1) and FLUX.1's two text encoders in miniature (a CLIPTextModel
// for the pooled vector, a gated-GELU T5EncoderModel for the sequence, each 32 wide as the
// transformer's pooled_projection_dim / joint_attention_dim) with tokenizers generated from the
// corpus below (a CLIP BPE vocabulary, a unigram SentencePiece model), small enough to generate
// a 256x256 image from a text prompt in about a second on a CPU, with FLUX.1-dev's scheduler
// config. Random weights: its images are noise.

// Training text of the demo tokenizers: varied English prompt-like sentences (~3.6 KB; a few
// capitalized, punctuated ones so that SentencePiece covers those characters too).
constexpr char kFluxTinyCorpus[] =
    "a photo of a cat sitting on a windowsill in the morning sun\n"
    "a painting of a red fox running across a snowy field\n"
    "an old lighthouse on a rocky coast under a stormy sky\n"
    "a bowl of ripe oranges and green apples on a wooden table\n"
    "a portrait of a young woman with curly hair, soft studio light\n"
    "a watercolor sketch of a quiet harbor with small fishing boats\n"
    "a futuristic city at night, neon signs reflected in wet streets\n"
    "a mountain lake surrounded by pine trees at sunrise\n"
    "a close-up of a honeybee collecting pollen from a purple flower\n"
    "an astronaut floating above the earth, highly detailed, 4k\n"
    "a cozy kitchen with copper pots hanging over the stove\n"
    "a child flying a yellow kite on a windy beach\n"
    "a black and white photograph of a busy train station in 1950\n"
    "a dragon sleeping on a pile of gold coins inside a cave\n"
    "a bicycle leaning against a brick wall covered in ivy\n"
    "a cup of hot chocolate with marshmallows next to a knitted scarf\n"
    "an oil painting of sunflowers in a blue vase\n"
    "a narrow street in an italian village with laundry hanging between the houses\n"
    "a herd of elephants walking through the savanna at dusk\n"
    "a robot reading a book in a library full of tall shelves\n"
    "a glass of lemonade with ice cubes on a sunny porch\n"
    "a misty forest path covered with autumn leaves\n"
    "a sailboat on calm water, pastel colors, minimalist style\n"
    "a steaming bowl of noodle soup with chopsticks, food photography\n"
    "a knight in shining armor standing in front of a castle gate\n"
    "a snowy owl perched on a fence post in winter\n"
    "a vintage car parked outside a small diner on route 66\n"
    "a map of an imaginary island drawn in ink on old paper\n"
    "a field of tulips in the netherlands with a windmill in the distance\n"
    "a hot air balloon drifting over green hills and rivers\n"
    "the quick brown fox jumps over the lazy dog\n"
    "she said it's going to rain, so we'll stay inside and paint\n"
    "they've built a tiny house out of recycled wood and glass\n"
    "don't forget the candles, the cake and the music for the party\n"
    "we're drawing 3 cats, 12 birds and 100 tiny stars\n"
    "cinematic lighting, sharp focus, dramatic shadows, ultra wide angle\n"
    "digital art of a crystal palace floating among the clouds\n"
    "a pencil drawing of an elderly man playing chess in the park\n"
    "a macro shot of dew drops on a spider web at dawn\n"
    "a stack of pancakes with blueberries and maple syrup\n"
    "a turtle swimming above a colorful coral reef\n"
    "a desert landscape with tall red rocks and a clear blue sky\n"
    "a jazz band playing on a small stage in a dark club\n"
    "a snowman wearing a striped hat and a long orange scarf\n"
    "an abandoned greenhouse overgrown with ferns and moss\n"
    "a wooden cabin by a frozen river under the northern lights\n"
    "a golden retriever puppy playing with a tennis ball on the grass\n"
    "a marble statue of a horse in a museum hall\n"
    "a paper boat floating in a puddle after the rain\n"
    "a hummingbird hovering near a bright red blossom\n"
    "a bustling night market with lanterns and food stalls\n"
    "a pair of worn leather boots beside a campfire\n"
    "a teapot shaped like a pumpkin, studio photo, white background\n"
    "a crowded beach in summer seen from above\n"
    "a violin resting on a velvet chair in an empty concert hall\n"
    "a comic book panel of a superhero landing on a rooftop\n"
    "a field of lavender stretching toward the horizon\n"
    "a fisherman mending nets on a wooden pier\n"
    "a medieval map with sea monsters and compass roses\n"
    "a tram climbing a steep hill in an old city\n"
    "A Photo Of The Eiffel Tower In Paris, Taken At Night!\n"
    "Is it a bird? Is it a plane? No, it's a Flying Whale.\n"
    "Tokyo, Japan: cherry blossoms along the river in April.\n"
    "New York City skyline; Central Park in the foreground (aerial view).\n"
    "Wow! A rainbow over the Scottish Highlands after a storm.\n"
    "Mount Fuji reflected in Lake Kawaguchi - early morning, no wind.\n";

// Vocabulary sizes of the demo tokenizers (= the encoders' token-embedding rows). CLIP: 512 byte
// symbols + 254 merges + 2 special tokens; T5: 256 SentencePiece pieces + 100 sentinels.
constexpr int64_t kFluxTinyClipVocab = 768;
constexpr int64_t kFluxTinyT5Extra = 100;
constexpr int64_t kFluxTinyT5Vocab = 256 + kFluxTinyT5Extra;

DemoPipelineRecipe FluxTinyDemo() {
  DemoPipelineRecipe demo;
  demo.name = "flux-tiny";
  demo.pipeline_class = "FluxPipeline";
  demo.description =
      "tiny FLUX.1-dev-architecture pipeline with random weights (images are noise): transformer "
      "1+1 blocks, 2 heads x 16; AutoencoderKL 2 levels, 4 latent channels; CLIP and T5 text "
      "encoders 2 layers x 32 wide with generated tokenizers; text prompts or prompt embeddings";
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
  // FLUX.1's text encoders in miniature: CLIP-L's architecture (quick_gelu, causal, pooled at
  // the first <|endoftext|>) and T5 v1.1's (gated-GELU, relative position buckets).
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
                 {"max_position_embeddings", 77},
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
  clip_tokenizer.model_max_length = 77;
  clip_tokenizer.encoder = "text_encoder";
  clip_tokenizer.corpus = kFluxTinyCorpus;
  DemoTokenizer t5_tokenizer;
  t5_tokenizer.name = "tokenizer_2";
  t5_tokenizer.kind = DemoTokenizerKind::kT5SentencePiece;
  t5_tokenizer.vocab_size = kFluxTinyT5Vocab;
  t5_tokenizer.extra_ids = kFluxTinyT5Extra;
  t5_tokenizer.model_max_length = 512;
  t5_tokenizer.encoder = "text_encoder_2";
  t5_tokenizer.corpus = kFluxTinyCorpus;
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
  // Stand-ins for the text encoders' outputs (8 tokens of T5 width, CLIP's pooled width), for
  // requests that bring their own embeddings.
  demo.example_inputs = {{"prompt_embeds", {8, 32}}, {"pooled_prompt_embeds", {32}}};
  demo.absent_components = {"image_encoder", "feature_extractor"};
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
