// Reproduces transformers' T5EncoderModel on $DS_GOLDEN_DIR/conditioning/text_encoders/ (see
// ../shared/golden/README.md): 32-token sequences with and without the attention mask, 512-token
// sequences, hidden_states, from the transformers folder (only shared.weight stored), from the
// same weights stored as encoder.embed_tokens.weight, sharded, and from single files (bare, with
// the ComfyUI prefix, with a decoder to ignore). Tolerance: |ours - golden| <= 1e-4 + 1e-4|golden|.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/text_encoder.h"
#include "models/t5/t5_encoder.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds::t5 {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::ds::test::WithinTolerance;

fs::path EncodersDir() { return fs::path(GoldenDir()) / "conditioning" / "text_encoders"; }
fs::path T5Dir() { return EncodersDir() / "t5_encoder"; }

torch::Tensor Io(const std::string& key) {
  auto f = SafetensorsFile::Open((EncodersDir() / "io.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto t = (*f)->Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

TensorMap GoldenWeights() {
  auto f = SafetensorsFile::Open((T5Dir() / "model.safetensors").string());
  EXPECT_TRUE(f.ok()) << f.status();
  auto all = (*f)->GetAll();
  EXPECT_TRUE(all.ok());
  TensorMap out;
  for (const auto& [k, t] : *all) out[k] = t.clone();
  return out;
}

void ExpectT5Golden(const DiffusionModel& model, bool all_cases = true) {
  const auto* encoder = dynamic_cast<const TextEncoder*>(&model);
  ASSERT_NE(encoder, nullptr);
  auto out = encoder->EncodeTokens(Io("t5/input_ids_32"), torch::Tensor(), true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_FALSE(out->pooled.defined());
  EXPECT_TRUE(WithinTolerance(out->last_hidden_state, Io("t5/last_hidden_state_32")));
  auto io = SafetensorsFile::Open((EncodersDir() / "io.safetensors").string());
  ASSERT_TRUE(io.ok());
  int64_t recorded = 0;
  while ((*io)->Get("t5/hidden_states." + std::to_string(recorded)).ok()) ++recorded;
  ASSERT_GT(recorded, 0);
  ASSERT_EQ(static_cast<int64_t>(out->hidden_states.size()), recorded);
  for (int64_t i = 0; i < recorded; ++i) {
    EXPECT_TRUE(WithinTolerance(out->hidden_states[i].narrow(0, 0, 1),
                                Io("t5/hidden_states." + std::to_string(i))))
        << "hidden_states." << i;
  }
  if (!all_cases) return;
  auto masked = encoder->EncodeTokens(Io("t5/input_ids_32"), Io("t5/attention_mask_32"));
  ASSERT_TRUE(masked.ok()) << masked.status();
  EXPECT_TRUE(WithinTolerance(masked->last_hidden_state, Io("t5/last_hidden_state_32_masked")));
  auto long_out = encoder->EncodeTokens(Io("t5/input_ids_512"), torch::Tensor());
  ASSERT_TRUE(long_out.ok()) << long_out.status();
  EXPECT_TRUE(WithinTolerance(long_out->last_hidden_state, Io("t5/last_hidden_state_512")));
}

TEST(T5GoldenTest, FolderResolvedFromArchitectures) {
  auto model = LoadModelFromFolder(T5Dir().string(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->class_name(), "T5EncoderModel");
  ExpectT5Golden(**model);
}

TEST(T5GoldenTest, TiedEmbeddingUnderEitherNameAndShardedFolders) {
  test::TempDir dir;
  std::filesystem::copy_file(T5Dir() / "config.json", dir.File("config.json"));
  TensorMap weights = GoldenWeights();
  weights["encoder.embed_tokens.weight"] = weights.at("shared.weight");
  weights.erase("shared.weight");
  // Two shards and an index, as transformers writes large checkpoints.
  TensorMap first, second;
  nlohmann::json index = {{"metadata", nlohmann::json::object()},
                          {"weight_map", nlohmann::json::object()}};
  for (const auto& [k, t] : weights) {
    const bool in_first = k.find("block.0.") != std::string::npos;
    (in_first ? first : second)[k] = t;
    index["weight_map"][k] = in_first ? "model-00001-of-00002.safetensors"
                                      : "model-00002-of-00002.safetensors";
  }
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00001-of-00002.safetensors"), first).ok());
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00002-of-00002.safetensors"), second).ok());
  std::ofstream(dir.File("model.safetensors.index.json")) << index.dump();
  auto model = LoadModelFromFolder(dir.path(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  ExpectT5Golden(**model, /*all_cases=*/false);
}

TEST(T5GoldenTest, SingleFiles) {
  test::TempDir dir;
  const TensorMap golden = GoldenWeights();
  struct Case {
    std::string name;
    std::string prefix;
    bool embed_tokens;  // also/only store encoder.embed_tokens.weight
    bool keep_shared;
    bool decoder;       // add decoder keys (ignored)
  };
  for (const Case& c : {Case{"bare", "", false, true, false},
                        Case{"embed_tokens only", "", true, false, false},
                        Case{"both names + decoder", "", true, true, true},
                        Case{"comfyui prefix", "text_encoders.t5xxl.transformer.", true, true,
                             false}}) {
    SCOPED_TRACE(c.name);
    TensorMap file;
    for (const auto& [k, t] : golden) {
      if (k == "shared.weight" && !c.keep_shared) continue;
      file[c.prefix + k] = t;
    }
    if (c.embed_tokens) file[c.prefix + "encoder.embed_tokens.weight"] = golden.at("shared.weight");
    if (c.decoder) {
      file["decoder.final_layer_norm.weight"] = golden.at("encoder.final_layer_norm.weight");
      file["lm_head.weight"] = golden.at("shared.weight");
    }
    const std::string path = dir.File("t5.safetensors");
    ASSERT_TRUE(WriteSafetensors(path, file).ok());
    auto loaded = LoadSingleFile(path);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->report.model_class, "T5EncoderModel");
    EXPECT_EQ(loaded->report.variant, "t5-v1.1");
    EXPECT_EQ(loaded->report.prefix, c.prefix);
    if (c.embed_tokens && c.keep_shared) {
      EXPECT_EQ(loaded->report.ignored.count(c.prefix + "encoder.embed_tokens.weight"), 1u)
          << loaded->report.ToString();
    }
    if (c.decoder) {
      EXPECT_EQ(loaded->report.ignored.count("decoder.final_layer_norm.weight"), 1u);
      EXPECT_EQ(loaded->report.ignored.count("lm_head.weight"), 1u);
    }
    ExpectT5Golden(*loaded->model, /*all_cases=*/false);
  }
}

TEST(T5GoldenTest, Float16KeepsWoInFloat32AndBFloat16StaysClose) {
  for (torch::Dtype dtype : {torch::kFloat16, torch::kBFloat16}) {
    ModelOptions options;
    options.dtype = dtype;
    auto model = LoadModelFromFolder(T5Dir().string(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    const TensorMap named = NamedTensors((*model)->module());
    EXPECT_EQ(named.at("encoder.block.0.layer.1.DenseReluDense.wo.weight").scalar_type(),
              dtype == torch::kFloat16 ? torch::kFloat32 : dtype);
    EXPECT_EQ(named.at("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").scalar_type(), dtype);
    const auto* encoder = dynamic_cast<const TextEncoder*>(model->get());
    auto out = encoder->EncodeTokens(Io("t5/input_ids_32"), Io("t5/attention_mask_32"));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->last_hidden_state.scalar_type(), dtype);
    const torch::Tensor golden = Io("t5/last_hidden_state_32_masked");
    const double err =
        (out->last_hidden_state.to(torch::kFloat) - golden).abs().max().item<double>();
    EXPECT_LT(err, 0.05 * golden.abs().max().item<double>()) << c10::toString(dtype);
  }
}

}  // namespace
}  // namespace ds::t5
