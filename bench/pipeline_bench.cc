// FluxPipeline overhead: time per denoising step of the pipeline versus the bare transformer
// forward at the same shapes (issue 6 target: <= 1.05x), and the VAE decode time, on a mid-size
// configuration with random weights.
//
//   pipeline_bench [--threads N] [--layers 2] [--single_layers 4] [--heads 8] [--head_dim 64]
//                  [--size 256] [--txt_tokens 128] [--steps 4] [--rounds 5]
//                  [--vae_channels 32,64,128,128]
//
// Rounds are interleaved so both sides see the same machine load: each round runs one Generate of
// --steps steps (latents only; per-step times from the step callback, callback to callback, so a
// step includes the timestep tensor, the forward, the scheduler step and bookkeeping) and --steps
// bare forwards of the same transformer on the same inputs. Reported: the median over rounds of
// (median pipeline step / median bare forward), the whole denoise loop per step (setup included:
// noise, packing, ids, schedule), and separately the VAE decode (+ postprocess) of one image.
//
// Text prompts (issue 7 target: a cached prompt's encoding < 1% of a 4-step generation): the same
// pipeline with a CLIP text encoder (--clip_layers, width = pooled_projection_dim) and a gated T5
// encoder (--t5_layers, width = joint_attention_dim), random weights, and the tokenizers of
// --tokenizers (a pipeline folder with tokenizer/ and tokenizer_2/; default: the golden
// flux_tiny). Reported: EncodePrompt of a cached prompt, of an uncached one (a fresh prompt each
// time; T5 padded to --txt_tokens), a whole 4-step Generate from the cached prompt (decode
// included), and the ratio cached / generation. --clip_layers 0 skips this part.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "handlers/image_decoder.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "handlers/text_encoder.h"
#include "handlers/tokenizers/tokenizer.h"
#include "models/flux/latents.h"
#include "models/flux/pipeline.h"

ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "intra-op threads (torch::set_num_threads)");
ABSL_FLAG(int32_t, layers, 2, "double-stream blocks");
ABSL_FLAG(int32_t, single_layers, 4, "single-stream blocks");
ABSL_FLAG(int32_t, heads, 8, "attention heads");
ABSL_FLAG(int32_t, head_dim, 64, "attention head dim");
ABSL_FLAG(int32_t, size, 256, "image height and width in pixels (multiple of 16)");
ABSL_FLAG(int32_t, txt_tokens, 128, "text tokens");
ABSL_FLAG(int32_t, steps, 4, "denoising steps per Generate");
ABSL_FLAG(int32_t, rounds, 5, "interleaved rounds (median reported)");
ABSL_FLAG(int32_t, clip_layers, 4, "CLIP text encoder layers (0: skip the text-prompt part)");
ABSL_FLAG(int32_t, t5_layers, 4, "T5 encoder layers");
ABSL_FLAG(std::string, tokenizers, std::string(DS_GOLDEN_DIR) + "/pipeline/flux_pipeline_text/flux_tiny",
          "folder with tokenizer/ (CLIP) and tokenizer_2/ (T5)");
ABSL_FLAG(int32_t, encode_reps, 30, "EncodePrompt repetitions per measurement (median)");
ABSL_FLAG(std::string, vae_channels, "32,64,128,128",
          "VAE block_out_channels (FLUX.1: 128,256,512,512); 4 levels = scale factor 8");

