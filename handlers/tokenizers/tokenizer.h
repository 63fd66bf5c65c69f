// Tokenizer: the model-agnostic text tokenizer interface pipelines use, and the loader of a
// diffusers pipeline's tokenizer/ or tokenizer_2/ folder.
//
// Implementations reproduce transformers' slow tokenizers id for id:
//   * "clip": CLIPTokenizer (vocab.json + merges.txt; byte-level BPE with "</w>" word ends). Its
//     text cleanup is the path transformers takes without ftfy installed (BasicTokenizer: control
//     characters dropped, whitespace normalized, CJK ideographs spaced, NFC, lower-cased).
//   * "t5": T5Tokenizer (spiece.model through SentencePiece), honouring tokenizer_config.json's
//     `legacy` and `add_prefix_space`.
// Added and special tokens written in the text (e.g. "<|endoftext|>", "</s>", "<extra_id_0>") are
// split out first and map to their ids, with their lstrip/rstrip/single_word flags, as
// PreTrainedTokenizer.tokenize does. The *Fast variants in tokenizer_class load the same files and
// get the slow tokenizer's behaviour.
//
// Thread-safety: a loaded Tokenizer is immutable to callers; every method is const and may run
// concurrently (internal caches are synchronized).
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ds::tokenizers {

// How Encode shapes the ids, as transformers' `tokenizer(text, padding="max_length",
// truncation=True, max_length=...)` does (the call diffusers' pipelines make).
struct TokenizerOptions {
  // Target length in tokens including the special tokens. -1: the tokenizer's model_max_length().
  // Otherwise at least the number of special tokens Encode adds (CLIP 2, T5 1).
  int64_t max_length = -1;
  // Pad (on the right, with pad_token_id(), mask 0) up to max_length.
  bool pad_to_max_length = true;
  // Cut the text's tokens (from the right) so that they and the special tokens fit max_length;
  // the end-of-sequence token is kept.
  bool truncate = true;
};

struct TokenizedText {
  // Token ids: [BOS] text tokens EOS, then padding.
  std::vector<int64_t> ids;
  // 1 for every token (special tokens included), 0 for padding; same length as ids.
  std::vector<int64_t> attention_mask;
  // Whether truncation removed text tokens.
  bool truncated = false;
  // Length of the encoding (special tokens included) without truncation or padding.
  int64_t untruncated_length = 0;
};

// model_max_length() when tokenizer_config.json gives none (or transformers' "very large" 1e30
// placeholder): Encode then needs an explicit max_length to pad.
inline constexpr int64_t kUnboundedLength = std::numeric_limits<int64_t>::max();

class Tokenizer {
 public:
  virtual ~Tokenizer();

  // "clip" or "t5".
  virtual std::string kind() const = 0;

  // transformers' tokenizer.tokenize(text): the token strings (CLIP BPE tokens such as "cat</w>",
  // SentencePiece pieces such as "▁cat", added tokens as written), without BOS/EOS.
  // INVALID_ARGUMENT if `text` is not valid UTF-8 (naming the byte offset).
  virtual absl::StatusOr<std::vector<std::string>> Tokenize(std::string_view text) const = 0;

  // Token ids with special tokens, truncated and padded per `options`. INVALID_ARGUMENT for text
  // that is not valid UTF-8, or a max_length that is < -1, smaller than the special tokens, or
  // needed (padding) but unknown (-1 with an unbounded model_max_length()).
  virtual absl::StatusOr<TokenizedText> Encode(std::string_view text,
                                               const TokenizerOptions& options) const = 0;

  // tokenizer_config.json's model_max_length (CLIP 77, T5 512), or kUnboundedLength.
  virtual int64_t model_max_length() const = 0;
  virtual int64_t pad_token_id() const = 0;
  virtual int64_t eos_token_id() const = 0;
  // -1 when the tokenizer adds no beginning-of-sequence token (T5).
  virtual int64_t bos_token_id() const = 0;
  // One more than the largest id Encode can return (len(tokenizer) in transformers for these
  // vocabularies): what a text encoder's embedding table must cover.
  virtual int64_t vocab_size() const = 0;
};

// Loads the tokenizer in `dir` (a diffusers pipeline's tokenizer/ or tokenizer_2/ folder, or any
// folder written by save_pretrained). The kind comes from tokenizer_config.json's tokenizer_class
// (CLIPTokenizer, T5Tokenizer or their Fast variants); without one, from the files present
// (vocab.json + merges.txt: CLIP; spiece.model: T5). special_tokens_map.json, when present,
// overrides the config's special tokens, as transformers' from_pretrained does.
// Errors: NOT_FOUND when `dir` or a required file (vocab.json, merges.txt, spiece.model) is
// missing, naming the path; INVALID_ARGUMENT for an unsupported tokenizer_class or malformed
// content, naming the file and the key (or line) at fault.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFromFolder(const std::string& dir);

}  // namespace ds::tokenizers
