// Flux transformer forward throughput relative to this machine's matrix-product throughput,
// both measured in the same run (so the ratio is comparable across machines and loads).
//
//   flux_forward_bench [--threads N] [--layers 4] [--single_layers 8] [--heads 12]
//                      [--head_dim 64] [--img_tokens 1024] [--txt_tokens 128] [--repeat 5]
//                      [--dtype float32|bfloat16|float16] [--profile]
//
// Prints (a) torch::mm GFLOP/s on square float32 matrices, (b) the forward's median time and
// GFLOP/s by the analytic count below, (c) their ratio; --profile adds a per-operator breakdown of
// one forward (self time, from LibTorch's profiler) and a comparison of attention kernels.
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/bench_util.h"
#include "models/flux/config.h"
#include "models/flux/transformer.h"

ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "intra-op threads (torch::set_num_threads)");
ABSL_FLAG(int32_t, layers, 4, "double-stream blocks");
ABSL_FLAG(int32_t, single_layers, 8, "single-stream blocks");
ABSL_FLAG(int32_t, heads, 12, "attention heads");
ABSL_FLAG(int32_t, head_dim, 64, "attention head dim (RoPE axes scale like Flux's 16/56/56)");
ABSL_FLAG(int32_t, img_tokens, 1024, "image tokens per sample");
ABSL_FLAG(int32_t, txt_tokens, 128, "text tokens per sample");
ABSL_FLAG(int32_t, batch, 1, "batch size");
ABSL_FLAG(int32_t, repeat, 5, "timed forward passes (median reported)");
ABSL_FLAG(int32_t, matmul_size, 2048, "side of the square matrices for the matmul reference");
ABSL_FLAG(std::string, dtype, "float32", "float32, bfloat16 or float16");
ABSL_FLAG(bool, profile, false, "print a per-operator breakdown of one forward");

namespace {

using ds::bench::Clock;
using ds::bench::Seconds;

struct Timing {
  double median = 0;
  double best = 0;
};

template <typename Fn>
Timing TimeIt(int repeat, Fn&& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    const auto start = Clock::now();
    fn();
    t.push_back(Seconds(start, Clock::now()));
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front()};
}

// Self time per operator name over one profiled call, from the legacy profiler's push/pop pairs.
void PrintProfile(const torch::autograd::profiler::thread_event_lists& lists, double total_s) {
  using torch::autograd::profiler::EventKind;
  using torch::autograd::profiler::LegacyEvent;
  struct Stat {
    double self_us = 0;
    int64_t calls = 0;
  };
  std::map<std::string, Stat> stats;
  for (const auto& events : lists) {
    struct Open {
      const LegacyEvent* event;
      double child_us;
    };
    std::vector<Open> stack;
    for (const auto& e : events) {
      if (e.kind() == EventKind::PushRange) {
        stack.push_back({&e, 0.0});
      } else if (e.kind() == EventKind::PopRange && !stack.empty()) {
        const Open open = stack.back();
        stack.pop_back();
        const double us = open.event->cpuElapsedUs(e);
        Stat& st = stats[open.event->name()];
        st.self_us += us - open.child_us;
        st.calls += 1;
        if (!stack.empty()) stack.back().child_us += us;
      }
    }
  }
  std::vector<std::pair<std::string, Stat>> sorted(stats.begin(), stats.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.second.self_us > b.second.self_us; });
  std::printf(
      "\nper-operator self time (one forward, %.3f s wall with profiler; operators inside a "
      "parallel region, such as the per-head attention products, count once per thread):\n",
      total_s);
  std::printf("  %-40s %8s %10s %7s\n", "operator", "calls", "ms", "share");
  for (size_t i = 0; i < sorted.size() && i < 18; ++i) {
    const double ms = sorted[i].second.self_us / 1e3;
    std::printf("  %-40s %8lld %10.1f %6.1f%%\n", sorted[i].first.c_str(),
                static_cast<long long>(sorted[i].second.calls), ms, 100.0 * ms / (total_s * 1e3));
  }
}

