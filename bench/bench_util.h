// Helpers shared by the benchmark binaries (bench/*.cc) and the Google Benchmark suite
// (bench/benchmarks.cc): timing, resident-memory readings, random-weight Flux models and pipelines
// built through the registry, the analytic FLOP count of a Flux forward, and a BFL-layout
// checkpoint writer. Nothing here is used by the server or the tests.
//
// Thread-safety: free functions without shared state, except ResetPeakResidentMemory
// (process-wide).
#pragma once

#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"
#include "handlers/safetensors_format.h"
#include "models/flux/config.h"
#include "models/flux/pipeline.h"

namespace ds::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}
inline double Since(Clock::time_point t0) { return Seconds(t0, Clock::now()); }

// The median (upper median for even sizes) and the minimum; 0 for an empty vector.
double Median(std::vector<double> v);
double Best(const std::vector<double>& v);

// CPU seconds of the whole process (all threads), for contention-robust ratios.
double ProcessCpuSeconds();

// A field of /proc/self/status in KiB ("VmRSS:", "VmHWM:"); 0 when absent.
int64_t StatusKiB(const char* field);
// Resets the process's peak resident size (VmHWM) to its current size (Linux: "5" written to
// /proc/self/clear_refs). False when the kernel refuses.
bool ResetPeakResidentMemory();

// The first three fields of /proc/loadavg, or "?".
std::string LoadAverage();

// RoPE axes for a head dim: Flux's (16, 56, 56) scaled to head_dim, every entry even.
std::vector<int64_t> RopeAxes(int64_t head_dim);

// Analytic FLOPs of one Flux forward: every matrix product counts 2·M·N·K (linear layers with
// M = tokens·batch, N = out, K = in; biases, norms, activations, RoPE and softmax are not counted)
// and attention counts QKᵀ and P·V as 2·S²·d each per head (S = text + image tokens).
double FluxForwardFlops(const flux::FluxConfig& c, int64_t batch, int64_t img_tokens,
                        int64_t txt_tokens);

// A FluxTransformer2DModel config.json of the given shape (guidance-distilled, FLUX.1's
// joint_attention_dim 4096 and pooled 768 unless overridden through the returned json).
nlohmann::json FluxShape(int64_t layers, int64_t single_layers, int64_t heads, int64_t head_dim);

// A model of the registered class `class_name` built through the registry with random weights
// (InitRandomWeights(seed)).
absl::StatusOr<std::shared_ptr<DiffusionModel>> BuildRandomModel(const std::string& class_name,
                                                                 const nlohmann::json& config,
                                                                 const ModelOptions& options,
                                                                 uint64_t seed);

// Random forward inputs of a Flux model (batch 1): packed latents of `img_tokens` tokens on a
// square-ish grid, `txt_tokens` text tokens, timestep 0.5, guidance 3.5 when the config has it.
TensorMap FluxForwardInputs(const flux::FluxConfig& c, int64_t img_tokens, int64_t txt_tokens,
                            uint64_t seed);

// A FluxPipeline of a random transformer (`transformer_config`) and a random FLUX-layout VAE with
// `vae_channels` (4 levels = scale factor 8), FLUX.1-dev's scheduler, no text encoders (requests
// give prompt embeddings).
struct RandomPipeline {
  flux::FluxPipelineComponents components;  // transformer, vae, scheduler
  std::unique_ptr<flux::FluxPipeline> pipeline;
};
absl::StatusOr<RandomPipeline> BuildRandomFluxPipeline(const nlohmann::json& transformer_config,
                                                       const std::vector<int64_t>& vae_channels,
                                                       const ModelOptions& options = {});
// The same with a whole AutoencoderKL config.json; `seed` for the transformer, seed + 1 the VAE.
absl::StatusOr<RandomPipeline> BuildRandomFluxPipeline(const nlohmann::json& transformer_config,
                                                       const nlohmann::json& vae_config,
                                                       const ModelOptions& options,
                                                       uint64_t seed);

// A request for BuildRandomFluxPipeline's pipeline: random prompt embeddings (seeded), size×size
// pixels, `steps` steps, latents only (decode false).
flux::FluxPipelineRequest RandomPromptRequest(const flux::FluxPipeline& pipeline, int64_t size,
                                              int64_t txt_tokens, int steps, uint64_t seed);

// PSNR in dB of `a` against `b` for values of range `peak` (identical: +inf).
double Psnr(const torch::Tensor& a, const torch::Tensor& b, double peak);

// The tensor layout of a BFL-format (FLUX.1 original) bf16 checkpoint of inner dim `d` (heads =
// d / 128), prefixed "model.diffusion_model." as ComfyUI exports it, and a writer filling every
// weight with 1.0 (finite, cheap). The file is fsync'ed.
std::vector<safetensors::TensorInfo> BflCheckpointLayout(int64_t d, int64_t layers,
                                                         int64_t single_layers);
absl::Status WriteBflCheckpoint(const std::string& path,
                                const std::vector<safetensors::TensorInfo>& infos);

// Seconds to read the whole file once with read(2) (from the page cache once warm); -1 when it
// cannot be opened.
double ReadFileOnce(const std::string& path);

// Size of a file in bytes, -1 when it cannot be stat'ed.
int64_t FileSize(const std::string& path);

}  // namespace ds::bench
