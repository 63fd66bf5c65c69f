// Reading memory-mapped files that other processes may truncate or rewrite while we read them.
//
// A file mapping whose file is truncated underneath it raises SIGBUS on the next touch of a page
// past the new end: with plain mmap a stranger truncating a checkpoint or an adapter (an operator's
// `cp` over it, a half-finished upload, a full disk) kills the server. Mappings registered with a
// MappingGuard instead get a zero page at the vanished address (the read goes on and sees zeros),
// and the file's MappingHealth counts the vanished pages. Loaders open a MappedReadScope around a
// load and, before they commit what they built, call its Check(): DATA_LOSS naming the file when
// a page vanished, or when the file (same device and inode) changed size, modification time or
// status-change time since it was mapped, so a load that read a torn file fails and the model
// stays exactly as it was. A file replaced by rename (a new inode) is not a change: the mapping
// keeps the old file's bytes, which stay consistent.
//
// The SIGBUS handler is installed on the first registration and chains to the handler that was in
// place before it for faults outside registered mappings (the default action when there was
// none). Registration takes one of a fixed number of slots (4096); a mapping registered when all
// are taken, or when the handler could not be installed, is read unprotected, as plain mmap
// (MappingGuard::registered() says which). The size and time checks apply either way.
//
// Thread-safety: everything here may be used from any thread. A MappedReadScope records the
// mappings registered by its own thread only (nested scopes: every enclosing scope records them).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace ds {

// What a mapping's reader needs to know afterwards about its file.
struct MappingHealth {
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
  int64_t size = 0;
  timespec mtime{};
  timespec ctime{};
  std::atomic<int64_t> vanished_pages{0};  // pages replaced by zeros after a SIGBUS

  // OK, or DATA_LOSS naming `path` and what happened (pages vanished; size, modification or
  // status-change time differ from when it was mapped, same device and inode). A path that no
  // longer exists or now names another file is OK (the mapping holds the old bytes).
  absl::Status Check() const;
};

// Registers [addr, addr + size) (page-aligned start) for SIGBUS recovery while it lives. Destroy
// it before unmapping. Records `health` in this thread's open MappedReadScopes.
class MappingGuard {
 public:
  MappingGuard(void* addr, std::size_t size, std::shared_ptr<MappingHealth> health);
  ~MappingGuard();
  MappingGuard(const MappingGuard&) = delete;
  MappingGuard& operator=(const MappingGuard&) = delete;

  bool registered() const { return slot_ >= 0; }

 private:
  int slot_ = -1;
  std::shared_ptr<MappingHealth> health_;
};

// Stats of the mapped file `fd` into a new MappingHealth for `path`. INTERNAL if fstat fails.
absl::Status FillMappingHealth(int fd, const std::string& path, MappingHealth& health);

// Collects the MappingHealth of every mapping this thread registers while the scope lives.
class MappedReadScope {
 public:
  MappedReadScope();
  ~MappedReadScope();
  MappedReadScope(const MappedReadScope&) = delete;
  MappedReadScope& operator=(const MappedReadScope&) = delete;

  // OK, or the first recorded file's DATA_LOSS (see MappingHealth::Check).
  absl::Status Check() const;
  int64_t files() const { return static_cast<int64_t>(healths_.size()); }

 private:
  friend class MappingGuard;
  MappedReadScope* parent_;
  std::vector<std::shared_ptr<const MappingHealth>> healths_;
};

// Pages replaced by zeros since the process started (all mappings); for metrics and tests.
int64_t VanishedMappedPages();

}  // namespace ds
