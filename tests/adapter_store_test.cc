// The shared adapter store in process: two ModelManagers with the embedded model play two
// replicas sharing one store folder. Publishing, on-demand loading (single flight under
// concurrency), digest verification (corrupt, truncated and garbled entries are DATA_LOSS naming
// the file and never inserted), replacement and removal followed by the poll pass, and the
// ALREADY_EXISTS race between replicas.
#include "server/adapter_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "handlers/digest.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "server/metrics.h"
#include "server/model_manager.h"
#include "testing/lora_util.h"
#include "testing/test_util.h"

namespace ds::server {
namespace {

namespace fs = std::filesystem;
using ::ds::test::TempDir;
using ::testing::HasSubstr;

// Count of diffusion_adapter_load_seconds observations for `model` in `metrics`.
int64_t AdapterLoads(const Metrics& metrics, const std::string& model) {
  const std::string text = metrics.SerializeText();
  const std::string key =
      absl::StrCat("diffusion_adapter_load_seconds_count{model=\"", model, "\"} ");
  const size_t at = text.find(key);
  if (at == std::string::npos) return 0;
  return std::stoll(text.substr(at + key.size()));
}

// One replica: its own ModelManager (embedded "default") and AdapterSync on the shared folder.
struct Replica {
  explicit Replica(const std::string& root) {
    models = std::make_shared<ModelManager>();
    auto loaded = models->LoadEmbedded("default");
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    auto store = AdapterStore::Open(root);
    EXPECT_TRUE(store.ok()) << store.status();
    metrics = std::make_shared<Metrics>();
    sync = std::make_unique<AdapterSync>(*std::move(store), models, AdapterSyncOptions{}, metrics);
  }
  InstancePtr instance() const { return *models->Get("default"); }
  // LoadLoRA as the service does it: local load, then the store half.
  absl::Status Load(const std::string& name, const std::string& file, bool replace,
                    double default_weight = 1.0) {
    auto entry = sync->Lock("default", name);
    InstancePtr inst = instance();
    AdapterLoadOptions options;
    options.replace = replace;
    options.default_weight = default_weight;
    absl::StatusOr<AdapterLoadResult> r = inst->host->Load(name, file, options);
    if (!r.ok()) return r.status();
    absl::StatusOr<AdapterInfo> info = inst->host->Info(name);
    if (!info.ok()) return info.status();
    absl::StatusOr<AdapterDescriptor> d =
        sync->Published(*inst, *info, file, false, false, replace);
    if (!d.ok()) {
      (void)inst->host->Unload(name);
      return d.status();
    }
    return absl::OkStatus();
  }
  std::string Digest(const std::string& name) const {
    absl::StatusOr<AdapterInfo> info = instance()->host->Info(name);
    return info.ok() ? info->sha256 : "";
  }

  std::shared_ptr<ModelManager> models;
  std::shared_ptr<Metrics> metrics;
  std::unique_ptr<AdapterSync> sync;
};

class AdapterStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    root_ = tmp_.File("store");
    fs::create_directories(root_);
    a_ = std::make_unique<Replica>(root_);
    b_ = std::make_unique<Replica>(root_);
    params_ = NamedTensors(a_->instance()->model().module());
  }
  // A LoRA file for the embedded model; different seeds give different bytes.
  std::string MakeLora(const std::string& file_name, uint64_t seed) {
    const std::string path = tmp_.File(file_name);
    EXPECT_TRUE(
        WriteSafetensors(path, test::MakeDiffusersLora(params_, test::LinearModules(params_),
                                                       /*rank=*/2, seed))
            .ok());
    return path;
  }
  std::string BlobPath(const std::string& name) {
    auto d = a_->sync->store().Read("default", name);
    EXPECT_TRUE(d.ok()) << d.status();
    return absl::StrCat(root_, "/v1/default.d/", d->blob);
  }

  TempDir tmp_;
  std::string root_;
  std::unique_ptr<Replica> a_, b_;
  TensorMap params_;
};

TEST_F(AdapterStoreTest, PublishWritesBlobAndDescriptorAtomically) {
  const std::string file = MakeLora("one.safetensors", 1);
  ASSERT_TRUE(a_->Load("style", file, false).ok());
  auto digest = Sha256File(file);
  ASSERT_TRUE(digest.ok());
  auto d = a_->sync->store().Read("default", "style");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->sha256, *digest);
  EXPECT_EQ(d->format, "diffusers");
  EXPECT_EQ(d->file_bytes, static_cast<int64_t>(fs::file_size(file)));
  EXPECT_EQ(test::ReadFileBytes(BlobPath("style")), test::ReadFileBytes(file));
  // Nothing temporary is left behind.
  for (const auto& e : fs::directory_iterator(root_ + "/v1/default.d")) {
    EXPECT_FALSE(e.path().filename().string().rfind(".tmp-", 0) == 0) << e.path();
  }
  // The listing and Stored() agree.
  auto listing = b_->sync->store().List("default");
  ASSERT_TRUE(listing.ok());
  ASSERT_EQ(listing->adapters.count("style"), 1u);
  EXPECT_EQ(listing->adapters.at("style").sha256, *digest);
  ASSERT_EQ(a_->sync->Stored("default").size(), 1u);
}

