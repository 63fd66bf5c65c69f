// Faults of the shared adapter store (issue 10): a full disk while an adapter is written to it
// (through AdapterStore/AdapterSync in process and through the gRPC LoadLoRA of the real server
// binary, the store on a small tmpfs), and a replica killed with SIGKILL at several points of a
// LoadLoRA (the store never lists a partial adapter; what is listed loads and verifies; the
// temporary files of the dead writer are deleted when the store is opened again; the same
// LoadLoRA then succeeds). Mounting needs CAP_SYS_ADMIN: without it the tmpfs tests skip, naming
// the reason.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "handlers/digest.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "server/adapter_store.h"
#include "server/model_manager.h"
#include "testing/lora_util.h"
#include "testing/server_process.h"
#include "testing/test_util.h"

namespace ds::server {
namespace {

namespace fs = std::filesystem;
namespace pb = ::diffusion::v1;
using ::ds::test::ServerProcess;
using ::ds::test::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;

constexpr char kToken[] = "fault-store-admin-token-0123456789";

std::unique_ptr<grpc::ClientContext> AdminContext(double seconds = 60) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
  return ctx;
}

// A tmpfs of `bytes` mounted on a fresh folder; unmounted (lazily) on destruction.
class Tmpfs {
 public:
  Tmpfs(const std::string& dir, int64_t bytes) : dir_(dir) {
    fs::create_directories(dir_);
    const std::string options = absl::StrCat("size=", bytes, ",mode=0755");
    if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      error_ = absl::StrCat("mount -t tmpfs -o ", options, " ", dir_, ": ", std::strerror(errno));
      return;
    }
    mounted_ = true;
  }
  ~Tmpfs() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  Tmpfs(const Tmpfs&) = delete;
  Tmpfs& operator=(const Tmpfs&) = delete;

  bool ok() const { return mounted_; }
  const std::string& error() const { return error_; }
  const std::string& dir() const { return dir_; }
  // Bytes an unprivileged writer may still allocate.
  int64_t FreeBytes() const {
    struct statvfs st;
    if (::statvfs(dir_.c_str(), &st) != 0) return -1;
    return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
  }

 private:
  std::string dir_;
  std::string error_;
  bool mounted_ = false;
};

// The names in `dir` (none when it does not exist), sorted.
std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

int CountTemps(const std::vector<std::string>& names) {
  return static_cast<int>(std::count_if(names.begin(), names.end(), [](const std::string& n) {
    return absl::StartsWith(n, ".tmp-");
  }));
}

// Writes `bytes` zero bytes to `path`; false when the filesystem refused.
bool WriteFiller(const std::string& path, int64_t bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const std::string chunk(4096, '\0');
  for (int64_t done = 0; done < bytes; done += static_cast<int64_t>(chunk.size())) {
    out.write(chunk.data(),
              static_cast<std::streamsize>(std::min<int64_t>(bytes - done, chunk.size())));
  }
  out.close();
  return static_cast<bool>(out);
}

std::string Host() {
  char buf[256] = {};
  ::gethostname(buf, sizeof(buf) - 1);
  return buf;
}

// One replica in process: a ModelManager with the embedded "default" and its AdapterSync.
struct Replica {
  explicit Replica(const std::string& root) {
    models = std::make_shared<ModelManager>();
    auto loaded = models->LoadEmbedded("default");
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    auto store = AdapterStore::Open(root);
    EXPECT_TRUE(store.ok()) << store.status();
    if (store.ok()) {
      sync =
          std::make_unique<AdapterSync>(*std::move(store), models, AdapterSyncOptions{}, nullptr);
    }
  }
  InstancePtr instance() const { return *models->Get("default"); }
  std::vector<std::string> Held() const {
    std::vector<std::string> out;
    for (const AdapterInfo& a : instance()->host->List()) out.push_back(a.name);
    std::sort(out.begin(), out.end());
    return out;
  }
  // LoadLoRA as the service does it: the local load, then the store half; a failed store half
  // unloads the local copy again.
  absl::Status Load(const std::string& name, const std::string& file) {
    auto entry = sync->Lock("default", name);
    InstancePtr inst = instance();
    absl::StatusOr<AdapterLoadResult> r = inst->host->Load(name, file, AdapterLoadOptions{});
    if (!r.ok()) return r.status();
    absl::StatusOr<AdapterInfo> info = inst->host->Info(name);
    if (!info.ok()) return info.status();
    absl::StatusOr<AdapterDescriptor> d = sync->Published(*inst, *info, file, false, false, false);
    if (!d.ok()) {
      (void)inst->host->Unload(name);
      return d.status();
    }
    return absl::OkStatus();
  }

