#include "server/metrics.h"

#include <unistd.h>

#include <exception>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace ds::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// RPC round trips and queue waits: 1 ms (tiny models) .. 10 min (large images, long queues).
const Histogram::BucketBoundaries& RequestBuckets() {
  static const auto* b =
      new Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1,     2.5,    5,     10,   25,    50,   100, 250,  600};
  return *b;
}

// One denoising step: 1 ms (tiny model on a GPU) .. 1 min (large model on a CPU).
const Histogram::BucketBoundaries& StepBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  return *b;
}

// Model and adapter loads: 1 ms (small adapter, warm page cache) .. 10 min (large checkpoint).
const Histogram::BucketBoundaries& LoadBuckets() {
  static const auto* b =
      new Histogram::BucketBoundaries{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                      1,     2.5,    5,     10,   25,    50,   100, 250,  600};
  return *b;
}

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  if (name.empty()) name = absl::StrCat("CODE_", static_cast<int>(code));
  return name;
}

std::string LabelKey(const prometheus::Labels& labels) {
  std::string key;
  for (const auto& [name, value] : labels) absl::StrAppend(&key, name, "\x1f", value, "\x1e");
  return key;
}

// What the exposer scrapes: refreshes the process gauges, then collects the registry.
class ScrapeCollectable : public prometheus::Collectable {
 public:
  explicit ScrapeCollectable(std::shared_ptr<Metrics> metrics) : metrics_(std::move(metrics)) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->UpdateProcessMemory();
    return metrics_->registry()->Collect();
  }

 private:
  std::shared_ptr<Metrics> metrics_;
};

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(BuildCounter()
                    .Name("diffusion_requests_total")
                    .Help("Finished RPCs by model, RPC method and gRPC status code.")
                    .Register(*registry_)),
      request_duration_(BuildHistogram()
                            .Name("diffusion_request_duration_seconds")
                            .Help("RPC duration from arrival to final status, in seconds.")
                            .Register(*registry_)),
      queue_wait_(BuildHistogram()
                      .Name("diffusion_queue_wait_seconds")
                      .Help("Time a request waited in its device queue before running, in seconds.")
                      .Register(*registry_)),
      denoise_step_(BuildHistogram()
                        .Name("diffusion_denoise_step_seconds")
                        .Help("Duration of one denoising step, in seconds.")
                        .Register(*registry_)),
      queue_depth_(BuildGauge()
                       .Name("diffusion_queue_depth")
                       .Help("Requests waiting in a device queue.")
                       .Register(*registry_)),
      in_flight_(BuildGauge()
                     .Name("diffusion_requests_in_flight")
                     .Help("Requests running on a device.")
                     .Register(*registry_)),
      model_load_(BuildHistogram()
                      .Name("diffusion_model_load_seconds")
                      .Help("Duration of loading a model instance, in seconds.")
                      .Register(*registry_)),
      adapter_load_(BuildHistogram()
                        .Name("diffusion_adapter_load_seconds")
                        .Help("Duration of loading an adapter (LoRA), in seconds.")
                        .Register(*registry_)),
      adapters_loaded_(BuildGauge()
                           .Name("diffusion_adapters_loaded")
                           .Help("Adapters currently loaded on a model instance.")
                           .Register(*registry_)),
      adapter_bytes_(BuildGauge()
                         .Name("diffusion_adapter_bytes")
                         .Help("Bytes of the adapters currently loaded on a model instance.")
                         .Register(*registry_)),
      adapter_hits_(BuildCounter()
                        .Name("diffusion_adapter_cache_hits_total")
                        .Help("Adapter lookups that found the adapter resident.")
                        .Register(*registry_)),
      adapter_misses_(BuildCounter()
                          .Name("diffusion_adapter_cache_misses_total")
                          .Help("Adapter lookups that did not find the adapter resident.")
                          .Register(*registry_)),
      adapter_evictions_(BuildCounter()
                             .Name("diffusion_adapter_evictions_total")
                             .Help("Adapters evicted from a model instance's cache.")
                             .Register(*registry_)),
      resident_memory_(BuildGauge()
                           .Name("diffusion_process_resident_memory_bytes")
                           .Help("Resident set size of the server process, in bytes.")
                           .Register(*registry_)
                           .Add({})),
      virtual_memory_(BuildGauge()
                          .Name("diffusion_process_virtual_memory_bytes")
                          .Help("Virtual memory size of the server process, in bytes.")
                          .Register(*registry_)
                          .Add({})) {}

