// Pieces shared by the tokenizer implementations (not part of the public interface): reading a
// tokenizer folder's JSON files, added/special tokens and the text split around them, and the
// truncation/special-token/padding step.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/tokenizers/tokenizer.h"

namespace ds::tokenizers::internal {

// A tokenizer folder's configuration: tokenizer_config.json and special_tokens_map.json (each {}
// when the file is absent; the path is then empty).
struct TokenizerFiles {
  std::string dir;
  std::string config_path;
  nlohmann::json config = nlohmann::json::object();
  std::string special_map_path;
  nlohmann::json special_map = nlohmann::json::object();
};

// The bytes of `path`: NOT_FOUND naming it when it does not exist, INTERNAL if unreadable.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path);
// `path` parsed as JSON: NOT_FOUND when missing, INVALID_ARGUMENT naming it when malformed.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);
// Reads `dir`'s JSON files (each optional). NOT_FOUND if `dir` is not a directory;
// INVALID_ARGUMENT if a file is malformed or not a JSON object.
absl::StatusOr<TokenizerFiles> ReadTokenizerFiles(const std::string& dir);

// A special token (bos_token, eos_token, unk_token, pad_token, ...): special_tokens_map.json
// first, then tokenizer_config.json; a string or an AddedToken object {"content": ...}. nullopt
// when absent or null; INVALID_ARGUMENT naming the file and key for any other type.
absl::StatusOr<std::optional<std::string>> SpecialToken(const TokenizerFiles& files,
                                                        const std::string& key);
// additional_special_tokens (same precedence); nullopt when absent.
absl::StatusOr<std::optional<std::vector<std::string>>> AdditionalSpecialTokens(
    const TokenizerFiles& files);
// tokenizer_config.json's `key` as a bool; nullopt when absent or null.
absl::StatusOr<std::optional<bool>> ConfigBool(const TokenizerFiles& files, const std::string& key);
// tokenizer_config.json's `key` as a non-negative integer; nullopt when absent or null.
absl::StatusOr<std::optional<int64_t>> ConfigInt(const TokenizerFiles& files,
                                                 const std::string& key);
// model_max_length, or kUnboundedLength when absent or transformers' 1e30 placeholder.
absl::StatusOr<int64_t> ModelMaxLength(const TokenizerFiles& files);

struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
  bool special = false;
};

// tokenizer_config.json's added_tokens_decoder ({"<id>": {"content": ..., "lstrip": ...}}), in
// file order; empty when absent. INVALID_ARGUMENT naming the file and entry when malformed.
absl::StatusOr<std::vector<AddedToken>> AddedTokensDecoder(const TokenizerFiles& files);

// The tokens PreTrainedTokenizer keeps out of the model's own tokenization.
class AddedTokenSet {
 public:
  // Adds `token` unless one with the same content is present (the first one stays).
  void Add(const AddedToken& token);
  const AddedToken* Find(std::string_view content) const;
  bool empty() const { return tokens_.empty(); }
  int64_t max_id() const { return max_id_; }

  // PreTrainedTokenizer.tokenize's split of valid UTF-8 `text`: the added tokens found
  // (leftmost, longest first) become their own chunks; a token's rstrip / lstrip strips the
  // whitespace (str.isspace) of the chunk after / before it, single_word glues it to a
  // neighbouring chunk that does not end / start with a space. Empty chunks are dropped. A chunk
  // is an added token iff Find(chunk) is not null.
  std::vector<std::string> Split(std::string_view text) const;

 private:
  absl::flat_hash_map<std::string, AddedToken> tokens_;
  std::size_t max_length_ = 0;
  std::array<bool, 256> first_byte_{};
  int64_t max_id_ = -1;
};

// INVALID_ARGUMENT naming the byte offset when `text` is not valid UTF-8.
absl::Status CheckUtf8(std::string_view text);

// Python's str.lstrip() / str.rstrip() (Unicode whitespace) on valid UTF-8.
std::string PyLStrip(std::string_view s);
std::string PyRStrip(std::string_view s);

// The truncation, special tokens and padding of transformers' prepare_for_model + pad for one
// sequence: `text_ids` are cut to max_length - num_special_tokens when truncating,
// `build_inputs` adds the special tokens (build_inputs_with_special_tokens), then padding.
absl::StatusOr<TokenizedText> FinishEncoding(
    std::vector<int64_t> text_ids, int64_t num_special_tokens,
    const std::function<std::vector<int64_t>(std::vector<int64_t>)>& build_inputs,
    const TokenizerOptions& options, int64_t model_max_length, int64_t pad_token_id);

}  // namespace ds::tokenizers::internal
