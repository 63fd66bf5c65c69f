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
// Views of one SafetensorsFile share its mapping: writing into a view changes what later Get()
// calls on the same SafetensorsFile return (never the file, nor another Open() of it). Clone a
// tensor before modifying it in place if the file's values must stay visible.
//
// Thread-safety: a SafetensorsFile is immutable after Open(); all methods are const and safe to
// call concurrently.
#pragma once

#include <torch/types.h>

#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/safetensors_format.h"

namespace ds {

// An ordered name -> tensor map (the shape of a state dict).
using TensorMap = std::map<std::string, torch::Tensor>;

class MappedFile;

class SafetensorsFile {
 public:
  // Maps and validates `path`. NOT_FOUND if it does not exist; INVALID_ARGUMENT (naming the file
  // and tensor) if the header is invalid (see safetensors::ParseHeader) or `path` is not a regular
  // file; INTERNAL for I/O errors. Only the header pages are read here. The mapping is guarded
  // (handlers/mapping_guard.h): if the file is truncated while mapped, the vanished pages read as
  // zeros instead of raising SIGBUS, and CheckUnchanged() / an enclosing MappedReadScope reports
  // it; loaders check before they commit.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const safetensors::Header& header() const { return header_; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  std::vector<std::string> names() const;  // in file order
  bool contains(const std::string& name) const;
  // NOT_FOUND naming the file and the tensor when absent. The pointer lives as long as this object.
  absl::StatusOr<const safetensors::TensorInfo*> info(const std::string& name) const;
  // The whole file as mapped (valid while this object lives; do not write through it). The data
  // of every view returned by Get() lies inside it.
  std::string_view mapped_bytes() const;
  // The file's version as the filesystem reported it when mapped: device, inode, size and the
  // modification and status-change times (ns). Rewriting the file changes the status-change time,
  // which only the kernel sets, so an equal identity means the same bytes (as git's index assumes).
  const std::string& identity() const;
  // OK, or DATA_LOSS naming the file if it was truncated or modified in place since Open()
  // (MappingHealth::Check).
  absl::Status CheckUnchanged() const;

  // The tensor `name` (view over the mapping; see the header comment). NOT_FOUND when absent;
  // INTERNAL if LibTorch fails (e.g. out of memory for an F8 or misaligned copy). Views do not
  // require grad. A zero-element tensor is a fresh empty tensor rather than a view.
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
// relative to the index file; a path ending in ".json" is taken as an index). Tensors are views as
// above. NOT_FOUND for missing files (index or shard); INVALID_ARGUMENT for a malformed index (see
// safetensors::ParseIndexWeightMap), an invalid shard, a tensor listed in the index but absent from
// its shard, a tensor present in two shards, or a shard tensor not in the index.
absl::StatusOr<TensorMap> LoadSafetensorsWeights(const std::string& path);

// Writes tensors (any device/dtype LibTorch can hold, made contiguous on CPU) and metadata
// atomically: to `path`.tmp.<pid>.<n> (n unique within the process), fsync, rename, fsync of the
// folder. Tensor data are streamed to the file (no second in-memory copy of a CPU tensor that is
// already contiguous). The data area holds the tensors by element size, largest first, and in the
// given order (TensorMap: name order) within one size, as the reference writer does: with the
// 8-aligned data area every tensor is then aligned to its element size, so reading gives views.
// INVALID_ARGUMENT for unsupported dtypes (complex, quantized, ...), non-strided or undefined
// tensors, and bad names (see safetensors::Serialize); INTERNAL for I/O errors (the destination is
// left untouched and the temporary file removed). Thread-safe for distinct paths.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata = {});
// Makes `WriteSafetensors(path, {{"a", t}, {"b", u}})` unambiguous; keeps the given order.
absl::Status WriteSafetensors(const std::string& path,
                              std::initializer_list<std::pair<std::string, torch::Tensor>> tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace ds
