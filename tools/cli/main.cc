// diffusion-cli: offline tools over the model registry, and a client of a running
// diffusion-server (the remote commands; see tools/cli/remote.h).
//
//   diffusion-cli describe CLASS [--verbose]     print a model's feature-attribute table
//   diffusion-cli describe --list                list the registered models
//   diffusion-cli forward --model DIR --inputs IN.safetensors --output OUT.safetensors
//                         [--repeat N] [--dtype float32|bfloat16|float16] [--device cpu|cuda:0]
//                         [--lora FILE[:WEIGHT]]...
//                                                one forward pass of a diffusers-format model
//                                                folder, with LoRA adapters applied unfused
//   diffusion-cli inspect FILE [--config JSON] [--json]
//                                                detect a single-file checkpoint's model, variant
//                                                and config from its header (no weights are read)
//   diffusion-cli convert FILE OUT_DIR [--config JSON]
//                                                write a single file as a diffusers-format folder
//   diffusion-cli lora inspect FILE --model DIR [--allow-partial] [--json]
//                                                detect a LoRA's format, convert it and check it
//                                                against the model's parameter shapes
//   diffusion-cli lora convert FILE --model DIR -o OUT.safetensors [--allow-partial]
//                                                write it in diffusers/PEFT naming
//   diffusion-cli generate --pipeline DIR --inputs IN.safetensors -o OUT.png|OUT.safetensors
//                         [--width W] [--height H] [--steps N] [--seed S] [--guidance G]
//                         [--num-images N] [--true-cfg-scale S] [--lora FILE[:WEIGHT]]...
//                                                run a diffusers pipeline folder in-process (no
//                                                server); OUT.safetensors gets `latents` and
//                                                `image` (see tools/cli/offline_generate.h)
//   diffusion-cli write-demo [NAME] -o DIR       write the demo pipeline NAME (default flux-tiny,
//                                                the server's embedded one) as real files
//   diffusion-cli tokenize --tokenizer DIR [--max_sequence_length N] TEXT...
//                                                token ids per TEXT, one line each (see
//                                                tools/cli/text_commands.h)
//   diffusion-cli encode-prompt --pipeline DIR [--prompt_2 TEXT] [--max_sequence_length N]
//                         -o OUT.safetensors [--dtype D] [--device D] TEXT...
//                                                the pipeline's prompt_embeds and
//                                                pooled_prompt_embeds for each TEXT (usable as
//                                                generate --inputs; tools/cli/encode_prompt.h)
//
// Remote commands (gRPC; every one takes --target=host:port (default localhost:50051),
// --token_file=FILE (admin bearer token, sent on management calls), --tls_ca=PEM (TLS) and
// --timeout=SECONDS):
//   diffusion-cli models                         the server's model instances
//   diffusion-cli metadata NAME [--verbose]      feature table (+ live state of an instance)
//   diffusion-cli load-single-file --name N --path P [--dtype D] [--device D] [--replace]
//                         [--config JSON]        load a checkpoint under the server's model root
//   diffusion-cli unload-model --name N
//   diffusion-cli load-lora [--model M] --name N (--path P | --file LOCAL) [--format-hint F]
//                         [--allow-partial] [--replace] [--pin]
//   diffusion-cli unload-lora [--model M] --name N
//   diffusion-cli loras [--model M]              adapters, memory used / budget
//   diffusion-cli load-ip-adapter [--model M] --name N --path P [--image_encoder_path E]
//                         [--replace]            an IP-Adapter under the server's adapter root,
//                                                its image encoder under its model root
//   diffusion-cli unload-ip-adapter [--model M] --name N
//   diffusion-cli health [--service NAME]        exit 0 only if SERVING
//   diffusion-cli generate [--model M] --inputs IN.safetensors -o OUT.safetensors|OUT.png
//                         [--latent-shape B,T,C] [--steps N] [--seed S] [--guidance G]
//                         [--lora NAME[:WEIGHT]]...
//                         [--ip_adapter NAME=IMAGE.png[:SCALE]]...
//                         [--ip_adapter_embeds NAME=FILE.safetensors[:SCALE]]...
//                                                progress bar on stderr; --lora names a loaded
//                                                adapter here (forward's --lora is FILE[:W])
//                         on a pipeline instance: [--width W] [--height H] [--num-images N]
//                         [--true-cfg-scale S] instead of --latent-shape; IN holds prompt_embeds,
//                         pooled_prompt_embeds (optional negative_*, noise; "inputs/" prefix ok)
//                         and OUT.png gets the image (OUT_1.png, ... further images);
//                         --ip_adapter sends a local PNG as an image prompt of the loaded
//                         IP-Adapter NAME (--ip_adapter_embeds: FILE's tensor image_embeds);
//                         SCALE is a number or a comma list, one per layer (default 1)
//   exit codes: 0 ok; 1 bad invocation or local failure; 2 unknown command; 3 the server (or the
//   transport) answered with an error, printed as "error: <CODE_NAME>: <message>"; 4 health: not
//   SERVING
//
//   every command: --threads N (LibTorch intra-op threads; default: all cores)
//   flag names may be spelled with '-' or '_' (--allow-partial = --allow_partial); -o is --output
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "handlers/lora_format.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/threads.h"
#include "tools/cli/encode_prompt.h"
#include "tools/cli/offline_generate.h"
#include "tools/cli/remote.h"
#include "tools/cli/text_commands.h"

