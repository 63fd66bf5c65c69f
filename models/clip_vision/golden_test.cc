// Reproduces transformers' CLIPVisionModelWithProjection on the fixtures under
// $DS_GOLDEN_DIR/conditioning/clip_vision/ (see ../shared/golden/README.md): image_embeds,
// last_hidden_state, pooler_output and every hidden state within |a - b| <= 1e-4 + 1e-4·|b|,
// loaded through the registry from the transformers folder, and end to end from image.png through
// the CLIP preprocessing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <iostream>
#include <string>

#include "handlers/image_encoder.h"
#include "handlers/image_processing.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "models/clip_vision/clip_vision.h"
#include "testing/test_util.h"

namespace ds::clip_vision {
namespace {

namespace fs = std::filesystem;

fs::path Dir() { return fs::path(test::GoldenDir()) / "conditioning" / "clip_vision"; }

torch::Tensor Golden(const std::string& key) {
  auto f = SafetensorsFile::Open((Dir() / "io.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto t = (*f)->Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

// The README's float tolerance: |ours - golden| <= 1e-4 + 1e-4·|golden| everywhere.
void ExpectClose(const torch::Tensor& ours, const torch::Tensor& golden, const std::string& what) {
  ASSERT_TRUE(ours.defined()) << what;
  ASSERT_EQ(ours.sizes(), golden.sizes()) << what;
  const torch::Tensor a = ours.to(torch::kCPU).to(torch::kDouble);
  const torch::Tensor b = golden.to(torch::kDouble);
  const torch::Tensor excess = (a - b).abs() - (1e-4 + 1e-4 * b.abs());
  EXPECT_LE(excess.max().item<double>(), 0.0)
      << what << ": max |diff| " << (a - b).abs().max().item<double>();
  std::cout << what << ": max |ours - golden| = " << (a - b).abs().max().item<double>() << "\n";
}

TEST(ClipVisionGoldenTest, OutputsMatchThroughTheRegistry) {
  auto loaded = LoadModelFromFolder((Dir() / "clip_vision_encoder").string(), ModelOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->class_name(), kClipVisionClassName);
  auto* model = dynamic_cast<ClipVisionModel*>(loaded->get());
  ASSERT_NE(model, nullptr);
  auto out = model->Encode(Golden("pre32/pixel_values"), /*output_hidden_states=*/true);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectClose(out->image_embeds, Golden("vision/image_embeds"), "image_embeds");
  ExpectClose(out->last_hidden_state, Golden("vision/last_hidden_state"), "last_hidden_state");
  ExpectClose(out->pooler_output, Golden("vision/pooler_output"), "pooler_output");
  ASSERT_EQ(out->hidden_states.size(),
            static_cast<size_t>(model->vision_config().num_hidden_layers + 1));
  for (size_t i = 0; i < out->hidden_states.size(); ++i) {
    const std::string key = "vision/hidden_states." + std::to_string(i);
    ExpectClose(out->hidden_states[i], Golden(key), key);
  }
  // The generic forward returns image_embeds.
  auto fwd = (*loaded)->Forward({{"pixel_values", Golden("pre32/pixel_values")}});
  ASSERT_TRUE(fwd.ok()) << fwd.status();
  ExpectClose(*fwd, Golden("vision/image_embeds"), "Forward");
}

TEST(ClipVisionGoldenTest, ImagePngToImageEmbedsAsAPipelineDoesIt) {
  auto loaded = LoadModelFromFolder((Dir() / "clip_vision_encoder").string(), ModelOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const auto* encoder = dynamic_cast<const ImageEncoder*>(loaded->get());
  ASSERT_NE(encoder, nullptr);
  EXPECT_EQ(encoder->image_size(), 32);
  auto rgb = DecodeImageToRgb(test::ReadFileBytes((Dir() / "image.png").string()));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  // diffusers' load_ip_adapter: CLIPImageProcessor(size=image_size, crop_size=image_size).
  auto pixels =
      ClipPixelValues(*rgb, ClipImageProcessorConfig::ForImageSize(encoder->image_size()));
  ASSERT_TRUE(pixels.ok()) << pixels.status();
  auto embeds = encoder->EncodeImages(*pixels);
  ASSERT_TRUE(embeds.ok()) << embeds.status();
  ExpectClose(*embeds, Golden("vision/image_embeds"), "image_embeds from image.png");
}

TEST(ClipVisionGoldenTest, DirectLoaderTakesARootWithAnImageEncoderSubfolder) {
  // As an IP-Adapter repository or a pipeline folder holds it: <root>/image_encoder/.
  test::TempDir root;
  const fs::path sub = fs::path(root.path()) / "image_encoder";
  fs::create_directories(sub);
  for (const char* f : {"config.json", "model.safetensors"}) {
    fs::copy_file(Dir() / "clip_vision_encoder" / f, sub / f);
  }
  auto model = LoadClipVisionModel(root.path());
  ASSERT_TRUE(model.ok()) << model.status();
  auto embeds = (*model)->EncodeImages(Golden("pre32/pixel_values"));
  ASSERT_TRUE(embeds.ok());
  ExpectClose(*embeds, Golden("vision/image_embeds"), "image_embeds");
  EXPECT_EQ(LoadClipVisionModel(root.File("missing")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ds::clip_vision
