// diffusers' FlowMatchEulerDiscreteScheduler (schedulers/scheduling_flow_match_euler_discrete.py)
// and FluxPipeline's `calculate_shift`, reproduced with diffusers' dtype flow so that sigmas and
// timesteps are bit-identical to diffusers' float32 values (model-agnostic: Flux, SD3, ...).
//
// Schedule (SetTimesteps), as diffusers computes it:
//   * sigmas given (FluxPipeline passes np.linspace(1, 1/N, N), see FluxPipelineSigmas): they are
//     rounded to float32 first and every later step (shift, shift_terminal) is float32 arithmetic,
//     as numpy does on a float32 array with Python scalars;
//   * no sigmas ("plain" set_timesteps(N)): t = np.linspace(sigma_max * T, sigma_min * T, N) in
//     float64, sigmas = t / T, shifted in float64 and rounded to float32 at the end. sigma_max and
//     sigma_min come from the schedule built at construction, which is *already* shifted when
//     use_dynamic_shifting is false, so sigma_min is shifted twice on this path (diffusers' own
//     behaviour: shift 3 ends at shift(shift(1/T)) = 0.00893, not shift(1/T) = 0.00299);
//   * shift: static  s' = shift * s / (1 + (shift - 1) * s), or with use_dynamic_shifting
//     "exponential" s' = e^mu / (e^mu + (1/s - 1)) / "linear" s' = mu / (mu + (1/s - 1));
//   * shift_terminal (when non-zero): s'' = 1 - (1 - s') / ((1 - s'_last) / (1 - shift_terminal))
//     (numpy 1.x promotion: the scale factor is float64, applied to the float32 array in float32);
//   * timesteps = float32(sigmas * T) (N values); sigmas get a terminal 0 appended (N + 1 values),
//     or with invert_sigmas sigmas = 1 - sigmas, timesteps from those, terminal 1.
//   T = num_train_timesteps.
//
// Step (Euler, deterministic): prev = float32(sample) + (sigma_{i+1} - sigma_i) * model_output,
// cast to model_output's dtype. As in diffusers (LibTorch promotion of a 0-dim float32 tensor),
// the product dt * model_output is formed in model_output's dtype (for bfloat16/float16 dt is
// rounded to that dtype and the product rounded back to it) and the sum in float32 (float64 for a
// float64 model output).
//
// Not implemented (UNIMPLEMENTED at Create): use_karras_sigmas, use_exponential_sigmas,
// use_beta_sigmas, stochastic_sampling; a scheduler_config.json naming another "_class_name".
//
// Thread-safety: a FlowMatchEulerScheduler is a value; SetTimesteps mutates it, every const method
// may run concurrently (Step keeps no step counter: the caller passes the step index).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds {

// diffusers' `time_shift_type`.
enum class TimeShiftType { kExponential, kLinear };

// The fields of a diffusers FlowMatchEulerDiscreteScheduler `scheduler_config.json`. Defaults are
// diffusers' constructor defaults (FLUX.1-schnell's published config is exactly these).
struct FlowMatchEulerConfig {
  int64_t num_train_timesteps = 1000;  // T, >= 1
  double shift = 1.0;                  // static shift (> 0), used when !use_dynamic_shifting
  bool use_dynamic_shifting = false;   // shift by `mu` given to SetTimesteps instead
  // CalculateShift's line: mu(base_image_seq_len) = base_shift, mu(max_image_seq_len) = max_shift.
  // Optional in diffusers (null in the JSON); CalculateShift needs both.
  std::optional<double> base_shift = 0.5;
  std::optional<double> max_shift = 1.15;
  int64_t base_image_seq_len = 256;
  int64_t max_image_seq_len = 4096;
  bool invert_sigmas = false;
  std::optional<double> shift_terminal;  // null or 0: off; otherwise in (-inf, 1)
  bool use_karras_sigmas = false;        // UNIMPLEMENTED when true
  bool use_exponential_sigmas = false;   // UNIMPLEMENTED when true
  bool use_beta_sigmas = false;          // UNIMPLEMENTED when true
  TimeShiftType time_shift_type = TimeShiftType::kExponential;
  bool stochastic_sampling = false;  // UNIMPLEMENTED when true

  // FLUX.1-dev's published scheduler config: shift 3.0, use_dynamic_shifting true, the defaults
  // otherwise (base/max shift 0.5/1.15 at 256/4096 tokens).
  static FlowMatchEulerConfig FluxDev();
  // FLUX.1-schnell's: shift 1.0, static (= the defaults).
  static FlowMatchEulerConfig FluxSchnell();
};