ABSL_FLAG(bool, verbose, false, "describe, metadata: add each row's description and docs link");
ABSL_FLAG(bool, list, false, "describe: list the registered models");
ABSL_FLAG(std::string, model, "",
          "forward, lora: diffusers-format model folder (config.json + weights); remote commands "
          "(load-lora, unload-lora, loras, generate): the server's model instance name (empty = "
          "its default instance)");
ABSL_FLAG(std::string, inputs, "",
          "forward, generate: safetensors file with the named forward inputs (generate: also "
          "'latents', the initial noise, optionally)");
ABSL_FLAG(std::string, output, "",
          "forward: safetensors file to write (tensor 'output'); lora convert: the converted "
          "LoRA; generate: OUT.safetensors (tensor 'latents') or OUT.png; encode-prompt: "
          "OUT.safetensors (prompt_embeds, pooled_prompt_embeds) (also -o)");
ABSL_FLAG(int, repeat, 0, "forward: run N more timed forwards and print the median seconds");
ABSL_FLAG(std::string, dtype, "float32",
          "forward, load-single-file, encode-prompt: weight/compute dtype: float32, bfloat16, "
          "float16");
ABSL_FLAG(std::string, device, "cpu",
          "forward, load-single-file, encode-prompt: device: cpu or cuda[:N]");
ABSL_FLAG(std::string, config, "",
          "inspect/convert/forward of a single file, load-single-file: config fields overriding "
          "the derived ones, as inline JSON ('{\"axes_dims_rope\": [16, 56, 56]}') or a (local) "
          "JSON file path");
ABSL_FLAG(bool, json, false, "inspect, lora inspect: print the report as JSON");
ABSL_FLAG(bool, allow_partial, false,
          "lora, load-lora: drop LoRA keys and targets the model lacks (listed in the report as "
          "unmatched) instead of failing");
ABSL_FLAG(bool, validate, false, "forward of a single file: reject NaN/Inf weights");
ABSL_FLAG(std::string, lora, "",
          "forward: FILE[:WEIGHT], a LoRA applied unfused for the pass (weight default 1); "
          "generate: NAME[:WEIGHT], an adapter loaded on the server; repeat the flag to stack "
          "adapters");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0 = number of cores)");
ABSL_FLAG(std::string, ip_adapter, "",
          "generate (remote, pipeline instance): NAME=IMAGE.png[:SCALE], an image prompt: the "
          "local PNG is sent for the loaded IP-Adapter NAME; SCALE is one number or a comma list "
          "with one per conditioned layer (default 1); repeatable");
ABSL_FLAG(std::string, ip_adapter_embeds, "",
          "generate (remote, pipeline instance): NAME=FILE.safetensors[:SCALE], precomputed image "
          "embeddings (FILE's tensor 'image_embeds') for the loaded IP-Adapter NAME; repeatable");
ABSL_FLAG(std::string, image_encoder_path, "",
          "load-ip-adapter: the image encoder (a CLIPVisionModelWithProjection folder) under the "
          "server's model root (empty = the pipeline's image_encoder component)");

// Remote commands (tools/cli/remote.h).
ABSL_FLAG(std::string, pipeline, "",
          "generate: run this diffusers pipeline folder in-process instead of asking a server; "
          "encode-prompt: the pipeline folder whose text encoders encode the prompts");
ABSL_FLAG(std::string, target, "localhost:50051", "remote commands: the server, host:port");
ABSL_FLAG(std::string, token_file, "",
          "remote management commands: file holding the admin bearer token");
ABSL_FLAG(std::string, tls_ca, "",
          "remote commands: PEM root certificates; connect with TLS (plaintext without)");
ABSL_FLAG(double, timeout, 0, "remote commands: deadline of each call in seconds (0 = none)");
ABSL_FLAG(std::string, name, "",
          "load-single-file, unload-model: instance name; load-lora, unload-lora, "
          "load-ip-adapter, unload-ip-adapter: adapter name");
ABSL_FLAG(std::string, path, "",
          "load-single-file, load-lora, load-ip-adapter: server-side path, under the server's "
          "model/adapter root");
ABSL_FLAG(std::string, file, "", "load-lora: local LoRA file whose bytes are sent inline");
ABSL_FLAG(bool, replace, false,
          "load-single-file, load-lora, load-ip-adapter: replace one of the same name");
ABSL_FLAG(bool, pin, false, "load-lora: never evict the adapter under memory pressure");
ABSL_FLAG(std::string, format_hint, "",
          "load-lora: expected LoRA format (kohya, xlabs, ...); a mismatch is an error");
ABSL_FLAG(std::string, weight, "",
          "load-lora: the adapter's default weight, applied when a Generate names it without one "
          "(default 1; generate --lora NAME:W still chooses per request)");
ABSL_FLAG(std::string, service, "", "health: service name (a model instance; empty = the server)");
ABSL_FLAG(int64_t, steps, 0, "generate: denoising steps (0 = the server's default)");
ABSL_FLAG(int64_t, seed, 0, "generate: seed of the initial noise");
ABSL_FLAG(double, guidance, 0,
          "generate: guidance (0 = the inputs' 'guidance' tensor, else the server's default)");
