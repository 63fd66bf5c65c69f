// The adapters one forward pass applies, as a model's forward consults them (unfused LoRA).
//
// A model that wires a LoRA handler applies, for every linear module `m` it runs,
//   y = W x + b + Σ_d  d.scale · (d.up (d.down x) + d.bias)
// over LoraContext::Find(m)'s deltas, and uses LoraContext::Overlay(p) in place of parameter `p`
// wherever one is set. A delta's `down` may be wider than W's input (a LoRA that widens the
// module's input, e.g. a BFL Control LoRA on Flux's x_embedder): the input x then has the wider
// width, W sees its first W.size(1) columns (the base weight padded with zero columns), and
// InputWidth(m) reports the width the model must accept.
//
// A context is built per request (ds::LoraHost) from immutable adapters; its tensors are already
// in the model's dtype and device and contiguous. Read-only after construction: safe to share
// across threads. Holds references to the adapters' tensors, so the adapters stay alive while a
// request uses them, however the store changes meanwhile.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace ds {

struct LoraDelta {
  torch::Tensor down;  // A [r, in'] (in' >= the module's input width)
  torch::Tensor up;    // B [out, r]
  torch::Tensor bias;  // [out] or undefined
  double scale = 1.0;  // the adapter's alpha/r times the request's weight for it
};

struct LinearLora {
  std::vector<LoraDelta> deltas;
  int64_t input_width = 0;  // the widest down.size(1)
};

class LoraContext {
 public:
  bool empty() const { return linears_.empty() && overlays_.empty(); }

  // The deltas on linear module `module` (diffusers name without prefix), or nullptr.
  const LinearLora* Find(const std::string& module) const {
    if (linears_.empty()) return nullptr;
    auto it = linears_.find(module);
    return it == linears_.end() ? nullptr : &it->second;
  }

  // The replacement for parameter `param`, or nullptr.
  const torch::Tensor* Overlay(const std::string& param) const {
    if (overlays_.empty()) return nullptr;
    auto it = overlays_.find(param);
    return it == overlays_.end() ? nullptr : &it->second;
  }

  // The input width of `module` under this context: the widest delta's, or `base_width`.
  int64_t InputWidth(const std::string& module, int64_t base_width) const {
    const LinearLora* l = Find(module);
    return l != nullptr && l->input_width > base_width ? l->input_width : base_width;
  }

  // Building (not thread-safe; done before the context is shared).
  void AddDelta(const std::string& module, LoraDelta delta) {
    LinearLora& l = linears_[module];
    if (delta.down.defined() && delta.down.size(1) > l.input_width) {
      l.input_width = delta.down.size(1);
    }
    l.deltas.push_back(std::move(delta));
  }
  void SetOverlay(const std::string& param, torch::Tensor value) {
    overlays_[param] = std::move(value);
  }
  size_t delta_count() const {
    size_t n = 0;
    for (const auto& [name, l] : linears_) n += l.deltas.size();
    return n;
  }
  const std::unordered_map<std::string, torch::Tensor>& overlays() const { return overlays_; }

 private:
  std::unordered_map<std::string, LinearLora> linears_;
  std::unordered_map<std::string, torch::Tensor> overlays_;
};

}  // namespace ds
