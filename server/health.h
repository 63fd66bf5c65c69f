// HealthService: grpc.health.v1.Health (Check and Watch) for the server, with a shutdown that
// ends open Watch streams.
//
// Why not gRPC's built-in health service: on shutdown it reports NOT_SERVING but keeps Watch
// streams open, and grpc::Server::Shutdown waits for every open call until its deadline — one
// watching client (a load balancer, a sidecar) would hold every graceful shutdown for the whole
// grace period. Here Shutdown() sends NOT_SERVING to every watcher and then finishes the stream
// (status OK), so the drain takes only as long as the real calls.
//
// Semantics (the standard protocol): Check answers the status of a known service name, NOT_FOUND
// for an unknown one; Watch sends the current status at once (SERVICE_UNKNOWN for an unknown
// name) and then every change. Names: "" = the process is live; a model instance name = READY.
//
// Thread-safety: every method is thread-safe. The service must outlive the grpc::Server it is
// registered with.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace ds::server {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Starts with "" = SERVING.
  HealthService();
  ~HealthService() override;

  // Sets `service` to SERVING or NOT_SERVING and notifies its watchers. Ignored after Shutdown().
  void SetServingStatus(const std::string& service, bool serving);

  // Every known status becomes NOT_SERVING (and stays so); each open Watch stream receives
  // NOT_SERVING and is then finished. Idempotent.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* ctx,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* ctx,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class WatchReactor;
  void Unregister(WatchReactor* reactor);
  ServingStatus StatusLocked(const std::string& service) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::mutex mu_;
  std::map<std::string, ServingStatus> statuses_ ABSL_GUARDED_BY(mu_);
  std::multimap<std::string, WatchReactor*> watchers_ ABSL_GUARDED_BY(mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace ds::server
