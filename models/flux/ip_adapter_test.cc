// The Flux IP-Adapter mixin: diffusers' golden forward with an XLabs adapter (scales 1, 0.5, 0;
// image projection and the IP attention output of the block), scale 0 = no adapter bit for bit,
// the diffusers key spelling, a non-golden config checked against an independent computation of
// the IP attention (query after QK-norm, before RoPE), per-request use without touching the
// model, the metadata row, and bad input (an adapter for another width, missing/unexpected keys,
// bad embeds and scales).
#include "models/flux/ip_adapter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <iostream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/spec.h"
#include "models/flux/transformer.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

fs::path IpDir() { return fs::path(test::GoldenDir()) / "conditioning" / "ip_adapter"; }
fs::path DevTransformerDir() {
  return fs::path(test::GoldenDir()) / "pipeline" / "flux_pipeline" / "dev" / "transformer";
}

std::shared_ptr<const SafetensorsFile> ForwardFile() {
  auto f = SafetensorsFile::Open((IpDir() / "forward.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? *f : nullptr;
}

torch::Tensor Get(const SafetensorsFile& f, const std::string& key) {
  auto t = f.Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

// The README's float tolerance: |ours - golden| <= 1e-4 + 1e-4·|golden|.
void ExpectClose(const torch::Tensor& ours, const torch::Tensor& golden, const std::string& what) {
  ASSERT_TRUE(ours.defined()) << what;
  ASSERT_EQ(ours.sizes(), golden.sizes()) << what;
  const torch::Tensor a = ours.to(torch::kDouble), b = golden.to(torch::kDouble);
  EXPECT_LE(((a - b).abs() - (1e-4 + 1e-4 * b.abs())).max().item<double>(), 0.0)
      << what << ": max |diff| " << (a - b).abs().max().item<double>();
  std::cout << what << ": max |ours - golden| = " << (a - b).abs().max().item<double>() << "\n";
}

FluxTransformer* AsFlux(const std::unique_ptr<DiffusionModel>& m) {
  return dynamic_cast<FluxTransformer*>(m.get());
}

class IPAdapterGoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto loaded = LoadModelFromFolder(DevTransformerDir().string(), ModelOptions{});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = std::move(loaded).value();
    ASSERT_NE(AsFlux(model_), nullptr);
    file_ = ForwardFile();
    ASSERT_NE(file_, nullptr);
    for (const std::string& name : file_->names()) {
      if (name.rfind("inputs/", 0) == 0 && name != "inputs/ip_adapter_image_embeds") {
        inputs_[name.substr(7)] = Get(*file_, name);
      }
    }
    embeds_ = Get(*file_, "inputs/ip_adapter_image_embeds");
    auto adapter =
        FluxIPAdapter::Load((IpDir() / "ip_adapter.safetensors").string(), flux().flux_config());
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapter_ = *adapter;
  }
  const FluxTransformer& flux() const { return *AsFlux(model_); }
  FluxIPAdapterConditioning Conditioning(double scale) const {
    FluxIPAdapterConditioning c;
    c.adapters.push_back({adapter_, embeds_, {scale}});
    return c;
  }

  std::unique_ptr<DiffusionModel> model_;
  std::shared_ptr<const SafetensorsFile> file_;
  TensorMap inputs_;
  torch::Tensor embeds_;
  FluxIPAdapterPtr adapter_;
};

TEST_F(IPAdapterGoldenTest, AdapterShapesAreDerived) {
  EXPECT_EQ(adapter_->format(), kIPAdapterFormatXLabs);
  EXPECT_EQ(adapter_->num_tokens(), 4);  // the README: 4 image tokens
  EXPECT_EQ(adapter_->image_embed_dim(), 32);
  EXPECT_EQ(adapter_->num_layers(), flux().flux_config().num_layers);
}

TEST_F(IPAdapterGoldenTest, NoAdapterMatches) {
  auto out = model_->Forward(inputs_);
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectClose(*out, Get(*file_, "output/no_adapter"), "output/no_adapter");
}

TEST_F(IPAdapterGoldenTest, EveryScaleMatchesDiffusers) {
  for (const char* scale_name : {"1.0", "0.5"}) {
    const double scale = std::stod(scale_name);
    const FluxIPAdapterConditioning ip = Conditioning(scale);
    Intermediates inter;
    auto out = flux().ForwardWithIPAdapter(inputs_, nullptr, &ip, &inter);
    ASSERT_TRUE(out.ok()) << out.status();
    const std::string s = absl::StrCat("scale", scale_name);
    ExpectClose(*out, Get(*file_, "output/" + s), "output/" + s);
    ASSERT_TRUE(inter.count("ip_hidden_states.0")) << s;
    ExpectClose(inter.at("ip_hidden_states.0"), Get(*file_, s + "/ip_hidden_states.0"),
                s + "/ip_hidden_states.0");
    const std::string ip_attn = "transformer_blocks.0.attn.ip_attn_output";
    ASSERT_TRUE(inter.count(ip_attn)) << s;
    ExpectClose(inter.at(ip_attn), Get(*file_, s + "/" + ip_attn), s + "/" + ip_attn);
  }
}

TEST_F(IPAdapterGoldenTest, ScaleZeroIsTheNoAdapterOutputBitForBit) {
  auto plain = model_->Forward(inputs_);
  ASSERT_TRUE(plain.ok());
  const FluxIPAdapterConditioning ip = Conditioning(0.0);
  Intermediates inter;
  auto zero = flux().ForwardWithIPAdapter(inputs_, nullptr, &ip, &inter);
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_TRUE(torch::equal(*zero, *plain));
  ExpectClose(*zero, Get(*file_, "output/scale0.0"), "output/scale0.0");
  // diffusers still projects the image (recorded), and its IP term is 0·x = 0; we skip both.
  EXPECT_TRUE(
      Get(*file_, "scale0.0/transformer_blocks.0.attn.ip_attn_output").eq(0).all().item<bool>());
  EXPECT_FALSE(inter.count("transformer_blocks.0.attn.ip_attn_output"));
  auto projected = adapter_->ProjectImageEmbeds(embeds_);
  ASSERT_TRUE(projected.ok()) << projected.status();
  ExpectClose(*projected, Get(*file_, "scale0.0/ip_hidden_states.0"), "ProjectImageEmbeds");
}

TEST_F(IPAdapterGoldenTest, DiffusersSpellingAndPerLayerScalesAreTheSame) {
  auto sd = LoadSafetensorsWeights((IpDir() / "ip_adapter.safetensors").string());
  ASSERT_TRUE(sd.ok());
  auto diffusers =
      FluxIPAdapter::FromStateDict(adapter_->DiffusersStateDict(), flux().flux_config());
  ASSERT_TRUE(diffusers.ok()) << diffusers.status();
  EXPECT_EQ((*diffusers)->format(), kIPAdapterFormatDiffusers);
  FluxIPAdapterConditioning a = Conditioning(0.5), b;
  b.adapters.push_back(
      {*diffusers, embeds_,
       std::vector<double>(static_cast<size_t>(flux().flux_config().num_layers), 0.5)});
  auto x = flux().ForwardWithIPAdapter(inputs_, nullptr, &a);
  auto y = flux().ForwardWithIPAdapter(inputs_, nullptr, &b);
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_TRUE(torch::equal(*x, *y));
}

TEST_F(IPAdapterGoldenTest, HandlerInspectsTheHeader) {
  auto f = SafetensorsFile::Open((IpDir() / "ip_adapter.safetensors").string());
  ASSERT_TRUE(f.ok());
  KeyShapes shapes;
  for (const auto& n : (*f)->names()) shapes[n] = (*(*f)->info(n))->shape;
  auto summary = FluxIPAdapterHandler().Inspect(shapes, flux().config());
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->format, "xlabs");
  EXPECT_EQ(summary->num_tokens, 4);
  EXPECT_EQ(summary->image_embed_dim, 32);
  EXPECT_EQ(summary->num_layers, 1);
}