ABSL_FLAG(std::string, latent_shape, "",
          "generate: packed latent shape B,T,C; default: B from encoder_hidden_states, T = rows "
          "of img_ids, C = the model config's in_channels");
ABSL_FLAG(int64_t, width, 0,
          "generate on a pipeline instance: image width in pixels (0 = the pipeline's default)");
ABSL_FLAG(int64_t, height, 0,
          "generate on a pipeline instance: image height in pixels (0 = the pipeline's default)");
ABSL_FLAG(int64_t, num_images, 0, "generate on a pipeline instance: images per prompt (0 = 1)");
ABSL_FLAG(double, true_cfg_scale, 0,
          "generate on a pipeline instance: true classifier-free guidance scale (needs "
          "negative_prompt_embeds in --inputs; 0 = off)");

// Text commands (tools/cli/text_commands.h).
ABSL_FLAG(std::string, tokenizer, "",
          "tokenize: the tokenizer folder (a pipeline's tokenizer/ or tokenizer_2/)");
ABSL_FLAG(int64_t, max_sequence_length, 0,
          "T5 prompt length in tokens (0 = the default, 512 as in FluxPipeline)");
ABSL_FLAG(std::string, prompt, "",
          "generate: the text prompt (pipelines with text encoders; --inputs then optional)");
ABSL_FLAG(std::string, prompt_2, "",
          "generate: the T5 prompt (default: the same as --prompt); encode-prompt: the T5 prompt "
          "for every TEXT (default: each TEXT)");
ABSL_FLAG(std::string, negative_prompt, "",
          "generate: negative prompt for true CFG (with --true-cfg-scale > 1)");
ABSL_FLAG(std::string, storage_dtype, "",
          "load-single-file: layerwise casting, weights stored as bfloat16, float16, float8_e4m3fn "
          "or float8_e5m2 and upcast per layer to --dtype (\"\" = none)");
ABSL_FLAG(std::vector<std::string>, skip_patterns, {},
          "load-single-file with --storage_dtype: comma-separated regular expressions replacing "
          "the model's layerwise-casting skip patterns");
ABSL_FLAG(int64_t, group_offload_blocks, 0,
          "load-single-file: group offloading, N consecutive blocks per group (0 = none)");
ABSL_FLAG(bool, group_offload_prefetch, false,
          "load-single-file with --group_offload_blocks: read the next group ahead");
ABSL_FLAG(std::string, group_offload_to, "",
          "load-single-file with --group_offload_blocks: disk (default) or cpu (CUDA models)");
ABSL_FLAG(std::string, device_map, "",
          "load-single-file: \"sequential\" (with --max_memory) or an explicit JSON object "
          "{\"module\": \"device\"}; whole blocks per device");
ABSL_FLAG(std::string, max_memory, "",
          "load-single-file with --device_map sequential: DEVICE=BYTES[,DEVICE=BYTES...] "
          "(K/M/G suffixes), e.g. cuda:0=20G,cpu=64G");
ABSL_FLAG(std::string, cache, "",
          "generate: step cache, first_block_cache or taylorseer_cache (\"\" = none)");
ABSL_FLAG(double, cache_threshold, -1,
          "generate --cache first_block_cache: threshold (-1 = the server's default, 0.05)");
ABSL_FLAG(int64_t, cache_interval, -1,
          "generate --cache taylorseer_cache: steps between full computations (-1 = default 5)");
ABSL_FLAG(int64_t, disable_cache_before_step, -1,
          "generate --cache taylorseer_cache: warm-up steps always computed (-1 = default 3)");
ABSL_FLAG(int64_t, disable_cache_after_step, -1,
          "generate --cache taylorseer_cache: steps from this one on always computed (-1 = none)");
ABSL_FLAG(int64_t, max_order, -1,
          "generate --cache taylorseer_cache: Taylor order (-1 = default 1)");
ABSL_FLAG(std::string, taylor_factors_dtype, "",
          "generate --cache taylorseer_cache: bfloat16 (default), float16 or float32");
ABSL_FLAG(bool, cache_lite, false,
          "generate --cache taylorseer_cache: lite mode (predict the model output)");

