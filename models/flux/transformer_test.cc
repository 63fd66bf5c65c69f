#include "models/flux/transformer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <iostream>
#include <string>
#include <vector>

#include "handlers/state_dict.h"
#include "models/flux/config.h"

namespace ds::flux {
namespace {

using ::testing::HasSubstr;

// diffusers' unit-test config: 1 + 1 blocks, 2 heads × 16, in 4, joint/pooled 32, rope [4, 4, 8].
nlohmann::json TinyConfig() {
  return {{"patch_size", 1},
          {"in_channels", 4},
          {"num_layers", 1},
          {"num_single_layers", 1},
          {"attention_head_dim", 16},
          {"num_attention_heads", 2},
          {"joint_attention_dim", 32},
          {"pooled_projection_dim", 32},
          {"axes_dims_rope", {4, 4, 8}}};
}

std::unique_ptr<FluxTransformer> MakeModel(const nlohmann::json& config,
                                           torch::Dtype dtype = torch::kFloat32,
                                           uint64_t seed = 7) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = FluxTransformer::Create(config, options);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  InitRandomWeights((*model)->module(), seed);
  return std::move(model).value();
}

// Random inputs for `cfg`: batch × (grid_h·grid_w) image tokens with grid ids, `txt` text tokens.
TensorMap MakeInputs(const FluxConfig& cfg, int64_t batch = 1, int64_t grid_h = 3,
                     int64_t grid_w = 4, int64_t txt = 5, uint64_t seed = 1) {
  torch::manual_seed(seed);
  const int64_t img = grid_h * grid_w;
  const int64_t axes = static_cast<int64_t>(cfg.axes_dims_rope.size());
  TensorMap in;
  in["hidden_states"] = torch::randn({batch, img, cfg.in_channels});
  in["encoder_hidden_states"] = torch::randn({batch, txt, cfg.joint_attention_dim});
  in["pooled_projections"] = torch::randn({batch, cfg.pooled_projection_dim});
  in["timestep"] = torch::linspace(0.3, 0.9, batch);
  torch::Tensor img_ids = torch::zeros({img, axes});
  if (axes >= 3) {
    const auto rows = torch::arange(grid_h, torch::kFloat).repeat_interleave(grid_w);
    const auto cols = torch::arange(grid_w, torch::kFloat).repeat({grid_h});
    img_ids.select(1, axes - 2).copy_(rows);
    img_ids.select(1, axes - 1).copy_(cols);
  } else {
    img_ids.copy_(torch::randn({img, axes}) * 3);
  }
  in["img_ids"] = img_ids;
  in["txt_ids"] = torch::zeros({txt, axes});
  if (cfg.guidance_embeds) in["guidance"] = torch::full({batch}, 3.5);
  return in;
}

double MaxAbs(const torch::Tensor& t) { return t.to(torch::kDouble).abs().max().item<double>(); }
double MaxDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return MaxAbs(a.to(torch::kDouble) - b.to(torch::kDouble));
}

std::vector<int64_t> Shape(const TensorMap& m, const std::string& name) {
  return m.at(name).sizes().vec();
}

// ---------------------------------------------------------------------------------------------
// Config

TEST(FluxConfigTest, DefaultsAreDiffusers) {
  auto cfg = FluxConfig::FromJson(nlohmann::json::object());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->patch_size, 1);
  EXPECT_EQ(cfg->in_channels, 64);
  EXPECT_FALSE(cfg->out_channels.has_value());
  EXPECT_EQ(cfg->resolved_out_channels(), 64);
  EXPECT_EQ(cfg->num_layers, 19);
  EXPECT_EQ(cfg->num_single_layers, 38);
  EXPECT_EQ(cfg->attention_head_dim, 128);
  EXPECT_EQ(cfg->num_attention_heads, 24);
  EXPECT_EQ(cfg->inner_dim(), 3072);
  EXPECT_EQ(cfg->joint_attention_dim, 4096);
  EXPECT_EQ(cfg->pooled_projection_dim, 768);
  EXPECT_FALSE(cfg->guidance_embeds);
  EXPECT_EQ(cfg->axes_dims_rope, (std::vector<int64_t>{16, 56, 56}));
}

