// CLIPTextModel without fixtures: config parsing and its errors, input validation, a non-golden
// config with random weights (shapes, both pooling rules, causality, the padding mask, the
// projection), folder loading errors, the specs' metadata, and the differentiable (training) mode:
// equal to the inference path, gradients for every parameter, finite-difference checks.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/clip/clip_text_model.h"
#include "models/clip/config.h"
#include "models/clip/spec.h"
#include "models/clip/weight_mapping.h"
#include "testing/gradient_check.h"
#include "testing/test_util.h"

namespace ds::clip {
namespace {

// Not the fixture's sizes: 48 wide, 3 heads, 3 layers, gelu, 20 positions, a real eos id.
nlohmann::json SmallConfig() {
  return {{"vocab_size", 100}, {"hidden_size", 48},          {"intermediate_size", 64},
          {"num_hidden_layers", 3}, {"num_attention_heads", 3}, {"max_position_embeddings", 20},
          {"hidden_act", "gelu"},   {"eos_token_id", 99},       {"bos_token_id", 98},
          {"projection_dim", 24}};
}

std::unique_ptr<ClipTextEncoder> Random(const nlohmann::json& config,
                                        const std::string& class_name = kCLIPTextModelClassName) {
  auto model = ClipTextEncoder::Create(config, {}, class_name);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), 7);
  return std::move(model).value();
}

void ExpectInvalid(const absl::Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(needle), std::string::npos) << s;
}

TEST(ClipConfigTest, DefaultsRoundTripAndTextConfig) {
  auto c = CLIPTextConfig::FromJson(nlohmann::json::object());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 512);
  EXPECT_EQ(c->eos_token_id, 49407);
  EXPECT_FALSE(c->legacy_eos_pooling());
  auto again = CLIPTextConfig::FromJson(c->ToJson());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToJson(), c->ToJson());
  // A CLIPConfig: its text_config is used.
  auto nested = CLIPTextConfig::FromJson(
      {{"model_type", "clip"}, {"text_config", SmallConfig()}, {"vision_config", {}}});
  ASSERT_TRUE(nested.ok()) << nested.status();
  EXPECT_EQ(nested->hidden_size, 48);
  EXPECT_EQ(nested->eos_token_id, 99);
}

TEST(ClipConfigTest, PreciseErrors) {
  nlohmann::json j = SmallConfig();
  j["hidden_act"] = "tanh";
  ExpectInvalid(CLIPTextConfig::FromJson(j).status(), "CLIPTextConfig.hidden_act");
  j = SmallConfig();
  j["num_attention_heads"] = 5;
  ExpectInvalid(CLIPTextConfig::FromJson(j).status(), "CLIPTextConfig.num_attention_heads");
  j = SmallConfig();
  j["hidden_size"] = "48";
  ExpectInvalid(CLIPTextConfig::FromJson(j).status(), "CLIPTextConfig.hidden_size");
  j = SmallConfig();
  j["num_hidden_layers"] = 0;
  ExpectInvalid(CLIPTextConfig::FromJson(j).status(), "CLIPTextConfig.num_hidden_layers");
  j = SmallConfig();
  j["layer_norm_eps"] = -1;
  ExpectInvalid(CLIPTextConfig::FromJson(j).status(), "CLIPTextConfig.layer_norm_eps");
  ExpectInvalid(CLIPTextConfig::FromJson({{"text_config", 3}}).status(),
                "CLIPTextConfig.text_config");
  ExpectInvalid(ClipTextEncoder::Create(SmallConfig(), {}, "CLIPVisionModel").status(),
                "CLIPVisionModel");
}

TEST(ClipTextModelTest, ParameterNamesMatchTheLayout) {
  auto config = CLIPTextConfig::FromJson(SmallConfig());
  ASSERT_TRUE(config.ok());
  for (bool projection : {false, true}) {
    auto model = Random(SmallConfig(), projection ? kCLIPTextModelWithProjectionClassName
                                                  : kCLIPTextModelClassName);
    ASSERT_NE(model, nullptr);
    const TensorMap named = NamedTensors(model->module());
    const auto expected = ClipTextParameters(*config, projection);
    ASSERT_EQ(named.size(), expected.size());
    for (const ClipParameter& p : expected) {
      auto it = named.find(p.name);
      ASSERT_NE(it, named.end()) << p.name;
      EXPECT_EQ(it->second.sizes().vec(), p.shape) << p.name;
    }
  }
}

