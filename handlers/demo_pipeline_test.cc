// handlers/demo_pipeline with a model registered here (no model folder): transformers-layout
// components, tokenizer folders generated from a corpus (CLIP BPE, T5 SentencePiece) that the
// real tokenizer loader reads, deterministic bytes, reuse of a verified copy, rewriting of a
// modified tokenizer file, and recipe errors naming the tokenizer.
#include "handlers/demo_pipeline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "handlers/tokenizers/tokenizer.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::ds::test::ReadFileBytes;
using ::ds::test::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kEmbedderClass[] = "DemoTestTextEmbedder";

// A token-embedding table [vocab_size, hidden_size] and a projection: the smallest "text encoder"
// whose weights depend on the vocabulary size.
class EmbedderImpl : public torch::nn::Module {
 public:
  EmbedderImpl(int64_t vocab_size, int64_t hidden_size)
      : embed_tokens(register_module("embed_tokens", torch::nn::Embedding(vocab_size, hidden_size))),
        proj(register_module("proj", torch::nn::Linear(hidden_size, hidden_size))) {}
  torch::nn::Embedding embed_tokens;
  torch::nn::Linear proj;
};
TORCH_MODULE(Embedder);

class EmbedderModel : public DiffusionModel {
 public:
  EmbedderModel(nlohmann::json config, ModelOptions options, int64_t vocab, int64_t hidden)
      : config_(std::move(config)), options_(options), module_(vocab, hidden) {}
  const std::string& class_name() const override { return class_name_; }
  const nlohmann::json& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *module_; }
  const torch::nn::Module& module() const override { return *module_; }
  std::vector<std::string> required_inputs() const override { return {"input_ids"}; }
  std::vector<std::string> optional_inputs() const override { return {}; }
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const LoraContext*) const override {
    torch::InferenceMode guard;
    const torch::Tensor table = module_->embed_tokens->weight;
    return torch::linear(table.index_select(0, inputs.at("input_ids").flatten()),
                         module_->proj->weight, module_->proj->bias);
  }

 private:
  std::string class_name_ = kEmbedderClass;
  nlohmann::json config_;
  ModelOptions options_;
  Embedder module_;
};

ModelSpec EmbedderSpec() {
  ModelSpec spec;
  spec.name = "demo-test-text-embedder";
  spec.class_name = kEmbedderClass;
  spec.factory = [](const nlohmann::json& config,
                    const ModelOptions& options) -> absl::StatusOr<std::unique_ptr<DiffusionModel>> {
    const int64_t vocab = config.value("vocab_size", int64_t{0});
    const int64_t hidden = config.value("hidden_size", int64_t{0});
    if (vocab <= 0 || hidden <= 0) {
      return absl::InvalidArgumentError("vocab_size and hidden_size must be positive");
    }
    return std::make_unique<EmbedderModel>(config, options, vocab, hidden);
  };
  return spec;
}
DS_REGISTER_MODEL(EmbedderSpec());

constexpr char kCorpus[] =
    "the cat sat on the mat and the dog sat on the log\n"
    "a red fox jumps over the lazy dog in the green field\n"
    "\n"
    "the morning sun shines on the sleeping cat by the window\n"
    "a small boat drifts on the calm lake under the blue sky\n"
    "they've painted the old house red, and it's looking lovely\n"
    "we saw 3 birds, 12 fish and 100 stars over the quiet sea\n"
    "an old man reads the paper while the kettle sings in the kitchen\n"
    "the children play in the garden as the rain begins to fall\n"
    "a photo of a mountain at sunset, soft light, sharp focus\n"
    "the train leaves the station at noon and arrives by night\n";

constexpr int64_t kClipVocab = 600;  // 512 byte symbols + 86 merges + 2 special tokens
constexpr int64_t kT5Extra = 10;
constexpr int64_t kT5Vocab = 80 + kT5Extra;  // 80 SentencePiece pieces + sentinels

