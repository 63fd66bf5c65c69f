// Helpers shared by the test binaries (header-only; tests only).
#pragma once

#include <stdlib.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

namespace ds::test {

// The golden fixtures: $DS_GOLDEN_DIR when set, else the DS_GOLDEN_DIR compile definition that
// ds_add_test passes (../shared/golden by default).
inline std::string GoldenDir() {
  if (const char* env = std::getenv("DS_GOLDEN_DIR"); env != nullptr && *env != '\0') return env;
#ifdef DS_GOLDEN_DIR
  return DS_GOLDEN_DIR;
#else
  return "../shared/golden";
#endif
}

// A fresh directory under $TMPDIR (or /tmp), removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base != nullptr ? base : "/tmp") + "/ds_test.XXXXXX";
    if (mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // The path of `name` inside the directory.
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A fixture folder name as a GoogleTest parameter name (non-alphanumerics become '_').
inline std::string CaseTestName(std::string name) {
  for (char& ch : name) {
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  }
  return name;
}

inline std::string ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace ds::test
