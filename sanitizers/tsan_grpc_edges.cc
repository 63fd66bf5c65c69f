// ThreadSanitizer builds only (linked, with tsan_absl_mutex.cc, into every executable of a
// DS_SANITIZE=thread build by CMakeLists.txt): makes gRPC core's completion hand-over visible to
// TSan.
//
// Debian's gRPC is not built with TSan. A batch of operations (a stream's write, a finish) is set
// up by inline grpcpp code on the calling thread — the CallOpSet and its completion tag — and
// given to core with grpc_call_start_batch(tag); core completes it on one of its threads and
// hands the tag back through a completion queue, where inline grpcpp code reads the same objects
// (CallbackWithSuccessTag::Run, CallOpSet::FinalizeResult) before any user callback runs. Core
// passes the tag through lock-free queues TSan cannot see, so every such read would be reported
// against the set-up. These definitions interpose the entry points libgrpc++ calls, call the
// library's own (dlsym(RTLD_NEXT)), and add the edge gRPC guarantees: the start of a batch
// happens-before its completion is delivered (__tsan_release on the tag before
// grpc_call_start_batch, __tsan_acquire on it when grpc_completion_queue_next / _pluck return it).
// The callback API's nexting threads and the async API's completion queues both come through
// these.
#include <dlfcn.h>
#include <grpc/grpc.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

namespace {

template <typename Fn>
Fn Real(const char* name) {
  void* fn = dlsym(RTLD_NEXT, name);
  if (fn == nullptr) {
    std::fprintf(stderr, "tsan_grpc_edges: %s not found in the gRPC library\n", name);
    std::abort();
  }
  return reinterpret_cast<Fn>(fn);
}

void Acquired(const grpc_event& event) {
  if (event.type == GRPC_OP_COMPLETE && event.tag != nullptr) __tsan_acquire(event.tag);
}

}  // namespace

extern "C" {

grpc_call_error grpc_call_start_batch(grpc_call* call, const grpc_op* ops, size_t nops, void* tag,
                                      void* reserved) {
  using Fn = grpc_call_error (*)(grpc_call*, const grpc_op*, size_t, void*, void*);
  static const Fn real = Real<Fn>("grpc_call_start_batch");
  if (tag != nullptr) __tsan_release(tag);
  return real(call, ops, nops, tag, reserved);
}

grpc_event grpc_completion_queue_next(grpc_completion_queue* cq, gpr_timespec deadline,
                                      void* reserved) {
  using Fn = grpc_event (*)(grpc_completion_queue*, gpr_timespec, void*);
  static const Fn real = Real<Fn>("grpc_completion_queue_next");
  const grpc_event event = real(cq, deadline, reserved);
  Acquired(event);
  return event;
}

grpc_event grpc_completion_queue_pluck(grpc_completion_queue* cq, void* tag, gpr_timespec deadline,
                                       void* reserved) {
  using Fn = grpc_event (*)(grpc_completion_queue*, void*, gpr_timespec, void*);
  static const Fn real = Real<Fn>("grpc_completion_queue_pluck");
  const grpc_event event = real(cq, tag, deadline, reserved);
  Acquired(event);
  return event;
}

}  // extern "C"
