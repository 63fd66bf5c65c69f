// CLIPVisionModelWithProjection on configs other than the golden one: config parsing and
// validation, the state-dict layout, forward properties, registry loading of a transformers folder
// (with keys transformers ignores), and bad input.
#include "models/clip_vision/clip_vision.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <set>

#include "handlers/image_encoder.h"
#include "handlers/lora_context.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/clip_vision/spec.h"
#include "testing/test_util.h"

namespace ds::clip_vision {
namespace {

using ::testing::HasSubstr;

// Not the golden shape: 3 heads of 8, 12x12 images in 4x4 patches, exact GELU, 3 layers.
nlohmann::json SmallConfig() {
  return {{"model_type", "clip_vision_model"},
          {"architectures", {"CLIPVisionModelWithProjection"}},
          {"hidden_size", 24},
          {"intermediate_size", 20},
          {"projection_dim", 10},
          {"num_hidden_layers", 3},
          {"num_attention_heads", 3},
          {"num_channels", 3},
          {"image_size", 12},
          {"patch_size", 4},
          {"hidden_act", "gelu"},
          {"layer_norm_eps", 1e-5},
          {"attention_dropout", 0.0}};
}

std::unique_ptr<ClipVisionModel> RandomModel(const nlohmann::json& config = SmallConfig(),
                                             torch::Dtype dtype = torch::kFloat32) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = ClipVisionModel::Create(config, options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), 7);
  return std::move(model).value();
}

torch::Tensor Pixels(int64_t batch, int64_t size, int seed = 3) {
  torch::manual_seed(seed);
  return torch::randn({batch, 3, size, size});
}

TEST(ClipVisionConfigTest, DefaultsAreTransformers) {
  auto c = ClipVisionConfig::FromJson(nlohmann::json::object());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 768);
  EXPECT_EQ(c->projection_dim, 512);
  EXPECT_EQ(c->patch_size, 32);
  EXPECT_EQ(c->num_positions(), 50);
  EXPECT_EQ(c->hidden_act, "quick_gelu");
  auto round = ClipVisionConfig::FromJson(c->ToJson());
  ASSERT_TRUE(round.ok());
  EXPECT_EQ(round->ToJson(), c->ToJson());
}

TEST(ClipVisionConfigTest, FullClipConfigUsesItsVisionConfig) {
  nlohmann::json full = {{"model_type", "clip"},
                         {"projection_dim", 99},
                         {"text_config", {{"hidden_size", 5}}},
                         {"vision_config", SmallConfig()}};
  full["vision_config"].erase("model_type");
  full["vision_config"].erase("architectures");
  auto c = ClipVisionConfig::FromJson(full);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 24);
  EXPECT_EQ(c->projection_dim, 10);
}

TEST(ClipVisionConfigTest, BadFieldsAreNamed) {
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"num_attention_heads", {{"num_attention_heads", 5}}},
      {"patch_size", {{"patch_size", 5}}},
      {"hidden_act", {{"hidden_act", "mish"}}},
      {"hidden_size", {{"hidden_size", "big"}}},
      {"layer_norm_eps", {{"layer_norm_eps", 0}}},
      {"model_type", {{"model_type", "siglip_vision_model"}}},
      {"architectures", {{"architectures", {"CLIPVisionModel"}}}},
      {"vision_config", {{"model_type", "clip"}}},
  };
  for (const auto& [field, patch] : cases) {
    nlohmann::json j = SmallConfig();
    j.merge_patch(patch);
    auto c = ClipVisionConfig::FromJson(j);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(field));
  }
}

TEST(ClipVisionModelTest, ParametersAreTheTransformersLayout) {
  auto model = RandomModel();
  ASSERT_NE(model, nullptr);
  const TensorMap named = NamedTensors(model->module());
  const auto expected = ClipVisionParameters(model->vision_config());
  ASSERT_EQ(named.size(), expected.size());
  for (const auto& [name, shape] : expected) {
    auto it = named.find(name);
    ASSERT_NE(it, named.end()) << name;
    EXPECT_EQ(it->second.sizes().vec(), shape) << name;
  }
  EXPECT_TRUE(named.count("vision_model.pre_layrnorm.weight"));  // transformers' spelling
}

