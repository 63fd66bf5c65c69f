#include "server/auth.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "testing/test_util.h"

namespace ds::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "s3cr3t-token-0123456789abcdef";

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream(path, std::ios::binary) << contents;
}

std::string RealPathOf(const std::string& path) {
  char* r = realpath(path.c_str(), nullptr);
  std::string out = r != nullptr ? r : "";
  free(r);
  return out;
}

// ----------------------------------------------------------------------------------------------
// Token file handling.

TEST(AdminAuthTest, TokenFileIsTrimmedAndUsed) {
  test::TempDir dir;
  const std::string path = dir.File("token");
  WriteFile(path, absl::StrCat("  \t", kToken, "\r\n\n"));
  auto auth = AdminAuth::FromTokenFile(path);
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE(auth->requires_token());
  EXPECT_TRUE(auth->management_enabled());
  EXPECT_TRUE(auth->Check({absl::StrCat("Bearer ", kToken)}).ok());
  // The whitespace around the token in the file is not part of the token.
  EXPECT_EQ(auth->Check({absl::StrCat("Bearer   \t", kToken, "\r\n")}).code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth->Check({absl::StrCat("Bearer ", kToken, "\n")}).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(AdminAuthTest, MissingTokenFileIsNotFoundNamingIt) {
  auto auth = AdminAuth::FromTokenFile("/nonexistent/dir/admin.token");
  ASSERT_FALSE(auth.ok());
  EXPECT_EQ(auth.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr("/nonexistent/dir/admin.token"));
}

TEST(AdminAuthTest, EmptyTokenFileIsInvalid) {
  test::TempDir dir;
  const std::string path = dir.File("token");
  WriteFile(path, " \n\t\n");
  auto auth = AdminAuth::FromTokenFile(path);
  ASSERT_FALSE(auth.ok());
  EXPECT_EQ(auth.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr("empty"));
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr(path));
}

TEST(AdminAuthTest, ShortTokenIsInvalidAndNotEchoed) {
  test::TempDir dir;
  const std::string path = dir.File("token");
  WriteFile(path, "fifteen-chars-x\n");  // 15 characters
  auto auth = AdminAuth::FromTokenFile(path);
  ASSERT_FALSE(auth.ok());
  EXPECT_EQ(auth.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr("too short"));
  EXPECT_THAT(std::string(auth.status().message()), Not(HasSubstr("fifteen-chars-x")));
  // Exactly the minimum length is accepted.
  WriteFile(path, "sixteen-chars-xx\n");
  EXPECT_TRUE(AdminAuth::FromTokenFile(path).ok());
}

TEST(AdminAuthTest, TokenWithInnerSpaceOrNonAsciiIsInvalid) {
  EXPECT_EQ(AdminAuth::FromToken("abcdefgh ijklmnopq").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdminAuth::FromToken("abcdefghijklmnop\xc3\xa9").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(AdminAuth::FromToken(kToken).ok());
}

// ----------------------------------------------------------------------------------------------
// Check() in token mode.

class TokenCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto auth = AdminAuth::FromToken(kToken);
    ASSERT_TRUE(auth.ok()) << auth.status();
    auth_ = *auth;
  }
  absl::StatusCode Code(const std::vector<std::string>& values) const {
    return auth_.Check(values).code();
  }
  AdminAuth auth_ = AdminAuth::Disabled();
};

TEST_F(TokenCheckTest, CorrectBearerTokenIsAllowed) {
  EXPECT_EQ(Code({absl::StrCat("Bearer ", kToken)}), absl::StatusCode::kOk);
}

TEST_F(TokenCheckTest, SchemeIsCaseInsensitiveAndSpacesAreTolerated) {
  EXPECT_EQ(Code({absl::StrCat("bearer ", kToken)}), absl::StatusCode::kOk);
  EXPECT_EQ(Code({absl::StrCat("BEARER ", kToken)}), absl::StatusCode::kOk);
  EXPECT_EQ(Code({absl::StrCat("BeArEr   ", kToken, "  ")}), absl::StatusCode::kOk);
  EXPECT_EQ(Code({absl::StrCat("Bearer\t", kToken, "\t")}), absl::StatusCode::kOk);
}

TEST_F(TokenCheckTest, MissingCredentialIsUnauthenticated) {
  const absl::Status s = auth_.Check({});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Bearer"));
}

TEST_F(TokenCheckTest, MalformedCredentialsAreUnauthenticated) {
  for (const std::string& value :
       {std::string(""), std::string("Bearer"), std::string("Bearer "), std::string("Bearer    "),
        absl::StrCat("Bearer", kToken), absl::StrCat("Basic ", kToken), std::string(kToken),
        absl::StrCat("Bearer ", kToken, " extra"), absl::StrCat("Token ", kToken),
        absl::StrCat("Bearer ", kToken, "\xc3\xa9"), absl::StrCat("Bearer\n", kToken)}) {
    EXPECT_EQ(Code({value}), absl::StatusCode::kUnauthenticated) << "'" << value << "'";
  }
}

