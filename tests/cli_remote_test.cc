// diffusion-cli's remote commands end to end: the real diffusion-server binary on loopback (port 0,
// temporary model/adapter roots, a token file) driven by the real diffusion-cli binary. Every
// command's happy path (results checked against the same calls made through the C++ stubs, and
// against the fixture files), and the error paths: the gRPC code name printed, the exit code.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "handlers/digest.h"
#include "handlers/image.h"
#include "handlers/safetensors.h"
#include "server/tensor_proto.h"
#include "testing/server_process.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
namespace pb = ::diffusion::v1;
using ::ds::test::GoldenDir;
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "cli-remote-test-token-0123456789";

// diffusion-cli's exit codes (tools/cli/remote.h).
constexpr int kExitLocalError = 1;
constexpr int kExitRpcError = 3;
constexpr int kExitNotServing = 4;

struct CliResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

std::ostream& operator<<(std::ostream& os, const CliResult& r) {
  return os << "exit " << r.exit_code << "\nstdout:\n" << r.out << "\nstderr:\n" << r.err;
}

std::unique_ptr<grpc::ClientContext> Context(bool admin = false) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  if (admin) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
  return ctx;
}

pb::Tensor ToProto(const torch::Tensor& t) {
  pb::Tensor p;
  EXPECT_TRUE(server::TensorToProto(t, &p).ok());
  return p;
}

// Generate through the C++ stub: the reference for what the CLI wrote.
torch::Tensor StubGenerate(pb::DiffusionService::Stub& stub, const pb::GenerateRequest& request) {
  auto ctx = Context();
  auto reader = stub.Generate(ctx.get(), request);
  pb::GenerateResponse message;
  std::optional<pb::GenerateResult> result;
  while (reader->Read(&message)) {
    if (message.has_result()) result = message.result();
  }
  const grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  if (!result.has_value()) return torch::Tensor();
  auto t = server::TensorFromProto(result->latents(), "latents");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : torch::Tensor();
}

torch::Tensor ReadTensor(const std::string& path, const std::string& name) {
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return torch::Tensor();
  auto t = (*file)->Get(name);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? t->clone() : torch::Tensor();
}

void ExpectSameLatents(const torch::Tensor& cli, const torch::Tensor& stub) {
  ASSERT_TRUE(cli.defined() && stub.defined());
  ASSERT_EQ(cli.sizes(), stub.sizes());
  EXPECT_LE((cli - stub).abs().max().item<double>(), 1e-6) << "CLI vs C++ stub";
}

class CliRemoteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    models_ = tmp_.File("models");
    adapters_ = tmp_.File("adapters");
    fs::create_directories(models_);
    fs::create_directories(adapters_);
    token_file_ = tmp_.File("token");
    std::ofstream(token_file_) << kToken << "\n";
    wrong_token_file_ = tmp_.File("wrong-token");
    std::ofstream(wrong_token_file_) << "not-the-token-0123456789abcdef\n";
  }

  void StartServer(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--admin_token_file=" + token_file_, "--model_root=" + models_,
                                     "--adapter_root=" + adapters_};
    args.insert(args.end(), extra.begin(), extra.end());
    server_ = std::make_unique<ServerProcess>(args);
    ASSERT_TRUE(server_->ok()) << server_->Stderr();
    stub_ = server_->Stub();
  }

  // Runs diffusion-cli with `args` plus --target (this server) and --threads=1, unless `args`
  // gives a --target itself.
  CliResult Cli(std::vector<std::string> args) {
    bool has_target = false;
    for (const std::string& a : args) has_target |= absl::StartsWith(a, "--target");
    if (!has_target && server_ != nullptr) args.push_back("--target=" + server_->target());
    args.push_back("--threads=1");
    args.insert(args.begin(), DS_CLI_PATH);
    const std::string out_path = tmp_.File("cli.out"), err_path = tmp_.File("cli.err");
    CliResult r;
    // Only async-signal-safe calls between fork and exec (this process has gRPC threads).
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
      const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      if (out < 0 || err < 0) _exit(126);
      dup2(out, STDOUT_FILENO);
      dup2(err, STDERR_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = test::ReadFileBytes(out_path);
    r.err = test::ReadFileBytes(err_path);
    return r;
  }

  std::string TokenFlag() const { return "--token_file=" + token_file_; }

  pb::GetMetadataResponse StubMetadata(const std::string& name, bool verbose = false) {
    pb::GetMetadataRequest req;
    req.set_name(name);
    req.set_verbose(verbose);
    pb::GetMetadataResponse md;
    const grpc::Status s = stub_->GetMetadata(Context().get(), req, &md);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return md;
  }

  TempDir tmp_;
  std::string models_, adapters_, token_file_, wrong_token_file_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<pb::DiffusionService::Stub> stub_;
};

