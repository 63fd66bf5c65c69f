// T5EncoderModel without fixtures: config parsing and its errors, relative position buckets, a
// non-golden config with random weights (shapes, the padding mask, non-gated relu), float16
// clamping, input validation, folder errors, state-dict adaptation, the spec's metadata, and the
// differentiable (training) mode: equal to the inference path, gradients for every parameter,
// finite-difference checks.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <fstream>
#include <string>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/t5/config.h"
#include "models/t5/spec.h"
#include "models/t5/t5_encoder.h"
#include "models/t5/weight_mapping.h"
#include "testing/gradient_check.h"
#include "testing/test_util.h"

namespace ds::t5 {
namespace {

// Not the fixture's sizes: 40 wide, 5 heads of 6, relu (v1.0 layout), 16 buckets, distance 20.
nlohmann::json SmallConfig() {
  return {{"vocab_size", 90},
          {"d_model", 40},
          {"d_kv", 6},
          {"d_ff", 24},
          {"num_layers", 3},
          {"num_heads", 5},
          {"relative_attention_num_buckets", 16},
          {"relative_attention_max_distance", 20},
          {"feed_forward_proj", "relu"}};
}

std::unique_ptr<T5TextEncoder> Random(const nlohmann::json& config,
                                      torch::Dtype dtype = torch::kFloat32) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = T5TextEncoder::Create(config, options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), 11);
  return std::move(model).value();
}

void ExpectInvalid(const absl::Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(needle), std::string::npos) << s;
}

TEST(T5ConfigTest, FeedForwardProjAndRoundTrip) {
  auto gated = T5Config::FromJson({{"feed_forward_proj", "gated-gelu"}});
  ASSERT_TRUE(gated.ok()) << gated.status();
  EXPECT_TRUE(gated->is_gated_act);
  EXPECT_EQ(gated->dense_act_fn, "gelu_new");
  auto silu = T5Config::FromJson({{"feed_forward_proj", "gated-silu"}});
  ASSERT_TRUE(silu.ok());
  EXPECT_EQ(silu->dense_act_fn, "silu");
  auto relu = T5Config::FromJson(SmallConfig());
  ASSERT_TRUE(relu.ok());
  EXPECT_FALSE(relu->is_gated_act);
  EXPECT_EQ(relu->inner_dim(), 30);
  auto again = T5Config::FromJson(relu->ToJson());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToJson(), relu->ToJson());
}

TEST(T5ConfigTest, PreciseErrors) {
  ExpectInvalid(T5Config::FromJson({{"feed_forward_proj", "gated-gelu-x"}}).status(),
                "T5Config.feed_forward_proj");
  ExpectInvalid(T5Config::FromJson({{"feed_forward_proj", "fancy-gelu"}}).status(),
                "T5Config.feed_forward_proj");
  ExpectInvalid(T5Config::FromJson({{"feed_forward_proj", "gated-tanh"}}).status(),
                "T5Config.dense_act_fn");
  ExpectInvalid(T5Config::FromJson({{"num_heads", 0}}).status(), "T5Config.num_heads");
  ExpectInvalid(T5Config::FromJson({{"d_model", 1.5}}).status(), "T5Config.d_model");
  ExpectInvalid(T5Config::FromJson({{"relative_attention_num_buckets", 2}}).status(),
                "T5Config.relative_attention_num_buckets");
  ExpectInvalid(T5Config::FromJson({{"is_gated_act", "yes"}}).status(), "T5Config.is_gated_act");
}

