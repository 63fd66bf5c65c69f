// T5Config: the parameters of transformers' T5EncoderModel (its config.json), and the
// transformers state-dict layout they imply.
//
// Pure data + JSON conversion, no LibTorch. Thread-safe as a value type.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::t5 {

inline constexpr char kT5EncoderModelClassName[] = "T5EncoderModel";

// Field names, meanings and defaults are exactly those of transformers' T5Config (4.43); only the
// encoder's fields matter (decoder ones are kept for the round trip).
struct T5Config {
  int64_t vocab_size = 32128;
  int64_t d_model = 512;  // hidden width
  int64_t d_kv = 64;      // width of one attention head (inner width = num_heads * d_kv)
  int64_t d_ff = 2048;    // feed-forward width
  int64_t num_layers = 6;
  int64_t num_decoder_layers = -1;  // -1: null (= num_layers); unused by the encoder
  int64_t num_heads = 8;
  int64_t relative_attention_num_buckets = 32;
  int64_t relative_attention_max_distance = 128;
  double dropout_rate = 0.1;  // training only
  double layer_norm_epsilon = 1e-6;
  double initializer_factor = 1.0;
  // "[gated-]ACT": "relu" (T5 v1.0: wi, relu, wo), "gated-gelu" (v1.1 / XXL: wi_0, wi_1, wo with
  // gelu_new, as transformers maps it for backwards compatibility), "gated-silu", ...
  std::string feed_forward_proj = "relu";
  // Derived from feed_forward_proj as transformers does (a config.json's own "dense_act_fn" /
  // "is_gated_act" override them, as transformers' PretrainedConfig does). Supported activations:
  // relu, gelu, gelu_new, gelu_pytorch_tanh, silu/swish.
  std::string dense_act_fn = "relu";
  bool is_gated_act = false;
  int64_t pad_token_id = 0;
  int64_t eos_token_id = 1;

  int64_t inner_dim() const { return num_heads * d_kv; }

  // OK, or INVALID_ARGUMENT naming the first bad field: sizes positive, at least 2 buckets,
  // max_distance positive, a supported activation, layer_norm_epsilon positive and finite.
  absl::Status Validate() const;

  // Parses a transformers config.json object. Absent keys take the defaults above; other keys
  // (architectures, torch_dtype, ...) are ignored, as transformers does. INVALID_ARGUMENT naming
  // the field (as "T5Config.<field>") for a value of the wrong type, a malformed
  // feed_forward_proj and anything Validate() rejects.
  static absl::StatusOr<T5Config> FromJson(const nlohmann::json& json);

  // The normalized config: every field above (num_decoder_layers null when unset),
  // "model_type": "t5", "architectures": ["T5EncoderModel"]. FromJson(ToJson()) round-trips.
  nlohmann::json ToJson() const;
};

struct T5Parameter {
  std::string name;  // "encoder.block.0.layer.0.SelfAttention.q.weight"
  std::vector<int64_t> shape;
};

// Every parameter of T5EncoderModel for `config` (must be valid), in module order: shared.weight
// (the token embedding; transformers' encoder.embed_tokens.weight is the same tensor), the blocks
// (relative_attention_bias in block 0 only), encoder.final_layer_norm.weight.
std::vector<T5Parameter> T5EncoderParameters(const T5Config& config);

}  // namespace ds::t5
