#include "handlers/safetensors_format.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace ds::safetensors {
namespace {

constexpr char kSource[] = "dir/model.safetensors";

// A file image: 8-byte little-endian length, `json`, then `data_size` bytes of data.
std::string MakeFile(const std::string& json, std::size_t data_size, char fill = '\x5a') {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + json + std::string(data_size, fill);
}

absl::StatusOr<Header> Parse(const std::string& file) {
  return ParseHeader(file, file.size(), kSource);
}

// Expects INVALID_ARGUMENT whose message names the source file and contains every part.
void ExpectInvalid(const absl::Status& status, const std::vector<std::string>& parts) {
  ASSERT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  const std::string message(status.message());
  EXPECT_NE(message.find(kSource), std::string::npos) << message;
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

TEST(SafetensorsDTypeTest, NamesRoundTripAndSizes) {
  const std::vector<std::pair<std::string, std::size_t>> expected = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},     {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  for (const auto& [name, size] : expected) {
    auto dtype = ParseDType(name);
    ASSERT_TRUE(dtype.ok()) << name;
    EXPECT_EQ(DTypeName(*dtype), name);
    EXPECT_EQ(DTypeSize(*dtype), size) << name;
  }
  for (const char* bad : {"f32", "F128", "", "U16", "F8_E8M0"}) {
    EXPECT_EQ(ParseDType(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(SafetensorsTensorInfoTest, Numel) {
  TensorInfo t;
  EXPECT_EQ(t.numel(), 1);  // scalar
  t.shape = {2, 3, 4};
  EXPECT_EQ(t.numel(), 24);
  t.shape = {5, 0, std::numeric_limits<int64_t>::max()};
  EXPECT_EQ(t.numel(), 0);
  t.shape = {int64_t{1} << 32, int64_t{1} << 32};
  EXPECT_EQ(t.numel(), -1);
  t.shape = {2, -1};
  EXPECT_EQ(t.numel(), -1);
}

// Independent reference: builds the float32 bit pattern instead of scaling.
float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void ExpectSameFloat(float actual, float expected, int bits) {
  if (std::isnan(expected)) {
    EXPECT_TRUE(std::isnan(actual)) << "bits 0x" << std::hex << bits;
    return;
  }
  EXPECT_EQ(actual, expected) << "bits 0x" << std::hex << bits;
  EXPECT_EQ(std::signbit(actual), std::signbit(expected)) << "bits 0x" << std::hex << bits;
}

TEST(SafetensorsF8Test, E4M3KnownPatterns) {
  struct Case {
    uint8_t bits;
    float value;
  };
  const Case cases[] = {
      {0x00, 0.0f},         {0x80, -0.0f},  {0x01, 0.001953125f},  // 2^-9
      {0x07, 0.013671875f},                                        // 7 * 2^-9, largest subnormal
      {0x08, 0.015625f},                                           // 2^-6, smallest normal
      {0x38, 1.0f},         {0xB8, -1.0f},  {0x40, 2.0f},
      {0x39, 1.125f},       {0x3C, 1.5f},   {0x7E, 448.0f},  // max finite
      {0xFE, -448.0f},      {0x78, 256.0f}, {0x7A, 320.0f},
  };
  for (const Case& c : cases) ExpectSameFloat(F8E4M3ToFloat(c.bits), c.value, c.bits);
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(F8E4M3ToFloat(0xFF)));
}

TEST(SafetensorsF8Test, E4M3AllPatternsMatchBitConstruction) {
  for (int b = 0; b < 256; ++b) {
    const uint32_t sign = (b & 0x80) ? 0x80000000u : 0u;
    const int e = (b >> 3) & 0xF;
    const int m = b & 0x7;
    float expected;
    if (e == 0xF && m == 0x7) {
      expected = std::numeric_limits<float>::quiet_NaN();
    } else if (e == 0) {
      expected = FromBits(sign | 0u) + (sign ? -1.0f : 1.0f) * static_cast<float>(m) / 512.0f;
    } else {
      expected = FromBits(sign | static_cast<uint32_t>(e - 7 + 127) << 23 |
                          static_cast<uint32_t>(m) << 20);
    }
    ExpectSameFloat(F8E4M3ToFloat(static_cast<uint8_t>(b)), expected, b);
    EXPECT_FALSE(std::isinf(F8E4M3ToFloat(static_cast<uint8_t>(b)))) << b;  // no infinities
  }
}

TEST(SafetensorsF8Test, E5M2KnownPatterns) {
  struct Case {
    uint8_t bits;
    float value;
  };
  const Case cases[] = {
      {0x00, 0.0f},
      {0x80, -0.0f},
      {0x01, 1.52587890625e-05f},  // 2^-16
      {0x03, 4.57763671875e-05f},  // 3 * 2^-16
      {0x04, 6.103515625e-05f},    // 2^-14
      {0x3C, 1.0f},
      {0xBC, -1.0f},
      {0x3D, 1.25f},
      {0x3E, 1.5f},
      {0x40, 2.0f},
      {0x7B, 57344.0f},
      {0xFB, -57344.0f},
      {0x7C, std::numeric_limits<float>::infinity()},
      {0xFC, -std::numeric_limits<float>::infinity()},
  };
  for (const Case& c : cases) ExpectSameFloat(F8E5M2ToFloat(c.bits), c.value, c.bits);
  for (int b : {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}) {
    EXPECT_TRUE(std::isnan(F8E5M2ToFloat(static_cast<uint8_t>(b)))) << b;
  }
}

TEST(SafetensorsF8Test, E5M2IsTheTopByteOfFloat16) {
  for (int b = 0; b < 256; ++b) {
    const uint32_t sign = (b & 0x80) ? 0x80000000u : 0u;
    const int e = (b >> 2) & 0x1F;
    const int m = b & 0x3;
    float expected;
    if (e == 0x1F) {
      expected = m == 0 ? FromBits(sign | 0x7F800000u) : std::numeric_limits<float>::quiet_NaN();
    } else if (e == 0) {
      expected = FromBits(sign) + (sign ? -1.0f : 1.0f) * static_cast<float>(m) / 65536.0f;
    } else {
      expected = FromBits(sign | static_cast<uint32_t>(e - 15 + 127) << 23 |
                          static_cast<uint32_t>(m) << 21);
    }
    ExpectSameFloat(F8E5M2ToFloat(static_cast<uint8_t>(b)), expected, b);
  }
}

TEST(SafetensorsParseHeaderTest, ValidFile) {
  const std::string json = R"({"b":{"dtype":"F16","shape":[3],"data_offsets":[8,14]},)"
                           R"("__metadata__":{"format":"pt","k":"v"},)"
                           R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  auto header = Parse(MakeFile(json, 14));
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->tensors.size(), 2u);
  EXPECT_EQ(header->tensors[0].name, "a");
  EXPECT_EQ(header->tensors[0].dtype, DType::kF32);
  EXPECT_EQ(header->tensors[0].shape, std::vector<int64_t>({2}));
  EXPECT_EQ(header->tensors[0].begin, 0u);
  EXPECT_EQ(header->tensors[0].end, 8u);
  EXPECT_EQ(header->tensors[1].name, "b");
  EXPECT_EQ(header->tensors[1].begin, 8u);
  EXPECT_EQ(header->tensors[1].end, 14u);
  EXPECT_EQ(header->metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"k", "v"}}));
  EXPECT_EQ(header->data_offset, 8 + json.size());
  EXPECT_EQ(header->data_size, 14u);
}

TEST(SafetensorsParseHeaderTest, ScalarsZeroSizeTensorsAndEmptyHeader) {
  const std::string json = R"({"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
                           R"("z2":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]},)"
                           R"("z1":{"dtype":"BOOL","shape":[0],"data_offsets":[8,8]},)"
                           R"("z0":{"dtype":"U8","shape":[3,0],"data_offsets":[0,0]},)"
                           R"("t":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}})";
  auto header = Parse(MakeFile(json, 10));
  ASSERT_TRUE(header.ok()) << header.status();
  std::vector<std::string> names;
  for (const auto& t : header->tensors) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"z0", "s", "z1", "z2", "t"}));
  EXPECT_EQ(header->tensors[1].numel(), 1);
  EXPECT_TRUE(header->metadata.empty());

  auto empty = Parse(MakeFile("{}", 0));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tensors.empty());
  // Trailing whitespace padding after the JSON is fine (the reference writer pads with spaces).
  EXPECT_TRUE(Parse(MakeFile("{}      ", 0)).ok());
}

