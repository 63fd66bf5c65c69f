#include "handlers/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/mapping_guard.h"
#include "handlers/status.h"

namespace ds {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data are little-endian; views need a little-endian host");

// A private (copy-on-write), writable mapping of a whole file. Writes through it never reach the
// file. Immutable after Map(); unmapped on destruction.
class MappedFile {
 public:
  static absl::StatusOr<std::shared_ptr<MappedFile>> Map(const std::string& path);

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    guard_.reset();  // unregistered before the pages go
    if (addr_ != nullptr) munmap(addr_, size_);
  }

  char* data() const { return static_cast<char*>(addr_); }
  std::size_t size() const { return size_; }
  const std::string& identity() const { return identity_; }
  const MappingHealth& health() const { return *health_; }
  std::string identity_;  // see SafetensorsFile::identity()

 private:
  MappedFile(void* addr, std::size_t size) : addr_(addr), size_(size) {}

  void* addr_;
  std::size_t size_;
  std::shared_ptr<MappingHealth> health_ = std::make_shared<MappingHealth>();
  std::unique_ptr<MappingGuard> guard_;  // SIGBUS recovery for the mapping (mapping_guard.h)
};

namespace {

using safetensors::DType;
using safetensors::TensorInfo;

std::string ErrnoText(int err) {
  char buf[256];
  return strerror_r(err, buf, sizeof(buf));  // GNU variant: returns the message
}

// Closes a file descriptor on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  ~FdCloser() {
    if (fd_ >= 0) close(fd_);
  }
  // Closes now and reports the result (close can report deferred write errors).
  int Release() {
    int rc = close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

std::optional<torch::ScalarType> NativeType(DType dtype) {
  switch (dtype) {
    case DType::kF64:
      return torch::kFloat64;
    case DType::kF32:
      return torch::kFloat32;
    case DType::kF16:
      return torch::kFloat16;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kI64:
      return torch::kInt64;
    case DType::kI32:
      return torch::kInt32;
    case DType::kI16:
      return torch::kInt16;
    case DType::kI8:
      return torch::kInt8;
    case DType::kU8:
      return torch::kUInt8;
    case DType::kBool:
      return torch::kBool;
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      return std::nullopt;
  }
  return std::nullopt;
}

std::optional<DType> FileType(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat64:
      return DType::kF64;
    case torch::kFloat32:
      return DType::kF32;
    case torch::kFloat16:
      return DType::kF16;
    case torch::kBFloat16:
      return DType::kBF16;
    case torch::kInt64:
      return DType::kI64;
    case torch::kInt32:
      return DType::kI32;
    case torch::kInt16:
      return DType::kI16;
    case torch::kInt8:
      return DType::kI8;
    case torch::kUInt8:
      return DType::kU8;
    case torch::kBool:
      return DType::kBool;
    default:
      return std::nullopt;
  }
}

using F8Table = std::array<float, 256>;

const F8Table& DecodeTable(DType dtype) {
  static const F8Table e4m3 = [] {
    F8Table t;
    for (int i = 0; i < 256; ++i) t[i] = safetensors::F8E4M3ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  static const F8Table e5m2 = [] {
    F8Table t;
    for (int i = 0; i < 256; ++i) t[i] = safetensors::F8E5M2ToFloat(static_cast<uint8_t>(i));
    return t;
  }();
  return dtype == DType::kF8E4M3 ? e4m3 : e5m2;
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat("file '", path, "' not found"));
    }
    return absl::InternalError(absl::StrCat("cannot open '", path, "': ", ErrnoText(err)));
  }
  FdCloser closer(fd);
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return absl::InternalError(absl::StrCat("cannot read '", path, "': ", ErrnoText(errno)));
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

absl::Status WriteAll(int fd, const char* data, std::size_t size, const std::string& path) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return absl::InternalError(absl::StrCat("cannot write '", path, "': ", ErrnoText(errno)));
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
  return absl::OkStatus();
}