TEST(ClipVisionModelTest, OutputsAreConsistent) {
  auto model = RandomModel();
  ASSERT_NE(model, nullptr);
  const ClipVisionConfig& cfg = model->vision_config();
  const torch::Tensor x = Pixels(2, 12);
  auto out = model->Encode(x, /*output_hidden_states=*/true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->image_embeds.sizes(), (std::vector<int64_t>{2, 10}));
  EXPECT_EQ(out->last_hidden_state.sizes(), (std::vector<int64_t>{2, 10, 24}));
  ASSERT_EQ(out->hidden_states.size(), 4u);
  EXPECT_TRUE(torch::equal(out->hidden_states.back(), out->last_hidden_state));
  const TensorMap p = NamedTensors(model->module());
  // pooler = post_layernorm(class token); image_embeds = pooler · Wᵀ (no bias).
  const torch::Tensor pooled = torch::layer_norm(
      out->last_hidden_state.select(1, 0), {24}, p.at("vision_model.post_layernorm.weight"),
      p.at("vision_model.post_layernorm.bias"), cfg.layer_norm_eps);
  EXPECT_TRUE(torch::allclose(out->pooler_output, pooled, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(
      out->image_embeds, torch::matmul(pooled, p.at("visual_projection.weight").t()), 1e-5, 1e-6));
  // hidden_states[0] = pre_layrnorm(class/patch embeddings + positions): per-token mean 0 before
  // the affine scale, so check it against a direct computation of the embeddings.
  const torch::Tensor patches =
      torch::conv2d(x, p.at("vision_model.embeddings.patch_embedding.weight"), {}, 4)
          .flatten(2)
          .transpose(1, 2);
  const torch::Tensor cls =
      p.at("vision_model.embeddings.class_embedding").view({1, 1, 24}).expand({2, 1, 24});
  const torch::Tensor emb =
      torch::cat({cls, patches}, 1) + p.at("vision_model.embeddings.position_embedding.weight");
  const torch::Tensor h0 =
      torch::layer_norm(emb, {24}, p.at("vision_model.pre_layrnorm.weight"),
                        p.at("vision_model.pre_layrnorm.bias"), cfg.layer_norm_eps);
  EXPECT_TRUE(torch::allclose(out->hidden_states[0], h0, 1e-5, 1e-6));
  // Images are independent: batch of two = each alone.
  for (int64_t i = 0; i < 2; ++i) {
    auto one = model->EncodeImages(x.narrow(0, i, 1));
    ASSERT_TRUE(one.ok());
    EXPECT_TRUE(torch::allclose(*one, out->image_embeds.narrow(0, i, 1), 1e-5, 1e-6));
  }
}

TEST(ClipVisionModelTest, EveryActivationRuns) {
  for (const char* act : {"quick_gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"}) {
    nlohmann::json cfg = SmallConfig();
    cfg["hidden_act"] = act;
    auto model = RandomModel(cfg);
    ASSERT_NE(model, nullptr) << act;
    auto out = model->EncodeImages(Pixels(1, 12));
    ASSERT_TRUE(out.ok()) << act << ": " << out.status();
    EXPECT_TRUE(torch::isfinite(*out).all().item<bool>()) << act;
  }
}

TEST(ClipVisionModelTest, BFloat16IsCloseToFloat32) {
  auto f32 = RandomModel();
  auto bf16 = RandomModel(SmallConfig(), torch::kBFloat16);
  ASSERT_NE(f32, nullptr);
  ASSERT_NE(bf16, nullptr);
  const torch::Tensor x = Pixels(1, 12);
  auto a = f32->EncodeImages(x);
  auto b = bf16->EncodeImages(x);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->scalar_type(), torch::kBFloat16);
  const double scale = a->abs().max().item<double>();
  EXPECT_LT((b->to(torch::kFloat) - *a).abs().max().item<double>(), 0.05 * scale + 0.05);
}