TEST(SafetensorsParseHeaderTest, PrefixOfTheFileIsEnough) {
  const std::string json = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
  const std::string file = MakeFile(json, 4);
  auto header =
      ParseHeader(std::string_view(file).substr(0, 8 + json.size()), file.size(), kSource);
  ASSERT_TRUE(header.ok()) << header.status();
  ExpectInvalid(ParseHeader(std::string_view(file).substr(0, 10), file.size(), kSource).status(),
                {"needed for the header"});
  ExpectInvalid(ParseHeader(std::string_view(file).substr(0, 4), file.size(), kSource).status(),
                {"only 4 bytes"});
}

TEST(SafetensorsParseHeaderTest, FileShorterThanLengthField) {
  ExpectInvalid(Parse("").status(), {"too short"});
  ExpectInvalid(Parse(std::string(7, '\0')).status(), {"7 bytes"});
}

TEST(SafetensorsParseHeaderTest, HeaderLengthBeyondFile) {
  std::string file = MakeFile(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1);
  file.resize(20);  // truncated inside the JSON
  ExpectInvalid(Parse(file).status(), {"beyond the end", "truncated"});
}

TEST(SafetensorsParseHeaderTest, HeaderLengthOverLimit) {
  std::string file(8, '\0');
  const uint64_t n = kMaxHeaderBytes + 1;
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  // The claimed file size covers the header, so only the limit can reject it.
  ExpectInvalid(ParseHeader(file, n + 8, kSource).status(), {"exceeds the limit"});
  file[7] = '\xff';  // 2^63-ish: no overflow in the bounds checks
  ExpectInvalid(ParseHeader(file, std::numeric_limits<uint64_t>::max(), kSource).status(),
                {"exceeds the limit"});
}

