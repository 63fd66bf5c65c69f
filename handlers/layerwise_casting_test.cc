#include "handlers/layerwise_casting.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
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
  const std::vector<std::string> expected = {
      "blocks.0.proj_out.bias", "blocks.0.proj_out.weight", "blocks.1.proj_out.bias",
      "blocks.1.proj_out.weight", "conv.bias", "conv.weight", "embed.weight"};
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
  EXPECT_EQ(LayerwiseCastingSkipPatterns(options, {"norm"}),
            std::vector<std::string>{"^conv$"});
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
  auto bad = ParseStorageDtype("float8_e4m3fn");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("float8_e4m3fn"), std::string::npos);

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
