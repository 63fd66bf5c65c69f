#include "server/metrics.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "testing/http_get.h"

namespace ds::server {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// The value of the sample line starting with `series` ("name{labels}"); NaN when absent.
double Sample(const std::string& text, const std::string& series) {
  for (const std::string& line : Lines(text)) {
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 &&
        line[series.size()] == ' ') {
      double v = 0;
      if (absl::SimpleAtod(absl::string_view(line).substr(series.size() + 1), &v)) return v;
    }
  }
  return std::nan("");
}

using ::ds::test::HttpGet;

TEST(MetricsTest, RequestsCountedByModelRpcAndCodeName) {
  Metrics m;
  m.RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.2);
  m.RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.3);
  m.RecordRequest("flux", "Generate", absl::StatusCode::kResourceExhausted, 0.0001);
  m.RecordRequest("", "GetMetadata", absl::StatusCode::kNotFound, 0.004);
  const std::vector<std::string> lines = Lines(m.SerializeText());
  EXPECT_THAT(lines, Contains("# TYPE diffusion_requests_total counter"));
  EXPECT_THAT(lines,
              Contains("diffusion_requests_total{code=\"OK\",model=\"flux\",rpc=\"Generate\"} 2"));
  EXPECT_THAT(lines, Contains("diffusion_requests_total{code=\"RESOURCE_EXHAUSTED\",model=\"flux\","
                              "rpc=\"Generate\"} 1"));
  EXPECT_THAT(lines, Contains("diffusion_requests_total{code=\"NOT_FOUND\",model=\"\","
                              "rpc=\"GetMetadata\"} 1"));
}

TEST(MetricsTest, RequestDurationHistogramHasBucketsCountAndSum) {
  Metrics m;
  m.RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.2);
  m.RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.3);
  m.RecordRequest("flux", "Generate", absl::StatusCode::kInternal, 700);  // past the last bucket
  const std::string text = m.SerializeText();
  const std::vector<std::string> lines = Lines(text);
  EXPECT_THAT(lines, Contains("# TYPE diffusion_request_duration_seconds histogram"));
  EXPECT_THAT(lines, Contains("diffusion_request_duration_seconds_count{model=\"flux\","
                              "rpc=\"Generate\"} 3"));
  EXPECT_DOUBLE_EQ(
      Sample(text, "diffusion_request_duration_seconds_sum{model=\"flux\",rpc=\"Generate\"}"),
      700.5);
  const std::string bucket =
      "diffusion_request_duration_seconds_bucket{model=\"flux\",rpc=\"Generate\",";
  EXPECT_EQ(Sample(text, bucket + "le=\"0.001\"}"), 0);
  EXPECT_EQ(Sample(text, bucket + "le=\"0.1\"}"), 0);
  EXPECT_EQ(Sample(text, bucket + "le=\"0.25\"}"), 1);
  EXPECT_EQ(Sample(text, bucket + "le=\"0.5\"}"), 2);
  EXPECT_EQ(Sample(text, bucket + "le=\"600\"}"), 2);
  EXPECT_EQ(Sample(text, bucket + "le=\"+Inf\"}"), 3);
}

TEST(MetricsTest, QueueStepAndLoadHistograms) {
  Metrics m;
  m.ObserveQueueWait("flux", 0.02);
  m.ObserveDenoiseStep("flux", 0.5);
  m.ObserveDenoiseStep("flux", 1.5);
  m.ObserveModelLoad("flux", 12);
  m.ObserveAdapterLoad("flux", 0.8);
  const std::string text = m.SerializeText();
  EXPECT_EQ(Sample(text, "diffusion_queue_wait_seconds_count{model=\"flux\"}"), 1);
  EXPECT_EQ(Sample(text, "diffusion_queue_wait_seconds_bucket{model=\"flux\",le=\"0.025\"}"), 1);
  EXPECT_EQ(Sample(text, "diffusion_queue_wait_seconds_bucket{model=\"flux\",le=\"0.01\"}"), 0);
  EXPECT_EQ(Sample(text, "diffusion_denoise_step_seconds_count{model=\"flux\"}"), 2);
  EXPECT_DOUBLE_EQ(Sample(text, "diffusion_denoise_step_seconds_sum{model=\"flux\"}"), 2.0);
  EXPECT_EQ(Sample(text, "diffusion_denoise_step_seconds_bucket{model=\"flux\",le=\"1\"}"), 1);
  EXPECT_EQ(Sample(text, "diffusion_model_load_seconds_count{model=\"flux\"}"), 1);
  EXPECT_EQ(Sample(text, "diffusion_model_load_seconds_bucket{model=\"flux\",le=\"10\"}"), 0);
  EXPECT_EQ(Sample(text, "diffusion_model_load_seconds_bucket{model=\"flux\",le=\"25\"}"), 1);
  EXPECT_DOUBLE_EQ(Sample(text, "diffusion_adapter_load_seconds_sum{model=\"flux\"}"), 0.8);
}

