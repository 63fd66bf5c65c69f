// Flow-matching Euler sampling (rectified flow): the model-agnostic denoising loop of models whose
// transformer predicts a velocity v = d x / d sigma (Flux, SD3, ...), driven by diffusers'
// FlowMatchEulerDiscreteScheduler (handlers/flow_match_scheduler.h: shift / dynamic shifting,
// terminal sigma 0, bit-identical float32 sigmas and timesteps).
//
// One step i (0-based) of a scheduler set to N steps, as diffusers' FluxPipeline runs it:
//   timestep = float32(timesteps[i]) cast to the latents' dtype, / 1000 in that dtype, one entry
//              per batch row (the transformer multiplies by 1000 again internally)
//   v        = model(inputs + {hidden_states: x, timestep})
//   x        = scheduler.Step(v, i, x)   (x + (sigma_{i+1} - sigma_i) * v in float32, cast back)
//
// Thread-safety: reentrant; concurrent calls on one LoraHost are safe (see lora_host.h); a
// scheduler passed by const reference may be shared by concurrent calls.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/flow_match_scheduler.h"
#include "handlers/lora_host.h"
#include "handlers/safetensors.h"

namespace ds {

// The initial noise of a seeded generation: standard normal float32 values drawn on the CPU from
// a generator seeded with `seed` (like diffusers' randn_tensor with a CPU torch.Generator), then
// converted to `dtype` and moved to `device`. The same seed and shape give the same noise on every
// machine. INVALID_ARGUMENT for an empty shape or a dimension < 1; INTERNAL if LibTorch fails.
absl::StatusOr<torch::Tensor> SeededNoise(const std::vector<int64_t>& shape, uint64_t seed,
                                          torch::Dtype dtype, torch::Device device);

// Called before the first step with (0, total) and after each step with (steps done, total). A
// non-OK status (client cancelled, deadline passed, server draining) stops the loop: no further
// forward runs and DenoiseFlowMatchEuler returns that status unchanged.
using DenoiseStepCallback = std::function<absl::Status(int step, int total)>;

// Called after step i (0-based) with the latents it produced (model dtype and device); for
// tests, previews and debugging. Must not modify the tensor.
using DenoiseLatentsObserver = std::function<void(int step, const torch::Tensor& latents)>;

// Runs the scheduler's N = scheduler.num_inference_steps() Euler steps from `latents` (the noise at
// sigmas[0], e.g. packed Flux latents [batch, image_tokens, channels]) and returns the denoised
// latents in the model's dtype and device. `scheduler` must have its timesteps set (e.g.
// SetTimestepsLikeFluxPipeline). `inputs` are the model's other forward inputs (never
// "hidden_states" or "timestep"; the loop sets them); `stack` (nullable) is the request's adapter
// snapshot, used for every step; `on_step` and `on_latents` may be empty.
// INVALID_ARGUMENT for a scheduler without timesteps, undefined or non-floating latents, or inputs
// naming hidden_states/timestep; otherwise what the model's forward returns (INVALID_ARGUMENT
// naming a bad input, ABORTED for a stale adapter stack, INTERNAL), UNIMPLEMENTED when the model's
// output is not shaped like the latents (e.g. an input-widened model), or what `on_step` returns.
absl::StatusOr<torch::Tensor> DenoiseFlowMatchEuler(const LoraHost& host, TensorMap inputs,
                                                    torch::Tensor latents,
                                                    const FlowMatchEulerScheduler& scheduler,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step,
                                                    const DenoiseLatentsObserver& on_latents = {});

// The same with `steps` steps of a default-config scheduler (diffusers' defaults = FLUX.1-schnell's
// config: shift 1, no dynamic shifting) set the way FluxPipeline sets it: sigmas
// linspace(1, 1/steps, steps) then 0, timesteps 1000 * sigmas. INVALID_ARGUMENT for steps < 1 or
// over FlowMatchEulerScheduler::kMaxInferenceSteps; otherwise as above.
absl::StatusOr<torch::Tensor> DenoiseFlowMatchEuler(const LoraHost& host, TensorMap inputs,
                                                    torch::Tensor latents, int steps,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step);

}  // namespace ds