TEST(SafetensorsParseHeaderTest, InvalidJson) {
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8",)", 0)).status(), {"invalid JSON"});
  ExpectInvalid(Parse(MakeFile("", 0)).status(), {"invalid JSON"});
  ExpectInvalid(Parse(MakeFile("{} x", 0)).status(), {"invalid JSON"});
  ExpectInvalid(Parse(MakeFile("{\"\xff\":1}", 0)).status(), {"invalid JSON"});  // bad UTF-8
  ExpectInvalid(Parse(MakeFile(std::string("{}\0", 3), 0)).status(), {"NUL byte"});
  ExpectInvalid(Parse(MakeFile(std::string("{\"a\0\":1}", 8), 0)).status(), {"NUL byte"});
  ExpectInvalid(Parse(MakeFile("\xEF\xBB\xBF{}", 0)).status(), {"byte order mark"});
  ExpectInvalid(Parse(MakeFile("{/* c */}", 0)).status(), {"invalid JSON"});
}

TEST(SafetensorsParseHeaderTest, NonObjectHeader) {
  ExpectInvalid(Parse(MakeFile("[]", 0)).status(), {"not a JSON object"});
  ExpectInvalid(Parse(MakeFile("\"x\"", 0)).status(), {"not a JSON object"});
  ExpectInvalid(Parse(MakeFile("null", 0)).status(), {"not a JSON object"});
}

TEST(SafetensorsParseHeaderTest, BadMetadata) {
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":[]})", 0)).status(), {"__metadata__"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":"x"})", 0)).status(), {"__metadata__"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":{"k":1}})", 0)).status(),
                {"__metadata__", "'k'", "not a string"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":{"k":{"x":"y"}}})", 0)).status(),
                {"'k'", "not a string"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":{"k":{"x":["y"]}}})", 0)).status(),
                {"nested deeper"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":{"k":"a","k":"b"}})", 0)).status(),
                {"duplicate key 'k'", "__metadata__"});
}

