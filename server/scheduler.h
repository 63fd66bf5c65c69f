// Scheduler: a bounded work queue with a fixed set of worker threads (one per device for
// generation; the service also uses one for slow management calls so that gRPC's callback threads
// never block).
//
// Admission is immediate: Submit either queues the task or fails at once — RESOURCE_EXHAUSTED when
// `queue_capacity` tasks are already waiting (tasks being run by workers do not count), UNAVAILABLE
// once shutdown has begun. Every submitted task ends exactly once: either `run` on a worker, or
// `abandon` with the reason (when shutdown drops it from the queue).
//
// Shutdown(deadline): stops admitting, lets workers drain the queue until `deadline`, then sets
// aborting() (long-running tasks poll it and stop early), abandons what is still queued
// (UNAVAILABLE) and joins the workers after their current task returns.
//
// Thread-safety: every method is thread-safe. `run` and `abandon` are called without the
// scheduler's lock held; they may call Submit (but a task must not call Shutdown).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/time/time.h"

namespace ds::server {

class Metrics;

struct SchedulerOptions {
  std::string name = "cpu";  // the device (metrics label) or purpose
  int workers = 1;           // >= 1
  int queue_capacity = 16;   // waiting tasks; >= 0 (0: admit only when a worker is idle)
};

class Scheduler {
 public:
  using Run = std::function<void()>;
  using Abandon = std::function<void(const absl::Status& why)>;

  // Starts the workers. `metrics` (nullable) receives queue depth and in-flight counts under
  // the label options.name.
  Scheduler(SchedulerOptions options, std::shared_ptr<Metrics> metrics);
  // Shutdown(absl::InfinitePast()) if it was not called.
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  absl::Status Submit(Run run, Abandon abandon);

  // See the header comment. Idempotent; blocks until the workers have exited.
  void Shutdown(absl::Time deadline);

  // True once shutdown's deadline has passed: running tasks should stop at their next check.
  bool aborting() const { return aborting_.load(std::memory_order_acquire); }

  const std::string& name() const { return options_.name; }
  int64_t queued() const;
  int64_t running() const;

 private:
  struct Task {
    Run run;
    Abandon abandon;
  };
  void WorkerLoop();
  void PublishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const SchedulerOptions options_;
  const std::shared_ptr<Metrics> metrics_;
  std::atomic<bool> aborting_{false};

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // a task was queued, or stopping
  std::condition_variable idle_cv_;  // the queue and the workers may have become idle
  std::deque<Task> queue_ ABSL_GUARDED_BY(mu_);
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;  // workers exit when the queue is empty
  std::vector<std::thread> workers_;
  std::once_flag shutdown_once_;
};

}  // namespace ds::server
