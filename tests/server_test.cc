// diffusion-server end to end: the real binary on loopback (port 0, temporary roots), driven by
// the generated C++ stubs. Every RPC's happy path, each status code from a real bad request, the
// scheduler's limits (queue full, deadline, cancellation within one step), health with Watch,
// reflection, the metrics endpoint, and graceful shutdown on SIGTERM.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "handlers/block_cache.h"
#include "handlers/flow_match.h"
#include "handlers/image.h"
#include "handlers/lora_host.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/single_file.h"
#include "handlers/state_dict.h"
#include "server/model_manager.h"
#include "server/tensor_proto.h"
#include "testing/lora_util.h"
#include "testing/server_process.h"
#include "testing/http_get.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
namespace pb = ::diffusion::v1;
using ::ds::test::GoldenDir;
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::Contains;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "test-admin-token-0123456789";

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::unique_ptr<grpc::ClientContext> Context(double seconds = 60, bool admin = false,
                                             const std::string& token = kToken) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (admin) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
  return ctx;
}

using ::ds::test::HttpGet;

// The distinct unlinked files under `dir` that process `pid` has memory-mapped (the "(deleted)"
// entries of /proc/PID/maps, counted by inode): the group offloading files.
int64_t MappedDeletedFilesUnder(pid_t pid, const std::string& dir) {
  std::ifstream maps(absl::StrCat("/proc/", pid, "/maps"));
  std::set<std::string> inodes;
  std::string line;
  const std::string prefix = fs::weakly_canonical(dir).string() + "/";
  while (std::getline(maps, line)) {
    if (!absl::EndsWith(line, " (deleted)")) continue;
    const size_t path = line.find(" /");
    if (path == std::string::npos || line.compare(path + 1, prefix.size(), prefix) != 0) continue;
    std::istringstream fields(line);
    std::string addr, perms, offset, dev, inode;
    fields >> addr >> perms >> offset >> dev >> inode;
    inodes.insert(dev + ":" + inode);
  }
  return static_cast<int64_t>(inodes.size());
}

// Where the server puts temporary files by default: $TMPDIR, else /tmp.
std::string DefaultTmpDir() {
  const char* tmp = std::getenv("TMPDIR");
  return tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
}

// ------------------------------------------------------------------------------------------------
// Requests and the in-process reference.

pb::Tensor ToProto(const torch::Tensor& t) {
  pb::Tensor p;
  EXPECT_TRUE(server::TensorToProto(t, &p).ok());
  return p;
}

// Forward inputs (besides hidden_states/timestep/guidance) of a tiny Flux model with a 4x4 latent
// grid (16 image tokens) and 8 text tokens.
TensorMap FluxInputs(int64_t joint_dim, int64_t pooled_dim, uint64_t seed) {
  torch::manual_seed(seed);
  TensorMap in;
  in["encoder_hidden_states"] = torch::randn({1, 8, joint_dim});
  in["pooled_projections"] = torch::randn({1, pooled_dim});
  torch::Tensor img = torch::zeros({16, 3});
  for (int64_t i = 0; i < 16; ++i) {
    img[i][1] = static_cast<float>(i / 4);
    img[i][2] = static_cast<float>(i % 4);
  }
  in["img_ids"] = img;
  in["txt_ids"] = torch::zeros({8, 3});
  return in;
}

pb::GenerateRequest MakeRequest(const std::string& model, const TensorMap& inputs, int64_t channels,
                                int64_t steps, int64_t seed = 42) {
  pb::GenerateRequest r;
  r.set_model(model);
  for (const auto& [name, t] : inputs) (*r.mutable_inputs())[name] = ToProto(t);
  r.add_latent_shape(1);
  r.add_latent_shape(16);
  r.add_latent_shape(channels);
  r.set_seed(seed);
  r.set_steps(steps);
  return r;
}

// The same sampler in this process: seeded noise, guidance 3.5, DenoiseFlowMatchEuler.
torch::Tensor InProcess(const LoraHost& host, TensorMap inputs, int64_t channels, int steps,
                        const AdapterStack* stack, int64_t seed = 42) {
  inputs["guidance"] = torch::full({1}, 3.5, torch::kFloat32);
  auto noise =
      SeededNoise({1, 16, channels}, static_cast<uint64_t>(seed), torch::kFloat32, torch::kCPU);
  EXPECT_TRUE(noise.ok());
  auto out = DenoiseFlowMatchEuler(host, inputs, *noise, steps, stack, nullptr);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : torch::Tensor();
}

struct Outcome {
  grpc::Status status;
  std::vector<pb::GenerateProgress> progress;
  std::optional<pb::GenerateResult> result;
  torch::Tensor latents;
};

// Runs a Generate; `on_event(ctx, events_so_far)` runs after each received message.
Outcome Generate(pb::DiffusionService::Stub& stub, const pb::GenerateRequest& request,
                 grpc::ClientContext* ctx,
                 const std::function<void(grpc::ClientContext&, int)>& on_event = nullptr) {
  Outcome o;
  auto reader = stub.Generate(ctx, request);
  pb::GenerateResponse message;
  int events = 0;
  while (reader->Read(&message)) {
    ++events;
    if (message.has_progress()) o.progress.push_back(message.progress());
    if (message.has_result()) o.result = message.result();
    if (on_event) on_event(*ctx, events);
  }
  o.status = reader->Finish();
  if (o.result.has_value() && o.result->has_latents()) {
    auto t = server::TensorFromProto(o.result->latents(), "latents");
    EXPECT_TRUE(t.ok()) << t.status();
    if (t.ok()) o.latents = *t;
  }
  return o;
}

Outcome Generate(pb::DiffusionService::Stub& stub, const pb::GenerateRequest& request,
                 double seconds = 60,
                 const std::function<void(grpc::ClientContext&, int)>& on_event = nullptr) {
  auto ctx = Context(seconds);
  return Generate(stub, request, ctx.get(), on_event);
}

void ExpectSameLatents(const torch::Tensor& served, const torch::Tensor& local) {
  ASSERT_TRUE(served.defined() && local.defined());
  ASSERT_EQ(served.sizes(), local.sizes());
  const double diff = (served - local).abs().max().item<double>();
  EXPECT_LE(diff, 1e-6) << "served vs in-process";
}

// A fixture with temporary model and adapter roots, a token file and a running server.
class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    models_ = tmp_.File("models");
    adapters_ = tmp_.File("adapters");
    fs::create_directories(models_);
    fs::create_directories(adapters_);
    token_file_ = tmp_.File("token");
    std::ofstream(token_file_) << kToken << "\n";
  }

  void StartServer(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--admin_token_file=" + token_file_, "--model_root=" + models_,
                                     "--adapter_root=" + adapters_};
    args.insert(args.end(), extra.begin(), extra.end());
    server_ = std::make_unique<ServerProcess>(args);
    ASSERT_TRUE(server_->ok()) << server_->Stderr();
    stub_ = server_->Stub();
  }

  // The embedded default model, built in this process as the server builds it.
  const server::ModelInstance& LocalDefault() {
    if (local_ == nullptr) {
      auto r = local_manager_.LoadEmbedded("default");
      EXPECT_TRUE(r.ok()) << r.status();
      local_ = r->instance;
    }
    return *local_;
  }

  TempDir tmp_;
  std::string models_, adapters_, token_file_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<pb::DiffusionService::Stub> stub_;
  server::ModelManager local_manager_;
  server::InstancePtr local_;
};

// ------------------------------------------------------------------------------------------------

TEST_F(ServerTest, ListModelsAndGetMetadata) {
  StartServer();
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  ASSERT_EQ(list.models_size(), 1);
  const pb::ModelInstance& m = list.models(0);
  EXPECT_EQ(m.name(), "default");
  EXPECT_EQ(m.state(), pb::READY);
  EXPECT_EQ(m.class_name(), "FluxTransformer2DModel");
  EXPECT_EQ(m.family(), "flux");
  EXPECT_EQ(m.dtype(), "float32");
  EXPECT_EQ(m.device(), "cpu");
  EXPECT_EQ(m.source(), "embedded");
  EXPECT_EQ(m.parameter_bytes(), LocalDefault().parameter_bytes);

  auto spec = ModelRegistry::Global().Find("flux");
  ASSERT_TRUE(spec.ok());
  for (const std::string name : {"default", "FluxTransformer2DModel", "flux"}) {
    SCOPED_TRACE(name);
    pb::GetMetadataRequest req;
    req.set_name(name);
    pb::GetMetadataResponse md;
    ASSERT_TRUE(stub_->GetMetadata(Context().get(), req, &md).ok());
    EXPECT_EQ(md.class_name(), "FluxTransformer2DModel");
    EXPECT_EQ(md.family(), "flux");
    EXPECT_EQ(md.table(), BuildModelMetadata(**spec).Render(false));
    bool lora = false, mapping = false;
    for (const pb::FeatureRow& row : md.features()) {
      if (row.attribute() == "_lora") {
        lora = true;
        ASSERT_TRUE(row.has_list_value());
        EXPECT_THAT(row.list_value().values(), Contains("kohya"));
        EXPECT_FALSE(row.docs_url().empty());
      }
      if (row.attribute() == "_weight_mapping") {
        mapping = true;
        EXPECT_THAT(row.list_value().values(), Contains("flux-dev"));
      }
    }
    EXPECT_TRUE(lora && mapping);
    EXPECT_EQ(md.limits().default_guidance(), 3.5);
    EXPECT_EQ(md.has_instance(), name == "default");
    if (name == "default") {
      EXPECT_EQ(md.instance().state(), pb::READY);
      EXPECT_THAT(md.required_inputs(), Contains("guidance"));
      EXPECT_EQ(nlohmann::json::parse(md.config_json())["in_channels"], 16);
    }
  }
  pb::GetMetadataRequest verbose;
  verbose.set_name("flux");
  verbose.set_verbose(true);
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), verbose, &md).ok());
  EXPECT_EQ(md.table(), BuildModelMetadata(**spec).Render(true));

  pb::GetMetadataRequest unknown;
  unknown.set_name("NoSuchModel");
  grpc::Status s = stub_->GetMetadata(Context().get(), unknown, &md);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("NoSuchModel"));
  s = stub_->GetMetadata(Context().get(), {}, &md);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("name"));
}

TEST_F(ServerTest, GenerateStreamsProgressThenLatentsEqualToInProcess) {
  StartServer();
  const TensorMap inputs = FluxInputs(32, 32, 7);
  const Outcome o = Generate(*stub_, MakeRequest("", inputs, 16, 3));
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  ASSERT_EQ(o.progress.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(o.progress[i].step(), i + 1);
    EXPECT_EQ(o.progress[i].total_steps(), 3);
  }
  ASSERT_TRUE(o.result.has_value());
  EXPECT_EQ(o.result->model(), "default");
  EXPECT_EQ(o.result->seed(), 42);
  EXPECT_EQ(o.result->steps(), 3);
  EXPECT_EQ(o.result->guidance(), 3.5);
  EXPECT_THAT(o.result->latent_shape(), ::testing::ElementsAre(1, 16, 16));
  const torch::Tensor local = InProcess(*LocalDefault().host, inputs, 16, 3, nullptr);
  ExpectSameLatents(o.latents, local);
  // The denoised latents differ from the noise, and explicit latents give the same result.
  auto noise = SeededNoise({1, 16, 16}, 42, torch::kFloat32, torch::kCPU);
  EXPECT_GT((o.latents - *noise).abs().max().item<double>(), 1e-3);
  pb::GenerateRequest explicit_latents = MakeRequest("default", inputs, 16, 3);
  explicit_latents.clear_latent_shape();
  *explicit_latents.mutable_latents() = ToProto(*noise);
  const Outcome e = Generate(*stub_, explicit_latents);
  ASSERT_TRUE(e.status.ok()) << e.status.error_message();
  ExpectSameLatents(e.latents, local);
}