TEST_F(TokenCheckTest, WrongTokenIsPermissionDeniedWithoutEchoingIt) {
  const std::string wrong_values[] = {
      "wrong-token-0123456789abcdef",
      std::string(kToken).substr(0, sizeof(kToken) - 2),  // a prefix of the right token
      absl::StrCat(kToken, "x"),                          // the right token plus one character
      "x",
  };
  for (const std::string& wrong : wrong_values) {
    const absl::Status s = auth_.Check({absl::StrCat("Bearer ", wrong)});
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << wrong;
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr(wrong))) << wrong;
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr(kToken)));
  }
}

TEST_F(TokenCheckTest, OtherSchemesNextToBearerAreIgnored) {
  EXPECT_EQ(Code({"Basic dXNlcjpwYXNz", absl::StrCat("Bearer ", kToken)}), absl::StatusCode::kOk);
  EXPECT_EQ(Code({"Basic dXNlcjpwYXNz", "Bearer wrong-token-0123456789"}),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(TokenCheckTest, TwoBearerCredentialsAreAmbiguous) {
  EXPECT_EQ(Code({absl::StrCat("Bearer ", kToken), "Bearer wrong-token-0123456789"}),
            absl::StatusCode::kUnauthenticated);
}

// ----------------------------------------------------------------------------------------------
// Disabled and insecure modes.

TEST(AdminAuthTest, DisabledRefusesEverythingWithTheFlagsInTheMessage) {
  const AdminAuth auth = AdminAuth::Disabled();
  EXPECT_FALSE(auth.requires_token());
  EXPECT_FALSE(auth.management_enabled());
  for (const std::vector<std::string>& values :
       {std::vector<std::string>{}, std::vector<std::string>{absl::StrCat("Bearer ", kToken)}}) {
    const absl::Status s = auth.Check(values);
    EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(std::string(s.message()), HasSubstr("--admin_token_file"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("--insecure_allow_management"));
  }
}

TEST(AdminAuthTest, InsecureAllowsEverything) {
  const AdminAuth auth = AdminAuth::Insecure();
  EXPECT_FALSE(auth.requires_token());
  EXPECT_TRUE(auth.management_enabled());
  EXPECT_TRUE(auth.Check({}).ok());
  EXPECT_TRUE(auth.Check({"Bearer anything-at-all-here"}).ok());
  EXPECT_TRUE(auth.Check({"garbage"}).ok());
}

// ----------------------------------------------------------------------------------------------
// ConfinePath.

class ConfinePathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(tmp_.path().empty());
    root_ = tmp_.File("root");
    outside_ = tmp_.File("outside");
    std::filesystem::create_directories(root_ + "/models/flux");
    std::filesystem::create_directories(outside_);
    WriteFile(root_ + "/models/flux/model.safetensors", "x");
    WriteFile(root_ + "/adapter.safetensors", "x");
    WriteFile(outside_ + "/secret.safetensors", "x");
  }
  absl::StatusOr<std::string> Confine(const std::string& requested) const {
    return ConfinePath(root_, requested, "--model_root");
  }

  test::TempDir tmp_;
  std::string root_;
  std::string outside_;
};

TEST_F(ConfinePathTest, RelativePathInsideResolvesToAbsolute) {
  auto p = Confine("models/flux/model.safetensors");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/models/flux/model.safetensors"));
  EXPECT_EQ(p->front(), '/');
}

TEST_F(ConfinePathTest, AbsolutePathInsideIsAllowed) {
  auto p = Confine(root_ + "/adapter.safetensors");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/adapter.safetensors"));
}

TEST_F(ConfinePathTest, DotDotInsideTheRootIsAllowed) {
  auto p = Confine("models/flux/../../adapter.safetensors");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/adapter.safetensors"));
}

TEST_F(ConfinePathTest, TraversalToEtcPasswdIsDenied) {
  // Deep enough to reach / from the temp root wherever $TMPDIR is.
  std::string up;
  for (int i = 0; i < 32; ++i) up += "../";
  for (const std::string& requested : {std::string("../../etc/passwd"), up + "etc/passwd",
                                       std::string("models/../../outside/secret.safetensors")}) {
    auto p = Confine(requested);
    ASSERT_FALSE(p.ok()) << requested;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kPermissionDenied) << requested;
    EXPECT_THAT(std::string(p.status().message()), HasSubstr("--model_root"));
  }
}