namespace ds {
namespace {

constexpr char kUsage[] =
    "usage:\n"
    "  diffusion-cli describe CLASS [--verbose]\n"
    "  diffusion-cli describe --list\n"
    "  diffusion-cli forward --model DIR --inputs IN.safetensors --output OUT.safetensors "
    "[--repeat N] [--dtype D] [--device D] [--lora FILE[:WEIGHT]]...\n"
    "      (--model may also be a single .safetensors checkpoint; see inspect; each --lora\n"
    "      applies an adapter unfused, as a request would)\n"
    "  diffusion-cli inspect FILE [--config JSON] [--json]\n"
    "  diffusion-cli convert FILE OUT_DIR [--config JSON]\n"
    "  diffusion-cli lora inspect FILE --model DIR [--allow-partial] [--json]\n"
    "  diffusion-cli lora convert FILE --model DIR -o OUT.safetensors [--allow-partial]\n"
    "  diffusion-cli generate --pipeline DIR --inputs IN.safetensors -o OUT.png|OUT.safetensors "
    "[--width W] [--height H] [--steps N] [--seed S] [--guidance G] [--num-images N] "
    "[--true-cfg-scale S] [--lora FILE[:WEIGHT]]... [--dtype D] [--device D]\n"
    "      [--prompt TEXT [--prompt_2 TEXT] [--negative_prompt TEXT] [--max_sequence_length N]]\n"
    "      (in-process, no server; IN holds prompt_embeds, pooled_prompt_embeds (unless --prompt),\n"
    "      optional negative_* and noise; OUT.safetensors gets tensors latents and image)\n"
    "  diffusion-cli write-demo [NAME] -o DIR   (the embedded demo pipeline, default flux-tiny)\n"
    "  diffusion-cli tokenize --tokenizer DIR [--max_sequence_length N] TEXT...\n"
    "      (one line of token ids per TEXT, padded/truncated as FluxPipeline: CLIP 77, T5 N)\n"
    "  diffusion-cli encode-prompt --pipeline DIR [--prompt_2 TEXT] [--max_sequence_length N] "
    "-o OUT.safetensors [--dtype D] [--device D] TEXT...\n"
    "      (the pipeline's text encodings, float32: prompt_embeds [P, L, D] and\n"
    "      pooled_prompt_embeds [P, Dp], one row per TEXT, prompts and truncations as metadata;\n"
    "      OUT works as generate --inputs OUT; truncated prompts are warned about on stderr)\n"
    "remote (a running diffusion-server; each takes [--target=host:port] [--token_file=FILE]\n"
    "[--tls_ca=PEM] [--timeout=SECONDS]):\n"
    "  diffusion-cli models\n"
    "  diffusion-cli metadata NAME [--verbose]\n"
    "  diffusion-cli load-single-file --name N --path P [--dtype D] [--device D] [--replace] "
    "[--config JSON]\n"
    "      [--storage_dtype bfloat16|float16|float8_e4m3fn|float8_e5m2 [--skip_patterns RE,...]]\n"
    "      [--group_offload_blocks N [--group_offload_prefetch] [--group_offload_to disk|cpu]]\n"
    "      [--device_map sequential --max_memory DEV=BYTES,... | --device_map JSON]\n"
    "  diffusion-cli unload-model --name N\n"
    "  diffusion-cli load-lora [--model M] --name N (--path P | --file LOCAL) [--format-hint F] "
    "[--allow-partial] [--replace] [--pin] [--weight W]\n"
    "  diffusion-cli unload-lora [--model M] --name N\n"
    "  diffusion-cli loras [--model M]\n"
    "  diffusion-cli load-ip-adapter [--model M] --name N --path P [--image_encoder_path E] "
    "[--replace]\n"
    "      (P under the server's adapter root; E, a CLIPVisionModelWithProjection folder, under\n"
    "      its model root; default: the pipeline's image_encoder component)\n"
    "  diffusion-cli unload-ip-adapter [--model M] --name N\n"
    "  diffusion-cli health [--service NAME]\n"
    "  diffusion-cli generate [--model M] --inputs IN.safetensors -o OUT.safetensors|OUT.png "
    "[--latent-shape B,T,C] [--steps N] [--seed S] [--guidance G] [--lora NAME[:WEIGHT]]...\n"
    "      (--lora names an adapter loaded on the server; without --latent-shape: B from\n"
    "      encoder_hidden_states, T = rows of img_ids, C = the model's in_channels)\n"
    "      on a pipeline instance: [--width W] [--height H] [--num-images N] [--true-cfg-scale S];\n"
    "      --prompt TEXT [--prompt_2 TEXT] [--negative_prompt TEXT] [--max_sequence_length N]\n"
    "      (text encoders), or IN holding prompt_embeds and pooled_prompt_embeds; OUT.png gets\n"
    "      the image; image prompts: [--ip_adapter NAME=IMAGE.png[:SCALE]]... (a local PNG for\n"
    "      the loaded IP-Adapter NAME) [--ip_adapter_embeds NAME=FILE.safetensors[:SCALE]]...\n"
    "      (FILE's tensor image_embeds); SCALE: a number or a comma list, one per layer (1)\n"    "      step cache: [--cache first_block_cache [--cache_threshold X]] or [--cache\n"
    "      taylorseer_cache [--cache_interval N] [--disable_cache_before_step N]\n"
    "      [--disable_cache_after_step N] [--max_order N] [--taylor_factors_dtype D] [--cache_lite]]\n"
    "  exit codes: 0 ok, 1 bad invocation or local failure, 2 unknown command, 3 error from the\n"
    "  server (printed as 'error: CODE_NAME: message'), 4 health not SERVING\n"
    "  (all commands accept --threads N; flag names take '-' or '_')";

absl::Status Describe(const std::vector<char*>& args) {
  const auto& registry = ModelRegistry::Global();
  if (absl::GetFlag(FLAGS_list)) {
    for (const ModelSpec* spec : registry.List()) {
      std::cout << spec->class_name << "  (" << spec->name;
      for (const auto& a : spec->aliases) std::cout << ", " << a;
      std::cout << ")  " << spec->description << "\n";
    }
    return absl::OkStatus();
  }
  if (args.size() != 3) return absl::InvalidArgumentError("describe takes one model class name");
  ASSIGN_OR_RETURN(const ModelSpec* spec, registry.Find(args[2]));
  std::cout << BuildModelMetadata(*spec).Render(absl::GetFlag(FLAGS_verbose));
  return absl::OkStatus();
}

absl::StatusOr<torch::Dtype> ParseDtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bfloat16" || name == "bf16") return torch::kBFloat16;
  if (name == "float16" || name == "fp16") return torch::kFloat16;
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype: '", name, "' is not one of float32, bfloat16, float16"));
}

absl::StatusOr<SingleFileOptions> SingleFileOptionsFromFlags() {
  SingleFileOptions options;
  const std::string config = absl::GetFlag(FLAGS_config);
  if (!config.empty()) {
    if (config.front() == '{') {
      options.config_override = nlohmann::json::parse(config, nullptr, /*allow_exceptions=*/false);
      if (options.config_override.is_discarded() || !options.config_override.is_object()) {
        return absl::InvalidArgumentError("--config: not a JSON object");
      }
    } else {
      ASSIGN_OR_RETURN(options.config_override, ReadJsonFile(config));
    }
  }
  options.validate_finite = absl::GetFlag(FLAGS_validate);
  return options;
}

absl::Status Inspect(const std::vector<char*>& args) {
  if (args.size() != 3) return absl::InvalidArgumentError("inspect takes one file");
  ASSIGN_OR_RETURN(SingleFileOptions options, SingleFileOptionsFromFlags());
  ASSIGN_OR_RETURN(SingleFileInspection in, InspectSingleFile(args[2], options));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << in.report.ToJson().dump(2) << "\n";
  } else {
    std::cout << in.report.ToString();
  }
  return absl::OkStatus();
}

