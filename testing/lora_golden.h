// Helpers shared by the tests that check LoRA conversion against the golden fixtures
// ($DS_GOLDEN_DIR/lora/, see ../shared/golden/README.md "lora/"). Header-only; tests only.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <system_error>
#include <vector>

#include "absl/strings/match.h"
#include "handlers/lora_format.h"
#include "testing/test_util.h"

namespace ds::test {

// The golden README's tolerance for LoRA conversion: deltas equal within 1e-5 relative.
inline constexpr double kLoraRelativeTolerance = 1e-5;

inline torch::Tensor F64(const torch::Tensor& t) { return t.to(torch::kFloat64); }

// `t` with the two halves of its rows exchanged (the (shift, scale) swap of an adaLN output).
inline torch::Tensor SwapHalves(const torch::Tensor& t) {
  const int64_t h = t.size(0) / 2;
  return torch::cat({t.narrow(0, h, h), t.narrow(0, 0, h)}, 0);
}

// max|ours - ref| <= rel * max|ref|, computed in float64.
inline ::testing::AssertionResult Close(const torch::Tensor& ours, const torch::Tensor& ref,
                                        double rel = kLoraRelativeTolerance) {
  if (!ours.defined() || !ref.defined()) {
    return ::testing::AssertionFailure()
           << "undefined tensor (ours " << ours.defined() << ", reference " << ref.defined() << ")";
  }
  if (ours.sizes() != ref.sizes()) {
    return ::testing::AssertionFailure() << "shape " << ours.sizes() << " vs " << ref.sizes();
  }
  if (ours.numel() == 0) return ::testing::AssertionSuccess();
  const double diff = (F64(ours) - F64(ref)).abs().max().item<double>();
  const double scale = F64(ref).abs().max().item<double>();
  if (diff <= rel * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max|ours - reference| = " << diff << " > " << rel
                                       << " x max|reference| = " << rel * scale;
}

inline std::filesystem::path LoraGoldenDir() { return std::filesystem::path(GoldenDir()) / "lora"; }

// The case folders under LoraGoldenDir(): those holding input.safetensors and expected.json,
// sorted by name.
inline std::vector<std::string> LoraGoldenCases() {
  std::vector<std::string> cases;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(LoraGoldenDir(), ec)) {
    if (entry.is_directory() && std::filesystem::exists(entry.path() / "input.safetensors") &&
        std::filesystem::exists(entry.path() / "expected.json")) {
      cases.push_back(entry.path().filename().string());
    }
  }
  std::sort(cases.begin(), cases.end());
  return cases;
}

// Our format name for the diffusers code path a case's expected.json records (`converter_called`,
// `kohya_sub_branch`).
inline std::string ExpectedLoraFormat(const nlohmann::json& expected) {
  const std::string sub = expected.value("kohya_sub_branch", nlohmann::json()).is_string()
                              ? expected["kohya_sub_branch"].get<std::string>()
                              : "";
  for (const auto& called : expected["converter_called"]) {
    const std::string fn = called.get<std::string>();
    if (fn == "_convert_kohya_flux_lora_to_diffusers") {
      // diffusers sends a "transformer."-prefixed PEFT dict spelled lora_down/lora_up through its
      // kohya converter only to rename the suffixes: that is native naming.
      return absl::StartsWith(sub, "peft_state_dict") ? kDiffusersLoraFormat : "kohya";
    }
    if (fn == "_convert_xlabs_flux_lora_to_diffusers") return "xlabs";
    if (fn == "_convert_bfl_flux_control_lora_to_diffusers") return "bfl";
    if (fn == "_convert_fal_kontext_lora_to_diffusers") return "kontext";
    return "unrecognised converter " + fn;
  }
  return kDiffusersLoraFormat;
}

}  // namespace ds::test
