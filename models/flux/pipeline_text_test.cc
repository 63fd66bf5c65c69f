// FluxPipeline from text prompts (issue 7) against diffusers' FluxPipeline on every case of
// $DS_GOLDEN_DIR/pipeline/flux_pipeline_text/ (cases.json: prompt / prompt_2, the recorded noise,
// the recorded size, steps and guidance, max_sequence_length = the recorded T5 id length), loaded
// with FromPretrained from the complete flux_tiny folder (CLIP + T5 tokenizers and text encoders):
// token ids exactly, pooled / sequence embeddings, the latents after every step, the final latents
// and the [0, 1] image within the README's float tolerance |ours - golden| <= 1e-4 + 1e-4 |golden|,
// the uint8 image within one level on at most 0.1 % of the values. Plus: truncation is reported
// exactly when a prompt's untruncated tokens exceed the length, the prompt cache returns
// bit-identical encodings and counts hits/misses/evictions, text prompts equal their own
// embeddings sent as tensors (num_images_per_prompt, several prompts, true CFG), single files and
// shared components give the same encoder, and bad requests/folders get precise errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "handlers/image.h"
#include "handlers/safetensors.h"
#include "models/flux/pipeline.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::CaseNames;
using ::ds::test::ReadJson;
using ::ds::test::TextPipelineDir;
using ::ds::test::WithinTolerance;
namespace fs = std::filesystem;

constexpr double kMaxUint8DifferingFraction = 0.001;

fs::path TinyFolder() { return TextPipelineDir() / "flux_tiny"; }

// The README's uint8 tolerance: at most one level anywhere, at most 0.1 % of values differing.
::testing::AssertionResult Uint8WithinTolerance(const torch::Tensor& ours,
                                                const torch::Tensor& golden) {
  if (ours.sizes() != golden.sizes()) {
    return ::testing::AssertionFailure() << "shape " << ours.sizes() << " vs " << golden.sizes();
  }
  const torch::Tensor diff = (ours.to(torch::kInt32) - golden.to(torch::kInt32)).abs();
  const int64_t max_diff = diff.max().item<int64_t>();
  const int64_t differing = diff.gt(0).sum().item<int64_t>();
  const double fraction = static_cast<double>(differing) / static_cast<double>(diff.numel());
  if (max_diff <= 1 && fraction <= kMaxUint8DifferingFraction) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "max level difference " << max_diff << ", " << differing
                                       << " of " << diff.numel() << " values differ";
}

class Fixture {
 public:
  explicit Fixture(const fs::path& file) {
    auto f = SafetensorsFile::Open(file.string());
    EXPECT_TRUE(f.ok()) << f.status();
    if (f.ok()) file_ = std::move(f).value();
  }
  torch::Tensor Get(const std::string& key) const {
    if (file_ == nullptr) return {};
    auto t = file_->Get(key);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : torch::Tensor();
  }

 private:
  std::shared_ptr<const SafetensorsFile> file_;
};

std::unique_ptr<FluxPipeline> LoadOrDie(const fs::path& folder,
                                        const FluxPipelineLoadOptions& options = {}) {
  auto p = FluxPipeline::FromPretrained(folder.string(), options);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(p).value() : nullptr;
}

std::vector<int64_t> Ids(const torch::Tensor& t) {
  const torch::Tensor flat = t.to(torch::kInt64).contiguous().view(-1);
  return std::vector<int64_t>(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel());
}

// One golden case: its call arguments and recorded tensors, as a request.
struct TextCase {
  std::string name;
  std::string prompt;
  std::string prompt_2;  // == prompt when the case gives none
  bool has_prompt_2 = false;
  nlohmann::json spec;
};

TextCase ReadCase(const std::string& name) {
  TextCase c;
  c.name = name;
  c.spec = ReadJson(TextPipelineDir() / "cases.json")["cases"][name];
  const nlohmann::json& kwargs = c.spec["call_kwargs"];
  c.prompt = kwargs["prompt"].get<std::string>();
  c.has_prompt_2 = kwargs.contains("prompt_2");
  c.prompt_2 = c.has_prompt_2 ? kwargs["prompt_2"].get<std::string>() : c.prompt;
  return c;
}