// The bucket function's documented behaviour, checked cell by cell against its definition.
TEST(T5EncoderTest, RelativePositionBuckets) {
  const int64_t buckets = 32, max_distance = 128, n = 300;
  const torch::Tensor b = T5EncoderImpl::RelativePositionBuckets(n, n, buckets, max_distance,
                                                                 torch::kCPU);
  ASSERT_EQ(b.sizes(), (std::vector<int64_t>{n, n}));
  auto at = [&](int64_t q, int64_t k) { return b[q][k].item<int64_t>(); };
  EXPECT_EQ(at(5, 5), 0);
  for (int64_t d = 1; d < 8; ++d) {
    EXPECT_EQ(at(100, 100 + d), 16 + d);  // keys after the query: upper half, exact
    EXPECT_EQ(at(100, 100 - d), d);       // keys before: lower half, exact
  }
  // Logarithmic beyond 8, saturating at the last bucket of each half from max_distance on.
  EXPECT_EQ(at(0, 128), 31);
  EXPECT_EQ(at(0, 299), 31);
  EXPECT_EQ(at(299, 0), 15);
  int64_t previous = 0;
  for (int64_t d = 1; d < n; ++d) {
    const int64_t v = at(0, d);
    EXPECT_GE(v, previous) << d;
    EXPECT_LE(v, 31);
    EXPECT_EQ(at(d, 0) + 16, v) << d;  // symmetric halves
    previous = v;
  }
}

TEST(T5EncoderTest, SmallConfigShapesAndMaskEqualsTheUnpaddedSequence) {
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->hidden_size(), 40);
  EXPECT_EQ(model->max_position_embeddings(), -1);
  const TensorMap named = NamedTensors(model->module());
  EXPECT_EQ(named.count("encoder.block.1.layer.1.DenseReluDense.wi.weight"), 1u);
  EXPECT_EQ(named.count("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"), 0u);
  const torch::Tensor ids = torch::tensor({{5, 6, 7, 8, 9, 1, 0, 0, 0, 0, 0, 0},
                                           {11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 1}});
  torch::Tensor mask = torch::ones({2, 12}, torch::kLong);
  mask[0].narrow(0, 6, 6).zero_();
  auto out = model->EncodeTokens(ids, mask, true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->last_hidden_state.sizes(), (std::vector<int64_t>{2, 12, 40}));
  EXPECT_FALSE(out->pooled.defined());
  ASSERT_EQ(out->hidden_states.size(), 4u);
  EXPECT_TRUE(torch::equal(out->hidden_states.back(), out->last_hidden_state));
  // The masked row's real tokens equal the 6 tokens encoded alone (relative positions only).
  auto alone = model->EncodeTokens(ids[0].narrow(0, 0, 6).unsqueeze(0), torch::Tensor());
  ASSERT_TRUE(alone.ok());
  EXPECT_TRUE(torch::allclose(out->last_hidden_state[0].narrow(0, 0, 6), alone->last_hidden_state[0],
                              1e-5, 1e-5));
  // Without the mask the padding is attended to and changes them.
  auto unmasked = model->EncodeTokens(ids, torch::Tensor());
  ASSERT_TRUE(unmasked.ok());
  EXPECT_FALSE(torch::allclose(unmasked->last_hidden_state[0].narrow(0, 0, 6),
                               alone->last_hidden_state[0], 1e-5, 1e-5));
  // Long sequences are fine (no position table).
  auto long_out = model->EncodeTokens(torch::ones({1, 300}, torch::kLong), torch::Tensor());
  ASSERT_TRUE(long_out.ok()) << long_out.status();
  EXPECT_EQ(long_out->last_hidden_state.size(1), 300);
}

