#include "handlers/group_offloading.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <set>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

int64_t PageSize() {
  static const int64_t size = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
  return size;
}

int64_t AlignUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

// "ds::flux::FluxTransformerBlockImpl" -> "FluxTransformerBlock" (as ModuleClassName spells it).
std::string ShortClassName(const std::string& name) {
  std::string out = name;
  if (auto pos = out.rfind("::"); pos != std::string::npos) out = out.substr(pos + 2);
  constexpr absl::string_view kImpl = "Impl";
  if (out.size() > kImpl.size() &&
      out.compare(out.size() - kImpl.size(), kImpl.size(), kImpl.data()) == 0) {
    out.resize(out.size() - kImpl.size());
  }
  return out;
}

std::string DefaultOffloadDir() {
  const char* tmp = std::getenv("TMPDIR");
  return tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
}

// Reads exactly `n` bytes at `offset`; false (errno set) on failure or a short file.
bool ReadFully(int fd, char* dst, int64_t n, int64_t offset) {
  while (n > 0) {
    const ssize_t r = pread(fd, dst, static_cast<size_t>(n), offset);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      if (r == 0) errno = EIO;
      return false;
    }
    dst += r;
    n -= r;
    offset += r;
  }
  return true;
}

bool WriteFully(int fd, const char* src, int64_t n, int64_t offset) {
  while (n > 0) {
    const ssize_t w = pwrite(fd, src, static_cast<size_t>(n), offset);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = EIO;
      return false;
    }
    src += w;
    n -= w;
    offset += w;
  }
  return true;
}

// Anonymous memory of `bytes` (page-granular, returned to the system by munmap when the last
// holder releases it; unlike the heap, which may keep freed blocks). Throws c10::Error.
std::shared_ptr<char> AnonymousMemory(int64_t bytes) {
  void* p = mmap(nullptr, static_cast<size_t>(std::max<int64_t>(bytes, 1)),
                 PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "group offloading: cannot allocate ", bytes,
              " bytes to onload a group: ", std::strerror(errno));
  const size_t size = static_cast<size_t>(std::max<int64_t>(bytes, 1));
  return std::shared_ptr<char>(static_cast<char*>(p), [size](char* q) { munmap(q, size); });
}

}  // namespace

// One group file: open (unlinked) descriptor and its shared mapping, released when the last
// tensor viewing it dies.
struct GroupOffloader::FileMapping {
  int fd = -1;
  char* base = nullptr;
  int64_t size = 0;
  ~FileMapping() {
    if (base != nullptr) munmap(base, static_cast<size_t>(size));
    if (fd >= 0) close(fd);
  }
};

struct GroupOffloader::Group {
  struct Entry {
    std::string name;
    torch::Tensor param;      // shares the module's parameter (or buffer) TensorImpl
    torch::Tensor offloaded;  // the mapped (kDisk) or pinned (kCpuMemory) copy
    torch::Tensor onloaded;   // while onloaded by this group: the copy the parameter points at
    int64_t offset = 0;       // in the group's file
    int64_t nbytes = 0;
  };
  std::vector<std::string> blocks;
  std::vector<Entry> entries;
  int64_t bytes = 0;       // tensor bytes
  int64_t file_bytes = 0;  // page-aligned layout
  std::shared_ptr<FileMapping> file;
  std::mutex mu;
  int64_t users = 0;       // guarded by mu
  int64_t onload_seq = 0;  // guarded by mu; counts this group's onloads
};

// Reads group files ahead into the page cache on its own thread.
class GroupOffloader::Prefetcher {
 public:
  explicit Prefetcher(const GroupOffloader* owner) : owner_(owner), thread_([this] { Run(); }) {}
  ~Prefetcher() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  // Reads group `g` ahead for its next onload. The read-ahead is skipped when that onload has
  // already started by the time the thread gets to it (a fast forward overtook the prefetch):
  // reading the file then would only leave its pages in the page cache after the group is
  // offloaded again.
  void Request(int64_t g) {
    Group& group = *owner_->groups_[g];
    int64_t seq;
    {
      std::lock_guard group_lock(group.mu);
      if (group.users > 0) return;  // resident already
      seq = group.onload_seq;
    }
    {
      std::lock_guard lock(mu_);
      for (const auto& [queued, unused] : queue_) {
        if (queued == g) return;
      }
      queue_.emplace_back(g, seq);
    }
    cv_.notify_one();
  }
  int64_t done() const { return done_.load(); }

