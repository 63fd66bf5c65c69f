// T5Tokenizer (transformers' slow tokenizer) over spiece.model with Debian's SentencePiece.
//
// Text chunks between added tokens (see tokenizer.h) go through SentencePiece; the pieces map to
// ids (added tokens first, then the model's pieces, unknown ones to unk). Encode appends eos
// unless the ids already end with it (transformers' _add_eos_if_not_present).
//
// tokenizer_config.json's `legacy` (absent: true, transformers' default) selects the behaviour:
//   * legacy: every chunk is encoded on its own, so SentencePiece puts its dummy "▁" prefix on
//     each (e.g. after "<extra_id_0>").
//   * non-legacy: the model loads without the dummy prefix; "▁" in the text becomes a space, the
//     text gets one "▁" in front when `add_prefix_space` (default true), a chunk starting with a
//     space or "▁" is encoded behind unk_token and those pieces dropped (so SentencePiece keeps
//     its leading space), and a leading lone "▁" before a special token is dropped.
// Added tokens: tokenizer_config.json's added_tokens_decoder; without one, <extra_id_N> (N <
// extra_ids, default 100) = size(spiece) - 1 + extra_ids - N with lstrip/rstrip, then
// added_tokens.json; the special tokens (eos "</s>", unk "<unk>", pad "<pad>" and
// additional_special_tokens) always.
//
// Thread-safety: immutable after Load.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "handlers/tokenizers/sentencepiece_model.h"
#include "handlers/tokenizers/tokenizer.h"
#include "handlers/tokenizers/tokenizer_internal.h"

namespace ds::tokenizers {

class T5Tokenizer final : public Tokenizer {
 public:
  // Loads spiece.model from files.dir. NOT_FOUND naming a missing spiece.model; INVALID_ARGUMENT
  // naming the file (and key) when the model or a config value is malformed.
  static absl::StatusOr<std::unique_ptr<T5Tokenizer>> Load(const internal::TokenizerFiles& files);

  std::string kind() const override { return "t5"; }
  absl::StatusOr<std::vector<std::string>> Tokenize(std::string_view text) const override;
  absl::StatusOr<TokenizedText> Encode(std::string_view text,
                                       const TokenizerOptions& options) const override;
  int64_t model_max_length() const override { return model_max_length_; }
  int64_t pad_token_id() const override { return pad_id_; }
  int64_t eos_token_id() const override { return eos_id_; }
  int64_t bos_token_id() const override { return -1; }
  int64_t vocab_size() const override { return vocab_size_; }

  bool legacy() const { return legacy_; }

 private:
  T5Tokenizer() = default;
  // transformers' _tokenize of one chunk.
  absl::Status TokenizeChunk(const std::string& chunk, std::vector<std::string>* pieces) const;
  int64_t TokenToId(const std::string& token) const;

  std::unique_ptr<SentencePieceModel> sp_;
  std::string model_path_;
  bool legacy_ = true;
  bool add_prefix_space_ = true;
  std::string unk_token_;
  std::size_t unk_token_length_ = 0;  // pieces of unk_token alone (non-legacy)
  internal::AddedTokenSet added_;
  absl::flat_hash_set<std::string> special_tokens_;  // all_special_tokens
  int64_t eos_id_ = 0, pad_id_ = 0;
  int64_t model_max_length_ = kUnboundedLength;
  int64_t vocab_size_ = 0;
};

}  // namespace ds::tokenizers
