#include "handlers/mapping_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"

namespace ds {
namespace {

constexpr int kSlots = 4096;

// A registered mapping. The handler reads slots without locks: a slot is published by storing
// state 2 (release) after its fields, and taken down by storing state 1 before clearing them.
struct Slot {
  std::atomic<int> state{0};  // 0 free, 1 being changed, 2 active
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<MappingHealth*> health{nullptr};
};

Slot g_slots[kSlots];
std::atomic<int> g_slots_used{0};  // slots [0, g_slots_used) may be active
std::atomic<int64_t> g_vanished{0};
uintptr_t g_page_size = 4096;
struct sigaction g_previous {};
std::once_flag g_install_once;
std::atomic<bool> g_installed{false};
thread_local MappedReadScope* t_scope = nullptr;

// Async-signal-safe: atomics, mmap, signal, raise.
void OnSigbus(int sig, siginfo_t* info, void* context) {
  const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
  const int used = g_slots_used.load(std::memory_order_acquire);
  for (int i = 0; i < used; ++i) {
    Slot& slot = g_slots[i];
    if (slot.state.load(std::memory_order_acquire) != 2) continue;
    if (address < slot.begin.load(std::memory_order_relaxed) ||
        address >= slot.end.load(std::memory_order_relaxed)) {
      continue;
    }
    // The file page behind `address` is gone (truncated): map a private zero page in its place,
    // so the faulting read repeats and sees zeros.
    void* page = reinterpret_cast<void*>(address & ~(g_page_size - 1));
    if (mmap(page, g_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1,
             0) == MAP_FAILED) {
      break;  // cannot recover: behave as without us
    }
    if (MappingHealth* health = slot.health.load(std::memory_order_acquire)) {
      health->vanished_pages.fetch_add(1, std::memory_order_relaxed);
    }
    g_vanished.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  // Not a registered mapping: what would have happened without us.
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if ((g_previous.sa_flags & SA_SIGINFO) == 0 && g_previous.sa_handler != SIG_DFL &&
      g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
    return;
  }
  // The default action. A hardware fault repeats when we return and now meets it; a SIGBUS sent
  // with kill() has to be raised again.
  signal(SIGBUS, SIG_DFL);
  if (info->si_code <= 0) raise(SIGBUS);
}

void InstallHandler() {
  const long page = sysconf(_SC_PAGESIZE);
  if (page > 0) g_page_size = static_cast<uintptr_t>(page);
  struct sigaction action {};
  action.sa_sigaction = OnSigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGBUS, &action, &g_previous) == 0) g_installed.store(true);
}

bool SameTime(const timespec& a, const timespec& b) {
  return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

}  // namespace

absl::Status FillMappingHealth(int fd, const std::string& path, MappingHealth& health) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat '", path, "': ", std::strerror(errno)));
  }
  health.path = path;
  health.dev = st.st_dev;
  health.ino = st.st_ino;
  health.size = static_cast<int64_t>(st.st_size);
  health.mtime = st.st_mtim;
  health.ctime = st.st_ctim;
  return absl::OkStatus();
}

absl::Status MappingHealth::Check() const {
  const int64_t vanished = vanished_pages.load(std::memory_order_relaxed);
  if (vanished > 0) {
    return absl::DataLossError(absl::StrCat(
        "file '", path, "' was truncated while being read: ", vanished,
        " page(s) of its mapping vanished (they read as zeros); nothing read from it was used"));
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || st.st_dev != dev || st.st_ino != ino) {
    return absl::OkStatus();  // removed or replaced: our mapping keeps the old, whole file
  }
  if (static_cast<int64_t>(st.st_size) != size) {
    return absl::DataLossError(absl::StrCat("file '", path, "' changed size while being read (",
                                            size, " bytes when opened, ", st.st_size,
                                            " now); nothing read from it was used"));
  }
  if (!SameTime(st.st_mtim, mtime) || !SameTime(st.st_ctim, ctime)) {
    return absl::DataLossError(absl::StrCat(
        "file '", path,
        "' was modified while being read (its modification or status-change time changed); "
        "nothing read from it was used"));
  }
  return absl::OkStatus();
}

MappingGuard::MappingGuard(void* addr, std::size_t size, std::shared_ptr<MappingHealth> health)
    : health_(std::move(health)) {
  for (MappedReadScope* s = t_scope; s != nullptr; s = s->parent_) s->healths_.push_back(health_);
  if (addr == nullptr || size == 0) return;
  std::call_once(g_install_once, InstallHandler);
  if (!g_installed.load()) return;
  for (int i = 0; i < kSlots; ++i) {
    int expected = 0;
    if (!g_slots[i].state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      continue;
    }
    Slot& slot = g_slots[i];
    slot.begin.store(reinterpret_cast<uintptr_t>(addr), std::memory_order_relaxed);
    slot.end.store(reinterpret_cast<uintptr_t>(addr) + size, std::memory_order_relaxed);
    slot.health.store(health_.get(), std::memory_order_relaxed);
    int used = g_slots_used.load(std::memory_order_relaxed);
    while (used < i + 1 &&
           !g_slots_used.compare_exchange_weak(used, i + 1, std::memory_order_acq_rel)) {
    }
    slot.state.store(2, std::memory_order_release);
    slot_ = i;
    return;
  }
}

MappingGuard::~MappingGuard() {
  if (slot_ < 0) return;
  Slot& slot = g_slots[slot_];
  slot.state.store(1, std::memory_order_release);
  slot.health.store(nullptr, std::memory_order_relaxed);
  slot.begin.store(0, std::memory_order_relaxed);
  slot.end.store(0, std::memory_order_relaxed);
  slot.state.store(0, std::memory_order_release);
}

MappedReadScope::MappedReadScope() : parent_(t_scope) { t_scope = this; }

MappedReadScope::~MappedReadScope() { t_scope = parent_; }

absl::Status MappedReadScope::Check() const {
  for (const auto& health : healths_) {
    absl::Status s = health->Check();
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

int64_t VanishedMappedPages() { return g_vanished.load(std::memory_order_relaxed); }

}  // namespace ds
