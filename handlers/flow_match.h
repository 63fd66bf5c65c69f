// Flow-matching Euler sampling (rectified flow): the model-agnostic denoising loop of models whose
// transformer predicts a velocity v = d x / d sigma (Flux, SD3, ...).
//
// Schedule (interim): sigma_i = 1 - i / steps for i = 0..steps (torch.linspace(1, 0, steps + 1)),
// with no shift and no dynamic shifting. The image pipeline replaces it with diffusers'
// FlowMatchEulerDiscreteScheduler (shift, use_dynamic_shifting, the final sigma 0); until then
// Generate runs on packed latents with this schedule.
//
// One step i (0-based), as diffusers' FlowMatchEulerDiscreteScheduler.step computes it:
//   v     = model(inputs + {hidden_states: x, timestep: [sigma_i] * batch})
//   x_new = x + (sigma_{i+1} - sigma_i) * v      (in float32, then cast back to the model dtype)
// The timestep is sigma itself (the transformer scales it by 1000 internally, as diffusers
// pipelines pass timestep / 1000), in the model dtype, one entry per batch row.
//
// Thread-safety: reentrant; concurrent calls on one LoraHost are safe (see lora_host.h).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/lora_host.h"
#include "handlers/safetensors.h"

namespace ds {

// The interim schedule above: steps + 1 values from 1 down to 0. Empty for steps < 1.
std::vector<double> FlowMatchEulerSigmas(int steps);

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

// Runs `steps` Euler steps from `latents` (the noise at sigma = 1, e.g. packed Flux latents
// [batch, image_tokens, channels]) and returns the denoised latents in the model's dtype and
// device. `inputs` are the model's other forward inputs (never "hidden_states" or "timestep"; the
// loop sets them); `stack` (nullable) is the request's adapter snapshot, used for every step;
// `on_step` may be empty.
// INVALID_ARGUMENT for steps < 1, undefined or non-floating latents, or inputs naming
// hidden_states/timestep; otherwise what the model's forward returns (INVALID_ARGUMENT naming a bad
// input, ABORTED for a stale adapter stack, INTERNAL), UNIMPLEMENTED when the model's output is not
// shaped like the latents (e.g. an input-widened model), or what `on_step` returns.
absl::StatusOr<torch::Tensor> DenoiseFlowMatchEuler(const LoraHost& host, TensorMap inputs,
                                                    torch::Tensor latents, int steps,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step);

}  // namespace ds
