// THE one place that declares CLIPVisionModelWithProjection: names, structural facts, wired
// capability handlers and the factory. Everything the metadata table shows is derived from it.
#include "models/clip_vision/spec.h"

#include "handlers/registry.h"
#include "models/clip_vision/clip_vision.h"

namespace ds::clip_vision {

ModelSpec MakeClipVisionSpec() {
  ModelSpec spec;
  spec.name = "clip-vision";
  spec.class_name = kClipVisionClassName;
  spec.aliases = {"clip-vision-with-projection", "clip-image-encoder"};
  spec.description =
      "CLIP ViT image encoder with projection (transformers): image -> image_embeds for "
      "IP-Adapters";
  // transformers' CLIPVisionModelWithProjection._no_split_modules: the encoder layer, named from
  // the module type itself ("CLIPEncoderLayer").
  spec.structure.no_split_modules = {ModuleClassName<CLIPEncoderLayerImpl>()};
  spec.structure.repeated_blocks = spec.structure.no_split_modules;
  // No capability handlers: no LoRA, no single-file mapping.
  spec.factory = [](const nlohmann::json& config, const ModelOptions& options) {
    return CreateClipVisionModel(config, options);
  };
  // Keys transformers ignores on load (legacy position_ids, a full CLIPModel's text tower).
  spec.adapt_state_dict = AdaptClipVisionStateDict;
  return spec;
}

DS_REGISTER_MODEL(MakeClipVisionSpec());

}  // namespace ds::clip_vision
