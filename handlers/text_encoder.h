// TextEncoder: the model-agnostic face of a text encoder (CLIP text model, T5 encoder, ...) as
// pipelines use it. A pipeline of one model family reaches the text encoders of other model
// folders only through this interface (models/ folders never include each other): it loads the
// encoder through the registry as a ds::DiffusionModel (LoadModelFromFolder, LoadSingleFile) and
// dynamic_casts it to TextEncoder, as it does with LatentImageDecoder (image_decoder.h).
//
// Token ids come from the matching tokenizer (padded / truncated by the caller, as diffusers'
// pipelines do); the encoder never tokenizes.
//
// Thread-safety: implementations are immutable once loaded; every method may run concurrently
// (EncodeTokens from many threads at once).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ds {

struct TextEncoderOutput {
  // [B, L, hidden_size()] in the encoder's dtype and device: transformers' last_hidden_state
  // (after the final layer norm for both CLIP and T5).
  torch::Tensor last_hidden_state;
  // [B, D] or undefined when the encoder has no pooled output (T5). CLIPTextModel: the hidden
  // state at the end-of-text token after the final layer norm (transformers' pooler_output);
  // CLIPTextModelWithProjection: that vector projected (transformers' text_embeds, D =
  // projection_dim), which is what pipelines use as the pooled embedding.
  torch::Tensor pooled;
  // Only when asked for: transformers' output_hidden_states tuple, each [B, L, hidden_size()]:
  // the embeddings, then the output of every layer. The encoder documents whether the last entry
  // is before (CLIP) or after (T5) the final layer norm.
  std::vector<torch::Tensor> hidden_states;
};

class TextEncoder {
 public:
  virtual ~TextEncoder() = default;

  // Encodes `input_ids` [B, L] (an integer tensor, any device; B, L >= 1) with an optional
  // `attention_mask` [B, L] (undefined = attend to every token; otherwise 1 = token, 0 = padding,
  // any integer, bool or floating dtype, as transformers accepts it).
  // INVALID_ARGUMENT naming `input_ids` (or `attention_mask`) and its shape for a wrong rank,
  // dtype or size, an id outside [0, vocab_size) (naming the id and its position), or a sequence
  // longer than max_position_embeddings(); INTERNAL if LibTorch fails (e.g. out of memory).
  virtual absl::StatusOr<TextEncoderOutput> EncodeTokens(const torch::Tensor& input_ids,
                                                         const torch::Tensor& attention_mask,
                                                         bool output_hidden_states = false) const = 0;

  // Width of last_hidden_state (CLIP hidden_size, T5 d_model).
  virtual int64_t hidden_size() const = 0;
  // The longest sequence the encoder takes (CLIP max_position_embeddings); -1 when unbounded
  // (T5's relative positions).
  virtual int64_t max_position_embeddings() const = 0;
};

// EncodeTokens' inputs checked and converted for a model (shared by the implementations).
struct TokenInputs {
  torch::Tensor input_ids;       // int64 [B, L] on the model's device
  torch::Tensor attention_mask;  // `mask_dtype` [B, L] on the model's device, or undefined
};

// Checks `input_ids` / `attention_mask` as TextEncoder::EncodeTokens documents (`model` prefixes
// the messages, e.g. "CLIPTextModel"; `max_length` -1 = unbounded) and converts them for a model
// on `device`. INVALID_ARGUMENT naming the tensor, its shape or dtype, or the first id outside
// [0, vocab_size) with its position; INTERNAL if LibTorch fails.
absl::StatusOr<TokenInputs> PrepareTokenInputs(absl::string_view model,
                                               const torch::Tensor& input_ids,
                                               const torch::Tensor& attention_mask,
                                               int64_t vocab_size, int64_t max_length,
                                               const torch::Device& device,
                                               torch::ScalarType mask_dtype);

}  // namespace ds