 private:
  void Run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      const auto [g, seq] = queue_.front();
      queue_.pop_front();
      lock.unlock();
      Group& group = *owner_->groups_[g];
      {
        // Held across the read-ahead so the onload it serves cannot start (and finish, dropping
        // the cached pages) in the middle of it.
        std::lock_guard group_lock(group.mu);
        // Best effort: a failed read-ahead only means the onload reads from disk itself.
        if (group.file != nullptr && group.users == 0 && group.onload_seq == seq &&
            readahead(group.file->fd, 0, static_cast<size_t>(group.file_bytes)) == 0) {
          ++done_;
        }
      }
      lock.lock();
    }
  }

  const GroupOffloader* owner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, int64_t>> queue_;  // (group, its onload_seq when requested)
  bool stop_ = false;
  std::atomic<int64_t> done_{0};
  std::thread thread_;  // last: starts after the members it uses exist
};

absl::StatusOr<GroupOffloadTarget> ParseGroupOffloadTarget(absl::string_view name) {
  if (name.empty() || name == "disk") return GroupOffloadTarget::kDisk;
  if (name == "cpu") return GroupOffloadTarget::kCpuMemory;
  return absl::InvalidArgumentError(absl::StrCat(
      "offload_to: unknown offload device '", std::string(name),
      "' (\"disk\": memory-mapped files, the default; \"cpu\": pinned CPU memory, CUDA only)"));
}

std::string GroupOffloadTargetName(GroupOffloadTarget target) {
  return target == GroupOffloadTarget::kDisk ? "disk" : "cpu";
}

std::string DescribeGroupOffloading(const GroupOffloadingOptions& options) {
  std::string out =
      absl::StrCat("blocks_per_group=", options.blocks_per_group,
                   " offload_to=", GroupOffloadTargetName(options.target),
                   " prefetch=", options.prefetch ? "on" : "off");
  if (options.target == GroupOffloadTarget::kDisk) {
    absl::StrAppend(&out, " offload_dir=",
                    options.offload_dir.empty() ? DefaultOffloadDir() : options.offload_dir);
  }
  return out;
}

absl::Status ValidateGroupOffloadingOptions(const GroupOffloadingOptions& options,
                                            const torch::Device& onload_device) {
  if (options.blocks_per_group < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks_per_group: must be at least 1, got ", options.blocks_per_group));
  }
  if (!onload_device.is_cpu() && !onload_device.is_cuda()) {
    return absl::UnimplementedError(absl::StrCat("group offloading: onload device ",
                                                 onload_device.str(), " is neither CPU nor CUDA"));
  }
  if (options.target == GroupOffloadTarget::kCpuMemory && onload_device.is_cpu()) {
    return absl::InvalidArgumentError(
        "offload_to: \"cpu\" (pinned CPU memory) offloads from a CUDA device; a model computing "
        "on the CPU offloads to \"disk\"");
  }
  if (options.prefetch && onload_device.is_cuda()) {
    return absl::UnimplementedError(absl::StrCat(
        "prefetch: overlapping the next group's copy to ", onload_device.str(),
        " needs a CUDA side stream, which this LibTorch build (CPU-only) cannot compile; load "
        "with prefetch off"));
  }
  if (options.target == GroupOffloadTarget::kDisk && !options.offload_dir.empty()) {
    std::error_code ec;
    if (!std::filesystem::is_directory(options.offload_dir, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "offload_dir: '", options.offload_dir, "' is not an existing directory"));
    }
  }
  return absl::OkStatus();
}

GroupOffloader::GroupOffloader(GroupOffloadingOptions options, torch::Device onload_device)
    : options_(std::move(options)), onload_device_(onload_device) {}

GroupOffloader::~GroupOffloader() {
  // Stop the read-ahead thread before the groups it reads go away.
  prefetcher_.reset();
}

