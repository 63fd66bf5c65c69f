#include "server/adapter_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "handlers/digest.h"
#include "handlers/lora_format.h"
#include "handlers/safetensors.h"
#include "handlers/status.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"

namespace ds::server {
namespace {

constexpr char kLayout[] = "v1";
constexpr char kDescriptorSuffix[] = ".adapter.json";
constexpr char kTempPrefix[] = ".tmp-";
constexpr int kDescriptorVersion = 1;
// Every this many poll passes the poller also sweeps orphaned files.
constexpr int64_t kSweepEveryPasses = 60;

std::string Errno(int err) { return std::strerror(err); }

absl::Status ValidateAdapterName(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter name must have 1 to 128 characters, got ", name.size()));
  }
  for (char ch : name) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter name '", name, "' may only contain letters, digits, '.', '_', '-'"));
    }
  }
  return absl::OkStatus();
}

bool IsSha256Hex(const std::string& s) {
  if (s.size() != 64) return false;
  for (char ch : s) {
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
  }
  return true;
}

std::string BlobName(const std::string& name, const std::string& sha256) {
  return absl::StrCat(name, ".", sha256, ".safetensors");
}

std::string HostName() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "";
  return buf;
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// When this process started (static initialization, before any store file is written): a
// temporary file with this process's id but older than this was left by an earlier process that
// had the same id (a restarted container's pid 1).
const absl::Time kProcessStart = absl::Now();

// "<host>-<pid>-<16 hex digits>": temporary file names say which writer made them, so Open can
// delete those of a dead writer on this host (see RemoveDeadWritersTemps).
std::string RandomSuffix() {
  static thread_local std::mt19937_64 rng(std::random_device{}() ^ static_cast<uint64_t>(::getpid())
                                                                       << 32);
  return absl::StrCat(HostName(), "-", ::getpid(), "-", absl::Hex(rng(), absl::kZeroPad16));
}

