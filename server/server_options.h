// ServerOptions: everything the diffusion server is configured with. main.cc fills it from flags
// (the only place flags exist); libraries and tests construct it directly.
//
// A plain value type; copy freely.
#pragma once

#include <cstdint>
#include <string>

namespace ds::server {

struct ServerOptions {
  // gRPC listening address: host and port. Port 0 picks a free port (Server::port() reports it).
  std::string host = "0.0.0.0";
  int port = 50051;
  // Prometheus /metrics port on `host`; 0 picks a free port, -1 disables the exposer.
  int metrics_port = 9464;

  // Management authorization (see auth.h): a file holding the admin bearer token, or the explicit
  // opt-out that allows management calls without one. Neither: management RPCs are refused.
  std::string admin_token_file;
  bool insecure_allow_management = false;

  // Roots that client-supplied server-side paths are confined to (LoadSingleFile / LoadLoRA);
  // empty = loading from server-side paths is disabled (inline LoRA bytes still work).
  std::string model_root;
  std::string adapter_root;

  // Logging: "text" or "json" (see logging.h).
  std::string log_format = "text";

  // LibTorch intra-op threads per forward; <= 0 = every core.
  int threads = 0;

  // The bounded scheduler of each device: worker threads (requests running at once) and queued
  // requests beyond those; a Generate that finds the queue full is RESOURCE_EXHAUSTED at once.
  int workers_per_device = 1;
  int queue_capacity_per_device = 16;

  // Graceful shutdown (SIGTERM/SIGINT): running and queued requests get this long to finish
  // before they are cancelled.
  double grace_period_s = 30.0;

  // gRPC message size limits (both directions), bytes.
  int64_t max_message_bytes = int64_t{64} << 20;
  // Inline LoRA bytes (LoadLoRA.inline_bytes) above this are RESOURCE_EXHAUSTED.
  int64_t max_inline_lora_bytes = int64_t{32} << 20;
  // GRPC_ARG_MAX_CONNECTION_AGE_MS: connections are closed (GOAWAY) after this long so clients
  // re-resolve and re-balance behind a load balancer; <= 0 = unlimited. Calls still running get
  // GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS (max_connection_age_grace_ms) to finish.
  int64_t max_connection_age_ms = 300000;
  int64_t max_connection_age_grace_ms = 60000;

  // The shared adapter store (see adapter_store.h): a folder every replica mounts (a
  // ReadWriteMany volume). Empty = none: adapters live only in the replica that loaded them.
  std::string adapter_store;
  // How often each replica re-reads the store (a replaced or removed adapter reaches every
  // replica within about this long), milliseconds; >= 10.
  int64_t adapter_store_poll_ms = 1000;

  // Tensor bytes of LoRA adapters each model instance may hold (LRU eviction beyond it).
  int64_t adapter_memory_budget_bytes = int64_t{4} << 30;

  // Process-wide budget for the bytes of LibTorch CPU tensors (handlers/memory_budget.h: model
  // weights copied or cast into memory, activations, outputs; not mmap'd safetensors views, gRPC
  // or protobuf buffers, or the C++ heap). An allocation past it fails its request (Generate,
  // LoadSingleFile, LoadLoRA, ...) with RESOURCE_EXHAUSTED and the server keeps serving, instead of
  // the process growing into the kernel's OOM killer. <= 0 = off (the default). Set it below the
  // container's memory limit by a margin for what it does not count.
  int64_t memory_budget_bytes = 0;

  // Directory of the disk-backed group offloading files (LoadSingleFile group_offload with
  // offload_to "disk": one unlinked, memory-mapped file per group, freed with the instance). Empty:
  // $TMPDIR, else /tmp. Must be an existing directory; on Kubernetes an emptyDir volume sized for
  // the offloaded weights.
  std::string offload_dir;

  // TLS: PEM certificate chain and private key files; both empty = plaintext. One without the
  // other is an error.
  std::string tls_cert;
  std::string tls_key;

  // Optional JSON file of models and adapters to load at start (see preload.h). Empty (or a
  // config listing no models): the embedded models below are served.
  std::string config_file;
  // The embedded models served without configured ones, comma-separated: "default" (a bare tiny
  // FluxTransformer2DModel built in memory) and registered demo pipelines (e.g. "flux-tiny",
  // written to files under embedded_dir on first run and loaded from them). Empty: none.
  std::string embedded_models = "flux-tiny";
  // Where demo pipelines' files are written. Empty: $XDG_CACHE_HOME/diffusion-server, else
  // $HOME/.cache/diffusion-server, else <temp>/diffusion-server-<uid>.
  std::string embedded_dir;

  // Generate limits (GetMetadata reports them as GenerateLimits).
  int64_t max_steps = 1000;
  int64_t default_steps = 28;
  double default_guidance = 3.5;
  int64_t max_batch = 16;
  int64_t max_image_tokens = 16384;
  int64_t max_text_tokens = 4096;
};

}  // namespace ds::server