absl::StatusOr<std::shared_ptr<GroupOffloader>> GroupOffloader::Apply(
    torch::nn::Module& module, const std::vector<std::string>& repeated_blocks,
    const GroupOffloadingOptions& options, const torch::Device& onload_device) {
  RETURN_IF_ERROR(ValidateGroupOffloadingOptions(options, onload_device));
  if (repeated_blocks.empty()) {
    return absl::InvalidArgumentError(
        "group offloading: the model declares no repeated block classes (_repeated_blocks)");
  }
  const std::set<std::string> classes(repeated_blocks.begin(), repeated_blocks.end());

  // The block lists, in registration order (= forward order for the models that wire this).
  struct Block {
    std::string name;
    std::shared_ptr<torch::nn::Module> module;
  };
  std::vector<std::vector<Block>> lists;
  std::function<void(torch::nn::Module&, const std::string&)> find =
      [&](torch::nn::Module& m, const std::string& prefix) {
        for (const auto& item : m.named_children()) {
          const std::string name = prefix.empty() ? item.key() : prefix + "." + item.key();
          torch::nn::Module& child = *item.value();
          const auto grandchildren = child.named_children();
          const bool is_list = ShortClassName(child.name()) == "ModuleList";
          const bool all_blocks =
              is_list && grandchildren.size() > 0 &&
              std::all_of(grandchildren.begin(), grandchildren.end(), [&](const auto& g) {
                return classes.count(ShortClassName(g.value()->name())) > 0;
              });
          if (all_blocks) {
            std::vector<Block> list;
            for (const auto& g : grandchildren) list.push_back({name + "." + g.key(), g.value()});
            lists.push_back(std::move(list));
          } else {
            find(child, name);
          }
        }
      };
  find(module, "");
  if (lists.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("group offloading: ", ShortClassName(module.name()),
                     " has no ModuleList of its repeated blocks (",
                     absl::StrJoin(repeated_blocks, ", "), ")"));
  }

  std::shared_ptr<GroupOffloader> out(new GroupOffloader(options, onload_device));
  std::unordered_set<const c10::TensorImpl*> seen;
  const int64_t page = PageSize();
  int64_t total_file_bytes = 0;
  for (const std::vector<Block>& list : lists) {
    for (size_t begin = 0; begin < list.size();
         begin += static_cast<size_t>(options.blocks_per_group)) {
      auto group = std::make_unique<Group>();
      const size_t end =
          std::min(list.size(), begin + static_cast<size_t>(options.blocks_per_group));
      for (size_t b = begin; b < end; ++b) {
        const Block& block = list[b];
        group->blocks.push_back(block.name);
        out->block_names_.push_back(block.name);
        out->block_group_.push_back(static_cast<int64_t>(out->groups_.size()));
        auto add = [&](const std::string& key, const torch::Tensor& t) {
          if (!t.defined() || t.numel() == 0 || !seen.insert(t.unsafeGetTensorImpl()).second) {
            return;
          }
          Group::Entry e;
          e.name = block.name + "." + key;
          e.param = t;
          e.nbytes = static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
          e.offset = group->file_bytes;
          group->file_bytes = AlignUp(e.offset + e.nbytes, page);
          group->bytes += e.nbytes;
          group->entries.push_back(std::move(e));
        };
        for (const auto& p : block.module->named_parameters(/*recurse=*/true)) add(p.key(), p.value());
        for (const auto& p : block.module->named_buffers(/*recurse=*/true)) add(p.key(), p.value());
      }
      total_file_bytes += group->file_bytes;
      out->groups_.push_back(std::move(group));
    }
  }

  // Build every offloaded copy before touching the module, so a failure leaves it unchanged.
  if (options.target == GroupOffloadTarget::kDisk) {
    const std::string dir = options.offload_dir.empty() ? DefaultOffloadDir() : options.offload_dir;
    auto dir_error = [&](const std::string& what) {
      const std::string msg = absl::StrCat("offload_dir: ", what);
      return options.offload_dir.empty() ? absl::InternalError(msg)
                                         : absl::InvalidArgumentError(msg);
    };
    struct statvfs vfs;
    if (statvfs(dir.c_str(), &vfs) != 0) {
      return dir_error(absl::StrCat("cannot stat '", dir, "': ", std::strerror(errno)));
    }
    const int64_t available = static_cast<int64_t>(vfs.f_bavail) * static_cast<int64_t>(vfs.f_frsize);
    if (available < total_file_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "offload_dir: '", dir, "' has ", available, " bytes free; group offloading needs ",
          total_file_bytes));
    }
    for (auto& group : out->groups_) {
      auto file = std::make_shared<FileMapping>();
      std::string path = (std::filesystem::path(dir) / "ds-group-offload-XXXXXX").string();
      file->fd = mkstemp(path.data());
      if (file->fd < 0) {
        return dir_error(absl::StrCat("cannot create a file in '", dir, "': ", std::strerror(errno)));
      }
      // Nameless from here on: the space is freed when the last mapping and descriptor go.
      unlink(path.c_str());
      auto io_error = [&](const std::string& what) {
        const int err = errno;
        const std::string msg = absl::StrCat("group offloading: ", what, " ", path, " (group of ",
                                             group->blocks.front(), "): ", std::strerror(err));
        return err == ENOSPC ? absl::ResourceExhaustedError(msg) : absl::InternalError(msg);
      };
      if (ftruncate(file->fd, group->file_bytes) != 0) return io_error("sizing");
      for (Group::Entry& e : group->entries) {
        torch::Tensor src;
        RETURN_IF_ERROR(TorchCallVoid(absl::StrCat("group offloading: reading ", e.name), [&] {
          torch::NoGradGuard no_grad;
          src = e.param.detach().to(torch::kCPU).contiguous();
        }));
        if (!WriteFully(file->fd, static_cast<const char*>(src.data_ptr()), e.nbytes, e.offset)) {
          return io_error("writing");
        }
      }
      if (fdatasync(file->fd) != 0) return io_error("syncing");
      void* base = mmap(nullptr, static_cast<size_t>(std::max<int64_t>(group->file_bytes, page)),
                        PROT_READ | PROT_WRITE, MAP_SHARED, file->fd, 0);
      if (base == MAP_FAILED) return io_error("mapping");
      file->base = static_cast<char*>(base);
      file->size = std::max<int64_t>(group->file_bytes, page);
      // The data is on disk now; the page cache copy only costs memory.
      posix_fadvise(file->fd, 0, 0, POSIX_FADV_DONTNEED);
      RETURN_IF_ERROR(TorchCallVoid("group offloading: mapping tensors", [&] {
        c10::InferenceMode normal(false);
        for (Group::Entry& e : group->entries) {
          e.offloaded = torch::from_blob(
              file->base + e.offset, e.param.sizes(), [file](void*) {},
              torch::TensorOptions().dtype(e.param.dtype()).device(torch::kCPU));
        }
      }));
      group->file = std::move(file);
    }
  } else {
    for (auto& group : out->groups_) {
      RETURN_IF_ERROR(TorchCallVoid("group offloading: pinning CPU copies", [&] {
        torch::NoGradGuard no_grad;
        c10::InferenceMode normal(false);
        for (Group::Entry& e : group->entries) {
          e.offloaded = e.param.detach().to(torch::kCPU).contiguous().pin_memory();
        }
      }));
    }
  }
  RETURN_IF_ERROR(TorchCallVoid("group offloading: offloading parameters", [&] {
    torch::NoGradGuard no_grad;
    c10::InferenceMode normal(false);
    for (auto& group : out->groups_) {
      for (Group::Entry& e : group->entries) e.param.set_data(e.offloaded);
    }
  }));
  if (options.prefetch && options.target == GroupOffloadTarget::kDisk && onload_device.is_cpu()) {
    out->prefetcher_ = std::make_unique<Prefetcher>(out.get());
  }
  return out;
}