TEST(SafetensorsParseHeaderTest, UnknownDtype) {
  ExpectInvalid(
      Parse(MakeFile(R"({"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16)).status(),
      {"tensor 'w'", "F128"});
  ExpectInvalid(
      Parse(MakeFile(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4)).status(),
      {"tensor 'w'", "dtype"});
}

TEST(SafetensorsParseHeaderTest, MalformedEntriesAndShapes) {
  const std::vector<std::string> entries = {
      R"("x")",
      R"({"shape":[1],"data_offsets":[0,1]})",
      R"({"dtype":"U8","data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[1]})",
      R"({"dtype":"U8","shape":1,"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[-1],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[1.0],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":["1"],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[1e0],"data_offsets":[0,1]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[0]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1,1]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[-1,0]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[0,1.5]})",
      R"({"dtype":"U8","shape":[1],"data_offsets":{"a":0}})",
      R"({"dtype":"U8","shape":[1],"data_offsets":[1,0]})",
  };
  for (const std::string& entry : entries) {
    SCOPED_TRACE(entry);
    ExpectInvalid(Parse(MakeFile(absl::StrCat("{\"w.weight\":", entry, "}"), 1)).status(),
                  {"tensor 'w.weight'"});
  }
  ExpectInvalid(
      Parse(MakeFile(R"({"w":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}})", 1)).status(),
      {"nested deeper", "in 'w'"});
}

TEST(SafetensorsParseHeaderTest, UnknownEntryKeysAreIgnored) {
  auto header =
      Parse(MakeFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":"x"}})", 1));
  ASSERT_TRUE(header.ok()) << header.status();
}

TEST(SafetensorsParseHeaderTest, SizeMismatch) {
  ExpectInvalid(
      Parse(MakeFile(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20)).status(),
      {"tensor 'w'", "[2, 3]", "24 bytes", "span 20"});
}

TEST(SafetensorsParseHeaderTest, ShapeOverflow) {
  ExpectInvalid(Parse(MakeFile(R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],)"
                               R"("data_offsets":[0,8]}})",
                               8))
                    .status(),
                {"tensor 'w'", "overflows"});
  // 2^61 elements x 8 bytes overflows uint64 only in the byte count.
  ExpectInvalid(Parse(MakeFile(R"({"w":{"dtype":"F64","shape":[2305843009213693952],)"
                               R"("data_offsets":[0,0]}})",
                               0))
                    .status(),
                {"tensor 'w'", "overflows"});
}

TEST(SafetensorsParseHeaderTest, OffsetsOutsideDataAreaAndTruncatedFile) {
  ExpectInvalid(
      Parse(MakeFile(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 3)).status(),
      {"tensor 'w'", "outside the data area", "truncated"});
  ExpectInvalid(Parse(MakeFile(R"({"w":{"dtype":"U8","shape":[0],)"
                               R"("data_offsets":[18446744073709551615,18446744073709551615]}})",
                               0))
                    .status(),
                {"tensor 'w'", "outside the data area"});
  // A complete file cut short inside its data area.
  std::string file = MakeFile(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                              R"("b":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
                              32);
  file.resize(file.size() - 5);
  ExpectInvalid(Parse(file).status(), {"tensor 'b'", "truncated"});
}

TEST(SafetensorsParseHeaderTest, OverlappingRanges) {
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
                               6))
                    .status(),
                {"tensor 'b'", "overlap", "'a'"});
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                               4))
                    .status(),
                {"overlap"});
  // A zero-size tensor inside another tensor's range.
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})",
                               4))
                    .status(),
                {"tensor 'z'", "overlap"});
}

TEST(SafetensorsParseHeaderTest, GapsAndTrailingBytes) {
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("b":{"dtype":"U8","shape":[4],"data_offsets":[5,9]}})",
                               9))
                    .status(),
                {"tensor 'b'", "gap", "[4, 5)"});
  ExpectInvalid(
      Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})", 6)).status(),
      {"tensor 'a'", "gap"});
  ExpectInvalid(
      Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", 7)).status(),
      {"3 unused trailing bytes"});
  ExpectInvalid(Parse(MakeFile("{}", 1)).status(), {"unused trailing bytes"});
}