TEST(ClipTextModelTest, SmallConfigShapesPoolingCausalityAndMask) {
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->hidden_size(), 48);
  EXPECT_EQ(model->max_position_embeddings(), 20);
  // eos 99 is not the highest id in row 0 (id 99 at 4, but a later... ids are < 100): rows with
  // the eos at different positions, and one without any eos (pooled at position 0).
  torch::Tensor ids = torch::tensor({{98, 5, 17, 99, 3, 2, 99, 0, 0, 0},
                                     {98, 40, 41, 42, 43, 44, 45, 46, 99, 1},
                                     {98, 10, 11, 12, 13, 14, 15, 16, 17, 18}});
  auto out = model->EncodeTokens(ids, torch::Tensor(), true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->last_hidden_state.sizes(), (std::vector<int64_t>{3, 10, 48}));
  EXPECT_EQ(out->pooled.sizes(), (std::vector<int64_t>{3, 48}));
  ASSERT_EQ(out->hidden_states.size(), 4u);  // embeddings + 3 layers
  const std::vector<int64_t> first_eos = {3, 8, 0};
  for (int64_t b = 0; b < 3; ++b) {
    EXPECT_TRUE(torch::equal(out->pooled[b], out->last_hidden_state[b][first_eos[b]])) << b;
  }
  // Causal: changing token 6 leaves positions 0..5 unchanged and changes 6.
  torch::Tensor changed = ids.clone();
  changed[0][6] = 50;
  auto out2 = model->EncodeTokens(changed, torch::Tensor());
  ASSERT_TRUE(out2.ok());
  EXPECT_TRUE(torch::equal(out2->last_hidden_state[0].narrow(0, 0, 6),
                           out->last_hidden_state[0].narrow(0, 0, 6)));
  EXPECT_FALSE(torch::allclose(out2->last_hidden_state[0][6], out->last_hidden_state[0][6]));
  // Masking key 1 changes every later position but not position 0; an all-ones mask is a no-op.
  torch::Tensor mask = torch::ones({3, 10}, torch::kLong);
  auto ones = model->EncodeTokens(ids, mask);
  ASSERT_TRUE(ones.ok()) << ones.status();
  EXPECT_TRUE(torch::allclose(ones->last_hidden_state, out->last_hidden_state, 1e-6, 1e-6));
  mask[0][1] = 0;
  auto masked = model->EncodeTokens(ids, mask);
  ASSERT_TRUE(masked.ok());
  EXPECT_TRUE(torch::allclose(masked->last_hidden_state[0][0], out->last_hidden_state[0][0]));
  EXPECT_FALSE(torch::allclose(masked->last_hidden_state[0][5], out->last_hidden_state[0][5]));
}

TEST(ClipTextModelTest, LegacyEosPoolingTakesTheArgmax) {
  nlohmann::json config = SmallConfig();
  config["eos_token_id"] = 2;
  auto model = Random(config);
  ASSERT_NE(model, nullptr);
  const torch::Tensor ids = torch::tensor({{0, 5, 2, 97, 3}, {0, 2, 1, 1, 1}});
  auto out = model->EncodeTokens(ids, torch::Tensor());
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(torch::equal(out->pooled[0], out->last_hidden_state[0][3]));  // the largest id
  EXPECT_TRUE(torch::equal(out->pooled[1], out->last_hidden_state[1][1]));
}

TEST(ClipTextModelTest, ProjectionGivesTextEmbeds) {
  auto plain = Random(SmallConfig());
  auto projected = Random(SmallConfig(), kCLIPTextModelWithProjectionClassName);
  ASSERT_NE(projected, nullptr);
  EXPECT_EQ(projected->class_name(), "CLIPTextModelWithProjection");
  const torch::Tensor ids = torch::tensor({{98, 4, 99}});
  auto out = projected->EncodeTokens(ids, torch::Tensor());
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->pooled.sizes(), (std::vector<int64_t>{1, 24}));
  // text_embeds = text_projection(the hidden state at the eos).
  const torch::Tensor w = NamedTensors(projected->module()).at("text_projection.weight");
  EXPECT_TRUE(torch::allclose(out->pooled, torch::matmul(out->last_hidden_state[0][2], w.t()).unsqueeze(0),
                              1e-5, 1e-6));
}

