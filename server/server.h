// Server: the running gRPC server around DiffusionService — listening port, message-size and
// connection-age limits, optional TLS, the standard health service (HealthService,
// grpc.health.v1: "" = the process is live, each READY model instance name = SERVING, with Watch)
// and server reflection — and its graceful shutdown.
//
// Shutdown(): every health status goes NOT_SERVING (Watch streams get it and end); Generate and
// management calls arriving now are UNAVAILABLE and the listener stops accepting; running and
// queued calls get ServerOptions::grace_period_s to finish; then the remaining calls are
// cancelled (generation workers stop at their next denoising step) and Shutdown returns once
// every call and worker is done.
//
// Thread-safety: port()/address() are constant; Shutdown() may be called from any thread, any
// number of times (the first call does the work; later calls wait for it).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "server/auth.h"
#include "server/health.h"
#include "server/model_manager.h"
#include "server/server_options.h"
#include "server/service.h"

namespace ds::server {

class Metrics;

class Server {
 public:
  // Builds and starts the server on options.host:options.port (port 0 picks one). Health
  // statuses follow `models` from now on. INVALID_ARGUMENT for a TLS certificate without a key
  // (or the reverse) and for an unreadable one (NOT_FOUND when missing); UNAVAILABLE if the
  // address cannot be bound; with options.adapter_store, the errors of AdapterStore::Open (and its
  // poller starts). `metrics` may be null.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options,
                                                       std::shared_ptr<ModelManager> models,
                                                       AdminAuth auth,
                                                       std::shared_ptr<Metrics> metrics);
  // Shutdown().
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const { return port_; }
  // "host:port" as bound.
  std::string address() const;

  // Graceful shutdown (see the header comment). Blocks until it is complete.
  void Shutdown();

  DiffusionService& service() { return *service_; }

 private:
  Server() = default;

  ServerOptions options_;
  std::shared_ptr<ModelManager> models_;
  std::shared_ptr<AdapterSync> adapter_sync_;  // with --adapter_store; its poller stops at Shutdown
  std::unique_ptr<DiffusionService> service_;
  std::unique_ptr<HealthService> health_;
  std::unique_ptr<grpc::Server> server_;  // destroyed first: the services outlive it
  int port_ = 0;
  std::once_flag shutdown_once_;
};

}  // namespace ds::server
