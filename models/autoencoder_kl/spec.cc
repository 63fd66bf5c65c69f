// THE one place that declares AutoencoderKL: names, structural facts, wired capability handlers
// and the factory. Everything the metadata table shows is derived from this spec.
#include "models/autoencoder_kl/spec.h"

#include "handlers/registry.h"
#include "models/autoencoder_kl/autoencoder_kl.h"
#include "models/autoencoder_kl/weight_mapping.h"

namespace ds::autoencoder_kl {

ModelSpec MakeAutoencoderKLSpec() {
  ModelSpec spec;
  spec.name = "autoencoder-kl";
  spec.class_name = kAutoencoderKLClassName;
  spec.aliases = {"vae", "flux-vae"};
  spec.description =
      "KL-regularized VAE of latent diffusion (FLUX.1 / SD): image <-> latent encoder and decoder";
  // The resnet is the unit that must not be split across devices (diffusers lists it too; its
  // BasicTransformerBlock entry names a class AutoencoderKL never builds).
  spec.structure.no_split_modules = {ModuleClassName<ResnetBlock2DImpl>()};
  // Capabilities wired (rows derived from the handlers): single-file loading only; no LoRA.
  spec.weight_mapping = &VaeWeightMappingHandler();
  spec.factory = [](const nlohmann::json& config, const ModelOptions& options) {
    return CreateAutoencoderKL(config, options);
  };
  return spec;
}

DS_REGISTER_MODEL(MakeAutoencoderKLSpec());

}  // namespace ds::autoencoder_kl