// ---------------------------------------------------------------------------------------------
// A non-golden config: 2 double blocks, 3 heads of 8, joint dim 20, 3 image tokens from 12-wide
// embeds.

nlohmann::json SmallConfig() {
  return {{"in_channels", 8},           {"num_layers", 2},
          {"num_single_layers", 1},     {"attention_head_dim", 8},
          {"num_attention_heads", 3},   {"joint_attention_dim", 20},
          {"pooled_projection_dim", 6}, {"axes_dims_rope", {2, 2, 4}}};
}

constexpr int64_t kTokens = 3, kEmbed = 12;

// An XLabs-layout adapter for `cfg` with random values.
TensorMap RandomAdapter(const FluxConfig& cfg, int64_t tokens = kTokens, int seed = 11) {
  torch::manual_seed(seed);
  const int64_t c = cfg.joint_attention_dim, inner = cfg.inner_dim();
  TensorMap sd = {{"ip_adapter_proj_model.proj.weight", torch::randn({tokens * c, kEmbed}) * 0.3},
                  {"ip_adapter_proj_model.proj.bias", torch::randn({tokens * c}) * 0.1},
                  {"ip_adapter_proj_model.norm.weight", 1 + torch::randn({c}) * 0.1},
                  {"ip_adapter_proj_model.norm.bias", torch::randn({c}) * 0.1}};
  for (int64_t i = 0; i < cfg.num_layers; ++i) {
    const std::string p = absl::StrCat("double_blocks.", i, ".processor.ip_adapter_double_stream_");
    for (const char* kv : {"k", "v"}) {
      sd[absl::StrCat(p, kv, "_proj.weight")] = torch::randn({inner, c}) * 0.3;
      sd[absl::StrCat(p, kv, "_proj.bias")] = torch::randn({inner}) * 0.1;
    }
  }
  return sd;
}

