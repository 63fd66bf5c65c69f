#include "handlers/layerwise_casting.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "handlers/registry.h"
#include "handlers/state_dict.h"

namespace ds {
namespace {

// A small module tree mixing cast layer classes, a norm with parameters, a bare parameter and
// names that the default patterns match at different depths.
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    to_q = register_module("to_q", torch::nn::Linear(8, 8));
    norm1 = register_module("norm1", torch::nn::Sequential(torch::nn::Linear(8, 16)));
    proj_out = register_module("proj_out", torch::nn::Linear(8, 4));
    scale = register_parameter("scale", torch::ones({8}));
  }
  torch::nn::Linear to_q{nullptr};
  torch::nn::Sequential norm1{nullptr};
  torch::nn::Linear proj_out{nullptr};
  torch::Tensor scale;
};
TORCH_MODULE(Block);

struct ToyImpl : torch::nn::Module {
  ToyImpl() {
    embed = register_module("embed", torch::nn::Embedding(10, 8));
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3)));
    pos_embed = register_module("pos_embed", torch::nn::Linear(4, 8));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({8})));
    blocks = register_module("blocks", torch::nn::ModuleList(Block(), Block()));
    proj_in = register_module("proj_in", torch::nn::Sequential(torch::nn::Linear(8, 8)));
    proj_out = register_module("proj_out", torch::nn::Linear(8, 2));
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Conv2d conv{nullptr};
  torch::nn::Linear pos_embed{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::Sequential proj_in{nullptr};
  torch::nn::Linear proj_out{nullptr};
};
TORCH_MODULE(Toy);

TEST(LayerwiseCastingTest, CastableClassesAreDiffusersLayers) {
  EXPECT_TRUE(IsLayerwiseCastableClass("torch::nn::LinearImpl"));
  EXPECT_TRUE(IsLayerwiseCastableClass("ds::flux::LinearImpl"));
  EXPECT_TRUE(IsLayerwiseCastableClass("Conv2d"));
  EXPECT_TRUE(IsLayerwiseCastableClass("torch::nn::ConvTranspose3dImpl"));
  EXPECT_TRUE(IsLayerwiseCastableClass("torch::nn::EmbeddingImpl"));
  EXPECT_FALSE(IsLayerwiseCastableClass("torch::nn::LayerNormImpl"));
  EXPECT_FALSE(IsLayerwiseCastableClass("ds::flux::RMSNormImpl"));
  EXPECT_FALSE(IsLayerwiseCastableClass("torch::nn::GroupNormImpl"));
  EXPECT_FALSE(IsLayerwiseCastableClass("LinearProjection"));
}

TEST(LayerwiseCastingTest, SelectsAsDiffusersDoes) {
  Toy toy;
  ModelOptions options;
  const std::vector<std::string> patterns = LayerwiseCastingSkipPatterns(options, {"to_q"});
  auto names = LayerwiseCastParameterNames(*toy, patterns);
  ASSERT_TRUE(names.ok()) << names.status();
  // embed and conv are cast; pos_embed / norm* (any depth) / ^proj_in$ (its child via the
  // ancestor) / ^proj_out$ (top level only) / the model's "to_q" are skipped; blocks' proj_out
  // is cast because the anchored pattern only matches the top-level name; bare parameters and the
  // LayerNorm never are.
  const std::vector<std::string> expected = {"blocks.0.proj_out.bias",
                                             "blocks.0.proj_out.weight",
                                             "blocks.1.proj_out.bias",
                                             "blocks.1.proj_out.weight",
                                             "conv.bias",
                                             "conv.weight",
                                             "embed.weight"};
  EXPECT_EQ(*names, expected);
}

TEST(LayerwiseCastingTest, SkipPatternsMergeAndOverride) {
  ModelOptions options;
  std::vector<std::string> merged =
      LayerwiseCastingSkipPatterns(options, {"pos_embed", "norm", "x_embedder"}, {"keep"});
  std::vector<std::string> expected = DefaultLayerwiseCastingSkipPatterns();
  expected.push_back("keep");
  expected.push_back("x_embedder");
  EXPECT_EQ(merged, expected);
  options.layerwise_casting_skip_patterns = std::vector<std::string>{"^conv$"};
  EXPECT_EQ(LayerwiseCastingSkipPatterns(options, {"norm"}), std::vector<std::string>{"^conv$"});
}