// An I/O failure: RESOURCE_EXHAUSTED when the filesystem is full (ENOSPC, EDQUOT), else INTERNAL.
absl::Status IoError(int err, absl::string_view message) {
  const std::string text = absl::StrCat(message, ": ", Errno(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(text);
  return absl::InternalError(text);
}

// Whether the temporary file `name` (".tmp-<host>-<pid>-<hex>") in `dir` was left by a writer of
// this host that is gone: last modified before this process started, and its pid is not running
// or is this process's (an earlier process with the same pid). Files of other hosts, of live
// processes, written since this process started (a writer in another pid namespace that shares
// the host name), or of an unknown naming are not (Sweep deletes them once old).
bool WrittenByDeadWriter(const std::string& dir, const std::string& name, const std::string& host) {
  if (host.empty() || !absl::StartsWith(name, kTempPrefix)) return false;
  const std::string rest = name.substr(std::strlen(kTempPrefix));
  const size_t hex_dash = rest.rfind('-');
  if (hex_dash == std::string::npos || hex_dash == 0) return false;
  const size_t pid_dash = rest.rfind('-', hex_dash - 1);
  if (pid_dash == std::string::npos || rest.substr(0, pid_dash) != host) return false;
  const std::string pid_text = rest.substr(pid_dash + 1, hex_dash - pid_dash - 1);
  if (pid_text.empty() || pid_text.size() > 9 ||
      !std::all_of(pid_text.begin(), pid_text.end(),
                   [](char ch) { return ch >= '0' && ch <= '9'; })) {
    return false;
  }
  const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
  if (pid <= 0) return false;
  struct stat st;
  if (::lstat(absl::StrCat(dir, "/", name).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (absl::TimeFromTimespec(st.st_mtim) >= kProcessStart) return false;
  return pid == ::getpid() || (::kill(pid, 0) != 0 && errno == ESRCH);
}

// Deletes the temporary files that dead writers of this host left in every instance folder under
// `layout` (a process killed mid-publish); returns how many. Best effort.
int RemoveDeadWritersTemps(const std::string& layout) {
  const std::string host = HostName();
  DIR* top = ::opendir(layout.c_str());
  if (top == nullptr) return 0;
  std::vector<std::string> dirs;
  while (dirent* e = ::readdir(top)) {
    const std::string name = e->d_name;
    if (absl::EndsWith(name, ".d") && name != "." && name != "..") {
      dirs.push_back(absl::StrCat(layout, "/", name));
    }
  }
  ::closedir(top);
  int deleted = 0;
  for (const std::string& dir : dirs) {
    DIR* d = ::opendir(dir.c_str());
    if (d == nullptr) continue;
    std::vector<std::string> temps;
    while (dirent* e = ::readdir(d)) {
      if (WrittenByDeadWriter(dir, e->d_name, host)) temps.push_back(e->d_name);
    }
    ::closedir(d);
    for (const std::string& name : temps) {
      if (::unlink(absl::StrCat(dir, "/", name).c_str()) == 0) {
        ++deleted;
        spdlog::info("adapter store: deleted {}/{} (left by a writer that is gone)", dir, name);
      }
    }
  }
  return deleted;
}

absl::Status FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open ", dir, ": ", Errno(errno)));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some network filesystems refuse fsync on a directory; their renames are synchronous.
  if (rc != 0 && err != EINVAL && err != EROFS) {
    return absl::InternalError(absl::StrCat("cannot fsync ", dir, ": ", Errno(err)));
  }
  return absl::OkStatus();
}

// Writes `size` bytes at `data` to a new temporary file in `dir` (mode 0644), fsync'ed; returns
// its path. `shown` names the destination in errors.
absl::StatusOr<std::string> WriteTemp(const std::string& dir, const void* data, size_t size,
                                      const std::string& shown) {
  const std::string path = absl::StrCat(dir, "/", kTempPrefix, RandomSuffix());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    return IoError(errno, absl::StrCat("adapter store: cannot create a file for ", shown));
  }
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, p + done, std::min<size_t>(size - done, size_t{1} << 24));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(path.c_str());
      return IoError(n == 0 ? ENOSPC : err, absl::StrCat("adapter store: cannot write ", shown));
    }
    done += static_cast<size_t>(n);
  }
  // Both always run (an fsync failure must not leak the descriptor); the first error wins.
  const int synced = ::fsync(fd);
  const int sync_err = errno;
  const int closed = ::close(fd);
  const int close_err = errno;
  if (synced != 0 || closed != 0) {
    ::unlink(path.c_str());
    return IoError(synced != 0 ? sync_err : close_err,
                   absl::StrCat("adapter store: cannot flush ", shown));
  }
  return path;
}

// A read-only mapping of a whole file.
class Mapping {
 public:
  ~Mapping() {
    if (data_ != nullptr && data_ != MAP_FAILED) ::munmap(data_, size_);
  }
  absl::Status Open(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      const std::string msg = absl::StrCat("cannot open ", path, ": ", Errno(err));
      return err == ENOENT ? absl::NotFoundError(msg) : absl::InternalError(msg);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot stat ", path));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data_ == MAP_FAILED) {
        ::close(fd);
        return absl::InternalError(absl::StrCat("cannot map ", path, ": ", Errno(errno)));
      }
    }
    ::close(fd);
    return absl::OkStatus();
  }
  const void* data() const { return size_ > 0 ? data_ : ""; }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

nlohmann::json ToJson(const AdapterDescriptor& d) {
  return nlohmann::json{{"version", kDescriptorVersion},
                        {"instance", d.instance},
                        {"name", d.name},
                        {"sha256", d.sha256},
                        {"file_bytes", d.file_bytes},
                        {"format", d.format},
                        {"allow_partial", d.allow_partial},
                        {"pin", d.pin},
                        {"default_weight", d.default_weight},
                        {"blob", d.blob},
                        {"source", d.source},
                        {"published_by", d.published_by},
                        {"published_unix_ms", d.published_unix_ms}};
}

