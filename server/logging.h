// Server logging on spdlog: human-readable text or one JSON object per line, to stderr, and the
// one-line-per-RPC access log.
//
// Thread-safety: LogRpc, FormatRpcLogJson and FormatRpcLogText may be called concurrently from
// any thread (spdlog's stderr sink serializes lines, so lines never interleave).
// ConfigureLogging replaces the loggers; call it at startup before serving (concurrent LogRpc
// calls stay safe — they use either the old or the new logger — but may not see the new format).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace ds::server {

// Configures the default spdlog logger (and the RPC logger) to write to stderr:
//   "text": `[2024-05-01T12:00:00.123Z] [info] message` (UTC);
//   "json": one JSON object per line; every plain spdlog call (spdlog::info(...) anywhere in the
//           process) becomes {"ts": RFC 3339 UTC, "level": "info", "msg": "..."}; RPC lines carry
//           the keys of FormatRpcLogJson.
// INVALID_ARGUMENT for any other `format` (message lists both). The level is carried over from the
// current default logger (spdlog's default: info); spdlog::set_level() afterwards reaches both
// loggers (the RPC logger is registered with spdlog as "ds_rpc").
absl::Status ConfigureLogging(const std::string& format);

// The format ConfigureLogging last installed: "text" (also before any call) or "json".
std::string LoggingFormat();

struct RpcLogEntry {
  std::string rpc;                    // method name, e.g. "Generate"
  std::string model;                  // model instance or class; empty when none applies
  std::vector<std::string> adapters;  // adapter names used by the call
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string message;  // status message (empty for OK)
  double seconds = 0;   // duration from arrival to final status
  std::string peer;     // grpc::ServerContext::peer(), e.g. "ipv4:127.0.0.1:5000"
};

// Writes one line for a finished RPC through the RPC logger in the configured format. Level:
// info for OK, error for INTERNAL / UNKNOWN / DATA_LOSS (server faults), warning otherwise.
void LogRpc(const RpcLogEntry& entry);

// The JSON line of an entry (no trailing newline): an object with keys ts (RFC 3339 UTC with
// milliseconds, now), level, msg = "rpc", rpc, model, adapters (array), code (gRPC code name, e.g.
// "NOT_FOUND"), message, seconds (number), peer. Invalid UTF-8 in any field is replaced (U+FFFD),
// so the line always parses.
std::string FormatRpcLogJson(const RpcLogEntry& entry);

// The text form (no timestamp/level; the logger's pattern adds them):
// `rpc=Generate model=m adapters=[a,b] code=OK seconds=0.012000 peer=ipv4:... message="..."`.
// The message is always quoted; any other value is quoted when it is empty or holds a space,
// control byte, '"', '=' or '\\'. Inside quotes \" \\ \n \r \t are escaped and other control
// bytes written as \xNN, so an entry is always one line.
std::string FormatRpcLogText(const RpcLogEntry& entry);

}  // namespace ds::server
