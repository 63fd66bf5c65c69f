#include "handlers/safetensors_format.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace ds::safetensors {
namespace {

using nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";

struct DTypeEntry {
  DType dtype;
  std::string_view name;
  std::size_t size;
};

constexpr std::array<DTypeEntry, 12> kDTypes = {{
    {DType::kF64, "F64", 8},
    {DType::kF32, "F32", 4},
    {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},
    {DType::kI64, "I64", 8},
    {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},
    {DType::kI8, "I8", 1},
    {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
    {DType::kF8E4M3, "F8_E4M3", 1},
    {DType::kF8E5M2, "F8_E5M2", 1},
}};

const DTypeEntry& Entry(DType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  return kDTypes[1];  // unreachable for a valid enum value
}

// Quotes a user-supplied string for an error message (escaped, truncated when huge).
std::string Quote(std::string_view s) {
  constexpr std::size_t kMaxShown = 200;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > kMaxShown) absl::StrAppend(&out, "...(", s.size(), " bytes)");
  out.push_back('\'');
  return out;
}

// Debian's Abseil has its own absl::string_view, which std::string_view does not convert to.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status FileError(std::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("safetensors file ", Quote(source), ": ", what));
}

absl::Status TensorError(std::string_view source, std::string_view tensor, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("safetensors file ", Quote(source), ": tensor ", Quote(tensor), ": ", what));
}

// numel x element size with overflow checks; false on a negative dimension or overflow.
bool CheckedByteSize(const std::vector<int64_t>& shape, std::size_t elem_size, uint64_t* bytes) {
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d == 0) {
      *bytes = 0;
      return true;
    }
  }
  uint64_t n = elem_size;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *bytes = n;
  return true;
}

// A JSON value for an error message, truncated when long.
std::string Brief(const json& value) {
  constexpr std::size_t kMaxShown = 100;
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > kMaxShown) text = absl::StrCat(text.substr(0, kMaxShown), "...");
  return text;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// A SAX consumer building a DOM like json::parse does, but rejecting duplicate object keys (the
// DOM parser silently keeps the last one) and nesting deeper than `max_depth`, and stopping at the
// first problem. The nlohmann parser itself is iterative, so hostile nesting cannot overflow the
// stack.
class StrictDomBuilder {
 public:
  StrictDomBuilder(json* root, std::size_t max_depth) : root_(root), max_depth_(max_depth) {}

  const std::string& error() const { return error_; }

  bool null() { return Add(nullptr) != nullptr; }
  bool boolean(bool v) { return Add(v) != nullptr; }
  bool number_integer(json::number_integer_t v) { return Add(v) != nullptr; }
  bool number_unsigned(json::number_unsigned_t v) { return Add(v) != nullptr; }
  bool number_float(json::number_float_t v, const json::string_t& /*raw*/) {
    return Add(v) != nullptr;
  }
  bool string(json::string_t& v) { return Add(std::move(v)) != nullptr; }
  bool binary(json::binary_t& /*v*/) { return Fail("binary values are not JSON"); }

  bool start_object(std::size_t /*len*/) { return Open(json::object()); }
  bool end_object() { return Close(); }
  bool start_array(std::size_t /*len*/) { return Open(json::array()); }
  bool end_array() { return Close(); }

  bool key(json::string_t& k) {
    const json& obj = *stack_.back();
    if (obj.find(k) != obj.end()) return Fail(absl::StrCat("duplicate key ", Quote(k), Where()));
    key_ = std::move(k);
    return true;
  }

  bool parse_error(std::size_t /*position*/, const std::string& /*last_token*/,
                   const nlohmann::detail::exception& ex) {
    return Fail(absl::StrCat("invalid JSON: ", ex.what()));
  }

 private:
  // Names the top-level entry (the tensor, or "__metadata__") being parsed, if any.
  std::string Where() const {
    return path_.size() > 1 ? absl::StrCat(" in ", Quote(path_[1])) : std::string();
  }

  bool Fail(std::string message) {
    if (error_.empty()) error_ = std::move(message);
    return false;
  }

  // Stores `v` at the current position and returns where it lives.
  json* Add(json v) {
    if (stack_.empty()) {
      *root_ = std::move(v);
      return root_;
    }
    json& top = *stack_.back();
    if (top.is_object()) {
      json& slot = top[key_];
      slot = std::move(v);
      return &slot;
    }
    top.push_back(std::move(v));
    return &top.back();
  }

