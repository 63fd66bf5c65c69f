#include "handlers/tokenizers/clip_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <queue>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/status.h"
#include "handlers/tokenizers/unicode_text.h"

namespace ds::tokenizers {
namespace {

constexpr char kEndOfWord[] = "</w>";
constexpr char32_t kStartOfText[] = U"<|startoftext|>";
constexpr char32_t kEndOfText[] = U"<|endoftext|>";
// transformers reads merges.txt lines [1, 49152 - 256 - 2 + 1): CLIP's merge count.
constexpr std::size_t kMaxMerges = 49152 - 256 - 2;

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the others to U+0100...
std::vector<char32_t> BytesToUnicode() {
  std::vector<char32_t> table(256, 0);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = direct[b] ? static_cast<char32_t>(b) : next++;
  return table;
}

// transformers' BERT-style _is_chinese_char: the CJK Unified Ideographs blocks.
bool IsCjkIdeograph(char32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
         (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
         (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

bool IsAsciiSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

std::vector<std::string_view> SplitAsciiWhitespace(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsAsciiSpace(line[i])) ++i;
    std::size_t j = i;
    while (j < line.size() && !IsAsciiSpace(line[j])) ++j;
    if (j > i) out.push_back(line.substr(i, j - i));
    i = j;
  }
  return out;
}

bool StartsWithAt(std::u32string_view s, std::size_t i, std::u32string_view prefix) {
  return s.size() - i >= prefix.size() && s.compare(i, prefix.size(), prefix) == 0;
}

// Case-insensitive (simple case folding) match of the contraction letters; the text is already
// lower-cased, which leaves only U+017F LATIN SMALL LETTER LONG S folding to 's'.
bool FoldEquals(char32_t cp, char32_t ascii_lower) {
  return cp == ascii_lower || (ascii_lower == U's' && cp == 0x17F);
}

// Length of the contraction ('s 't 're 've 'm 'll 'd, in the pattern's order) at s[i] == '\'',
// or 0.
std::size_t ContractionAt(std::u32string_view s, std::size_t i) {
  static constexpr std::u32string_view kContractions[] = {U"s", U"t",  U"re", U"ve",
                                                          U"m", U"ll", U"d"};
  for (std::u32string_view c : kContractions) {
    if (s.size() - i - 1 < c.size()) continue;
    bool match = true;
    for (std::size_t k = 0; k < c.size() && match; ++k) match = FoldEquals(s[i + 1 + k], c[k]);
    if (match) return 1 + c.size();
  }
  return 0;
}

// re.findall of CLIP's pattern over one lower-cased word (no whitespace inside).
std::vector<std::u32string_view> ClipPatternMatches(std::u32string_view w) {
  std::vector<std::u32string_view> out;
  std::size_t i = 0;
  while (i < w.size()) {
    std::size_t len = 0;
    if (StartsWithAt(w, i, kStartOfText)) {
      len = std::char_traits<char32_t>::length(kStartOfText);
    } else if (StartsWithAt(w, i, kEndOfText)) {
      len = std::char_traits<char32_t>::length(kEndOfText);
    } else if (w[i] == U'\'' && ContractionAt(w, i) > 0) {
      len = ContractionAt(w, i);
    } else if (IsLetter(w[i])) {
      len = 1;
      while (i + len < w.size() && IsLetter(w[i + len])) ++len;
    } else if (IsNumber(w[i])) {
      len = 1;
    } else {
      len = 1;
      while (i + len < w.size() && !IsLetter(w[i + len]) && !IsNumber(w[i + len]) &&
             !IsPythonSpace(w[i + len])) {
        ++len;
      }
    }
    out.push_back(w.substr(i, len));
    i += len;
  }
  return out;
}

}  // namespace

int32_t ClipTokenizer::InternSymbol(const std::string& s) {
  auto [it, inserted] = symbol_ids_.try_emplace(s, static_cast<int32_t>(symbols_.size()));
  if (inserted) symbols_.push_back(s);
  return it->second;
}

int64_t ClipTokenizer::TokenToId(const std::string& token) const {
  if (const internal::AddedToken* t = added_.Find(token)) return t->id;
  auto it = encoder_.find(token);
  return it == encoder_.end() ? unk_id_ : it->second;
}

absl::StatusOr<std::unique_ptr<ClipTokenizer>> ClipTokenizer::Load(
    const internal::TokenizerFiles& files) {
  namespace fs = std::filesystem;
  auto tok = std::unique_ptr<ClipTokenizer>(new ClipTokenizer());
  const std::string vocab_path = (fs::path(files.dir) / "vocab.json").string();
  const std::string merges_path = (fs::path(files.dir) / "merges.txt").string();

  ASSIGN_OR_RETURN(nlohmann::json vocab, internal::ReadJsonFile(vocab_path));
  if (!vocab.is_object() || vocab.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(vocab_path, ": must be a non-empty JSON object of token -> id"));
  }
  int64_t max_id = -1;
  tok->encoder_.reserve(vocab.size());
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0) {
      return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": entry \"", token,
                                                     "\" must be a non-negative integer id, got ",
                                                     id.dump()));
    }
    tok->encoder_[token] = id.get<int64_t>();
    max_id = std::max(max_id, id.get<int64_t>());
  }

  // Symbols: every byte's unicode character, alone and with "</w>", then each merge's parts and
  // result (BPE compares symbols as strings, so equal strings are one symbol).
  const std::vector<char32_t> byte_chars = BytesToUnicode();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(byte_chars[b], &s);
    tok->byte_symbol_[b] = tok->InternSymbol(s);
    tok->byte_end_symbol_[b] = tok->InternSymbol(s + kEndOfWord);
  }
  ASSIGN_OR_RETURN(std::string merges_text, internal::ReadFileBytes(merges_path));
  {
    std::string_view text = merges_text;
    while (!text.empty() && IsAsciiSpace(text.front())) text.remove_prefix(1);
    while (!text.empty() && IsAsciiSpace(text.back())) text.remove_suffix(1);
    std::size_t line_no = 0;
    std::size_t pos = 0;
    int32_t rank = 0;
    while (pos <= text.size() && static_cast<std::size_t>(rank) < kMaxMerges) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string_view::npos) end = text.size();
      const std::string_view line = text.substr(pos, end - pos);
      pos = end + 1;
      if (line_no++ == 0) continue;  // the "#version: ..." header
      const std::vector<std::string_view> parts = SplitAsciiWhitespace(line);
      if (parts.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(merges_path, ": line ", line_no,
                                                       ": expected two symbols, got \"",
                                                       std::string(line), "\""));
      }
      const int32_t a = tok->InternSymbol(std::string(parts[0]));
      const int32_t b = tok->InternSymbol(std::string(parts[1]));
      const int32_t merged = tok->InternSymbol(std::string(parts[0]) + std::string(parts[1]));
      // dict(zip(merges, range(...))): a repeated pair keeps its last rank.
      tok->merges_[(static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b)] =
          Merge{rank++, merged};
    }
    if (text.empty()) return absl::InvalidArgumentError(absl::StrCat(merges_path, ": empty"));
  }

  // Special tokens (CLIPTokenizer's defaults) and added tokens.
  auto special = [&](const char* key, const char* fallback) -> absl::StatusOr<std::string> {
    ASSIGN_OR_RETURN(std::optional<std::string> v, internal::SpecialToken(files, key));
    return v.value_or(fallback);
  };
  ASSIGN_OR_RETURN(const std::string bos, special("bos_token", "<|startoftext|>"));
  ASSIGN_OR_RETURN(const std::string eos, special("eos_token", "<|endoftext|>"));
  ASSIGN_OR_RETURN(const std::string unk, special("unk_token", "<|endoftext|>"));
  ASSIGN_OR_RETURN(const std::string pad, special("pad_token", "<|endoftext|>"));
  ASSIGN_OR_RETURN(std::vector<internal::AddedToken> decoder, internal::AddedTokensDecoder(files));
  for (const auto& t : decoder) tok->added_.Add(t);
  std::vector<std::string> specials = {bos, eos, unk, pad};
  ASSIGN_OR_RETURN(auto additional, internal::AdditionalSpecialTokens(files));
  if (additional) specials.insert(specials.end(), additional->begin(), additional->end());
  for (const std::string& s : specials) {
    if (tok->added_.Find(s) != nullptr) continue;
    // PreTrainedTokenizer adds special tokens missing from added_tokens_decoder: with their
    // vocabulary id, or a new id after the vocabulary.
    auto it = tok->encoder_.find(s);
    const int64_t id =
        it != tok->encoder_.end() ? it->second : std::max(max_id, tok->added_.max_id()) + 1;
    tok->added_.Add(internal::AddedToken{s, id, false, false, false, true});
  }
  tok->unk_id_ = tok->added_.Find(unk)->id;
  tok->bos_id_ = tok->added_.Find(bos)->id;
  tok->eos_id_ = tok->added_.Find(eos)->id;
  tok->pad_id_ = tok->added_.Find(pad)->id;
  tok->vocab_size_ = std::max(max_id, tok->added_.max_id()) + 1;
  ASSIGN_OR_RETURN(tok->model_max_length_, internal::ModelMaxLength(files));

  tok->symbol_token_id_.resize(tok->symbols_.size());
  for (std::size_t s = 0; s < tok->symbols_.size(); ++s) {
    auto it = tok->encoder_.find(tok->symbols_[s]);
    tok->symbol_token_id_[s] = it == tok->encoder_.end() ? tok->unk_id_ : it->second;
  }
  return tok;
}

