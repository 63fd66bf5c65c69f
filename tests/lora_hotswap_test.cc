// Hot swap under load: request threads run forwards with the adapter named "style" while other
// threads load it (v1), replace it (v2) and unload it in a loop, and fuse/unfuse another adapter.
// Every output must equal, bit for bit, one of the outputs of a consistent state (base or fused
// base, with no adapter, v1 or v2: whichever the request's snapshot holds), never a mix.
// Built with -fsanitize=thread (see tests/CMakeLists.txt): ThreadSanitizer checks the store,
// the snapshots and the weight swaps for data races while this runs.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "handlers/lora_host.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/lora.h"
#include "models/flux/transformer.h"
#include "testing/lora_util.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

// The base model of the LoRA fixtures, built directly (this binary links the model folder's
// objects without its registration; see tests/CMakeLists.txt).
std::shared_ptr<DiffusionModel> LoadBase() {
  auto folder = OpenModelFolder((fs::path(test::GoldenDir()) / "lora" / "base_model_dir").string());
  EXPECT_TRUE(folder.ok()) << folder.status();
  if (!folder.ok()) return nullptr;
  auto model = flux::CreateFluxTransformer(folder->config, ModelOptions{});
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return nullptr;
  EXPECT_TRUE(LoadStateDict((*model)->module(), folder->weights, folder->dir).ok());
  return std::shared_ptr<DiffusionModel>(std::move(*model));
}

TEST(LoraHotSwapTest, RequestsSeeOldOrNewAdapterSetsNeverAMix) {
  at::set_num_threads(1);  // deterministic outputs, and no OpenMP pool under ThreadSanitizer
  std::shared_ptr<DiffusionModel> model = LoadBase();
  ASSERT_NE(model, nullptr);
  const TensorMap params = NamedTensors(model->module());
  test::TempDir dir;
  auto write = [&](const std::string& name, uint64_t seed) {
    const std::string path = dir.File(name + ".safetensors");
    EXPECT_TRUE(
        WriteSafetensors(path, test::MakeDiffusersLora(params, test::LinearModules(params), 4, seed))
            .ok());
    return path;
  };
  const std::string v1 = write("v1", 1), v2 = write("v2", 2), fused_file = write("f", 3);
  auto inputs = LoadSafetensorsWeights(
      (fs::path(test::GoldenDir()) / "lora" / "diffusers" / "forward.safetensors").string());
  ASSERT_TRUE(inputs.ok());
  inputs->erase("output");

  LoraHost host(model, &flux::FluxLoraHandler());
  ASSERT_TRUE(host.Load("f", fused_file).ok());

  // Expected outputs of every consistent state: [fused?][adapter digest or "" for none].
  std::map<std::string, torch::Tensor> expected[2];
  for (int fused = 0; fused < 2; ++fused) {
    if (fused) {
      ASSERT_TRUE(host.Fuse({{"f", 1.0}}).ok());
    }
    for (const std::string& file : {std::string(), v1, v2}) {
      AdapterStackPtr stack;
      std::string digest;
      if (!file.empty()) {
        ASSERT_TRUE(host.Load("style", file, {.replace = true}).ok());
        auto s = host.Snapshot({{"style", 1.0}});
        ASSERT_TRUE(s.ok());
        stack = *s;
        digest = stack->adapters[0].adapter->sha256;
      }
      auto out = host.Forward(*inputs, stack.get());
      ASSERT_TRUE(out.ok()) << out.status();
      expected[fused][digest] = *out;
    }
    ASSERT_TRUE(host.Unload("style").ok());
    if (fused) {
      ASSERT_TRUE(host.Unfuse().ok());
    }
  }
  ASSERT_EQ(expected[0].size(), 3u);

  std::atomic<bool> stop{false};
  std::atomic<int> requests{0}, mixed{0}, failures{0};
  std::atomic<int> swaps{0}, fuses{0};
  auto swapper = [&] {
    while (!stop) {
      for (const std::string& file : {v1, v2}) {
        if (!host.Load("style", file, {.replace = true}).ok()) ++failures;
        ++swaps;
      }
      if (!host.Unload("style").ok()) ++failures;
    }
  };
  auto fuser = [&] {
    while (!stop) {
      if (!host.Fuse({{"f", 1.0}}).ok()) ++failures;
      if (!host.Unfuse().ok()) ++failures;
      ++fuses;
    }
  };
  auto requester = [&] {
    for (int i = 0; i < 40; ++i) {
      auto stack = host.Snapshot({{"style", 1.0}});
      AdapterStackPtr s;
      std::string digest;
      if (stack.ok()) {
        s = *stack;
        digest = s->adapters[0].adapter->sha256;
      } else if (stack.status().code() != absl::StatusCode::kNotFound) {
        ++failures;
        continue;
      }
      auto out = host.Forward(*inputs, s.get());
      if (!out.ok()) {
        ++failures;
        continue;
      }
      ++requests;
      if (!torch::equal(*out, expected[0].at(digest)) &&
          !torch::equal(*out, expected[1].at(digest))) {
        ++mixed;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.emplace_back(swapper);
  threads.emplace_back(fuser);
  std::vector<std::thread> clients;
  for (int i = 0; i < 3; ++i) clients.emplace_back(requester);
  for (auto& t : clients) t.join();
  stop = true;
  for (auto& t : threads) t.join();

  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mixed.load(), 0) << "outputs that match no consistent adapter state";
  EXPECT_EQ(requests.load(), 120);
  EXPECT_GT(swaps.load(), 0);
  EXPECT_GT(fuses.load(), 0);
  // Everything is released once the requests are gone: nothing retired, base restored.
  EXPECT_EQ(host.retired_bytes(), 0);
  EXPECT_TRUE(host.fused().empty());
  auto base = host.Forward(*inputs);
  ASSERT_TRUE(base.ok());
  EXPECT_TRUE(torch::equal(*base, expected[0].at("")));
}

}  // namespace
}  // namespace ds