template <typename T, typename... Args>
T& Metrics::Get(prometheus::Family<T>& family, const Labels& labels, const Args&... args) {
  auto key = std::make_pair(static_cast<const void*>(&family), LabelKey(labels));
  auto it = cache_.find(key);
  if (it != cache_.end()) return *static_cast<T*>(it->second);
  T& metric = family.Add(labels, args...);
  cache_.emplace(std::move(key), &metric);
  return metric;
}

void Metrics::RecordRequest(const std::string& model, const std::string& rpc, absl::StatusCode code,
                            double seconds) {
  absl::MutexLock lock(&mu_);
  Get(requests_, {{"model", model}, {"rpc", rpc}, {"code", CodeName(code)}}).Increment();
  Get(request_duration_, {{"model", model}, {"rpc", rpc}}, RequestBuckets()).Observe(seconds);
}

void Metrics::ObserveQueueWait(const std::string& model, double seconds) {
  absl::MutexLock lock(&mu_);
  Get(queue_wait_, {{"model", model}}, RequestBuckets()).Observe(seconds);
}

void Metrics::ObserveDenoiseStep(const std::string& model, double seconds) {
  absl::MutexLock lock(&mu_);
  Get(denoise_step_, {{"model", model}}, StepBuckets()).Observe(seconds);
}

void Metrics::SetQueueDepth(const std::string& device, int64_t depth) {
  absl::MutexLock lock(&mu_);
  Get(queue_depth_, {{"device", device}}).Set(static_cast<double>(depth));
}

void Metrics::SetInFlight(const std::string& device, int64_t n) {
  absl::MutexLock lock(&mu_);
  Get(in_flight_, {{"device", device}}).Set(static_cast<double>(n));
}

void Metrics::ObserveModelLoad(const std::string& model, double seconds) {
  absl::MutexLock lock(&mu_);
  Get(model_load_, {{"model", model}}, LoadBuckets()).Observe(seconds);
}

void Metrics::ObserveAdapterLoad(const std::string& model, double seconds) {
  absl::MutexLock lock(&mu_);
  Get(adapter_load_, {{"model", model}}, LoadBuckets()).Observe(seconds);
}

void Metrics::SetAdapters(const std::string& model, int64_t count, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  Get(adapters_loaded_, {{"model", model}}).Set(static_cast<double>(count));
  Get(adapter_bytes_, {{"model", model}}).Set(static_cast<double>(bytes));
}

void Metrics::AdapterLookup(const std::string& model, bool hit) {
  absl::MutexLock lock(&mu_);
  Get(hit ? adapter_hits_ : adapter_misses_, {{"model", model}}).Increment();
}

void Metrics::AdapterEvictions(const std::string& model, int64_t n) {
  if (n <= 0) return;
  absl::MutexLock lock(&mu_);
  Get(adapter_evictions_, {{"model", model}}).Increment(static_cast<double>(n));
}

void Metrics::UpdateProcessMemory() {
  std::ifstream statm("/proc/self/statm");
  long long size_pages = 0;
  long long resident_pages = 0;
  if (!(statm >> size_pages >> resident_pages)) return;
  const long page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return;
  // Gauge::Set is atomic; these two gauges are never removed, so no lock is needed.
  resident_memory_.Set(static_cast<double>(resident_pages) * static_cast<double>(page));
  virtual_memory_.Set(static_cast<double>(size_pages) * static_cast<double>(page));
}

void Metrics::ForgetModel(const std::string& model) {
  absl::MutexLock lock(&mu_);
  const Labels labels = {{"model", model}};
  for (prometheus::Family<prometheus::Gauge>* family : {&adapters_loaded_, &adapter_bytes_}) {
    auto it = cache_.find(std::make_pair(static_cast<const void*>(family), LabelKey(labels)));
    if (it == cache_.end()) continue;
    family->Remove(static_cast<prometheus::Gauge*>(it->second));
    cache_.erase(it);
  }
}

std::string Metrics::SerializeText() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

MetricsServer::~MetricsServer() = default;

absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetricsServer(
    const std::string& address, std::shared_ptr<Metrics> metrics) {
  if (metrics == nullptr) return absl::InvalidArgumentError("StartMetricsServer: no Metrics");
  if (address.empty()) return absl::InvalidArgumentError("the metrics address is empty");
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->address_ = address;
  server->metrics_ = metrics;
  server->collectable_ = std::make_shared<ScrapeCollectable>(std::move(metrics));
  try {
    server->exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': ", e.what()));
  }
  server->exposer_->RegisterCollectable(server->collectable_);
  const std::vector<int> ports = server->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': no listening port"));
  }
  server->port_ = ports.front();
  return server;
}

}  // namespace ds::server