TEST(SafetensorsParseHeaderTest, DuplicateNames) {
  ExpectInvalid(Parse(MakeFile(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                               R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                               8))
                    .status(),
                {"duplicate key 'a'"});
  ExpectInvalid(
      Parse(MakeFile(R"({"a":{"dtype":"U8","dtype":"I8","shape":[4],"data_offsets":[0,4]}})", 4))
          .status(),
      {"duplicate key 'dtype'", "in 'a'"});
  ExpectInvalid(Parse(MakeFile(R"({"__metadata__":{},"__metadata__":{}})", 0)).status(),
                {"duplicate key '__metadata__'"});
}

TEST(SafetensorsParseHeaderTest, HugeNestingIsRejectedWithoutCrashing) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  ExpectInvalid(Parse(MakeFile(deep, 0)).status(), {"nested deeper"});
  const std::string unbalanced = "{\"a\":" + std::string(100000, '[');
  ExpectInvalid(Parse(MakeFile(unbalanced, 0)).status(), {"nested deeper"});
}

TEST(SafetensorsParseHeaderTest, ErrorMessagesEscapeControlCharacters) {
  auto status =
      Parse(MakeFile(R"({"a\nb":{"dtype":"X","shape":[1],"data_offsets":[0,1]}})", 1)).status();
  ExpectInvalid(status, {"tensor 'a\\x0ab'"});
}

std::string Bytes(std::size_t n, int seed) {
  std::string out(n, '\0');
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<char>((i * 131 + seed * 7) & 0xFF);
  return out;
}

TEST(SafetensorsSerializeTest, RoundTripsEveryDtypeWithMetadata) {
  const std::vector<DType> dtypes = {DType::kF64, DType::kF32,  DType::kF16,    DType::kBF16,
                                     DType::kI64, DType::kI32,  DType::kI16,    DType::kI8,
                                     DType::kU8,  DType::kBool, DType::kF8E4M3, DType::kF8E5M2};
  std::vector<std::string> storage;
  std::vector<RawTensor> tensors;
  storage.reserve(dtypes.size() + 2);
  for (std::size_t i = 0; i < dtypes.size(); ++i) {
    const std::vector<int64_t> shape = {static_cast<int64_t>(i % 3 + 1), 3};
    storage.push_back(Bytes(shape[0] * shape[1] * DTypeSize(dtypes[i]), static_cast<int>(i)));
    tensors.push_back({absl::StrCat("t", i, ".", std::string(DTypeName(dtypes[i]))), dtypes[i],
                       shape, storage.back()});
  }
  storage.push_back(Bytes(4, 99));
  tensors.push_back({"scalar", DType::kF32, {}, storage.back()});
  tensors.push_back({"empty", DType::kF16, {0, 7}, ""});
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"quote\"and\\slash", "unicode \xc3\xa9 \n newline"}};

  auto file = Serialize(tensors, metadata);
  ASSERT_TRUE(file.ok()) << file.status();
  auto header = Parse(*file);
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->data_offset % 8, 0u);  // padded
  EXPECT_EQ(header->metadata, metadata);
  ASSERT_EQ(header->tensors.size(), tensors.size());
  for (const TensorInfo& info : header->tensors) {
    auto it = std::find_if(tensors.begin(), tensors.end(),
                           [&](const RawTensor& t) { return t.name == info.name; });
    ASSERT_NE(it, tensors.end()) << info.name;
    EXPECT_EQ(info.dtype, it->dtype) << info.name;
    EXPECT_EQ(info.shape, it->shape) << info.name;
    EXPECT_EQ(file->substr(header->data_offset + info.begin, info.end - info.begin), it->data)
        << info.name;
  }
  // Data are laid out in the given order.
  EXPECT_EQ(header->tensors.front().name, "t0.F64");
}

