// Reproduces transformers' CLIPTextModel on the fixtures under
// $DS_GOLDEN_DIR/conditioning/text_encoders/ (see ../shared/golden/README.md): last_hidden_state,
// pooler_output and hidden_states of all golden strings, from the transformers folder (resolved by
// the registry from config.json's "architectures") and from single files with each supported
// prefix; and the FluxPipeline text fixtures' pooled_prompt_embeds / prompt_embeds from the
// pipeline folder's text_encoder/ and text_encoder_2/, reached only through ds::TextEncoder.
// Tolerance: the README's |ours - golden| <= 1e-4 + 1e-4 |golden|.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <string>
#include <vector>

#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/text_encoder.h"
#include "testing/pipeline_golden.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;
using ::ds::test::WithinTolerance;

fs::path EncodersDir() { return fs::path(GoldenDir()) / "conditioning" / "text_encoders"; }

torch::Tensor Golden(const std::string& file, const std::string& key) {
  auto f = SafetensorsFile::Open(file);
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return {};
  auto t = (*f)->Get(key);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

torch::Tensor Io(const std::string& key) {
  return Golden((EncodersDir() / "io.safetensors").string(), key);
}

const TextEncoder* AsEncoder(const std::unique_ptr<DiffusionModel>& model) {
  return dynamic_cast<const TextEncoder*>(model.get());
}

// Every golden output of the CLIP fixture from `model`.
void ExpectClipGolden(const DiffusionModel& model) {
  const auto* encoder = dynamic_cast<const TextEncoder*>(&model);
  ASSERT_NE(encoder, nullptr);
  EXPECT_EQ(encoder->hidden_size(), Io("clip/last_hidden_state").size(2));
  auto out = encoder->EncodeTokens(Io("clip/input_ids"), torch::Tensor(), true);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(WithinTolerance(out->last_hidden_state, Io("clip/last_hidden_state")));
  EXPECT_TRUE(WithinTolerance(out->pooled, Io("clip/pooler_output")));
  // hidden_states.<i> are recorded for string 0.
  auto io = SafetensorsFile::Open((EncodersDir() / "io.safetensors").string());
  ASSERT_TRUE(io.ok());
  int64_t recorded = 0;
  while ((*io)->Get("clip/hidden_states." + std::to_string(recorded)).ok()) ++recorded;
  ASSERT_GT(recorded, 0);
  ASSERT_EQ(static_cast<int64_t>(out->hidden_states.size()), recorded);
  for (int64_t i = 0; i < recorded; ++i) {
    EXPECT_TRUE(WithinTolerance(out->hidden_states[i].narrow(0, 0, 1),
                                Io("clip/hidden_states." + std::to_string(i))))
        << "hidden_states." << i;
  }
}

TEST(ClipGoldenTest, FolderResolvedFromArchitectures) {
  auto model = LoadModelFromFolder((EncodersDir() / "clip_text_encoder").string(), {});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->class_name(), "CLIPTextModel");
  ExpectClipGolden(**model);
  // Forward (the DiffusionModel face) gives last_hidden_state.
  auto forward = (*model)->Forward({{"input_ids", Io("clip/input_ids")}});
  ASSERT_TRUE(forward.ok()) << forward.status();
  EXPECT_TRUE(WithinTolerance(*forward, Io("clip/last_hidden_state")));
}

TEST(ClipGoldenTest, BFloat16AndFloat16StayClose) {
  for (torch::Dtype dtype : {torch::kBFloat16, torch::kFloat16}) {
    ModelOptions options;
    options.dtype = dtype;
    auto model = LoadModelFromFolder((EncodersDir() / "clip_text_encoder").string(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    auto out = AsEncoder(*model)->EncodeTokens(Io("clip/input_ids"), torch::Tensor());
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->last_hidden_state.scalar_type(), dtype);
    const torch::Tensor golden = Io("clip/last_hidden_state");
    const double err =
        (out->last_hidden_state.to(torch::kFloat) - golden).abs().max().item<double>();
    // 16-bit rounding through 2 layers: far below the values' scale, far above fp32 noise.
    EXPECT_LT(err, 0.05 * golden.abs().max().item<double>()) << c10::toString(dtype);
    EXPECT_TRUE(torch::isfinite(out->pooled).all().item<bool>());
  }
}

// Writes the golden CLIP weights under `prefix` (optionally in the pre-`text_model.` naming and
// with the extra keys old checkpoints carry) to `path`.
void WriteClipFile(const std::string& path, const std::string& prefix, bool legacy_naming,
                   const TensorMap& extra = {}) {
  auto f = SafetensorsFile::Open((EncodersDir() / "clip_text_encoder" / "model.safetensors").string());
  ASSERT_TRUE(f.ok()) << f.status();
  auto all = (*f)->GetAll();
  ASSERT_TRUE(all.ok());
  TensorMap out;
  for (const auto& [k, t] : *all) {
    std::string name = k;
    if (legacy_naming) name = name.substr(std::string("text_model.").size());
    out[prefix + name] = t;
  }
  for (const auto& [k, t] : extra) out[prefix + k] = t;
  ASSERT_TRUE(WriteSafetensors(path, out).ok());
}

SingleFileOptions ClipSingleFileOptions(const std::string& model_class = "") {
  SingleFileOptions o;
  o.model_class = model_class;
  // The head count is not recorded in the weights (the fixture's 32-wide model has 4 heads).
  o.config_override = {{"num_attention_heads", 4}};
  return o;
}

TEST(ClipGoldenTest, SingleFilesWithEachPrefix) {
  test::TempDir dir;
  struct Case {
    std::string prefix;
    bool legacy;
  };
  const int64_t positions = Io("clip/input_ids").size(1);
  const int64_t width = Io("clip/last_hidden_state").size(2);
  for (const Case& c : {Case{"", false}, Case{"text_encoders.clip_l.transformer.", false},
                        Case{"cond_stage_model.transformer.", false},
                        Case{"cond_stage_model.transformer.", true}}) {
    SCOPED_TRACE("prefix '" + c.prefix + "'" + (c.legacy ? " (legacy naming)" : ""));
    const std::string path = dir.File("clip.safetensors");
    // What SD / ComfyUI files carry besides the text model: left out and reported.
    TensorMap extra;
    if (!c.prefix.empty()) {
      extra[c.legacy ? "embeddings.position_ids" : "text_model.embeddings.position_ids"] =
          torch::arange(positions).unsqueeze(0);
      extra["text_projection.weight"] = torch::zeros({width, width});
    }
    WriteClipFile(path, c.prefix, c.legacy, extra);
    auto loaded = LoadSingleFile(path, ClipSingleFileOptions());
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->report.model_class, "CLIPTextModel");
    EXPECT_EQ(loaded->report.prefix, c.prefix);
    EXPECT_EQ(loaded->report.variant, "clip-text");
    if (!c.prefix.empty()) {
      // The extras are reported as ignored under their names in the file.
      EXPECT_EQ(loaded->report.ignored.count(c.prefix + "text_projection.weight"), 1u)
          << loaded->report.ToString();
      EXPECT_EQ(loaded->report.ignored.size(), 2u) << loaded->report.ToString();
    }
    ExpectClipGolden(*loaded->model);
  }
}