DemoPipelineRecipe TextRecipe() {
  DemoPipelineRecipe r;
  r.name = "text-demo";
  r.pipeline_class = "TestTextPipeline";
  r.description = "test recipe with generated tokenizers";
  r.seed = 5;
  DemoComponent clip;
  clip.name = "text_encoder";
  clip.class_name = kEmbedderClass;
  clip.library = "transformers";
  clip.config = {{"vocab_size", kClipVocab}, {"hidden_size", 8}};
  DemoComponent t5 = clip;
  t5.name = "text_encoder_2";
  t5.config = {{"vocab_size", kT5Vocab}, {"hidden_size", 8}};
  DemoComponent diffusers_one = clip;
  diffusers_one.name = "denoiser";
  diffusers_one.library = "diffusers";
  diffusers_one.config = {{"vocab_size", 4}, {"hidden_size", 4}};
  r.components = {diffusers_one, clip, t5};
  DemoTokenizer clip_tok;
  clip_tok.name = "tokenizer";
  clip_tok.kind = DemoTokenizerKind::kClipBpe;
  clip_tok.vocab_size = kClipVocab;
  clip_tok.model_max_length = 16;
  clip_tok.encoder = "text_encoder";
  clip_tok.corpus = kCorpus;
  DemoTokenizer t5_tok;
  t5_tok.name = "tokenizer_2";
  t5_tok.kind = DemoTokenizerKind::kT5SentencePiece;
  t5_tok.vocab_size = kT5Vocab;
  t5_tok.extra_ids = kT5Extra;
  t5_tok.model_max_length = 24;
  t5_tok.encoder = "text_encoder_2";
  t5_tok.corpus = kCorpus;
  r.tokenizers = {clip_tok, t5_tok};
  return r;
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

TEST(DemoPipelineTokenizersTest, WritesTransformersComponentsAndLoadableTokenizers) {
  TempDir tmp;
  auto files = WriteDemoPipeline(TextRecipe(), tmp.path());
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_TRUE(files->written);
  const std::string p = files->pipeline_dir;

  const nlohmann::json index = ReadJson(p + "/model_index.json");
  EXPECT_EQ(index["denoiser"], nlohmann::json({"diffusers", kEmbedderClass}));
  EXPECT_EQ(index["text_encoder"], nlohmann::json({"transformers", kEmbedderClass}));
  EXPECT_EQ(index["tokenizer"], nlohmann::json({"transformers", "CLIPTokenizer"}));
  EXPECT_EQ(index["tokenizer_2"], nlohmann::json({"transformers", "T5Tokenizer"}));

  // Each library's layout.
  EXPECT_TRUE(fs::exists(p + "/denoiser/diffusion_pytorch_model.safetensors"));
  EXPECT_EQ(ReadJson(p + "/denoiser/config.json")["_class_name"], kEmbedderClass);
  EXPECT_TRUE(fs::exists(p + "/text_encoder/model.safetensors"));
  EXPECT_FALSE(fs::exists(p + "/text_encoder/diffusion_pytorch_model.safetensors"));
  const nlohmann::json te_config = ReadJson(p + "/text_encoder/config.json");
  EXPECT_EQ(te_config["architectures"], nlohmann::json({kEmbedderClass}));
  EXPECT_FALSE(te_config.contains("_class_name"));
  // A transformers folder loads through the registry by its "architectures".
  auto encoder = LoadModelFromFolder(p + "/text_encoder", {});
  ASSERT_TRUE(encoder.ok()) << encoder.status();

  // The CLIP tokenizer: byte symbols, learned merges, specials as the two highest ids.
  const nlohmann::json vocab = ReadJson(p + "/tokenizer/vocab.json");
  EXPECT_EQ(static_cast<int64_t>(vocab.size()), kClipVocab);
  EXPECT_EQ(vocab["!"], 0);
  EXPECT_EQ(vocab["!</w>"], 256);
  EXPECT_EQ(vocab["<|startoftext|>"], kClipVocab - 2);
  EXPECT_EQ(vocab["<|endoftext|>"], kClipVocab - 1);
  std::ifstream merges_in(p + "/tokenizer/merges.txt");
  std::string header;
  std::getline(merges_in, header);
  EXPECT_EQ(header, "#version: 0.2");
  int64_t merge_lines = 0;
  for (std::string line; std::getline(merges_in, line);) ++merge_lines;
  EXPECT_EQ(merge_lines, kClipVocab - 514);
  auto clip = tokenizers::LoadTokenizerFromFolder(p + "/tokenizer");
  ASSERT_TRUE(clip.ok()) << clip.status();
  EXPECT_EQ((*clip)->kind(), "clip");
  EXPECT_EQ((*clip)->vocab_size(), kClipVocab);
  EXPECT_EQ((*clip)->bos_token_id(), kClipVocab - 2);
  EXPECT_EQ((*clip)->eos_token_id(), kClipVocab - 1);
  EXPECT_EQ((*clip)->model_max_length(), 16);
  // The corpus's most frequent word became one token.
  auto the = (*clip)->Tokenize("The");
  ASSERT_TRUE(the.ok()) << the.status();
  EXPECT_THAT(*the, ElementsAre("the</w>"));
  auto encoded = (*clip)->Encode("the cat sat on the mat", {});
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_EQ(encoded->ids.size(), 16u);
  EXPECT_EQ(encoded->ids.front(), kClipVocab - 2);
  for (int64_t id : encoded->ids) EXPECT_LT(id, kClipVocab);

  // The T5 tokenizer: a trained unigram model, the sentinels at the top.
  auto t5 = tokenizers::LoadTokenizerFromFolder(p + "/tokenizer_2");
  ASSERT_TRUE(t5.ok()) << t5.status();
  EXPECT_EQ((*t5)->kind(), "t5");
  EXPECT_EQ((*t5)->vocab_size(), kT5Vocab);
  EXPECT_EQ((*t5)->pad_token_id(), 0);
  EXPECT_EQ((*t5)->eos_token_id(), 1);
  EXPECT_EQ((*t5)->bos_token_id(), -1);
  EXPECT_EQ((*t5)->model_max_length(), 24);
  auto sentinel = (*t5)->Encode("<extra_id_0>", {});
  ASSERT_TRUE(sentinel.ok()) << sentinel.status();
  EXPECT_EQ(sentinel->ids[0], kT5Vocab - 1);
  auto sentence = (*t5)->Encode("the cat sat on the mat", {});
  ASSERT_TRUE(sentence.ok()) << sentence.status();
  int64_t text_tokens = 0;
  for (size_t i = 0; i < sentence->ids.size() && sentence->attention_mask[i] == 1; ++i) {
    EXPECT_NE(sentence->ids[i], 2) << "corpus words are covered (no <unk>)";
    ++text_tokens;
  }
  EXPECT_GT(text_tokens, 1);
  EXPECT_LT(text_tokens, 22) << "pieces longer than characters were learned";
  EXPECT_EQ(ReadJson(p + "/tokenizer_2/added_tokens.json")["<extra_id_0>"], kT5Vocab - 1);

  // The embedding rows match the vocabularies.
  auto clip_weights = LoadSafetensorsWeights(p + "/text_encoder/model.safetensors");
  auto t5_weights = LoadSafetensorsWeights(p + "/text_encoder_2/model.safetensors");
  ASSERT_TRUE(clip_weights.ok() && t5_weights.ok());
  EXPECT_EQ(clip_weights->at("embed_tokens.weight").size(0), (*clip)->vocab_size());
  EXPECT_EQ(t5_weights->at("embed_tokens.weight").size(0), (*t5)->vocab_size());

  // Every tokenizer file is in the manifest.
  const nlohmann::json manifest = ReadJson(files->dir + "/manifest.json");
  for (const char* f : {"pipeline/tokenizer/vocab.json", "pipeline/tokenizer/merges.txt",
                        "pipeline/tokenizer/tokenizer_config.json",
                        "pipeline/tokenizer/special_tokens_map.json",
                        "pipeline/tokenizer_2/spiece.model",
                        "pipeline/tokenizer_2/tokenizer_config.json",
                        "pipeline/tokenizer_2/special_tokens_map.json",
                        "pipeline/tokenizer_2/added_tokens.json",
                        "pipeline/text_encoder/model.safetensors"}) {
    EXPECT_TRUE(manifest["files"].contains(f)) << f;
  }
  EXPECT_EQ(manifest["recipe"]["tokenizers"].size(), 2u);
}

TEST(DemoPipelineTokenizersTest, SameRecipeSameBytes) {
  TempDir a, b;
  auto first = WriteDemoPipeline(TextRecipe(), a.path());
  auto second = WriteDemoPipeline(TextRecipe(), b.path());
  ASSERT_TRUE(first.ok() && second.ok()) << first.status() << " / " << second.status();
  const nlohmann::json files_a = ReadJson(first->dir + "/manifest.json")["files"];
  const nlohmann::json files_b = ReadJson(second->dir + "/manifest.json")["files"];
  EXPECT_EQ(files_a, files_b);
  EXPECT_GE(files_a.size(), 14u);

  // Another corpus gives another vocabulary.
  DemoPipelineRecipe other = TextRecipe();
  other.tokenizers[0].corpus = std::string(kCorpus) + "zebra zebra zebra zebra zebra zebra\n";
  TempDir c;
  auto third = WriteDemoPipeline(other, c.path());
  ASSERT_TRUE(third.ok()) << third.status();
  const nlohmann::json files_c = ReadJson(third->dir + "/manifest.json")["files"];
  EXPECT_NE(files_c["pipeline/tokenizer/merges.txt"], files_a["pipeline/tokenizer/merges.txt"]);
  EXPECT_EQ(files_c["pipeline/tokenizer_2/spiece.model"],
            files_a["pipeline/tokenizer_2/spiece.model"]);
}

TEST(DemoPipelineTokenizersTest, ReusesAVerifiedCopyAndRewritesAModifiedTokenizerFile) {
  TempDir tmp;
  auto first = WriteDemoPipeline(TextRecipe(), tmp.path());
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string merges = first->pipeline_dir + "/tokenizer/merges.txt";
  const std::string spiece = first->pipeline_dir + "/tokenizer_2/spiece.model";
  const std::string merges_bytes = ReadFileBytes(merges);
  const std::string spiece_bytes = ReadFileBytes(spiece);

  auto second = WriteDemoPipeline(TextRecipe(), tmp.path());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(second->written);

  { std::ofstream(merges, std::ios::app) << "q z\n"; }
  auto third = WriteDemoPipeline(TextRecipe(), tmp.path());
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_TRUE(third->written);
  EXPECT_EQ(ReadFileBytes(merges), merges_bytes);

  fs::remove(spiece);
  auto fourth = WriteDemoPipeline(TextRecipe(), tmp.path());
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  EXPECT_TRUE(fourth->written);
  EXPECT_EQ(ReadFileBytes(spiece), spiece_bytes);

  // Another tokenizer declaration is another recipe: rewritten.
  DemoPipelineRecipe longer = TextRecipe();
  longer.tokenizers[1].model_max_length = 32;
  auto fifth = WriteDemoPipeline(longer, tmp.path());
  ASSERT_TRUE(fifth.ok()) << fifth.status();
  EXPECT_TRUE(fifth->written);
  EXPECT_EQ(ReadJson(fifth->pipeline_dir + "/tokenizer_2/tokenizer_config.json")["model_max_length"],
            32);
}

TEST(DemoPipelineTokenizersTest, BadTokenizerDeclarationsAreRefusedNamingTheTokenizer) {
  TempDir tmp;
  auto expect_invalid = [&](const DemoPipelineRecipe& r, const std::string& needle) {
    auto files = WriteDemoPipeline(r, tmp.path());
    EXPECT_EQ(files.status().code(), absl::StatusCode::kInvalidArgument) << files.status();
    EXPECT_THAT(std::string(files.status().message()), HasSubstr(needle));
  };
  DemoPipelineRecipe r = TextRecipe();
  r.components[1].config["vocab_size"] = kClipVocab + 1;
  expect_invalid(r, "tokenizer 'tokenizer' has vocab_size 600 but its encoder 'text_encoder'");

  r = TextRecipe();
  r.tokenizers[1].encoder = "text_encoder_3";
  expect_invalid(r, "'text_encoder_3' is not a component");

  r = TextRecipe();
  r.tokenizers[0].vocab_size = 513;
  expect_invalid(r, "tokenizer 'tokenizer': vocab_size must be in [514");

  r = TextRecipe();
  r.tokenizers[0].corpus = " \n\t\n";
  expect_invalid(r, "tokenizer 'tokenizer': the corpus is empty");

  r = TextRecipe();
  r.tokenizers[1].name = "text_encoder";
  expect_invalid(r, "bad or duplicate tokenizer name 'text_encoder'");

  r = TextRecipe();
  r.absent_components = {"tokenizer"};
  expect_invalid(r, "bad absent component 'tokenizer'");

  r = TextRecipe();
  r.components[0].library = "timm";
  expect_invalid(r, "library 'timm'");

  // Vocabularies the corpus cannot fill.
  r = TextRecipe();
  r.tokenizers[0].vocab_size = 5000;
  r.components[1].config["vocab_size"] = 5000;
  expect_invalid(r, "tokenizer 'tokenizer' (CLIPTokenizer): the corpus yields only");
  r = TextRecipe();
  r.tokenizers[1].vocab_size = 5000;
  r.components[2].config["vocab_size"] = 5000;
  expect_invalid(r, "tokenizer 'tokenizer_2' (T5Tokenizer): training the SentencePiece model");
  EXPECT_FALSE(fs::exists(tmp.File("text-demo"))) << "nothing left behind";
}

}  // namespace
}  // namespace ds