absl::Status Convert(const std::vector<char*>& args) {
  if (args.size() != 4)
    return absl::InvalidArgumentError("convert takes a file and an output folder");
  ASSIGN_OR_RETURN(SingleFileOptions options, SingleFileOptionsFromFlags());
  ASSIGN_OR_RETURN(SingleFileReport report, ConvertSingleFile(args[2], args[3], options));
  std::cout << report.ToString() << "wrote " << args[3] << "\n";
  return absl::OkStatus();
}

// Every --lora value, in order (the flag is repeatable; see ExtractLoraFlags).
std::vector<std::string>& LoraFlags() {
  static std::vector<std::string> values;
  return values;
}

// Every --ip_adapter / --ip_adapter_embeds value, in order (see ExtractRepeatableFlags).
std::vector<cli::IPAdapterFlag>& IPAdapterFlags() {
  static std::vector<cli::IPAdapterFlag> values;
  return values;
}

// "FILE[:WEIGHT]" -> (file, weight). The suffix after the last ':' is a weight only if it parses
// as a number, so paths with colons still work.
std::pair<std::string, double> ParseLoraFlag(const std::string& value) {
  const std::size_t colon = value.rfind(':');
  double weight = 1.0;
  if (colon != std::string::npos && colon + 1 < value.size() &&
      absl::SimpleAtod(value.substr(colon + 1), &weight)) {
    return {value.substr(0, colon), weight};
  }
  return {value, 1.0};
}

absl::Status Forward() {
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  const std::string inputs_path = absl::GetFlag(FLAGS_inputs);
  const std::string output_path = absl::GetFlag(FLAGS_output);
  if (model_dir.empty()) return absl::InvalidArgumentError("forward needs --model");
  if (inputs_path.empty()) return absl::InvalidArgumentError("forward needs --inputs");
  if (output_path.empty()) return absl::InvalidArgumentError("forward needs --output");
  if (absl::GetFlag(FLAGS_repeat) < 0) return absl::InvalidArgumentError("--repeat must be >= 0");

  ModelOptions options;
  ASSIGN_OR_RETURN(options.dtype, ParseDtype(absl::GetFlag(FLAGS_dtype)));
  ASSIGN_OR_RETURN(options.device,
                   TorchCall(
                       "--device", [] { return torch::Device(absl::GetFlag(FLAGS_device)); },
                       absl::StatusCode::kInvalidArgument));
  std::unique_ptr<DiffusionModel> model;
  if (std::filesystem::is_regular_file(model_dir)) {
    ASSIGN_OR_RETURN(SingleFileOptions single, SingleFileOptionsFromFlags());
    single.model = options;
    ASSIGN_OR_RETURN(LoadedSingleFile loaded, LoadSingleFile(model_dir, single));
    std::cerr << loaded.report.ToString();
    model = std::move(loaded.model);
  } else {
    ASSIGN_OR_RETURN(model, LoadModelFromFolder(model_dir, options));
  }

  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(inputs_path));
  TensorMap inputs;
  std::vector<std::string> wanted = model->required_inputs();
  for (const auto& n : model->optional_inputs()) wanted.push_back(n);
  for (const auto& name : wanted) {
    if (!file->contains(name)) continue;  // the model reports missing required inputs by name
    ASSIGN_OR_RETURN(inputs[name], file->Get(name));
  }

  // Adapters, applied unfused the way a request applies them.
  ASSIGN_OR_RETURN(const ModelSpec* spec, ModelRegistry::Global().Find(model->class_name()));
  LoraHost host(std::shared_ptr<DiffusionModel>(std::move(model)), spec->lora);
  std::vector<AdapterRequest> stack;
  for (const std::string& value : LoraFlags()) {
    const auto [file, weight] = ParseLoraFlag(value);
    const std::string name = absl::StrCat("lora", stack.size());
    ASSIGN_OR_RETURN(AdapterLoadResult loaded,
                     host.Load(name, file, {.allow_partial = absl::GetFlag(FLAGS_allow_partial)}));
    std::cerr << loaded.report.ToString() << "  applied with weight " << weight << "\n";
    stack.push_back({name, weight});
  }
  ASSIGN_OR_RETURN(AdapterStackPtr adapters, host.Snapshot(stack));
  const DiffusionModel* m = &host.model();
  auto run = [&] { return host.Forward(inputs, adapters.get()); };

  ASSIGN_OR_RETURN(torch::Tensor output, run());
  RETURN_IF_ERROR(WriteSafetensors(output_path, {{"output", output}},
                                   {{"model", model_dir},
                                    {"class_name", m->class_name()},
                                    {"dtype", absl::GetFlag(FLAGS_dtype)}}));

  const int repeat = absl::GetFlag(FLAGS_repeat);
  if (repeat > 0) {
    std::vector<double> seconds;
    for (int i = 0; i < repeat; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      ASSIGN_OR_RETURN(torch::Tensor out, run());
      if (out.is_cuda()) RETURN_IF_ERROR(TorchCallVoid("sync", [&] { out.cpu(); }));
      seconds.push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(seconds.begin(), seconds.end());
    std::printf("median seconds per forward: %.6f (%d runs, %d threads)\n",
                seconds[seconds.size() / 2], repeat, at::get_num_threads());
  }
  return absl::OkStatus();
}

