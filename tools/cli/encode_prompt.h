// diffusion-cli encode-prompt: a pipeline's text conditioning, written to a file.
//
//   encode-prompt --pipeline DIR [--prompt_2 TEXT] [--max_sequence_length N]
//                 -o OUT.safetensors [--dtype D] [--device D] TEXT...
//       Loads the diffusers pipeline folder DIR (model_index.json, through the PipelineRegistry),
//       encodes each TEXT with the pipeline's own text encoders exactly as its Generate does for
//       a text prompt (DiffusionPipeline::EncodePrompt; for Flux: diffusers'
//       FluxPipeline.encode_prompt, CLIP pooled output + T5 last hidden state, no attention
//       masks), and writes OUT with
//         prompt_embeds         [P, L, D]  float32, CPU (P = number of TEXTs, L = the sequence
//                                          length, max_sequence_length for Flux)
//         pooled_prompt_embeds  [P, Dp]    float32, CPU (left out for pipelines without one)
//       and string metadata: "format" ("pt"), "pipeline" (DIR), "class_name", "prompt" (JSON array
//       of the TEXTs), "prompt_2" (JSON array, only with --prompt_2), "max_sequence_length",
//       "encoder_dtype" (the encoders' dtype before the cast to float32) and
//       "truncated_prompts" (JSON array of {field, index, component, tokens, max_length}: the
//       prompts whose tokens did not fit and were cut, as diffusers does).
//       --prompt_2 is the second encoder's prompt (Flux: T5) for every TEXT (default: each TEXT
//       itself). --max_sequence_length 0 (the flag's default) means the pipeline's default
//       (PipelineRequest's, 512 as in FluxPipeline). Each truncation is also printed to stderr as
//       "warning: ...". OUT works as `generate --inputs OUT` (its tensor names are the ones
//       generate reads), giving the same result as `generate --prompt TEXT`.
//
// Thread-compatible; runs on the calling thread.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "handlers/pipeline.h"

namespace ds::cli {

struct EncodePromptOptions {
  std::string pipeline_dir;  // --pipeline; required
  std::string prompt_2;      // --prompt_2; "" = each TEXT itself
  // --max_sequence_length: the sequence encoder's token length; 0 = the pipeline default
  // (PipelineRequest{}.max_sequence_length). Must be in [0, limits().max_sequence_length_limit].
  int64_t max_sequence_length = 0;
  std::string output;  // -o; required, a .safetensors path whose folder exists
  // dtype and device the pipeline's components are loaded with (--dtype, --device).
  PipelineLoadOptions load;
};

// Runs `encode-prompt` on `texts` (the positional arguments after the command; "" is a valid,
// empty prompt). Writes a summary line to `out` and truncation warnings to `err`.
// Errors (nothing is written then):
//   INVALID_ARGUMENT: no --pipeline, no TEXT, no -o, -o not ending in .safetensors or naming a
//     folder, a negative --max_sequence_length or one above the pipeline's limit, or the
//     pipeline's own INVALID_ARGUMENT for a text (e.g. not UTF-8);
//   NOT_FOUND: -o's folder does not exist, or the pipeline folder (LoadPipelineFromFolder);
//   PERMISSION_DENIED: -o's folder is not writable;
//   FAILED_PRECONDITION: the pipeline has no text encoders (the message names the missing
//     components when the pipeline reports them);
//   INTERNAL: LibTorch failed, or writing OUT failed (the message names the file);
//   otherwise LoadPipelineFromFolder's errors.
absl::Status RunEncodePrompt(const std::vector<std::string>& texts,
                             const EncodePromptOptions& options, std::ostream& out,
                             std::ostream& err);

}  // namespace ds::cli