FluxPipelineRequest GoldenRequest(const TextCase& c, const Fixture& golden) {
  FluxPipelineRequest r;
  r.prompt = {c.prompt};
  if (c.has_prompt_2) r.prompt_2 = {c.prompt_2};
  r.max_sequence_length = golden.Get("text/t5_input_ids").size(1);
  r.latents = golden.Get("inputs/latents_unpacked");
  const torch::Tensor image = golden.Get("final/image");
  r.height = image.size(2);
  r.width = image.size(3);
  r.num_inference_steps = golden.Get("timesteps").numel();
  r.guidance_scale = golden.Get("step/0/guidance_in")[0].item<double>();
  r.png = true;
  return r;
}

// The pipeline shared by the golden cases (loading once keeps the test fast).
FluxPipeline* SharedPipeline() {
  static FluxPipeline* const kPipeline = LoadOrDie(TinyFolder()).release();
  return kPipeline;
}

TEST(FluxPipelineTextDiscoveryTest, FindsCases) {
  EXPECT_FALSE(CaseNames(TextPipelineDir()).empty()) << "no cases in " << TextPipelineDir();
}

TEST(FluxPipelineTextTest, LoadsTheTextComponentsFromTheFolder) {
  FluxPipeline* p = SharedPipeline();
  ASSERT_NE(p, nullptr);
  const nlohmann::json index = ReadJson(TinyFolder() / "model_index.json");
  const PipelineDescription d = p->describe();
  for (const char* key : {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}) {
    EXPECT_EQ(p->not_loaded().count(key), 0u) << key;
    ASSERT_EQ(d.classes.count(key), 1u) << key;
    // The class model_index.json lists (slow tokenizer classes, transformers encoder classes).
    EXPECT_EQ(d.classes.at(key), index[key][1].get<std::string>()) << key;
    EXPECT_EQ(d.sources.at(key), (TinyFolder() / key).string()) << key;
  }
  const PipelineLimits limits = p->limits();
  EXPECT_TRUE(limits.accepts_text_prompt);
  EXPECT_EQ(limits.max_sequence_length_limit, 512);
  EXPECT_EQ(p->components().text_encoder_2->hidden_size(),
            p->transformer_config().joint_attention_dim);
}

class FluxPipelineTextGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FluxPipelineTextGoldenTest, MatchesFluxPipelineFromPrompts) {
  FluxPipeline* pipeline = SharedPipeline();
  ASSERT_NE(pipeline, nullptr);
  const TextCase c = ReadCase(GetParam());
  const Fixture golden(TextPipelineDir() / c.spec["file"].get<std::string>());
  const FluxPipelineRequest request = GoldenRequest(c, golden);
  const FluxPipelineComponents& parts = pipeline->components();

  // Token ids exactly as FluxPipeline's tokenizer calls (padding max_length, truncation).
  const torch::Tensor clip_ids = golden.Get("text/clip_input_ids");
  const torch::Tensor t5_ids = golden.Get("text/t5_input_ids");
  auto clip_tokens = parts.tokenizer->Encode(c.prompt, {clip_ids.size(1), true, true});
  auto t5_tokens = parts.tokenizer_2->Encode(c.prompt_2, {t5_ids.size(1), true, true});
  ASSERT_TRUE(clip_tokens.ok() && t5_tokens.ok()) << clip_tokens.status() << t5_tokens.status();
  EXPECT_EQ(clip_tokens->ids, Ids(clip_ids));
  EXPECT_EQ(t5_tokens->ids, Ids(t5_ids));

  // encode_prompt.
  auto encoded =
      pipeline->EncodePrompt(request.prompt, request.prompt_2, request.max_sequence_length);
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_TRUE(
      WithinTolerance(encoded->pooled_prompt_embeds, golden.Get("text/pooled_prompt_embeds")));
  EXPECT_TRUE(WithinTolerance(encoded->prompt_embeds, golden.Get("text/prompt_embeds")));

  // The whole call, step by step.
  std::map<int, torch::Tensor> steps;
  auto out = pipeline->Generate(
      request, {}, [&](int i, const torch::Tensor& latents) { steps[i] = latents.clone(); });
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(static_cast<int64_t>(steps.size()), golden.Get("timesteps").numel());
  for (const auto& [i, latents] : steps) {
    EXPECT_TRUE(WithinTolerance(latents, golden.Get(absl::StrCat("step/", i, "/latents"))))
        << "step " << i;
  }
  EXPECT_TRUE(WithinTolerance(out->latents, golden.Get("final/latents_unpacked")));
  EXPECT_TRUE(WithinTolerance(out->image, golden.Get("final/image")));
  EXPECT_TRUE(torch::equal(torch::tensor(out->sigmas), golden.Get("sigmas")));
  auto u8 = ImagesToUint8(out->image);
  ASSERT_TRUE(u8.ok()) << u8.status();
  EXPECT_TRUE(Uint8WithinTolerance(*u8, golden.Get("final/image_uint8")));
  ASSERT_EQ(out->png.size(), 1u);

