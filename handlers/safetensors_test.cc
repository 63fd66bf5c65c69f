#include "handlers/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "handlers/safetensors_format.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::GoldenDir;
using ::ds::test::TempDir;

namespace fs = std::filesystem;
using safetensors::DType;
using safetensors::RawTensor;

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string Message(const absl::Status& status) { return std::string(status.message()); }

// Expects `code` and a message containing every part.
void ExpectError(const absl::Status& status, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  ASSERT_EQ(status.code(), code) << status;
  for (const std::string& part : parts) {
    EXPECT_NE(Message(status).find(part), std::string::npos)
        << "'" << part << "' not in: " << status.message();
  }
}

std::shared_ptr<const SafetensorsFile> OpenOrDie(const std::string& path) {
  auto file = SafetensorsFile::Open(path);
  EXPECT_TRUE(file.ok()) << file.status();
  return file.ok() ? *file : nullptr;
}

torch::Tensor GetOrDie(const SafetensorsFile& file, const std::string& name) {
  auto t = file.Get(name);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : torch::Tensor();
}

bool InMapping(const SafetensorsFile& file, const torch::Tensor& t) {
  const auto* p = static_cast<const char*>(t.data_ptr());
  const std::string_view bytes = file.mapped_bytes();
  return p >= bytes.data() && p + t.nbytes() <= bytes.data() + bytes.size();
}

std::vector<std::pair<std::string, torch::Tensor>> EveryDtype() {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> out = {
      {"f64", torch::randn({3, 4}, torch::kFloat64)},
      {"f32", torch::randn({2, 3, 5}, torch::kFloat32)},
      {"f16", torch::randn({7}, torch::kFloat32).to(torch::kFloat16)},
      {"bf16", torch::randn({2, 9}, torch::kFloat32).to(torch::kBFloat16)},
      {"i64", torch::randint(-1000000, 1000000, {5}, torch::kInt64)},
      {"i32", torch::randint(-100000, 100000, {2, 2}, torch::kInt32)},
      {"i16", torch::randint(-30000, 30000, {3}, torch::kInt16)},
      {"i8", torch::randint(-128, 127, {11}, torch::kInt8)},
      {"u8", torch::randint(0, 255, {13}, torch::kUInt8)},
      {"bool", torch::rand({6}) > 0.5},
      {"scalar", torch::tensor(3.5, torch::kFloat64)},
      {"empty", torch::zeros({0, 4}, torch::kFloat32)},
  };
  return out;
}

TEST(SafetensorsTest, RoundTripsEveryDtypeAndMetadata) {
  TempDir dir;
  const std::string path = dir.File("all.safetensors");
  const auto tensors = EveryDtype();
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"note", "\xc3\xa9t\xc3\xa9"}};
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());

  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->path(), path);
  EXPECT_EQ(file->metadata(), metadata);
  EXPECT_EQ(file->names().size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    SCOPED_TRACE(name);
    EXPECT_TRUE(file->contains(name));
    torch::Tensor actual = GetOrDie(*file, name);
    ASSERT_TRUE(actual.defined());
    EXPECT_EQ(actual.scalar_type(), expected.scalar_type());
    EXPECT_EQ(actual.sizes(), expected.sizes());
    EXPECT_TRUE(torch::equal(actual, expected));
    EXPECT_FALSE(actual.requires_grad());
  }
  // The writer orders the data area by element size (largest first), then by the given order,
  // so that every tensor is aligned.
  std::vector<std::string> names = file->names();
  names.erase(std::remove(names.begin(), names.end(), "empty"), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"f64", "i64", "scalar", "f32", "i32", "f16", "bf16",
                                             "i16", "i8", "u8", "bool"}));
  for (const std::string& name : names) {
    const auto* info = *file->info(name);
    EXPECT_EQ((file->header().data_offset + info->begin) % safetensors::DTypeSize(info->dtype), 0u)
        << name;
  }

  auto all = file->GetAll();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->size(), tensors.size());
}

TEST(SafetensorsTest, TensorMapOverloadAndNonContiguousInput) {
  TempDir dir;
  const std::string path = dir.File("map.safetensors");
  torch::Tensor base = torch::arange(12, torch::kFloat32).reshape({3, 4});
  TensorMap map = {{"t", base.t()}, {"s", base.index({torch::indexing::Slice(), 1})}};
  ASSERT_FALSE(map["t"].is_contiguous());
  ASSERT_TRUE(WriteSafetensors(path, map).ok());
  auto loaded = LoadSafetensorsWeights(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 2u);
  EXPECT_TRUE(torch::equal(loaded->at("t"), base.t()));
  EXPECT_TRUE(torch::equal(loaded->at("s"), base.index({torch::indexing::Slice(), 1})));
}

