// diffusion-cli's remote commands: a client of a running diffusion-server
// (diffusion.v1.DiffusionService and grpc.health.v1.Health, proto/diffusion/v1/diffusion.proto)
// over the generated C++ stubs.
//
//   models                          ListModels as a table (name, class, state, dtype, device,
//                                   memory, LoRA adapters, IP-Adapters)
//   metadata NAME [--verbose]       GetMetadata: the server's rendered feature table, plus the
//                                   instance's live state when NAME is an instance
//   load-single-file --name N --path P [--dtype D] [--device D] [--replace] [--config JSON]
//   unload-model --name N
//   load-lora [--model M] --name N (--path P | --file LOCAL) [--format-hint F] [--allow-partial]
//             [--replace] [--pin]
//   unload-lora [--model M] --name N
//   loras [--model M]
//   load-ip-adapter [--model M] --name N --path P [--image_encoder_path E] [--replace]
//                                   LoadIPAdapter into a pipeline instance: P under the server's
//                                   adapter root, E (a CLIPVisionModelWithProjection folder) under
//                                   its model root ("" = the pipeline's image_encoder component)
//   unload-ip-adapter [--model M] --name N
//   health [--service NAME]         grpc.health.v1 Check ("" = the server itself)
//   generate [--model M] --inputs IN.safetensors -o OUT.(safetensors|png) [--latent-shape B,T,C]
//            [--steps N] [--seed S] [--guidance G] [--lora NAME[:WEIGHT]]...
//            [--ip_adapter NAME=IMAGE.png[:SCALE]]... [--ip_adapter_embeds NAME=FILE[:SCALE]]...
//
// Image prompts (generate on a pipeline instance, GenerateRequest.ip_adapters, in flag order):
// `--ip_adapter NAME=IMAGE.png[:SCALE]` sends the local PNG's bytes for the loaded IP-Adapter
// NAME; `--ip_adapter_embeds NAME=FILE.safetensors[:SCALE]` sends FILE's tensor `image_embeds`
// instead. SCALE is one number (every conditioned layer) or a comma list with one per layer
// (IPAdapterInfo.num_layers); absent = 1. The text after the last ':' is SCALE unless the whole
// value after '=' names an existing file (so paths with ':' still work). A missing or unreadable
// file is NOT_FOUND naming the flag and the path, a file that is not a PNG or a malformed SCALE
// INVALID_ARGUMENT naming the flag (both local, exit 1, nothing sent); an unknown NAME is the
// server's NOT_FOUND (exit 3).
//
// Every command takes --target=host:port (default localhost:50051), --tls_ca=PEM (TLS with these
// root certificates; plaintext without), --timeout=SECONDS (a deadline per call; 0 = none) and
// --token_file=FILE (the admin bearer token, sent as `authorization: Bearer <token>` on the
// management calls LoadSingleFile, UnloadModel, LoadLoRA, UnloadLoRA, LoadIPAdapter,
// UnloadIPAdapter only). An empty --model means the server's default instance.
//
// Output: results on stdout; generate's progress bar on stderr (redrawn in place on a terminal,
// one line per step otherwise); every error on stderr as `error: <CODE_NAME>: <message>`, the
// gRPC status code name of the server's answer (or of the local failure).
//
// Thread-compatible; a command runs on the calling thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ds::cli {

// Exit codes of a remote command.
enum ExitCode : int {
  kExitOk = 0,
  // Bad invocation (missing or malformed flag, wrong positional arguments) or a local failure
  // (unreadable file, unwritable output, a result that cannot be written as asked).
  kExitLocalError = 1,
  // (2 is diffusion-cli's "unknown command / no command".)
  // The server, or the transport (e.g. UNAVAILABLE: nothing listening), answered with an error.
  kExitRpcError = 3,
  // health: the server answered, and the service is not SERVING.
  kExitNotServing = 4,
};

// One image prompt flag of generate, as given (parsed by the command).
struct IPAdapterFlag {
  bool embeds = false;  // false: --ip_adapter NAME=IMAGE.png[:SCALE]; true: --ip_adapter_embeds
  std::string value;    // the text after the flag
};

// What a remote command needs; main.cc fills it from diffusion-cli's flags. Strings left empty
// mean "not given".
struct RemoteOptions {
  // Connection.
  std::string target = "localhost:50051";  // host:port (any gRPC target URI)
  std::string token_file;                  // admin token file (whitespace around it trimmed)
  std::string tls_ca;                      // PEM root certificates; set = TLS
  double timeout_seconds = 0;              // deadline per call; 0 = none; must be >= 0

