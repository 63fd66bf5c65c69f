// The trained default's quality (issue 11): images generated for held-out captions are scored by
// the shipped shape classifier and the colour reader; the kohya circles->stars LoRA turns circles
// into stars at weight 1, leaves the other shapes alone, and changes nothing at weight 0.
//
// By default it checks what ships: the embedded flux-tiny recipe written through the demo writer
// (models/flux/demo/ weights) and loaded as any pipeline folder, the LoRA and classifier from
// models/flux/demo/. With DS_FLUX_TINY_EVAL_DIR set it checks a train-flux-tiny output folder
// instead (flux-tiny/, flux-tiny-stars.safetensors, shape-classifier.safetensors), which is how a
// new training run is judged before it is shipped.
#include "tools/train/quality.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "handlers/demo_pipeline.h"
#include "handlers/image.h"
#include "handlers/registry.h"
#include "models/autoencoder_kl/autoencoder_kl.h"
#include "models/flux/pipeline.h"
#include "models/flux/spec.h"
#include "testing/test_util.h"
#include "tools/train/classifier.h"
#include "tools/train/scenes.h"

namespace ds::train {
namespace {

namespace fs = std::filesystem;

struct Shipped {
  std::string pipeline_dir;
  std::unique_ptr<flux::FluxPipeline> pipeline;
  std::unique_ptr<ShapeClassifier> classifier;
  std::string lora;
};

// Loaded once for the whole binary (the tests only read it; adapters are per request).
Shipped& Model() {
  static Shipped* shipped = [] {
    auto* s = new Shipped();
    static test::TempDir tmp;
    const char* eval = std::getenv("DS_FLUX_TINY_EVAL_DIR");
    std::string pipeline_dir, demo_dir;
    if (eval != nullptr && *eval != '\0') {
      pipeline_dir = (fs::path(eval) / "flux-tiny").string();
      demo_dir = eval;
    } else {
      auto files = WriteDemoPipeline(flux::FluxTinyDemo(), tmp.path());
      EXPECT_TRUE(files.ok()) << files.status();
      if (!files.ok()) return s;
      pipeline_dir = files->pipeline_dir;
      demo_dir = DS_FLUX_DEMO_DIR;
    }
    s->pipeline_dir = pipeline_dir;
    auto pipeline = flux::FluxPipeline::FromPretrained(pipeline_dir);
    EXPECT_TRUE(pipeline.ok()) << pipeline.status();
    if (pipeline.ok()) s->pipeline = *std::move(pipeline);
    auto classifier =
        ShapeClassifier::Load((fs::path(demo_dir) / "shape-classifier.safetensors").string());
    EXPECT_TRUE(classifier.ok()) << classifier.status();
    if (classifier.ok()) s->classifier = *std::move(classifier);
    s->lora = (fs::path(demo_dir) / "flux-tiny-stars.safetensors").string();
    if (s->pipeline != nullptr) {
      auto loaded = s->pipeline->transformer_host().Load("stars", s->lora);
      EXPECT_TRUE(loaded.ok()) << loaded.status();
    }
    return s;
  }();
  return *shipped;
}

std::string Describe(const QualityResult& r) {
  return absl::StrFormat("%d images: %.1f%% all right, %.1f%% shape, %.1f%% colours; %.2f s",
                         r.images, 100 * r.accuracy(), 100 * r.shape_accuracy(),
                         100.0 * r.colours_correct / std::max<int64_t>(1, r.images),
                         r.generate_seconds);
}

// With DS_FLUX_TINY_DUMP=<folder>: the scored images as one PNG grid per check (rows of
// images_per_combination), for looking at what the model draws.
void Dump(const QualityResult& r, int64_t per_row, const std::string& name) {
  const char* dir = std::getenv("DS_FLUX_TINY_DUMP");
  if (dir == nullptr || *dir == '\0') return;
  const int64_t n = r.images_rgb.size(0), side = r.images_rgb.size(2);
  const int64_t rows = (n + per_row - 1) / per_row;
  torch::Tensor grid = torch::ones({rows * (side + 2), per_row * (side + 2), 3}, torch::kUInt8) * 128;
  const torch::Tensor hwc =
      (r.images_rgb * 255).round().clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = (i / per_row) * (side + 2), x = (i % per_row) * (side + 2);
    grid.narrow(0, y, side).narrow(1, x, side).copy_(hwc[i]);
  }
  auto png = EncodePng(grid);
  ASSERT_TRUE(png.ok()) << png.status();
  std::ofstream((fs::path(dir) / (name + ".png")).string(), std::ios::binary) << *png;
}

std::vector<Combination> Without(const std::vector<Combination>& all, Shape shape) {
  std::vector<Combination> out;
  for (const Combination& c : all) {
    if (c.shape != shape) out.push_back(c);
  }
  return out;
}

TEST(FluxTinyQualityTest, DrawsHeldOutCaptions) {
  Shipped& m = Model();
  ASSERT_NE(m.pipeline, nullptr);
  ASSERT_NE(m.classifier, nullptr);
  QualityOptions o;
  o.images_per_combination = 4;
  // Diagnostics (not set in the suite): true CFG scale, step count.
  if (const char* cfg = std::getenv("DS_FLUX_TINY_CFG")) o.true_cfg_scale = std::atof(cfg);
  if (const char* steps = std::getenv("DS_FLUX_TINY_STEPS")) o.steps = std::atoi(steps);
  std::vector<Combination> combos = HeldOutCombinations();
  if (std::getenv("DS_FLUX_TINY_TRAINSET") != nullptr) {
    combos = TrainingCombinations();
    combos.resize(30);
  }
  auto r = ScoreCaptions(*m.pipeline, *m.classifier, combos, o);
  ASSERT_TRUE(r.ok()) << r.status();
  std::cout << "held-out captions, base model: " << Describe(*r) << "\n";
  Dump(*r, o.images_per_combination, "base");
  EXPECT_GE(r->accuracy(), 0.9) << Describe(*r);
}

TEST(FluxTinyQualityTest, StarLoraTurnsCirclesIntoStarsAndLeavesTheRest) {
  Shipped& m = Model();
  ASSERT_NE(m.pipeline, nullptr);
  ASSERT_NE(m.classifier, nullptr);
  auto one = m.pipeline->transformer_host().Snapshot({{"stars", 1.0}});
  ASSERT_TRUE(one.ok()) << one.status();
  std::vector<Combination> circles;
  for (const Combination& c : AllCombinations()) {
    if (c.shape == Shape::kCircle) circles.push_back(c);
  }
  QualityOptions o;
  o.images_per_combination = 2;
  o.adapters = *one;
  o.expected = [](const Combination& c) {
    Combination star = c;
    star.shape = Shape::kStar;
    return star;
  };
  auto stars = ScoreCaptions(*m.pipeline, *m.classifier, circles, o);
  ASSERT_TRUE(stars.ok()) << stars.status();
  std::cout << "circle captions with the LoRA at weight 1 (expecting stars): " << Describe(*stars)
            << "\n";
  Dump(*stars, o.images_per_combination, "lora-circles");
  EXPECT_GE(stars->shape_accuracy(), 0.7) << Describe(*stars);

  QualityOptions rest;
  rest.images_per_combination = 4;
  rest.adapters = *one;
  auto others = ScoreCaptions(*m.pipeline, *m.classifier,
                              Without(HeldOutCombinations(), Shape::kCircle), rest);
  ASSERT_TRUE(others.ok()) << others.status();
  std::cout << "other held-out captions with the LoRA at weight 1: " << Describe(*others) << "\n";
  EXPECT_GE(others->accuracy(), 0.9) << Describe(*others);
}

TEST(FluxTinyQualityTest, StarLoraAtWeightZeroIsTheBaseBitForBit) {
  Shipped& m = Model();
  ASSERT_NE(m.pipeline, nullptr);
  ASSERT_NE(m.classifier, nullptr);
  auto zero = m.pipeline->transformer_host().Snapshot({{"stars", 0.0}});
  ASSERT_TRUE(zero.ok()) << zero.status();
  QualityOptions o;
  o.images_per_combination = 2;
  auto base = ScoreCaptions(*m.pipeline, *m.classifier, HeldOutCombinations(), o);
  o.adapters = *zero;
  auto with_zero = ScoreCaptions(*m.pipeline, *m.classifier, HeldOutCombinations(), o);
  ASSERT_TRUE(base.ok() && with_zero.ok()) << base.status() << with_zero.status();
  EXPECT_TRUE(torch::equal(base->images_rgb, with_zero->images_rgb));
}

TEST(FluxTinyQualityTest, TheLoraIsKohyaAndFullyApplied) {
  Shipped& m = Model();
  ASSERT_NE(m.pipeline, nullptr);
  auto again = m.pipeline->transformer_host().Load("stars-check", m.lora);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->report.format, "kohya");
  EXPECT_TRUE(again->report.unmatched.empty()) << again->report.ToString();
  // Every block linear but the modulations, fused qkv / linear1 split into their targets.
  const flux::FluxConfig& cfg = m.pipeline->transformer_config();
  EXPECT_EQ(again->report.modules.size(),
            static_cast<size_t>(cfg.num_layers * 12 + cfg.num_single_layers * 5));
  EXPECT_TRUE(m.pipeline->transformer_host().Unload("stars-check").ok());
}

