// The serving overhead of diffusion-server (issue 5, "Performance"), each number next to its
// reference measured in the same run, on the embedded tiny Flux model:
//
// (1) Overhead: Generate over gRPC on loopback against a real ds::server::Server started in this
//     process (the class diffusion-server runs, with the same ServerOptions its flags fill), versus
//     the same work called in-process — what the server's worker runs for the request: the
//     instance's adapter snapshot, SeededNoise and DenoiseFlowMatchEuler on the served instance's
//     LoraHost (handlers/flow_match.h). The gRPC side adds request serialization and parsing,
//     validation, the scheduler hand-off, the progress and result messages and the client's
//     decoding of the result tensor. A near-empty unary RPC (ListModels) runs alongside as the
//     transport's floor. Variants are interleaved (each round runs all three, in rotating order);
//     reported: p50/p90 wall time of each, the median process CPU time per call (robust when other
//     processes compete for the cores), the served call split by the server's own timings (worker
//     run, queue wait, the rest), and the added p50 (target <= 1 ms). The served latents are
//     checked against the in-process ones first.
//
// (2) Throughput: --clients concurrent clients (each its own channel and connection) calling
//     Generate in a loop for --seconds, against servers with 1 and 2 scheduler workers
//     (--workers) and the default queue (--queue_capacity): completed requests/s, the ratio 2:1
//     next to the cores available, the CPU cores the process actually got (process CPU time /
//     wall time: below the core count means other processes took the rest), and the largest queue
//     depth seen on the server's diffusion_queue_depth gauge (sampled every ~0.5 ms). Then the same
//     clients against 1 worker and a small queue (--bounded_queue): requests beyond the bound are
//     RESOURCE_EXHAUSTED at once (their latency is reported), and the queue stays bounded.
//     Rejected clients retry after --backoff_ms. The gauge's bound is capacity + workers: admission
//     does not count queued tasks that idle workers are about to take (server/scheduler.h), so the
//     gauge may briefly read up to `workers` above the capacity between a worker finishing and
//     taking the next task.
//
// Exits 1 when the served latents differ from the in-process ones, a queue depth above
// capacity + workers is observed, or a call fails with anything but RESOURCE_EXHAUSTED.
//
//   server_bench [--threads 1] [--iterations 300] [--warmup 20] [--steps 1] [--grid 4]
//                [--text_tokens 8] [--clients 16] [--seconds 3] [--queue_capacity 16]
//                [--bounded_queue 4] [--backoff_ms 20] [--access_log]
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>
#include <time.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "bench/bench_util.h"
#include "bench/server_workload.h"
#include "handlers/flow_match.h"
#include "handlers/threads.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/model_manager.h"
#include "server/server.h"
#include "server/server_options.h"
#include "server/tensor_proto.h"

ABSL_FLAG(int, threads, 1, "LibTorch intra-op threads (0 = all cores)");
ABSL_FLAG(int, iterations, 300, "overhead: timed rounds (each runs gRPC and in-process once)");
ABSL_FLAG(int, warmup, 20, "overhead: untimed rounds first");
ABSL_FLAG(int, steps, 1, "denoising steps per request");
ABSL_FLAG(int64_t, grid, 4, "latent grid side (image tokens = grid^2)");
ABSL_FLAG(int64_t, text_tokens, 8, "text tokens");
ABSL_FLAG(int, clients, 16, "throughput: concurrent clients");
ABSL_FLAG(double, seconds, 3.0, "throughput: seconds per configuration");
ABSL_FLAG(int, queue_capacity, 16, "throughput: queue capacity of the 1- and 2-worker runs");
ABSL_FLAG(int, bounded_queue, 4, "throughput: queue capacity of the bounded-queue run");
ABSL_FLAG(
    double, backoff_ms, 20.0,
    "throughput: a rejected client's wait before it retries, ms (a hot retry loop would take the "
    "cores the worker needs)");
ABSL_FLAG(bool, access_log, false,
          "write the server's per-RPC access log to stderr (otherwise lines are formatted but "
          "dropped below spdlog's error level)");

