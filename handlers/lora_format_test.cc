// The model-agnostic LoRA machinery: suffix normalization, PEFT scaling, plan execution,
// validation against a model's parameter shapes, and the report.
#include "handlers/lora_format.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

// A toy model family for the shared machinery: native keys live under "model."; the foreign
// format "fused" stores `fused.<name>.lora_{A,B}.*` whose B rows are two modules <name>.a and
// <name>.b (equal halves), and `fused.<param>.full` replaces parameter <param>. Module "embed" may
// be widened.
class ToyHandler : public LoraHandler {
 public:
  std::vector<std::string> FormatNames() const override { return {"fused"}; }
  std::optional<std::string> DetectFormat(const KeyShapes& keys) const override {
    for (const auto& [k, shape] : keys) {
      if (absl::StartsWith(k, "model.")) return std::string(kDiffusersLoraFormat);
    }
    for (const auto& [k, shape] : keys) {
      if (absl::StartsWith(k, "fused.")) return std::string("fused");
    }
    return std::nullopt;
  }
  absl::StatusOr<LoraPlan> PlanConversion(const LoraKeys& keys,
                                          const std::string& format) const override {
    if (format == kDiffusersLoraFormat) {
      auto plan = PlanPeftLora(keys, "model.");
      if (plan.ok()) {
        for (LoraModulePlan& m : plan->modules) m.input_expandable = m.module == "embed";
      }
      return plan;
    }
    LoraPlan plan;
    LoraKeyGroups groups = GroupLoraKeys(keys.shapes, "fused.");
    for (const auto& [k, reason] : groups.incomplete) plan.unused[k] = reason;
    for (const std::string& k : groups.other) {
      if (absl::EndsWith(k, ".full")) {
        plan.overlays.push_back({k.substr(6, k.size() - 6 - 5), k});
      } else {
        plan.unused[k] = "toy: not a LoRA key";
      }
    }
    for (const auto& [stub, g] : groups.groups) {
      const int64_t out = keys.shapes.at(g.up)[0];
      for (int j = 0; j < 2; ++j) {
        LoraModulePlan m;
        m.module = absl::StrCat(stub, j == 0 ? ".a" : ".b");
        m.down.key = g.down;
        m.up = {g.up, j * out / 2, out / 2};
        if (!g.up_bias.empty()) m.up_bias = {g.up_bias, j * out / 2, out / 2};
        m.down_bias.key = g.down_bias;
        m.fused_index = j;
        m.fused_count = 2;
        m.source_rank = keys.shapes.at(g.down)[0];
        m.alpha = static_cast<double>(m.source_rank);
        plan.modules.push_back(m);
      }
    }
    return plan;
  }
};

const ToyHandler& Toy() {
  static const ToyHandler* kHandler = new ToyHandler();
  return *kHandler;
}

torch::Tensor Rand(std::vector<int64_t> shape, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randn(shape);
}

torch::Tensor Scalar(double v) { return torch::tensor(v, torch::kFloat32); }

// A model with linears blk.<i>.q [32, 16], blk.<i>.k [32, 16], embed [16, 4], a norm [8].
KeyShapes ToyModel() {
  KeyShapes m;
  for (int i = 0; i < 2; ++i) {
    m[absl::StrCat("blk.", i, ".q.weight")] = {32, 16};
    m[absl::StrCat("blk.", i, ".q.bias")] = {32};
    m[absl::StrCat("blk.", i, ".k.weight")] = {32, 16};
  }
  m["qk.a.weight"] = {32, 16};
  m["qk.b.weight"] = {32, 16};
  m["embed.weight"] = {16, 4};
  m["norm.weight"] = {8};
  return m;
}

const LoraModule* Find(const ConvertedLora& lora, const std::string& module) {
  for (const LoraModule& m : lora.modules) {
    if (m.module == module) return &m;
  }
  return nullptr;
}

torch::Tensor Delta(const LoraModule& m) {
  return m.up.to(torch::kFloat64).matmul(m.down.to(torch::kFloat64)) * m.scale;
}

double MaxAbsDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

std::string Message(const absl::Status& s) { return std::string(s.message()); }

LoraLoadOptions Partial() {
  LoraLoadOptions options;
  options.allow_partial = true;
  return options;
}

// ---------------------------------------------------------------------------------------------

