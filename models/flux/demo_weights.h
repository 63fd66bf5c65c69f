// flux-tiny's trained files, embedded in the binary at build time from models/flux/demo/flux-tiny/
// (the diffusers pipeline folder tools/train writes): each component's safetensors weights and
// the VAE's config.json (whose scaling/shift factors training measured). Static, immutable data:
// thread-safe.
#pragma once

#include <string_view>

namespace ds::flux {

struct FluxTinyEmbeddedFiles {
  std::string_view transformer;     // transformer/diffusion_pytorch_model.safetensors
  std::string_view vae;             // vae/diffusion_pytorch_model.safetensors
  std::string_view text_encoder;    // text_encoder/model.safetensors
  std::string_view text_encoder_2;  // text_encoder_2/model.safetensors
  std::string_view vae_config;      // vae/config.json
};

const FluxTinyEmbeddedFiles& FluxTinyEmbedded();

}  // namespace ds::flux
