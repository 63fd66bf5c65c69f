// The benchmark suite (issue 9): one Google Benchmark binary measuring, in one run, every figure
// the performance work is judged by, each next to the reference it is a ratio of:
//
//   matmul/...            torch::mm GFLOP/s on square matrices (float32, bfloat16): the machine's
//                         matrix-product throughput, the reference of every forward figure;
//   forward/...           Flux transformer forward at several sizes, achieved GFLOP/s (analytic
//                         count, bench_util.h) -> % of the float32 matmul GFLOP/s;
//   pipeline/...          FluxPipeline time per denoising step vs the bare forward at its shapes;
//   lora/...              LoraHost::Load of a ~20 MB LoRA vs reading its bytes once; the forward
//                         with 1 and 4 unfused rank-16 adapters vs the base forward;
//   single_file/...       LoadSingleFile of a BFL-format bf16 checkpoint vs reading it once, and
//                         its peak resident memory growth / file size;
//   grpc/...              Generate over gRPC on loopback vs the same work in-process, and a
//                         near-empty unary RPC (the transport's floor);
//   cache/...             a 28-step generation uncached vs each step cache (speedup, PSNR of the
//                         image vs the uncached one, skipped forwards), on random weights and on
//                         the trained embedded default (cache_tiny/..., flux-tiny);
//   casting/...           the forward with weights stored in bf16/fp16/8-bit vs float32: resident
//                         weight bytes ratio, time ratio, max relative error;
//   offload/...           the forward with block-level group offloading vs resident: time ratio,
//                         peak resident growth vs one group.
//
// Repetitions of all benchmarks are randomly interleaved (Google Benchmark's
// --benchmark_enable_random_interleaving), so a subject and its reference see the same machine
// load; medians over repetitions are reported. With --report=FILE the results are written as
// Markdown (BENCHMARKS.md: machine, command, tables of ratios).
//
//   build/bench/benchmarks [--report=BENCHMARKS.md] [--threads=N] [--repetitions=3] [--quick]
//                          [--benchmark_filter=REGEX] [other --benchmark_* flags]
//
// --quick shrinks every configuration (seconds in all; the ctest smoke run uses it).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/bench_util.h"
#include "bench/server_workload.h"
#include "handlers/block_cache.h"
#include "handlers/group_offloading.h"
#include "handlers/layerwise_casting.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/threads.h"
#include "models/flux/spec.h"
#include "server/model_manager.h"
#include "testing/lora_util.h"

ABSL_FLAG(std::string, report, "",
          "write the results as Markdown to this file (e.g. BENCHMARKS.md)");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0 = all cores)");
ABSL_FLAG(int, repetitions, 3, "repetitions of every benchmark (medians reported)");
ABSL_FLAG(bool, quick, false, "tiny configurations (a smoke run: seconds, numbers meaningless)");
ABSL_FLAG(std::string, dir, "/tmp", "directory for temporary files (checkpoints, LoRAs)");

