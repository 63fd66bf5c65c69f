#include "handlers/text_encoder.h"

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

std::string Shape(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

}  // namespace

absl::StatusOr<TokenInputs> PrepareTokenInputs(absl::string_view model,
                                               const torch::Tensor& input_ids,
                                               const torch::Tensor& attention_mask,
                                               int64_t vocab_size, int64_t max_length,
                                               const torch::Device& device,
                                               torch::ScalarType mask_dtype) {
  if (!input_ids.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(model, ": 'input_ids' is undefined"));
  }
  if (input_ids.dim() != 2 || input_ids.size(0) < 1 || input_ids.size(1) < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        model, ": 'input_ids' must be [batch, sequence] with both >= 1, got ", Shape(input_ids)));
  }
  if (!c10::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false)) {
    return absl::InvalidArgumentError(
        absl::StrCat(model, ": 'input_ids' ", Shape(input_ids), " must be an integer tensor, got ",
                     c10::toString(input_ids.scalar_type())));
  }
  if (max_length >= 0 && input_ids.size(1) > max_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        model, ": 'input_ids' ", Shape(input_ids), " has ", input_ids.size(1),
        " tokens, more than max_position_embeddings ", max_length));
  }
  if (attention_mask.defined()) {
    if (attention_mask.sizes() != input_ids.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat(model, ": 'attention_mask' ",
                                                     Shape(attention_mask), " must have the shape of 'input_ids' ",
                                                     Shape(input_ids)));
    }
    if (attention_mask.is_complex()) {
      return absl::InvalidArgumentError(absl::StrCat(model, ": 'attention_mask' must be real, got ",
                                                     c10::toString(attention_mask.scalar_type())));
    }
  }
  // The first id out of range, as (flat index, id), or (-1, 0).
  ASSIGN_OR_RETURN(auto bad, TorchCall(absl::StrCat(model, ": checking input_ids"), [&] {
                     const torch::Tensor ids = input_ids.to(torch::kCPU, torch::kLong).contiguous();
                     const torch::Tensor out = (ids < 0).logical_or(ids >= vocab_size).flatten();
                     const torch::Tensor where = out.nonzero();
                     if (where.numel() == 0) return std::make_pair<int64_t, int64_t>(-1, 0);
                     const int64_t flat = where[0][0].item<int64_t>();
                     return std::make_pair(flat, ids.flatten()[flat].item<int64_t>());
                   }));
  if (bad.first >= 0) {
    const int64_t row = bad.first / input_ids.size(1), col = bad.first % input_ids.size(1);
    return absl::InvalidArgumentError(absl::StrCat(
        model, ": 'input_ids' ", Shape(input_ids), " holds id ", bad.second, " at [", row, ", ",
        col, "], outside the vocabulary [0, ", vocab_size, ")"));
  }
  return TorchCall(absl::StrCat(model, ": preparing inputs"), [&] {
    TokenInputs out;
    out.input_ids = input_ids.to(device, torch::kLong);
    if (attention_mask.defined()) out.attention_mask = attention_mask.to(device, mask_dtype);
    return out;
  });
}

}  // namespace ds
