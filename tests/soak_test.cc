// Soak test: the real diffusion-server binary (embedded flux-tiny, a shared adapter store,
// management with a token) under mixed traffic for DS_SOAK_SECONDS (default 60; `make soak` runs
// 600, the ctest entry `soak_test_smoke` 20):
//   - generators: Generate (32x32, 2-4 steps, text prompts) with random stacks of stable adapters
//     (three LoRAs written here for flux-tiny's transformer and the shipped circles->stars LoRA);
//   - churn: LoadLoRA (path and inline bytes alternately) -> Generate with it -> ListLoRAs ->
//     UnloadLoRA, cycling through a few names;
//   - readers: GetMetadata, ListLoRAs, ListModels and health checks;
//   - deliberately bad requests, each of which must fail with its expected code.
// The server's VmRSS and open file descriptors are sampled every 250 ms. The warm-up figure is
// the median of the samples in the window ending at 10% of the run, the end figure the median of
// the last window of the same length (both under traffic). Asserted: the end RSS within 5% of the
// warm-up RSS, fds grown by at most 2, no unexpected error. One summary line is printed.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "handlers/registry.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "testing/lora_util.h"
#include "testing/proc_stats.h"
#include "testing/server_process.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
namespace pb = ::diffusion::v1;
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "soak-admin-token-0123456789";
constexpr char kModel[] = "flux-tiny";
constexpr int kGenerators = 3;
constexpr double kMaxRssDrift = 0.05;
constexpr int64_t kMaxFdGrowth = 2;
// The stable adapters (never unloaded during the run) and the churned ones.
const std::vector<std::string> kStable = {"soak-r2", "soak-r4", "soak-r8", "stars"};
const std::vector<std::string> kChurn = {"churn-a", "churn-b", "churn-c"};

double SoakSeconds() {
  const char* env = std::getenv("DS_SOAK_SECONDS");
  const double s = env != nullptr ? std::atof(env) : 60.0;
  return s > 0 ? s : 60.0;
}

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::unique_ptr<grpc::ClientContext> Context(double seconds, bool admin = false) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  if (admin) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
  return ctx;
}

// Counts of requests by kind and the unexpected errors (with the first few messages).
class Tally {
 public:
  void Count(const std::string& kind) {
    std::lock_guard lock(mu_);
    ++requests_[kind];
  }
  // Counts `kind`; an error unless `status` has the `expected` code.
  void Check(const std::string& kind, const grpc::Status& status,
             grpc::StatusCode expected = grpc::StatusCode::OK, const std::string& what = "") {
    std::lock_guard lock(mu_);
    ++requests_[kind];
    if (status.error_code() == expected) return;
    Error(kind + (what.empty() ? "" : " " + what) + ": got code " +
          std::to_string(status.error_code()) + " (want " + std::to_string(expected) +
          "): " + status.error_message());
  }
  void Fail(const std::string& message) {
    std::lock_guard lock(mu_);
    Error(message);
  }
  int64_t errors() const {
    std::lock_guard lock(mu_);
    return errors_;
  }
  std::string Summary() const {
    std::lock_guard lock(mu_);
    std::vector<std::string> parts;
    int64_t total = 0;
    for (const auto& [kind, n] : requests_) {
      parts.push_back(absl::StrCat(kind, "=", n));
      total += n;
    }
    return absl::StrCat("total=", total, " ", absl::StrJoin(parts, " "));
  }
  std::string FirstErrors() const {
    std::lock_guard lock(mu_);
    return absl::StrJoin(first_errors_, "\n");
  }

 private:
  void Error(const std::string& message) {
    ++errors_;
    if (first_errors_.size() < 10) first_errors_.push_back(message);
  }
  mutable std::mutex mu_;
  std::map<std::string, int64_t> requests_;
  int64_t errors_ = 0;
  std::vector<std::string> first_errors_;
};

const std::vector<std::string> kColours = {"red", "green", "blue", "yellow", "black", "white"};
const std::vector<std::string> kShapes = {"circle", "square", "triangle", "cross", "star"};

