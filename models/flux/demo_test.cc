// The flux-tiny demo pipeline (models/flux/spec.cc's recipe, written by handlers/demo_pipeline):
// real files that the real loaders read, the diffusers folder and the BFL single files giving the
// same pipeline, text prompts through the generated tokenizers and tiny text encoders, idempotent
// reuse, rewriting of modified copies, and recipe errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "handlers/demo_pipeline.h"
#include "handlers/image.h"
#include "handlers/pipeline.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/tokenizers/tokenizer.h"
#include "models/flux/pipeline.h"
#include "models/flux/spec.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using ::ds::test::TempDir;

PipelineRequest Request(const DiffusionPipeline& p, uint64_t seed) {
  const PipelineLimits l = p.limits();
  PipelineRequest r;
  torch::manual_seed(7);
  r.prompt_embeds = torch::randn({6, l.prompt_embeds_dim});
  r.pooled_prompt_embeds = torch::randn({l.pooled_prompt_embeds_dim});
  r.height = 2 * l.image_size_multiple;
  r.width = 3 * l.image_size_multiple;
  r.num_inference_steps = 2;
  r.seed = seed;
  r.png = true;
  return r;
}

TEST(FluxTinyDemoTest, IsRegisteredWithTheFluxPipeline) {
  auto demo = PipelineRegistry::Global().FindDemo("flux-tiny");
  ASSERT_TRUE(demo.ok()) << demo.status();
  EXPECT_EQ((*demo)->pipeline_class, "FluxPipeline");
  EXPECT_EQ(DemoRecipeJson(**demo), DemoRecipeJson(FluxTinyDemo()));
  auto missing = PipelineRegistry::Global().FindDemo("flux-huge");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "flux-tiny")) << missing.status();
}

TEST(FluxTinyDemoTest, FolderAndSingleFilesLoadThroughTheRealLoaders) {
  TempDir tmp;
  auto files = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
  ASSERT_TRUE(files.ok()) << files.status();
  EXPECT_TRUE(files->written);
  EXPECT_TRUE(IsPipelineFolder(files->pipeline_dir));
  ASSERT_EQ(files->single_files.size(), 2u);

  // The diffusers folder through the registry, as the server loads it.
  auto folder = LoadPipelineFromFolder(files->pipeline_dir, {});
  ASSERT_TRUE(folder.ok()) << folder.status();
  const PipelineLimits limits = (*folder)->limits();
  // The example request tensors fit the pipeline and run as they are.
  auto examples = LoadSafetensorsWeights(files->example_inputs);
  ASSERT_TRUE(examples.ok()) << examples.status();
  EXPECT_EQ(examples->at("prompt_embeds").size(-1), limits.prompt_embeds_dim);
  EXPECT_EQ(examples->at("pooled_prompt_embeds").size(-1), limits.pooled_prompt_embeds_dim);
  {
    PipelineRequest r;
    r.prompt_embeds = examples->at("prompt_embeds");
    r.pooled_prompt_embeds = examples->at("pooled_prompt_embeds");
    r.height = r.width = limits.image_size_multiple;
    r.num_inference_steps = 1;
    r.seed = 1;
    auto run = (*folder)->Generate(r);
    ASSERT_TRUE(run.ok()) << run.status();
  }
  EXPECT_TRUE(limits.can_decode);
  EXPECT_TRUE(limits.guidance_embeds);
  EXPECT_EQ(limits.latent_channels, 4);
  EXPECT_EQ((*folder)->describe().not_loaded.count("image_encoder"), 0u)
      << "absent components are [null, null] entries, not unloaded ones";

  // The single files are in the original (BFL / LDM) naming, not diffusers'.
  auto transformer_file = SafetensorsFile::Open(files->single_files.at("transformer"));
  ASSERT_TRUE(transformer_file.ok()) << transformer_file.status();
  EXPECT_TRUE((*transformer_file)->contains("double_blocks.0.img_attn.qkv.weight"));
  auto vae_file = SafetensorsFile::Open(files->single_files.at("vae"));
  ASSERT_TRUE(vae_file.ok()) << vae_file.status();
  EXPECT_TRUE((*vae_file)->contains("decoder.mid.attn_1.q.weight"));

  FluxSingleFiles single;
  single.transformer = files->single_files.at("transformer");
  const nlohmann::json recipe_transformer = FluxTinyDemo().components[0].config;
  const nlohmann::json recipe_vae = FluxTinyDemo().components[1].config;
  single.transformer_config_override = {{"axes_dims_rope", recipe_transformer["axes_dims_rope"]}};
  single.vae = files->single_files.at("vae");
  single.vae_config_override = {{"norm_num_groups", recipe_vae["norm_num_groups"]},
                                {"scaling_factor", recipe_vae["scaling_factor"]},
                                {"shift_factor", recipe_vae["shift_factor"]}};
  single.scheduler_config = files->pipeline_dir + "/scheduler";
  auto from_single = FluxPipeline::FromSingleFiles(single);
  ASSERT_TRUE(from_single.ok()) << from_single.status();

  const PipelineRequest r = Request(**folder, 11);
  auto a = (*folder)->Generate(r);
  auto b = (*from_single)->Generate(r);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << " / " << b.status();
  EXPECT_TRUE(torch::equal(a->latents, b->latents));
  ASSERT_EQ(a->png.size(), 1u);
  EXPECT_EQ(a->png, b->png);
  auto decoded = DecodePng(a->png[0]);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->sizes(), (std::vector<int64_t>{r.height, r.width, 3}));
  // Random weights still give an image with structure, not a constant.
  EXPECT_GT(a->image.std().item<double>(), 0.01);

  // Same seed, same bytes; another seed, other bytes.
  auto again = (*folder)->Generate(r);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->png, a->png);
  auto other = (*folder)->Generate(Request(**folder, 12));
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->png, a->png);
}

