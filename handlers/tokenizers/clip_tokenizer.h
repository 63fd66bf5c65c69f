// CLIPTokenizer (transformers' slow tokenizer) from vocab.json + merges.txt.
//
// Per text chunk between added tokens (see tokenizer.h), exactly transformers' path without ftfy:
//   1. BasicTokenizer(strip_accents=False, do_split_on_punc=False): drop U+0000, U+FFFD and
//      category C* code points except \t \n \r; whitespace (\t \n \r, Zs) becomes a space; CJK
//      ideographs get spaces around them; NFC; split on whitespace; str.lower() each word.
//   2. The CLIP pattern, leftmost alternative first: <|startoftext|> | <|endoftext|> | 's 't 're
//      've 'm 'll 'd (case-insensitive) | \p{L}+ | one \p{N} | [^\s\p{L}\p{N}]+.
//   3. Each match as its UTF-8 bytes through the GPT-2 byte-to-unicode table, then BPE over those
//      symbols with "</w>" on the last one: repeatedly merge every non-overlapping occurrence of
//      the lowest-ranked pair, left to right (a heap of pair ranks: O(n log n) per word). The two
//      CLIP markers themselves stay whole.
// Tokens map to vocab.json ids (unknown: unk_token); Encode adds bos and eos.
//
// merges.txt: its first line is skipped (the "#version" header) and at most 48894 merges are
// read, as transformers does (49152 - 256 - 2). Every read line must hold two symbols.
//
// Thread-safety: immutable after Load except a word cache (mutex-guarded, bounded).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "handlers/tokenizers/tokenizer.h"
#include "handlers/tokenizers/tokenizer_internal.h"

namespace ds::tokenizers {

class ClipTokenizer final : public Tokenizer {
 public:
  // Loads vocab.json and merges.txt from files.dir. NOT_FOUND naming a missing file;
  // INVALID_ARGUMENT naming the file and key/line for malformed content (vocab.json not an object
  // of non-negative integer ids, a merges line without exactly two symbols, a bad config value).
  // Special tokens missing from vocab.json and added_tokens_decoder get the next free id, as
  // transformers adds them.
  static absl::StatusOr<std::unique_ptr<ClipTokenizer>> Load(const internal::TokenizerFiles& files);

  std::string kind() const override { return "clip"; }
  absl::StatusOr<std::vector<std::string>> Tokenize(std::string_view text) const override;
  absl::StatusOr<TokenizedText> Encode(std::string_view text,
                                       const TokenizerOptions& options) const override;
  int64_t model_max_length() const override { return model_max_length_; }
  int64_t pad_token_id() const override { return pad_id_; }
  int64_t eos_token_id() const override { return eos_id_; }
  int64_t bos_token_id() const override { return bos_id_; }
  int64_t vocab_size() const override { return vocab_size_; }

  // Words held by the BPE cache (for tests).
  std::size_t cached_words() const;

 private:
  struct Merge {
    int32_t rank;
    int32_t merged;  // symbol id of first + second
  };

  ClipTokenizer() = default;

  // Token ids (and, when `tokens` is not null, token strings) of `text` without bos/eos.
  absl::Status TokenizeToIds(std::string_view text, std::vector<int64_t>* ids,
                             std::vector<std::string>* tokens) const;
  // Appends the tokens of one text chunk (no added tokens inside).
  void TokenizeChunk(std::string_view chunk, std::vector<int64_t>* ids,
                     std::vector<std::string>* tokens) const;
  // Appends the BPE tokens of one pattern match (UTF-8).
  void AppendWord(const std::string& word, std::vector<int64_t>* ids,
                  std::vector<std::string>* tokens) const;
  std::vector<int32_t> Bpe(const std::string& word) const;
  int32_t InternSymbol(const std::string& s);
  int64_t TokenToId(const std::string& token) const;

  absl::flat_hash_map<std::string, int64_t> encoder_;
  std::vector<std::string> symbols_;                      // symbol id -> string
  absl::flat_hash_map<std::string, int32_t> symbol_ids_;  // string -> symbol id
  std::vector<int64_t> symbol_token_id_;                  // symbol id -> vocab id (unk if none)
  absl::flat_hash_map<uint64_t, Merge> merges_;           // (first << 32 | second) -> merge
  int32_t byte_symbol_[256] = {};                         // byte -> symbol
  int32_t byte_end_symbol_[256] = {};                     // byte -> symbol + "</w>"
  internal::AddedTokenSet added_;
  int64_t unk_id_ = 0, bos_id_ = 0, eos_id_ = 0, pad_id_ = 0;
  int64_t model_max_length_ = kUnboundedLength;
  int64_t vocab_size_ = 0;

  static constexpr std::size_t kMaxCachedWords = 1 << 16;
  mutable absl::Mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace ds::tokenizers