TEST(SafetensorsTest, ViewsShareTheMapping) {
  TempDir dir;
  const std::string path = dir.File("views.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, EveryDtype()).ok());
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  for (const std::string& name : file->names()) {
    if (name == "empty") continue;
    SCOPED_TRACE(name);
    torch::Tensor t = GetOrDie(*file, name);
    const auto* info = *file->info(name);
    EXPECT_TRUE(InMapping(*file, t));
    EXPECT_EQ(static_cast<const char*>(t.data_ptr()),
              file->mapped_bytes().data() + file->header().data_offset + info->begin);
    EXPECT_EQ(GetOrDie(*file, name).data_ptr(), t.data_ptr());  // no copy on a second Get
  }
  auto all = file->GetAll();
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(InMapping(*file, all->at("f32")));
}

TEST(SafetensorsTest, ViewOutlivesTheFile) {
  TempDir dir;
  const std::string path = dir.File("outlive.safetensors");
  torch::Tensor expected = torch::arange(1000, torch::kFloat32);
  ASSERT_TRUE(WriteSafetensors(path, {{"x", expected}}).ok());
  torch::Tensor view;
  {
    auto file = OpenOrDie(path);
    ASSERT_NE(file, nullptr);
    view = GetOrDie(*file, "x");
  }                  // the SafetensorsFile is gone; the mapping must not be
  fs::remove(path);  // even the file's name may go
  EXPECT_TRUE(torch::equal(view, expected));
  EXPECT_EQ(view.sum().item<float>(), 999.0f * 1000.0f / 2.0f);
}

TEST(SafetensorsTest, WritingIntoAViewDoesNotChangeTheFile) {
  TempDir dir;
  const std::string path = dir.File("cow.safetensors");
  torch::Tensor expected = torch::arange(64, torch::kInt32);
  ASSERT_TRUE(WriteSafetensors(path, {{"x", expected}}).ok());
  const std::string before = ReadBytes(path);

  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  torch::Tensor view = GetOrDie(*file, "x");
  view.fill_(-7);
  EXPECT_EQ(view.sum().item<int64_t>(), -7 * 64);

  EXPECT_EQ(ReadBytes(path), before);
  auto reopened = OpenOrDie(path);
  ASSERT_NE(reopened, nullptr);
  EXPECT_TRUE(torch::equal(GetOrDie(*reopened, "x"), expected));
  // Documented: later Get() calls on the same SafetensorsFile see the write (shared mapping).
  EXPECT_EQ(GetOrDie(*file, "x")[0].item<int32_t>(), -7);
}

// A file whose data area starts at an odd offset (a legal but unusual header length).
std::string MisalignedFile(const std::vector<float>& values) {
  std::string json = absl::StrCat(R"({"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)",
                                  R"("f":{"dtype":"F32","shape":[)", values.size(),
                                  R"(],"data_offsets":[1,)", 1 + 4 * values.size(), "]}}");
  while ((8 + json.size()) % 8 != 0) json.push_back(' ');  // data area 8-aligned; "f" at +1
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((json.size() >> (8 * i)) & 0xFF);
  out += json;
  out.push_back('\x2a');
  out.append(reinterpret_cast<const char*>(values.data()), 4 * values.size());
  return out;
}

TEST(SafetensorsTest, MisalignedDataAreCopiedIntoAlignedMemory) {
  TempDir dir;
  const std::string path = dir.File("misaligned.safetensors");
  const std::vector<float> values = {1.5f, -2.25f, 3e-7f, 65504.0f, -0.0f};
  WriteBytes(path, MisalignedFile(values));
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  torch::Tensor f = GetOrDie(*file, "f");
  EXPECT_FALSE(InMapping(*file, f));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data_ptr()) % alignof(float), 0u);
  EXPECT_TRUE(torch::equal(f, torch::tensor(values)));
  torch::Tensor u = GetOrDie(*file, "u");  // 1-byte elements are always aligned: a view
  EXPECT_TRUE(InMapping(*file, u));
  EXPECT_EQ(u.item<uint8_t>(), 0x2a);
}

