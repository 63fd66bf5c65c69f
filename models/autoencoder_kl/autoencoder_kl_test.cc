// AutoencoderKL: config parsing, module structure (diffusers names), validation of inputs, folder
// loading errors, the spec's registration and metadata, and the differentiable (training) mode:
// equal to the inference path, gradients for every parameter, finite-difference checks.
#include "models/autoencoder_kl/autoencoder_kl.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/autoencoder_kl/spec.h"
#include "testing/gradient_check.h"
#include "testing/test_util.h"

namespace ds::autoencoder_kl {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

fs::path VaeFolder() { return fs::path(GoldenDir()) / "pipeline" / "vae" / "vae"; }

nlohmann::json TinyConfig() {
  return {{"block_out_channels", {4, 8}},
          {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D"}},
          {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D"}},
          {"latent_channels", 2},
          {"norm_num_groups", 2},
          {"use_quant_conv", false},
          {"use_post_quant_conv", false}};
}

// "ds::autoencoder_kl::ResnetBlock2DImpl" -> "ResnetBlock2D"
std::string Short(std::string name) {
  if (auto p = name.rfind("::"); p != std::string::npos) name = name.substr(p + 2);
  if (name.size() > 4 && name.substr(name.size() - 4) == "Impl") name.resize(name.size() - 4);
  return name;
}

// ---------------------------------------------------------------------------------------------
// Config

TEST(AutoencoderKLConfigTest, DefaultsAreDiffusers) {
  auto c = AutoencoderKLConfig::FromJson(nlohmann::json::object());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->in_channels, 3);
  EXPECT_EQ(c->out_channels, 3);
  EXPECT_EQ(c->block_out_channels, (std::vector<int64_t>{64}));
  EXPECT_EQ(c->down_block_types, (std::vector<std::string>{"DownEncoderBlock2D"}));
  EXPECT_EQ(c->up_block_types, (std::vector<std::string>{"UpDecoderBlock2D"}));
  EXPECT_EQ(c->layers_per_block, 1);
  EXPECT_EQ(c->act_fn, "silu");
  EXPECT_EQ(c->latent_channels, 4);
  EXPECT_EQ(c->norm_num_groups, 32);
  EXPECT_EQ(c->sample_size, (std::vector<int64_t>{32}));
  EXPECT_DOUBLE_EQ(c->scaling_factor, 0.18215);
  EXPECT_FALSE(c->shift_factor.has_value());
  EXPECT_FALSE(c->latents_mean.has_value());
  EXPECT_FALSE(c->latents_std.has_value());
  EXPECT_TRUE(c->force_upcast);
  EXPECT_TRUE(c->use_quant_conv);
  EXPECT_TRUE(c->use_post_quant_conv);
  EXPECT_TRUE(c->mid_block_add_attention);
  EXPECT_EQ(c->scale_factor(), 1);
}

TEST(AutoencoderKLConfigTest, GoldenConfigParsesAndRoundTrips) {
  auto json = ReadJsonFile((VaeFolder() / "config.json").string());
  ASSERT_TRUE(json.ok()) << json.status();
  auto c = AutoencoderKLConfig::FromJson(*json);
  ASSERT_TRUE(c.ok()) << c.status();
  const nlohmann::json out = c->ToJson();
  // Every field of the diffusers config.json is present with the same value.
  for (const auto& [key, value] : json->items()) {
    if (key[0] == '_') continue;
    ASSERT_TRUE(out.contains(key)) << key;
    EXPECT_EQ(out[key], value) << key;
  }
  EXPECT_EQ(out.size(), json->size() - 1);  // all but _diffusers_version
  auto again = AutoencoderKLConfig::FromJson(out);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->ToJson(), out);
  EXPECT_EQ(c->scale_factor(), 4);
  // sample_size as [h, w] and latents statistics round-trip too.
  nlohmann::json j = TinyConfig();
  j["sample_size"] = {64, 96};
  j["latents_mean"] = {0.5, -0.25};
  j["shift_factor"] = 0.1;
  auto with = AutoencoderKLConfig::FromJson(j);
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_EQ(with->ToJson()["sample_size"], nlohmann::json({64, 96}));
  EXPECT_EQ(with->ToJson()["latents_mean"], nlohmann::json({0.5, -0.25}));
  EXPECT_EQ(AutoencoderKLConfig::FromJson(with->ToJson())->ToJson(), with->ToJson());
}

TEST(AutoencoderKLConfigTest, ErrorsNameTheField) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"up_block_types", {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}, "AttnUpDecoderBlock2D"},
      {"down_block_types", {"DownEncoderBlock2D", "CrossAttnDownBlock2D"}, "down_block_types"},
      {"up_block_types", {"UpDecoderBlock2D"}, "up_block_types"},  // one entry for two levels
      {"norm_num_groups", 3, "norm_num_groups"},                   // does not divide 4
      {"act_fn", "gelu", "act_fn"},
      {"latent_channels", 0, "latent_channels"},
      {"latent_channels", 4.0, "latent_channels"},
      {"layers_per_block", 0, "layers_per_block"},
      {"block_out_channels", nlohmann::json::array(), "block_out_channels"},
      {"block_out_channels", {4, -8}, "block_out_channels"},
      {"scaling_factor", "0.3611", "scaling_factor"},
      {"scaling_factor", 0, "scaling_factor"},
      {"shift_factor", "x", "shift_factor"},
      {"use_quant_conv", 1, "use_quant_conv"},
      {"sample_size", {1, 2, 3}, "sample_size"},
      {"latents_mean", "none", "latents_mean"},
      {"_class_name", "AutoencoderTiny", "_class_name"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = TinyConfig();
    j[c.key] = c.value;
    auto cfg = AutoencoderKLConfig::FromJson(j);
    ASSERT_FALSE(cfg.ok()) << c.key << " = " << c.value.dump();
    EXPECT_EQ(cfg.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(cfg.status().message()), HasSubstr(c.expected)) << c.value.dump();
  }
  nlohmann::json extra = TinyConfig();
  extra["some_future_flag"] = true;
  EXPECT_TRUE(AutoencoderKLConfig::FromJson(extra).ok());
  // The factory reports the same error.
  nlohmann::json bad = TinyConfig();
  bad["up_block_types"] = {"UpDecoderBlock2D", "UpBlock2D"};
  auto model = AutoencoderKLModel::Create(bad, ModelOptions{});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("UpBlock2D"));
}

