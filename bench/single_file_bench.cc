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

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int64_t StatusKiB(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string f = field;
  while (std::getline(in, line)) {
    if (line.rfind(f, 0) == 0) return std::stoll(line.substr(f.size()));
  }
  return 0;
}

// BFL-layout keys and shapes of a FLUX.1-dev-like transformer with inner dim `d`.
std::vector<safetensors::TensorInfo> BflLayout(int64_t d, int64_t layers, int64_t singles) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  auto linear = [&t](const std::string& name, int64_t out, int64_t in) {
    t.push_back({name + ".weight", {out, in}});
    t.push_back({name + ".bias", {out}});
  };
  const int64_t head = 128;
  linear("img_in", d, 64);
  linear("txt_in", d, 4096);
  linear("time_in.in_layer", d, 256);
  linear("time_in.out_layer", d, d);
  linear("guidance_in.in_layer", d, 256);
  linear("guidance_in.out_layer", d, d);
  linear("vector_in.in_layer", d, 768);
  linear("vector_in.out_layer", d, d);
  linear("final_layer.linear", 64, d);
  linear("final_layer.adaLN_modulation.1", 2 * d, d);
  for (int64_t i = 0; i < layers; ++i) {
    const std::string p = absl::StrCat("double_blocks.", i, ".");
    for (const char* s : {"img", "txt"}) {
      linear(p + s + "_mod.lin", 6 * d, d);
      linear(p + s + "_attn.qkv", 3 * d, d);
      linear(p + s + "_attn.proj", d, d);
      linear(p + s + "_mlp.0", 4 * d, d);
      linear(p + s + "_mlp.2", d, 4 * d);
      t.push_back({p + s + "_attn.norm.query_norm.scale", {head}});
      t.push_back({p + s + "_attn.norm.key_norm.scale", {head}});
    }
  }
  for (int64_t i = 0; i < singles; ++i) {
    const std::string p = absl::StrCat("single_blocks.", i, ".");
    linear(p + "modulation.lin", 3 * d, d);
    linear(p + "linear1", 7 * d, d);
    linear(p + "linear2", d, 5 * d);
    t.push_back({p + "norm.query_norm.scale", {head}});
    t.push_back({p + "norm.key_norm.scale", {head}});
  }
  std::vector<safetensors::TensorInfo> infos;
  uint64_t offset = 0;
  for (auto& [name, shape] : t) {
    safetensors::TensorInfo info;
    info.name = "model.diffusion_model." + name;
    info.dtype = safetensors::DType::kBF16;
    info.shape = shape;
    info.begin = offset;
    offset += static_cast<uint64_t>(info.numel()) * 2;
    info.end = offset;
    infos.push_back(std::move(info));
  }
  return infos;
}

absl::Status WriteCheckpoint(const std::string& path,
                             const std::vector<safetensors::TensorInfo>& infos) {
  ASSIGN_OR_RETURN(std::string header, safetensors::SerializeHeader(infos, {{"bench", "1"}}));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return absl::InternalError(absl::StrCat("cannot write ", path));
  std::fwrite(header.data(), 1, header.size(), f);
  // bf16 0x3F80 = 1.0: finite, cheap to produce.
  std::vector<uint16_t> chunk(8 << 20, 0x3F80);
  for (const auto& info : infos) {
    for (int64_t left = info.numel(); left > 0;) {
      const int64_t n = std::min<int64_t>(left, static_cast<int64_t>(chunk.size()));
      std::fwrite(chunk.data(), 2, static_cast<std::size_t>(n), f);
      left -= n;
    }
  }
  const bool ok = std::fflush(f) == 0 && fsync(fileno(f)) == 0;
  std::fclose(f);
  return ok ? absl::OkStatus() : absl::InternalError(absl::StrCat("writing ", path));
}

// Seconds to read the whole file once with read(2) (from the page cache once warm).
double ReadOnce(const std::string& path) {
  const auto t0 = Clock::now();
  const int fd = open(path.c_str(), O_RDONLY);
  std::vector<char> buf(16 << 20);
  uint64_t sum = 0;
  ssize_t n;
  while ((n = read(fd, buf.data(), buf.size())) > 0) sum += static_cast<unsigned char>(buf[0]);
  close(fd);
  const double s = Since(t0);
  if (sum == 1) std::printf(" ");  // keep the loop observable
  return s;
}

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

  const auto infos = BflLayout(absl::GetFlag(FLAGS_dim), absl::GetFlag(FLAGS_layers),
                               absl::GetFlag(FLAGS_single_layers));
  const std::string path =
      absl::StrCat(absl::GetFlag(FLAGS_dir), "/single_file_bench_", getpid(), ".safetensors");
  const double file_bytes = static_cast<double>(infos.back().end);
  std::printf("checkpoint: %s, %.2f GiB bf16, %zu tensors\n", path.c_str(), file_bytes / (1 << 30),
              infos.size());
  if (auto s = WriteCheckpoint(path, infos); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  ReadOnce(path);  // into the page cache
  std::vector<double> reads, loads, peaks, touched;
  for (int i = 0; i < absl::GetFlag(FLAGS_runs); ++i) {
    reads.push_back(ReadOnce(path));
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
