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

std::vector<double> FlowMatchEulerSigmas(int steps) {
  std::vector<double> sigmas;
  if (steps < 1) return sigmas;
  sigmas.reserve(static_cast<size_t>(steps) + 1);
  for (int i = 0; i <= steps; ++i) {
    sigmas.push_back(1.0 - static_cast<double>(i) / static_cast<double>(steps));
  }
  return sigmas;
}

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
                                                    torch::Tensor latents, int steps,
                                                    const AdapterStack* stack,
                                                    const DenoiseStepCallback& on_step) {
  if (steps < 1) {
    return absl::InvalidArgumentError(absl::StrCat("steps must be at least 1, got ", steps));
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
  const std::vector<double> sigmas = FlowMatchEulerSigmas(steps);
  if (on_step) RETURN_IF_ERROR(on_step(0, steps));
  for (int i = 0; i < steps; ++i) {
    ASSIGN_OR_RETURN(inputs["timestep"], TorchCall("timestep", [&] {
                       return torch::full({batch}, sigmas[i],
                                          torch::TensorOptions().dtype(mo.dtype).device(mo.device));
                     }));
    inputs["hidden_states"] = x;
    ASSIGN_OR_RETURN(torch::Tensor v, host.Forward(inputs, stack));
    if (v.sizes() != x.sizes()) {
      return absl::UnimplementedError(absl::StrCat(
          host.model().class_name(), " predicts shape ", ShapeString(v), " for latents of shape ",
          ShapeString(x), "; this sampler needs the output shaped like its input"));
    }
    const double dt = sigmas[i + 1] - sigmas[i];
    ASSIGN_OR_RETURN(x, TorchCall("Euler step", [&] {
                       torch::InferenceMode guard;
                       return (x.to(torch::kFloat32) + dt * v.to(torch::kFloat32)).to(mo.dtype);
                     }));
    if (on_step) RETURN_IF_ERROR(on_step(i + 1, steps));
  }
  return x;
}

}  // namespace ds
