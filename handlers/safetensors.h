// Zero-copy safetensors reading (mmap) and writing, with LibTorch tensors.
//
// Ownership: SafetensorsFile owns a private, copy-on-write memory mapping of the file. Every tensor
// returned by Get() for a natively supported dtype is a view over that mapping that holds a
// shared_ptr to it, so the mapping stays alive while any view does, even after the
// SafetensorsFile is destroyed. Pages are read from disk only when touched. Writing into a view
// never changes the file (MAP_PRIVATE). F8_E4M3 / F8_E5M2 (no LibTorch 1.13 dtype) are decoded and
// upcast to float32 on Get() (a copy). Tensors whose data are not aligned to their element size are
// copied into aligned memory.
//
// Thread-safety: a SafetensorsFile is immutable after Open(); all methods are const and safe to
// call concurrently.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "absl/status/statusor.h"
#include "handlers/safetensors_format.h"

namespace ds {

// An ordered name -> tensor map (the shape of a state dict).
using TensorMap = std::map<std::string, torch::Tensor>;

class MappedFile;

class SafetensorsFile {
 public:
  // Maps and validates `path`. NOT_FOUND if it does not exist; INVALID_ARGUMENT (naming the file
  // and tensor) if the header is invalid (see safetensors::ParseHeader); INTERNAL for I/O errors.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const safetensors::Header& header() const { return header_; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  std::vector<std::string> names() const;  // in file order
  bool contains(const std::string& name) const;
  // NOT_FOUND naming the file and the tensor when absent.
  absl::StatusOr<const safetensors::TensorInfo*> info(const std::string& name) const;

  // The tensor `name` (view over the mapping; see the header comment). NOT_FOUND when absent.
  absl::StatusOr<torch::Tensor> Get(const std::string& name) const;
  // Every tensor, as views.
  absl::StatusOr<TensorMap> GetAll() const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::shared_ptr<MappedFile> mapping_;
  safetensors::Header header_;
  std::map<std::string, std::size_t> index_;  // name -> position in header_.tensors
};

// The weights of a (possibly sharded) checkpoint: either one .safetensors file or a
// `*.safetensors.index.json` whose "weight_map" names the shard of every tensor (shards resolved
// relative to the index file). Tensors are views as above.
// NOT_FOUND for missing files; INVALID_ARGUMENT for a malformed index, a tensor listed in the index
// but absent from its shard, a tensor present in two shards, or a shard tensor not in the index.
absl::StatusOr<TensorMap> LoadSafetensorsWeights(const std::string& path);

// Writes tensors (any device/dtype LibTorch can hold, made contiguous on CPU) and metadata
// atomically: to `path`.tmp.<pid>, fsync, rename. INVALID_ARGUMENT for unsupported dtypes or bad
// names; INTERNAL for I/O errors (the destination is left untouched).
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace ds
