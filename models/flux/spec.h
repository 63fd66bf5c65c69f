// The Flux model's spec (see spec.cc). Exposed so tests can build variants of it (e.g. with other
// handlers wired) without touching the global registry.
#pragma once

#include "handlers/pipeline.h"
#include "handlers/registry.h"

#include <string>
#include <vector>

namespace ds::flux {

// A fresh copy of the spec that spec.cc registers.
ModelSpec MakeFluxSpec();

// A fresh copy of the pipeline spec that spec.cc registers: "FluxPipeline", loaded by
// FluxPipeline::FromPretrained.
PipelineSpec MakeFluxPipelineSpec();

// The "flux-tiny" demo recipe MakeFluxPipelineSpec lists (handlers/demo_pipeline.h): the trained
// synthetic-scene pipeline, its weights embedded from models/flux/demo/flux-tiny/.
DemoPipelineRecipe FluxTinyDemo();

// The same recipe without the trained weights (random weights, the VAE's scaling factor 1 and
// shift 0): what the training tool (tools/train) starts from.
DemoPipelineRecipe FluxTinyDemoArchitecture();

// flux-tiny's caption vocabulary: "a {colour} {shape} on a {background} background" with
// background != colour.
const std::vector<std::string>& FluxTinyShapes();   // circle, square, triangle, cross, star
const std::vector<std::string>& FluxTinyColours();  // red, green, blue, yellow, black, white
std::string FluxTinyCaption(const std::string& colour, const std::string& shape,
                            const std::string& background);

}  // namespace ds::flux