namespace ds::bench {
namespace {

bool Quick() { return absl::GetFlag(FLAGS_quick); }

std::string TempPath(const std::string& tag) {
  return absl::StrCat(absl::GetFlag(FLAGS_dir), "/ds_benchmarks_", getpid(), "_", tag);
}

// Files the run creates, removed at exit.
std::vector<std::string>& TempFiles() {
  static auto* files = new std::vector<std::string>();
  return *files;
}

// Fails the benchmark with the status (Google Benchmark then reports the error instead of times).
bool Check(benchmark::State& state, const absl::Status& s) {
  if (s.ok()) return true;
  state.SkipWithError(s.ToString().c_str());
  return false;
}

// ---------------------------------------------------------------------------------------------
// Shapes

struct ForwardSize {
  std::string name;
  int64_t layers, single_layers, heads, head_dim, img_tokens, txt_tokens;
};

// "mid" is the foundation issue's benchmark configuration (flux_forward_bench's defaults).
std::vector<ForwardSize> ForwardSizes() {
  if (Quick()) return {{"mid", 1, 1, 2, 32, 64, 16}};
  return {{"small", 2, 4, 8, 64, 256, 64},
          {"mid", 4, 8, 12, 64, 1024, 128},
          {"large", 2, 4, 16, 64, 1024, 128}};
}

nlohmann::json ShapeOf(const ForwardSize& s) {
  return FluxShape(s.layers, s.single_layers, s.heads, s.head_dim);
}

// A random model per (config, options), built once and kept for the run.
const DiffusionModel& CachedFlux(const std::string& key, const nlohmann::json& config,
                                 const ModelOptions& options, absl::Status* status) {
  static auto* models = new std::map<std::string, std::shared_ptr<DiffusionModel>>();
  auto it = models->find(key);
  if (it == models->end()) {
    absl::StatusOr<std::shared_ptr<DiffusionModel>> m =
        BuildRandomModel("FluxTransformer2DModel", config, options, 0);
    if (!m.ok()) {
      *status = m.status();
      static auto* none = new std::shared_ptr<DiffusionModel>();
      return **none;  // never dereferenced: callers check `status` first
    }
    it = models->emplace(key, *std::move(m)).first;
  }
  *status = absl::OkStatus();
  return *it->second;
}

// ---------------------------------------------------------------------------------------------
// matmul

void BM_MatMul(benchmark::State& state, int64_t n, torch::Dtype dtype) {
  torch::InferenceMode guard;
  const auto a = torch::randn({n, n}).to(dtype);
  const auto b = torch::randn({n, n}).to(dtype);
  auto c = torch::empty({n, n}, torch::TensorOptions().dtype(dtype));
  for (auto _ : state) at::mm_out(c, a, b);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(n * n * n) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------------------------
// forward

void BM_Forward(benchmark::State& state, ForwardSize size, torch::Dtype dtype) {
  ModelOptions options;
  options.dtype = dtype;
  absl::Status s;
  const DiffusionModel& model =
      CachedFlux(absl::StrCat(size.name, "/", c10::toString(dtype)), ShapeOf(size), options, &s);
  if (!Check(state, s)) return;
  const auto cfg = flux::FluxConfig::FromJson(model.config());
  if (!cfg.ok() && !Check(state, cfg.status())) return;
  const TensorMap in = FluxForwardInputs(*cfg, size.img_tokens, size.txt_tokens, 1);
  for (auto _ : state) {
    absl::StatusOr<torch::Tensor> out = model.Forward(in);
    if (!Check(state, out.status())) return;
    benchmark::DoNotOptimize(out->data_ptr());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(FluxForwardFlops(*cfg, 1, size.img_tokens, size.txt_tokens) / 1e9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

// ---------------------------------------------------------------------------------------------
// pipeline: pipeline_bench's configuration (2+4 blocks, 8 x 64, 256 px, 128 text tokens)

struct PipelineFixture {
  RandomPipeline built;
  flux::FluxPipelineRequest request;
  TensorMap bare_inputs;
};

PipelineFixture* Pipeline(absl::Status* status) {
  static PipelineFixture* fixture = nullptr;
  static absl::Status error;
  if (fixture == nullptr && error.ok()) {
    nlohmann::json config = Quick() ? FluxShape(1, 1, 2, 32) : FluxShape(2, 4, 8, 64);
    config["joint_attention_dim"] = 1024;
    config["pooled_projection_dim"] = 256;
    absl::StatusOr<RandomPipeline> built = BuildRandomFluxPipeline(
        config, Quick() ? std::vector<int64_t>{8, 16} : std::vector<int64_t>{32, 64, 128, 128});
    if (!built.ok()) {
      error = built.status();
    } else {
      fixture = new PipelineFixture{*std::move(built), {}, {}};
      const int64_t size = Quick() ? 32 : 256, txt = Quick() ? 16 : 128;
      fixture->request = RandomPromptRequest(*fixture->built.pipeline, size, txt, 4, 0);
      const int64_t s = fixture->built.pipeline->vae_scale_factor() * 2;
      fixture->bare_inputs = FluxForwardInputs(fixture->built.pipeline->transformer_config(),
                                               (size / s) * (size / s), txt, 2);
    }
  }
  *status = error;
  return fixture;
}

// Manual time: the median step of a 4-step Generate (callback to callback: timestep tensor,
// forward, scheduler step, bookkeeping).
void BM_PipelineStep(benchmark::State& state) {
  absl::Status s;
  PipelineFixture* f = Pipeline(&s);
  if (!Check(state, s)) return;
  std::vector<double> steps;
  Clock::time_point last;
  auto on_step = [&](int step, int) {
    const auto now = Clock::now();
    if (step > 0) steps.push_back(Seconds(last, now));
    last = now;
    return absl::OkStatus();
  };
  for (auto _ : state) {
    steps.clear();
    auto r = f->built.pipeline->Generate(f->request, on_step);
    if (!Check(state, r.status())) return;
    state.SetIterationTime(Median(steps));
  }
}

void BM_PipelineBareForward(benchmark::State& state) {
  absl::Status s;
  PipelineFixture* f = Pipeline(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) {
    auto r = f->built.components.transformer->Forward(f->bare_inputs);
    if (!Check(state, r.status())) return;
  }
}

// ---------------------------------------------------------------------------------------------
// lora

struct LoraFixture {
  std::shared_ptr<LoraHost> host;
  std::string file;  // the ~20 MB LoRA
  int64_t file_bytes = 0;
  TensorMap inputs;
  AdapterStackPtr one, four;
};

LoraFixture* Lora(absl::Status* status) {
  static LoraFixture* fixture = nullptr;
  static absl::Status error;
  if (fixture != nullptr || !error.ok()) {
    *status = error;
    return fixture;
  }
  auto build = [&]() -> absl::StatusOr<LoraFixture*> {
    const nlohmann::json config = Quick() ? FluxShape(1, 1, 2, 32) : FluxShape(2, 4, 8, 64);
    ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find("flux"));
    ASSIGN_OR_RETURN(std::shared_ptr<DiffusionModel> model,
                     BuildRandomModel("flux", config, ModelOptions{}, 0));
    auto f = std::make_unique<LoraFixture>();
    f->host = std::make_shared<LoraHost>(model, spec->lora);
    const TensorMap params = NamedTensors(model->module());
    const std::vector<std::string> modules = test::LinearModules(params);
    const int64_t bytes = Quick() ? 1000000 : 20000000;
    const int64_t rank = std::max<int64_t>(1, test::RankForBytes(params, modules, bytes));
    f->file = TempPath("lora_20mb.safetensors");
    TempFiles().push_back(f->file);
    RETURN_IF_ERROR(WriteSafetensors(f->file, test::MakeDiffusersLora(params, modules, rank, 7)));
    f->file_bytes = FileSize(f->file);
    std::vector<AdapterRequest> stack;
    for (int i = 0; i < 4; ++i) {
      const std::string path = TempPath(absl::StrCat("lora_r16_", i, ".safetensors"));
      TempFiles().push_back(path);
      RETURN_IF_ERROR(
          WriteSafetensors(path, test::MakeDiffusersLora(params, modules, 16, 100 + i)));
      const std::string name = absl::StrCat("a", i);
      RETURN_IF_ERROR(f->host->Load(name, path).status());
      stack.push_back({name, 1.0});
    }
    ASSIGN_OR_RETURN(f->one, f->host->Snapshot({stack[0]}));
    ASSIGN_OR_RETURN(f->four, f->host->Snapshot(stack));
    ASSIGN_OR_RETURN(const flux::FluxConfig cfg, flux::FluxConfig::FromJson(model->config()));
    f->inputs = FluxForwardInputs(cfg, Quick() ? 64 : 1024, Quick() ? 16 : 128, 3);
    return f.release();
  };
  absl::StatusOr<LoraFixture*> f = build();
  if (f.ok()) {
    fixture = *f;
  } else {
    error = f.status();
  }
  *status = error;
  return fixture;
}

void BM_LoraReadFile(benchmark::State& state) {
  absl::Status s;
  LoraFixture* f = Lora(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) benchmark::DoNotOptimize(ReadFileOnce(f->file));
  state.counters["MB"] = static_cast<double>(f->file_bytes) / 1e6;
}

// Manual time: Load only (the Unload after it is not timed). The file's mtime is renewed first so
// that a digest cache keyed by the file's identity cannot turn this into a cache hit.
void BM_LoraLoad(benchmark::State& state) {
  absl::Status s;
  LoraFixture* f = Lora(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) {
    ::utimensat(AT_FDCWD, f->file.c_str(), nullptr, 0);
    const auto t0 = Clock::now();
    auto r = f->host->Load("bench", f->file);
    state.SetIterationTime(Since(t0));
    if (!Check(state, r.status())) return;
    if (!Check(state, f->host->Unload("bench"))) return;
  }
  state.counters["MB"] = static_cast<double>(f->file_bytes) / 1e6;
}

void BM_LoraForward(benchmark::State& state, int adapters) {
  absl::Status s;
  LoraFixture* f = Lora(&s);
  if (!Check(state, s)) return;
  const AdapterStack* stack =
      adapters == 0 ? nullptr : (adapters == 1 ? f->one.get() : f->four.get());
  for (auto _ : state) {
    auto r = f->host->Forward(f->inputs, stack);
    if (!Check(state, r.status())) return;
  }
}

// ---------------------------------------------------------------------------------------------
// single file

std::string SingleFilePath(absl::Status* status) {
  static std::string path;
  static absl::Status error;
  if (path.empty() && error.ok()) {
    const std::string p = TempPath("bfl.safetensors");
    const auto infos = Quick() ? BflCheckpointLayout(256, 1, 1) : BflCheckpointLayout(1024, 4, 8);
    error = WriteBflCheckpoint(p, infos);
    if (error.ok()) {
      path = p;
      TempFiles().push_back(p);
      ReadFileOnce(p);  // into the page cache
    }
  }
  *status = error;
  return path;
}

void BM_SingleFileRead(benchmark::State& state) {
  absl::Status s;
  const std::string path = SingleFilePath(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) benchmark::DoNotOptimize(ReadFileOnce(path));
  state.counters["MB"] = static_cast<double>(FileSize(path)) / 1e6;
}

// Manual time: LoadSingleFile in bf16 (zero-copy from the mapping); the model is freed untimed.
// peak_rss_x_file: the growth of the peak resident size while loading / the file size.
void BM_SingleFileLoad(benchmark::State& state) {
  absl::Status s;
  const std::string path = SingleFilePath(&s);
  if (!Check(state, s)) return;
  std::vector<double> peaks;
  for (auto _ : state) {
    SingleFileOptions options;
    options.model.dtype = torch::kBFloat16;
    ResetPeakResidentMemory();
    const int64_t base = StatusKiB("VmRSS:");
    const auto t0 = Clock::now();
    auto loaded = LoadSingleFile(path, options);
    state.SetIterationTime(Since(t0));
    if (!Check(state, loaded.status())) return;
    peaks.push_back(static_cast<double>(StatusKiB("VmHWM:") - base) * 1024);
  }
  const double file = static_cast<double>(FileSize(path));
  state.counters["peak_rss_x_file"] = Median(peaks) / file;
  state.counters["MB"] = file / 1e6;
}

// ---------------------------------------------------------------------------------------------
// grpc: server_bench's overhead part, on the embedded default (1 step, 4x4 latent grid)

struct GrpcFixture {
  Served served;
  Workload workload;
  std::unique_ptr<pb::DiffusionService::Stub> stub;
};

GrpcFixture* Grpc(absl::Status* status) {
  static GrpcFixture* fixture = nullptr;
  static absl::Status error;
  if (fixture == nullptr && error.ok()) {
    absl::StatusOr<Served> served = Serve(1, 16, absl::GetFlag(FLAGS_threads));
    if (!served.ok()) {
      error = served.status();
    } else {
      absl::StatusOr<Workload> w = MakeWorkload(*served->instance, 1, 4, 8);
      if (!w.ok()) {
        error = w.status();
      } else {
        fixture = new GrpcFixture{*std::move(served), *std::move(w), nullptr};
        fixture->stub = pb::DiffusionService::NewStub(NewChannel(fixture->served.server->port()));
      }
    }
  }
  *status = error;
  return fixture;
}

void BM_GrpcGenerate(benchmark::State& state) {
  absl::Status s;
  GrpcFixture* f = Grpc(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) {
    if (!Check(state, OverGrpc(*f->stub, f->workload.request).status())) return;
  }
}

void BM_GrpcInProcess(benchmark::State& state) {
  absl::Status s;
  GrpcFixture* f = Grpc(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) {
    if (!Check(state, InProcess(*f->served.instance, f->workload).status())) return;
  }
}

void BM_GrpcUnary(benchmark::State& state) {
  absl::Status s;
  GrpcFixture* f = Grpc(&s);
  if (!Check(state, s)) return;
  for (auto _ : state) {
    if (!Check(state, UnaryRoundTrip(*f->stub))) return;
  }
}

// ---------------------------------------------------------------------------------------------
// cache: cache_bench's configuration (2+4 blocks, 2 x 32, 64 px, 28 steps, random weights)

struct CacheFixture {
  RandomPipeline built;
  flux::FluxPipelineRequest request;
  torch::Tensor reference;  // the uncached image
  auto Generate(const flux::FluxPipelineRequest& r) const { return built.pipeline->Generate(r); }
};

CacheFixture* Cache(absl::Status* status) {
  static CacheFixture* fixture = nullptr;
  static absl::Status error;
  if (fixture == nullptr && error.ok()) {
    nlohmann::json config = FluxShape(Quick() ? 1 : 2, Quick() ? 1 : 4, 2, 32);
    config["joint_attention_dim"] = 256;
    config["pooled_projection_dim"] = 128;
    absl::StatusOr<RandomPipeline> built = BuildRandomFluxPipeline(config, {16, 32});
    if (!built.ok()) {
      error = built.status();
    } else {
      fixture = new CacheFixture{*std::move(built), {}, {}};
      fixture->request =
          RandomPromptRequest(*fixture->built.pipeline, Quick() ? 16 : 64, 64, Quick() ? 6 : 28, 0);
      fixture->request.decode = true;
      auto r = fixture->built.pipeline->Generate(fixture->request);
      if (r.ok()) {
        fixture->reference = r->image;
      } else {
        error = r.status();
      }
    }
  }
  *status = error;
  return fixture;
}

// One cached generation per iteration (`pipeline->Generate(request)` with `cache` set); counters:
// the PSNR of the last image against the fixture's uncached `reference`, the skipped forwards.
template <typename Fixture, typename Request>
void RunCacheBenchmark(benchmark::State& state, Fixture* (*fixture)(absl::Status*),
                       std::optional<BlockCacheConfig> cache) {
  absl::Status s;
  Fixture* f = fixture(&s);
  if (!Check(state, s)) return;
  Request request = f->request;
  request.cache = cache;
  torch::Tensor image;
  int64_t skipped = 0;
  for (auto _ : state) {
    auto r = f->Generate(request);
    if (!Check(state, r.status())) return;
    image = r->image;
    skipped = r->cache_skipped_steps;
  }
  state.counters["psnr_db"] = std::min(Psnr(image, f->reference, 1.0), 999.0);
  state.counters["skipped"] = static_cast<double>(skipped);
}

void BM_Cache(benchmark::State& state, std::optional<BlockCacheConfig> cache) {
  RunCacheBenchmark<CacheFixture, flux::FluxPipelineRequest>(state, Cache, cache);
}

// ---------------------------------------------------------------------------------------------
// cache_tiny: the trained embedded default (flux-tiny, written and loaded as the server does), a
// 28-step generation of 32x32 images for four captions (a trained model's head-block residual
// changes far less between steps than random weights')

struct TinyCacheFixture {
  std::shared_ptr<server::ModelManager> models;
  server::InstancePtr instance;
  PipelineRequest request;
  torch::Tensor reference;  // the uncached images
  auto Generate(const PipelineRequest& r) const { return instance->pipeline->Generate(r); }
};

TinyCacheFixture* TinyCache(absl::Status* status) {
  static TinyCacheFixture* fixture = nullptr;
  static absl::Status error;
  if (fixture == nullptr && error.ok()) {
    auto f = std::make_unique<TinyCacheFixture>();
    f->models = std::make_shared<server::ModelManager>(server::ModelManagerOptions{});
    const std::string root = TempPath("flux-tiny");
    TempFiles().push_back(root);
    auto loaded = f->models->LoadDemo("flux-tiny", root, "flux-tiny");
    if (!loaded.ok()) {
      error = loaded.status();
    } else {
      f->instance = loaded->instance;
      const auto& shapes = flux::FluxTinyShapes();
      const auto& colours = flux::FluxTinyColours();
      for (size_t i = 0; i < 4; ++i) {
        f->request.prompt.push_back(flux::FluxTinyCaption(
            colours[i % colours.size()], shapes[i % shapes.size()],
            colours[(i + 2) % colours.size()]));
      }
      f->request.height = f->request.width = 32;
      f->request.num_inference_steps = Quick() ? 6 : 28;
      f->request.seed = 0;
      auto r = f->instance->pipeline->Generate(f->request);
      if (r.ok()) {
        f->reference = r->image;
        fixture = f.release();
      } else {
        error = r.status();
      }
    }
  }
  *status = error;
  return fixture;
}

void BM_TinyCache(benchmark::State& state, std::optional<BlockCacheConfig> cache) {
  RunCacheBenchmark<TinyCacheFixture, PipelineRequest>(state, TinyCache, cache);
}

// ---------------------------------------------------------------------------------------------
// casting: the forward size "small" with weights stored low

void BM_Casting(benchmark::State& state, std::string storage, bool all_linears) {
  const ForwardSize size = ForwardSizes().front();
  absl::Status s;
  const DiffusionModel& fp32 = CachedFlux(size.name + "/Float", ShapeOf(size), {}, &s);
  if (!Check(state, s)) return;
  const auto cfg = flux::FluxConfig::FromJson(fp32.config());
  if (!cfg.ok() && !Check(state, cfg.status())) return;
  const TensorMap in = FluxForwardInputs(*cfg, size.img_tokens, size.txt_tokens, 1);
  std::unique_ptr<DiffusionModel> owned;
  const DiffusionModel* model = &fp32;
  if (!storage.empty()) {
    ModelOptions options;
    if (!Check(state, SetStorageDtype(storage, options))) return;
    if (all_linears) {
      options.layerwise_casting_skip_patterns =
          std::vector<std::string>{"pos_embed", "patch_embed", "^proj_in$", "^proj_out$"};
    }
    absl::StatusOr<const ModelSpec*> spec = ModelRegistry::Global().Find("flux");
    if (!Check(state, spec.status())) return;
    absl::StatusOr<std::unique_ptr<DiffusionModel>> m = (*spec)->factory(fp32.config(), options);
    if (!Check(state, m.status())) return;
    // A float checkpoint in the model's storage form (8-bit: quantized into codes and scales).
    absl::StatusOr<TensorMap> weights =
        ToStorageForm((*m)->module(), NamedTensors(fp32.module()), options.float8_format);
    if (!Check(state, weights.status())) return;
    if (!Check(state, LoadStateDict((*m)->module(), *weights))) return;
    owned = *std::move(m);
    model = owned.get();
  }
  torch::Tensor out;
  for (auto _ : state) {
    absl::StatusOr<torch::Tensor> r = model->Forward(in);
    if (!Check(state, r.status())) return;
    out = *r;
  }
  const torch::Tensor ref = *fp32.Forward(in);
  state.counters["weight_bytes_x_fp32"] = static_cast<double>(ParameterBytes(model->module())) /
                                          static_cast<double>(ParameterBytes(fp32.module()));
  state.counters["max_rel_err"] =
      (out - ref).abs().max().item<double>() / ref.abs().max().item<double>();
}

// ---------------------------------------------------------------------------------------------
// offload: block-level group offloading to disk (1 block per group) vs the resident model

struct OffloadFixture {
  std::shared_ptr<DiffusionModel> resident, offloaded;
  TensorMap inputs;
  double largest_group = 0;  // bytes
};

OffloadFixture* Offload(absl::Status* status, bool prefetch) {
  static OffloadFixture* fixtures[2] = {nullptr, nullptr};
  static absl::Status error;
  OffloadFixture*& fixture = fixtures[prefetch ? 1 : 0];
  if (fixture != nullptr || !error.ok()) {
    *status = error;
    return fixture;
  }
  auto build = [&]() -> absl::StatusOr<OffloadFixture*> {
    const nlohmann::json config = Quick() ? FluxShape(1, 2, 2, 32) : FluxShape(4, 8, 8, 64);
    ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find("flux"));
    auto f = std::make_unique<OffloadFixture>();
    ASSIGN_OR_RETURN(f->resident, BuildRandomModel("flux", config, ModelOptions{}, 0));
    ModelOptions options;
    GroupOffloadingOptions offload;
    offload.blocks_per_group = 1;
    offload.prefetch = prefetch;
    offload.offload_dir = absl::GetFlag(FLAGS_dir);
    options.group_offloading = offload;
    ASSIGN_OR_RETURN(std::unique_ptr<DiffusionModel> m, spec->factory(config, options));
    RETURN_IF_ERROR(LoadStateDict(m->module(), NamedTensors(f->resident->module())));
    RETURN_IF_ERROR(ApplyGroupOffloading(*spec, *m));
    f->offloaded = std::move(m);
    ASSIGN_OR_RETURN(const flux::FluxConfig cfg, flux::FluxConfig::FromJson(config));
    f->inputs = FluxForwardInputs(cfg, Quick() ? 64 : 1024, Quick() ? 16 : 128, 4);
    const GroupOffloader* offloader = f->offloaded->group_offloader();
    if (offloader == nullptr) return absl::InternalError("no offloader installed");
    for (int64_t b : offloader->stats().group_bytes) {
      f->largest_group = std::max(f->largest_group, static_cast<double>(b));
    }
    return f.release();
  };
  absl::StatusOr<OffloadFixture*> f = build();
  if (f.ok()) {
    fixture = *f;
  } else {
    error = f.status();
  }
  *status = error;
  return fixture;
}

// Peak resident growth during one forward of `model` (bytes).
double ForwardPeakGrowth(const DiffusionModel& model, const TensorMap& in, absl::Status* s) {
  ResetPeakResidentMemory();
  const int64_t base = StatusKiB("VmRSS:");
  *s = model.Forward(in).status();
  return static_cast<double>(StatusKiB("VmHWM:") - base) * 1024;
}

// offload/resident and offload/disk[_prefetch]; peak_x_group_plus_act: the offloaded forward's
// peak resident growth / (largest group + the resident forward's peak growth = activations).
void BM_Offload(benchmark::State& state, bool offloaded, bool prefetch) {
  absl::Status s;
  OffloadFixture* f = Offload(&s, prefetch);
  if (!Check(state, s)) return;
  const DiffusionModel& model = offloaded ? *f->offloaded : *f->resident;
  for (auto _ : state) {
    if (!Check(state, model.Forward(f->inputs).status())) return;
  }
  const double activations = ForwardPeakGrowth(*f->resident, f->inputs, &s);
  if (!Check(state, s)) return;
  if (offloaded) {
    const double peak = ForwardPeakGrowth(model, f->inputs, &s);
    if (!Check(state, s)) return;
    state.counters["peak_x_group_plus_act"] = peak / (f->largest_group + activations);
    state.counters["group_MB"] = f->largest_group / 1e6;
  }
  state.counters["activations_MB"] = activations / 1e6;
  state.counters["weights_MB"] = static_cast<double>(ParameterBytes(f->resident->module())) / 1e6;
}

// ---------------------------------------------------------------------------------------------
// The report

// The registered cache and casting benchmarks, in registration order (filled by Register).
std::vector<std::string>& CacheNames() {
  static auto* names = new std::vector<std::string>();
  return *names;
}
std::vector<std::string>& TinyCacheNames() {
  static auto* names = new std::vector<std::string>();
  return *names;
}
std::vector<std::string>& CastingNames() {
  static auto* names = new std::vector<std::string>();
  return *names;
}

struct Result {
  std::vector<double> seconds;  // per repetition, per iteration
  std::map<std::string, std::vector<double>> counters;
  std::string error;
};

class CollectingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      Result& r = results_[run.benchmark_name()];
      if (run.error_occurred) {
        r.error = run.error_message;
        continue;
      }
      r.seconds.push_back(run.real_accumulated_time / static_cast<double>(run.iterations));
      for (const auto& [name, c] : run.counters) r.counters[name].push_back(c.value);
    }
    ConsoleReporter::ReportRuns(runs);
  }
  const std::map<std::string, Result>& results() const { return results_; }