TEST(SafetensorsTest, F8TensorsAreDecodedToFloat32) {
  TempDir dir;
  const std::string path = dir.File("f8.safetensors");
  std::string all_bytes(256, '\0');
  for (int i = 0; i < 256; ++i) all_bytes[i] = static_cast<char>(i);
  auto image = safetensors::Serialize({{"e4m3", DType::kF8E4M3, {256}, all_bytes},
                                       {"e5m2", DType::kF8E5M2, {16, 16}, all_bytes},
                                       {"none", DType::kF8E4M3, {0}, ""}},
                                      {});
  ASSERT_TRUE(image.ok()) << image.status();
  WriteBytes(path, *image);
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);

  torch::Tensor e4m3 = GetOrDie(*file, "e4m3");
  ASSERT_EQ(e4m3.scalar_type(), torch::kFloat32);
  ASSERT_EQ(e4m3.sizes(), torch::IntArrayRef({256}));
  EXPECT_FALSE(InMapping(*file, e4m3));
  auto a = e4m3.accessor<float, 1>();
  EXPECT_EQ(a[0x00], 0.0f);
  EXPECT_EQ(a[0x01], std::ldexp(1.0f, -9));
  EXPECT_EQ(a[0x08], std::ldexp(1.0f, -6));
  EXPECT_EQ(a[0x38], 1.0f);
  EXPECT_EQ(a[0x3C], 1.5f);
  EXPECT_EQ(a[0x7E], 448.0f);
  EXPECT_EQ(a[0xFE], -448.0f);
  EXPECT_TRUE(std::isnan(a[0x7F]));
  EXPECT_TRUE(std::isnan(a[0xFF]));
  EXPECT_TRUE(std::signbit(a[0x80]));
  EXPECT_EQ(torch::isinf(e4m3).sum().item<int64_t>(), 0);
  EXPECT_EQ(torch::isnan(e4m3).sum().item<int64_t>(), 2);

  torch::Tensor e5m2 = GetOrDie(*file, "e5m2");
  ASSERT_EQ(e5m2.sizes(), torch::IntArrayRef({16, 16}));
  auto flat = e5m2.reshape({256});
  auto b = flat.accessor<float, 1>();
  EXPECT_EQ(b[0x01], std::ldexp(1.0f, -16));
  EXPECT_EQ(b[0x04], std::ldexp(1.0f, -14));
  EXPECT_EQ(b[0x3C], 1.0f);
  EXPECT_EQ(b[0x7B], 57344.0f);
  EXPECT_EQ(b[0x7C], std::numeric_limits<float>::infinity());
  EXPECT_EQ(b[0xFC], -std::numeric_limits<float>::infinity());
  EXPECT_EQ(torch::isnan(e5m2).sum().item<int64_t>(), 6);
  for (int i = 0; i < 256; ++i) {
    const float expected = safetensors::F8E5M2ToFloat(static_cast<uint8_t>(i));
    if (!std::isnan(expected)) {
      EXPECT_EQ(b[i], expected) << i;
    }
  }
  // E5M2 is the top byte of an IEEE half: cross-check with LibTorch's own float16 conversion.
  torch::Tensor as_half = (torch::arange(256, torch::kInt32) * 256).to(torch::kInt16);
  torch::Tensor half_values = as_half.view(torch::kFloat16).to(torch::kFloat32);
  EXPECT_TRUE(torch::allclose(flat, half_values, 0.0, 0.0, /*equal_nan=*/true));

  torch::Tensor none = GetOrDie(*file, "none");
  EXPECT_EQ(none.numel(), 0);
  EXPECT_EQ(none.scalar_type(), torch::kFloat32);
}