  // Names and paths.
  // Instance name (load-lora, unload-lora, loras, load-ip-adapter, unload-ip-adapter, generate);
  // "" = default.
  std::string model;
  // load-single-file/unload-model: instance; load-lora/unload-lora/load-ip-adapter/
  // unload-ip-adapter: adapter.
  std::string name;
  // load-single-file, load-lora, load-ip-adapter: server-side path (under the server's root).
  std::string path;
  std::string file;   // load-lora: a local file whose bytes are sent inline

  // load-single-file.
  std::string dtype;     // "float32", "bfloat16", "float16"; "" = the server's default
  std::string device;    // "cpu", "cuda", "cuda:N"; "" = the server's default
  std::string config;    // config override: inline JSON object text, or a local JSON file path
  bool replace = false;  // also load-lora, load-ip-adapter
  // Layerwise casting: "" = none; "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2".
  std::string storage_dtype;
  std::vector<std::string> skip_patterns;  // replaces the model's casting skip patterns
  // Group offloading: blocks per group, 0 = none; prefetch; "" / "disk" / "cpu".
  int64_t group_offload_blocks = 0;
  bool group_offload_prefetch = false;
  std::string group_offload_to;
  // Device map: "" = none, "sequential", or an explicit JSON object {"module": "device"}; with
  // "sequential", budgets as "DEVICE=BYTES[,DEVICE=BYTES...]" (BYTES may end in K, M, G: 2^10...).
  std::string device_map;
  std::string max_memory;

  // load-ip-adapter: the image encoder folder under the server's model root; "" = the pipeline's
  // image_encoder component (or none: requests then give image embeddings).
  std::string image_encoder_path;

  // load-lora.
  std::string format_hint;
  bool allow_partial = false;
  bool pin = false;
  // The adapter's default weight: what a Generate naming it without a weight applies (a
  // request's `--lora NAME:W` still wins). "" = 1.
  std::string weight;

  // metadata.
  bool verbose = false;

  // health.
  std::string service;

  // generate.
  std::string inputs;        // safetensors file of forward inputs (and optionally `latents`)
  std::string output;        // .safetensors (tensor `latents` + echoed parameters) or .png
  std::string latent_shape;  // "B,T,C"; "" = derived (see generate in the usage)
  int64_t steps = 0;         // 0 = the server's default
  int64_t seed = 0;
  double guidance = 0;             // 0 = the server's default (or the inputs' `guidance`)
  std::vector<std::string> loras;  // NAME[:WEIGHT], in order
  // Image prompts (pipeline instances), in order; see the file comment for the syntax.
  std::vector<IPAdapterFlag> ip_adapters;
  // generate on a pipeline instance (ModelInstance.pipeline_class set): --inputs then holds
  // prompt_embeds, pooled_prompt_embeds and optionally negative_* and noise (each name also
  // accepted with an "inputs/" prefix, as the golden pipeline files store them).
  int64_t width = 0;   // 0 = the pipeline's default
  int64_t height = 0;
  int64_t num_images = 0;
  double true_cfg_scale = 0;
  // Text prompts (pipelines with text encoders; --inputs is then optional): the prompt, the T5
  // prompt ("" = the same), the negative prompt (true CFG), T5 tokens (0 = 512).
  std::string prompt;
  std::string prompt_2;
  std::string negative_prompt;
  int64_t max_sequence_length = 0;
  // Step cache (GenerateRequest.cache): "" = none, "first_block_cache" or "taylorseer_cache";
  // unset parameters take the server's defaults (diffusers').
  std::string cache;
  std::optional<double> cache_threshold;
  std::optional<int64_t> cache_interval;
  std::optional<int64_t> disable_cache_before_step;
  std::optional<int64_t> disable_cache_after_step;
  std::optional<int64_t> max_order;
  std::string taylor_factors_dtype;
  bool cache_lite = false;
};

// True for the command names above.
bool IsRemoteCommand(const std::string& command);

// Runs `command` (one of the above) with its positional arguments (after the command name).
// Prints as described in the file comment and returns an ExitCode.
int RunRemoteCommand(const std::string& command, const std::vector<std::string>& positional,
                     const RemoteOptions& options);

}  // namespace ds::cli