TEST(ClipVisionModelTest, BadInputIsNamed) {
  auto model = RandomModel();
  ASSERT_NE(model, nullptr);
  auto wrong_size = model->EncodeImages(Pixels(1, 16));
  EXPECT_EQ(wrong_size.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong_size.status().message()), HasSubstr("[1, 3, 16, 16]"));
  EXPECT_THAT(std::string(wrong_size.status().message()), HasSubstr("pixel_values"));
  EXPECT_EQ(model->EncodeImages(torch::zeros({1, 3, 12, 12}, torch::kUInt8)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model->EncodeImages(torch::zeros({3, 12, 12})).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto unknown = model->Forward({{"pixel_values", Pixels(1, 12)}, {"image", Pixels(1, 12)}});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("'image'"));
  EXPECT_EQ(model->Forward(TensorMap{}).status().code(), absl::StatusCode::kInvalidArgument);
  LoraContext lora;
  lora.SetOverlay("visual_projection.weight", torch::zeros({10, 24}));
  EXPECT_EQ(model->Forward({{"pixel_values", Pixels(1, 12)}}, &lora).status().code(),
            absl::StatusCode::kUnimplemented);
  ModelOptions bad_dtype;
  bad_dtype.dtype = torch::kInt32;
  EXPECT_EQ(ClipVisionModel::Create(SmallConfig(), bad_dtype).status().code(),
            absl::StatusCode::kInvalidArgument);
}

void WriteFolder(const std::string& dir, const nlohmann::json& config, const TensorMap& weights) {
  std::ofstream(dir + "/config.json") << config.dump(2);
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", weights).ok());
}

TEST(ClipVisionModelTest, LoadsATransformersFolderThroughTheRegistry) {
  auto model = RandomModel();
  ASSERT_NE(model, nullptr);
  TensorMap weights = NamedTensors(model->module());
  // What older transformers checkpoints and full CLIPModel files carry besides the vision tower.
  weights["vision_model.embeddings.position_ids"] = torch::arange(10).unsqueeze(0);
  weights["text_model.embeddings.token_embedding.weight"] = torch::zeros({4, 2});
  weights["logit_scale"] = torch::zeros({});
  test::TempDir dir;
  WriteFolder(dir.path(), SmallConfig(), weights);
  auto loaded = LoadModelFromFolder(dir.path(), ModelOptions{});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const auto* encoder = dynamic_cast<const ImageEncoder*>(loaded->get());
  ASSERT_NE(encoder, nullptr);
  EXPECT_EQ(encoder->image_embed_dim(), 10);
  const torch::Tensor x = Pixels(1, 12);
  auto a = encoder->EncodeImages(x);
  auto b = model->EncodeImages(x);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(*a, *b));

  // A missing vision weight is named.
  weights.erase("vision_model.encoder.layers.2.mlp.fc1.bias");
  test::TempDir broken;
  WriteFolder(broken.path(), SmallConfig(), weights);
  auto missing = LoadClipVisionModel(broken.path());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("vision_model.encoder.layers.2.mlp.fc1.bias"));
}

TEST(ClipVisionSpecTest, RegisteredWithMetadataFromTheSpec) {
  auto spec = ModelRegistry::Global().Find("CLIPVisionModelWithProjection");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ((*spec)->name, "clip-vision");
  const ModelMetadata meta = BuildModelMetadata(MakeClipVisionSpec());
  EXPECT_FALSE(meta.contains("_lora"));
  EXPECT_FALSE(meta.contains("_supports_ip_adapter"));
  EXPECT_TRUE(meta.contains("_no_split_modules"));
  // The declared block class is a module class of the model, spelled as transformers does.
  EXPECT_EQ(MakeClipVisionSpec().structure.no_split_modules,
            std::vector<std::string>{"CLIPEncoderLayer"});
  auto model = RandomModel();
  ASSERT_NE(model, nullptr);
  int layers = 0;
  for (const auto& item : model->module().named_modules()) {
    std::string n = item.value()->name();
    n = n.substr(n.rfind("::") + 2);
    layers += n == "CLIPEncoderLayerImpl";
  }
  EXPECT_EQ(layers, 3);
}

}  // namespace
}  // namespace ds::clip_vision