// Writes header + tensor bytes to `tmp` and syncs it. The caller removes `tmp` on failure.
absl::Status WriteAndSync(const std::string& tmp, const std::string& header,
                          const std::vector<torch::Tensor>& tensors) {
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot create '", tmp, "': ", ErrnoText(errno)));
  }
  FdCloser closer(fd);
  RETURN_IF_ERROR(WriteAll(fd, header.data(), header.size(), tmp));
  for (const torch::Tensor& t : tensors) {
    const std::size_t bytes = t.nbytes();
    if (bytes == 0) continue;
    RETURN_IF_ERROR(WriteAll(fd, static_cast<const char*>(t.data_ptr()), bytes, tmp));
  }
  if (fsync(fd) != 0) {
    return absl::InternalError(absl::StrCat("cannot fsync '", tmp, "': ", ErrnoText(errno)));
  }
  if (closer.Release() != 0) {
    return absl::InternalError(absl::StrCat("cannot close '", tmp, "': ", ErrnoText(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<MappedFile>> MappedFile::Map(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat("safetensors file '", path, "' not found"));
    }
    return absl::InternalError(
        absl::StrCat("cannot open safetensors file '", path, "': ", ErrnoText(err)));
  }
  FdCloser closer(fd);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat '", path, "': ", ErrnoText(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file '", path, "' is not a regular file"));
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  const std::string identity =
      absl::StrCat(st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                   st.st_mtim.tv_nsec, ":", st.st_ctim.tv_sec, ".", st.st_ctim.tv_nsec);
  if (size == 0) {
    std::shared_ptr<MappedFile> empty(new MappedFile(nullptr, 0));
    empty->identity_ = identity;
    RETURN_IF_ERROR(FillMappingHealth(fd, path, *empty->health_));
    empty->guard_ = std::make_unique<MappingGuard>(nullptr, 0, empty->health_);
    return empty;
  }
  // MAP_PRIVATE + PROT_WRITE: views are writable, writes are copy-on-write and never reach the
  // file. MAP_NORESERVE: untouched pages need no swap reservation.
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  if (addr == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap '", path, "': ", ErrnoText(errno)));
  }
  std::shared_ptr<MappedFile> mapped(new MappedFile(addr, size));
  mapped->identity_ = identity;
  RETURN_IF_ERROR(FillMappingHealth(fd, path, *mapped->health_));
  mapped->guard_ = std::make_unique<MappingGuard>(addr, size, mapped->health_);
  return mapped;
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> mapping, MappedFile::Map(path));
  ASSIGN_OR_RETURN(safetensors::Header header,
                   safetensors::ParseHeader(std::string_view(mapping->data(), mapping->size()),
                                            mapping->size(), path));
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->mapping_ = std::move(mapping);
  file->header_ = std::move(header);
  for (std::size_t i = 0; i < file->header_.tensors.size(); ++i) {
    file->index_.emplace(file->header_.tensors[i].name, i);
  }
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(header_.tensors.size());
  for (const TensorInfo& t : header_.tensors) out.push_back(t.name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

absl::StatusOr<const TensorInfo*> SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("safetensors file '", path_, "': no tensor '", name, "'"));
  }
  return &header_.tensors[it->second];
}

const std::string& SafetensorsFile::identity() const { return mapping_->identity(); }

absl::Status SafetensorsFile::CheckUnchanged() const { return mapping_->health().Check(); }

std::string_view SafetensorsFile::mapped_bytes() const {
  return std::string_view(mapping_->data(), mapping_->size());
}

absl::StatusOr<torch::Tensor> SafetensorsFile::Get(const std::string& name) const {
  ASSIGN_OR_RETURN(const TensorInfo* t, info(name));
  const std::string context = absl::StrCat("safetensors file '", path_, "': tensor '", name, "'");
  char* data = mapping_->data() + header_.data_offset + t->begin;
  const int64_t numel = t->numel();
  const std::optional<torch::ScalarType> native = NativeType(t->dtype);

  if (!native.has_value()) {  // F8: decode to float32
    const F8Table& table = DecodeTable(t->dtype);
    return TorchCall(context, [&] {
      torch::Tensor out = torch::empty(t->shape, torch::kFloat32);
      float* dst = out.data_ptr<float>();
      const auto* src = reinterpret_cast<const uint8_t*>(data);
      for (int64_t i = 0; i < numel; ++i) dst[i] = table[src[i]];
      return out;
    });
  }
  const auto options = torch::TensorOptions().dtype(*native);
  const std::size_t elem_size = safetensors::DTypeSize(t->dtype);
  if (numel == 0 || reinterpret_cast<uintptr_t>(data) % elem_size != 0) {
    return TorchCall(context, [&] {
      torch::Tensor out = torch::empty(t->shape, options);
      if (numel > 0) std::memcpy(out.data_ptr(), data, t->end - t->begin);
      return out;
    });
  }
  // The deleter owns a reference to the mapping: the mapping lives as long as any view.
  return TorchCall(context, [&] {
    return torch::from_blob(
        data, t->shape, [keep = mapping_](void*) {}, options);
  });
}

absl::StatusOr<TensorMap> SafetensorsFile::GetAll() const {
  TensorMap out;
  for (const TensorInfo& t : header_.tensors) {
    ASSIGN_OR_RETURN(torch::Tensor tensor, Get(t.name));
    out.emplace(t.name, std::move(tensor));
  }
  return out;
}

