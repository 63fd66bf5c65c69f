// The CLIPTextModel single-file handler: CLIP text towers in transformers naming, bare
// (`clip_l.safetensors`) or bundled under a component prefix (ComfyUI's
// `text_encoders.clip_l.transformer.`, SD checkpoints' `cond_stage_model.transformer.`), in the
// current naming (`text_model.encoder.layers.N...`) or the one of transformers releases before
// the `text_model.` level existed (`encoder.layers.N...`, `embeddings...`, `final_layer_norm...`).
// From key names and shapes only.
//
// Derived from the weights: vocab_size, hidden_size, max_position_embeddings,
// num_hidden_layers, intermediate_size, projection_dim (from text_projection.weight when
// present). Not recorded in weights (listed as assumed, callers override with a config):
// num_attention_heads (hidden_size / 64, the head width of every OpenAI/OpenCLIP text tower; 1
// when 64 does not divide hidden_size), hidden_act (quick_gelu), layer_norm_eps (1e-5) and the
// token ids (bos 0, eos 2, pad 1: CLIP-L's config as FLUX.1 / SD ship it, whose eos_token_id 2
// selects transformers' argmax pooling).
//
// Left out and reported as ignored: `text_model.embeddings.position_ids` (a buffer of older
// transformers releases), `text_projection.weight` (CLIPTextModel has no projection) and
// `logit_scale` (CLIPModel's). Any other unknown key is an error.
//
// Pure (no LibTorch); the handler object is immutable and thread-safe.
#pragma once

#include "handlers/weight_mapping.h"

namespace ds::clip {

class ClipTextWeightMapping : public WeightMappingHandler {
 public:
  // "clip-l" (the ViT-L/14 text tower: 768 wide, 12 layers, 49408 tokens) and "clip-text" (any
  // other size).
  std::vector<std::string> VariantNames() const override;
  std::vector<std::string> MarkerKeys() const override;
  // A match needs the token embedding in one of the two namings.
  absl::StatusOr<std::optional<WeightMappingDetection>> Detect(
      const KeyShapes& keys) const override;
  absl::StatusOr<MappingPlan> PlanToDiffusers(
      const KeyShapes& keys, const WeightMappingDetection& detection) const override;
  // transformers naming is both the loaded and the written one: an identity plan (checked).
  absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes& keys) const override;
  // "text_encoders.clip_l.transformer." (ComfyUI) and "cond_stage_model.transformer." (SD 1.x).
  std::vector<std::string> ComponentPrefixes() const override;
};

// The handler object the CLIPTextModel spec wires (static lifetime).
const ClipTextWeightMapping& ClipTextWeightMappingHandler();

}  // namespace ds::clip
