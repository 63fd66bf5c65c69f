// The Flux single-file handler: BFL original layout <-> diffusers naming, and variant detection
// (flux-dev, flux-schnell, flux-fill, flux-depth) from key names and shapes only.
//
// Everything is derived from the weights: inner dim (img_in rows), head dim (q-norm scale length),
// layer counts (highest block index + 1, every block complete), in/out channels, text and pooled
// widths, guidance. Only axes_dims_rope is not recorded in the weights: it is FLUX.1's (16, 56, 56)
// when the head dim is 128 and is otherwise listed as assumed (callers pass a config to override).
//
// Pure (no LibTorch); the handler object is immutable and thread-safe.
#pragma once

#include "handlers/weight_mapping.h"

namespace ds::flux {

class FluxWeightMapping : public WeightMappingHandler {
 public:
  std::vector<std::string> VariantNames() const override;
  std::vector<std::string> MarkerKeys() const override;
  absl::StatusOr<std::optional<WeightMappingDetection>> Detect(
      const KeyShapes& keys) const override;
  absl::StatusOr<MappingPlan> PlanToDiffusers(
      const KeyShapes& keys, const WeightMappingDetection& detection) const override;
  absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes& keys) const override;
};

// The handler object the Flux spec wires (static lifetime).
const FluxWeightMapping& FluxWeightMappingHandler();

}  // namespace ds::flux