TEST(T5EncoderTest, Float16ClampsTheResidualStreamLikeTransformers) {
  nlohmann::json config = SmallConfig();
  config["feed_forward_proj"] = "gated-gelu";
  auto model = Random(config, torch::kFloat16);
  ASSERT_NE(model, nullptr);
  {
    torch::NoGradGuard no_grad;
    // An attention output far beyond float16's range: the block-0 residual overflows to inf and
    // is clamped to finfo.max - 1000 before the (float32) feed-forward.
    NamedTensors(model->module()).at("encoder.block.0.layer.0.SelfAttention.o.weight").mul_(3e4);
  }
  auto out = model->EncodeTokens(torch::tensor({{3, 4, 5, 6}}), torch::Tensor(), true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(torch::isfinite(out->last_hidden_state).all().item<bool>());
  EXPECT_TRUE(torch::isfinite(out->hidden_states[1]).all().item<bool>());
  EXPECT_LE(out->hidden_states[1].to(torch::kFloat).abs().max().item<float>(), 65504.0f);
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

// FLUX.1's T5 layout in miniature (gated gelu_new), smooth everywhere for finite differences.
nlohmann::json GatedConfig() {
  nlohmann::json config = SmallConfig();
  config["feed_forward_proj"] = "gated-gelu";
  return config;
}

// Two prompts, the first padded (mask 0) after its eos.
struct Batch {
  torch::Tensor ids =
      torch::tensor({{5, 6, 7, 8, 9, 1, 0, 0, 0, 0}, {11, 12, 13, 14, 15, 16, 17, 18, 19, 1}});
  torch::Tensor mask =
      torch::tensor({{1, 1, 1, 1, 1, 1, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1}});
};

TEST(T5DifferentiableTest, ForwardEqualsTheInferencePathAndToggles) {
  for (const nlohmann::json& config : {SmallConfig(), GatedConfig()}) {
    SCOPED_TRACE(config.dump());
    auto model = Random(config);
    ASSERT_NE(model, nullptr);
    T5EncoderImpl& t5 = *model->t5();
    EXPECT_FALSE(t5.differentiable());
    for (const auto& p : t5.parameters()) ASSERT_FALSE(p.requires_grad());
    const Batch batch;
    auto inference = model->EncodeTokens(batch.ids, batch.mask, true);
    ASSERT_TRUE(inference.ok()) << inference.status();
    EXPECT_TRUE(inference->last_hidden_state.is_inference());

    t5.set_differentiable(true);
    EXPECT_TRUE(t5.differentiable());
    for (const auto& p : t5.parameters()) ASSERT_TRUE(p.requires_grad());
    auto trained = model->EncodeTokens(batch.ids, batch.mask, true);
    ASSERT_TRUE(trained.ok()) << trained.status();
    EXPECT_FALSE(trained->last_hidden_state.is_inference());
    EXPECT_TRUE(trained->last_hidden_state.requires_grad());
    EXPECT_TRUE(CloseToScale(inference->last_hidden_state, trained->last_hidden_state, 1e-5));
    ASSERT_EQ(trained->hidden_states.size(), inference->hidden_states.size());
    for (size_t i = 0; i < trained->hidden_states.size(); ++i) {
      EXPECT_TRUE(CloseToScale(inference->hidden_states[i], trained->hidden_states[i], 1e-5)) << i;
    }

    t5.set_differentiable(false);
    for (const auto& p : t5.parameters()) ASSERT_FALSE(p.requires_grad());
    auto again = model->EncodeTokens(batch.ids, batch.mask, false);
    ASSERT_TRUE(again.ok());
    EXPECT_TRUE(torch::equal(again->last_hidden_state, inference->last_hidden_state));
  }
}

TEST(T5DifferentiableTest, EveryParameterGetsAFiniteGradient) {
  auto model = Random(GatedConfig());
  ASSERT_NE(model, nullptr);
  T5EncoderImpl& t5 = *model->t5();
  t5.set_differentiable(true);
  const Batch batch;
  torch::manual_seed(8);
  const torch::Tensor weights = torch::randn({2, 10, 40});
  auto out = model->EncodeTokens(batch.ids, batch.mask);
  ASSERT_TRUE(out.ok()) << out.status();
  (out->last_hidden_state * weights).sum().backward();
  int64_t count = 0;
  for (const auto& item : t5.named_parameters()) {
    const torch::Tensor& g = item.value().grad();
    ASSERT_TRUE(g.defined()) << item.key();
    EXPECT_EQ(g.sizes(), item.value().sizes()) << item.key();
    EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << item.key();
    EXPECT_GT(g.abs().max().item<double>(), 0) << item.key() << " has an all-zero gradient";
    ++count;
  }
  // shared, block 0 (q, k, v, o, relative_attention_bias, 2 layer norms, wi_0, wi_1, wo), two more
  // blocks without the bias, final_layer_norm.
  EXPECT_EQ(count, 1 + 10 + 2 * 9 + 1);
  const torch::Tensor shared_grad = t5.shared->weight.grad();
  EXPECT_EQ(shared_grad[50].abs().max().item<double>(), 0.0);  // an unused id
  EXPECT_GT(shared_grad[7].abs().max().item<double>(), 0.0);
}

TEST(T5DifferentiableTest, GradientMatchesFiniteDifferences) {
  auto model = Random(GatedConfig());
  ASSERT_NE(model, nullptr);
  T5EncoderImpl& t5 = *model->t5();
  t5.set_differentiable(true);
  const Batch batch;
  torch::manual_seed(9);
  const torch::Tensor weights = torch::randn({2, 10, 40});
  auto loss = [&] {
    auto out = model->EncodeTokens(batch.ids, batch.mask);
    EXPECT_TRUE(out.ok()) << out.status();
    return (out->last_hidden_state * weights).sum();
  };
  loss().backward();
  const auto params = t5.named_parameters();
  for (const char* name : {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                           "encoder.block.1.layer.0.SelfAttention.q.weight",
                           "encoder.block.2.layer.1.DenseReluDense.wi_0.weight",
                           "encoder.block.0.layer.1.layer_norm.weight"}) {
    SCOPED_TRACE(name);
    ASSERT_NE(params.find(name), nullptr);
    torch::Tensor p = params[name];
    const test::GradientEntry g =
        test::LargestGradientEntry(p, [&] { return loss().item<double>(); });
    ASSERT_NE(g.analytic, 0.0);
    EXPECT_NEAR(g.numeric, g.analytic, 2e-2 * std::abs(g.analytic)) << "entry " << g.index;
  }
}

TEST(T5DifferentiableTest, SixteenBitModelsAreRefused) {
  auto model = Random(GatedConfig(), torch::kBFloat16);
  ASSERT_NE(model, nullptr);
  model->t5()->set_differentiable(true);
  const torch::Tensor ids = torch::tensor({{3, 4, 5}});
  auto refused = model->EncodeTokens(ids, torch::Tensor());
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(std::string(refused.status().message()).find("float32"), std::string::npos)
      << refused.status();
  model->t5()->set_differentiable(false);
  auto out = model->EncodeTokens(ids, torch::Tensor());
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->last_hidden_state.scalar_type(), torch::kBFloat16);
}

TEST(T5EncoderTest, BadInputsNameTheTensor) {
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  ExpectInvalid(model->EncodeTokens(torch::zeros({2, 3, 4}, torch::kLong), {}).status(),
                "'input_ids' must be [batch, sequence] with both >= 1, got [2, 3, 4]");
  ExpectInvalid(model->EncodeTokens(torch::zeros({1, 3}), {}).status(), "integer tensor");
  ExpectInvalid(model->EncodeTokens(torch::tensor({{1, 2}, {3, 90}}), {}).status(),
                "holds id 90 at [1, 1]");
  ExpectInvalid(model->EncodeTokens(torch::zeros({1, 3}, torch::kLong), torch::ones({3})).status(),
                "'attention_mask'");
  ExpectInvalid(model->Forward({{"input_ids", torch::zeros({1, 3}, torch::kLong)},
                                {"decoder_input_ids", torch::zeros({1, 3}, torch::kLong)}})
                    .status(),
                "unknown input 'decoder_input_ids'");
}

TEST(T5EncoderTest, AdaptStateDict) {
  TensorMap sd = {{"encoder.embed_tokens.weight", torch::zeros({4, 2})},
                  {"decoder.block.0.layer.0.SelfAttention.q.weight", torch::zeros({2, 2})},
                  {"lm_head.weight", torch::zeros({4, 2})}};
  auto adapted = AdaptT5StateDict(sd);
  ASSERT_TRUE(adapted.ok());
  EXPECT_EQ(adapted->size(), 1u);
  EXPECT_EQ(adapted->count("shared.weight"), 1u);
  sd["shared.weight"] = torch::zeros({5, 2});
  ExpectInvalid(AdaptT5StateDict(sd).status(), "encoder.embed_tokens.weight");
}

TEST(T5EncoderTest, FolderErrorsNameTheKey) {
  test::TempDir dir;
  auto model = Random(SmallConfig());
  ASSERT_NE(model, nullptr);
  TensorMap weights = NamedTensors(model->module());
  weights.erase("encoder.block.2.layer.1.DenseReluDense.wo.weight");
  std::ofstream(dir.File("config.json")) << model->config().dump();
  ASSERT_TRUE(WriteSafetensors(dir.File("model.safetensors"), weights).ok());
  ExpectInvalid(LoadModelFromFolder(dir.path(), {}).status(),
                "encoder.block.2.layer.1.DenseReluDense.wo.weight");
  nlohmann::json bad = model->config();
  bad["feed_forward_proj"] = "gated-gelu-new";
  bad.erase("dense_act_fn");
  std::ofstream(dir.File("config.json")) << bad.dump();
  ExpectInvalid(LoadModelFromFolder(dir.path(), {}).status(), "T5Config.feed_forward_proj");
}

TEST(T5WeightMappingTest, DerivesTheConfig) {
  auto config = T5Config::FromJson(SmallConfig());
  ASSERT_TRUE(config.ok());
  KeyShapes keys;
  for (const T5Parameter& p : T5EncoderParameters(*config)) keys[p.name] = p.shape;
  auto det = T5WeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok()) << det.status();
  ASSERT_TRUE(det->has_value());
  const nlohmann::json& c = (**det).config;
  EXPECT_EQ(c["d_model"], 40);
  EXPECT_EQ(c["num_heads"], 5);
  EXPECT_EQ(c["d_kv"], 6);
  EXPECT_EQ(c["d_ff"], 24);
  EXPECT_EQ(c["num_layers"], 3);
  EXPECT_EQ(c["relative_attention_num_buckets"], 16);
  EXPECT_EQ(c["feed_forward_proj"], "relu");
  EXPECT_EQ((**det).variant, "t5-v1.0");
  keys["encoder.block.1.layer.0.SelfAttention.k.weight"] = {31, 40};
  ExpectInvalid(T5WeightMappingHandler().PlanToDiffusers(keys, **det).status(),
                "encoder.block.1.layer.0.SelfAttention.k.weight");
  keys["encoder.block.1.layer.0.SelfAttention.k.weight"] = {30, 40};
  keys["encoder.block.1.layer.0.SelfAttention.extra"] = {3};
  ExpectInvalid(T5WeightMappingHandler().PlanToDiffusers(keys, **det).status(),
                "encoder.block.1.layer.0.SelfAttention.extra");
}

TEST(T5SpecTest, MetadataIsDerivedFromTheWiring) {
  const ModelMetadata m = BuildModelMetadata(MakeT5EncoderModelSpec());
  ASSERT_TRUE(m.contains("_weight_mapping"));
  EXPECT_EQ(std::get<std::vector<std::string>>(m.Find("_weight_mapping")->value),
            (std::vector<std::string>{"t5-v1.0", "t5-v1.1"}));
  EXPECT_EQ(std::get<std::vector<std::string>>(m.Find("_no_split_modules")->value),
            (std::vector<std::string>{"T5Block"}));
  EXPECT_EQ(std::get<std::vector<std::string>>(m.Find("_keep_in_fp32_modules")->value),
            (std::vector<std::string>{"wo"}));
  EXPECT_FALSE(m.contains("_lora"));
  auto spec = ModelRegistry::Global().Find("T5EncoderModel");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ((*spec)->name, "t5-encoder");
}

}  // namespace
}  // namespace ds::t5