// The VAE alone: renders of every combination, encoded and decoded, still read right (what the
// transformer's latents can at best become).
TEST(FluxTinyQualityTest, VaeReconstructionsReadRight) {
  Shipped& m = Model();
  ASSERT_NE(m.classifier, nullptr);
  auto vae = LoadModelFromFolder(m.pipeline_dir + "/vae", ModelOptions{});
  ASSERT_TRUE(vae.ok()) << vae.status();
  auto& ae = *dynamic_cast<autoencoder_kl::AutoencoderKLModel&>(**vae).autoencoder();
  const std::vector<Combination> all = AllCombinations();
  int64_t right = 0, shape_right = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    auto scene = SampleScene({all[i]}, 5, static_cast<int64_t>(i), 32);
    ASSERT_TRUE(scene.ok());
    auto rgb = RenderScene(*scene, 32);
    ASSERT_TRUE(rgb.ok());
    const torch::Tensor x =
        torch::from_blob(rgb->data(), {1, 32, 32, 3}, torch::kUInt8).to(torch::kFloat).permute({0, 3, 1, 2}) / 127.5 - 1;
    const torch::Tensor y = ae.decode(ae.encode(x).mean);
    const torch::Tensor back = ((y + 1) * 127.5).round().clamp(0, 255).to(torch::kUInt8).permute({0, 2, 3, 1}).contiguous();
    auto reading = m.classifier->Read(back.data_ptr<uint8_t>(), 32);
    ASSERT_TRUE(reading.ok()) << reading.status();
    shape_right += reading->shape == all[i].shape;
    right += reading->shape == all[i].shape && reading->colours.foreground == all[i].colour &&
             reading->colours.background == all[i].background;
  }
  std::cout << "VAE reconstructions: " << right << "/" << all.size() << " all right, " << shape_right
            << " shape right\n";
  EXPECT_GE(right, static_cast<int64_t>(0.95 * all.size()));
}

