#include "server/health.h"

#include <utility>

namespace ds::server {

namespace hv1 = ::grpc::health::v1;

// One Watch stream: writes the latest status whenever it differs from the last one written
// (intermediate values may be skipped, as the protocol allows), one write at a time.
class HealthService::WatchReactor final
    : public grpc::ServerWriteReactor<hv1::HealthCheckResponse> {
 public:
  WatchReactor(HealthService* service, std::string name)
      : service_(service), name_(std::move(name)) {}

  const std::string& name() const { return name_; }

  // A new status (and, with `last`, the end of the stream after it is written).
  void Update(ServingStatus status, bool last) {
    const hv1::HealthCheckResponse* to_write = nullptr;
    bool finish = false;
    {
      std::lock_guard lock(mu_);
      if (finishing_) return;
      wanted_ = status;
      closing_ = closing_ || last;
      to_write = NextWriteLocked();
      finish = to_write == nullptr && !writing_ && closing_ && MarkFinishingLocked();
    }
    if (to_write != nullptr) StartWrite(to_write);
    if (finish) Finish(grpc::Status::OK);
  }

  void OnWriteDone(bool ok) override {
    const hv1::HealthCheckResponse* to_write = nullptr;
    bool finish = false;
    grpc::Status status = grpc::Status::OK;
    {
      std::lock_guard lock(mu_);
      writing_ = false;
      if (!ok) {
        closing_ = true;
        status = grpc::Status(grpc::StatusCode::CANCELLED, "the call ended");
      } else {
        to_write = NextWriteLocked();
      }
      finish = to_write == nullptr && closing_ && MarkFinishingLocked();
    }
    if (to_write != nullptr) StartWrite(to_write);
    if (finish) Finish(status);
  }

  void OnCancel() override {
    bool finish = false;
    {
      std::lock_guard lock(mu_);
      closing_ = true;
      finish = !writing_ && MarkFinishingLocked();
    }
    if (finish) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    service_->Unregister(this);
    delete this;
  }

 private:
  const hv1::HealthCheckResponse* NextWriteLocked() {
    if (writing_ || finishing_ || (has_written_ && wanted_ == written_)) return nullptr;
    written_ = wanted_;
    has_written_ = true;
    current_.set_status(wanted_);
    writing_ = true;
    return &current_;
  }
  bool MarkFinishingLocked() {
    if (finishing_) return false;
    finishing_ = true;
    return true;
  }

  HealthService* const service_;
  const std::string name_;
  std::mutex mu_;
  hv1::HealthCheckResponse current_;
  ServingStatus wanted_ = hv1::HealthCheckResponse::UNKNOWN;
  ServingStatus written_ = hv1::HealthCheckResponse::UNKNOWN;
  bool has_written_ = false;
  bool writing_ = false;
  bool closing_ = false;
  bool finishing_ = false;
};

HealthService::HealthService() { statuses_[""] = hv1::HealthCheckResponse::SERVING; }

HealthService::~HealthService() {
  // The grpc::Server is gone by now, so every reactor has been done (OnDone unregisters).
}

HealthService::ServingStatus HealthService::StatusLocked(const std::string& service) const {
  auto it = statuses_.find(service);
  return it == statuses_.end() ? hv1::HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

void HealthService::SetServingStatus(const std::string& service, bool serving) {
  std::lock_guard lock(mu_);
  if (shut_down_) return;
  const ServingStatus status =
      serving ? hv1::HealthCheckResponse::SERVING : hv1::HealthCheckResponse::NOT_SERVING;
  statuses_[service] = status;
  auto range = watchers_.equal_range(service);
  for (auto it = range.first; it != range.second; ++it) it->second->Update(status, false);
}

void HealthService::Shutdown() {
  std::lock_guard lock(mu_);
  if (shut_down_) return;
  shut_down_ = true;
  for (auto& [name, status] : statuses_) status = hv1::HealthCheckResponse::NOT_SERVING;
  for (auto& [name, watcher] : watchers_) {
    watcher->Update(hv1::HealthCheckResponse::NOT_SERVING, /*last=*/true);
  }
}

void HealthService::Unregister(WatchReactor* reactor) {
  std::lock_guard lock(mu_);
  auto range = watchers_.equal_range(reactor->name());
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == reactor) {
      watchers_.erase(it);
      break;
    }
  }
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* ctx,
                                               const hv1::HealthCheckRequest* request,
                                               hv1::HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  ServingStatus status;
  {
    std::lock_guard lock(mu_);
    status = StatusLocked(request->service());
  }
  if (status == hv1::HealthCheckResponse::SERVICE_UNKNOWN) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service '" + request->service() + "'"));
  } else {
    response->set_status(status);
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

grpc::ServerWriteReactor<hv1::HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*ctx*/, const hv1::HealthCheckRequest* request) {
  auto* reactor = new WatchReactor(this, request->service());
  std::lock_guard lock(mu_);
  watchers_.emplace(request->service(), reactor);
  // After shutdown a new watcher gets the (frozen) status and the end of the stream.
  reactor->Update(StatusLocked(request->service()), /*last=*/shut_down_);
  return reactor;
}

}  // namespace ds::server
