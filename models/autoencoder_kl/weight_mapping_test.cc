// The AutoencoderKL single-file handler: the golden BFL `ae.safetensors` against the diffusers
// weights and `ae_mapping.json`, other configs round-tripping, errors naming the key, and
// coexistence with the Flux transformer's detection.
#include "models/autoencoder_kl/weight_mapping.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "models/autoencoder_kl/autoencoder_kl.h"
#include "models/autoencoder_kl/config.h"
#include "testing/test_util.h"

namespace ds::autoencoder_kl {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

fs::path VaeDir() { return fs::path(GoldenDir()) / "pipeline" / "vae"; }

TensorMap Load(const fs::path& p) {
  auto f = SafetensorsFile::Open(p.string());
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto all = (*f)->GetAll();
  EXPECT_TRUE(all.ok());
  return all.ok() ? *all : TensorMap{};
}

KeyShapes ShapesOf(const TensorMap& m) {
  KeyShapes out;
  for (const auto& [k, t] : m) out[k] = t.sizes().vec();
  return out;
}

TensorMap Ae() { return Load(VaeDir() / "ae.safetensors"); }
TensorMap Diffusers() { return Load(VaeDir() / "vae" / "diffusion_pytorch_model.safetensors"); }

nlohmann::json FolderConfig() {
  auto c = ReadJsonFile((VaeDir() / "vae" / "config.json").string());
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : nlohmann::json::object();
}

void ExpectBitwiseEqual(const TensorMap& ours, const TensorMap& expected) {
  ASSERT_EQ(ours.size(), expected.size());
  for (const auto& [k, t] : expected) {
    auto it = ours.find(k);
    ASSERT_NE(it, ours.end()) << "missing " << k;
    EXPECT_EQ(it->second.sizes(), t.sizes()) << k;
    EXPECT_EQ(it->second.scalar_type(), t.scalar_type()) << k;
    EXPECT_TRUE(torch::equal(it->second, t)) << k;
  }
}

TEST(VaeWeightMappingTest, DetectsTheGoldenBflFileAndDerivesItsStructure) {
  auto det = VaeWeightMappingHandler().Detect(ShapesOf(Ae()));
  ASSERT_TRUE(det.ok()) << det.status();
  ASSERT_TRUE(det->has_value());
  const WeightMappingDetection& d = **det;
  EXPECT_FALSE(d.diffusers_naming);
  EXPECT_EQ(d.variant, "flux-vae");
  const nlohmann::json ref = FolderConfig();
  for (const char* field :
       {"in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
        "down_block_types", "up_block_types", "mid_block_add_attention", "use_quant_conv",
        "use_post_quant_conv", "scaling_factor", "shift_factor"}) {
    EXPECT_EQ(d.config[field], ref[field]) << field;
  }
  EXPECT_THAT(d.assumed, ::testing::Contains("norm_num_groups"));
  // The diffusers folder's weights are detected as diffusers naming with the same structure.
  auto dd = VaeWeightMappingHandler().Detect(ShapesOf(Diffusers()));
  ASSERT_TRUE(dd.ok() && dd->has_value());
  EXPECT_TRUE((*dd)->diffusers_naming);
  EXPECT_EQ((*dd)->config, d.config);
}

TEST(VaeWeightMappingTest, BflFileMapsToTheDiffusersWeightsBitwise) {
  const TensorMap ae = Ae();
  auto det = VaeWeightMappingHandler().Detect(ShapesOf(ae));
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = VaeWeightMappingHandler().PlanToDiffusers(ShapesOf(ae), **det);
  ASSERT_TRUE(plan.ok()) << plan.status();
  auto mapped = ExecuteMappingPlan(*plan, ae);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  ExpectBitwiseEqual(*mapped, Diffusers());
  // And back: the reverse plan reproduces the BFL file exactly.
  auto reverse = VaeWeightMappingHandler().PlanFromDiffusers(ShapesOf(Diffusers()));
  ASSERT_TRUE(reverse.ok()) << reverse.status();
  auto original = ExecuteMappingPlan(*reverse, Diffusers());
  ASSERT_TRUE(original.ok()) << original.status();
  ExpectBitwiseEqual(*original, ae);
}

TEST(VaeWeightMappingTest, PlanAgreesWithTheReferenceMappingJson) {
  auto json = ReadJsonFile((VaeDir() / "ae_mapping.json").string());
  ASSERT_TRUE(json.ok()) << json.status();
  const KeyShapes keys = ShapesOf(Ae());
  auto det = VaeWeightMappingHandler().Detect(keys);
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = VaeWeightMappingHandler().PlanToDiffusers(keys, **det);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(json->size(), plan->size());
  for (const auto& [bfl, entry] : json->items()) {
    const std::string target = entry["diffusers_key"].get<std::string>();
    auto it = plan->find(target);
    ASSERT_NE(it, plan->end()) << target;
    ASSERT_EQ(it->second.sources.size(), 1u);
    EXPECT_EQ(it->second.sources[0], bfl);
    EXPECT_EQ(keys.at(bfl), entry["bfl_shape"].get<std::vector<int64_t>>()) << bfl;
    auto shape = PlannedShape(it->second, keys);
    ASSERT_TRUE(shape.ok()) << shape.status();
    EXPECT_EQ(*shape, entry["diffusers_shape"].get<std::vector<int64_t>>()) << target;
  }
}

TEST(VaeWeightMappingTest, EachBundlingPrefixLoadsTheSameStateDict) {
  const TensorMap ae = Ae();
  const TensorMap diffusers = Diffusers();
  TempDir tmp;
  for (const std::string prefix : {"vae.", "first_stage_model."}) {
    SCOPED_TRACE(prefix);
    TensorMap renamed;
    for (const auto& [k, t] : ae) renamed[prefix + k] = t;
    const std::string path = tmp.File(prefix + "safetensors");
    ASSERT_TRUE(WriteSafetensors(path, renamed).ok());
    SingleFileOptions options;
    options.config_override = FolderConfig();
    auto loaded = LoadSingleFile(path, options);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->report.prefix, prefix);
    EXPECT_EQ(loaded->report.model_class, "AutoencoderKL");
    ExpectBitwiseEqual(NamedTensors(loaded->model->module()), diffusers);
  }
}

