#include "handlers/digest.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "testing/test_util.h"

namespace ds {
namespace {

// FIPS 180-4 / NIST CSRC example vectors.
TEST(DigestTest, Sha256KnownVectors) {
  EXPECT_EQ(Sha256Hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc", 3),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(Sha256Hex(two_blocks.data(), two_blocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(DigestTest, FileDigestEqualsBufferDigestAcrossChunks) {
  test::TempDir dir;
  // 3 MiB + 7 bytes: several read chunks and a partial one.
  std::string bytes(3 * (1 << 20) + 7, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>((i * 2654435761u) >> 13);
  const std::string path = dir.File("blob.bin");
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  auto digest = Sha256File(path);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, Sha256Hex(bytes.data(), bytes.size()));
  bytes[bytes.size() / 2] ^= 1;
  EXPECT_NE(*digest, Sha256Hex(bytes.data(), bytes.size()));
}

TEST(DigestTest, MissingFileIsNotFoundNamingIt) {
  auto digest = Sha256File("/nonexistent/dir/x.safetensors");
  ASSERT_FALSE(digest.ok());
  EXPECT_EQ(digest.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(digest.status().message().find("/nonexistent/dir/x.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace ds
