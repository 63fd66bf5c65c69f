// Content digests (SHA-256, OpenSSL) for content-addressed artifacts such as LoRA adapters.
//
// Thread-safety: reentrant.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"

namespace ds {

// Lower-case hex SHA-256 of `size` bytes at `data`.
std::string Sha256Hex(const void* data, size_t size);

// SHA-256 of a file's bytes (read in chunks, not mapped). NOT_FOUND if it does not exist;
// INTERNAL for a read error; both name the file.
absl::StatusOr<std::string> Sha256File(const std::string& path);

}  // namespace ds