TEST(SafetensorsSerializeTest, EmptyAndHeaderPrefix) {
  auto empty = Serialize({}, {});
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->size() % 8, 0u);
  EXPECT_TRUE(Parse(*empty).ok());

  const std::string data = Bytes(12, 1);
  auto file = Serialize({{"w", DType::kI32, {3}, data}}, {{"k", "v"}});
  ASSERT_TRUE(file.ok());
  TensorInfo info;
  info.name = "w";
  info.dtype = DType::kI32;
  info.shape = {3};
  info.begin = 1234;  // ignored
  auto header = SerializeHeader({info}, {{"k", "v"}});
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(*header + data, *file);
}

TEST(SafetensorsSerializeTest, Errors) {
  const std::string four(4, 'x');
  EXPECT_EQ(Serialize({{"", DType::kF32, {1}, four}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Serialize({{"__metadata__", DType::kF32, {1}, four}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto dup = Serialize({{"a", DType::kU8, {4}, four}, {"a", DType::kU8, {4}, four}}, {});
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(dup.status().message()).find("'a'"), std::string::npos);
  auto mismatch = Serialize({{"w", DType::kF32, {2}, four}}, {});
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(mismatch.status().message()).find("'w'"), std::string::npos);
  EXPECT_EQ(Serialize({{"w", DType::kF32, {-1}, ""}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Serialize({{"w", DType::kF64, {int64_t{1} << 62}, ""}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Three tensors of 2^63 - 1 bytes: the offsets overflow 64 bits.
  TensorInfo huge;
  huge.dtype = DType::kU8;
  huge.shape = {std::numeric_limits<int64_t>::max()};
  std::vector<TensorInfo> huge_tensors(3, huge);
  for (int i = 0; i < 3; ++i) huge_tensors[i].name = absl::StrCat("h", i);
  auto overflow = SerializeHeader(huge_tensors, {});
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(overflow.status().message()).find("overflow"), std::string::npos);
  EXPECT_EQ(Serialize({{"bad\xff", DType::kU8, {4}, four}}, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Serialize({}, {{"k", "bad\xc3"}}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsParseIndexTest, Valid) {
  auto map = ParseIndexWeightMap(R"({"metadata":{"total_size":123,"nested":{"a":[1,{"b":2}]}},)"
                                 R"("weight_map":{"a.weight":"model-00001-of-00002.safetensors",)"
                                 R"("b.weight":"sub/model-00002-of-00002.safetensors"}})",
                                 "model.safetensors.index.json");
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(map->size(), 2u);
  EXPECT_EQ(map->at("b.weight"), "sub/model-00002-of-00002.safetensors");
}

TEST(SafetensorsParseIndexTest, Errors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{", "invalid JSON"},
      {"[]", "not a JSON object"},
      {R"({"metadata":{}})", "missing \"weight_map\""},
      {R"({"weight_map":[]})", "not a JSON object"},
      {R"({"weight_map":{}})", "empty"},
      {R"({"weight_map":{"a":1}})", "tensor 'a'"},
      {R"({"weight_map":{"a":""}})", "tensor 'a'"},
      {R"({"weight_map":{"a":"/etc/x.safetensors"}})", "under the index"},
      {R"({"weight_map":{"a":"../x.safetensors"}})", "under the index"},
      {R"({"weight_map":{"a":"s/../../x.safetensors"}})", "under the index"},
      {R"({"weight_map":{"a":"x","a":"y"}})", "duplicate key 'a'"},
      {R"({"weight_map":{},"weight_map":{"a":"x"}})", "duplicate key 'weight_map'"},
  };
  for (const auto& [json, part] : cases) {
    auto map = ParseIndexWeightMap(json, "idx.json");
    ASSERT_EQ(map.status().code(), absl::StatusCode::kInvalidArgument) << json;
    const std::string message(map.status().message());
    EXPECT_NE(message.find("idx.json"), std::string::npos) << message;
    EXPECT_NE(message.find(part), std::string::npos) << part << " not in " << message;
  }
}

}  // namespace
}  // namespace ds::safetensors
