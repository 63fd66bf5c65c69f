// Finite-difference check of autograd gradients for the models' differentiable-mode tests.
// Header-only; tests only. Not thread-safe (it perturbs the parameter in place and restores it).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>

namespace ds::test {

struct GradientEntry {
  int64_t index = 0;    // flat index of the entry checked
  double analytic = 0;  // p.grad() there
  double numeric = 0;   // (loss(p + h) - loss(p - h)) / 2h there
};

// Checks the entry of parameter `p` with the largest |gradient| (p.grad() must be defined), so
// that float32 rounding of the loss stays far below the difference being measured: `loss`
// evaluates the scalar loss (it runs under NoGradGuard), `p` is restored afterwards.
inline GradientEntry LargestGradientEntry(torch::Tensor p, const std::function<double()>& loss,
                                          double h = 1e-2) {
  GradientEntry g;
  const torch::Tensor flat_grad = p.grad().reshape({-1});
  g.index = flat_grad.abs().argmax().item<int64_t>();
  g.analytic = flat_grad[g.index].item<double>();
  auto loss_at = [&](double delta) {
    torch::NoGradGuard no_grad;
    const torch::Tensor entry = p.view({-1}).narrow(0, g.index, 1);
    const torch::Tensor saved = entry.clone();
    entry.add_(delta);
    const double value = loss();
    entry.copy_(saved);
    return value;
  };
  g.numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
  return g;
}

}  // namespace ds::test