// The model a LoRA is checked against: its spec (whose wired LoRA handler converts the file) and
// its parameter shapes. Only config.json matters: the model is built from it with uninitialized
// parameters (their memory is never touched) and no weight data is read.
struct LoraTarget {
  const ModelSpec* spec = nullptr;
  KeyShapes params;
};

absl::StatusOr<LoraTarget> LoraTargetFromFlags(const std::string& command) {
  const std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        command, " needs --model DIR (the diffusers-format model folder the LoRA is for)"));
  }
  ASSIGN_OR_RETURN(ModelFolder folder, OpenModelFolder(dir));
  const std::string config_path = absl::StrCat(folder.dir, "/config.json");
  auto name = folder.config.find("_class_name");
  if (name == folder.config.end() || !name->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": no \"_class_name\" string naming the model class"));
  }
  LoraTarget target;
  ASSIGN_OR_RETURN(target.spec, ModelRegistry::Global().Find(name->get<std::string>()));
  if (target.spec->lora == nullptr) {
    return absl::UnimplementedError(absl::StrCat(target.spec->class_name, " (", config_path,
                                                 ") has no LoRA handler wired in its spec"));
  }
  ModelOptions options;
  options.uninitialized_parameters = true;
  options.dtype = torch::kBFloat16;  // shapes do not depend on it; halves the reserved memory
  auto model = target.spec->factory(folder.config, options);
  if (!model.ok()) return Annotate(model.status(), config_path);
  target.params = ParameterShapes(NamedTensors((*model)->module()));
  return target;
}

absl::StatusOr<LoadedLora> LoadLoraFromFlags(const std::string& command, const std::string& path) {
  ASSIGN_OR_RETURN(LoraTarget target, LoraTargetFromFlags(command));
  LoraLoadOptions options;
  options.allow_partial = absl::GetFlag(FLAGS_allow_partial);
  return LoadLora(path, *target.spec->lora, target.params, options);
}

// args: diffusion-cli lora inspect|convert FILE
absl::Status Lora(const std::vector<char*>& args) {
  const std::string sub = args[2];
  const std::string command = absl::StrCat("lora ", sub);
  if (args.size() != 4) return absl::InvalidArgumentError(absl::StrCat(command, " takes one file"));
  const std::string path = args[3];
  if (sub == "inspect") {
    ASSIGN_OR_RETURN(LoadedLora loaded, LoadLoraFromFlags(command, path));
    if (absl::GetFlag(FLAGS_json)) {
      std::cout << loaded.report.ToJson().dump(2) << "\n";
    } else {
      std::cout << loaded.report.ToString();
    }
    return absl::OkStatus();
  }
  // convert
  const std::string out = absl::GetFlag(FLAGS_output);
  if (out.empty()) return absl::InvalidArgumentError("lora convert needs -o OUT.safetensors");
  ASSIGN_OR_RETURN(LoadedLora loaded, LoadLoraFromFlags(command, path));
  // diffusers' pipelines name the Flux denoiser component "transformer".
  ASSIGN_OR_RETURN(TensorMap state_dict, loaded.lora.ToDiffusersStateDict("transformer."));
  RETURN_IF_ERROR(WriteSafetensors(
      out, state_dict,
      {{"format", "pt"}, {"converted_from", path}, {"source_format", loaded.report.format}}));
  std::cout << loaded.report.ToString() << "wrote " << out << ": " << state_dict.size()
            << " tensors in diffusers/PEFT naming, each module's scale folded into lora_B "
               "(load with lora_alpha = r)\n";
  return absl::OkStatus();
}

