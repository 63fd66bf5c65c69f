// Tensors on the wire: diffusion.v1.Tensor (dtype, shape, raw little-endian row-major bytes) to
// and from torch::Tensor.
//
// Reentrant; no shared state.
#pragma once

#include <torch/types.h>

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "diffusion/v1/diffusion.pb.h"

namespace ds::server {

// A CPU tensor owning a copy of the bytes. INVALID_ARGUMENT naming `field` (e.g.
// "inputs['txt_ids']") for DTYPE_UNSPECIFIED or an unknown dtype, more than 8 dimensions, a
// negative dimension, an element count that overflows, or `data` whose size is not
// prod(shape) * element size (both sizes stated).
absl::StatusOr<torch::Tensor> TensorFromProto(const diffusion::v1::Tensor& proto,
                                              const std::string& field);

// Writes `tensor` (any device, any layout) as contiguous CPU bytes. INVALID_ARGUMENT for a dtype
// the API has no name for; INTERNAL if LibTorch fails.
absl::Status TensorToProto(const torch::Tensor& tensor, diffusion::v1::Tensor* proto);

}  // namespace ds::server
