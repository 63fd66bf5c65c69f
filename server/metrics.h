// Prometheus metrics of the server: the one owner of every metric (models and handlers never
// include prometheus), and the HTTP exposer that serves them.
//
// Every name is prefixed `diffusion_` and uses base units (seconds, bytes). Metric families
// (type, labels):
//   diffusion_requests_total                 counter    {model, rpc, code}
//   diffusion_request_duration_seconds       histogram  {model, rpc}
//   diffusion_queue_wait_seconds             histogram  {model}
//   diffusion_denoise_step_seconds           histogram  {model}
//   diffusion_queue_depth                    gauge      {device}
//   diffusion_requests_in_flight             gauge      {device}
//   diffusion_model_load_seconds             histogram  {model}
//   diffusion_adapter_load_seconds           histogram  {model}
//   diffusion_adapters_loaded                gauge      {model}
//   diffusion_adapter_bytes                  gauge      {model}
//   diffusion_adapter_cache_hits_total       counter    {model}
//   diffusion_adapter_cache_misses_total     counter    {model}
//   diffusion_adapter_evictions_total        counter    {model}
//   diffusion_process_resident_memory_bytes  gauge
//   diffusion_process_virtual_memory_bytes   gauge
// `code` is the gRPC status code name ("OK", "NOT_FOUND", ...; absl and gRPC codes coincide).
// Label values are free text (escaped by the serializer); an empty model name is a valid value.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace ds::server {

// Thread-safe: every method may be called concurrently from any thread. Each update is a short
// critical section under one internal mutex (a hash lookup and an atomic add), so updates never
// race with ForgetModel.
class Metrics {
 public:
  Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // The registry holding every family above (shared with exposers and tests; lives as long as the
  // longest holder).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // One finished RPC: increments diffusion_requests_total{model, rpc, code} and observes
  // `seconds` in diffusion_request_duration_seconds{model, rpc}.
  void RecordRequest(const std::string& model, const std::string& rpc, absl::StatusCode code,
                     double seconds);
  // Time a request waited in a device queue before a worker took it.
  void ObserveQueueWait(const std::string& model, double seconds);
  // Duration of one denoising step.
  void ObserveDenoiseStep(const std::string& model, double seconds);
  // Current number of queued (not yet running) requests of a device ("cpu", "cuda:0").
  void SetQueueDepth(const std::string& device, int64_t depth);
  // Current number of requests running on a device.
  void SetInFlight(const std::string& device, int64_t n);
  // Duration of loading a model instance (success or not).
  void ObserveModelLoad(const std::string& model, double seconds);
  // Duration of loading one adapter into a model instance.
  void ObserveAdapterLoad(const std::string& model, double seconds);
  // Adapters currently loaded on a model and their total bytes.
  void SetAdapters(const std::string& model, int64_t count, int64_t bytes);
  // One adapter lookup for a request: `hit` when it was already resident.
  void AdapterLookup(const std::string& model, bool hit);
  // `n` adapters evicted from a model's cache (n <= 0 is ignored).
  void AdapterEvictions(const std::string& model, int64_t n);
  // A pipeline request's text encoding: prompt-cache lookups (hits, misses) and its seconds.
  void ObservePromptEncoding(const std::string& model, int64_t hits, int64_t misses,
                             double seconds);
  // Reads /proc/self/statm and sets diffusion_process_{resident,virtual}_memory_bytes. Leaves the
  // gauges unchanged when /proc is unavailable. The exposer of StartMetricsServer calls it on
  // every scrape.
  void UpdateProcessMemory();
  // Removes the model's gauges (diffusion_adapters_loaded / diffusion_adapter_bytes) so an
  // unloaded model no longer reports current values. Its counters and histograms stay: they are
  // cumulative, and Prometheus rates need them to persist.
  void ForgetModel(const std::string& model);

  // The text exposition format of the registry (what /metrics serves), for tests and debugging.
  std::string SerializeText() const;