  bool Open(json v) {
    if (stack_.size() >= max_depth_) {
      return Fail(absl::StrCat("JSON nested deeper than ", max_depth_, " levels", Where()));
    }
    // Only the innermost container is ever modified, so pointers to its ancestors stay valid.
    path_.push_back(stack_.empty() ? std::string() : (stack_.back()->is_object() ? key_ : ""));
    stack_.push_back(Add(std::move(v)));
    return true;
  }

  bool Close() {
    stack_.pop_back();
    path_.pop_back();
    return true;
  }

  json* root_;
  std::size_t max_depth_;
  std::vector<json*> stack_;
  std::vector<std::string> path_;  // the key each open container was stored under
  std::string key_;
  std::string error_;
};

// Parses `text` strictly (see StrictDomBuilder). On failure returns the reason.
absl::StatusOr<json> ParseStrictJson(std::string_view text, std::size_t max_depth) {
  // nlohmann's lexer takes a NUL byte for the end of input, which would accept "{}\0garbage".
  // JSON text never holds a raw NUL (inside strings it must be escaped).
  if (auto pos = text.find('\0'); pos != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: NUL byte at offset ", pos));
  }
  // nlohmann skips a UTF-8 byte order mark; JSON (RFC 8259) and the reference reader do not.
  if (text.substr(0, 3) == "\xEF\xBB\xBF") {
    return absl::InvalidArgumentError("invalid JSON: starts with a byte order mark");
  }
  json root;
  StrictDomBuilder builder(&root, max_depth);
  bool ok = false;
  try {
    ok = json::sax_parse(text.begin(), text.end(), &builder);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("invalid JSON: ", e.what()));
  }
  if (!ok) {
    return absl::InvalidArgumentError(builder.error().empty() ? "invalid JSON" : builder.error());
  }
  return root;
}

bool GetNonNegative(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

absl::StatusOr<TensorInfo> ParseTensorEntry(const std::string& name, const json& entry,
                                            uint64_t data_size, std::string_view source) {
  if (!entry.is_object()) return TensorError(source, name, "entry is not a JSON object");
  TensorInfo info;
  info.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return TensorError(source, name, "missing \"dtype\"");
  if (!dtype_it->is_string()) return TensorError(source, name, "\"dtype\" is not a string");
  auto dtype = ParseDType(dtype_it->get_ref<const std::string&>());
  if (!dtype.ok()) return TensorError(source, name, dtype.status().message());
  info.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return TensorError(source, name, "missing \"shape\"");
  if (!shape_it->is_array()) return TensorError(source, name, "\"shape\" is not an array");
  for (const json& d : *shape_it) {
    uint64_t dim = 0;
    if (!GetNonNegative(d, &dim) ||
        dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return TensorError(
          source, name,
          absl::StrCat("shape dimension ", Brief(d), " is not an integer in [0, 2^63)"));
    }
    info.shape.push_back(static_cast<int64_t>(dim));
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return TensorError(source, name, "missing \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2 ||
      !GetNonNegative((*offsets_it)[0], &info.begin) ||
      !GetNonNegative((*offsets_it)[1], &info.end)) {
    return TensorError(
        source, name,
        absl::StrCat("\"data_offsets\" ", Brief(*offsets_it), " is not two non-negative integers"));
  }
  if (info.begin > info.end) {
    return TensorError(
        source, name,
        absl::StrCat("data_offsets [", info.begin, ", ", info.end, "] end before they begin"));
  }
  if (info.end > data_size) {
    return TensorError(
        source, name,
        absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                     "] lie outside the data area of ", data_size, " bytes (truncated file?)"));
  }
  uint64_t bytes = 0;
  if (!CheckedByteSize(info.shape, DTypeSize(info.dtype), &bytes)) {
    return TensorError(source, name,
                       absl::StrCat("shape ", ShapeString(info.shape), " overflows the byte size"));
  }
  if (bytes != info.end - info.begin) {
    return TensorError(
        source, name,
        absl::StrCat("shape ", ShapeString(info.shape), " x ", Sv(DTypeName(info.dtype)), " is ",
                     bytes, " bytes but data_offsets [", info.begin, ", ", info.end, "] span ",
                     info.end - info.begin));
  }
  return info;
}

// Validates names and shapes for writing; returns each tensor's byte size.
absl::StatusOr<std::vector<uint64_t>> CheckForWriting(const std::vector<TensorInfo>& tensors) {
  std::vector<uint64_t> sizes;
  sizes.reserve(tensors.size());
  std::set<std::string_view> seen;
  for (const TensorInfo& t : tensors) {
    if (t.name.empty()) return absl::InvalidArgumentError("empty tensor name");
    if (t.name == kMetadataKey) {
      return absl::InvalidArgumentError("a tensor may not be named \"__metadata__\"");
    }
    if (!seen.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name ", Quote(t.name)));
    }
    uint64_t bytes = 0;
    if (!CheckedByteSize(t.shape, DTypeSize(t.dtype), &bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quote(t.name), ": bad shape ", ShapeString(t.shape)));
    }
    sizes.push_back(bytes);
  }
  return sizes;
}

}  // namespace

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const auto& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown or unsupported dtype ", Quote(name)));
}