TEST(FluxConfigTest, ToJsonIsNormalizedAndRoundTrips) {
  nlohmann::json j = TinyConfig();
  j["_class_name"] = "FluxTransformer2DModel";
  j["_diffusers_version"] = "0.40.0.dev0";
  j["out_channels"] = nullptr;
  auto cfg = FluxConfig::FromJson(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  const nlohmann::json out = cfg->ToJson();
  for (const char* key :
       {"patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
        "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
        "guidance_embeds", "axes_dims_rope", "_class_name"}) {
    EXPECT_TRUE(out.contains(key)) << key;
  }
  EXPECT_TRUE(out["out_channels"].is_null());
  EXPECT_EQ(out["guidance_embeds"], false);
  EXPECT_EQ(out["axes_dims_rope"], nlohmann::json({4, 4, 8}));
  auto again = FluxConfig::FromJson(out);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToJson(), out);

  j["out_channels"] = 8;
  auto with_out = FluxConfig::FromJson(j);
  ASSERT_TRUE(with_out.ok());
  EXPECT_EQ(with_out->resolved_out_channels(), 8);
  EXPECT_EQ(with_out->ToJson()["out_channels"], 8);
}

TEST(FluxConfigTest, ErrorsNameTheField) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* field;
  };
  const std::vector<Case> cases = {
      {"num_layers", "19", "num_layers"},
      {"num_layers", -1, "num_layers"},
      {"in_channels", 64.0, "in_channels"},
      {"in_channels", 0, "in_channels"},
      {"out_channels", -4, "out_channels"},
      {"num_attention_heads", 0, "num_attention_heads"},
      {"attention_head_dim", 32, "axes_dims_rope"},     // sum 16 != 32
      {"axes_dims_rope", {4, 5, 7}, "axes_dims_rope"},  // odd
      {"axes_dims_rope", "16,56,56", "axes_dims_rope"},
      {"axes_dims_rope", nlohmann::json::array(), "axes_dims_rope"},
      {"guidance_embeds", 1, "guidance_embeds"},
      {"pooled_projection_dim", nullptr, "pooled_projection_dim"},
      {"_class_name", "SD3Transformer2DModel", "_class_name"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = TinyConfig();
    j[c.key] = c.value;
    auto cfg = FluxConfig::FromJson(j);
    ASSERT_FALSE(cfg.ok()) << c.key << " = " << c.value.dump();
    EXPECT_EQ(cfg.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(cfg.status().message()), HasSubstr(c.field)) << c.value.dump();
  }
  EXPECT_EQ(FluxConfig::FromJson(nlohmann::json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Unknown keys are ignored like diffusers does.
  nlohmann::json extra = TinyConfig();
  extra["some_future_flag"] = true;
  EXPECT_TRUE(FluxConfig::FromJson(extra).ok());
}

// ---------------------------------------------------------------------------------------------
// Module structure

TEST(FluxTransformerTest, ParameterNamesAndShapes) {
  nlohmann::json j = TinyConfig();
  j["patch_size"] = 2;
  j["out_channels"] = 3;
  auto model = MakeModel(j);
  ASSERT_NE(model, nullptr);
  const TensorMap p = NamedTensors(model->module());
  using V = std::vector<int64_t>;
  EXPECT_EQ(Shape(p, "x_embedder.weight"), (V{32, 4}));
  EXPECT_EQ(Shape(p, "context_embedder.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "time_text_embed.timestep_embedder.linear_1.weight"), (V{32, 256}));
  EXPECT_EQ(Shape(p, "time_text_embed.timestep_embedder.linear_2.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "time_text_embed.text_embedder.linear_1.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.norm1.linear.weight"), (V{192, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.norm1_context.linear.bias"), (V{192}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.to_q.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.norm_q.weight"), (V{16}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.norm_added_k.weight"), (V{16}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.add_v_proj.bias"), (V{32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.to_out.0.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.attn.to_add_out.weight"), (V{32, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.ff.net.0.proj.weight"), (V{128, 32}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.ff.net.2.weight"), (V{32, 128}));
  EXPECT_EQ(Shape(p, "transformer_blocks.0.ff_context.net.2.bias"), (V{32}));
  EXPECT_EQ(Shape(p, "single_transformer_blocks.0.norm.linear.weight"), (V{96, 32}));
  EXPECT_EQ(Shape(p, "single_transformer_blocks.0.proj_mlp.weight"), (V{128, 32}));
  EXPECT_EQ(Shape(p, "single_transformer_blocks.0.attn.norm_k.weight"), (V{16}));
  EXPECT_EQ(Shape(p, "single_transformer_blocks.0.proj_out.weight"), (V{32, 160}));
  EXPECT_EQ(Shape(p, "norm_out.linear.weight"), (V{64, 32}));
  EXPECT_EQ(Shape(p, "proj_out.weight"), (V{12, 32}));  // patch² · out_channels
  // 16 top-level + 32 per double block + 14 per single block; no buffers.
  EXPECT_EQ(p.size(), 16u + 32u + 14u);
  EXPECT_EQ(p.count("single_transformer_blocks.0.attn.to_out.0.weight"), 0u);
  EXPECT_EQ(p.count("time_text_embed.guidance_embedder.linear_1.weight"), 0u);
  for (const auto& [name, t] : p) EXPECT_EQ(t.scalar_type(), torch::kFloat32) << name;
}

TEST(FluxTransformerTest, GuidanceEmbedsAddsExactlyTheGuidanceEmbedder) {
  nlohmann::json with = TinyConfig();
  with["guidance_embeds"] = true;
  with["num_layers"] = 2;
  with["num_single_layers"] = 3;
  auto a = MakeModel(TinyConfig());
  auto b = MakeModel(with);
  ASSERT_TRUE(a && b);
  const TensorMap pa = NamedTensors(a->module()), pb = NamedTensors(b->module());
  EXPECT_EQ(pb.size(), 16u + 4u + 2u * 32u + 3u * 14u);
  std::vector<std::string> added;
  for (const auto& [name, t] : pb) {
    if (!pa.count(name)) added.push_back(name);
  }
  EXPECT_THAT(added, ::testing::Contains("time_text_embed.guidance_embedder.linear_1.weight"));
  EXPECT_THAT(added, ::testing::Contains("time_text_embed.guidance_embedder.linear_2.bias"));
  EXPECT_THAT(added, ::testing::Contains("single_transformer_blocks.2.proj_out.weight"));
  EXPECT_THAT(added, ::testing::Contains("transformer_blocks.1.attn.to_add_out.bias"));
  for (const auto& name : added) {
    const bool guidance = name.rfind("time_text_embed.guidance_embedder.", 0) == 0;
    const bool extra_block = name.rfind("transformer_blocks.1.", 0) == 0 ||
                             name.rfind("single_transformer_blocks.1.", 0) == 0 ||
                             name.rfind("single_transformer_blocks.2.", 0) == 0;
    EXPECT_TRUE(guidance || extra_block) << name;
  }
  EXPECT_EQ(b->required_inputs().back(), "guidance");
  EXPECT_EQ(a->required_inputs().size(), 6u);
}

TEST(FluxTransformerTest, DiffusionModelInterface) {
  ModelOptions options;
  options.dtype = torch::kBFloat16;
  auto model = CreateFluxTransformer(TinyConfig(), options);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->class_name(), "FluxTransformer2DModel");
  EXPECT_EQ((*model)->config()["in_channels"], 4);
  EXPECT_EQ((*model)->config()["num_layers"], 1);
  EXPECT_TRUE((*model)->config()["out_channels"].is_null());
  EXPECT_EQ((*model)->config()["_class_name"], "FluxTransformer2DModel");
  EXPECT_EQ((*model)->options().dtype, torch::kBFloat16);
  EXPECT_TRUE((*model)->optional_inputs().empty());
  for (const auto& [name, t] : NamedTensors((*model)->module())) {
    EXPECT_EQ(t.scalar_type(), torch::kBFloat16) << name;
  }
  options.dtype = torch::kFloat64;
  EXPECT_EQ(CreateFluxTransformer(TinyConfig(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  if (!torch::cuda::is_available()) {
    options.dtype = torch::kFloat32;
    options.device = torch::Device(torch::kCUDA, 0);
    EXPECT_EQ(CreateFluxTransformer(TinyConfig(), options).status().code(),
              absl::StatusCode::kUnimplemented);
  }
  nlohmann::json bad = TinyConfig();
  bad["axes_dims_rope"] = {4, 4, 4};
  auto s = CreateFluxTransformer(bad, ModelOptions{}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("axes_dims_rope"));
}

TEST(FluxTransformerTest, StateDictRoundTripsBetweenInstances) {
  auto a = MakeModel(TinyConfig(), torch::kFloat32, 1);
  auto b = MakeModel(TinyConfig(), torch::kFloat32, 2);
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(LoadStateDict(b->module(), NamedTensors(a->module())).ok());
  const TensorMap in = MakeInputs(a->flux_config());
  auto ya = a->Forward(in), yb = b->Forward(in);
  ASSERT_TRUE(ya.ok() && yb.ok());
  EXPECT_TRUE(torch::equal(*ya, *yb));
}

// ---------------------------------------------------------------------------------------------
// Input validation

TEST(FluxTransformerTest, InputValidationNamesTheInput) {
  auto model = MakeModel(TinyConfig());
  ASSERT_NE(model, nullptr);
  const FluxConfig& cfg = model->flux_config();
  const TensorMap good = MakeInputs(cfg, /*batch=*/2);
  ASSERT_TRUE(model->Forward(good).ok());

  struct Case {
    std::string input;
    torch::Tensor value;  // undefined = remove the input
  };
  const std::vector<Case> cases = {
      {"hidden_states", torch::Tensor()},
      {"txt_ids", torch::Tensor()},
      {"hidden_states", torch::randn({2, 12, 5})},  // wrong channels
      {"hidden_states", torch::randn({12, 4})},     // 2-D
      {"hidden_states", torch::ones({2, 12, 4}, torch::kLong)},
      {"encoder_hidden_states", torch::randn({2, 5, 31})},
      {"encoder_hidden_states", torch::randn({3, 5, 32})},  // batch 3 vs 2
      {"pooled_projections", torch::randn({2, 16})},
      {"pooled_projections", torch::randn({2, 1, 32})},
      {"timestep", torch::tensor(0.5)},    // 0-d
      {"timestep", torch::rand({3})},      // batch
      {"img_ids", torch::zeros({11, 3})},  // token count
      {"img_ids", torch::zeros({12, 2})},  // axes
      {"txt_ids", torch::zeros({5, 4})},
      {"txt_ids", torch::zeros({5, 3}, torch::kBool)},
      {"guidance", torch::full({2}, 3.5)},    // model has no guidance embedder
      {"latents", torch::randn({2, 12, 4})},  // unknown
  };
  for (const Case& c : cases) {
    TensorMap in = good;
    if (c.value.defined()) {
      in[c.input] = c.value;
    } else {
      in.erase(c.input);
    }
    auto out = model->Forward(in);
    ASSERT_FALSE(out.ok()) << c.input << " " << c.value.sizes();
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(out.status().message()), HasSubstr("'" + c.input + "'"))
        << out.status();
  }

  nlohmann::json guided = TinyConfig();
  guided["guidance_embeds"] = true;
  auto gmodel = MakeModel(guided);
  ASSERT_NE(gmodel, nullptr);
  TensorMap gin = MakeInputs(gmodel->flux_config());
  ASSERT_TRUE(gmodel->Forward(gin).ok());
  gin.erase("guidance");
  auto missing = gmodel->Forward(gin);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("'guidance'"));
}

// ---------------------------------------------------------------------------------------------
// Forward behaviour

TEST(FluxTransformerTest, DeterministicAndShaped) {
  nlohmann::json j = TinyConfig();
  j["out_channels"] = 6;
  auto model = MakeModel(j);
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config(), /*batch=*/2);
  auto a = model->Forward(in);
  auto b = model->Forward(in);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->sizes(), (std::vector<int64_t>{2, 12, 6}));
  EXPECT_EQ(a->scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::equal(*a, *b));
  EXPECT_TRUE(torch::isfinite(*a).all().item<bool>());
  // The batch elements are independent: element 1 alone gives the same result.
  TensorMap one;
  for (const auto& [name, t] : in) {
    one[name] = (name == "img_ids" || name == "txt_ids") ? t : t.narrow(0, 1, 1);
  }
  auto single = model->Forward(one);
  ASSERT_TRUE(single.ok());
  EXPECT_LE(MaxDiff(*single, a->narrow(0, 1, 1)), 1e-5 * MaxAbs(*a));
}

TEST(FluxTransformerTest, ThreadCountDoesNotChangeTheResult) {
  // One intra-op thread runs the attention heads in turn; several hand them out to workers.
  nlohmann::json j = TinyConfig();
  j["num_attention_heads"] = 3;
  j["attention_head_dim"] = 8;
  j["axes_dims_rope"] = {2, 2, 4};
  auto model = MakeModel(j);
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config(), /*batch=*/2);
  const int saved = torch::get_num_threads();
  torch::set_num_threads(1);
  auto one = model->Forward(in);
  torch::set_num_threads(4);
  auto four = model->Forward(in);
  torch::set_num_threads(saved);
  ASSERT_TRUE(one.ok() && four.ok());
  EXPECT_LE(MaxDiff(*one, *four), 1e-6 * MaxAbs(*one));
}

TEST(FluxTransformerTest, ThreeDimensionalIdsUseTheFirstEntry) {
  auto model = MakeModel(TinyConfig());
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config());
  TensorMap in3 = in;
  in3["img_ids"] = torch::stack({in.at("img_ids"), torch::randn_like(in.at("img_ids"))});
  in3["txt_ids"] = in.at("txt_ids").unsqueeze(0);
  auto a = model->Forward(in), b = model->Forward(in3);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(torch::equal(*a, *b));
}

TEST(FluxTransformerTest, BatchOneConditioningBroadcasts) {
  nlohmann::json j = TinyConfig();
  j["guidance_embeds"] = true;
  auto model = MakeModel(j);
  ASSERT_NE(model, nullptr);
  TensorMap in = MakeInputs(model->flux_config(), /*batch=*/2);
  TensorMap broadcast = in;
  for (const char* name : {"encoder_hidden_states", "pooled_projections", "guidance"}) {
    broadcast[name] = in.at(name).narrow(0, 0, 1);
    in[name] = broadcast[name].expand_as(in.at(name)).contiguous();
  }
  auto a = model->Forward(in), b = model->Forward(broadcast);
  ASSERT_TRUE(a.ok() && b.ok()) << b.status();
  EXPECT_EQ(b->sizes(), a->sizes());
  EXPECT_LE(MaxDiff(*a, *b), 1e-6 * MaxAbs(*a));
}

TEST(FluxTransformerTest, NonDefaultRopeAxes) {
  for (const nlohmann::json& axes :
       {nlohmann::json{4, 6, 6}, nlohmann::json{8, 8}, nlohmann::json{2, 2, 4, 8}}) {
    nlohmann::json j = TinyConfig();
    j["axes_dims_rope"] = axes;
    j["num_layers"] = 2;
    j["num_single_layers"] = 2;
    auto model = MakeModel(j);
    ASSERT_NE(model, nullptr) << axes.dump();
    const TensorMap in = MakeInputs(model->flux_config(), 2, 3, 5, 7);
    Intermediates inter;
    auto out = model->ForwardWithIntermediates(in, &inter);
    ASSERT_TRUE(out.ok()) << axes.dump() << ": " << out.status();
    EXPECT_TRUE(torch::isfinite(*out).all().item<bool>());
    EXPECT_EQ(inter.at("pos_embed.0").sizes(), (std::vector<int64_t>{22, 16}));
    // Text ids are zero: identity rotation.
    EXPECT_TRUE(torch::equal(inter.at("pos_embed.0").narrow(0, 0, 7), torch::ones({7, 16})));
    EXPECT_TRUE(torch::equal(inter.at("pos_embed.1").narrow(0, 0, 7), torch::zeros({7, 16})));
  }
}

TEST(FluxTransformerTest, NoTextTokens) {
  auto model = MakeModel(TinyConfig());
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config(), 1, 3, 4, /*txt=*/0);
  auto out = model->Forward(in);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->sizes(), (std::vector<int64_t>{1, 12, 4}));
  EXPECT_TRUE(torch::isfinite(*out).all().item<bool>());
}

