// The Flux LoRA handler: detection, the conversion rules of every format (synthetic tensors with
// widths unlike FLUX.1's), and every golden case under $DS_GOLDEN_DIR/lora/ (see
// ../shared/golden/README.md), including the four deliberate differences from diffusers.
#include "models/flux/lora.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/spec.h"
#include "testing/lora_golden.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

using ::ds::test::Close;
using ::ds::test::ExpectedLoraFormat;
using ::ds::test::F64;
using ::ds::test::kLoraRelativeTolerance;
using ::ds::test::LoraGoldenCases;
using ::ds::test::LoraGoldenDir;
using ::ds::test::SwapHalves;

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

torch::Tensor Rand(std::vector<int64_t> shape, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn(shape);
}

torch::Tensor Delta(const LoraModule& m) { return F64(m.up).matmul(F64(m.down)) * m.scale; }

absl::StatusOr<ConvertedLora> Convert(const TensorMap& t) {
  return ConvertLora(t, {}, FluxLoraHandler());
}

const LoraModule* Find(const ConvertedLora& lora, const std::string& module) {
  for (const LoraModule& m : lora.modules) {
    if (m.module == module) return &m;
  }
  return nullptr;
}

std::optional<std::string> Detect(const std::vector<std::string>& keys) {
  KeyShapes shapes;
  for (const std::string& k : keys) shapes[NormalizeLoraSuffix(k)] = {4, 4};
  return FluxLoraHandler().DetectFormat(shapes);
}

// ---------------------------------------------------------------------------------------------

TEST(FluxLoraTest, FormatNamesFeedTheMetadataRow) {
  std::vector<std::string> names = FluxLoraHandler().FormatNames();
  std::sort(names.begin(), names.end());
  EXPECT_THAT(names, ElementsAre("bfl", "kohya", "kontext", "xlabs"));
  // The row is derived from the handler once a spec wires it.
  ModelSpec spec = MakeFluxSpec();
  spec.lora = &FluxLoraHandler();
  EXPECT_EQ(BuildModelMetadata(spec).Find("_lora")->display, "bfl, kohya, kontext, xlabs");
}