  // Truncation is reported exactly when the untruncated token count exceeds the length: counted
  // here by the tokenizers without truncation or padding.
  auto clip_full = parts.tokenizer->Encode(c.prompt, {parts.tokenizer->model_max_length() * 100,
                                                      /*pad_to_max_length=*/false,
                                                      /*truncate=*/false});
  auto t5_full = parts.tokenizer_2->Encode(c.prompt_2, {100000, false, false});
  ASSERT_TRUE(clip_full.ok() && t5_full.ok());
  std::map<std::string, int64_t> reported;
  for (const auto& t : out->truncated_prompts) {
    reported[t.component] = t.tokens;
    EXPECT_EQ(t.index, 0);
    EXPECT_EQ(t.field, t.component == "tokenizer" || !c.has_prompt_2 ? "prompt" : "prompt_2");
  }
  const bool clip_cut = static_cast<int64_t>(clip_full->ids.size()) > clip_ids.size(1);
  const bool t5_cut = static_cast<int64_t>(t5_full->ids.size()) > t5_ids.size(1);
  EXPECT_EQ(reported.count("tokenizer") == 1, clip_cut);
  EXPECT_EQ(reported.count("tokenizer_2") == 1, t5_cut);
  if (clip_cut) {
    EXPECT_EQ(reported["tokenizer"], static_cast<int64_t>(clip_full->ids.size()));
  }
  if (t5_cut) {
    EXPECT_EQ(reported["tokenizer_2"], static_cast<int64_t>(t5_full->ids.size()));
  }
  EXPECT_EQ(out->warnings.size(), out->truncated_prompts.size());
  if (c.name == "long") {  // the README: "long truncates in both tokenizers"
    EXPECT_TRUE(clip_cut && t5_cut);
  }
  EXPECT_GE(out->encode_seconds, 0.0);
}

INSTANTIATE_TEST_SUITE_P(Cases, FluxPipelineTextGoldenTest,
                         ::testing::ValuesIn(CaseNames(TextPipelineDir())),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxPipelineTextGoldenTest);

FluxPipelineRequest SmallTextRequest(const FluxPipeline& p, std::vector<std::string> prompt) {
  FluxPipelineRequest r;
  r.prompt = std::move(prompt);
  r.height = 2 * p.vae_scale_factor() * 2;
  r.width = 2 * p.vae_scale_factor() * 3;
  r.num_inference_steps = 2;
  r.max_sequence_length = 16;
  r.seed = 99;
  return r;
}

TEST(FluxPipelineTextTest, CacheHitsAreBitIdenticalAndCounted) {
  auto pipeline = LoadOrDie(TinyFolder());
  ASSERT_NE(pipeline, nullptr);
  EXPECT_EQ(pipeline->prompt_cache_stats().capacity_entries,
            PipelineOptions().prompt_cache_entries);
  const FluxPipelineRequest r = SmallTextRequest(*pipeline, {"a photo of a cat"});
  auto first = pipeline->Generate(r);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->prompt_cache_hits, 0);
  EXPECT_EQ(first->prompt_cache_misses, 2);  // CLIP and T5
  auto second = pipeline->Generate(r);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(second->prompt_cache_hits, 2);
  EXPECT_EQ(second->prompt_cache_misses, 0);
  EXPECT_TRUE(torch::equal(first->latents, second->latents));
  EXPECT_TRUE(torch::equal(first->image, second->image));
  PromptCacheStats stats = pipeline->prompt_cache_stats();
  EXPECT_EQ(stats.hits, 2);
  EXPECT_EQ(stats.misses, 2);
  EXPECT_EQ(stats.entries, 2);
  EXPECT_GT(stats.bytes, 0);

  // Another max_sequence_length is another T5 entry (CLIP's is unchanged).
  FluxPipelineRequest longer = r;
  longer.max_sequence_length = 24;
  auto third = pipeline->Generate(longer);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->prompt_cache_hits, 1);
  EXPECT_EQ(third->prompt_cache_misses, 1);

  // Without a cache the encodings are the same bits (each prompt is encoded on its own).
  FluxPipelineLoadOptions no_cache;
  no_cache.pipeline.prompt_cache_entries = 0;
  auto uncached = LoadOrDie(TinyFolder(), no_cache);
  ASSERT_NE(uncached, nullptr);
  auto a = uncached->Generate(r);
  auto b = uncached->Generate(r);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ(b->prompt_cache_hits, 0);
  EXPECT_EQ(uncached->prompt_cache_stats().entries, 0);
  EXPECT_EQ(uncached->prompt_cache_stats().misses, 4);
  EXPECT_TRUE(torch::equal(a->latents, second->latents));
}