TEST(FluxTransformerTest, CapturesIntermediates) {
  auto model = MakeModel(TinyConfig());
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config());
  Intermediates inter;
  auto out = model->ForwardWithIntermediates(in, &inter);
  ASSERT_TRUE(out.ok());
  for (const char* name :
       {"x_embedder", "context_embedder", "time_text_embed", "pos_embed.0", "pos_embed.1",
        "transformer_blocks.0.norm1.0", "transformer_blocks.0.norm1_context.4",
        "transformer_blocks.0.attn.0", "transformer_blocks.0.attn.1", "transformer_blocks.0.0",
        "transformer_blocks.0.1", "single_transformer_blocks.0.norm.0",
        "single_transformer_blocks.0.norm.1", "single_transformer_blocks.0.attn",
        "single_transformer_blocks.0.0", "single_transformer_blocks.0.1", "norm_out", "proj_out"}) {
    EXPECT_TRUE(inter.count(name)) << name;
  }
  EXPECT_TRUE(torch::equal(inter.at("proj_out"), *out));
  EXPECT_EQ(inter.at("single_transformer_blocks.0.0").sizes(), (std::vector<int64_t>{1, 5, 32}));
  EXPECT_EQ(inter.at("single_transformer_blocks.0.1").sizes(), (std::vector<int64_t>{1, 12, 32}));
  // Captures are copies: the forward's in-place updates do not change them.
  EXPECT_FALSE(
      torch::equal(inter.at("transformer_blocks.0.1"), inter.at("single_transformer_blocks.0.1")));
}

