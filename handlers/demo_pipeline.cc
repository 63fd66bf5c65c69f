#include "handlers/demo_pipeline.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "handlers/digest.h"
#include "handlers/model.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/tokenizers/sentencepiece_model.h"
#include "handlers/tokenizers/tokenizer.h"
#include "handlers/tokenizers/unicode_text.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

bool SafeName(const std::string& name) {
  if (name.empty() || name.size() > 128 || name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::Status ErrnoStatus(const std::string& what, int err) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EACCES || err == EPERM || err == EROFS) return absl::PermissionDeniedError(message);
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc | std::ios::binary);
  out << text;
  out.flush();
  if (!out) return ErrnoStatus(absl::StrCat("writing ", path), errno);
  return absl::OkStatus();
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return ErrnoStatus(absl::StrCat("creating ", dir), ec.value());
  return absl::OkStatus();
}

// An exclusive flock held for the object's lifetime.
class FileLock {
 public:
  static absl::StatusOr<FileLock> Acquire(const std::string& path) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoStatus(absl::StrCat("opening lock ", path), errno);
    while (flock(fd, LOCK_EX) != 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      return ErrnoStatus(absl::StrCat("locking ", path), err);
    }
    return FileLock(fd);
  }
  FileLock(FileLock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  FileLock& operator=(FileLock&&) = delete;
  ~FileLock() {
    if (fd_ >= 0) close(fd_);  // releases the lock
  }

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

constexpr char kDiffusers[] = "diffusers";
constexpr char kTransformers[] = "transformers";

// CLIP's vocabulary before the merges: 256 byte symbols, their "</w>" forms; after them the two
// special tokens.
constexpr int64_t kClipBaseSymbols = 512;
constexpr int64_t kClipSpecialTokens = 2;
constexpr char kClipBos[] = "<|startoftext|>";
constexpr char kClipEos[] = "<|endoftext|>";
// SentencePiece's reserved pieces in a T5 model: <pad>, </s>, <unk>; the trainer needs at least
// one learned piece besides them.
constexpr int64_t kT5ReservedPieces = 3;

const char* TokenizerClass(DemoTokenizerKind kind) {
  return kind == DemoTokenizerKind::kClipBpe ? "CLIPTokenizer" : "T5Tokenizer";
}

const char* TokenizerKindName(DemoTokenizerKind kind) {
  return kind == DemoTokenizerKind::kClipBpe ? "clip_bpe" : "t5_sentencepiece";
}

absl::Status ValidateTokenizer(const DemoPipelineRecipe& recipe, const DemoTokenizer& t,
                               const std::set<std::string>& taken) {
  const std::string where =
      absl::StrCat("demo pipeline '", recipe.name, "' tokenizer '", t.name, "'");
  if (!SafeName(t.name) || t.name == "scheduler" || t.name == "single_file" ||
      taken.count(t.name) > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo pipeline '", recipe.name, "': bad or duplicate tokenizer name '",
                     t.name, "'"));
  }
  int64_t minimum = 0;
  if (t.kind == DemoTokenizerKind::kClipBpe) {
    minimum = kClipBaseSymbols + kClipSpecialTokens;
  } else {
    if (t.extra_ids < 0 || t.extra_ids > 100000) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": extra_ids must be in [0, 100000], got ", t.extra_ids));
    }
    minimum = t.extra_ids + kT5ReservedPieces + 1;
  }
  if (t.vocab_size < minimum || t.vocab_size > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": vocab_size must be in [", minimum,
                                                   ", 16777216] for a ", TokenizerClass(t.kind),
                                                   ", got ", t.vocab_size));
  }
  if (t.model_max_length < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": model_max_length must be >= 2, got ", t.model_max_length));
  }
  if (t.corpus.find_first_not_of(" \t\r\n") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": the corpus is empty"));
  }
  if (!t.encoder.empty()) {
    const DemoComponent* encoder = nullptr;
    for (const DemoComponent& c : recipe.components) {
      if (c.name == t.encoder) encoder = &c;
    }
    if (encoder == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": its encoder '", t.encoder, "' is not a component"));
    }
    const auto it = encoder->config.find("vocab_size");
    if (it == encoder->config.end() || !it->is_number_integer() ||
        it->get<int64_t>() != t.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, " has vocab_size ", t.vocab_size, " but its encoder '", t.encoder,
          "' config has \"vocab_size\": ",
          it == encoder->config.end() ? std::string("(none)") : it->dump(),
          " (the token-embedding rows must match the vocabulary)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateRecipe(const DemoPipelineRecipe& recipe) {
  if (!SafeName(recipe.name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "demo pipeline name '", recipe.name, "' must be 1..128 characters of [A-Za-z0-9._-]"));
  }
  if (recipe.pipeline_class.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo pipeline '", recipe.name, "': pipeline_class is empty"));
  }
  if (recipe.components.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo pipeline '", recipe.name, "' has no components"));
  }
  std::set<std::string> names, files;
  for (const DemoComponent& c : recipe.components) {
    if (!SafeName(c.name) || c.name == "scheduler" || c.name == "single_file") {
      return absl::InvalidArgumentError(
          absl::StrCat("demo pipeline '", recipe.name, "': bad component name '", c.name, "'"));
    }
    if (!names.insert(c.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("demo pipeline '", recipe.name, "': duplicate component '", c.name, "'"));
    }
    if (!c.single_file.empty() && (!SafeName(c.single_file) || !files.insert(c.single_file).second)) {
      return absl::InvalidArgumentError(absl::StrCat("demo pipeline '", recipe.name,
                                                     "': bad or duplicate single file name '",
                                                     c.single_file, "' of '", c.name, "'"));
    }
    if (!c.config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "demo pipeline '", recipe.name, "': component '", c.name, "' config is not an object"));
    }
    if (c.library != kDiffusers && c.library != kTransformers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "demo pipeline '", recipe.name, "': component '", c.name, "' has library '", c.library,
          "'; expected \"", kDiffusers, "\" or \"", kTransformers, "\""));
    }
  }
  for (const DemoTokenizer& t : recipe.tokenizers) {
    RETURN_IF_ERROR(ValidateTokenizer(recipe, t, names));
  }
  for (const DemoTokenizer& t : recipe.tokenizers) names.insert(t.name);
  for (const std::string& absent : recipe.absent_components) {
    if (!SafeName(absent) || names.count(absent) > 0 || absent == "scheduler") {
      return absl::InvalidArgumentError(absl::StrCat(
          "demo pipeline '", recipe.name, "': bad absent component '", absent, "'"));
    }
  }
  if (!recipe.scheduler_config.is_null() &&
      (!recipe.scheduler_config.is_object() || !recipe.scheduler_config.contains("_class_name") ||
       !recipe.scheduler_config["_class_name"].is_string())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "demo pipeline '", recipe.name, "': scheduler_config needs a string \"_class_name\""));
  }
  return absl::OkStatus();
}

