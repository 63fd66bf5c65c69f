// libFuzzer target: Generate request validation end to end. The input is a serialized
// diffusion.v1.GenerateRequest (proto/diffusion/v1/diffusion.proto); inputs that do not parse are
// skipped. It is sent over a local channel to a diffusion server started in this process (in
// LLVMFuzzerInitialize, as server/main.cc starts it) serving the embedded "default" model (a bare
// tiny FluxTransformer2DModel: latents in, latents out) and the embedded "flux-tiny" pipeline with
// the shipped kohya LoRA loaded as "stars"; the response stream is read to the end.
//
// Cost bound, so that validation paths dominate: the server runs with max_steps 2, max_batch 1
// and max_image_side 64 (requests over them are INVALID_ARGUMENT without running anything), the
// harness clamps steps to 2 (keeping 0 and negative values, which validation refuses) and skips
// requests with more than one image, a side over 64 pixels, more than 4096 latent elements or a
// max_sequence_length over 64; each call has a 30 s deadline.
//
// Findings: a crash of the process (the server runs inside it), sanitizer reports, a hang (the
// libFuzzer -timeout), and broken invariants (Require): a status of UNKNOWN, INTERNAL or
// DATA_LOSS (a bad request must be a client error; LibTorch failures on a tiny model are bugs);
// an OK call without exactly one result, or a result before the progress events.
//
// Seeds: DS_FUZZ_WRITE_SEEDS=<dir> generate_request_fuzz_replay writes fuzz/corpus/generate/:
// valid text-to-image requests to flux-tiny (PNG, latents, LoRA stack, true CFG, prompt
// embeddings), latents requests to "default", and near-valid ones (unknown model, bad shapes,
// dtypes, sizes, steps, adapters, NaN guidance, IP-Adapter without a loaded adapter).
#include <grpcpp/grpcpp.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>

#include "diffusion/v1/diffusion.grpc.pb.h"
#include "fuzz/fuzz_util.h"
#include "server/auth.h"
#include "server/model_manager.h"
#include "server/server.h"
#include "server/server_options.h"
#include "server/tensor_proto.h"

namespace {

namespace fs = std::filesystem;
namespace pb = diffusion::v1;
using ds::fuzz::Require;

constexpr int64_t kMaxSide = 64;

std::unique_ptr<ds::server::Server>* g_server = nullptr;
std::unique_ptr<pb::DiffusionService::Stub>* g_stub = nullptr;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void StartServer() {
  char tmpl[] = "/tmp/ds-generate-fuzz-XXXXXX";
  Require(mkdtemp(tmpl) != nullptr, "mkdtemp");
  static const std::string root = tmpl;
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(root, ec);
  });

  ds::server::ServerOptions options;
  options.host = "127.0.0.1";
  options.port = 0;
  options.threads = 1;
  options.workers_per_device = 1;
  options.queue_capacity_per_device = 4;
  options.grace_period_s = 1;
  options.max_steps = 2;
  options.default_steps = 2;
  options.max_batch = 1;
  options.max_inline_lora_bytes = int64_t{1} << 20;
  ds::server::ModelManagerOptions manager_options;
  manager_options.pipeline.max_inference_steps = options.max_steps;
  manager_options.pipeline.max_batch = options.max_batch;
  manager_options.pipeline.max_image_side = kMaxSide;
  auto models = std::make_shared<ds::server::ModelManager>(manager_options);
  auto embedded = models->LoadEmbedded(ds::server::kDefaultInstanceName);
  Require(embedded.ok(), "the embedded default model loads");
  auto tiny = models->LoadDemo("flux-tiny", root, "flux-tiny");
  Require(tiny.ok(), "the embedded flux-tiny pipeline loads");
  auto server =
      ds::server::Server::Start(options, models, ds::server::AdminAuth::Insecure(), nullptr);
  if (!server.ok()) {
    std::fprintf(stderr, "generate_request_fuzz: %s\n", server.status().ToString().c_str());
    std::abort();
  }
  g_server = new std::unique_ptr<ds::server::Server>(*std::move(server));
  g_stub = new std::unique_ptr<pb::DiffusionService::Stub>(pb::DiffusionService::NewStub(
      grpc::CreateChannel((*g_server)->address(), grpc::InsecureChannelCredentials())));

  // The shipped kohya LoRA, for requests naming "stars".
  pb::LoadLoRARequest lora;
  lora.set_model("flux-tiny");
  lora.set_name("stars");
  lora.set_inline_bytes(
      ReadAll(std::string(DS_SOURCE_DIR) + "/models/flux/demo/flux-tiny-stars.safetensors"));
  pb::LoadLoRAResponse response;
  grpc::ClientContext context;
  const grpc::Status s = (*g_stub)->LoadLoRA(&context, lora, &response);
  if (!s.ok()) {
    std::fprintf(stderr, "generate_request_fuzz: LoadLoRA: %s\n", s.error_message().c_str());
    std::abort();
  }
  // Stop the server before static destructors run: its threads (a call's OnDone writes the
  // access log) would outlive spdlog's registry. Registered after the first RPC so that it runs
  // before the destructors of the statics that RPC created.
  std::atexit([] { (*g_server)->Shutdown(); });
}

