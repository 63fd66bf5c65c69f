// A main() for replaying libFuzzer inputs without libFuzzer: runs LLVMFuzzerTestOneInput once on
// every file named on the command line and on every regular file inside every directory named
// there (recursively, in sorted path order), after LLVMFuzzerInitialize when the harness defines
// it. Arguments starting with '-' are libFuzzer flags and are ignored. Prints how many inputs ran;
// exits 1 when an argument does not exist or no input ran at all (an empty or misplaced corpus),
// so a replay test cannot pass vacuously. A crash or sanitizer report aborts the process as under
// libFuzzer; the input being run is printed first so that it can be found.
//
// Linked into `<name>_replay` next to the harness in every build (fuzz/CMakeLists.txt): the seed
// corpora run as ordinary tests under g++, and crash reproducers replay without clang.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size);
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) __attribute__((weak));

namespace {

namespace fs = std::filesystem;

bool ReadFile(const fs::path& path, std::vector<uint8_t>* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return !in.bad();
}

}  // namespace

int main(int argc, char** argv) {
  if (LLVMFuzzerInitialize != nullptr) LLVMFuzzerInitialize(&argc, &argv);

  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.empty() || arg[0] == '-') continue;
    std::error_code ec;
    if (fs::is_directory(arg, ec)) {
      std::vector<fs::path> found;
      for (auto it = fs::recursive_directory_iterator(arg, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        if (it->is_regular_file(ec)) found.push_back(it->path());
      }
      if (ec) {
        std::fprintf(stderr, "replay: cannot list %s: %s\n", arg.c_str(), ec.message().c_str());
        return 1;
      }
      std::sort(found.begin(), found.end());
      inputs.insert(inputs.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(arg, ec)) {
      inputs.emplace_back(arg);
    } else {
      std::fprintf(stderr, "replay: no such file or directory: %s\n", arg.c_str());
      return 1;
    }
  }

  std::size_t ran = 0;
  std::vector<uint8_t> bytes;
  for (const fs::path& path : inputs) {
    if (!ReadFile(path, &bytes)) {
      std::fprintf(stderr, "replay: cannot read %s\n", path.c_str());
      return 1;
    }
    std::fprintf(stderr, "replay: %s (%zu bytes)\n", path.c_str(), bytes.size());
    // A copy of exactly the input's size, so that reads past its end are caught as under
    // libFuzzer (which also hands the harness a buffer of exactly `size` bytes).
    std::vector<uint8_t> exact(bytes);
    static uint8_t empty = 0;
    LLVMFuzzerTestOneInput(exact.empty() ? &empty : exact.data(), exact.size());
    ++ran;
  }
  std::printf("replay: ran %zu inputs\n", ran);
  if (ran == 0) {
    std::fprintf(stderr, "replay: no inputs (give corpus directories or files)\n");
    return 1;
  }
  return 0;
}