 private:
  std::map<std::string, Result> results_;
};

// A run's name without Google Benchmark's suffixes ("/min_time:0.300", "/repeats:3",
// "/iterations:1", "/real_time", "/manual_time"): the name it was registered under.
std::string Strip(const std::string& name) {
  std::vector<std::string> kept;
  for (absl::string_view part : absl::StrSplit(name, '/')) {
    if (absl::StrContains(part, ':') || part == "real_time" || part == "manual_time") continue;
    kept.emplace_back(part);
  }
  return absl::StrJoin(kept, "/");
}

// Every registered benchmark name (filled by Register).
std::vector<std::string>& RegisteredNames() {
  static auto* names = new std::vector<std::string>();
  return *names;
}

class Report {
 public:
  explicit Report(const std::map<std::string, Result>& raw) {
    for (const auto& [name, r] : raw) results_[Strip(name)] = r;
  }
  bool Has(const std::string& n) const {
    auto it = results_.find(n);
    return it != results_.end() && it->second.error.empty() && !it->second.seconds.empty();
  }
  double Sec(const std::string& n) const { return Median(results_.at(n).seconds); }
  double Counter(const std::string& n, const std::string& c) const {
    auto it = results_.at(n).counters.find(c);
    return it == results_.at(n).counters.end() ? NAN : Median(it->second);
  }
  std::string Error(const std::string& n) const {
    auto it = results_.find(n);
    if (it == results_.end()) return "not run";
    return it->second.error.empty() ? "" : it->second.error;
  }

