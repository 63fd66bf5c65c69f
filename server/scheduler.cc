#include "server/scheduler.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/metrics.h"

namespace ds::server {

Scheduler::Scheduler(SchedulerOptions options, std::shared_ptr<Metrics> metrics)
    : options_(std::move(options)), metrics_(std::move(metrics)) {
  const int workers = std::max(1, options_.workers);
  workers_.reserve(workers);
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  std::lock_guard lock(mu_);
  PublishLocked();
}

Scheduler::~Scheduler() { Shutdown(absl::InfinitePast()); }

absl::Status Scheduler::Submit(Run run, Abandon abandon) {
  {
    std::lock_guard lock(mu_);
    if (!accepting_) {
      return absl::UnavailableError(
          absl::StrCat("the server is shutting down (", options_.name, " queue closed)"));
    }
    // Queued tasks that idle workers are about to take are not waiting.
    const int64_t idle_workers =
        std::max<int64_t>(0, static_cast<int64_t>(workers_.size()) - running_);
    const int64_t queued_after = static_cast<int64_t>(queue_.size()) + 1;
    if (queued_after - std::min(queued_after, idle_workers) >
        std::max(0, options_.queue_capacity)) {
      return absl::ResourceExhaustedError(absl::StrCat("the ", options_.name, " queue is full (",
                                                       options_.queue_capacity, " waiting, ",
                                                       running_, " running); retry later"));
    }
    queue_.push_back(Task{std::move(run), std::move(abandon)});
    PublishLocked();
  }
  work_cv_.notify_one();
  return absl::OkStatus();
}

void Scheduler::WorkerLoop() {
  for (;;) {
    Task task;
    {
      std::unique_lock lock(mu_);
      work_cv_.wait(lock, [&] { return !queue_.empty() || stopping_; });
      if (queue_.empty()) return;  // stopping and nothing left
      task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      PublishLocked();
    }
    task.run();
    task = Task{};  // release what the task captured before reporting idle
    {
      std::lock_guard lock(mu_);
      --running_;
      PublishLocked();
    }
    idle_cv_.notify_all();
  }
}

void Scheduler::Shutdown(absl::Time deadline) {
  std::call_once(shutdown_once_, [&] {
    std::deque<Task> dropped;
    {
      std::unique_lock lock(mu_);
      accepting_ = false;
      // Drain until the deadline.
      auto idle = [&] { return queue_.empty() && running_ == 0; };
      if (deadline == absl::InfiniteFuture()) {
        idle_cv_.wait(lock, idle);
      } else if (deadline > absl::Now()) {
        idle_cv_.wait_until(lock, absl::ToChronoTime(deadline), idle);
      }
      aborting_.store(true, std::memory_order_release);
      dropped.swap(queue_);
      stopping_ = true;
      PublishLocked();
    }
    work_cv_.notify_all();
    for (Task& t : dropped) {
      if (t.abandon) {
        t.abandon(absl::UnavailableError(absl::StrCat(
            "the server shut down before the request ran (", options_.name, " queue)")));
      }
    }
    for (std::thread& w : workers_) w.join();
  });
}

int64_t Scheduler::queued() const {
  std::lock_guard lock(mu_);
  return static_cast<int64_t>(queue_.size());
}

int64_t Scheduler::running() const {
  std::lock_guard lock(mu_);
  return running_;
}

void Scheduler::PublishLocked() {
  if (metrics_ == nullptr) return;
  metrics_->SetQueueDepth(options_.name, static_cast<int64_t>(queue_.size()));
  metrics_->SetInFlight(options_.name, running_);
}

}  // namespace ds::server