TEST(NormalizeLoraSuffixTest, AppliesDiffusersRulesInOrder) {
  EXPECT_EQ(NormalizeLoraSuffix("a.b.lora_down.weight"), "a.b.lora_A.weight");
  EXPECT_EQ(NormalizeLoraSuffix("a.b.lora_up.weight"), "a.b.lora_B.weight");
  EXPECT_EQ(NormalizeLoraSuffix("x.processor.qkv_lora1.down.weight"),
            "x.processor.qkv_lora1.lora_A.weight");
  EXPECT_EQ(NormalizeLoraSuffix("x.processor.proj_lora.up.weight"),
            "x.processor.proj_lora.lora_B.weight");
  EXPECT_EQ(NormalizeLoraSuffix("a.lora_A.weight"), "a.lora_A.weight");
  EXPECT_EQ(NormalizeLoraSuffix("a.lora_B.bias"), "a.lora_B.bias");
  EXPECT_EQ(NormalizeLoraSuffix("lora_unet_x.alpha"), "lora_unet_x.alpha");
  // Biases keep their spelling: diffusers only rewrites ".weight" suffixes.
  EXPECT_EQ(NormalizeLoraSuffix("a.lora_up.bias"), "a.lora_up.bias");
}

TEST(MakeLoraKeysTest, NamesShapesScalarsAndMetadata) {
  TensorMap t{{"m.lora_down.weight", Rand({4, 8}, 1)},
              {"m.lora_up.weight", Rand({6, 4}, 2)},
              {"m.alpha", Scalar(2.5)}};
  auto keys = MakeLoraKeys(t, {{kLoraAdapterMetadataKey, R"({"r": 4, "lora_alpha": 2})"}});
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_THAT(keys->shapes.at("m.lora_A.weight"), ElementsAre(4, 8));
  EXPECT_EQ(keys->source.at("m.lora_B.weight"), "m.lora_up.weight");
  EXPECT_DOUBLE_EQ(keys->scalars.at("m.alpha"), 2.5);
  EXPECT_EQ(keys->scalars.count("m.lora_A.weight"), 0u);
  EXPECT_EQ(keys->adapter_metadata["r"], 4);
}

TEST(MakeLoraKeysTest, RejectsKeysThatNormalizeAlikeAndBadMetadata) {
  TensorMap t{{"m.lora_down.weight", Rand({4, 8}, 1)}, {"m.lora_A.weight", Rand({4, 8}, 2)}};
  auto keys = MakeLoraKeys(t, {});
  EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(keys.status()), HasSubstr("m.lora_down.weight"));
  EXPECT_THAT(Message(keys.status()), HasSubstr("m.lora_A.weight"));

  auto bad = MakeLoraKeys({{"m.lora_A.weight", Rand({4, 8}, 1)}},
                          {{kLoraAdapterMetadataKey, "{not json"}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(bad.status()), HasSubstr(kLoraAdapterMetadataKey));
}

TEST(GroupLoraKeysTest, GroupsByStubAndSortsTheRest) {
  KeyShapes keys{{"p.a.lora_A.weight", {4, 8}}, {"p.a.lora_B.weight", {8, 4}},
                 {"p.a.lora_B.bias", {8}},      {"p.a.alpha", {}},
                 {"p.b.lora_A.weight", {4, 8}}, {"p.c.something", {3}},
                 {"q.a.lora_A.weight", {4, 8}}};
  LoraKeyGroups g = GroupLoraKeys(keys, "p.");
  ASSERT_EQ(g.groups.size(), 1u);
  const LoraKeyGroup& a = g.groups.at("a");
  EXPECT_EQ(a.down, "p.a.lora_A.weight");
  EXPECT_EQ(a.up, "p.a.lora_B.weight");
  EXPECT_EQ(a.up_bias, "p.a.lora_B.bias");
  EXPECT_EQ(a.alpha, "p.a.alpha");
  EXPECT_THAT(g.other, ElementsAre("p.c.something"));
  EXPECT_THAT(g.outside, ElementsAre("q.a.lora_A.weight"));
  ASSERT_EQ(g.incomplete.count("p.b.lora_A.weight"), 1u);
  EXPECT_THAT(g.incomplete.at("p.b.lora_A.weight"), HasSubstr("no lora_B"));
}

// ---------------------------------------------------------------------------------------------
// PEFT scaling.

absl::StatusOr<ConvertedLora> Convert(const TensorMap& t,
                                      const std::map<std::string, std::string>& metadata = {}) {
  return ConvertLora(t, metadata, Toy());
}