// Relative path -> SHA-256 of every regular file under `dir` except the manifest.
absl::StatusOr<std::map<std::string, std::string>> HashTree(const std::string& dir) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file()) continue;
    const std::string rel = fs::relative(it->path(), dir).string();
    if (rel == "manifest.json") continue;
    ASSIGN_OR_RETURN(out[rel], Sha256File(it->path().string()));
  }
  if (ec) return ErrnoStatus(absl::StrCat("listing ", dir), ec.value());
  return out;
}

// Whether `dir` holds a complete copy of the recipe (manifest digest and every file's hash).
bool VerifiedCopy(const std::string& dir, const std::string& recipe_digest) {
  auto manifest = ReadJsonFile(dir + "/manifest.json");
  if (!manifest.ok() || !manifest->is_object()) return false;
  if (manifest->value("recipe_sha256", "") != recipe_digest) return false;
  if (!manifest->contains("files") || !(*manifest)["files"].is_object()) return false;
  auto files = HashTree(dir);
  if (!files.ok()) return false;
  std::map<std::string, std::string> recorded;
  for (const auto& [k, v] : (*manifest)["files"].items()) {
    if (!v.is_string()) return false;
    recorded[k] = v.get<std::string>();
  }
  return recorded == *files;
}

// Builds, initializes and writes one component into `<pipeline_dir>/<name>/` and its single file.
absl::Status WriteComponent(const DemoPipelineRecipe& recipe, size_t index,
                            const std::string& pipeline_dir, const std::string& single_dir) {
  const DemoComponent& c = recipe.components[index];
  const std::string where = absl::StrCat("demo pipeline '", recipe.name, "' component '", c.name,
                                         "' (", c.class_name, ")");
  auto spec_or = ModelRegistry::Global().Find(c.class_name);
  if (!spec_or.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", spec_or.status().message()));
  }
  const ModelSpec* spec = *spec_or;
  nlohmann::json config = c.config;
  if (c.library == kTransformers) {
    config["architectures"] = {spec->class_name};
  } else {
    config["_class_name"] = spec->class_name;
  }
  auto model_or = spec->factory(config, ModelOptions{});
  if (!model_or.ok()) return Annotate(model_or.status(), where);
  std::unique_ptr<DiffusionModel> model = *std::move(model_or);
  const std::string dir = absl::StrCat(pipeline_dir, "/", c.name);
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(WriteText(dir + "/config.json", config.dump(2) + "\n"));
  const char* weights_name =
      c.library == kTransformers ? "model.safetensors" : "diffusion_pytorch_model.safetensors";
  const std::string weights_path = absl::StrCat(dir, "/", weights_name);
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  TensorMap weights;
  if (!c.weights.empty()) {
    // Trained weights: written as given, then read back and loaded (which checks them).
    RETURN_IF_ERROR(WriteText(weights_path, std::string(c.weights)));
    auto file = SafetensorsFile::Open(weights_path);
    if (!file.ok()) return Annotate(file.status(), absl::StrCat(where, ": trained weights"));
    auto all = (*file)->GetAll();
    if (!all.ok()) return Annotate(all.status(), absl::StrCat(where, ": trained weights"));
    metadata = (*file)->metadata();
    weights = *std::move(all);
    absl::Status loaded = LoadStateDict(model->module(), weights);
    if (!loaded.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": trained weights do not fit the config: ", loaded.message()));
    }
  } else {
    RETURN_IF_ERROR(TorchCallVoid(absl::StrCat(where, ": initializing weights"), [&] {
      InitRandomWeights(model->module(), recipe.seed + index);
    }));
    weights = NamedTensors(model->module());
    metadata["source"] = absl::StrCat("diffusion-server demo pipeline ", recipe.name,
                                      ", random weights (InitRandomWeights seed ",
                                      recipe.seed + index, ")");
    RETURN_IF_ERROR(WriteSafetensors(weights_path, weights, metadata));
  }
  if (c.single_file.empty()) return absl::OkStatus();
  if (spec->weight_mapping == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": single_file '", c.single_file, "' asked for, but ",
                     spec->class_name, " has no single-file (weight mapping) handler"));
  }
  KeyShapes shapes;
  for (const auto& [k, t] : weights) shapes[k] = t.sizes().vec();
  auto plan = spec->weight_mapping->PlanFromDiffusers(shapes);
  if (!plan.ok()) return Annotate(plan.status(), absl::StrCat(where, ": reverse mapping"));
  auto original = ExecuteMappingPlan(*plan, weights);
  if (!original.ok()) return Annotate(original.status(), absl::StrCat(where, ": reverse mapping"));
  return WriteSafetensors(absl::StrCat(single_dir, "/", c.single_file), *original, metadata);
}