// A Flux all-in-one checkpoint stays a Flux transformer; asked for the VAE, the same file gives
// its bundled VAE.
TEST(VaeWeightMappingTest, AllInOneFileResolvesToItsMainModelUnlessTheVaeIsAskedFor) {
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  fs::path flux_file;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (fs::exists(e.path() / "original.safetensors")) {
      flux_file = e.path() / "original.safetensors";
      break;
    }
  }
  ASSERT_FALSE(flux_file.empty()) << "no Flux single-file fixture under " << root;
  auto flux_config = ReadJsonFile((flux_file.parent_path() / "config.json").string());
  ASSERT_TRUE(flux_config.ok());
  const std::string flux_prefix = (*flux_config)["key_prefix"].get<std::string>();
  TensorMap all;
  for (const auto& [k, t] : Load(flux_file)) {
    all["model.diffusion_model." + k.substr(flux_prefix.size())] = t;
  }
  for (const auto& [k, t] : Ae()) all["vae." + k] = t;
  TempDir tmp;
  const std::string path = tmp.File("all_in_one.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, all).ok());

  auto as_flux = InspectSingleFile(path);
  ASSERT_TRUE(as_flux.ok()) << as_flux.status();
  EXPECT_EQ(as_flux->report.model_class, "FluxTransformer2DModel");
  EXPECT_EQ(as_flux->report.ignored.at("vae.decoder.conv_in.weight"), "bundled VAE");

  SingleFileOptions options;
  options.model_class = "AutoencoderKL";
  options.config_override = FolderConfig();
  auto vae = LoadSingleFile(path, options);
  ASSERT_TRUE(vae.ok()) << vae.status();
  EXPECT_EQ(vae->report.prefix, "vae.");
  EXPECT_TRUE(vae->report.ignored.count("model.diffusion_model.img_in.weight"));
  ExpectBitwiseEqual(NamedTensors(vae->model->module()), Diffusers());
}

