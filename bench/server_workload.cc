#include "bench/server_workload.h"

#include <torch/torch.h>

#include <chrono>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "handlers/flow_match.h"
#include "server/auth.h"
#include "server/server_options.h"
#include "server/tensor_proto.h"

namespace ds::bench {

absl::StatusOr<Workload> MakeWorkload(const server::ModelInstance& instance, int steps,
                                      int64_t grid, int64_t text_tokens) {
  const nlohmann::json& config = instance.model().config();
  for (const char* key :
       {"in_channels", "joint_attention_dim", "pooled_projection_dim", "axes_dims_rope"}) {
    if (!config.contains(key)) {
      return absl::FailedPreconditionError(
          absl::StrCat("model '", instance.name, "' (", instance.model().class_name(),
                       ") config has no '", key, "': this benchmark builds Flux-family inputs"));
    }
  }
  Workload w;
  w.steps = steps;
  try {
    const int64_t axes = static_cast<int64_t>(config["axes_dims_rope"].size());
    const int64_t tokens = grid * grid;
    torch::manual_seed(7);
    w.inputs["encoder_hidden_states"] =
        torch::randn({1, text_tokens, config["joint_attention_dim"].get<int64_t>()});
    w.inputs["pooled_projections"] =
        torch::randn({1, config["pooled_projection_dim"].get<int64_t>()});
    torch::Tensor img = torch::zeros({tokens, axes});
    for (int64_t i = 0; i < tokens; ++i) {
      img[i][1] = static_cast<double>(i / grid);
      img[i][2] = static_cast<double>(i % grid);
    }
    w.inputs["img_ids"] = img;
    w.inputs["txt_ids"] = torch::zeros({text_tokens, axes});
    w.latent_shape = {1, tokens, config["in_channels"].get<int64_t>()};
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building the inputs: ", e.what()));
  }
  w.request.set_model(instance.name);
  for (const auto& [name, t] : w.inputs) {
    absl::Status s = server::TensorToProto(t, &(*w.request.mutable_inputs())[name]);
    if (!s.ok()) return s;
  }
  for (int64_t d : w.latent_shape) w.request.add_latent_shape(d);
  w.request.set_seed(static_cast<int64_t>(w.seed));
  w.request.set_steps(steps);
  w.request.set_guidance(3.5);
  // The server adds the guidance tensor when the request gives none; the in-process path needs it.
  if (config.value("guidance_embeds", false)) {
    w.inputs["guidance"] = torch::full({1}, 3.5, torch::kFloat32);
  }
  return w;
}

// What the server's worker runs for the request (see server/service.cc RunGenerate): the
// request's adapter snapshot (none), seeded noise, the Euler loop.
absl::StatusOr<torch::Tensor> InProcess(const server::ModelInstance& instance, const Workload& w) {
  absl::StatusOr<AdapterStackPtr> stack = instance.host->Snapshot({});
  if (!stack.ok()) return stack.status();
  const ModelOptions& mo = instance.model().options();
  absl::StatusOr<torch::Tensor> noise = SeededNoise(w.latent_shape, w.seed, mo.dtype, mo.device);
  if (!noise.ok()) return noise.status();
  return DenoiseFlowMatchEuler(*instance.host, w.inputs, *noise, w.steps, stack->get(),
                               [](int, int) { return absl::OkStatus(); });
}

std::shared_ptr<grpc::Channel> NewChannel(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                   grpc::InsecureChannelCredentials(), args);
}

// One Generate over gRPC, read to the end; the result's latents decoded as a client would.
// `code_out` and `times_out` (nullable) receive the call's status code and the server's timings.
absl::StatusOr<torch::Tensor> OverGrpc(pb::DiffusionService::Stub& stub,
                                       const pb::GenerateRequest& request,
                                       grpc::StatusCode* code_out, ServerTimes* times_out) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  auto reader = stub.Generate(&ctx, request);
  pb::GenerateResponse message;
  torch::Tensor latents;
  absl::Status decode;
  while (reader->Read(&message)) {
    if (message.has_result()) {
      const pb::GenerateResult& result = message.result();
      if (times_out != nullptr) *times_out = {result.seconds(), result.queue_seconds()};
      absl::StatusOr<torch::Tensor> t = server::TensorFromProto(result.latents(), "result.latents");
      if (t.ok()) {
        latents = *t;
      } else {
        decode = t.status();
      }
    }
  }
  const grpc::Status s = reader->Finish();
  if (code_out != nullptr) *code_out = s.error_code();
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  }
  if (!decode.ok()) return decode;
  if (!latents.defined()) return absl::InternalError("the stream ended without a result");
  return latents;
}

// A unary round trip that does almost no work on the server (ListModels): the transport's floor.
absl::Status UnaryRoundTrip(pb::DiffusionService::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  pb::ListModelsResponse response;
  const grpc::Status s = stub.ListModels(&ctx, {}, &response);
  return s.ok() ? absl::OkStatus()
                : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<Served> Serve(int workers, int queue_capacity, int threads) {
  Served s;
  s.models = std::make_shared<server::ModelManager>();
  s.metrics = std::make_shared<server::Metrics>();
  server::ServerOptions options;
  options.host = "127.0.0.1";
  options.port = 0;
  options.metrics_port = -1;  // the bench reads the registry directly
  options.threads = threads;
  options.workers_per_device = workers;
  options.queue_capacity_per_device = queue_capacity;
  options.grace_period_s = 5;
  // As diffusion-server does: the embedded default first, then the server.
  absl::StatusOr<server::LoadModelResult> loaded =
      s.models->LoadEmbedded(server::kDefaultInstanceName);
  if (!loaded.ok()) return loaded.status();
  absl::StatusOr<std::unique_ptr<server::Server>> server =
      server::Server::Start(options, s.models, server::AdminAuth::Disabled(), s.metrics);
  if (!server.ok()) return server.status();
  s.server = *std::move(server);
  s.instance = loaded->instance;
  return s;
}

}  // namespace ds::bench
