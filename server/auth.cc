#include "server/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdlib.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace ds::server {
namespace {

constexpr char kEnableHint[] =
    "start the server with --admin_token_file or --insecure_allow_management";

std::array<unsigned char, 32> Sha256(absl::string_view bytes) {
  std::array<unsigned char, 32> out{};
  unsigned int n = 0;
  // EVP_Digest only fails on allocation failure, which the rest of the process would not survive.
  if (EVP_Digest(bytes.data(), bytes.size(), out.data(), &n, EVP_sha256(), nullptr) != 1 ||
      n != out.size()) {
    std::abort();
  }
  return out;
}

bool IsTokenChar(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u >= 0x21 && u <= 0x7e;
}

bool IsSpaceOrTab(char c) { return c == ' ' || c == '\t'; }

// "Bearer <token>" -> token; an empty view when `value` is not a well-formed Bearer credential:
// the scheme (any case), one or more spaces/tabs, one token of printable non-space ASCII, optional
// trailing spaces/tabs.
absl::string_view ParseBearer(absl::string_view value) {
  constexpr absl::string_view kScheme = "bearer";
  if (value.size() <= kScheme.size() || !absl::StartsWithIgnoreCase(value, kScheme)) return {};
  absl::string_view rest = value.substr(kScheme.size());
  if (!IsSpaceOrTab(rest.front())) return {};  // "Bearerx..." is another scheme.
  while (!rest.empty() && IsSpaceOrTab(rest.front())) rest.remove_prefix(1);
  while (!rest.empty() && IsSpaceOrTab(rest.back())) rest.remove_suffix(1);
  for (char c : rest) {
    if (!IsTokenChar(c)) return {};
  }
  return rest;
}

absl::Status ValidateToken(absl::string_view token, absl::string_view source) {
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("admin token ", source, " is empty"));
  }
  if (token.size() < AdminAuth::kMinTokenLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin token ", source, " is too short: ", token.size(),
                     " characters, at least ", AdminAuth::kMinTokenLength, " required"));
  }
  for (char c : token) {
    if (!IsTokenChar(c)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "admin token ", source,
          " contains whitespace or a non-printable / non-ASCII character; it must be printable "
          "ASCII without spaces to travel as gRPC metadata"));
    }
  }
  return absl::OkStatus();
}

// realpath(3) as a std::string; errno preserved on failure.
bool RealPath(const std::string& path, std::string* out) {
  std::unique_ptr<char, decltype(&std::free)> resolved(realpath(path.c_str(), nullptr), &std::free);
  if (resolved == nullptr) return false;
  *out = resolved.get();
  return true;
}

// True when `path` equals `root` or lies below it, comparing whole components. Both absolute and
// normalized (no trailing slash except for "/").
bool IsWithin(const std::string& path, const std::string& root) {
  if (root == "/") return !path.empty() && path.front() == '/';
  if (path.size() < root.size() || path.compare(0, root.size(), root) != 0) return false;
  return path.size() == root.size() || path[root.size()] == '/';
}

// Lexically normalized absolute form without a trailing slash (except "/").
std::string LexicalNormal(const std::string& path) {
  std::string s = std::filesystem::path(path).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

}  // namespace

absl::StatusOr<AdminAuth> AdminAuth::FromTokenFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat("admin token file '", path, "' does not exist"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("admin token file '", path, "' cannot be opened: ", std::strerror(errno)));
  }
  std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) {
    return absl::NotFoundError(absl::StrCat("admin token file '", path, "' cannot be read"));
  }
  const absl::string_view token = absl::StripAsciiWhitespace(contents);
  if (absl::Status s = ValidateToken(token, absl::StrCat("in file '", path, "'")); !s.ok()) {
    return s;
  }
  AdminAuth auth(Mode::kToken);
  auth.token_digest_ = Sha256(token);
  return auth;
}