std::string_view DTypeName(DType dtype) { return Entry(dtype).name; }

std::size_t DTypeSize(DType dtype) { return Entry(dtype).size; }

float F8E4M3ToFloat(uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // mantissa/8 * 2^(1-7)
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);  // (1+m/8) * 2^(e-7)
  }
  return negative ? -magnitude : magnitude;
}

float F8E5M2ToFloat(uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 2) & 0x1F;
  const int mantissa = bits & 0x3;
  float magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity()
                              : std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -16);  // mantissa/4 * 2^(1-15)
  } else {
    magnitude = std::ldexp(static_cast<float>(4 + mantissa), exponent - 17);  // (1+m/4) * 2^(e-15)
  }
  return negative ? -magnitude : magnitude;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d == 0) return 0;
  }
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

absl::StatusOr<Header> ParseHeader(std::string_view prefix, uint64_t file_size,
                                   std::string_view source) {
  if (file_size < 8) {
    return FileError(source, absl::StrCat("file is ", file_size,
                                          " bytes, too short for the 8-byte header length"));
  }
  if (prefix.size() < 8) {
    return FileError(source, absl::StrCat("only ", prefix.size(), " bytes of the file given"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<unsigned char>(prefix[i]);
  }
  if (header_len > kMaxHeaderBytes) {
    return FileError(source, absl::StrCat("header length ", header_len, " exceeds the limit of ",
                                          kMaxHeaderBytes, " bytes"));
  }
  if (header_len > file_size - 8) {
    return FileError(source,
                     absl::StrCat("header length ", header_len, " extends beyond the end of the ",
                                  file_size, "-byte file (truncated file?)"));
  }
  if (prefix.size() < 8 + header_len) {
    return FileError(source, absl::StrCat("only ", prefix.size(), " bytes of the file given, ",
                                          8 + header_len, " needed for the header"));
  }

  Header header;
  header.data_offset = 8 + header_len;
  header.data_size = file_size - header.data_offset;

  // Deepest legal nesting: header object > tensor entry > shape array.
  constexpr std::size_t kMaxDepth = 3;
  auto parsed = ParseStrictJson(prefix.substr(8, header_len), kMaxDepth);
  if (!parsed.ok()) return FileError(source, absl::StrCat("header: ", parsed.status().message()));
  const json& root = *parsed;
  if (!root.is_object()) return FileError(source, "header is not a JSON object");

  for (const auto& [name, value] : root.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) return FileError(source, "\"__metadata__\" is not a JSON object");
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string()) {
          return FileError(
              source, absl::StrCat("\"__metadata__\" value of ", Quote(key), " is not a string"));
        }
        header.metadata.emplace(key, v.get<std::string>());
      }
      continue;
    }
    auto info = ParseTensorEntry(name, value, header.data_size, source);
    if (!info.ok()) return info.status();
    header.tensors.push_back(*std::move(info));
  }

  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  uint64_t cursor = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.begin < cursor) {
      return TensorError(
          source, t.name,
          absl::StrCat("data_offsets [", t.begin, ", ", t.end, "] overlap tensor ",
                       Quote(previous->name), " [", previous->begin, ", ", previous->end, "]"));
    }
    if (t.begin > cursor) {
      return TensorError(
          source, t.name,
          absl::StrCat("data_offsets [", t.begin, ", ", t.end, "] leave a gap of unused bytes [",
                       cursor, ", ", t.begin, ") before it"));
    }
    cursor = t.end;
    previous = &t;
  }
  if (cursor != header.data_size) {
    return FileError(source,
                     absl::StrCat("data area has ", header.data_size - cursor,
                                  " unused trailing bytes [", cursor, ", ", header.data_size, ")"));
  }
  return header;
}

