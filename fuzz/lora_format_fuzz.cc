// libFuzzer target: LoRA format detection and conversion (handlers/lora_format.h) with the Flux
// handler (models/flux/lora.h: kohya, BFL, XLabs, fal Kontext, diffusers/PEFT), validated against
// the parameter shapes of the embedded flux-tiny transformer, as LoadLoRA does in the server.
//
// Input: a checkpoint in the TensorListInput text form (fuzz/fuzz_util.h): lines
//   <key> TAB <shape "4,64"> [TAB <dtype "F16"> [TAB <value "4">]]   and   @<metadata key>=<value>
// (e.g. "@lora_adapter_metadata={\"r\": 4}"), at most 2^16 elements in all. The harness builds the
// safetensors file in memory (a memfd) and runs, as the server would on an uploaded adapter:
//   SafetensorsFile::Open -> GetAll -> MakeLoraKeys -> DetectFormat / PlanLoraConversion ->
//   ConvertLora -> ValidateLora (strict and allow_partial) -> LoadLora (the whole path), and for a
//   LoRA that validates: ToDiffusersStateDict("transformer.") converted again as diffusers.
// Any absl::Status error is fine. Findings: crashes, sanitizer reports, uncaught exceptions, and
// broken invariants (Require): a status code outside the documented ones; a converted module or
// validated report whose shapes disagree with the model; a diffusers re-export that does not
// convert back to the same modules with the same deltas (scale * B * A).
//
// Seeds: DS_FUZZ_WRITE_SEEDS=<dir> lora_format_fuzz_replay writes fuzz/corpus/lora/ (one key set
// per format from the flux-tiny shapes, the shipped kohya stars LoRA's keys, and near-valid
// variants).
#include <torch/torch.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "fuzz/fuzz_util.h"
#include "handlers/lora_format.h"
#include "handlers/safetensors.h"
#include "handlers/safetensors_format.h"
#include "models/flux/demo_weights.h"
#include "models/flux/lora.h"

