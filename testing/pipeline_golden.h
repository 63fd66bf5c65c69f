// Helpers shared by the tests that check the scheduler, latents and pipeline against the golden
// pipeline fixtures ($DS_GOLDEN_DIR/pipeline/, see ../shared/golden/README.md "Pipeline and
// conditioning fixtures"). Header-only; tests only.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace ds::test {

// The golden README's pipeline tolerance: |ours - golden| <= 1e-4 + 1e-4 |golden| everywhere.
inline constexpr double kPipelineAbsTolerance = 1e-4;
inline constexpr double kPipelineRelTolerance = 1e-4;

// $DS_GOLDEN_DIR/pipeline/flux_pipeline (diffusers' FluxPipeline runs from embeddings) and
// .../flux_pipeline_text (the same from prompts, with text encoders).
inline std::filesystem::path PipelineDir() {
  return std::filesystem::path(GoldenDir()) / "pipeline" / "flux_pipeline";
}
inline std::filesystem::path TextPipelineDir() {
  return std::filesystem::path(GoldenDir()) / "pipeline" / "flux_pipeline_text";
}

// The parsed JSON file, or a discarded value (is_discarded()) when it is missing or malformed.
inline nlohmann::json ReadJson(const std::filesystem::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
}

// The case names of `dir`/cases.json ({"cases": {name: ...}}), found at run time; empty when the
// file is missing or has no cases (tests assert it is not).
inline std::vector<std::string> CaseNames(const std::filesystem::path& dir = PipelineDir()) {
  std::vector<std::string> out;
  const nlohmann::json cases = ReadJson(dir / "cases.json");
  if (!cases.is_object() || !cases.contains("cases")) return out;
  for (const auto& [name, unused] : cases["cases"].items()) out.push_back(name);
  return out;
}

// |ours - golden| <= kPipelineAbsTolerance + kPipelineRelTolerance |golden| everywhere (in
// float64, `ours` on any device); the message gives the largest difference and the worst excess.
inline ::testing::AssertionResult WithinTolerance(const torch::Tensor& ours,
                                                  const torch::Tensor& golden) {
  if (!ours.defined() || !golden.defined()) {
    return ::testing::AssertionFailure() << "undefined tensor";
  }
  if (ours.sizes() != golden.sizes()) {
    return ::testing::AssertionFailure() << "shape " << ours.sizes() << " vs " << golden.sizes();
  }
  const torch::Tensor a = ours.cpu().to(torch::kFloat64), b = golden.to(torch::kFloat64);
  const torch::Tensor diff = (a - b).abs();
  const double max_diff = diff.max().item<double>();
  const double excess =
      (diff - (kPipelineAbsTolerance + kPipelineRelTolerance * b.abs())).max().item<double>();
  if (excess <= 0) return ::testing::AssertionSuccess() << "max |diff| " << max_diff;
  return ::testing::AssertionFailure() << "max |diff| " << max_diff << " exceeds "
                                       << kPipelineAbsTolerance << " + " << kPipelineRelTolerance
                                       << " |golden| by " << excess;
}

}  // namespace ds::test
