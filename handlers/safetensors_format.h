// The safetensors file format, without LibTorch: header parsing/validation and serialization.
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data area.
// The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
// to the data area) plus an optional "__metadata__" string->string map.
//
// Everything here is a pure function over bytes: cheap to unit-test and to fuzz
// (fuzz/safetensors_header_fuzz.cc). Thread-safe (no shared state).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ds::safetensors {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

// "F32" -> kF32 etc. INVALID_ARGUMENT for an unknown name.
absl::StatusOr<DType> ParseDType(std::string_view name);
std::string_view DTypeName(DType dtype);
// Bytes per element.
std::size_t DTypeSize(DType dtype);

// Exact decoding of the 8-bit float formats to float32 (every value is representable).
// F8_E4M3 is OCP "e4m3fn": bias 7, subnormals, no infinities, 0x7F and 0xFF are NaN (max 448).
// F8_E5M2: bias 15, subnormals, IEEE-like infinities (0x7C, 0xFC) and NaNs (max 57344).
float F8E4M3ToFloat(uint8_t bits);
float F8E5M2ToFloat(uint8_t bits);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset of the first byte, relative to the data area
  uint64_t end = 0;    // one past the last byte, relative to the data area
  // Product of `shape` (1 for a scalar, 0 if any dimension is 0); -1 if a dimension is negative or
  // the product overflows int64 (never for a TensorInfo that ParseHeader returned).
  int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // ordered by data offset (file order); ties (zero-size
                                    // tensors) by name
  std::map<std::string, std::string> metadata;  // the "__metadata__" map (empty when absent)
  uint64_t data_offset = 0;  // absolute offset of the data area in the file (8 + header length)
  uint64_t data_size = 0;    // bytes in the data area
};

// Largest accepted JSON header (the reference implementation's limit).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Parses and strictly validates a header. `prefix` holds the first bytes of the file (at least
// 8 + header length of them; the whole file is fine); `file_size` is the full file size. `source`
// names the file in error messages.
//
// Returns INVALID_ARGUMENT naming `source` (and the tensor where one is at fault) for: a file
// shorter than 8 bytes, a header length beyond the file or over kMaxHeaderBytes, invalid JSON or a
// non-object header, a bad "__metadata__" (not a string->string object), an unknown dtype, a
// malformed shape or data_offsets, shape x dtype size != byte range, offsets outside the data area,
// overlapping ranges, gaps between ranges or unused trailing bytes (ranges must tile the data area
// contiguously), duplicate names, and a truncated file. Also rejected: duplicate keys anywhere in
// the JSON, a tensor entry missing "dtype", "shape" or "data_offsets", shape dimensions or offsets
// that are not non-negative integers (1.0 is not an integer) or exceed int64, JSON nested deeper
// than a header needs, and invalid UTF-8. Unknown keys inside a tensor entry are ignored, as the
// reference implementation does. Empty tensor names are accepted (the reference accepts them).
absl::StatusOr<Header> ParseHeader(std::string_view prefix, uint64_t file_size,
                                   std::string_view source);

// One tensor to serialize: raw little-endian bytes in `data` (size must equal numel x dtype size).
struct RawTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::string_view data;
};

// Serializes tensors (in the given order) and metadata into a complete safetensors file image.
// The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
// INVALID_ARGUMENT on duplicate/empty names, a name "__metadata__", or a size mismatch.
// Also INVALID_ARGUMENT for a negative dimension and for names or metadata that are not valid
// UTF-8.
absl::StatusOr<std::string> Serialize(const std::vector<RawTensor>& tensors,
                                      const std::map<std::string, std::string>& metadata);

// The first part of what Serialize returns: the 8-byte length and the padded JSON header for
// tensors laid out contiguously in the given order (`begin`/`end` of the inputs are ignored). The
// data area that must follow holds each tensor's numel() x DTypeSize() bytes in the same order. For
// writers that stream large tensors instead of building the whole image in memory. Same errors as
// Serialize (except the data size check, which is the caller's to keep).
absl::StatusOr<std::string> SerializeHeader(const std::vector<TensorInfo>& tensors,
                                            const std::map<std::string, std::string>& metadata);

// Parses a sharded checkpoint's `*.safetensors.index.json` text and returns its "weight_map"
// (tensor name -> shard file name). Other top-level keys ("metadata") are ignored. `source` names
// the file in error messages. INVALID_ARGUMENT for invalid JSON, duplicate keys, a non-object root,
// a missing, empty or non-object "weight_map", a non-string or empty shard name, and a shard name
// that is an absolute path or has a ".." component (shards must live under the index's folder).
absl::StatusOr<std::map<std::string, std::string>> ParseIndexWeightMap(std::string_view json_text,
                                                                       std::string_view source);

}  // namespace ds::safetensors
