// THE one place that declares FluxTransformer2DModel: names, structural facts, wired capability
// handlers and the factory. Everything the metadata table shows is derived from this spec.
#include "models/flux/spec.h"

#include "handlers/registry.h"
#include "models/flux/lora.h"
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

}  // namespace ds::flux