TEST(FluxPipelineTextTest, CacheIsBoundedLeastRecentlyUsedFirst) {
  FluxPipelineLoadOptions options;
  options.pipeline.prompt_cache_entries = 2;
  auto pipeline = LoadOrDie(TinyFolder(), options);
  ASSERT_NE(pipeline, nullptr);
  auto encode = [&](const std::string& text) {
    PipelineResult report;
    auto e = pipeline->EncodePrompt({text}, {}, 8, "prompt", &report);
    EXPECT_TRUE(e.ok()) << e.status();
    return report;
  };
  encode("one");  // 2 entries: CLIP "one", T5 "one"
  EXPECT_EQ(pipeline->prompt_cache_stats().entries, 2);
  EXPECT_EQ(encode("one").prompt_cache_hits, 2);
  encode("two");  // evicts both "one" entries
  PromptCacheStats stats = pipeline->prompt_cache_stats();
  EXPECT_EQ(stats.entries, 2);
  EXPECT_EQ(stats.evictions, 2);
  EXPECT_EQ(encode("one").prompt_cache_misses, 2);

  // A byte bound smaller than one entry caches nothing.
  FluxPipelineLoadOptions tiny;
  tiny.pipeline.prompt_cache_max_bytes = 1;
  auto bounded = LoadOrDie(TinyFolder(), tiny);
  ASSERT_NE(bounded, nullptr);
  PipelineResult report;
  ASSERT_TRUE(bounded->EncodePrompt({"one"}, {}, 8, "prompt", &report).ok());
  ASSERT_TRUE(bounded->EncodePrompt({"one"}, {}, 8, "prompt", &report).ok());
  EXPECT_EQ(report.prompt_cache_hits, 0);
  EXPECT_EQ(bounded->prompt_cache_stats().bytes, 0);
}

// Text prompts are exactly their encodings sent as tensors: several prompts, several images per
// prompt, prompt_2, and true CFG with a negative prompt.
TEST(FluxPipelineTextTest, PromptsEqualTheirEmbeddings) {
  FluxPipeline* pipeline = SharedPipeline();
  ASSERT_NE(pipeline, nullptr);
  FluxPipelineRequest text = SmallTextRequest(*pipeline, {"a red house", "", "a dog"});
  text.prompt_2 = {"a blue car", "rain", ""};
  text.num_images_per_prompt = 2;
  text.negative_prompt = {"blurry"};
  text.true_cfg_scale = 2.0;
  auto encoded = pipeline->EncodePrompt(text.prompt, text.prompt_2, text.max_sequence_length);
  auto negative = pipeline->EncodePrompt(text.negative_prompt, {}, text.max_sequence_length);
  ASSERT_TRUE(encoded.ok() && negative.ok()) << encoded.status() << negative.status();
  EXPECT_EQ(encoded->prompt_embeds.sizes(),
            (std::vector<int64_t>{3, text.max_sequence_length,
                                  pipeline->transformer_config().joint_attention_dim}));
  EXPECT_EQ(encoded->pooled_prompt_embeds.sizes(),
            (std::vector<int64_t>{3, pipeline->transformer_config().pooled_projection_dim}));
  // Each prompt's rows equal that prompt encoded alone; prompt_2 reaches only T5.
  auto alone = pipeline->EncodePrompt({"a red house"}, {"a blue car"}, text.max_sequence_length);
  auto clip_same = pipeline->EncodePrompt({"a red house"}, {}, text.max_sequence_length);
  ASSERT_TRUE(alone.ok() && clip_same.ok());
  EXPECT_TRUE(torch::equal(encoded->prompt_embeds[0], alone->prompt_embeds[0]));
  EXPECT_TRUE(torch::equal(encoded->pooled_prompt_embeds[0], clip_same->pooled_prompt_embeds[0]));
  EXPECT_FALSE(torch::equal(alone->prompt_embeds, clip_same->prompt_embeds));

  FluxPipelineRequest tensors = text;
  tensors.prompt.clear();
  tensors.prompt_2.clear();
  tensors.negative_prompt.clear();
  tensors.prompt_embeds = encoded->prompt_embeds;
  tensors.pooled_prompt_embeds = encoded->pooled_prompt_embeds;
  tensors.negative_prompt_embeds = negative->prompt_embeds;
  tensors.negative_pooled_prompt_embeds = negative->pooled_prompt_embeds;
  auto from_text = pipeline->Generate(text);
  auto from_tensors = pipeline->Generate(tensors);
  ASSERT_TRUE(from_text.ok() && from_tensors.ok()) << from_text.status() << from_tensors.status();
  EXPECT_TRUE(from_text->true_cfg_applied);
  EXPECT_EQ(from_text->image.size(0), 6);
  EXPECT_TRUE(torch::equal(from_text->latents, from_tensors->latents));

  // Without true CFG the negative prompt is ignored (not encoded) and a warning says so.
  text.true_cfg_scale = 1.0;
  auto plain = pipeline->Generate(text);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->true_cfg_applied);
  // 3 prompts x (CLIP + T5) looked up; none for the negative prompt.
  EXPECT_EQ(plain->prompt_cache_hits + plain->prompt_cache_misses, 6);
  bool warned = false;
  for (const std::string& w : plain->warnings) warned |= absl::StrContains(w, "negative_prompt");
  EXPECT_TRUE(warned);
}

