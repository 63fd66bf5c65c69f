// Replicas behind a real L7 load balancer: three diffusion-server processes on loopback share one
// adapter store (--adapter_store) behind Debian's nginx running deploy/nginx/nginx.conf.in
// (grpc_pass, as a normal user with a temporary prefix). One client connection to nginx:
//   - calls spread over every replica (each replica's own /metrics counts its Generate calls);
//   - LoadLoRA through the balancer (it reaches one replica), then 50 Generate calls naming the
//     adapter through the balancer all succeed and echo the same digest, and every replica loaded
//     it exactly once (single flight);
//   - a store entry that is corrupt is DATA_LOSS on another replica, naming the file;
//   - replacing the adapter under the same name reaches every replica within the poll bound;
//   - UnloadLoRA through the balancer: every replica drops it within the bound;
//   - SIGTERM to one replica while calls run on it: every call succeeds (calls it had accepted
//     finish; calls it refused while draining are refused with UNAVAILABLE before running, which
//     clients retry), and it exits 0.
#include <arpa/inet.h>
#include <fcntl.h>
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
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "handlers/digest.h"
#include "handlers/safetensors.h"
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
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "deploy-test-admin-token-0123456789";
constexpr int kReplicas = 3;
constexpr int kPollMs = 300;
// A change must reach every replica within one poll interval plus the time to load it.
constexpr double kConvergenceBoundS = kPollMs / 1000.0 + 1.5;
// The refusal of a draining replica (DiffusionService's Draining()).
constexpr char kDrainingMessage[] = "the server is shutting down";

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::unique_ptr<grpc::ClientContext> Context(double seconds = 60, bool admin = false) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (admin) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
  return ctx;
}

using ::ds::test::HttpGet;

// The sum of the samples of `family` whose labels include every `labels` pair.
double MetricSum(const std::string& exposition, const std::string& family,
                 const std::map<std::string, std::string>& labels) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::StartsWith(line, family + "{") && !absl::StartsWith(line, family + " ")) continue;
    bool match = true;
    for (const auto& [k, v] : labels) {
      match = match && absl::StrContains(line, absl::StrCat(k, "=\"", v, "\""));
    }
    if (!match) continue;
    const size_t space = line.rfind(' ');
    sum += std::stod(std::string(line.substr(space + 1)));
  }
  return sum;
}

int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

