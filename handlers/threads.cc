#include "handlers/threads.h"

#include <ATen/Parallel.h>

#include <thread>

namespace ds {

int DefaultThreadCount() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

int SetIntraOpThreads(int threads) {
  if (threads <= 0) threads = DefaultThreadCount();
  at::set_num_threads(threads);
  return at::get_num_threads();
}

}  // namespace ds