 private:
  std::map<std::string, Result> results_;
};

std::string ReadFirstLine(const std::string& path, const std::string& prefix) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(prefix, 0) == 0) {
      const auto colon = line.find(':');
      std::string v = colon == std::string::npos ? line : line.substr(colon + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  return "?";
}

std::string Ms(double s) { return absl::StrFormat("%.2f ms", s * 1e3); }
std::string Ratio(double r) { return absl::StrFormat("%.3f", r); }

void WriteReport(const std::string& path, const Report& r, const std::string& command,
                 double wall_s) {
  std::ostringstream o;
  o << "# Benchmarks\n\n"
    << "Written by `build/bench/benchmarks` (bench/benchmarks.cc). Every figure is a ratio to a "
       "reference measured in the same run; repetitions of all benchmarks are randomly interleaved "
       "so subjects and references see the same machine load; medians over repetitions.\n\n"
    << "Regenerate: `make benchmarks` (runs `" << command << "`).\n\n";
  o << "## Machine\n\n"
    << "- CPU: " << ReadFirstLine("/proc/cpuinfo", "model name") << ", "
    << std::thread::hardware_concurrency() << " logical cores\n"
    << "- Memory: " << ReadFirstLine("/proc/meminfo", "MemTotal") << "\n"
    << "- LibTorch " << TORCH_VERSION << ", " << torch::get_num_threads() << " intra-op threads\n"
    << "- Load average at the end: " << LoadAverage() << "\n"
    << "- Suite wall time: " << absl::StrFormat("%.0f s", wall_s) << "\n";
  if (Quick()) o << "- **--quick run: tiny configurations, the numbers are meaningless**\n";
  o << "\n";

  auto missing = [&](const std::string& n) {
    return absl::StrCat("| ", n, " | not measured: ", r.Error(n), " |\n");
  };

  o << "## Matrix products and the transformer forward\n\n"
    << "The forward's achieved GFLOP/s (analytic count of its matrix products and attention, "
       "bench/bench_util.h) next to `torch::mm` on square float32 matrices. Target: the mid size "
       "(the foundation issue's configuration: 4+8 blocks, 12 heads x 64, 1024 image + 128 text "
       "tokens) >= 70% of the float32 matmul GFLOP/s.\n\n";
  const int64_t big = Quick() ? 256 : 2048;
  const std::string ref_name = absl::StrCat("matmul/float32/", big);
  const double ref = r.Has(ref_name) ? r.Counter(ref_name, "GFLOP/s") : NAN;
  o << "| benchmark | time | GFLOP/s | vs fp32 matmul " << big << " |\n|---|---|---|---|\n";
  for (const std::string& n :
       {std::string("matmul/float32/") + std::to_string(Quick() ? 128 : 1024), ref_name,
        std::string("matmul/bfloat16/") + std::to_string(Quick() ? 128 : 1024)}) {
    if (!r.Has(n)) {
      o << missing(n);
      continue;
    }
    o << "| " << n << " | " << Ms(r.Sec(n)) << " | "
      << absl::StrFormat("%.1f", r.Counter(n, "GFLOP/s")) << " | "
      << absl::StrFormat("%.0f%%", 100 * r.Counter(n, "GFLOP/s") / ref) << " |\n";
  }
  for (const ForwardSize& s : ForwardSizes()) {
    for (const char* dt : {"float32", "bfloat16"}) {
      const std::string n = absl::StrCat("forward/", dt, "/", s.name);
      if (std::string(dt) == "bfloat16" && s.name != "mid") continue;
      if (!r.Has(n)) {
        o << missing(n);
        continue;
      }
      o << "| " << n << " (" << s.layers << "+" << s.single_layers << " blocks, " << s.heads << "x"
        << s.head_dim << ", " << s.img_tokens << "+" << s.txt_tokens << " tokens) | "
        << Ms(r.Sec(n)) << " | " << absl::StrFormat("%.1f", r.Counter(n, "GFLOP/s")) << " | "
        << absl::StrFormat("**%.0f%%**", 100 * r.Counter(n, "GFLOP/s") / ref) << " |\n";
    }
  }
  o << "\nbfloat16 on a CPU without AVX512-BF16/AMX is computed in float32 and rounded per "
       "operation (models/flux/transformer.h), so its forward is compared with the float32 "
       "matmul too.\n\n";

  o << "## Pipeline step\n\n";
  if (r.Has("pipeline/step") && r.Has("pipeline/bare_forward")) {
    o << "FluxPipeline time per denoising step (2+4 blocks, 8x64, 256 px, 128 text tokens; "
         "median step of a 4-step Generate) vs the bare transformer forward at its shapes: "
      << Ms(r.Sec("pipeline/step")) << " vs " << Ms(r.Sec("pipeline/bare_forward")) << " = **"
      << Ratio(r.Sec("pipeline/step") / r.Sec("pipeline/bare_forward"))
      << "x** (target <= 1.05).\n\n";
  } else {
    o << "not measured: " << r.Error("pipeline/step") << r.Error("pipeline/bare_forward") << "\n\n";
  }

  o << "## LoRA\n\n| benchmark | time | ratio |\n|---|---|---|\n";
  if (r.Has("lora/read_file") && r.Has("lora/load")) {
    o << "| read the " << absl::StrFormat("%.0f MB", r.Counter("lora/load", "MB"))
      << " LoRA once (page cache) | " << Ms(r.Sec("lora/read_file")) << " | 1 |\n"
      << "| LoraHost::Load of it (diffusers/PEFT, every linear) | " << Ms(r.Sec("lora/load"))
      << " | **" << Ratio(r.Sec("lora/load") / r.Sec("lora/read_file")) << "x** the read |\n";
  } else {
    o << missing("lora/load");
  }
  for (const char* n : {"lora/forward/base", "lora/forward/unfused_1", "lora/forward/unfused_4"}) {
    if (!r.Has(n)) {
      o << missing(n);
      continue;
    }
    o << "| " << n << " (rank 16 on every linear) | " << Ms(r.Sec(n)) << " | **"
      << Ratio(r.Sec(n) / r.Sec("lora/forward/base")) << "x** the base forward |\n";
  }

  o << "\n## Single-file load\n\n";
  if (r.Has("single_file/read") && r.Has("single_file/load")) {
    o << absl::StrFormat(
        "A BFL-format bf16 checkpoint of %.0f MB loaded with LoadSingleFile (bf16): %s vs %s to "
        "read it once = **%.2fx** the read; peak resident growth while loading **%.3fx** the "
        "file size. Loading in the file's dtype is zero-copy: the weights are views of the "
        "memory-mapped file, paged in by the first forward, so the load reads only the header "
        "and checks shapes (bench/single_file_bench.cc also measures a load that touches every "
        "weight).\n\n",
        r.Counter("single_file/load", "MB"), Ms(r.Sec("single_file/load")),
        Ms(r.Sec("single_file/read")), r.Sec("single_file/load") / r.Sec("single_file/read"),
        r.Counter("single_file/load", "peak_rss_x_file"));
  } else {
    o << "not measured: " << r.Error("single_file/load") << "\n\n";
  }

  o << "## gRPC overhead\n\n";
  if (r.Has("grpc/generate") && r.Has("grpc/in_process")) {
    o << absl::StrFormat(
        "Generate (embedded default, 1 step, 16 image tokens) over gRPC on loopback %s vs the "
        "same work in-process %s: **+%.3f ms** (%.2fx); a near-empty unary RPC (ListModels) "
        "takes %s.\n\n",
        Ms(r.Sec("grpc/generate")), Ms(r.Sec("grpc/in_process")),
        (r.Sec("grpc/generate") - r.Sec("grpc/in_process")) * 1e3,
        r.Sec("grpc/generate") / r.Sec("grpc/in_process"),
        r.Has("grpc/unary") ? Ms(r.Sec("grpc/unary")) : "?");
  } else {
    o << "not measured: " << r.Error("grpc/generate") << "\n\n";
  }

  o << "## Step caches\n\n"
    << "A " << (Quick() ? 6 : 28)
    << "-step generation of a small random-weight pipeline (2+4 blocks, 2x32, 64 px), images "
       "compared with the uncached one. Random weights change the head block's residual by "
       "~0.2-0.3 per step, so FirstBlockCache at diffusers' default threshold 0.05 skips "
       "nothing on them; a trained model's residuals change far less. TaylorSeer at diffusers' "
       "defaults (interval 5, warm-up 3 steps, order 1, bf16 factors) predicts every block's "
       "attention outputs on skipped steps; its lite mode predicts the whole model output.\n\n"
    ;
  // One table per cache section; its first row is the uncached reference.
  auto cache_table = [&](const std::vector<std::string>& names) {
    o << "| cache | time | speedup | skipped forwards | PSNR vs uncached |\n"
         "|---|---|---|---|---|\n";
    for (const std::string& n : names) {
      if (!r.Has(n) || !r.Has(names.front())) {
        o << missing(n);
        continue;
      }
      o << "| " << n << " | " << Ms(r.Sec(n)) << " | **"
        << Ratio(r.Sec(names.front()) / r.Sec(n)) << "x** | "
        << absl::StrFormat("%.0f", r.Counter(n, "skipped")) << " | "
        << (n == names.front() ? std::string("-")
                               : absl::StrFormat("%.1f dB", r.Counter(n, "psnr_db")))
        << " |\n";
    }
  };
  cache_table(CacheNames());
  o << "\nThe trained embedded default, flux-tiny (as shipped in models/flux/demo/, "
       "loaded as the server loads it): a "
    << (Quick() ? 6 : 28)
    << "-step generation of four 32x32 captions (one request, decoded), the same seed.\n\n";
  cache_table(TinyCacheNames());

  o << "\n## Layerwise casting\n\n"
    << "The forward size \"small\" with weights stored low and computed in float32: resident "
       "weight bytes and time as ratios to the float32 model, and max |out - fp32| / max |fp32|. "
       "\"diffusers patterns\" keeps Flux's `_skip_layerwise_casting_patterns` (pos_embed, norm: "
       "the AdaLayerNorm modulation linears) and diffusers' defaults in float32; \"all linears\" "
       "casts every linear but proj_out.\n\n"
    << "| storage | weight bytes | time | max rel. error |\n|---|---|---|---|\n";
  for (const std::string& n : CastingNames()) {
    if (!r.Has(n)) {
      o << missing(n);
      continue;
    }
    o << "| " << n << " | **" << Ratio(r.Counter(n, "weight_bytes_x_fp32")) << "x** | "
      << Ratio(r.Sec(n) / r.Sec("casting/float32")) << "x | "
      << absl::StrFormat("%.2g", r.Counter(n, "max_rel_err")) << " |\n";
  }
  o << "\n## Group offloading\n\n"
    << "Block-level groups of 1 block offloaded to memory-mapped files on disk (the CPU "
       "mechanism), read back just before each group runs; 4+8 blocks, 8x64, 1024+128 tokens. "
       "Peak: the offloaded forward's peak resident growth over (one group + the resident "
       "forward's activations); target <= 1.3. In this long-running process the activations "
       "mostly reuse memory freed earlier, so they add little resident growth; "
       "bench/group_offloading_bench.cc measures each variant in a fresh process.\n\n"
    << "| variant | time | vs resident | peak / (group + activations) |\n|---|---|---|---|\n";
  for (const char* n : {"offload/resident", "offload/disk", "offload/disk_prefetch"}) {
    if (!r.Has(n)) {
      o << missing(n);
      continue;
    }
    const bool off = std::string(n) != "offload/resident";
    o << "| " << n << " | " << Ms(r.Sec(n)) << " | " << Ratio(r.Sec(n) / r.Sec("offload/resident"))
      << "x | "
      << (off ? absl::StrFormat("**%.2f** (group %.1f MB, activations %.1f MB)",
                                r.Counter(n, "peak_x_group_plus_act"), r.Counter(n, "group_MB"),
                                r.Counter(n, "activations_MB"))
              : std::string("-"))
      << " |\n";
  }
  o << "\n";

  std::ofstream out(path);
  out << o.str();
}

// ---------------------------------------------------------------------------------------------
// Registration

void Register() {
  const int reps = std::max(1, absl::GetFlag(FLAGS_repetitions));
  // Each benchmark runs for at least the min time per repetition, or exactly `iterations` times.
  auto configure = [reps](benchmark::internal::Benchmark* b, int64_t iterations) {
    b->Unit(benchmark::kMillisecond)->Repetitions(reps);
    if (iterations > 0) {
      b->Iterations(iterations);
    } else {
      b->MinTime(Quick() ? 0.01 : 0.3);
    }
    return b;
  };
  auto add = [configure](const std::string& name, auto fn, int64_t iterations = 0) {
    RegisteredNames().push_back(name);
    return configure(benchmark::RegisterBenchmark(name.c_str(), fn)->UseRealTime(), iterations);
  };
  auto add_manual = [configure](const std::string& name, auto fn, int64_t iterations = 0) {
    RegisteredNames().push_back(name);
    return configure(benchmark::RegisterBenchmark(name.c_str(), fn)->UseManualTime(), iterations);
  };
  for (int64_t n : Quick() ? std::vector<int64_t>{128, 256} : std::vector<int64_t>{1024, 2048}) {
    add(absl::StrCat("matmul/float32/", n),
        [n](benchmark::State& s) { BM_MatMul(s, n, torch::kFloat32); });
  }
  const int64_t bf = Quick() ? 128 : 1024;
  add(absl::StrCat("matmul/bfloat16/", bf),
      [bf](benchmark::State& s) { BM_MatMul(s, bf, torch::kBFloat16); });
  for (const ForwardSize& size : ForwardSizes()) {
    add("forward/float32/" + size.name,
        [size](benchmark::State& s) { BM_Forward(s, size, torch::kFloat32); });
    if (size.name == "mid") {
      add("forward/bfloat16/" + size.name,
          [size](benchmark::State& s) { BM_Forward(s, size, torch::kBFloat16); });
    }
  }
  add_manual("pipeline/step", BM_PipelineStep);
  add("pipeline/bare_forward", BM_PipelineBareForward);
  add("lora/read_file", BM_LoraReadFile);
  add_manual("lora/load", BM_LoraLoad);
  add("lora/forward/base", [](benchmark::State& s) { BM_LoraForward(s, 0); });
  add("lora/forward/unfused_1", [](benchmark::State& s) { BM_LoraForward(s, 1); });
  add("lora/forward/unfused_4", [](benchmark::State& s) { BM_LoraForward(s, 4); });
  add("single_file/read", BM_SingleFileRead);
  add_manual("single_file/load", BM_SingleFileLoad, 1);
  add("grpc/generate", BM_GrpcGenerate);
  add("grpc/in_process", BM_GrpcInProcess);
  add("grpc/unary", BM_GrpcUnary);

  std::vector<std::pair<std::string, std::optional<BlockCacheConfig>>> caches = {
      {"cache/none", std::nullopt}};
  for (double t : {kFirstBlockCacheDefaultThreshold, 0.3, 0.5}) {
    BlockCacheConfig c;
    c.type = kFirstBlockCacheType;
    c.threshold = t;
    caches.push_back({absl::StrCat("cache/first_block_cache/", t), c});
  }
  for (bool lite : {false, true}) {
    BlockCacheConfig c;
    c.type = kTaylorSeerCacheType;  // diffusers' defaults otherwise
    c.use_lite_mode = lite;
    caches.push_back({lite ? "cache/taylorseer_cache/lite" : "cache/taylorseer_cache", c});
  }
  for (const auto& [name, config] : caches) {
    CacheNames().push_back(name);
    add(name, [config = config](benchmark::State& s) { BM_Cache(s, config); });
  }
  std::vector<std::pair<std::string, std::optional<BlockCacheConfig>>> tiny_caches = {
      {"cache_tiny/none", std::nullopt}};
  for (double t : {kFirstBlockCacheDefaultThreshold, 0.1, 0.2}) {
    BlockCacheConfig c;
    c.type = kFirstBlockCacheType;
    c.threshold = t;
    tiny_caches.push_back({absl::StrCat("cache_tiny/first_block_cache/", t), c});
  }
  {
    BlockCacheConfig c;
    c.type = kTaylorSeerCacheType;
    tiny_caches.push_back({"cache_tiny/taylorseer_cache", c});
  }
  for (const auto& [name, config] : tiny_caches) {
    TinyCacheNames().push_back(name);
    add(name, [config = config](benchmark::State& s) { BM_TinyCache(s, config); });
  }

  add("offload/resident", [](benchmark::State& s) { BM_Offload(s, false, false); });
  add("offload/disk", [](benchmark::State& s) { BM_Offload(s, true, false); });
  add("offload/disk_prefetch", [](benchmark::State& s) { BM_Offload(s, true, true); });
  for (const char* storage : {"", "bfloat16", "float16", "float8_e4m3fn"}) {
    for (bool all : {false, true}) {
      if (storage[0] == 0 && all) continue;
      const std::string name =
          storage[0] == 0
              ? "casting/float32"
              : absl::StrCat("casting/", storage, all ? "/all_linears" : "/diffusers_patterns");
      CastingNames().push_back(name);
      add(name, [storage = std::string(storage), all](benchmark::State& s) {
        BM_Casting(s, storage, all);
      });
    }
  }
}

}  // namespace
}  // namespace ds::bench

