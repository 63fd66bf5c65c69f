// FirstBlockCache and TaylorSeer speedup and quality (issue 9 target: >= 1.6x at the default
// threshold on a 28-step generation, with the PSNR against the uncached output reported).
//
//   cache_bench [--threads N] [--layers 2] [--single_layers 4] [--heads 2] [--head_dim 32]
//               [--size 64] [--txt_tokens 64] [--steps 28] [--rounds 3]
//               [--thresholds 0.05,0.1,0.2,0.3,0.5,0.8] [--vae_channels 16,32] [--weights_seed 0]
//               [--taylorseer_intervals 3]
//
// A FluxPipeline with random weights (a FLUX.1-dev-layout transformer of the given size, guidance
// embedding, and a small AutoencoderKL), built in this process. Each round generates the same
// request (same seed, same embeddings) uncached and then with FirstBlockCache at every threshold,
// so every ratio compares runs of the same round. Reported per threshold: the forwards that skipped
// the blocks after the first, the median over rounds of (uncached denoise time / cached denoise
// time) — the denoising loop only, from PipelineResult::denoise_seconds — and the PSNR of the
// decoded cached image against the decoded uncached one (images in [0, 1], peak 1), plus the
// latents' relative L2 error. Random weights are not a trained model: how often the head block's
// residual stays within a threshold is a property of the weights, so the curve is the result.
// TaylorSeer rows (same rounds, same uncached reference): diffusers' defaults (cache_interval 5,
// disable_cache_before_step 3, max_order 1, bfloat16 factors; attention outputs predicted), the
// same in lite mode (the model output predicted, no block run), and every --taylorseer_intervals
// value with the other defaults. Its schedule is fixed, so its skipped count does not depend on
// the weights; its quality does.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "handlers/block_cache.h"
#include "handlers/image_decoder.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/flux/pipeline.h"

ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "intra-op threads (torch::set_num_threads)");
ABSL_FLAG(int32_t, layers, 2, "double-stream blocks");
ABSL_FLAG(int32_t, single_layers, 4, "single-stream blocks");
ABSL_FLAG(int32_t, heads, 2, "attention heads");
ABSL_FLAG(int32_t, head_dim, 32, "attention head dim");
ABSL_FLAG(int32_t, size, 64,
          "image height and width in pixels (multiple of 2 x the VAE scale factor, 2 for the default "
          "2-level VAE: 64 px = 256 image tokens)");
ABSL_FLAG(int32_t, txt_tokens, 64, "text tokens");
ABSL_FLAG(int32_t, steps, 28, "denoising steps");
ABSL_FLAG(int32_t, rounds, 3, "rounds (medians reported)");
ABSL_FLAG(std::string, thresholds, "0.05,0.1,0.2,0.3,0.5,0.8",
          "FirstBlockCache thresholds (the first is reported as the default's when it is 0.05)");
ABSL_FLAG(std::string, vae_channels, "16,32", "VAE block_out_channels");
ABSL_FLAG(int32_t, weights_seed, 0, "seed of the random weights");
ABSL_FLAG(std::string, taylorseer_intervals, "3",
          "extra TaylorSeer cache_interval values to report (besides the default 5); empty: none");

namespace {

using ds::bench::Median;
using ds::bench::RopeAxes;

bool ParseList(const std::string& text, std::vector<double>* out) {
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v)) return false;
    out->push_back(v);
  }
  return !out->empty();
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "cache_bench: %s\n", s.ToString().c_str());
  return 1;
}