TEST(ClipTextModelTest, BadInputsNameTheTensor) {
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  ExpectInvalid(model->EncodeTokens(torch::tensor({1, 2, 3}), {}).status(), "'input_ids' must be");
  ExpectInvalid(model->EncodeTokens(torch::zeros({1, 3}), {}).status(), "integer tensor");
  ExpectInvalid(model->EncodeTokens(torch::tensor({{1, 100, 3}}), {}).status(),
                "holds id 100 at [0, 1]");
  ExpectInvalid(model->EncodeTokens(torch::tensor({{1, -4}}), {}).status(), "holds id -4");
  ExpectInvalid(model->EncodeTokens(torch::zeros({1, 21}, torch::kLong), {}).status(),
                "more than max_position_embeddings 20");
  ExpectInvalid(model->EncodeTokens(torch::zeros({2, 3}, torch::kLong), torch::ones({2, 4})).status(),
                "'attention_mask' [2, 4]");
  ExpectInvalid(model->Forward({{"ids", torch::zeros({1, 3}, torch::kLong)}}).status(),
                "unknown input 'ids'");
  ExpectInvalid(model->Forward(TensorMap{}).status(), "missing input 'input_ids'");
  auto forward = model->Forward({{"input_ids", torch::zeros({1, 3}, torch::kInt)}});
  ASSERT_TRUE(forward.ok()) << forward.status();
  EXPECT_EQ(forward->sizes(), (std::vector<int64_t>{1, 3, 48}));
}

// ---------------------------------------------------------------------------------------------
// Differentiable (training) mode

// max |u - v| <= tol * max |u| (the output scale).
::testing::AssertionResult CloseToScale(const torch::Tensor& u, const torch::Tensor& v,
                                        double tol) {
  const double scale = std::max(u.abs().max().item<double>(), 1e-30);
  const double diff = (u.detach() - v.detach()).abs().max().item<double>();
  return ::testing::AssertionResult(diff <= tol * scale)
         << "max |diff| " << diff << " vs max |value| " << scale;
}

// Two prompts, the second padded (mask 0) after its eos.
struct Batch {
  torch::Tensor ids = torch::tensor({{98, 5, 17, 42, 3, 2, 99, 7}, {98, 40, 41, 99, 0, 0, 0, 0}});
  torch::Tensor mask = torch::tensor({{1, 1, 1, 1, 1, 1, 1, 1}, {1, 1, 1, 1, 0, 0, 0, 0}});
};

// A scalar of every output (fixed random coefficients, so no gradient vanishes by symmetry).
torch::Tensor Loss(const TextEncoderOutput& out, const torch::Tensor& w_hidden,
                   const torch::Tensor& w_pooled) {
  return (out.last_hidden_state * w_hidden).sum() + (out.pooled * w_pooled).sum();
}

TEST(ClipDifferentiableTest, ForwardEqualsTheInferencePathAndToggles) {
  auto model = Random(SmallConfig(), kCLIPTextModelWithProjectionClassName);
  ASSERT_NE(model, nullptr);
  CLIPTextModelImpl& clip = *model->clip();
  EXPECT_FALSE(clip.differentiable());
  for (const auto& p : clip.parameters()) ASSERT_FALSE(p.requires_grad());
  const Batch batch;
  auto inference = model->EncodeTokens(batch.ids, batch.mask, true);
  ASSERT_TRUE(inference.ok()) << inference.status();
  EXPECT_TRUE(inference->last_hidden_state.is_inference());

  clip.set_differentiable(true);
  EXPECT_TRUE(clip.differentiable());
  for (const auto& p : clip.parameters()) ASSERT_TRUE(p.requires_grad());
  auto trained = model->EncodeTokens(batch.ids, batch.mask, true);
  ASSERT_TRUE(trained.ok()) << trained.status();
  EXPECT_FALSE(trained->last_hidden_state.is_inference());
  EXPECT_TRUE(trained->last_hidden_state.requires_grad());
  EXPECT_TRUE(trained->pooled.requires_grad());
  EXPECT_TRUE(CloseToScale(inference->last_hidden_state, trained->last_hidden_state, 1e-5));
  EXPECT_TRUE(CloseToScale(inference->pooled, trained->pooled, 1e-5));
  ASSERT_EQ(trained->hidden_states.size(), inference->hidden_states.size());
  for (size_t i = 0; i < trained->hidden_states.size(); ++i) {
    EXPECT_TRUE(CloseToScale(inference->hidden_states[i], trained->hidden_states[i], 1e-5)) << i;
  }

  clip.set_differentiable(false);
  for (const auto& p : clip.parameters()) ASSERT_FALSE(p.requires_grad());
  auto again = model->EncodeTokens(batch.ids, batch.mask, false);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(torch::equal(again->last_hidden_state, inference->last_hidden_state));
  EXPECT_TRUE(torch::equal(again->pooled, inference->pooled));
}