// The recipe's caption vocabulary (models/flux) is the renderer's (tools/train).
TEST(FluxTinyRecipeTest, VocabularyIsTheScenes) {
  ASSERT_EQ(flux::FluxTinyShapes().size(), kShapes.size());
  for (size_t i = 0; i < kShapes.size(); ++i) {
    EXPECT_EQ(flux::FluxTinyShapes()[i], ShapeName(kShapes[i]));
  }
  ASSERT_EQ(flux::FluxTinyColours().size(), kColours.size());
  for (size_t i = 0; i < kColours.size(); ++i) {
    EXPECT_EQ(flux::FluxTinyColours()[i], ColourName(kColours[i]));
  }
  for (const Combination& c : AllCombinations()) {
    EXPECT_EQ(Caption(c), flux::FluxTinyCaption(ColourName(c.colour), ShapeName(c.shape),
                                                ColourName(c.background)));
  }
  const DemoPipelineRecipe recipe = flux::FluxTinyDemo();
  for (const std::string& word : recipe.vocabulary) {
    EXPECT_NE(recipe.tokenizers[0].corpus.find(word), std::string::npos) << word;
  }
}

// The tokenizer files generated from the recipe's corpus (what the server writes) are the shipped
// ones the weights were trained with, byte for byte.
TEST(FluxTinyRecipeTest, GeneratedTokenizersAreTheShippedOnes) {
  test::TempDir tmp;
  auto files = WriteDemoPipeline(flux::FluxTinyDemo(), tmp.path());
  ASSERT_TRUE(files.ok()) << files.status();
  const fs::path shipped = fs::path(DS_FLUX_DEMO_DIR) / "flux-tiny";
  int compared = 0;
  for (const char* folder : {"tokenizer", "tokenizer_2"}) {
    for (const auto& entry : fs::directory_iterator(shipped / folder)) {
      const fs::path generated = fs::path(files->pipeline_dir) / folder / entry.path().filename();
      std::ifstream a(entry.path(), std::ios::binary), b(generated, std::ios::binary);
      const std::string x((std::istreambuf_iterator<char>(a)), {});
      const std::string y((std::istreambuf_iterator<char>(b)), {});
      EXPECT_EQ(x, y) << entry.path() << " differs from the generated " << generated;
      ++compared;
    }
  }
  EXPECT_GE(compared, 6);
}

}  // namespace
}  // namespace ds::train