// Clamps or skips requests that would run long; false = skip.
bool Bound(pb::GenerateRequest* r) {
  if (r->steps() > 2) r->set_steps(2);
  if (r->num_images() > 1 || r->width() > kMaxSide || r->height() > kMaxSide) return false;
  if (r->max_sequence_length() > 64) return false;
  int64_t elements = 1;
  for (int64_t d : r->latent_shape()) {
    if (d < 0 || d > 4096) return false;
    elements *= d;
    if (elements > 4096) return false;
  }
  return true;
}

void Send(const pb::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto reader = (*g_stub)->Generate(&context, request);
  pb::GenerateResponse response;
  int results = 0;
  while (reader->Read(&response)) {
    if (response.has_result()) {
      ++results;
    } else {
      Require(results == 0, "no progress after the result");
    }
  }
  const grpc::Status status = reader->Finish();
  const grpc::StatusCode code = status.error_code();
  if (code == grpc::StatusCode::UNKNOWN || code == grpc::StatusCode::INTERNAL ||
      code == grpc::StatusCode::DATA_LOSS) {
    std::fprintf(stderr, "Generate: %d %s\n", static_cast<int>(code),
                 status.error_message().c_str());
    Require(false, "a request is never UNKNOWN / INTERNAL / DATA_LOSS");
  }
  if (status.ok()) Require(results == 1, "an OK call has exactly one result");
}

// ---------------------------------------------------------------------------------------------
// Seeds.

pb::Tensor Proto(const torch::Tensor& t) {
  pb::Tensor p;
  Require(ds::server::TensorToProto(t, &p).ok(), "seed tensor");
  return p;
}

pb::GenerateRequest TextRequest() {
  pb::GenerateRequest r;
  r.set_model("flux-tiny");
  r.add_prompt("a red circle on a yellow background");
  r.set_width(32);
  r.set_height(32);
  r.set_steps(2);
  r.set_seed(7);
  return r;
}

pb::GenerateRequest DefaultRequest() {
  pb::GenerateRequest r;
  r.set_model("default");
  torch::manual_seed(3);
  (*r.mutable_inputs())["encoder_hidden_states"] = Proto(torch::randn({1, 8, 32}));
  (*r.mutable_inputs())["pooled_projections"] = Proto(torch::randn({1, 32}));
  torch::Tensor img = torch::zeros({16, 3});
  for (int64_t i = 0; i < 16; ++i) {
    img[i][1] = static_cast<float>(i / 4);
    img[i][2] = static_cast<float>(i % 4);
  }
  (*r.mutable_inputs())["img_ids"] = Proto(img);
  (*r.mutable_inputs())["txt_ids"] = Proto(torch::zeros({8, 3}));
  r.add_latent_shape(1);
  r.add_latent_shape(16);
  r.add_latent_shape(16);
  r.set_steps(2);
  r.set_seed(42);
  return r;
}