// ---- Tokenizers -------------------------------------------------------------------------------

// The corpus as training sentences: its non-blank lines.
std::vector<std::string> CorpusLines(const std::string& corpus) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(corpus, '\n')) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find_first_not_of(" \t") == absl::string_view::npos) continue;
    lines.emplace_back(line);
  }
  return lines;
}

// GPT-2's bytes_to_unicode() as transformers' CLIPTokenizer builds it: the byte symbols in
// vocabulary order (the printable Latin-1 bytes '!'..'~', '¡'..'¬', '®'..'ÿ' as themselves, then
// the remaining bytes as U+0100, U+0101, ...), each as UTF-8.
std::vector<std::string> ClipByteSymbols() {
  std::vector<int> bytes;
  std::vector<char32_t> chars;
  for (int b = '!'; b <= '~'; ++b) bytes.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bytes.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bytes.push_back(b);
  chars.assign(bytes.begin(), bytes.end());
  std::vector<bool> seen(256, false);
  for (int b : bytes) seen[b] = true;
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    if (!seen[b]) chars.push_back(next++);
  }
  std::vector<std::string> out;
  for (char32_t c : chars) out.push_back(tokenizers::EncodeUtf8(std::u32string(1, c)));
  return out;
}

absl::Status WriteJson(const std::string& path, const nlohmann::json& json) {
  return WriteText(path, json.dump(2) + "\n");
}

