#include "tools/train/quality.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/status.h"

namespace ds::train {

absl::StatusOr<QualityResult> ScoreCaptions(const DiffusionPipeline& pipeline,
                                            const ShapeClassifier& classifier,
                                            const std::vector<Combination>& combinations,
                                            const QualityOptions& options) {
  if (combinations.empty()) return absl::InvalidArgumentError("no combinations to score");
  if (options.images_per_combination < 1) {
    return absl::InvalidArgumentError("images_per_combination must be >= 1");
  }
  // Requests of at most max_batch images, whole prompts each, seeds counting up.
  const int64_t max_batch = std::max<int64_t>(1, options.max_batch);
  const int64_t per_request =
      std::max<int64_t>(1, max_batch / options.images_per_combination);
  QualityResult result;
  std::vector<torch::Tensor> images;
  for (size_t first = 0; first < combinations.size(); first += per_request) {
    PipelineRequest r;
    for (size_t i = first; i < std::min(combinations.size(), first + per_request); ++i) {
      r.prompt.push_back(Caption(combinations[i]));
    }
    r.num_images_per_prompt = options.images_per_combination;
    r.num_inference_steps = options.steps;
    r.seed = options.seed + first;
    r.height = options.side;
    r.width = options.side;
    r.adapters = options.adapters;
    if (options.true_cfg_scale > 1) {
      r.true_cfg_scale = options.true_cfg_scale;
      r.negative_prompt = {""};
    }
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(PipelineResult generated, pipeline.Generate(r));
    result.generate_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!generated.image.defined()) return absl::InternalError("the pipeline decoded no images");
    images.push_back(generated.image);
  }
  ASSIGN_OR_RETURN(result.images_rgb, TorchCall("joining images", [&] { return torch::cat(images); }));
  ASSIGN_OR_RETURN(const torch::Tensor hwc, TorchCall("images to RGB bytes", [&] {
                     return (result.images_rgb * 255)
                         .round()
                         .clamp(0, 255)
                         .to(torch::kUInt8)
                         .permute({0, 2, 3, 1})
                         .contiguous();
                   }));
  const int64_t side = hwc.size(1);
  for (int64_t i = 0; i < hwc.size(0); ++i) {
    const Combination& asked = combinations[i / options.images_per_combination];
    const Combination expected = options.expected ? options.expected(asked) : asked;
    ASSIGN_OR_RETURN(SceneReading reading, classifier.Read(hwc[i].data_ptr<uint8_t>(), side));
    const bool shape_ok = reading.shape == expected.shape;
    const bool colours_ok = reading.colours.foreground == expected.colour &&
                            reading.colours.background == expected.background;
    ++result.images;
    result.shape_correct += shape_ok;
    result.colours_correct += colours_ok;
    result.correct += shape_ok && colours_ok;
    result.expected.push_back(expected);
    result.readings.push_back(reading);
  }
  return result;
}

}  // namespace ds::train
