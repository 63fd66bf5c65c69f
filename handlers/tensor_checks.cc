#include "handlers/tensor_checks.h"

#include <torch/torch.h>

#include <cstdint>
#include <cstring>

#include "handlers/status.h"

namespace ds {
namespace {

// True when no element's exponent field is all ones (the encoding of Inf and NaN). Elements are
// checked in blocks with a branch-free OR so the compiler vectorizes the inner loop; the scan stops
// at the first block with a bad value.
template <typename Bits>
bool ExponentsFinite(const void* data, int64_t n, Bits mask) {
  const auto* p = static_cast<const unsigned char*>(data);
  constexpr int64_t kBlock = 1024;
  Bits block[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - i);
    std::memcpy(block, p + i * sizeof(Bits), static_cast<size_t>(m) * sizeof(Bits));
    bool bad = false;
    for (int64_t j = 0; j < m; ++j) bad |= (block[j] & mask) == mask;
    if (bad) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<bool> AllFinite(const torch::Tensor& t) {
  if (!t.defined() || t.numel() == 0 || !t.is_floating_point()) return true;
  return TorchCall("finiteness check", [&]() -> bool {
    if (!t.is_cpu()) return torch::isfinite(t).all().item<bool>();
    const torch::Tensor c = t.contiguous();
    const void* data = c.data_ptr();
    const int64_t n = c.numel();
    switch (c.scalar_type()) {
      case torch::kFloat:
        return ExponentsFinite<uint32_t>(data, n, 0x7f800000u);
      case torch::kDouble:
        return ExponentsFinite<uint64_t>(data, n, 0x7ff0000000000000ull);
      case torch::kBFloat16:
        return ExponentsFinite<uint16_t>(data, n, 0x7f80u);
      case torch::kHalf:
        return ExponentsFinite<uint16_t>(data, n, 0x7c00u);
      default:  // float8 and others: LibTorch's check
        return torch::isfinite(c.to(torch::kFloat)).all().item<bool>();
    }
  });
}

}  // namespace ds
