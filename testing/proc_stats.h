// Resource figures of a process read from /proc (Linux; header-only; tests only): resident
// memory, thread count and open file descriptors, and the pid of a child started from a given
// executable. Used by the unread-streams and soak tests to watch the real server binary.
//
// Every function is thread-safe (each reads /proc afresh). Errors (the process is gone, /proc is
// not mounted) read as -1.
#pragma once

#include <dirent.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>

namespace ds::test {

// True in sanitizer builds (AddressSanitizer, ThreadSanitizer: this binary and the server it
// starts come from the same build): their allocators keep freed memory (ASan's quarantine holds
// up to 256 MB by default) and add shadow memory, so resident-memory figures measure the
// sanitizer. Tests print them but do not bound them there; LeakSanitizer checks leaks instead.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSanitizerOwnsResidentMemory = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool kSanitizerOwnsResidentMemory = true;
#else
inline constexpr bool kSanitizerOwnsResidentMemory = false;
#endif
#else
inline constexpr bool kSanitizerOwnsResidentMemory = false;
#endif

struct ProcStats {
  int64_t rss_kb = -1;  // VmRSS
  int64_t threads = -1;
  int64_t fds = -1;  // entries of /proc/<pid>/fd
};

// The number after `key` ("VmRSS:", "Threads:", "PPid:") in /proc/<pid>/status, or -1.
inline int64_t ProcStatusField(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0) {
      return std::strtoll(line.c_str() + key.size(), nullptr, 10);
    }
  }
  return -1;
}

inline int64_t CountFds(pid_t pid) {
  DIR* dir = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
  if (dir == nullptr) return -1;
  int64_t n = 0;
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(dir);
  return n;
}

inline ProcStats ReadProcStats(pid_t pid) {
  ProcStats s;
  s.rss_kb = ProcStatusField(pid, "VmRSS:");
  s.threads = ProcStatusField(pid, "Threads:");
  s.fds = CountFds(pid);
  return s;
}

// The process's threads by name (/proc/<pid>/task/*/comm, at most 15 characters) -> count.
inline std::map<std::string, int> ThreadsByName(pid_t pid) {
  const std::string base = "/proc/" + std::to_string(pid) + "/task";
  std::map<std::string, int> names;
  DIR* dir = opendir(base.c_str());
  if (dir == nullptr) return names;
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(base + "/" + e->d_name + "/comm");
    std::string name;
    std::getline(in, name);
    ++names[name];
  }
  closedir(dir);
  return names;
}

// "name xN, ..." of ThreadsByName.
inline std::string FormatThreads(const std::map<std::string, int>& threads) {
  std::string out;
  for (const auto& [name, n] : threads) {
    if (!out.empty()) out += ", ";
    out += name + " x" + std::to_string(n);
  }
  return out;
}

// The pid of a child of this process whose /proc/<pid>/exe is `executable` (resolved), or -1.
inline pid_t FindChildProcess(const std::string& executable) {
  char want[4096];
  if (realpath(executable.c_str(), want) == nullptr) return -1;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return -1;
  pid_t found = -1;
  const pid_t self = getpid();
  while (const dirent* e = readdir(proc)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    if (ProcStatusField(static_cast<pid_t>(pid), "PPid:") != self) continue;
    char exe[4096];
    const ssize_t n =
        readlink(("/proc/" + std::string(e->d_name) + "/exe").c_str(), exe, sizeof(exe) - 1);
    if (n <= 0) continue;
    exe[n] = '\0';
    if (std::string(exe) == want) {
      found = static_cast<pid_t>(pid);
      break;
    }
  }
  closedir(proc);
  return found;
}

}  // namespace ds::test