 private:
  using Labels = prometheus::Labels;

  // The metric of `family` with `labels`, created on first use (constructed from `args`) and
  // cached, so hot paths do not allocate (Family::Add constructs a metric on every call).
  template <typename T, typename... Args>
  T& Get(prometheus::Family<T>& family, const Labels& labels, const Args&... args)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& request_duration_;
  prometheus::Family<prometheus::Histogram>& queue_wait_;
  prometheus::Family<prometheus::Histogram>& denoise_step_;
  prometheus::Family<prometheus::Gauge>& queue_depth_;
  prometheus::Family<prometheus::Gauge>& in_flight_;
  prometheus::Family<prometheus::Histogram>& model_load_;
  prometheus::Family<prometheus::Histogram>& adapter_load_;
  prometheus::Family<prometheus::Gauge>& adapters_loaded_;
  prometheus::Family<prometheus::Gauge>& adapter_bytes_;
  prometheus::Family<prometheus::Counter>& adapter_hits_;
  prometheus::Family<prometheus::Counter>& adapter_misses_;
  prometheus::Family<prometheus::Counter>& adapter_evictions_;
  prometheus::Family<prometheus::Counter>& prompt_cache_hits_;
  prometheus::Family<prometheus::Counter>& prompt_cache_misses_;
  prometheus::Family<prometheus::Histogram>& prompt_encode_;
  prometheus::Gauge& resident_memory_;
  prometheus::Gauge& virtual_memory_;

  mutable absl::Mutex mu_;
  // (family address, serialized labels) -> the metric, owned by its family.
  absl::flat_hash_map<std::pair<const void*, std::string>, void*> cache_ ABSL_GUARDED_BY(mu_);
};

// Serves a Metrics registry over HTTP at /metrics (Prometheus text format 0.0.4), calling
// Metrics::UpdateProcessMemory before each scrape; other paths are 404, other methods 405.
//
// A small HTTP/1.x server of our own (one thread, one connection at a time, `Connection: close`,
// 5 s I/O timeout per request) rather than prometheus-cpp's civetweb Exposer: civetweb creates
// its threads with a fixed 100 KiB stack, and glibc carves the static TLS of every loaded library
// out of each thread's stack — in a binary linking LibTorch (OpenBLAS alone has 60 KiB of TLS)
// that exceeds 100 KiB, so civetweb's pthread_create fails with EINVAL and the exposer never
// starts. Scrapes are sequential by nature (Prometheus scrapes a target one request at a time).
//
// Stops serving on destruction (waits for an in-progress scrape). Not copyable or movable;
// thread-safe accessors.
class MetricsServer {
 public:
  ~MetricsServer();
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // The port actually bound (the chosen one when the address asked for port 0).
  int port() const { return port_; }
  // The address as given to StartMetricsServer.
  const std::string& address() const { return address_; }

 private:
  friend absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetricsServer(
      const std::string& address, std::shared_ptr<Metrics> metrics);
  MetricsServer() = default;
  void Serve();
  void HandleConnection(int fd);

  std::string address_;
  int port_ = 0;
  std::shared_ptr<Metrics> metrics_;
  int listen_fd_ = -1;
  int wake_fds_[2] = {-1, -1};  // a pipe: writing to [1] stops Serve()
  std::thread thread_;
};

// Starts serving `metrics` at /metrics on `address`: "host:port" ("0.0.0.0:9090",
// "127.0.0.1:0", "[::]:9090"), or a bare port "9090" = all IPv4 interfaces; port 0 picks a free
// port (see MetricsServer::port()). INVALID_ARGUMENT when `metrics` is null or the address is
// empty or malformed; UNAVAILABLE if it cannot bind (message names the address).
absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetricsServer(const std::string& address,
                                                                  std::shared_ptr<Metrics> metrics);

}  // namespace ds::server
