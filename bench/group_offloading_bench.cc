// Group offloading (issue 9): peak resident memory of a forward of a Flux transformer whose blocks
// are offloaded to disk (groups of --blocks_per_group blocks), against the size of one group and
// the activations of the same forward on the resident model, and the forward time against the
// resident model, all measured in the same run.
//
//   group_offloading_bench [--threads N] [--layers 8] [--single_layers 16] [--heads 8]
//                          [--head_dim 64] [--img_tokens 256] [--txt_tokens 64] [--repeat 3]
//                          [--blocks_per_group 1] [--offload_dir DIR]
//
// Every measurement runs in a fresh child process (this binary with --child=...), so one model's
// allocations never hide another's. A child builds its model (random weights; offloaded ones are
// then moved to disk), runs one warm-up forward, then measures: VmRSS just before a forward, the
// peak VmHWM of that forward (the peak is reset first through /proc/self/clear_refs), and the
// median time of --repeat forwards. Reported:
//   activations     = peak - before, resident model (weights already resident, so the increase is
//                     what the forward allocates)
//   offloaded peak  = peak - before, offloaded model (one group onloaded at a time + activations)
//   ratio           = (offloaded peak - activations) / largest group bytes   (target <= 1.3)
//   slowdown        = offloaded median forward time / resident median forward time
// The group files' page-cache copies are dropped after each onload, so every forward reads each
// group back from the file system (from the disk, unless the storage below caches it).
#include <malloc.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "handlers/group_offloading.h"
#include "handlers/registry.h"
#include "handlers/state_dict.h"
#include "models/flux/transformer.h"

ABSL_FLAG(int32_t, threads, static_cast<int32_t>(std::thread::hardware_concurrency()),
          "intra-op threads (torch::set_num_threads)");
ABSL_FLAG(int32_t, layers, 8, "double-stream blocks");
ABSL_FLAG(int32_t, single_layers, 16, "single-stream blocks");
ABSL_FLAG(int32_t, heads, 8, "attention heads");
ABSL_FLAG(int32_t, head_dim, 64, "attention head dim");
ABSL_FLAG(int32_t, img_tokens, 256, "image tokens");
ABSL_FLAG(int32_t, txt_tokens, 64, "text tokens");
ABSL_FLAG(int32_t, repeat, 3, "timed forward passes per model (median reported)");
ABSL_FLAG(int32_t, blocks_per_group, 1, "blocks per offloaded group");
ABSL_FLAG(std::string, offload_dir, "", "folder for the group files (\"\" = $TMPDIR or /tmp)");
ABSL_FLAG(std::string, child, "", "internal: run one measurement (resident, offloaded, prefetch)");

namespace {

using Clock = std::chrono::steady_clock;

// A field of /proc/self/status in bytes ("VmRSS", "VmHWM").
int64_t StatusBytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream s(line.substr(field.size() + 1));
      int64_t kb = 0;
      s >> kb;
      return kb * 1024;
    }
  }
  return -1;
}

bool ResetPeak() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return static_cast<bool>(out);
}

nlohmann::json Config() {
  const int64_t heads = absl::GetFlag(FLAGS_heads), head_dim = absl::GetFlag(FLAGS_head_dim);
  // FLUX.1's rope split (16, 56, 56 of 128) scaled to the head dim, each part even.
  const int64_t a0 = std::max<int64_t>(2, head_dim / 8 / 2 * 2);
  const int64_t a1 = (head_dim - a0) / 2 / 2 * 2;
  return {{"patch_size", 1},
          {"in_channels", 64},
          {"num_layers", absl::GetFlag(FLAGS_layers)},
          {"num_single_layers", absl::GetFlag(FLAGS_single_layers)},
          {"attention_head_dim", head_dim},
          {"num_attention_heads", heads},
          {"joint_attention_dim", 256},
          {"pooled_projection_dim", 128},
          {"guidance_embeds", true},
          {"axes_dims_rope", {a0, a1, head_dim - a0 - a1}}};
}

ds::TensorMap Inputs() {
  torch::manual_seed(3);
  const int64_t img = absl::GetFlag(FLAGS_img_tokens), txt = absl::GetFlag(FLAGS_txt_tokens);
  ds::TensorMap in;
  in["hidden_states"] = torch::randn({1, img, 64});
  in["encoder_hidden_states"] = torch::randn({1, txt, 256});
  in["pooled_projections"] = torch::randn({1, 128});
  in["timestep"] = torch::full({1}, 0.7);
  in["guidance"] = torch::full({1}, 3.5);
  in["img_ids"] = torch::zeros({img, 3});
  in["txt_ids"] = torch::zeros({txt, 3});
  return in;
}