pb::GenerateRequest RandomRequest(std::mt19937_64& rng) {
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  pb::GenerateRequest r;
  r.set_model(kModel);
  r.add_prompt(absl::StrCat("a ", pick(kColours), " ", pick(kShapes), " on a ", pick(kColours),
                            " background"));
  r.set_width(32);
  r.set_height(32);
  r.set_steps(2 + static_cast<int64_t>(rng() % 3));
  r.set_seed(static_cast<int64_t>(rng() % 1000000));
  return r;
}

// Runs a Generate to the end; the status, with `images` set to the result's image count.
grpc::Status RunGenerate(pb::DiffusionService::Stub& stub, const pb::GenerateRequest& request,
                         int* images) {
  auto ctx = Context(60);
  auto reader = stub.Generate(ctx.get(), request);
  pb::GenerateResponse m;
  *images = 0;
  while (reader->Read(&m)) {
    if (m.has_result()) *images = m.result().images_size();
  }
  return reader->Finish();
}

// Samples of the server's VmRSS and fd count.
struct Sample {
  double t = 0;
  int64_t rss_kb = 0;
  int64_t fds = 0;
};

// The medians of RSS and fds over the samples with t in [from, to].
std::pair<int64_t, int64_t> Medians(const std::vector<Sample>& samples, double from, double to) {
  std::vector<int64_t> rss, fds;
  for (const Sample& s : samples) {
    if (s.t >= from && s.t <= to) {
      rss.push_back(s.rss_kb);
      fds.push_back(s.fds);
    }
  }
  if (rss.empty()) return {-1, -1};
  std::sort(rss.begin(), rss.end());
  std::sort(fds.begin(), fds.end());
  return {rss[rss.size() / 2], fds[fds.size() / 2]};
}