TEST(FluxPipelineTextTest, RejectsBadTextRequests) {
  FluxPipeline* pipeline = SharedPipeline();
  ASSERT_NE(pipeline, nullptr);
  const FluxPipelineRequest good = SmallTextRequest(*pipeline, {"a cat"});
  auto expect = [&](const FluxPipelineRequest& r, absl::StatusCode code,
                    const std::string& needle) {
    auto out = pipeline->Generate(r);
    EXPECT_EQ(out.status().code(), code) << out.status();
    EXPECT_TRUE(absl::StrContains(out.status().message(), needle))
        << "'" << needle << "' not in: " << out.status();
  };
  const int64_t misses_before = pipeline->prompt_cache_stats().misses;
  FluxPipelineRequest r = good;
  r.prompt_embeds = torch::zeros({4, pipeline->transformer_config().joint_attention_dim});
  r.pooled_prompt_embeds = torch::zeros({pipeline->transformer_config().pooled_projection_dim});
  expect(r, absl::StatusCode::kInvalidArgument, "prompt and prompt_embeds");
  r = good;
  r.max_sequence_length = 0;
  expect(r, absl::StatusCode::kInvalidArgument, "max_sequence_length");
  r.max_sequence_length = pipeline->limits().max_sequence_length_limit + 1;
  expect(r, absl::StatusCode::kInvalidArgument, "max_sequence_length");
  r = good;
  r.prompt_2 = {"x", "y"};
  expect(r, absl::StatusCode::kInvalidArgument, "prompt_2");
  r = good;
  r.prompt.clear();
  r.prompt_2 = {"x"};
  expect(r, absl::StatusCode::kInvalidArgument, "prompt_2");
  r = good;
  r.negative_prompt = {"a"};
  r.negative_prompt_embeds = torch::zeros({4, pipeline->transformer_config().joint_attention_dim});
  expect(r, absl::StatusCode::kInvalidArgument, "negative_prompt and negative_prompt_embeds");
  r = good;
  r.num_images_per_prompt = pipeline->options().max_batch + 1;
  expect(r, absl::StatusCode::kInvalidArgument, "max_batch");
  // Nothing above reached the encoders.
  EXPECT_EQ(pipeline->prompt_cache_stats().misses, misses_before);
  r = good;
  r.negative_prompt = {"a", "b"};
  r.true_cfg_scale = 3;
  expect(r, absl::StatusCode::kInvalidArgument, "negative_prompt has 2");
  r = good;
  r.prompt = {"ok", std::string("bad \xff utf-8")};
  expect(r, absl::StatusCode::kInvalidArgument, "prompt[1]");
  r = good;
  r.prompt.clear();
  expect(r, absl::StatusCode::kInvalidArgument, "prompt or prompt_embeds is required");

  // A pipeline without its text encoders refuses text, naming what is missing.
  FluxPipelineLoadOptions without_text;
  without_text.load_text_encoders = false;
  auto bare = LoadOrDie(TinyFolder(), without_text);
  ASSERT_NE(bare, nullptr);
  EXPECT_FALSE(bare->limits().accepts_text_prompt);
  EXPECT_EQ(bare->not_loaded().count("text_encoder_2"), 1u);
  auto out = bare->Generate(good);
  EXPECT_EQ(out.status().code(), absl::StatusCode::kFailedPrecondition) << out.status();
  EXPECT_TRUE(absl::StrContains(out.status().message(), "text_encoder_2")) << out.status();
}

