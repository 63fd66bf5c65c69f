// Synthetic LoRAs for tests and benchmarks (header-only; never used by the server).
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "handlers/safetensors.h"

namespace ds::test {

// The linear modules of a model: every "<m>.weight" parameter that is a matrix.
inline std::vector<std::string> LinearModules(const TensorMap& params) {
  std::vector<std::string> out;
  const std::string suffix = ".weight";
  for (const auto& [name, t] : params) {
    if (t.dim() == 2 && name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      out.push_back(name.substr(0, name.size() - suffix.size()));
    }
  }
  return out;
}

// A diffusers/PEFT LoRA (`transformer.<m>.lora_A.weight` [r, in], `.lora_B.weight` [out, r],
// float32, values ~ U(-a, a) with a chosen so that B·A is about 1% of a unit-scale weight) on the
// given modules of `params`; with `alpha` > 0 also `.alpha` keys.
inline TensorMap MakeDiffusersLora(const TensorMap& params, const std::vector<std::string>& modules,
                                   int64_t rank, uint64_t seed, double alpha = 0) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  TensorMap out;
  const double a = std::sqrt(0.01 / static_cast<double>(rank));
  for (const std::string& m : modules) {
    const torch::Tensor& w = params.at(m + ".weight");
    const std::string key = "transformer." + m;
    out[key + ".lora_A.weight"] = torch::empty({rank, w.size(1)}).uniform_(-a, a, gen);
    out[key + ".lora_B.weight"] = torch::empty({w.size(0), rank}).uniform_(-a, a, gen);
    if (alpha > 0) out[key + ".alpha"] = torch::full({}, alpha);
  }
  return out;
}

// Bytes of the tensors of `lora`.
inline int64_t TensorBytes(const TensorMap& lora) {
  int64_t n = 0;
  for (const auto& [k, t] : lora) n += t.numel() * t.element_size();
  return n;
}

// The rank at which a float32 LoRA on `modules` holds about `bytes`.
inline int64_t RankForBytes(const TensorMap& params, const std::vector<std::string>& modules,
                            int64_t bytes) {
  int64_t per_rank = 0;
  for (const std::string& m : modules) {
    const torch::Tensor& w = params.at(m + ".weight");
    per_rank += 4 * (w.size(0) + w.size(1));
  }
  return std::max<int64_t>(1, bytes / std::max<int64_t>(per_rank, 1));
}

}  // namespace ds::test
