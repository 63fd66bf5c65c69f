#include "handlers/mapping_guard.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "handlers/safetensors.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::TempDir;

// A file of one float32 tensor "w" of `n` elements, values 1..n.
std::string WriteFile(const TempDir& dir, const std::string& name, int64_t n) {
  const std::string path = dir.path() + "/" + name;
  absl::Status s = WriteSafetensors(path, {{"w", torch::arange(1, n + 1, torch::kFloat32)}});
  EXPECT_TRUE(s.ok()) << s;
  return path;
}

// The mapping outlives the file's end: the later pages vanish. Reading them must neither kill
// the process nor return stale data, and the file reports DATA_LOSS.
TEST(MappingGuardTest, TruncatedWhileMappedReadsZerosAndReportsDataLoss) {
  TempDir dir;
  const int64_t n = 1 << 20;  // 4 MiB of data
  const std::string path = WriteFile(dir, "w.safetensors", n);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE((*file)->CheckUnchanged().ok());
  auto view = (*file)->Get("w");
  ASSERT_TRUE(view.ok()) << view.status();
  const int64_t before = VanishedMappedPages();
  ASSERT_EQ(truncate(path.c_str(), 4096), 0);
  // Sum touches every page, most of them gone now.
  const double sum = view->sum().item<double>();
  const double full = static_cast<double>(n) * static_cast<double>(n + 1) / 2;
  EXPECT_LT(sum, full / 100);  // nearly everything reads as zero
  EXPECT_EQ(view->index({n - 1}).item<float>(), 0.0f);
  EXPECT_GT(VanishedMappedPages(), before);
  absl::Status s = (*file)->CheckUnchanged();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find(path), std::string::npos) << s;
  EXPECT_NE(std::string(s.message()).find("truncated"), std::string::npos) << s;
}

// Truncated but never touched past the new end: the size check still catches it.
TEST(MappingGuardTest, ResizedFileIsReportedWithoutTouchingIt) {
  TempDir dir;
  const std::string path = WriteFile(dir, "w.safetensors", 4096);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(truncate(path.c_str(), 100), 0);
  absl::Status s = (*file)->CheckUnchanged();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find("changed size"), std::string::npos) << s;
}

TEST(MappingGuardTest, ModifiedInPlaceIsReported) {
  TempDir dir;
  const std::string path = WriteFile(dir, "w.safetensors", 4096);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  // File times have the kernel's coarse clock granularity (a few ms): let it tick.
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const int fd = open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  const float x = 42.0f;
  ASSERT_EQ(pwrite(fd, &x, sizeof(x), 200), static_cast<ssize_t>(sizeof(x)));
  close(fd);
  absl::Status s = (*file)->CheckUnchanged();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(std::string(s.message()).find("modified"), std::string::npos) << s;
}

// Replacing the file by rename leaves our mapping with the old, whole file: nothing to report.
TEST(MappingGuardTest, ReplacedOrRemovedFileIsNotAChange) {
  TempDir dir;
  const std::string path = WriteFile(dir, "w.safetensors", 4096);
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const std::string other = WriteFile(dir, "other.safetensors", 16);
  ASSERT_EQ(std::rename(other.c_str(), path.c_str()), 0);
  EXPECT_TRUE((*file)->CheckUnchanged().ok());
  auto view = (*file)->Get("w");
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(view->size(0), 4096);
  EXPECT_EQ(view->index({4095}).item<float>(), 4096.0f);
  ASSERT_EQ(std::remove(path.c_str()), 0);
  EXPECT_TRUE((*file)->CheckUnchanged().ok());
}

TEST(MappingGuardTest, ScopeRecordsFilesOpenedOnItsThreadOnly) {
  TempDir dir;
  const std::string a = WriteFile(dir, "a.safetensors", 2048);
  const std::string b = WriteFile(dir, "b.safetensors", 2048);
  MappedReadScope outer;
  std::shared_ptr<const SafetensorsFile> fa, fb;
  {
    MappedReadScope inner;
    fa = *SafetensorsFile::Open(a);
    std::thread other([&] { fb = *SafetensorsFile::Open(b); });
    other.join();
    EXPECT_EQ(inner.files(), 1);
    EXPECT_TRUE(inner.Check().ok());
    ASSERT_EQ(truncate(a.c_str(), 10), 0);
    absl::Status s = inner.Check();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(std::string(s.message()).find(a), std::string::npos) << s;
  }
  EXPECT_EQ(outer.files(), 1);  // the nested scope's file, not the other thread's
  EXPECT_EQ(outer.Check().code(), absl::StatusCode::kDataLoss);
  ASSERT_EQ(truncate(b.c_str(), 10), 0);
  MappedReadScope fresh;
  EXPECT_EQ(fresh.files(), 0);
  EXPECT_TRUE(fresh.Check().ok());
}

// A SIGBUS outside the registered mappings still has its default effect.
TEST(MappingGuardDeathTest, UnregisteredMappingStillDies) {
  TempDir dir;
  const std::string path = WriteFile(dir, "w.safetensors", 1 << 16);
  ASSERT_TRUE(SafetensorsFile::Open(path).ok());  // installs the handler
  const std::string raw = dir.path() + "/raw.bin";
  {
    std::FILE* f = std::fopen(raw.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::string bytes(1 << 16, 'x');
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
  }
  EXPECT_EXIT(
      {
        const int fd = open(raw.c_str(), O_RDONLY);
        void* p = mmap(nullptr, 1 << 16, PROT_READ, MAP_PRIVATE, fd, 0);
        if (ftruncate(open(raw.c_str(), O_WRONLY), 0) != 0) std::_Exit(3);
        volatile char c = static_cast<const char*>(p)[1 << 15];
        (void)c;
        std::_Exit(0);
      },
      ::testing::KilledBySignal(SIGBUS), "");
}

}  // namespace
}  // namespace ds