TEST(MetricsTest, GaugesAndAdapterCounters) {
  Metrics m;
  m.SetQueueDepth("cuda:0", 5);
  m.SetQueueDepth("cuda:0", 3);
  m.SetInFlight("cpu", 2);
  m.SetAdapters("flux", 4, 123456789);
  m.AdapterLookup("flux", true);
  m.AdapterLookup("flux", true);
  m.AdapterLookup("flux", false);
  m.AdapterEvictions("flux", 2);
  m.AdapterEvictions("flux", 0);
  m.AdapterEvictions("flux", -3);
  const std::vector<std::string> lines = Lines(m.SerializeText());
  EXPECT_THAT(lines, Contains("# TYPE diffusion_queue_depth gauge"));
  EXPECT_THAT(lines, Contains("diffusion_queue_depth{device=\"cuda:0\"} 3"));
  EXPECT_THAT(lines, Contains("diffusion_requests_in_flight{device=\"cpu\"} 2"));
  EXPECT_THAT(lines, Contains("diffusion_adapters_loaded{model=\"flux\"} 4"));
  EXPECT_THAT(lines, Contains("diffusion_adapter_bytes{model=\"flux\"} 123456789"));
  EXPECT_THAT(lines, Contains("# TYPE diffusion_adapter_cache_hits_total counter"));
  EXPECT_THAT(lines, Contains("diffusion_adapter_cache_hits_total{model=\"flux\"} 2"));
  EXPECT_THAT(lines, Contains("diffusion_adapter_cache_misses_total{model=\"flux\"} 1"));
  EXPECT_THAT(lines, Contains("diffusion_adapter_evictions_total{model=\"flux\"} 2"));
}

TEST(MetricsTest, ForgetModelRemovesItsGaugesOnly) {
  Metrics m;
  m.SetAdapters("a", 1, 10);
  m.SetAdapters("b", 2, 20);
  m.RecordRequest("a", "Generate", absl::StatusCode::kOk, 0.1);
  m.ForgetModel("a");
  m.ForgetModel("never-seen");
  std::string text = m.SerializeText();
  EXPECT_THAT(text, Not(HasSubstr("diffusion_adapters_loaded{model=\"a\"}")));
  EXPECT_THAT(text, Not(HasSubstr("diffusion_adapter_bytes{model=\"a\"}")));
  EXPECT_THAT(Lines(text), Contains("diffusion_adapters_loaded{model=\"b\"} 2"));
  EXPECT_THAT(Lines(text),
              Contains("diffusion_requests_total{code=\"OK\",model=\"a\",rpc=\"Generate\"} 1"));
  // The model can come back.
  m.SetAdapters("a", 3, 30);
  EXPECT_THAT(Lines(m.SerializeText()), Contains("diffusion_adapters_loaded{model=\"a\"} 3"));
}

TEST(MetricsTest, ProcessMemoryIsReadFromProc) {
  Metrics m;
  m.UpdateProcessMemory();
  const std::string text = m.SerializeText();
  const double rss = Sample(text, "diffusion_process_resident_memory_bytes");
  const double vsz = Sample(text, "diffusion_process_virtual_memory_bytes");
  EXPECT_GT(rss, 1 << 20);  // a gtest binary is more than 1 MiB resident
  EXPECT_GE(vsz, rss);
  EXPECT_EQ(static_cast<int64_t>(rss) % sysconf(_SC_PAGESIZE), 0);
}

