#include "tools/cli/offline_generate.h"

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "handlers/demo_pipeline.h"
#include "handlers/pipeline.h"
#include "handlers/safetensors.h"
#include "handlers/status.h"

namespace ds::cli {
namespace {

absl::StatusOr<torch::Dtype> DtypeFromName(const std::string& name) {
  if (name.empty() || name == "float32") return torch::kFloat32;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype '", name, "': expected float32, bfloat16 or float16"));
}

// "FILE[:WEIGHT]": the suffix after the last ':' is a weight only when it parses as a number.
std::pair<std::string, double> SplitLora(const std::string& value) {
  const std::size_t colon = value.rfind(':');
  double weight = 1.0;
  if (colon != std::string::npos && colon + 1 < value.size() &&
      absl::SimpleAtod(value.substr(colon + 1), &weight)) {
    return {value.substr(0, colon), weight};
  }
  return {value, 1.0};
}

// OUT.png -> OUT.png, OUT_1.png, ... for image i.
std::string NumberedPath(const std::string& path, size_t i) {
  if (i == 0) return path;
  return absl::StrCat(path.substr(0, path.size() - 4), "_", i, path.substr(path.size() - 4));
}

absl::Status WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("-o ", path, ": writing failed"));
  return absl::OkStatus();
}

}  // namespace

