#include "handlers/tokenizers/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/status.h"
#include "handlers/tokenizers/clip_tokenizer.h"
#include "handlers/tokenizers/t5_tokenizer.h"
#include "handlers/tokenizers/tokenizer_internal.h"
#include "handlers/tokenizers/unicode_text.h"

namespace ds::tokenizers {

Tokenizer::~Tokenizer() = default;

namespace internal {
namespace {

namespace fs = std::filesystem;

// The JSON value of `key` with its source file: special_tokens_map.json wins over
// tokenizer_config.json. Null when neither has it.
std::pair<const nlohmann::json*, const std::string*> SpecialValue(const TokenizerFiles& files,
                                                                  const std::string& key) {
  if (auto it = files.special_map.find(key); it != files.special_map.end() && !it->is_null()) {
    return {&*it, &files.special_map_path};
  }
  if (auto it = files.config.find(key); it != files.config.end() && !it->is_null()) {
    return {&*it, &files.config_path};
  }
  return {nullptr, nullptr};
}

absl::StatusOr<std::string> TokenContent(const nlohmann::json& v, const std::string& file,
                                         const std::string& key) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) {
    auto c = v.find("content");
    if (c != v.end() && c->is_string()) return c->get<std::string>();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      file, ": ", key, " must be a string or an object with a string \"content\", got ", v.dump()));
}

// Length in bytes of the UTF-8 sequence starting with `b0` (valid input assumed).
std::size_t Utf8Length(unsigned char b0) {
  if (b0 < 0x80) return 1;
  if ((b0 & 0xE0) == 0xC0) return 2;
  if ((b0 & 0xF0) == 0xE0) return 3;
  return 4;
}

char32_t DecodeAt(std::string_view s, std::size_t i, std::size_t len) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  if (len == 1) return p[0];
  char32_t cp = p[0] & (0xFF >> (len + 1));
  for (std::size_t k = 1; k < len; ++k) cp = (cp << 6) | (p[k] & 0x3F);
  return cp;
}

}  // namespace

absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, " not found"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat("cannot open ", path));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::InternalError(absl::StrCat("cannot read ", path));
  return bytes;
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFileBytes(path));
  nlohmann::json j = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  }
  return j;
}

absl::StatusOr<TokenizerFiles> ReadTokenizerFiles(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("tokenizer folder ", dir, " not found"));
  }
  TokenizerFiles files;
  files.dir = dir;
  const std::string config_path = (fs::path(dir) / "tokenizer_config.json").string();
  if (fs::exists(config_path, ec)) {
    ASSIGN_OR_RETURN(files.config, ReadJsonFile(config_path));
    if (!files.config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
    }
    files.config_path = config_path;
  }
  const std::string map_path = (fs::path(dir) / "special_tokens_map.json").string();
  if (fs::exists(map_path, ec)) {
    ASSIGN_OR_RETURN(files.special_map, ReadJsonFile(map_path));
    if (!files.special_map.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(map_path, ": not a JSON object"));
    }
    files.special_map_path = map_path;
  }
  return files;
}

absl::StatusOr<std::optional<std::string>> SpecialToken(const TokenizerFiles& files,
                                                        const std::string& key) {
  auto [v, file] = SpecialValue(files, key);
  if (v == nullptr) return std::optional<std::string>();
  ASSIGN_OR_RETURN(std::string content, TokenContent(*v, *file, key));
  if (content.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(*file, ": ", key, " is empty"));
  }
  return std::optional<std::string>(std::move(content));
}

absl::StatusOr<std::optional<std::vector<std::string>>> AdditionalSpecialTokens(
    const TokenizerFiles& files) {
  const std::string key = "additional_special_tokens";
  auto [v, file] = SpecialValue(files, key);
  if (v == nullptr) return std::optional<std::vector<std::string>>();
  if (!v->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(*file, ": ", key, " must be a list"));
  }
  std::vector<std::string> out;
  for (std::size_t i = 0; i < v->size(); ++i) {
    ASSIGN_OR_RETURN(std::string content,
                     TokenContent((*v)[i], *file, absl::StrCat(key, "[", i, "]")));
    if (content.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(*file, ": ", key, "[", i, "] is empty"));
    }
    out.push_back(std::move(content));
  }
  return std::optional<std::vector<std::string>>(std::move(out));
}

absl::StatusOr<std::optional<bool>> ConfigBool(const TokenizerFiles& files,
                                               const std::string& key) {
  auto it = files.config.find(key);
  if (it == files.config.end() || it->is_null()) return std::optional<bool>();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(files.config_path, ": ", key, " must be true or false, got ", it->dump()));
  }
  return std::optional<bool>(it->get<bool>());
}

