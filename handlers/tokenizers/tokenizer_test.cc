// The tokenizers against transformers' own slow tokenizers: every golden string's tokens and ids
// (unpadded, and padded as FluxPipeline calls them), the complete pipeline folder's tokenizers
// against the ids its FluxPipeline runs used, truncation reporting, and bad folders.
#include "handlers/tokenizers/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "handlers/safetensors.h"
#include "handlers/tokenizers/clip_tokenizer.h"
#include "handlers/tokenizers/t5_tokenizer.h"
#include "testing/test_util.h"

namespace ds::tokenizers {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::ds::test::TempDir;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

std::string TokenizerGoldenDir() { return GoldenDir() + "/conditioning/tokenizers"; }
std::string ClipDir() { return TokenizerGoldenDir() + "/clip_tokenizer"; }
std::string T5Dir() { return TokenizerGoldenDir() + "/t5_tokenizer"; }
std::string PipelineTextDir() { return GoldenDir() + "/pipeline/flux_pipeline_text"; }

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Rows of an I64 tensor of the golden ids file.
class GoldenIds {
 public:
  GoldenIds() {
    auto f = SafetensorsFile::Open(TokenizerGoldenDir() + "/ids.safetensors");
    EXPECT_TRUE(f.ok()) << f.status();
    if (f.ok()) file_ = *f;
  }
  bool ok() const { return file_ != nullptr; }
  // The whole tensor (1-D) or row `row` of a 2-D one.
  std::vector<int64_t> Get(const std::string& name, int64_t row = -1) const {
    auto t = file_->Get(name);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return {};
    torch::Tensor v = row >= 0 ? (*t)[row] : *t;
    v = v.contiguous();
    return std::vector<int64_t>(v.data_ptr<int64_t>(), v.data_ptr<int64_t>() + v.numel());
  }
  int64_t Rows(const std::string& name) const { return file_->Get(name)->size(0); }