int main(int argc, char** argv) {
  // Interleave repetitions unless the caller decides.
  std::vector<char*> args(argv, argv + argc);
  bool interleave_given = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]).rfind("--benchmark_enable_random_interleaving", 0) == 0) {
      interleave_given = true;
    }
  }
  static char interleave[] = "--benchmark_enable_random_interleaving=true";
  if (!interleave_given) args.insert(args.begin() + 1, interleave);
  int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&n, args.data());
  absl::ParseCommandLine(n, args.data());
  ds::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));

  std::string command = "build/bench/benchmarks";
  for (int i = 1; i < argc; ++i) absl::StrAppend(&command, " ", argv[i]);

  ds::bench::Register();
  ds::bench::CollectingReporter reporter;
  const auto t0 = ds::bench::Clock::now();
  benchmark::RunSpecifiedBenchmarks(&reporter);
  const double wall = ds::bench::Since(t0);
  benchmark::Shutdown();
  for (const std::string& f : ds::bench::TempFiles()) {
    std::error_code ignored;
    std::filesystem::remove_all(f, ignored);
  }

  int failed = 0;
  for (const auto& [name, r] : reporter.results()) {
    if (!r.error.empty()) {
      std::fprintf(stderr, "FAILED %s: %s\n", name.c_str(), r.error.c_str());
      ++failed;
    }
  }
  const ds::bench::Report results(reporter.results());
  const bool filtered = absl::StrContains(command, "--benchmark_filter");
  for (const std::string& name : ds::bench::RegisteredNames()) {
    if (!filtered && !results.Has(name) && results.Error(name) == "not run") {
      std::fprintf(stderr, "FAILED %s: no result under its registered name\n", name.c_str());
      ++failed;
    }
  }
  const std::string report = absl::GetFlag(FLAGS_report);
  if (!report.empty()) {
    ds::bench::WriteReport(report, results, command, wall);
    std::printf("wrote %s\n", report.c_str());
  }
  return failed == 0 ? 0 : 1;
}