// Copies flux_tiny to a temporary folder so that a test can break it.
void CopyTiny(const std::string& to) { fs::copy(TinyFolder(), to, fs::copy_options::recursive); }

TEST(FluxPipelineTextTest, FolderErrorsNameTheComponent) {
  {
    ds::test::TempDir dir;
    CopyTiny(dir.File("p"));
    fs::remove_all(dir.File("p/text_encoder_2"));
    auto p = FluxPipeline::FromPretrained(dir.File("p"));
    EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound) << p.status();
    EXPECT_TRUE(absl::StrContains(p.status().message(), "text_encoder_2")) << p.status();
  }
  {
    ds::test::TempDir dir;
    CopyTiny(dir.File("p"));
    fs::remove(dir.File("p/tokenizer/vocab.json"));
    auto p = FluxPipeline::FromPretrained(dir.File("p"));
    EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound) << p.status();
    EXPECT_TRUE(absl::StrContains(p.status().message(), "tokenizer")) << p.status();
  }
  {
    // The T5 tokenizer listed as absent while its encoder is present.
    ds::test::TempDir dir;
    CopyTiny(dir.File("p"));
    nlohmann::json index = ReadJson(dir.File("p/model_index.json"));
    index["tokenizer_2"] = {nullptr, nullptr};
    std::ofstream(dir.File("p/model_index.json")) << index.dump();
    auto p = FluxPipeline::FromPretrained(dir.File("p"));
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << p.status();
    EXPECT_TRUE(absl::StrContains(p.status().message(), "'tokenizer_2'")) << p.status();
  }
}

// The same encoders from single files (plus tokenizer folders), and shared between pipelines,
// encode the same bits as the folder.
TEST(FluxPipelineTextTest, SingleFilesAndSharedComponentsEncodeTheSame) {
  FluxPipeline* folder = SharedPipeline();
  ASSERT_NE(folder, nullptr);
  auto reference = folder->EncodePrompt({"a photo of a cat"}, {}, 12);
  ASSERT_TRUE(reference.ok()) << reference.status();

  const fs::path root = TinyFolder();
  FluxSingleFiles files;
  files.transformer = (root / "transformer" / "diffusion_pytorch_model.safetensors").string();
  files.transformer_config_override = ReadJson(root / "transformer" / "config.json");
  files.text_encoder = (root / "text_encoder" / "model.safetensors").string();
  files.text_encoder_config_override = ReadJson(root / "text_encoder" / "config.json");
  files.tokenizer = (root / "tokenizer").string();
  files.text_encoder_2 = (root / "text_encoder_2" / "model.safetensors").string();
  files.text_encoder_2_config_override = ReadJson(root / "text_encoder_2" / "config.json");
  files.tokenizer_2 = (root / "tokenizer_2").string();
  auto single = FluxPipeline::FromSingleFiles(files);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_TRUE((*single)->limits().accepts_text_prompt);
  EXPECT_EQ((*single)->describe().sources.at("text_encoder_2"), files.text_encoder_2);
  auto from_files = (*single)->EncodePrompt({"a photo of a cat"}, {}, 12);
  ASSERT_TRUE(from_files.ok()) << from_files.status();
  EXPECT_TRUE(torch::equal(from_files->prompt_embeds, reference->prompt_embeds));
  EXPECT_TRUE(torch::equal(from_files->pooled_prompt_embeds, reference->pooled_prompt_embeds));

  FluxPipelineLoadOptions shared;
  shared.transformer = folder->components().transformer;
  shared.text_encoder = folder->components().text_encoder;
  shared.tokenizer = folder->components().tokenizer;
  shared.text_encoder_2 = folder->components().text_encoder_2;
  shared.tokenizer_2 = folder->components().tokenizer_2;
  shared.load_text_encoders = false;  // shared components are used regardless
  auto second = LoadOrDie(root, shared);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(second->components().text_encoder_2.get(), folder->components().text_encoder_2.get());
  EXPECT_EQ(second->describe().sources.at("tokenizer"), "shared");
  auto again = second->EncodePrompt({"a photo of a cat"}, {}, 12);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(torch::equal(again->prompt_embeds, reference->prompt_embeds));
}

}  // namespace
}  // namespace ds::flux