 private:
  std::shared_ptr<const SafetensorsFile> file_;
};

std::unique_ptr<Tokenizer> MustLoad(const std::string& dir) {
  auto t = LoadTokenizerFromFolder(dir);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(*t) : nullptr;
}

const nlohmann::json& Strings() {
  static const nlohmann::json* strings =
      new nlohmann::json(ReadJson(TokenizerGoldenDir() + "/tokens.json")["strings"]);
  return *strings;
}

TokenizerOptions Unpadded() {
  TokenizerOptions o;
  o.pad_to_max_length = false;
  o.truncate = false;
  return o;
}

TokenizerOptions Padded(int64_t max_length) {
  TokenizerOptions o;
  o.max_length = max_length;
  return o;
}

TEST(TokenizerTest, LoadsKindsAndSpecialTokensFromTheFolders) {
  const nlohmann::json info = ReadJson(TokenizerGoldenDir() + "/tokens.json")["tokenizers"];
  auto clip = MustLoad(ClipDir());
  ASSERT_NE(clip, nullptr);
  EXPECT_EQ(clip->kind(), "clip");
  EXPECT_EQ(clip->model_max_length(), info["clip"]["model_max_length"].get<int64_t>());
  EXPECT_EQ(clip->bos_token_id(), info["clip"]["bos_token_id"].get<int64_t>());
  EXPECT_EQ(clip->eos_token_id(), info["clip"]["eos_token_id"].get<int64_t>());
  EXPECT_EQ(clip->pad_token_id(), info["clip"]["pad_token_id"].get<int64_t>());
  EXPECT_EQ(clip->vocab_size(), info["clip"]["len"].get<int64_t>());

  auto t5 = MustLoad(T5Dir());
  ASSERT_NE(t5, nullptr);
  EXPECT_EQ(t5->kind(), "t5");
  EXPECT_EQ(t5->bos_token_id(), -1);
  EXPECT_EQ(t5->eos_token_id(), info["t5"]["eos_token_id"].get<int64_t>());
  EXPECT_EQ(t5->pad_token_id(), info["t5"]["pad_token_id"].get<int64_t>());
  EXPECT_EQ(t5->vocab_size(), info["t5"]["len"].get<int64_t>());
  EXPECT_TRUE(dynamic_cast<const T5Tokenizer&>(*t5).legacy());
  const nlohmann::json config = ReadJson(T5Dir() + "/tokenizer_config.json");
  EXPECT_EQ(t5->model_max_length(), config["model_max_length"].get<int64_t>());
}

TEST(TokenizerTest, ClipMatchesTransformersOnEveryGoldenString) {
  GoldenIds golden;
  ASSERT_TRUE(golden.ok());
  auto clip = MustLoad(ClipDir());
  ASSERT_NE(clip, nullptr);
  const int64_t max_length = clip->model_max_length();
  ASSERT_EQ(static_cast<int64_t>(Strings().size()), golden.Rows("clip_padded"));
  int truncated_cases = 0;
  for (const auto& s : Strings()) {
    const int64_t i = s["index"].get<int64_t>();
    const std::string text = s["text"].get<std::string>();
    SCOPED_TRACE("string " + std::to_string(i) + ": " + text.substr(0, 60));
    auto tokens = clip->Tokenize(text);
    ASSERT_TRUE(tokens.ok()) << tokens.status();
    EXPECT_THAT(*tokens, ElementsAreArray(s["clip_tokens"].get<std::vector<std::string>>()));

    auto plain = clip->Encode(text, Unpadded());
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_THAT(plain->ids, ElementsAreArray(golden.Get("clip/" + std::to_string(i))));
    EXPECT_FALSE(plain->truncated);
    EXPECT_EQ(plain->untruncated_length, s["clip_len_untruncated"].get<int64_t>());

    auto padded = clip->Encode(text, TokenizerOptions());
    ASSERT_TRUE(padded.ok()) << padded.status();
    EXPECT_THAT(padded->ids, ElementsAreArray(golden.Get("clip_padded", i)));
    EXPECT_THAT(padded->attention_mask,
                ElementsAreArray(golden.Get("clip_padded_attention_mask", i)));
    const bool over = s["clip_len_untruncated"].get<int64_t>() > max_length;
    EXPECT_EQ(padded->truncated, over);
    EXPECT_EQ(padded->untruncated_length, s["clip_len_untruncated"].get<int64_t>());
    if (over) {
      ++truncated_cases;
      EXPECT_EQ(padded->ids.back(), clip->eos_token_id());  // truncation keeps EOS
    }
  }
  EXPECT_GT(truncated_cases, 0);
}

TEST(TokenizerTest, T5MatchesTransformersOnEveryGoldenString) {
  GoldenIds golden;
  ASSERT_TRUE(golden.ok());
  auto t5 = MustLoad(T5Dir());
  ASSERT_NE(t5, nullptr);
  int truncated_cases = 0;
  for (const auto& s : Strings()) {
    const int64_t i = s["index"].get<int64_t>();
    const std::string text = s["text"].get<std::string>();
    SCOPED_TRACE("string " + std::to_string(i) + ": " + text.substr(0, 60));
    auto pieces = t5->Tokenize(text);
    ASSERT_TRUE(pieces.ok()) << pieces.status();
    EXPECT_THAT(*pieces, ElementsAreArray(s["t5_pieces"].get<std::vector<std::string>>()));

    auto plain = t5->Encode(text, Unpadded());
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_THAT(plain->ids, ElementsAreArray(golden.Get("t5/" + std::to_string(i))));
    EXPECT_EQ(plain->untruncated_length, s["t5_len_untruncated"].get<int64_t>());

    for (int64_t max_length : {32, 512}) {
      const std::string key = "t5_padded_" + std::to_string(max_length);
      auto padded = t5->Encode(text, Padded(max_length));
      ASSERT_TRUE(padded.ok()) << padded.status();
      EXPECT_THAT(padded->ids, ElementsAreArray(golden.Get(key, i))) << key;
      EXPECT_THAT(padded->attention_mask, ElementsAreArray(golden.Get(key + "_attention_mask", i)))
          << key;
      const bool over = s["t5_len_untruncated"].get<int64_t>() > max_length;
      EXPECT_EQ(padded->truncated, over) << key;
      EXPECT_EQ(padded->untruncated_length, s["t5_len_untruncated"].get<int64_t>()) << key;
      if (over) {
        ++truncated_cases;
        EXPECT_EQ(padded->ids.back(), t5->eos_token_id());
      }
    }
  }
  EXPECT_GT(truncated_cases, 0);
}

// A copy of a golden tokenizer folder whose tokenizer_config.json is edited by `edit`.
std::string CopyWithConfig(const TempDir& tmp, const std::string& from,
                           const std::function<void(nlohmann::json&)>& edit) {
  const std::string dir = tmp.File(fs::path(from).filename().string());
  fs::copy(from, dir, fs::copy_options::recursive);
  for (const auto& e : fs::directory_iterator(dir)) {
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  }
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::add);
  nlohmann::json config = ReadJson(dir + "/tokenizer_config.json");
  edit(config);
  WriteText(dir + "/tokenizer_config.json", config.dump(2));
  return dir;
}