// Parses a scheduler_config.json object. Unknown keys are ignored, as diffusers ignores them
// (with a warning); missing keys keep their defaults. INVALID_ARGUMENT naming the field for a wrong
// JSON type or an invalid value (num_train_timesteps < 1, shift <= 0 or non-finite, an unknown
// time_shift_type, shift_terminal >= 1, base_image_seq_len == max_image_seq_len, more than one of
// the use_*_sigmas flags, a non-object); UNIMPLEMENTED for a "_class_name" other than
// FlowMatchEulerDiscreteScheduler.
absl::StatusOr<FlowMatchEulerConfig> ParseFlowMatchEulerConfig(const nlohmann::json& json);

// Reads `path`: a scheduler_config.json file, or a folder holding one (a diffusers pipeline's
// `scheduler/`). NOT_FOUND if absent; INVALID_ARGUMENT (naming the file) for malformed JSON or as
// ParseFlowMatchEulerConfig; UNIMPLEMENTED as ParseFlowMatchEulerConfig.
absl::StatusOr<FlowMatchEulerConfig> LoadFlowMatchEulerConfig(const std::string& path);

// FluxPipeline's calculate_shift in float64 with diffusers' operation order:
//   m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
//   mu = image_seq_len * m + (base_shift - m * base_image_seq_len)
// image_seq_len is the packed latent sequence length (latents.shape[1]). INVALID_ARGUMENT for
// image_seq_len < 1 or a config without base_shift/max_shift (null).
absl::StatusOr<double> CalculateShift(int64_t image_seq_len, const FlowMatchEulerConfig& config);

// np.linspace(start, stop, num) in float64 exactly as numpy computes it (i * step + start, the
// last value set to stop). Empty for num < 1.
std::vector<double> NumpyLinspace(double start, double stop, int64_t num);

// The sigmas FluxPipeline passes to set_timesteps: np.linspace(1.0, 1 / N, N). Empty for N < 1.
std::vector<double> FluxPipelineSigmas(int64_t num_inference_steps);

class FlowMatchEulerScheduler {
 public:
  // Largest num_inference_steps SetTimesteps accepts.
  static constexpr int64_t kMaxInferenceSteps = 100000;

  // Validates `config` as ParseFlowMatchEulerConfig does (INVALID_ARGUMENT / UNIMPLEMENTED naming
  // the field). The scheduler has no timesteps until SetTimesteps.
  static absl::StatusOr<FlowMatchEulerScheduler> Create(const FlowMatchEulerConfig& config);

  // diffusers' set_timesteps(num_inference_steps, sigmas=..., mu=...): replaces the schedule.
  // `sigmas` (optional) must hold num_inference_steps finite values; `mu` is required (finite)
  // when use_dynamic_shifting and ignored otherwise. INVALID_ARGUMENT for num_inference_steps
  // outside [1, kMaxInferenceSteps], a sigmas length mismatch, non-finite values, or a missing mu;
  // the schedule is unchanged on error.
  absl::Status SetTimesteps(int64_t num_inference_steps,
                            const std::optional<std::vector<double>>& sigmas = std::nullopt,
                            std::optional<double> mu = std::nullopt);

  // FluxPipeline's step 5: SetTimesteps(N, FluxPipelineSigmas(N), CalculateShift(image_seq_len)).
  // Errors as those two.
  absl::Status SetTimestepsLikeFluxPipeline(int64_t num_inference_steps, int64_t image_seq_len);

  const FlowMatchEulerConfig& config() const { return config_; }
  // 0 before SetTimesteps.
  int64_t num_inference_steps() const { return static_cast<int64_t>(timesteps_.size()); }
  // num_inference_steps() + 1 values (terminal 0, or 1 with invert_sigmas); empty before
  // SetTimesteps.
  const std::vector<float>& sigmas() const { return sigmas_; }
  // num_inference_steps() values, float32(sigma * num_train_timesteps).
  const std::vector<float>& timesteps() const { return timesteps_; }

  // One Euler step from sigmas()[step_index] to sigmas()[step_index + 1] (see the file comment);
  // returns a new tensor in model_output's dtype on its device. FAILED_PRECONDITION before
  // SetTimesteps; OUT_OF_RANGE for step_index outside [0, num_inference_steps()); INVALID_ARGUMENT
  // for undefined or non-floating tensors or different shapes; INTERNAL if LibTorch fails.
  absl::StatusOr<torch::Tensor> Step(const torch::Tensor& model_output, int64_t step_index,
                                     const torch::Tensor& sample) const;

 private:
  explicit FlowMatchEulerScheduler(const FlowMatchEulerConfig& config) : config_(config) {}

  FlowMatchEulerConfig config_;
  std::vector<float> sigmas_;
  std::vector<float> timesteps_;
};

}  // namespace ds