TEST(MetricsTest, EveryFamilyIsPrefixedAndTyped) {
  Metrics m;
  m.RecordRequest("x", "Generate", absl::StatusCode::kOk, 1);
  for (const std::string& line : Lines(m.SerializeText())) {
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) {
      EXPECT_EQ(line.substr(7, 10), "diffusion_") << line;
    } else {
      EXPECT_EQ(line.rfind("diffusion_", 0), 0u) << line;
    }
  }
}

TEST(MetricsTest, ConcurrentUpdatesAreAllCounted) {
  Metrics m;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&m, t] {
      for (int i = 0; i < 1000; ++i) {
        m.RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.01);
        m.AdapterLookup(absl::StrCat("model", t % 2), i % 2 == 0);
        m.SetAdapters(absl::StrCat("model", t % 2), i, i);
        if (i % 100 == 0) m.ForgetModel(absl::StrCat("model", t % 2));
      }
    });
  }
  for (auto& th : threads) th.join();
  const std::string text = m.SerializeText();
  EXPECT_EQ(Sample(text, "diffusion_requests_total{code=\"OK\",model=\"flux\",rpc=\"Generate\"}"),
            8000);
  EXPECT_EQ(Sample(text, "diffusion_adapter_cache_hits_total{model=\"model0\"}"), 2000);
}

TEST(MetricsServerTest, ServesMetricsOverHttpOnAPickedPort) {
  auto metrics = std::make_shared<Metrics>();
  auto server = StartMetricsServer("127.0.0.1:0", metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  EXPECT_EQ((*server)->address(), "127.0.0.1:0");
  metrics->RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.05);
  metrics->RecordRequest("flux", "LoadLoRA", absl::StatusCode::kPermissionDenied, 0.001);

  const std::string response = HttpGet((*server)->port(), "/metrics");
  ASSERT_THAT(response, HasSubstr("200 OK"));
  const size_t body_at = response.find("\r\n\r\n");
  ASSERT_NE(body_at, std::string::npos);
  const std::vector<std::string> body = Lines(response.substr(body_at + 4));
  EXPECT_THAT(body,
              Contains("diffusion_requests_total{code=\"OK\",model=\"flux\",rpc=\"Generate\"} 1"));
  EXPECT_THAT(body, Contains("diffusion_requests_total{code=\"PERMISSION_DENIED\",model=\"flux\","
                             "rpc=\"LoadLoRA\"} 1"));
  // The scrape refreshed the process memory gauges (never set explicitly here).
  EXPECT_GT(Sample(response.substr(body_at + 4), "diffusion_process_resident_memory_bytes"), 0);

  // Counters move between scrapes.
  metrics->RecordRequest("flux", "Generate", absl::StatusCode::kOk, 0.05);
  EXPECT_THAT(Lines(HttpGet((*server)->port(), "/metrics")),
              Contains("diffusion_requests_total{code=\"OK\",model=\"flux\",rpc=\"Generate\"} 2"));
}

TEST(MetricsServerTest, BusyPortIsUnavailableNamingTheAddress) {
  auto metrics = std::make_shared<Metrics>();
  auto first = StartMetricsServer("127.0.0.1:0", metrics);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string address = absl::StrCat("127.0.0.1:", (*first)->port());
  auto second = StartMetricsServer(address, metrics);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr(address));
}

TEST(MetricsServerTest, BadArgumentsAreInvalid) {
  EXPECT_EQ(StartMetricsServer("127.0.0.1:0", nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StartMetricsServer("", std::make_shared<Metrics>()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(MetricsServerTest, StopsServingOnDestruction) {
  auto metrics = std::make_shared<Metrics>();
  auto server = StartMetricsServer("127.0.0.1:0", metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  const int port = (*server)->port();
  server->reset();
  EXPECT_EQ(HttpGet(port, "/metrics"), "");
  // The port is free again.
  auto again = StartMetricsServer(absl::StrCat("127.0.0.1:", port), metrics);
  EXPECT_TRUE(again.ok()) << again.status();
}

}  // namespace
}  // namespace ds::server