absl::StatusOr<std::string> SerializeHeader(const std::vector<TensorInfo>& tensors,
                                            const std::map<std::string, std::string>& metadata) {
  auto sizes = CheckForWriting(tensors);
  if (!sizes.ok()) return sizes.status();

  // ordered_json keeps the file order; uniqueness was checked above.
  nlohmann::ordered_json root = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& m = root[std::string(kMetadataKey)] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) {
      m.get_ref<nlohmann::ordered_json::object_t&>().emplace_back(key, value);
    }
  }
  uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo& t = tensors[i];
    nlohmann::ordered_json entry;
    entry["dtype"] = std::string(DTypeName(t.dtype));
    entry["shape"] = t.shape;
    uint64_t end = 0;
    if (__builtin_add_overflow(offset, (*sizes)[i], &end)) {
      return absl::InvalidArgumentError("total tensor size overflows 64 bits");
    }
    entry["data_offsets"] = {offset, end};
    // Appended directly: ordered_json's operator[] searches linearly (quadratic for big models).
    root.get_ref<nlohmann::ordered_json::object_t&>().emplace_back(t.name, std::move(entry));
    offset = end;
  }
  std::string text;
  try {
    text = root.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor names and metadata must be valid UTF-8: ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("header of ", text.size(), " bytes exceeds the limit of ", kMaxHeaderBytes));
  }
  std::string out(8, '\0');
  uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xFF);
  out += text;
  return out;
}

absl::StatusOr<std::string> Serialize(const std::vector<RawTensor>& tensors,
                                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorInfo> infos;
  infos.reserve(tensors.size());
  for (const RawTensor& t : tensors) {
    TensorInfo info;
    info.name = t.name;
    info.dtype = t.dtype;
    info.shape = t.shape;
    infos.push_back(std::move(info));
  }
  auto header = SerializeHeader(infos, metadata);
  if (!header.ok()) return header.status();

  std::size_t total = header->size();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    uint64_t bytes = 0;
    CheckedByteSize(infos[i].shape, DTypeSize(infos[i].dtype), &bytes);  // checked above
    if (bytes != tensors[i].data.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", Quote(tensors[i].name), ": shape ", ShapeString(infos[i].shape),
                       " x ", Sv(DTypeName(infos[i].dtype)), " needs ", bytes, " bytes but ",
                       tensors[i].data.size(), " were given"));
    }
    total += bytes;
  }
  std::string out = *std::move(header);
  out.reserve(total);
  for (const RawTensor& t : tensors) out.append(t.data);
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> ParseIndexWeightMap(std::string_view json_text,
                                                                       std::string_view source) {
  auto index_error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors index ", Quote(source), ": ", what));
  };
  // The "metadata" object is free-form; allow generous nesting there.
  constexpr std::size_t kMaxDepth = 64;
  auto parsed = ParseStrictJson(json_text, kMaxDepth);
  if (!parsed.ok()) return index_error(parsed.status().message());
  const json& root = *parsed;
  if (!root.is_object()) return index_error("not a JSON object");
  auto it = root.find("weight_map");
  if (it == root.end()) return index_error("missing \"weight_map\"");
  if (!it->is_object()) return index_error("\"weight_map\" is not a JSON object");
  if (it->empty()) return index_error("\"weight_map\" is empty");
  std::map<std::string, std::string> weight_map;
  for (const auto& [name, shard] : it->items()) {
    if (!shard.is_string() || shard.get_ref<const std::string&>().empty()) {
      return index_error(absl::StrCat("tensor ", Quote(name), ": shard is not a non-empty string"));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    bool escapes = file.front() == '/';
    for (absl::string_view part : absl::StrSplit(file, '/')) escapes |= part == "..";
    if (escapes) {
      return index_error(absl::StrCat("tensor ", Quote(name), ": shard ", Quote(file),
                                      " is not a path under the index's folder"));
    }
    weight_map.emplace(name, file);
  }
  return weight_map;
}

}  // namespace ds::safetensors