namespace {

using ds::ConvertedLora;
using ds::KeyShapes;
using ds::LoraModule;
using ds::TensorMap;
using ds::fuzz::Require;
using ds::fuzz::TensorListInput;

// flux-tiny's transformer parameters (diffusers names), read from the embedded weights' header.
const KeyShapes& TinyParams() {
  static const KeyShapes* params = [] {
    const std::string_view file = ds::flux::FluxTinyEmbedded().transformer;
    auto header = ds::safetensors::ParseHeader(file, file.size(), "flux-tiny transformer");
    Require(header.ok(), "the embedded flux-tiny transformer parses");
    auto* out = new KeyShapes;
    for (const auto& t : header->tensors) (*out)[t.name] = t.shape;
    return out;
  }();
  return *params;
}

bool DocumentedLoraCode(const absl::Status& s) {
  return s.code() == absl::StatusCode::kInvalidArgument ||
         s.code() == absl::StatusCode::kUnimplemented || s.code() == absl::StatusCode::kInternal;
}

bool AllFloating(const ConvertedLora& lora) {
  for (const LoraModule& m : lora.modules) {
    if (!m.down.is_floating_point() || !m.up.is_floating_point()) return false;
    if (m.bias.defined() && !m.bias.is_floating_point()) return false;
  }
  return true;
}

torch::Tensor Delta(const LoraModule& m) {
  return m.up.to(torch::kFloat64).matmul(m.down.to(torch::kFloat64)) * m.scale;
}

// The diffusers re-export of a validated LoRA converts back to the same modules and deltas.
void CheckRoundTrip(const ConvertedLora& lora) {
  if (lora.modules.empty() || !AllFloating(lora)) return;
  auto state_dict = lora.ToDiffusersStateDict("transformer.");
  Require(state_dict.ok(), "a validated LoRA exports as a diffusers state dict");
  auto again = ds::ConvertLora(*state_dict, {}, ds::flux::FluxLoraHandler());
  Require(again.ok(), "the diffusers export converts again");
  Require(again->format == ds::kDiffusersLoraFormat, "the export is detected as diffusers");
  Require(again->modules.size() == lora.modules.size(), "the export keeps every module");
  for (std::size_t i = 0; i < lora.modules.size(); ++i) {
    const LoraModule& a = lora.modules[i];
    const LoraModule& b = again->modules[i];
    Require(a.module == b.module, "the export keeps module names");
    Require(a.down.sizes() == b.down.sizes() && a.up.sizes() == b.up.sizes(),
            "the export keeps shapes");
    Require(a.bias.defined() == b.bias.defined(), "the export keeps biases");
    const torch::Tensor da = Delta(a), db = Delta(b);
    if (!da.isfinite().all().item<bool>()) continue;
    // Relative to the largest factor product: the export rounds scale * B to B's dtype.
    const double bound = (a.up.to(torch::kFloat64).abs().max().item<double>() *
                              a.down.to(torch::kFloat64).abs().max().item<double>() *
                              std::abs(a.scale) * static_cast<double>(a.down.size(0)) +
                          1e-30) *
                         1e-2;
    Require((da - db).abs().max().item<double>() <= bound, "the export keeps the deltas");
  }
}

void Run(const TensorListInput& input) {
  auto image = input.ToSafetensors();
  if (!image.ok()) return;
  const ds::fuzz::MemFile file(*image);
  auto opened = ds::SafetensorsFile::Open(file.path());
  Require(opened.ok(), "a serialized image opens");
  auto tensors = (*opened)->GetAll();
  if (!tensors.ok()) return;
  const ds::flux::FluxLora& handler = ds::flux::FluxLoraHandler();

  auto keys = ds::MakeLoraKeys(*tensors, (*opened)->metadata());
  if (keys.ok()) {
    std::optional<std::string> format = handler.DetectFormat(keys->shapes);
    auto plan = ds::PlanLoraConversion(handler, *keys);
    if (plan.ok()) {
      Require(format.has_value() && plan->format == *format, "the plan has the detected format");
      auto executed = ds::ExecuteLoraPlan(*plan, *keys, *tensors);
      if (!executed.ok()) Require(DocumentedLoraCode(executed.status()), "execute status code");
    } else {
      Require(DocumentedLoraCode(plan.status()), "plan status code");
    }
  } else {
    Require(keys.status().code() == absl::StatusCode::kInvalidArgument ||
                keys.status().code() == absl::StatusCode::kInternal,
            "MakeLoraKeys status code");
  }

  auto lora = ds::ConvertLora(*tensors, (*opened)->metadata(), handler);
  if (!lora.ok()) {
    Require(DocumentedLoraCode(lora.status()), "ConvertLora status code");
  } else {
    for (const LoraModule& m : lora->modules) {
      Require(m.down.defined() && m.up.defined(), "a converted module has A and B");
    }
    for (bool partial : {false, true}) {
      ds::LoraLoadOptions options;
      options.allow_partial = partial;
      auto report = ds::ValidateLora(*lora, TinyParams(), options);
      if (!report.ok()) {
        Require(report.status().code() == absl::StatusCode::kInvalidArgument,
                "ValidateLora errors are INVALID_ARGUMENT");
        continue;
      }
      for (const ds::LoraModuleReport& m : report->modules) {
        auto param = TinyParams().find(m.module + ".weight");
        Require(param != TinyParams().end() && param->second.size() == 2,
                "a validated module targets a 2-D weight");
        const std::vector<int64_t>& w = param->second;
        Require(m.down_shape.size() == 2 && m.up_shape.size() == 2, "validated A and B are 2-D");
        Require(m.up_shape[0] == w[0] && m.up_shape[1] == m.down_shape[0] && m.rank > 0 &&
                    m.down_shape[0] == m.rank && m.down_shape[1] >= w[1],
                "validated shapes match the model");
      }
      if (!partial) CheckRoundTrip(*lora);
    }
  }

  ds::LoraLoadOptions options;
  options.allow_partial = true;
  auto loaded = ds::LoadLora(file.path(), handler, TinyParams(), options);
  if (!loaded.ok()) {
    Require(DocumentedLoraCode(loaded.status()), "LoadLora status code");
  } else {
    Require(!loaded->report.sha256.empty(), "LoadLora reports the digest");
  }
}

// ---------------------------------------------------------------------------------------------
// Seeds.

using Lines = std::string;
std::string L(const std::string& key, std::vector<int64_t> shape, const std::string& dtype = "",
              const std::string& value = "") {
  return TensorListInput::Line(key, shape, dtype, value);
}

// A LoRA pair (and optional alpha) for `stub` with `suffix_down`/`suffix_up`.
std::string Pair(const std::string& stub, int64_t r, int64_t in, int64_t out,
                 const std::string& down = ".lora_A.weight",
                 const std::string& up = ".lora_B.weight") {
  return L(stub + down, {r, in}) + L(stub + up, {out, r});
}

void WriteSeeds(ds::fuzz::SeedWriter& w) {
  // The shipped kohya LoRA's keys, shapes, dtypes and alphas (values from the pattern).
  {
    const std::string path =
        std::string(DS_SOURCE_DIR) + "/models/flux/demo/flux-tiny-stars.safetensors";
    auto stars = ds::SafetensorsFile::Open(path);
    Require(stars.ok(), "the stars LoRA opens");
    std::string text;
    for (const auto& [k, v] : (*stars)->metadata()) text += "@" + k + "=" + v + "\n";
    for (const auto& t : (*stars)->header().tensors) {
      text += L(t.name, t.shape, std::string(ds::safetensors::DTypeName(t.dtype)),
                t.shape.empty() ? "4" : "");
    }
    w.Write("kohya_stars.txt", text);
  }
  const int64_t d = 64, r = 2;
  w.Write("kohya_blocks.txt",
          Pair("lora_unet_double_blocks_0_img_attn_qkv", r, d, 3 * d, ".lora_down.weight",
               ".lora_up.weight") +
              L("lora_unet_double_blocks_0_img_attn_qkv.alpha", {}, "F32", "1") +
              Pair("lora_unet_single_blocks_1_linear1", r, d, 3 * d + 4 * d, ".lora_down.weight",
                   ".lora_up.weight") +
              Pair("lora_unet_single_blocks_1_linear2", r, d + 4 * d, d, ".lora_down.weight",
                   ".lora_up.weight") +
              Pair("lora_unet_final_layer_adaLN_modulation_1", r, d, 2 * d, ".lora_down.weight",
                   ".lora_up.weight") +
              Pair("lora_unet_img_in", r, 16, d, ".lora_down.weight", ".lora_up.weight") +
              Pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", r, 8, 8, ".lora_down.weight",
                   ".lora_up.weight"));
  w.Write("kohya_comfy.txt",
          Pair("diffusion_model.double_blocks.1.txt_attn.qkv", r, d, 3 * d, ".lora_down.weight",
               ".lora_up.weight") +
              L("diffusion_model.double_blocks.1.txt_attn.qkv.alpha", {}, "F16", "2"));
  w.Write("kohya_mixture.txt", Pair("lora_transformer_single_transformer_blocks_0_attn_to_k", r, d,
                                    d, ".lora_down.weight", ".lora_up.weight") +
                                   Pair("lora_transformer_x_embedder", r, 16, d,
                                        ".lora_down.weight", ".lora_up.weight"));
  w.Write("bfl_control.txt", Pair("double_blocks.0.img_attn.qkv", r, d, 3 * d) +
                                 L("double_blocks.0.img_attn.qkv.lora_B.bias", {3 * d}) +
                                 Pair("img_in", r, 32, d) + L("img_in.lora_B.bias", {d}) +
                                 L("double_blocks.0.img_attn.norm.query_norm.scale", {16}) +
                                 L("single_blocks.0.norm.key_norm.scale", {16}) +
                                 Pair("final_layer.adaLN_modulation.1", r, d, 2 * d) +
                                 L("final_layer.adaLN_modulation.1.lora_B.bias", {2 * d}) +
                                 Pair("time_in.in_layer", r, 256, d) +
                                 Pair("guidance_in.out_layer", r, d, d));
  w.Write("kontext.txt",
          Pair("base_model.model.double_blocks.0.img_mod.lin", r, d, 6 * d) +
              L("base_model.model.double_blocks.0.img_mod.lin.lora_B.bias", {6 * d}) +
              Pair("base_model.model.single_blocks.1.modulation.lin", r, d, 3 * d));
  w.Write("xlabs.txt",
          Pair("double_blocks.0.processor.qkv_lora1", r, d, 3 * d, ".down.weight", ".up.weight") +
              Pair("double_blocks.0.processor.proj_lora1", r, d, d, ".down.weight", ".up.weight") +
              Pair("diffusion_model.double_blocks.1.processor.qkv_lora2", r, d, 3 * d,
                   ".down.weight", ".up.weight") +
              Pair("diffusion_model.double_blocks.1.processor.proj_lora2", r, d, d, ".down.weight",
                   ".up.weight"));
  w.Write("diffusers_metadata.txt",
          std::string("@lora_adapter_metadata={\"r\": 2, \"lora_alpha\": 4, \"rank_pattern\": "
                      "{\"to_q\": 2}, \"alpha_pattern\": {\"proj_out\": 1}}\n") +
              Pair("transformer.transformer_blocks.0.attn.to_q", r, d, d) +
              Pair("transformer.single_transformer_blocks.1.proj_out", r, 5 * d, d) +
              L("transformer.single_transformer_blocks.1.proj_out.lora_B.bias", {d}));
  w.Write("peft_alpha.txt", Pair("transformer_blocks.1.ff.net.0.proj", r, d, 4 * d) +
                                L("transformer_blocks.1.ff.net.0.proj.alpha", {}, "F32", "8") +
                                Pair("proj_out", r, d, 16, ".lora_down.weight", ".lora_up.weight"));
  // Near-valid: each breaks one rule.
  w.Write("bad_qkv_rows.txt", Pair("double_blocks.0.img_attn.qkv", r, d, 3 * d + 1));
  w.Write("bad_rank_mismatch.txt", L("transformer.x_embedder.lora_A.weight", {3, 16}) +
                                       L("transformer.x_embedder.lora_B.weight", {d, 2}));
  w.Write("bad_model_shape.txt", Pair("transformer.transformer_blocks.0.attn.to_k", r, 63, d));
  w.Write("bad_nan.txt", L("transformer.proj_out.lora_A.weight", {r, d}, "F32", "nan") +
                             L("transformer.proj_out.lora_B.weight", {16, r}));
  w.Write("bad_unpaired.txt", L("lora_unet_double_blocks_0_img_mlp_0.lora_down.weight", {r, d}) +
                                  L("lora_unet_double_blocks_0_img_mlp_0.alpha", {}, "", "2"));
  w.Write("bad_duplicate_normalized.txt", L("transformer.proj_out.lora_down.weight", {r, d}) +
                                              L("transformer.proj_out.lora_A.weight", {r, d}) +
                                              L("transformer.proj_out.lora_B.weight", {16, r}));
  w.Write("bad_dora.txt", std::string("@lora_adapter_metadata={\"use_dora\": true}\n") +
                              Pair("transformer.proj_out", r, d, 16) +
                              L("transformer.proj_out.lora_magnitude_vector", {16}));
  w.Write("bad_metadata_json.txt",
          std::string("@lora_adapter_metadata=[1,2\n") + Pair("transformer.proj_out", r, d, 16));
  w.Write("bad_int_dtype.txt", L("transformer.proj_out.lora_A.weight", {r, d}, "I64") +
                                   L("transformer.proj_out.lora_B.weight", {16, r}, "U8"));
  w.Write("bad_unknown.txt", Pair("unet.down_blocks.0.attn.to_q", r, 8, 8));
  w.Write("bad_3d.txt", L("transformer.proj_out.lora_A.weight", {r, d, 1}) +
                            L("transformer.proj_out.lora_B.weight", {16, r}));
  w.Write("empty.txt", "");
  w.Finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (auto seeds = ds::fuzz::SeedWriter::FromEnv()) WriteSeeds(*seeds);
  TinyParams();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  auto input = TensorListInput::Decode(std::string_view(reinterpret_cast<const char*>(data), size));
  if (input.has_value()) Run(*input);
  return 0;
}