  std::shared_ptr<ModelManager> models;
  std::unique_ptr<AdapterSync> sync;
};

class FaultStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    ModelManager local;
    auto loaded = local.LoadEmbedded("default");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    params_ = NamedTensors(loaded->instance->model().module());
    modules_ = test::LinearModules(params_);
    token_file_ = tmp_.File("token");
    std::ofstream(token_file_) << kToken << "\n";
  }

  // A diffusers LoRA for the embedded model of about `bytes` bytes (float32).
  std::string MakeLora(const std::string& file_name, int64_t bytes, uint64_t seed) {
    const std::string path = tmp_.File(file_name);
    const int64_t rank = test::RankForBytes(params_, modules_, bytes);
    EXPECT_TRUE(
        WriteSafetensors(path, test::MakeDiffusersLora(params_, modules_, rank, seed)).ok());
    return path;
  }
  static std::string Digest(const std::string& path) {
    auto d = Sha256File(path);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : "";
  }

  std::unique_ptr<ServerProcess> StartServer(const std::string& store,
                                             std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {absl::StrCat("--adapter_store=", store),
                                     absl::StrCat("--admin_token_file=", token_file_)};
    args.insert(args.end(), extra.begin(), extra.end());
    auto server = std::make_unique<ServerProcess>(args);
    EXPECT_TRUE(server->ok()) << server->Stderr();
    return server;
  }

  static grpc::Status LoadInline(pb::DiffusionService::Stub& stub, const std::string& name,
                                 const std::string& file, bool replace = false) {
    pb::LoadLoRARequest req;
    req.set_model("default");
    req.set_name(name);
    req.set_inline_bytes(test::ReadFileBytes(file));
    req.set_replace(replace);
    pb::LoadLoRAResponse resp;
    return stub.LoadLoRA(AdminContext().get(), req, &resp);
  }
  static pb::ListLoRAsResponse ListLoRAs(pb::DiffusionService::Stub& stub) {
    pb::ListLoRAsRequest req;
    req.set_model("default");
    pb::ListLoRAsResponse resp;
    const grpc::Status s = stub.ListLoRAs(AdminContext().get(), req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }
  static std::vector<std::string> Names(const google::protobuf::RepeatedPtrField<pb::LoRAInfo>& a) {
    std::vector<std::string> out;
    for (const pb::LoRAInfo& i : a) out.push_back(i.name());
    std::sort(out.begin(), out.end());
    return out;
  }
  static std::vector<std::string> Names(
      const google::protobuf::RepeatedPtrField<pb::StoredAdapter>& a) {
    std::vector<std::string> out;
    for (const pb::StoredAdapter& i : a) out.push_back(i.name());
    std::sort(out.begin(), out.end());
    return out;
  }

  TempDir tmp_;
  TensorMap params_;
  std::vector<std::string> modules_;
  std::string token_file_;
};

// ------------------------------------------------------------------------------------------------
// A full disk.

