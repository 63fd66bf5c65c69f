// A real Prometheus server (Debian's /usr/bin/prometheus) scrapes the real diffusion-server's
// metrics port, and its HTTP API reports the request counters of the traffic this test sent.
//
// Both processes run on loopback with ports picked at run time; Prometheus scrapes every second
// into a temporary TSDB. The test sends known traffic (ListModels, GetMetadata, a GetMetadata of
// an unknown model, a Generate and an invalid Generate), then polls
// /api/v1/query?query=diffusion_requests_total until every {model, rpc, code} series shows exactly
// the number of calls sent, and checks /api/v1/targets reports the target as "up".
//
// The Prometheus binary: $DS_PROMETHEUS when set, else /usr/bin/prometheus (Debian package
// `prometheus`, installed by scripts/install_deps.sh).
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "testing/server_process.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace pb = ::diffusion::v1;
using ::ds::test::TempDir;
using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

constexpr char kJob[] = "diffusion-server";

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string PrometheusBinary() {
  const char* env = std::getenv("DS_PROMETHEUS");
  return env != nullptr && *env != '\0' ? env : "/usr/bin/prometheus";
}

// ------------------------------------------------------------------------------------------------
// Child processes.

// A child process running `args` (args[0] is the executable path) with stdout and stderr going
// to `log_path`. Killed (SIGKILL) on destruction unless Stop() ended it.
class Child {
 public:
  Child(std::vector<std::string> args, const std::string& log_path) : log_path_(log_path) {
    // Everything the child needs is prepared before fork(): between fork and exec only
    // async-signal-safe calls (this process has gRPC threads).
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log < 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(log, STDOUT_FILENO);
      dup2(log, STDERR_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(log);
  }
  ~Child() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  bool started() const { return pid_ > 0; }
  std::string Log() const { return ds::test::ReadFileBytes(log_path_); }

  // SIGTERM, then SIGKILL if it has not exited within `seconds`. Returns the exit status as
  // waitpid reports it.
  int Stop(double seconds) {
    if (pid_ <= 0 || exited_) return 0;
    kill(pid_, SIGTERM);
    int status = 0;
    const auto start = Clock::now();
    while (Since(start) < seconds) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return status;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, &status, 0);
    exited_ = true;
    return status;
  }

 private:
  std::string log_path_;
  pid_t pid_ = -1;
  bool exited_ = false;
};

// A loopback TCP port that was free a moment ago (bound to port 0, then released).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

struct HttpResponse {
  int status = 0;  // 0: no response (connection refused, timeout, malformed)
  std::string body;
};

// GET http://127.0.0.1:<port><target> (HTTP/1.0, the server closes the connection), with a 5 s
// I/O timeout.
HttpResponse HttpGet(int port, const std::string& target) {
  HttpResponse out;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return out;
  timeval timeout{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string raw;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request =
        absl::StrCat("GET ", target, " HTTP/1.0\r\nHost: 127.0.0.1:", port, "\r\n\r\n");
    if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
        static_cast<ssize_t>(request.size())) {
      char buf[8192];
      ssize_t n;
      while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) raw.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  const size_t header_end = raw.find("\r\n\r\n");
  const size_t space = raw.find(' ');
  if (!absl::StartsWith(raw, "HTTP/") || header_end == std::string::npos ||
      space == std::string::npos) {
    return out;
  }
  out.status = std::atoi(raw.c_str() + space + 1);
  out.body = raw.substr(header_end + 4);
  return out;
}

// GET of a Prometheus API endpoint; the parsed JSON when the answer is HTTP 200 with
// status "success", else null.
Json PrometheusApi(int port, const std::string& target) {
  const HttpResponse r = HttpGet(port, target);
  if (r.status != 200) return Json();
  Json j = Json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("status", "") != "success") return Json();
  return j;
}

// ------------------------------------------------------------------------------------------------
// Requests.

// A float32 tensor proto of `shape` filled by value(i) for flat index i.
template <typename F>
pb::Tensor Float32Tensor(const std::vector<int64_t>& shape, F value) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "Tensor.data is little-endian");
  pb::Tensor t;
  t.set_dtype(pb::FLOAT32);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::string data(static_cast<size_t>(n) * sizeof(float), '\0');
  for (int64_t i = 0; i < n; ++i) {
    const float v = value(i);
    std::memcpy(&data[static_cast<size_t>(i) * sizeof(float)], &v, sizeof(float));
  }
  t.set_data(std::move(data));
  return t;
}