namespace {

using ds::bench::Clock;
using ds::bench::Median;
using ds::bench::Seconds;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "pipeline_bench: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  torch::set_num_threads(threads);
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const int64_t size = absl::GetFlag(FLAGS_size);
  const int64_t txt_tokens = absl::GetFlag(FLAGS_txt_tokens);
  std::vector<int64_t> vae_channels;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_vae_channels), ',')) {
    int64_t c = 0;
    if (!absl::SimpleAtoi(part, &c) || c < 1) {
      std::fprintf(stderr, "bad --vae_channels\n");
      return 2;
    }
    vae_channels.push_back(c);
  }

  // A guidance-distilled (dev-like) transformer and a FLUX-layout VAE, random weights, built
  // through the registry as a server would find them.
  nlohmann::json transformer_config =
      ds::bench::FluxShape(absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_single_layers),
                           absl::GetFlag(FLAGS_heads), absl::GetFlag(FLAGS_head_dim));
  transformer_config["joint_attention_dim"] = 1024;
  transformer_config["pooled_projection_dim"] = 256;
  auto built = ds::bench::BuildRandomFluxPipeline(transformer_config, vae_channels);
  if (!built.ok()) return Fail(built.status());
  ds::flux::FluxPipelineComponents& components = built->components;
  std::unique_ptr<ds::flux::FluxPipeline>* pipeline = &built->pipeline;
  const ds::flux::FluxConfig& cfg = (*pipeline)->transformer_config();

  torch::manual_seed(0);
  ds::flux::FluxPipelineRequest request;
  request.prompt_embeds = torch::randn({txt_tokens, cfg.joint_attention_dim});
  request.pooled_prompt_embeds = torch::randn({cfg.pooled_projection_dim});
  request.height = size;
  request.width = size;
  request.num_inference_steps = steps;
  request.seed = 0;
  request.decode = false;

  // The bare forward's inputs: exactly the shapes and values a pipeline step hands over.
  const int64_t s = (*pipeline)->vae_scale_factor();
  auto shape = ds::flux::LatentShape(1, (*pipeline)->num_channels_latents(), size, size, s);
  if (!shape.ok()) return Fail(shape.status());
  auto packed = ds::flux::PackLatents(torch::randn(*shape));
  auto img_ids =
      ds::flux::LatentImageIds((*shape)[2] / 2, (*shape)[3] / 2, torch::kFloat32, torch::kCPU);
  auto txt_ids = ds::flux::TextIds(txt_tokens, torch::kFloat32, torch::kCPU);
  if (!packed.ok() || !img_ids.ok() || !txt_ids.ok()) return Fail(absl::InternalError("inputs"));
  ds::TensorMap inputs = {
      {"hidden_states", *packed},
      {"encoder_hidden_states", request.prompt_embeds.unsqueeze(0)},
      {"pooled_projections", request.pooled_prompt_embeds.unsqueeze(0)},
      {"timestep", torch::full({1}, 0.5)},
      {"img_ids", *img_ids},
      {"txt_ids", *txt_ids},
      {"guidance", torch::full({1}, 3.5)},
  };
  const ds::LoraHost& host = *components.transformer;

  std::vector<double> step_times;
  Clock::time_point last;
  auto on_step = [&](int step, int) {
    const auto now = Clock::now();
    if (step > 0) step_times.push_back(Seconds(last, now));
    last = now;
    return absl::OkStatus();
  };
  // Warm-up of both paths.
  if (auto r = (*pipeline)->Generate(request, on_step); !r.ok()) return Fail(r.status());
  if (auto r = host.Forward(inputs); !r.ok()) return Fail(r.status());

  std::vector<double> ratios, loop_ratios, step_med, fwd_med, loop_per_step;
  for (int round = 0; round < rounds; ++round) {
    step_times.clear();
    const auto start = Clock::now();
    auto result = (*pipeline)->Generate(request, on_step);
    const double whole = Seconds(start, Clock::now());
    if (!result.ok()) return Fail(result.status());
    std::vector<double> fwd;
    for (int i = 0; i < steps; ++i) {
      const auto t0 = Clock::now();
      auto out = host.Forward(inputs);
      fwd.push_back(Seconds(t0, Clock::now()));
      if (!out.ok()) return Fail(out.status());
    }
    const double f = Median(fwd);
    step_med.push_back(Median(step_times));
    fwd_med.push_back(f);
    loop_per_step.push_back(whole / steps);
    ratios.push_back(step_med.back() / f);
    loop_ratios.push_back(loop_per_step.back() / f);
  }

  // VAE decode (+ postprocess to [0, 1]) of one image, timed inside Generate.
  std::vector<double> decode_s;
  request.decode = true;
  request.num_inference_steps = 1;
  for (int round = 0; round < std::max(1, rounds / 2); ++round) {
    auto r = (*pipeline)->Generate(request);
    if (!r.ok()) return Fail(r.status());
    decode_s.push_back(r->decode_seconds);
  }

  std::printf(
      "pipeline_bench: threads=%d layers=%lld single_layers=%lld heads=%lld head_dim=%lld "
      "image=%lldx%lld (%lld image tokens) txt_tokens=%lld steps=%d rounds=%d\n",
      threads, static_cast<long long>(cfg.num_layers),
      static_cast<long long>(cfg.num_single_layers),
      static_cast<long long>(cfg.num_attention_heads),
      static_cast<long long>(cfg.attention_head_dim), static_cast<long long>(size),
      static_cast<long long>(size), static_cast<long long>(packed->size(1)),
      static_cast<long long>(txt_tokens), steps, rounds);
  std::printf("  bare transformer forward:         median %.2f ms\n", Median(fwd_med) * 1e3);
  std::printf("  pipeline step (callback to callback): median %.2f ms\n", Median(step_med) * 1e3);
  std::printf(
      "  ratio step / forward:             median %.4f (min %.4f, max %.4f) [target <= 1.05]\n",
      Median(ratios), *std::min_element(ratios.begin(), ratios.end()),
      *std::max_element(ratios.begin(), ratios.end()));
  std::printf("  whole denoise loop / steps:       median %.2f ms, ratio %.4f (setup included)\n",
              Median(loop_per_step) * 1e3, Median(loop_ratios));
  std::printf(
      "  VAE decode + postprocess (1 image %lldx%lld, block_out_channels %s): median %.1f ms\n",
      static_cast<long long>(size), static_cast<long long>(size),
      absl::GetFlag(FLAGS_vae_channels).c_str(), Median(decode_s) * 1e3);

  // Text prompts.
  const int clip_layers = absl::GetFlag(FLAGS_clip_layers);
  if (clip_layers < 1) return 0;
  const std::string tok_dir = absl::GetFlag(FLAGS_tokenizers);
  auto clip_tok = ds::tokenizers::LoadTokenizerFromFolder(tok_dir + "/tokenizer");
  auto t5_tok = ds::tokenizers::LoadTokenizerFromFolder(tok_dir + "/tokenizer_2");
  if (!clip_tok.ok()) return Fail(clip_tok.status());
  if (!t5_tok.ok()) return Fail(t5_tok.status());
  const int64_t clip_width = cfg.pooled_projection_dim;
  const nlohmann::json clip_config = {
      {"vocab_size", (*clip_tok)->vocab_size()}, {"hidden_size", clip_width},
      {"intermediate_size", 4 * clip_width},     {"num_hidden_layers", clip_layers},
      {"num_attention_heads", clip_width / 64},  {"max_position_embeddings", 77},
      {"hidden_act", "quick_gelu"},              {"bos_token_id", 0},
      {"eos_token_id", 2},                       {"pad_token_id", 1},
  };
  const int64_t t5_width = cfg.joint_attention_dim;
  const nlohmann::json t5_config = {
      {"vocab_size", (*t5_tok)->vocab_size()},
      {"d_model", t5_width},
      {"d_kv", 64},
      {"num_heads", t5_width / 64},
      {"d_ff", t5_width * 5 / 2},
      {"num_layers", absl::GetFlag(FLAGS_t5_layers)},
      {"feed_forward_proj", "gated-gelu"},
      {"relative_attention_num_buckets", 32},
      {"relative_attention_max_distance", 128},
  };
  std::shared_ptr<const ds::TextEncoder> encoders[2];
  for (int i = 0; i < 2; ++i) {
    auto spec = ds::ModelRegistry::Global().Find(i == 0 ? "CLIPTextModel" : "T5EncoderModel");
    if (!spec.ok()) return Fail(spec.status());
    auto model = (*spec)->factory(i == 0 ? clip_config : t5_config, ds::ModelOptions{});
    if (!model.ok()) return Fail(model.status());
    ds::InitRandomWeights((*model)->module(), 2 + i);
    std::shared_ptr<const ds::DiffusionModel> owner(std::move(model).value());
    const auto* encoder = dynamic_cast<const ds::TextEncoder*>(owner.get());
    if (encoder == nullptr) return Fail(absl::InternalError("not a TextEncoder"));
    encoders[i] = std::shared_ptr<const ds::TextEncoder>(owner, encoder);
  }
  components.tokenizer = std::move(clip_tok).value();
  components.text_encoder = encoders[0];
  components.tokenizer_2 = std::move(t5_tok).value();
  components.text_encoder_2 = encoders[1];
  auto text_pipeline = ds::flux::FluxPipeline::Create(components);
  if (!text_pipeline.ok()) return Fail(text_pipeline.status());
  const ds::flux::FluxPipeline& tp = **text_pipeline;

  const std::string prompt =
      "a photo of a cat sitting on a windowsill in the afternoon sun, highly detailed";
  const int reps = std::max(1, absl::GetFlag(FLAGS_encode_reps));
  std::vector<double> cached_s, uncached_s, generate_s;
  if (auto e = tp.EncodePrompt({prompt}, {}, txt_tokens); !e.ok()) return Fail(e.status());
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    auto cached = tp.EncodePrompt({prompt}, {}, txt_tokens);
    cached_s.push_back(Seconds(t0, Clock::now()));
    if (!cached.ok()) return Fail(cached.status());
    const std::string fresh = prompt + " variation " + std::to_string(i);
    t0 = Clock::now();
    auto uncached = tp.EncodePrompt({fresh}, {}, txt_tokens);
    uncached_s.push_back(Seconds(t0, Clock::now()));
    if (!uncached.ok()) return Fail(uncached.status());
  }
  ds::flux::FluxPipelineRequest text_request;
  text_request.prompt = {prompt};
  text_request.max_sequence_length = txt_tokens;
  text_request.height = size;
  text_request.width = size;
  text_request.num_inference_steps = 4;
  text_request.seed = 0;
  text_request.decode = true;
  double encode_in_generate = 0;
  for (int round = 0; round < rounds; ++round) {
    const auto t0 = Clock::now();
    auto r = tp.Generate(text_request);
    generate_s.push_back(Seconds(t0, Clock::now()));
    if (!r.ok()) return Fail(r.status());
    encode_in_generate = r->encode_seconds;
  }
  const ds::PromptCacheStats stats = tp.prompt_cache_stats();
  std::printf(
      "text prompts: CLIP %d layers x %lld wide, T5 %d layers x %lld wide, T5 tokens %lld\n",
      clip_layers, static_cast<long long>(clip_width), absl::GetFlag(FLAGS_t5_layers),
      static_cast<long long>(t5_width), static_cast<long long>(txt_tokens));
  std::printf("  EncodePrompt, cached prompt:      median %.4f ms\n", Median(cached_s) * 1e3);
  std::printf("  EncodePrompt, uncached prompt:    median %.2f ms\n", Median(uncached_s) * 1e3);
  std::printf("  4-step Generate from the cached prompt (decode included): median %.1f ms "
              "(its encode_seconds %.4f ms)\n",
              Median(generate_s) * 1e3, encode_in_generate * 1e3);
  std::printf("  ratio cached encode / 4-step generation: %.6f (%.4f%%) [target < 1%%]\n",
              Median(cached_s) / Median(generate_s), 100 * Median(cached_s) / Median(generate_s));
  std::printf("  ratio uncached encode / 4-step generation: %.4f\n",
              Median(uncached_s) / Median(generate_s));
  std::printf("  prompt cache: %lld hits, %lld misses, %lld entries, %lld bytes\n",
              static_cast<long long>(stats.hits), static_cast<long long>(stats.misses),
              static_cast<long long>(stats.entries), static_cast<long long>(stats.bytes));
  return 0;
}