bool Accepts(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// nginx with the repository's template, rendered for `upstream_ports`, as a child process.
class Nginx {
 public:
  Nginx(const std::string& prefix, const std::vector<int>& upstream_ports) : prefix_(prefix) {
    for (const char* sub : {"client_body", "proxy", "fastcgi", "uwsgi", "scgi"}) {
      fs::create_directories(fs::path(prefix) / sub);
    }
    port_ = FreePort();
    const std::string conf_path = Render(upstream_ports, -1);
    std::vector<std::string> args = {
        DS_NGINX, "-p", prefix, "-c", conf_path, "-e", prefix + "/error.log"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = fork();
    if (pid_ == 0) {
      const int null = open("/dev/null", O_RDWR);
      dup2(null, STDOUT_FILENO);
      dup2(null, STDERR_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto start = Clock::now();
    while (Since(start) < 20 && !Accepts(port_)) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ~Nginx() {
    if (pid_ > 0) {
      kill(pid_, SIGQUIT);
      waitpid(pid_, nullptr, 0);
    }
  }
  // Takes upstream `down_index` out of rotation (as a Kubernetes endpoint update does before a
  // pod gets SIGTERM): rewrites the config and reloads (SIGHUP; old workers finish their calls).
  void TakeOutOfRotation(const std::vector<int>& upstream_ports, int down_index) {
    Render(upstream_ports, down_index);
    kill(pid_, SIGHUP);
  }
  bool ok() const { return pid_ > 0 && Accepts(port_); }
  std::string target() const { return absl::StrCat("127.0.0.1:", port_); }
  std::string ErrorLog() const { return test::ReadFileBytes(prefix_ + "/error.log"); }

 private:
  // Writes nginx.conf from the template; returns its path.
  std::string Render(const std::vector<int>& upstream_ports, int down_index) {
    std::string servers;
    for (size_t i = 0; i < upstream_ports.size(); ++i) {
      absl::StrAppend(&servers, "server 127.0.0.1:", upstream_ports[i],
                      static_cast<int>(i) == down_index ? " down" : "",
                      " max_fails=1 fail_timeout=5s;\n    ");
    }
    const std::string conf = absl::StrReplaceAll(test::ReadFileBytes(DS_NGINX_TEMPLATE),
                                                 {{"@PREFIX@", prefix_},
                                                  {"@LISTEN@", absl::StrCat("127.0.0.1:", port_)},
                                                  {"@ERROR_LOG@", prefix_ + "/error.log"},
                                                  {"@UPSTREAM_SERVERS@", servers}});
    const std::string conf_path = prefix_ + "/nginx.conf";
    // As root, nginx would run its workers as `nobody`, who cannot enter this private temporary
    // folder; as any other user the workers stay that user.
    std::ofstream(conf_path, std::ios::trunc) << (geteuid() == 0 ? "user root;\n" : "") << conf;
    return conf_path;
  }

  std::string prefix_;
  pid_t pid_ = -1;
  int port_ = 0;
};

pb::Tensor ToProto(const torch::Tensor& t) {
  pb::Tensor p;
  EXPECT_TRUE(server::TensorToProto(t, &p).ok());
  return p;
}

// A Generate on the embedded default model (16 image tokens, 8 text tokens).
pb::GenerateRequest MakeRequest(int64_t steps, const std::string& adapter = "") {
  const nlohmann::json& config = server::EmbeddedDefaultConfig();
  const int64_t joint = config["joint_attention_dim"].get<int64_t>();
  const int64_t pooled = config["pooled_projection_dim"].get<int64_t>();
  const int64_t channels = config["in_channels"].get<int64_t>();
  torch::manual_seed(7);
  pb::GenerateRequest r;
  r.set_model("default");
  (*r.mutable_inputs())["encoder_hidden_states"] = ToProto(torch::randn({1, 8, joint}));
  (*r.mutable_inputs())["pooled_projections"] = ToProto(torch::randn({1, pooled}));
  torch::Tensor img = torch::zeros({16, 3});
  for (int64_t i = 0; i < 16; ++i) {
    img[i][1] = static_cast<float>(i / 4);
    img[i][2] = static_cast<float>(i % 4);
  }
  (*r.mutable_inputs())["img_ids"] = ToProto(img);
  (*r.mutable_inputs())["txt_ids"] = ToProto(torch::zeros({8, 3}));
  r.add_latent_shape(1);
  r.add_latent_shape(16);
  r.add_latent_shape(channels);
  r.set_seed(3);
  r.set_steps(steps);
  if (!adapter.empty()) r.add_adapters()->set_name(adapter);
  return r;
}

struct Outcome {
  grpc::Status status;
  std::string digest;  // of the first applied adapter
  int attempts = 0;
};

// One Generate; with `retry_draining`, a refusal by a draining replica (UNAVAILABLE before the
// call ran) is retried, as clients of a replicated deployment do.
Outcome Generate(pb::DiffusionService::Stub& stub, const pb::GenerateRequest& request,
                 bool retry_draining = false) {
  Outcome o;
  for (;;) {
    ++o.attempts;
    auto ctx = Context(60);
    auto reader = stub.Generate(ctx.get(), request);
    pb::GenerateResponse message;
    while (reader->Read(&message)) {
      if (message.has_result() && message.result().adapters_size() > 0) {
        o.digest = message.result().adapters(0).sha256();
      }
    }
    o.status = reader->Finish();
    if (retry_draining && o.status.error_code() == grpc::StatusCode::UNAVAILABLE &&
        absl::StrContains(o.status.error_message(), kDrainingMessage) && o.attempts < 5) {
      continue;
    }
    return o;
  }
}

// Runs `n` calls of `call(i)` on `concurrency` threads.
void RunConcurrently(int n, int concurrency, const std::function<void(int)>& call) {
  std::atomic<int> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&] {
      for (int i = next++; i < n; i = next++) call(i);
    });
  }
  for (std::thread& t : threads) t.join();
}

class DeployTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    store_ = tmp_.File("store");
    fs::create_directories(store_);
    token_file_ = tmp_.File("token");
    std::ofstream(token_file_) << kToken << "\n";
    for (int i = 0; i < kReplicas; ++i) {
      replicas_.push_back(std::make_unique<ServerProcess>(std::vector<std::string>{
          absl::StrCat("--adapter_store=", store_),
          absl::StrCat("--adapter_store_poll_ms=", kPollMs),
          absl::StrCat("--admin_token_file=", token_file_), "--queue_capacity=64",
          "--grace_period_s=20", "--max_connection_age_ms=0"}));
      ASSERT_TRUE(replicas_.back()->ok()) << replicas_.back()->Stderr();
      ports_.push_back(replicas_.back()->port());
    }
    nginx_ = std::make_unique<Nginx>(tmp_.File("nginx"), ports_);
    ASSERT_TRUE(nginx_->ok()) << "nginx did not start: " << nginx_->ErrorLog();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    lb_ = pb::DiffusionService::NewStub(
        grpc::CreateCustomChannel(nginx_->target(), grpc::InsecureChannelCredentials(), args));
    params_ = NamedTensors(local_.LoadEmbedded("default")->instance->model().module());
  }

  std::string Metrics(int replica) {
    return HttpGet(replicas_[static_cast<size_t>(replica)]->metrics_port(), "/metrics");
  }
  double GenerateCount(int replica, const std::string& code = "OK") {
    return MetricSum(Metrics(replica), "diffusion_requests_total",
                     {{"rpc", "Generate"}, {"code", code}});
  }
  std::string LoraBytes(uint64_t seed) {
    const std::string path = tmp_.File(absl::StrCat("lora", seed, ".safetensors"));
    EXPECT_TRUE(WriteSafetensors(
                    path, test::MakeDiffusersLora(params_, test::LinearModules(params_), 2, seed))
                    .ok());
    return test::ReadFileBytes(path);
  }
  grpc::Status LoadLoRA(pb::DiffusionService::Stub& stub, const std::string& name,
                        const std::string& bytes, bool replace, pb::LoadLoRAResponse* out) {
    pb::LoadLoRARequest req;
    req.set_model("default");
    req.set_name(name);
    req.set_inline_bytes(bytes);
    req.set_replace(replace);
    return stub.LoadLoRA(Context(60, true).get(), req, out);
  }
  // Seconds until every live replica, asked directly, echoes `digest` for `adapter` (or, with an
  // empty digest, answers NOT_FOUND for it); -1 if not within `limit` seconds.
  double Converge(const std::string& adapter, const std::string& digest, double limit,
                  const std::vector<int>& live) {
    const auto start = Clock::now();
    std::vector<bool> done(replicas_.size(), false);
    while (Since(start) < limit) {
      bool all = true;
      for (int r : live) {
        if (done[static_cast<size_t>(r)]) continue;
        auto stub = replicas_[static_cast<size_t>(r)]->Stub();
        Outcome o = Generate(*stub, MakeRequest(1, adapter));
        done[static_cast<size_t>(r)] = digest.empty()
                                           ? o.status.error_code() == grpc::StatusCode::NOT_FOUND
                                           : (o.status.ok() && o.digest == digest);
        all = all && done[static_cast<size_t>(r)];
      }
      if (all) return Since(start);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  TempDir tmp_;
  std::string store_, token_file_;
  std::vector<std::unique_ptr<ServerProcess>> replicas_;
  std::vector<int> ports_;
  std::unique_ptr<Nginx> nginx_;
  std::unique_ptr<pb::DiffusionService::Stub> lb_;
  server::ModelManager local_;
  TensorMap params_;
};

TEST_F(DeployTest, ReplicasBehindNginxServeOneAdapterSetAndDrainWithoutLoss) {
  // 1. Calls over one client connection spread over every replica.
  std::atomic<int> ok{0};
  RunConcurrently(30, 6, [&](int) {
    if (Generate(*lb_, MakeRequest(2)).status.ok()) ++ok;
  });
  EXPECT_EQ(ok.load(), 30);
  // A replica counts a call when it is done with it, which may be just after the client saw
  // its status: wait for the counters to settle.
  double total = 0;
  std::vector<double> per_replica(kReplicas, 0);
  for (const auto start = Clock::now(); total < 30 && Since(start) < 5;) {
    total = 0;
    for (int r = 0; r < kReplicas; ++r) total += per_replica[r] = GenerateCount(r);
    if (total < 30) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(total, 30);
  for (int r = 0; r < kReplicas; ++r) {
    EXPECT_GE(per_replica[r], 1) << "replica " << r << " received no call";
  }

  // 2. LoadLoRA through the balancer reaches one replica; every replica then serves it.
  const std::string v1 = LoraBytes(1);
  const std::string d1 = Sha256Hex(v1.data(), v1.size());
  pb::LoadLoRAResponse loaded;
  grpc::Status s = LoadLoRA(*lb_, "style", v1, false, &loaded);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(loaded.adapter().sha256(), d1);
  std::mutex mu;
  std::map<std::string, int> digests;
  std::vector<std::string> errors;
  RunConcurrently(50, 10, [&](int) {
    Outcome o = Generate(*lb_, MakeRequest(2, "style"));
    std::lock_guard lock(mu);
    if (o.status.ok()) {
      ++digests[o.digest];
    } else {
      errors.push_back(absl::StrCat(o.status.error_code(), ": ", o.status.error_message()));
    }
  });
  EXPECT_THAT(errors, ::testing::IsEmpty());
  EXPECT_EQ(digests.size(), 1u);
  EXPECT_EQ(digests[d1], 50);
  for (int r = 0; r < kReplicas; ++r) {
    const std::string m = Metrics(r);
    // One load per replica: the LoadLoRA on one, a single on-demand load on each other.
    EXPECT_EQ(MetricSum(m, "diffusion_adapter_load_seconds_count", {{"model", "default"}}), 1)
        << "replica " << r;
    EXPECT_GE(MetricSum(m, "diffusion_requests_total", {{"rpc", "Generate"}, {"code", "OK"}}), 2)
        << "replica " << r;
  }
  // The store holds it; every replica lists it.
  {
    pb::ListLoRAsRequest req;
    req.set_model("default");
    pb::ListLoRAsResponse listed;
    ASSERT_TRUE(replicas_[1]->Stub()->ListLoRAs(Context().get(), req, &listed).ok());
    ASSERT_EQ(listed.stored_size(), 1);
    EXPECT_EQ(listed.stored(0).sha256(), d1);
  }

  // 3. A corrupt store entry is DATA_LOSS on a replica that does not hold it, naming the file.
  const std::string broken = LoraBytes(9);
  ASSERT_TRUE(LoadLoRA(*replicas_[0]->Stub(), "broken", broken, false, &loaded).ok());
  const std::string blob = absl::StrCat("broken.", loaded.adapter().sha256(), ".safetensors");
  {
    std::string bytes = broken;
    bytes.back() = static_cast<char>(bytes.back() ^ 1);
    std::ofstream(absl::StrCat(store_, "/v1/default.d/", blob), std::ios::trunc) << bytes;
  }
  Outcome corrupt = Generate(*replicas_[1]->Stub(), MakeRequest(1, "broken"));
  EXPECT_EQ(corrupt.status.error_code(), grpc::StatusCode::DATA_LOSS)
      << corrupt.status.error_message();
  EXPECT_THAT(corrupt.status.error_message(), HasSubstr(absl::StrCat("default.d/", blob)));
  EXPECT_THAT(corrupt.status.error_message(), ::testing::Not(HasSubstr(store_)));

  // 4. Replacing the adapter under the same name converges on every replica within the bound.
  const std::string v2 = LoraBytes(2);
  const std::string d2 = Sha256Hex(v2.data(), v2.size());
  ASSERT_TRUE(LoadLoRA(*lb_, "style", v2, true, &loaded).ok());
  EXPECT_EQ(loaded.adapter().sha256(), d2);
  const double converged = Converge("style", d2, 10, {0, 1, 2});
  EXPECT_GE(converged, 0) << "not converged within 10 s";
  EXPECT_LE(converged, kConvergenceBoundS);
  std::cout << "replacement converged on " << kReplicas << " replicas in " << converged
            << " s (poll " << kPollMs << " ms)\n";
  digests.clear();
  RunConcurrently(20, 10, [&](int) {
    Outcome o = Generate(*lb_, MakeRequest(1, "style"));
    std::lock_guard lock(mu);
    ++digests[o.status.ok() ? o.digest : o.status.error_message()];
  });
  EXPECT_EQ(digests[d2], 20);

  // 5. UnloadLoRA through the balancer: every replica drops it within the bound.
  {
    pb::UnloadLoRARequest req;
    req.set_model("default");
    req.set_name("style");
    pb::UnloadLoRAResponse resp;
    ASSERT_TRUE(lb_->UnloadLoRA(Context(60, true).get(), req, &resp).ok());
  }
  const double dropped = Converge("style", "", 10, {0, 1, 2});
  EXPECT_GE(dropped, 0);
  EXPECT_LE(dropped, kConvergenceBoundS);

  // 6. SIGTERM one replica while calls run on it: no call is lost.
  const int victim = 2;
  const double before = GenerateCount(victim);
  std::atomic<int> succeeded{0}, retried{0};
  std::vector<std::string> failures;
  std::thread traffic([&] {
    RunConcurrently(36, 9, [&](int) {
      Outcome o = Generate(*lb_, MakeRequest(150), /*retry_draining=*/true);
      if (o.attempts > 1) ++retried;
      if (o.status.ok()) {
        ++succeeded;
      } else {
        std::lock_guard lock(mu);
        failures.push_back(absl::StrCat(o.status.error_code(), ": ", o.status.error_message()));
      }
    });
  });
  // Wait until the victim is running a call, then signal it.
  const auto start = Clock::now();
  bool running = false;
  while (!running && Since(start) < 20) {
    running = MetricSum(Metrics(victim), "diffusion_requests_in_flight", {}) >= 1;
    if (!running) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(running) << "the victim never ran a call";
  // As in Kubernetes (endpoint removal, preStop), the balancer stops routing new calls to the
  // replica, then it gets SIGTERM while it still runs the calls it accepted. (Without that step a
  // new call that nginx puts on the replica's connection as the replica's GOAWAY goes out is
  // answered 502 by nginx, which cannot re-send a streamed gRPC request.)
  nginx_->TakeOutOfRotation(ports_, victim);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_GE(MetricSum(Metrics(victim), "diffusion_requests_in_flight", {}), 1)
      << "the victim must still be running calls when it gets SIGTERM";
  replicas_[victim]->Signal(SIGTERM);
  const int exit_code = replicas_[victim]->WaitExit(30);
  traffic.join();
  EXPECT_EQ(exit_code, 0) << replicas_[victim]->Stderr();
  EXPECT_THAT(failures, ::testing::IsEmpty())
      << "nginx: " << nginx_->ErrorLog() << "\nvictim: " << replicas_[victim]->Stderr();
  EXPECT_EQ(succeeded.load(), 36);
  // The victim finished every call it accepted: its access log has no failed Generate among the
  // adapter-free calls (those of this phase; the convergence checks above expect NOT_FOUND).
  for (absl::string_view line : absl::StrSplit(replicas_[victim]->Stderr(), '\n')) {
    if (absl::StrContains(line, "rpc=Generate") && absl::StrContains(line, "adapters=[]")) {
      EXPECT_TRUE(absl::StrContains(line, "code=OK")) << line;
    }
  }
  std::cout << "SIGTERM mid-traffic: " << succeeded.load() << "/36 calls succeeded, "
            << retried.load()
            << " refused by the draining replica before running and retried; the victim had "
            << before << " Generate calls before\n";
}

}  // namespace
}  // namespace ds
