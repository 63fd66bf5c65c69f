// The trained default's generation speed (issue 11): 100 images of 32x32 at 8 steps from the
// embedded flux-tiny (25 captions x 4 images, one request), through the offline pipeline and
// through gRPC (an in-process server on 127.0.0.1 serving the same instance, PNG output read to
// the end). Medians of --repeat runs, interleaved, and their ratio.
//
//   build/bench/flux_tiny_bench [--repeat=5] [--threads=N]
#include <ATen/Parallel.h>
#include <grpcpp/grpcpp.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/bench_util.h"
#include "bench/server_workload.h"
#include "models/flux/spec.h"
#include "server/model_manager.h"
#include "server/server.h"

ABSL_FLAG(int, repeat, 5, "runs of each variant (interleaved)");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0 = LibTorch's default)");

namespace {

namespace pb = ::diffusion::v1;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "flux_tiny_bench: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0) at::set_num_threads(absl::GetFlag(FLAGS_threads));
  const std::string root =
      (std::filesystem::temp_directory_path() / ("flux_tiny_bench." + std::to_string(getpid())))
          .string();
  ds::server::ModelManagerOptions manager_options;
  manager_options.pipeline.max_batch = 128;  // the 100 images in one request
  auto models = std::make_shared<ds::server::ModelManager>(manager_options);
  auto loaded = models->LoadDemo("flux-tiny", root, "flux-tiny");
  if (!loaded.ok()) return Fail(loaded.status());
  const ds::server::InstancePtr instance = loaded->instance;

  // 25 captions (5 shapes x 5 colours, on a colour 1..5 further on) x 4 images.
  const auto& shapes = ds::flux::FluxTinyShapes();
  const auto& colours = ds::flux::FluxTinyColours();
  std::vector<std::string> prompts;
  for (size_t s = 0; s < shapes.size(); ++s) {
    for (size_t c = 0; c < 5; ++c) {
      // Background: 1..5 colours further on, never the shape's colour.
      prompts.push_back(ds::flux::FluxTinyCaption(colours[c], shapes[s], colours[(c + 1 + s) % 6]));
    }
  }
  constexpr int64_t kPerPrompt = 4, kSide = 32, kSteps = 8;
  ds::PipelineRequest offline;
  offline.prompt = prompts;
  offline.num_images_per_prompt = kPerPrompt;
  offline.height = offline.width = kSide;
  offline.num_inference_steps = kSteps;
  offline.seed = 7;
  offline.png = true;

  ds::server::ServerOptions options;
  options.host = "127.0.0.1";
  options.port = 0;
  options.metrics_port = -1;
  options.max_batch = 128;
  options.grace_period_s = 5;
  auto metrics = std::make_shared<ds::server::Metrics>();
  auto server =
      ds::server::Server::Start(options, models, ds::server::AdminAuth::Disabled(), metrics);
  if (!server.ok()) return Fail(server.status());
  auto stub = pb::DiffusionService::NewStub(ds::bench::NewChannel((*server)->port()));
  pb::GenerateRequest request;
  request.set_model("flux-tiny");
  for (const std::string& p : prompts) request.add_prompt(p);
  request.set_num_images(kPerPrompt);
  request.set_width(kSide);
  request.set_height(kSide);
  request.set_steps(kSteps);
  request.set_seed(7);
  request.set_output(pb::GenerateRequest::OUTPUT_PNG);

  auto grpc_once = [&]() -> absl::Status {
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, request);
    pb::GenerateResponse message;
    int64_t images = 0;
    while (reader->Read(&message)) {
      if (message.has_result()) images = message.result().images_size();
    }
    const grpc::Status s = reader->Finish();
    if (!s.ok())
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    if (images != static_cast<int64_t>(prompts.size()) * kPerPrompt) {
      return absl::InternalError("gRPC result has " + std::to_string(images) + " images");
    }
    return absl::OkStatus();
  };
  // Warm-up of both paths.
  if (auto r = instance->pipeline->Generate(offline); !r.ok()) return Fail(r.status());
  if (auto s = grpc_once(); !s.ok()) return Fail(s);
  std::vector<double> local, remote;
  for (int i = 0; i < absl::GetFlag(FLAGS_repeat); ++i) {
    auto t0 = ds::bench::Clock::now();
    auto r = instance->pipeline->Generate(offline);
    if (!r.ok()) return Fail(r.status());
    local.push_back(ds::bench::Since(t0));
    t0 = ds::bench::Clock::now();
    if (auto s = grpc_once(); !s.ok()) return Fail(s);
    remote.push_back(ds::bench::Since(t0));
  }
  const double a = ds::bench::Median(local), b = ds::bench::Median(remote);
  std::printf("flux-tiny: %zu images %lldx%lld, %lld steps, %d threads, load %s\n",
              prompts.size() * kPerPrompt, static_cast<long long>(kSide),
              static_cast<long long>(kSide), static_cast<long long>(kSteps), at::get_num_threads(),
              ds::bench::LoadAverage().c_str());
  std::printf("  offline pipeline (PNG): median %.3f s (target <= 5 s)\n", a);
  std::printf("  gRPC (PNG, read to the end): median %.3f s = %.3fx offline (+%.3f s)\n", b, b / a,
              b - a);
  (*server)->Shutdown();
  std::error_code ec;
  std::filesystem::remove_all(root, ec);
  return 0;
}