TEST(ClipDifferentiableTest, EveryParameterGetsAFiniteGradient) {
  auto model = Random(SmallConfig(), kCLIPTextModelWithProjectionClassName);
  ASSERT_NE(model, nullptr);
  CLIPTextModelImpl& clip = *model->clip();
  clip.set_differentiable(true);
  const Batch batch;
  torch::manual_seed(6);
  const torch::Tensor w_hidden = torch::randn({2, 8, 48});
  const torch::Tensor w_pooled = torch::randn({2, 24});
  auto out = model->EncodeTokens(batch.ids, batch.mask);
  ASSERT_TRUE(out.ok()) << out.status();
  Loss(*out, w_hidden, w_pooled).backward();
  int64_t count = 0;
  for (const auto& item : clip.named_parameters()) {
    const torch::Tensor& g = item.value().grad();
    ASSERT_TRUE(g.defined()) << item.key();
    EXPECT_EQ(g.sizes(), item.value().sizes()) << item.key();
    EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << item.key();
    EXPECT_GT(g.abs().max().item<double>(), 0) << item.key() << " has an all-zero gradient";
    ++count;
  }
  EXPECT_EQ(count, 2 + 3 * 16 + 2 + 1);  // embeddings, 3 layers, final_layer_norm, projection
  // Rows of unused ids and positions get exactly zero; used ones do not.
  const torch::Tensor token_grad = clip.text_model->embeddings->token_embedding->weight.grad();
  EXPECT_EQ(token_grad[50].abs().max().item<double>(), 0.0);
  EXPECT_GT(token_grad[17].abs().max().item<double>(), 0.0);
  const torch::Tensor position_grad =
      clip.text_model->embeddings->position_embedding->weight.grad();
  EXPECT_EQ(position_grad.narrow(0, 8, 12).abs().max().item<double>(), 0.0);
  EXPECT_GT(position_grad[7].abs().max().item<double>(), 0.0);
}

TEST(ClipDifferentiableTest, GradientMatchesFiniteDifferences) {
  auto model = Random(SmallConfig(), kCLIPTextModelWithProjectionClassName);
  ASSERT_NE(model, nullptr);
  CLIPTextModelImpl& clip = *model->clip();
  clip.set_differentiable(true);
  const Batch batch;
  torch::manual_seed(7);
  const torch::Tensor w_hidden = torch::randn({2, 8, 48});
  const torch::Tensor w_pooled = torch::randn({2, 24});
  auto loss = [&] {
    auto out = model->EncodeTokens(batch.ids, batch.mask);
    EXPECT_TRUE(out.ok()) << out.status();
    return Loss(*out, w_hidden, w_pooled);
  };
  loss().backward();
  const auto params = clip.named_parameters();
  for (const char* name : {"text_model.encoder.layers.1.self_attn.q_proj.weight",
                           "text_model.encoder.layers.0.mlp.fc1.weight",
                           "text_model.embeddings.token_embedding.weight",
                           "text_model.encoder.layers.2.layer_norm1.weight"}) {
    SCOPED_TRACE(name);
    ASSERT_NE(params.find(name), nullptr);
    torch::Tensor p = params[name];
    const test::GradientEntry g =
        test::LargestGradientEntry(p, [&] { return loss().item<double>(); });
    ASSERT_NE(g.analytic, 0.0);
    EXPECT_NEAR(g.numeric, g.analytic, 2e-2 * std::abs(g.analytic)) << "entry " << g.index;
  }
}

TEST(ClipDifferentiableTest, SixteenBitModelsAreRefused) {
  auto cfg = CLIPTextConfig::FromJson(SmallConfig());
  ASSERT_TRUE(cfg.ok());
  CLIPTextModel clip(CLIPTextModelOptions{*cfg, false, torch::kBFloat16});
  InitRandomWeights(*clip, 1);
  clip->set_differentiable(true);
  const torch::Tensor ids = torch::tensor({{98, 4, 99}});
  EXPECT_THROW(clip->Encode(ids, torch::Tensor(), false), c10::Error);
  clip->set_differentiable(false);
  EXPECT_EQ(clip->Encode(ids, torch::Tensor(), false).last_hidden_state.scalar_type(),
            torch::kBFloat16);
}