TEST_F(FaultStoreTest, FullDiskPublishIsResourceExhaustedAndLeavesNothing) {
  Tmpfs disk(tmp_.File("disk"), 256 << 10);
  if (!disk.ok()) GTEST_SKIP() << "cannot mount a tmpfs here: " << disk.error();
  const std::string root = disk.dir() + "/store";
  fs::create_directories(root);
  const std::string small = MakeLora("small.safetensors", 16 << 10, 1);
  const std::string big = MakeLora("big.safetensors", 96 << 10, 2);
  const int64_t big_bytes = static_cast<int64_t>(fs::file_size(big));

  Replica a(root);
  ASSERT_NE(a.sync, nullptr);
  ASSERT_TRUE(a.Load("small", small).ok());
  const std::string dir = root + "/v1/default.d";
  const std::vector<std::string> before = ListDir(dir);
  const std::vector<std::string> held_before = a.Held();
  ASSERT_EQ(held_before, std::vector<std::string>{"small"});

  // Leave half the big adapter's size free.
  const std::string filler = disk.dir() + "/filler";
  const int64_t free_bytes = disk.FreeBytes();
  ASSERT_GT(free_bytes, big_bytes / 2);
  WriteFiller(filler, free_bytes - big_bytes / 2);
  ASSERT_LT(disk.FreeBytes(), big_bytes);

  const absl::Status full = a.Load("big", big);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  const std::string shown = absl::StrCat("default.d/big.", Digest(big), ".safetensors");
  EXPECT_THAT(std::string(full.message()), HasSubstr(shown));
  EXPECT_THAT(std::string(full.message()), Not(HasSubstr(disk.dir())));
  // No temporary or partial file; the folder is as it was; the model holds what it held.
  EXPECT_EQ(ListDir(dir), before);
  EXPECT_EQ(a.Held(), held_before);
  EXPECT_TRUE(absl::IsNotFound(a.sync->store().Read("default", "big").status()));

  // The existing adapter stays readable: listed, verified, and loadable by another replica.
  auto listing = a.sync->store().List("default");
  ASSERT_TRUE(listing.ok()) << listing.status();
  EXPECT_EQ(listing->adapters.size(), 1u);
  EXPECT_TRUE(listing->bad.empty());
  ASSERT_EQ(listing->adapters.count("small"), 1u);
  EXPECT_TRUE(a.sync->store().VerifiedBlob(listing->adapters.at("small")).ok());
  Replica b(root);
  ASSERT_NE(b.sync, nullptr);
  const absl::Status ensured = b.sync->EnsureLoaded(b.instance(), {"small"});
  EXPECT_TRUE(ensured.ok()) << ensured;
  EXPECT_EQ(b.Held(), std::vector<std::string>{"small"});

  // Space freed: the same load succeeds, and the entry verifies.
  ASSERT_TRUE(fs::remove(filler));
  const absl::Status again = a.Load("big", big);
  ASSERT_TRUE(again.ok()) << again;
  auto d = a.sync->store().Read("default", "big");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->sha256, Digest(big));
  EXPECT_TRUE(a.sync->store().VerifiedBlob(*d).ok());
  EXPECT_EQ(a.Held(), (std::vector<std::string>{"big", "small"}));
  EXPECT_EQ(CountTemps(ListDir(dir)), 0);
}