// Parses a descriptor file's text; DATA_LOSS naming `shown` and the field.
absl::StatusOr<AdapterDescriptor> ParseDescriptor(const std::string& text,
                                                  const std::string& instance,
                                                  const std::string& name,
                                                  const std::string& shown) {
  auto bad = [&](const std::string& why) {
    return absl::DataLossError(
        absl::StrCat("adapter store descriptor ", shown, " is corrupt: ", why));
  };
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return bad("not a JSON object (truncated or overwritten?)");
  auto str = [&](const char* key, std::string* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) return bad(absl::StrCat("'", key, "' is not a string"));
    *out = it->get<std::string>();
    return absl::OkStatus();
  };
  auto boolean = [&](const char* key, bool* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_boolean()) return bad(absl::StrCat("'", key, "' is not a bool"));
    *out = it->get<bool>();
    return absl::OkStatus();
  };
  auto integer = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) {
      return bad(absl::StrCat("'", key, "' is not an integer"));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  };
  int64_t version = 0;
  RETURN_IF_ERROR(integer("version", &version));
  if (version != kDescriptorVersion) {
    return bad(
        absl::StrCat("version ", version, ", this server reads version ", kDescriptorVersion));
  }
  AdapterDescriptor d;
  RETURN_IF_ERROR(str("instance", &d.instance));
  RETURN_IF_ERROR(str("name", &d.name));
  RETURN_IF_ERROR(str("sha256", &d.sha256));
  RETURN_IF_ERROR(integer("file_bytes", &d.file_bytes));
  RETURN_IF_ERROR(str("format", &d.format));
  RETURN_IF_ERROR(boolean("allow_partial", &d.allow_partial));
  RETURN_IF_ERROR(boolean("pin", &d.pin));
  {
    auto it = j.find("default_weight");
    if (it == j.end() || !it->is_number() || !std::isfinite(it->get<double>())) {
      return bad("'default_weight' is not a finite number");
    }
    d.default_weight = it->get<double>();
  }
  RETURN_IF_ERROR(str("blob", &d.blob));
  RETURN_IF_ERROR(str("source", &d.source));
  RETURN_IF_ERROR(str("published_by", &d.published_by));
  RETURN_IF_ERROR(integer("published_unix_ms", &d.published_unix_ms));
  if (d.instance != instance || d.name != name) {
    return bad(absl::StrCat("it describes '", d.instance, "'/'", d.name, "', not '", instance,
                            "'/'", name, "'"));
  }
  if (!IsSha256Hex(d.sha256)) return bad("'sha256' is not 64 lower-case hex digits");
  if (d.file_bytes < 0) return bad("'file_bytes' is negative");
  if (d.blob != BlobName(d.name, d.sha256)) {
    return bad(
        absl::StrCat("'blob' is '", d.blob, "', expected '", BlobName(d.name, d.sha256), "'"));
  }
  return d;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// AdapterStore

