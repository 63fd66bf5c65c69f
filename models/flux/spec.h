// The Flux model's spec (see spec.cc). Exposed so tests can build variants of it (e.g. with other
// handlers wired) without touching the global registry.
#pragma once

#include "handlers/pipeline.h"
#include "handlers/registry.h"

namespace ds::flux {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeFluxSpec();

// A fresh copy of the pipeline spec that spec.cc registers: "FluxPipeline", loaded by
// FluxPipeline::FromPretrained.
PipelineSpec MakeFluxPipelineSpec();

// The "flux-tiny" demo recipe MakeFluxPipelineSpec lists (handlers/demo_pipeline.h).
DemoPipelineRecipe FluxTinyDemo();

}  // namespace ds::flux