void GroupOffloader::Onload(Group& group) const {
  c10::InferenceMode normal(false);  // the copies are ordinary tensors, like the parameters
  torch::NoGradGuard no_grad;
  auto holds_offloaded = [](const Group::Entry& e) {
    return e.param.data_ptr() == e.offloaded.data_ptr();
  };
  if (onload_device_.is_cpu()) {
    std::shared_ptr<char> memory = AnonymousMemory(group.file_bytes);
    for (Group::Entry& e : group.entries) {
      if (!holds_offloaded(e)) continue;  // replaced by an exclusive operation: left as is
      TORCH_CHECK(ReadFully(group.file->fd, memory.get() + e.offset, e.nbytes, e.offset),
                  "group offloading: reading ", e.name, " from its offload file: ",
                  std::strerror(errno));
      e.onloaded = torch::from_blob(memory.get() + e.offset, e.offloaded.sizes(),
                                    [memory](void*) {}, e.offloaded.options());
      e.param.set_data(e.onloaded);
    }
    // The bytes are in `memory` now; drop the file's cached copy.
    posix_fadvise(group.file->fd, 0, 0, POSIX_FADV_DONTNEED);
  } else {
    const bool non_blocking = options_.target == GroupOffloadTarget::kCpuMemory;
    for (Group::Entry& e : group.entries) {
      if (!holds_offloaded(e)) continue;
      e.onloaded = e.offloaded.to(onload_device_, non_blocking);
      e.param.set_data(e.onloaded);
    }
  }
}