std::vector<int32_t> ClipTokenizer::Bpe(const std::string& word) const {
  const std::size_t n = word.size();
  std::vector<int32_t> sym(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = static_cast<unsigned char>(word[i]);
    sym[i] = i + 1 == n ? byte_end_symbol_[b] : byte_symbol_[b];
  }
  if (n < 2) return sym;
  // Doubly linked list over positions; a merge keeps the left position and drops the right one.
  std::vector<int32_t> prev(n), next(n);
  for (std::size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  std::vector<bool> alive(n, true);
  auto find_merge = [&](int32_t p) -> const Merge* {
    if (p < 0 || next[p] < 0) return nullptr;
    auto it =
        merges_.find((static_cast<uint64_t>(sym[p]) << 32) | static_cast<uint32_t>(sym[next[p]]));
    return it == merges_.end() ? nullptr : &it->second;
  };
  using Entry = std::pair<int32_t, int32_t>;  // (rank, position)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](int32_t p) {
    if (const Merge* m = find_merge(p)) heap.emplace(m->rank, p);
  };
  for (std::size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  std::vector<int32_t> round;
  while (!heap.empty()) {
    // One step of transformers' loop: the lowest-ranked pair present, merged at every
    // non-overlapping occurrence from left to right. Heap entries may be stale; they are
    // re-checked against the current symbols.
    const int32_t rank = heap.top().first;
    round.clear();
    while (!heap.empty() && heap.top().first == rank) {
      round.push_back(heap.top().second);
      heap.pop();
    }
    std::sort(round.begin(), round.end());
    round.erase(std::unique(round.begin(), round.end()), round.end());
    for (int32_t p : round) {
      if (!alive[p]) continue;
      const Merge* m = find_merge(p);
      if (m == nullptr || m->rank != rank) continue;
      const int32_t q = next[p];
      sym[p] = m->merged;
      alive[q] = false;
      next[p] = next[q];
      if (next[q] >= 0) prev[next[q]] = p;
      push(prev[p]);
      push(p);
    }
  }
  std::vector<int32_t> out;
  for (int32_t p = 0; p >= 0; p = next[p]) out.push_back(sym[p]);
  return out;
}

void ClipTokenizer::AppendWord(const std::string& word, std::vector<int64_t>* ids,
                               std::vector<std::string>* tokens) const {
  // transformers seeds its BPE cache with the two markers: they stay whole, without "</w>".
  if (word == "<|startoftext|>" || word == "<|endoftext|>") {
    ids->push_back(TokenToId(word));
    if (tokens != nullptr) tokens->push_back(word);
    return;
  }
  std::vector<int32_t> symbols;
  bool cached = false;
  {
    absl::ReaderMutexLock lock(&cache_mu_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      symbols = it->second;
      cached = true;
    }
  }
  if (!cached) {
    symbols = Bpe(word);
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() < kMaxCachedWords) cache_.emplace(word, symbols);
  }
  for (int32_t s : symbols) {
    ids->push_back(symbol_token_id_[s]);
    if (tokens != nullptr) tokens->push_back(symbols_[s]);
  }
}

