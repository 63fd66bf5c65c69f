#include "handlers/flow_match.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

}  // namespace

absl::StatusOr<torch::Tensor> SeededNoise(const std::vector<int64_t>& shape, uint64_t seed,
                                          torch::Dtype dtype, torch::Device device) {
  if (shape.empty()) return absl::InvalidArgumentError("noise shape is empty");
  for (int64_t d : shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("noise shape [", absl::StrJoin(shape, ", "), "] has a dimension < 1"));
    }
  }
  return TorchCall("drawing seeded noise", [&] {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    return torch::randn(shape, gen, torch::TensorOptions().dtype(torch::kFloat32))
        .to(device, dtype);
  });
}

absl::StatusOr<torch::Tensor> DenoiseFlowMatchEuler(const LoraHost& host, TensorMap inputs,
                                                    torch::Tensor latents,
                                                    const FlowMatchEulerScheduler& scheduler,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step,
                                                    const DenoiseLatentsObserver& on_latents) {
  const int steps = static_cast<int>(scheduler.num_inference_steps());
  if (steps < 1) {
    return absl::InvalidArgumentError("the scheduler has no timesteps (SetTimesteps not called)");
  }
  if (!latents.defined() || !latents.is_floating_point() || latents.dim() < 1 ||
      latents.size(0) < 1) {
    return absl::InvalidArgumentError(
        "latents must be a floating-point tensor with a batch dimension");
  }
  for (const char* reserved : {"hidden_states", "timestep"}) {
    if (inputs.count(reserved) > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("input '", reserved, "' is set by the sampler and must not be given"));
    }
  }
  const ModelOptions& mo = host.model().options();
  const int64_t batch = latents.size(0);
  ASSIGN_OR_RETURN(torch::Tensor x, TorchCall("moving latents to the model", [&] {
                     return latents.to(mo.device, mo.dtype).contiguous();
                   }));
  const std::vector<float>& timesteps = scheduler.timesteps();
  if (on_step) RETURN_IF_ERROR(on_step(0, steps));
  for (int i = 0; i < steps; ++i) {
    // FluxPipeline: t.expand(batch).to(latents.dtype) / 1000, divided in the latents' dtype on
    // the model's device (as diffusers does it there).
    ASSIGN_OR_RETURN(inputs["timestep"], TorchCall("timestep", [&] {
                       return torch::full(
                                  {batch}, timesteps[static_cast<size_t>(i)],
                                  torch::TensorOptions().dtype(torch::kFloat32).device(mo.device))
                           .to(mo.dtype)
                           .div(1000);
                     }));
    inputs["hidden_states"] = x;
    ASSIGN_OR_RETURN(torch::Tensor v, host.Forward(inputs, stack));
    if (v.sizes() != x.sizes()) {
      return absl::UnimplementedError(absl::StrCat(
          host.model().class_name(), " predicts shape ", ShapeString(v), " for latents of shape ",
          ShapeString(x), "; this sampler needs the output shaped like its input"));
    }
    ASSIGN_OR_RETURN(x, scheduler.Step(v, i, x));
    if (on_latents) on_latents(i, x);
    if (on_step) RETURN_IF_ERROR(on_step(i + 1, steps));
  }
  return x;
}

absl::StatusOr<torch::Tensor> DenoiseFlowMatchEuler(const LoraHost& host, TensorMap inputs,
                                                    torch::Tensor latents, int steps,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step) {
  if (steps < 1 || steps > FlowMatchEulerScheduler::kMaxInferenceSteps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "steps must be in [1, ", FlowMatchEulerScheduler::kMaxInferenceSteps, "], got ", steps));
  }
  ASSIGN_OR_RETURN(FlowMatchEulerScheduler scheduler,
                   FlowMatchEulerScheduler::Create(FlowMatchEulerConfig()));
  // The default config is static, so the image sequence length (mu) plays no part.
  RETURN_IF_ERROR(scheduler.SetTimestepsLikeFluxPipeline(steps, /*image_seq_len=*/1));
  return DenoiseFlowMatchEuler(host, std::move(inputs), std::move(latents), scheduler, stack,
                               on_step);
}

}  // namespace ds
