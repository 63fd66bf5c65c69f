// The small handler objects a model folder implements for the shared machinery in handlers/.
//
// A model "wires" a capability by putting a handler object in its ModelSpec (registry.h). The
// metadata rows for that capability are derived from the handler, never typed a second time: the
// `_lora` row lists LoraHandler::FormatNames(), the `_weight_mapping` row lists
// WeightMappingHandler::VariantNames(). A spec without the handler has no row.
//
// Handler objects are owned by their model folder (static lifetime), immutable and thread-safe.
#pragma once

#include <string>
#include <vector>

namespace ds {

// The per-model LoRA format handler: format markers and pure conversions to diffusers naming.
class LoraHandler {
 public:
  virtual ~LoraHandler() = default;
  // Names of the foreign formats this model converts (e.g. "kohya", "xlabs"), any order.
  virtual std::vector<std::string> FormatNames() const = 0;
};

// The per-model single-file weight-mapping handler: variant detection and key mapping.
class WeightMappingHandler {
 public:
  virtual ~WeightMappingHandler() = default;
  // Names of the variants whose config it resolves from a single file (e.g. "flux-dev"), any order.
  virtual std::vector<std::string> VariantNames() const = 0;
};

}  // namespace ds
