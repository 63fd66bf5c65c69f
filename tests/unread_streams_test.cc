// A client that opens 1,000 Generate streams and never reads them, against the real
// diffusion-server binary serving the embedded flux-tiny model (32x32 images, a few steps).
//
// The streams are opened in waves on a few channels with the async (completion queue) client API;
// no stream ever gets a Read. Asserted: every stream beyond the bounded scheduler is refused at
// once with RESOURCE_EXHAUSTED ("queue is full") and no other code appears; the server's resident
// memory stays within kRssBoundMb of its value before the streams (see there for why); health
// checks and GetMetadata keep answering within a 2 s deadline while the streams are open; once
// the client cancels them and closes its channels, the server's thread and file-descriptor
// counts come back to their baseline and a normal Generate succeeds.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "testing/proc_stats.h"
#include "testing/server_process.h"
#include "testing/http_get.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace pb = ::diffusion::v1;
using ::ds::test::ProcStats;
using ::ds::test::ReadProcStats;
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using Clock = std::chrono::steady_clock;

constexpr int kStreams = 1000;
constexpr int kChannels = 4;
constexpr int kWaves = 10;  // kStreams / kWaves streams at once, kWavePause apart
constexpr auto kWavePause = std::chrono::milliseconds(300);
constexpr int kWorkers = 1;
constexpr int kQueueCapacity = 16;
// Resident-memory bound above the baseline. What an unread stream can cost the server: its
// HTTP/2 stream and call state (a few KB to tens of KB each; 1,000 of them well under 100 MB) and,
// for the at most kWorkers + kQueueCapacity admitted at a time, one flux-tiny generation (a few
// MB of activations) plus its result (a 32x32 PNG and progress events, which fit the client's
// flow-control window, so the server's writes complete even though nobody reads). 256 MB is
// that with a wide margin; unbounded buffering (e.g. generating for every stream) would pass it.
constexpr int64_t kRssBoundMb = 256;
constexpr auto kResponsiveDeadline = std::chrono::seconds(2);
// gRPC's executor threads' name as /proc shows it (15 characters).
constexpr char kExecutorThread[] = "default-executo";

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

using ::ds::test::HttpGet;

// The value of the Prometheus sample `series` (name{labels}) in `text`, or -1.
double MetricValue(const std::string& text, const std::string& series) {
  const std::string needle = "\n" + series + " ";
  const size_t at = text.find(needle);
  if (at == std::string::npos) return -1;
  return std::strtod(text.c_str() + at + needle.size(), nullptr);
}

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds d) {
  ctx->set_deadline(std::chrono::system_clock::now() + d);
}

pb::GenerateRequest TinyRequest(int64_t seed) {
  pb::GenerateRequest r;
  r.set_model("flux-tiny");
  r.add_prompt("a red circle on a yellow background");
  r.set_width(32);
  r.set_height(32);
  r.set_steps(4);
  r.set_seed(seed);
  return r;
}

// A Generate read to the end.
grpc::Status GenerateAndRead(pb::DiffusionService::Stub& stub, int64_t seed, int* images) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, std::chrono::seconds(60));
  auto reader = stub.Generate(&ctx, TinyRequest(seed));
  pb::GenerateResponse m;
  *images = 0;
  while (reader->Read(&m)) {
    if (m.has_result()) *images = m.result().images_size();
  }
  return reader->Finish();
}

// One unread stream: started and asked for its final status, never read.
struct Stream {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientAsyncReader<pb::GenerateResponse>> reader;
  grpc::Status status;
  std::atomic<bool> finished{false};
};

// Tags: 2 * index (StartCall), 2 * index + 1 (Finish).
void* Tag(int index, bool finish) {
  return reinterpret_cast<void*>(static_cast<intptr_t>(2 * index + (finish ? 1 : 0)));
}

