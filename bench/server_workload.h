// A served Flux-family workload for the serving benchmarks (bench/server_bench.cc and the suite in
// bench/benchmarks.cc): a real ds::server::Server in this process on the embedded default, one
// Generate request shaped from the instance's config, the same work called in-process (what the
// server's worker runs for it), and a gRPC client that reads the stream to the end.
#pragma once

#include <grpcpp/grpcpp.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "handlers/safetensors.h"
#include "server/metrics.h"
#include "server/model_manager.h"
#include "server/server.h"

namespace ds::bench {

namespace pb = ::diffusion::v1;

// The forward inputs of a Flux-family instance, shaped from its config (not from any particular
// model size), and the gRPC request carrying them.
struct Workload {
  TensorMap inputs;                   // as the server holds them after parsing (with guidance)
  std::vector<int64_t> latent_shape;  // [1, grid^2, in_channels]
  uint64_t seed = 42;
  int steps = 1;
  pb::GenerateRequest request;
};

// FAILED_PRECONDITION when the instance's config is not Flux-like; INTERNAL if LibTorch fails.
absl::StatusOr<Workload> MakeWorkload(const server::ModelInstance& instance, int steps,
                                      int64_t grid, int64_t text_tokens);

// What the server's worker runs for the request (see server/service.cc RunGenerate): the
// request's adapter snapshot (none), seeded noise, the Euler loop.
absl::StatusOr<torch::Tensor> InProcess(const server::ModelInstance& instance, const Workload& w);

// A channel of its own (own connection) to 127.0.0.1:port, 64 MiB messages.
std::shared_ptr<grpc::Channel> NewChannel(int port);

// What the server reported about one served Generate (GenerateResult.seconds / queue_seconds).
struct ServerTimes {
  double run = 0;    // the worker's run, from taking the request to the result message
  double queue = 0;  // waiting in the device queue
};

// One Generate over gRPC, read to the end; the result's latents decoded as a client would.
// `code_out` and `times_out` (nullable) receive the call's status code and the server's timings.
absl::StatusOr<torch::Tensor> OverGrpc(pb::DiffusionService::Stub& stub,
                                       const pb::GenerateRequest& request,
                                       grpc::StatusCode* code_out = nullptr,
                                       ServerTimes* times_out = nullptr);

// A unary round trip that does almost no work on the server (ListModels): the transport's floor.
absl::Status UnaryRoundTrip(pb::DiffusionService::Stub& stub);

// A server on 127.0.0.1:<free port> serving the embedded default, with its own model manager and
// metrics.
struct Served {
  std::shared_ptr<server::ModelManager> models;
  std::shared_ptr<server::Metrics> metrics;
  std::unique_ptr<server::Server> server;
  server::InstancePtr instance;
};
absl::StatusOr<Served> Serve(int workers, int queue_capacity, int threads);

}  // namespace ds::bench
