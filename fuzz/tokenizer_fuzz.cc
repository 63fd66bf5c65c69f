// libFuzzer target: the text tokenizers (handlers/tokenizers/): CLIP BPE and T5 SentencePiece on
// arbitrary bytes, and the tokenizer-folder parsers on arbitrary file contents.
//
// Tokenizers: flux-tiny's generated ones (models/flux/demo/flux-tiny/tokenizer{,_2}, checked in)
// and, when $DS_GOLDEN_DIR/conditioning/tokenizers exists, the reference CLIP and T5 tokenizers.
//
// Input: byte 0 selects the mode, the rest is the payload.
//   byte 0 < 0xF0: text mode. The payload is the text (any bytes); byte 0 gives the options:
//     bits 0-5 max_length (0 = -1, the tokenizer's model_max_length), bit 6 pad_to_max_length,
//     bit 7 truncate. Every tokenizer runs Tokenize, Encode with those options and Encode unpadded.
//   byte 0 >= 0xF0: file mode. The payload replaces one file of a copy of flux-tiny's tokenizer
//     folders (low nibble: 0 vocab.json, 1 merges.txt, 2 tokenizer_config.json,
//     3 special_tokens_map.json of the CLIP folder; 4 tokenizer_config.json,
//     5 special_tokens_map.json, 6 added_tokens.json, 7 spiece.model of the T5 folder; others
//     wrap around); the folder is loaded (LoadTokenizerFromFolder) and, if it loads, a caption with
//     special tokens is tokenized. The file is restored afterwards.
// Findings: crashes, sanitizer reports, uncaught exceptions and broken invariants (Require):
// Tokenize/Encode must succeed exactly on valid UTF-8 (else INVALID_ARGUMENT); ids and mask have
// the same length, ids lie in [0, vocab_size()), padding reaches max_length, truncation keeps to
// it and is reported; loader errors are NOT_FOUND / INVALID_ARGUMENT.
//
// Seeds: DS_FUZZ_WRITE_SEEDS=<dir> tokenizer_fuzz_replay writes fuzz/corpus/tokenizer/.
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "fuzz/fuzz_util.h"
#include "handlers/tokenizers/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using ds::fuzz::Require;
using ds::tokenizers::LoadTokenizerFromFolder;
using ds::tokenizers::Tokenizer;
using ds::tokenizers::TokenizerOptions;

std::vector<std::unique_ptr<Tokenizer>>* g_tokenizers = nullptr;
std::string g_clip_dir, g_t5_dir;  // writable copies for file mode

const char* const kFiles[] = {"vocab.json",
                              "merges.txt",
                              "tokenizer_config.json",
                              "special_tokens_map.json",
                              "tokenizer_config.json",
                              "special_tokens_map.json",
                              "added_tokens.json",
                              "spiece.model"};

std::string FluxTinyDir(const std::string& name) {
  return std::string(DS_SOURCE_DIR) + "/models/flux/demo/flux-tiny/" + name;
}

// Strict UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool ValidUtf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      n = 1, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (std::size_t k = 1; k <= n; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    const uint32_t min[] = {0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

void CheckEncoding(const Tokenizer& t, const TokenizerOptions& o,
                   const ds::tokenizers::TokenizedText& e) {
  Require(e.ids.size() == e.attention_mask.size(), "ids and mask have the same length");
  for (int64_t id : e.ids) Require(id >= 0 && id < t.vocab_size(), "ids lie in the vocabulary");
  const int64_t max_length = o.max_length == -1 ? t.model_max_length() : o.max_length;
  const int64_t n = static_cast<int64_t>(e.ids.size());
  if (o.pad_to_max_length) {
    // Without truncation a longer text keeps its length; padding never shortens.
    Require(n == (o.truncate ? max_length : std::max(max_length, e.untruncated_length)),
            "padding reaches max_length");
  }
  if (o.truncate) {
    Require(n <= max_length, "truncation keeps to max_length");
    Require(e.truncated == (e.untruncated_length > max_length), "truncation is reported");
  } else {
    Require(!e.truncated, "no truncation without truncate");
  }
  int64_t real = 0;
  for (int64_t m : e.attention_mask) {
    Require(m == 0 || m == 1, "mask is 0/1");
    real += m;
  }
  Require(real <= e.untruncated_length, "the mask counts the kept tokens");
}