// A 1-step Generate for a served FluxTransformer2DModel instance, shaped from the config the
// server reports (GetMetadata.config_json): a 2x2 latent grid (4 image tokens), 3 text tokens.
pb::GenerateRequest FluxRequest(const std::string& model, const Json& config) {
  const int64_t channels = config.at("in_channels").get<int64_t>();
  const int64_t joint = config.at("joint_attention_dim").get<int64_t>();
  const int64_t pooled = config.at("pooled_projection_dim").get<int64_t>();
  const int64_t axes = static_cast<int64_t>(config.at("axes_dims_rope").size());
  constexpr int64_t kGrid = 2, kImageTokens = kGrid * kGrid, kTextTokens = 3;
  auto wave = [](int64_t i) { return static_cast<float>(std::sin(0.37 * static_cast<double>(i))); };
  pb::GenerateRequest r;
  r.set_model(model);
  auto& in = *r.mutable_inputs();
  in["encoder_hidden_states"] = Float32Tensor({1, kTextTokens, joint}, wave);
  in["pooled_projections"] = Float32Tensor({1, pooled}, wave);
  // Image ids (0, row, column, 0, ...) of the grid; text ids all zero.
  in["img_ids"] = Float32Tensor({kImageTokens, axes}, [&](int64_t i) {
    const int64_t token = i / axes, axis = i % axes;
    if (axis == 1) return static_cast<float>(token / kGrid);
    if (axis == 2) return static_cast<float>(token % kGrid);
    return 0.0f;
  });
  in["txt_ids"] = Float32Tensor({kTextTokens, axes}, [](int64_t) { return 0.0f; });
  r.add_latent_shape(1);
  r.add_latent_shape(kImageTokens);
  r.add_latent_shape(channels);
  r.set_seed(3);
  r.set_steps(1);
  return r;
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return ctx;
}

// Runs a Generate to its end; the final status, and whether a result message arrived.
std::pair<grpc::Status, bool> RunGenerate(pb::DiffusionService::Stub& stub,
                                          const pb::GenerateRequest& request) {
  auto ctx = Context();
  auto reader = stub.Generate(ctx.get(), request);
  pb::GenerateResponse message;
  bool result = false;
  while (reader->Read(&message)) result = result || message.has_result();
  return {reader->Finish(), result};
}

// (model, rpc, code) -> value of diffusion_requests_total as Prometheus' query API returns it.
using Series = std::map<std::tuple<std::string, std::string, std::string>, double>;

std::string Describe(const Series& series) {
  std::vector<std::string> parts;
  for (const auto& [key, value] : series) {
    parts.push_back(absl::StrCat("{model=\"", std::get<0>(key), "\",rpc=\"", std::get<1>(key),
                                 "\",code=\"", std::get<2>(key), "\"} ", value));
  }
  return parts.empty() ? "(none)" : absl::StrJoin(parts, ", ");
}

// ------------------------------------------------------------------------------------------------