absl::Status RunOfflineGenerate(const std::string& pipeline_dir, const RemoteOptions& o) {
  if (o.inputs.empty() && o.prompt.empty()) {
    return absl::InvalidArgumentError(
        "generate --pipeline needs --prompt TEXT (pipelines with text encoders) or --inputs "
        "IN.safetensors (prompt_embeds, pooled_prompt_embeds, optional negative_* and noise)");
  }
  if (o.output.empty()) {
    return absl::InvalidArgumentError("generate --pipeline needs -o OUT.png or OUT.safetensors");
  }
  const std::string lower = absl::AsciiStrToLower(o.output);
  const bool png = absl::EndsWith(lower, ".png");
  if (!png && !absl::EndsWith(lower, ".safetensors")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "-o '", o.output, "': the output must end in .png (images) or .safetensors (latents and "
        "image tensors)"));
  }
  if (!o.latent_shape.empty()) {
    return absl::InvalidArgumentError(
        "--latent-shape is for bare transformer instances; a pipeline takes --width/--height");
  }
  if (o.steps < 0 || o.num_images < 0 || o.width < 0 || o.height < 0) {
    return absl::InvalidArgumentError(
        "--steps, --num-images, --width and --height must be >= 0 (0 = the pipeline's default)");
  }

  PipelineLoadOptions load;
  ASSIGN_OR_RETURN(load.model.dtype, DtypeFromName(o.dtype));
  ASSIGN_OR_RETURN(load.model.device,
                   TorchCall(
                       "--device", [&] { return torch::Device(o.device.empty() ? "cpu" : o.device); },
                       absl::StatusCode::kInvalidArgument));
  const auto t0 = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(std::unique_ptr<DiffusionPipeline> pipeline,
                   LoadPipelineFromFolder(pipeline_dir, load));
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const PipelineLimits limits = pipeline->limits();
  std::cerr << absl::StrFormat("loaded %s %s in %.3f s\n", pipeline->class_name(), pipeline_dir,
                               load_seconds);

  PipelineRequest r;
  if (!o.prompt.empty()) {
    r.prompt = {o.prompt};
    if (!o.prompt_2.empty()) r.prompt_2 = {o.prompt_2};
    if (!o.negative_prompt.empty()) r.negative_prompt = {o.negative_prompt};
  }
  if (o.max_sequence_length != 0) r.max_sequence_length = o.max_sequence_length;
  std::shared_ptr<const SafetensorsFile> file;
  if (!o.inputs.empty()) {
    ASSIGN_OR_RETURN(file, SafetensorsFile::Open(o.inputs));
  }
  const std::vector<std::pair<std::string, torch::Tensor*>> fields = {
      {"prompt_embeds", &r.prompt_embeds},
      {"pooled_prompt_embeds", &r.pooled_prompt_embeds},
      {"negative_prompt_embeds", &r.negative_prompt_embeds},
      {"negative_pooled_prompt_embeds", &r.negative_pooled_prompt_embeds},
      {"noise", &r.latents}};
  std::vector<std::string> used;
  for (const auto& [name, field] : fields) {
    if (file == nullptr) break;
    const std::string key = file->contains(name) ? name : "inputs/" + name;
    if (!file->contains(key)) {
      if (name == "prompt_embeds" && r.prompt.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--inputs ", o.inputs,
                         ": no tensor 'prompt_embeds' (or 'inputs/prompt_embeds'), and no "
                         "--prompt"));
      }
      continue;
    }
    ASSIGN_OR_RETURN(*field, file->Get(key));
    used.push_back(key);
  }
  if (!used.empty()) {
    std::cerr << "inputs: " << absl::StrJoin(used, ", ") << " from " << o.inputs << "\n";
  }
  r.width = o.width;
  r.height = o.height;
  r.num_images_per_prompt = o.num_images == 0 ? 1 : o.num_images;
  r.num_inference_steps = o.steps == 0 ? limits.default_inference_steps : o.steps;
  r.guidance_scale = o.guidance == 0 ? limits.default_guidance_scale : o.guidance;
  r.true_cfg_scale = o.true_cfg_scale == 0 ? 1.0 : o.true_cfg_scale;
  if (!r.latents.defined()) r.seed = static_cast<uint64_t>(o.seed);
  r.decode = true;
  r.png = png;

  // Adapters: local LoRA files, applied unfused the way a server request applies them.
  std::vector<AdapterRequest> stack;
  for (const std::string& value : o.loras) {
    const auto [path, weight] = SplitLora(value);
    const std::string name = absl::StrCat("lora", stack.size());
    ASSIGN_OR_RETURN(AdapterLoadResult loaded,
                     pipeline->transformer_host().Load(name, path,
                                                       {.allow_partial = o.allow_partial}));
    std::cerr << loaded.report.ToString() << "  applied with weight " << weight << "\n";
    stack.push_back({name, weight});
  }
  ASSIGN_OR_RETURN(r.adapters, pipeline->transformer_host().Snapshot(stack));

  const auto start = std::chrono::steady_clock::now();
  auto on_step = [&](int64_t step, int64_t total) -> absl::Status {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cerr << absl::StrFormat("\rstep %d/%d  %.2f s", step, total, s) << std::flush;
    return absl::OkStatus();
  };
  ASSIGN_OR_RETURN(PipelineResult result, pipeline->Generate(r, on_step));
  std::cerr << "\n";

  std::vector<float> sigmas = result.sigmas;
  if (png) {
    for (size_t i = 0; i < result.png.size(); ++i) {
      RETURN_IF_ERROR(WriteBytes(NumberedPath(o.output, i), result.png[i]));
      std::cout << "wrote " << NumberedPath(o.output, i) << " (png)\n";
    }
  } else {
    const std::map<std::string, std::string> metadata = {
        {"pipeline", pipeline_dir},
        {"class_name", pipeline->class_name()},
        {"seed", result.seed.has_value() ? absl::StrCat(*result.seed) : "noise given"},
        {"steps", absl::StrCat(result.steps)},
        {"guidance", absl::StrFormat("%.17g", result.guidance_scale)},
        {"guidance_applied", result.guidance_applied ? "true" : "false"},
        {"true_cfg_applied", result.true_cfg_applied ? "true" : "false"},
        {"sigmas", absl::StrJoin(sigmas, ",")},
        {"dtype", o.dtype.empty() ? "float32" : o.dtype},
    };
    torch::Tensor latents, image;
    RETURN_IF_ERROR(TorchCallVoid("copying the result to the CPU", [&] {
      latents = result.latents.to(torch::kCPU).contiguous();
      image = result.image.to(torch::kCPU, torch::kFloat32).contiguous();
    }));
    RETURN_IF_ERROR(Annotate(WriteSafetensors(o.output, {{"latents", latents}, {"image", image}},
                                              metadata),
                             absl::StrCat("-o ", o.output)));
    std::cout << "wrote " << o.output << " (tensors 'latents' " << latents.sizes() << ", 'image' "
              << image.sizes() << ")\n";
  }
  for (const std::string& warning : result.warnings) std::cerr << "warning: " << warning << "\n";
  std::cout << absl::StrFormat(
      "seed %s, steps %d, guidance %g%s%s; denoise %.3f s, decode %.3f s\n",
      result.seed.has_value() ? absl::StrCat(*result.seed) : "(noise given)", result.steps,
      result.guidance_scale, result.guidance_applied ? "" : " (not applied: no guidance embedding)",
      result.true_cfg_applied ? ", true CFG" : "", result.denoise_seconds, result.decode_seconds);
  return absl::OkStatus();
}

absl::Status RunWriteDemo(const std::vector<std::string>& positional, const std::string& output) {
  if (positional.size() > 1) {
    return absl::InvalidArgumentError("write-demo takes at most one demo name");
  }
  if (output.empty()) return absl::InvalidArgumentError("write-demo needs -o DIR");
  const std::string name = positional.empty() ? "flux-tiny" : positional[0];
  ASSIGN_OR_RETURN(const DemoPipelineRecipe* recipe, PipelineRegistry::Global().FindDemo(name));
  ASSIGN_OR_RETURN(DemoPipelineFiles files, WriteDemoPipeline(*recipe, output));
  std::cout << recipe->name << ": " << recipe->description << "\n"
            << (files.written ? "wrote " : "verified existing ") << files.dir
            << absl::StrFormat(" in %.3f s\n", files.seconds) << "  diffusers folder: "
            << files.pipeline_dir << "\n";
  for (const auto& [component, path] : files.single_files) {
    std::cout << "  single file (" << component << "): " << path << "\n";
  }
  if (!files.example_inputs.empty()) {
    std::cout << "  example request tensors: " << files.example_inputs << "\n";
  }
  return absl::OkStatus();
}

}  // namespace ds::cli