absl::StatusOr<std::unique_ptr<AdapterStore>> AdapterStore::Open(const std::string& root) {
  if (root.empty()) return absl::InvalidArgumentError("adapter store: empty folder name");
  struct stat st;
  if (::stat(root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter store ", root, " is not a folder (create it, or mount the volume)"));
  }
  const std::string layout = absl::StrCat(root, "/", kLayout);
  if (::mkdir(layout.c_str(), 0755) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter store ", root, ": cannot create ", kLayout, "/: ", Errno(errno)));
  }
  if (::access(layout.c_str(), R_OK | W_OK | X_OK) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter store ", root, " is not writable by this process"));
  }
  RemoveDeadWritersTemps(layout);
  return std::unique_ptr<AdapterStore>(new AdapterStore(root));
}

std::string AdapterStore::InstanceDir(const std::string& instance) const {
  return absl::StrCat(root_, "/", kLayout, "/", instance, ".d");
}

std::string AdapterStore::Shown(const std::string& instance, const std::string& file) {
  return absl::StrCat(instance, ".d/", file);
}

absl::StatusOr<AdapterDescriptor> AdapterStore::Publish(AdapterDescriptor d,
                                                        const std::string& file, bool replace) {
  RETURN_IF_ERROR(ValidateInstanceName(d.instance));
  RETURN_IF_ERROR(ValidateAdapterName(d.name));
  if (!IsSha256Hex(d.sha256)) {
    return absl::InvalidArgumentError(absl::StrCat("adapter store: bad digest '", d.sha256, "'"));
  }
  const std::string dir = InstanceDir(d.instance);
  if (::mkdir(dir.c_str(), 0755) == 0) {
    RETURN_IF_ERROR(FsyncDir(absl::StrCat(root_, "/", kLayout)));
  } else if (errno != EEXIST) {
    return IoError(errno, absl::StrCat("adapter store: cannot create ", Shown(d.instance, "")));
  }
  std::optional<AdapterDescriptor> previous;
  if (absl::StatusOr<AdapterDescriptor> old = Read(d.instance, d.name); old.ok()) {
    if (!replace) {
      return absl::AlreadyExistsError(absl::StrCat(
          "adapter '", d.name, "' of model '", d.instance, "' is in the adapter store (sha256 ",
          old->sha256, "); unload it first or load with replace"));
    }
    previous = *std::move(old);
  }

  d.blob = BlobName(d.name, d.sha256);
  const std::string shown_blob = Shown(d.instance, d.blob);
  {
    Mapping source;
    RETURN_IF_ERROR(source.Open(file));
    // The bytes written are the bytes hashed: a file changed since it was loaded is refused.
    const std::string digest = Sha256Hex(source.data(), source.size());
    if (digest != d.sha256) {
      return absl::AbortedError(
          absl::StrCat("the adapter file changed while it was being loaded "
                       "(sha256 ",
                       digest, ", loaded ", d.sha256, "); load it again"));
    }
    d.file_bytes = static_cast<int64_t>(source.size());
    ASSIGN_OR_RETURN(std::string temp, WriteTemp(dir, source.data(), source.size(), shown_blob));
    if (::rename(temp.c_str(), absl::StrCat(dir, "/", d.blob).c_str()) != 0) {
      const int err = errno;
      ::unlink(temp.c_str());
      return IoError(err, absl::StrCat("adapter store: cannot rename into ", shown_blob));
    }
  }
  RETURN_IF_ERROR(FsyncDir(dir));

  d.published_by = HostName();
  d.published_unix_ms = NowUnixMs();
  const std::string descriptor_name = absl::StrCat(d.name, kDescriptorSuffix);
  const std::string shown_descriptor = Shown(d.instance, descriptor_name);
  const std::string text = ToJson(d).dump(2) + "\n";
  ASSIGN_OR_RETURN(std::string temp, WriteTemp(dir, text.data(), text.size(), shown_descriptor));
  const std::string target = absl::StrCat(dir, "/", descriptor_name);
  if (replace) {
    if (::rename(temp.c_str(), target.c_str()) != 0) {
      const int err = errno;
      ::unlink(temp.c_str());
      return IoError(err, absl::StrCat("adapter store: cannot rename into ", shown_descriptor));
    }
  } else {
    // link() fails if the name exists: an entry created concurrently elsewhere wins.
    const int rc = ::link(temp.c_str(), target.c_str());
    const int err = errno;
    ::unlink(temp.c_str());
    if (rc != 0) {
      if (err == EEXIST) {
        return absl::AlreadyExistsError(
            absl::StrCat("adapter '", d.name, "' of model '", d.instance,
                         "' was just added to the adapter store by another replica"));
      }
      return IoError(err, absl::StrCat("adapter store: cannot create ", shown_descriptor));
    }
  }
  RETURN_IF_ERROR(FsyncDir(dir));
  if (previous.has_value() && previous->blob != d.blob) {
    ::unlink(absl::StrCat(dir, "/", previous->blob).c_str());
  }
  return d;
}

absl::StatusOr<AdapterDescriptor> AdapterStore::Read(const std::string& instance,
                                                     const std::string& name) const {
  RETURN_IF_ERROR(ValidateInstanceName(instance));
  RETURN_IF_ERROR(ValidateAdapterName(name));
  const std::string file = absl::StrCat(name, kDescriptorSuffix);
  const std::string path = absl::StrCat(InstanceDir(instance), "/", file);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT || ::access(path.c_str(), F_OK) != 0) {
      return absl::NotFoundError(absl::StrCat("adapter '", name, "' of model '", instance,
                                              "' is not in the adapter store"));
    }
    return absl::DataLossError(
        absl::StrCat("adapter store descriptor ", Shown(instance, file), " cannot be read"));
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseDescriptor(text, instance, name, Shown(instance, file));
}