// An added-token entry of tokenizer_config.json's added_tokens_decoder (as transformers writes it).
nlohmann::json AddedTokenJson(const std::string& content, bool strip, bool normalized) {
  return {{"content", content}, {"lstrip", strip},           {"normalized", normalized},
          {"rstrip", strip},    {"single_word", false},      {"special", true}};
}

// special_tokens_map.json's form of a token: AddedTokenJson without "special".
nlohmann::json SpecialTokenJson(const std::string& content, bool normalized) {
  nlohmann::json j = AddedTokenJson(content, false, normalized);
  j.erase("special");
  return j;
}

// CLIPTokenizer's vocab.json (symbols in id order) and merges.txt for `merges`.
absl::Status WriteClipVocabulary(const std::string& dir, const std::vector<std::string>& symbols,
                                 const std::vector<std::pair<std::string, std::string>>& merges) {
  nlohmann::json vocab = nlohmann::json::object();
  for (size_t i = 0; i < symbols.size(); ++i) vocab[symbols[i]] = i;
  std::string merges_text = "#version: 0.2\n";
  for (const auto& [a, b] : merges) absl::StrAppend(&merges_text, a, " ", b, "\n");
  RETURN_IF_ERROR(WriteText(dir + "/vocab.json", vocab.dump(2) + "\n"));
  return WriteText(dir + "/merges.txt", merges_text);
}

// The CLIP tokenizer files of `t` in `dir`. The corpus is split into words by the real
// CLIPTokenizer (loaded over the bare byte vocabulary, so every word comes back as its byte
// symbols with "</w>" on the last), then merges are learned by plain BPE: repeatedly merge the
// most frequent adjacent pair (ties: the smallest pair of strings), skipping pairs whose merged
// string is already in the vocabulary, until vocab_size is reached.
absl::Status WriteClipTokenizer(const DemoTokenizer& t, const std::string& where,
                                const std::string& dir) {
  const std::vector<std::string> bytes = ClipByteSymbols();
  std::vector<std::string> symbols = bytes;
  for (const std::string& b : bytes) symbols.push_back(b + "</w>");
  const nlohmann::json config = {
      {"added_tokens_decoder",
       {{std::to_string(t.vocab_size - 2), AddedTokenJson(kClipBos, false, true)},
        {std::to_string(t.vocab_size - 1), AddedTokenJson(kClipEos, false, true)}}},
      {"bos_token", kClipBos},
      {"clean_up_tokenization_spaces", true},
      {"eos_token", kClipEos},
      {"errors", "replace"},
      {"model_max_length", t.model_max_length},
      {"pad_token", kClipEos},
      {"tokenizer_class", "CLIPTokenizer"},
      {"unk_token", kClipEos}};
  const nlohmann::json special_map = {{"bos_token", SpecialTokenJson(kClipBos, true)},
                                      {"eos_token", SpecialTokenJson(kClipEos, true)},
                                      {"pad_token", SpecialTokenJson(kClipEos, true)},
                                      {"unk_token", SpecialTokenJson(kClipEos, true)}};
  RETURN_IF_ERROR(WriteJson(dir + "/special_tokens_map.json", special_map));

  // Words of the corpus as byte symbols, through the real tokenizer's text cleanup and pattern.
  std::map<std::vector<std::string>, int64_t> words;
  {
    std::vector<std::string> bare = symbols;
    bare.push_back(kClipBos);
    bare.push_back(kClipEos);
    nlohmann::json bare_config = config;
    bare_config["added_tokens_decoder"] = {
        {std::to_string(bare.size() - 2), AddedTokenJson(kClipBos, false, true)},
        {std::to_string(bare.size() - 1), AddedTokenJson(kClipEos, false, true)}};
    RETURN_IF_ERROR(WriteClipVocabulary(dir, bare, {}));
    RETURN_IF_ERROR(WriteJson(dir + "/tokenizer_config.json", bare_config));
    auto splitter = tokenizers::LoadTokenizerFromFolder(dir);
    if (!splitter.ok()) return Annotate(splitter.status(), where);
    for (const std::string& line : CorpusLines(t.corpus)) {
      auto tokens = (*splitter)->Tokenize(line);
      if (!tokens.ok()) return Annotate(tokens.status(), absl::StrCat(where, ": corpus"));
      std::vector<std::string> word;
      for (const std::string& token : *tokens) {
        if (token == kClipBos || token == kClipEos) continue;
        word.push_back(token);
        if (token.size() > 4 && token.compare(token.size() - 4, 4, "</w>") == 0) {
          ++words[word];
          word.clear();
        }
      }
    }
  }

  std::set<std::string> known(symbols.begin(), symbols.end());
  known.insert(kClipBos);
  known.insert(kClipEos);
  const int64_t wanted = t.vocab_size - kClipBaseSymbols - kClipSpecialTokens;
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<std::pair<std::vector<std::string>, int64_t>> corpus(words.begin(), words.end());
  while (static_cast<int64_t>(merges.size()) < wanted) {
    std::map<std::pair<std::string, std::string>, int64_t> counts;
    for (const auto& [word, n] : corpus) {
      for (size_t i = 0; i + 1 < word.size(); ++i) {
        if (known.count(word[i] + word[i + 1]) == 0) counts[{word[i], word[i + 1]}] += n;
      }
    }
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_count = 0;
    for (const auto& [pair, n] : counts) {  // ordered: the first of equal counts is the smallest
      if (n > best_count) {
        best = &pair;
        best_count = n;
      }
    }
    if (best == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": the corpus yields only ", merges.size(), " BPE merges; vocab_size ",
          t.vocab_size, " needs ", wanted, " (use a larger corpus or a smaller vocab_size)"));
    }
    const auto [first, second] = *best;
    const std::string merged = first + second;
    for (auto& [word, n] : corpus) {
      std::vector<std::string> out;
      for (size_t i = 0; i < word.size(); ++i) {
        if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
          out.push_back(merged);
          ++i;
        } else {
          out.push_back(word[i]);
        }
      }
      word = std::move(out);
    }
    known.insert(merged);
    symbols.push_back(merged);
    merges.emplace_back(first, second);
  }
  symbols.push_back(kClipBos);
  symbols.push_back(kClipEos);
  RETURN_IF_ERROR(WriteClipVocabulary(dir, symbols, merges));
  return WriteJson(dir + "/tokenizer_config.json", config);
}