TensorMap SmallInputs(const FluxConfig& cfg, int64_t batch) {
  torch::manual_seed(5);
  const int64_t img = 6, txt = 4;
  return {{"hidden_states", torch::randn({batch, img, cfg.in_channels})},
          {"encoder_hidden_states", torch::randn({batch, txt, cfg.joint_attention_dim})},
          {"pooled_projections", torch::randn({batch, cfg.pooled_projection_dim})},
          {"timestep", torch::full({batch}, 0.6)},
          {"img_ids", torch::randint(0, 4, {img, 3}).to(torch::kFloat)},
          {"txt_ids", torch::zeros({txt, 3})}};
}

class IPAdapterSmallTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = FluxTransformer::Create(SmallConfig(), ModelOptions{});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(model).value();
    InitRandomWeights(model_->module(), 3);
    auto adapter = FluxIPAdapter::FromStateDict(RandomAdapter(cfg()), cfg());
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapter_ = *adapter;
    torch::manual_seed(9);
    embeds_ = torch::randn({1, 2, kEmbed});  // two images
  }
  const FluxConfig& cfg() const { return model_->flux_config(); }
  FluxIPAdapterConditioning Conditioning(std::vector<double> scales,
                                         torch::Tensor embeds = {}) const {
    FluxIPAdapterConditioning c;
    c.adapters.push_back({adapter_, embeds.defined() ? embeds : embeds_, std::move(scales)});
    return c;
  }
  std::unique_ptr<FluxTransformer> model_;
  FluxIPAdapterPtr adapter_;
  torch::Tensor embeds_;
};

TEST_F(IPAdapterSmallTest, IPAttentionIsAnIndependentComputationOfTheImageQuery) {
  // Recompute block 1's IP term from its captured modulated input: q = norm_q(to_q(norm1(h)))
  // split into heads (RMSNorm over head_dim, no RoPE), k/v from the projected image tokens.
  const FluxIPAdapterConditioning ip = Conditioning({0.7, 1.3});
  Intermediates inter;
  auto out = model_->ForwardWithIPAdapter(SmallInputs(cfg(), 1), nullptr, &ip, &inter);
  ASSERT_TRUE(out.ok()) << out.status();
  const TensorMap p = NamedTensors(model_->module());
  for (int block = 0; block < 2; ++block) {
    const std::string b = absl::StrCat("transformer_blocks.", block, ".");
    const torch::Tensor nh = inter.at(b + "norm1.0");  // [1, 6, 24]
    torch::Tensor q = torch::linear(nh, p.at(b + "attn.to_q.weight"), p.at(b + "attn.to_q.bias"))
                          .view({1, 6, 3, 8});
    q = q * torch::rsqrt(q.pow(2).mean(-1, true) + 1e-6) * p.at(b + "attn.norm_q.weight");
    auto tokens = adapter_->ProjectImageEmbeds(embeds_);  // [1, 2, 3, 20]
    ASSERT_TRUE(tokens.ok());
    const torch::Tensor t = tokens->reshape({1, 6, 20});
    const auto& l = adapter_->layer(block);
    const torch::Tensor k = torch::linear(t, l.k_weight, l.k_bias).view({1, 6, 3, 8});
    const torch::Tensor v = torch::linear(t, l.v_weight, l.v_bias).view({1, 6, 3, 8});
    const torch::Tensor att =
        torch::softmax(torch::einsum("bshd,bthd->bhst", {q, k}) / std::sqrt(8.0), -1);
    const torch::Tensor o = torch::einsum("bhst,bthd->bshd", {att, v}).reshape({1, 6, 24});
    const double scale = block == 0 ? 0.7 : 1.3;
    const torch::Tensor ours = inter.at(b + "attn.ip_attn_output");
    EXPECT_TRUE(torch::allclose(ours, o * scale, 1e-5, 1e-6))
        << "block " << block << " max diff " << (ours - o * scale).abs().max().item<double>();
  }
}

