#include "tools/cli/encode_prompt.h"

#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "handlers/safetensors.h"
#include "handlers/status.h"

namespace ds::cli {
namespace {

namespace fs = std::filesystem;

// Checks `output` before any work is done: a .safetensors path (not a folder) in an existing,
// writable folder.
absl::Status CheckOutputPath(const std::string& output) {
  if (output.empty()) {
    return absl::InvalidArgumentError("encode-prompt needs -o OUT.safetensors");
  }
  if (!absl::EndsWith(absl::AsciiStrToLower(output), ".safetensors")) {
    return absl::InvalidArgumentError(
        absl::StrCat("-o '", output, "': the output must end in .safetensors"));
  }
  std::error_code ec;
  if (fs::is_directory(output, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("-o ", output, ": is a folder; name the .safetensors file to write"));
  }
  fs::path folder = fs::path(output).parent_path();
  if (folder.empty()) folder = ".";
  if (!fs::is_directory(folder, ec)) {
    return absl::NotFoundError(
        absl::StrCat("-o ", output, ": folder ", folder.string(), " does not exist"));
  }
  if (access(folder.c_str(), W_OK | X_OK) != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("-o ", output, ": folder ", folder.string(), " is not writable"));
  }
  return absl::OkStatus();
}

// The dtype as the --dtype flag spells it (LibTorch's own names for others).
std::string DtypeName(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    case torch::kFloat64:
      return "float64";
    default:
      return std::string(c10::toString(t.scalar_type()));
  }
}

// Compact JSON; bytes that are not UTF-8 become U+FFFD instead of throwing (the encoders have
// already accepted the texts, so this is only a guard).
std::string JsonText(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

absl::Status RunEncodePrompt(const std::vector<std::string>& texts,
                             const EncodePromptOptions& options, std::ostream& out,
                             std::ostream& err) {
  if (options.pipeline_dir.empty()) {
    return absl::InvalidArgumentError(
        "encode-prompt needs --pipeline DIR (a diffusers pipeline folder with text encoders)");
  }
  if (texts.empty()) {
    return absl::InvalidArgumentError("encode-prompt takes at least one TEXT (the prompts)");
  }
  if (options.max_sequence_length < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_sequence_length must be >= 0 (0 = the pipeline's default), got ",
                     options.max_sequence_length));
  }
  RETURN_IF_ERROR(CheckOutputPath(options.output));

  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<DiffusionPipeline> pipeline,
                   LoadPipelineFromFolder(options.pipeline_dir, options.load));
  const PipelineLimits limits = pipeline->limits();
  // Pipelines without text encoders answer FAILED_PRECONDITION from EncodePrompt (naming what is
  // missing), so the length is only checked against a pipeline that can encode.
  const int64_t length = options.max_sequence_length > 0 ? options.max_sequence_length
                                                         : PipelineRequest{}.max_sequence_length;
  if (limits.accepts_text_prompt && limits.max_sequence_length_limit > 0 &&
      length > limits.max_sequence_length_limit) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_sequence_length ", length, " exceeds the limit of ", pipeline->class_name(), " (",
        options.pipeline_dir, "): at most ", limits.max_sequence_length_limit, " tokens"));
  }

  std::vector<std::string> prompt_2;
  if (!options.prompt_2.empty()) prompt_2.assign(texts.size(), options.prompt_2);
  PipelineResult report;
  auto encoded = pipeline->EncodePrompt(texts, prompt_2, length, "prompt", &report);
  if (!encoded.ok()) {
    return Annotate(encoded.status(),
                    absl::StrCat("encode-prompt --pipeline ", options.pipeline_dir));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const std::string& warning : report.warnings) err << "warning: " << warning << "\n";

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::string encoder_dtype;
  RETURN_IF_ERROR(TorchCallVoid("copying the embeddings to the CPU as float32", [&] {
    encoder_dtype = DtypeName(encoded->prompt_embeds);
    tensors.emplace_back("prompt_embeds",
                         encoded->prompt_embeds.to(torch::kCPU, torch::kFloat32).contiguous());
    if (encoded->pooled_prompt_embeds.defined()) {
      tensors.emplace_back(
          "pooled_prompt_embeds",
          encoded->pooled_prompt_embeds.to(torch::kCPU, torch::kFloat32).contiguous());
    }
  }));

  nlohmann::json truncated = nlohmann::json::array();
  for (const PipelineResult::PromptTruncation& t : report.truncated_prompts) {
    truncated.push_back({{"field", t.field},
                         {"index", t.index},
                         {"component", t.component},
                         {"tokens", t.tokens},
                         {"max_length", t.max_length}});
  }
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"pipeline", options.pipeline_dir},
      {"class_name", pipeline->class_name()},
      {"prompt", JsonText(nlohmann::json(texts))},
      {"max_sequence_length", absl::StrCat(length)},
      {"encoder_dtype", encoder_dtype},
      {"truncated_prompts", JsonText(truncated)},
  };
  if (!prompt_2.empty()) metadata["prompt_2"] = JsonText(nlohmann::json(prompt_2));
  RETURN_IF_ERROR(Annotate(WriteSafetensors(options.output, tensors, metadata),
                           absl::StrCat("-o ", options.output)));

  out << "wrote " << options.output << ":";
  for (const auto& [name, tensor] : tensors) out << " " << name << " " << tensor.sizes();
  out << absl::StrFormat(" (%s %s, encoders in %s; %d prompt(s), %d truncated; %.3f s)\n",
                         pipeline->class_name(), options.pipeline_dir, encoder_dtype, texts.size(),
                         report.truncated_prompts.size(), seconds);
  out.flush();
  return absl::OkStatus();
}

}  // namespace ds::cli
