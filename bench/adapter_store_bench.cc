// Adapter store load-on-miss latency (issue 8, "Performance"): a replica that is asked for an
// adapter it does not hold loads it from the shared store (descriptor read, size and SHA-256
// verification, then LoraHost::Load, which takes the digest just computed from the identity cache)
// next to a local LoadLoRA of the same bytes (LoraHost::Load of a fresh local file: hash overlapped
// with conversion and copy). Target: miss <= 2x local, both measured in this run, interleaved.
// The publishing side (AdapterSync::Published: copy + fsync + rename of file and descriptor) is
// reported as well.
//
// Two ModelManagers play two replicas sharing one store folder. The model is a Flux transformer
// with Flux's full depth (19 double + 38 single blocks, so the LoRA has ~1,000 tensors like a real
// Flux LoRA) at a narrow width, loaded as a diffusers folder through ModelManager::Load; the LoRA
// is a synthetic float32 diffusers/PEFT LoRA on every linear, sized to --mb.
//
//   adapter_store_bench [--mb 20] [--rounds 7] [--dir /tmp] [--threads N]
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "handlers/threads.h"
#include "server/adapter_store.h"
#include "server/model_manager.h"
#include "testing/lora_util.h"

ABSL_FLAG(double, mb, 20, "LoRA file size, MB");
ABSL_FLAG(int, rounds, 7, "Interleaved rounds (each: one local load, one publish, one miss)");
ABSL_FLAG(std::string, dir, "/tmp", "Folder for the model, the LoRA files and the store");
ABSL_FLAG(int, threads, 0, "LibTorch intra-op threads; 0 = every core");

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Fail(const absl::Status& s, const std::string& what) {
  std::fprintf(stderr, "adapter_store_bench: %s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  ds::SetIntraOpThreads(absl::GetFlag(FLAGS_threads));
  using namespace ds;          // NOLINT
  using namespace ds::server;  // NOLINT
  const fs::path root =
      fs::path(absl::GetFlag(FLAGS_dir)) / absl::StrCat("adapter_store_bench_", getpid());
  fs::create_directories(root / "model");
  fs::create_directories(root / "store");
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{root};

  // The model folder (diffusers layout), random weights.
  const nlohmann::json config = {{"_class_name", "FluxTransformer2DModel"},
                                 {"num_layers", 19},
                                 {"num_single_layers", 38},
                                 {"num_attention_heads", 2},
                                 {"attention_head_dim", 32},
                                 {"axes_dims_rope", {4, 14, 14}},
                                 {"in_channels", 16},
                                 {"joint_attention_dim", 64},
                                 {"pooled_projection_dim", 64}};
  TensorMap params;
  {
    auto spec = ModelRegistry::Global().Find("flux");
    if (!spec.ok()) return Fail(spec.status(), "flux");
    auto model = (*spec)->factory(config, ModelOptions{});
    if (!model.ok()) return Fail(model.status(), "building the model");
    InitRandomWeights((*model)->module(), 0);
    params = NamedTensors((*model)->module());
    std::ofstream(root / "model" / "config.json") << config.dump(2);
    if (auto s = WriteSafetensors((root / "model" / "diffusion_pytorch_model.safetensors").string(),
                                  params);
        !s.ok()) {
      return Fail(s, "writing the model");
    }
  }
  std::vector<std::shared_ptr<ModelManager>> replicas;
  std::vector<std::unique_ptr<AdapterSync>> syncs;
  for (int i = 0; i < 2; ++i) {
    auto models = std::make_shared<ModelManager>();
    LoadModelRequest request;
    request.name = "flux-narrow";
    request.path = (root / "model").string();
    if (auto r = models->Load(request); !r.ok()) return Fail(r.status(), "loading the model");
    auto store = AdapterStore::Open((root / "store").string());
    if (!store.ok()) return Fail(store.status(), "opening the store");
    syncs.push_back(
        std::make_unique<AdapterSync>(*std::move(store), models, AdapterSyncOptions{}, nullptr));
    replicas.push_back(std::move(models));
  }
  const InstancePtr a = *replicas[0]->Get("flux-narrow");
  const InstancePtr b = *replicas[1]->Get("flux-narrow");

  const std::vector<std::string> modules = test::LinearModules(params);
  const int64_t rank =
      test::RankForBytes(params, modules, static_cast<int64_t>(absl::GetFlag(FLAGS_mb) * 1e6));
  const std::string lora_file = (root / "lora.safetensors").string();
  if (auto s = WriteSafetensors(lora_file, test::MakeDiffusersLora(params, modules, rank, 7));
      !s.ok()) {
    return Fail(s, "writing the LoRA");
  }
  const int64_t file_bytes = static_cast<int64_t>(fs::file_size(lora_file));
  std::printf(
      "adapter store: LoRA %.1f MB (%zu modules, rank %lld, float32) on flux 19+38 blocks "
      "width 64; %d interleaved rounds\n",
      static_cast<double>(file_bytes) / 1e6, modules.size(), static_cast<long long>(rank),
      absl::GetFlag(FLAGS_rounds));

  std::vector<double> local, publish, miss;
  for (int round = -1; round < absl::GetFlag(FLAGS_rounds); ++round) {  // round -1: warm-up
    const std::string name = absl::StrCat("style", round + 1);
    // A fresh copy each round, so no digest is remembered from an earlier round.
    const std::string fresh = (root / absl::StrCat("copy", round + 1, ".safetensors")).string();
    fs::copy_file(lora_file, fresh, fs::copy_options::overwrite_existing);

    auto entry = syncs[0]->Lock("flux-narrow", name);
    auto start = Clock::now();
    absl::StatusOr<AdapterLoadResult> loaded = a->host->Load(name, fresh);
    const double t_local = Since(start);
    if (!loaded.ok()) return Fail(loaded.status(), "local load");
    absl::StatusOr<AdapterInfo> info = a->host->Info(name);
    start = Clock::now();
    auto published = syncs[0]->Published(*a, *info, fresh, false, false, false);
    const double t_publish = Since(start);
    if (!published.ok()) return Fail(published.status(), "publish");
    entry.unlock();

    start = Clock::now();
    if (auto s = syncs[1]->EnsureLoaded(b, {name}); !s.ok()) return Fail(s, "load on miss");
    const double t_miss = Since(start);
    if (b->host->Info(name)->sha256 != info->sha256) {
      return Fail(absl::InternalError("digest differs"), "load on miss");
    }
    if (round >= 0) {
      local.push_back(t_local);
      publish.push_back(t_publish);
      miss.push_back(t_miss);
    }
    (void)a->host->Unload(name);
    (void)b->host->Unload(name);
    (void)syncs[0]->Removed("flux-narrow", name);
    fs::remove(fresh);
  }
  std::printf("  local LoadLoRA (LoraHost::Load, fresh file)  median %.4f s  best %.4f s\n",
              Median(local), *std::min_element(local.begin(), local.end()));
  std::printf("  publish to the store (copy+fsync+rename)      median %.4f s  best %.4f s\n",
              Median(publish), *std::min_element(publish.begin(), publish.end()));
  std::printf("  load on miss from the store (verify + load)   median %.4f s  best %.4f s\n",
              Median(miss), *std::min_element(miss.begin(), miss.end()));
  std::printf("  ratio miss / local: %.2fx (target <= 2x)\n", Median(miss) / Median(local));
  return 0;
}