PipelineRequest TextRequest(const DiffusionPipeline& p, const std::string& prompt) {
  const PipelineLimits l = p.limits();
  PipelineRequest r;
  r.prompt = {prompt};
  r.max_sequence_length = 32;
  r.height = 2 * l.image_size_multiple;
  r.width = 2 * l.image_size_multiple;
  r.num_inference_steps = 2;
  r.seed = 3;
  r.png = true;
  return r;
}

TEST(FluxTinyDemoTest, TextPromptsRunThroughTheGeneratedTokenizersAndEncoders) {
  TempDir tmp;
  const auto start = std::chrono::steady_clock::now();
  auto files = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
  const double write_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(files.ok()) << files.status();
  // The server writes the demo at start-up.
  EXPECT_LT(write_seconds, 5.0);
  std::cout << "flux-tiny written in " << write_seconds << " s\n";

  auto loaded = LoadPipelineFromFolder(files->pipeline_dir, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const DiffusionPipeline& pipeline = **loaded;
  EXPECT_TRUE(pipeline.limits().accepts_text_prompt);
  const PipelineDescription d = pipeline.describe();
  EXPECT_EQ(d.classes.at("text_encoder"), "CLIPTextModel");
  EXPECT_EQ(d.classes.at("text_encoder_2"), "T5EncoderModel");
  EXPECT_TRUE(d.not_loaded.empty());

  // The tokenizers fit their encoders: every id has an embedding row, the CLIP specials are the
  // encoder's bos/eos.
  auto clip = tokenizers::LoadTokenizerFromFolder(files->pipeline_dir + "/tokenizer");
  auto t5 = tokenizers::LoadTokenizerFromFolder(files->pipeline_dir + "/tokenizer_2");
  ASSERT_TRUE(clip.ok() && t5.ok()) << clip.status() << " / " << t5.status();
  auto clip_weights = LoadSafetensorsWeights(files->pipeline_dir + "/text_encoder/model.safetensors");
  auto t5_weights = LoadSafetensorsWeights(files->pipeline_dir + "/text_encoder_2/model.safetensors");
  ASSERT_TRUE(clip_weights.ok() && t5_weights.ok());
  EXPECT_EQ(clip_weights->at("text_model.embeddings.token_embedding.weight").size(0),
            (*clip)->vocab_size());
  EXPECT_EQ(t5_weights->at("shared.weight").size(0), (*t5)->vocab_size());
  const nlohmann::json clip_config = FluxTinyDemo().components[2].config;
  EXPECT_EQ(clip_config["bos_token_id"], (*clip)->bos_token_id());
  EXPECT_EQ(clip_config["eos_token_id"], (*clip)->eos_token_id());

  auto cat = pipeline.Generate(TextRequest(pipeline, "a red circle"));
  ASSERT_TRUE(cat.ok()) << cat.status();
  ASSERT_EQ(cat->png.size(), 1u);
  EXPECT_TRUE(torch::isfinite(cat->image).all().item<bool>());
  EXPECT_TRUE(cat->truncated_prompts.empty());
  // The same prompt again: the same image (the encoded prompt now comes from the cache).
  auto again = pipeline.Generate(TextRequest(pipeline, "a red circle"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->png, cat->png);
  EXPECT_TRUE(torch::equal(again->latents, cat->latents));
  EXPECT_GT(again->prompt_cache_hits, 0);
  // Another prompt conditions the transformer differently.
  auto dog = pipeline.Generate(TextRequest(pipeline, "a green star"));
  ASSERT_TRUE(dog.ok()) << dog.status();
  EXPECT_NE(dog->png, cat->png);
  EXPECT_FALSE(torch::equal(dog->latents, cat->latents));
  // The text path equals the embeddings path with the pipeline's own encoding.
  auto encoding = pipeline.EncodePrompt({"a red circle"}, {}, 32);
  ASSERT_TRUE(encoding.ok()) << encoding.status();
  // T5 pads to at most its tokenizer's model_max_length (16 here), even when asked for 32.
  EXPECT_EQ(encoding->prompt_embeds.size(-2), (*t5)->model_max_length());
  EXPECT_EQ((*t5)->model_max_length(), 16);
  PipelineRequest embeds = TextRequest(pipeline, "");
  embeds.prompt.clear();
  embeds.prompt_embeds = encoding->prompt_embeds;
  embeds.pooled_prompt_embeds = encoding->pooled_prompt_embeds;
  auto from_embeds = pipeline.Generate(embeds);
  ASSERT_TRUE(from_embeds.ok()) << from_embeds.status();
  EXPECT_TRUE(torch::equal(from_embeds->latents, cat->latents));

  // A prompt past the tokenizers' limits (16 tokens each for this demo) is truncated, and the
  // result says so.
  std::string long_prompt;
  for (int i = 0; i < 40; ++i) long_prompt += "a golden retriever puppy playing on the grass, ";
  auto truncated = pipeline.Generate(TextRequest(pipeline, long_prompt));
  ASSERT_TRUE(truncated.ok()) << truncated.status();
  ASSERT_EQ(truncated->truncated_prompts.size(), 2u);
  std::set<std::string> components;
  for (const auto& t : truncated->truncated_prompts) {
    components.insert(t.component);
    EXPECT_EQ(t.field, "prompt");
    EXPECT_GT(t.tokens, t.max_length);
  }
  EXPECT_EQ(components, (std::set<std::string>{"tokenizer", "tokenizer_2"}));
  EXPECT_FALSE(truncated->warnings.empty());
  EXPECT_TRUE(torch::isfinite(truncated->image).all().item<bool>());
}

TEST(FluxTinyDemoTest, ReusesAVerifiedCopyAndRewritesAModifiedOne) {
  TempDir tmp;
  auto first = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string weights = first->pipeline_dir + "/transformer/diffusion_pytorch_model.safetensors";
  auto original = LoadSafetensorsWeights(weights);
  ASSERT_TRUE(original.ok());
  const torch::Tensor before = original->at("proj_out.weight").clone();

  auto second = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_FALSE(second->written);

  // Flip one byte at the end of the weights: the copy no longer verifies and is rewritten.
  {
    std::fstream f(weights, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-1, std::ios::end);
    char c = 0;
    f.get(c);
    f.seekp(-1, std::ios::end);
    f.put(static_cast<char>(c ^ 0x5a));
  }
  auto third = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_TRUE(third->written);
  auto rewritten = LoadSafetensorsWeights(weights);
  ASSERT_TRUE(rewritten.ok());
  EXPECT_TRUE(torch::equal(rewritten->at("proj_out.weight"), before)) << "deterministic weights";

  // Another recipe under the same name replaces the copy (here the architecture with random
  // weights instead of the trained ones).
  DemoPipelineRecipe reseeded = FluxTinyDemoArchitecture();
  auto fourth = WriteDemoPipeline(reseeded, tmp.path());
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  EXPECT_TRUE(fourth->written);
  auto reseeded_weights = LoadSafetensorsWeights(weights);
  ASSERT_TRUE(reseeded_weights.ok());
  EXPECT_FALSE(torch::equal(reseeded_weights->at("proj_out.weight"), before));
}

TEST(FluxTinyDemoTest, ConcurrentWritersNeverSeeAPartialFolder) {
  TempDir tmp;
  std::vector<std::thread> threads;
  std::vector<absl::Status> results(3);
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back([&, i] {
      auto files = WriteDemoPipeline(FluxTinyDemo(), tmp.path());
      results[i] = files.status();
      if (files.ok()) {
        auto loaded = LoadPipelineFromFolder(files->pipeline_dir, {});
        results[i] = loaded.status();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const absl::Status& s : results) EXPECT_TRUE(s.ok()) << s;
  // Only the final folder, the lock file and no temporary folders remain.
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp.path())) names.push_back(e.path().filename());
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("flux-tiny", ".flux-tiny.lock"));
}

TEST(FluxTinyDemoTest, BadRecipesAndRootsAreRefused) {
  TempDir tmp;
  DemoPipelineRecipe r = FluxTinyDemo();
  r.name = "../escape";
  EXPECT_EQ(WriteDemoPipeline(r, tmp.path()).status().code(), absl::StatusCode::kInvalidArgument);

  r = FluxTinyDemo();
  r.components[1].class_name = "NoSuchAutoencoder";
  auto unknown = WriteDemoPipeline(r, tmp.path());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(unknown.status().message(), "NoSuchAutoencoder"))
      << unknown.status();
  EXPECT_FALSE(fs::exists(tmp.File("flux-tiny"))) << "nothing left behind";

  r = FluxTinyDemo();
  r.components[0].config["num_attention_heads"] = -2;
  auto bad_config = WriteDemoPipeline(r, tmp.path());
  EXPECT_FALSE(bad_config.ok());
  EXPECT_TRUE(absl::StrContains(bad_config.status().message(), "transformer")) << bad_config.status();

  r = FluxTinyDemo();
  r.components.push_back(r.components[0]);
  EXPECT_EQ(WriteDemoPipeline(r, tmp.path()).status().code(), absl::StatusCode::kInvalidArgument);

  // A root below a regular file cannot be created.
  { std::ofstream(tmp.File("file")) << "x"; }
  auto blocked = WriteDemoPipeline(FluxTinyDemo(), tmp.File("file") + "/root");
  EXPECT_FALSE(blocked.ok());
  EXPECT_TRUE(absl::StrContains(blocked.status().message(), tmp.File("file"))) << blocked.status();
}

TEST(FluxTinyDemoTest, RandomConvolutionWeightsKeepActivationsBounded) {
  // InitRandomWeights scales kernels by their fan-in (in x k x k), so the random VAE decodes to
  // values of order one instead of saturating every pixel (the architecture recipe: random
  // weights).
  TempDir tmp;
  auto files = WriteDemoPipeline(FluxTinyDemoArchitecture(), tmp.path());
  ASSERT_TRUE(files.ok()) << files.status();
  auto weights = LoadSafetensorsWeights(files->pipeline_dir + "/vae/diffusion_pytorch_model.safetensors");
  ASSERT_TRUE(weights.ok());
  const torch::Tensor conv = weights->at("decoder.conv_in.weight");
  ASSERT_EQ(conv.dim(), 4);
  const double bound = 1.0 / std::sqrt(static_cast<double>(conv.numel() / conv.size(0)));
  EXPECT_LE(conv.abs().max().item<double>(), bound);
  EXPECT_GT(conv.abs().max().item<double>(), 0.5 * bound);
}

}  // namespace
}  // namespace ds::flux
