// diffusion-server: the gRPC model server. The only place with flags; everything else takes
// ServerOptions.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "handlers/flow_match_scheduler.h"
#include "handlers/memory_budget.h"
#include "handlers/threads.h"
#include "server/auth.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/model_manager.h"
#include "server/preload.h"
#include "server/server.h"
#include "server/server_options.h"
#include "spdlog/spdlog.h"

namespace {
const ds::server::ServerOptions kDefaults;
}  // namespace

ABSL_FLAG(std::string, host, kDefaults.host,
          "Address to listen on (gRPC and metrics), e.g. 0.0.0.0, 127.0.0.1, [::]");
ABSL_FLAG(int, port, kDefaults.port, "gRPC port; 0 picks a free port (printed on stdout)");
ABSL_FLAG(int, metrics_port, kDefaults.metrics_port,
          "Prometheus /metrics port; 0 picks a free port (printed on stdout), -1 disables it");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin bearer token that management RPCs (LoadSingleFile, "
          "UnloadModel, LoadLoRA, UnloadLoRA, LoadIPAdapter, UnloadIPAdapter) must send as "
          "`authorization: Bearer <token>`");
ABSL_FLAG(bool, insecure_allow_management, false,
          "Allow management RPCs without a token (only without --admin_token_file; for local "
          "development)");
ABSL_FLAG(std::string, model_root, "",
          "Folder that LoadSingleFile paths are confined to (empty: no server-side model loading)");
ABSL_FLAG(std::string, adapter_root, "",
          "Folder that LoadLoRA paths are confined to (empty: only inline LoRA bytes)");
ABSL_FLAG(std::string, log_format, kDefaults.log_format,
          "Log format on stderr: text or json (one object per line)");
ABSL_FLAG(int, threads, kDefaults.threads, "LibTorch intra-op threads; 0 = every core");
ABSL_FLAG(int, workers, kDefaults.workers_per_device,
          "Generate requests running at once per device");
ABSL_FLAG(int, queue_capacity, kDefaults.queue_capacity_per_device,
          "Generate requests waiting per device beyond the running ones; more are "
          "RESOURCE_EXHAUSTED at once");
ABSL_FLAG(double, grace_period_s, kDefaults.grace_period_s,
          "On SIGTERM/SIGINT: seconds running requests get to finish before they are cancelled");
ABSL_FLAG(int64_t, max_message_bytes, kDefaults.max_message_bytes,
          "Largest gRPC message accepted or sent, bytes");
ABSL_FLAG(int64_t, max_inline_lora_bytes, kDefaults.max_inline_lora_bytes,
          "Largest inline LoRA (LoadLoRA.inline_bytes), bytes; larger is RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, max_connection_age_ms, kDefaults.max_connection_age_ms,
          "Close connections after this long (clients re-balance behind a load balancer); "
          "0 = never");
ABSL_FLAG(int64_t, max_connection_age_grace_ms, kDefaults.max_connection_age_grace_ms,
          "Time calls on an aged connection get to finish, ms");
ABSL_FLAG(std::string, adapter_store, "",
          "Shared adapter store folder (a volume every replica mounts, e.g. a ReadWriteMany PVC): "
          "LoadLoRA also writes adapters there, other replicas load them on demand and follow "
          "replacements and removals (see server/adapter_store.h); empty = per-replica adapters");
ABSL_FLAG(int64_t, adapter_store_poll_ms, kDefaults.adapter_store_poll_ms,
          "How often each replica re-reads the adapter store, ms: a replaced or removed adapter "
          "reaches every replica within about this long");
ABSL_FLAG(int64_t, adapter_memory_budget_bytes, kDefaults.adapter_memory_budget_bytes,
          "LoRA tensor bytes each model instance may hold; least recently used adapters are "
          "evicted beyond it");