TEST_F(ServerTest, LoRALifecycleOnTheDefaultModel) {
  StartServer({"--max_inline_lora_bytes=1048576"});
  // A synthetic diffusers LoRA on every linear of the embedded model.
  const TensorMap params = NamedTensors(LocalDefault().model().module());
  const TensorMap lora =
      test::MakeDiffusersLora(params, test::LinearModules(params), /*rank=*/2, /*seed=*/5);
  const std::string file = adapters_ + "/synth.safetensors";
  ASSERT_TRUE(WriteSafetensors(file, lora).ok());

  pb::LoadLoRARequest load;
  load.set_model("default");
  load.set_name("synth");
  load.set_path("synth.safetensors");
  pb::LoadLoRAResponse loaded;
  grpc::Status s = stub_->LoadLoRA(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.adapter().name(), "synth");
  EXPECT_EQ(loaded.adapter().format(), "diffusers");
  EXPECT_EQ(loaded.adapter().sha256().size(), 64u);
  EXPECT_EQ(loaded.report().format(), "diffusers");
  EXPECT_EQ(loaded.report().modules_size(), static_cast<int>(test::LinearModules(params).size()));
  EXPECT_FALSE(loaded.report().text().empty());

  // The same bytes inline, as a second adapter.
  pb::LoadLoRARequest inline_load;
  inline_load.set_name("synth-inline");
  inline_load.set_inline_bytes(test::ReadFileBytes(file));
  s = stub_->LoadLoRA(Context(60, true).get(), inline_load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.adapter().source(), "inline");
  EXPECT_THAT(loaded.report().text(), ::testing::Not(HasSubstr("ds-inline-lora")));
  // Over the inline cap: RESOURCE_EXHAUSTED before anything is parsed.
  inline_load.set_name("too-big");
  inline_load.set_inline_bytes(std::string(1048577, 'x'));
  s = stub_->LoadLoRA(Context(60, true).get(), inline_load, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("inline_bytes"));

  pb::ListLoRAsRequest list_req;
  list_req.set_model("default");
  pb::ListLoRAsResponse list;
  ASSERT_TRUE(stub_->ListLoRAs(Context().get(), list_req, &list).ok());
  ASSERT_EQ(list.adapters_size(), 2);
  EXPECT_EQ(list.adapters(0).name(), "synth");
  EXPECT_GT(list.memory_used_bytes(), 0);
  pb::ListModelsResponse models;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &models).ok());
  EXPECT_EQ(models.models(0).adapters_size(), 2);

  // Generate with the adapter equals the in-process run with the same adapter.
  const TensorMap inputs = FluxInputs(32, 32, 9);
  pb::GenerateRequest req = MakeRequest("default", inputs, 16, 2);
  pb::AdapterWeight* a = req.add_adapters();
  a->set_name("synth");
  a->set_weight(0.8);
  const Outcome o = Generate(*stub_, req);
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  ASSERT_EQ(o.result->adapters_size(), 1);
  EXPECT_EQ(o.result->adapters(0).name(), "synth");
  EXPECT_EQ(o.result->adapters(0).weight(), 0.8);
  EXPECT_EQ(o.result->adapters(0).sha256(), list.adapters(0).sha256());
  LoraHost& host = *LocalDefault().host;
  ASSERT_TRUE(host.Load("synth", file).ok());
  auto stack = host.Snapshot({{"synth", 0.8}});
  ASSERT_TRUE(stack.ok());
  ExpectSameLatents(o.latents, InProcess(host, inputs, 16, 2, stack->get()));
  const torch::Tensor base = InProcess(host, inputs, 16, 2, nullptr);
  EXPECT_GT((o.latents - base).abs().max().item<double>(), 1e-6) << "the adapter changed nothing";

  pb::UnloadLoRARequest unload;
  unload.set_model("default");
  unload.set_name("synth");
  pb::UnloadLoRAResponse unloaded;
  ASSERT_TRUE(stub_->UnloadLoRA(Context(60, true).get(), unload, &unloaded).ok());
  ASSERT_TRUE(stub_->ListLoRAs(Context().get(), list_req, &list).ok());
  ASSERT_EQ(list.adapters_size(), 1);
  EXPECT_EQ(list.adapters(0).name(), "synth-inline");
  const Outcome gone = Generate(*stub_, req);
  EXPECT_EQ(gone.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(gone.status.error_message(), HasSubstr("synth"));
  EXPECT_EQ(stub_->UnloadLoRA(Context(60, true).get(), unload, &unloaded).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, LoadSingleFileGoldenLoRAReplaceAndUnload) {
  StartServer();
  // The golden LoRA base model (a diffusers folder) and the flux-dev single file, copied under
  // the model root; the golden diffusers LoRA under the adapter root.
  const fs::path golden = GoldenDir();
  fs::copy(golden / "lora" / "base_model_dir", fs::path(models_) / "base_model_dir",
           fs::copy_options::recursive);
  fs::copy_file(golden / "single_file" / "flux-dev" / "original.safetensors",
                fs::path(models_) / "flux-dev.safetensors");
  fs::copy_file(golden / "lora" / "diffusers" / "input.safetensors",
                fs::path(adapters_) / "golden-diffusers.safetensors");

  // Watch the instance's health before it exists.
  auto health = grpc::health::v1::Health::NewStub(server_->NewChannel());
  grpc::ClientContext watch_ctx;
  HealthCheckRequest watch_req;
  watch_req.set_service("golden");
  auto watch = health->Watch(&watch_ctx, watch_req);
  HealthCheckResponse h;
  ASSERT_TRUE(watch->Read(&h));
  EXPECT_EQ(h.status(), HealthCheckResponse::SERVICE_UNKNOWN);

  pb::LoadSingleFileRequest load;
  load.set_name("golden");
  load.set_path("base_model_dir");
  pb::LoadSingleFileResponse loaded;
  grpc::Status s = stub_->LoadSingleFile(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.instance().state(), pb::READY);
  EXPECT_EQ(loaded.instance().class_name(), "FluxTransformer2DModel");
  EXPECT_EQ(loaded.instance().sha256().size(), 64u);
  EXPECT_THAT(loaded.report(), HasSubstr("diffusers model folder"));
  ASSERT_TRUE(watch->Read(&h));
  EXPECT_EQ(h.status(), HealthCheckResponse::SERVING);
  // Loading the name again without replace is refused.
  EXPECT_EQ(stub_->LoadSingleFile(Context(60, true).get(), load, &loaded).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  pb::LoadLoRARequest lora;
  lora.set_model("golden");
  lora.set_name("g");
  lora.set_path("golden-diffusers.safetensors");
  pb::LoadLoRAResponse lora_loaded;
  s = stub_->LoadLoRA(Context(60, true).get(), lora, &lora_loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(lora_loaded.report().format(), "diffusers");

  // Generate on the golden model with the golden LoRA equals the in-process run.
  const TensorMap inputs = FluxInputs(32, 32, 11);
  pb::GenerateRequest req = MakeRequest("golden", inputs, 4, 2);
  req.add_adapters()->set_name("g");
  const Outcome o = Generate(*stub_, req);
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_EQ(o.result->model_sha256(), loaded.instance().sha256());
  auto base = LoadModelFromFolder((golden / "lora" / "base_model_dir").string(), ModelOptions{});
  ASSERT_TRUE(base.ok()) << base.status();
  auto spec = ModelRegistry::Global().Find("flux");
  LoraHost host(std::shared_ptr<DiffusionModel>(std::move(*base)), (*spec)->lora);
  ASSERT_TRUE(host.Load("g", (golden / "lora" / "diffusers" / "input.safetensors").string()).ok());
  auto stack = host.Snapshot({{"g", 1.0}});
  ASSERT_TRUE(stack.ok());
  ExpectSameLatents(o.latents, InProcess(host, inputs, 4, 2, stack->get()));

  // Replace with the flux-dev single file (same shapes; RoPE axes given as a config override).
  load.set_path("flux-dev.safetensors");
  load.set_replace(true);
  load.set_config_json(R"({"axes_dims_rope": [4, 4, 8]})");
  s = stub_->LoadSingleFile(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.instance().variant(), "flux-dev");
  EXPECT_EQ(loaded.instance().adapters_size(), 0);  // a new instance: its own adapter store
  EXPECT_THAT(loaded.report(), HasSubstr("flux-dev"));
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_EQ(list.models(1).name(), "golden");
  EXPECT_EQ(list.models(1).variant(), "flux-dev");
  EXPECT_TRUE(absl::EndsWith(list.models(1).source(), "flux-dev.safetensors"));

  pb::UnloadModelRequest unload;
  unload.set_name("golden");
  pb::UnloadModelResponse unloaded;
  ASSERT_TRUE(stub_->UnloadModel(Context(60, true).get(), unload, &unloaded).ok());
  // (The replacement re-announced SERVING.)
  bool not_serving = false;
  for (int i = 0; i < 3 && !not_serving && watch->Read(&h); ++i) {
    not_serving = h.status() == HealthCheckResponse::NOT_SERVING;
  }
  EXPECT_TRUE(not_serving);
  watch_ctx.TryCancel();
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  EXPECT_EQ(list.models_size(), 1);
  EXPECT_EQ(Generate(*stub_, req).status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(stub_->UnloadModel(Context(60, true).get(), unload, &unloaded).error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, PreloadConfigLoadsModelsAndAdaptersAfterStart) {
  const fs::path golden = GoldenDir();
  fs::copy(golden / "lora" / "base_model_dir", fs::path(models_) / "base_model_dir",
           fs::copy_options::recursive);
  fs::copy_file(golden / "lora" / "diffusers" / "input.safetensors",
                fs::path(adapters_) / "golden-diffusers.safetensors");
  const std::string config = tmp_.File("preload.json");
  std::ofstream(config) << R"({
    "models": [{"name": "default", "embedded": true}, {"name": "golden", "path": "base_model_dir"}],
    "adapters": [{"model": "golden", "name": "g", "path": "golden-diffusers.safetensors",
                  "pin": true}]})";
  StartServer({"--config=" + config});
  // Configured models load after the port opens; health says when each is READY.
  auto health = grpc::health::v1::Health::NewStub(server_->NewChannel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  HealthCheckRequest req;
  req.set_service("golden");
  auto watch = health->Watch(&ctx, req);
  HealthCheckResponse h;
  while (watch->Read(&h) && h.status() != HealthCheckResponse::SERVING) {
  }
  EXPECT_EQ(h.status(), HealthCheckResponse::SERVING);
  ctx.TryCancel();
  (void)watch->Finish();
  pb::ListLoRAsRequest list_req;
  list_req.set_model("golden");
  pb::ListLoRAsResponse list;
  // The adapter is loaded right after the model; give it a moment.
  const auto start = Clock::now();
  do {
    ASSERT_TRUE(stub_->ListLoRAs(Context().get(), list_req, &list).ok());
  } while (list.adapters_size() == 0 && Since(start) < 10);
  ASSERT_EQ(list.adapters_size(), 1);
  EXPECT_EQ(list.adapters(0).name(), "g");
  EXPECT_TRUE(list.adapters(0).pinned());
  pb::ListModelsResponse models;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &models).ok());
  EXPECT_EQ(models.models_size(), 2);
}

TEST_F(ServerTest, EachStatusCodeFromARealBadRequest) {
  StartServer();
  const TensorMap inputs = FluxInputs(32, 32, 3);
  // Unknown model.
  Outcome o = Generate(*stub_, MakeRequest("nope", inputs, 16, 1));
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(o.status.error_message(), HasSubstr("nope"));
  // Bad fields, each named.
  struct Bad {
    std::function<void(pb::GenerateRequest&)> mutate;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {[](pb::GenerateRequest& r) { r.set_steps(-1); }, "steps"},
      {[](pb::GenerateRequest& r) { r.set_guidance(-2); }, "guidance"},
      {[](pb::GenerateRequest& r) { r.clear_latent_shape(); }, "latent_shape"},
      {[](pb::GenerateRequest& r) { (*r.mutable_inputs())["bogus"] = ToProto(torch::ones({1})); },
       "inputs['bogus']"},
      {[](pb::GenerateRequest& r) { r.mutable_inputs()->erase("txt_ids"); }, "inputs['txt_ids']"},
      {[](pb::GenerateRequest& r) { (*r.mutable_inputs())["txt_ids"].mutable_data()->resize(3); },
       "inputs['txt_ids'].data"},
      {[](pb::GenerateRequest& r) { r.add_adapters()->set_weight(1); }, "adapters[0].name"},
      {[](pb::GenerateRequest& r) {
         (*r.mutable_inputs())["encoder_hidden_states"] = ToProto(torch::ones({1, 8, 31}));
       },
       "encoder_hidden_states"},
  };
  for (const Bad& b : bad) {
    pb::GenerateRequest r = MakeRequest("default", inputs, 16, 1);
    b.mutate(r);
    o = Generate(*stub_, r);
    EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << b.field;
    EXPECT_THAT(o.status.error_message(), HasSubstr(b.field));
  }

  // Management without a token, with a wrong one.
  pb::LoadLoRARequest load;
  load.set_name("x");
  load.set_path("x.safetensors");
  pb::LoadLoRAResponse resp;
  grpc::Status s = stub_->LoadLoRA(Context().get(), load, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  s = stub_->LoadLoRA(Context(60, true, "wrong-token-0123456789abc").get(), load, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  pb::UnloadModelRequest unload;
  unload.set_name("default");
  pb::UnloadModelResponse unloaded;
  EXPECT_EQ(stub_->UnloadModel(Context().get(), unload, &unloaded).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);

  // Paths escaping the roots: traversal and a symlink (the target exists, outside the root).
  const std::string outside = tmp_.File("outside.safetensors");
  std::ofstream(outside) << "not a lora";
  fs::create_symlink(outside, fs::path(adapters_) / "escape.safetensors");
  fs::create_directory_symlink(tmp_.path(), fs::path(models_) / "escape-dir");
  for (const std::string path : {"../../etc/passwd", "escape.safetensors", "/etc/passwd"}) {
    load.set_path(path);
    s = stub_->LoadLoRA(Context(60, true).get(), load, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << path << s.error_message();
  }
  pb::LoadSingleFileRequest single;
  single.set_name("evil");
  pb::LoadSingleFileResponse single_resp;
  for (const std::string path : {"../../etc/passwd", "escape-dir/outside.safetensors"}) {
    single.set_path(path);
    s = stub_->LoadSingleFile(Context(60, true).get(), single, &single_resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << path << s.error_message();
  }
  // A missing file inside the root; a file that is no LoRA.
  load.set_path("missing.safetensors");
  EXPECT_EQ(stub_->LoadLoRA(Context(60, true).get(), load, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  std::ofstream(adapters_ + "/junk.safetensors") << "junk";
  load.set_path("junk.safetensors");
  EXPECT_EQ(stub_->LoadLoRA(Context(60, true).get(), load, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  load.clear_source();
  s = stub_->LoadLoRA(Context(60, true).get(), load, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("source"));
  single.set_path("x");
  single.set_name("bad name!");
  s = stub_->LoadSingleFile(Context(60, true).get(), single, &single_resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("name"));
}

TEST_F(ServerTest, QueueFullDeadlineAndCancelStopWithinOneStep) {
  StartServer({"--workers=1", "--queue_capacity=1", "--max_steps=100000"});
  const TensorMap inputs = FluxInputs(32, 32, 5);
  const pb::GenerateRequest slow = MakeRequest("default", inputs, 16, 100000);
  const pb::GenerateRequest quick = MakeRequest("default", inputs, 16, 1);

  // One running, one queued, the third is refused at once.
  std::atomic<bool> running{false};
  auto first_ctx = Context(60);
  Outcome first, second;
  std::thread t1([&] {
    first =
        Generate(*stub_, slow, first_ctx.get(), [&](grpc::ClientContext&, int) { running = true; });
  });
  const auto wait_start = Clock::now();
  while (!running && Since(wait_start) < 30)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(running.load());
  auto second_ctx = Context(60);
  auto second_stub = server_->Stub();
  std::thread t2([&] {
    auto reader = second_stub->Generate(second_ctx.get(), slow);
    pb::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    second.status = reader->Finish();
  });
  // Once the second is queued (the server's queue-depth gauge says so), a third is refused.
  const auto queued_start = Clock::now();
  while (!absl::StrContains(HttpGet(server_->metrics_port(), "/metrics"),
                            "diffusion_queue_depth{device=\"cpu\"} 1") &&
         Since(queued_start) < 20) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto t3_start = Clock::now();
  const Outcome third = Generate(*stub_, quick, 10);
  EXPECT_EQ(third.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << third.status.error_message();
  EXPECT_THAT(third.status.error_message(), HasSubstr("queue is full"));
  EXPECT_LT(Since(t3_start), 5.0);

  // Client cancellation: the running request stops within one step, the queued one after it.
  const auto cancel_at = Clock::now();
  first_ctx->TryCancel();
  second_ctx->TryCancel();
  t1.join();
  t2.join();
  EXPECT_EQ(first.status.error_code(), grpc::StatusCode::CANCELLED) << first.status.error_message();
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_GT(first.progress.size(), 0u);
  // The single worker is free again: a quick request runs at once.
  Outcome after;
  do {
    after = Generate(*stub_, quick, 10);
  } while (after.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
           Since(cancel_at) < 10);
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_LT(Since(cancel_at), 2.0) << "the cancelled worker kept running";

  // Deadline: many steps, 300 ms.
  const auto deadline_start = Clock::now();
  const Outcome late = Generate(*stub_, slow, 0.3);
  EXPECT_EQ(late.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(late.progress.size(), 0u);
  after = Generate(*stub_, quick, 10);
  EXPECT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_LT(Since(deadline_start), 2.3) << "the worker kept running past the deadline";

  // The server saw and counted them, and its worker logged where it stopped.
  const std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("diffusion_requests_total{code=\"CANCELLED\",model=\"default\","
                                 "rpc=\"Generate\"} 2"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_requests_total{code=\"RESOURCE_EXHAUSTED\","
                                 "model=\"default\",rpc=\"Generate\"}"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_requests_total{code=\"DEADLINE_EXCEEDED\","
                                 "model=\"default\",rpc=\"Generate\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_denoise_step_seconds_count{model=\"default\"}"));
  EXPECT_THAT(server_->Stderr(), HasSubstr("cancelled after step"));
}

TEST_F(ServerTest, HealthReflectionAndMetrics) {
  StartServer();
  auto health = grpc::health::v1::Health::NewStub(server_->NewChannel());
  for (const std::string service : {"", "default"}) {
    HealthCheckRequest req;
    req.set_service(service);
    HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(Context().get(), req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING) << service;
  }
  HealthCheckRequest unknown;
  unknown.set_service("no-such-model");
  HealthCheckResponse resp;
  EXPECT_EQ(health->Check(Context().get(), unknown, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext ctx;
    HealthCheckRequest req;
    req.set_service("default");
    auto watch = health->Watch(&ctx, req);
    ASSERT_TRUE(watch->Read(&resp));
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING);
    ctx.TryCancel();
    (void)watch->Finish();
  }

  // Reflection lists the services and serves the API's file descriptor.
  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(server_->NewChannel());
  grpc::ClientContext ctx;
  auto stream = reflection->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse answer;
  ASSERT_TRUE(stream->Read(&answer));
  std::vector<std::string> services;
  for (const auto& s : answer.list_services_response().service()) services.push_back(s.name());
  EXPECT_THAT(services, Contains("diffusion.v1.DiffusionService"));
  EXPECT_THAT(services, Contains("grpc.health.v1.Health"));
  grpc::reflection::v1alpha::ServerReflectionRequest symbol;
  symbol.set_file_containing_symbol("diffusion.v1.DiffusionService");
  ASSERT_TRUE(stream->Write(symbol));
  ASSERT_TRUE(stream->Read(&answer));
  ASSERT_GT(answer.file_descriptor_response().file_descriptor_proto_size(), 0);
  EXPECT_THAT(answer.file_descriptor_response().file_descriptor_proto(0),
              HasSubstr("diffusion/v1/diffusion.proto"));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  // Prometheus text on the metrics port, counting the calls above.
  pb::ListModelsResponse models;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &models).ok());
  const std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("200 OK"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_requests_total{code=\"OK\",model=\"\","
                                 "rpc=\"ListModels\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_process_resident_memory_bytes"));
}

TEST_F(ServerTest, TlsWhenGivenACertificateAndKey) {
  const std::string cert = tmp_.File("cert.pem"), key = tmp_.File("key.pem");
  const std::string cmd = absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=IP:127.0.0.1 -keyout ",
      key, " -out ", cert, " >/dev/null 2>&1");
  if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "no openssl command to make a certificate";
  StartServer({"--tls_cert=" + cert, "--tls_key=" + key});
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = test::ReadFileBytes(cert);
  auto secure = pb::DiffusionService::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->port()), grpc::SslCredentials(ssl)));
  pb::ListModelsResponse list;
  grpc::Status s = secure->ListModels(Context().get(), {}, &list);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(list.models_size(), 1);
  // A plaintext client cannot talk to it.
  EXPECT_EQ(stub_->ListModels(Context(5).get(), {}, &list).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  // A certificate without its key is a start-up error.
  ServerProcess half({"--tls_cert=" + cert});
  EXPECT_FALSE(half.ok());
  EXPECT_NE(half.WaitExit(10), 0);
  EXPECT_THAT(half.Stderr(), HasSubstr("--tls_key"));
}

TEST_F(ServerTest, ManagementWithoutTokenConfigIsRefusedAndSigtermDrains) {
  // No --admin_token_file and no --insecure_allow_management.
  server_ = std::make_unique<ServerProcess>(
      std::vector<std::string>{"--adapter_root=" + adapters_, "--grace_period_s=20"});
  ASSERT_TRUE(server_->ok()) << server_->Stderr();
  stub_ = server_->Stub();
  pb::LoadLoRARequest load;
  load.set_name("x");
  load.set_inline_bytes("x");
  pb::LoadLoRAResponse resp;
  for (bool with_token : {false, true}) {
    grpc::Status s = stub_->LoadLoRA(Context(60, with_token).get(), load, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("--admin_token_file"));
  }

  // SIGTERM during a running Generate: the stream completes, new calls are refused, exit 0.
  const TensorMap inputs = FluxInputs(32, 32, 13);
  const pb::GenerateRequest req = MakeRequest("default", inputs, 16, 1000);
  std::atomic<bool> started{false}, done{false};
  Outcome running;
  std::thread t([&] {
    running = Generate(*stub_, req, 60, [&](grpc::ClientContext&, int) { started = true; });
    done = true;
  });
  const auto wait_start = Clock::now();
  while (!started && !done && Since(wait_start) < 30) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (!started) {
    t.join();
    FAIL() << "Generate did not start: " << running.status.error_message();
  }
  // A health watcher sees the drain.
  auto health = grpc::health::v1::Health::NewStub(server_->NewChannel());
  grpc::ClientContext watch_ctx;
  HealthCheckRequest watch_req;
  watch_req.set_service("default");
  auto watch = health->Watch(&watch_ctx, watch_req);
  HealthCheckResponse h;
  ASSERT_TRUE(watch->Read(&h));
  EXPECT_EQ(h.status(), HealthCheckResponse::SERVING);
  const auto sigterm_at = Clock::now();
  server_->Signal(SIGTERM);
  ASSERT_TRUE(watch->Read(&h));
  EXPECT_EQ(h.status(), HealthCheckResponse::NOT_SERVING);
  // New calls are refused (on a new connection and on the existing one) while it drains.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  pb::ListModelsResponse list;
  grpc::Status refused = server_->Stub()->ListModels(Context(5).get(), {}, &list);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  refused = stub_->ListModels(Context(5).get(), {}, &list);
  EXPECT_FALSE(refused.ok());
  t.join();
  ASSERT_TRUE(running.status.ok()) << running.status.error_message();
  EXPECT_EQ(running.progress.size(), 1000u);
  ASSERT_TRUE(running.result.has_value());
  EXPECT_EQ(running.result->steps(), 1000);
  EXPECT_EQ(server_->WaitExit(30), 0) << server_->Stderr();
  // Drained as soon as the running call finished (an open Watch does not hold the 20 s grace).
  EXPECT_LT(Since(sigterm_at), 10.0);
  watch_ctx.TryCancel();
  (void)watch->Finish();
}

// ------------------------------------------------------------------------------------------------
// Pipeline instances: a diffusers pipeline folder (model_index.json) served as images.

// The server's embedded models without any flag: "flux-tiny" (a demo pipeline written to files on
// first run and loaded from them) next to the bare "default" transformer; Generate end to end.
TEST_F(ServerTest, EmbeddedFluxTinyServesPngsEndToEnd) {
  const std::string embedded = tmp_.File("embedded-cache");
  StartServer({"--embedded_models=default,flux-tiny", "--embedded_dir=" + embedded});
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  std::map<std::string, pb::ModelInstance> models;
  for (const pb::ModelInstance& m : list.models()) models[m.name()] = m;
  ASSERT_EQ(models.count("default"), 1u);
  ASSERT_EQ(models.count("flux-tiny"), 1u);
  const pb::ModelInstance& tiny = models["flux-tiny"];
  EXPECT_EQ(tiny.pipeline_class(), "FluxPipeline");
  EXPECT_EQ(tiny.state(), pb::READY);
  EXPECT_EQ(tiny.source(), embedded + "/flux-tiny/pipeline");
  EXPECT_EQ(tiny.sha256().size(), 64u);
  EXPECT_TRUE(fs::exists(embedded + "/flux-tiny/single_file/flux-tiny.safetensors"));
  EXPECT_TRUE(fs::exists(embedded + "/flux-tiny/single_file/ae.safetensors"));

  pb::GetMetadataRequest md_req;
  md_req.set_name("flux-tiny");
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &md).ok());
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  torch::manual_seed(5);
  auto request = [&](int64_t seed) {
    pb::GenerateRequest r;
    r.set_model("flux-tiny");
    *r.mutable_prompt_embeds() = ToProto(torch::randn({4, md.limits().prompt_embeds_dim()}));
    *r.mutable_pooled_prompt_embeds() = ToProto(torch::randn({md.limits().pooled_prompt_embeds_dim()}));
    r.set_width(3 * multiple);
    r.set_height(2 * multiple);
    r.set_steps(2);
    r.set_seed(seed);
    return r;
  };
  const pb::GenerateRequest base_request = request(77);
  const Outcome a = Generate(*stub_, base_request);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_EQ(a.result->images_size(), 1);
  auto rgb = DecodePng(a.result->images(0));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_THAT(rgb->sizes().vec(), ::testing::ElementsAre(2 * multiple, 3 * multiple, 3));
  const Outcome same = Generate(*stub_, base_request);
  ASSERT_TRUE(same.status.ok());
  EXPECT_EQ(same.result->images(0), a.result->images(0));
  pb::GenerateRequest reseeded = base_request;
  reseeded.set_seed(78);
  const Outcome other = Generate(*stub_, reseeded);
  ASSERT_TRUE(other.status.ok());
  EXPECT_NE(other.result->images(0), a.result->images(0));

  // An adapter for the demo's transformer (built from the files the server wrote): weight 0 gives
  // the base image bit for bit, weight 1 changes it.
  auto transformer = LoadModelFromFolder(embedded + "/flux-tiny/pipeline/transformer", {});
  ASSERT_TRUE(transformer.ok()) << transformer.status();
  const TensorMap params = NamedTensors((*transformer)->module());
  ASSERT_TRUE(WriteSafetensors(adapters_ + "/tiny-lora.safetensors",
                               test::MakeDiffusersLora(params, test::LinearModules(params), 2, 4))
                  .ok());
  pb::LoadLoRARequest load;
  load.set_model("flux-tiny");
  load.set_name("tiny");
  load.set_path("tiny-lora.safetensors");
  pb::LoadLoRAResponse loaded;
  grpc::Status s = stub_->LoadLoRA(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::GenerateRequest zero = base_request;
  pb::AdapterWeight* w = zero.add_adapters();
  w->set_name("tiny");
  w->set_weight(0.0);
  const Outcome z = Generate(*stub_, zero);
  ASSERT_TRUE(z.status.ok()) << z.status.error_message();
  EXPECT_EQ(z.result->images(0), a.result->images(0));
  pb::GenerateRequest one = base_request;
  one.add_adapters()->set_name("tiny");
  const Outcome o = Generate(*stub_, one);
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  EXPECT_NE(o.result->images(0), a.result->images(0));

  // The same file with default weight 0: named without a weight it gives the base image; an
  // explicit weight 1 gives what "tiny" (default 1) gives.
  pb::LoadLoRARequest quiet = load;
  quiet.set_name("quiet");
  quiet.set_default_weight(0.0);
  pb::LoadLoRAResponse quiet_loaded;
  s = stub_->LoadLoRA(Context(60, true).get(), quiet, &quiet_loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::ListLoRAsRequest list_req;
  list_req.set_model("flux-tiny");
  pb::ListLoRAsResponse listed;
  ASSERT_TRUE(stub_->ListLoRAs(Context().get(), list_req, &listed).ok());
  for (const pb::LoRAInfo& info : listed.adapters()) {
    EXPECT_EQ(info.default_weight(), info.name() == "quiet" ? 0.0 : 1.0) << info.name();
  }
  pb::GenerateRequest unweighted = base_request;
  unweighted.add_adapters()->set_name("quiet");
  const Outcome q = Generate(*stub_, unweighted);
  ASSERT_TRUE(q.status.ok()) << q.status.error_message();
  EXPECT_EQ(q.result->images(0), a.result->images(0));
  ASSERT_EQ(q.result->adapters_size(), 1);
  EXPECT_EQ(q.result->adapters(0).weight(), 0.0);
  pb::GenerateRequest weighted = base_request;
  pb::AdapterWeight* qw = weighted.add_adapters();
  qw->set_name("quiet");
  qw->set_weight(1.0);
  const Outcome q1 = Generate(*stub_, weighted);
  ASSERT_TRUE(q1.status.ok()) << q1.status.error_message();
  EXPECT_EQ(q1.result->images(0), o.result->images(0));
  quiet.set_name("bad-default");
  quiet.set_default_weight(std::nan(""));
  EXPECT_EQ(stub_->LoadLoRA(Context(60, true).get(), quiet, &quiet_loaded).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // A size that is not a multiple: INVALID_ARGUMENT naming the nearest valid sizes.
  pb::GenerateRequest odd = base_request;
  odd.set_width(3 * multiple + 1);
  const Outcome bad = Generate(*stub_, odd);
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.status.error_message(), HasSubstr(std::to_string(3 * multiple)));
}

// The embedded default end to end from text: flux-tiny's generated tokenizers and tiny CLIP/T5
// encoders turn a prompt into a PNG over gRPC; the same prompt gives the same bytes, another
// prompt another image, and an over-long prompt is truncated and reported.
TEST_F(ServerTest, EmbeddedFluxTinyTakesATextPromptAndReturnsAPng) {
  StartServer({"--embedded_models=default,flux-tiny", "--embedded_dir=" + tmp_.File("embedded")});
  pb::GetMetadataRequest md_req;
  md_req.set_name("flux-tiny");
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &md).ok());
  EXPECT_TRUE(md.limits().accepts_text_prompt());
  EXPECT_GT(md.limits().max_sequence_length(), 0);
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  auto request = [&](const std::string& prompt) {
    pb::GenerateRequest r;
    r.set_model("flux-tiny");
    r.add_prompt(prompt);
    r.set_max_sequence_length(32);
    r.set_width(2 * multiple);
    r.set_height(multiple);
    r.set_steps(2);
    r.set_seed(9);
    return r;
  };
  const Outcome cat = Generate(*stub_, request("a red circle"));
  ASSERT_TRUE(cat.status.ok()) << cat.status.error_message();
  ASSERT_EQ(cat.result->images_size(), 1);
  auto rgb = DecodePng(cat.result->images(0));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_THAT(rgb->sizes().vec(), ::testing::ElementsAre(multiple, 2 * multiple, 3));
  EXPECT_EQ(cat.result->truncated_prompts_size(), 0);
  EXPECT_GT(cat.result->encode_seconds(), 0.0);

  const Outcome again = Generate(*stub_, request("a red circle"));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.result->images(0), cat.result->images(0));
  const Outcome fox = Generate(*stub_, request("a green star"));
  ASSERT_TRUE(fox.status.ok()) << fox.status.error_message();
  EXPECT_NE(fox.result->images(0), cat.result->images(0));

  std::string long_prompt;
  for (int i = 0; i < 40; ++i) long_prompt += "a misty forest path covered with autumn leaves, ";
  const Outcome cut = Generate(*stub_, request(long_prompt));
  ASSERT_TRUE(cut.status.ok()) << cut.status.error_message();
  ASSERT_EQ(cut.result->images_size(), 1);
  std::set<std::string> tokenizers;
  for (const pb::TruncatedPrompt& t : cut.result->truncated_prompts()) {
    tokenizers.insert(t.tokenizer());
    EXPECT_GT(t.tokens(), t.max_length());
  }
  EXPECT_EQ(tokenizers, (std::set<std::string>{"tokenizer", "tokenizer_2"}));

  // Text and embeddings together: INVALID_ARGUMENT.
  pb::GenerateRequest both = request("a cat");
  *both.mutable_prompt_embeds() = ToProto(torch::zeros({4, md.limits().prompt_embeds_dim()}));
  EXPECT_EQ(Generate(*stub_, both).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

class ServerPipelineTest : public ServerTest {
 protected:
  static fs::path GoldenPipelines() { return fs::path(GoldenDir()) / "pipeline" / "flux_pipeline"; }

  // Copies the golden dev pipeline folder under the model root and loads it as `name`.
  void LoadPipeline(const std::string& name) {
    fs::copy(GoldenPipelines() / "dev", fs::path(models_) / "flux-dev-pipeline",
             fs::copy_options::recursive);
    pb::LoadSingleFileRequest load;
    load.set_name(name);
    load.set_path("flux-dev-pipeline");
    grpc::Status s = stub_->LoadSingleFile(Context(60, true).get(), load, &loaded_);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::ifstream cases(GoldenPipelines() / "cases.json");
    case_ = nlohmann::json::parse(cases)["cases"]["dev_dynamic_n2"];
    auto golden = LoadSafetensorsWeights((GoldenPipelines() / case_["file"].get<std::string>()).string());
    ASSERT_TRUE(golden.ok()) << golden.status();
    golden_ = *std::move(golden);
    width_ = case_["width"].get<int64_t>();
    height_ = case_["height"].get<int64_t>();
    pb::GetMetadataRequest md_req;
    md_req.set_name(name);
    ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &metadata_).ok());
  }

  pb::GenerateRequest ImageRequest(int64_t seed) const {
    pb::GenerateRequest r;
    r.set_model("pipe");
    *r.mutable_prompt_embeds() = ToProto(golden_.at("inputs/prompt_embeds"));
    *r.mutable_pooled_prompt_embeds() = ToProto(golden_.at("inputs/pooled_prompt_embeds"));
    r.set_width(width_);
    r.set_height(height_);
    r.set_steps(2);
    r.set_seed(seed);
    return r;
  }

  pb::LoadSingleFileResponse loaded_;
  pb::GetMetadataResponse metadata_;
  nlohmann::json case_;  // the golden case whose embeddings (and noise) requests use
  TensorMap golden_;
  int64_t width_ = 0, height_ = 0;
};

TEST_F(ServerPipelineTest, LoadsAFolderAndServesPngs) {
  StartServer();
  LoadPipeline("pipe");
  const pb::ModelInstance& inst = loaded_.instance();
  EXPECT_EQ(inst.state(), pb::READY);
  EXPECT_EQ(inst.pipeline_class(), "FluxPipeline");
  EXPECT_EQ(inst.class_name(), "FluxTransformer2DModel");
  EXPECT_EQ(inst.sha256().size(), 64u);
  std::map<std::string, std::string> components;
  for (const pb::PipelineComponent& c : inst.components()) {
    if (c.loaded()) components[c.name()] = c.class_name();
  }
  EXPECT_EQ(components["transformer"], "FluxTransformer2DModel");
  EXPECT_EQ(components["vae"], "AutoencoderKL");
  EXPECT_EQ(components["scheduler"], "FlowMatchEulerDiscreteScheduler");
  EXPECT_THAT(loaded_.report(), HasSubstr("FluxPipeline"));

  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  bool listed = false;
  for (const pb::ModelInstance& m : list.models()) {
    if (m.name() == "pipe") listed = m.pipeline_class() == "FluxPipeline" && m.components_size() >= 3;
  }
  EXPECT_TRUE(listed);
  const pb::GetMetadataResponse& md = metadata_;
  EXPECT_EQ(md.instance().pipeline_class(), "FluxPipeline");
  EXPECT_EQ(md.limits().prompt_embeds_dim(), golden_.at("inputs/prompt_embeds").size(-1));
  EXPECT_EQ(md.limits().pooled_prompt_embeds_dim(),
            golden_.at("inputs/pooled_prompt_embeds").size(-1));
  EXPECT_EQ(md.limits().latent_channels(), golden_.at("inputs/latents_unpacked").size(1));
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  EXPECT_EQ(width_ % multiple, 0);
  EXPECT_EQ(height_ % multiple, 0);
  EXPECT_TRUE(md.limits().guidance_embeds());

  // PNG of the requested size, progress per step.
  const Outcome a = Generate(*stub_, ImageRequest(1234));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_EQ(a.progress.size(), 2u);
  EXPECT_EQ(a.progress[1].step(), 2);
  ASSERT_TRUE(a.result.has_value());
  ASSERT_EQ(a.result->images_size(), 1);
  EXPECT_EQ(a.result->png(), a.result->images(0));
  EXPECT_EQ(a.result->seed(), 1234);
  EXPECT_EQ(a.result->steps(), 2);
  EXPECT_EQ(a.result->width(), width_);
  EXPECT_EQ(a.result->height(), height_);
  EXPECT_TRUE(a.result->guidance_applied());
  EXPECT_EQ(a.result->latents().data().size(), 0u);  // not requested
  auto rgb = DecodePng(a.result->png());
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_THAT(rgb->sizes().vec(), ::testing::ElementsAre(height_, width_, 3));

  // The same seed gives the same bytes; another seed other bytes.
  const Outcome again = Generate(*stub_, ImageRequest(1234));
  ASSERT_TRUE(again.status.ok()) << again.status.error_message();
  EXPECT_EQ(again.result->png(), a.result->png());
  const Outcome other = Generate(*stub_, ImageRequest(1235));
  ASSERT_TRUE(other.status.ok()) << other.status.error_message();
  EXPECT_NE(other.result->png(), a.result->png());

  // Two images per prompt, with latents.
  pb::GenerateRequest two = ImageRequest(1234);
  two.set_num_images(2);
  two.set_output(pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS);
  const Outcome t = Generate(*stub_, two);
  ASSERT_TRUE(t.status.ok()) << t.status.error_message();
  EXPECT_EQ(t.result->images_size(), 2);
  ASSERT_TRUE(t.latents.defined());
  EXPECT_EQ(t.latents.size(0), 2);
  EXPECT_EQ(t.latents.size(1), md.limits().latent_channels());
}

// A pipeline folder's storage dtype, group offloading and device map apply to its transformer
// (the VAE and text encoders stay resident): reported in the instance, and the images are those of
// the plain load (bit for bit when offloaded or mapped, near them with bfloat16 storage).
TEST_F(ServerPipelineTest, StorageDtypeOffloadAndDeviceMapApplyToTheTransformer) {
  StartServer();
  LoadPipeline("pipe");
  auto load = [&](const std::string& name, pb::LoadSingleFileRequest r,
                  pb::LoadSingleFileResponse* out) {
    r.set_name(name);
    r.set_path("flux-dev-pipeline");
    return stub_->LoadSingleFile(Context(60, true).get(), r, out);
  };
  pb::LoadSingleFileRequest cast_request;
  cast_request.set_storage_dtype("bfloat16");
  pb::LoadSingleFileResponse cast, offloaded, mapped;
  grpc::Status s = load("pipe-bf16", cast_request, &cast);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::LoadSingleFileRequest offload_request;
  offload_request.mutable_group_offload()->set_blocks_per_group(1);
  s = load("pipe-offload", offload_request, &offloaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::LoadSingleFileRequest map_request;
  map_request.set_device_map("sequential");
  (*map_request.mutable_max_memory_bytes())["cpu"] = int64_t{1} << 40;
  s = load("pipe-mapped", map_request, &mapped);
  ASSERT_TRUE(s.ok()) << s.error_message();

  const pb::ModelInstance& plain = loaded_.instance();
  EXPECT_EQ(plain.storage_dtype(), "");
  EXPECT_EQ(cast.instance().pipeline_class(), "FluxPipeline");
  EXPECT_EQ(cast.instance().dtype(), "float32");
  EXPECT_EQ(cast.instance().storage_dtype(), "bfloat16");
  EXPECT_LT(cast.instance().parameter_bytes(), plain.parameter_bytes());
  EXPECT_GT(2 * cast.instance().parameter_bytes(), plain.parameter_bytes());
  ASSERT_TRUE(offloaded.instance().has_group_offload());
  EXPECT_GT(offloaded.instance().group_offload().groups(), 0);
  EXPECT_GT(offloaded.instance().group_offload().offloaded_bytes(), 0);
  EXPECT_FALSE(plain.has_group_offload());
  EXPECT_THAT(mapped.instance().device_map(), ::testing::StartsWith("cpu "));
  EXPECT_EQ(plain.device_map(), "");

  auto images = [&](const std::string& model) {
    pb::GenerateRequest r = ImageRequest(77);
    r.set_model(model);
    r.set_output(pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS);
    return Generate(*stub_, r);
  };
  const Outcome p = images("pipe");
  ASSERT_TRUE(p.status.ok()) << p.status.error_message();
  const Outcome o = images("pipe-offload");
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  const Outcome m = images("pipe-mapped");
  ASSERT_TRUE(m.status.ok()) << m.status.error_message();
  const Outcome c = images("pipe-bf16");
  ASSERT_TRUE(c.status.ok()) << c.status.error_message();
  ASSERT_TRUE(p.latents.defined() && o.latents.defined() && m.latents.defined() &&
              c.latents.defined());
  EXPECT_TRUE(torch::equal(o.latents, p.latents));
  EXPECT_EQ(o.result->png(), p.result->png());
  EXPECT_TRUE(torch::equal(m.latents, p.latents));
  EXPECT_EQ(m.result->png(), p.result->png());
  const double err = (c.latents - p.latents).abs().max().item<double>() /
                     p.latents.abs().max().item<double>();
  std::printf("[pipeline storage] bf16-storage transformer vs fp32 latents: max rel diff %.3g\n",
              err);
  EXPECT_GT(err, 0.0);
  EXPECT_LE(err, 2e-2);

  // Refusals still name the field.
  pb::LoadSingleFileResponse refused;
  pb::LoadSingleFileRequest both = offload_request;
  both.set_device_map("sequential");
  (*both.mutable_max_memory_bytes())["cpu"] = int64_t{1} << 40;
  s = load("pipe-both", both, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << s.error_message();
  pb::LoadSingleFileRequest bad = cast_request;
  bad.set_storage_dtype("float4");
  s = load("pipe-bad", bad, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("storage_dtype"));
}

TEST_F(ServerPipelineTest, GivenNoiseReproducesTheGoldenImage) {
  StartServer();
  LoadPipeline("pipe");
  const nlohmann::json& spec = case_;
  pb::GenerateRequest r = ImageRequest(0);
  r.set_width(spec["width"].get<int64_t>());
  r.set_height(spec["height"].get<int64_t>());
  r.set_steps(spec["num_inference_steps"].get<int64_t>());
  r.set_guidance(spec["guidance_scale"].get<double>());
  *r.mutable_noise() = ToProto(golden_.at("inputs/latents_unpacked"));
  const Outcome o = Generate(*stub_, r);
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  ASSERT_EQ(o.result->images_size(), 1);
  auto rgb = DecodePng(o.result->images(0));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  // final/image_uint8 is [B, H, W, 3] or [B, 3, H, W]; compare as [H, W, 3].
  torch::Tensor golden = golden_.at("final/image_uint8")[0];
  if (golden.size(0) == 3) golden = golden.permute({1, 2, 0});
  ASSERT_EQ(rgb->sizes(), golden.sizes());
  const int64_t max_diff =
      (rgb->to(torch::kInt32) - golden.to(torch::kInt32)).abs().max().item<int64_t>();
  EXPECT_LE(max_diff, 1);
}

TEST_F(ServerPipelineTest, BadRequestsGetPreciseErrors) {
  StartServer();
  LoadPipeline("pipe");
  // Not a multiple of the size step: the nearest valid sizes are named.
  const int64_t multiple = metadata_.limits().image_size_multiple();
  ASSERT_GE(multiple, 2);
  pb::GenerateRequest bad_size = ImageRequest(1);
  bad_size.set_width(width_ + multiple / 2);
  Outcome o = Generate(*stub_, bad_size);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("width"));
  EXPECT_THAT(o.status.error_message(), HasSubstr(absl::StrCat(width_, " and ", width_ + multiple)));
  EXPECT_TRUE(o.progress.empty());
  // Embeddings of the wrong width.
  pb::GenerateRequest bad_embeds = ImageRequest(1);
  const torch::Tensor embeds = golden_.at("inputs/prompt_embeds");
  std::vector<int64_t> wrong = embeds.sizes().vec();
  wrong.back() += 1;
  *bad_embeds.mutable_prompt_embeds() = ToProto(torch::zeros(wrong));
  o = Generate(*stub_, bad_embeds);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("prompt_embeds"));
  EXPECT_THAT(o.status.error_message(), HasSubstr("joint_attention_dim"));
  // Missing embeddings; bare-transformer fields on a pipeline and pipeline fields on a bare model.
  pb::GenerateRequest missing = ImageRequest(1);
  missing.clear_pooled_prompt_embeds();
  o = Generate(*stub_, missing);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("pooled_prompt_embeds"));
  pb::GenerateRequest with_shape = ImageRequest(1);
  with_shape.add_latent_shape(1);
  o = Generate(*stub_, with_shape);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("latent_shape"));
  pb::GenerateRequest on_bare = ImageRequest(1);
  on_bare.set_model("default");
  o = Generate(*stub_, on_bare);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("only pipeline instances"));
  // Wrong noise shape names the expected one.
  pb::GenerateRequest bad_noise = ImageRequest(1);
  *bad_noise.mutable_noise() = ToProto(torch::zeros({1, 2, 3, 4}));
  o = Generate(*stub_, bad_noise);
  EXPECT_EQ(o.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(o.status.error_message(), HasSubstr("latents"));
}

// A pipeline folder with text encoders: text prompts over gRPC reproduce diffusers' images
// (golden flux_pipeline_text), long prompts are reported truncated, prompts are cached (metrics),
// and prompts on a pipeline without text encoders are refused.
TEST_F(ServerPipelineTest, TextPromptsReproduceTheGoldenImages) {
  StartServer();
  const fs::path text_dir = fs::path(GoldenDir()) / "pipeline" / "flux_pipeline_text";
  fs::copy(text_dir / "flux_tiny", fs::path(models_) / "flux-tiny-text",
           fs::copy_options::recursive);
  pb::LoadSingleFileRequest load;
  load.set_name("text");
  load.set_path("flux-tiny-text");
  pb::LoadSingleFileResponse loaded;
  grpc::Status s = stub_->LoadSingleFile(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::GetMetadataRequest md_req;
  md_req.set_name("text");
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &md).ok());
  EXPECT_TRUE(md.limits().accepts_text_prompt());
  EXPECT_EQ(md.limits().max_sequence_length(), 512);

  std::ifstream cases_file(text_dir / "cases.json");
  const nlohmann::json cases = nlohmann::json::parse(cases_file)["cases"];
  for (const std::string name : {"cat", "prompt2", "long"}) {
    SCOPED_TRACE(name);
    const nlohmann::json& kwargs = cases[name]["call_kwargs"];
    ASSERT_TRUE(kwargs.is_object()) << kwargs;
    auto golden = LoadSafetensorsWeights((text_dir / cases[name]["file"].get<std::string>()).string());
    ASSERT_TRUE(golden.ok()) << golden.status();
    pb::GenerateRequest r;
    r.set_model("text");
    r.add_prompt(kwargs["prompt"].get<std::string>());
    if (kwargs.contains("prompt_2")) r.add_prompt_2(kwargs["prompt_2"].get<std::string>());
    r.set_max_sequence_length(32);
    r.set_width(48);
    r.set_height(32);
    r.set_steps(2);
    r.set_guidance(3.5);
    *r.mutable_noise() = ToProto(golden->at("inputs/latents_unpacked"));
    const Outcome o = Generate(*stub_, r);
    ASSERT_TRUE(o.status.ok()) << o.status.error_message();
    ASSERT_EQ(o.result->images_size(), 1);
    auto rgb = DecodePng(o.result->images(0));
    ASSERT_TRUE(rgb.ok()) << rgb.status();
    torch::Tensor expected = golden->at("final/image_uint8")[0];
    if (expected.size(0) == 3) expected = expected.permute({1, 2, 0});
    const torch::Tensor diff = (rgb->to(torch::kInt) - expected.to(torch::kInt)).abs();
    EXPECT_LE(diff.max().item<int>(), 1);
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000 + 1);
    EXPECT_EQ(o.result->truncated_prompts_size() > 0, name == "long");
    if (name == "long") {
      EXPECT_GT(o.result->truncated_prompts(0).tokens(), o.result->truncated_prompts(0).max_length());
    }
    // The same request again: bit-identical (the encoded prompt comes from the cache).
    const Outcome again = Generate(*stub_, r);
    ASSERT_TRUE(again.status.ok()) << again.status.error_message();
    EXPECT_EQ(again.result->images(0), o.result->images(0));
  }
  const std::string metrics = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_THAT(metrics, HasSubstr("diffusion_prompt_cache_hits_total{model=\"text\"}"));
  EXPECT_THAT(metrics, HasSubstr("diffusion_prompt_cache_misses_total{model=\"text\"}"));

  // Prompt and embeddings together; a prompt for a pipeline without text encoders; a bare model.
  pb::GenerateRequest both;
  both.set_model("text");
  both.add_prompt("a cat");
  *both.mutable_prompt_embeds() = ToProto(torch::randn({4, md.limits().prompt_embeds_dim()}));
  *both.mutable_pooled_prompt_embeds() =
      ToProto(torch::randn({md.limits().pooled_prompt_embeds_dim()}));
  EXPECT_EQ(Generate(*stub_, both).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  LoadPipeline("pipe");  // the golden dev folder: no text encoders
  pb::GenerateRequest no_encoders = ImageRequest(1);
  no_encoders.clear_prompt_embeds();
  no_encoders.clear_pooled_prompt_embeds();
  no_encoders.add_prompt("a cat");
  EXPECT_EQ(Generate(*stub_, no_encoders).status.error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  pb::GenerateRequest bare;
  bare.set_model("default");
  bare.add_prompt("a cat");
  const Outcome b = Generate(*stub_, bare);
  EXPECT_EQ(b.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(b.status.error_message(), HasSubstr("prompt"));
}

TEST_F(ServerPipelineTest, AdaptersApplyPerRequestToTheTransformer) {
  StartServer();
  LoadPipeline("pipe");
  auto transformer = LoadModelFromFolder((GoldenPipelines() / "dev" / "transformer").string(), {});
  ASSERT_TRUE(transformer.ok()) << transformer.status();
  const TensorMap params = NamedTensors((*transformer)->module());
  const TensorMap lora =
      test::MakeDiffusersLora(params, test::LinearModules(params), /*rank=*/2, /*seed=*/3);
  ASSERT_TRUE(WriteSafetensors(adapters_ + "/pipe-lora.safetensors", lora).ok());
  pb::LoadLoRARequest load;
  load.set_model("pipe");
  load.set_name("synth");
  load.set_path("pipe-lora.safetensors");
  pb::LoadLoRAResponse loaded;
  grpc::Status s = stub_->LoadLoRA(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();

  pb::GenerateRequest plain = ImageRequest(9);
  plain.set_output(pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS);
  const Outcome base = Generate(*stub_, plain);
  ASSERT_TRUE(base.status.ok()) << base.status.error_message();
  pb::GenerateRequest zero = plain;
  pb::AdapterWeight* w = zero.add_adapters();
  w->set_name("synth");
  w->set_weight(0.0);
  const Outcome z = Generate(*stub_, zero);
  ASSERT_TRUE(z.status.ok()) << z.status.error_message();
  EXPECT_EQ(z.result->png(), base.result->png());
  ASSERT_EQ(z.result->adapters_size(), 1);
  EXPECT_EQ(z.result->adapters(0).sha256(), loaded.adapter().sha256());
  EXPECT_TRUE(torch::equal(z.latents, base.latents));
  pb::GenerateRequest full = plain;
  full.add_adapters()->set_name("synth");
  const Outcome f = Generate(*stub_, full);
  ASSERT_TRUE(f.status.ok()) << f.status.error_message();
  ASSERT_TRUE(f.latents.defined() && base.latents.defined());
  EXPECT_GT((f.latents - base.latents).abs().max().item<double>(), 1e-4);
  pb::GenerateRequest unknown = ImageRequest(9);
  unknown.add_adapters()->set_name("nope");
  EXPECT_EQ(Generate(*stub_, unknown).status.error_code(), grpc::StatusCode::NOT_FOUND);
}


// IP-Adapters over gRPC on the golden dev pipeline: LoadIPAdapter (management: token) with the
// golden CLIP vision encoder, an image prompt changes the PNG, scale 0 gives the no-adapter bytes
// exactly, scale 1 reproduces diffusers' FluxPipeline(ip_adapter_image=...) image within one
// level, and bad inputs (an undecodable image, an adapter for another width, unknown names, a
// bare transformer) get precise errors that change nothing.
TEST_F(ServerPipelineTest, IPAdapterImagePromptsOverGrpc) {
  const fs::path ip_dir = fs::path(GoldenDir()) / "conditioning" / "ip_adapter";
  const fs::path vision_dir = fs::path(GoldenDir()) / "conditioning" / "clip_vision";
  fs::copy(ip_dir / "ip_adapter.safetensors", fs::path(adapters_) / "ip.safetensors");
  fs::copy(vision_dir / "clip_vision_encoder", fs::path(models_) / "clip-vision",
           fs::copy_options::recursive);
  StartServer();
  LoadPipeline("pipe");
  EXPECT_TRUE(metadata_.limits().supports_ip_adapter());

  pb::LoadIPAdapterRequest load;
  load.set_model("pipe");
  load.set_name("style");
  load.set_path("ip.safetensors");
  load.set_image_encoder_path("clip-vision");
  pb::LoadIPAdapterResponse loaded;
  EXPECT_EQ(stub_->LoadIPAdapter(Context(60).get(), load, &loaded).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  grpc::Status s = stub_->LoadIPAdapter(Context(60, true).get(), load, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.adapter().name(), "style");
  EXPECT_EQ(loaded.adapter().path(), "ip.safetensors");
  EXPECT_EQ(loaded.adapter().image_encoder(), "clip-vision");
  EXPECT_EQ(loaded.adapter().format(), "xlabs");
  EXPECT_GT(loaded.adapter().memory_bytes(), 0);
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  int listed = 0;
  for (const pb::ModelInstance& m : list.models()) {
    for (const pb::IPAdapterInfo& a : m.ip_adapters())
      listed += m.name() == "pipe" && a.name() == "style";
  }
  EXPECT_EQ(listed, 1);

  // The golden request: its embeddings and noise, with the image prompt at scale 1.
  const fs::path golden_file = ip_dir / "pipeline_scale1.0.safetensors";
  auto golden = LoadSafetensorsWeights(golden_file.string());
  ASSERT_TRUE(golden.ok()) << golden.status();
  pb::GenerateRequest plain = ImageRequest(0);
  *plain.mutable_prompt_embeds() = ToProto(golden->at("inputs/prompt_embeds"));
  *plain.mutable_pooled_prompt_embeds() = ToProto(golden->at("inputs/pooled_prompt_embeds"));
  *plain.mutable_noise() = ToProto(golden->at("inputs/latents_unpacked"));
  const std::string image_png = test::ReadFileBytes((vision_dir / "image.png").string());
  auto with_image = [&](double scale) {
    pb::GenerateRequest r = plain;
    pb::IPAdapterInput* ip = r.add_ip_adapters();
    ip->set_name("style");
    ip->set_image(image_png);
    ip->add_scale(scale);
    return r;
  };
  const Outcome base = Generate(*stub_, plain);
  ASSERT_TRUE(base.status.ok()) << base.status.error_message();
  const Outcome zero = Generate(*stub_, with_image(0.0));
  ASSERT_TRUE(zero.status.ok()) << zero.status.error_message();
  EXPECT_EQ(zero.result->images(0), base.result->images(0));
  const Outcome one = Generate(*stub_, with_image(1.0));
  ASSERT_TRUE(one.status.ok()) << one.status.error_message();
  EXPECT_NE(one.result->images(0), base.result->images(0));
  ASSERT_EQ(one.result->ip_adapters_size(), 1);
  EXPECT_EQ(one.result->ip_adapters(0).name(), "style");
  EXPECT_GT(one.result->image_encode_seconds(), 0.0);
  auto rgb = DecodePng(one.result->images(0));
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  const torch::Tensor diff =
      ((*rgb).to(torch::kInt32) - golden->at("final/image_uint8")[0].to(torch::kInt32)).abs();
  EXPECT_LE(diff.max().item<int64_t>(), 1);
  EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000 + 1);

  // Bad inputs.
  pb::GenerateRequest undecodable = with_image(1.0);
  undecodable.mutable_ip_adapters(0)->set_image("GIF89a not a png");
  const Outcome u = Generate(*stub_, undecodable);
  EXPECT_EQ(u.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(u.status.error_message(), HasSubstr("ip_adapters[0].image"));
  EXPECT_THAT(u.status.error_message(), HasSubstr("not a PNG"));
  pb::GenerateRequest unknown = with_image(1.0);
  unknown.mutable_ip_adapters(0)->set_name("nope");
  const Outcome n = Generate(*stub_, unknown);
  EXPECT_EQ(n.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(n.status.error_message(), HasSubstr("'nope'"));
  pb::GenerateRequest no_input = plain;
  no_input.add_ip_adapters()->set_name("style");
  EXPECT_EQ(Generate(*stub_, no_input).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  pb::GenerateRequest bad_scale = with_image(std::nan(""));
  EXPECT_EQ(Generate(*stub_, bad_scale).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // An adapter for another transformer width: INVALID_ARGUMENT naming the key; nothing changes.
  auto sd = LoadSafetensorsWeights((ip_dir / "ip_adapter.safetensors").string());
  ASSERT_TRUE(sd.ok()) << sd.status();
  TensorMap wide;
  for (const auto& [key, t] : *sd) {
    wide[key] = absl::StrContains(key, "double_stream") ? torch::cat({t, t}, 0).contiguous() : t;
  }
  ASSERT_TRUE(WriteSafetensors((fs::path(adapters_) / "wide.safetensors").string(), wide).ok());
  pb::LoadIPAdapterRequest wide_load = load;
  wide_load.set_name("style");
  wide_load.set_path("wide.safetensors");
  wide_load.set_replace(true);
  s = stub_->LoadIPAdapter(Context(60, true).get(), wide_load, &loaded);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("double_blocks.0.processor"));
  EXPECT_THAT(s.error_message(), ::testing::Not(HasSubstr(adapters_)));
  const Outcome still = Generate(*stub_, with_image(1.0));
  ASSERT_TRUE(still.status.ok()) << still.status.error_message();
  EXPECT_EQ(still.result->images(0), one.result->images(0));
  pb::LoadIPAdapterRequest escape = load;
  escape.set_name("escape");
  escape.set_path("../../etc/passwd");
  EXPECT_EQ(stub_->LoadIPAdapter(Context(60, true).get(), escape, &loaded).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  pb::LoadIPAdapterRequest taken = load;
  EXPECT_EQ(stub_->LoadIPAdapter(Context(60, true).get(), taken, &loaded).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  pb::LoadIPAdapterRequest bare = load;
  bare.set_model("default");
  EXPECT_EQ(stub_->LoadIPAdapter(Context(60, true).get(), bare, &loaded).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  pb::GenerateRequest bare_generate;
  bare_generate.set_model("default");
  bare_generate.add_ip_adapters()->set_name("style");
  EXPECT_EQ(Generate(*stub_, bare_generate).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // Unload: management; afterwards the name is unknown.
  pb::UnloadIPAdapterRequest unload;
  unload.set_model("pipe");
  unload.set_name("style");
  pb::UnloadIPAdapterResponse unloaded;
  EXPECT_EQ(stub_->UnloadIPAdapter(Context(60).get(), unload, &unloaded).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(stub_->UnloadIPAdapter(Context(60, true).get(), unload, &unloaded).ok());
  EXPECT_EQ(stub_->UnloadIPAdapter(Context(60, true).get(), unload, &unloaded).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Generate(*stub_, with_image(1.0)).status.error_code(), grpc::StatusCode::NOT_FOUND);
}

// FirstBlockCache over gRPC on the embedded flux-tiny: the limits and metadata say it is supported,
// a cached request reports its skipped steps, threshold 0 gives the uncached PNG bytes, and bad
// configs (or `cache` on a bare transformer) are INVALID_ARGUMENT naming the field.
TEST_F(ServerTest, EmbeddedFluxTinyFirstBlockCache) {
  StartServer({"--embedded_models=default,flux-tiny", "--embedded_dir=" + tmp_.File("embedded")});
  pb::GetMetadataRequest md_req;
  md_req.set_name("flux-tiny");
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &md).ok());
  EXPECT_THAT(md.limits().cache_types(), Contains("first_block_cache"));
  bool row = false;
  for (const pb::FeatureRow& f : md.features()) row |= f.attribute() == "_supports_cache";
  EXPECT_TRUE(row);
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  constexpr int64_t kSteps = 4;
  torch::manual_seed(8);
  pb::GenerateRequest base;
  base.set_model("flux-tiny");
  *base.mutable_prompt_embeds() = ToProto(torch::randn({4, md.limits().prompt_embeds_dim()}));
  *base.mutable_pooled_prompt_embeds() =
      ToProto(torch::randn({md.limits().pooled_prompt_embeds_dim()}));
  base.set_width(2 * multiple);
  base.set_height(2 * multiple);
  base.set_steps(kSteps);
  base.set_seed(5);
  auto cached = [&](const std::string& type, std::optional<double> threshold) {
    pb::GenerateRequest r = base;
    r.mutable_cache()->set_type(type);
    if (threshold.has_value()) r.mutable_cache()->set_threshold(*threshold);
    return r;
  };

  const Outcome plain = Generate(*stub_, base);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  ASSERT_EQ(plain.result->images_size(), 1);
  EXPECT_EQ(plain.result->cache_skipped_steps() + plain.result->cache_computed_steps(), 0);

  const Outcome zero = Generate(*stub_, cached("first_block_cache", 0.0));
  ASSERT_TRUE(zero.status.ok()) << zero.status.error_message();
  EXPECT_EQ(zero.result->images(0), plain.result->images(0));
  EXPECT_EQ(zero.result->cache_skipped_steps(), 0);
  EXPECT_EQ(zero.result->cache_computed_steps(), kSteps);

  const Outcome skipping = Generate(*stub_, cached("first_block_cache", 1e9));
  ASSERT_TRUE(skipping.status.ok()) << skipping.status.error_message();
  ASSERT_EQ(skipping.result->images_size(), 1);
  EXPECT_TRUE(DecodePng(skipping.result->images(0)).ok());
  EXPECT_EQ(skipping.result->cache_skipped_steps(), kSteps - 1);
  EXPECT_EQ(skipping.result->cache_computed_steps(), 1);
  EXPECT_NE(skipping.result->images(0), plain.result->images(0));
  EXPECT_EQ(skipping.progress.size(), static_cast<size_t>(kSteps));

  // Unset threshold: diffusers' default; every step is counted one way or the other.
  const Outcome def = Generate(*stub_, cached("first_block_cache", std::nullopt));
  ASSERT_TRUE(def.status.ok()) << def.status.error_message();
  EXPECT_EQ(def.result->cache_skipped_steps() + def.result->cache_computed_steps(), kSteps);

  const Outcome unknown = Generate(*stub_, cached("teacache", 0.1));
  EXPECT_EQ(unknown.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(unknown.status.error_message(), HasSubstr("cache.type"));
  const Outcome negative = Generate(*stub_, cached("first_block_cache", -0.5));
  EXPECT_EQ(negative.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(negative.status.error_message(), HasSubstr("cache.threshold"));

  // A bare transformer refuses it like other pipeline fields.
  pb::GenerateRequest bare = MakeRequest("default", FluxInputs(32, 32, 7), 16, 2);
  bare.mutable_cache()->set_type("first_block_cache");
  const Outcome refused = Generate(*stub_, bare);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("cache"));
}

// TaylorSeer over gRPC on the embedded flux-tiny: listed in the limits, cache_interval 1 gives the
// uncached PNG bytes, the defaults skip on diffusers' schedule (reported), lite mode too, and bad
// or mismatched fields are INVALID_ARGUMENT naming `cache.<field>`.
TEST_F(ServerTest, EmbeddedFluxTinyTaylorSeerCache) {
  StartServer({"--embedded_models=default,flux-tiny", "--embedded_dir=" + tmp_.File("embedded")});
  pb::GetMetadataRequest md_req;
  md_req.set_name("flux-tiny");
  pb::GetMetadataResponse md;
  ASSERT_TRUE(stub_->GetMetadata(Context().get(), md_req, &md).ok());
  EXPECT_THAT(md.limits().cache_types(), Contains("taylorseer_cache"));
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  constexpr int64_t kSteps = 8;
  torch::manual_seed(9);
  pb::GenerateRequest base;
  base.set_model("flux-tiny");
  *base.mutable_prompt_embeds() = ToProto(torch::randn({4, md.limits().prompt_embeds_dim()}));
  *base.mutable_pooled_prompt_embeds() =
      ToProto(torch::randn({md.limits().pooled_prompt_embeds_dim()}));
  base.set_width(2 * multiple);
  base.set_height(2 * multiple);
  base.set_steps(kSteps);
  base.set_seed(6);
  auto taylor = [&](const std::function<void(pb::CacheConfig*)>& set) {
    pb::GenerateRequest r = base;
    r.mutable_cache()->set_type("taylorseer_cache");
    set(r.mutable_cache());
    return r;
  };

  const Outcome plain = Generate(*stub_, base);
  ASSERT_TRUE(plain.status.ok()) << plain.status.error_message();
  ASSERT_EQ(plain.result->images_size(), 1);

  const Outcome every =
      Generate(*stub_, taylor([](pb::CacheConfig* c) { c->set_cache_interval(1); }));
  ASSERT_TRUE(every.status.ok()) << every.status.error_message();
  EXPECT_EQ(every.result->images(0), plain.result->images(0));
  EXPECT_EQ(every.result->cache_skipped_steps(), 0);
  EXPECT_EQ(every.result->cache_computed_steps(), kSteps);

  // Defaults: the schedule's computed steps (BlockCacheConfig's defaults are diffusers').
  BlockCacheConfig defaults;
  defaults.type = kTaylorSeerCacheType;
  int64_t scheduled = 0;
  for (int64_t step = 0; step < kSteps; ++step) {
    scheduled += TaylorSeerShouldCompute(defaults, step) ? 1 : 0;
  }
  ASSERT_LT(scheduled, kSteps);
  for (bool lite : {false, true}) {
    const Outcome cached = Generate(*stub_, taylor([&](pb::CacheConfig* c) {
      if (lite) c->set_use_lite_mode(true);
    }));
    ASSERT_TRUE(cached.status.ok()) << cached.status.error_message();
    ASSERT_EQ(cached.result->images_size(), 1);
    EXPECT_TRUE(DecodePng(cached.result->images(0)).ok());
    EXPECT_EQ(cached.result->cache_computed_steps(), scheduled) << lite;
    EXPECT_EQ(cached.result->cache_skipped_steps(), kSteps - scheduled) << lite;
    EXPECT_NE(cached.result->images(0), plain.result->images(0)) << lite;
    EXPECT_EQ(cached.progress.size(), static_cast<size_t>(kSteps));
  }
  // Every field set explicitly, cool-down included.
  const Outcome custom = Generate(*stub_, taylor([](pb::CacheConfig* c) {
    c->set_cache_interval(2);
    c->set_disable_cache_before_step(1);
    c->set_disable_cache_after_step(6);
    c->set_max_order(2);
    c->set_taylor_factors_dtype("float32");
  }));
  ASSERT_TRUE(custom.status.ok()) << custom.status.error_message();
  EXPECT_GT(custom.result->cache_skipped_steps(), 0);
  EXPECT_EQ(custom.result->cache_skipped_steps() + custom.result->cache_computed_steps(), kSteps);

  const std::vector<std::pair<std::string, std::function<void(pb::CacheConfig*)>>> bad = {
      {"cache.cache_interval", [](pb::CacheConfig* c) { c->set_cache_interval(0); }},
      {"cache.disable_cache_before_step",
       [](pb::CacheConfig* c) { c->set_disable_cache_before_step(-1); }},
      {"cache.disable_cache_after_step",
       [](pb::CacheConfig* c) { c->set_disable_cache_after_step(-2); }},
      {"cache.max_order", [](pb::CacheConfig* c) { c->set_max_order(99); }},
      {"cache.taylor_factors_dtype",
       [](pb::CacheConfig* c) { c->set_taylor_factors_dtype("fp4"); }},
      {"cache.threshold", [](pb::CacheConfig* c) { c->set_threshold(0.1); }},
      {"cache.max_order",
       [](pb::CacheConfig* c) {
         c->set_type("first_block_cache");
         c->set_max_order(2);
       }},
  };
  for (const auto& [field, set] : bad) {
    const Outcome refused = Generate(*stub_, taylor(set));
    EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << field;
    EXPECT_THAT(refused.status.error_message(), HasSubstr(field));
  }
}


TEST_F(ServerTest, LoadSingleFileWithBFloat16StorageGenerates) {
  StartServer();
  const fs::path golden = GoldenDir();
  fs::copy_file(golden / "single_file" / "flux-dev" / "original.safetensors",
                fs::path(models_) / "flux-dev.safetensors");
  auto load = [&](const std::string& name, const std::string& dtype, const std::string& storage,
                  pb::LoadSingleFileResponse* out) {
    pb::LoadSingleFileRequest r;
    r.set_name(name);
    r.set_path("flux-dev.safetensors");
    r.set_dtype(dtype);
    r.set_storage_dtype(storage);
    return stub_->LoadSingleFile(Context(60, true).get(), r, out);
  };
  pb::LoadSingleFileResponse fp32, cast;
  grpc::Status s = load("fp32", "", "", &fp32);
  ASSERT_TRUE(s.ok()) << s.error_message();
  s = load("cast", "float32", "bfloat16", &cast);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(cast.instance().dtype(), "float32");
  EXPECT_EQ(cast.instance().storage_dtype(), "bfloat16");
  EXPECT_EQ(fp32.instance().storage_dtype(), "");
  EXPECT_LT(cast.instance().parameter_bytes(), fp32.instance().parameter_bytes());
  EXPECT_GT(2 * cast.instance().parameter_bytes(), fp32.instance().parameter_bytes());

  // Generate equals the same load in-process, and stays near the float32 instance.
  const TensorMap inputs = FluxInputs(32, 32, 13);
  const Outcome o = Generate(*stub_, MakeRequest("cast", inputs, 4, 2));
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  const Outcome f = Generate(*stub_, MakeRequest("fp32", inputs, 4, 2));
  ASSERT_TRUE(f.status.ok()) << f.status.error_message();
  SingleFileOptions options;
  options.model.storage_dtype = torch::kBFloat16;
  auto local = LoadSingleFile((golden / "single_file" / "flux-dev" / "original.safetensors").string(),
                              options);
  ASSERT_TRUE(local.ok()) << local.status();
  auto spec = ModelRegistry::Global().Find("flux");
  LoraHost host(std::shared_ptr<DiffusionModel>(std::move(local->model)), (*spec)->lora);
  ExpectSameLatents(o.latents, InProcess(host, inputs, 4, 2, nullptr));
  const double err = (o.latents - f.latents).abs().max().item<double>() /
                     f.latents.abs().max().item<double>();
  std::printf("[layerwise casting] served bf16-storage vs fp32 latents: max rel diff %.3g\n", err);
  EXPECT_GT(err, 0.0);
  EXPECT_LE(err, 1e-2);

  // Precise refusals naming the field.
  pb::LoadSingleFileResponse refused;
  s = load("bad1", "float32", "float4", &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("storage_dtype"));
  s = load("bad2", "bfloat16", "bfloat16", &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("not lower than the compute dtype"));
}


TEST_F(ServerTest, LoadSingleFileWithGroupOffloadGenerates) {
  StartServer();
  fs::copy_file(fs::path(GoldenDir()) / "single_file" / "flux-dev" / "original.safetensors",
                fs::path(models_) / "flux-dev.safetensors");
  auto load = [&](const std::string& name, std::optional<pb::GroupOffloadConfig> offload,
                  pb::LoadSingleFileResponse* out) {
    pb::LoadSingleFileRequest r;
    r.set_name(name);
    r.set_path("flux-dev.safetensors");
    if (offload.has_value()) *r.mutable_group_offload() = *offload;
    return stub_->LoadSingleFile(Context(60, true).get(), r, out);
  };
  pb::GroupOffloadConfig config;
  config.set_blocks_per_group(1);
  config.set_prefetch(true);
  pb::LoadSingleFileResponse plain, offloaded;
  grpc::Status s = load("plain", std::nullopt, &plain);
  ASSERT_TRUE(s.ok()) << s.error_message();
  s = load("offloaded", config, &offloaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(plain.instance().has_group_offload());
  ASSERT_TRUE(offloaded.instance().has_group_offload());
  const pb::GroupOffloadStatus& g = offloaded.instance().group_offload();
  EXPECT_EQ(g.config().blocks_per_group(), 1);
  EXPECT_TRUE(g.config().prefetch());
  EXPECT_EQ(g.config().offload_to(), "disk");
  EXPECT_GT(g.groups(), 0);
  EXPECT_GT(g.offloaded_bytes(), 0);
  EXPECT_LT(g.offloaded_bytes(), plain.instance().parameter_bytes());
  EXPECT_EQ(g.resident_bytes(), 0);

  // The offloaded instance serves exactly what the resident one serves.
  const TensorMap inputs = FluxInputs(32, 32, 17);
  const Outcome o = Generate(*stub_, MakeRequest("offloaded", inputs, 4, 2));
  ASSERT_TRUE(o.status.ok()) << o.status.error_message();
  const Outcome p = Generate(*stub_, MakeRequest("plain", inputs, 4, 2));
  ASSERT_TRUE(p.status.ok()) << p.status.error_message();
  ASSERT_TRUE(o.latents.defined() && p.latents.defined());
  EXPECT_TRUE(torch::equal(o.latents, p.latents));

  // The group files live (unlinked, mapped) in the server's offload directory (--offload_dir,
  // here the default $TMPDIR or /tmp, never the model root).
  EXPECT_GT(MappedDeletedFilesUnder(server_->pid(), DefaultTmpDir()), 0);
  EXPECT_EQ(MappedDeletedFilesUnder(server_->pid(), models_), 0);

  // Precise refusals naming the field.
  pb::LoadSingleFileResponse refused;
  config.set_blocks_per_group(0);
  s = load("bad1", config, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("group_offload: blocks_per_group"));
  config.set_blocks_per_group(1);
  config.set_offload_to("ssd");
  s = load("bad2", config, &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("offload_to"));
}

TEST_F(ServerTest, OffloadDirHoldsTheGroupFilesAndMustExist) {
  const std::string offload = (fs::path(tmp_.path()) / "offload").string();
  fs::create_directories(offload);
  StartServer({"--offload_dir=" + offload});
  fs::copy_file(fs::path(GoldenDir()) / "single_file" / "flux-dev" / "original.safetensors",
                fs::path(models_) / "flux-dev.safetensors");
  pb::LoadSingleFileRequest r;
  r.set_name("offloaded");
  r.set_path("flux-dev.safetensors");
  r.mutable_group_offload()->set_blocks_per_group(1);
  pb::LoadSingleFileResponse out;
  grpc::Status s = stub_->LoadSingleFile(Context(60, true).get(), r, &out);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_TRUE(out.instance().has_group_offload());
  // One mapped, unlinked file per group, all in --offload_dir.
  EXPECT_EQ(MappedDeletedFilesUnder(server_->pid(), offload), out.instance().group_offload().groups());
  const Outcome o = Generate(*stub_, MakeRequest("offloaded", FluxInputs(32, 32, 17), 4, 2));
  EXPECT_TRUE(o.status.ok()) << o.status.error_message();
  // Unloading frees them.
  pb::UnloadModelRequest unload;
  unload.set_name("offloaded");
  pb::UnloadModelResponse unloaded;
  s = stub_->UnloadModel(Context(60, true).get(), unload, &unloaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  for (int i = 0; i < 100 && MappedDeletedFilesUnder(server_->pid(), offload) > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(MappedDeletedFilesUnder(server_->pid(), offload), 0);
  server_.reset();

  // A directory that does not exist stops the server at start, naming the flag.
  ServerProcess bad({"--admin_token_file=" + token_file_, "--model_root=" + models_,
                     "--offload_dir=" + offload + "/missing"});
  EXPECT_FALSE(bad.ok());
  EXPECT_THAT(bad.Stderr(), HasSubstr("--offload_dir"));
}

}  // namespace
}  // namespace ds
