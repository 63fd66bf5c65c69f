#include "handlers/tokenizers/t5_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "handlers/status.h"

namespace ds::tokenizers {
namespace {

constexpr char kSpieceUnderline[] = "\xe2\x96\x81";  // U+2581 "▁"

}  // namespace

absl::StatusOr<std::unique_ptr<T5Tokenizer>> T5Tokenizer::Load(
    const internal::TokenizerFiles& files) {
  namespace fs = std::filesystem;
  auto tok = std::unique_ptr<T5Tokenizer>(new T5Tokenizer());
  tok->model_path_ = (fs::path(files.dir) / "spiece.model").string();
  ASSIGN_OR_RETURN(std::optional<bool> legacy, internal::ConfigBool(files, "legacy"));
  tok->legacy_ = legacy.value_or(true);
  ASSIGN_OR_RETURN(std::optional<bool> prefix, internal::ConfigBool(files, "add_prefix_space"));
  tok->add_prefix_space_ = prefix.value_or(true);

  ASSIGN_OR_RETURN(std::string model_bytes, internal::ReadFileBytes(tok->model_path_));
  std::string error;
  tok->sp_ = SentencePieceModel::Load(model_bytes, /*add_dummy_prefix=*/tok->legacy_, &error);
  if (tok->sp_ == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(tok->model_path_, ": not a SentencePiece model: ", error));
  }

  auto special = [&](const char* key, const char* fallback) -> absl::StatusOr<std::string> {
    ASSIGN_OR_RETURN(std::optional<std::string> v, internal::SpecialToken(files, key));
    return v.value_or(fallback);
  };
  ASSIGN_OR_RETURN(const std::string eos, special("eos_token", "</s>"));
  ASSIGN_OR_RETURN(tok->unk_token_, special("unk_token", "<unk>"));
  ASSIGN_OR_RETURN(const std::string pad, special("pad_token", "<pad>"));
  ASSIGN_OR_RETURN(std::optional<int64_t> extra_ids, internal::ConfigInt(files, "extra_ids"));
  ASSIGN_OR_RETURN(auto additional, internal::AdditionalSpecialTokens(files));

  ASSIGN_OR_RETURN(std::vector<internal::AddedToken> decoder, internal::AddedTokensDecoder(files));
  if (!decoder.empty()) {
    for (const auto& t : decoder) tok->added_.Add(t);
  } else {
    const int64_t n = extra_ids.value_or(100);
    for (int64_t i = 0; i < n; ++i) {
      tok->added_.Add(internal::AddedToken{absl::StrCat("<extra_id_", i, ">"),
                                           tok->sp_->size() - 1 + n - i, true, true, false, true});
    }
    const std::string added_path = (fs::path(files.dir) / "added_tokens.json").string();
    std::error_code ec;
    if (fs::exists(added_path, ec)) {
      ASSIGN_OR_RETURN(nlohmann::json added, internal::ReadJsonFile(added_path));
      if (!added.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(added_path, ": not a JSON object"));
      }
      for (const auto& [content, id] : added.items()) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0) {
          return absl::InvalidArgumentError(absl::StrCat(added_path, ": entry \"", content,
                                                         "\" must be a non-negative integer id"));
        }
        tok->added_.Add(
            internal::AddedToken{content, id.get<int64_t>(), false, false, false, false});
      }
    }
  }
  std::vector<std::string> specials = {eos, tok->unk_token_, pad};
  if (additional) {
    specials.insert(specials.end(), additional->begin(), additional->end());
  } else {
    for (int64_t i = 0; i < extra_ids.value_or(100); ++i) {
      specials.push_back(absl::StrCat("<extra_id_", i, ">"));
    }
  }
  for (const std::string& s : specials) {
    tok->special_tokens_.insert(s);
    if (tok->added_.Find(s) != nullptr) continue;
    // As PreTrainedTokenizer adds them: the piece's id, or a new id after the vocabulary.
    int64_t id = tok->sp_->PieceToId(s);
    if (id == tok->sp_->unk_id() && s != tok->unk_token_) {
      id = std::max<int64_t>(tok->sp_->size() - 1, tok->added_.max_id()) + 1;
    }
    tok->added_.Add(internal::AddedToken{s, id, false, false, false, true});
  }
  tok->eos_id_ = tok->added_.Find(eos)->id;
  tok->pad_id_ = tok->added_.Find(pad)->id;
  tok->vocab_size_ = std::max<int64_t>(tok->sp_->size() - 1, tok->added_.max_id()) + 1;
  ASSIGN_OR_RETURN(tok->model_max_length_, internal::ModelMaxLength(files));

  if (!tok->legacy_) {
    std::vector<std::string> pieces;
    if (!tok->sp_->Encode(tok->unk_token_, &pieces, &error)) {
      return absl::InvalidArgumentError(absl::StrCat(tok->model_path_, ": ", error));
    }
    tok->unk_token_length_ = pieces.size();
  }
  return tok;
}