TEST_F(AdapterStoreTest, AnotherReplicaLoadsOnDemandOnceUnderConcurrency) {
  const std::string file = MakeLora("one.safetensors", 1);
  ASSERT_TRUE(a_->Load("style", file, false).ok());
  EXPECT_EQ(b_->Digest("style"), "");
  const InstancePtr inst = b_->instance();
  EXPECT_EQ(AdapterSync::Missing(*inst, {"style"}), std::vector<std::string>{"style"});

  std::vector<std::thread> threads;
  std::vector<absl::Status> results(16);
  for (size_t i = 0; i < results.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = b_->sync->EnsureLoaded(inst, {"style"}); });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : results) EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(b_->Digest("style"), a_->Digest("style"));
  EXPECT_EQ(AdapterLoads(*b_->metrics, "default"), 1) << "one load for 16 concurrent requests";
  auto info = inst->host->Info("style");
  ASSERT_TRUE(info.ok());
  EXPECT_THAT(info->path, HasSubstr("store:default.d/style."));

  // An adapter neither held nor stored: NOT_FOUND naming it.
  absl::Status missing = b_->sync->EnsureLoaded(inst, {"nope"});
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
  EXPECT_THAT(std::string(missing.message()), HasSubstr("'nope'"));
}

// The adapter's default weight (LoadLoRA.default_weight) is part of the descriptor: a replica that
// loads the adapter from the store applies the same weight to requests that give none.
TEST_F(AdapterStoreTest, DefaultWeightTravelsWithTheDescriptor) {
  const std::string file = MakeLora("weighted.safetensors", 3);
  ASSERT_TRUE(a_->Load("soft", file, false, /*default_weight=*/0.25).ok());
  auto d = a_->sync->store().Read("default", "soft");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->default_weight, 0.25);
  const InstancePtr inst = b_->instance();
  ASSERT_TRUE(b_->sync->EnsureLoaded(inst, {"soft"}).ok());
  auto info = inst->host->Info("soft");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->default_weight, 0.25);
  auto stack = inst->host->Snapshot({AdapterRequest{"soft", std::nullopt}});
  ASSERT_TRUE(stack.ok()) << stack.status();
  ASSERT_EQ((*stack)->adapters.size(), 1u);
  EXPECT_EQ((*stack)->adapters[0].weight, 0.25);
  auto explicit_stack = inst->host->Snapshot({AdapterRequest{"soft", 2.0}});
  ASSERT_TRUE(explicit_stack.ok());
  EXPECT_EQ((*explicit_stack)->adapters[0].weight, 2.0);
  // A non-finite default weight is refused before anything is loaded or published.
  EXPECT_TRUE(absl::IsInvalidArgument(a_->Load("nan", file, false, std::nan(""))));
  EXPECT_FALSE(a_->sync->store().Read("default", "nan").ok());
}

TEST_F(AdapterStoreTest, CorruptEntriesAreDataLossAndNeverServed) {
  const std::string file = MakeLora("one.safetensors", 1);
  ASSERT_TRUE(a_->Load("style", file, false).ok());
  const std::string blob = BlobPath("style");
  const std::string good = test::ReadFileBytes(blob);
  const std::string shown = absl::StrCat("default.d/", fs::path(blob).filename().string());

  // One flipped byte in the tensor data (the end of the file): the digest no longer matches.
  std::string flipped = good;
  flipped.back() = static_cast<char>(flipped.back() ^ 0x5a);
  std::ofstream(blob, std::ios::binary | std::ios::trunc) << flipped;
  absl::Status s = b_->sync->EnsureLoaded(b_->instance(), {"style"});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(shown));
  EXPECT_THAT(std::string(s.message()), HasSubstr("sha256"));
  EXPECT_EQ(b_->Digest("style"), "") << "a corrupt adapter must not be inserted";

  // Truncated.
  std::ofstream(blob, std::ios::binary | std::ios::trunc) << good.substr(0, good.size() / 2);
  s = b_->sync->EnsureLoaded(b_->instance(), {"style"});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("bytes"));
  EXPECT_EQ(b_->Digest("style"), "");

  // Missing file behind a descriptor.
  fs::remove(blob);
  s = b_->sync->EnsureLoaded(b_->instance(), {"style"});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(shown));

  // A garbled descriptor.
  std::ofstream(blob, std::ios::binary) << good;
  const std::string descriptor = root_ + "/v1/default.d/style.adapter.json";
  std::ofstream(descriptor, std::ios::trunc) << "{\"version\": 1, \"name\": ";
  s = b_->sync->EnsureLoaded(b_->instance(), {"style"});
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("default.d/style.adapter.json"));
  EXPECT_EQ(b_->Digest("style"), "");
}