TEST(TokenizerTest, T5NonLegacyMatchesTransformers) {
  GoldenIds golden;
  ASSERT_TRUE(golden.ok());
  TempDir tmp;
  const std::string dir =
      CopyWithConfig(tmp, T5Dir(), [](nlohmann::json& c) { c["legacy"] = false; });
  auto t5 = MustLoad(dir);
  ASSERT_NE(t5, nullptr);
  EXPECT_FALSE(dynamic_cast<const T5Tokenizer&>(*t5).legacy());
  int differing = 0;
  for (const auto& s : Strings()) {
    const int64_t i = s["index"].get<int64_t>();
    const std::string text = s["text"].get<std::string>();
    SCOPED_TRACE("string " + std::to_string(i) + ": " + text.substr(0, 60));
    auto plain = t5->Encode(text, Unpadded());
    ASSERT_TRUE(plain.ok()) << plain.status();
    const std::vector<int64_t> expected = golden.Get("t5_nonlegacy/" + std::to_string(i));
    EXPECT_THAT(plain->ids, ElementsAreArray(expected));
    EXPECT_THAT(expected, ElementsAreArray(s["t5_nonlegacy_ids"].get<std::vector<int64_t>>()));
    if (s["t5_nonlegacy_differs"].get<bool>()) ++differing;
  }
  EXPECT_GT(differing, 0);  // the fixture does tell the two behaviours apart
}

TEST(TokenizerTest, PipelineFolderTokenizersMatchThePipelineRuns) {
  const std::string root = PipelineTextDir();
  auto clip = MustLoad(root + "/flux_tiny/tokenizer");
  auto t5 = MustLoad(root + "/flux_tiny/tokenizer_2");
  ASSERT_NE(clip, nullptr);
  ASSERT_NE(t5, nullptr);
  EXPECT_EQ(clip->kind(), "clip");
  EXPECT_EQ(t5->kind(), "t5");
  const nlohmann::json cases = ReadJson(root + "/cases.json")["cases"];
  ASSERT_FALSE(cases.empty());
  for (const auto& [name, c] : cases.items()) {
    SCOPED_TRACE(name);
    const nlohmann::json kwargs = c["call_kwargs"];
    const std::string prompt = kwargs["prompt"].get<std::string>();
    const std::string prompt_2 = kwargs.value("prompt_2", prompt);
    auto file = SafetensorsFile::Open(root + "/" + c["file"].get<std::string>());
    ASSERT_TRUE(file.ok()) << file.status();
    auto clip_ids = (*file)->Get("text/clip_input_ids");
    auto t5_ids = (*file)->Get("text/t5_input_ids");
    ASSERT_TRUE(clip_ids.ok() && t5_ids.ok());
    // FluxPipeline: CLIP at tokenizer.model_max_length, T5 at max_sequence_length (the T5 ids'
    // width).
    auto clip_out = clip->Encode(prompt, TokenizerOptions());
    auto t5_out = t5->Encode(prompt_2, Padded(t5_ids->size(1)));
    ASSERT_TRUE(clip_out.ok() && t5_out.ok());
    torch::Tensor c_ids = clip_ids->contiguous();
    torch::Tensor t_ids = t5_ids->contiguous();
    EXPECT_THAT(clip_out->ids, ElementsAreArray(c_ids.data_ptr<int64_t>(),
                                                c_ids.data_ptr<int64_t>() + c_ids.numel()));
    EXPECT_THAT(t5_out->ids, ElementsAreArray(t_ids.data_ptr<int64_t>(),
                                              t_ids.data_ptr<int64_t>() + t_ids.numel()));
  }
}

TEST(TokenizerTest, ClipNormalizesDecomposedTextToNfc) {
  // BasicTokenizer applies NFC: a decomposed spelling of golden string 8 gives its ids.
  GoldenIds golden;
  ASSERT_TRUE(golden.ok());
  auto clip = MustLoad(ClipDir());
  ASSERT_NE(clip, nullptr);
  const std::string composed = Strings()[8]["text"].get<std::string>();
  const std::string decomposed =
      "cafe\xcc\x81 nai\xcc\x88ve re\xcc\x81sume\xcc\x81 fac\xcc\xa7"
      "ade";
  ASSERT_NE(composed, decomposed);
  auto a = clip->Encode(decomposed, Unpadded());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_THAT(a->ids, ElementsAreArray(golden.Get("clip/8")));
}

