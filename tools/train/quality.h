// The quality check of the trained tiny default (issue 11): generates images for caption
// combinations through a text-to-image pipeline and scores them with the shape classifier and the
// colour reader (classifier.h).
//
// Thread-safety: stateless; the pipeline and classifier are only read.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/pipeline.h"
#include "tools/train/classifier.h"
#include "tools/train/scenes.h"

namespace ds::train {

struct QualityOptions {
  int64_t images_per_combination = 4;  // each from its own noise
  int64_t steps = 8;
  uint64_t seed = 1;
  int64_t side = 32;
  // Images per request: at most the pipeline's PipelineOptions::max_batch (default 16).
  int64_t max_batch = 16;
  AdapterStackPtr adapters;  // null: the base model
  // True classifier-free guidance with the empty negative prompt when > 1 (the model was trained
  // with caption dropout for it).
  double true_cfg_scale = 1.0;
  // What each caption should draw (default: the caption itself), e.g. circles -> stars.
  std::function<Combination(const Combination&)> expected;
};

struct QualityResult {
  int64_t images = 0;
  int64_t correct = 0;          // shape, colour and background all right
  int64_t shape_correct = 0;    // the expected shape
  int64_t colours_correct = 0;  // colour and background right
  std::vector<Combination> expected;
  std::vector<SceneReading> readings;
  torch::Tensor images_rgb;  // [N, 3, side, side] float32 in [0, 1], as the pipeline decoded them
  double generate_seconds = 0;  // the pipeline's Generate calls
  double accuracy() const { return images == 0 ? 0 : static_cast<double>(correct) / images; }
  double shape_accuracy() const {
    return images == 0 ? 0 : static_cast<double>(shape_correct) / images;
  }
};

// Generates options.images_per_combination images for each combination's caption (prompts in
// order, images of a prompt together; requests of at most options.max_batch images, whole
// prompts each, the k-th request seeded options.seed + its first prompt's index) and reads each. The pipeline's errors (e.g.
// FAILED_PRECONDITION without text encoders) and the classifier's pass through; INVALID_ARGUMENT
// for an empty list.
absl::StatusOr<QualityResult> ScoreCaptions(const DiffusionPipeline& pipeline,
                                            const ShapeClassifier& classifier,
                                            const std::vector<Combination>& combinations,
                                            const QualityOptions& options);

}  // namespace ds::train