int64_t T5Tokenizer::TokenToId(const std::string& token) const {
  if (const internal::AddedToken* t = added_.Find(token)) return t->id;
  return sp_->PieceToId(token);
}

absl::Status T5Tokenizer::TokenizeChunk(const std::string& chunk,
                                        std::vector<std::string>* pieces) const {
  std::string error;
  std::vector<std::string> out;
  if (legacy_ || !(absl::StartsWith(chunk, kSpieceUnderline) || absl::StartsWith(chunk, " "))) {
    if (!sp_->Encode(chunk, &out, &error)) {
      return absl::InternalError(absl::StrCat(model_path_, ": ", error));
    }
  } else {
    // SentencePiece drops leading whitespace; behind unk_token it survives, and unk_token's own
    // pieces are removed again.
    if (!sp_->Encode(unk_token_ + chunk, &out, &error)) {
      return absl::InternalError(absl::StrCat(model_path_, ": ", error));
    }
    if (out.size() >= unk_token_length_) {
      out.erase(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(unk_token_length_));
    }
  }
  pieces->insert(pieces->end(), std::make_move_iterator(out.begin()),
                 std::make_move_iterator(out.end()));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> T5Tokenizer::Tokenize(std::string_view text) const {
  RETURN_IF_ERROR(internal::CheckUtf8(text));
  std::string prepared(text);
  const bool non_legacy = !legacy_ && !text.empty();
  if (non_legacy) {
    prepared = absl::StrReplaceAll(prepared, {{kSpieceUnderline, " "}});
    if (add_prefix_space_) prepared = kSpieceUnderline + prepared;
  }
  std::vector<std::string> tokens;
  for (const std::string& chunk : added_.Split(prepared)) {
    if (added_.Find(chunk) != nullptr) {
      tokens.push_back(chunk);
    } else {
      RETURN_IF_ERROR(TokenizeChunk(chunk, &tokens));
    }
  }
  if (non_legacy && tokens.size() > 1 && tokens[0] == kSpieceUnderline &&
      special_tokens_.contains(tokens[1])) {
    tokens.erase(tokens.begin());
  }
  return tokens;
}

absl::StatusOr<TokenizedText> T5Tokenizer::Encode(std::string_view text,
                                                  const TokenizerOptions& options) const {
  ASSIGN_OR_RETURN(std::vector<std::string> tokens, Tokenize(text));
  std::vector<int64_t> ids;
  ids.reserve(tokens.size() + 1);
  for (const std::string& t : tokens) ids.push_back(TokenToId(t));
  return internal::FinishEncoding(
      std::move(ids), 1,
      [this](std::vector<int64_t> body) {
        if (body.empty() || body.back() != eos_id_) body.push_back(eos_id_);
        return body;
      },
      options, model_max_length_, pad_id_);
}

}  // namespace ds::tokenizers
