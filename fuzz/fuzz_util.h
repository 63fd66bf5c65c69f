// Helpers shared by the libFuzzer harnesses in fuzz/ (header-only, test code; never linked into
// the server).
//
//   Require            aborts with a message when a harness invariant is broken (a finding).
//   MemFile            bytes behind a path (/proc/self/fd/N of a memfd) for the APIs that take
//                      file paths, without touching the disk.
//   SeedWriter         DS_FUZZ_WRITE_SEEDS=<dir>: a harness writes its seed corpus there and exits
//                      (how fuzz/corpus/* are generated; see fuzz/CMakeLists.txt).
//   TensorListInput    the text encoding of "a checkpoint" (key, shape, dtype, value lines and
//                      metadata lines) that the LoRA and single-file harnesses decode, and its
//                      safetensors image.
//
// Thread-safety: none needed (libFuzzer runs one input at a time).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/safetensors_format.h"

namespace ds::fuzz {

// Aborts (a crash libFuzzer records) with `what` when `condition` is false.
inline void Require(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "fuzz invariant violated: %s\n", what);
    std::abort();
  }
}

// An anonymous in-memory file holding `bytes`, reachable by path() while this object lives.
class MemFile {
 public:
  explicit MemFile(std::string_view bytes) {
    fd_ = memfd_create("ds-fuzz", MFD_CLOEXEC);
    Require(fd_ >= 0, "memfd_create failed");
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = write(fd_, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      Require(n > 0, "writing the memfd failed");
      done += static_cast<std::size_t>(n);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// With DS_FUZZ_WRITE_SEEDS set, Write() stores a seed file in that directory; the harness calls
// Finish() at the end of its seed generation, which exits the process.
class SeedWriter {
 public:
  // nullopt when DS_FUZZ_WRITE_SEEDS is not set (the normal case).
  static std::optional<SeedWriter> FromEnv() {
    const char* dir = std::getenv("DS_FUZZ_WRITE_SEEDS");
    if (dir == nullptr || *dir == '\0') return std::nullopt;
    return SeedWriter(dir);
  }
  void Write(const std::string& name, std::string_view bytes) {
    const std::string path = dir_ + "/" + name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    Require(static_cast<bool>(out), "cannot write a seed file");
    ++count_;
  }
  [[noreturn]] void Finish() {
    std::printf("wrote %d seeds to %s\n", count_, dir_.c_str());
    std::exit(0);
  }

 private:
  explicit SeedWriter(std::string dir) : dir_(std::move(dir)) {}
  std::string dir_;
  int count_ = 0;
};

// ---------------------------------------------------------------------------------------------
// TensorListInput: the text form of a checkpoint's keys. One entry per line ('\n'):
//
//   <name> TAB <shape> [TAB <dtype> [TAB <value>]]   a tensor
//   @<key>=<value>                                   a __metadata__ entry (value to end of line)
//
// <shape> is comma-separated decimal dimensions ("" = a scalar, "4,8" = [4, 8]); <dtype> a
// safetensors dtype name (F32 when absent or empty); <value> a number, "nan", "inf" or "-inf"
// that fills the tensor (absent: the pattern ((i % 7) - 3) / 8, i the element index, so that
// matrices are not degenerate). Lines that are not of this form are ignored, so mutations that
// break a line only drop it.
//
// Limits keep every execution fast: at most kMaxEntries tensors, kMaxRank dims, and kMaxElements
// elements over all tensors; an input beyond them is skipped (Decode returns nullopt).
struct TensorEntry {
  std::string name;
  safetensors::DType dtype = safetensors::DType::kF32;
  std::vector<int64_t> shape;
  std::optional<double> value;
};

struct TensorListInput {
  static constexpr std::size_t kMaxEntries = 512;
  static constexpr std::size_t kMaxRank = 6;
  static constexpr int64_t kMaxElements = int64_t{1} << 16;

  std::vector<TensorEntry> entries;
  std::map<std::string, std::string> metadata;

  static std::optional<TensorListInput> Decode(std::string_view text) {
    TensorListInput out;
    int64_t total = 0;
    while (!text.empty()) {
      const std::size_t nl = text.find('\n');
      std::string_view line = text.substr(0, nl);
      text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
      if (line.empty()) continue;
      if (line[0] == '@') {
        const std::size_t eq = line.find('=');
        if (eq == std::string_view::npos) continue;
        out.metadata[std::string(line.substr(1, eq - 1))] = std::string(line.substr(eq + 1));
        continue;
      }
      std::vector<std::string_view> fields;
      while (true) {
        const std::size_t tab = line.find('\t');
        fields.push_back(line.substr(0, tab));
        if (tab == std::string_view::npos) break;
        line = line.substr(tab + 1);
      }
      if (fields.size() < 2 || fields.size() > 4) continue;
      TensorEntry e;
      e.name = std::string(fields[0]);
      if (!ParseShape(fields[1], &e.shape)) continue;
      if (fields.size() >= 3 && !fields[2].empty()) {
        auto dtype = safetensors::ParseDType(fields[2]);
        if (!dtype.ok()) continue;
        e.dtype = *dtype;
      }
      if (fields.size() == 4) {
        std::optional<double> v = ParseValue(fields[3]);
        if (!v.has_value()) continue;
        e.value = v;
      }
      int64_t numel = 1;
      for (int64_t d : e.shape) {
        numel *= d;  // every d <= kMaxElements and numel <= kMaxElements: no overflow
        if (numel > kMaxElements) return std::nullopt;
      }
      total += numel;
      if (total > kMaxElements || out.entries.size() == kMaxEntries) return std::nullopt;
      out.entries.push_back(std::move(e));
    }
    return out;
  }

  // The safetensors file image of the entries (in input order) and the metadata.
  // INVALID_ARGUMENT from safetensors::Serialize (duplicate or empty names, invalid UTF-8, ...).
  absl::StatusOr<std::string> ToSafetensors() const {
    std::vector<std::string> data(entries.size());
    std::vector<safetensors::RawTensor> raw;
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const TensorEntry& e = entries[i];
      int64_t numel = 1;
      for (int64_t d : e.shape) numel *= d;
      const std::size_t esize = safetensors::DTypeSize(e.dtype);
      data[i].resize(static_cast<std::size_t>(numel) * esize);
      for (int64_t j = 0; j < numel; ++j) {
        const double v = e.value.has_value() ? *e.value : ((j % 7) - 3) / 8.0;
        EncodeElement(e.dtype, v, &data[i][static_cast<std::size_t>(j) * esize]);
      }
      raw.push_back({e.name, e.dtype, e.shape, data[i]});
    }
    return safetensors::Serialize(raw, metadata);
  }

  // The text form (inverse of Decode for entries it accepts), for seed writers.
  static std::string Line(const std::string& name, const std::vector<int64_t>& shape,
                          const std::string& dtype = "", const std::string& value = "") {
    std::string s = name + "\t";
    for (std::size_t i = 0; i < shape.size(); ++i) {
      if (i > 0) s += ",";
      s += std::to_string(shape[i]);
    }
    if (!dtype.empty() || !value.empty()) s += "\t" + dtype;
    if (!value.empty()) s += "\t" + value;
    return s + "\n";
  }

 private:
  static bool ParseShape(std::string_view s, std::vector<int64_t>* shape) {
    if (s.empty()) return true;
    while (true) {
      const std::size_t comma = s.find(',');
      const std::string_view part = s.substr(0, comma);
      if (part.empty() || part.size() > 6) return false;
      int64_t d = 0;
      for (char c : part) {
        if (c < '0' || c > '9') return false;
        d = d * 10 + (c - '0');
      }
      if (d > kMaxElements || shape->size() == kMaxRank) return false;
      shape->push_back(d);
      if (comma == std::string_view::npos) return true;
      s = s.substr(comma + 1);
    }
  }

  static std::optional<double> ParseValue(std::string_view s) {
    if (s == "nan") return std::nan("");
    if (s == "inf") return HUGE_VAL;
    if (s == "-inf") return -HUGE_VAL;
    if (s.empty() || s.size() > 32) return std::nullopt;
    const std::string copy(s);
    char* end = nullptr;
    const double v = std::strtod(copy.c_str(), &end);
    if (end != copy.c_str() + copy.size()) return std::nullopt;
    return v;
  }

  template <typename T>
  static void Put(T v, char* out) {
    std::memcpy(out, &v, sizeof(T));
  }

  // Integer conversions saturate (a double outside the range, or NaN, is undefined in C++).
  template <typename T>
  static T ToInt(double v) {
    if (!(v == v)) return 0;
    if (v <= static_cast<double>(std::numeric_limits<T>::min())) {
      return std::numeric_limits<T>::min();
    }
    if (v >= static_cast<double>(std::numeric_limits<T>::max())) {
      return std::numeric_limits<T>::max();
    }
    return static_cast<T>(v);
  }

  static uint16_t ToBF16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return static_cast<uint16_t>(bits >> 16);  // truncation: any value is fine for fuzzing
  }

  static uint16_t ToF16(float f) {
    // IEEE binary16 by truncation, with infinities, NaN and flushing tiny values to zero.
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const int32_t exp = static_cast<int32_t>((bits >> 23) & 0xFF) - 127 + 15;
    const uint32_t mant = bits & 0x7FFFFFu;
    if (((bits >> 23) & 0xFF) == 0xFF) return sign | 0x7C00u | (mant != 0 ? 0x200u : 0u);
    if (exp >= 31) return sign | 0x7C00u;
    if (exp <= 0) return sign;
    return static_cast<uint16_t>(sign | (exp << 10) | (mant >> 13));
  }

  static void EncodeElement(safetensors::DType dtype, double v, char* out) {
    using safetensors::DType;
    switch (dtype) {
      case DType::kF64:
        return Put<double>(v, out);
      case DType::kF32:
        return Put<float>(static_cast<float>(v), out);
      case DType::kF16:
        return Put<uint16_t>(ToF16(static_cast<float>(v)), out);
      case DType::kBF16:
        return Put<uint16_t>(ToBF16(static_cast<float>(v)), out);
      case DType::kI64:
        return Put<int64_t>(ToInt<int64_t>(v), out);
      case DType::kI32:
        return Put<int32_t>(ToInt<int32_t>(v), out);
      case DType::kI16:
        return Put<int16_t>(ToInt<int16_t>(v), out);
      case DType::kI8:
        return Put<int8_t>(ToInt<int8_t>(v), out);
      case DType::kU8:
        return Put<uint8_t>(ToInt<uint8_t>(v), out);
      case DType::kBool:
        return Put<uint8_t>(v != 0 ? 1 : 0, out);
      case DType::kF8E4M3:
      case DType::kF8E5M2:
        // Raw codes: the low byte of the value's integer part (every code is a valid input).
        return Put<uint8_t>(static_cast<uint8_t>(ToInt<int64_t>(v) & 0xFF), out);
    }
  }
};

}  // namespace ds::fuzz