absl::StatusOr<TensorMap> LoadSafetensorsWeights(const std::string& path) {
  if (!absl::EndsWith(path, ".json")) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    return file->GetAll();
  }

  const std::string where = absl::StrCat("safetensors index '", path, "'");
  auto text = ReadWholeFile(path);
  if (!text.ok()) return Annotate(text.status(), where);
  ASSIGN_OR_RETURN(auto weight_map, safetensors::ParseIndexWeightMap(*text, path));

  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards;  // shard name -> file
  for (const auto& [name, shard] : weight_map) {
    if (shards.count(shard) > 0) continue;
    auto file = SafetensorsFile::Open((dir / shard).string());
    if (!file.ok()) return Annotate(file.status(), where);
    shards.emplace(shard, *std::move(file));
  }

  std::map<std::string, std::vector<std::string>> found;  // tensor -> shards holding it
  for (const auto& [shard, file] : shards) {
    for (const TensorInfo& t : file->header().tensors) found[t.name].push_back(shard);
  }
  for (const auto& [name, holders] : found) {
    if (holders.size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name,
                                                     "' is present in several shards: '",
                                                     absl::StrJoin(holders, "', '"), "'"));
    }
    if (weight_map.count(name) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": shard '", holders.front(),
                                                     "' holds tensor '", name,
                                                     "', which the index does not list"));
    }
  }
  for (const auto& [name, shard] : weight_map) {
    auto it = found.find(name);
    if (it == found.end() || it->second.front() != shard) {
      std::string elsewhere =
          it == found.end() ? "" : absl::StrCat(" (it is in shard '", it->second.front(), "')");
      return absl::InvalidArgumentError(absl::StrCat(where, ": tensor '", name,
                                                     "' is listed in shard '", shard,
                                                     "' but absent from it", elsewhere));
    }
  }

  TensorMap out;
  for (const auto& [shard, file] : shards) {
    ASSIGN_OR_RETURN(TensorMap tensors, file->GetAll());
    out.merge(tensors);
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  const std::string where = absl::StrCat("writing safetensors file '", path, "'");
  std::vector<TensorInfo> infos;
  std::vector<torch::Tensor> cpu;
  infos.reserve(tensors.size());
  cpu.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    const std::string context = absl::StrCat(where, ": tensor '", name, "'");
    if (!tensor.defined()) return absl::InvalidArgumentError(absl::StrCat(context, ": undefined"));
    if (tensor.layout() != torch::kStrided) {
      return absl::InvalidArgumentError(absl::StrCat(context, ": not a dense (strided) tensor"));
    }
    std::optional<DType> dtype = FileType(tensor.scalar_type());
    if (!dtype.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          context, ": dtype ", c10::toString(tensor.scalar_type()), " has no safetensors type"));
    }
    ASSIGN_OR_RETURN(torch::Tensor c, TorchCall(context, [&tensor = tensor] {
                       return tensor.detach().to(torch::kCPU).contiguous();
                     }));
    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    info.shape = c.sizes().vec();
    infos.push_back(std::move(info));
    cpu.push_back(std::move(c));
  }
  // Largest elements first keeps every tensor aligned to its element size (see the header).
  std::vector<std::size_t> order(infos.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return safetensors::DTypeSize(infos[a].dtype) > safetensors::DTypeSize(infos[b].dtype);
  });
  std::vector<TensorInfo> sorted_infos;
  std::vector<torch::Tensor> sorted_cpu;
  sorted_infos.reserve(order.size());
  sorted_cpu.reserve(order.size());
  for (std::size_t i : order) {
    sorted_infos.push_back(std::move(infos[i]));
    sorted_cpu.push_back(std::move(cpu[i]));
  }
  auto header = safetensors::SerializeHeader(sorted_infos, metadata);
  if (!header.ok()) return Annotate(header.status(), where);

  static std::atomic<uint64_t> counter{0};
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid(), ".", counter++);
  absl::Status written = WriteAndSync(tmp, *header, sorted_cpu);
  if (written.ok() && rename(tmp.c_str(), path.c_str()) != 0) {
    written = absl::InternalError(
        absl::StrCat("cannot rename '", tmp, "' to '", path, "': ", ErrnoText(errno)));
  }
  if (!written.ok()) {
    unlink(tmp.c_str());
    return Annotate(written, where);
  }
  // Make the rename itself durable. Best effort: the file is already in place.
  std::string dir = std::filesystem::path(path).parent_path().string();
  int dir_fd = open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    fsync(dir_fd);
    close(dir_fd);
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, torch::Tensor>> list(tensors.begin(), tensors.end());
  return WriteSafetensors(path, list, metadata);
}

absl::Status WriteSafetensors(const std::string& path,
                              std::initializer_list<std::pair<std::string, torch::Tensor>> tensors,
                              const std::map<std::string, std::string>& metadata) {
  return WriteSafetensors(path, std::vector<std::pair<std::string, torch::Tensor>>(tensors),
                          metadata);
}

}  // namespace ds