TEST(ClipGoldenTest, BundledFileNeedsTheModelClassAndResolvesEachEncoder) {
  test::TempDir dir;
  auto clip = SafetensorsFile::Open((EncodersDir() / "clip_text_encoder" / "model.safetensors").string());
  auto t5 = SafetensorsFile::Open((EncodersDir() / "t5_encoder" / "model.safetensors").string());
  ASSERT_TRUE(clip.ok() && t5.ok());
  auto clip_weights = (*clip)->GetAll();
  auto t5_weights = (*t5)->GetAll();
  ASSERT_TRUE(clip_weights.ok() && t5_weights.ok());
  TensorMap both;
  for (const auto& [k, t] : *clip_weights) both["text_encoders.clip_l.transformer." + k] = t;
  for (const auto& [k, t] : *t5_weights) both["text_encoders.t5xxl.transformer." + k] = t;
  const std::string path = dir.File("encoders.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, both).ok());
  // Neither component alone is the whole file: nothing is guessed.
  auto guessed = InspectSingleFile(path, ClipSingleFileOptions());
  EXPECT_EQ(guessed.status().code(), absl::StatusCode::kInvalidArgument);
  auto loaded = LoadSingleFile(path, ClipSingleFileOptions("CLIPTextModel"));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectClipGolden(*loaded->model);
  EXPECT_EQ(loaded->report.ignored.count(
                "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"),
            1u);
}

// The pipeline folder's text encoders, found through the registry by class name and used only
// as ds::TextEncoder, reproduce FluxPipeline's prompt embeddings for every golden case.
TEST(ClipGoldenTest, PipelineFolderEncodersReproducePromptEmbeds) {
  const fs::path root = test::TextPipelineDir() / "flux_tiny";
  const nlohmann::json index = test::ReadJson(root / "model_index.json");
  ASSERT_TRUE(index.is_object());
  auto clip = LoadModelFromFolder((root / "text_encoder").string(), {},
                                  index["text_encoder"][1].get<std::string>());
  auto t5 = LoadModelFromFolder((root / "text_encoder_2").string(), {},
                                index["text_encoder_2"][1].get<std::string>());
  ASSERT_TRUE(clip.ok()) << clip.status();
  ASSERT_TRUE(t5.ok()) << t5.status();
  const TextEncoder* clip_encoder = AsEncoder(*clip);
  const TextEncoder* t5_encoder = AsEncoder(*t5);
  ASSERT_NE(clip_encoder, nullptr);
  ASSERT_NE(t5_encoder, nullptr);
  EXPECT_EQ(t5_encoder->max_position_embeddings(), -1);
  const std::vector<std::string> cases = test::CaseNames(test::TextPipelineDir());
  ASSERT_FALSE(cases.empty());
  for (const std::string& name : cases) {
    SCOPED_TRACE(name);
    const std::string file = (test::TextPipelineDir() / (name + ".safetensors")).string();
    auto pooled = clip_encoder->EncodeTokens(Golden(file, "text/clip_input_ids"), torch::Tensor());
    ASSERT_TRUE(pooled.ok()) << pooled.status();
    EXPECT_TRUE(WithinTolerance(pooled->pooled, Golden(file, "text/pooled_prompt_embeds")));
    auto embeds = t5_encoder->EncodeTokens(Golden(file, "text/t5_input_ids"), torch::Tensor());
    ASSERT_TRUE(embeds.ok()) << embeds.status();
    EXPECT_FALSE(embeds->pooled.defined());
    EXPECT_TRUE(WithinTolerance(embeds->last_hidden_state, Golden(file, "text/prompt_embeds")));
  }
}

}  // namespace
}  // namespace ds
