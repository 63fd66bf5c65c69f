// LibTorch intra-op threading. LibTorch defaults to one thread on this platform's build, so every
// binary sets it explicitly from its --threads flag.
#pragma once

namespace ds {

// Number of hardware threads (at least 1).
int DefaultThreadCount();

// Sets LibTorch's intra-op threads (and OpenMP's) to `threads`; <= 0 means DefaultThreadCount().
// Returns the count in effect. Call once at startup, before any tensor work.
int SetIntraOpThreads(int threads);

}  // namespace ds