TEST(UnreadStreamsTest, ThousandUnreadGenerateStreamsKeepTheServerBoundedAndResponsive) {
  TempDir tmp;
  ServerProcess server({"--embedded_models=flux-tiny", "--embedded_dir=" + tmp.File("embedded"),
                        absl::StrCat("--workers=", kWorkers),
                        absl::StrCat("--queue_capacity=", kQueueCapacity)});
  ASSERT_TRUE(server.ok()) << server.Stderr();
  // On any failure, the server's log (a sanitizer report, a crash) is what explains it.
  struct PrintServerLogOnFailure {
    ServerProcess& server;
    ~PrintServerLogOnFailure() {
      if (::testing::Test::HasFailure()) {
        std::fprintf(stderr, "server stderr:\n%s\n", server.Stderr().c_str());
      }
    }
  } print_log_on_failure{server};
  const pid_t pid = test::FindChildProcess(DS_SERVER_PATH);
  ASSERT_GT(pid, 0) << "the server process was not found under /proc";

  std::shared_ptr<grpc::Channel> control_channel = server.NewChannel();
  auto control = pb::DiffusionService::NewStub(control_channel);
  auto health = grpc::health::v1::Health::NewStub(control_channel);

  // Warm up (the first generations allocate the model's working memory), then the baseline.
  for (int i = 0; i < 3; ++i) {
    int images = 0;
    const grpc::Status s = GenerateAndRead(*control, i, &images);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(images, 1);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const ProcStats baseline = ReadProcStats(pid);
  ASSERT_GT(baseline.rss_kb, 0);
  ASSERT_GT(baseline.threads, 0);
  ASSERT_GT(baseline.fds, 0);
  const std::map<std::string, int> baseline_threads = test::ThreadsByName(pid);

  // Checks that must keep answering while the streams are open; each returns its latency (s).
  double worst_check_s = 0;
  int checks = 0;
  auto responsive = [&](const char* when) {
    const auto start = Clock::now();
    grpc::ClientContext hctx;
    SetDeadline(&hctx, kResponsiveDeadline);
    grpc::health::v1::HealthCheckRequest hreq;
    hreq.set_service("flux-tiny");
    grpc::health::v1::HealthCheckResponse hresp;
    const grpc::Status hs = health->Check(&hctx, hreq, &hresp);
    EXPECT_TRUE(hs.ok()) << when << ": health: " << hs.error_message();
    EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << when;
    grpc::ClientContext mctx;
    SetDeadline(&mctx, kResponsiveDeadline);
    pb::GetMetadataRequest mreq;
    mreq.set_name("flux-tiny");
    pb::GetMetadataResponse mresp;
    const grpc::Status ms = control->GetMetadata(&mctx, mreq, &mresp);
    EXPECT_TRUE(ms.ok()) << when << ": GetMetadata: " << ms.error_message();
    worst_check_s = std::max(worst_check_s, Since(start));
    ++checks;
  };

  // The unread streams, on their own channels (one connection each) and completion queue.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<pb::DiffusionService::Stub>> stubs;
  for (int c = 0; c < kChannels; ++c) {
    channels.push_back(server.NewChannel());
    stubs.push_back(pb::DiffusionService::NewStub(channels.back()));
  }
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<Stream>> streams(kStreams);
  std::atomic<int> finished{0};
  std::mutex codes_mu;
  std::map<grpc::StatusCode, int> codes;  // final codes before the client's cancel
  std::map<grpc::StatusCode, std::string> messages;
  std::atomic<bool> cancelling{false};
  std::thread poller([&] {
    void* tag = nullptr;
    bool ok = false;
    while (cq.Next(&tag, &ok)) {
      const intptr_t t = reinterpret_cast<intptr_t>(tag);
      if ((t & 1) == 0) continue;  // StartCall done
      Stream& s = *streams[static_cast<size_t>(t / 2)];
      if (!cancelling.load()) {
        std::lock_guard lock(codes_mu);
        ++codes[s.status.error_code()];
        messages[s.status.error_code()] = s.status.error_message();
      }
      s.finished.store(true);
      finished.fetch_add(1);
    }
  });

  ProcStats peak = baseline;
  auto sample = [&] {
    const ProcStats now = ReadProcStats(pid);
    peak.rss_kb = std::max(peak.rss_kb, now.rss_kb);
    peak.threads = std::max(peak.threads, now.threads);
    peak.fds = std::max(peak.fds, now.fds);
  };
  const int per_wave = kStreams / kWaves;
  for (int wave = 0; wave < kWaves; ++wave) {
    for (int k = 0; k < per_wave; ++k) {
      const int i = wave * per_wave + k;
      streams[i] = std::make_unique<Stream>();
      Stream& s = *streams[i];
      s.reader = stubs[i % kChannels]->PrepareAsyncGenerate(&s.ctx, TinyRequest(1000 + i), &cq);
      s.reader->StartCall(Tag(i, false));
      s.reader->Finish(&s.status, Tag(i, true));
    }
    std::this_thread::sleep_for(kWavePause);
    sample();
    responsive(absl::StrCat("after wave ", wave).c_str());
  }
  // Let the refusals arrive and the admitted generations run (the server finishes them; their
  // results wait in the client's transport, unread), then keep checking for a while.
  int last = -1;
  const auto settle = Clock::now();
  while (Since(settle) < 30) {
    const int now = finished.load();
    if (now == last) break;
    last = now;
    std::this_thread::sleep_for(std::chrono::seconds(2));
    sample();
    responsive("streams open");
  }
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    sample();
    responsive("streams open, settled");
  }
  const int ended_before_cancel = finished.load();
  // The server finished every admitted stream although nobody read them (each result fits the
  // client's flow-control window): its queue is empty, no worker is busy, and it counted each
  // admitted Generate as OK.
  int admitted = 0;
  {
    std::lock_guard lock(codes_mu);
    admitted = kStreams - codes[grpc::StatusCode::RESOURCE_EXHAUSTED];
  }
  const std::string ok_series =
      "diffusion_requests_total{code=\"OK\",model=\"flux-tiny\",rpc=\"Generate\"}";
  std::string metrics;
  const auto drain_start = Clock::now();
  do {
    metrics = HttpGet(server.metrics_port(), "/metrics");
    if (MetricValue(metrics, ok_series) >= 3 + admitted) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (Since(drain_start) < 30);
  EXPECT_EQ(MetricValue(metrics, ok_series), 3 + admitted) << metrics;
  EXPECT_EQ(MetricValue(metrics, "diffusion_queue_depth{device=\"cpu\"}"), 0) << metrics;
  EXPECT_EQ(MetricValue(metrics, "diffusion_requests_in_flight{device=\"cpu\"}"), 0) << metrics;
  {
    std::lock_guard lock(codes_mu);
    const int exhausted = codes[grpc::StatusCode::RESOURCE_EXHAUSTED];
    const int ok = codes[grpc::StatusCode::OK];
    const int still_open = kStreams - ended_before_cancel;
    std::printf(
        "unread streams: %d opened, %d RESOURCE_EXHAUSTED, %d OK without a read, %d still open; "
        "server RSS %.1f MB -> peak %.1f MB, threads %lld -> peak %lld, fds %lld -> peak %lld; "
        "worst health+metadata check %.3f s over %d checks\n",
        kStreams, exhausted, ok, still_open, baseline.rss_kb / 1024.0, peak.rss_kb / 1024.0,
        static_cast<long long>(baseline.threads), static_cast<long long>(peak.threads),
        static_cast<long long>(baseline.fds), static_cast<long long>(peak.fds), worst_check_s,
        checks);
    for (const auto& [code, n] : codes) {
      EXPECT_TRUE(code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::OK)
          << n << " streams ended with code " << code << ": " << messages[code];
    }
    EXPECT_GT(exhausted, 0) << "admission beyond the queue must be refused";
    EXPECT_TRUE(absl::StrContains(messages[grpc::StatusCode::RESOURCE_EXHAUSTED], "queue is full"))
        << messages[grpc::StatusCode::RESOURCE_EXHAUSTED];
    // Each wave finds the queue free again, so at least workers + queue of each were admitted.
    EXPECT_GE(ok + still_open, kWorkers + kQueueCapacity);
  }
  EXPECT_LE(peak.rss_kb, baseline.rss_kb + kRssBoundMb * 1024)
      << "server RSS grew by " << (peak.rss_kb - baseline.rss_kb) / 1024 << " MB";
  // No thread per stream: at most gRPC's executor threads (see below) and a couple more.
  EXPECT_LE(peak.threads,
            baseline.threads + 2 * static_cast<int>(std::thread::hardware_concurrency()) + 2);
  EXPECT_LT(worst_check_s, std::chrono::duration<double>(kResponsiveDeadline).count());

  // The client gives up: cancels every stream and closes its channels.
  cancelling.store(true);
  for (auto& s : streams) s->ctx.TryCancel();
  const auto cancel_start = Clock::now();
  while (finished.load() < kStreams && Since(cancel_start) < 30) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(finished.load(), kStreams) << "streams that never ended after TryCancel";
  // Each ClientContext holds its call and so the channel's connection: release them all (a stream
  // that never ended is leaked rather than destroyed with an operation pending).
  for (auto& s : streams) {
    if (!s->finished.load()) (void)s.release();
  }
  streams.clear();
  stubs.clear();
  channels.clear();
  cq.Shutdown();
  poller.join();

  // The server's threads and fds return to the baseline: the connections' sockets close, and no
  // thread stays per stream. gRPC's legacy executor ("default-executor") starts threads on demand
  // up to 2 x cores and keeps them for the life of the process by design, so its threads are
  // checked against that cap instead.
  const int executor_cap = 2 * static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto other_threads = [](std::map<std::string, int> threads) {
    int n = 0;
    for (const auto& [name, count] : threads) {
      if (name != kExecutorThread) n += count;
    }
    return n;
  };
  std::map<std::string, int> threads_after = test::ThreadsByName(pid);
  int64_t fds_after = test::CountFds(pid);
  const auto recover_start = Clock::now();
  while ((other_threads(threads_after) > other_threads(baseline_threads) + 2 ||
          fds_after > baseline.fds + 2) &&
         Since(recover_start) < 30) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    threads_after = test::ThreadsByName(pid);
    fds_after = test::CountFds(pid);
  }
  std::printf("after cancel (%.1f s): fds %lld (baseline %lld); threads %s (baseline %s)\n",
              Since(recover_start), static_cast<long long>(fds_after),
              static_cast<long long>(baseline.fds), test::FormatThreads(threads_after).c_str(),
              test::FormatThreads(baseline_threads).c_str());
  EXPECT_LE(other_threads(threads_after), other_threads(baseline_threads) + 2);
  EXPECT_LE(threads_after[kExecutorThread], executor_cap);
  EXPECT_LE(fds_after, baseline.fds + 2);

  // And a normal Generate succeeds.
  int images = 0;
  const grpc::Status s = GenerateAndRead(*control, 7, &images);
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(images, 1);
  responsive("after cancel");
}

}  // namespace
}  // namespace ds