absl::StatusOr<AdapterStore::Listing> AdapterStore::List(const std::string& instance) const {
  RETURN_IF_ERROR(ValidateInstanceName(instance));
  Listing out;
  const std::string dir = InstanceDir(instance);
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return out;
    return absl::InternalError(
        absl::StrCat("adapter store: cannot list ", Shown(instance, ""), ": ", Errno(errno)));
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    const std::string file = e->d_name;
    if (absl::StartsWith(file, kTempPrefix) || !absl::EndsWith(file, kDescriptorSuffix)) continue;
    names.push_back(file.substr(0, file.size() - std::strlen(kDescriptorSuffix)));
  }
  ::closedir(d);
  for (const std::string& name : names) {
    if (!ValidateAdapterName(name).ok()) continue;  // not ours
    absl::StatusOr<AdapterDescriptor> desc = Read(instance, name);
    if (desc.ok()) {
      out.adapters[name] = *std::move(desc);
    } else if (!absl::IsNotFound(desc.status())) {  // NOT_FOUND: removed meanwhile
      out.bad[name] = desc.status();
    }
  }
  return out;
}

absl::Status AdapterStore::Remove(const std::string& instance, const std::string& name) {
  ASSIGN_OR_RETURN(AdapterDescriptor d, Read(instance, name));
  const std::string dir = InstanceDir(instance);
  const std::string descriptor = absl::StrCat(dir, "/", name, kDescriptorSuffix);
  if (::unlink(descriptor.c_str()) != 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("adapter '", name, "' of model '", instance,
                                              "' is not in the adapter store"));
    }
    return absl::InternalError(absl::StrCat("adapter store: cannot remove ",
                                            Shown(instance, name + kDescriptorSuffix), ": ",
                                            Errno(errno)));
  }
  ::unlink(absl::StrCat(dir, "/", d.blob).c_str());
  return FsyncDir(dir);
}

absl::StatusOr<std::string> AdapterStore::VerifiedBlob(const AdapterDescriptor& d) const {
  const std::string shown = Shown(d.instance, d.blob);
  const std::string path = absl::StrCat(InstanceDir(d.instance), "/", d.blob);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("adapter store file ", shown, " is gone"));
    }
    return absl::DataLossError(
        absl::StrCat("adapter store file ", shown, " cannot be read: ", Errno(errno)));
  }
  if (static_cast<int64_t>(st.st_size) != d.file_bytes) {
    return absl::DataLossError(absl::StrCat("adapter store file ", shown, " has ", st.st_size,
                                            " bytes, its descriptor says ", d.file_bytes,
                                            " (truncated or altered); not served"));
  }
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file = SafetensorsFile::Open(path);
  if (!file.ok()) {
    if (absl::IsNotFound(file.status())) {
      return absl::NotFoundError(absl::StrCat("adapter store file ", shown, " is gone"));
    }
    return absl::DataLossError(absl::StrCat("adapter store file ", shown,
                                            " is not a readable safetensors file (",
                                            file.status().message(), "); not served"));
  }
  PendingDigest digest(*file);
  const std::string actual = digest.Join();
  if (actual != d.sha256) {
    return absl::DataLossError(absl::StrCat("adapter store file ", shown, " has sha256 ", actual,
                                            ", its descriptor says ", d.sha256,
                                            " (corrupt); not served"));
  }
  return path;
}

int AdapterStore::Sweep(const std::string& instance, absl::Duration min_age) {
  if (!ValidateInstanceName(instance).ok()) return 0;
  absl::StatusOr<Listing> listing = List(instance);
  if (!listing.ok()) return 0;
  std::set<std::string> referenced;
  for (const auto& [name, d] : listing->adapters) referenced.insert(d.blob);
  // A name with a corrupt descriptor keeps its files (an operator may want to look at them).
  for (const auto& [name, status] : listing->bad) referenced.insert(name);
  const std::string dir = InstanceDir(instance);
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return 0;
  std::vector<std::string> files;
  while (dirent* e = ::readdir(d)) files.push_back(e->d_name);
  ::closedir(d);
  const absl::Time cutoff = absl::Now() - min_age;
  int deleted = 0;
  for (const std::string& file : files) {
    const bool temp = absl::StartsWith(file, kTempPrefix);
    const bool blob = absl::EndsWith(file, ".safetensors") && !temp;
    if (!temp && !blob) continue;
    if (blob) {
      if (referenced.count(file) > 0) continue;
      bool of_bad = false;
      for (const auto& [name, status] : listing->bad) {
        of_bad = of_bad || absl::StartsWith(file, name + ".");
      }
      if (of_bad) continue;
    }
    const std::string path = absl::StrCat(dir, "/", file);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) continue;
    if (absl::FromTimeT(st.st_mtime) > cutoff) continue;
    if (::unlink(path.c_str()) == 0) ++deleted;
  }
  return deleted;
}