int RunChild(const std::string& mode) {
  torch::set_num_threads(absl::GetFlag(FLAGS_threads));
  ds::ModelOptions options;
  if (mode != "resident") {
    ds::GroupOffloadingOptions g;
    g.blocks_per_group = absl::GetFlag(FLAGS_blocks_per_group);
    g.prefetch = mode == "prefetch";
    g.offload_dir = absl::GetFlag(FLAGS_offload_dir);
    options.group_offloading = g;
  }
  auto model = ds::flux::FluxTransformer::Create(Config(), options);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  ds::InitRandomWeights((*model)->module(), 1);
  auto spec = ds::ModelRegistry::Global().Find("flux");
  if (!spec.ok()) return 1;
  const auto t_apply = Clock::now();
  if (absl::Status s = ds::ApplyGroupOffloading(**spec, **model); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  const double apply_s = std::chrono::duration<double>(Clock::now() - t_apply).count();
  malloc_trim(0);
  const ds::TensorMap in = Inputs();
  auto forward = [&] {
    auto out = (*model)->Forward(in);
    if (!out.ok()) {
      std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
      std::exit(1);
    }
  };
  forward();  // warm-up: thread pools, allocator arenas
  malloc_trim(0);
  const int64_t loaded = StatusBytes("VmRSS");
  if (!ResetPeak()) {
    std::fprintf(stderr, "cannot reset VmHWM through /proc/self/clear_refs\n");
    return 1;
  }
  forward();
  const int64_t peak = StatusBytes("VmHWM");
  std::vector<double> t;
  for (int i = 0; i < absl::GetFlag(FLAGS_repeat); ++i) {
    const auto start = Clock::now();
    forward();
    t.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  int64_t weights = 0, group = 0, groups = 0;
  for (const auto& [k, v] : ds::NamedTensors((*model)->module())) weights += v.nbytes();
  if (const ds::GroupOffloader* o = (*model)->group_offloader(); o != nullptr) {
    const ds::GroupOffloadingStats s = o->stats();
    group = *std::max_element(s.group_bytes.begin(), s.group_bytes.end());
    groups = s.groups;
  }
  std::printf("RESULT rss_before=%lld peak=%lld seconds=%.6f weights=%lld group=%lld groups=%lld "
              "apply=%.3f\n",
              static_cast<long long>(loaded), static_cast<long long>(peak), t[t.size() / 2],
              static_cast<long long>(weights), static_cast<long long>(group),
              static_cast<long long>(groups), apply_s);
  return 0;
}

struct Result {
  double rss_before = 0, peak = 0, seconds = 0, weights = 0, group = 0, groups = 0, apply = 0;
};

Result Measure(const std::string& self, const std::string& mode) {
  std::string cmd = absl::StrCat(
      self, " --child=", mode, " --threads=", absl::GetFlag(FLAGS_threads),
      " --layers=", absl::GetFlag(FLAGS_layers), " --single_layers=",
      absl::GetFlag(FLAGS_single_layers), " --heads=", absl::GetFlag(FLAGS_heads),
      " --head_dim=", absl::GetFlag(FLAGS_head_dim), " --img_tokens=",
      absl::GetFlag(FLAGS_img_tokens), " --txt_tokens=", absl::GetFlag(FLAGS_txt_tokens),
      " --repeat=", absl::GetFlag(FLAGS_repeat), " --blocks_per_group=",
      absl::GetFlag(FLAGS_blocks_per_group), " --offload_dir='", absl::GetFlag(FLAGS_offload_dir),
      "'");
  FILE* p = popen(cmd.c_str(), "r");
  Result r;
  if (p == nullptr) return r;
  char line[1024];
  while (std::fgets(line, sizeof(line), p) != nullptr) {
    long long rss, peak, weights, group, groups;
    double seconds, apply;
    if (std::sscanf(line,
                    "RESULT rss_before=%lld peak=%lld seconds=%lf weights=%lld group=%lld "
                    "groups=%lld apply=%lf",
                    &rss, &peak, &seconds, &weights, &group, &groups, &apply) == 7) {
      r = {static_cast<double>(rss), static_cast<double>(peak), seconds,
           static_cast<double>(weights), static_cast<double>(group), static_cast<double>(groups),
           apply};
    }
  }
  if (pclose(p) != 0 || r.seconds == 0) {
    std::fprintf(stderr, "measurement '%s' failed\n", mode.c_str());
    std::exit(1);
  }
  return r;
}

double MiB(double b) { return b / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string child = absl::GetFlag(FLAGS_child);
  if (!child.empty()) return RunChild(child);

  const std::string self = "/proc/self/exe";
  std::printf("Flux transformer %d double + %d single blocks, %d heads x %d, %d image + %d text "
              "tokens, float32, %d threads, blocks_per_group %d\n",
              absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_single_layers),
              absl::GetFlag(FLAGS_heads), absl::GetFlag(FLAGS_head_dim),
              absl::GetFlag(FLAGS_img_tokens), absl::GetFlag(FLAGS_txt_tokens),
              absl::GetFlag(FLAGS_threads), absl::GetFlag(FLAGS_blocks_per_group));
  // popen runs a shell whose /proc/self is the shell's; resolve our own path first.
  char path[4096];
  const ssize_t n = readlink(self.c_str(), path, sizeof(path) - 1);
  if (n <= 0) return 1;
  path[n] = '\0';
  const Result resident = Measure(path, "resident");
  const Result offloaded = Measure(path, "offloaded");
  const Result prefetch = Measure(path, "prefetch");
  const double activations = resident.peak - resident.rss_before;
  std::printf("weights %.1f MiB in %.0f groups, largest group %.1f MiB\n", MiB(resident.weights),
              offloaded.groups, MiB(offloaded.group));
  std::printf("resident model: RSS before forward %.1f MiB, forward peak +%.1f MiB "
              "(activations), %.3f s/forward\n",
              MiB(resident.rss_before), MiB(activations), resident.seconds);
  for (const auto& [name, r] : {std::pair<const char*, const Result&>{"offloaded", offloaded},
                                {"offloaded+prefetch", prefetch}}) {
    const double delta = r.peak - r.rss_before;
    std::printf("%s: RSS before forward %.1f MiB (%.2f x resident), forward peak +%.1f MiB, "
                "(peak - activations) / group = %.2f (target <= 1.3), %.3f s/forward "
                "(slowdown %.2fx), offload at load %.2f s\n",
                name, MiB(r.rss_before), r.rss_before / resident.rss_before, MiB(delta),
                (delta - activations) / r.group, r.seconds, r.seconds / resident.seconds, r.apply);
  }
  return 0;
}