// ------------------------------------------------------------------------------------------------

TEST_F(CliRemoteTest, ModelsMetadataAndHealth) {
  StartServer();
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  ASSERT_EQ(list.models_size(), 1);
  const pb::ModelInstance& m = list.models(0);

  CliResult r = Cli({"models"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << r;  // header + the one instance
  EXPECT_THAT(lines[0], HasSubstr("NAME"));
  for (const std::string& cell :
       {m.name(), m.class_name(), std::string("READY"), m.dtype(), m.device()}) {
    EXPECT_THAT(lines[1], HasSubstr(cell));
  }
  EXPECT_TRUE(absl::StartsWith(lines[1], "default ")) << lines[1];

  // metadata: the server's rendered table, then the instance's live state.
  const pb::GetMetadataResponse md = StubMetadata("default");
  r = Cli({"metadata", "default"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_TRUE(absl::StartsWith(r.out, md.table())) << r;
  EXPECT_THAT(r.out, HasSubstr("instance default: READY"));
  EXPECT_THAT(r.out, HasSubstr("\"in_channels\""));
  for (const std::string& input : md.required_inputs()) EXPECT_THAT(r.out, HasSubstr(input));
  // A class name: the verbose table, no instance part.
  const pb::GetMetadataResponse verbose = StubMetadata("FluxTransformer2DModel", true);
  r = Cli({"metadata", "FluxTransformer2DModel", "--verbose"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(r.out, verbose.table() + (absl::EndsWith(verbose.table(), "\n") ? "" : "\n"));

  r = Cli({"metadata", "no-such-model"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_TRUE(absl::StartsWith(r.err, "error: NOT_FOUND: ")) << r;
  EXPECT_THAT(r.err, HasSubstr("no-such-model"));
  r = Cli({"metadata"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("metadata takes one NAME"));

  // health.
  r = Cli({"health"});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("SERVING"));
  r = Cli({"health", "--service=default"});
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("'default': SERVING"));
  r = Cli({"health", "--service", "nope"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));

  // Nothing listening: the transport's code.
  r = Cli({"models", "--target=127.0.0.1:1", "--timeout=5"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: UNAVAILABLE: "));
  // Unknown command: usage, exit 2 (as before).
  EXPECT_EQ(Cli({"frobnicate"}).exit_code, 2);
}

TEST_F(CliRemoteTest, GoldenModelLoRALifecycleAndGenerate) {
  StartServer();
  const fs::path golden = GoldenDir();
  fs::copy(golden / "lora" / "base_model_dir", fs::path(models_) / "base_model_dir",
           fs::copy_options::recursive);
  fs::copy_file(golden / "single_file" / "flux-dev" / "original.safetensors",
                fs::path(models_) / "flux-dev.safetensors");
  const fs::path lora_file = golden / "lora" / "diffusers" / "input.safetensors";
  fs::copy_file(lora_file, fs::path(adapters_) / "golden-diffusers.safetensors");
  auto lora_sha = Sha256File(lora_file.string());
  ASSERT_TRUE(lora_sha.ok()) << lora_sha.status();

  // load-single-file: the mapping report and the instance.
  CliResult r = Cli({"load-single-file", "--name=golden", "--path", "base_model_dir", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("diffusers model folder"));
  EXPECT_THAT(r.out, HasSubstr("loaded golden: FluxTransformer2DModel"));
  EXPECT_THAT(r.out, HasSubstr("READY"));
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_THAT(r.out, HasSubstr(list.models(1).sha256()));
  r = Cli({"models"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("\ngolden "));
  r = Cli({"health", "--service=golden"});
  EXPECT_EQ(r.exit_code, 0) << r;
  // Again without --replace: the server's ALREADY_EXISTS.
  r = Cli({"load-single-file", "--name=golden", "--path=base_model_dir", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: ALREADY_EXISTS: "));

  // load-lora from the adapter root: report + digest (the file's sha256); loras lists it.
  r = Cli({"load-lora", "--model=golden", "--name=g", "--path=golden-diffusers.safetensors",
           "--allow-partial", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("sha256 " + *lora_sha));
  EXPECT_THAT(r.out, HasSubstr("loaded adapter g: diffusers"));
  // The same bytes inline, pinned.
  r = Cli({"load-lora", "--model", "golden", "--name", "g-inline", "--file", lora_file.string(),
           "--pin", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("source inline"));
  EXPECT_THAT(r.out, HasSubstr("pinned"));
  r = Cli({"loras", "--model=golden"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const std::vector<std::string> rows = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(rows.size(), 4u) << r;  // header, g, g-inline, memory line
  EXPECT_TRUE(absl::StartsWith(rows[1], "g ")) << r;
  EXPECT_THAT(rows[1], HasSubstr(*lora_sha));
  EXPECT_TRUE(absl::StartsWith(rows[2], "g-inline ")) << r;
  EXPECT_THAT(rows[2], HasSubstr(*lora_sha));
  EXPECT_THAT(rows[3], HasSubstr("memory: "));
  EXPECT_THAT(rows[3], HasSubstr(" budget"));

  // generate with the adapter from the golden forward inputs (the forward-pass tensors the
  // sampler sets itself, and the output, are not sent); the latent shape is derived.
  const std::string inputs = (golden / "lora" / "diffusers" / "forward.safetensors").string();
  const std::string out = tmp_.File("golden.safetensors");
  r = Cli({"generate", "--model=golden", "--inputs", inputs, "--steps=2", "--seed=7",
           "--lora=g:0.7", "-o", out});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("step 1/2"));
  EXPECT_THAT(r.err, HasSubstr("step 2/2"));
  EXPECT_THAT(r.err, HasSubstr("not sent"));
  EXPECT_THAT(r.out, HasSubstr("g:0.7 (sha256 " + *lora_sha + ")"));

  pb::GenerateRequest request;
  request.set_model("golden");
  torch::Tensor hidden;
  {
    auto file = SafetensorsFile::Open(inputs);
    ASSERT_TRUE(file.ok()) << file.status();
    for (const std::string name :
         {"encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance"}) {
      auto t = (*file)->Get(name);
      ASSERT_TRUE(t.ok()) << t.status();
      (*request.mutable_inputs())[name] = ToProto(*t);
    }
    auto h = (*file)->Get("hidden_states");  // the packed latents' shape
    ASSERT_TRUE(h.ok());
    hidden = *h;
  }
  for (int64_t d : hidden.sizes()) request.add_latent_shape(d);
  request.set_seed(7);
  request.set_steps(2);
  pb::AdapterWeight* adapter = request.add_adapters();
  adapter->set_name("g");
  adapter->set_weight(0.7);
  const torch::Tensor reference = StubGenerate(*stub_, request);
  ExpectSameLatents(ReadTensor(out, "latents"), reference);
  // The resolved parameters are echoed in the file.
  auto written = SafetensorsFile::Open(out);
  ASSERT_TRUE(written.ok());
  const auto& meta = (*written)->metadata();
  EXPECT_EQ(meta.at("seed"), "7");
  EXPECT_EQ(meta.at("steps"), "2");
  EXPECT_EQ(meta.at("model"), "golden");
  EXPECT_EQ(meta.at("model_sha256"), list.models(1).sha256());
  const nlohmann::json applied = nlohmann::json::parse(meta.at("adapters"));
  ASSERT_EQ(applied.size(), 1u);
  EXPECT_EQ(applied[0]["sha256"], *lora_sha);
  EXPECT_EQ(applied[0]["weight"], 0.7);
  // An explicit --latent-shape gives the same.
  const std::string out2 = tmp_.File("golden2.safetensors");
  r = Cli({"generate", "--model=golden", "--inputs", inputs, "--steps=2", "--seed=7",
           "--lora=g:0.7", "--latent-shape",
           absl::StrCat(hidden.size(0), ",", hidden.size(1), ",", hidden.size(2)), "-o", out2});
  ASSERT_EQ(r.exit_code, 0) << r;
  ExpectSameLatents(ReadTensor(out2, "latents"), reference);

  // unload-lora: gone from loras; a generate naming it is the server's NOT_FOUND.
  r = Cli({"unload-lora", "--model=golden", "--name=g", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  r = Cli({"loras", "--model=golden"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, Not(HasSubstr("\ng ")));
  EXPECT_THAT(r.out, HasSubstr("\ng-inline "));
  r = Cli({"generate", "--model=golden", "--inputs", inputs, "--steps=1", "--lora=g", "-o", out});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));

  // Replace with the flux-dev single file (RoPE axes as a config override), then unload.
  r = Cli({"load-single-file", "--name=golden", "--path=flux-dev.safetensors", "--replace",
           R"(--config={"axes_dims_rope": [4, 4, 8]})", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("flux-dev"));
  r = Cli({"unload-model", "--name=golden", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("unloaded model golden"));
  r = Cli({"models"});
  EXPECT_THAT(r.out, Not(HasSubstr("golden")));
  r = Cli({"health", "--service=golden"});
  EXPECT_EQ(r.exit_code, kExitNotServing) << r;  // answered, but no longer serving
  EXPECT_THAT(r.out, HasSubstr("'golden': NOT_SERVING"));
  r = Cli({"unload-model", "--name=golden", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));
}

TEST_F(CliRemoteTest, GenerateOnTheDefaultModel) {
  StartServer({"--max_steps=100000"});
  const pb::GetMetadataResponse md = StubMetadata("default");
  const nlohmann::json config = nlohmann::json::parse(md.config_json());
  const int64_t channels = config.at("in_channels").get<int64_t>();
  const int64_t axes = static_cast<int64_t>(config.at("axes_dims_rope").size());
  // Inputs for a 4x4 latent grid and 8 text tokens, sized from the served model's config.
  torch::manual_seed(3);
  TensorMap in;
  in["encoder_hidden_states"] =
      torch::randn({1, 8, config.at("joint_attention_dim").get<int64_t>()});
  in["pooled_projections"] = torch::randn({1, config.at("pooled_projection_dim").get<int64_t>()});
  in["img_ids"] = torch::zeros({16, axes});
  for (int64_t i = 0; i < 16; ++i) {
    in["img_ids"][i][axes - 2] = static_cast<float>(i / 4);
    in["img_ids"][i][axes - 1] = static_cast<float>(i % 4);
  }
  in["txt_ids"] = torch::zeros({8, axes});
  const std::string inputs = tmp_.File("in.safetensors");
  ASSERT_TRUE(WriteSafetensors(inputs, in).ok());

  const std::string out = tmp_.File("out.safetensors");
  CliResult r = Cli({"generate", "--model", "default", "--inputs", inputs, "--steps", "2", "--seed",
                     "11", "--guidance", "2.5", "--output", out});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("step 2/2"));
  EXPECT_THAT(r.out, HasSubstr("guidance 2.5"));
  pb::GenerateRequest request;
  request.set_model("default");
  for (const auto& [name, t] : in) (*request.mutable_inputs())[name] = ToProto(t);
  for (int64_t d : {int64_t{1}, int64_t{16}, channels}) request.add_latent_shape(d);
  request.set_seed(11);
  request.set_steps(2);
  request.set_guidance(2.5);
  ExpectSameLatents(ReadTensor(out, "latents"), StubGenerate(*stub_, request));
  // Without --model: the server's default instance.
  const std::string out_default = tmp_.File("out-default.safetensors");
  r = Cli({"generate", "--inputs", inputs, "--steps=2", "--seed=11", "--guidance=2.5", "-o",
           out_default});
  ASSERT_EQ(r.exit_code, 0) << r;
  ExpectSameLatents(ReadTensor(out_default, "latents"), ReadTensor(out, "latents"));

  // .png: this server returns latents only.
  r = Cli(
      {"generate", "--model=default", "--inputs", inputs, "--steps=1", "-o", tmp_.File("out.png")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("latents only"));
  EXPECT_THAT(r.err, HasSubstr(".safetensors"));
  EXPECT_FALSE(fs::exists(tmp_.File("out.png")));
  // Bad invocations, refused before any call.
  r = Cli({"generate", "--model=default", "--inputs", inputs, "-o", tmp_.File("out.txt")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr(".safetensors"));
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--lora=g:lots", "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("WEIGHT 'lots'"));
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--latent-shape=1,x", "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--latent-shape"));
  r = Cli({"generate", "--model=default", "--inputs", tmp_.File("missing.safetensors"), "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("missing.safetensors"));
  // The server's field errors come back by name.
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--steps=-1", "-o", out});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: steps"));
  r = Cli({"generate", "--model=nope", "--inputs", inputs, "-o", out});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));
  EXPECT_THAT(r.err, HasSubstr("nope"));
  // --timeout: a deadline the server honours between steps.
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--steps=100000", "--timeout=0.5",
           "-o", out});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: DEADLINE_EXCEEDED: "));
}

TEST_F(CliRemoteTest, GenerateImagesOnAPipelineInstance) {
  StartServer();
  // A diffusers pipeline folder (model_index.json) becomes a pipeline instance.
  const fs::path golden = fs::path(GoldenDir()) / "pipeline" / "flux_pipeline";
  fs::copy(golden / "dev", fs::path(models_) / "pipe", fs::copy_options::recursive);
  CliResult r = Cli({"load-single-file", TokenFlag(), "--name=pipe", "--path=pipe"});
  ASSERT_EQ(r.exit_code, 0) << r;
  const pb::GetMetadataResponse md = StubMetadata("pipe");
  ASSERT_FALSE(md.instance().pipeline_class().empty());
  // A size from the served limits (two multiples wide, one high), embeddings from a golden case
  // file (keys "inputs/prompt_embeds", "inputs/pooled_prompt_embeds").
  const int64_t multiple = md.limits().image_size_multiple();
  ASSERT_GT(multiple, 0);
  const std::string inputs = (golden / "dev_dynamic_n2.safetensors").string();
  const std::string out = tmp_.File("image.png");
  auto generate = [&](const std::string& path, int64_t seed) {
    return Cli({"generate", "--model=pipe", "--inputs", inputs, "--width",
                absl::StrCat(2 * multiple), "--height", absl::StrCat(multiple), "--steps=2",
                absl::StrCat("--seed=", seed), "-o", path});
  };
  r = generate(out, 5);
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("step 2/2"));
  auto image = DecodePng(test::ReadFileBytes(out));
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->size(-1), 3);
  EXPECT_EQ(image->size(-2), 2 * multiple);
  EXPECT_EQ(image->size(-3), multiple);
  // Same seed: the same bytes; another seed: different bytes.
  const std::string again = tmp_.File("again.png"), other = tmp_.File("other.png");
  ASSERT_EQ(generate(again, 5).exit_code, 0);
  ASSERT_EQ(generate(other, 6).exit_code, 0);
  EXPECT_EQ(test::ReadFileBytes(again), test::ReadFileBytes(out));
  EXPECT_NE(test::ReadFileBytes(other), test::ReadFileBytes(out));
  // Two images per prompt: OUT.png and OUT_1.png.
  r = Cli({"generate", "--model=pipe", "--inputs", inputs, "--width", absl::StrCat(multiple),
           "--height", absl::StrCat(multiple), "--steps=1", "--num-images=2", "-o",
           tmp_.File("two.png")});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_TRUE(fs::exists(tmp_.File("two_1.png")));
  // Bad requests: a size off the multiple (the server names the nearest valid one), packed
  // latent flags on a pipeline, image flags on a bare transformer, no prompt embeddings.
  r = Cli({"generate", "--model=pipe", "--inputs", inputs, "--width", absl::StrCat(multiple + 1),
           "--height", absl::StrCat(multiple), "-o", tmp_.File("bad.png")});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: "));
  EXPECT_THAT(r.err, HasSubstr(absl::StrCat(multiple)));
  r = Cli({"generate", "--model=pipe", "--inputs", inputs, "--latent-shape=1,4,64", "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--width/--height"));
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--width=32", "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("pipeline instance"));
  TensorMap no_text;
  no_text["something"] = torch::zeros({2});
  const std::string empty_inputs = tmp_.File("no-text.safetensors");
  ASSERT_TRUE(WriteSafetensors(empty_inputs, no_text).ok());
  r = Cli({"generate", "--model=pipe", "--inputs", empty_inputs, "-o", out});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("prompt_embeds"));
}

// IP-Adapters through the CLI on the golden dev pipeline: load-ip-adapter (management) with the
// golden adapter and CLIP vision encoder, models/metadata list it, generate --ip_adapter sends the
// local PNG (scale 0 = the plain image bytes; scale 1 reproduces the golden diffusers image within
// one level, as does --ip_adapter_embeds with the golden image embeddings), per-layer scale lists,
// local mistakes refused before any call, the server's NOT_FOUND for unknown names, unload.
TEST_F(CliRemoteTest, IPAdapterLifecycleAndImagePrompts) {
  StartServer();
  const fs::path golden = GoldenDir();
  const fs::path ip_dir = golden / "conditioning" / "ip_adapter";
  const fs::path vision_dir = golden / "conditioning" / "clip_vision";
  fs::copy(golden / "pipeline" / "flux_pipeline" / "dev", fs::path(models_) / "pipe",
           fs::copy_options::recursive);
  fs::copy(vision_dir / "clip_vision_encoder", fs::path(models_) / "clip-vision",
           fs::copy_options::recursive);
  fs::copy_file(ip_dir / "ip_adapter.safetensors", fs::path(adapters_) / "ip.safetensors");
  CliResult r = Cli({"load-single-file", TokenFlag(), "--name=pipe", "--path=pipe"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_TRUE(StubMetadata("pipe").limits().supports_ip_adapter());

  // load-ip-adapter: a management call; the printed info is the server's.
  const std::vector<std::string> load = {"load-ip-adapter", "--model=pipe", "--name=style",
                                         "--path=ip.safetensors",
                                         "--image-encoder-path=clip-vision"};
  r = Cli(load);
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_TRUE(absl::StartsWith(r.err, "error: UNAUTHENTICATED: ")) << r;
  std::vector<std::string> with_token = load;
  with_token.push_back(TokenFlag());
  r = Cli(with_token);
  ASSERT_EQ(r.exit_code, 0) << r;
  pb::ListModelsResponse list;
  ASSERT_TRUE(stub_->ListModels(Context().get(), {}, &list).ok());
  std::optional<pb::IPAdapterInfo> info;
  for (const pb::ModelInstance& m : list.models()) {
    if (m.name() == "pipe" && m.ip_adapters_size() == 1) info = m.ip_adapters(0);
  }
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->name(), "style");
  EXPECT_THAT(r.out, HasSubstr("loaded IP-Adapter style: " + info->format()));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat(info->num_layers(), " layers")));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("embed dim ", info->image_embed_dim())));
  EXPECT_THAT(r.out, HasSubstr("image encoder clip-vision"));
  with_token.push_back("--replace");
  r = Cli(with_token);
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("replaced IP-Adapter style"));
  // models: the pipeline's row lists it; metadata shows it.
  r = Cli({"models"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("IP-ADAPTERS"));
  bool listed = false;
  for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
    if (absl::StartsWith(line, "pipe ")) listed = absl::EndsWith(line, "  style");
  }
  EXPECT_TRUE(listed) << r;
  r = Cli({"metadata", "pipe"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("ip-adapters:\n    style  " + info->format()));

  // The golden IP-Adapter pipeline case: its embeddings and noise; size, steps and guidance from
  // its recorded tensors.
  auto ref = LoadSafetensorsWeights((ip_dir / "pipeline_scale1.0.safetensors").string());
  ASSERT_TRUE(ref.ok()) << ref.status();
  TensorMap in;
  in["prompt_embeds"] = ref->at("inputs/prompt_embeds");
  in["pooled_prompt_embeds"] = ref->at("inputs/pooled_prompt_embeds");
  in["noise"] = ref->at("inputs/latents_unpacked");
  const std::string inputs = tmp_.File("ip-inputs.safetensors");
  ASSERT_TRUE(WriteSafetensors(inputs, in).ok());
  const torch::Tensor expected = ref->at("final/image_uint8")[0];  // [H, W, 3]
  const std::string image = (vision_dir / "image.png").string();
  auto generate = [&](const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> args = {
        "generate",
        "--model=pipe",
        "--inputs",
        inputs,
        "--width",
        absl::StrCat(expected.size(1)),
        "--height",
        absl::StrCat(expected.size(0)),
        absl::StrCat("--steps=", ref->at("timesteps").numel()),
        absl::StrCat("--guidance=", ref->at("step/0/guidance_in").item<double>()),
        "-o",
        out};
    args.insert(args.end(), extra.begin(), extra.end());
    return Cli(args);
  };
  auto expect_golden = [&](const std::string& png) {
    auto rgb = DecodePng(test::ReadFileBytes(png));
    ASSERT_TRUE(rgb.ok()) << rgb.status();
    ASSERT_EQ(rgb->sizes(), expected.sizes());
    const torch::Tensor diff = (rgb->to(torch::kInt32) - expected.to(torch::kInt32)).abs();
    EXPECT_LE(diff.max().item<int64_t>(), 1) << png;
    EXPECT_LE(diff.gt(0).sum().item<int64_t>(), diff.numel() / 1000 + 1) << png;
  };
  const std::string plain = tmp_.File("plain.png"), zero = tmp_.File("zero.png"),
                    one = tmp_.File("one.png");
  r = generate(plain, {});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, Not(HasSubstr("ip-adapters:")));
  r = generate(zero, {"--ip_adapter=style=" + image + ":0"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("ip-adapters: style (scale 0)"));
  EXPECT_EQ(test::ReadFileBytes(zero), test::ReadFileBytes(plain));
  r = generate(one, {"--ip-adapter", "style=" + image});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("ip-adapters: style"));
  EXPECT_NE(test::ReadFileBytes(one), test::ReadFileBytes(plain));
  expect_golden(one);
  // One scale per conditioned layer, all 1: the same image as the single scale 1.
  std::vector<std::string> ones(static_cast<size_t>(info->num_layers()), "1");
  const std::string per_layer = tmp_.File("per-layer.png");
  r = generate(per_layer, {"--ip_adapter=style=" + image + ":" + absl::StrJoin(ones, ",")});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(test::ReadFileBytes(per_layer), test::ReadFileBytes(one));
  // Precomputed embeddings (diffusers' own image_embeds of the same image).
  TensorMap embeds;
  embeds["image_embeds"] = ref->at("inputs/ip_adapter_image_embeds");
  const std::string embeds_file = tmp_.File("embeds.safetensors");
  ASSERT_TRUE(WriteSafetensors(embeds_file, embeds).ok());
  const std::string from_embeds = tmp_.File("embeds.png");
  r = generate(from_embeds, {"--ip_adapter_embeds", "style=" + embeds_file + ":1"});
  ASSERT_EQ(r.exit_code, 0) << r;
  expect_golden(from_embeds);

  // Local mistakes: exit 1, named flag, nothing written.
  const std::string bad = tmp_.File("bad.png");
  r = generate(bad, {"--ip_adapter=style=" + tmp_.File("missing.png")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_TRUE(absl::StartsWith(r.err, "error: NOT_FOUND: --ip_adapter")) << r;
  EXPECT_THAT(r.err, HasSubstr("missing.png"));
  r = generate(bad, {"--ip_adapter=style=" + image + ":1,lots"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: --ip_adapter"));
  EXPECT_THAT(r.err, HasSubstr("SCALE '1,lots'"));
  r = generate(bad, {"--ip_adapter=" + image});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("expected NAME=IMAGE.png"));
  r = generate(bad, {"--ip_adapter=style=" + embeds_file});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("is not a PNG"));
  r = generate(bad, {"--ip_adapter_embeds=style=" + inputs});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--ip_adapter_embeds"));
  EXPECT_THAT(r.err, HasSubstr("no tensor 'image_embeds'"));
  EXPECT_FALSE(fs::exists(bad));
  r = Cli({"generate", "--model=default", "--inputs", inputs, "--ip_adapter=style=" + image, "-o",
           tmp_.File("bare.safetensors")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("pipeline instance"));
  r = Cli({"generate", "--pipeline", (fs::path(models_) / "pipe").string(), "--inputs", inputs,
           "--ip_adapter=style=" + image, "-o", bad});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("in-process"));
  // The server's answers: an unknown name, a scale list of the wrong length.
  r = generate(bad, {"--ip_adapter=nope=" + image});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));
  EXPECT_THAT(r.err, HasSubstr("'nope'"));
  ones.push_back("1");
  r = generate(bad, {"--ip_adapter=style=" + image + ":" + absl::StrJoin(ones, ",")});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: "));

  // unload-ip-adapter (management): afterwards the name is unknown.
  r = Cli({"unload-ip-adapter", "--model=pipe", "--name=style", TokenFlag()});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("unloaded IP-Adapter style"));
  const pb::GetMetadataResponse after = StubMetadata("pipe");
  EXPECT_EQ(after.instance().ip_adapters_size(), 0);
  r = generate(bad, {"--ip_adapter=style=" + image});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: NOT_FOUND: "));
}

TEST_F(CliRemoteTest, ManagementCredentialsAndPaths) {
  StartServer();
  std::ofstream(adapters_ + "/x.safetensors") << "not a lora";
  // No token, a wrong token.
  CliResult r = Cli({"load-lora", "--name=x", "--path=x.safetensors"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_TRUE(absl::StartsWith(r.err, "error: UNAUTHENTICATED: ")) << r;
  r = Cli({"load-lora", "--name=x", "--path=x.safetensors", "--token_file=" + wrong_token_file_});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_TRUE(absl::StartsWith(r.err, "error: PERMISSION_DENIED: ")) << r;
  r = Cli({"unload-model", "--name=default"});
  EXPECT_THAT(r.err, HasSubstr("error: UNAUTHENTICATED: "));
  // The right token; a file that is no LoRA is the server's INVALID_ARGUMENT.
  r = Cli({"load-lora", "--name=x", "--path=x.safetensors", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: "));
  // Paths escaping the roots.
  r = Cli({"load-lora", "--name=x", "--path=../../etc/passwd", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: PERMISSION_DENIED: "));
  r = Cli({"load-single-file", "--name=evil", "--path=../../etc/passwd", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: PERMISSION_DENIED: "));

  // Local mistakes: exit 1, nothing sent.
  r = Cli({"load-lora", "--name=x", "--path=x.safetensors", "--weight=lots", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--weight lots"));
  r = Cli({"load-lora", "--name=x", "--path=x.safetensors", "--file=" + token_file_, TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("exactly one of --path"));
  r = Cli({"load-lora", "--name=x", "--path=x.safetensors",
           "--token_file=" + tmp_.File("no-such-token")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("no-such-token"));
  r = Cli({"load-single-file", "--path=x", TokenFlag()});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--name"));
  r = Cli({"models", "extra"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
}

TEST_F(CliRemoteTest, TlsWithACertificateAuthority) {
  const std::string cert = tmp_.File("cert.pem"), key = tmp_.File("key.pem");
  const std::string cmd = absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
      "-addext subjectAltName=IP:127.0.0.1 -keyout ",
      key, " -out ", cert, " >/dev/null 2>&1");
  if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "no openssl command to make a certificate";
  StartServer({"--tls_cert=" + cert, "--tls_key=" + key});
  CliResult r = Cli({"models", "--tls_ca=" + cert});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("default"));
  r = Cli({"models", "--timeout=5"});  // plaintext against TLS
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("error: UNAVAILABLE: "));
  r = Cli({"models", "--tls_ca=" + tmp_.File("missing.pem")});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("missing.pem"));
}

// The issue-9 flags: load-single-file with layerwise casting (8-bit), group offloading and a
// device map prints what the server applied; generate --cache on the embedded flux-tiny pipeline
// (threshold 0 and TaylorSeer interval 1 give the uncached PNG bytes, TaylorSeer's defaults skip
// forwards and say how many); local mistakes are refused before any call.
TEST_F(CliRemoteTest, PerformanceFlags) {
  StartServer({"--embedded_models=default,flux-tiny"});
  fs::copy(fs::path(GoldenDir()) / "lora" / "base_model_dir", fs::path(models_) / "base",
           fs::copy_options::recursive);
  CliResult r = Cli({"load-single-file", "--name=fp8", "--path=base", TokenFlag(),
                     "--storage_dtype=float8_e4m3fn", "--skip_patterns=^proj_out$"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("weights stored as float8_e4m3fn"));
  r = Cli({"load-single-file", "--name=off", "--path=base", TokenFlag(),
           "--group_offload_blocks=1", "--group_offload_prefetch"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("group offloading: "));
  EXPECT_THAT(r.out, HasSubstr("block(s)"));
  EXPECT_THAT(r.out, HasSubstr("prefetch"));
  r = Cli({"load-single-file", "--name=mapped", "--path=base", TokenFlag(),
           "--device_map=sequential", "--max_memory=cpu=1G"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("device map: "));
  EXPECT_EQ(StubMetadata("fp8").instance().storage_dtype(), "float8_e4m3fn");
  EXPECT_TRUE(StubMetadata("off").instance().has_group_offload());
  EXPECT_FALSE(StubMetadata("mapped").instance().device_map().empty());
  // Local refusals, before any call.
  r = Cli({"load-single-file", "--name=x", "--path=base", TokenFlag(), "--max_memory=cpu=lots",
           "--device_map=sequential"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--max_memory: 'cpu=lots'"));
  r = Cli({"load-single-file", "--name=x", "--path=base", TokenFlag(), "--group_offload_prefetch"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("--group_offload_blocks"));
  // The server's refusal of an unknown storage dtype names the field.
  r = Cli({"load-single-file", "--name=x", "--path=base", TokenFlag(), "--storage_dtype=int3"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("storage_dtype"));

  // Step caches on the embedded pipeline.
  auto generate = [&](const std::string& out, std::vector<std::string> extra) {
    // flux-tiny's trained size (the pipeline's default, 128 x the VAE scale factor = 512 px, is
    // 256 times the tokens and spent most of this test's time).
    std::vector<std::string> args = {"generate", "--model=flux-tiny", "--prompt=a red circle",
                                     "--width=32", "--height=32", "--steps=8", "--seed=3", "-o",
                                     out};
    args.insert(args.end(), extra.begin(), extra.end());
    return Cli(args);
  };
  const std::string plain = tmp_.File("plain.png"), zero = tmp_.File("zero.png"),
                    every = tmp_.File("every.png"), taylor = tmp_.File("taylor.png");
  ASSERT_EQ(generate(plain, {}).exit_code, 0);
  r = generate(zero, {"--cache=first_block_cache", "--cache_threshold=0"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("cache first_block_cache: "));
  EXPECT_EQ(test::ReadFileBytes(zero), test::ReadFileBytes(plain));
  r = generate(every, {"--cache=taylorseer_cache", "--cache_interval=1"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("cache taylorseer_cache: 0 forwards skipped, 8 computed"));
  EXPECT_EQ(test::ReadFileBytes(every), test::ReadFileBytes(plain));
  r = generate(taylor, {"--cache=taylorseer_cache"});
  ASSERT_EQ(r.exit_code, 0) << r;
  EXPECT_THAT(r.out, Not(HasSubstr("cache taylorseer_cache: 0 forwards skipped")));
  // Parameters without a type are a local mistake; a bad value is the server's INVALID_ARGUMENT.
  r = generate(taylor, {"--cache_interval=2"});
  EXPECT_EQ(r.exit_code, kExitLocalError) << r;
  EXPECT_THAT(r.err, HasSubstr("need --cache TYPE"));
  r = generate(taylor, {"--cache=taylorseer_cache", "--cache_interval=0"});
  EXPECT_EQ(r.exit_code, kExitRpcError) << r;
  EXPECT_THAT(r.err, HasSubstr("cache.cache_interval"));
}

}  // namespace
}  // namespace ds