// ------------------------------------------------------------------------------------------------
// AdapterSync

AdapterSync::AdapterSync(std::unique_ptr<AdapterStore> store, std::shared_ptr<ModelManager> models,
                         AdapterSyncOptions options, std::shared_ptr<Metrics> metrics)
    : store_(std::move(store)),
      models_(std::move(models)),
      options_(options),
      metrics_(std::move(metrics)) {}

AdapterSync::~AdapterSync() { Stop(); }

void AdapterSync::Start() {
  std::lock_guard lock(poll_mu_);
  if (poller_.joinable() || stopping_) return;
  poller_ = std::thread([this] { PollLoop(); });
}

void AdapterSync::Stop() {
  {
    std::lock_guard lock(poll_mu_);
    stopping_ = true;
  }
  poll_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

void AdapterSync::PollLoop() {
  std::unique_lock lock(poll_mu_);
  while (!stopping_) {
    lock.unlock();
    SyncOnce();
    if (++passes_ % kSweepEveryPasses == 0) {
      for (const std::string& name : models_->ReadyNames()) {
        store_->Sweep(name, options_.orphan_age);
      }
    }
    lock.lock();
    poll_cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.poll_interval),
                      [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return stopping_; });
  }
}

std::unique_lock<std::mutex> AdapterSync::Lock(const std::string& instance,
                                               const std::string& adapter) {
  std::shared_ptr<std::mutex> m;
  {
    std::lock_guard lock(mu_);
    std::shared_ptr<std::mutex>& slot = locks_[{instance, adapter}];
    if (slot == nullptr) slot = std::make_shared<std::mutex>();
    m = slot;
  }
  // Entries are never removed, so the mutex outlives the returned lock.
  return std::unique_lock<std::mutex>(*m);
}

void AdapterSync::SetManaged(const Key& key, bool managed) {
  std::lock_guard lock(mu_);
  if (managed) {
    managed_.insert(key);
  } else {
    managed_.erase(key);
  }
}

bool AdapterSync::IsManaged(const Key& key) const {
  std::lock_guard lock(mu_);
  return managed_.count(key) > 0;
}

void AdapterSync::RememberStored(const AdapterDescriptor& d, bool present) {
  std::lock_guard lock(mu_);
  if (present) {
    stored_[d.instance][d.name] = d;
  } else {
    stored_[d.instance].erase(d.name);
  }
}

std::vector<AdapterDescriptor> AdapterSync::Stored(const std::string& instance) const {
  std::lock_guard lock(mu_);
  std::vector<AdapterDescriptor> out;
  auto it = stored_.find(instance);
  if (it == stored_.end()) return out;
  for (const auto& [name, d] : it->second) out.push_back(d);
  return out;
}

absl::StatusOr<AdapterDescriptor> AdapterSync::Published(const ModelInstance& instance,
                                                         const AdapterInfo& adapter,
                                                         const std::string& file,
                                                         bool allow_partial, bool pin,
                                                         bool replace) {
  AdapterDescriptor d;
  d.instance = instance.name;
  d.name = adapter.name;
  d.sha256 = adapter.sha256;
  d.format = adapter.format;
  d.allow_partial = allow_partial;
  d.pin = pin;
  d.default_weight = adapter.default_weight;
  d.source = adapter.path;
  ASSIGN_OR_RETURN(AdapterDescriptor written, store_->Publish(std::move(d), file, replace));
  SetManaged({instance.name, adapter.name}, true);
  RememberStored(written, true);
  return written;
}

absl::Status AdapterSync::Removed(const std::string& instance, const std::string& adapter) {
  AdapterDescriptor d;
  d.instance = instance;
  d.name = adapter;
  RememberStored(d, false);
  SetManaged({instance, adapter}, false);
  return store_->Remove(instance, adapter);
}

