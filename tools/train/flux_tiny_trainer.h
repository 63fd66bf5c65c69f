// The training tool of the trained tiny default (issue 11): trains flux-tiny's AutoencoderKL, its
// text encoders jointly with its FluxTransformer2DModel, a kohya-format rank-4 LoRA that turns
// circles into stars, and the shape classifier the quality test scores generated images with — all
// with the project's own modules in differentiable mode (set_differentiable), never a second
// implementation of a model.
//
// Stages (each seeded, each logging its loss with a progress line):
//   1. vae:       AutoencoderKL on rendered scenes of the training combinations (scenes.h): MSE
//                 reconstruction + a small KL term; then the latent statistics give the VAE's
//                 shift_factor (mean) and scaling_factor (1 / std), as FLUX.1's VAE config has.
//   2. denoiser:  CLIP + T5 + FluxTransformer2DModel jointly on the flow-matching objective
//                 (x_t = (1 - t) x0 + t ε, target v = ε - x0, t logit-normal or uniform), captions
//                 dropped to "" with probability `caption_dropout` (for true CFG) and cut to two of
//                 their three attributes with probability `partial_captions` (so that each word
//                 steers its attribute and held-out combinations can be drawn), the guidance input
//                 drawn from [1, 5] (the model learns to ignore it).
//   3. lora:      a rank-`lora_rank` LoRA on every block linear in BFL naming (fused qkv / linear1
//                 with one shared lora_down, as kohya trains them), base frozen, on circle captions
//                 paired with star renders (same colours and placement) mixed with the other
//                 shapes' own renders (so they stay as they are).
//   4. classifier: ShapeClassifier (classifier.h).
//
// Output (`out_dir`): flux-tiny/ (a diffusers pipeline folder, weights as float16 safetensors,
// tokenizers generated from the caption vocabulary), flux-tiny-stars.safetensors (the LoRA, kohya
// naming, float16), shape-classifier.safetensors, training-report.json (per-stage seconds, final
// losses, the settings).
//
// Thread-safety: one TrainFluxTiny call at a time per process (it sets LibTorch's global seed).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace ds::train {

struct FluxTinyTrainOptions {
  std::string out_dir;
  uint64_t seed = 0;
  int64_t side = 32;
  // Rendered scenes per training combination (the pools the stages draw batches from).
  int64_t scenes_per_combination = 32;
  int64_t vae_steps = 900;
  int64_t vae_batch = 32;
  double vae_learning_rate = 2e-3;
  double vae_kl_weight = 1e-5;
  int64_t denoiser_steps = 4000;
  int64_t denoiser_batch = 64;
  double denoiser_learning_rate = 1e-3;
  double caption_dropout = 0.1;
  // Probability of a partial caption naming two of the three attributes, half "a {colour}
  // {shape}", half "a {shape} on a {colour} background" (compositional generalization).
  double partial_captions = 0.3;
  int64_t lora_steps = 800;
  int64_t lora_batch = 32;
  double lora_learning_rate = 2e-3;
  int64_t lora_rank = 4;
  int64_t classifier_steps = 1500;
  // Progress output (one line per `log_every` steps and a final one per stage); empty: silent.
  std::function<void(const std::string& line)> log;
  int64_t log_every = 100;
};

// Trains every stage and writes the outputs listed above. Returns the report (also written as
// training-report.json). INVALID_ARGUMENT for non-positive sizes, steps or rates; the underlying
// loaders' / writers' errors naming the file; INTERNAL for LibTorch failures.
absl::StatusOr<nlohmann::json> TrainFluxTiny(const FluxTinyTrainOptions& options);

}  // namespace ds::train
