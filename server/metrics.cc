#include "server/metrics.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
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
      prompt_cache_hits_(BuildCounter()
                             .Name("diffusion_prompt_cache_hits_total")
                             .Help("Encoded-prompt lookups served from a pipeline's prompt cache "
                                   "(one per text encoder and prompt).")
                             .Register(*registry_)),
      prompt_cache_misses_(BuildCounter()
                               .Name("diffusion_prompt_cache_misses_total")
                               .Help("Encoded-prompt lookups that ran a text encoder.")
                               .Register(*registry_)),
      prompt_encode_(BuildHistogram()
                         .Name("diffusion_prompt_encode_seconds")
                         .Help("Text encoding time of a pipeline request (tokenizers, encoders, "
                               "cache lookups).")
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

void Metrics::ObservePromptEncoding(const std::string& model, int64_t hits, int64_t misses,
                                    double seconds) {
  if (hits + misses == 0) return;  // the request carried embeddings, not text
  absl::MutexLock lock(&mu_);
  const Labels labels = {{"model", model}};
  if (hits > 0) Get(prompt_cache_hits_, labels).Increment(static_cast<double>(hits));
  if (misses > 0) Get(prompt_cache_misses_, labels).Increment(static_cast<double>(misses));
  Get(prompt_encode_, labels, StepBuckets()).Observe(seconds);
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

namespace {

constexpr int kIoTimeoutSeconds = 5;
constexpr size_t kMaxRequestBytes = 16 * 1024;

bool SendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

std::string HttpResponse(const char* status, const char* content_type, const std::string& body) {
  return absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                      "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n", body);
}

// "host:port", "[v6]:port" or "port" -> (host, port); host "" for a bare port.
bool SplitAddress(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    *host = "";
    *port = address;
  } else {
    *host = address.substr(0, colon);
    *port = address.substr(colon + 1);
    if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
      *host = host->substr(1, host->size() - 2);
    }
  }
  if (port->empty() || port->size() > 5) return false;
  for (char c : *port) {
    if (c < '0' || c > '9') return false;
  }
  return std::stoi(*port) <= 65535;
}

}  // namespace

MetricsServer::~MetricsServer() {
  if (thread_.joinable()) {
    const char stop = 1;
    (void)!::write(wake_fds_[1], &stop, 1);
    thread_.join();
  }
  for (int fd : {listen_fd_, wake_fds_[0], wake_fds_[1]}) {
    if (fd >= 0) ::close(fd);
  }
}

void MetricsServer::Serve() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fds_[0], POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    HandleConnection(fd);
    ::close(fd);
  }
}

void MetricsServer::HandleConnection(int fd) {
  const timeval timeout{kIoTimeoutSeconds, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  std::string request;
  char buf[2048];
  while (request.find("\r\n\r\n") == std::string::npos &&
         request.find("\n\n") == std::string::npos && request.size() < kMaxRequestBytes) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    request.append(buf, static_cast<size_t>(n));
  }
  // Request line: METHOD SP TARGET SP VERSION.
  const std::string line = request.substr(0, request.find_first_of("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? std::string::npos : line.find(' ', sp1 + 1);
  if (sp1 == std::string::npos) {
    SendAll(fd, HttpResponse("400 Bad Request", "text/plain", "bad request\n"));
    return;
  }
  const std::string method = line.substr(0, sp1);
  std::string target =
      line.substr(sp1 + 1, sp2 == std::string::npos ? std::string::npos : sp2 - sp1 - 1);
  target = target.substr(0, target.find('?'));
  if (method != "GET" && method != "HEAD") {
    SendAll(fd, HttpResponse("405 Method Not Allowed", "text/plain", "use GET\n"));
    return;
  }
  if (target != "/metrics") {
    SendAll(fd, HttpResponse("404 Not Found", "text/plain", "see /metrics\n"));
    return;
  }
  metrics_->UpdateProcessMemory();
  std::string response =
      HttpResponse("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics_->SerializeText());
  if (method == "HEAD") response.resize(response.find("\r\n\r\n") + 4);
  SendAll(fd, response);
}

absl::StatusOr<std::unique_ptr<MetricsServer>> StartMetricsServer(
    const std::string& address, std::shared_ptr<Metrics> metrics) {
  if (metrics == nullptr) return absl::InvalidArgumentError("StartMetricsServer: no Metrics");
  if (address.empty()) return absl::InvalidArgumentError("the metrics address is empty");
  std::string host, port;
  if (!SplitAddress(address, &host, &port)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the metrics address '", address, "' is not host:port or a port"));
  }
  std::unique_ptr<MetricsServer> server(new MetricsServer());
  server->address_ = address;
  server->metrics_ = std::move(metrics);

  addrinfo hints{};
  hints.ai_family = host.empty() ? AF_INET : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (const int rc =
          ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
      rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': ", ::gai_strerror(rc)));
  }
  std::string error = "no usable address";
  for (addrinfo* ai = found; ai != nullptr && server->listen_fd_ < 0; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
      error = std::strerror(errno);
      ::close(fd);
      continue;
    }
    server->listen_fd_ = fd;
  }
  ::freeaddrinfo(found);
  if (server->listen_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on '", address, "': ", error));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  if (::getsockname(server->listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': ", std::strerror(errno)));
  }
  server->port_ =
      ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                        : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  if (::pipe2(server->wake_fds_, O_CLOEXEC) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on '", address, "': pipe: ", std::strerror(errno)));
  }
  MetricsServer* raw = server.get();
  server->thread_ = std::thread([raw] { raw->Serve(); });
  return server;
}

}  // namespace ds::server