TEST_F(IPAdapterSmallTest, ZeroScaleLayersAreSkippedAndScalesAreLinear) {
  const TensorMap in = SmallInputs(cfg(), 1);
  auto plain = model_->Forward(in);
  ASSERT_TRUE(plain.ok());
  const FluxIPAdapterConditioning zero = Conditioning({0.0, 0.0});
  auto z = model_->ForwardWithIPAdapter(in, nullptr, &zero);
  ASSERT_TRUE(z.ok());
  EXPECT_TRUE(torch::equal(*z, *plain));
  // Only block 1 conditioned: block 0's outputs stay those of the plain forward.
  Intermediates a, b;
  const FluxIPAdapterConditioning only1 = Conditioning({0.0, 1.0});
  ASSERT_TRUE(model_->ForwardWithIPAdapter(in, nullptr, &only1, &a).ok());
  ASSERT_TRUE(model_->ForwardWithIntermediates(in, &b).ok());
  EXPECT_TRUE(torch::equal(a.at("transformer_blocks.0.1"), b.at("transformer_blocks.0.1")));
  EXPECT_FALSE(torch::equal(a.at("transformer_blocks.1.1"), b.at("transformer_blocks.1.1")));
  EXPECT_FALSE(a.count("transformer_blocks.0.attn.ip_attn_output"));
  // The IP term is scale · attention: halving the scale halves it exactly (same inputs to it).
  Intermediates half;
  const FluxIPAdapterConditioning only1_half = Conditioning({0.0, 0.5});
  ASSERT_TRUE(model_->ForwardWithIPAdapter(in, nullptr, &only1_half, &half).ok());
  const std::string key = "transformer_blocks.1.attn.ip_attn_output";
  EXPECT_TRUE(torch::equal(half.at(key) * 2, a.at(key)));
}

