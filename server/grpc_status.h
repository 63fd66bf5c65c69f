// The one place where absl::Status becomes grpc::Status (the RPC edge). Everything below the
// service speaks absl::Status.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace ds::server {

// Same code (absl and gRPC share the canonical code numbers) and message. OK maps to OK; a code
// outside the canonical range becomes UNKNOWN.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace ds::server
