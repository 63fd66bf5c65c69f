// Scheduler: admission against capacity (RESOURCE_EXHAUSTED at once), every task ending exactly
// once (run or abandon), draining until the deadline, then aborting.
#include "server/scheduler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/time/clock.h"

namespace ds::server {
namespace {

using ::testing::HasSubstr;

// A gate tasks wait on.
class Gate {
 public:
  void Open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

void WaitFor(const std::function<bool()>& done) {
  const auto start = std::chrono::steady_clock::now();
  while (!done() && std::chrono::steady_clock::now() - start < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

TEST(SchedulerTest, QueueFullIsRefusedAtOnce) {
  Scheduler s({.name = "test", .workers = 1, .queue_capacity = 1}, nullptr);
  Gate gate;
  std::atomic<int> ran{0};
  auto blocking = [&] {
    gate.Wait();
    ++ran;
  };
  ASSERT_TRUE(s.Submit(blocking, nullptr).ok());
  WaitFor([&] { return s.running() == 1; });
  ASSERT_TRUE(s.Submit(blocking, nullptr).ok());
  EXPECT_EQ(s.queued(), 1);
  const absl::Status full = s.Submit(blocking, nullptr);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), HasSubstr("test queue is full"));
  gate.Open();
  WaitFor([&] { return ran == 2; });
  EXPECT_EQ(ran.load(), 2);
  // Room again.
  EXPECT_TRUE(s.Submit([] {}, nullptr).ok());
}

TEST(SchedulerTest, IdleWorkersAdmitBeyondTheQueueCapacity) {
  Scheduler s({.name = "test", .workers = 2, .queue_capacity = 0}, nullptr);
  Gate gate;
  ASSERT_TRUE(s.Submit([&] { gate.Wait(); }, nullptr).ok());
  ASSERT_TRUE(s.Submit([&] { gate.Wait(); }, nullptr).ok());
  EXPECT_EQ(s.Submit([] {}, nullptr).code(), absl::StatusCode::kResourceExhausted);
  gate.Open();
}

TEST(SchedulerTest, ShutdownDrainsWithinTheDeadline) {
  Scheduler s({.name = "test", .workers = 1, .queue_capacity = 8}, nullptr);
  std::atomic<int> ran{0};
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(s.Submit(
                     [&] {
                       std::this_thread::sleep_for(std::chrono::milliseconds(5));
                       ++ran;
                     },
                     [](const absl::Status&) { ADD_FAILURE() << "abandoned"; })
                    .ok());
  }
  s.Shutdown(absl::Now() + absl::Seconds(10));
  EXPECT_EQ(ran.load(), 5);
  EXPECT_EQ(s.Submit([] {}, nullptr).code(), absl::StatusCode::kUnavailable);
}

TEST(SchedulerTest, AfterTheDeadlineRunningTasksAbortAndQueuedOnesAreAbandoned) {
  Scheduler s({.name = "test", .workers = 1, .queue_capacity = 4}, nullptr);
  std::atomic<bool> started{false}, aborted{false};
  std::atomic<int> abandoned{0}, ran{0};
  ASSERT_TRUE(s.Submit(
                   [&] {
                     started = true;
                     // A long task that checks between its "steps".
                     while (!s.aborting())
                       std::this_thread::sleep_for(std::chrono::milliseconds(1));
                     aborted = true;
                   },
                   nullptr)
                  .ok());
  WaitFor([&] { return started.load(); });
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(s.Submit([&] { ++ran; },
                         [&](const absl::Status& why) {
                           EXPECT_EQ(why.code(), absl::StatusCode::kUnavailable);
                           ++abandoned;
                         })
                    .ok());
  }
  const auto start = std::chrono::steady_clock::now();
  s.Shutdown(absl::Now() + absl::Milliseconds(100));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(aborted.load());
  EXPECT_EQ(abandoned.load(), 3);
  EXPECT_EQ(ran.load(), 0);
  EXPECT_GE(seconds, 0.09);
  EXPECT_LT(seconds, 5.0);
  s.Shutdown(absl::Now());  // idempotent
}

}  // namespace
}  // namespace ds::server