void RunText(uint8_t flags, std::string_view text) {
  TokenizerOptions options;
  options.max_length = (flags & 0x3F) == 0 ? -1 : (flags & 0x3F);
  options.pad_to_max_length = (flags & 0x40) != 0;
  options.truncate = (flags & 0x80) != 0;
  const bool valid = ValidUtf8(text);
  for (const auto& t : *g_tokenizers) {
    auto tokens = t->Tokenize(text);
    Require(tokens.ok() == valid, "Tokenize succeeds exactly on valid UTF-8");
    if (!tokens.ok()) {
      Require(tokens.status().code() == absl::StatusCode::kInvalidArgument,
              "invalid UTF-8 is INVALID_ARGUMENT");
    }
    TokenizerOptions plain;
    plain.pad_to_max_length = false;
    plain.truncate = false;
    auto unpadded = t->Encode(text, plain);
    Require(unpadded.ok() == valid, "unpadded Encode succeeds exactly on valid UTF-8");
    if (unpadded.ok()) {
      CheckEncoding(*t, plain, *unpadded);
      Require(static_cast<int64_t>(unpadded->ids.size()) == unpadded->untruncated_length,
              "unpadded length is the untruncated length");
    }
    auto encoded = t->Encode(text, options);
    if (encoded.ok()) {
      Require(valid, "Encode refuses invalid UTF-8");
      CheckEncoding(*t, options, *encoded);
      if (unpadded.ok()) {
        Require(encoded->untruncated_length == unpadded->untruncated_length,
                "untruncated length does not depend on the options");
      }
    } else {
      Require(encoded.status().code() == absl::StatusCode::kInvalidArgument,
              "Encode errors are INVALID_ARGUMENT");
    }
  }
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteAll(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  Require(static_cast<bool>(out), "writing a tokenizer file");
}

void RunFile(uint8_t selector, std::string_view content) {
  const int which = (selector & 0x0F) % 8;
  const std::string& dir = which < 4 ? g_clip_dir : g_t5_dir;
  const std::string path = dir + "/" + kFiles[which];
  const std::string original = ReadAll(path);
  WriteAll(path, content);
  auto tokenizer = LoadTokenizerFromFolder(dir);
  if (tokenizer.ok()) {
    const std::string caption = "a red circle on a yellow background <|endoftext|></s><extra_id_0>";
    auto tokens = (*tokenizer)->Tokenize(caption);
    Require(tokens.ok(), "a loaded tokenizer tokenizes valid UTF-8");
    TokenizerOptions o;
    o.max_length = 16;
    auto encoded = (*tokenizer)->Encode(caption, o);
    if (encoded.ok()) CheckEncoding(**tokenizer, o, *encoded);
  } else {
    Require(tokenizer.status().code() == absl::StatusCode::kInvalidArgument ||
                tokenizer.status().code() == absl::StatusCode::kNotFound,
            "loader errors are INVALID_ARGUMENT / NOT_FOUND");
  }
  WriteAll(path, original);
}

void WriteSeeds(ds::fuzz::SeedWriter& w) {
  auto text = [](uint8_t flags, const std::string& s) {
    return std::string(1, static_cast<char>(flags)) + s;
  };
  w.Write("caption_padded.bin", text(0xC0 | 16, "a red circle on a yellow background"));
  w.Write("caption_default.bin", text(0xC0, "a white star on a black background"));
  w.Write("caption_unpadded.bin", text(0x00, "A Green CROSS,   on a blue background!!"));
  w.Write("long_truncated.bin",
          text(0x80 | 8, "a red circle on a yellow background and a blue square on a green one"));
  w.Write("special_tokens.bin",
          text(0xC0 | 20, "<|startoftext|>a cat<|endoftext|> </s> <pad> <extra_id_0> <unk>"));
  w.Write("unicode.bin", text(0xC0 | 32,
                              "caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 na\xC3\xAF"
                              "ve \xF0\x9F\x98\x80 \xE2\x80\x8B\xC2\xA0tab\tend"));
  w.Write("control_chars.bin", text(0x40 | 4, std::string("a\x00"
                                                          "b\x01\x7f\r\n",
                                                          8)));
  w.Write("invalid_utf8.bin", text(0xC0, "ok \xC3\x28 \xED\xA0\x80 \xF4\x90\x80\x80 \xC0\xAF"));
  w.Write("too_short_max_length.bin", text(0xC0 | 1, "a red circle"));
  w.Write("empty_text.bin", text(0xC0 | 5, ""));
  w.Write("numbers_punct.bin", text(0x80, "1234567890 3.14 ... --- ''' \"quoted\" it's"));
  for (int i = 0; i < 8; ++i) {
    const std::string dir = FluxTinyDir(i < 4 ? "tokenizer" : "tokenizer_2");
    const std::string original = ReadAll(dir + "/" + kFiles[i]);
    // spiece.model (238 KB) is left out: it would raise libFuzzer's -max_len for every input, and
    // its parser is libsentencepiece's; a small corrupt one is below.
    if (i == 7 || (original.empty() && i != 6)) continue;
    w.Write(std::string("file_") + std::to_string(i) + "_" + kFiles[i],
            std::string(1, static_cast<char>(0xF0 | i)) + original);
  }
  w.Write("file_1_bad_merges",
          std::string(1, static_cast<char>(0xF1)) + "#version: 0.2\na\nb c d\n");
  w.Write("file_0_bad_vocab", std::string(1, static_cast<char>(0xF0)) + "{\"a\": -1, \"b\": 1.5}");
  w.Write("file_7_bad_spiece", std::string(1, static_cast<char>(0xF7)) + "\x0a\x05\x0a\x01a\x15");
  w.Write("file_2_bad_config",
          std::string(1, static_cast<char>(0xF2)) +
              "{\"tokenizer_class\": \"CLIPTokenizer\", \"model_max_length\": -3, "
              "\"added_tokens_decoder\": {\"x\": {\"content\": 5}}}");
  w.Finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (auto seeds = ds::fuzz::SeedWriter::FromEnv()) WriteSeeds(*seeds);
  g_tokenizers = new std::vector<std::unique_ptr<Tokenizer>>;
  std::vector<std::string> dirs = {FluxTinyDir("tokenizer"), FluxTinyDir("tokenizer_2")};
  const char* golden_env = std::getenv("DS_GOLDEN_DIR");
  const std::string golden =
      std::string(golden_env != nullptr ? golden_env : DS_GOLDEN_DIR) + "/conditioning/tokenizers";
  if (fs::is_directory(golden + "/clip_tokenizer")) dirs.push_back(golden + "/clip_tokenizer");
  if (fs::is_directory(golden + "/t5_tokenizer")) dirs.push_back(golden + "/t5_tokenizer");
  for (const std::string& dir : dirs) {
    auto t = LoadTokenizerFromFolder(dir);
    if (!t.ok()) {
      std::fprintf(stderr, "tokenizer_fuzz: %s: %s\n", dir.c_str(), t.status().ToString().c_str());
      std::abort();
    }
    g_tokenizers->push_back(*std::move(t));
  }
  // Writable copies of flux-tiny's folders for file mode (removed at exit).
  char tmpl[] = "/tmp/ds-tokenizer-fuzz-XXXXXX";
  Require(mkdtemp(tmpl) != nullptr, "mkdtemp");
  static const std::string root = tmpl;
  g_clip_dir = root + "/clip";
  g_t5_dir = root + "/t5";
  fs::copy(FluxTinyDir("tokenizer"), g_clip_dir, fs::copy_options::recursive);
  fs::copy(FluxTinyDir("tokenizer_2"), g_t5_dir, fs::copy_options::recursive);
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(root, ec);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] >= 0xF0) {
    RunFile(data[0], payload);
  } else {
    RunText(data[0], payload);
  }
  return 0;
}