TEST(SoakTest, MixedTrafficKeepsMemoryAndFdsFlatWithoutUnexpectedErrors) {
  torch::set_num_threads(1);
  const double seconds = SoakSeconds();
  TempDir tmp;
  const std::string embedded = tmp.File("embedded");
  const std::string adapters = tmp.File("adapters");
  const std::string store = tmp.File("store");
  const std::string token_file = tmp.File("token");
  fs::create_directories(adapters);
  fs::create_directories(store);
  std::ofstream(token_file) << kToken << "\n";
  ServerProcess server({"--embedded_models=flux-tiny", "--embedded_dir=" + embedded,
                        "--admin_token_file=" + token_file, "--adapter_root=" + adapters,
                        "--adapter_store=" + store, "--adapter_store_poll_ms=200", "--workers=1",
                        "--queue_capacity=32"});
  ASSERT_TRUE(server.ok()) << server.Stderr();
  const pid_t pid = test::FindChildProcess(DS_SERVER_PATH);
  ASSERT_GT(pid, 0) << "the server process was not found under /proc";

  // Small LoRAs for the transformer the server wrote (ranks 2, 4, 8 and three churned ones) in
  // the adapter root, plus the shipped stars LoRA (kohya format).
  auto transformer = LoadModelFromFolder(embedded + "/flux-tiny/pipeline/transformer", {});
  ASSERT_TRUE(transformer.ok()) << transformer.status();
  const TensorMap params = NamedTensors((*transformer)->module());
  const std::vector<std::string> modules = test::LinearModules(params);
  const std::map<std::string, int64_t> ranks = {{"soak-r2", 2}, {"soak-r4", 4}, {"soak-r8", 8},
                                                {"churn-a", 2}, {"churn-b", 4}, {"churn-c", 3}};
  uint64_t seed = 1;
  for (const auto& [name, rank] : ranks) {
    ASSERT_TRUE(WriteSafetensors(adapters + "/" + name + ".safetensors",
                                 test::MakeDiffusersLora(params, modules, rank, seed++))
                    .ok());
  }
  fs::copy_file(std::string(DS_SOURCE_DIR) + "/models/flux/demo/flux-tiny-stars.safetensors",
                adapters + "/stars.safetensors");

  auto admin = server.Stub();
  for (const std::string& name : kStable) {
    pb::LoadLoRARequest load;
    load.set_model(kModel);
    load.set_name(name);
    load.set_path(name + ".safetensors");
    pb::LoadLoRAResponse loaded;
    const grpc::Status s = admin->LoadLoRA(Context(60, true).get(), load, &loaded);
    ASSERT_TRUE(s.ok()) << name << ": " << s.error_message();
  }

  Tally tally;
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;

  // Generators: random stacks of 0-3 stable adapters with weights in [-1, 1].
  for (int g = 0; g < kGenerators; ++g) {
    threads.emplace_back([&, g] {
      std::mt19937_64 rng(100 + g);
      auto stub = server.Stub();
      while (!stop.load()) {
        pb::GenerateRequest r = RandomRequest(rng);
        std::vector<std::string> names = kStable;
        std::shuffle(names.begin(), names.end(), rng);
        const size_t n = rng() % 4;
        for (size_t i = 0; i < n; ++i) {
          pb::AdapterWeight* a = r.add_adapters();
          a->set_name(names[i]);
          a->set_weight(std::uniform_real_distribution<double>(-1, 1)(rng));
        }
        int images = 0;
        const grpc::Status s = RunGenerate(*stub, r, &images);
        tally.Check("generate", s);
        if (s.ok() && images != 1) tally.Fail(absl::StrCat("generate: ", images, " images"));
      }
    });
  }

  // Churn: load (path / inline bytes alternately), use, list, unload.
  threads.emplace_back([&] {
    std::mt19937_64 rng(7);
    auto stub = server.Stub();
    std::map<std::string, std::string> bytes;
    for (const std::string& name : kChurn) {
      bytes[name] = test::ReadFileBytes(adapters + "/" + name + ".safetensors");
    }
    for (int64_t i = 0; !stop.load(); ++i) {
      const std::string& name = kChurn[static_cast<size_t>(i) % kChurn.size()];
      pb::LoadLoRARequest load;
      load.set_model(kModel);
      load.set_name(name);
      if (i % 2 == 0) {
        load.set_path(name + ".safetensors");
      } else {
        load.set_inline_bytes(bytes[name]);
      }
      pb::LoadLoRAResponse loaded;
      grpc::Status s = stub->LoadLoRA(Context(60, true).get(), load, &loaded);
      tally.Check("load_lora", s, grpc::StatusCode::OK, name);
      if (!s.ok()) continue;
      pb::GenerateRequest r = RandomRequest(rng);
      pb::AdapterWeight* a = r.add_adapters();
      a->set_name(name);
      a->set_weight(0.8);
      int images = 0;
      s = RunGenerate(*stub, r, &images);
      tally.Check("generate_churn", s);
      pb::ListLoRAsRequest list;
      list.set_model(kModel);
      pb::ListLoRAsResponse listed;
      s = stub->ListLoRAs(Context(10).get(), list, &listed);
      tally.Check("list_loras", s);
      bool found = false;
      for (const pb::LoRAInfo& info : listed.adapters()) found |= info.name() == name;
      if (s.ok() && !found) tally.Fail("ListLoRAs does not list the loaded " + name);
      pb::UnloadLoRARequest unload;
      unload.set_model(kModel);
      unload.set_name(name);
      pb::UnloadLoRAResponse unloaded;
      s = stub->UnloadLoRA(Context(60, true).get(), unload, &unloaded);
      tally.Check("unload_lora", s, grpc::StatusCode::OK, name);
    }
  });

  // Readers and deliberately bad requests.
  threads.emplace_back([&] {
    std::mt19937_64 rng(11);
    auto stub = server.Stub();
    auto health = grpc::health::v1::Health::NewStub(server.NewChannel());
    for (int64_t i = 0; !stop.load(); ++i) {
      pb::GetMetadataRequest md;
      md.set_name(kModel);
      pb::GetMetadataResponse md_out;
      tally.Check("get_metadata", stub->GetMetadata(Context(10).get(), md, &md_out));
      pb::ListLoRAsRequest list;
      list.set_model(kModel);
      pb::ListLoRAsResponse listed;
      tally.Check("list_loras", stub->ListLoRAs(Context(10).get(), list, &listed));
      pb::ListModelsResponse models;
      tally.Check("list_models", stub->ListModels(Context(10).get(), {}, &models));
      grpc::health::v1::HealthCheckRequest hreq;
      hreq.set_service(kModel);
      grpc::health::v1::HealthCheckResponse hresp;
      tally.Check("health", health->Check(Context(10).get(), hreq, &hresp));
      if (i % 5 == 0) {
        // One bad request per round, in turn.
        int images = 0;
        pb::LoadLoRAResponse loaded;
        pb::LoadLoRARequest load;
        load.set_model(kModel);
        load.set_name("bad");
        switch ((i / 5) % 6) {
          case 0: {
            pb::GenerateRequest r = RandomRequest(rng);
            r.set_model("no-such-model");
            tally.Check("bad", RunGenerate(*stub, r, &images), grpc::StatusCode::NOT_FOUND,
                        "unknown model");
            break;
          }
          case 1: {
            pb::GenerateRequest r = RandomRequest(rng);
            r.set_width(33);
            tally.Check("bad", RunGenerate(*stub, r, &images), grpc::StatusCode::INVALID_ARGUMENT,
                        "width 33");
            break;
          }
          case 2: {
            pb::GenerateRequest r = RandomRequest(rng);
            r.add_adapters()->set_name("never-loaded");
            tally.Check("bad", RunGenerate(*stub, r, &images), grpc::StatusCode::NOT_FOUND,
                        "unknown adapter");
            break;
          }
          case 3:
            load.set_path("soak-r2.safetensors");
            tally.Check("bad", stub->LoadLoRA(Context(10).get(), load, &loaded),
                        grpc::StatusCode::UNAUTHENTICATED, "no token");
            break;
          case 4:
            load.set_path("../token");
            tally.Check("bad", stub->LoadLoRA(Context(10, true).get(), load, &loaded),
                        grpc::StatusCode::PERMISSION_DENIED, "path escape");
            break;
          case 5:
            load.set_inline_bytes("not a safetensors file");
            tally.Check("bad", stub->LoadLoRA(Context(10, true).get(), load, &loaded),
                        grpc::StatusCode::INVALID_ARGUMENT, "junk bytes");
            break;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });

  // Sampling until the end.
  const auto start = Clock::now();
  std::vector<Sample> samples;
  while (Since(start) < seconds) {
    const test::ProcStats p = test::ReadProcStats(pid);
    if (p.rss_kb < 0 || p.fds < 0) {
      tally.Fail("the server process is gone");
      break;
    }
    samples.push_back({Since(start), p.rss_kb, p.fds});
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  stop.store(true);
  for (std::thread& t : threads) t.join();

  const double warmup = 0.1 * seconds;
  const double window = std::max(1.0, 0.05 * seconds);
  const auto [warm_rss, warm_fds] = Medians(samples, warmup - window, warmup);
  const auto [end_rss, end_fds] = Medians(samples, seconds - window, seconds);
  const double drift =
      warm_rss > 0 ? static_cast<double>(end_rss - warm_rss) / static_cast<double>(warm_rss) : 0;
  int64_t peak_rss = 0;
  for (const Sample& s : samples) peak_rss = std::max(peak_rss, s.rss_kb);
  std::printf(
      "soak: %.0f s, requests %s; unexpected errors %lld; RSS warm-up %.1f MB end %.1f MB "
      "(peak %.1f MB) drift %+.2f%%; fds warm-up %lld end %lld\n",
      seconds, tally.Summary().c_str(), static_cast<long long>(tally.errors()), warm_rss / 1024.0,
      end_rss / 1024.0, peak_rss / 1024.0, 100 * drift, static_cast<long long>(warm_fds),
      static_cast<long long>(end_fds));
  std::fflush(stdout);

  EXPECT_EQ(tally.errors(), 0) << tally.FirstErrors();
  ASSERT_GT(warm_rss, 0);
  ASSERT_GT(end_rss, 0);
  if (test::kSanitizerOwnsResidentMemory) {
    std::printf("soak: sanitizer build, RSS drift not bounded (the sanitizer's allocator)\n");
  } else {
    EXPECT_LE(std::abs(drift), kMaxRssDrift)
        << "RSS warm-up " << warm_rss << " kB, end " << end_rss << " kB";
  }
  EXPECT_LE(end_fds - warm_fds, kMaxFdGrowth);
}

}  // namespace
}  // namespace ds