// The T5 tokenizer files of `t` in `dir`: spiece.model from Debian's SentencePiece trainer (a
// fixed argument set: unigram, single-threaded, whole corpus, quiet), then the files
// T5Tokenizer.save_pretrained writes.
absl::Status WriteT5Tokenizer(const DemoTokenizer& t, const std::string& where,
                              const std::string& dir) {
  const int64_t pieces = t.vocab_size - t.extra_ids;
  const std::vector<std::pair<std::string, std::string>> args = {
      {"model_type", "unigram"},
      {"vocab_size", std::to_string(pieces)},
      {"pad_id", "0"},
      {"eos_id", "1"},
      {"unk_id", "2"},
      {"bos_id", "-1"},
      {"normalization_rule_name", "nmt_nfkc"},
      {"character_coverage", "1.0"},
      {"input_sentence_size", "0"},
      {"num_threads", "1"},
      {"minloglevel", "2"}};
  std::string model, error;
  if (!tokenizers::SentencePieceModel::Train(CorpusLines(t.corpus), args, &model, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": training the SentencePiece model (", pieces, " pieces): ", error));
  }
  RETURN_IF_ERROR(WriteText(dir + "/spiece.model", model));

  nlohmann::json decoder = {{"0", AddedTokenJson("<pad>", false, false)},
                            {"1", AddedTokenJson("</s>", false, false)},
                            {"2", AddedTokenJson("<unk>", false, false)}};
  nlohmann::json additional = nlohmann::json::array();
  nlohmann::json added = nlohmann::json::object();
  for (int64_t i = 0; i < t.extra_ids; ++i) {
    const std::string token = absl::StrCat("<extra_id_", i, ">");
    const int64_t id = t.vocab_size - 1 - i;
    decoder[std::to_string(id)] = AddedTokenJson(token, true, false);
    additional.push_back(token);
    added[token] = id;
  }
  const nlohmann::json config = {{"add_prefix_space", true},
                                 {"added_tokens_decoder", decoder},
                                 {"additional_special_tokens", additional},
                                 {"clean_up_tokenization_spaces", true},
                                 {"eos_token", "</s>"},
                                 {"extra_ids", t.extra_ids},
                                 {"legacy", true},
                                 {"model_max_length", t.model_max_length},
                                 {"pad_token", "<pad>"},
                                 {"sp_model_kwargs", nlohmann::json::object()},
                                 {"tokenizer_class", "T5Tokenizer"},
                                 {"unk_token", "<unk>"}};
  const nlohmann::json special_map = {{"additional_special_tokens", additional},
                                      {"eos_token", SpecialTokenJson("</s>", false)},
                                      {"pad_token", SpecialTokenJson("<pad>", false)},
                                      {"unk_token", SpecialTokenJson("<unk>", false)}};
  RETURN_IF_ERROR(WriteJson(dir + "/tokenizer_config.json", config));
  RETURN_IF_ERROR(WriteJson(dir + "/special_tokens_map.json", special_map));
  return WriteJson(dir + "/added_tokens.json", added);
}