std::vector<std::string> AdapterSync::Missing(const ModelInstance& instance,
                                              const std::vector<std::string>& adapters) {
  std::vector<std::string> out;
  for (const std::string& name : adapters) {
    if (!instance.host->Info(name).ok()) out.push_back(name);
  }
  return out;
}

absl::Status AdapterSync::LoadFromStoreLocked(const ModelInstance& instance,
                                              const std::string& adapter, bool replace) {
  const auto start = std::chrono::steady_clock::now();
  // A concurrent replace elsewhere may delete the file of the descriptor just read: read again.
  constexpr int kAttempts = 3;
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<AdapterDescriptor> d = store_->Read(instance.name, adapter);
    if (absl::IsNotFound(d.status())) {
      return absl::NotFoundError(absl::StrCat("adapter '", adapter, "' is neither loaded on '",
                                              instance.name, "' nor in the adapter store"));
    }
    RETURN_IF_ERROR(d.status());
    absl::StatusOr<std::string> path = store_->VerifiedBlob(*d);
    if (absl::IsNotFound(path.status()) && attempt + 1 < kAttempts) continue;
    if (absl::IsNotFound(path.status())) {
      return absl::DataLossError(absl::StrCat(path.status().message(), " (its descriptor ",
                                              AdapterStore::Shown(instance.name, adapter),
                                              ".adapter.json names it)"));
    }
    RETURN_IF_ERROR(path.status());
    AdapterLoadOptions options;
    options.allow_partial = d->allow_partial;
    options.pin = d->pin;
    options.default_weight = d->default_weight;
    options.replace = replace;
    options.format_hint = d->format;
    options.source = absl::StrCat("store:", AdapterStore::Shown(instance.name, d->blob));
    absl::StatusOr<AdapterLoadResult> loaded = instance.host->Load(adapter, *path, options);
    if (absl::IsNotFound(loaded.status()) && attempt + 1 < kAttempts) continue;
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("loading adapter '", adapter, "' from the adapter store (",
                                       options.source.substr(6), "): ",
                                       absl::StrReplaceAll(loaded.status().message(),
                                                           {{*path, options.source.substr(6)}})));
    }
    // The file was verified just before; its identity (inode, times) pins the digest, so this
    // only trips if it was rewritten in between. Then the adapter must not stay.
    absl::StatusOr<AdapterInfo> info = instance.host->Info(adapter);
    if (!info.ok() || info->sha256 != d->sha256) {
      (void)instance.host->Unload(adapter);
      return absl::DataLossError(absl::StrCat("adapter store file ", options.source.substr(6),
                                              " changed while it was being loaded; not served"));
    }
    SetManaged({instance.name, adapter}, true);
    RememberStored(*d, true);
    if (metrics_ != nullptr) {
      metrics_->ObserveAdapterLoad(
          instance.name,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      metrics_->AdapterEvictions(instance.name, static_cast<int64_t>(loaded->evicted.size()));
      metrics_->SetAdapters(instance.name, static_cast<int64_t>(instance.host->adapter_count()),
                            instance.host->memory_used_bytes());
    }
    spdlog::info("adapter store: loaded '{}' (sha256 {}) into '{}'", adapter, d->sha256,
                 instance.name);
    return absl::OkStatus();
  }
}

absl::Status AdapterSync::EnsureOne(const InstancePtr& instance, const std::string& adapter) {
  if (instance->host->Info(adapter).ok()) return absl::OkStatus();
  const std::pair<const void*, std::string> key{instance.get(), adapter};
  std::shared_ptr<Flight> flight;
  {
    std::unique_lock lock(mu_);
    auto it = flights_.find(key);
    if (it != flights_.end()) {
      // Another request is loading it: share its outcome.
      std::shared_ptr<Flight> other = it->second;
      flight_cv_.wait(lock, [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return other->done; });
      return other->status;
    }
    flight = std::make_shared<Flight>();
    flights_[key] = flight;
  }
  absl::Status status;
  {
    std::unique_lock entry = Lock(instance->name, adapter);
    // Loaded meanwhile (by LoadLoRA, the poller or an earlier flight)?
    status = instance->host->Info(adapter).ok()
                 ? absl::OkStatus()
                 : LoadFromStoreLocked(*instance, adapter, /*replace=*/false);
    if (absl::IsAlreadyExists(status)) status = absl::OkStatus();  // inserted concurrently
  }
  {
    std::lock_guard lock(mu_);
    flight->status = status;
    flight->done = true;
    flights_.erase(key);
  }
  flight_cv_.notify_all();
  return status;
}

