#include "server/tensor_proto.h"

#include <torch/torch.h>

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::server {
namespace {

namespace pb = ::diffusion::v1;

// The wire format is little-endian; so is every host this server builds for.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tensor bytes are little-endian");

constexpr int kMaxDims = 8;

absl::StatusOr<torch::Dtype> FromProtoDtype(pb::DType dtype, const std::string& field) {
  switch (dtype) {
    case pb::FLOAT32:
      return torch::kFloat32;
    case pb::BFLOAT16:
      return torch::kBFloat16;
    case pb::FLOAT16:
      return torch::kFloat16;
    case pb::FLOAT64:
      return torch::kFloat64;
    case pb::INT64:
      return torch::kInt64;
    case pb::INT32:
      return torch::kInt32;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".dtype: ",
                       dtype == pb::DTYPE_UNSPECIFIED ? std::string("required")
                                                      : absl::StrCat("unknown value ", dtype),
                       " (FLOAT32, BFLOAT16, FLOAT16, FLOAT64, INT64, INT32)"));
  }
}

}  // namespace

absl::StatusOr<torch::Tensor> TensorFromProto(const pb::Tensor& proto, const std::string& field) {
  ASSIGN_OR_RETURN(torch::Dtype dtype, FromProtoDtype(proto.dtype(), field));
  if (proto.shape_size() > kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".shape: ", proto.shape_size(), " dimensions, at most ", kMaxDims));
  }
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  int64_t count = 1;
  for (int64_t d : proto.shape()) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape: negative dimension ", d));
    }
    if (d > 0 && count > std::numeric_limits<int64_t>::max() / element / d) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".shape: too many elements"));
    }
    count *= d;
  }
  const int64_t expected = count * element;
  if (static_cast<int64_t>(proto.data().size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".data: ", proto.data().size(), " bytes, expected ", expected, " for ",
                     pb::DType_Name(proto.dtype()), " [", absl::StrJoin(proto.shape(), ", "), "]"));
  }
  std::vector<int64_t> shape(proto.shape().begin(), proto.shape().end());
  return TorchCall(absl::StrCat("decoding ", field), [&] {
    torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(dtype));
    if (expected > 0) std::memcpy(t.data_ptr(), proto.data().data(), expected);
    return t;
  });
}

absl::Status TensorToProto(const torch::Tensor& tensor, pb::Tensor* proto) {
  pb::DType dtype;
  switch (tensor.scalar_type()) {
    case torch::kFloat32:
      dtype = pb::FLOAT32;
      break;
    case torch::kBFloat16:
      dtype = pb::BFLOAT16;
      break;
    case torch::kFloat16:
      dtype = pb::FLOAT16;
      break;
    case torch::kFloat64:
      dtype = pb::FLOAT64;
      break;
    case torch::kInt64:
      dtype = pb::INT64;
      break;
    case torch::kInt32:
      dtype = pb::INT32;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tensor dtype ", c10::toString(tensor.scalar_type()), " has no API name"));
  }
  ASSIGN_OR_RETURN(torch::Tensor cpu, TorchCall("encoding a tensor", [&] {
                     return tensor.to(torch::kCPU).contiguous();
                   }));
  proto->set_dtype(dtype);
  proto->clear_shape();
  for (int64_t d : cpu.sizes()) proto->add_shape(d);
  const size_t bytes = static_cast<size_t>(cpu.numel()) * cpu.element_size();
  if (bytes == 0) {
    proto->clear_data();
  } else {
    proto->set_data(static_cast<const char*>(cpu.data_ptr()), bytes);
  }
  return absl::OkStatus();
}

}  // namespace ds::server