// Generates tokenizer `t` under `<pipeline_dir>/<name>/` and checks that the real loader reads it
// with the declared vocabulary size.
absl::Status WriteTokenizer(const DemoPipelineRecipe& recipe, const DemoTokenizer& t,
                            const std::string& pipeline_dir) {
  const std::string where = absl::StrCat("demo pipeline '", recipe.name, "' tokenizer '", t.name,
                                         "' (", TokenizerClass(t.kind), ")");
  const std::string dir = absl::StrCat(pipeline_dir, "/", t.name);
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(t.kind == DemoTokenizerKind::kClipBpe ? WriteClipTokenizer(t, where, dir)
                                                         : WriteT5Tokenizer(t, where, dir));
  auto loaded = tokenizers::LoadTokenizerFromFolder(dir);
  if (!loaded.ok()) return Annotate(loaded.status(), where);
  if ((*loaded)->vocab_size() != t.vocab_size || (*loaded)->model_max_length() != t.model_max_length) {
    return absl::InternalError(absl::StrCat(
        where, ": the written files load with vocab_size ", (*loaded)->vocab_size(),
        " and model_max_length ", (*loaded)->model_max_length(), ", not the declared ",
        t.vocab_size, " and ", t.model_max_length));
  }
  return absl::OkStatus();
}

absl::Status WriteTree(const DemoPipelineRecipe& recipe, const std::string& dir,
                       const std::string& recipe_digest) {
  const std::string pipeline_dir = dir + "/pipeline";
  const std::string single_dir = dir + "/single_file";
  RETURN_IF_ERROR(MakeDirs(pipeline_dir));
  RETURN_IF_ERROR(MakeDirs(single_dir));
  nlohmann::json index = {{"_class_name", recipe.pipeline_class},
                          {"_diffusers_version", "0.33.0"}};
  for (const DemoComponent& c : recipe.components) {
    RETURN_IF_ERROR(WriteComponent(recipe, &c - recipe.components.data(), pipeline_dir, single_dir));
    index[c.name] = {c.library, c.class_name};
  }
  for (const DemoTokenizer& t : recipe.tokenizers) {
    RETURN_IF_ERROR(WriteTokenizer(recipe, t, pipeline_dir));
    index[t.name] = {kTransformers, TokenizerClass(t.kind)};
  }
  for (const std::string& absent : recipe.absent_components) {
    index[absent] = {nullptr, nullptr};
  }
  if (!recipe.scheduler_config.is_null()) {
    RETURN_IF_ERROR(MakeDirs(pipeline_dir + "/scheduler"));
    RETURN_IF_ERROR(WriteText(pipeline_dir + "/scheduler/scheduler_config.json",
                              recipe.scheduler_config.dump(2) + "\n"));
    index["scheduler"] = {"diffusers", recipe.scheduler_config["_class_name"]};
  }
  RETURN_IF_ERROR(WriteText(pipeline_dir + "/model_index.json", index.dump(2) + "\n"));
  if (!recipe.example_inputs.empty()) {
    std::vector<std::pair<std::string, torch::Tensor>> inputs;
    RETURN_IF_ERROR(TorchCallVoid("drawing the example inputs", [&] {
      at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(recipe.seed);
      for (const auto& [name, shape] : recipe.example_inputs) {
        inputs.emplace_back(name, at::randn(shape, gen, torch::kFloat32));
      }
    }, absl::StatusCode::kInvalidArgument));
    RETURN_IF_ERROR(WriteSafetensors(
        dir + "/example_inputs.safetensors", inputs,
        {{"source", absl::StrCat("diffusion-server demo pipeline ", recipe.name,
                                 ": random example request tensors (seed ", recipe.seed, ")")}}));
  }
  ASSIGN_OR_RETURN(auto files, HashTree(dir));
  nlohmann::json manifest = {{"name", recipe.name},
                             {"description", recipe.description},
                             {"recipe_sha256", recipe_digest},
                             {"recipe", DemoRecipeJson(recipe)},
                             {"files", files}};
  return WriteText(dir + "/manifest.json", manifest.dump(2) + "\n");
}

}  // namespace