// bfloat16 and float16 weights (the same values, rounded) stay close to float32. The tolerances
// are relative to max|float32 output| and leave ~4× margin over what these configs show
// (bfloat16 ≈ 8 significant bits, float16 ≈ 11).
TEST(FluxTransformerTest, LowPrecisionStaysCloseToFloat32) {
  nlohmann::json j = TinyConfig();
  j["guidance_embeds"] = true;
  j["num_layers"] = 2;
  j["num_single_layers"] = 2;
  auto f32 = MakeModel(j, torch::kFloat32, 3);
  ASSERT_NE(f32, nullptr);
  TensorMap in = MakeInputs(f32->flux_config(), 2, 4, 4, 8);
  // ×1000 exact in bfloat16; otherwise the rounding diffusers also does in the model dtype
  // (3.5 → 3504) moves the high sinusoid frequencies and dominates the comparison.
  in["timestep"] = torch::tensor({0.5f, 0.25f});
  in["guidance"] = torch::tensor({4.0f, 1.0f});
  auto ref = f32->Forward(in);
  ASSERT_TRUE(ref.ok());
  const double scale = MaxAbs(*ref);
  for (const auto& [dtype, tolerance] : std::vector<std::pair<torch::Dtype, double>>{
           {torch::kBFloat16, 3e-2}, {torch::kFloat16, 2.5e-3}}) {
    auto low = MakeModel(j, dtype, 3);
    ASSERT_NE(low, nullptr);
    auto out = low->Forward(in);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->scalar_type(), dtype);
    const double rel = MaxDiff(*out, *ref) / scale;
    std::cout << c10::toString(dtype) << ": max|low - f32| / max|f32| = " << rel << "\n";
    EXPECT_LE(rel, tolerance) << c10::toString(dtype);
    EXPECT_GT(rel, 0.0) << "expected rounding differences for " << c10::toString(dtype);
    // Intermediates come back in the model dtype.
    Intermediates inter;
    ASSERT_TRUE(low->ForwardWithIntermediates(in, &inter).ok());
    EXPECT_EQ(inter.at("transformer_blocks.0.1").scalar_type(), dtype);
    EXPECT_EQ(inter.at("pos_embed.0").scalar_type(), torch::kFloat32);
  }
}