TEST(TokenizerTest, EncodeRejectsBadInput) {
  auto clip = MustLoad(ClipDir());
  auto t5 = MustLoad(T5Dir());
  ASSERT_NE(clip, nullptr);
  ASSERT_NE(t5, nullptr);
  for (const Tokenizer* t : {clip.get(), t5.get()}) {
    auto bad = t->Encode("ok \xff\xfe", TokenizerOptions());
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(bad.status().message(), HasSubstr("byte offset 3"));
    EXPECT_EQ(t->Tokenize("\xc3").status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(t->Encode("x", Padded(-2)).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(clip->Encode("x", Padded(1)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(clip->Encode("x", Padded(2)).ok());
  EXPECT_EQ(t5->Encode("x", Padded(0)).status().code(), absl::StatusCode::kInvalidArgument);
  auto only_eos = t5->Encode("a photo", Padded(1));
  ASSERT_TRUE(only_eos.ok());
  EXPECT_THAT(only_eos->ids, ElementsAreArray({t5->eos_token_id()}));
  EXPECT_TRUE(only_eos->truncated);
}

TEST(TokenizerTest, ConcurrentEncodesAgree) {
  // One tokenizer shared by threads (CLIP fills its word cache meanwhile) gives each thread the
  // single-threaded results.
  auto clip = MustLoad(ClipDir());
  auto t5 = MustLoad(T5Dir());
  ASSERT_NE(clip, nullptr);
  ASSERT_NE(t5, nullptr);
  std::vector<std::string> texts;
  for (const auto& s : Strings()) texts.push_back(s["text"].get<std::string>());
  auto run_all = [&](std::vector<std::vector<int64_t>>* out) {
    for (const std::string& text : texts) {
      out->push_back(clip->Encode(text, TokenizerOptions())->ids);
      out->push_back(t5->Encode(text, Padded(512))->ids);
    }
  };
  std::vector<std::vector<std::vector<int64_t>>> results(4);
  std::vector<std::thread> threads;
  for (auto& r : results) threads.emplace_back(run_all, &r);
  for (auto& th : threads) th.join();
  std::vector<std::vector<int64_t>> reference;
  run_all(&reference);
  for (const auto& r : results) EXPECT_EQ(r, reference);
  EXPECT_GT(dynamic_cast<const ClipTokenizer&>(*clip).cached_words(), 0u);
}

TEST(TokenizerTest, ReportsTheLongPromptTime) {
  // Not an assertion: the time of the 1471-token prompt, cold (fresh tokenizer) and warm.
  auto clip = MustLoad(ClipDir());
  auto t5 = MustLoad(T5Dir());
  ASSERT_NE(clip, nullptr);
  ASSERT_NE(t5, nullptr);
  const std::string text = Strings()[23]["text"].get<std::string>();
  auto time_us = [&](const Tokenizer& t, int64_t max_length) {
    const auto start = std::chrono::steady_clock::now();
    auto r = t.Encode(text, Padded(max_length));
    const auto end = std::chrono::steady_clock::now();
    EXPECT_TRUE(r.ok());
    return std::chrono::duration<double, std::micro>(end - start).count();
  };
  const double clip_cold = time_us(*clip, 77);
  const double clip_warm = time_us(*clip, 77);
  const double t5_first = time_us(*t5, 512);
  const double t5_second = time_us(*t5, 512);
  std::cout << "1471-token prompt (" << text.size() << " bytes): CLIP " << clip_cold << " us cold, "
            << clip_warm << " us warm; T5 " << t5_first << " us, " << t5_second << " us\n";
  RecordProperty("clip_cold_us", std::to_string(clip_cold));
  RecordProperty("t5_us", std::to_string(t5_second));
}

// --- bad folders ---

absl::Status LoadStatus(const std::string& dir) { return LoadTokenizerFromFolder(dir).status(); }

TEST(TokenizerTest, MissingFolderOrFilesAreNotFound) {
  TempDir tmp;
  absl::Status s = LoadStatus(tmp.File("nope"));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(tmp.File("nope")));

  s = LoadStatus(tmp.path());  // empty folder: no config, no model files
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("spiece.model"));

  const std::string clip = CopyWithConfig(tmp, ClipDir(), [](nlohmann::json&) {});
  fs::remove(clip + "/vocab.json");
  s = LoadStatus(clip);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(clip + "/vocab.json"));

  const std::string t5 = CopyWithConfig(tmp, T5Dir(), [](nlohmann::json&) {});
  fs::remove(t5 + "/spiece.model");
  s = LoadStatus(t5);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(t5 + "/spiece.model"));
}

TEST(TokenizerTest, MalformedFilesAreInvalidArgumentNamingTheFile) {
  TempDir tmp;
  const std::string clip = CopyWithConfig(tmp, ClipDir(), [](nlohmann::json&) {});
  const std::string merges = test::ReadFileBytes(clip + "/merges.txt");

  // A merges line without exactly two symbols (line 3 of the file).
  std::string broken = merges;
  std::size_t second_nl = broken.find('\n', broken.find('\n') + 1);
  broken.insert(second_nl + 1, "a b c\n");
  WriteText(clip + "/merges.txt", broken);
  absl::Status s = LoadStatus(clip);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(clip + "/merges.txt"));
  EXPECT_THAT(s.message(), HasSubstr("line 3"));
  WriteText(clip + "/merges.txt", merges);
  EXPECT_TRUE(LoadStatus(clip).ok());

  WriteText(clip + "/vocab.json", R"({"a": 0, "b": "one"})");
  s = LoadStatus(clip);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(clip + "/vocab.json"));
  EXPECT_THAT(s.message(), HasSubstr("\"b\""));
  WriteText(clip + "/vocab.json", "{not json");
  s = LoadStatus(clip);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(clip + "/vocab.json"));

  const std::string t5 = CopyWithConfig(tmp, T5Dir(), [](nlohmann::json&) {});
  WriteText(t5 + "/spiece.model", "definitely not a protobuf");
  s = LoadStatus(t5);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(t5 + "/spiece.model"));
}