TEST(VaeWeightMappingTest, DoesNotCollideWithFluxDetection) {
  const KeyShapes ae = ShapesOf(Ae());
  auto flux = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(flux.ok());
  auto flux_on_vae = (*flux)->weight_mapping->Detect(ae);
  ASSERT_TRUE(flux_on_vae.ok()) << flux_on_vae.status();
  EXPECT_FALSE(flux_on_vae->has_value());
  // The VAE handler ignores transformer checkpoints in both namings.
  const fs::path root = fs::path(GoldenDir()) / "single_file";
  std::error_code ec;
  int probed = 0;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (!fs::exists(e.path() / "original.safetensors")) continue;
    SingleFileKeys split = SplitSingleFileKeys(ShapesOf(Load(e.path() / "original.safetensors")));
    auto det = VaeWeightMappingHandler().Detect(split.model_keys);
    ASSERT_TRUE(det.ok()) << det.status();
    EXPECT_FALSE(det->has_value()) << e.path();
    ++probed;
  }
  EXPECT_GT(probed, 0);
  // Exactly one registered model claims ae.safetensors.
  auto inspected = InspectSingleFile((VaeDir() / "ae.safetensors").string());
  ASSERT_TRUE(inspected.ok()) << inspected.status();
  EXPECT_EQ(inspected->report.model_class, "AutoencoderKL");
  EXPECT_EQ(inspected->report.tensors_mapped, static_cast<int64_t>(ae.size()));
  EXPECT_EQ(inspected->report.tensors_zero_copy, static_cast<int64_t>(ae.size()));
}

// A config unlike the fixture's (4 levels, 2 layers, quant convs, no attention, other widths and
// channel counts): the module's parameters are exactly VaeParameters', the mapping round-trips, and
// a single file written in the original naming loads back into an identical model.
TEST(VaeWeightMappingTest, OtherConfigsBuildAndRoundTrip) {
  nlohmann::json j = {{"in_channels", 4},
                      {"out_channels", 2},
                      {"block_out_channels", {6, 12, 12, 18}},
                      {"down_block_types", std::vector<std::string>(4, "DownEncoderBlock2D")},
                      {"up_block_types", std::vector<std::string>(4, "UpDecoderBlock2D")},
                      {"layers_per_block", 2},
                      {"latent_channels", 3},
                      {"norm_num_groups", 3},
                      {"use_quant_conv", true},
                      {"use_post_quant_conv", true},
                      {"mid_block_add_attention", false}};
  for (bool attention : {false, true}) {
    SCOPED_TRACE(attention ? "with attention" : "without attention");
    j["mid_block_add_attention"] = attention;
    auto config = AutoencoderKLConfig::FromJson(j);
    ASSERT_TRUE(config.ok()) << config.status();
    auto model = AutoencoderKLModel::Create(j, ModelOptions{});
    ASSERT_TRUE(model.ok()) << model.status();
    InitRandomWeights((*model)->module(), 7);
    const TensorMap weights = NamedTensors((*model)->module());
    KeyShapes expected;
    for (const VaeParameter& p : VaeParameters(*config)) expected[p.diffusers] = p.shape;
    EXPECT_EQ(ShapesOf(weights), expected);

    auto to_original = VaeWeightMappingHandler().PlanFromDiffusers(ShapesOf(weights));
    ASSERT_TRUE(to_original.ok()) << to_original.status();
    auto original = ExecuteMappingPlan(*to_original, weights);
    ASSERT_TRUE(original.ok());
    EXPECT_EQ(original->count("decoder.up.3.block.2.conv1.weight"), 1u);  // up_blocks.0, resnet 2
    EXPECT_EQ(original->count("encoder.down.1.block.0.nin_shortcut.weight"), 1u);
    EXPECT_EQ(original->count("encoder.mid.attn_1.q.weight"), attention ? 1u : 0u);
    auto det = VaeWeightMappingHandler().Detect(ShapesOf(*original));
    ASSERT_TRUE(det.ok()) << det.status();
    ASSERT_TRUE(det->has_value());
    EXPECT_EQ((*det)->variant, "ldm-vae");
    for (const char* f :
         {"in_channels", "out_channels", "block_out_channels", "layers_per_block",
          "latent_channels", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}) {
      EXPECT_EQ((*det)->config[f], config->ToJson()[f]) << f;
    }
    auto back = VaeWeightMappingHandler().PlanToDiffusers(ShapesOf(*original), **det);
    ASSERT_TRUE(back.ok()) << back.status();
    auto restored = ExecuteMappingPlan(*back, *original);
    ASSERT_TRUE(restored.ok());
    ExpectBitwiseEqual(*restored, weights);

    // Through the real loader from a file, then one decode on both models.
    TempDir tmp;
    const std::string path = tmp.File("other.safetensors");
    ASSERT_TRUE(WriteSafetensors(path, *original).ok());
    SingleFileOptions options;
    options.config_override = {{"norm_num_groups", 3}};
    auto loaded = LoadSingleFile(path, options);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    auto* vae = dynamic_cast<AutoencoderKLModel*>(loaded->model.get());
    ASSERT_NE(vae, nullptr);
    torch::manual_seed(1);
    const torch::Tensor z = torch::randn({1, 3, 3, 5});
    auto a = (*model)->Decode(z);
    auto b = vae->Decode(z);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->sizes(), (std::vector<int64_t>{1, 2, 24, 40}));
    EXPECT_TRUE(torch::equal(*a, *b));
  }
}

