// Group offloading on a small generic model of repeated blocks (two block lists, parameters and
// buffers, an unmatched embedder and head): offloaded forwards equal resident ones bit for bit for
// every group size, groups are onloaded one at a time and offloaded after the forward, concurrent
// forwards keep their solo results, exclusive-access writes behave as documented, bad options are
// refused naming the field.
#include "handlers/group_offloading.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/vfs.h>
#include <torch/torch.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"

namespace ds {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kWidth = 48;

struct TinyBlockImpl : torch::nn::Module {
  explicit TinyBlockImpl(int64_t width) {
    fc = register_module("fc", torch::nn::Linear(width, width));
    scale = register_parameter("scale", torch::randn({width}));
    shift = register_buffer("shift", torch::randn({width}));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::tanh(fc(x)) * scale + shift; }
  torch::nn::Linear fc{nullptr};
  torch::Tensor scale, shift;
};
TORCH_MODULE(TinyBlock);

struct TinyOtherBlockImpl : torch::nn::Module {
  explicit TinyOtherBlockImpl(int64_t width) {
    up = register_module("up", torch::nn::Linear(width, 2 * width));
    down = register_module("down", torch::nn::Linear(2 * width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + down(torch::gelu(up(x))); }
  torch::nn::Linear up{nullptr}, down{nullptr};
};
TORCH_MODULE(TinyOtherBlock);

// What a forward saw at each block: the groups resident and whether the block's own weights were
// outside the offload mapping (onloaded).
struct Trace {
  std::vector<int64_t> resident_groups;
};

struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl(int64_t blocks, int64_t other_blocks) {
    embed = register_module("embed", torch::nn::Linear(8, kWidth));
    first = register_module("first", torch::nn::ModuleList());
    for (int64_t i = 0; i < blocks; ++i) first->push_back(TinyBlock(kWidth));
    second = register_module("second", torch::nn::ModuleList());
    for (int64_t i = 0; i < other_blocks; ++i) second->push_back(TinyOtherBlock(kWidth));
    head = register_module("head", torch::nn::Linear(kWidth, 4));
  }
  // The model's forward as a model wires group offloading: Enter(i) before block i.
  torch::Tensor forward(const torch::Tensor& x, const GroupOffloader* offloader,
                        Trace* trace = nullptr) {
    torch::InferenceMode inference;
    GroupOffloadSession session(offloader);
    torch::Tensor h = embed->forward(x);
    int64_t i = 0;
    for (const auto& m : *first) {
      session.Enter(i++);
      if (trace != nullptr && offloader != nullptr) {
        trace->resident_groups.push_back(offloader->stats().resident_groups);
      }
      h = m->as<TinyBlock>()->forward(h);
    }
    for (const auto& m : *second) {
      session.Enter(i++);
      if (trace != nullptr && offloader != nullptr) {
        trace->resident_groups.push_back(offloader->stats().resident_groups);
      }
      h = m->as<TinyOtherBlock>()->forward(h);
    }
    session.Leave();
    return head->forward(h);
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  torch::nn::ModuleList first{nullptr}, second{nullptr};
};
TORCH_MODULE(TinyNet);

const std::vector<std::string> kBlocks = {"TinyBlock", "TinyOtherBlock"};

TinyNet MakeNet(int64_t blocks = 5, int64_t other_blocks = 3) {
  torch::manual_seed(7);
  return TinyNet(blocks, other_blocks);
}

torch::Tensor Input(int64_t seed) {
  torch::manual_seed(seed);
  return torch::randn({3, 6, 8});
}

GroupOffloadingOptions Options(int64_t blocks_per_group, bool prefetch = false) {
  GroupOffloadingOptions o;
  o.blocks_per_group = blocks_per_group;
  o.prefetch = prefetch;
  return o;
}

std::shared_ptr<GroupOffloader> Offload(TinyNet& net, const GroupOffloadingOptions& options) {
  auto offloader = GroupOffloader::Apply(*net, kBlocks, options, torch::kCPU);
  EXPECT_TRUE(offloader.ok()) << offloader.status();
  return offloader.ok() ? *offloader : nullptr;
}

int64_t BlockBytes(const TinyNet& net) {
  int64_t bytes = 0;
  for (const auto* list : {&net->first, &net->second}) {
    for (const auto& t : (*list)->parameters()) bytes += t.numel() * t.element_size();
    for (const auto& t : (*list)->buffers()) bytes += t.numel() * t.element_size();
  }
  return bytes;
}

int64_t OpenDescriptors() {
  int64_t n = 0;
  for (auto it = fs::directory_iterator("/proc/self/fd"); it != fs::directory_iterator(); ++it) ++n;
  return n;
}

bool OnTmpfs(const std::string& dir) {
  struct statfs s;
  return statfs(dir.c_str(), &s) == 0 && s.f_type == 0x01021994;  // TMPFS_MAGIC
}

class ScratchDir {
 public:
  ScratchDir() {
    path_ = fs::temp_directory_path() /
            ("ds-group-offloading-test-" + std::to_string(::getpid()) + "-" +
             std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~ScratchDir() { fs::remove_all(path_); }
  std::string path() const { return path_.string(); }
  bool empty() const { return fs::is_empty(path_); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

TEST(GroupOffloadingTest, OffloadedForwardEqualsResidentForEveryGroupSize) {
  TinyNet reference = MakeNet();
  const torch::Tensor x = Input(1);
  const torch::Tensor expected = reference->forward(x, nullptr);
  for (int64_t k : {1, 2, 3, 8}) {
    SCOPED_TRACE(k);
    TinyNet net = MakeNet();
    ScratchDir dir;
    GroupOffloadingOptions options = Options(k);
    options.offload_dir = dir.path();
    auto offloader = Offload(net, options);
    ASSERT_NE(offloader, nullptr);
    // Groups never span the two lists: ceil(5/k) + ceil(3/k).
    const int64_t groups = (5 + k - 1) / k + (3 + k - 1) / k;
    const GroupOffloadingStats before = offloader->stats();
    EXPECT_EQ(before.blocks, 8);
    EXPECT_EQ(before.groups, groups);
    EXPECT_EQ(before.offloaded_bytes, BlockBytes(net));
    EXPECT_EQ(before.resident_bytes, 0);
    EXPECT_EQ(offloader->block_names().front(), "first.0");
    EXPECT_EQ(offloader->block_names().back(), "second.2");
    EXPECT_EQ(offloader->group_of(4), (5 + k - 1) / k - 1);
    EXPECT_EQ(offloader->group_of(5), (5 + k - 1) / k);
    // The group files are nameless: nothing is left in the folder even while the model lives.
    EXPECT_TRUE(dir.empty());

    Trace trace;
    const torch::Tensor out = net->forward(x, offloader.get(), &trace);
    EXPECT_TRUE(torch::equal(out, expected));
    // One group resident at a time, every group onloaded once and offloaded after the forward.
    for (int64_t r : trace.resident_groups) EXPECT_EQ(r, 1);
    const GroupOffloadingStats after = offloader->stats();
    EXPECT_EQ(after.onloads, groups);
    EXPECT_EQ(after.offloads, groups);
    EXPECT_EQ(after.resident_groups, 0);
    EXPECT_EQ(after.resident_bytes, 0);
    // A second forward gives the same result again.
    EXPECT_TRUE(torch::equal(net->forward(x, offloader.get()), expected));
  }
}

TEST(GroupOffloadingTest, OffloadedGroupsLeaveMemory) {
  TinyNet net = MakeNet();
  ScratchDir dir;
  GroupOffloadingOptions options = Options(2);
  options.offload_dir = dir.path();
  auto offloader = Offload(net, options);
  ASSERT_NE(offloader, nullptr);
  const torch::Tensor w = net->first[0]->as<TinyBlock>()->fc->weight;
  const void* mapped = w.data_ptr();
  net->forward(Input(2), offloader.get());
  // Outside a forward the parameters are the offload mapping again (same address as before).
  EXPECT_EQ(w.data_ptr(), mapped);
  if (OnTmpfs(dir.path())) GTEST_SKIP() << "tmpfs offload dir: its pages are memory";
  auto cached = offloader->PageCacheBytes();
  ASSERT_TRUE(cached.ok()) << cached.status();
  // Only dirty pages could stay; none were written after the file was synced.
  EXPECT_EQ(*cached, 0);
  // Reading offloaded weights outside a forward maps pages in; the next offload drops them.
  EXPECT_TRUE(torch::isfinite(w).all().item<bool>());
  net->forward(Input(2), offloader.get());
  EXPECT_EQ(*offloader->PageCacheBytes(), 0);
}

TEST(GroupOffloadingTest, ConcurrentForwardsKeepTheirSoloResults) {
  TinyNet reference = MakeNet(6, 4);
  std::vector<torch::Tensor> inputs, expected;
  for (int64_t t = 0; t < 4; ++t) {
    inputs.push_back(Input(10 + t));
    expected.push_back(reference->forward(inputs.back(), nullptr));
  }
  for (bool prefetch : {false, true}) {
    SCOPED_TRACE(prefetch);
    TinyNet net = MakeNet(6, 4);
    auto offloader = Offload(net, Options(1, prefetch));
    ASSERT_NE(offloader, nullptr);
    std::vector<std::vector<torch::Tensor>> outs(4);
    std::vector<std::thread> threads;
    for (int64_t t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int r = 0; r < 20; ++r) outs[t].push_back(net->forward(inputs[t], offloader.get()));
      });
    }
    for (auto& th : threads) th.join();
    for (int64_t t = 0; t < 4; ++t) {
      for (const torch::Tensor& o : outs[t]) EXPECT_TRUE(torch::equal(o, expected[t]));
    }
    const GroupOffloadingStats s = offloader->stats();
    EXPECT_EQ(s.resident_groups, 0);
    EXPECT_EQ(s.onloads, s.offloads);
    // Every group was onloaded at least once, and at most once per forward.
    EXPECT_GE(s.onloads, 10);
    EXPECT_LE(s.onloads, 4 * 20 * 10);
    if (prefetch) {
      // Read-aheads complete asynchronously.
      for (int i = 0; i < 200 && offloader->stats().prefetches == 0; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      EXPECT_GT(offloader->stats().prefetches, 0);
    }
  }
}

TEST(GroupOffloadingTest, ExclusiveWritesWhileOffloaded) {
  TinyNet reference = MakeNet();
  TinyNet net = MakeNet();
  auto offloader = Offload(net, Options(2));
  ASSERT_NE(offloader, nullptr);
  const torch::Tensor x = Input(3);
  auto weight = [](TinyNet& n) { return n->first[1]->as<TinyBlock>()->fc->weight; };
  auto scale = [](TinyNet& n) { return n->second[0]->as<TinyOtherBlock>()->up->bias; };

  // An in-place write goes to the offloaded copy and is seen by later onloads.
  {
    torch::NoGradGuard no_grad;
    weight(reference).mul_(0.5);
    weight(net).mul_(0.5);
  }
  EXPECT_TRUE(torch::equal(net->forward(x, offloader.get()), reference->forward(x, nullptr)));

  // Replacing a parameter's data (as LoraHost::Fuse does) keeps the replacement, resident.
  torch::Tensor mapped = scale(net).detach();
  torch::Tensor reference_original = scale(reference).detach();
  const torch::Tensor fused = scale(net).detach().clone() + 1.0;
  {
    torch::NoGradGuard no_grad;
    scale(net).set_data(fused);
    scale(reference).set_data(fused.clone());
  }
  EXPECT_TRUE(torch::equal(net->forward(x, offloader.get()), reference->forward(x, nullptr)));
  EXPECT_EQ(scale(net).data_ptr(), fused.data_ptr());
  EXPECT_EQ(offloader->stats().resident_bytes, 0);

  // Setting the offloaded tensor back (LoraHost::Unfuse) brings it under offloading again.
  {
    torch::NoGradGuard no_grad;
    scale(net).set_data(mapped);
    scale(reference).set_data(reference_original);
  }
  EXPECT_TRUE(torch::equal(net->forward(x, offloader.get()), reference->forward(x, nullptr)));
  EXPECT_EQ(scale(net).data_ptr(), mapped.data_ptr());
}

TEST(GroupOffloadingTest, ReleasesItsFilesWhenDestroyed) {
  const int64_t before = OpenDescriptors();
  {
    TinyNet net = MakeNet();
    auto offloader = Offload(net, Options(1, /*prefetch=*/true));
    ASSERT_NE(offloader, nullptr);
    EXPECT_EQ(OpenDescriptors(), before + 8);  // one per group
    net->forward(Input(4), offloader.get());
  }
  EXPECT_EQ(OpenDescriptors(), before);
}

TEST(GroupOffloadingTest, EnterOutsideTheBlocksThrows) {
  TinyNet net = MakeNet();
  auto offloader = Offload(net, Options(1));
  ASSERT_NE(offloader, nullptr);
  GroupOffloadSession session(offloader.get());
  EXPECT_THROW(session.Enter(8), c10::Error);
  EXPECT_THROW(session.Enter(-1), c10::Error);
  GroupOffloadSession none(nullptr);
  EXPECT_NO_THROW(none.Enter(1000));
}

TEST(GroupOffloadingTest, BadOptionsNameTheField) {
  TinyNet net = MakeNet();
  auto expect = [&](const GroupOffloadingOptions& o, const torch::Device& device,
                    absl::StatusCode code, const std::string& field) {
    auto r = GroupOffloader::Apply(*net, kBlocks, o, device);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), field)) << r.status();
  };
  const torch::Tensor w = net->first[0]->as<TinyBlock>()->fc->weight;
  const void* original = w.data_ptr();
  expect(Options(0), torch::kCPU, absl::StatusCode::kInvalidArgument, "blocks_per_group");
  GroupOffloadingOptions missing_dir = Options(1);
  missing_dir.offload_dir = "/nonexistent/ds-offload";
  expect(missing_dir, torch::kCPU, absl::StatusCode::kInvalidArgument, "offload_dir");
  GroupOffloadingOptions cpu_memory = Options(1);
  cpu_memory.target = GroupOffloadTarget::kCpuMemory;
  expect(cpu_memory, torch::kCPU, absl::StatusCode::kInvalidArgument, "offload_to");
  expect(Options(1, /*prefetch=*/true), torch::Device("cuda:0"),
         absl::StatusCode::kUnimplemented, "prefetch");
  auto no_blocks = GroupOffloader::Apply(*net, {"NoSuchBlock"}, Options(1), torch::kCPU);
  EXPECT_EQ(no_blocks.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(no_blocks.status().message(), "NoSuchBlock"));
  EXPECT_EQ(GroupOffloader::Apply(*net, {}, Options(1), torch::kCPU).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Refusals leave the module untouched.
  EXPECT_EQ(w.data_ptr(), original);

  EXPECT_EQ(*ParseGroupOffloadTarget(""), GroupOffloadTarget::kDisk);
  EXPECT_EQ(*ParseGroupOffloadTarget("cpu"), GroupOffloadTarget::kCpuMemory);
  auto bad = ParseGroupOffloadTarget("ssd");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "offload_to"));
}

}  // namespace
}  // namespace ds