absl::Status AdapterSync::EnsureLoaded(const InstancePtr& instance,
                                       const std::vector<std::string>& adapters) {
  if (!instance->host->supports_lora()) return absl::OkStatus();  // Snapshot reports it
  for (const std::string& name : adapters) {
    if (!ValidateAdapterName(name).ok()) continue;  // Snapshot reports the bad name
    RETURN_IF_ERROR(EnsureOne(instance, name));
  }
  return absl::OkStatus();
}

void AdapterSync::Reconcile(const ModelInstance& instance, const AdapterStore::Listing& listing) {
  for (const AdapterInfo& local : instance.host->List()) {
    const Key key{instance.name, local.name};
    auto it = listing.adapters.find(local.name);
    if (it != listing.adapters.end()) {
      if (it->second.sha256 == local.sha256 &&
          it->second.default_weight == local.default_weight) {
        SetManaged(key, true);
        continue;
      }
      // Replaced elsewhere: load the new version (requests running keep the old one).
      std::unique_lock entry = Lock(instance.name, local.name);
      absl::StatusOr<AdapterInfo> now = instance.host->Info(local.name);
      absl::StatusOr<AdapterDescriptor> d = store_->Read(instance.name, local.name);
      if (!now.ok() || (d.ok() && d->sha256 == now->sha256 &&
                        d->default_weight == now->default_weight)) {
        continue;  // changed meanwhile
      }
      absl::Status s =
          d.ok() ? LoadFromStoreLocked(instance, local.name, /*replace=*/true) : d.status();
      if (!s.ok() && !absl::IsNotFound(s)) {
        // Never keep serving a version the store no longer has; requests get the store's error.
        spdlog::error("adapter store: '{}' of '{}' changed but cannot be reloaded: {}", local.name,
                      instance.name, std::string(s.message()));
        (void)instance.host->Unload(local.name);
        SetManaged(key, false);
      }
      if (absl::IsNotFound(s) && IsManaged(key)) {
        (void)instance.host->Unload(local.name);
        SetManaged(key, false);
      }
      continue;
    }
    if (!IsManaged(key)) continue;  // never in the store (e.g. preloaded): not ours to drop
    // Removed from the store (or its descriptor went bad): drop it here too.
    std::unique_lock entry = Lock(instance.name, local.name);
    absl::StatusOr<AdapterDescriptor> d = store_->Read(instance.name, local.name);
    if (d.ok()) continue;  // re-added meanwhile; the next pass compares digests
    if (absl::Status s = instance.host->Unload(local.name); s.ok() || absl::IsNotFound(s)) {
      SetManaged(key, false);
      spdlog::info("adapter store: dropped '{}' of '{}' ({})", local.name, instance.name,
                   std::string(d.status().message()));
    }
  }
  if (metrics_ != nullptr) {
    metrics_->SetAdapters(instance.name, static_cast<int64_t>(instance.host->adapter_count()),
                          instance.host->memory_used_bytes());
  }
}

void AdapterSync::SyncOnce() {
  std::set<std::string> seen;
  for (const InstanceStatus& s : models_->List()) {
    if (s.state != InstanceState::kReady || s.instance == nullptr) continue;
    seen.insert(s.name);
    absl::StatusOr<AdapterStore::Listing> listing = store_->List(s.name);
    if (!listing.ok()) {
      spdlog::warn("adapter store: {}", std::string(listing.status().message()));
      continue;
    }
    for (const auto& [name, status] : listing->bad) {
      spdlog::warn("adapter store: {}", std::string(status.message()));
    }
    {
      std::lock_guard lock(mu_);
      stored_[s.name] = listing->adapters;
    }
    if (s.instance->host->supports_lora()) Reconcile(*s.instance, *listing);
  }
  std::lock_guard lock(mu_);
  for (auto it = stored_.begin(); it != stored_.end();) {
    it = seen.count(it->first) > 0 ? std::next(it) : stored_.erase(it);
  }
}

}  // namespace ds::server