namespace ds {
namespace {

namespace pb = ::diffusion::v1;
using bench::Clock;
using bench::ProcessCpuSeconds;
using bench::Seconds;
using bench::InProcess;
using bench::MakeWorkload;
using bench::NewChannel;
using bench::OverGrpc;
using bench::Serve;
using bench::Served;
using bench::ServerTimes;
using bench::UnaryRoundTrip;
using bench::Workload;

// The q-quantile (0..1) by nearest rank; 0 for an empty sample.
double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())));
  return v[i];
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "server_bench: %s\n", s.ToString().c_str());
  return 1;
}

// The current value of diffusion_queue_depth{device="cpu"} in the registry (-1 if absent).
double QueueDepth(const server::Metrics& metrics) {
  for (const prometheus::MetricFamily& family : metrics.registry()->Collect()) {
    if (family.name != "diffusion_queue_depth") continue;
    for (const prometheus::ClientMetric& m : family.metric) {
      for (const prometheus::ClientMetric::Label& l : m.label) {
        if (l.name == "device" && l.value == "cpu") return m.gauge.value;
      }
    }
  }
  return -1;
}

struct LoadResult {
  int64_t ok = 0, rejected = 0, other = 0;
  double seconds = 0;
  double max_queue_depth = 0;
  int64_t depth_samples = 0;
  double cpu_seconds = 0;  // process CPU time during the run (clients + server)
  std::vector<double> ok_latency, rejected_latency;
};