TEST(ClipTextModelTest, FolderErrorsNameTheKey) {
  test::TempDir dir;
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  TensorMap weights = NamedTensors(model->module());
  weights.erase("text_model.encoder.layers.2.mlp.fc2.bias");
  // An old-transformers position_ids buffer is accepted (dropped before the strict load).
  weights["text_model.embeddings.position_ids"] = torch::arange(20).unsqueeze(0);
  {
    std::ofstream(dir.File("config.json")) << model->config().dump();
  }
  ASSERT_TRUE(WriteSafetensors(dir.File("model.safetensors"), weights).ok());
  auto loaded = LoadModelFromFolder(dir.path(), {});
  ExpectInvalid(loaded.status(), "text_model.encoder.layers.2.mlp.fc2.bias");
  EXPECT_EQ(std::string(loaded.status().message()).find("position_ids"), std::string::npos);

  weights["text_model.encoder.layers.2.mlp.fc2.bias"] = torch::zeros({48});
  ASSERT_TRUE(WriteSafetensors(dir.File("model.safetensors"), weights).ok());
  loaded = LoadModelFromFolder(dir.path(), {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->class_name(), "CLIPTextModel");

  nlohmann::json bad = model->config();
  bad["num_attention_heads"] = 7;
  {
    std::ofstream(dir.File("config.json")) << bad.dump();
  }
  ExpectInvalid(LoadModelFromFolder(dir.path(), {}).status(), "CLIPTextConfig.num_attention_heads");
}

TEST(ClipWeightMappingTest, DerivesTheConfigAndRejectsUnknownKeys) {
  auto config = CLIPTextConfig::FromJson(SmallConfig());
  ASSERT_TRUE(config.ok());
  KeyShapes keys;
  for (const ClipParameter& p : ClipTextParameters(*config, false)) keys[p.name] = p.shape;
  auto det = ClipTextWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok()) << det.status();
  ASSERT_TRUE(det->has_value());
  EXPECT_EQ((**det).config["hidden_size"], 48);
  EXPECT_EQ((**det).config["num_hidden_layers"], 3);
  EXPECT_EQ((**det).config["intermediate_size"], 64);
  EXPECT_EQ((**det).config["max_position_embeddings"], 20);
  EXPECT_EQ((**det).variant, "clip-text");
  auto plan = ClipTextWeightMappingHandler().PlanToDiffusers(keys, **det);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->size(), keys.size());
  keys["text_model.encoder.layers.0.self_attn.extra.weight"] = {1};
  ExpectInvalid(ClipTextWeightMappingHandler().PlanToDiffusers(keys, **det).status(),
                "text_model.encoder.layers.0.self_attn.extra.weight");
  keys.erase("text_model.encoder.layers.0.self_attn.extra.weight");
  keys["text_model.encoder.layers.1.mlp.fc1.weight"] = {65, 48};
  ExpectInvalid(ClipTextWeightMappingHandler().PlanToDiffusers(keys, **det).status(),
                "text_model.encoder.layers.1.mlp.fc1.weight");
  // Not CLIP.
  auto other = ClipTextWeightMappingHandler().Detect({{"decoder.conv_in.weight", {4, 4, 3, 3}}});
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->has_value());
}

TEST(ClipSpecTest, MetadataIsDerivedFromTheWiring) {
  const ModelMetadata text = BuildModelMetadata(MakeCLIPTextModelSpec());
  ASSERT_TRUE(text.contains("_weight_mapping"));
  EXPECT_EQ(std::get<std::vector<std::string>>(text.Find("_weight_mapping")->value),
            (std::vector<std::string>{"clip-l", "clip-text"}));
  EXPECT_FALSE(text.contains("_lora"));
  EXPECT_EQ(std::get<std::vector<std::string>>(text.Find("_no_split_modules")->value),
            (std::vector<std::string>{"CLIPTextEmbeddings", "CLIPEncoderLayer"}));
  const ModelMetadata projected = BuildModelMetadata(MakeCLIPTextModelWithProjectionSpec());
  EXPECT_FALSE(projected.contains("_weight_mapping"));
  EXPECT_FALSE(projected.contains("_lora"));
  auto spec = ModelRegistry::Global().Find("CLIPTextModel");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ((*spec)->name, "clip-text");
}

}  // namespace
}  // namespace ds::clip