TEST(FluxTransformerTest, Float16ClipsBlockOutputs) {
  // A huge context MLP gate overflows float16 in the text residual; diffusers clips the block
  // output to ±65504 instead of propagating inf.
  nlohmann::json j = TinyConfig();
  j["num_single_layers"] = 0;
  auto model = MakeModel(j, torch::kFloat16);
  ASSERT_NE(model, nullptr);
  {
    torch::NoGradGuard no_grad;
    FluxTransformerBlockImpl& block = *model->transformer()->blocks[0];
    block.norm1_context->linear->bias.narrow(0, 5 * 32, 32).fill_(60000);  // c_gate_mlp
    block.ff_context->net_2->weight.mul_(50);
  }
  Intermediates inter;
  auto out = model->ForwardWithIntermediates(MakeInputs(model->flux_config()), &inter);
  ASSERT_TRUE(out.ok()) << out.status();
  const torch::Tensor e = inter.at("transformer_blocks.0.0").to(torch::kFloat);
  EXPECT_TRUE(torch::isfinite(e).all().item<bool>());
  EXPECT_EQ(MaxAbs(e), 65504.0);
  EXPECT_TRUE(torch::isfinite(*out).all().item<bool>());
}

// Differentiable mode (training): the same numbers as the inference path, gradients for every
// parameter and for a LoRA context's tensors, and a gradient that matches a finite difference.
TEST(FluxTransformerTest, DifferentiableModeMatchesInferenceAndBackpropagates) {
  nlohmann::json j = TinyConfig();
  j["num_layers"] = 2;
  j["guidance_embeds"] = true;
  auto model = MakeModel(j);
  ASSERT_NE(model, nullptr);
  const TensorMap in = MakeInputs(model->flux_config(), /*batch=*/2);
  auto reference = model->Forward(in);
  ASSERT_TRUE(reference.ok()) << reference.status();
  auto inputs = model->PrepareInputs(in);
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  FluxTransformer2DModelImpl& net = *model->transformer();
  net.set_differentiable(true);
  const torch::Tensor out = net.forward(*inputs);
  EXPECT_TRUE(out.requires_grad());
  EXPECT_LE(MaxDiff(out, *reference), 1e-5 * MaxAbs(*reference));
  const torch::Tensor target = torch::randn_like(out);
  (out - target).square().mean().backward();
  int64_t nonzero = 0, total = 0;
  for (const auto& p : net.named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    ++total;
    if (p.value().grad().abs().max().item<double>() > 0) ++nonzero;
  }
  // Every parameter influences the output (proj_out's bias too); none may be cut off.
  EXPECT_EQ(nonzero, total);

  // Finite difference on one weight entry of the second double block's MLP.
  torch::Tensor w = net.blocks[1]->ff->net_2->weight;
  const double analytic = w.grad()[3][5].item<double>();
  const double h = 1e-2;
  auto loss_at = [&](double delta) {
    torch::NoGradGuard no_grad;
    const double old = w[3][5].item<double>();
    w[3][5].fill_(old + delta);
    const double l = (net.forward(*inputs) - target).square().mean().item<double>();
    w[3][5].fill_(old);
    return l;
  };
  const double numeric = (loss_at(h) - loss_at(-h)) / (2 * h);
  EXPECT_NEAR(analytic, numeric, 2e-2 * std::abs(numeric) + 1e-6);

  // A LoRA context built from tensors that require grad receives gradients through it.
  torch::Tensor down = (torch::randn({2, 32}) * 0.1).requires_grad_(true);
  torch::Tensor up = (torch::randn({32, 2}) * 0.1).requires_grad_(true);
  ds::LoraContext lora;
  lora.AddDelta("transformer_blocks.0.attn.to_out.0", ds::LoraDelta{down, up, {}, 0.5});
  const torch::Tensor with_lora = net.forward(*inputs, nullptr, &lora);
  EXPECT_GT(MaxDiff(with_lora, out), 0);
  with_lora.sum().backward();
  ASSERT_TRUE(down.grad().defined() && up.grad().defined());
  EXPECT_GT(down.grad().abs().max().item<double>(), 0);
  EXPECT_GT(up.grad().abs().max().item<double>(), 0);
  // The inference path with the same context agrees with the differentiable one.
  net.set_differentiable(false);
  for (const auto& p : net.parameters()) EXPECT_FALSE(p.requires_grad());
  torch::Tensor lora_reference;
  {
    torch::NoGradGuard no_grad;
    ds::LoraContext frozen;
    frozen.AddDelta("transformer_blocks.0.attn.to_out.0",
                    ds::LoraDelta{down.detach(), up.detach(), {}, 0.5});
    lora_reference = net.forward(*inputs, nullptr, &frozen);
  }
  EXPECT_LE(MaxDiff(with_lora.detach(), lora_reference), 1e-5 * MaxAbs(lora_reference));
}

TEST(FluxTransformerTest, DifferentiableModeRefusesEmulatedHalfPrecision) {
  auto model = MakeModel(TinyConfig(), torch::kFloat16);
  ASSERT_NE(model, nullptr);
  auto inputs = model->PrepareInputs(MakeInputs(model->flux_config()));
  ASSERT_TRUE(inputs.ok());
  model->transformer()->set_differentiable(true);
  EXPECT_THROW(model->transformer()->forward(*inputs), c10::Error);
}

}  // namespace
}  // namespace ds::flux