TEST(PrometheusTest, ScrapesRequestCountersFromTheServer) {
  const std::string prometheus = PrometheusBinary();
  ASSERT_EQ(access(prometheus.c_str(), X_OK), 0)
      << prometheus << " is not an executable: install the Debian package `prometheus` "
      << "(scripts/install_deps.sh) or point DS_PROMETHEUS at a Prometheus 2.x binary";
  TempDir tmp;
  ASSERT_FALSE(tmp.path().empty());

  // The server, with both ports picked by the kernel.
  ds::test::ServerProcess server({});
  ASSERT_TRUE(server.ok()) << server.Stderr();
  const int metrics_port = server.metrics_port();
  ASSERT_GT(metrics_port, 0) << server.Stderr();

  // Prometheus, scraping it every second.
  const std::string config_path = tmp.File("prometheus.yml");
  std::ofstream(config_path) << "global:\n"
                             << "  scrape_interval: 1s\n"
                             << "  scrape_timeout: 1s\n"
                             << "scrape_configs:\n"
                             << "  - job_name: " << kJob << "\n"
                             << "    static_configs:\n"
                             << "      - targets: ['127.0.0.1:" << metrics_port << "']\n";
  const int web_port = FreePort();
  ASSERT_GT(web_port, 0);
  Child prom({prometheus, "--config.file=" + config_path, "--storage.tsdb.path=" + tmp.File("tsdb"),
              absl::StrCat("--web.listen-address=127.0.0.1:", web_port)},
             tmp.File("prometheus.log"));
  ASSERT_TRUE(prom.started());

  // Traffic, with a fresh server: these are the only calls it counts.
  auto stub = server.Stub();
  constexpr int kListModels = 3, kGetMetadata = 2;
  for (int i = 0; i < kListModels; ++i) {
    pb::ListModelsResponse list;
    const grpc::Status s = stub->ListModels(Context().get(), {}, &list);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  pb::GetMetadataRequest metadata_request;
  metadata_request.set_name("default");
  pb::GetMetadataResponse metadata;
  for (int i = 0; i < kGetMetadata; ++i) {
    const grpc::Status s = stub->GetMetadata(Context().get(), metadata_request, &metadata);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(metadata.class_name(), "FluxTransformer2DModel")
      << "the request below is built for the embedded Flux default";
  const Json config = Json::parse(metadata.config_json());
  // Bad requests: an unknown model (not a label value: counted under model=""), and a Generate
  // with a negative step count (the model is known by then: counted under model="default").
  pb::GetMetadataRequest unknown;
  unknown.set_name("no-such-model");
  ASSERT_EQ(stub->GetMetadata(Context().get(), unknown, &metadata).error_code(),
            grpc::StatusCode::NOT_FOUND);
  pb::GenerateRequest generate = FluxRequest("default", config);
  const auto [ok_status, ok_result] = RunGenerate(*stub, generate);
  ASSERT_TRUE(ok_status.ok()) << ok_status.error_message() << "\n" << server.Stderr();
  EXPECT_TRUE(ok_result);
  generate.set_steps(-1);
  EXPECT_EQ(RunGenerate(*stub, generate).first.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  const Series expected = {
      {{"", "ListModels", "OK"}, kListModels},
      {{"default", "GetMetadata", "OK"}, kGetMetadata},
      {{"", "GetMetadata", "NOT_FOUND"}, 1},
      {{"default", "Generate", "OK"}, 1},
      {{"default", "Generate", "INVALID_ARGUMENT"}, 1},
  };

  // Poll Prometheus until its latest samples show exactly these counts.
  Series seen;
  bool ready = false;
  const auto start = Clock::now();
  while (Since(start) < 30) {
    ready = ready || HttpGet(web_port, "/-/ready").status == 200;
    if (ready) {
      const Json j = PrometheusApi(web_port, "/api/v1/query?query=diffusion_requests_total");
      seen.clear();
      if (!j.is_null() && j["data"].value("resultType", "") == "vector") {
        for (const Json& r : j["data"]["result"]) {
          const Json& m = r["metric"];
          EXPECT_EQ(m.value("job", ""), kJob);
          EXPECT_EQ(m.value("instance", ""), absl::StrCat("127.0.0.1:", metrics_port));
          // "value": [<unix time>, "<sample value as a string>"]
          // Prometheus drops labels with an empty value: a missing `model` is model="".
          seen[{m.value("model", ""), m.value("rpc", "?"), m.value("code", "?")}] =
              std::stod(r["value"][1].get<std::string>());
        }
      }
      if (seen == expected) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  ASSERT_TRUE(ready) << "Prometheus never became ready:\n" << prom.Log();
  EXPECT_EQ(seen, expected) << "Prometheus has " << Describe(seen) << "\nexpected "
                            << Describe(expected) << "\nPrometheus log:\n"
                            << prom.Log();

  // The target's health as Prometheus sees it.
  const Json targets = PrometheusApi(web_port, "/api/v1/targets?state=active");
  ASSERT_FALSE(targets.is_null()) << prom.Log();
  const Json& active = targets["data"]["activeTargets"];
  ASSERT_EQ(active.size(), 1u) << active.dump();
  EXPECT_EQ(active[0]["labels"].value("job", ""), kJob);
  EXPECT_EQ(active[0].value("scrapeUrl", ""),
            absl::StrCat("http://127.0.0.1:", metrics_port, "/metrics"));
  EXPECT_EQ(active[0].value("health", ""), "up") << active.dump();
  EXPECT_EQ(active[0].value("lastError", "?"), "") << active.dump();
  // ... and the same as the `up` series, next to a gauge the server sets on every scrape.
  const Json up = PrometheusApi(web_port, "/api/v1/query?query=up");
  ASSERT_FALSE(up.is_null());
  ASSERT_EQ(up["data"]["result"].size(), 1u) << up.dump();
  EXPECT_EQ(up["data"]["result"][0]["value"][1], "1");
  const Json rss =
      PrometheusApi(web_port, "/api/v1/query?query=diffusion_process_resident_memory_bytes");
  ASSERT_FALSE(rss.is_null());
  ASSERT_EQ(rss["data"]["result"].size(), 1u) << rss.dump();
  EXPECT_GT(std::stod(rss["data"]["result"][0]["value"][1].get<std::string>()), 0);

  // Both stop cleanly on SIGTERM.
  const int prom_status = prom.Stop(15);
  EXPECT_TRUE(WIFEXITED(prom_status) && WEXITSTATUS(prom_status) == 0) << prom.Log();
  // Our channel closes first: with an idle client still connected the server's drain takes
  // seconds longer (gRPC waits on the connection), which is not what this test is about.
  stub.reset();
  server.Signal(SIGTERM);
  EXPECT_EQ(server.WaitExit(15), 0) << server.Stderr();
}

}  // namespace
}  // namespace ds