absl::StatusOr<std::optional<int64_t>> ConfigInt(const TokenizerFiles& files,
                                                 const std::string& key) {
  auto it = files.config.find(key);
  if (it == files.config.end() || it->is_null()) return std::optional<int64_t>();
  if (!it->is_number_integer() || it->get<int64_t>() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        files.config_path, ": ", key, " must be a non-negative integer, got ", it->dump()));
  }
  return std::optional<int64_t>(it->get<int64_t>());
}

absl::StatusOr<int64_t> ModelMaxLength(const TokenizerFiles& files) {
  auto it = files.config.find("model_max_length");
  if (it == files.config.end() || it->is_null()) return kUnboundedLength;
  // transformers writes int(1e30) ("VERY_LARGE_INTEGER") when a checkpoint sets no limit; JSON
  // readers see it as a float or an unsigned integer beyond int64.
  if (it->is_number_float() && it->get<double>() >= 1e18) return kUnboundedLength;
  if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(kUnboundedLength)) {
    return kUnboundedLength;
  }
  if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        files.config_path, ": model_max_length must be a positive integer, got ", it->dump()));
  }
  return it->get<int64_t>();
}

absl::StatusOr<std::vector<AddedToken>> AddedTokensDecoder(const TokenizerFiles& files) {
  std::vector<AddedToken> out;
  auto it = files.config.find("added_tokens_decoder");
  if (it == files.config.end() || it->is_null()) return out;
  const std::string& file = files.config_path;
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": added_tokens_decoder must be an object"));
  }
  for (const auto& [key, value] : it->items()) {
    const std::string where = absl::StrCat(file, ": added_tokens_decoder[\"", key, "\"]");
    AddedToken t;
    std::size_t used = 0;
    try {
      t.id = std::stoll(key, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != key.size() || key.empty() || t.id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": key must be a token id"));
    }
    if (!value.is_object() || !value.contains("content") || !value["content"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": must be an object with a string \"content\""));
    }
    t.content = value["content"].get<std::string>();
    if (t.content.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": \"content\" is empty"));
    }
    for (auto [name, field] : {std::pair<const char*, bool*>{"lstrip", &t.lstrip},
                               {"rstrip", &t.rstrip},
                               {"single_word", &t.single_word},
                               {"special", &t.special}}) {
      auto f = value.find(name);
      if (f == value.end() || f->is_null()) continue;
      if (!f->is_boolean()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": \"", name, "\" must be true or false"));
      }
      *field = f->get<bool>();
    }
    out.push_back(std::move(t));
  }
  return out;
}

void AddedTokenSet::Add(const AddedToken& token) {
  if (token.content.empty() || tokens_.contains(token.content)) return;
  tokens_.emplace(token.content, token);
  max_length_ = std::max(max_length_, token.content.size());
  first_byte_[static_cast<unsigned char>(token.content[0])] = true;
  max_id_ = std::max(max_id_, token.id);
}

const AddedToken* AddedTokenSet::Find(std::string_view content) const {
  auto it = tokens_.find(absl::string_view(content.data(), content.size()));
  return it == tokens_.end() ? nullptr : &it->second;
}

std::vector<std::string> AddedTokenSet::Split(std::string_view text) const {
  // transformers' Trie.split: cut at the added tokens, earliest match first and, among matches
  // starting there, the longest. Byte matching equals code point matching on valid UTF-8.
  std::vector<std::string> chunks;
  std::size_t start = 0;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t match = 0;
    if (first_byte_[static_cast<unsigned char>(text[i])]) {
      for (std::size_t len = std::min(max_length_, text.size() - i); len > 0; --len) {
        if (tokens_.contains(absl::string_view(text.data() + i, len))) {
          match = len;
          break;
        }
      }
    }
    if (match == 0) {
      ++i;
      continue;
    }
    if (i > start) chunks.emplace_back(text.substr(start, i - start));
    chunks.emplace_back(text.substr(i, match));
    i += match;
    start = i;
  }
  if (start < text.size()) chunks.emplace_back(text.substr(start));
  if (tokens_.empty()) return chunks;

  // PreTrainedTokenizer.tokenize: strip / glue the neighbours of each added token, in order
  // (later tokens see the earlier edits).
  for (std::size_t k = 0; k < chunks.size(); ++k) {
    const AddedToken* t = Find(chunks[k]);
    if (t == nullptr) continue;
    // As in transformers, the single_word tests see the neighbours from before the stripping.
    const std::string left = k > 0 ? chunks[k - 1] : std::string();
    const std::string right = k + 1 < chunks.size() ? chunks[k + 1] : std::string();
    if (t->rstrip && !right.empty()) chunks[k + 1] = PyLStrip(right);
    if (t->lstrip && !left.empty()) chunks[k - 1] = PyRStrip(left);
    if (t->single_word && !left.empty() && left.back() != ' ') {
      chunks[k - 1] += chunks[k];
      chunks[k].clear();
    } else if (t->single_word && !right.empty() && right.front() != ' ') {
      chunks[k] += right;
      chunks[k + 1].clear();
    }
  }
  std::vector<std::string> out;
  for (auto& c : chunks) {
    if (!c.empty()) out.push_back(std::move(c));
  }
  return out;
}