TEST(SafetensorsTest, OpenErrors) {
  TempDir dir;
  ExpectError(SafetensorsFile::Open(dir.File("missing.safetensors")).status(),
              absl::StatusCode::kNotFound, {"missing.safetensors"});
  ExpectError(SafetensorsFile::Open(dir.File("no/such/dir.safetensors")).status(),
              absl::StatusCode::kNotFound, {"dir.safetensors"});
  ExpectError(SafetensorsFile::Open(dir.path()).status(), absl::StatusCode::kInvalidArgument,
              {"not a regular file"});

  const std::string empty = dir.File("empty.safetensors");
  WriteBytes(empty, "");
  ExpectError(SafetensorsFile::Open(empty).status(), absl::StatusCode::kInvalidArgument,
              {empty, "too short"});

  // Size mismatch in one tensor: the message names the file and the tensor.
  const std::string bad = dir.File("bad.safetensors");
  auto image = safetensors::Serialize({{"good", DType::kF32, {2}, std::string(8, '\0')},
                                       {"bad.weight", DType::kF32, {2}, std::string(8, '\0')}},
                                      {});
  ASSERT_TRUE(image.ok());
  std::string bytes = *image;
  const std::size_t pos = bytes.find("\"shape\":[2]", bytes.find("bad.weight"));
  ASSERT_NE(pos, std::string::npos);
  bytes.replace(pos, 11, "\"shape\":[3]");
  WriteBytes(bad, bytes);
  ExpectError(SafetensorsFile::Open(bad).status(), absl::StatusCode::kInvalidArgument,
              {bad, "bad.weight"});

  // A valid file cut short inside the data area.
  const std::string cut = dir.File("cut.safetensors");
  ASSERT_TRUE(WriteSafetensors(cut, {{"a", torch::ones({4})}, {"b", torch::ones({4})}}).ok());
  fs::resize_file(cut, fs::file_size(cut) - 3);
  ExpectError(SafetensorsFile::Open(cut).status(), absl::StatusCode::kInvalidArgument,
              {cut, "'b'", "truncated"});
}

TEST(SafetensorsTest, MissingTensorIsNotFound) {
  TempDir dir;
  const std::string path = dir.File("one.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", torch::ones({1})}}).ok());
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_FALSE(file->contains("b"));
  ExpectError(file->Get("b").status(), absl::StatusCode::kNotFound, {path, "'b'"});
  ExpectError(file->info("b").status(), absl::StatusCode::kNotFound, {path, "'b'"});
}

TEST(SafetensorsTest, ConcurrentGets) {
  TempDir dir;
  const std::string path = dir.File("mt.safetensors");
  const auto tensors = EveryDtype();
  ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  std::vector<std::thread> threads;
  std::vector<int> failures(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int round = 0; round < 50; ++round) {
        auto all = file->GetAll();
        if (!all.ok() || all->size() != tensors.size()) ++failures[i];
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures, std::vector<int>(4, 0));
}

constexpr char kShard1[] = "model-00001-of-00002.safetensors";
constexpr char kShard2[] = "sub/model-00002-of-00002.safetensors";

class SafetensorsShardedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    a_ = torch::arange(6, torch::kFloat32).reshape({2, 3});
    b_ = torch::arange(4, torch::kInt64);
    c_ = torch::ones({5}, torch::kFloat16);
    ASSERT_TRUE(WriteSafetensors(dir_.File(kShard1), {{"a", a_}, {"b", b_}}).ok());
    fs::create_directory(dir_.File("sub"));
    ASSERT_TRUE(WriteSafetensors(dir_.File(kShard2), {{"c", c_}}).ok());
  }

  std::string WriteIndexText(const std::string& weight_map_json) {
    const std::string path = dir_.File("model.safetensors.index.json");
    WriteBytes(
        path, absl::StrCat(R"({"metadata":{"total_size":42},"weight_map":)", weight_map_json, "}"));
    return path;
  }

  std::string WriteIndex(const std::map<std::string, std::string>& weight_map) {
    return WriteIndexText(nlohmann::json(weight_map).dump());
  }

  const std::map<std::string, std::string> good_map_ = {
      {"a", kShard1}, {"b", kShard1}, {"c", kShard2}};
  TempDir dir_;
  torch::Tensor a_, b_, c_;
};

TEST_F(SafetensorsShardedTest, LoadsEveryShard) {
  auto weights = LoadSafetensorsWeights(WriteIndex(good_map_));
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_EQ(weights->size(), 3u);
  EXPECT_TRUE(torch::equal(weights->at("a"), a_));
  EXPECT_TRUE(torch::equal(weights->at("b"), b_));
  EXPECT_TRUE(torch::equal(weights->at("c"), c_));
}

TEST_F(SafetensorsShardedTest, MissingFiles) {
  ExpectError(LoadSafetensorsWeights(dir_.File("nope.safetensors.index.json")).status(),
              absl::StatusCode::kNotFound, {"nope.safetensors.index.json"});
  ExpectError(LoadSafetensorsWeights(dir_.File("nope.safetensors")).status(),
              absl::StatusCode::kNotFound, {"nope.safetensors"});
  const std::string index = WriteIndex({{"a", kShard1}, {"x", "gone.safetensors"}});
  ExpectError(LoadSafetensorsWeights(index).status(), absl::StatusCode::kNotFound,
              {"gone.safetensors", index});
}