ABSL_FLAG(int64_t, memory_budget_bytes, kDefaults.memory_budget_bytes,
          "Budget for LibTorch CPU tensor bytes in the whole process (weights in memory, "
          "activations, outputs; not mmap'd weight files, gRPC buffers or the heap): a request "
          "whose allocation would pass it fails with RESOURCE_EXHAUSTED and the server keeps "
          "serving, instead of being OOM-killed. 0 = off. Set it below the container's memory "
          "limit (cgroup memory.max) by a margin for what it does not count");
ABSL_FLAG(std::string, offload_dir, "",
          "Directory for disk-backed group offloading (LoadSingleFile group_offload): one "
          "unlinked memory-mapped file per group; default $TMPDIR, else /tmp");
ABSL_FLAG(int64_t, max_steps, kDefaults.max_steps, "Largest Generate step count");
ABSL_FLAG(int64_t, default_steps, kDefaults.default_steps, "Generate steps when a request gives 0");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain file (TLS; needs --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key file (TLS; needs --tls_cert)");
ABSL_FLAG(std::string, config, "",
          "JSON file of models and adapters to load at start (see server/preload.h); without it "
          "(or when it lists no models) the --embedded_models are served");
ABSL_FLAG(std::string, embedded_models, kDefaults.embedded_models,
          "Models served when no configured ones are (comma-separated; empty = none): "
          "\"flux-tiny\" = a tiny FluxPipeline trained on synthetic scenes ('a red circle on a "
          "blue background'; weights embedded in the binary), written to files under "
          "--embedded_dir on first run and loaded from them; \"default\" = a bare tiny "
          "FluxTransformer2DModel with random weights (latents API, for tests)");
ABSL_FLAG(std::string, embedded_dir, "",
          "Where embedded demo pipelines' files are written (default: "
          "$XDG_CACHE_HOME/diffusion-server, else $HOME/.cache/diffusion-server, else "
          "<temp>/diffusion-server-<uid>)");

namespace {

constexpr char kUsage[] =
    "serves diffusion models over gRPC (diffusion.v1.DiffusionService, "
    "grpc.health.v1, reflection) with Prometheus metrics.\n\n"
    "  diffusion-server [--port=50051] [--metrics_port=9464] [--admin_token_file=FILE]\n"
    "                   [--model_root=DIR] [--adapter_root=DIR] [--config=FILE] ...\n\n"
    "With no model flags it serves the embedded demo model \"flux-tiny\": a tiny FluxPipeline "
    "trained on synthetic scenes (prompts like \"a red triangle on a yellow background\"; shapes "
    "circle, square, triangle, cross, star; colours red, green, blue, yellow, black, white).";

// --embedded_dir, or the user's cache folder, or a per-user temporary folder.
std::string EmbeddedDir(const std::string& flag) {
  if (!flag.empty()) return flag;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg == '/') {
    return std::string(xdg) + "/diffusion-server";
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home == '/') {
    const std::string cache = std::string(home) + "/.cache";
    std::error_code ec;
    std::filesystem::create_directories(cache, ec);
    if (!ec && access(cache.c_str(), W_OK) == 0) return cache + "/diffusion-server";
  }
  std::error_code ec;
  const std::filesystem::path tmp = std::filesystem::temp_directory_path(ec);
  return absl::StrCat(ec ? "/tmp" : tmp.string(), "/diffusion-server-", getuid());
}

// The cgroup v2 memory limit of this process (memory.max), or 0 when there is none or it cannot be
// read.
int64_t CgroupMemoryLimit() {
  std::ifstream in("/sys/fs/cgroup/memory.max");
  std::string value;
  if (!(in >> value) || value == "max") return 0;
  int64_t bytes = 0;
  return absl::SimpleAtoi(value, &bytes) ? bytes : 0;
}

int Fail(const std::string& message, int code = 2) {
  std::cerr << "diffusion-server: " << message << std::endl;
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  // SIGTERM/SIGINT are taken synchronously by sigwait below; block them before any thread
  // starts so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::SetProgramUsageMessage(kUsage);
  // --help lists the flags of this file (absl's default filter matches only files named after
  // the binary).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "server/main.cc");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);

  using ds::server::ServerOptions;
  ServerOptions options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  options.insecure_allow_management = absl::GetFlag(FLAGS_insecure_allow_management);
  options.model_root = absl::GetFlag(FLAGS_model_root);
  options.adapter_root = absl::GetFlag(FLAGS_adapter_root);
  options.log_format = absl::GetFlag(FLAGS_log_format);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.workers_per_device = absl::GetFlag(FLAGS_workers);
  options.queue_capacity_per_device = absl::GetFlag(FLAGS_queue_capacity);
  options.grace_period_s = absl::GetFlag(FLAGS_grace_period_s);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.max_inline_lora_bytes = absl::GetFlag(FLAGS_max_inline_lora_bytes);
  options.max_connection_age_ms = absl::GetFlag(FLAGS_max_connection_age_ms);
  options.max_connection_age_grace_ms = absl::GetFlag(FLAGS_max_connection_age_grace_ms);
  options.adapter_memory_budget_bytes = absl::GetFlag(FLAGS_adapter_memory_budget_bytes);
  options.adapter_store = absl::GetFlag(FLAGS_adapter_store);
  options.adapter_store_poll_ms = absl::GetFlag(FLAGS_adapter_store_poll_ms);
  options.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  options.offload_dir = absl::GetFlag(FLAGS_offload_dir);
  options.max_steps = absl::GetFlag(FLAGS_max_steps);
  options.default_steps = absl::GetFlag(FLAGS_default_steps);
  options.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key = absl::GetFlag(FLAGS_tls_key);
  options.config_file = absl::GetFlag(FLAGS_config);
  options.embedded_models = absl::GetFlag(FLAGS_embedded_models);
  options.embedded_dir = absl::GetFlag(FLAGS_embedded_dir);

  if (options.workers_per_device < 1) return Fail("--workers must be at least 1");
  if (!options.offload_dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(options.offload_dir, ec)) {
      return Fail(absl::StrCat("--offload_dir: '", options.offload_dir,
                               "' is not an existing directory"));
    }
  }
  if (options.queue_capacity_per_device < 0) return Fail("--queue_capacity must be >= 0");
  if (options.max_steps < 1 || options.default_steps < 1 ||
      options.default_steps > options.max_steps) {
    return Fail("need 1 <= --default_steps <= --max_steps");
  }
  if (options.max_steps > ds::FlowMatchEulerScheduler::kMaxInferenceSteps) {
    return Fail(absl::StrCat("--max_steps may be at most ",
                             ds::FlowMatchEulerScheduler::kMaxInferenceSteps,
                             " (the scheduler's limit)"));
  }
  if (absl::Status s = ds::server::ConfigureLogging(options.log_format); !s.ok()) {
    return Fail(absl::StrCat("--log_format: ", s.message()));
  }
  ds::SetIntraOpThreads(options.threads);
  // Before any model loads, so that their weights count.
  if (options.memory_budget_bytes > 0) {
    if (absl::Status s = ds::InstallCpuMemoryBudget(options.memory_budget_bytes); !s.ok()) {
      return Fail(absl::StrCat("--memory_budget_bytes: ", s.message()));
    }
    const int64_t cgroup_limit = CgroupMemoryLimit();
    if (cgroup_limit > 0 && options.memory_budget_bytes >= cgroup_limit) {
      spdlog::warn("--memory_budget_bytes={} is not below the cgroup memory limit ({} bytes): the "
                   "OOM killer may still end the process first",
                   options.memory_budget_bytes, cgroup_limit);
    }
    spdlog::info("CPU tensor memory budget: {} bytes", options.memory_budget_bytes);
  }

  // Management authorization.
  if (!options.admin_token_file.empty() && options.insecure_allow_management) {
    return Fail("give either --admin_token_file or --insecure_allow_management, not both");
  }
  ds::server::AdminAuth auth = ds::server::AdminAuth::Disabled();
  if (!options.admin_token_file.empty()) {
    auto token = ds::server::AdminAuth::FromTokenFile(options.admin_token_file);
    if (!token.ok()) return Fail(absl::StrCat("--admin_token_file: ", token.status().message()));
    auth = *token;
  } else if (options.insecure_allow_management) {
    spdlog::warn("management RPCs are allowed without a token (--insecure_allow_management)");
    auth = ds::server::AdminAuth::Insecure();
  } else {
    spdlog::info("management RPCs are disabled (no --admin_token_file)");
  }

  // Metrics.
  auto metrics = std::make_shared<ds::server::Metrics>();
  std::unique_ptr<ds::server::MetricsServer> metrics_server;
  if (options.metrics_port >= 0) {
    auto started = ds::server::StartMetricsServer(
        absl::StrCat(options.host, ":", options.metrics_port), metrics);
    if (!started.ok()) return Fail(absl::StrCat("--metrics_port: ", started.status().message()));
    metrics_server = *std::move(started);
  }

  // Models: the preload config, or the embedded default.
  ds::server::ModelManagerOptions manager_options;
  manager_options.lora.memory_budget_bytes = options.adapter_memory_budget_bytes;
  manager_options.offload_dir = options.offload_dir;
  manager_options.pipeline.max_inference_steps = options.max_steps;
  manager_options.pipeline.max_batch = options.max_batch;
  auto models = std::make_shared<ds::server::ModelManager>(manager_options);
  ds::server::PreloadConfig preload;
  if (!options.config_file.empty()) {
    auto config = ds::server::ReadPreloadConfig(options.config_file, options.model_root,
                                                options.adapter_root);
    if (!config.ok()) return Fail(absl::StrCat("--config: ", config.status().message()));
    preload = *std::move(config);
  }
  if (preload.models.empty()) {
    for (absl::string_view part :
         absl::StrSplit(options.embedded_models, ',', absl::SkipWhitespace())) {
      const std::string name(absl::StripAsciiWhitespace(part));
      absl::StatusOr<ds::server::LoadModelResult> loaded;
      if (name == ds::server::kDefaultInstanceName) {
        loaded = models->LoadEmbedded(name);
      } else {
        loaded = models->LoadDemo(name, EmbeddedDir(options.embedded_dir), name);
      }
      if (!loaded.ok()) {
        return Fail(absl::StrCat("--embedded_models: ", name, ": ", loaded.status().message()), 1);
      }
      spdlog::info("embedded model {} ready in {:.3f} s: {}", name, loaded->seconds,
                   loaded->report);
      metrics->ObserveModelLoad(name, loaded->seconds);
    }
  }

  auto server = ds::server::Server::Start(options, models, auth, metrics);
  if (!server.ok()) return Fail(server.status().ToString(), 1);
  // Tests and scripts parse these lines (the ports matter when 0 was asked for).
  if (metrics_server != nullptr) {
    std::cout << "metrics on " << options.host << ":" << metrics_server->port() << "\n";
  }
  std::cout << "listening on " << (*server)->address() << std::endl;
  spdlog::info("diffusion-server listening on {}", (*server)->address());

  // Configured models load after the port is open; health reports each as it becomes READY.
  std::thread preloader([&] {
    if (preload.models.empty() && preload.adapters.empty()) return;
    if (absl::Status s = ds::server::Preload(preload, *models, metrics.get()); !s.ok()) {
      spdlog::error("preload: {}", std::string(s.message()));
    }
  });

  int signal = 0;
  sigwait(&signals, &signal);
  spdlog::info("received {}; draining for up to {} s", signal == SIGTERM ? "SIGTERM" : "SIGINT",
               options.grace_period_s);
  (*server)->Shutdown();
  preloader.join();
  server->reset();
  metrics_server.reset();
  spdlog::info("diffusion-server stopped");
  return 0;
}