// PSNR of `a` against `b` (both in [0, 1]); infinite when identical.
double Psnr(const torch::Tensor& a, const torch::Tensor& b) { return ds::bench::Psnr(a, b, 1.0); }

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  torch::set_num_threads(threads);
  const int rounds = std::max(1, absl::GetFlag(FLAGS_rounds));
  const int64_t size = absl::GetFlag(FLAGS_size);
  std::vector<double> thresholds, vae_channels_d;
  if (!ParseList(absl::GetFlag(FLAGS_thresholds), &thresholds)) {
    std::fprintf(stderr, "bad --thresholds\n");
    return 2;
  }
  if (!ParseList(absl::GetFlag(FLAGS_vae_channels), &vae_channels_d)) {
    std::fprintf(stderr, "bad --vae_channels\n");
    return 2;
  }
  std::vector<int64_t> vae_channels;
  for (double c : vae_channels_d) vae_channels.push_back(static_cast<int64_t>(c));

  const nlohmann::json transformer_config = {
      {"in_channels", 16},
      {"num_layers", absl::GetFlag(FLAGS_layers)},
      {"num_single_layers", absl::GetFlag(FLAGS_single_layers)},
      {"num_attention_heads", absl::GetFlag(FLAGS_heads)},
      {"attention_head_dim", absl::GetFlag(FLAGS_head_dim)},
      {"axes_dims_rope", RopeAxes(absl::GetFlag(FLAGS_head_dim))},
      {"joint_attention_dim", 64},
      {"pooled_projection_dim", 32},
      {"guidance_embeds", true},
  };
  const std::vector<std::string> down(vae_channels.size(), "DownEncoderBlock2D");
  const std::vector<std::string> up(vae_channels.size(), "UpDecoderBlock2D");
  const nlohmann::json vae_config = {
      {"block_out_channels", vae_channels},
      {"down_block_types", down},
      {"up_block_types", up},
      {"latent_channels", 4},
      {"layers_per_block", 1},
      {"norm_num_groups", 8},
      {"scaling_factor", 0.3611},
      {"shift_factor", 0.1159},
      {"use_quant_conv", false},
      {"use_post_quant_conv", false},
  };
  const auto seed = static_cast<uint64_t>(absl::GetFlag(FLAGS_weights_seed));
  auto built =
      ds::bench::BuildRandomFluxPipeline(transformer_config, vae_config, ds::ModelOptions{}, seed);
  if (!built.ok()) return Fail(built.status());
  std::unique_ptr<ds::flux::FluxPipeline>* pipeline = &built->pipeline;
  const ds::flux::FluxConfig& cfg = (*pipeline)->transformer_config();

  torch::manual_seed(0);
  ds::flux::FluxPipelineRequest request;
  request.prompt_embeds = torch::randn({absl::GetFlag(FLAGS_txt_tokens), cfg.joint_attention_dim});
  request.pooled_prompt_embeds = torch::randn({cfg.pooled_projection_dim});
  request.height = size;
  request.width = size;
  request.num_inference_steps = absl::GetFlag(FLAGS_steps);
  request.seed = 0;
  request.decode = true;

  // Warm-up.
  if (auto r = (*pipeline)->Generate(request); !r.ok()) return Fail(r.status());

  struct Row {
    double threshold;
    std::vector<double> speedups;
    int64_t skipped = 0, computed = 0;
    double psnr = 0, latent_rel = 0;
    std::optional<ds::BlockCacheConfig> config;  // set: this config instead of the threshold
    std::string label;
  };
  std::vector<Row> rows;
  for (double t : thresholds) rows.push_back({t, {}, 0, 0, 0, 0, std::nullopt, ""});
  {
    ds::BlockCacheConfig taylor;
    taylor.type = ds::kTaylorSeerCacheType;
    rows.push_back({0, {}, 0, 0, 0, 0, taylor, "taylorseer (defaults)"});
    std::vector<double> intervals;
    if (!absl::GetFlag(FLAGS_taylorseer_intervals).empty() &&
        !ParseList(absl::GetFlag(FLAGS_taylorseer_intervals), &intervals)) {
      std::fprintf(stderr, "bad --taylorseer_intervals\n");
      return 2;
    }
    for (double interval : intervals) {
      ds::BlockCacheConfig c = taylor;
      c.cache_interval = static_cast<int64_t>(interval);
      rows.push_back({0, {}, 0, 0, 0, 0, c, absl::StrCat("taylorseer interval ", c.cache_interval)});
    }
    taylor.use_lite_mode = true;
    rows.push_back({0, {}, 0, 0, 0, 0, taylor, "taylorseer lite (defaults)"});
  }
  std::vector<double> uncached_s;
  for (int round = 0; round < rounds; ++round) {
    request.cache.reset();
    auto base = (*pipeline)->Generate(request);
    if (!base.ok()) return Fail(base.status());
    uncached_s.push_back(base->denoise_seconds);
    for (Row& row : rows) {
      request.cache = row.config.has_value()
                          ? *row.config
                          : ds::BlockCacheConfig{ds::kFirstBlockCacheType, row.threshold};
      auto cached = (*pipeline)->Generate(request);
      if (!cached.ok()) return Fail(cached.status());
      row.speedups.push_back(base->denoise_seconds / cached->denoise_seconds);
      row.skipped = cached->cache_skipped_steps;
      row.computed = cached->cache_computed_steps;
      row.psnr = Psnr(cached->image, base->image);
      row.latent_rel = ((cached->latents - base->latents).norm() / base->latents.norm())
                           .item<double>();
    }
  }

  std::printf(
      "cache_bench: threads=%d layers=%lld single_layers=%lld heads=%lld head_dim=%lld "
      "image=%lldx%lld txt_tokens=%d steps=%d rounds=%d weights_seed=%llu (random weights)\n",
      threads, static_cast<long long>(cfg.num_layers),
      static_cast<long long>(cfg.num_single_layers),
      static_cast<long long>(cfg.num_attention_heads),
      static_cast<long long>(cfg.attention_head_dim), static_cast<long long>(size),
      static_cast<long long>(size), absl::GetFlag(FLAGS_txt_tokens), absl::GetFlag(FLAGS_steps),
      rounds, static_cast<unsigned long long>(seed));
  std::printf("  uncached denoise loop: median %.1f ms (%.2f ms/step)\n",
              Median(uncached_s) * 1e3, Median(uncached_s) * 1e3 / absl::GetFlag(FLAGS_steps));
  std::printf("  %-28s %-18s %-22s %-12s %s\n", "first_block_cache threshold",
              "skipped/forwards", "speedup (min..max)", "PSNR dB", "latents rel. L2");
  for (const Row& row : rows) {
    const std::string label =
        row.config.has_value() ? row.label : absl::StrCat(row.threshold);
    std::printf("  %-28s %4lld/%-13lld %5.2fx (%.2f..%.2f)     %-12.2f %.4f%s\n",
                label.c_str(), static_cast<long long>(row.skipped),
                static_cast<long long>(row.skipped + row.computed), Median(row.speedups),
                *std::min_element(row.speedups.begin(), row.speedups.end()),
                *std::max_element(row.speedups.begin(), row.speedups.end()), row.psnr,
                row.latent_rel,
                !row.config.has_value() && row.threshold == ds::kFirstBlockCacheDefaultThreshold
                    ? "   <- default threshold [target >= 1.6x]"
                    : "");
  }
  return 0;
}
