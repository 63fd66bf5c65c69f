// libFuzzer target: safetensors header parsing (and index parsing), with invariants on every
// accepted header and a Serialize -> ParseHeader round trip.
//
// Input: a whole safetensors file image. Build and run: see fuzz/CMakeLists.txt.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "handlers/safetensors_format.h"

namespace {

using ds::safetensors::DTypeSize;
using ds::safetensors::Header;
using ds::safetensors::ParseHeader;
using ds::safetensors::RawTensor;
using ds::safetensors::TensorInfo;

void Require(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

bool SameTensors(const Header& a, const Header& b) {
  if (a.tensors.size() != b.tensors.size()) return false;
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    const TensorInfo& x = a.tensors[i];
    const TensorInfo& y = b.tensors[i];
    if (x.name != y.name || x.dtype != y.dtype || x.shape != y.shape || x.begin != y.begin ||
        x.end != y.end) {
      return false;
    }
  }
  return a.metadata == b.metadata && a.data_size == b.data_size;
}

void CheckInvariants(const Header& header, std::size_t file_size) {
  Require(header.data_offset >= 8 && header.data_offset + header.data_size == file_size,
          "data area bounds");
  uint64_t cursor = 0;
  for (const TensorInfo& t : header.tensors) {
    Require(t.begin == cursor, "tensors tile the data area in order");
    const int64_t numel = t.numel();
    Require(numel >= 0, "numel is valid");
    Require(static_cast<uint64_t>(numel) * DTypeSize(t.dtype) == t.end - t.begin,
            "byte range matches shape x dtype");
    cursor = t.end;
  }
  Require(cursor == header.data_size, "no trailing bytes");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  auto header = ParseHeader(input, size, "fuzz.safetensors");

  // Only the header bytes are needed: a half prefix either fails or agrees with the full parse.
  auto partial = ParseHeader(input.substr(0, size / 2), size, "fuzz.safetensors");
  if (partial.ok()) Require(header.ok() && SameTensors(*partial, *header), "prefix parse agrees");

  // The JSON part also feeds the index parser.
  if (size >= 8) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
    if (n <= size - 8) {
      auto index = ds::safetensors::ParseIndexWeightMap(input.substr(8, n), "fuzz.index.json");
      Require(index.ok() || index.status().code() == absl::StatusCode::kInvalidArgument,
              "index errors are INVALID_ARGUMENT");
    }
  }

  if (!header.ok()) {
    Require(header.status().code() == absl::StatusCode::kInvalidArgument,
            "header errors are INVALID_ARGUMENT");
    return 0;
  }
  CheckInvariants(*header, size);

  // Round trip. Serialize refuses empty names, which the reader accepts.
  std::vector<RawTensor> raw;
  for (const TensorInfo& t : header->tensors) {
    if (t.name.empty()) return 0;
    raw.push_back(
        {t.name, t.dtype, t.shape, input.substr(header->data_offset + t.begin, t.end - t.begin)});
  }
  auto image = ds::safetensors::Serialize(raw, header->metadata);
  Require(image.ok(), "an accepted header serializes");
  auto again = ParseHeader(*image, image->size(), "roundtrip.safetensors");
  Require(again.ok(), "a serialized image parses");
  Require(again->data_offset % 8 == 0, "serialized header is padded");
  Require(SameTensors(*header, *again), "round trip keeps tensors and metadata");
  Require(std::string_view(*image).substr(again->data_offset) == input.substr(header->data_offset),
          "round trip keeps the data");
  return 0;
}
