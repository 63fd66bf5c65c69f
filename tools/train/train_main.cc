// train-flux-tiny: regenerates the embedded default's weights (models/flux/demo/) — see
// flux_tiny_trainer.h for the stages. Usage:
//   train-flux-tiny --out=DIR [--seed=0] [--denoiser_steps=N ...]
// then copy DIR/flux-tiny, DIR/flux-tiny-stars.safetensors and DIR/shape-classifier.safetensors
// to models/flux/demo/ (make train-demo does both).
#include <ATen/Parallel.h>

#include <cstdio>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "tools/train/flux_tiny_trainer.h"

namespace {
const ds::train::FluxTinyTrainOptions kDefaults;
}

ABSL_FLAG(std::string, out, "", "output folder (required)");
ABSL_FLAG(uint64_t, seed, kDefaults.seed, "seed of every stage");
ABSL_FLAG(int64_t, scenes_per_combination, kDefaults.scenes_per_combination,
          "rendered scenes per training combination");
ABSL_FLAG(int64_t, vae_steps, kDefaults.vae_steps, "AutoencoderKL steps");
ABSL_FLAG(int64_t, vae_batch, kDefaults.vae_batch, "AutoencoderKL batch");
ABSL_FLAG(double, vae_learning_rate, kDefaults.vae_learning_rate, "AutoencoderKL learning rate");
ABSL_FLAG(int64_t, denoiser_steps, kDefaults.denoiser_steps, "text encoders + transformer steps");
ABSL_FLAG(int64_t, denoiser_batch, kDefaults.denoiser_batch, "text encoders + transformer batch");
ABSL_FLAG(double, denoiser_learning_rate, kDefaults.denoiser_learning_rate,
          "text encoders + transformer learning rate");
ABSL_FLAG(double, caption_dropout, kDefaults.caption_dropout, "probability of an empty caption");
ABSL_FLAG(double, partial_captions, kDefaults.partial_captions,
          "probability of a caption naming two of its three attributes");
ABSL_FLAG(int64_t, lora_steps, kDefaults.lora_steps, "LoRA steps");
ABSL_FLAG(int64_t, lora_batch, kDefaults.lora_batch, "LoRA batch");
ABSL_FLAG(double, lora_learning_rate, kDefaults.lora_learning_rate, "LoRA learning rate");
ABSL_FLAG(int64_t, lora_rank, kDefaults.lora_rank, "LoRA rank");
ABSL_FLAG(int64_t, classifier_steps, kDefaults.classifier_steps, "shape classifier steps");
ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "LibTorch intra-op threads");
ABSL_FLAG(int64_t, log_every, kDefaults.log_every, "progress line every N steps");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "train-flux-tiny --out=DIR: trains the synthetic-scene flux-tiny pipeline, its "
      "circles->stars "
      "LoRA (kohya) and the shape classifier of the quality test");
  absl::ParseCommandLine(argc, argv);
  ds::train::FluxTinyTrainOptions o;
  o.out_dir = absl::GetFlag(FLAGS_out);
  if (o.out_dir.empty()) {
    std::fprintf(stderr, "--out is required\n");
    return 2;
  }
  o.seed = absl::GetFlag(FLAGS_seed);
  o.scenes_per_combination = absl::GetFlag(FLAGS_scenes_per_combination);
  o.vae_steps = absl::GetFlag(FLAGS_vae_steps);
  o.vae_batch = absl::GetFlag(FLAGS_vae_batch);
  o.vae_learning_rate = absl::GetFlag(FLAGS_vae_learning_rate);
  o.denoiser_steps = absl::GetFlag(FLAGS_denoiser_steps);
  o.denoiser_batch = absl::GetFlag(FLAGS_denoiser_batch);
  o.denoiser_learning_rate = absl::GetFlag(FLAGS_denoiser_learning_rate);
  o.caption_dropout = absl::GetFlag(FLAGS_caption_dropout);
  o.partial_captions = absl::GetFlag(FLAGS_partial_captions);
  o.lora_steps = absl::GetFlag(FLAGS_lora_steps);
  o.lora_batch = absl::GetFlag(FLAGS_lora_batch);
  o.lora_learning_rate = absl::GetFlag(FLAGS_lora_learning_rate);
  o.lora_rank = absl::GetFlag(FLAGS_lora_rank);
  o.classifier_steps = absl::GetFlag(FLAGS_classifier_steps);
  o.log_every = absl::GetFlag(FLAGS_log_every);
  if (absl::GetFlag(FLAGS_threads) > 0) at::set_num_threads(absl::GetFlag(FLAGS_threads));
  o.log = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  };
  std::fprintf(stderr, "train-flux-tiny: %d threads, output %s\n", at::get_num_threads(),
               o.out_dir.c_str());
  auto report = ds::train::TrainFluxTiny(o);
  if (!report.ok()) {
    std::fprintf(stderr, "train-flux-tiny: %s\n", report.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", report->dump(2).c_str());
  return 0;
}
