// Single-file loading cost: peak resident memory and wall time of LoadSingleFile on a bf16
// BFL-format Flux checkpoint of >= 2 GiB, next to the time of reading the file's bytes once, all in
// one run.
//
// The parent writes the checkpoint (streamed, never held in memory), reads it once to put it in the
// page cache and time a plain read, then runs the load in fresh child processes (this binary with
// --load) so that each child's peak RSS (VmHWM) measures loading alone.
//
//   single_file_bench [--dir /tmp] [--dim 1536] [--layers 8] [--single_layers 12] [--runs 3]
#include <fcntl.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "handlers/safetensors_format.h"
#include "handlers/single_file.h"
#include "handlers/status.h"
#include "handlers/threads.h"

ABSL_FLAG(std::string, dir, "/tmp", "directory for the temporary checkpoint");
ABSL_FLAG(int64_t, dim, 1536, "inner dim D (heads = D / 128)");
ABSL_FLAG(int64_t, layers, 8, "double-stream blocks");
ABSL_FLAG(int64_t, single_layers, 12, "single-stream blocks");
ABSL_FLAG(int, runs, 3, "load runs (child processes); the median is reported");
ABSL_FLAG(std::string, load, "", "internal: load this file and print the measurements");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads (0 = all cores)");

namespace ds {
namespace {

using bench::Clock;
using bench::Since;
using bench::StatusKiB;

int LoadChild(const std::string& path) {
  const int64_t base = StatusKiB("VmRSS:");
  SingleFileOptions options;
  options.model.dtype = torch::kBFloat16;
  const auto t0 = Clock::now();
  auto loaded = LoadSingleFile(path, options);
  const double load_s = Since(t0);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
    return 1;
  }
  const int64_t peak_load = StatusKiB("VmHWM:");
  // Touch every weight once (what the first forward does) to show nothing is held twice.
  double sum = 0;
  for (const auto& p : loaded->model->module().parameters()) sum += p.sum().item<double>();
  std::printf(
      "load_s=%.6f base_kib=%lld peak_load_kib=%lld peak_touched_kib=%lld zero_copy=%lld/%lld "
      "sum=%g\n",
      load_s, static_cast<long long>(base), static_cast<long long>(peak_load),
      static_cast<long long>(StatusKiB("VmHWM:")),
      static_cast<long long>(loaded->report.tensors_zero_copy),
      static_cast<long long>(loaded->report.tensors_mapped), sum);
  return 0;
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  if (!absl::GetFlag(FLAGS_load).empty()) return LoadChild(absl::GetFlag(FLAGS_load));

  const auto infos = bench::BflCheckpointLayout(absl::GetFlag(FLAGS_dim), absl::GetFlag(FLAGS_layers),
                               absl::GetFlag(FLAGS_single_layers));
  const std::string path =
      absl::StrCat(absl::GetFlag(FLAGS_dir), "/single_file_bench_", getpid(), ".safetensors");
  const double file_bytes = static_cast<double>(infos.back().end);
  std::printf("checkpoint: %s, %.2f GiB bf16, %zu tensors\n", path.c_str(), file_bytes / (1 << 30),
              infos.size());
  if (auto s = bench::WriteBflCheckpoint(path, infos); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  bench::ReadFileOnce(path);  // into the page cache
  std::vector<double> reads, loads, peaks, touched;
  for (int i = 0; i < absl::GetFlag(FLAGS_runs); ++i) {
    reads.push_back(bench::ReadFileOnce(path));
    const std::string cmd = absl::StrCat("/proc/", getpid(), "/exe --load=", path,
                                         " --threads=", absl::GetFlag(FLAGS_threads));
    std::FILE* child = popen(cmd.c_str(), "r");
    char line[512] = {0};
    const bool got = child != nullptr && std::fgets(line, sizeof(line), child) != nullptr;
    const int rc = child != nullptr ? pclose(child) : -1;
    double load_s = 0;
    long long base = 0, peak = 0, peak_touched = 0;
    if (!got || rc != 0 ||
        std::sscanf(line, "load_s=%lf base_kib=%lld peak_load_kib=%lld peak_touched_kib=%lld",
                    &load_s, &base, &peak, &peak_touched) != 4) {
      std::fprintf(stderr, "load child failed: %s\n", line);
      std::remove(path.c_str());
      return 1;
    }
    std::printf("run %d: %s", i, line);
    loads.push_back(load_s);
    peaks.push_back(static_cast<double>(peak - base) * 1024);
    touched.push_back(static_cast<double>(peak_touched - base) * 1024);
  }
  std::remove(path.c_str());
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double read_s = median(reads), load_s = median(loads);
  std::printf("read file once (page cache): %.3f s (%.2f GiB/s)\n", read_s,
              file_bytes / read_s / (1 << 30));
  std::printf("LoadSingleFile:              %.3f s -> %.2fx the read time (target <= 1.5x)\n",
              load_s, load_s / read_s);
  std::printf("peak RSS growth while loading: %.3fx the file size (target <= 1.15x)\n",
              median(peaks) / file_bytes);
  std::printf("peak RSS growth after touching every weight: %.3fx the file size\n",
              median(touched) / file_bytes);
  return 0;
}

}  // namespace
}  // namespace ds

int main(int argc, char** argv) { return ds::Main(argc, argv); }