TEST_F(FaultStoreTest, FullDiskLoadLoRAOverGrpcIsResourceExhausted) {
  Tmpfs disk(tmp_.File("disk"), 256 << 10);
  if (!disk.ok()) GTEST_SKIP() << "cannot mount a tmpfs here: " << disk.error();
  const std::string root = disk.dir() + "/store";
  fs::create_directories(root);
  const std::string small = MakeLora("small.safetensors", 16 << 10, 3);
  const std::string big = MakeLora("big.safetensors", 96 << 10, 4);
  const int64_t big_bytes = static_cast<int64_t>(fs::file_size(big));

  std::unique_ptr<ServerProcess> server = StartServer(root);
  ASSERT_TRUE(server->ok());
  auto stub = server->Stub();
  const grpc::Status loaded = LoadInline(*stub, "small", small);
  ASSERT_TRUE(loaded.ok()) << loaded.error_message();
  const std::string dir = root + "/v1/default.d";
  const std::vector<std::string> before = ListDir(dir);

  const std::string filler = disk.dir() + "/filler";
  const int64_t free_bytes = disk.FreeBytes();
  ASSERT_GT(free_bytes, big_bytes / 2);
  WriteFiller(filler, free_bytes - big_bytes / 2);
  ASSERT_LT(disk.FreeBytes(), big_bytes);

  const grpc::Status full = LoadInline(*stub, "big", big);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << full.error_message();
  EXPECT_THAT(full.error_message(), HasSubstr("adapter store"));
  EXPECT_THAT(full.error_message(),
              HasSubstr(absl::StrCat("default.d/big.", Digest(big), ".safetensors")));
  EXPECT_THAT(full.error_message(), Not(HasSubstr(disk.dir())));  // no server-side path
  EXPECT_EQ(ListDir(dir), before);
  pb::ListLoRAsResponse listed = ListLoRAs(*stub);
  EXPECT_EQ(Names(listed.adapters()), std::vector<std::string>{"small"});
  EXPECT_EQ(Names(listed.stored()), std::vector<std::string>{"small"});

  // The existing adapter is still readable from the store (a fresh replica on the same folder).
  {
    Replica fresh(root);
    ASSERT_NE(fresh.sync, nullptr);
    const absl::Status ensured = fresh.sync->EnsureLoaded(fresh.instance(), {"small"});
    EXPECT_TRUE(ensured.ok()) << ensured;
  }

  ASSERT_TRUE(fs::remove(filler));
  const grpc::Status again = LoadInline(*stub, "big", big);
  ASSERT_TRUE(again.ok()) << again.error_message();
  listed = ListLoRAs(*stub);
  EXPECT_EQ(Names(listed.adapters()), (std::vector<std::string>{"big", "small"}));
  EXPECT_EQ(Names(listed.stored()), (std::vector<std::string>{"big", "small"}));
  EXPECT_EQ(CountTemps(ListDir(dir)), 0);
}

// ------------------------------------------------------------------------------------------------
// Temporary files of dead writers.

TEST_F(FaultStoreTest, OpenDeletesTemporaryFilesOfDeadWritersOnThisHostOnly) {
  const std::string root = tmp_.File("store");
  const std::string dir = root + "/v1/default.d";
  fs::create_directories(dir);
  // A process id that is certainly gone: a child that exited and was reaped.
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  const std::string host = Host();
  ASSERT_FALSE(host.empty());
  const std::string hex = "0123456789abcdef";
  const std::string dead = absl::StrCat(".tmp-", host, "-", child, "-", hex);
  const std::string dead_fresh = absl::StrCat(".tmp-", host, "-", child, "-fedcba9876543210");
  const std::string live = absl::StrCat(".tmp-", host, "-", ::getppid(), "-", hex);
  const std::string other_host = absl::StrCat(".tmp-", host, "x.other-", child, "-", hex);
  const std::string mine_old = absl::StrCat(".tmp-", host, "-", ::getpid(), "-", hex);
  const std::string mine_new = absl::StrCat(".tmp-", host, "-", ::getpid(), "-fedcba9876543210");
  const std::string legacy = absl::StrCat(".tmp-", child, "-", hex);  // no host: unknown writer
  // Files "old" were last written an hour ago, before this process started; the others now (a
  // writer that may share the host name from another pid namespace).
  const timespec an_hour_ago[2] = {{::time(nullptr) - 3600, 0}, {::time(nullptr) - 3600, 0}};
  for (const std::string& name : {dead, dead_fresh, live, other_host, mine_old, mine_new, legacy}) {
    const std::string path = dir + "/" + name;
    std::ofstream(path) << "partial";
    if (name != dead_fresh && name != mine_new) {
      ASSERT_EQ(::utimensat(AT_FDCWD, path.c_str(), an_hour_ago, 0), 0) << path;
    }
  }

  auto store = AdapterStore::Open(root);
  ASSERT_TRUE(store.ok()) << store.status();
  std::vector<std::string> expected = {dead_fresh, live, other_host, mine_new, legacy};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(ListDir(dir), expected);
  // The listing never shows temporary files, whoever wrote them.
  auto listing = (*store)->List("default");
  ASSERT_TRUE(listing.ok());
  EXPECT_TRUE(listing->adapters.empty());
  EXPECT_TRUE(listing->bad.empty());
  // What remains is Sweep's, by age.
  EXPECT_EQ((*store)->Sweep("default", absl::ZeroDuration()), 5);
  EXPECT_TRUE(ListDir(dir).empty());
}