TEST_F(AdapterStoreTest, ReplacementAndRemovalReachOtherReplicasOnTheNextPass) {
  const std::string v1 = MakeLora("v1.safetensors", 1);
  const std::string v2 = MakeLora("v2.safetensors", 2);
  ASSERT_TRUE(a_->Load("style", v1, false).ok());
  ASSERT_TRUE(b_->sync->EnsureLoaded(b_->instance(), {"style"}).ok());
  const std::string d1 = b_->Digest("style");
  const std::string old_blob = BlobPath("style");

  // Replace on A: the store changes before Load returns; B follows at its next pass.
  ASSERT_TRUE(a_->Load("style", v2, true).ok());
  const std::string d2 = a_->Digest("style");
  ASSERT_NE(d1, d2);
  EXPECT_FALSE(fs::exists(old_blob)) << "the replaced file is deleted";
  // A request on B that took its snapshot before the pass keeps the old adapter.
  auto before = b_->instance()->host->Snapshot({{"style", 1.0}});
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(b_->Digest("style"), d1);
  b_->sync->SyncOnce();
  EXPECT_EQ(b_->Digest("style"), d2);
  EXPECT_EQ((*before)->adapters[0].adapter->sha256, d1);

  // Not in the store on this replica's own terms: a locally loaded adapter without a descriptor
  // is left alone by the pass.
  ASSERT_TRUE(b_->instance()->host->Load("local-only", v1).ok());
  b_->sync->SyncOnce();
  EXPECT_EQ(b_->Digest("local-only"), d1);

  // Remove on A: B drops it at the next pass (the running snapshot still holds it).
  {
    auto entry = a_->sync->Lock("default", "style");
    ASSERT_TRUE(a_->instance()->host->Unload("style").ok());
    ASSERT_TRUE(a_->sync->Removed("default", "style").ok());
  }
  EXPECT_FALSE(a_->sync->store().Read("default", "style").ok());
  EXPECT_TRUE(fs::is_empty(root_ + "/v1/default.d") ||
              !fs::exists(root_ + "/v1/default.d/style.adapter.json"));
  b_->sync->SyncOnce();
  EXPECT_EQ(b_->Digest("style"), "");
  EXPECT_EQ(b_->Digest("local-only"), d1);
  EXPECT_TRUE(absl::IsNotFound(a_->sync->Removed("default", "style")));
}

TEST_F(AdapterStoreTest, NoReplaceRaceHasOneWinner) {
  const std::string v1 = MakeLora("v1.safetensors", 1);
  const std::string v2 = MakeLora("v2.safetensors", 2);
  ASSERT_TRUE(a_->Load("style", v1, false).ok());
  // B has no local copy, but the store has the name: without replace it is ALREADY_EXISTS, and
  // B does not keep its local load.
  absl::Status s = b_->Load("style", v2, false);
  EXPECT_TRUE(absl::IsAlreadyExists(s)) << s;
  EXPECT_EQ(b_->Digest("style"), "");
  auto d = a_->sync->store().Read("default", "style");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->sha256, a_->Digest("style"));
}

TEST_F(AdapterStoreTest, SweepDeletesOnlyOldOrphans) {
  const std::string v1 = MakeLora("v1.safetensors", 1);
  ASSERT_TRUE(a_->Load("style", v1, false).ok());
  const std::string dir = root_ + "/v1/default.d";
  std::ofstream(dir + "/style.0000.safetensors") << "orphan";
  std::ofstream(dir + "/.tmp-123-abc") << "partial";
  EXPECT_EQ(a_->sync->store().Sweep("default", absl::Hours(1)), 0) << "too young";
  EXPECT_EQ(a_->sync->store().Sweep("default", absl::ZeroDuration()), 2);
  EXPECT_TRUE(fs::exists(BlobPath("style")));
  EXPECT_TRUE(b_->sync->EnsureLoaded(b_->instance(), {"style"}).ok());
}

TEST(AdapterStoreOpenTest, RefusesMissingFolder) {
  TempDir tmp;
  auto store = AdapterStore::Open(tmp.File("absent"));
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(store.status().message()), HasSubstr("absent"));
  EXPECT_EQ(AdapterStore::Open("").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds::server
