// Authorization of management RPCs and confinement of client-supplied server-side paths.
//
// No LibTorch, no gRPC: the service passes the "authorization" metadata values of a call in and
// turns the absl::Status it gets back into a grpc::Status at the RPC edge.
//
// Thread-safety: AdminAuth is immutable after construction; Check() and the accessors may be
// called concurrently from any thread. ConfinePath() is reentrant.
#pragma once

#include <array>
#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ds::server {

// How management RPCs (LoadSingleFile, UnloadModel, LoadLoRA, UnloadLoRA, LoadIPAdapter,
// UnloadIPAdapter) are authorized.
// One of three modes:
//   token     - every management call must carry `authorization: Bearer <token>`;
//   insecure  - every management call is allowed (operator passed --insecure_allow_management);
//   disabled  - no token and no flag: every management call is refused.
// The token itself is never stored, only its SHA-256 digest, and never appears in a message.
// Copyable and movable (a small value).
class AdminAuth {
 public:
  // Reads the token from `path`; surrounding whitespace (spaces, tabs, CR, LF) is trimmed.
  // NOT_FOUND if the file does not exist or cannot be opened (message names the file);
  // INVALID_ARGUMENT (naming the file, never the token) if the token is empty after trimming,
  // shorter than kMinTokenLength characters, or contains a character outside printable ASCII
  // without space (0x21..0x7E) — such a token could not be sent as gRPC metadata anyway.
  static absl::StatusOr<AdminAuth> FromTokenFile(const std::string& path);
  // The token given directly (same validation as FromTokenFile, without the trimming);
  // INVALID_ARGUMENT as above.
  static absl::StatusOr<AdminAuth> FromToken(const std::string& token);
  // --insecure_allow_management: everything allowed, no token.
  static AdminAuth Insecure();
  // No token configured and no flag: management refused.
  static AdminAuth Disabled();

  static constexpr size_t kMinTokenLength = 16;

  // `authorization` = the values of the "authorization" metadata key of the call (any number,
  // usually zero or one). Returns:
  //   OK                 when the call is allowed (insecure mode, or exactly one well-formed
  //                      "Bearer <token>" value whose token matches);
  //   UNAUTHENTICATED    in token mode when the call carries no well-formed Bearer credential:
  //                      no value, only other schemes ("Basic ..."), "Bearer" with no token, or
  //                      more than one Bearer value (ambiguous);
  //   PERMISSION_DENIED  in token mode when the Bearer token is wrong, and in disabled mode for
  //                      every call (message: start the server with --admin_token_file or
  //                      --insecure_allow_management).
  // The auth scheme is matched case-insensitively (RFC 7235: "bearer" == "Bearer"), followed by
  // one or more spaces or tabs; trailing spaces/tabs are ignored; a token with any other
  // character outside 0x21..0x7E (inner space, control, non-ASCII) is malformed
  // (UNAUTHENTICATED). Values of other schemes are ignored. The token comparison is
  // constant time: SHA-256 digests of the expected and presented tokens are compared with
  // CRYPTO_memcmp, so neither content nor length leaks through timing.
  absl::Status Check(const std::vector<std::string>& authorization) const;

  // True in token mode.
  bool requires_token() const { return mode_ == Mode::kToken; }
  // True in token and insecure modes (false only when disabled).
  bool management_enabled() const { return mode_ != Mode::kDisabled; }

 private:
  enum class Mode { kToken, kInsecure, kDisabled };
  explicit AdminAuth(Mode mode) : mode_(mode) {}

  Mode mode_;
  std::array<unsigned char, 32> token_digest_{};  // SHA-256 of the token; token mode only.
};

// Confines a client-supplied path to `root`. `requested` is relative to root (or absolute); it is
// resolved with realpath (every symlink followed, `.`/`..` resolved) and must lie at or below the
// resolved root. `flag_name` is the flag that configures `root` (e.g. "--model_root"), used in
// messages. Returns the resolved absolute path.
//   INVALID_ARGUMENT   `root` is empty (message: the flag is not configured and names it), or
//                      `requested` is empty or contains a NUL byte;
//   FAILED_PRECONDITION the configured root itself cannot be resolved (missing, not a directory);
//   NOT_FOUND          the path does not exist (message names the requested path, never a resolved
//                      one) and lexically lies inside the root;
//   PERMISSION_DENIED  the resolved path is outside the resolved root (`..` traversal, an absolute
//                      path elsewhere, a symlink that escapes), or — without saying whether it
//                      exists — a missing path that lexically lies outside the root; also when
//                      resolution is refused by the file system (EACCES). The message names the
//                      requested path and the flag, never the resolved target;
//   INVALID_ARGUMENT   also for a symlink loop (ELOOP) or an over-long name (ENAMETOOLONG);
//   INTERNAL           any other realpath failure.
// A path equal to the root itself is inside. "/tmp/xy/f" is not inside root "/tmp/x" (component
// comparison, not string prefix).
absl::StatusOr<std::string> ConfinePath(const std::string& root, const std::string& requested,
                                        const std::string& flag_name);

}  // namespace ds::server
