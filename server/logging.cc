#include "server/logging.h"

#include <spdlog/formatter.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace ds::server {
namespace {

constexpr char kRpcLoggerName[] = "ds_rpc";
constexpr char kTextPattern[] = "[%Y-%m-%dT%H:%M:%S.%eZ] [%l] %v";

struct LoggingState {
  absl::Mutex mu;
  std::shared_ptr<spdlog::logger> rpc_logger ABSL_GUARDED_BY(mu);  // null until configured
  bool json ABSL_GUARDED_BY(mu) = false;
};

LoggingState& State() {
  static LoggingState* state = new LoggingState;  // never destroyed: loggers outlive main
  return *state;
}

std::string Rfc3339(absl::Time t) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone());
}

std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace);
}

spdlog::level::level_enum LevelFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return spdlog::level::info;
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kDataLoss:
      return spdlog::level::err;
    default:
      return spdlog::level::warn;
  }
}

std::string LevelName(spdlog::level::level_enum level) {
  const spdlog::string_view_t name = spdlog::level::to_string_view(level);
  return std::string(name.data(), name.size());
}

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  if (name.empty()) name = absl::StrCat("CODE_", static_cast<int>(code));
  return name;
}

// A text-log value: as is when it is a non-empty run of printable non-space characters other
// than '"' and '='; otherwise quoted, with \" \\ \n \r \t and \xNN escapes.
std::string TextValue(const std::string& value, bool always_quote = false) {
  bool plain = !value.empty() && !always_quote;
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f || c == '"' || c == '=' || c == '\\') plain = false;
  }
  if (plain) return value;
  std::string out = "\"";
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (u < 0x20 || u == 0x7f) {
          absl::StrAppendFormat(&out, "\\x%02x", u);
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

// JSON-lines formatter: lines of the RPC logger are complete JSON objects already and pass
// through; every other message becomes {"ts", "level", "msg"}.
class JsonFormatter : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string line;
    if (absl::string_view(msg.logger_name.data(), msg.logger_name.size()) == kRpcLoggerName) {
      line.assign(msg.payload.data(), msg.payload.size());
    } else {
      nlohmann::json j;
      j["ts"] = Rfc3339(absl::FromChrono(msg.time));
      j["level"] = LevelName(msg.level);
      j["msg"] = std::string(msg.payload.data(), msg.payload.size());
      line = Dump(j);
    }
    line += '\n';
    dest.append(line.data(), line.data() + line.size());
  }
  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }
};

}  // namespace

absl::Status ConfigureLogging(const std::string& format) {
  if (format != "text" && format != "json") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown log format '", format, "'; expected \"text\" or \"json\""));
  }
  const bool json = format == "json";
  auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  if (json) {
    sink->set_formatter(std::make_unique<JsonFormatter>());
  } else {
    sink->set_formatter(
        std::make_unique<spdlog::pattern_formatter>(kTextPattern, spdlog::pattern_time_type::utc));
  }
  const spdlog::level::level_enum level = spdlog::default_logger_raw()->level();
  auto default_logger = std::make_shared<spdlog::logger>("", sink);
  default_logger->set_level(level);
  auto rpc_logger = std::make_shared<spdlog::logger>(kRpcLoggerName, sink);
  rpc_logger->set_level(level);
  spdlog::set_default_logger(std::move(default_logger));
  // Registered so that spdlog::set_level() also reaches the RPC logger.
  spdlog::drop(kRpcLoggerName);
  spdlog::register_logger(rpc_logger);

  LoggingState& state = State();
  absl::MutexLock lock(&state.mu);
  state.rpc_logger = std::move(rpc_logger);
  state.json = json;
  return absl::OkStatus();
}

std::string LoggingFormat() {
  LoggingState& state = State();
  absl::MutexLock lock(&state.mu);
  return state.json ? "json" : "text";
}

std::string FormatRpcLogJson(const RpcLogEntry& entry) {
  nlohmann::json j;
  j["ts"] = Rfc3339(absl::Now());
  j["level"] = LevelName(LevelFor(entry.code));
  j["msg"] = "rpc";
  j["rpc"] = entry.rpc;
  j["model"] = entry.model;
  j["adapters"] = entry.adapters;
  j["code"] = CodeName(entry.code);
  j["message"] = entry.message;
  j["seconds"] = entry.seconds;
  j["peer"] = entry.peer;
  return Dump(j);
}

std::string FormatRpcLogText(const RpcLogEntry& entry) {
  std::vector<std::string> adapters;
  adapters.reserve(entry.adapters.size());
  for (const std::string& a : entry.adapters) adapters.push_back(TextValue(a));
  return absl::StrCat("rpc=", TextValue(entry.rpc), " model=", TextValue(entry.model),
                      " adapters=[", absl::StrJoin(adapters, ","), "] code=", CodeName(entry.code),
                      " seconds=", absl::StrFormat("%.6f", entry.seconds),
                      " peer=", TextValue(entry.peer),
                      " message=", TextValue(entry.message, /*always_quote=*/true));
}

void LogRpc(const RpcLogEntry& entry) {
  std::shared_ptr<spdlog::logger> logger;
  bool json = false;
  {
    LoggingState& state = State();
    absl::MutexLock lock(&state.mu);
    logger = state.rpc_logger;
    json = state.json;
  }
  if (logger == nullptr) logger = spdlog::default_logger();
  const std::string line = json ? FormatRpcLogJson(entry) : FormatRpcLogText(entry);
  logger->log(LevelFor(entry.code), "{}", line);
}

}  // namespace ds::server