nlohmann::json DemoRecipeJson(const DemoPipelineRecipe& recipe) {
  nlohmann::json components = nlohmann::json::array();
  for (const DemoComponent& c : recipe.components) {
    components.push_back({{"name", c.name},
                          {"class_name", c.class_name},
                          {"config", c.config},
                          {"single_file", c.single_file},
                          {"library", c.library},
                          {"weights", c.weights.empty()
                                          ? std::string("random")
                                          : Sha256Hex(c.weights.data(), c.weights.size())}});
  }
  nlohmann::json tokenizers = nlohmann::json::array();
  for (const DemoTokenizer& t : recipe.tokenizers) {
    tokenizers.push_back({{"name", t.name},
                          {"kind", TokenizerKindName(t.kind)},
                          {"vocab_size", t.vocab_size},
                          {"model_max_length", t.model_max_length},
                          {"extra_ids", t.extra_ids},
                          {"encoder", t.encoder},
                          {"corpus", t.corpus}});
  }
  return {{"name", recipe.name},
          {"pipeline_class", recipe.pipeline_class},
          {"components", components},
          {"scheduler_config", recipe.scheduler_config},
          {"tokenizers", tokenizers},
          {"absent_components", recipe.absent_components},
          {"seed", recipe.seed},
          {"example_inputs", recipe.example_inputs},
          {"prompt_template", recipe.prompt_template},
          {"vocabulary", recipe.vocabulary},
          // Weights depend on the initializer too: bump when InitRandomWeights changes.
          {"initializer", "InitRandomWeights/2"},
          // Tokenizer files depend on the generators too: bump when they change.
          {"tokenizer_generator", "DemoTokenizer/1"}};
}

absl::StatusOr<DemoPipelineFiles> WriteDemoPipeline(const DemoPipelineRecipe& recipe,
                                                    const std::string& root) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(ValidateRecipe(recipe));
  const std::string recipe_json = DemoRecipeJson(recipe).dump();
  const std::string digest = Sha256Hex(recipe_json.data(), recipe_json.size());
  RETURN_IF_ERROR(MakeDirs(root));
  ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(absl::StrCat(root, "/.", recipe.name, ".lock")));

  DemoPipelineFiles files;
  files.dir = absl::StrCat(root, "/", recipe.name);
  files.pipeline_dir = files.dir + "/pipeline";
  for (const DemoComponent& c : recipe.components) {
    if (!c.single_file.empty()) {
      files.single_files[c.name] = absl::StrCat(files.dir, "/single_file/", c.single_file);
    }
  }
  if (!recipe.example_inputs.empty()) files.example_inputs = files.dir + "/example_inputs.safetensors";
  if (!VerifiedCopy(files.dir, digest)) {
    const std::string tmp = absl::StrCat(root, "/.", recipe.name, ".tmp.", getpid());
    std::error_code ec;
    fs::remove_all(tmp, ec);
    absl::Status written = WriteTree(recipe, tmp, digest);
    if (written.ok()) {
      // Under the lock nobody else writes `dir`; readers of an older copy keep their open files.
      fs::remove_all(files.dir, ec);
      if (ec) written = ErrnoStatus(absl::StrCat("removing the old ", files.dir), ec.value());
    }
    if (written.ok()) {
      fs::rename(tmp, files.dir, ec);
      if (ec) written = ErrnoStatus(absl::StrCat("renaming ", tmp, " to ", files.dir), ec.value());
    }
    if (!written.ok()) {
      fs::remove_all(tmp, ec);
      return written;
    }
    files.written = true;
  }
  files.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return files;
}

}  // namespace ds