TEST_F(SafetensorsShardedTest, MalformedIndex) {
  for (const std::string& map :
       {std::string("[1]"), std::string("{\"a\":3}"), std::string("{}"),
        std::string("{\"a\":\"../x.safetensors\"}"), std::string("{\"a\":\"x\",\"a\":\"y\"}")}) {
    SCOPED_TRACE(map);
    const std::string index = WriteIndexText(map);
    ExpectError(LoadSafetensorsWeights(index).status(), absl::StatusCode::kInvalidArgument,
                {index});
  }
  const std::string index = dir_.File("model.safetensors.index.json");
  WriteBytes(index, "{not json");
  ExpectError(LoadSafetensorsWeights(index).status(), absl::StatusCode::kInvalidArgument,
              {index, "invalid JSON"});
}

TEST_F(SafetensorsShardedTest, TensorListedButAbsentFromItsShard) {
  auto map = good_map_;
  map["d"] = kShard2;
  ExpectError(LoadSafetensorsWeights(WriteIndex(map)).status(), absl::StatusCode::kInvalidArgument,
              {"'d'", "absent"});
  // Listed in the wrong shard.
  map = good_map_;
  map["b"] = kShard2;
  ExpectError(LoadSafetensorsWeights(WriteIndex(map)).status(), absl::StatusCode::kInvalidArgument,
              {"'b'", "absent", "it is in shard"});
}

TEST_F(SafetensorsShardedTest, ShardTensorNotInTheIndex) {
  auto map = good_map_;
  map.erase("b");
  ExpectError(LoadSafetensorsWeights(WriteIndex(map)).status(), absl::StatusCode::kInvalidArgument,
              {"'b'", "does not list"});
}

TEST_F(SafetensorsShardedTest, TensorInTwoShards) {
  ASSERT_TRUE(WriteSafetensors(dir_.File("extra.safetensors"), {{"a", a_}}).ok());
  auto map = good_map_;
  map["x"] = "extra.safetensors";
  ExpectError(LoadSafetensorsWeights(WriteIndex(map)).status(), absl::StatusCode::kInvalidArgument,
              {"'a'", "several shards", "extra.safetensors"});
}

TEST_F(SafetensorsShardedTest, InvalidShard) {
  WriteBytes(dir_.File(kShard2), "garbage!garbage");
  ExpectError(LoadSafetensorsWeights(WriteIndex(good_map_)).status(),
              absl::StatusCode::kInvalidArgument, {"model-00002-of-00002.safetensors"});
}

TEST(WriteSafetensorsTest, RejectsUnsupportedTensorsAndBadNames) {
  TempDir dir;
  const std::string path = dir.File("w.safetensors");
  ExpectError(WriteSafetensors(path, {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
              absl::StatusCode::kInvalidArgument, {"'c'", "ComplexFloat"});
  ExpectError(WriteSafetensors(path, {{"u", torch::Tensor()}}), absl::StatusCode::kInvalidArgument,
              {"'u'", "undefined"});
  torch::Tensor sparse = torch::eye(3).to_sparse();
  ExpectError(WriteSafetensors(path, {{"s", sparse}}), absl::StatusCode::kInvalidArgument,
              {"'s'", "dense"});
  ExpectError(WriteSafetensors(path, {{"", torch::ones({1})}}), absl::StatusCode::kInvalidArgument,
              {path, "empty"});
  ExpectError(WriteSafetensors(path, {{"__metadata__", torch::ones({1})}}),
              absl::StatusCode::kInvalidArgument, {"__metadata__"});
  ExpectError(WriteSafetensors(path, {{"a", torch::ones({1})}, {"a", torch::ones({1})}}),
              absl::StatusCode::kInvalidArgument, {"duplicate", "'a'"});
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(WriteSafetensorsTest, IoErrorsLeaveTheDestinationUntouched) {
  TempDir dir;
  ExpectError(WriteSafetensors(dir.File("no/such/dir/w.safetensors"), {{"a", torch::ones({1})}}),
              absl::StatusCode::kInternal, {"w.safetensors"});
  // The destination is a directory: the rename fails after the data were written.
  const std::string target = dir.File("target");
  fs::create_directory(target);
  WriteBytes(dir.File("target/keep"), "x");
  ExpectError(WriteSafetensors(target, {{"a", torch::ones({1000})}}), absl::StatusCode::kInternal,
              {"rename"});
  EXPECT_TRUE(fs::is_directory(target));
  EXPECT_EQ(ReadBytes(dir.File("target/keep")), "x");
  int entries = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(entry.path().filename(), "target");  // no temporary file left behind
  }
  EXPECT_EQ(entries, 1);
}

TEST(WriteSafetensorsTest, ReplacesAnExistingFileAtomically) {
  TempDir dir;
  const std::string path = dir.File("w.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", torch::ones({3})}}).ok());
  auto old_file = OpenOrDie(path);
  ASSERT_NE(old_file, nullptr);
  torch::Tensor old_view = GetOrDie(*old_file, "a");
  ASSERT_TRUE(WriteSafetensors(path, {{"b", torch::zeros({2}, torch::kInt8)}}).ok());
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->names(), std::vector<std::string>{"b"});
  // The old mapping still shows the old contents (the rename replaced the name, not the inode).
  EXPECT_TRUE(torch::equal(old_view, torch::ones({3})));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