TEST(VaeWeightMappingTest, LinearAttentionWeightsInTheOriginalAreAccepted) {
  TensorMap ae = Ae();
  for (const char* k : {"decoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight"}) {
    ae[k] = ae[k].reshape({ae[k].size(0), ae[k].size(1)});
  }
  auto det = VaeWeightMappingHandler().Detect(ShapesOf(ae));
  ASSERT_TRUE(det.ok() && det->has_value());
  auto plan = VaeWeightMappingHandler().PlanToDiffusers(ShapesOf(ae), **det);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->at("decoder.mid_block.attentions.0.to_q.weight").op, TensorRecipe::Op::kCopy);
  EXPECT_EQ(plan->at("decoder.mid_block.attentions.0.to_k.weight").op, TensorRecipe::Op::kReshape);
  auto mapped = ExecuteMappingPlan(*plan, ae);
  ASSERT_TRUE(mapped.ok());
  ExpectBitwiseEqual(*mapped, Diffusers());
}

TEST(VaeWeightMappingTest, ErrorsNameTheKey) {
  const KeyShapes ae = ShapesOf(Ae());
  auto plan_error = [](const KeyShapes& keys) -> absl::Status {
    auto det = VaeWeightMappingHandler().Detect(keys);
    if (!det.ok()) return det.status();
    if (!det->has_value()) return absl::NotFoundError("not detected");
    return VaeWeightMappingHandler().PlanToDiffusers(keys, **det).status();
  };
  {
    KeyShapes k = ae;
    k.erase("decoder.up.0.block.1.norm2.bias");
    const absl::Status s = plan_error(k);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("decoder.up.0.block.1.norm2.bias"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("decoder.up_blocks.2.resnets.1.norm2.bias"));
  }
  {
    KeyShapes k = ae;
    k["decoder.up.1.upsample.conv.weight"] = {16, 16, 1, 1};
    const absl::Status s = plan_error(k);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("decoder.up.1.upsample.conv.weight"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("[16, 16, 3, 3]"));
  }
  {
    KeyShapes k = ae;
    k["decoder.up.0.block.0.extra.weight"] = {3};
    const absl::Status s = plan_error(k);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("decoder.up.0.block.0.extra.weight"));
  }
  {
    KeyShapes k = ae;
    k.erase("encoder.mid.attn_1.q.weight");
    const absl::Status s = plan_error(k);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("mid.attn_1.q.weight"));
  }
  {
    KeyShapes k = ae;
    k["encoder.conv_out.weight"] = {30, 16, 3, 3};
    const absl::Status s = plan_error(k);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("encoder.conv_out.weight"));
  }
  // Not a VAE at all: no detection, no error.
  auto none = VaeWeightMappingHandler().Detect({{"encoder.w", {2}}});
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  // Without the folder's group count the tiny fixture cannot be built: the error names the field.
  auto loaded = LoadSingleFile((VaeDir() / "ae.safetensors").string());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(loaded.status().message()), HasSubstr("norm_num_groups"));
}

}  // namespace
}  // namespace ds::autoencoder_kl