// ------------------------------------------------------------------------------------------------
// SIGKILL mid-LoadLoRA.

TEST_F(FaultStoreTest, SigkillMidLoadLoRALeavesNoPartialAdapter) {
  const std::string store = tmp_.File("store");
  const std::string adapters = tmp_.File("adapters");
  fs::create_directories(store);
  fs::create_directories(adapters);
  // Several MB, so that the load (parse, hash, copy, fsync) takes measurable time.
  const std::string big = MakeLora("adapters/big.safetensors", 8 << 20, 5);
  const std::string sha = Digest(big);
  const int64_t big_bytes = static_cast<int64_t>(fs::file_size(big));
  const std::vector<std::string> server_args = {absl::StrCat("--adapter_root=", adapters)};
  auto load = [&](pb::DiffusionService::Stub& stub, const std::string& name, bool replace) {
    pb::LoadLoRARequest req;
    req.set_model("default");
    req.set_name(name);
    req.set_path("big.safetensors");
    req.set_replace(replace);
    pb::LoadLoRAResponse resp;
    return stub.LoadLoRA(AdminContext().get(), req, &resp);
  };
  const std::string dir = store + "/v1/default.d";

  // How long one LoadLoRA takes, request to answer.
  double load_s = 0;
  {
    std::unique_ptr<ServerProcess> server = StartServer(store, server_args);
    ASSERT_TRUE(server->ok());
    auto stub = server->Stub();
    const auto start = Clock::now();
    const grpc::Status s = load(*stub, "probe", false);
    load_s = std::chrono::duration<double>(Clock::now() - start).count();
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  std::cout << "[ measure  ] LoadLoRA of " << big_bytes << " bytes: " << load_s * 1000 << " ms\n";

  constexpr int kIterations = 10;
  std::set<std::string> acknowledged;  // LoadLoRA answered OK before the kill
  int temps_found = 0, orphans_found = 0, listed_after_kill = 0;
  for (int i = 0; i < kIterations; ++i) {
    const std::string name = absl::StrCat("big-", i);
    const double delay_s = load_s * i / (kIterations - 1);
    grpc::Status status;
    {
      std::unique_ptr<ServerProcess> server = StartServer(store, server_args);
      ASSERT_TRUE(server->ok());
      auto stub = server->Stub();
      std::thread call([&] { status = load(*stub, name, false); });
      std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(delay_s * 1e6)));
      server->Signal(SIGKILL);
      call.join();
    }  // reaped
    if (status.ok()) acknowledged.insert(name);
    // What the killed writer left, before anything opens the store again.
    const std::vector<std::string> files = ListDir(dir);
    const int temps = CountTemps(files);
    const bool described =
        std::find(files.begin(), files.end(), name + ".adapter.json") != files.end();
    const bool blob = std::find(files.begin(), files.end(),
                                absl::StrCat(name, ".", sha, ".safetensors")) != files.end();
    temps_found += temps;
    orphans_found += (blob && !described) ? 1 : 0;
    listed_after_kill += described ? 1 : 0;
    std::cout << "[ kill     ] " << name << " after " << delay_s * 1000 << " ms: rpc "
              << (status.ok() ? "OK" : absl::StrCat("code ", status.error_code())) << ", "
              << (described ? "listed" : "not listed") << ", blob " << (blob ? "yes" : "no")
              << ", temporary files " << temps << "\n";
    // An answered LoadLoRA is in the store.
    if (status.ok()) {
      EXPECT_TRUE(described) << name;
    }
    // A descriptor only ever names a complete adapter file.
    if (described) {
      EXPECT_TRUE(blob) << name;
    }
  }
  std::cout << "[ summary  ] " << kIterations << " kills: " << acknowledged.size() << " answered, "
            << listed_after_kill << " listed, " << orphans_found << " unnamed complete blobs, "
            << temps_found << " temporary files left\n";

  // A fresh server (a restarted replica) opens the store: the temporary files of the dead
  // writers are deleted. Every listed adapter verifies and loads, and nothing partial is listed.
  std::unique_ptr<ServerProcess> server = StartServer(store, server_args);
  ASSERT_TRUE(server->ok());
  EXPECT_EQ(CountTemps(ListDir(dir)), 0) << absl::StrJoin(ListDir(dir), ", ");
  {
    Replica fresh(store);
    ASSERT_NE(fresh.sync, nullptr);
    auto listing = fresh.sync->store().List("default");
    ASSERT_TRUE(listing.ok()) << listing.status();
    EXPECT_TRUE(listing->bad.empty());
    EXPECT_EQ(listing->adapters.count("probe"), 1u);
    EXPECT_EQ(static_cast<int>(listing->adapters.size()), listed_after_kill + 1);
    std::vector<std::string> names;
    for (const auto& [name, d] : listing->adapters) {
      EXPECT_EQ(d.sha256, sha) << name;
      EXPECT_EQ(d.file_bytes, big_bytes) << name;
      const absl::StatusOr<std::string> verified = fresh.sync->store().VerifiedBlob(d);
      EXPECT_TRUE(verified.ok()) << name << ": " << verified.status();
      names.push_back(name);
    }
    for (const std::string& name : acknowledged) EXPECT_EQ(listing->adapters.count(name), 1u);
    const absl::Status ensured = fresh.sync->EnsureLoaded(fresh.instance(), names);
    EXPECT_TRUE(ensured.ok()) << ensured;
    for (const std::string& name : names) {
      auto info = fresh.instance()->host->Info(name);
      ASSERT_TRUE(info.ok()) << name << ": " << info.status();
      EXPECT_EQ(info->sha256, sha) << name;
    }
  }

  // The server lists the same adapters, and every LoadLoRA of the test now succeeds (a listed
  // one is ALREADY_EXISTS without replace and replaced with it).
  auto stub = server->Stub();
  const std::vector<std::string> stored = Names(ListLoRAs(*stub).stored());
  for (int i = 0; i < kIterations; ++i) {
    const std::string name = absl::StrCat("big-", i);
    const bool listed = std::find(stored.begin(), stored.end(), name) != stored.end();
    const grpc::Status first = load(*stub, name, false);
    if (listed) {
      EXPECT_EQ(first.error_code(), grpc::StatusCode::ALREADY_EXISTS) << name;
      const grpc::Status replaced = load(*stub, name, true);
      EXPECT_TRUE(replaced.ok()) << name << ": " << replaced.error_message();
    } else {
      EXPECT_TRUE(first.ok()) << name << ": " << first.error_message();
    }
  }
  auto reopened = AdapterStore::Open(store);
  ASSERT_TRUE(reopened.ok());
  auto listing = (*reopened)->List("default");
  ASSERT_TRUE(listing.ok());
  EXPECT_EQ(listing->adapters.size(), static_cast<size_t>(kIterations + 1));
  for (const auto& [name, d] : listing->adapters) {
    EXPECT_TRUE((*reopened)->VerifiedBlob(d).ok()) << name;
  }
  EXPECT_EQ(CountTemps(ListDir(dir)), 0);
  // Every adapter file is named by its descriptor again (the unnamed blobs were rewritten).
  int blobs = 0;
  for (const std::string& f : ListDir(dir)) blobs += absl::EndsWith(f, ".safetensors") ? 1 : 0;
  EXPECT_EQ(blobs, kIterations + 1);
}

}  // namespace
}  // namespace ds::server