TEST(TokenizerTest, BadConfigValuesNameTheFileAndKey) {
  TempDir tmp;
  const std::string dir = CopyWithConfig(
      tmp, ClipDir(), [](nlohmann::json& c) { c["tokenizer_class"] = "BertTokenizer"; });
  absl::Status s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(dir + "/tokenizer_config.json"));
  EXPECT_THAT(s.message(), HasSubstr("tokenizer_class"));
  EXPECT_THAT(s.message(), HasSubstr("BertTokenizer"));

  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::json>>{
           {"model_max_length", "77"},
           {"model_max_length", -5},
           {"additional_special_tokens", 5},
           {"added_tokens_decoder", {{"x", {{"content", "<a>"}}}}},
           {"tokenizer_class", 7}}) {
    SCOPED_TRACE(key + " = " + value.dump());
    nlohmann::json config = ReadJson(ClipDir() + "/tokenizer_config.json");
    config[key] = value;
    WriteText(dir + "/tokenizer_config.json", config.dump());
    s = LoadStatus(dir);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr(dir + "/tokenizer_config.json"));
    EXPECT_THAT(s.message(), HasSubstr(key));
  }
  WriteText(dir + "/tokenizer_config.json", "[1, 2]");
  s = LoadStatus(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(dir + "/tokenizer_config.json"));

  const std::string t5 =
      CopyWithConfig(tmp, T5Dir(), [](nlohmann::json& c) { c["legacy"] = "no"; });
  s = LoadStatus(t5);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(t5 + "/tokenizer_config.json"));
  EXPECT_THAT(s.message(), HasSubstr("legacy"));
}

TEST(TokenizerTest, KindFromFilesWithoutConfigAndUnboundedLength) {
  // Without tokenizer_config.json the files decide the kind; there is then no model_max_length,
  // so padding needs an explicit max_length.
  GoldenIds golden;
  ASSERT_TRUE(golden.ok());
  TempDir tmp;
  for (const std::string& from : {ClipDir(), T5Dir()}) {
    const std::string dir = CopyWithConfig(tmp, from, [](nlohmann::json&) {});
    fs::remove(dir + "/tokenizer_config.json");
    auto t = MustLoad(dir);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->model_max_length(), kUnboundedLength);
    EXPECT_EQ(t->Encode("a photo of a cat", TokenizerOptions()).status().code(),
              absl::StatusCode::kInvalidArgument);
    auto ids = t->Encode("a photo of a cat", Unpadded());
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(ids->ids, ElementsAreArray(golden.Get(t->kind() + "/0")));
  }
}

}  // namespace
}  // namespace ds::tokenizers
