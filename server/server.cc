#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/security/server_credentials.h>

#include <algorithm>
#include <climits>
#include <fstream>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "handlers/status.h"

namespace ds::server {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (text.find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return text;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const ServerOptions& o) {
  if (o.tls_cert.empty() && o.tls_key.empty()) return grpc::InsecureServerCredentials();
  if (o.tls_cert.empty() || o.tls_key.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  ASSIGN_OR_RETURN(std::string cert, ReadPem(o.tls_cert, "--tls_cert"));
  ASSIGN_OR_RETURN(std::string key, ReadPem(o.tls_key, "--tls_key"));
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  return grpc::SslServerCredentials(ssl);
}

int ClampInt(int64_t v) { return static_cast<int>(std::clamp<int64_t>(v, 0, INT_MAX)); }

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options,
                                                      std::shared_ptr<ModelManager> models,
                                                      AdminAuth auth,
                                                      std::shared_ptr<Metrics> metrics) {
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(options));
  std::unique_ptr<Server> server(new Server());
  server->options_ = options;
  server->models_ = models;
  if (!options.adapter_store.empty()) {
    if (options.adapter_store_poll_ms < 10) {
      return absl::InvalidArgumentError("--adapter_store_poll_ms must be at least 10");
    }
    absl::StatusOr<std::unique_ptr<AdapterStore>> store = AdapterStore::Open(options.adapter_store);
    if (!store.ok()) return Annotate(store.status(), "--adapter_store");
    AdapterSyncOptions sync_options;
    sync_options.poll_interval = absl::Milliseconds(options.adapter_store_poll_ms);
    server->adapter_sync_ =
        std::make_shared<AdapterSync>(*std::move(store), models, sync_options, metrics);
  }
  server->service_ = std::make_unique<DiffusionService>(options, models, std::move(auth),
                                                        std::move(metrics), server->adapter_sync_);

  server->health_ = std::make_unique<HealthService>();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string requested = absl::StrCat(options.host, ":", options.port);
  builder.AddListeningPort(requested, credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.RegisterService(server->health_.get());
  builder.SetMaxReceiveMessageSize(ClampInt(options.max_message_bytes));
  builder.SetMaxSendMessageSize(ClampInt(options.max_message_bytes));
  if (options.max_connection_age_ms > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                               ClampInt(options.max_connection_age_ms));
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                               ClampInt(options.max_connection_age_grace_ms));
  }
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", requested));
  }
  HealthService* health = server->health_.get();
  models->SetServingListener(
      [health](const std::string& name, bool serving) { health->SetServingStatus(name, serving); });
  for (const std::string& name : models->ReadyNames()) health->SetServingStatus(name, true);
  if (server->adapter_sync_ != nullptr) server->adapter_sync_->Start();
  return server;
}

Server::~Server() { Shutdown(); }

std::string Server::address() const { return absl::StrCat(options_.host, ":", port_); }

void Server::Shutdown() {
  std::call_once(shutdown_once_, [&] {
    if (server_ == nullptr) return;
    const absl::Time deadline = absl::Now() + absl::Seconds(std::max(0.0, options_.grace_period_s));
    // Health first, so load balancers stop routing here while calls drain.
    models_->SetServingListener(nullptr);
    health_->Shutdown();  // every status NOT_SERVING, frozen; Watch streams end
    service_->BeginDrain();
    // Stops accepting; waits for running calls until the deadline, then cancels the rest and
    // waits for them (each generation stops at its next step).
    server_->Shutdown(absl::ToChronoTime(deadline));
    service_->ShutdownSchedulers(absl::Now());
    if (adapter_sync_ != nullptr) adapter_sync_->Stop();
  });
}

}  // namespace ds::server
