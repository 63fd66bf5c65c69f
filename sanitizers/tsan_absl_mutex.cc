// ThreadSanitizer builds only (linked into every executable of a DS_SANITIZE=thread build by
// CMakeLists.txt): makes absl::Mutex's and absl::CondVar's synchronization visible to TSan.
//
// Debian's Abseil is not built with TSan, so its Mutex never tells TSan that an Unlock
// happens-before the next Lock of the same mutex, and every access guarded by one would be
// reported as a race. gRPC core (libgpr, libgrpc) synchronizes its executors, thread pools and
// completion queues with the same absl::Mutex and absl::CondVar, so work it hands from one thread
// to another would be reported too. These definitions interpose the entry points the project and
// gRPC call (Lock, Unlock, TryLock, ReaderLock, ReaderUnlock; CondVar::Wait, WaitWithTimeout,
// WaitWithDeadline), call the library's own implementation (looked up with dlsym(RTLD_NEXT)) and
// add the edges with __tsan_release before an unlock and __tsan_acquire after a lock, on the
// mutex's address. A CondVar wait unlocks and relocks its mutex inside the library, so it
// releases before and acquires after. Reader unlocks release too: a later writer then
// happens-after every reader.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"

namespace {

using MutexFn = void (*)(absl::Mutex*);

#define DS_STR2(x) #x
#define DS_STR(x) DS_STR2(x)

// The library's definition of the function whose Itanium mangled name is "_ZN4absl" + Abseil's
// inline namespace (when it has one) + `rest`; aborts when it cannot be found.
void* Real(const std::string& rest) {
  std::string name = "_ZN4absl";
#if ABSL_OPTION_USE_INLINE_NAMESPACE
  const std::string ns = DS_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  name += std::to_string(ns.size()) + ns;
#endif
  name += rest;
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: %s not found in the Abseil library\n", name.c_str());
    std::abort();
  }
  return fn;
}

// absl::Mutex::<method>() (no arguments, void).
MutexFn RealMutex(const std::string& method) {
  return reinterpret_cast<MutexFn>(
      Real("5Mutex" + std::to_string(method.size()) + method + "Ev"));
}

// The mangled tail of a CondVar method taking (Mutex*, <extra>): "<extra>" is "" or a mangled
// class of the inline namespace ("8Duration", "4Time").
std::string CondVarMethod(const std::string& method, const std::string& extra) {
  std::string rest = "7CondVar" + std::to_string(method.size()) + method + "EPN";
#if ABSL_OPTION_USE_INLINE_NAMESPACE
  rest += "S0_";
#else
  rest += "S_";
#endif
  rest += "5MutexE";
  if (!extra.empty()) {
#if ABSL_OPTION_USE_INLINE_NAMESPACE
    rest += "NS0_" + extra + "E";
#else
    rest += "NS_" + extra + "E";
#endif
  }
  return rest;
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const MutexFn real = RealMutex("Lock");
  real(this);
  __tsan_acquire(this);
}

void Mutex::Unlock() {
  static const MutexFn real = RealMutex("Unlock");
  __tsan_release(this);
  real(this);
}

void Mutex::ReaderLock() {
  static const MutexFn real = RealMutex("ReaderLock");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderUnlock() {
  static const MutexFn real = RealMutex("ReaderUnlock");
  __tsan_release(this);
  real(this);
}

bool Mutex::TryLock() {
  using Fn = bool (*)(Mutex*);
  static const Fn real = reinterpret_cast<Fn>(Real("5Mutex7TryLockEv"));
  const bool locked = real(this);
  if (locked) __tsan_acquire(this);
  return locked;
}

void CondVar::Wait(Mutex* mu) {
  using Fn = void (*)(CondVar*, Mutex*);
  static const Fn real = reinterpret_cast<Fn>(Real(CondVarMethod("Wait", "")));
  __tsan_release(mu);
  real(this, mu);
  __tsan_acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  using Fn = bool (*)(CondVar*, Mutex*, Duration);
  static const Fn real = reinterpret_cast<Fn>(Real(CondVarMethod("WaitWithTimeout", "8Duration")));
  __tsan_release(mu);
  const bool timed_out = real(this, mu, timeout);
  __tsan_acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  using Fn = bool (*)(CondVar*, Mutex*, Time);
  static const Fn real = reinterpret_cast<Fn>(Real(CondVarMethod("WaitWithDeadline", "4Time")));
  __tsan_release(mu);
  const bool timed_out = real(this, mu, deadline);
  __tsan_acquire(mu);
  return timed_out;
}

ABSL_NAMESPACE_END
}  // namespace absl
