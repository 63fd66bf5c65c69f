// IPAdapterHandler: how a model's IP-Adapter mixin shows itself to the shared machinery.
//
// IP-Adapters are a per-model mixin (ARCHITECTURE.md): the weights, the image projection and the
// extra attention live in the model folder (e.g. models/flux/ip_adapter.h), because what they
// attach to differs too much between model families to share. What is model-agnostic is only
// this small face: a model opts in by putting a handler in its ModelSpec (registry.h,
// `ip_adapter`), which makes the `_supports_ip_adapter` metadata row appear, and lets tools check
// an adapter file against a model config from the header alone.
//
// Handler objects are owned by their model folder (static lifetime), immutable and thread-safe.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/weight_mapping.h"  // KeyShapes

namespace ds {

// What an IP-Adapter file holds, as derived from its key shapes.
struct IPAdapterSummary {
  std::string format;           // one of the handler's FormatNames()
  int64_t num_tokens = 0;       // image tokens per image (from the projection's shape)
  int64_t image_embed_dim = 0;  // width of the image embeddings it takes (image encoder's)
  int64_t num_layers = 0;       // attention layers it adds keys/values to
};

class IPAdapterHandler {
 public:
  virtual ~IPAdapterHandler() = default;

  // The weight layouts the model's loader accepts ("xlabs", "diffusers", ...).
  virtual std::vector<std::string> FormatNames() const = 0;

  // Checks an adapter's keys and shapes (a safetensors header) against the model `model_config`
  // (its diffusers config.json) without reading tensors. INVALID_ARGUMENT naming the key, the
  // expected and the found shape for anything that does not fit (e.g. an adapter made for another
  // width), or a missing / unexpected key; the model's config errors otherwise.
  virtual absl::StatusOr<IPAdapterSummary> Inspect(const KeyShapes& keys,
                                                   const nlohmann::json& model_config) const = 0;
};

}  // namespace ds
