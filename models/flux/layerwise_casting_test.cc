// Layerwise casting on FluxTransformer2DModel: bfloat16/float16 storage with float32 compute.
// The cast model must compute exactly what the float32 model computes with its cast weights
// rounded to the storage dtype (the per-layer upcast is exact), keep diffusers' skipped modules in
// float32, hold fewer resident bytes, and work through every loader and LoRA path.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "handlers/layerwise_casting.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "models/flux/spec.h"
#include "models/flux/transformer.h"
#include "testing/test_util.h"

namespace ds::flux {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;

// Max |cast - float32| relative to max |float32| allowed for bfloat16 storage: bfloat16 keeps 8
// significant bits (relative rounding error <= 2^-9 ≈ 0.002 per weight), and the golden cases
// come out at 1.3e-3..2.1e-3 of max |output|. 1e-2 is ~5x that.
constexpr double kBFloat16StorageTolerance = 1e-2;
// float16 keeps 11 significant bits (8x finer): observed 1.9e-4..2.4e-4; ~5x that.
constexpr double kFloat16StorageTolerance = 1.25e-3;

fs::path FluxCase(const std::string& name) { return fs::path(GoldenDir()) / "flux" / name; }

ModelOptions Storage(torch::Dtype storage) {
  ModelOptions o;
  o.storage_dtype = storage;
  return o;
}

std::unique_ptr<DiffusionModel> LoadFolder(const fs::path& dir, const ModelOptions& options) {
  auto model = LoadModelFromFolder(dir.string(), options);
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

TensorMap Inputs(const fs::path& io_file) {
  auto all = LoadSafetensorsWeights(io_file.string());
  EXPECT_TRUE(all.ok()) << all.status();
  TensorMap in;
  for (const auto& [k, v] : *all) {
    if (k != "output" && k.rfind("intermediate/", 0) != 0) in.emplace(k, v);
  }
  return in;
}

torch::Tensor Forward(const DiffusionModel& model, const TensorMap& inputs) {
  auto out = model.Forward(inputs);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : torch::Tensor();
}

// The names whose tensors `model` stores in `dtype`.
std::vector<std::string> NamesIn(const DiffusionModel& model, torch::Dtype dtype) {
  std::vector<std::string> out;
  for (const auto& [k, t] : NamedTensors(model.module())) {
    if (t.scalar_type() == dtype) out.push_back(k);
  }
  return out;
}

// Rounds the parameters `names` of a float32 model through `storage` in place.
void RoundThrough(DiffusionModel& model, const std::vector<std::string>& names,
                  torch::Dtype storage) {
  torch::NoGradGuard no_grad;
  TensorMap params = NamedTensors(model.module());
  for (const std::string& n : names) {
    torch::Tensor p = params.at(n);
    p.copy_(p.to(storage).to(torch::kFloat));
  }
}

double MaxRelative(const torch::Tensor& a, const torch::Tensor& ref) {
  const torch::Tensor x = a.to(torch::kDouble), y = ref.to(torch::kDouble);
  return (x - y).abs().max().item<double>() / std::max(y.abs().max().item<double>(), 1e-30);
}

bool Matches(const std::string& module, const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns) {
    if (std::regex_search(module, std::regex(p))) return true;
  }
  return false;
}

class FluxLayerwiseCastingTest : public ::testing::TestWithParam<torch::Dtype> {};

// Every golden forward case: cast storage == float32 with rounded weights, bit for bit; the error
// against the unrounded float32 model is printed and bounded.
TEST_P(FluxLayerwiseCastingTest, EqualsRoundedFloat32ModelOnEveryGoldenCase) {
  const torch::Dtype storage = GetParam();
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(GoldenDir()) / "flux")) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "io.safetensors") || !fs::exists(dir / "transformer")) continue;
    ++cases;
    SCOPED_TRACE(dir.string());
    auto cast = LoadFolder(dir / "transformer", Storage(storage));
    auto fp32 = LoadFolder(dir / "transformer", ModelOptions{});
    auto rounded = LoadFolder(dir / "transformer", ModelOptions{});
    ASSERT_TRUE(cast && fp32 && rounded);
    EXPECT_EQ(cast->options().storage_dtype, storage);
    EXPECT_EQ(cast->options().dtype, torch::kFloat);
    const std::vector<std::string> low = NamesIn(*cast, storage);
    ASSERT_FALSE(low.empty());
    RoundThrough(*rounded, low, storage);

    const TensorMap in = Inputs(dir / "io.safetensors");
    const torch::Tensor out_cast = Forward(*cast, in);
    const torch::Tensor out_rounded = Forward(*rounded, in);
    const torch::Tensor out_fp32 = Forward(*fp32, in);
    ASSERT_EQ(out_cast.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(out_cast, out_rounded))
        << "max |cast - rounded| = " << (out_cast - out_rounded).abs().max().item<double>();
    const double err = MaxRelative(out_cast, out_fp32);
    const double tol =
        storage == torch::kBFloat16 ? kBFloat16StorageTolerance : kFloat16StorageTolerance;
    std::printf("[layerwise casting] %s storage, %s: max|cast - fp32| / max|fp32| = %.3g "
                "(tolerance %.3g); resident bytes %lld vs %lld fp32 (%.3f)\n",
                c10::toString(storage), dir.filename().c_str(), err, tol,
                static_cast<long long>(ParameterBytes(cast->module())),
                static_cast<long long>(ParameterBytes(fp32->module())),
                static_cast<double>(ParameterBytes(cast->module())) /
                    static_cast<double>(ParameterBytes(fp32->module())));
    EXPECT_LE(err, tol);
    EXPECT_GT(err, 0.0) << "rounding the weights must change the output a little";
  }
  EXPECT_GT(cases, 0) << "no golden flux cases under " << GoldenDir();
}

