// diffusion-cli's in-process pipeline commands (no server):
//
//   generate --pipeline DIR --inputs IN.safetensors -o OUT.(png|safetensors)
//            [--width W] [--height H] [--steps N] [--seed S] [--guidance G] [--num-images N]
//            [--true-cfg-scale S] [--lora FILE[:WEIGHT]]... [--dtype D] [--device D]
//       Loads the diffusers pipeline folder DIR (model_index.json) through the PipelineRegistry
//       and runs it. IN holds prompt_embeds, pooled_prompt_embeds, optionally
//       negative_prompt_embeds / negative_pooled_prompt_embeds (true CFG) and `noise` (the initial
//       latents, unpacked [B, C, h, w]; without it the noise is drawn from --seed); each name is
//       also accepted with an "inputs/" prefix. OUT.png gets the image (OUT_1.png, ... further
//       ones); OUT.safetensors gets `latents` (the final unpacked latents) and `image` (float
//       [B, 3, H, W] in [0, 1]) plus the run's parameters as metadata — the parity path against
//       any reference implementation.
//   write-demo [NAME] -o DIR
//       Writes the registered demo pipeline NAME (default "flux-tiny") under DIR (see
//       handlers/demo_pipeline.h) and prints where its diffusers folder and single files are.
//
// Errors are returned as Status (the caller prints them and exits 1).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tools/cli/remote.h"

namespace ds::cli {

// `o` carries the generate flags (inputs, output, width, height, steps, seed, guidance,
// num_images, true_cfg_scale, loras as FILE[:WEIGHT], dtype, device).
absl::Status RunOfflineGenerate(const std::string& pipeline_dir, const RemoteOptions& o);

absl::Status RunWriteDemo(const std::vector<std::string>& positional, const std::string& output);

}  // namespace ds::cli