// ---------------------------------------------------------------------------------------------
// Module

TEST(AutoencoderKLTest, ParameterNamesAndShapesAreDiffusers) {
  // The golden folder's weights load with no renaming: names and shapes agree exactly.
  auto folder = OpenModelFolder(VaeFolder().string());
  ASSERT_TRUE(folder.ok()) << folder.status();
  auto model = AutoencoderKLModel::Create(folder->config, ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  const StateDictReport report = CheckStateDict((*model)->module(), folder->weights);
  EXPECT_TRUE(report.ok()) << report.ToString();
  for (const char* name :
       {"decoder.conv_in.weight", "decoder.mid_block.resnets.1.conv2.bias",
        "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight", "decoder.conv_norm_out.weight",
        "decoder.conv_out.bias", "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.conv_out.weight"}) {
    EXPECT_TRUE(folder->weights.count(name)) << name;
  }
  // quant convs only when configured; attention only when configured.
  nlohmann::json j = TinyConfig();
  j["use_quant_conv"] = true;
  j["mid_block_add_attention"] = false;
  auto other = AutoencoderKLModel::Create(j, ModelOptions{});
  ASSERT_TRUE(other.ok());
  const TensorMap named = NamedTensors((*other)->module());
  EXPECT_EQ(named.at("quant_conv.weight").sizes(), (std::vector<int64_t>{4, 4, 1, 1}));
  EXPECT_EQ(named.count("post_quant_conv.weight"), 0u);
  for (const auto& [k, t] : named) EXPECT_EQ(k.find("attentions"), std::string::npos) << k;
}

TEST(AutoencoderKLTest, WeightsComeInTheRequestedDtype) {
  for (torch::Dtype dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    ModelOptions options;
    options.dtype = dtype;
    auto model = AutoencoderKLModel::Create(TinyConfig(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    for (const auto& [k, t] : NamedTensors((*model)->module())) {
      EXPECT_EQ(t.scalar_type(), dtype) << k;
    }
    InitRandomWeights((*model)->module(), 3);
    auto out = (*model)->Decode(torch::randn({1, 2, 3, 4}));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->scalar_type(), dtype);
    EXPECT_EQ(out->sizes(), (std::vector<int64_t>{1, 3, 6, 8}));
  }
  ModelOptions bad;
  bad.dtype = torch::kFloat64;
  EXPECT_EQ(AutoencoderKLModel::Create(TinyConfig(), bad).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AutoencoderKLTest, InputsAreValidatedByName) {
  auto model = LoadAutoencoderKL(VaeFolder().string());
  ASSERT_TRUE(model.ok()) << model.status();
  const AutoencoderKLModel& vae = **model;
  {
    auto r = vae.Decode(torch::zeros({1, 4, 8, 8}));
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("[1, 4, 8, 8]"));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("latent_channels 16"));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("'z'"));
  }
  EXPECT_EQ(vae.Decode(torch::zeros({16, 8, 8})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vae.Decode(torch::zeros({1, 16, 8, 8}, torch::kLong)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vae.Decode(torch::Tensor()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vae.Decode(torch::zeros({0, 16, 8, 8})).status().code(),
            absl::StatusCode::kInvalidArgument);
  {
    auto r = vae.Encode(torch::zeros({1, 3, 3, 8}));  // 3 rows < scale factor 4
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("[1, 3, 3, 8]"));
  }
  EXPECT_EQ(vae.Encode(torch::zeros({1, 4, 8, 8})).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Odd sizes work: each stride-2 level floors.
  auto odd = vae.Encode(torch::zeros({1, 3, 9, 13}));
  ASSERT_TRUE(odd.ok()) << odd.status();
  EXPECT_EQ(odd->mean.sizes(), (std::vector<int64_t>{1, 16, 2, 3}));
  // Forward: the inputs are named.
  EXPECT_THAT(
      std::string(vae.Forward({{"latents", torch::zeros({1, 3, 8, 8})}}).status().message()),
      HasSubstr("'latents'"));
  EXPECT_THAT(std::string(vae.Forward(TensorMap{}).status().message()), HasSubstr("'sample'"));
  EXPECT_EQ(vae.required_inputs(), (std::vector<std::string>{"sample"}));
}

TEST(AutoencoderKLTest, EncodeClampsLogvarAndIsDeterministic) {
  auto model = AutoencoderKLModel::Create(TinyConfig(), ModelOptions{});
  ASSERT_TRUE(model.ok());
  InitRandomWeights((*model)->module(), 5);
  // Make the logvar half of conv_out's bias huge in both directions: the clamp must hold.
  {
    torch::NoGradGuard guard;
    torch::Tensor bias = (*model)->autoencoder()->encoder->conv_out->bias;
    bias.narrow(0, 2, 1).fill_(1000);
    bias.narrow(0, 3, 1).fill_(-1000);
  }
  torch::manual_seed(0);
  const torch::Tensor x = torch::rand({2, 3, 8, 6}) * 2 - 1;
  auto a = (*model)->Encode(x);
  auto b = (*model)->Encode(x);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(a->mean, b->mean));
  EXPECT_EQ(a->logvar.select(1, 0).max().item<float>(), 20.f);
  EXPECT_EQ(a->logvar.select(1, 1).min().item<float>(), -30.f);
  EXPECT_EQ(a->mean.sizes(), (std::vector<int64_t>{2, 2, 4, 3}));
}

TEST(AutoencoderKLTest, AttentionChunkingDoesNotChangeTheResult) {
  auto cfg = AutoencoderKLConfig::FromJson(TinyConfig());
  ASSERT_TRUE(cfg.ok());
  AutoencoderKLOptions whole{*cfg}, chunked{*cfg};
  // Decoder mid block: 2 images x 12 tokens; 72 scores per chunk = 3 query rows, 4 chunks.
  chunked.max_attention_scores = 72;
  AutoencoderKL a(whole), b(chunked);
  InitRandomWeights(*a, 9);
  ASSERT_TRUE(LoadStateDict(*b, NamedTensors(*a)).ok());
  torch::manual_seed(2);
  const torch::Tensor z = torch::randn({2, 2, 3, 4});
  // Chunking only reorders float32 sums: differences stay at rounding level relative to the
  // largest value (values near 0 make an elementwise relative test meaningless).
  auto close = [](const torch::Tensor& u, const torch::Tensor& v) {
    const double scale = std::max(u.abs().max().item<double>(), 1e-30);
    const double diff = (u - v).abs().max().item<double>();
    return ::testing::AssertionResult(diff <= 1e-5 * scale)
           << "max |diff| " << diff << " vs max |value| " << scale;
  };
  const torch::Tensor ya = a->decode(z), yb = b->decode(z);
  EXPECT_TRUE(close(ya, yb));
  const torch::Tensor x = torch::rand({1, 3, 10, 6});
  EXPECT_TRUE(close(a->encode(x).mean, b->encode(x).mean));
}

// ---------------------------------------------------------------------------------------------
// Differentiable (training) mode

// max |u - v| <= tol * max |u| (the output scale; elementwise relative tests are meaningless near
// zero).
::testing::AssertionResult CloseToScale(const torch::Tensor& u, const torch::Tensor& v,
                                        double tol) {
  const double scale = std::max(u.abs().max().item<double>(), 1e-30);
  const double diff = (u.detach() - v.detach()).abs().max().item<double>();
  return ::testing::AssertionResult(diff <= tol * scale)
         << "max |diff| " << diff << " vs max |value| " << scale;
}

// A float32 tiny VAE whose mid-block attention runs in several chunks in both modes (encoder and
// decoder mid blocks: 2 images x 16 tokens; 64 scores per chunk = 2 query rows, 8 chunks).
AutoencoderKL ChunkedTinyVae() {
  auto cfg = AutoencoderKLConfig::FromJson(TinyConfig());
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  AutoencoderKLOptions options{*cfg};
  options.max_attention_scores = 64;
  AutoencoderKL vae(options);
  InitRandomWeights(*vae, 13);
  return vae;
}

// The training objective: encode -> reparameterized sample (fixed noise) -> decode, weighted by
// fixed random coefficients (so no parameter's gradient vanishes by symmetry), plus a KL-like term
// on the posterior.
torch::Tensor TrainingLoss(const AutoencoderKLImpl& vae, const torch::Tensor& x,
                           const torch::Tensor& noise, const torch::Tensor& weights) {
  const Posterior p = vae.encode(x);
  const torch::Tensor z = p.mean + torch::exp(0.5 * p.logvar) * noise;
  const torch::Tensor y = vae.decode(z);
  const torch::Tensor kl = 0.5 * (p.mean.pow(2) + p.logvar.exp() - 1 - p.logvar).mean();
  return (y * weights).sum() + 0.1 * kl;
}

TEST(AutoencoderKLDifferentiableTest, ForwardEqualsTheInferencePathAndToggles) {
  AutoencoderKL vae = ChunkedTinyVae();
  EXPECT_FALSE(vae->differentiable());
  for (const auto& p : vae->parameters()) ASSERT_FALSE(p.requires_grad());
  torch::manual_seed(3);
  const torch::Tensor x = torch::rand({2, 3, 8, 8}) * 2 - 1;
  const torch::Tensor z = torch::randn({2, 2, 4, 4});
  Intermediates inference_captures;
  const Posterior pi = vae->encode(x);
  const torch::Tensor yi = vae->decode(z, &inference_captures);
  EXPECT_TRUE(yi.is_inference());

  vae->set_differentiable(true);
  EXPECT_TRUE(vae->differentiable());
  for (const auto& p : vae->parameters()) ASSERT_TRUE(p.requires_grad());
  Intermediates captures;
  const Posterior pd = vae->encode(x);
  const torch::Tensor yd = vae->decode(z, &captures);
  EXPECT_FALSE(yd.is_inference());
  EXPECT_TRUE(yd.requires_grad());
  EXPECT_TRUE(pd.mean.requires_grad());
  EXPECT_TRUE(pd.logvar.requires_grad());
  EXPECT_TRUE(CloseToScale(yi, yd, 1e-5));
  EXPECT_TRUE(CloseToScale(pi.mean, pd.mean, 1e-5));
  EXPECT_TRUE(CloseToScale(pi.logvar, pd.logvar, 1e-5));
  ASSERT_EQ(captures.size(), inference_captures.size());
  for (const auto& [name, t] : inference_captures) {
    ASSERT_TRUE(captures.count(name)) << name;
    EXPECT_TRUE(CloseToScale(t, captures.at(name), 1e-5)) << name;
  }

  // Back to the default: bit-identical to the first inference run, parameters frozen again.
  vae->set_differentiable(false);
  for (const auto& p : vae->parameters()) ASSERT_FALSE(p.requires_grad());
  EXPECT_TRUE(torch::equal(vae->decode(z), yi));
  EXPECT_TRUE(torch::equal(vae->encode(x).mean, pi.mean));
}

TEST(AutoencoderKLDifferentiableTest, EveryParameterAndTheInputGetAFiniteGradient) {
  AutoencoderKL vae = ChunkedTinyVae();
  vae->set_differentiable(true);
  torch::manual_seed(4);
  const torch::Tensor x = (torch::rand({2, 3, 8, 8}) * 2 - 1).requires_grad_(true);
  const torch::Tensor noise = torch::randn({2, 2, 4, 4});
  const torch::Tensor weights = torch::randn({2, 3, 8, 8});
  TrainingLoss(*vae, x, noise, weights).backward();
  int64_t count = 0, nonzero = 0;
  for (const auto& item : vae->named_parameters()) {
    const torch::Tensor& g = item.value().grad();
    ASSERT_TRUE(g.defined()) << item.key();
    EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << item.key();
    EXPECT_EQ(g.sizes(), item.value().sizes()) << item.key();
    ++count;
    if (g.abs().max().item<double>() > 0) {
      ++nonzero;
    } else {
      ADD_FAILURE() << item.key() << " has an all-zero gradient";
    }
  }
  EXPECT_GT(count, 50);
  EXPECT_EQ(nonzero, count);
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  EXPECT_GT(x.grad().abs().max().item<double>(), 0);
}

TEST(AutoencoderKLDifferentiableTest, GradientMatchesFiniteDifferences) {
  AutoencoderKL vae = ChunkedTinyVae();
  vae->set_differentiable(true);
  torch::manual_seed(5);
  const torch::Tensor x = torch::rand({2, 3, 8, 8}) * 2 - 1;
  const torch::Tensor noise = torch::randn({2, 2, 4, 4});
  const torch::Tensor weights = torch::randn({2, 3, 8, 8});
  TrainingLoss(*vae, x, noise, weights).backward();
  const auto params = vae->named_parameters();
  // The attentions' query and value projections (the score product is the one operation that
  // differs between the paths), an encoder convolution and a decoder GroupNorm scale.
  for (const char* name :
       {"decoder.mid_block.attentions.0.to_q.weight", "encoder.mid_block.attentions.0.to_v.weight",
        "encoder.conv_in.weight", "decoder.up_blocks.1.resnets.0.norm1.weight"}) {
    SCOPED_TRACE(name);
    ASSERT_NE(params.find(name), nullptr);
    torch::Tensor p = params[name];
    const test::GradientEntry g =
        test::LargestGradientEntry(p, [&] { return TrainingLoss(*vae, x, noise, weights).item<double>(); });
    ASSERT_NE(g.analytic, 0.0);
    EXPECT_NEAR(g.numeric, g.analytic, 2e-2 * std::abs(g.analytic)) << "entry " << g.index;
  }
}

TEST(AutoencoderKLDifferentiableTest, SixteenBitModelsAreRefused) {
  auto cfg = AutoencoderKLConfig::FromJson(TinyConfig());
  ASSERT_TRUE(cfg.ok());
  AutoencoderKL vae(AutoencoderKLOptions{*cfg, torch::kBFloat16});
  InitRandomWeights(*vae, 1);
  vae->set_differentiable(true);
  EXPECT_THROW(vae->decode(torch::randn({1, 2, 2, 2})), c10::Error);
  EXPECT_THROW(vae->encode(torch::randn({1, 3, 4, 4})), c10::Error);
  vae->set_differentiable(false);
  EXPECT_EQ(vae->decode(torch::randn({1, 2, 2, 2})).scalar_type(), torch::kBFloat16);
}

TEST(AutoencoderKLTest, FolderErrorsNameTheKey) {
  auto folder = OpenModelFolder(VaeFolder().string());
  ASSERT_TRUE(folder.ok());
  TempDir tmp;
  TensorMap weights = folder->weights;
  weights.erase("decoder.up_blocks.1.upsamplers.0.conv.bias");
  ASSERT_TRUE(WriteSafetensors(tmp.File("diffusion_pytorch_model.safetensors"), weights).ok());
  {
    std::ofstream out(tmp.File("config.json"));
    out << folder->config.dump();
  }
  auto r = LoadAutoencoderKL(tmp.path());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()),
              HasSubstr("decoder.up_blocks.1.upsamplers.0.conv.bias"));
  // A pipeline root resolves its vae/ subfolder.
  TempDir root;
  fs::create_directories(fs::path(root.path()) / "vae");
  fs::copy(VaeFolder(), fs::path(root.path()) / "vae", fs::copy_options::recursive);
  EXPECT_TRUE(LoadAutoencoderKL(root.path()).ok());
  EXPECT_EQ(LoadAutoencoderKL(tmp.File("absent")).status().code(), absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------------------------
// Spec

TEST(AutoencoderKLSpecTest, RegisteredAndLoadableFromItsFolder) {
  for (std::string_view n : {"autoencoder-kl", "AutoencoderKL", "vae"}) {
    auto spec = ModelRegistry::Global().Find(n);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ((*spec)->class_name, "AutoencoderKL");
  }
  // The generic folder loader resolves the class from config.json's _class_name.
  auto model = LoadModelFromFolder(VaeFolder().string(), ModelOptions{});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->class_name(), "AutoencoderKL");
  EXPECT_NE(dynamic_cast<AutoencoderKLModel*>(model->get()), nullptr);
}

TEST(AutoencoderKLSpecTest, MetadataDeclaresOnlyWhatIsWired) {
  const ModelSpec spec = MakeAutoencoderKLSpec();
  const ModelMetadata md = BuildModelMetadata(spec);
  auto variants = md.Get("_weight_mapping");
  ASSERT_TRUE(variants.ok()) << variants.status();
  EXPECT_EQ(std::get<std::vector<std::string>>(*variants),
            (std::vector<std::string>{"flux-vae", "ldm-vae"}));
  EXPECT_FALSE(md.contains("_lora"));
  EXPECT_EQ(spec.lora, nullptr);
  // Every declared block class is a class of the real module tree.
  auto model = spec.factory(TinyConfig(), ModelOptions{});
  ASSERT_TRUE(model.ok());
  std::multiset<std::string> classes;
  for (const auto& item : (*model)->module().named_modules()) {
    classes.insert(Short(item.value()->name()));
  }
  ASSERT_FALSE(spec.structure.no_split_modules.empty());
  for (const auto& block : spec.structure.no_split_modules) {
    EXPECT_GT(classes.count(block), 0u) << block;
  }
}

}  // namespace
}  // namespace ds::autoencoder_kl