TEST(PeftScalingTest, NoAlphaMeansScaleOne) {
  TensorMap t{{"model.blk.0.q.lora_A.weight", Rand({4, 16}, 1)},
              {"model.blk.0.q.lora_B.weight", Rand({32, 4}, 2)},
              {"model.blk.0.k.lora_A.weight", Rand({8, 16}, 3)},
              {"model.blk.0.k.lora_B.weight", Rand({32, 8}, 4)}};
  auto lora = Convert(t);
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(lora->format, kDiffusersLoraFormat);
  ASSERT_EQ(lora->modules.size(), 2u);
  for (const LoraModule& m : lora->modules) {
    EXPECT_DOUBLE_EQ(m.scale, 1.0) << m.module;
    EXPECT_DOUBLE_EQ(m.alpha, static_cast<double>(m.rank())) << m.module;
  }
}

TEST(PeftScalingTest, AlphaKeysGiveAlphaOverRankAndMissingAlphaIsRank) {
  TensorMap t{{"model.blk.0.q.lora_A.weight", Rand({4, 16}, 1)},
              {"model.blk.0.q.lora_B.weight", Rand({32, 4}, 2)},
              {"model.blk.0.q.alpha", Scalar(2)},
              {"model.blk.0.k.lora_A.weight", Rand({8, 16}, 3)},
              {"model.blk.0.k.lora_B.weight", Rand({32, 8}, 4)}};
  auto lora = Convert(t);
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.0.q")->scale, 0.5);
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.0.k")->scale, 1.0);
  EXPECT_THAT(Find(*lora, "blk.0.q")->sources, ::testing::Contains("model.blk.0.q.alpha"));
  EXPECT_TRUE(lora->unused.empty());
}