// `clients` threads calling Generate for `seconds` against `served`, while a sampler reads the
// queue depth gauge.
LoadResult Load(Served& served, const pb::GenerateRequest& request, int clients, double seconds,
                double backoff_ms) {
  LoadResult r;
  std::mutex mu;
  std::atomic<bool> stop{false};
  std::atomic<int> ready{0};
  std::thread sampler([&] {
    while (!stop.load()) {
      r.max_queue_depth = std::max(r.max_queue_depth, QueueDepth(*served.metrics));
      ++r.depth_samples;
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  std::vector<std::thread> threads;
  const double cpu0 = ProcessCpuSeconds();
  const Clock::time_point start = Clock::now();
  const Clock::time_point end =
      start + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&] {
      auto stub = pb::DiffusionService::NewStub(NewChannel(served.server->port()));
      ready.fetch_add(1);
      LoadResult mine;
      while (Clock::now() < end) {
        const Clock::time_point t0 = Clock::now();
        grpc::StatusCode code = grpc::StatusCode::OK;
        (void)OverGrpc(*stub, request, &code);
        const double dt = Seconds(t0, Clock::now());
        if (code == grpc::StatusCode::OK) {
          ++mine.ok;
          mine.ok_latency.push_back(dt);
        } else if (code == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          ++mine.rejected;
          mine.rejected_latency.push_back(dt);
          std::this_thread::sleep_for(
              std::chrono::microseconds(static_cast<int64_t>(backoff_ms * 1e3)));
        } else {
          ++mine.other;
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      r.ok += mine.ok;
      r.rejected += mine.rejected;
      r.other += mine.other;
      r.ok_latency.insert(r.ok_latency.end(), mine.ok_latency.begin(), mine.ok_latency.end());
      r.rejected_latency.insert(r.rejected_latency.end(), mine.rejected_latency.begin(),
                                mine.rejected_latency.end());
    });
  }
  for (std::thread& t : threads) t.join();
  r.seconds = Seconds(start, Clock::now());
  r.cpu_seconds = ProcessCpuSeconds() - cpu0;
  stop.store(true);
  sampler.join();
  return r;
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int threads = SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  if (!absl::GetFlag(FLAGS_access_log)) spdlog::set_level(spdlog::level::err);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int iterations = absl::GetFlag(FLAGS_iterations);
  const int clients = absl::GetFlag(FLAGS_clients);
  if (steps < 1 || iterations < 1 || clients < 1 || absl::GetFlag(FLAGS_grid) < 1 ||
      absl::GetFlag(FLAGS_text_tokens) < 1) {
    return Fail(absl::InvalidArgumentError(
        "--steps, --iterations, --clients, --grid and --text_tokens must be >= 1"));
  }
  if (!(absl::GetFlag(FLAGS_seconds) > 0) || absl::GetFlag(FLAGS_queue_capacity) < 0 ||
      absl::GetFlag(FLAGS_bounded_queue) < 0 || !(absl::GetFlag(FLAGS_backoff_ms) >= 0)) {
    return Fail(absl::InvalidArgumentError(
        "need --seconds > 0, --queue_capacity >= 0, --bounded_queue >= 0, --backoff_ms >= 0"));
  }
  std::printf(
      "server_bench: embedded tiny Flux model, %d step(s), %lld image + %lld text tokens, "
      "intra-op threads %d, %u hardware threads\n",
      steps, static_cast<long long>(absl::GetFlag(FLAGS_grid) * absl::GetFlag(FLAGS_grid)),
      static_cast<long long>(absl::GetFlag(FLAGS_text_tokens)), threads,
      std::thread::hardware_concurrency());

  // ---------------------------------------------------------------------------------------------
  // (1) Overhead.
  absl::StatusOr<Served> served = Serve(1, absl::GetFlag(FLAGS_queue_capacity), threads);
  if (!served.ok()) return Fail(served.status());
  absl::StatusOr<Workload> workload = MakeWorkload(
      *served->instance, steps, absl::GetFlag(FLAGS_grid), absl::GetFlag(FLAGS_text_tokens));
  if (!workload.ok()) return Fail(workload.status());
  auto stub = pb::DiffusionService::NewStub(NewChannel(served->server->port()));

  // The same work: served latents equal the in-process ones.
  absl::StatusOr<torch::Tensor> remote = OverGrpc(*stub, workload->request);
  if (!remote.ok()) return Fail(remote.status());
  absl::StatusOr<torch::Tensor> local = InProcess(*served->instance, *workload);
  if (!local.ok()) return Fail(local.status());
  const double diff = (remote->sizes() == local->sizes())
                          ? (*remote - *local).abs().max().item<double>()
                          : std::numeric_limits<double>::infinity();
  if (!(diff <= 1e-6)) {
    return Fail(absl::InternalError(
        absl::StrCat("served latents differ from the in-process ones (max |diff| ", diff, ")")));
  }

  // Three variants per round, in a rotating order: [0] Generate over gRPC, [1] the same work
  // in-process, [2] a near-empty unary RPC.
  constexpr int kVariants = 3;
  std::vector<double> wall[kVariants], cpu[kVariants], paired, server_run, server_queue, rest;
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  for (int i = 0; i < warmup + iterations; ++i) {
    double w[kVariants] = {}, c[kVariants] = {};
    ServerTimes times;
    for (int k = 0; k < kVariants; ++k) {
      const int which = (i + k) % kVariants;
      const double c0 = ProcessCpuSeconds();
      const Clock::time_point t0 = Clock::now();
      absl::Status s;
      if (which == 0) {
        s = OverGrpc(*stub, workload->request, nullptr, &times).status();
      } else if (which == 1) {
        s = InProcess(*served->instance, *workload).status();
      } else {
        s = UnaryRoundTrip(*stub);
      }
      w[which] = Seconds(t0, Clock::now());
      c[which] = ProcessCpuSeconds() - c0;
      if (!s.ok()) return Fail(s);
    }
    if (i < warmup) continue;
    for (int v = 0; v < kVariants; ++v) {
      wall[v].push_back(w[v]);
      cpu[v].push_back(c[v]);
    }
    paired.push_back(w[0] - w[1]);
    server_run.push_back(times.run);
    server_queue.push_back(times.queue);
    rest.push_back(w[0] - times.run - times.queue);
  }
  const double g50 = Quantile(wall[0], 0.5), l50 = Quantile(wall[1], 0.5);
  std::printf(
      "\n(1) Generate overhead, %d rounds (+%d warm-up), variants interleaved in rotating "
      "order; served == in-process (max |diff| %.1e)\n",
      iterations, warmup, diff);
  std::printf("  %-40s %9s %9s %12s\n", "", "p50 ms", "p90 ms", "CPU/call ms");
  const char* names[kVariants] = {"Generate over gRPC on loopback", "in-process (worker's work)",
                                  "unary ListModels over gRPC (floor)"};
  for (int v : {1, 0, 2}) {
    std::printf("  %-40s %9.3f %9.3f %12.3f\n", names[v], Quantile(wall[v], 0.5) * 1e3,
                Quantile(wall[v], 0.9) * 1e3, Quantile(cpu[v], 0.5) * 1e3);
  }
  std::printf(
      "  served call, p50 of its parts: worker run %.3f ms (server-measured), queue wait "
      "%.3f ms, the rest (transport, parsing, hand-offs, client decode) %.3f ms\n",
      Quantile(server_run, 0.5) * 1e3, Quantile(server_queue, 0.5) * 1e3,
      Quantile(rest, 0.5) * 1e3);
  std::printf(
      "  added at p50: %.3f ms wall (median of per-round differences %.3f ms; ratio "
      "%.2fx), %.3f ms CPU -> target <= 1 ms: %s\n",
      (g50 - l50) * 1e3, Quantile(paired, 0.5) * 1e3, l50 > 0 ? g50 / l50 : 0.0,
      (Quantile(cpu[0], 0.5) - Quantile(cpu[1], 0.5)) * 1e3,
      (g50 - l50) <= 1e-3 ? "MET" : "MISSED");
  served->server->Shutdown();
  served = absl::InternalError("released");

  // ---------------------------------------------------------------------------------------------
  // (2) Throughput.
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const double backoff_ms = absl::GetFlag(FLAGS_backoff_ms);
  const int capacity = absl::GetFlag(FLAGS_queue_capacity);
  const int bounded = absl::GetFlag(FLAGS_bounded_queue);
  struct Config {
    int workers, capacity;
  };
  const std::vector<Config> configs = {{1, capacity}, {2, capacity}, {1, bounded}};
  std::printf("\n(2) Throughput: %d concurrent clients, %.1f s each, intra-op threads %d\n",
              clients, seconds, threads);
  std::printf("  %-8s %-6s %9s %8s %9s %7s %10s %14s %11s %6s\n", "workers", "queue", "req/s", "ok",
              "rejected", "errors", "ok p50 ms", "reject p50 ms", "depth/bound", "cores");
  std::vector<double> rates;
  bool bounded_ok = true;
  LoadResult last;
  for (const Config& c : configs) {
    absl::StatusOr<Served> s = Serve(c.workers, c.capacity, threads);
    if (!s.ok()) return Fail(s.status());
    last = Load(*s, workload->request, clients, seconds, backoff_ms);
    s->server->Shutdown();
    const LoadResult& r = last;
    const double rate = static_cast<double>(r.ok) / r.seconds;
    rates.push_back(rate);
    std::printf("  %-8d %-6d %9.1f %8lld %9lld %7lld %10.2f %14.3f %8.0f/%-2d %6.2f\n", c.workers,
                c.capacity, rate, static_cast<long long>(r.ok), static_cast<long long>(r.rejected),
                static_cast<long long>(r.other), Quantile(r.ok_latency, 0.5) * 1e3,
                Quantile(r.rejected_latency, 0.5) * 1e3, r.max_queue_depth, c.capacity + c.workers,
                r.cpu_seconds / r.seconds);
    if (r.max_queue_depth > c.capacity + c.workers || r.other > 0) bounded_ok = false;
  }
  const unsigned cores = std::thread::hardware_concurrency();
  std::printf(
      "  2 workers / 1 worker: %.2fx (ideal: min(2, hardware threads / intra-op threads) "
      "= %.2fx; %u hardware threads, shared with whatever else runs)\n",
      rates[1] / rates[0], std::min(2.0, static_cast<double>(cores) / std::max(1, threads)), cores);
  std::printf(
      "  bounded queue (1 worker, capacity %d, %d clients): %lld of %lld calls "
      "RESOURCE_EXHAUSTED, p50 %.3f ms / p90 %.3f ms to the rejection vs. %.2f ms p50 "
      "for a served call; bounded requests/s %.1f = %.2fx the capacity-%d run\n",
      bounded, clients, static_cast<long long>(last.rejected),
      static_cast<long long>(last.rejected + last.ok + last.other),
      Quantile(last.rejected_latency, 0.5) * 1e3, Quantile(last.rejected_latency, 0.9) * 1e3,
      Quantile(last.ok_latency, 0.5) * 1e3, rates[2], rates[2] / rates[0], capacity);
  std::printf(
      "  queue depth never above its bound (capacity + workers) and no other errors: %s "
      "(%lld gauge samples in the last run)\n",
      bounded_ok ? "yes" : "NO", static_cast<long long>(last.depth_samples));
  return bounded_ok ? 0 : 1;
}

}  // namespace
}  // namespace ds

int main(int argc, char** argv) { return ds::Main(argc, argv); }
