// THE one place that declares CLIPTextModel and CLIPTextModelWithProjection: names, structural
// facts, wired capability handlers and the factories. Everything the metadata tables show is
// derived from these specs.
#include "models/clip/spec.h"

#include "handlers/registry.h"
#include "models/clip/clip_text_model.h"
#include "models/clip/weight_mapping.h"

namespace ds::clip {
namespace {

ModelStructure Structure() {
  ModelStructure s;
  // transformers' CLIPTextModel._no_split_modules.
  s.no_split_modules = {ModuleClassName<CLIPTextEmbeddingsImpl>(),
                        ModuleClassName<CLIPEncoderLayerImpl>()};
  return s;
}

}  // namespace

ModelSpec MakeCLIPTextModelSpec() {
  ModelSpec spec;
  spec.name = "clip-text";
  spec.class_name = kCLIPTextModelClassName;
  spec.aliases = {"clip-text-model", "clip-l"};
  spec.description =
      "CLIP text encoder (transformers CLIPTextModel; CLIP-L of FLUX.1 / SD): token ids -> "
      "hidden states and the pooled end-of-text vector";
  spec.structure = Structure();
  // Capabilities wired (rows derived from the handlers): single-file loading only; no LoRA.
  spec.weight_mapping = &ClipTextWeightMappingHandler();
  spec.adapt_state_dict = AdaptClipStateDict;
  spec.factory = CreateCLIPTextModel;
  return spec;
}

ModelSpec MakeCLIPTextModelWithProjectionSpec() {
  ModelSpec spec;
  spec.name = "clip-text-with-projection";
  spec.class_name = kCLIPTextModelWithProjectionClassName;
  spec.description =
      "CLIP text encoder with its text projection (transformers CLIPTextModelWithProjection): "
      "token ids -> hidden states and the projected pooled vector (text_embeds)";
  spec.structure = Structure();
  // Folder loading only: single files resolve to CLIPTextModel (its handler), no LoRA.
  spec.adapt_state_dict = AdaptClipStateDict;
  spec.factory = CreateCLIPTextModelWithProjection;
  return spec;
}

DS_REGISTER_MODEL(MakeCLIPTextModelSpec());
DS_REGISTER_MODEL(MakeCLIPTextModelWithProjectionSpec());

}  // namespace ds::clip