absl::StatusOr<AdminAuth> AdminAuth::FromToken(const std::string& token) {
  if (absl::Status s = ValidateToken(token, "(given directly)"); !s.ok()) return s;
  AdminAuth auth(Mode::kToken);
  auth.token_digest_ = Sha256(token);
  return auth;
}

AdminAuth AdminAuth::Insecure() { return AdminAuth(Mode::kInsecure); }

AdminAuth AdminAuth::Disabled() { return AdminAuth(Mode::kDisabled); }

absl::Status AdminAuth::Check(const std::vector<std::string>& authorization) const {
  switch (mode_) {
    case Mode::kInsecure:
      return absl::OkStatus();
    case Mode::kDisabled:
      return absl::PermissionDeniedError(
          absl::StrCat("management RPCs are disabled on this server; ", kEnableHint));
    case Mode::kToken:
      break;
  }
  absl::string_view presented;
  int bearer_values = 0;
  for (const std::string& value : authorization) {
    absl::string_view token = ParseBearer(value);
    if (token.empty()) continue;
    presented = token;
    ++bearer_values;
  }
  if (bearer_values == 0) {
    return absl::UnauthenticatedError(
        authorization.empty()
            ? "management RPCs require an 'authorization: Bearer <token>' metadata entry"
            : "the 'authorization' metadata carries no well-formed 'Bearer <token>' credential");
  }
  if (bearer_values > 1) {
    return absl::UnauthenticatedError(
        "the call carries more than one 'authorization: Bearer' credential; send exactly one");
  }
  const std::array<unsigned char, 32> digest = Sha256(presented);
  if (CRYPTO_memcmp(digest.data(), token_digest_.data(), digest.size()) != 0) {
    return absl::PermissionDeniedError("the admin bearer token is not valid");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ConfinePath(const std::string& root, const std::string& requested,
                                        const std::string& flag_name) {
  if (root.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("server-side paths are not allowed: ", flag_name,
                                                   " is not configured (start the server with ",
                                                   flag_name, "=DIR)"));
  }
  if (requested.empty()) return absl::InvalidArgumentError("the path is empty");
  if (requested.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError("the path contains a NUL byte");
  }
  std::string resolved_root;
  if (!RealPath(root, &resolved_root)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the configured ", flag_name, " '", root, "' cannot be resolved: ", std::strerror(errno)));
  }
  std::error_code ec;
  if (!std::filesystem::is_directory(resolved_root, ec)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the configured ", flag_name, " '", root, "' is not a directory"));
  }
  const std::string candidate =
      requested.front() == '/' ? requested : absl::StrCat(resolved_root, "/", requested);
  std::string resolved;
  if (!RealPath(candidate, &resolved)) {
    const int err = errno;
    const std::string outside = absl::StrCat("'", requested, "' is outside ", flag_name);
    if (err == ENOENT || err == ENOTDIR) {
      // Only say "does not exist" for paths that are lexically inside the root, so that probing
      // outside the root cannot tell which files exist there.
      const std::string lexical = LexicalNormal(candidate);
      if (IsWithin(lexical, resolved_root) ||
          IsWithin(lexical, LexicalNormal(std::filesystem::absolute(root, ec).string()))) {
        return absl::NotFoundError(
            absl::StrCat("'", requested, "' does not exist under ", flag_name));
      }
      return absl::PermissionDeniedError(outside);
    }
    if (err == EACCES) {
      return absl::PermissionDeniedError(
          absl::StrCat("'", requested, "' cannot be accessed: ", std::strerror(err)));
    }
    if (err == ELOOP || err == ENAMETOOLONG) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", requested, "' cannot be resolved: ", std::strerror(err)));
    }
    return absl::InternalError(
        absl::StrCat("'", requested, "' cannot be resolved: ", std::strerror(err)));
  }
  if (!IsWithin(resolved, resolved_root)) {
    return absl::PermissionDeniedError(absl::StrCat("'", requested, "' is outside ", flag_name,
                                                    " (after resolving '..' and symlinks)"));
  }
  return resolved;
}

}  // namespace ds::server