TEST_F(IPAdapterSmallTest, BatchOneEmbedsBroadcastAndRequestsDoNotInterfere) {
  const TensorMap in = SmallInputs(cfg(), 2);
  const FluxIPAdapterConditioning one = Conditioning({1.0});
  const FluxIPAdapterConditioning two = Conditioning({1.0}, embeds_.expand({2, -1, -1}));
  auto a = model_->ForwardWithIPAdapter(in, nullptr, &one);
  auto b = model_->ForwardWithIPAdapter(in, nullptr, &two);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_TRUE(torch::allclose(*a, *b, 1e-5, 1e-5)) << (*a - *b).abs().max().item<double>();
  // Concurrent requests with different scales give what they give alone.
  const FluxIPAdapterConditioning other = Conditioning({0.25, 2.0});
  auto alone = model_->ForwardWithIPAdapter(in, nullptr, &other);
  ASSERT_TRUE(alone.ok());
  torch::Tensor r1, r2;
  std::thread t1([&] { r1 = *model_->ForwardWithIPAdapter(in, nullptr, &one); });
  std::thread t2([&] { r2 = *model_->ForwardWithIPAdapter(in, nullptr, &other); });
  t1.join();
  t2.join();
  EXPECT_TRUE(torch::allclose(r1, *a, 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(r2, *alone, 1e-5, 1e-5));
  auto plain = model_->Forward(in);  // the model itself is unchanged
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(torch::allclose(*plain, *a));
}

TEST_F(IPAdapterSmallTest, TwoAdaptersAddUp) {
  const TensorMap in = SmallInputs(cfg(), 1);
  auto second = FluxIPAdapter::FromStateDict(RandomAdapter(cfg(), 2, 23), cfg());
  ASSERT_TRUE(second.ok());
  FluxIPAdapterConditioning both = Conditioning({1.0});
  both.adapters.push_back({*second, torch::randn({1, kEmbed}), {0.5}});
  FluxIPAdapterConditioning first_only = Conditioning({1.0}), second_only;
  second_only.adapters.push_back(both.adapters[1]);
  Intermediates ab, a, b;
  ASSERT_TRUE(model_->ForwardWithIPAdapter(in, nullptr, &both, &ab).ok());
  ASSERT_TRUE(model_->ForwardWithIPAdapter(in, nullptr, &first_only, &a).ok());
  ASSERT_TRUE(model_->ForwardWithIPAdapter(in, nullptr, &second_only, &b).ok());
  // Block 0 sees the same inputs in all three runs: its IP term is the sum of the two.
  const std::string key = "transformer_blocks.0.attn.ip_attn_output";
  EXPECT_TRUE(torch::allclose(ab.at(key), a.at(key) + b.at(key), 1e-6, 1e-6));
  EXPECT_TRUE(ab.count("ip_hidden_states.1"));
}

TEST_F(IPAdapterSmallTest, BFloat16FollowsFloat32) {
  // The emulated-bfloat16 CPU path rounds the IP branch like the rest of the forward.
  ModelOptions bf16;
  bf16.dtype = torch::kBFloat16;
  auto low = FluxTransformer::Create(SmallConfig(), bf16);
  ASSERT_TRUE(low.ok());
  ASSERT_TRUE(LoadStateDict((*low)->module(), NamedTensors(model_->module())).ok());
  auto adapter = FluxIPAdapter::FromStateDict(RandomAdapter(cfg()), cfg(), torch::kBFloat16);
  ASSERT_TRUE(adapter.ok());
  EXPECT_EQ((*adapter)->dtype(), torch::kBFloat16);
  FluxIPAdapterConditioning ip;
  ip.adapters.push_back({*adapter, embeds_, {1.0}});
  const FluxIPAdapterConditioning ref = Conditioning({1.0});
  const TensorMap in = SmallInputs(cfg(), 1);
  auto a = model_->ForwardWithIPAdapter(in, nullptr, &ref);
  auto b = (*low)->ForwardWithIPAdapter(in, nullptr, &ip);
  auto plain = (*low)->Forward(in);
  ASSERT_TRUE(a.ok() && b.ok() && plain.ok()) << b.status();
  EXPECT_EQ(b->scalar_type(), torch::kBFloat16);
  const double scale = a->abs().max().item<double>();
  EXPECT_LT((b->to(torch::kFloat) - *a).abs().max().item<double>(), 0.05 * scale);
  EXPECT_FALSE(torch::equal(*b, *plain));
}

TEST(FluxIPAdapterPlanTest, AnAdapterForAnotherWidthIsRejectedWithShapes) {
  auto small = FluxConfig::FromJson(SmallConfig());
  ASSERT_TRUE(small.ok());
  nlohmann::json wide_json = SmallConfig();
  wide_json["num_attention_heads"] = 4;  // inner_dim 32 instead of 24
  auto wide = FluxConfig::FromJson(wide_json);
  ASSERT_TRUE(wide.ok());
  auto r = FluxIPAdapter::FromStateDict(RandomAdapter(*wide), *small, torch::kFloat32, torch::kCPU,
                                        "wide.safetensors");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr("wide.safetensors"));
  EXPECT_THAT(msg, HasSubstr("double_blocks.0.processor.ip_adapter_double_stream_k_proj"));
  EXPECT_THAT(msg, HasSubstr("[24, 20]"));
  EXPECT_THAT(msg, HasSubstr("[32, 20]"));
  // Another joint_attention_dim: the projection's norm says so.
  nlohmann::json other_json = SmallConfig();
  other_json["joint_attention_dim"] = 16;
  auto other = FluxConfig::FromJson(other_json);
  ASSERT_TRUE(other.ok());
  auto r2 = FluxIPAdapter::FromStateDict(RandomAdapter(*other), *small);
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r2.status().message()), HasSubstr("ip_adapter_proj_model."));
}