cli::RemoteOptions RemoteOptionsFromFlags() {
  cli::RemoteOptions o;
  o.target = absl::GetFlag(FLAGS_target);
  o.token_file = absl::GetFlag(FLAGS_token_file);
  o.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  o.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  o.model = absl::GetFlag(FLAGS_model);
  o.name = absl::GetFlag(FLAGS_name);
  o.path = absl::GetFlag(FLAGS_path);
  o.file = absl::GetFlag(FLAGS_file);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.device = absl::GetFlag(FLAGS_device);
  o.config = absl::GetFlag(FLAGS_config);
  o.replace = absl::GetFlag(FLAGS_replace);
  o.format_hint = absl::GetFlag(FLAGS_format_hint);
  o.allow_partial = absl::GetFlag(FLAGS_allow_partial);
  o.pin = absl::GetFlag(FLAGS_pin);
  o.weight = absl::GetFlag(FLAGS_weight);
  o.verbose = absl::GetFlag(FLAGS_verbose);
  o.service = absl::GetFlag(FLAGS_service);
  o.inputs = absl::GetFlag(FLAGS_inputs);
  o.output = absl::GetFlag(FLAGS_output);
  o.latent_shape = absl::GetFlag(FLAGS_latent_shape);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.guidance = absl::GetFlag(FLAGS_guidance);
  o.width = absl::GetFlag(FLAGS_width);
  o.height = absl::GetFlag(FLAGS_height);
  o.num_images = absl::GetFlag(FLAGS_num_images);
  o.true_cfg_scale = absl::GetFlag(FLAGS_true_cfg_scale);
  o.loras = LoraFlags();
  o.ip_adapters = IPAdapterFlags();
  o.image_encoder_path = absl::GetFlag(FLAGS_image_encoder_path);
  o.prompt = absl::GetFlag(FLAGS_prompt);
  o.prompt_2 = absl::GetFlag(FLAGS_prompt_2);
  o.negative_prompt = absl::GetFlag(FLAGS_negative_prompt);
  o.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
  o.storage_dtype = absl::GetFlag(FLAGS_storage_dtype);
  o.skip_patterns = absl::GetFlag(FLAGS_skip_patterns);
  o.group_offload_blocks = absl::GetFlag(FLAGS_group_offload_blocks);
  o.group_offload_prefetch = absl::GetFlag(FLAGS_group_offload_prefetch);
  o.group_offload_to = absl::GetFlag(FLAGS_group_offload_to);
  o.device_map = absl::GetFlag(FLAGS_device_map);
  o.max_memory = absl::GetFlag(FLAGS_max_memory);
  o.cache = absl::GetFlag(FLAGS_cache);
  auto set_if = [](auto value, auto* out) {
    if (value >= 0) *out = value;
  };
  set_if(absl::GetFlag(FLAGS_cache_threshold), &o.cache_threshold);
  set_if(absl::GetFlag(FLAGS_cache_interval), &o.cache_interval);
  set_if(absl::GetFlag(FLAGS_disable_cache_before_step), &o.disable_cache_before_step);
  set_if(absl::GetFlag(FLAGS_disable_cache_after_step), &o.disable_cache_after_step);
  set_if(absl::GetFlag(FLAGS_max_order), &o.max_order);
  o.taylor_factors_dtype = absl::GetFlag(FLAGS_taylor_factors_dtype);
  o.cache_lite = absl::GetFlag(FLAGS_cache_lite);
  return o;
}

// Flag spellings Abseil does not accept, rewritten before parsing: '-' inside a flag name
// (--allow-partial for --allow_partial; only where that names a defined flag) and the short -o
// for --output. A value given as the next argument of a non-boolean flag and everything after a
// bare "--" are left as they are.
std::vector<std::string> NormalizeFlagSpellings(int argc, char** argv) {
  std::vector<std::string> out;
  bool value_next = false;  // the previous argument was a non-boolean flag without "=value"
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    const bool is_value = value_next;
    value_next = false;
    if (i == 0 || is_value || flags_done || arg.size() < 2 || arg[0] != '-') {
      out.push_back(std::move(arg));
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      out.push_back(std::move(arg));
      continue;
    }
    if (arg == "-o" || absl::StartsWith(arg, "-o=")) arg = "--output" + arg.substr(2);
    const std::size_t dashes = arg[1] == '-' ? 2 : 1;
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(dashes, eq == std::string::npos ? eq : eq - dashes);
    const std::string underscored = absl::StrReplaceAll(name, {{"-", "_"}});
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(underscored);
    if (flag != nullptr && underscored != name) {
      arg = absl::StrCat(arg.substr(0, dashes), underscored,
                         eq == std::string::npos ? std::string() : arg.substr(eq));
    }
    value_next = flag != nullptr && eq == std::string::npos && !flag->IsOfType<bool>();
    out.push_back(std::move(arg));
  }
  return out;
}

