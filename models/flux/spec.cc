// THE one place that declares FluxTransformer2DModel: names, structural facts, wired capability
// handlers and the factory. Everything the metadata table shows is derived from this spec.
#include "models/flux/spec.h"

#include "handlers/registry.h"
#include "handlers/status.h"
#include "models/flux/lora.h"
#include "models/flux/pipeline.h"
#include "models/flux/transformer.h"
#include "models/flux/weight_mapping.h"

namespace ds::flux {

ModelSpec MakeFluxSpec() {
  ModelSpec spec;
  spec.name = "flux";
  spec.class_name = "FluxTransformer2DModel";
  spec.aliases = {"flux-transformer", "FluxTransformer"};
  spec.description = "FLUX.1 rectified-flow transformer (double- and single-stream MMDiT blocks)";
  const std::vector<std::string> blocks = {ModuleClassName<FluxTransformerBlockImpl>(),
                                           ModuleClassName<FluxSingleTransformerBlockImpl>()};
  spec.structure.no_split_modules = blocks;
  spec.structure.repeated_blocks = blocks;
  // Module-name substrings whose weights stay in the compute dtype under layerwise casting.
  spec.structure.skip_layerwise_casting_patterns = {"pos_embed", "norm"};
  // Capabilities wired (rows derived from the handlers): single-file loading and LoRA formats.
  spec.weight_mapping = &FluxWeightMappingHandler();
  spec.lora = &FluxLoraHandler();
  spec.factory = [](const nlohmann::json& config, const ModelOptions& options) {
    return CreateFluxTransformer(config, options);
  };
  return spec;
}

DS_REGISTER_MODEL(MakeFluxSpec());

PipelineSpec MakeFluxPipelineSpec() {
  PipelineSpec spec;
  spec.class_name = "FluxPipeline";
  spec.description =
      "FLUX.1 text-to-image (flow-matching Euler; transformer + AutoencoderKL; prompt embeddings)";
  spec.from_pretrained = [](const std::string& folder, const PipelineLoadOptions& options)
      -> absl::StatusOr<std::unique_ptr<DiffusionPipeline>> {
    FluxPipelineLoadOptions flux_options;
    flux_options.model = options.model;
    flux_options.pipeline = options.pipeline;
    flux_options.lora = options.lora;
    ASSIGN_OR_RETURN(std::unique_ptr<FluxPipeline> pipeline,
                     FluxPipeline::FromPretrained(folder, flux_options));
    return std::unique_ptr<DiffusionPipeline>(std::move(pipeline));
  };
  return spec;
}

DS_REGISTER_PIPELINE(MakeFluxPipelineSpec());

}  // namespace ds::flux