TEST_F(ConfinePathTest, AbsolutePathOutsideIsDenied) {
  for (const std::string& requested :
       {std::string("/etc/passwd"), std::string("/"), outside_ + "/secret.safetensors"}) {
    auto p = Confine(requested);
    ASSERT_FALSE(p.ok()) << requested;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kPermissionDenied) << requested;
  }
}

TEST_F(ConfinePathTest, MissingPathOutsideIsDeniedNotReportedMissing) {
  // Probing outside the root must not reveal whether files exist there.
  for (const std::string& requested :
       {std::string("/nonexistent/file"), std::string("../nonexistent"),
        outside_ + "/missing.safetensors"}) {
    auto p = Confine(requested);
    ASSERT_FALSE(p.ok()) << requested;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kPermissionDenied) << requested;
  }
}

TEST_F(ConfinePathTest, SymlinkEscapingTheRootIsDeniedWithoutNamingTheTarget) {
  std::filesystem::create_symlink(outside_ + "/secret.safetensors", root_ + "/escape.safetensors");
  std::filesystem::create_directory_symlink(outside_, root_ + "/escape_dir");
  for (const std::string& requested :
       {std::string("escape.safetensors"), std::string("escape_dir/secret.safetensors"),
        root_ + "/escape.safetensors"}) {
    auto p = Confine(requested);
    ASSERT_FALSE(p.ok()) << requested;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kPermissionDenied) << requested;
    EXPECT_THAT(std::string(p.status().message()), Not(HasSubstr(outside_)));
  }
}

TEST_F(ConfinePathTest, SymlinkStayingInsideIsAllowed) {
  std::filesystem::create_symlink(root_ + "/models/flux/model.safetensors",
                                  root_ + "/latest.safetensors");
  std::filesystem::create_directory_symlink("models/flux", root_ + "/flux");  // relative target
  auto p = Confine("latest.safetensors");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/models/flux/model.safetensors"));
  auto q = Confine("flux/model.safetensors");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(*q, *p);
}

TEST_F(ConfinePathTest, MissingFileInsideIsNotFoundNamingTheRequestedPath) {
  auto p = Confine("models/nope.safetensors");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("models/nope.safetensors"));
  EXPECT_THAT(std::string(p.status().message()), Not(HasSubstr(tmp_.path())));
  // A file used as a directory is missing too.
  EXPECT_EQ(Confine("adapter.safetensors/x").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ConfinePathTest, RootWithTrailingSlashAndTheRootItself) {
  auto p = ConfinePath(root_ + "/", "adapter.safetensors", "--adapter_root");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/adapter.safetensors"));
  auto self = ConfinePath(root_ + "/", root_ + "/", "--adapter_root");
  ASSERT_TRUE(self.ok()) << self.status();
  EXPECT_EQ(*self, RealPathOf(root_));
  auto dot = ConfinePath(root_ + "//", ".", "--adapter_root");
  ASSERT_TRUE(dot.ok()) << dot.status();
  EXPECT_EQ(*dot, RealPathOf(root_));
  EXPECT_EQ(ConfinePath(root_ + "/", "..", "--adapter_root").status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(ConfinePathTest, SiblingWithTheRootAsStringPrefixIsDenied) {
  // root .../x and path .../xy/file: a string-prefix check would wrongly allow it.
  std::filesystem::create_directories(tmp_.File("x"));
  std::filesystem::create_directories(tmp_.File("xy"));
  WriteFile(tmp_.File("xy/file"), "x");
  for (const std::string& requested : {tmp_.File("xy/file"), std::string("../xy/file")}) {
    auto p = ConfinePath(tmp_.File("x"), requested, "--model_root");
    ASSERT_FALSE(p.ok()) << requested;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kPermissionDenied) << requested;
  }
}

TEST_F(ConfinePathTest, RootBehindASymlinkWorks) {
  const std::string link = tmp_.File("root_link");
  std::filesystem::create_directory_symlink(root_, link);
  auto p = ConfinePath(link, link + "/adapter.safetensors", "--adapter_root");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, RealPathOf(root_ + "/adapter.safetensors"));
  auto missing = ConfinePath(link, link + "/missing.safetensors", "--adapter_root");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ConfinePathTest, UnconfiguredRootAndEmptyPathAreInvalid) {
  auto no_root = ConfinePath("", "adapter.safetensors", "--adapter_root");
  ASSERT_FALSE(no_root.ok());
  EXPECT_EQ(no_root.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_root.status().message()), HasSubstr("--adapter_root"));
  EXPECT_EQ(Confine("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Confine(std::string("adapter.safetensors\0/../x", 25)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ConfinePathTest, MissingRootIsFailedPrecondition) {
  auto p = ConfinePath(tmp_.File("no_such_root"), "a", "--model_root");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("--model_root"));
}

}  // namespace
}  // namespace ds::server