// Reads the file's header with nlohmann directly and checks that SafetensorsFile agrees on every
// name, dtype, shape, byte range and metadata entry, and that tensors hold the file's bytes.
void CheckAgainstIndependentParse(const std::string& path) {
  SCOPED_TRACE(path);
  const std::string bytes = ReadBytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  ASSERT_LE(n, bytes.size() - 8);
  const nlohmann::json header = nlohmann::json::parse(bytes.substr(8, n));

  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->header().data_offset, 8 + n);
  std::set<std::string> expected_names;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      EXPECT_EQ(file->metadata(), (entry.get<std::map<std::string, std::string>>()));
      continue;
    }
    expected_names.insert(name);
    SCOPED_TRACE(name);
    auto info = file->info(name);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(safetensors::DTypeName((*info)->dtype), entry["dtype"].get<std::string>());
    EXPECT_EQ((*info)->shape, entry["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ((*info)->begin, entry["data_offsets"][0].get<uint64_t>());
    EXPECT_EQ((*info)->end, entry["data_offsets"][1].get<uint64_t>());

    torch::Tensor t = GetOrDie(*file, name);
    EXPECT_EQ(t.sizes().vec(), (*info)->shape);
    if (static_cast<std::size_t>(t.element_size()) == safetensors::DTypeSize((*info)->dtype)) {
      EXPECT_EQ(
          std::string_view(static_cast<const char*>(t.data_ptr()), t.nbytes()),
          std::string_view(bytes).substr(8 + n + (*info)->begin, (*info)->end - (*info)->begin));
    }
  }
  const std::vector<std::string> names = file->names();
  EXPECT_EQ(std::set<std::string>(names.begin(), names.end()), expected_names);
}

TEST(SafetensorsGoldenTest, ReadsFluxTinyIo) {
  const std::string path = GoldenDir() + "/flux/flux_tiny/io.safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << "no golden fixture at " << path;
  CheckAgainstIndependentParse(path);
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_FALSE(file->metadata().empty());
  EXPECT_FALSE(file->names().empty());
}

TEST(SafetensorsGoldenTest, EveryGoldenFileAgreesWithAnIndependentParse) {
  const std::string dir = GoldenDir();
  if (dir.empty() || !fs::is_directory(dir)) GTEST_SKIP() << "no golden directory";
  int checked = 0;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file() && entry.path().extension() == ".safetensors") {
      CheckAgainstIndependentParse(entry.path().string());
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(SafetensorsGoldenTest, LoadsFluxTinyTransformerWeights) {
  const std::string path =
      GoldenDir() + "/flux/flux_tiny/transformer/diffusion_pytorch_model.safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << "no golden fixture at " << path;
  auto weights = LoadSafetensorsWeights(path);
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto file = OpenOrDie(path);
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(weights->size(), file->names().size());
  for (const auto& [name, t] : *weights) {
    auto info = file->info(name);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(t.sizes().vec(), (*info)->shape) << name;
    EXPECT_TRUE(torch::equal(t, GetOrDie(*file, name))) << name;
  }
}

}  // namespace
}  // namespace ds