INSTANTIATE_TEST_SUITE_P(Storage, FluxLayerwiseCastingTest,
                         ::testing::Values(torch::kBFloat16, torch::kFloat16),
                         [](const auto& info) { return std::string(c10::toString(info.param)); });

// Which parameters are stored low: exactly the Linear weights/biases outside diffusers' default
// patterns and Flux's own (pos_embed, norm), checked by name against the patterns themselves.
TEST(FluxLayerwiseCastingNamesTest, SkipPatternsStayInComputeDtype) {
  auto cast = LoadFolder(FluxCase("flux_small_b2") / "transformer", Storage(torch::kBFloat16));
  ASSERT_TRUE(cast);
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(spec.ok());
  const std::vector<std::string> patterns = LayerwiseCastingSkipPatterns(
      ModelOptions{}, (*spec)->structure.skip_layerwise_casting_patterns,
      (*spec)->structure.keep_in_fp32_modules);
  int low = 0, kept = 0;
  for (const auto& [name, t] : NamedTensors(cast->module())) {
    const std::string module = name.substr(0, name.rfind('.'));
    // Module and ancestor names, as diffusers walks them.
    bool skipped = false;
    for (size_t end = module.find('.');; end = module.find('.', end + 1)) {
      skipped |= Matches(end == std::string::npos ? module : module.substr(0, end), patterns);
      if (end == std::string::npos) break;
    }
    // Flux's parameters are Linear weights/biases except the RMSNorm scales (norm_q, ...).
    const bool linear = module.find("norm_") == std::string::npos ||
                        module.rfind(".linear") == module.size() - 7;
    const bool want_low = linear && !skipped;
    EXPECT_EQ(t.scalar_type(), want_low ? torch::kBFloat16 : torch::kFloat) << name;
    (want_low ? low : kept) += 1;
  }
  EXPECT_GT(low, 0);
  EXPECT_GT(kept, 0);
  // Spot checks of diffusers' decisions on Flux's own names.
  const TensorMap t = NamedTensors(cast->module());
  EXPECT_EQ(t.at("transformer_blocks.0.norm1.linear.weight").scalar_type(), torch::kFloat);
  EXPECT_EQ(t.at("transformer_blocks.0.attn.norm_q.weight").scalar_type(), torch::kFloat);
  EXPECT_EQ(t.at("norm_out.linear.weight").scalar_type(), torch::kFloat);
  EXPECT_EQ(t.at("proj_out.weight").scalar_type(), torch::kFloat);  // ^proj_out$
  EXPECT_EQ(t.at("single_transformer_blocks.0.proj_out.weight").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(t.at("transformer_blocks.0.attn.to_q.weight").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(t.at("x_embedder.bias").scalar_type(), torch::kBFloat16);
}

// Resident weight memory, on FLUX.1-dev's proportions (19 double + 38 single blocks, head dim
// 128, T5/CLIP widths, 64 input channels) at 2 heads so that it builds in a test (uninitialized,
// nothing is touched). With diffusers' skip patterns the modulation linears (about a quarter of
// the weights) stay float32, so bfloat16 storage cannot reach half; casting them too (patterns
// without "norm") meets the 0.55 target.
TEST(FluxLayerwiseCastingMemoryTest, ResidentBytesRatio) {
  nlohmann::json config = {{"patch_size", 1},          {"in_channels", 64},
                           {"num_layers", 19},         {"num_single_layers", 38},
                           {"attention_head_dim", 128}, {"num_attention_heads", 2},
                           {"joint_attention_dim", 4096}, {"pooled_projection_dim", 768},
                           {"guidance_embeds", true},  {"axes_dims_rope", {16, 56, 56}}};
  ModelOptions base;
  base.uninitialized_parameters = true;
  auto fp32 = FluxTransformer::Create(config, base);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  const double fp32_bytes = static_cast<double>(ParameterBytes((*fp32)->module()));

  ModelOptions cast_options = base;
  cast_options.storage_dtype = torch::kBFloat16;
  auto cast = FluxTransformer::Create(config, cast_options);
  ASSERT_TRUE(cast.ok()) << cast.status();
  // The bytes are exactly 2 per stored-low element and 4 per other one.
  int64_t expected = 0;
  for (const auto& [k, v] : NamedTensors((*cast)->module())) {
    expected += v.numel() * (v.scalar_type() == torch::kBFloat16 ? 2 : 4);
  }
  const int64_t cast_bytes = ParameterBytes((*cast)->module());
  EXPECT_EQ(cast_bytes, expected);
  const double default_ratio = static_cast<double>(cast_bytes) / fp32_bytes;

  ModelOptions all_linear = cast_options;
  all_linear.layerwise_casting_skip_patterns =
      std::vector<std::string>{"pos_embed", "patch_embed", "^proj_in$", "^proj_out$"};
  auto cast_all = FluxTransformer::Create(config, all_linear);
  ASSERT_TRUE(cast_all.ok()) << cast_all.status();
  const double all_ratio = static_cast<double>(ParameterBytes((*cast_all)->module())) / fp32_bytes;
  std::printf("[layerwise casting] FLUX.1-dev proportions, bf16 storage: resident/fp32 = %.3f "
              "with diffusers' skip patterns, %.3f casting the modulation linears too\n",
              default_ratio, all_ratio);
  EXPECT_LT(default_ratio, 0.70);
  EXPECT_GT(default_ratio, 0.5);
  EXPECT_LE(all_ratio, 0.55);
}

// The single-file loader (BFL naming, zero-copy where dtypes match) with a storage dtype.
TEST(FluxLayerwiseCastingLoadersTest, SingleFile) {
  const fs::path dir = fs::path(GoldenDir()) / "single_file" / "flux-dev";
  SingleFileOptions cast_options;
  cast_options.model = Storage(torch::kBFloat16);
  auto cast = LoadSingleFile((dir / "original.safetensors").string(), cast_options);
  ASSERT_TRUE(cast.ok()) << cast.status();
  auto rounded = LoadSingleFile((dir / "original.safetensors").string());
  ASSERT_TRUE(rounded.ok()) << rounded.status();
  const std::vector<std::string> low = NamesIn(*cast->model, torch::kBFloat16);
  ASSERT_FALSE(low.empty());
  EXPECT_EQ(NamedTensors(cast->model->module()).at("proj_out.weight").scalar_type(),
            torch::kFloat);
  RoundThrough(*rounded->model, low, torch::kBFloat16);
  auto io = LoadSafetensorsWeights((dir / "io.safetensors").string());
  ASSERT_TRUE(io.ok()) << io.status();
  TensorMap in;
  for (const auto& [k, v] : *io) {
    if (k != "output") in.emplace(k, v);
  }
  const torch::Tensor a = Forward(*cast->model, in), b = Forward(*rounded->model, in);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_LE(MaxRelative(a, io->at("output")), kBFloat16StorageTolerance);

  // A storage dtype not narrower than the compute dtype is refused before anything is built.
  SingleFileOptions bad;
  bad.model.dtype = torch::kBFloat16;
  bad.model.storage_dtype = torch::kBFloat16;
  auto refused = LoadSingleFile((dir / "original.safetensors").string(), bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("not lower than the compute dtype"),
            std::string::npos)
      << refused.status();
}

TEST(FluxLayerwiseCastingLoadersTest, FolderErrors) {
  ModelOptions bad = Storage(torch::kFloat16);
  bad.dtype = torch::kBFloat16;
  auto refused = LoadModelFromFolder((FluxCase("flux_tiny") / "transformer").string(), bad);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  ModelOptions pattern = Storage(torch::kBFloat16);
  pattern.layerwise_casting_skip_patterns = std::vector<std::string>{"norm", "[oops"};
  auto bad_pattern = LoadModelFromFolder((FluxCase("flux_tiny") / "transformer").string(), pattern);
  EXPECT_EQ(bad_pattern.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_pattern.status().message().find("[oops"), std::string::npos);
  // A model family without layerwise casting refuses it (the golden VAE folder).
  const fs::path vae = fs::path(GoldenDir()) / "pipeline" / "vae" / "vae";
  auto unsupported = LoadModelFromFolder(vae.string(), Storage(torch::kBFloat16));
  EXPECT_EQ(unsupported.status().code(), absl::StatusCode::kUnimplemented)
      << unsupported.status();
  EXPECT_NE(unsupported.status().message().find("AutoencoderKL"), std::string::npos);
}

// LoRA on stored-low weights. Unfused: the adapters run in the compute dtype, so the result is the
// rounded float32 model's with the same adapters, bit for bit. Fused: W' = W + ΔW is computed in
// float32 from the stored weight and rounded once to the storage dtype (the parameter keeps its
// storage dtype and memory); Unfuse restores the stored weights bit for bit.
TEST(FluxLayerwiseCastingLoraTest, UnfusedAndFused) {
  const fs::path golden = fs::path(GoldenDir()) / "lora";
  const fs::path base = golden / "base_model_dir" / "transformer";
  const std::string lora = (golden / "diffusers" / "input.safetensors").string();
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(spec.ok());
  std::shared_ptr<DiffusionModel> cast_model = LoadFolder(base, Storage(torch::kBFloat16));
  std::shared_ptr<DiffusionModel> rounded_model = LoadFolder(base, ModelOptions{});
  ASSERT_TRUE(cast_model && rounded_model);
  const std::vector<std::string> low = NamesIn(*cast_model, torch::kBFloat16);
  RoundThrough(*rounded_model, low, torch::kBFloat16);
  LoraHost cast(cast_model, (*spec)->lora);
  LoraHost rounded(rounded_model, (*spec)->lora);
  ASSERT_TRUE(cast.Load("a", lora).ok());
  ASSERT_TRUE(rounded.Load("a", lora).ok());
  for (const LoraAdapterPtr& a : {*cast.Get("a"), *rounded.Get("a")}) {
    for (const LoraModule& m : a->modules) EXPECT_EQ(m.down.scalar_type(), torch::kFloat);
  }

  const TensorMap in = Inputs(golden / "diffusers" / "forward.safetensors");
  auto cast_stack = cast.Snapshot({{"a", 1.0}});
  auto rounded_stack = rounded.Snapshot({{"a", 1.0}});
  ASSERT_TRUE(cast_stack.ok() && rounded_stack.ok());
  auto unfused = cast.Forward(in, cast_stack->get());
  auto unfused_ref = rounded.Forward(in, rounded_stack->get());
  ASSERT_TRUE(unfused.ok() && unfused_ref.ok()) << unfused.status() << unfused_ref.status();
  EXPECT_TRUE(torch::equal(*unfused, *unfused_ref));
  auto plain = cast.Forward(in);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(torch::equal(*plain, *unfused)) << "the adapter must change the output";

  // Fused.
  std::map<std::string, torch::Tensor> stored;
  for (const auto& [k, v] : NamedTensors(cast_model->module())) stored[k] = v.clone();
  const int64_t bytes_before = ParameterBytes(cast_model->module());
  ASSERT_TRUE(cast.Fuse({{"a", 1.0}}).ok());
  ASSERT_TRUE(rounded.Fuse({{"a", 1.0}}).ok());
  EXPECT_EQ(ParameterBytes(cast_model->module()), bytes_before);
  for (const std::string& n : low) {
    EXPECT_EQ(NamedTensors(cast_model->module()).at(n).scalar_type(), torch::kBFloat16) << n;
  }
  // Expected: the float32 fused weights of the rounded model, rounded once to bfloat16.
  std::shared_ptr<DiffusionModel> expected_model = LoadFolder(base, ModelOptions{});
  ASSERT_TRUE(expected_model);
  ASSERT_TRUE(LoadStateDict(expected_model->module(), NamedTensors(rounded_model->module())).ok());
  RoundThrough(*expected_model, low, torch::kBFloat16);
  auto fused = cast.Forward(in);
  ASSERT_TRUE(fused.ok());
  const torch::Tensor fused_ref = Forward(*expected_model, in);
  EXPECT_TRUE(torch::equal(*fused, fused_ref));
  std::printf("[layerwise casting] LoRA fused vs unfused on bf16 storage: max rel diff %.3g\n",
              MaxRelative(*fused, *unfused));
  EXPECT_LE(MaxRelative(*fused, *unfused), kBFloat16StorageTolerance);

  ASSERT_TRUE(cast.Unfuse().ok());
  for (const auto& [k, v] : NamedTensors(cast_model->module())) {
    EXPECT_TRUE(v.scalar_type() == stored.at(k).scalar_type() && torch::equal(v, stored.at(k)))
        << k;
  }
}

// ---------------------------------------------------------------------------------------------
// 8-bit float storage (uint8 codes + float32 row scales, handlers/layerwise_casting.h).

// Max |cast - float32| relative to max |float32| allowed for 8-bit storage of the default
// selection: E4M3 keeps 4 significant bits (relative rounding error <= 2^-4 per weight), E5M2
// 3 bits (2^-3). The golden cases come out at 0.015..0.025 (E4M3) and 0.020..0.052 (E5M2) of
// max |output| (printed below); the bounds are ~4x the largest observed.
constexpr double kE4M3StorageTolerance = 0.1;
constexpr double kE5M2StorageTolerance = 0.2;

ModelOptions Float8Storage(Float8Format format) {
  ModelOptions o;
  o.storage_dtype = torch::kByte;
  o.float8_format = format;
  return o;
}

// Replaces, in a float32 model, each weight that `cast` stores as 8-bit codes by its decoded
// value (codes x row scale), and returns how many.
int DequantizeInto(DiffusionModel& fp32, const DiffusionModel& cast) {
  torch::NoGradGuard no_grad;
  const TensorMap c = NamedTensors(cast.module());
  TensorMap params = NamedTensors(fp32.module());
  int n = 0;
  for (const auto& [param, scale] : Float8StoredParameters(cast.module())) {
    params.at(param).copy_(
        DequantizeFloat8(c.at(param), c.at(scale), cast.options().float8_format));
    ++n;
  }
  return n;
}

class FluxFloat8StorageTest : public ::testing::TestWithParam<Float8Format> {};

// Every golden forward case: the 8-bit model == the float32 model with decoded weights, bit for
// bit; the error against the float32 model is printed and bounded.
TEST_P(FluxFloat8StorageTest, EqualsDecodedFloat32ModelOnEveryGoldenCase) {
  const Float8Format format = GetParam();
  int cases = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(GoldenDir()) / "flux")) {
    const fs::path dir = entry.path();
    if (!fs::exists(dir / "io.safetensors") || !fs::exists(dir / "transformer")) continue;
    ++cases;
    SCOPED_TRACE(dir.string());
    auto cast = LoadFolder(dir / "transformer", Float8Storage(format));
    auto fp32 = LoadFolder(dir / "transformer", ModelOptions{});
    auto decoded = LoadFolder(dir / "transformer", ModelOptions{});
    ASSERT_TRUE(cast && fp32 && decoded);
    EXPECT_EQ(StorageDtypeName(cast->options()), Float8FormatName(format));
    ASSERT_GT(DequantizeInto(*decoded, *cast), 0);
    // Only weights are codes; the selected linears' biases stay float32.
    const TensorMap t = NamedTensors(cast->module());
    EXPECT_EQ(t.at("transformer_blocks.0.attn.to_q.weight").scalar_type(), torch::kByte);
    EXPECT_EQ(t.at("transformer_blocks.0.attn.to_q.bias").scalar_type(), torch::kFloat);
    EXPECT_EQ(t.at("transformer_blocks.0.attn.to_q.weight_scale").scalar_type(), torch::kFloat);
    EXPECT_EQ(t.at("transformer_blocks.0.norm1.linear.weight").scalar_type(), torch::kFloat);

    const TensorMap in = Inputs(dir / "io.safetensors");
    const torch::Tensor out_cast = Forward(*cast, in);
    const torch::Tensor out_decoded = Forward(*decoded, in);
    const torch::Tensor out_fp32 = Forward(*fp32, in);
    ASSERT_EQ(out_cast.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(out_cast, out_decoded))
        << "max |cast - decoded| = " << (out_cast - out_decoded).abs().max().item<double>();
    const double err = MaxRelative(out_cast, out_fp32);
    const double abs_err = (out_cast - out_fp32).abs().max().item<double>();
    const double tol =
        format == Float8Format::kE4M3FN ? kE4M3StorageTolerance : kE5M2StorageTolerance;
    std::printf("[layerwise casting] %s storage, %s: max|cast - fp32| = %.3g, / max|fp32| = %.3g "
                "(tolerance %.3g); resident bytes %.3f of fp32\n",
                Float8FormatName(format), dir.filename().c_str(), abs_err, err, tol,
                static_cast<double>(ParameterBytes(cast->module())) /
                    static_cast<double>(ParameterBytes(fp32->module())));
    EXPECT_LE(err, tol);
    EXPECT_GT(err, 0.0);
  }
  EXPECT_GT(cases, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, FluxFloat8StorageTest,
                         ::testing::Values(Float8Format::kE4M3FN, Float8Format::kE5M2),
                         [](const auto& info) { return std::string(Float8FormatName(info.param)); });

// Resident bytes with every linear but pos_embed/proj_out cast to 8 bits, FLUX.1-dev proportions:
// 1 byte per weight plus 4 per row scale, against 4 per weight.
TEST(FluxFloat8StorageMemoryTest, ResidentBytesRatio) {
  nlohmann::json config = {{"patch_size", 1},          {"in_channels", 64},
                           {"num_layers", 19},         {"num_single_layers", 38},
                           {"attention_head_dim", 128}, {"num_attention_heads", 2},
                           {"joint_attention_dim", 4096}, {"pooled_projection_dim", 768},
                           {"guidance_embeds", true},  {"axes_dims_rope", {16, 56, 56}}};
  ModelOptions base;
  base.uninitialized_parameters = true;
  auto fp32 = FluxTransformer::Create(config, base);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  ModelOptions all = Float8Storage(Float8Format::kE4M3FN);
  all.uninitialized_parameters = true;
  all.layerwise_casting_skip_patterns =
      std::vector<std::string>{"pos_embed", "patch_embed", "^proj_in$", "^proj_out$"};
  auto cast = FluxTransformer::Create(config, all);
  ASSERT_TRUE(cast.ok()) << cast.status();
  int64_t expected = 0;
  for (const auto& [k, v] : NamedTensors((*cast)->module())) {
    expected += v.numel() * (v.scalar_type() == torch::kByte ? 1 : 4);
  }
  EXPECT_EQ(ParameterBytes((*cast)->module()), expected);
  const double ratio = static_cast<double>(ParameterBytes((*cast)->module())) /
                       static_cast<double>(ParameterBytes((*fp32)->module()));
  std::printf("[layerwise casting] FLUX.1-dev proportions, float8_e4m3fn storage of all linears: "
              "resident/fp32 = %.3f\n", ratio);
  EXPECT_GE(ratio, 0.25);
  EXPECT_LE(ratio, 0.30);
}

// The single-file loader quantizes while mapping (codes become the parameters, scales the
// buffers).
TEST(FluxFloat8StorageLoadersTest, SingleFile) {
  const fs::path dir = fs::path(GoldenDir()) / "single_file" / "flux-dev";
  SingleFileOptions cast_options;
  cast_options.model = Float8Storage(Float8Format::kE4M3FN);
  auto cast = LoadSingleFile((dir / "original.safetensors").string(), cast_options);
  ASSERT_TRUE(cast.ok()) << cast.status();
  auto decoded = LoadSingleFile((dir / "original.safetensors").string());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  ASSERT_GT(DequantizeInto(*decoded->model, *cast->model), 0);
  auto io = LoadSafetensorsWeights((dir / "io.safetensors").string());
  ASSERT_TRUE(io.ok()) << io.status();
  TensorMap in;
  for (const auto& [k, v] : *io) {
    if (k != "output") in.emplace(k, v);
  }
  const torch::Tensor a = Forward(*cast->model, in), b = Forward(*decoded->model, in);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_LE(MaxRelative(a, io->at("output")), kE4M3StorageTolerance);
}

// LoRA on 8-bit weights. Unfused: adapters in float32 on top of the decoded weights, equal to the
// decoded float32 model's. Fused: decode, add the delta in float32, re-encode with fresh row
// scales (exactly QuantizeFloat8 of the float32 fused weight); Unfuse restores codes and scales.
TEST(FluxFloat8StorageLoraTest, UnfusedAndFused) {
  const fs::path golden = fs::path(GoldenDir()) / "lora";
  const fs::path base = golden / "base_model_dir" / "transformer";
  const std::string lora = (golden / "diffusers" / "input.safetensors").string();
  auto spec = ModelRegistry::Global().Find("FluxTransformer2DModel");
  ASSERT_TRUE(spec.ok());
  std::shared_ptr<DiffusionModel> cast_model =
      LoadFolder(base, Float8Storage(Float8Format::kE4M3FN));
  std::shared_ptr<DiffusionModel> decoded_model = LoadFolder(base, ModelOptions{});
  ASSERT_TRUE(cast_model && decoded_model);
  ASSERT_GT(DequantizeInto(*decoded_model, *cast_model), 0);
  LoraHost cast(cast_model, (*spec)->lora);
  LoraHost decoded(decoded_model, (*spec)->lora);
  ASSERT_TRUE(cast.Load("a", lora).ok());
  ASSERT_TRUE(decoded.Load("a", lora).ok());
  const TensorMap in = Inputs(golden / "diffusers" / "forward.safetensors");
  auto cast_stack = cast.Snapshot({{"a", 1.0}});
  auto decoded_stack = decoded.Snapshot({{"a", 1.0}});
  ASSERT_TRUE(cast_stack.ok() && decoded_stack.ok());
  auto unfused = cast.Forward(in, cast_stack->get());
  auto unfused_ref = decoded.Forward(in, decoded_stack->get());
  ASSERT_TRUE(unfused.ok() && unfused_ref.ok()) << unfused.status() << unfused_ref.status();
  EXPECT_TRUE(torch::equal(*unfused, *unfused_ref));

  std::map<std::string, torch::Tensor> stored;
  for (const auto& [k, v] : NamedTensors(cast_model->module())) stored[k] = v.clone();
  ASSERT_TRUE(cast.Fuse({{"a", 1.0}}).ok());
  ASSERT_TRUE(decoded.Fuse({{"a", 1.0}}).ok());
  const TensorMap fused_cast = NamedTensors(cast_model->module());
  const TensorMap fused_float = NamedTensors(decoded_model->module());
  int requantized = 0;
  for (const auto& [param, scale] : Float8StoredParameters(cast_model->module())) {
    ASSERT_EQ(fused_cast.at(param).scalar_type(), torch::kByte) << param;
    auto q = QuantizeFloat8(fused_float.at(param), Float8Format::kE4M3FN, param);
    ASSERT_TRUE(q.ok());
    EXPECT_TRUE(torch::equal(fused_cast.at(param), q->codes)) << param;
    EXPECT_TRUE(torch::equal(fused_cast.at(scale), q->scale)) << param;
    requantized += !torch::equal(fused_cast.at(param), stored.at(param));
  }
  EXPECT_GT(requantized, 0) << "the adapter must change some stored weights";
  auto fused = cast.Forward(in);
  ASSERT_TRUE(fused.ok());
  std::printf("[layerwise casting] LoRA fused vs unfused on float8_e4m3fn storage: max rel diff "
              "%.3g\n", MaxRelative(*fused, *unfused));
  EXPECT_LE(MaxRelative(*fused, *unfused), kE4M3StorageTolerance);

  ASSERT_TRUE(cast.Unfuse().ok());
  for (const auto& [k, v] : NamedTensors(cast_model->module())) {
    EXPECT_TRUE(v.scalar_type() == stored.at(k).scalar_type() && torch::equal(v, stored.at(k)))
        << k;
  }
  auto plain = cast.Forward(in);
  auto plain_ref = decoded.Forward(in);
  ASSERT_TRUE(plain.ok() && plain_ref.ok());
  ASSERT_TRUE(decoded.Unfuse().ok());
  auto plain_ref2 = decoded.Forward(in);
  ASSERT_TRUE(plain_ref2.ok());
  EXPECT_TRUE(torch::equal(*plain, *plain_ref2));
}

}  // namespace
}  // namespace ds::flux