TEST(LayerwiseCastingTest, ApplyConvertsOnlySelectedAndKeepsValues) {
  torch::manual_seed(0);
  Toy toy;
  const TensorMap before = NamedTensors(*toy);
  std::map<std::string, torch::Tensor> copies;
  for (const auto& [k, v] : before) copies[k] = v.detach().clone();
  const int64_t fp32_bytes = ParameterBytes(*toy);
  const std::vector<std::string> patterns = LayerwiseCastingSkipPatterns(ModelOptions{}, {});
  auto cast = ApplyLayerwiseCasting(*toy, torch::kBFloat16, patterns);
  ASSERT_TRUE(cast.ok()) << cast.status();
  int64_t expected_bytes = 0;
  for (const auto& [k, v] : NamedTensors(*toy)) {
    const bool selected = std::find(cast->begin(), cast->end(), k) != cast->end();
    EXPECT_EQ(v.scalar_type(), selected ? torch::kBFloat16 : torch::kFloat) << k;
    // Same values, rounded to bfloat16 where cast.
    const torch::Tensor want = selected ? copies[k].to(torch::kBFloat16) : copies[k];
    EXPECT_TRUE(torch::equal(v, want)) << k;
    expected_bytes += v.numel() * (selected ? 2 : 4);
  }
  EXPECT_EQ(ParameterBytes(*toy), expected_bytes);
  EXPECT_LT(ParameterBytes(*toy), fp32_bytes);
  // The module's own parameter handles see the new storage (set_data keeps them valid).
  EXPECT_EQ(toy->conv->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(toy->pos_embed->weight.scalar_type(), torch::kFloat);
}

TEST(LayerwiseCastingTest, ParseAndValidate) {
  auto bf = ParseStorageDtype("bfloat16");
  ASSERT_TRUE(bf.ok());
  EXPECT_EQ(**bf, torch::kBFloat16);
  auto fp = ParseStorageDtype("fp16");
  ASSERT_TRUE(fp.ok());
  EXPECT_EQ(**fp, torch::kFloat16);
  auto none = ParseStorageDtype("");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  auto bad = ParseStorageDtype("float8_e3m4");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("float8_e3m4"), std::string::npos);
  EXPECT_NE(bad.status().message().find("float8_e4m3fn"), std::string::npos) << "lists choices";
  for (const char* name : {"float8_e4m3fn", "float8_e5m2"}) {
    auto byte = ParseStorageDtype(name);
    ASSERT_TRUE(byte.ok()) << name;
    EXPECT_EQ(**byte, torch::kByte);
    ModelOptions options;
    ASSERT_TRUE(SetStorageDtype(name, options).ok());
    EXPECT_EQ(StorageDtypeName(options), name);
    EXPECT_TRUE(ValidateStorageDtype(options).ok());
    options.dtype = torch::kBFloat16;  // 8-bit storage is narrower than any compute dtype
    EXPECT_TRUE(ValidateStorageDtype(options).ok());
  }
  ModelOptions unchanged;
  EXPECT_FALSE(SetStorageDtype("int4", unchanged).ok());
  EXPECT_FALSE(unchanged.storage_dtype.has_value());

  ModelOptions o;
  o.storage_dtype = torch::kBFloat16;
  EXPECT_TRUE(ValidateStorageDtype(o).ok());
  o.dtype = torch::kBFloat16;
  absl::Status same = ValidateStorageDtype(o);
  EXPECT_EQ(same.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(same.message().find("not lower than the compute dtype"), std::string::npos) << same;
  o.dtype = torch::kFloat16;
  EXPECT_EQ(ValidateStorageDtype(o).code(), absl::StatusCode::kInvalidArgument);
  o.storage_dtype = torch::kFloat32;
  o.dtype = torch::kFloat32;
  EXPECT_EQ(ValidateStorageDtype(o).code(), absl::StatusCode::kInvalidArgument);

  absl::Status bad_pattern = ValidateSkipPatterns({"norm", "(unclosed"});
  EXPECT_EQ(bad_pattern.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_pattern.message().find("(unclosed"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// 8-bit floats. Expected values come from the format definitions (OCP FP8) only: the encoder is
// checked against a brute-force nearest search over the decoded table.

class Float8Test : public ::testing::TestWithParam<Float8Format> {};

// Format-definition facts about the table: largest finite value, smallest subnormal, specials,
// strict monotonicity of the finite codes and the sign bit.
TEST_P(Float8Test, TableFollowsTheFormat) {
  const Float8Format f = GetParam();
  const bool e4m3 = f == Float8Format::kE4M3FN;
  const auto& t = Float8Table(f);
  const int max_code = e4m3 ? 0x7e : 0x7b;
  EXPECT_EQ(Float8Max(f), e4m3 ? 448.0f : 57344.0f);
  EXPECT_EQ(t[max_code], Float8Max(f));
  EXPECT_EQ(t[1], std::ldexp(1.0f, e4m3 ? -9 : -16));  // smallest subnormal
  EXPECT_EQ(t[0], 0.0f);
  if (e4m3) {
    EXPECT_TRUE(std::isnan(t[0x7f]) && std::isnan(t[0xff]));
  } else {
    EXPECT_TRUE(std::isinf(t[0x7c]) && t[0x7c] > 0 && std::isinf(t[0xfc]) && t[0xfc] < 0);
    for (int c : {0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff}) EXPECT_TRUE(std::isnan(t[c])) << c;
  }
  for (int c = 1; c <= max_code; ++c) EXPECT_LT(t[c - 1], t[c]) << c;
  for (int c = 0; c < 128; ++c) {
    if (!std::isnan(t[c])) {
      EXPECT_EQ(t[c | 0x80], -t[c]) << c;
    }
  }
}

// The reference: the nearest finite representable magnitude to |x| (ties to the even code),
// saturating at max; NaN stays NaN.
uint8_t NearestCode(float x, Float8Format f) {
  const auto& t = Float8Table(f);
  const int max_code = f == Float8Format::kE4M3FN ? 0x7e : 0x7b;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= t[max_code]) return sign | max_code;
  int best = 0;
  for (int c = 1; c <= max_code; ++c) {
    const double d = std::fabs(a - t[c]), db = std::fabs(a - t[best]);
    if (d < db || (d == db && (c & 1) == 0)) best = c;
  }
  return sign | static_cast<uint8_t>(best);
}

TEST_P(Float8Test, EncodeIsNearestTiesToEvenSaturating) {
  const Float8Format f = GetParam();
  const auto& t = Float8Table(f);
  const int max_code = f == Float8Format::kE4M3FN ? 0x7e : 0x7b;
  std::vector<float> xs;
  // Every representable value, the midpoints between neighbours (exact ties), and the floats just
  // either side of each midpoint; beyond max, the would-be next midpoint and far values.
  for (int c = 0; c <= max_code; ++c) {
    xs.push_back(t[c]);
    if (c < max_code) {
      const float mid = (t[c] + t[c + 1]) / 2;  // exact in float32
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(t[c]) + t[c + 1]) / 2);
      xs.push_back(mid);
      xs.push_back(std::nextafter(mid, 0.0f));
      xs.push_back(std::nextafter(mid, 1e30f));
    }
  }
  for (float v : {std::nextafter(Float8Max(f), 0.0f), std::nextafter(Float8Max(f), 1e30f),
                  Float8Max(f) * 1.0625f, Float8Max(f) * 2, 1e30f,
                  std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::denorm_min(), std::ldexp(1.0f, -30)}) {
    xs.push_back(v);
  }
  // A sweep over float32 bit patterns (every 4099th: all binades, float32 subnormals, NaNs).
  for (uint64_t bits = 0; bits <= 0x7fffffffu; bits += 4099) {
    const uint32_t b = static_cast<uint32_t>(bits);
    float v;
    std::memcpy(&v, &b, sizeof(v));
    xs.push_back(v);
  }
  int64_t checked = 0;
  for (float x : xs) {
    for (float v : {x, -x}) {
      const uint8_t code = EncodeFloat8(v, f);
      if (std::isnan(v)) {
        EXPECT_EQ(code & 0x7f, 0x7f) << v;
        EXPECT_TRUE(std::isnan(DecodeFloat8(code, f)));
        continue;
      }
      ASSERT_EQ(code, NearestCode(v, f)) << "x = " << v << " (" << std::hexfloat << v << ")";
      ++checked;
    }
  }
  EXPECT_GT(checked, 1000000);
  // Representable values round-trip, with their sign (including -0).
  for (int c = 0; c < 256; ++c) {
    if (std::isnan(t[c]) || std::isinf(t[c])) continue;
    EXPECT_EQ(EncodeFloat8(t[c], f), c) << c;
  }
}

TEST_P(Float8Test, QuantizePerRow) {
  const Float8Format f = GetParam();
  torch::manual_seed(3);
  // Rows of very different magnitudes, one all-zero row.
  torch::Tensor w = torch::randn({6, 37});
  w[1].mul_(1e-6);
  w[2].mul_(1e3);
  w[3].zero_();
  w[4].mul_(1e-30);
  auto q = QuantizeFloat8(w, f, "w");
  ASSERT_TRUE(q.ok()) << q.status();
  ASSERT_EQ(q->codes.scalar_type(), torch::kByte);
  ASSERT_EQ(q->codes.sizes(), w.sizes());
  const torch::Tensor amax = w.abs().amax(1);
  const int mantissa_bits = f == Float8Format::kE4M3FN ? 3 : 2;
  const torch::Tensor deq = DequantizeFloat8(q->codes, q->scale, f);
  for (int64_t r = 0; r < w.size(0); ++r) {
    const float a = amax[r].item<float>();
    const float s = q->scale[r].item<float>();
    EXPECT_EQ(s, a > 0 ? a / Float8Max(f) : 1.0f) << r;
    for (int64_t j = 0; j < w.size(1); ++j) {
      const float x = w[r][j].item<float>();
      const uint8_t code = q->codes[r][j].item<uint8_t>();
      EXPECT_EQ(code, EncodeFloat8(x / s, f)) << r << "," << j;
      EXPECT_EQ(deq[r][j].item<float>(), DecodeFloat8(code, f) * s);
    }
    // Every value within half a step of the row's grid: relative 2^-(M+1) for normals, half the
    // smallest subnormal (times the scale) below.
    const torch::Tensor err = (deq[r] - w[r]).abs();
    const torch::Tensor bound = torch::max(w[r].abs() * std::ldexp(1.0, -(mantissa_bits + 1)),
                                           torch::full_like(w[r], Float8Table(f)[1] * s / 2));
    EXPECT_TRUE((err <= bound * (1 + 1e-6)).all().item<bool>()) << "row " << r;
    // The row's largest value maps to the largest code.
    if (a > 0) {
      EXPECT_NEAR(deq[r].abs().max().item<float>(), a, a * 1e-6) << r;
    }
  }
  // Non-CPU code path (index_select of the table) computes the same values: exercise it on a CPU
  // tensor through the same arithmetic.
  const torch::Tensor table =
      torch::tensor(std::vector<float>(Float8Table(f).begin(), Float8Table(f).end()));
  const torch::Tensor by_index =
      table.index_select(0, q->codes.reshape({-1}).to(torch::kInt)).view(w.sizes()) *
      q->scale.unsqueeze(1);
  EXPECT_TRUE(torch::equal(by_index, deq));

  torch::Tensor bad = w.clone();
  bad[5][3] = std::numeric_limits<float>::infinity();
  auto refused = QuantizeFloat8(bad, f, "layer.weight");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("layer.weight"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Formats, Float8Test,
                         ::testing::Values(Float8Format::kE4M3FN, Float8Format::kE5M2),
                         [](const auto& info) {
                           return std::string(Float8FormatName(info.param));
                         });

// 8-bit storage on a module tree: which tensors become codes, the scale buffers, bytes, state
// dicts in both forms.
TEST(LayerwiseCastingTest, Float8StorageAndStateDicts) {
  torch::manual_seed(0);
  Toy toy;
  std::map<std::string, torch::Tensor> original;
  for (const auto& [k, v] : NamedTensors(*toy)) original[k] = v.detach().clone();
  const std::vector<std::string> patterns = LayerwiseCastingSkipPatterns(ModelOptions{}, {});
  auto selected = LayerwiseCastParameterNames(*toy, patterns);
  ASSERT_TRUE(selected.ok());
  auto cast = ApplyLayerwiseCasting(*toy, torch::kByte, patterns, false, Float8Format::kE4M3FN);
  ASSERT_TRUE(cast.ok()) << cast.status();
  // Exactly the selected parameters of rank >= 2.
  std::vector<std::string> want;
  for (const std::string& n : *selected) {
    if (original.at(n).dim() >= 2) want.push_back(n);
  }
  EXPECT_EQ(*cast, want);
  const std::map<std::string, std::string> stored = Float8StoredParameters(*toy);
  ASSERT_EQ(stored.size(), want.size());
  const TensorMap now = NamedTensors(*toy);
  int64_t expected_bytes = 0;
  for (const auto& [k, v] : original) {
    const torch::Tensor& t = now.at(k);
    if (stored.count(k)) {
      ASSERT_EQ(t.scalar_type(), torch::kByte) << k;
      const torch::Tensor& scale = now.at(stored.at(k));
      EXPECT_EQ(stored.at(k), Float8ScaleName(k));
      auto q = QuantizeFloat8(v, Float8Format::kE4M3FN);
      ASSERT_TRUE(q.ok());
      EXPECT_TRUE(torch::equal(t, q->codes) && torch::equal(scale, q->scale)) << k;
      expected_bytes += t.numel() + scale.numel() * 4;
    } else {
      EXPECT_TRUE(torch::equal(t, v)) << k;  // biases, skipped layers, norms: unchanged
      expected_bytes += t.numel() * 4;
    }
  }
  EXPECT_EQ(ParameterBytes(*toy), expected_bytes);
  EXPECT_EQ(toy->conv->weight.scalar_type(), torch::kByte);  // the module's handle sees it

  // A floating-point checkpoint converts to the storage form and loads strictly.
  Toy fresh;
  ASSERT_TRUE(ApplyLayerwiseCasting(*fresh, torch::kByte, patterns).ok());
  TensorMap float_checkpoint(original.begin(), original.end());
  auto converted = ToStorageForm(*fresh, float_checkpoint, Float8Format::kE4M3FN);
  ASSERT_TRUE(converted.ok()) << converted.status();
  ASSERT_TRUE(LoadStateDict(*fresh, *converted).ok());
  for (const auto& [k, v] : NamedTensors(*fresh)) EXPECT_TRUE(torch::equal(v, now.at(k))) << k;
  // The storage form (an export of an 8-bit module) passes through unchanged and loads back.
  auto again = ToStorageForm(*fresh, now, Float8Format::kE4M3FN);
  ASSERT_TRUE(again.ok());
  for (const auto& [k, v] : *again) EXPECT_TRUE(v.is_same(now.at(k))) << k;
  // Without the conversion the strict load refuses float -> uint8 (never truncates silently).
  Toy plain;
  ASSERT_TRUE(ApplyLayerwiseCasting(*plain, torch::kByte, patterns).ok());
  EXPECT_EQ(LoadStateDict(*plain, float_checkpoint).code(), absl::StatusCode::kInvalidArgument);
  // Codes without their scales, and NaN weights, are INVALID_ARGUMENT naming the key.
  TensorMap no_scale = now;
  no_scale.erase(Float8ScaleName("conv.weight"));
  auto missing = ToStorageForm(*fresh, no_scale, Float8Format::kE4M3FN);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("conv.weight_scale"), std::string::npos);
  TensorMap nan = float_checkpoint;
  nan["embed.weight"] = nan["embed.weight"].clone();
  nan["embed.weight"][0][0] = std::numeric_limits<float>::quiet_NaN();
  auto refused = ToStorageForm(*fresh, nan, Float8Format::kE4M3FN);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("embed.weight"), std::string::npos);
  // A module without 8-bit storage takes the state dict as it is.
  Toy fp32;
  auto same = ToStorageForm(*fp32, float_checkpoint, Float8Format::kE4M3FN);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->size(), float_checkpoint.size());
}

TEST(LayerwiseCastingTest, UnsupportedModelIsUnimplemented) {
  ModelSpec spec;
  spec.class_name = "SomeModel";
  ModelOptions o;
  EXPECT_TRUE(CheckLayerwiseCastingSupported(spec, o).ok());
  o.storage_dtype = torch::kBFloat16;
  absl::Status s = CheckLayerwiseCastingSupported(spec, o);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("SomeModel"), std::string::npos);
  spec.layerwise_casting = true;
  EXPECT_TRUE(CheckLayerwiseCastingSupported(spec, o).ok());
  o.layerwise_casting_skip_patterns = std::vector<std::string>{"["};
  EXPECT_EQ(CheckLayerwiseCastingSupported(spec, o).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds
