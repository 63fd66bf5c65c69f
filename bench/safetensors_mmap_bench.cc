// Zero-copy safetensors loading: how much resident memory does opening a big file and getting
// every tensor cost, before and after the data are touched?
//
// Writes a --size_mib file of --tensors float32 tensors under --dir (streamed in chunks, never
// held in memory), drops it from the page cache, then reports VmRSS growth (a) after
// SafetensorsFile::Open + Get of every tensor (views, untouched; target < 5% of the file) and
// (b) after summing every tensor (pages faulted in: ~100%). Deletes the file at the end.
//
//   safetensors_mmap_bench --size_mib=1024 --dir=/tmp --threads=1 --tensors=8
#include <fcntl.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "handlers/safetensors.h"
#include "handlers/safetensors_format.h"
#include "handlers/status.h"

ABSL_FLAG(int64_t, size_mib, 1024, "Size of the safetensors file to write, in MiB.");
ABSL_FLAG(std::string, dir, "/tmp", "Directory for the temporary safetensors file.");
ABSL_FLAG(int, threads, 1, "LibTorch intra-op threads (torch::set_num_threads).");
ABSL_FLAG(int, tensors, 8, "Number of tensors the file is split into.");

namespace ds {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kColumns = 1024;  // floats per row: 4 KiB rows

// VmRSS of this process in KiB (0 if unreadable).
int64_t RssKiB() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  }
  return 0;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

absl::Status WriteAll(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::InternalError(absl::StrCat("write: ", std::strerror(errno)));
    data += n;
    size -= static_cast<std::size_t>(n);
  }
  return absl::OkStatus();
}

// Tensor k holds the value k + 1 everywhere, so sums are checkable.
absl::Status WriteFile(const std::string& path, const std::vector<safetensors::TensorInfo>& infos) {
  ASSIGN_OR_RETURN(std::string header, safetensors::SerializeHeader(infos, {{"bench", "mmap"}}));
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  absl::Status status = WriteAll(fd, header.data(), header.size());
  constexpr int64_t kChunkFloats = 16 * kMiB / 4;
  std::vector<float> chunk(kChunkFloats);
  for (std::size_t k = 0; k < infos.size() && status.ok(); ++k) {
    std::fill(chunk.begin(), chunk.end(), static_cast<float>(k + 1));
    for (int64_t left = infos[k].numel(); left > 0 && status.ok();) {
      const int64_t n = std::min(left, kChunkFloats);
      status = WriteAll(fd, reinterpret_cast<const char*>(chunk.data()), n * 4);
      left -= n;
    }
  }
  if (status.ok() && fsync(fd) != 0) status = absl::InternalError("fsync failed");
  // Drop the file's (now clean) pages so that the load really starts cold.
  if (status.ok()) posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  close(fd);
  return status;
}

int Run() {
  const int64_t size_mib = absl::GetFlag(FLAGS_size_mib);
  const int num_tensors = absl::GetFlag(FLAGS_tensors);
  const int threads = absl::GetFlag(FLAGS_threads);
  if (size_mib <= 0 || num_tensors <= 0 || threads <= 0) {
    std::fprintf(stderr, "--size_mib, --tensors and --threads must be positive\n");
    return 2;
  }
  torch::set_num_threads(threads);
  (void)torch::ones({16}).sum().item<float>();  // LibTorch's lazy initialization, before measuring

  // Equal tensors of whole 4 KiB rows, together ~size_mib.
  const int64_t rows = std::max<int64_t>(1, size_mib * kMiB / (kColumns * 4) / num_tensors);
  std::vector<safetensors::TensorInfo> infos(num_tensors);
  for (int k = 0; k < num_tensors; ++k) {
    infos[k].name = absl::StrCat("layers.", k, ".weight");
    infos[k].dtype = safetensors::DType::kF32;
    infos[k].shape = {rows, kColumns};
  }
  const std::string path =
      absl::StrCat(absl::GetFlag(FLAGS_dir), "/safetensors_mmap_bench.", getpid(), ".safetensors");

  auto start = std::chrono::steady_clock::now();
  if (absl::Status s = WriteFile(path, infos); !s.ok()) {
    std::fprintf(stderr, "writing %s failed: %s\n", path.c_str(), std::string(s.message()).c_str());
    unlink(path.c_str());
    return 1;
  }
  const double write_s = Seconds(start);

  int rc = 0;
  {
    const int64_t rss_before = RssKiB();
    start = std::chrono::steady_clock::now();
    auto file = SafetensorsFile::Open(path);
    if (!file.ok()) {
      std::fprintf(stderr, "%s\n", std::string(file.status().message()).c_str());
      unlink(path.c_str());
      return 1;
    }
    auto tensors = (*file)->GetAll();
    if (!tensors.ok()) {
      std::fprintf(stderr, "%s\n", std::string(tensors.status().message()).c_str());
      unlink(path.c_str());
      return 1;
    }
    const double load_s = Seconds(start);
    const int64_t rss_loaded = RssKiB();
    const auto file_bytes = static_cast<double>((*file)->mapped_bytes().size());

    start = std::chrono::steady_clock::now();
    double total = 0;
    for (int k = 0; k < num_tensors; ++k) {
      const torch::Tensor& t = tensors->at(infos[k].name);
      const double sum = t.sum(torch::kFloat64).item<double>();
      if (sum != static_cast<double>(k + 1) * static_cast<double>(t.numel())) {
        std::fprintf(stderr, "tensor %d: wrong sum %f\n", k, sum);
        rc = 1;
      }
      total += sum;
    }
    const double touch_s = Seconds(start);
    const int64_t rss_touched = RssKiB();

    const auto pct = [&](int64_t kib) {
      return 100.0 * static_cast<double>(kib) * 1024 / file_bytes;
    };
    std::printf("file: %s, %.1f MiB, %d tensors of [%lld, %lld] F32; threads %d\n", path.c_str(),
                file_bytes / kMiB, num_tensors, static_cast<long long>(rows),
                static_cast<long long>(kColumns), threads);
    std::printf("write (streamed, fsync, page cache dropped): %.2f s\n", write_s);
    std::printf("VmRSS before open:                %8lld KiB\n",
                static_cast<long long>(rss_before));
    std::printf(
        "after Open + Get of all (views):  %8lld KiB  growth %8lld KiB = %6.3f%% of file "
        "(%.2f ms)\n",
        static_cast<long long>(rss_loaded), static_cast<long long>(rss_loaded - rss_before),
        pct(rss_loaded - rss_before), load_s * 1e3);
    std::printf(
        "after touching (summing) all:     %8lld KiB  growth %8lld KiB = %6.2f%% of file "
        "(%.2f s, %.0f MiB/s cold)\n",
        static_cast<long long>(rss_touched), static_cast<long long>(rss_touched - rss_before),
        pct(rss_touched - rss_before), touch_s, file_bytes / kMiB / touch_s);
    std::printf("load growth target < 5%%: %s; checksum %.0f\n",
                pct(rss_loaded - rss_before) < 5.0 ? "met" : "MISSED", total);
  }
  unlink(path.c_str());
  return rc;
}

}  // namespace
}  // namespace ds

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ds::Run();
}