TEST(FluxIPAdapterPlanTest, MissingUnexpectedAndOutOfRangeKeysAreNamed) {
  auto cfg = FluxConfig::FromJson(SmallConfig());
  ASSERT_TRUE(cfg.ok());
  auto expect_error = [&](TensorMap sd, const std::string& needle) {
    auto r = FluxIPAdapter::FromStateDict(sd, *cfg);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(needle));
  };
  TensorMap sd = RandomAdapter(*cfg);
  sd.erase("double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias");
  expect_error(sd, "double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias");
  sd = RandomAdapter(*cfg);
  sd["double_blocks.2.processor.ip_adapter_double_stream_k_proj.weight"] = torch::zeros({24, 20});
  expect_error(sd, "block 2 does not exist");
  sd = RandomAdapter(*cfg);
  sd["single_blocks.0.processor.ip_adapter_single_stream_k_proj.weight"] = torch::zeros({24, 20});
  expect_error(sd, "unexpected key");
  sd = RandomAdapter(*cfg);
  sd["image_proj.norm.bias"] = torch::zeros({20});
  expect_error(sd, "also given as");
  sd = RandomAdapter(*cfg);
  sd["ip_adapter_proj_model.proj.weight"] = torch::zeros({50, kEmbed});  // 50 % 20 != 0
  expect_error(sd, "not a multiple of 20");
  sd = RandomAdapter(*cfg);
  sd["ip_adapter_proj_model.norm.weight"].fill_(NAN);
  expect_error(sd, "NaN");
  expect_error(TensorMap{}, "no IP-Adapter keys");
  EXPECT_EQ(FluxIPAdapter::Load("/nonexistent/ip.safetensors", *cfg).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(IPAdapterSmallTest, BadConditioningIsNamed) {
  const TensorMap in = SmallInputs(cfg(), 2);
  auto expect_error = [&](const FluxIPAdapterConditioning& ip, const std::string& needle) {
    auto r = model_->ForwardWithIPAdapter(in, nullptr, &ip);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(needle));
  };
  expect_error(Conditioning({1.0}, torch::randn({1, 2, kEmbed + 1})), "image_embeds");
  expect_error(Conditioning({1.0}, torch::randn({3, 2, kEmbed})), "batch size 3");
  expect_error(Conditioning({1.0}, torch::randn({1, 2, 2, kEmbed})), "image_embeds");
  expect_error(Conditioning({1.0, 1.0, 1.0}), "scales");
  expect_error(Conditioning({1.0, NAN}), "scales[1]");
  FluxIPAdapterConditioning null_adapter;
  null_adapter.adapters.push_back({nullptr, embeds_, {1.0}});
  expect_error(null_adapter, "no adapter");
  // An adapter built for another transformer.
  nlohmann::json deeper = SmallConfig();
  deeper["num_layers"] = 3;
  auto deeper_cfg = FluxConfig::FromJson(deeper);
  ASSERT_TRUE(deeper_cfg.ok());
  auto foreign = FluxIPAdapter::FromStateDict(RandomAdapter(*deeper_cfg), *deeper_cfg);
  ASSERT_TRUE(foreign.ok());
  FluxIPAdapterConditioning wrong;
  wrong.adapters.push_back({*foreign, embeds_, {1.0}});
  expect_error(wrong, "another transformer");
}

TEST(FluxIPAdapterSpecTest, TheMetadataRowComesFromTheWiredMixin) {
  ModelSpec spec = MakeFluxSpec();
  ASSERT_NE(spec.ip_adapter, nullptr);
  const ModelMetadata meta = BuildModelMetadata(spec);
  ASSERT_TRUE(meta.contains("_supports_ip_adapter"));
  EXPECT_EQ(meta.Find("_supports_ip_adapter")->display, "True");
  spec.ip_adapter = nullptr;
  EXPECT_FALSE(BuildModelMetadata(spec).contains("_supports_ip_adapter"));
  EXPECT_THAT(FluxIPAdapterHandler().FormatNames(), ::testing::Contains("xlabs"));
}

}  // namespace
}  // namespace ds::flux