TEST(PeftScalingTest, AdapterMetadataOverridesWithPeftPatterns) {
  TensorMap t{{"model.blk.0.q.lora_A.weight", Rand({4, 16}, 1)},
              {"model.blk.0.q.lora_B.weight", Rand({32, 4}, 2)},
              {"model.blk.1.q.lora_A.weight", Rand({2, 16}, 3)},
              {"model.blk.1.q.lora_B.weight", Rand({32, 2}, 4)},
              {"model.blk.1.k.lora_A.weight", Rand({4, 16}, 5)},
              {"model.blk.1.k.lora_B.weight", Rand({32, 4}, 6)}};
  // Diffusers writes the config with the component prefix; "^" anchors like diffusers' patterns,
  // a bare "k" matches a whole trailing name component only.
  const std::string md = R"({"model.r": 4, "model.lora_alpha": 8,
      "model.rank_pattern": {"^blk.1.q": 2},
      "model.alpha_pattern": {"^blk.1.q": 1, "k": 2},
      "other.r": 99})";
  auto lora = Convert(t, {{kLoraAdapterMetadataKey, md}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.0.q")->scale, 8.0 / 4);
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.1.q")->scale, 1.0 / 2);
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.1.k")->scale, 2.0 / 4);
  EXPECT_DOUBLE_EQ(Find(*lora, "blk.1.k")->alpha, 2.0);

  // Without prefixed entries the top-level LoraConfig fields apply; use_rslora divides by sqrt(r).
  auto rs = Convert(t, {{kLoraAdapterMetadataKey,
                         R"({"r": 4, "lora_alpha": 8, "use_rslora": true,
                             "rank_pattern": {"blk.1.q": 2}})"}});
  ASSERT_TRUE(rs.ok()) << rs.status();
  EXPECT_DOUBLE_EQ(Find(*rs, "blk.0.q")->scale, 8.0 / 2);
  EXPECT_DOUBLE_EQ(Find(*rs, "blk.1.q")->scale, 8.0 / std::sqrt(2.0));
}

TEST(PeftScalingTest, MetadataContradictionsAreErrors) {
  TensorMap t{{"model.blk.0.q.lora_A.weight", Rand({4, 16}, 1)},
              {"model.blk.0.q.lora_B.weight", Rand({32, 4}, 2)}};
  auto rank = Convert(t, {{kLoraAdapterMetadataKey, R"({"model.r": 8, "model.lora_alpha": 8})"}});
  EXPECT_EQ(rank.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(rank.status()), HasSubstr("blk.0.q"));
  EXPECT_THAT(Message(rank.status()), HasSubstr("[4, 16]"));

  TensorMap with_alpha = t;
  with_alpha["model.blk.0.q.alpha"] = Scalar(3);
  auto alpha =
      Convert(with_alpha, {{kLoraAdapterMetadataKey, R"({"model.r": 4, "model.lora_alpha": 8})"}});
  EXPECT_EQ(alpha.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(alpha.status()), HasSubstr("model.blk.0.q.alpha"));

  auto dora = Convert(t, {{kLoraAdapterMetadataKey, R"({"model.r": 4, "model.use_dora": true})"}});
  EXPECT_EQ(dora.status().code(), absl::StatusCode::kUnimplemented);

  auto regex = Convert(t, {{kLoraAdapterMetadataKey, R"({"r": 4, "rank_pattern": {"(": 4}})"}});
  EXPECT_EQ(regex.status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Detection, execution.

TEST(ConvertLoraTest, UnknownFormatShowsSampleKeys) {
  TensorMap t{{"weird.thing.one", Rand({4, 4}, 1)}, {"weird.thing.two", Rand({4, 4}, 2)}};
  auto lora = Convert(t);
  EXPECT_EQ(lora.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(lora.status()), HasSubstr("unknown LoRA format"));
  EXPECT_THAT(Message(lora.status()), HasSubstr("'weird.thing.one'"));
  EXPECT_THAT(Message(lora.status()), HasSubstr("fused"));
  EXPECT_EQ(Convert({}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConvertLoraTest, FusedSplitReplicatesAOrSplitsABlockDiagonalB) {
  const torch::Tensor a = Rand({4, 16}, 1);
  const torch::Tensor dense_b = Rand({64, 4}, 2);
  auto dense = Convert({{"fused.qk.lora_A.weight", a}, {"fused.qk.lora_B.weight", dense_b}});
  ASSERT_TRUE(dense.ok()) << dense.status();
  ASSERT_EQ(dense->modules.size(), 2u);
  EXPECT_EQ(Find(*dense, "qk.a")->rank(), 4);
  EXPECT_TRUE(Find(*dense, "qk.b")->down.equal(a));
  EXPECT_TRUE(Find(*dense, "qk.b")->up.equal(dense_b.narrow(0, 32, 32)));

  torch::Tensor sparse_b = dense_b.clone();
  sparse_b.narrow(0, 0, 32).narrow(1, 2, 2).zero_();
  sparse_b.narrow(0, 32, 32).narrow(1, 0, 2).zero_();
  auto sparse = Convert({{"fused.qk.lora_A.weight", a}, {"fused.qk.lora_B.weight", sparse_b}});
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  const LoraModule* qa = Find(*sparse, "qk.a");
  const LoraModule* qb = Find(*sparse, "qk.b");
  EXPECT_EQ(qa->rank(), 2);
  EXPECT_EQ(qb->rank(), 2);
  EXPECT_EQ(qb->source_rank, 4);
  EXPECT_TRUE(qb->down.equal(a.narrow(0, 2, 2)));
  const torch::Tensor full = sparse_b.to(torch::kFloat64).matmul(a.to(torch::kFloat64));
  EXPECT_LT(MaxAbsDiff(Delta(*qa), full.narrow(0, 0, 32)), 1e-12);
  EXPECT_LT(MaxAbsDiff(Delta(*qb), full.narrow(0, 32, 32)), 1e-12);
}

TEST(ConvertLoraTest, LoraABiasIsFoldedIntoTheBias) {
  const torch::Tensor a = Rand({4, 16}, 1), b = Rand({64, 4}, 2);
  const torch::Tensor a_bias = Rand({4}, 3), b_bias = Rand({64}, 4);
  auto lora = Convert({{"fused.qk.lora_A.weight", a},
                       {"fused.qk.lora_B.weight", b},
                       {"fused.qk.lora_A.bias", a_bias},
                       {"fused.qk.lora_B.bias", b_bias}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  const torch::Tensor expected = torch::mv(b, a_bias) + b_bias;
  EXPECT_LT(MaxAbsDiff(Find(*lora, "qk.a")->bias, expected.narrow(0, 0, 32)), 1e-5);
  EXPECT_LT(MaxAbsDiff(Find(*lora, "qk.b")->bias, expected.narrow(0, 32, 32)), 1e-5);
}

TEST(ConvertLoraTest, EveryKeyIsUsedOrListed) {
  auto lora = Convert({{"fused.qk.lora_A.weight", Rand({4, 16}, 1)},
                       {"fused.qk.lora_B.weight", Rand({64, 4}, 2)},
                       {"fused.norm.weight.full", Rand({8}, 3)},
                       {"fused.junk", Rand({3}, 4)},
                       {"fused.orphan.lora_B.weight", Rand({8, 2}, 5)},
                       {"elsewhere.key", Rand({3}, 6)}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  ASSERT_EQ(lora->overlays.size(), 1u);
  EXPECT_EQ(lora->overlays[0].param, "norm.weight");
  EXPECT_EQ(lora->unused.at("fused.junk"), "toy: not a LoRA key");
  EXPECT_THAT(lora->unused.at("fused.orphan.lora_B.weight"), HasSubstr("no lora_A"));
  EXPECT_THAT(lora->unused.at("elsewhere.key"), HasSubstr("not used by the fused conversion"));
}

// ---------------------------------------------------------------------------------------------
// Validation.

TensorMap GoodNative() {
  return {{"model.blk.0.q.lora_A.weight", Rand({4, 16}, 1)},
          {"model.blk.0.q.lora_B.weight", Rand({32, 4}, 2)},
          {"model.blk.0.q.lora_B.bias", Rand({32}, 3)},
          {"model.blk.1.k.lora_A.weight", Rand({2, 16}, 4)},
          {"model.blk.1.k.lora_B.weight", Rand({32, 2}, 5)}};
}

absl::StatusOr<LoraReport> Validate(const TensorMap& t, LoraLoadOptions options = {}) {
  auto lora = Convert(t);
  if (!lora.ok()) return lora.status();
  return ValidateLora(*lora, ToyModel(), options);
}

TEST(ValidateLoraTest, AcceptsAMatchingLora) {
  auto report = Validate(GoodNative());
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->modules.size(), 2u);
  EXPECT_EQ(report->modules[0].module, "blk.0.q");
  EXPECT_TRUE(report->modules[0].bias);
  EXPECT_EQ(report->RankHistogram(), (std::map<int64_t, int>{{2, 1}, {4, 1}}));
  EXPECT_TRUE(report->unmatched.empty());
}

TEST(ValidateLoraTest, AnotherWidthNamesModuleExpectedAndGot) {
  TensorMap t = GoodNative();
  t["model.blk.0.q.lora_A.weight"] = Rand({4, 24}, 1);
  auto report = Validate(t);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg = Message(report.status());
  EXPECT_THAT(msg, HasSubstr("module blk.0.q"));
  EXPECT_THAT(msg, HasSubstr("[32, 16]"));        // the model's weight
  EXPECT_THAT(msg, HasSubstr("lora_A [4, 16]"));  // expected
  EXPECT_THAT(msg, HasSubstr("got lora_A [4, 24]"));

  TensorMap out = GoodNative();
  out["model.blk.0.q.lora_B.weight"] = Rand({48, 4}, 2);
  out.erase("model.blk.0.q.lora_B.bias");
  auto report2 = Validate(out);
  EXPECT_THAT(Message(report2.status()),
              HasSubstr("lora_B [32, 4], got lora_A [4, 16] and lora_B [48, 4]"));
}

TEST(ValidateLoraTest, RankZeroAndRankDisagreement) {
  TensorMap zero = GoodNative();
  zero["model.blk.1.k.lora_A.weight"] = torch::zeros({0, 16});
  zero["model.blk.1.k.lora_B.weight"] = torch::zeros({32, 0});
  auto r0 = Validate(zero);
  EXPECT_EQ(r0.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(r0.status()), HasSubstr("module blk.1.k: rank 0"));

  TensorMap mixed = GoodNative();
  mixed["model.blk.1.k.lora_B.weight"] = Rand({32, 3}, 5);
  auto r1 = Validate(mixed);
  EXPECT_EQ(r1.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(r1.status()), HasSubstr("ranks disagree"));
  EXPECT_THAT(Message(r1.status()), HasSubstr("[2, 16] has rank 2"));
  EXPECT_THAT(Message(r1.status()), HasSubstr("[32, 3] has rank 3"));
}

TEST(ValidateLoraTest, NanAndInfAreRejected) {
  for (double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    TensorMap t = GoodNative();
    torch::Tensor b = t["model.blk.0.q.lora_B.weight"].clone();
    b[3][1] = bad;
    t["model.blk.0.q.lora_B.weight"] = b;
    auto report = Validate(t);
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(report.status()), HasSubstr("module blk.0.q: lora_B contains NaN or Inf"));
  }
  TensorMap t = GoodNative();
  t["model.blk.1.k.alpha"] = Scalar(std::numeric_limits<double>::infinity());
  EXPECT_THAT(Message(Validate(t).status()), HasSubstr("is not finite"));
}

TEST(ValidateLoraTest, UnmatchedKeysAreAnErrorUnlessPartialIsAllowed) {
  TensorMap t = GoodNative();
  t["text_encoder.layer.lora_A.weight"] = Rand({4, 8}, 7);
  t["model.blk.0.q.lora_magnitude_vector"] = Rand({32}, 8);
  t["model.missing.lora_A.weight"] = Rand({4, 16}, 9);
  t["model.missing.lora_B.weight"] = Rand({32, 4}, 10);
  auto strict = Validate(t);
  EXPECT_EQ(strict.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg = Message(strict.status());
  EXPECT_THAT(msg, HasSubstr("3 unmatched"));
  EXPECT_THAT(msg, HasSubstr("text_encoder.layer.lora_A.weight: text-encoder"));
  EXPECT_THAT(msg, HasSubstr("model.blk.0.q.lora_magnitude_vector: DoRA"));
  EXPECT_THAT(msg, HasSubstr("missing: target module without a parameter 'missing.weight'"));

  auto partial = Validate(t, Partial());
  ASSERT_TRUE(partial.ok()) << partial.status();
  EXPECT_EQ(partial->modules.size(), 2u);
  EXPECT_EQ(partial->unmatched.size(), 3u);
  EXPECT_EQ(partial->unmatched.count("missing"), 1u);
  EXPECT_THAT(partial->ToString(), HasSubstr("unmatched text_encoder.layer.lora_A.weight"));
}

TEST(ValidateLoraTest, ALoraForAnotherModelMatchesNothingEvenWhenPartial) {
  TensorMap t{{"model.other.lora_A.weight", Rand({4, 16}, 1)},
              {"model.other.lora_B.weight", Rand({32, 4}, 2)}};
  auto report = Validate(t, Partial());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(report.status()), HasSubstr("matches nothing"));
}

TEST(ValidateLoraTest, DuplicateTargetsAndBadBiases) {
  auto lora = Convert(GoodNative());
  ASSERT_TRUE(lora.ok());
  ConvertedLora dup = *lora;
  dup.modules.push_back(dup.modules[0]);
  auto report = ValidateLora(dup, ToyModel());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(report.status()), HasSubstr("module blk.0.q: targeted twice"));

  ConvertedLora bias = *lora;
  bias.modules[0].bias = Rand({31}, 1);
  EXPECT_THAT(Message(ValidateLora(bias, ToyModel()).status()),
              HasSubstr("expected lora_B bias [32], got [31]"));
}

TEST(ValidateLoraTest, OverlaysAndInputExpansion) {
  auto lora = Convert({{"fused.qk.lora_A.weight", Rand({4, 16}, 1)},
                       {"fused.qk.lora_B.weight", Rand({64, 4}, 2)},
                       {"fused.norm.weight.full", Rand({8}, 3)}});
  ASSERT_TRUE(lora.ok()) << lora.status();
  auto report = ValidateLora(*lora, ToyModel());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_THAT(report->overlays, ElementsAre("norm.weight"));

  auto wrong = Convert({{"fused.qk.lora_A.weight", Rand({4, 16}, 1)},
                        {"fused.qk.lora_B.weight", Rand({64, 4}, 2)},
                        {"fused.norm.weight.full", Rand({9}, 3)}});
  ASSERT_TRUE(wrong.ok());
  auto bad = ValidateLora(*wrong, ToyModel());
  EXPECT_THAT(Message(bad.status()),
              HasSubstr("parameter norm.weight: the model's is [8], got [9]"));

  // "embed" may be widened (the toy handler marks it); "blk.0.q" may not.
  TensorMap wide{{"model.embed.lora_A.weight", Rand({4, 8}, 1)},
                 {"model.embed.lora_B.weight", Rand({16, 4}, 2)}};
  auto widened = Validate(wide);
  ASSERT_TRUE(widened.ok()) << widened.status();
  ASSERT_EQ(widened->expansions.size(), 1u);
  EXPECT_EQ(widened->expansions[0].module, "embed");
  EXPECT_THAT(widened->expansions[0].old_shape, ElementsAre(16, 4));
  EXPECT_THAT(widened->expansions[0].new_shape, ElementsAre(16, 8));
  EXPECT_EQ(widened->ToJson()["expanded_modules"][0]["new_shape"], nlohmann::json({16, 8}));

  TensorMap narrow{{"model.embed.lora_A.weight", Rand({4, 2}, 1)},
                   {"model.embed.lora_B.weight", Rand({16, 4}, 2)}};
  EXPECT_THAT(Message(Validate(narrow).status()), HasSubstr("(or wider)"));
}

TEST(ValidateLoraTest, ReportRendersEverything) {
  auto report = Validate(GoodNative());
  ASSERT_TRUE(report.ok());
  const std::string text = report->ToString();
  EXPECT_THAT(text, HasSubstr("format diffusers"));
  EXPECT_THAT(text, HasSubstr("blk.0.q"));
  EXPECT_THAT(text, HasSubstr("ranks: 2 (1 module), 4 (1 module)"));
  EXPECT_THAT(text, HasSubstr("model.blk.0.q.lora_A.weight"));
  const nlohmann::json j = report->ToJson();
  EXPECT_EQ(j["format"], "diffusers");
  EXPECT_EQ(j["modules"].size(), 2u);
  EXPECT_EQ(j["modules"][0]["lora_A"], nlohmann::json({4, 16}));
  EXPECT_EQ(j["ranks"]["4"], 1);
  EXPECT_TRUE(j.contains("tensor_bytes"));
  EXPECT_TRUE(j.contains("seconds"));
}

// ---------------------------------------------------------------------------------------------
// Files.

class LoraFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("lora_format_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST_F(LoraFileTest, LoadsZeroCopyWithMetadataAndDropsWhatDidNotMatch) {
  TensorMap t = GoodNative();
  t["model.missing.lora_A.weight"] = Rand({4, 16}, 9);
  t["model.missing.lora_B.weight"] = Rand({32, 4}, 10);
  const std::string path = (dir_ / "adapter.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, t,
                               {{kLoraAdapterMetadataKey,
                                 R"({"model.r": 4, "model.lora_alpha": 2,
                                     "model.rank_pattern": {"^blk.1.k": 2, "^missing": 4}})"}})
                  .ok());
  EXPECT_EQ(LoadLora(path, Toy(), ToyModel()).status().code(), absl::StatusCode::kInvalidArgument);
  auto loaded = LoadLora(path, Toy(), ToyModel(), Partial());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->lora.path, path);
  EXPECT_GT(loaded->lora.file_bytes, 0);
  EXPECT_EQ(loaded->lora.modules.size(), 2u);  // "missing" dropped
  EXPECT_EQ(loaded->report.unmatched.count("missing"), 1u);
  EXPECT_DOUBLE_EQ(Find(loaded->lora, "blk.0.q")->scale, 0.5);
  EXPECT_DOUBLE_EQ(Find(loaded->lora, "blk.1.k")->scale, 1.0);
  EXPECT_EQ(loaded->report.path, path);
  EXPECT_GT(loaded->report.seconds, 0);
  EXPECT_GT(loaded->report.tensor_bytes, 0);

  auto missing = ConvertLoraFile((dir_ / "absent.safetensors").string(), Toy());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST(ToDiffusersStateDictTest, FoldsTheScaleIntoLoraB) {
  TensorMap t = GoodNative();
  t["model.blk.0.q.alpha"] = Scalar(2);
  auto lora = Convert(t);
  ASSERT_TRUE(lora.ok());
  auto sd = lora->ToDiffusersStateDict("transformer.");
  ASSERT_TRUE(sd.ok()) << sd.status();
  const torch::Tensor a = sd->at("transformer.blk.0.q.lora_A.weight");
  const torch::Tensor b = sd->at("transformer.blk.0.q.lora_B.weight");
  EXPECT_LT(MaxAbsDiff(b.matmul(a), Delta(*Find(*lora, "blk.0.q"))), 1e-5);
  EXPECT_LT(MaxAbsDiff(sd->at("transformer.blk.0.q.lora_B.bias"),
                       t.at("model.blk.0.q.lora_B.bias") * 0.5),
            1e-6);
}

}  // namespace
}  // namespace ds