void ClipTokenizer::TokenizeChunk(std::string_view chunk, std::vector<int64_t>* ids,
                                  std::vector<std::string>* tokens) const {
  std::u32string text;
  std::size_t bad = 0;
  DecodeUtf8(chunk, &text, &bad);  // validated by the caller
  // BasicTokenizer._clean_text and _tokenize_chinese_chars.
  std::u32string cleaned;
  cleaned.reserve(text.size());
  for (char32_t cp : text) {
    const bool tab_or_newline = cp == U'\t' || cp == U'\n' || cp == U'\r';
    if (cp == 0 || cp == 0xFFFD || (!tab_or_newline && IsOtherCategory(cp))) continue;
    if (cp == U' ' || tab_or_newline || IsSpaceSeparator(cp)) {
      cleaned.push_back(U' ');
    } else if (IsCjkIdeograph(cp)) {
      cleaned.push_back(U' ');
      cleaned.push_back(cp);
      cleaned.push_back(U' ');
    } else {
      cleaned.push_back(cp);
    }
  }
  const std::u32string normalized = NormalizeNfc(cleaned);
  // whitespace_tokenize (str.split()), then str.lower() per word.
  std::size_t i = 0;
  while (i < normalized.size()) {
    while (i < normalized.size() && IsPythonSpace(normalized[i])) ++i;
    std::size_t j = i;
    while (j < normalized.size() && !IsPythonSpace(normalized[j])) ++j;
    if (j > i) {
      const std::u32string lower = PythonLower(std::u32string_view(normalized).substr(i, j - i));
      for (std::u32string_view match : ClipPatternMatches(lower)) {
        AppendWord(EncodeUtf8(match), ids, tokens);
      }
    }
    i = j;
  }
}

