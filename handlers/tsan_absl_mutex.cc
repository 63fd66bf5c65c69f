// ThreadSanitizer builds only (linked into every executable of a DS_SANITIZE=thread build by
// CMakeLists.txt): makes absl::Mutex's lock edges visible to TSan.
//
// Debian's Abseil is not built with TSan, so its Mutex never tells TSan that an Unlock
// happens-before the next Lock of the same mutex, and every access the project guards with one
// would be reported as a race. These definitions interpose the four entry points the project uses
// (absl::MutexLock and absl::ReaderMutexLock call them; nothing here uses Await, LockWhen or
// CondVar), call the library's own implementation (looked up with dlsym(RTLD_NEXT)) and add the
// edges with __tsan_release before an unlock and __tsan_acquire after a lock, on the mutex's
// address. Reader unlocks release too: a later writer then happens-after every reader.
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

// The library's definition of absl::Mutex::<method> (Itanium mangling, with Abseil's inline
// namespace when it has one); aborts when it cannot be found.
MutexFn Real(const std::string& method) {
  std::string name = "_ZN4absl";
#if ABSL_OPTION_USE_INLINE_NAMESPACE
  const std::string ns = DS_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  name += std::to_string(ns.size()) + ns;
#endif
  name += "5Mutex" + std::to_string(method.size()) + method + "Ev";
  void* fn = dlsym(RTLD_NEXT, name.c_str());
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_absl_mutex: %s not found in the Abseil library\n", name.c_str());
    std::abort();
  }
  return reinterpret_cast<MutexFn>(fn);
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const MutexFn real = Real("Lock");
  real(this);
  __tsan_acquire(this);
}

void Mutex::Unlock() {
  static const MutexFn real = Real("Unlock");
  __tsan_release(this);
  real(this);
}

void Mutex::ReaderLock() {
  static const MutexFn real = Real("ReaderLock");
  real(this);
  __tsan_acquire(this);
}

void Mutex::ReaderUnlock() {
  static const MutexFn real = Real("ReaderUnlock");
  __tsan_release(this);
  real(this);
}

ABSL_NAMESPACE_END
}  // namespace absl
