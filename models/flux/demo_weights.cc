// The bytes come from the assembler's .incbin (no generated source, no compile-time cost for a
// few MB); DS_FLUX_TINY_DIR is the shipped folder and DS_FLUX_TINY_DIGEST its files' SHA-256 (set
// by CMake, which re-configures when they change), so a cached object file is never reused for
// other weights.
#include "models/flux/demo_weights.h"

#ifndef DS_FLUX_TINY_DIR
#error "DS_FLUX_TINY_DIR must name models/flux/demo/flux-tiny"
#endif
#ifndef DS_FLUX_TINY_DIGEST
#error "DS_FLUX_TINY_DIGEST must be set"
#endif

#define DS_INCBIN(symbol, file)              \
  __asm__(                                   \
      ".section .rodata\n"                   \
      ".balign 64\n"                         \
      ".local " #symbol "_begin\n" #symbol   \
      "_begin:\n"                            \
      ".incbin \"" DS_FLUX_TINY_DIR "/" file \
      "\"\n"                                 \
      ".local " #symbol "_end\n" #symbol     \
      "_end:\n"                              \
      ".byte 0\n"                            \
      ".previous\n");                        \
  extern "C" const char symbol##_begin[];    \
  extern "C" const char symbol##_end[];

DS_INCBIN(ds_flux_tiny_transformer, "transformer/diffusion_pytorch_model.safetensors")
DS_INCBIN(ds_flux_tiny_vae, "vae/diffusion_pytorch_model.safetensors")
DS_INCBIN(ds_flux_tiny_text_encoder, "text_encoder/model.safetensors")
DS_INCBIN(ds_flux_tiny_text_encoder_2, "text_encoder_2/model.safetensors")
DS_INCBIN(ds_flux_tiny_vae_config, "vae/config.json")

namespace ds::flux {
namespace {

std::string_view Bytes(const char* begin, const char* end) {
  return std::string_view(begin, static_cast<size_t>(end - begin));
}

}  // namespace

const FluxTinyEmbeddedFiles& FluxTinyEmbedded() {
  static const FluxTinyEmbeddedFiles kFiles = {
      Bytes(ds_flux_tiny_transformer_begin, ds_flux_tiny_transformer_end),
      Bytes(ds_flux_tiny_vae_begin, ds_flux_tiny_vae_end),
      Bytes(ds_flux_tiny_text_encoder_begin, ds_flux_tiny_text_encoder_end),
      Bytes(ds_flux_tiny_text_encoder_2_begin, ds_flux_tiny_text_encoder_2_end),
      Bytes(ds_flux_tiny_vae_config_begin, ds_flux_tiny_vae_config_end)};
  (void)DS_FLUX_TINY_DIGEST;
  return kFiles;
}

}  // namespace ds::flux