void WriteSeeds(ds::fuzz::SeedWriter& w) {
  auto put = [&w](const std::string& name, const pb::GenerateRequest& r) {
    std::string bytes;
    Require(r.SerializeToString(&bytes), "serialize a seed");
    w.Write(name, bytes);
  };
  put("text_png.pb", TextRequest());
  {
    auto r = TextRequest();
    r.set_output(pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS);
    r.add_prompt_2("a red circle");
    r.set_guidance(2.5);
    put("text_png_latents.pb", r);
  }
  {
    auto r = TextRequest();
    auto* a = r.add_adapters();
    a->set_name("stars");
    a->set_weight(0.5);
    put("text_lora.pb", r);
  }
  {
    auto r = TextRequest();
    r.add_negative_prompt("a blue square");
    r.set_true_cfg_scale(2.0);
    r.set_max_sequence_length(16);
    put("text_true_cfg.pb", r);
  }
  {
    auto r = TextRequest();
    r.clear_prompt();
    torch::manual_seed(5);
    *r.mutable_prompt_embeds() = Proto(torch::randn({1, 16, 32}));
    *r.mutable_pooled_prompt_embeds() = Proto(torch::randn({1, 32}));
    r.set_output(pb::GenerateRequest::OUTPUT_LATENTS);
    put("embeds_latents.pb", r);
  }
  {
    auto r = TextRequest();
    r.mutable_cache()->set_type("first_block_cache");
    r.mutable_cache()->set_threshold(0.1);
    put("text_cache.pb", r);
  }
  put("default_latents.pb", DefaultRequest());
  {
    auto r = DefaultRequest();
    r.clear_latent_shape();
    torch::manual_seed(9);
    *r.mutable_latents() = Proto(torch::randn({1, 16, 16}));
    r.set_return_latents(true);
    put("default_explicit_latents.pb", r);
  }
  // Near-valid requests.
  {
    auto r = TextRequest();
    r.set_model("no-such-model");
    put("bad_unknown_model.pb", r);
  }
  {
    auto r = TextRequest();
    r.set_width(33);
    put("bad_width.pb", r);
  }
  {
    auto r = TextRequest();
    r.set_steps(-1);
    put("bad_steps.pb", r);
  }
  {
    auto r = TextRequest();
    r.set_guidance(std::nan(""));
    put("bad_guidance_nan.pb", r);
  }
  {
    auto r = TextRequest();
    r.add_adapters()->set_name("missing");
    auto* inf = r.add_adapters();
    inf->set_name("stars");
    inf->set_weight(HUGE_VAL);
    put("bad_adapters.pb", r);
  }
  {
    auto r = TextRequest();
    auto* ip = r.add_ip_adapters();
    ip->set_name("none");
    ip->set_image("\x89PNG\r\n\x1a\n");
    put("bad_ip_adapter.pb", r);
  }
  {
    auto r = DefaultRequest();
    (*r.mutable_inputs())["pooled_projections"] = Proto(torch::zeros({1, 31}));
    put("bad_default_shape.pb", r);
  }
  {
    auto r = DefaultRequest();
    pb::Tensor t = Proto(torch::zeros({1, 8, 32}));
    t.mutable_data()->resize(5);
    (*r.mutable_inputs())["encoder_hidden_states"] = t;
    put("bad_tensor_bytes.pb", r);
  }
  {
    auto r = DefaultRequest();
    (*r.mutable_inputs())["img_ids"] = Proto(torch::zeros({16, 3}, torch::kInt64));
    (*r.mutable_inputs())["extra"] = Proto(torch::zeros({2}));
    put("bad_default_extra_input.pb", r);
  }
  {
    auto r = TextRequest();
    r.add_prompt("a second prompt over max_batch");
    r.set_output(static_cast<pb::GenerateRequest::Output>(7));
    put("bad_batch_output.pb", r);
  }
  {
    auto r = TextRequest();
    r.clear_prompt();
    put("bad_no_prompt.pb", r);
  }
  w.Finish();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (auto seeds = ds::fuzz::SeedWriter::FromEnv()) WriteSeeds(*seeds);
  StartServer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  pb::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  if (!Bound(&request)) return 0;
  Send(request);
  return 0;
}