absl::Status CheckUtf8(std::string_view text) {
  std::u32string decoded;
  std::size_t offset = 0;
  if (!DecodeUtf8(text, &decoded, &offset)) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is not valid UTF-8 (byte offset ", offset, ")"));
  }
  return absl::OkStatus();
}

std::string PyLStrip(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const std::size_t len = Utf8Length(static_cast<unsigned char>(s[i]));
    if (!IsPythonSpace(DecodeAt(s, i, len))) break;
    i += len;
  }
  return std::string(s.substr(i));
}

std::string PyRStrip(std::string_view s) {
  std::size_t end = 0;  // end of the last non-space code point
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t len = Utf8Length(static_cast<unsigned char>(s[i]));
    if (!IsPythonSpace(DecodeAt(s, i, len))) end = i + len;
    i += len;
  }
  return std::string(s.substr(0, end));
}

absl::StatusOr<TokenizedText> FinishEncoding(
    std::vector<int64_t> text_ids, int64_t num_special_tokens,
    const std::function<std::vector<int64_t>(std::vector<int64_t>)>& build_inputs,
    const TokenizerOptions& options, int64_t model_max_length, int64_t pad_token_id) {
  if (options.max_length < -1 ||
      (options.max_length >= 0 && options.max_length < num_special_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat("max_length ", options.max_length,
                                                   " is smaller than the ", num_special_tokens,
                                                   " special tokens"));
  }
  const int64_t max_length = options.max_length == -1 ? model_max_length : options.max_length;
  const bool bounded = max_length != kUnboundedLength;
  if (options.pad_to_max_length && !bounded) {
    return absl::InvalidArgumentError(
        "padding needs a max_length: the tokenizer has no model_max_length");
  }
  TokenizedText out;
  const int64_t n = static_cast<int64_t>(text_ids.size());
  if (options.truncate && bounded && n + num_special_tokens > max_length) {
    // Computed on the unmodified ids, as transformers' prepare_for_model does before cutting.
    out.untruncated_length = static_cast<int64_t>(build_inputs(text_ids).size());
    text_ids.resize(static_cast<std::size_t>(max_length - num_special_tokens));
    out.truncated = true;
    out.ids = build_inputs(std::move(text_ids));
  } else {
    out.ids = build_inputs(std::move(text_ids));
    out.untruncated_length = static_cast<int64_t>(out.ids.size());
  }
  out.attention_mask.assign(out.ids.size(), 1);
  if (options.pad_to_max_length && static_cast<int64_t>(out.ids.size()) < max_length) {
    out.ids.resize(static_cast<std::size_t>(max_length), pad_token_id);
    out.attention_mask.resize(static_cast<std::size_t>(max_length), 0);
  }
  return out;
}

}  // namespace internal

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFromFolder(const std::string& dir) {
  namespace fs = std::filesystem;
  ASSIGN_OR_RETURN(internal::TokenizerFiles files, internal::ReadTokenizerFiles(dir));
  std::string kind;
  auto cls = files.config.find("tokenizer_class");
  if (cls != files.config.end() && !cls->is_null()) {
    if (!cls->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(files.config_path, ": tokenizer_class must be a string"));
    }
    const std::string name = cls->get<std::string>();
    if (name == "CLIPTokenizer" || name == "CLIPTokenizerFast") {
      kind = "clip";
    } else if (name == "T5Tokenizer" || name == "T5TokenizerFast") {
      kind = "t5";
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          files.config_path, ": tokenizer_class \"", name,
          "\" is not supported (CLIPTokenizer, CLIPTokenizerFast, T5Tokenizer, T5TokenizerFast)"));
    }
  } else {
    std::error_code ec;
    if (fs::exists(fs::path(dir) / "spiece.model", ec)) {
      kind = "t5";
    } else if (fs::exists(fs::path(dir) / "vocab.json", ec) &&
               fs::exists(fs::path(dir) / "merges.txt", ec)) {
      kind = "clip";
    } else {
      return absl::NotFoundError(absl::StrCat(
          dir,
          ": no tokenizer_config.json with a tokenizer_class, and neither spiece.model (T5) "
          "nor vocab.json + merges.txt (CLIP)"));
    }
  }
  if (kind == "clip") {
    ASSIGN_OR_RETURN(auto clip, ClipTokenizer::Load(files));
    return std::unique_ptr<Tokenizer>(std::move(clip));
  }
  ASSIGN_OR_RETURN(auto t5, T5Tokenizer::Load(files));
  return std::unique_ptr<Tokenizer>(std::move(t5));
}

}  // namespace ds::tokenizers