void GroupOffloader::Offload(Group& group) const {
  c10::InferenceMode normal(false);
  torch::NoGradGuard no_grad;
  for (Group::Entry& e : group.entries) {
    if (!e.onloaded.defined()) continue;
    if (e.param.data_ptr() == e.onloaded.data_ptr()) e.param.set_data(e.offloaded);
    e.onloaded.reset();
  }
  if (group.file != nullptr) {
    // Pages of the mapping touched while offloaded (reads outside a forward) leave this process;
    // dirty ones stay with the kernel's page cache and reach the file.
    madvise(group.file->base, static_cast<size_t>(group.file->size), MADV_DONTNEED);
    posix_fadvise(group.file->fd, 0, 0, POSIX_FADV_DONTNEED);
  }
}

void GroupOffloader::Acquire(int64_t g) const {
  Group& group = *groups_[g];
  {
    std::lock_guard lock(group.mu);
    if (group.users == 0) {
      try {
        Onload(group);
      } catch (...) {
        Offload(group);  // undo the entries already onloaded
        throw;
      }
      ++group.onload_seq;
      ++onloads_;
      ++resident_groups_;
      resident_bytes_ += group.bytes;
    }
    ++group.users;
  }
  if (prefetcher_ != nullptr && g + 1 < num_groups()) prefetcher_->Request(g + 1);
}

void GroupOffloader::Release(int64_t g) const {
  Group& group = *groups_[g];
  std::lock_guard lock(group.mu);
  if (--group.users == 0) {
    Offload(group);
    ++offloads_;
    --resident_groups_;
    resident_bytes_ -= group.bytes;
  }
}

GroupOffloadingStats GroupOffloader::stats() const {
  GroupOffloadingStats s;
  s.blocks = num_blocks();
  s.groups = num_groups();
  for (const auto& g : groups_) {
    s.group_bytes.push_back(g->bytes);
    s.offloaded_bytes += g->bytes;
  }
  s.resident_groups = resident_groups_.load();
  s.resident_bytes = resident_bytes_.load();
  s.onloads = onloads_.load();
  s.offloads = offloads_.load();
  s.prefetches = prefetcher_ != nullptr ? prefetcher_->done() : 0;
  return s;
}

absl::StatusOr<int64_t> GroupOffloader::PageCacheBytes() const {
  int64_t bytes = 0;
  const int64_t page = PageSize();
  for (const auto& g : groups_) {
    if (g->file == nullptr) continue;
    std::vector<unsigned char> resident(static_cast<size_t>((g->file->size + page - 1) / page));
    if (mincore(g->file->base, static_cast<size_t>(g->file->size), resident.data()) != 0) {
      return absl::InternalError(
          absl::StrCat("group offloading: mincore failed: ", std::strerror(errno)));
    }
    for (unsigned char r : resident) bytes += (r & 1) ? page : 0;
  }
  return bytes;
}

GroupOffloadSession::~GroupOffloadSession() {
  try {
    Leave();
  } catch (const std::exception&) {
    // Offloading only points tensors back at their offloaded copies; nothing to report here.
  }
}

void GroupOffloadSession::Enter(int64_t block_index) {
  if (offloader_ == nullptr) return;
  TORCH_CHECK(block_index >= 0 && block_index < offloader_->num_blocks(),
              "group offloading: block ", block_index, " out of range (the model has ",
              offloader_->num_blocks(), " offloaded blocks)");
  const int64_t g = offloader_->group_of(block_index);
  if (g == held_) return;
  Leave();
  offloader_->Acquire(g);
  held_ = g;
}

void GroupOffloadSession::Leave() {
  if (offloader_ == nullptr || held_ < 0) return;
  const int64_t g = held_;
  held_ = -1;
  offloader_->Release(g);
}

}  // namespace ds