// Attention alone, at the forward's shapes: LibTorch 1.13's _scaled_dot_product_attention versus
// the model's kernel choice (baddbmm with the 1/√d scale as alpha, in-place softmax, bmm).
void CompareAttention(int64_t heads, int64_t head_dim, int64_t seq, int repeat) {
  torch::InferenceMode guard;
  const auto q = torch::randn({1, heads, seq, head_dim});
  const auto k = torch::randn({1, heads, seq, head_dim});
  const auto v = torch::randn({1, heads, seq, head_dim});
  const double flops = 4.0 * heads * seq * seq * head_dim;
  const Timing sdpa = TimeIt(repeat, [&] { at::_scaled_dot_product_attention(q, k, v); });
  torch::Tensor scores = torch::zeros({heads, seq, seq});
  torch::Tensor out = torch::empty({heads, seq, head_dim});
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const Timing mine = TimeIt(repeat, [&] {
    at::baddbmm_out(scores, scores, q[0], k[0].transpose(1, 2), 0, scale);
    at::_softmax_out(scores, scores, -1, false);
    at::bmm_out(out, scores, v[0]);
  });
  std::printf("\nattention alone (%lld heads x %lld, %lld tokens):\n",
              static_cast<long long>(heads), static_cast<long long>(head_dim),
              static_cast<long long>(seq));
  std::printf("  at::_scaled_dot_product_attention   %8.1f ms  %6.1f GFLOP/s\n", sdpa.median * 1e3,
              flops / sdpa.median / 1e9);
  std::printf("  baddbmm(alpha) + softmax_ + bmm     %8.1f ms  %6.1f GFLOP/s\n", mine.median * 1e3,
              flops / mine.median / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int threads = std::max(1, absl::GetFlag(FLAGS_threads));
  torch::set_num_threads(threads);
  const int repeat = std::max(1, absl::GetFlag(FLAGS_repeat));
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  torch::Dtype dtype = torch::kFloat32;
  if (dtype_name == "bfloat16") {
    dtype = torch::kBFloat16;
  } else if (dtype_name == "float16") {
    dtype = torch::kFloat16;
  } else if (dtype_name != "float32") {
    std::fprintf(stderr, "unknown --dtype %s\n", dtype_name.c_str());
    return 2;
  }

  // (a) The machine's float32 matrix-product throughput (measured below, interleaved with the
  // forward passes, so that both see the same machine load).
  const int64_t n = absl::GetFlag(FLAGS_matmul_size);
  torch::Tensor mm_a, mm_b, mm_c;
  {
    torch::InferenceMode guard;
    mm_a = torch::randn({n, n});
    mm_b = torch::randn({n, n});
    mm_c = torch::empty({n, n});
  }
  auto matmul = [&] {
    torch::InferenceMode guard;
    at::mm_out(mm_c, mm_a, mm_b);
  };
  const double mm_flops =
      2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);

  // (b) The forward.
  nlohmann::json config = {
      {"num_layers", absl::GetFlag(FLAGS_layers)},
      {"num_single_layers", absl::GetFlag(FLAGS_single_layers)},
      {"num_attention_heads", absl::GetFlag(FLAGS_heads)},
      {"attention_head_dim", absl::GetFlag(FLAGS_head_dim)},
      {"axes_dims_rope", ds::bench::RopeAxes(absl::GetFlag(FLAGS_head_dim))},
  };
  ds::ModelOptions options;
  options.dtype = dtype;
  auto model = ds::flux::FluxTransformer::Create(config, options);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  ds::flux::InitRandomWeights((*model)->module(), 0);
  const ds::flux::FluxConfig& cfg = (*model)->flux_config();
  const int64_t batch = absl::GetFlag(FLAGS_batch);
  const int64_t n_img = absl::GetFlag(FLAGS_img_tokens), n_txt = absl::GetFlag(FLAGS_txt_tokens);
  torch::manual_seed(0);
  ds::TensorMap inputs;
  inputs["hidden_states"] = torch::randn({batch, n_img, cfg.in_channels});
  inputs["encoder_hidden_states"] = torch::randn({batch, n_txt, cfg.joint_attention_dim});
  inputs["pooled_projections"] = torch::randn({batch, cfg.pooled_projection_dim});
  inputs["timestep"] = torch::full({batch}, 0.5);
  const int64_t side = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n_img))));
  torch::Tensor img_ids = torch::zeros({n_img, 3});
  const auto pos = torch::arange(n_img, torch::kLong);
  img_ids.select(1, 1).copy_(pos.div(side, "floor"));
  img_ids.select(1, 2).copy_(pos.remainder(side));
  inputs["img_ids"] = img_ids;
  inputs["txt_ids"] = torch::zeros({n_txt, 3});

  bool failed = false;
  auto forward = [&] {
    auto out = (*model)->Forward(inputs);
    if (!out.ok()) {
      std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
      failed = true;
    }
  };
  // Warm-up, then `repeat` rounds of (best of 3 matmuls, one forward). The ratio of each round
  // compares the two under the same load; the median round ratio is the headline number.
  matmul();
  forward();
  if (failed) return 1;
  std::vector<double> mm_s, fwd_s, ratios;
  const double flops = ds::bench::FluxForwardFlops(cfg, batch, n_img, n_txt);
  for (int i = 0; i < repeat; ++i) {
    double best_mm = 1e30;
    for (int j = 0; j < 3; ++j) {
      const auto start = Clock::now();
      matmul();
      best_mm = std::min(best_mm, Seconds(start, Clock::now()));
    }
    const auto start = Clock::now();
    forward();
    const double t = Seconds(start, Clock::now());
    if (failed) return 1;
    mm_s.push_back(best_mm);
    fwd_s.push_back(t);
    ratios.push_back((flops / t) / (mm_flops / best_mm));
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto best = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
  auto worst = [](const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); };

  std::printf(
      "flux_forward_bench: threads=%d dtype=%s layers=%lld single_layers=%lld heads=%lld "
      "head_dim=%lld img_tokens=%lld txt_tokens=%lld batch=%lld repeat=%d\n",
      threads, dtype_name.c_str(), static_cast<long long>(cfg.num_layers),
      static_cast<long long>(cfg.num_single_layers),
      static_cast<long long>(cfg.num_attention_heads),
      static_cast<long long>(cfg.attention_head_dim), static_cast<long long>(n_img),
      static_cast<long long>(n_txt), static_cast<long long>(batch), repeat);
  std::printf("(a) matmul float32 %lldx%lld: median %.1f GFLOP/s (best %.1f)\n",
              static_cast<long long>(n), static_cast<long long>(n), mm_flops / median(mm_s) / 1e9,
              mm_flops / best(mm_s) / 1e9);
  std::printf("(b) forward: %.2f GFLOP, median %.3f s (best %.3f s) -> %.1f GFLOP/s (best %.1f)\n",
              flops / 1e9, median(fwd_s), best(fwd_s), flops / median(fwd_s) / 1e9,
              flops / best(fwd_s) / 1e9);
  std::printf("(c) ratio forward/matmul: median %.3f over %d rounds (min %.3f, max %.3f)\n",
              median(ratios), repeat, best(ratios), worst(ratios));

  if (absl::GetFlag(FLAGS_profile)) {
    const torch::profiler::impl::ProfilerConfig profiler_config(
        torch::profiler::impl::ProfilerState::CPU, /*report_input_shapes=*/false,
        /*profile_memory=*/false);
    torch::autograd::profiler::enableProfilerLegacy(profiler_config);
    const auto start = Clock::now();
    auto out = (*model)->Forward(inputs);
    const double wall = Seconds(start, Clock::now());
    const auto events = torch::autograd::profiler::disableProfilerLegacy();
    if (out.ok()) PrintProfile(events, wall);
    CompareAttention(cfg.num_attention_heads, cfg.attention_head_dim, n_img + n_txt, repeat);
  }
  return 0;
}
