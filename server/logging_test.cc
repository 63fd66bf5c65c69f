#include "server/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace ds::server {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::SizeIs;

RpcLogEntry SampleEntry() {
  RpcLogEntry e;
  e.rpc = "Generate";
  e.model = "flux-dev";
  e.adapters = {"style", "detail"};
  e.code = absl::StatusCode::kNotFound;
  e.message = "model \"x\" not found\nsecond line";
  e.seconds = 0.125;
  e.peer = "ipv4:127.0.0.1:50000";
  return e;
}

// Everything LogRpc / spdlog writes to stderr while `fn` runs, split into lines.
template <typename Fn>
std::vector<std::string> CaptureLines(Fn fn) {
  ::testing::internal::CaptureStderr();
  fn();
  return absl::StrSplit(::testing::internal::GetCapturedStderr(), '\n', absl::SkipEmpty());
}

TEST(LoggingTest, BadFormatIsInvalidArgumentListingBoth) {
  for (const char* bad : {"", "JSON", "xml", "text "}) {
    const absl::Status s = ConfigureLogging(bad);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("text"));
    EXPECT_THAT(std::string(s.message()), HasSubstr("json"));
  }
}

TEST(LoggingTest, JsonLineHoldsEveryField) {
  const nlohmann::json j = nlohmann::json::parse(FormatRpcLogJson(SampleEntry()));
  EXPECT_EQ(j.at("msg"), "rpc");
  EXPECT_EQ(j.at("level"), "warning");
  EXPECT_EQ(j.at("rpc"), "Generate");
  EXPECT_EQ(j.at("model"), "flux-dev");
  EXPECT_EQ(j.at("adapters"), nlohmann::json::array({"style", "detail"}));
  EXPECT_EQ(j.at("code"), "NOT_FOUND");
  EXPECT_EQ(j.at("message"), "model \"x\" not found\nsecond line");
  EXPECT_DOUBLE_EQ(j.at("seconds").get<double>(), 0.125);
  EXPECT_EQ(j.at("peer"), "ipv4:127.0.0.1:50000");
  EXPECT_THAT(j.at("ts").get<std::string>(),
              MatchesRegex("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z"));
  EXPECT_EQ(j.size(), 10u);
}

TEST(LoggingTest, JsonLevelFollowsTheCode) {
  RpcLogEntry e = SampleEntry();
  e.code = absl::StatusCode::kOk;
  EXPECT_EQ(nlohmann::json::parse(FormatRpcLogJson(e)).at("level"), "info");
  e.code = absl::StatusCode::kInternal;
  EXPECT_EQ(nlohmann::json::parse(FormatRpcLogJson(e)).at("level"), "error");
}

TEST(LoggingTest, JsonSurvivesInvalidUtf8) {
  RpcLogEntry e = SampleEntry();
  e.model = "bad\xff\xfe";
  const std::string line = FormatRpcLogJson(e);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j.at("model"), "bad\xef\xbf\xbd\xef\xbf\xbd");
}

TEST(LoggingTest, JsonModeWritesOneObjectPerLineForRpcsAndPlainMessages) {
  ASSERT_TRUE(ConfigureLogging("json").ok());
  EXPECT_EQ(LoggingFormat(), "json");
  const std::vector<std::string> lines = CaptureLines([] {
    LogRpc(SampleEntry());
    spdlog::info("server listening on {}", "[::]:50051");
  });
  ASSERT_THAT(lines, SizeIs(2));
  const nlohmann::json rpc = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(rpc.at("msg"), "rpc");
  EXPECT_EQ(rpc.at("rpc"), "Generate");
  EXPECT_EQ(rpc.at("code"), "NOT_FOUND");
  EXPECT_EQ(rpc.at("adapters"), nlohmann::json::array({"style", "detail"}));
  const nlohmann::json plain = nlohmann::json::parse(lines[1]);
  EXPECT_EQ(plain.at("msg"), "server listening on [::]:50051");
  EXPECT_EQ(plain.at("level"), "info");
  EXPECT_TRUE(plain.contains("ts"));
  ASSERT_TRUE(ConfigureLogging("text").ok());
}

TEST(LoggingTest, TextModeLineContainsTheFieldsOnOneLine) {
  ASSERT_TRUE(ConfigureLogging("text").ok());
  EXPECT_EQ(LoggingFormat(), "text");
  const std::vector<std::string> lines = CaptureLines([] { LogRpc(SampleEntry()); });
  ASSERT_THAT(lines, SizeIs(1));
  const std::string& line = lines[0];
  EXPECT_THAT(line, HasSubstr("[warning]"));
  EXPECT_THAT(line, HasSubstr("rpc=Generate"));
  EXPECT_THAT(line, HasSubstr("model=flux-dev"));
  EXPECT_THAT(line, HasSubstr("adapters=[style,detail]"));
  EXPECT_THAT(line, HasSubstr("code=NOT_FOUND"));
  EXPECT_THAT(line, HasSubstr("seconds=0.125000"));
  EXPECT_THAT(line, HasSubstr("peer=ipv4:127.0.0.1:50000"));
  EXPECT_THAT(line, HasSubstr("message=\"model \\\"x\\\" not found\\nsecond line\""));
  EXPECT_THAT(line, MatchesRegex("\\[[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z\\] .*"));
}

TEST(LoggingTest, TextValuesWithSpacesOrControlsAreQuoted) {
  RpcLogEntry e;
  e.rpc = "GetMetadata";
  e.model = "my model\r";
  e.code = absl::StatusCode::kOk;
  e.peer = "";
  const std::string text = FormatRpcLogText(e);
  EXPECT_EQ(text,
            "rpc=GetMetadata model=\"my model\\r\" adapters=[] code=OK seconds=0.000000 peer=\"\" "
            "message=\"\"");
}

TEST(LoggingTest, LevelIsKeptAcrossReconfiguration) {
  spdlog::set_level(spdlog::level::err);
  ASSERT_TRUE(ConfigureLogging("json").ok());
  const std::vector<std::string> lines = CaptureLines([] {
    LogRpc(SampleEntry());  // warning: filtered
    RpcLogEntry e = SampleEntry();
    e.code = absl::StatusCode::kInternal;
    LogRpc(e);  // error: kept
  });
  ASSERT_THAT(lines, SizeIs(1));
  EXPECT_EQ(nlohmann::json::parse(lines[0]).at("code"), "INTERNAL");
  spdlog::set_level(spdlog::level::info);
  ASSERT_TRUE(ConfigureLogging("text").ok());
}

}  // namespace
}  // namespace ds::server
