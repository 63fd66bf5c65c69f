// The T5EncoderModel single-file handler: T5 encoders in transformers naming, bare
// (`t5xxl_fp16.safetensors`, full T5 checkpoints whose decoder is then ignored) or under
// ComfyUI's `text_encoders.t5xxl.transformer.` prefix. From key names and shapes only.
//
// Derived from the weights: vocab_size and d_model (the token embedding, stored as shared.weight
// and/or encoder.embed_tokens.weight), num_heads and relative_attention_num_buckets (block 0's
// relative_attention_bias), d_kv (q rows / num_heads), d_ff, num_layers, gated or not (wi_0/wi_1
// vs wi). Not recorded in weights (listed as assumed, callers override with a config): the
// activation (feed_forward_proj "gated-gelu" = gelu_new for gated files, as T5 v1.1 / XXL;
// "relu" otherwise, as T5 v1.0), relative_attention_max_distance (128), layer_norm_epsilon
// (1e-6).
//
// Left out and reported as ignored: encoder.embed_tokens.weight when shared.weight is also
// stored (tied), decoder.* and lm_head.weight of full T5 checkpoints. Any other unknown key is an
// error.
//
// Pure (no LibTorch); the handler object is immutable and thread-safe.
#pragma once

#include "handlers/weight_mapping.h"

namespace ds::t5 {

class T5WeightMapping : public WeightMappingHandler {
 public:
  // "t5-v1.1" (gated feed-forward, e.g. T5-XXL of FLUX.1 / SD3) and "t5-v1.0" (wi + relu).
  std::vector<std::string> VariantNames() const override;
  std::vector<std::string> MarkerKeys() const override;
  // A match needs block 0's query weight and relative attention bias plus a token embedding.
  absl::StatusOr<std::optional<WeightMappingDetection>> Detect(
      const KeyShapes& keys) const override;
  absl::StatusOr<MappingPlan> PlanToDiffusers(
      const KeyShapes& keys, const WeightMappingDetection& detection) const override;
  // transformers naming both ways: an identity plan (checked).
  absl::StatusOr<MappingPlan> PlanFromDiffusers(const KeyShapes& keys) const override;
  // "text_encoders.t5xxl.transformer." (ComfyUI all-in-one files).
  std::vector<std::string> ComponentPrefixes() const override;
};

// The handler object the T5EncoderModel spec wires (static lifetime).
const T5WeightMapping& T5WeightMappingHandler();

}  // namespace ds::t5