TEST(FluxLoraTest, DetectionIsOrderSafe) {
  // A Kontext key also contains diffusers' bfl marker "double_blocks.0.img_mod.lin.lora_A".
  EXPECT_EQ(Detect({"base_model.model.double_blocks.0.img_mod.lin.lora_A.weight"}), "kontext");
  EXPECT_EQ(Detect({"double_blocks.0.img_mod.lin.lora_A.weight"}), "bfl");
  EXPECT_EQ(Detect({"time_in.in_layer.lora_A.weight"}), "bfl");
  EXPECT_EQ(Detect({"diffusion_model.double_blocks.0.processor.qkv_lora1.down.weight"}), "xlabs");
  EXPECT_EQ(Detect({"single_blocks.3.processor.proj_lora.up.weight"}), "xlabs");
  EXPECT_EQ(Detect({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"}), "kohya");
  EXPECT_EQ(Detect({"lora_unet_single_blocks_0_linear1.lora_down.weight"}), "kohya");
  EXPECT_EQ(Detect({"lora_transformer_x_embedder.lora_down.weight"}), "kohya");
  EXPECT_EQ(Detect({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                    "transformer.proj_out.lora_A.weight"}),
            kDiffusersLoraFormat);
  EXPECT_EQ(Detect({"transformer.x_embedder.lora_up.weight"}), kDiffusersLoraFormat);
  EXPECT_EQ(Detect({"transformer_blocks.2.attn.to_q.lora_A.weight"}), kDiffusersLoraFormat);
  EXPECT_FALSE(Detect({"unet.down_blocks.0.attn.lora_A.weight"}).has_value());
}

TEST(FluxLoraTest, QkvSplitReplicatesAAndSplitsBRows) {
  const int64_t d = 5, r = 3, in = 7;
  const torch::Tensor a = Rand({r, in}, 1);
  const torch::Tensor b = Rand({3 * d, r}, 2);
  const torch::Tensor bias = Rand({3 * d}, 3);
  auto lora = Convert({{"double_blocks.3.img_attn.qkv.lora_A.weight", a},
                       {"double_blocks.3.img_attn.qkv.lora_B.weight", b},
                       {"double_blocks.3.img_attn.qkv.lora_B.bias", bias},
                       {"double_blocks.3.txt_attn.qkv.lora_A.weight", a},
                       {"double_blocks.3.txt_attn.qkv.lora_B.weight", b}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->format, "bfl");
  const char* img[] = {"to_q", "to_k", "to_v"};
  const char* txt[] = {"add_q_proj", "add_k_proj", "add_v_proj"};
  for (int j = 0; j < 3; ++j) {
    const LoraModule* m = Find(*lora, absl::StrCat("transformer_blocks.3.attn.", img[j]));
    ASSERT_NE(m, nullptr) << img[j];
    EXPECT_TRUE(m->down.equal(a));
    EXPECT_TRUE(m->up.equal(b.narrow(0, j * d, d)));
    EXPECT_TRUE(m->bias.equal(bias.narrow(0, j * d, d)));
    EXPECT_DOUBLE_EQ(m->scale, 1.0);
    const LoraModule* t = Find(*lora, absl::StrCat("transformer_blocks.3.attn.", txt[j]));
    ASSERT_NE(t, nullptr) << txt[j];
    EXPECT_TRUE(t->up.equal(b.narrow(0, j * d, d)));
  }
  EXPECT_TRUE(lora->unused.empty());
}

TEST(FluxLoraTest, Linear1SplitsAtTheInputWidthOfItsLoraA) {
  const int64_t width = 6, mlp = 20, r = 4;
  const torch::Tensor a = Rand({r, width}, 1);
  const torch::Tensor b = Rand({3 * width + mlp, r}, 2);
  const torch::Tensor bias = Rand({3 * width + mlp}, 3);
  auto lora = Convert({{"single_blocks.11.linear1.lora_A.weight", a},
                       {"single_blocks.11.linear1.lora_B.weight", b},
                       {"single_blocks.11.linear1.lora_B.bias", bias}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  const char* parts[] = {"attn.to_q", "attn.to_k", "attn.to_v"};
  for (int j = 0; j < 3; ++j) {
    const LoraModule* m = Find(*lora, absl::StrCat("single_transformer_blocks.11.", parts[j]));
    ASSERT_NE(m, nullptr);
    EXPECT_TRUE(m->up.equal(b.narrow(0, j * width, width)));
  }
  const LoraModule* mlp_module = Find(*lora, "single_transformer_blocks.11.proj_mlp");
  ASSERT_NE(mlp_module, nullptr);
  EXPECT_TRUE(mlp_module->down.equal(a));
  EXPECT_TRUE(mlp_module->up.equal(b.narrow(0, 3 * width, mlp)));
  EXPECT_TRUE(mlp_module->bias.equal(bias.narrow(0, 3 * width, mlp)));

  auto bad = Convert({{"single_blocks.0.linear1.lora_A.weight", a},
                      {"single_blocks.0.linear1.lora_B.weight", Rand({3 * width, r}, 4)}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("single_blocks.0.linear1.lora_B.weight"));
  auto thirds = Convert({{"double_blocks.0.img_attn.qkv.lora_A.weight", a},
                         {"double_blocks.0.img_attn.qkv.lora_B.weight", Rand({10, r}, 5)}});
  EXPECT_EQ(thirds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(thirds.status().message()), HasSubstr("three equal"));
}

TEST(FluxLoraTest, KohyaAlphaIsAlphaOverRankIncludingTheFinalLayer) {
  const int64_t rank = 16;
  const double alphas[] = {16, 8, 4, 1, 32};
  for (double alpha : alphas) {
    const torch::Tensor down = Rand({rank, 8}, 1), up = Rand({8, rank}, 2);
    const torch::Tensor head_down = Rand({rank, 8}, 3), head_up = Rand({3, rank}, 4);
    auto lora =
        Convert({{"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", down},
                 {"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight", up},
                 {"lora_unet_double_blocks_0_img_attn_proj.alpha", torch::tensor(alpha)},
                 // Deliberate difference 3: diffusers drops this alpha.
                 {"lora_unet_final_layer_linear.lora_down.weight", head_down},
                 {"lora_unet_final_layer_linear.lora_up.weight", head_up},
                 {"lora_unet_final_layer_linear.alpha", torch::tensor(alpha)},
                 {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight", head_down},
                 {"lora_unet_final_layer_adaLN_modulation_1.lora_up.weight", Rand({6, rank}, 5)},
                 {"lora_unet_final_layer_adaLN_modulation_1.alpha", torch::tensor(alpha)}});
    ASSERT_TRUE(lora.ok()) << lora.status();
    EXPECT_EQ(lora->format, "kohya");
    const LoraModule* proj = Find(*lora, "transformer_blocks.0.attn.to_out.0");
    ASSERT_NE(proj, nullptr);
    EXPECT_DOUBLE_EQ(proj->scale, alpha / rank);
    EXPECT_TRUE(Close(Delta(*proj), F64(up).matmul(F64(down)) * (alpha / rank)));
    // Deliberate difference 1: the global/final-layer module is kept.
    const LoraModule* head = Find(*lora, "proj_out");
    ASSERT_NE(head, nullptr);
    EXPECT_DOUBLE_EQ(head->scale, alpha / rank);
    const LoraModule* ada = Find(*lora, "norm_out.linear");
    ASSERT_NE(ada, nullptr);
    EXPECT_DOUBLE_EQ(ada->scale, alpha / rank);
  }
  // No alpha: alpha = rank.
  auto plain = Convert({{"lora_unet_txt_in.lora_down.weight", Rand({4, 8}, 1)},
                        {"lora_unet_txt_in.lora_up.weight", Rand({8, 4}, 2)}});
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_DOUBLE_EQ(Find(*plain, "context_embedder")->scale, 1.0);
}

TEST(FluxLoraTest, FinalLayerSwapTouchesOnlyLoraBAndItsBias) {
  const torch::Tensor a = Rand({4, 6}, 1), b = Rand({12, 4}, 2), bias = Rand({12}, 3);
  for (const std::string prefix : {"", "diffusion_model."}) {
    TensorMap t{{prefix + "final_layer.adaLN_modulation.1.lora_A.weight", a},
                {prefix + "final_layer.adaLN_modulation.1.lora_B.weight", b}};
    if (prefix.empty()) t["final_layer.adaLN_modulation.1.lora_B.bias"] = bias;
    auto lora = Convert(t);
    ASSERT_TRUE(lora.ok()) << lora.status();
    const LoraModule* m = Find(*lora, "norm_out.linear");
    ASSERT_NE(m, nullptr);
    EXPECT_TRUE(m->down.equal(a)) << "lora_A must not be swapped (deliberate difference 2)";
    EXPECT_TRUE(m->up.equal(SwapHalves(b)));
    if (prefix.empty()) {
      EXPECT_TRUE(m->bias.equal(SwapHalves(bias)));
    }
    // The delta is the BFL delta with its (shift, scale) output halves exchanged.
    EXPECT_TRUE(Close(Delta(*m), SwapHalves(F64(b).matmul(F64(a)))));
  }
}

TEST(FluxLoraTest, KohyaSpellings) {
  const torch::Tensor down = Rand({6, 8}, 1), up = Rand({24, 6}, 2);
  // sd-scripts with some dots left (diffusers collapses them), ComfyUI, and the mixture spelling.
  for (const std::string stub :
       {"lora_unet_double_blocks.4.img_attn.qkv", "lora_unet_double_blocks_4_img_attn_qkv",
        "diffusion_model.double_blocks.4.img_attn.qkv"}) {
    auto lora = Convert({{stub + ".lora_down.weight", down}, {stub + ".lora_up.weight", up}});
    ASSERT_TRUE(lora.ok()) << stub << ": " << lora.status();
    EXPECT_EQ(lora->format, "kohya");
    ASSERT_NE(Find(*lora, "transformer_blocks.4.attn.to_v"), nullptr) << stub;
    EXPECT_TRUE(Find(*lora, "transformer_blocks.4.attn.to_v")->up.equal(up.narrow(0, 16, 8)));
  }
  auto mixture = Convert(
      {{"lora_transformer_single_transformer_blocks_7_attn_to_q.lora_down.weight", down},
       {"lora_transformer_single_transformer_blocks_7_attn_to_q.lora_up.weight", up},
       {"lora_transformer_single_transformer_blocks_7_attn_to_q.alpha", torch::tensor(3.0)},
       {"lora_transformer_transformer_blocks_2_ff_context_net_0_proj.lora_down.weight", down},
       {"lora_transformer_transformer_blocks_2_ff_context_net_0_proj.lora_up.weight", up},
       {"lora_transformer_norm_out_linear.lora_down.weight", down},
       {"lora_transformer_norm_out_linear.lora_up.weight", up}});
  ASSERT_TRUE(mixture.ok()) << mixture.status();
  EXPECT_DOUBLE_EQ(Find(*mixture, "single_transformer_blocks.7.attn.to_q")->scale, 0.5);
  EXPECT_NE(Find(*mixture, "transformer_blocks.2.ff_context.net.0.proj"), nullptr);
  // Already diffusers' norm_out.linear: no swap.
  EXPECT_TRUE(Find(*mixture, "norm_out.linear")->up.equal(up));
}

TEST(FluxLoraTest, KohyaBlockDiagonalQkvSplitsAlongTheRank) {
  const int64_t d = 8, part = 2;
  const torch::Tensor down = Rand({3 * part, 5}, 1);
  torch::Tensor up = torch::zeros({3 * d, 3 * part});
  for (int j = 0; j < 3; ++j) {
    up.narrow(0, j * d, d).narrow(1, j * part, part).copy_(Rand({d, part}, 10 + j));
  }
  auto lora = Convert({{"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight", down},
                       {"lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight", up},
                       {"lora_unet_double_blocks_0_txt_attn_qkv.alpha", torch::tensor(3.0)}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  const torch::Tensor full = F64(up).matmul(F64(down)) * (3.0 / (3 * part));
  const char* names[] = {"add_q_proj", "add_k_proj", "add_v_proj"};
  for (int j = 0; j < 3; ++j) {
    const LoraModule* m = Find(*lora, absl::StrCat("transformer_blocks.0.attn.", names[j]));
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->rank(), part);
    EXPECT_TRUE(Close(Delta(*m), full.narrow(0, j * d, d)));
  }
}

TEST(FluxLoraTest, XlabsStreamsAndSingleBlocks) {
  const torch::Tensor a = Rand({2, 6}, 1), qkv = Rand({18, 2}, 2), proj = Rand({6, 2}, 3);
  const torch::Tensor wide = Rand({2, 30}, 4);
  auto lora = Convert({{"double_blocks.1.processor.proj_lora1.down.weight", a},
                       {"double_blocks.1.processor.proj_lora1.up.weight", proj},
                       {"double_blocks.1.processor.proj_lora2.down.weight", a},
                       {"double_blocks.1.processor.proj_lora2.up.weight", proj},
                       {"double_blocks.1.processor.qkv_lora2.down.weight", a},
                       {"double_blocks.1.processor.qkv_lora2.up.weight", qkv},
                       {"diffusion_model.single_blocks.5.processor.qkv_lora.down.weight", a},
                       {"diffusion_model.single_blocks.5.processor.qkv_lora.up.weight", qkv},
                       {"diffusion_model.single_blocks.5.processor.proj_lora.down.weight", wide},
                       {"diffusion_model.single_blocks.5.processor.proj_lora.up.weight", proj}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->format, "xlabs");
  EXPECT_NE(Find(*lora, "transformer_blocks.1.attn.to_out.0"), nullptr);
  EXPECT_NE(Find(*lora, "transformer_blocks.1.attn.to_add_out"), nullptr);
  EXPECT_TRUE(Find(*lora, "transformer_blocks.1.attn.add_k_proj")->up.equal(qkv.narrow(0, 6, 6)));
  EXPECT_TRUE(Find(*lora, "single_transformer_blocks.5.attn.to_v")->up.equal(qkv.narrow(0, 12, 6)));
  EXPECT_EQ(Find(*lora, "single_transformer_blocks.5.proj_mlp"), nullptr);
  EXPECT_TRUE(Find(*lora, "single_transformer_blocks.5.proj_out")->down.equal(wide));
  EXPECT_EQ(lora->modules.size(), 9u);
  EXPECT_TRUE(lora->unused.empty());
}

TEST(FluxLoraTest, ControlLoraOverlaysWidenedInputAndKontextBiases) {
  auto lora = Convert({{"img_in.lora_A.weight", Rand({4, 12}, 1)},
                       {"img_in.lora_B.weight", Rand({10, 4}, 2)},
                       {"img_in.lora_B.bias", Rand({10}, 3)},
                       {"double_blocks.0.txt_attn.norm.key_norm.scale", Rand({5}, 4)},
                       {"single_blocks.2.norm.query_norm.scale", Rand({5}, 5)},
                       {"double_blocks.0.img_attn.norm.mystery.scale", Rand({5}, 6)}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  const LoraModule* x = Find(*lora, "x_embedder");
  ASSERT_NE(x, nullptr);
  EXPECT_TRUE(x->input_expandable);
  ASSERT_EQ(lora->overlays.size(), 2u);
  EXPECT_EQ(lora->overlays[0].param, "single_transformer_blocks.2.attn.norm_q.weight");
  EXPECT_EQ(lora->overlays[1].param, "transformer_blocks.0.attn.norm_added_k.weight");
  EXPECT_EQ(lora->unused.count("double_blocks.0.img_attn.norm.mystery.scale"), 1u);

  KeyShapes model{{"x_embedder.weight", {10, 6}},
                  {"single_transformer_blocks.2.attn.norm_q.weight", {5}},
                  {"transformer_blocks.0.attn.norm_added_k.weight", {5}}};
  LoraLoadOptions partial;
  partial.allow_partial = true;
  auto report = ValidateLora(*lora, model, partial);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->expansions.size(), 1u);
  EXPECT_THAT(report->expansions[0].new_shape, ElementsAre(10, 12));

  auto comfy = Convert({{"diffusion_model.single_blocks.0.linear2.lora_A.weight", Rand({2, 4}, 1)},
                        {"diffusion_model.single_blocks.0.linear2.lora_B.weight", Rand({4, 2}, 2)},
                        {"diffusion_model.single_blocks.0.norm.key_norm.scale", Rand({5}, 3)}});
  ASSERT_TRUE(comfy.ok()) << comfy.status();
  EXPECT_EQ(comfy->format, "kohya");
  ASSERT_EQ(comfy->overlays.size(), 1u);
  EXPECT_EQ(comfy->overlays[0].param, "single_transformer_blocks.0.attn.norm_k.weight");
  EXPECT_TRUE(comfy->unused.empty());

  // The diffusers spelling of the same (what ConvertedLora::ToDiffusersStateDict writes).
  auto native =
      Convert({{"transformer.x_embedder.lora_A.weight", Rand({4, 12}, 1)},
               {"transformer.x_embedder.lora_B.weight", Rand({10, 4}, 2)},
               {"transformer.transformer_blocks.0.attn.norm_added_k.weight", Rand({5}, 4)}});
  ASSERT_TRUE(native.ok()) << native.status();
  EXPECT_TRUE(native->unused.empty());
  ASSERT_EQ(native->overlays.size(), 1u);
  EXPECT_EQ(native->overlays[0].param, "transformer_blocks.0.attn.norm_added_k.weight");
  EXPECT_TRUE(Find(*native, "x_embedder")->input_expandable);

  // fal's converter in diffusers skips these biases (it tests unprefixed names); they are used.
  auto kontext =
      Convert({{"base_model.model.double_blocks.0.img_mod.lin.lora_A.weight", Rand({2, 4}, 1)},
               {"base_model.model.double_blocks.0.img_mod.lin.lora_B.weight", Rand({24, 2}, 2)},
               {"base_model.model.double_blocks.0.img_mod.lin.lora_B.bias", Rand({24}, 3)}});
  ASSERT_TRUE(kontext.ok()) << kontext.status();
  EXPECT_EQ(kontext->format, "kontext");
  EXPECT_TRUE(Find(*kontext, "transformer_blocks.0.norm1.linear")->bias.defined());
}

TEST(FluxLoraTest, KeysThatAreNotAppliedAreReportedWithReasons) {
  auto lora =
      Convert({{"lora_unet_double_blocks_0_img_mlp_0.lora_down.weight", Rand({2, 4}, 1)},
               {"lora_unet_double_blocks_0_img_mlp_0.lora_up.weight", Rand({8, 2}, 2)},
               {"lora_unet_double_blocks_0_img_mlp_0.diff_b", Rand({8}, 3)},
               {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", Rand({2, 4}, 4)},
               {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", Rand({8, 2}, 5)},
               {"lora_unet_double_blocks_0_img_gizmo.lora_down.weight", Rand({2, 4}, 6)},
               {"lora_unet_double_blocks_0_img_gizmo.lora_up.weight", Rand({8, 2}, 7)},
               {"lora_unet_single_blocks_0_linear2.alpha", torch::tensor(1.0)}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->modules.size(), 1u);
  EXPECT_THAT(lora->unused.at("lora_unet_double_blocks_0_img_mlp_0.diff_b"), HasSubstr("diff_b"));
  EXPECT_THAT(lora->unused.at("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"),
              HasSubstr("text-encoder"));
  EXPECT_THAT(lora->unused.at("lora_unet_double_blocks_0_img_gizmo.lora_down.weight"),
              HasSubstr("not a kohya name of a Flux module"));
  EXPECT_THAT(lora->unused.at("lora_unet_single_blocks_0_linear2.alpha"),
              HasSubstr("no lora_A and lora_B"));
  EXPECT_EQ(lora->unused.size(), 6u);

  KeyShapes model{{"transformer_blocks.0.ff.net.0.proj.weight", {8, 4}}};
  auto strict = ValidateLora(*lora, model);
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(strict.status().message()), HasSubstr("6 unmatched"));
  LoraLoadOptions partial;
  partial.allow_partial = true;
  auto report = ValidateLora(*lora, model, partial);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->unmatched.size(), 6u);
}

// ---------------------------------------------------------------------------------------------
// Golden cases.

// One module of diffusers' converted state dict.
struct DiffusersModule {
  torch::Tensor down, up, bias;
};

std::string ModuleOf(const std::string& key) {
  for (const char* suffix : {".lora_A.weight", ".lora_B.weight", ".lora_B.bias"}) {
    if (absl::EndsWith(key, suffix)) return key.substr(0, key.size() - std::strlen(suffix));
  }
  return "";
}

std::string StripTransformer(const std::string& key) {
  return absl::StartsWith(key, "transformer.") ? key.substr(std::strlen("transformer.")) : key;
}

class FluxLoraGoldenTest : public ::testing::TestWithParam<std::string> {};

TEST(FluxLoraGoldenDiscoveryTest, FindsCases) {
  EXPECT_FALSE(LoraGoldenCases().empty()) << "no LoRA cases under " << LoraGoldenDir();
}

TEST_P(FluxLoraGoldenTest, ConvertsLikeDiffusersOrAsTheFormatMeans) {
  const fs::path dir = LoraGoldenDir() / GetParam();
  auto expected_or = ReadJsonFile((dir / "expected.json").string());
  ASSERT_TRUE(expected_or.ok()) << expected_or.status();
  const nlohmann::json& expected = *expected_or;
  auto input = LoadSafetensorsWeights((dir / "input.safetensors").string());
  auto converted = LoadSafetensorsWeights((dir / "converted.safetensors").string());
  auto merged = LoadSafetensorsWeights((dir / "merged.safetensors").string());
  auto base = LoadSafetensorsWeights((LoraGoldenDir() / "base_model.safetensors").string());
  ASSERT_TRUE(input.ok() && converted.ok() && merged.ok() && base.ok());

  auto lora = ConvertLoraFile((dir / "input.safetensors").string(), FluxLoraHandler());
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->format, ExpectedLoraFormat(expected));

  // Against the model the LoRA was made for: everything matches; anything unused must be listed
  // and is an error unless partial loading is allowed.
  const KeyShapes params = ParameterShapes(*base);
  auto report = ValidateLora(*lora, params);
  if (!lora->unused.empty()) {
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    LoraLoadOptions partial;
    partial.allow_partial = true;
    report = ValidateLora(*lora, params, partial);
  }
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->modules.size(), lora->modules.size());
  EXPECT_EQ(report->overlays.size(), lora->overlays.size());
  SCOPED_TRACE(report->ToString());

  // Every key of the file is used or reported, never both.
  std::set<std::string> used;
  for (const LoraModule& m : lora->modules) used.insert(m.sources.begin(), m.sources.end());
  for (const LoraOverlay& o : lora->overlays) used.insert(o.source);
  for (const auto& [key, tensor] : *input) {
    EXPECT_NE(used.count(key) + lora->unused.count(key), 0u)
        << key << " is neither used nor reported";
    EXPECT_FALSE(used.count(key) > 0 && lora->unused.count(key) > 0) << key;
  }
  for (const std::string& key : used) EXPECT_EQ(input->count(key), 1u) << key;

  // Widened inputs, as diffusers widens them.
  std::vector<nlohmann::json> expansions;
  for (const LoraInputExpansion& e : report->expansions) {
    expansions.push_back(
        {{"module", e.module}, {"new_shape", e.new_shape}, {"old_shape", e.old_shape}});
  }
  EXPECT_EQ(nlohmann::json(expansions), expected["expanded_modules"]);

  // diffusers' conversion, by module.
  std::map<std::string, DiffusersModule> theirs;
  std::map<std::string, torch::Tensor> their_overlays;
  for (const auto& [key, t] : *converted) {
    const std::string module = StripTransformer(ModuleOf(key));
    if (module.empty()) {
      their_overlays[StripTransformer(key)] = t;
    } else if (absl::EndsWith(key, ".lora_A.weight")) {
      theirs[module].down = t;
    } else if (absl::EndsWith(key, ".lora_B.weight")) {
      theirs[module].up = t;
    } else {
      theirs[module].bias = t;
    }
  }
  std::set<std::string> dropped;  // converted without the prefix: diffusers' loader drops them
  for (const auto& key : expected["dropped_by_loader"]) {
    dropped.insert(StripTransformer(ModuleOf(key.get<std::string>())));
  }
  const nlohmann::json& per_module = expected["per_module"];
  const nlohmann::json semantic =
      expected["semantic_check"].value("max_abs_diff", nlohmann::json::object());

  std::set<std::string> ours_names, their_names;
  for (const LoraModule& m : lora->modules) ours_names.insert(m.module);
  for (const auto& [name, d] : theirs) their_names.insert(name);
  EXPECT_EQ(ours_names, their_names);

  std::set<std::string> diffusers_wrong;  // modules whose fused weight diffusers gets wrong
  std::map<std::string, torch::Tensor> ours_merged;
  for (const LoraModule& m : lora->modules) {
    SCOPED_TRACE(m.module);
    auto it = theirs.find(m.module);
    if (it == theirs.end()) continue;
    const DiffusersModule& d = it->second;
    const torch::Tensor ours = Delta(m);
    double their_scale = 1.0;
    if (dropped.count(m.module) > 0) {
      // Deliberate difference 1: kept and applied. diffusers' converted tensors carry its alpha
      // scaling (PEFT scale 1) except for the final-layer modules, whose alpha it discards
      // (deliberate difference 3): the format means alpha/r there too.
      ASSERT_FALSE(per_module.contains(m.module));
      bool final_layer = false;
      double alpha = static_cast<double>(m.source_rank);
      for (const std::string& source : m.sources) {
        final_layer |= absl::StrContains(source, "final_layer");
        if (absl::EndsWith(source, ".alpha")) alpha = input->at(source).item<double>();
      }
      if (final_layer) {
        their_scale = alpha / static_cast<double>(m.source_rank);
        EXPECT_DOUBLE_EQ(m.scale, their_scale);
      }
    } else {
      ASSERT_TRUE(per_module.contains(m.module)) << "diffusers' loader has no such module";
      their_scale = per_module[m.module]["scaling"].get<double>();
    }
    const torch::Tensor theirs_delta = F64(d.up).matmul(F64(d.down)) * their_scale;
    const double semantic_error = semantic.value(m.module, 0.0);
    if (semantic_error > kLoraRelativeTolerance * F64(ours).abs().max().item<double>()) {
      // Deliberate difference 2: diffusers' BFL path swaps the (shift, scale) halves of lora_A as
      // well as lora_B for the final adaLN. The correct delta is the source delta with its output
      // halves swapped, which is what swapping lora_B alone gives.
      diffusers_wrong.insert(m.module);
      EXPECT_EQ(m.module, "norm_out.linear");
      torch::Tensor src_down, src_up;
      for (const std::string& source : m.sources) {
        const std::string n = NormalizeLoraSuffix(source);
        if (absl::EndsWith(n, ".lora_A.weight")) src_down = input->at(source);
        if (absl::EndsWith(n, ".lora_B.weight")) src_up = input->at(source);
      }
      ASSERT_TRUE(src_down.defined() && src_up.defined());
      EXPECT_TRUE(m.down.equal(src_down));
      EXPECT_TRUE(Close(m.up, d.up));  // diffusers swaps lora_B correctly
      EXPECT_TRUE(Close(ours, SwapHalves(F64(src_up).matmul(F64(src_down))) * m.scale));
      EXPECT_FALSE(Close(ours, theirs_delta)) << "diffusers was expected to differ here";
    } else {
      EXPECT_TRUE(Close(ours, theirs_delta));
    }
    EXPECT_EQ(m.bias.defined(), d.bias.defined());
    if (m.bias.defined() && d.bias.defined()) {
      EXPECT_TRUE(Close(F64(m.bias) * m.scale, F64(d.bias) * their_scale));
    }

    // What fusing at scale 1 makes of the base parameters (zero columns for a widened input).
    torch::Tensor w = F64(base->at(m.module + ".weight"));
    if (m.down.size(1) > w.size(1)) {
      w = torch::cat({w, torch::zeros({w.size(0), m.down.size(1) - w.size(1)}, w.options())}, 1);
    }
    ours_merged[m.module + ".weight"] = w + ours;
    if (m.bias.defined()) {
      ours_merged[m.module + ".bias"] = F64(base->at(m.module + ".bias")) + F64(m.bias) * m.scale;
    }
  }

  // Written back in diffusers naming (scale folded into lora_B), it converts to the same deltas.
  auto state_dict = lora->ToDiffusersStateDict("transformer.");
  ASSERT_TRUE(state_dict.ok()) << state_dict.status();
  auto again = ConvertLora(*state_dict, {}, FluxLoraHandler());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->format, kDiffusersLoraFormat);
  EXPECT_TRUE(again->unused.empty());
  ASSERT_EQ(again->modules.size(), lora->modules.size());
  ASSERT_EQ(again->overlays.size(), lora->overlays.size());
  for (std::size_t i = 0; i < lora->modules.size(); ++i) {
    const LoraModule& a = lora->modules[i];
    const LoraModule& b = again->modules[i];
    ASSERT_EQ(a.module, b.module);
    EXPECT_EQ(a.input_expandable, b.input_expandable) << a.module;
    EXPECT_TRUE(Close(Delta(b), Delta(a))) << a.module;
    if (a.bias.defined()) {
      EXPECT_TRUE(Close(F64(b.bias) * b.scale, F64(a.bias) * a.scale));
    }
  }

  // Overlays equal diffusers' norm replacements exactly.
  std::set<std::string> ours_overlays;
  for (const LoraOverlay& o : lora->overlays) {
    ours_overlays.insert(o.param);
    ASSERT_EQ(their_overlays.count(o.param), 1u) << o.param;
    EXPECT_TRUE(o.value.equal(their_overlays.at(o.param))) << o.param;
    ours_merged[o.param] = F64(o.value);
  }
  EXPECT_EQ(ours_overlays.size(), their_overlays.size());

  // base + our delta reproduces diffusers' fused parameters, except where diffusers is wrong.
  for (const auto& [param, value] : *merged) {
    SCOPED_TRACE(param);
    auto ours = ours_merged.find(param);
    ASSERT_NE(ours, ours_merged.end()) << "diffusers changes a parameter this conversion does not";
    const std::string module = param.substr(0, param.rfind('.'));
    if (diffusers_wrong.count(module) > 0 && absl::EndsWith(param, ".weight")) {
      EXPECT_FALSE(Close(ours->second, value));  // checked against the correct math above
      continue;
    }
    EXPECT_TRUE(Close(ours->second, value));
  }
  for (const auto& [param, value] : ours_merged) {
    if (merged->count(param) == 0) {
      EXPECT_EQ(dropped.count(param.substr(0, param.rfind('.'))), 1u)
          << param << " changes here but not in diffusers, and diffusers does not drop it";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, FluxLoraGoldenTest, ::testing::ValuesIn(LoraGoldenCases()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return ::ds::test::CaseTestName(info.param);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(FluxLoraGoldenTest);

}  // namespace
}  // namespace ds::flux