absl::Status ClipTokenizer::TokenizeToIds(std::string_view text, std::vector<int64_t>* ids,
                                          std::vector<std::string>* tokens) const {
  RETURN_IF_ERROR(internal::CheckUtf8(text));
  for (const std::string& chunk : added_.Split(text)) {
    if (const internal::AddedToken* t = added_.Find(chunk)) {
      ids->push_back(t->id);
      if (tokens != nullptr) tokens->push_back(chunk);
    } else {
      TokenizeChunk(chunk, ids, tokens);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ClipTokenizer::Tokenize(std::string_view text) const {
  std::vector<int64_t> ids;
  std::vector<std::string> tokens;
  RETURN_IF_ERROR(TokenizeToIds(text, &ids, &tokens));
  return tokens;
}

absl::StatusOr<TokenizedText> ClipTokenizer::Encode(std::string_view text,
                                                    const TokenizerOptions& options) const {
  std::vector<int64_t> ids;
  RETURN_IF_ERROR(TokenizeToIds(text, &ids, nullptr));
  return internal::FinishEncoding(
      std::move(ids), 2,
      [this](std::vector<int64_t> body) {
        std::vector<int64_t> out;
        out.reserve(body.size() + 2);
        out.push_back(bos_id_);
        out.insert(out.end(), body.begin(), body.end());
        out.push_back(eos_id_);
        return out;
      },
      options, model_max_length_, pad_id_);
}

std::size_t ClipTokenizer::cached_words() const {
  absl::ReaderMutexLock lock(&cache_mu_);
  return cache_.size();
}

}  // namespace ds::tokenizers