// Takes every `--lora VALUE` / `--lora=VALUE` out of `args` into LoraFlags(), and every
// `--ip_adapter[_embeds] VALUE` (or `=VALUE`) into IPAdapterFlags(), in order (absl flags keep
// only the last occurrence of a flag; these are repeatable). Runs after NormalizeFlagSpellings,
// so '-' spellings arrive as '_'.
std::vector<std::string> ExtractRepeatableFlags(std::vector<std::string> args) {
  std::vector<std::string> rest;
  // The value of `name` at args[*i] ("--name=V" or "--name V"), advancing *i past it.
  auto take = [&](std::size_t* i, const std::string& name) -> std::optional<std::string> {
    const std::string flag = "--" + name;
    if (absl::StartsWith(args[*i], flag + "=")) return args[*i].substr(flag.size() + 1);
    if (args[*i] == flag && *i + 1 < args.size()) return args[++*i];
    return std::nullopt;
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--") {
      rest.insert(rest.end(), args.begin() + static_cast<std::ptrdiff_t>(i), args.end());
      break;
    }
    if (auto v = take(&i, "lora")) {
      LoraFlags().push_back(*v);
    } else if (auto v = take(&i, "ip_adapter")) {
      IPAdapterFlags().push_back({/*embeds=*/false, *v});
    } else if (auto v = take(&i, "ip_adapter_embeds")) {
      IPAdapterFlags().push_back({/*embeds=*/true, *v});
    } else {
      rest.push_back(args[i]);
    }
  }
  return rest;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  std::vector<std::string> spelled = ExtractRepeatableFlags(NormalizeFlagSpellings(argc, argv));
  std::vector<char*> spelled_argv;
  for (std::string& a : spelled) spelled_argv.push_back(a.data());
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(spelled_argv.size()), spelled_argv.data());
  SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  if (args.size() < 2) {
    std::cerr << kUsage << "\n";
    return 2;
  }
  std::string command = args[1];
  absl::Status status;
  if (command == "describe") {
    status = Describe(args);
  } else if (command == "inspect") {
    status = Inspect(args);
  } else if (command == "convert") {
    status = Convert(args);
  } else if (command == "lora") {
    if (args.size() < 3 ||
        (std::string(args[2]) != "inspect" && std::string(args[2]) != "convert")) {
      std::cerr << "lora takes a subcommand: inspect or convert\n" << kUsage << "\n";
      return 2;
    }
    command = absl::StrCat("lora ", args[2]);
    status = Lora(args);
  } else if (command == "generate" && !absl::GetFlag(FLAGS_pipeline).empty()) {
    if (args.size() != 2) {
      status = absl::InvalidArgumentError("generate takes no positional arguments");
    } else if (!IPAdapterFlags().empty()) {
      status = absl::InvalidArgumentError(absl::StrCat(
          IPAdapterFlags()[0].embeds ? "--ip_adapter_embeds" : "--ip_adapter",
          ": generate --pipeline (in-process) takes no image prompts; load the pipeline into a "
          "server and use load-ip-adapter + generate --model"));
    } else {
      status = cli::RunOfflineGenerate(absl::GetFlag(FLAGS_pipeline), RemoteOptionsFromFlags());
    }
  } else if (command == "tokenize") {
    status = cli::RunTokenize(std::vector<std::string>(args.begin() + 2, args.end()),
                              {absl::GetFlag(FLAGS_tokenizer),
                               absl::GetFlag(FLAGS_max_sequence_length)},
                              std::cout, std::cerr);
  } else if (command == "encode-prompt") {
    cli::EncodePromptOptions encode;
    encode.pipeline_dir = absl::GetFlag(FLAGS_pipeline);
    encode.prompt_2 = absl::GetFlag(FLAGS_prompt_2);
    encode.max_sequence_length = absl::GetFlag(FLAGS_max_sequence_length);
    encode.output = absl::GetFlag(FLAGS_output);
    auto dtype = ParseDtype(absl::GetFlag(FLAGS_dtype));
    auto device = TorchCall(
        "--device", [] { return torch::Device(absl::GetFlag(FLAGS_device)); },
        absl::StatusCode::kInvalidArgument);
    if (!dtype.ok()) {
      status = dtype.status();
    } else if (!device.ok()) {
      status = device.status();
    } else {
      encode.load.model.dtype = *dtype;
      encode.load.model.device = *device;
      status = cli::RunEncodePrompt(std::vector<std::string>(args.begin() + 2, args.end()), encode,
                                    std::cout, std::cerr);
    }
  } else if (command == "write-demo") {
    status = cli::RunWriteDemo(std::vector<std::string>(args.begin() + 2, args.end()),
                               absl::GetFlag(FLAGS_output));
  } else if (cli::IsRemoteCommand(command)) {
    std::vector<std::string> positional(args.begin() + 2, args.end());
    return cli::RunRemoteCommand(command, positional, RemoteOptionsFromFlags());
  } else if (command == "forward") {
    if (args.size() != 2) {
      status = absl::InvalidArgumentError("forward takes no positional arguments");
    } else {
      status = Forward();
    }
  } else {
    std::cerr << "unknown command '" << command << "'\n" << kUsage << "\n";
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "diffusion-cli " << command << ": " << status << "\n";
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace ds

int main(int argc, char** argv) { return ds::Main(argc, argv); }
