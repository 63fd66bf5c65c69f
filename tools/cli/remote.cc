#include "tools/cli/remote.h"

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "handlers/safetensors.h"
#include "handlers/status.h"
#include "server/tensor_proto.h"

namespace ds::cli {
namespace {

namespace pb = ::diffusion::v1;
namespace hv1 = ::grpc::health::v1;

// Marks a status as the server's (or the transport's) answer rather than a local failure; it
// decides the exit code.
constexpr char kRpcErrorPayload[] = "type.googleapis.com/ds.cli.RpcError";

absl::Status RpcError(const grpc::Status& s) {
  const int code = static_cast<int>(s.error_code());
  // absl and gRPC share the canonical code numbers.
  absl::Status out(
      code >= 0 && code <= 16 ? static_cast<absl::StatusCode>(code) : absl::StatusCode::kUnknown,
      s.error_message());
  out.SetPayload(kRpcErrorPayload, absl::Cord("1"));
  return out;
}

bool IsRpcError(const absl::Status& s) { return s.GetPayload(kRpcErrorPayload).has_value(); }

absl::StatusOr<std::string> ReadLocalFile(const std::string& path, const std::string& flag) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(flag, ": '", path, "' is not a readable file"));
  }
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) {
    return absl::InternalError(absl::StrCat(flag, ": reading '", path, "' failed"));
  }
  return bytes;
}

// ------------------------------------------------------------------------------------------------
// Formatting.

std::string FormatBytes(int64_t bytes) {
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = -1;
  while (v >= 1024 && u < 3) {
    v /= 1024;
    ++u;
  }
  return absl::StrFormat("%.1f %s", v, units[u]);
}

// Rows of cells as aligned columns (two spaces apart); the first row is the header.
std::string RenderTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      if (i > 0) line += "  ";
      line += row[i];
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size(), ' ');
    }
    out += line + "\n";
  }
  return out;
}

std::string StateText(const pb::ModelInstance& m) {
  std::string state = pb::ModelState_Name(m.state());
  if (!m.state_reason().empty()) absl::StrAppend(&state, " (", m.state_reason(), ")");
  return state;
}

std::string WithNewline(std::string text) {
  if (!text.empty() && text.back() != '\n') text += '\n';
  return text;
}

// Generate's progress on stderr: a bar redrawn in place on a terminal, else one line per event.
class ProgressBar {
 public:
  explicit ProgressBar(std::FILE* out) : out_(out), tty_(isatty(fileno(out)) == 1) {}
  ~ProgressBar() { Finish(); }

  void Update(int64_t step, int64_t total, double elapsed) {
    if (!tty_) {
      std::fprintf(out_, "step %lld/%lld  %.2f s\n", static_cast<long long>(step),
                   static_cast<long long>(total), elapsed);
      std::fflush(out_);
      return;
    }
    constexpr int kWidth = 30;
    const double fraction =
        total > 0 ? std::clamp(static_cast<double>(step) / static_cast<double>(total), 0.0, 1.0)
                  : 0.0;
    const int filled = static_cast<int>(fraction * kWidth);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(kWidth - filled), '.');
    std::string eta;
    if (step > 0 && step < total) {
      eta = absl::StrFormat(
          "  eta %.1f s", elapsed / static_cast<double>(step) * static_cast<double>(total - step));
    }
    std::fprintf(out_, "\r[%s] step %lld/%lld  %.2f s%s\033[K", bar.c_str(),
                 static_cast<long long>(step), static_cast<long long>(total), elapsed, eta.c_str());
    std::fflush(out_);
    drawn_ = true;
  }

  // Ends the in-place line (so that what follows starts on a new one).
  void Finish() {
    if (drawn_) std::fputc('\n', out_);
    drawn_ = false;
  }

 private:
  std::FILE* out_;
  bool tty_;
  bool drawn_ = false;
};

// ------------------------------------------------------------------------------------------------
// The connection.

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const RemoteOptions& o) {
    if (o.target.empty()) return absl::InvalidArgumentError("--target: required (host:port)");
    if (!(o.timeout_seconds >= 0) || !std::isfinite(o.timeout_seconds)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--timeout: must be finite and >= 0 seconds, got ", o.timeout_seconds));
    }
    std::shared_ptr<grpc::ChannelCredentials> credentials;
    if (!o.tls_ca.empty()) {
      grpc::SslCredentialsOptions ssl;
      ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadLocalFile(o.tls_ca, "--tls_ca"));
      credentials = grpc::SslCredentials(ssl);
    } else {
      credentials = grpc::InsecureChannelCredentials();
    }
    grpc::ChannelArguments args;
    // Latents and images can exceed gRPC's 4 MiB default; the server enforces its own limit.
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    auto client = std::unique_ptr<Client>(new Client());
    client->options_ = &o;
    client->channel_ = grpc::CreateCustomChannel(o.target, credentials, args);
    client->stub_ = pb::DiffusionService::NewStub(client->channel_);
    return client;
  }

  // A context with the deadline; for management calls also the bearer token (none when
  // --token_file is not given: the server then answers UNAUTHENTICATED).
  absl::StatusOr<std::unique_ptr<grpc::ClientContext>> Context(bool management) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (options_->timeout_seconds > 0) {
      ctx->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(
                            std::chrono::duration<double>(options_->timeout_seconds)));
    }
    if (management && !options_->token_file.empty()) {
      ASSIGN_OR_RETURN(const std::string token, Token());
      ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token));
    }
    return ctx;
  }

  // Runs one unary call: `call(ctx)` returns the grpc::Status of the stub call.
  absl::Status Call(bool management,
                    const std::function<grpc::Status(grpc::ClientContext*)>& call) {
    ASSIGN_OR_RETURN(std::unique_ptr<grpc::ClientContext> ctx, Context(management));
    const grpc::Status s = call(ctx.get());
    return s.ok() ? absl::OkStatus() : RpcError(s);
  }

  pb::DiffusionService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  Client() = default;

  absl::StatusOr<std::string> Token() const {
    const std::string& path = options_->token_file;
    ASSIGN_OR_RETURN(std::string contents, ReadLocalFile(path, "--token_file"));
    const std::string token(absl::StripAsciiWhitespace(contents));
    if (token.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--token_file: '", path, "' is empty"));
    }
    for (char ch : token) {
      if (ch < 0x21 || ch > 0x7e) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--token_file: the token in '", path,
            "' has a character that is not printable ASCII without space (it cannot be sent as "
            "gRPC metadata)"));
      }
    }
    return token;
  }

  const RemoteOptions* options_ = nullptr;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::DiffusionService::Stub> stub_;
};

absl::Status Require(const std::string& value, const std::string& command, const std::string& flag,
                     const std::string& what) {
  if (!value.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(command, " needs ", flag, " (", what, ")"));
}

// ------------------------------------------------------------------------------------------------
// Commands.

absl::Status Models(Client& client) {
  pb::ListModelsResponse response;
  RETURN_IF_ERROR(client.Call(false, [&](grpc::ClientContext* ctx) {
    return client.stub().ListModels(ctx, pb::ListModelsRequest(), &response);
  }));
  if (response.models().empty()) {
    std::cout << "no models\n";
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "CLASS", "STATE", "DTYPE", "DEVICE", "MEMORY", "ADAPTERS", "IP-ADAPTERS"}};
  for (const pb::ModelInstance& m : response.models()) {
    std::string class_name = m.class_name();
    if (!m.variant().empty()) absl::StrAppend(&class_name, " (", m.variant(), ")");
    std::string memory = FormatBytes(m.parameter_bytes());
    if (m.adapter_bytes() > 0) absl::StrAppend(&memory, " + ", FormatBytes(m.adapter_bytes()));
    std::vector<std::string> adapters;
    for (const pb::LoRAInfo& a : m.adapters()) adapters.push_back(a.name());
    std::vector<std::string> ip_adapters;
    for (const pb::IPAdapterInfo& a : m.ip_adapters()) ip_adapters.push_back(a.name());
    rows.push_back({m.name(), class_name, StateText(m), m.dtype(), m.device(), memory,
                    adapters.empty() ? "-" : absl::StrJoin(adapters, ", "),
                    ip_adapters.empty() ? "-" : absl::StrJoin(ip_adapters, ", ")});
  }
  std::cout << RenderTable(rows);
  return absl::OkStatus();
}

// One line about a loaded IP-Adapter: layout, tokens, widths, memory, encoder.
std::string IPAdapterSummary(const pb::IPAdapterInfo& a) {
  return absl::StrCat(
      a.format(), ", ", a.num_tokens(), " image tokens, embed dim ", a.image_embed_dim(), ", ",
      a.num_layers(), " layers, ", FormatBytes(a.memory_bytes()), ", image encoder ",
      a.image_encoder().empty() ? std::string("none (requests give image_embeds)")
                                : absl::StrCat(a.image_encoder(), " (", a.image_size(), " px)"),
      ", source ", a.path());
}

void PrintInstance(const pb::GetMetadataResponse& md) {
  const pb::ModelInstance& m = md.instance();
  std::cout << "\ninstance " << m.name() << ": " << StateText(m) << "\n";
  std::cout << "  class:     " << m.class_name() << " (" << m.family() << ")"
            << (m.variant().empty() ? "" : absl::StrCat(", variant ", m.variant())) << "\n";
  std::cout << "  dtype:     " << m.dtype() << " on " << m.device() << "\n";
  std::cout << "  source:    " << m.source() << "\n";
  std::cout << "  sha256:    " << (m.sha256().empty() ? "-" : m.sha256()) << "\n";
  if (m.has_demo()) {
    const pb::DemoModelInfo& d = m.demo();
    std::cout << "  demo:      " << d.name() << (d.synthetic() ? ", SYNTHETIC demo model" : "")
              << (d.trained() ? "" : ", random weights") << ": " << d.description() << "\n";
    if (!d.prompt_template().empty()) {
      std::cout << "  prompts:   " << d.prompt_template() << "; vocabulary "
                << absl::StrJoin(d.vocabulary(), " ") << "\n";
    }
  }
  std::cout << "  memory:    parameters " << FormatBytes(m.parameter_bytes()) << ", adapters "
            << FormatBytes(m.adapter_bytes()) << "\n";
  if (m.adapters().empty()) {
    std::cout << "  adapters:  none\n";
  } else {
    std::cout << "  adapters:\n";
    for (const pb::LoRAInfo& a : m.adapters()) {
      std::cout << "    " << a.name() << "  " << a.format() << "  sha256 " << a.sha256() << "\n";
    }
  }
  if (!m.pipeline_class().empty()) {
    if (m.ip_adapters().empty()) {
      std::cout << "  ip-adapters: none"
                << (md.limits().supports_ip_adapter() ? "" : " (this pipeline takes none)") << "\n";
    } else {
      std::cout << "  ip-adapters:\n";
      for (const pb::IPAdapterInfo& a : m.ip_adapters()) {
        std::cout << "    " << a.name() << "  " << IPAdapterSummary(a) << "\n";
      }
    }
  }
  std::cout << "  inputs:    required " << absl::StrJoin(md.required_inputs(), ", ")
            << "; optional "
            << (md.optional_inputs().empty() ? "none" : absl::StrJoin(md.optional_inputs(), ", "))
            << "\n";
  const pb::GenerateLimits& l = md.limits();
  std::cout << "  generate:  steps default " << l.default_steps() << " (max " << l.max_steps()
            << "), guidance default " << l.default_guidance() << ", batch max " << l.max_batch()
            << ", image tokens max " << l.max_image_tokens() << ", text tokens max "
            << l.max_text_tokens() << ", inline LoRA max " << FormatBytes(l.max_inline_lora_bytes())
            << "\n";
  if (!md.config_json().empty()) {
    const nlohmann::json config = nlohmann::json::parse(md.config_json(), nullptr, false);
    std::string text = config.is_discarded() ? md.config_json() : config.dump(2);
    std::cout << "  config:    " << absl::StrReplaceAll(text, {{"\n", "\n  "}}) << "\n";
  }
}

absl::Status Metadata(Client& client, const std::vector<std::string>& positional,
                      const RemoteOptions& o) {
  if (positional.size() != 1) {
    return absl::InvalidArgumentError(
        "metadata takes one NAME (a model instance, a model class name or a registry name)");
  }
  pb::GetMetadataRequest request;
  request.set_name(positional[0]);
  request.set_verbose(o.verbose);
  pb::GetMetadataResponse response;
  RETURN_IF_ERROR(client.Call(false, [&](grpc::ClientContext* ctx) {
    return client.stub().GetMetadata(ctx, request, &response);
  }));
  std::cout << WithNewline(response.table());
  if (response.has_instance()) PrintInstance(response);
  return absl::OkStatus();
}

// --max_memory "DEVICE=BYTES[,DEVICE=BYTES...]"; BYTES an integer, optionally with a K, M or G
// suffix (powers of 1024). INVALID_ARGUMENT naming the item at fault.
absl::StatusOr<std::map<std::string, int64_t>> ParseMaxMemory(const std::string& text) {
  std::map<std::string, int64_t> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    const std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    absl::string_view number = kv.size() == 2 ? kv[1] : absl::string_view();
    int64_t unit = 1;
    if (!number.empty()) {
      const char last = number.back();
      if (last == 'K' || last == 'k') unit = int64_t{1} << 10;
      if (last == 'M' || last == 'm') unit = int64_t{1} << 20;
      if (last == 'G' || last == 'g') unit = int64_t{1} << 30;
      if (unit != 1) number.remove_suffix(1);
    }
    int64_t value = 0;
    if (kv.size() != 2 || kv[0].empty() || !absl::SimpleAtoi(number, &value) || value < 0 ||
        value > std::numeric_limits<int64_t>::max() / unit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--max_memory: '", item, "' is not DEVICE=BYTES (e.g. cpu=8G,cuda:0=20G)"));
    }
    out[std::string(kv[0])] = value * unit;
  }
  return out;
}

absl::Status LoadSingleFile(Client& client, const RemoteOptions& o) {
  const std::string command = "load-single-file";
  RETURN_IF_ERROR(Require(o.name, command, "--name", "the instance name to load it as"));
  RETURN_IF_ERROR(Require(o.path, command, "--path",
                          "the checkpoint file or diffusers folder, under the server's model "
                          "root"));
  pb::LoadSingleFileRequest request;
  request.set_name(o.name);
  request.set_path(o.path);
  request.set_dtype(o.dtype);
  request.set_device(o.device);
  request.set_replace(o.replace);
  request.set_storage_dtype(o.storage_dtype);
  for (const std::string& p : o.skip_patterns) request.add_layerwise_casting_skip_patterns(p);
  if (o.group_offload_blocks < 0) {
    return absl::InvalidArgumentError("--group_offload_blocks must be >= 0 (0 = no offloading)");
  }
  if (o.group_offload_blocks > 0) {
    pb::GroupOffloadConfig* g = request.mutable_group_offload();
    g->set_blocks_per_group(static_cast<int32_t>(o.group_offload_blocks));
    g->set_prefetch(o.group_offload_prefetch);
    g->set_offload_to(o.group_offload_to);
  } else if (o.group_offload_prefetch || !o.group_offload_to.empty()) {
    return absl::InvalidArgumentError(
        "--group_offload_prefetch / --group_offload_to need --group_offload_blocks N");
  }
  request.set_device_map(o.device_map);
  ASSIGN_OR_RETURN(const auto budgets, ParseMaxMemory(o.max_memory));
  for (const auto& [device, bytes] : budgets) (*request.mutable_max_memory_bytes())[device] = bytes;
  if (!o.config.empty()) {
    if (absl::StartsWith(absl::StripLeadingAsciiWhitespace(o.config), "{")) {
      request.set_config_json(o.config);
    } else {
      ASSIGN_OR_RETURN(*request.mutable_config_json(), ReadLocalFile(o.config, "--config"));
    }
  }
  pb::LoadSingleFileResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().LoadSingleFile(ctx, request, &response);
  }));
  const pb::ModelInstance& m = response.instance();
  std::cout << WithNewline(response.report());
  std::cout << "loaded " << m.name() << ": " << m.class_name()
            << (m.variant().empty() ? "" : absl::StrCat(" (", m.variant(), ")")) << ", "
            << m.dtype() << " on " << m.device() << ", " << FormatBytes(m.parameter_bytes()) << ", "
            << StateText(m) << ", sha256 " << (m.sha256().empty() ? "-" : m.sha256()) << "\n";
  if (!m.storage_dtype().empty()) std::cout << "weights stored as " << m.storage_dtype() << "\n";
  if (m.has_group_offload()) {
    const pb::GroupOffloadStatus& g = m.group_offload();
    std::cout << "group offloading: " << g.groups() << " groups of "
              << g.config().blocks_per_group() << " block(s), "
              << FormatBytes(g.offloaded_bytes()) << " offloaded"
              << (g.config().prefetch() ? ", prefetch" : "") << "\n";
  }
  if (!m.device_map().empty()) std::cout << "device map: " << m.device_map() << "\n";
  std::cout << absl::StrFormat("%.3f s\n", response.seconds());
  return absl::OkStatus();
}

absl::Status UnloadModel(Client& client, const RemoteOptions& o) {
  RETURN_IF_ERROR(Require(o.name, "unload-model", "--name", "the instance to unload"));
  pb::UnloadModelRequest request;
  request.set_name(o.name);
  pb::UnloadModelResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().UnloadModel(ctx, request, &response);
  }));
  std::cout << "unloaded model " << o.name << "\n";
  return absl::OkStatus();
}

absl::Status LoadLora(Client& client, const RemoteOptions& o) {
  // --weight: the adapter's default weight (what a request naming it without a weight applies).
  double default_weight = 1.0;
  if (!o.weight.empty() &&
      (!absl::SimpleAtod(o.weight, &default_weight) || !std::isfinite(default_weight))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--weight ", o.weight, ": not a finite number (the adapter's default weight; a request "
        "can still choose its own with `generate --lora NAME:W`)"));
  }
  const std::string command = "load-lora";
  RETURN_IF_ERROR(Require(o.name, command, "--name", "the adapter name"));
  if (o.path.empty() == o.file.empty()) {
    return absl::InvalidArgumentError(
        "load-lora needs exactly one of --path (a file under the server's adapter root) and "
        "--file (a local file sent inline)");
  }
  pb::LoadLoRARequest request;
  request.set_model(o.model);
  request.set_name(o.name);
  if (!o.path.empty()) {
    request.set_path(o.path);
  } else {
    ASSIGN_OR_RETURN(*request.mutable_inline_bytes(), ReadLocalFile(o.file, "--file"));
  }
  request.set_format_hint(o.format_hint);
  request.set_allow_partial(o.allow_partial);
  request.set_replace(o.replace);
  request.set_pin(o.pin);
  if (!o.weight.empty()) request.set_default_weight(default_weight);
  pb::LoadLoRAResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().LoadLoRA(ctx, request, &response);
  }));
  const pb::LoRAInfo& a = response.adapter();
  std::cout << WithNewline(response.report().text());
  std::cout << (response.replaced() ? "replaced" : "loaded") << " adapter " << a.name() << ": "
            << a.format() << ", " << a.modules() << " modules, " << FormatBytes(a.bytes())
            << (a.pinned() ? ", pinned" : "") << ", source " << a.source() << "\n"
            << "sha256 " << a.sha256() << "\n";
  if (!response.evicted().empty()) {
    std::cout << "evicted: " << absl::StrJoin(response.evicted(), ", ") << "\n";
  }
  std::cout << absl::StrFormat("%.3f s\n", response.report().seconds());
  return absl::OkStatus();
}

absl::Status UnloadLora(Client& client, const RemoteOptions& o) {
  RETURN_IF_ERROR(Require(o.name, "unload-lora", "--name", "the adapter to unload"));
  pb::UnloadLoRARequest request;
  request.set_model(o.model);
  request.set_name(o.name);
  pb::UnloadLoRAResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().UnloadLoRA(ctx, request, &response);
  }));
  std::cout << "unloaded adapter " << o.name << "\n";
  return absl::OkStatus();
}

absl::Status Loras(Client& client, const RemoteOptions& o) {
  pb::ListLoRAsRequest request;
  request.set_model(o.model);
  pb::ListLoRAsResponse response;
  RETURN_IF_ERROR(client.Call(false, [&](grpc::ClientContext* ctx) {
    return client.stub().ListLoRAs(ctx, request, &response);
  }));
  if (response.adapters().empty()) {
    std::cout << "no adapters\n";
  } else {
    std::vector<std::vector<std::string>> rows = {
        {"NAME", "FORMAT", "MODULES", "MEMORY", "PINNED", "FUSED", "USERS", "SHA256", "SOURCE"}};
    for (const pb::LoRAInfo& a : response.adapters()) {
      rows.push_back({a.name(), a.format(), absl::StrCat(a.modules()), FormatBytes(a.bytes()),
                      a.pinned() ? "yes" : "no", a.fused() ? "yes" : "no", absl::StrCat(a.users()),
                      a.sha256(), a.source()});
    }
    std::cout << RenderTable(rows);
  }
  std::cout << "memory: " << FormatBytes(response.memory_used_bytes()) << " used of "
            << FormatBytes(response.memory_budget_bytes()) << " budget\n";
  return absl::OkStatus();
}

absl::Status LoadIPAdapter(Client& client, const RemoteOptions& o) {
  const std::string command = "load-ip-adapter";
  RETURN_IF_ERROR(Require(o.name, command, "--name", "the IP-Adapter name"));
  RETURN_IF_ERROR(Require(o.path, command, "--path",
                          "the IP-Adapter weights, under the server's adapter root"));
  pb::LoadIPAdapterRequest request;
  request.set_model(o.model);
  request.set_name(o.name);
  request.set_path(o.path);
  request.set_image_encoder_path(o.image_encoder_path);
  request.set_replace(o.replace);
  pb::LoadIPAdapterResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().LoadIPAdapter(ctx, request, &response);
  }));
  const pb::IPAdapterInfo& a = response.adapter();
  std::cout << (response.replaced() ? "replaced" : "loaded") << " IP-Adapter " << a.name() << ": "
            << IPAdapterSummary(a) << "\n"
            << absl::StrFormat("%.3f s\n", response.seconds());
  return absl::OkStatus();
}

absl::Status UnloadIPAdapter(Client& client, const RemoteOptions& o) {
  RETURN_IF_ERROR(Require(o.name, "unload-ip-adapter", "--name", "the IP-Adapter to unload"));
  pb::UnloadIPAdapterRequest request;
  request.set_model(o.model);
  request.set_name(o.name);
  pb::UnloadIPAdapterResponse response;
  RETURN_IF_ERROR(client.Call(true, [&](grpc::ClientContext* ctx) {
    return client.stub().UnloadIPAdapter(ctx, request, &response);
  }));
  std::cout << "unloaded IP-Adapter " << o.name << "\n";
  return absl::OkStatus();
}

// OK with true when SERVING.
absl::StatusOr<bool> Health(Client& client, const RemoteOptions& o) {
  auto health = hv1::Health::NewStub(client.channel());
  hv1::HealthCheckRequest request;
  request.set_service(o.service);
  hv1::HealthCheckResponse response;
  RETURN_IF_ERROR(client.Call(
      false, [&](grpc::ClientContext* ctx) { return health->Check(ctx, request, &response); }));
  std::cout << (o.service.empty() ? std::string("server") : absl::StrCat("'", o.service, "'"))
            << ": " << hv1::HealthCheckResponse::ServingStatus_Name(response.status()) << "\n";
  return response.status() == hv1::HealthCheckResponse::SERVING;
}

// --lora NAME[:WEIGHT] of generate: a loaded adapter's name (names have no ':').
absl::StatusOr<pb::AdapterWeight> ParseAdapterFlag(const std::string& value) {
  pb::AdapterWeight adapter;
  const size_t colon = value.rfind(':');
  adapter.set_name(value.substr(0, colon));
  if (colon != std::string::npos) {
    double weight = 0;
    if (!absl::SimpleAtod(value.substr(colon + 1), &weight) || !std::isfinite(weight)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--lora '", value, "': WEIGHT '", value.substr(colon + 1),
          "' is not a finite number (generate takes NAME[:WEIGHT], NAME a loaded adapter)"));
    }
    adapter.set_weight(weight);
  }
  if (adapter.name().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lora '", value, "': no adapter NAME (generate takes NAME[:WEIGHT])"));
  }
  return adapter;
}

// SCALE of an image prompt flag: one finite number or a comma list of them (one per layer).
absl::StatusOr<std::vector<double>> ParseIPAdapterScales(const std::string& text,
                                                         const std::string& flag,
                                                         const std::string& value) {
  std::vector<double> scales;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    double scale = 0;
    if (!absl::SimpleAtod(part, &scale) || !std::isfinite(scale)) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " '", value, "': SCALE '", text,
          "' is not a finite number or a comma list of them (one per conditioned layer)"));
    }
    scales.push_back(scale);
  }
  return scales;
}

// --ip_adapter NAME=IMAGE.png[:SCALE] / --ip_adapter_embeds NAME=FILE.safetensors[:SCALE] of
// generate (see remote.h): the request's image prompt, with the local file's PNG bytes or its
// tensor `image_embeds`.
absl::StatusOr<pb::IPAdapterInput> ParseIPAdapterFlag(const IPAdapterFlag& f) {
  const std::string flag = f.embeds ? "--ip_adapter_embeds" : "--ip_adapter";
  const std::string syntax = f.embeds ? "NAME=FILE.safetensors[:SCALE]" : "NAME=IMAGE.png[:SCALE]";
  const size_t eq = f.value.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == f.value.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " '", f.value, "': expected ", syntax,
                     " (NAME a loaded IP-Adapter; SCALE a number or a comma list, one per layer)"));
  }
  pb::IPAdapterInput input;
  input.set_name(f.value.substr(0, eq));
  std::string file = f.value.substr(eq + 1);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec)) {
    const size_t colon = file.rfind(':');
    if (colon != std::string::npos) {
      ASSIGN_OR_RETURN(std::vector<double> scales,
                       ParseIPAdapterScales(file.substr(colon + 1), flag, f.value));
      for (double scale : scales) input.add_scale(scale);
      file.resize(colon);
    }
  }
  if (file.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " '", f.value, "': no file (expected ", syntax, ")"));
  }
  if (!f.embeds) {
    ASSIGN_OR_RETURN(std::string bytes, ReadLocalFile(file, flag));
    static constexpr char kPngSignature[] = "\x89PNG\r\n\x1a\n";
    if (!absl::StartsWith(bytes, absl::string_view(kPngSignature, 8))) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, ": '", file, "' is not a PNG image (image prompts are sent as PNG files)"));
    }
    input.set_image(std::move(bytes));
    return input;
  }
  if (!std::filesystem::is_regular_file(file, ec)) {
    return absl::NotFoundError(absl::StrCat(flag, ": '", file, "' is not a readable file"));
  }
  auto opened = SafetensorsFile::Open(file);
  if (!opened.ok()) return Annotate(opened.status(), flag);
  const SafetensorsFile& tensors = **opened;
  if (!tensors.contains("image_embeds")) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, ": '", file,
        "' has no tensor 'image_embeds' (it has: ", absl::StrJoin(tensors.names(), ", "), ")"));
  }
  ASSIGN_OR_RETURN(torch::Tensor embeds, tensors.Get("image_embeds"));
  RETURN_IF_ERROR(Annotate(server::TensorToProto(embeds, input.mutable_image_embeds()),
                           absl::StrCat(flag, " ", file, ": 'image_embeds'")));
  return input;
}

absl::StatusOr<std::vector<int64_t>> ParseLatentShape(const std::string& text) {
  std::vector<int64_t> shape;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t d = 0;
    if (!absl::SimpleAtoi(part, &d) || d < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--latent-shape '", text,
                       "': expected positive integers B,T,C (batch, image tokens, "
                       "channels of the packed latents)"));
    }
    shape.push_back(d);
  }
  return shape;
}

// "" = the server's default instance, resolved the way the API documents it ("default" when it
// exists, else the only instance), since GetMetadata needs a name.
absl::StatusOr<std::string> ResolveModel(Client& client, const std::string& model) {
  if (!model.empty()) return model;
  pb::ListModelsResponse response;
  RETURN_IF_ERROR(client.Call(false, [&](grpc::ClientContext* ctx) {
    return client.stub().ListModels(ctx, pb::ListModelsRequest(), &response);
  }));
  std::vector<std::string> names;
  for (const pb::ModelInstance& m : response.models()) {
    if (m.state() == pb::UNLOADING) continue;
    if (m.name() == "default") return m.name();
    names.push_back(m.name());
  }
  if (names.size() == 1) return names[0];
  return absl::InvalidArgumentError(absl::StrCat(
      "generate needs --model (the server has no instance named 'default'; instances: ",
      names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
}

// The packed latent shape when --latent-shape is not given: batch from encoder_hidden_states,
// one image token per row of img_ids, channels = the config's in_channels.
absl::StatusOr<std::vector<int64_t>> DeriveLatentShape(const SafetensorsFile& inputs,
                                                       const std::string& config_json) {
  const std::string fix = " (give --latent-shape B,T,C)";
  const std::string& path = inputs.path();
  if (!inputs.contains("img_ids")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--latent-shape: cannot derive the image tokens: ", path, " has no 'img_ids'", fix));
  }
  ASSIGN_OR_RETURN(const safetensors::TensorInfo* ids, inputs.info("img_ids"));
  if (ids->shape.size() != 2 && ids->shape.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat("--latent-shape: cannot derive it: ", path,
                                                   ": 'img_ids' is not [tokens, axes] or "
                                                   "[batch, tokens, axes]",
                                                   fix));
  }
  const int64_t tokens = ids->shape[ids->shape.size() - 2];
  int64_t batch = 1;
  if (inputs.contains("encoder_hidden_states")) {
    ASSIGN_OR_RETURN(const safetensors::TensorInfo* text, inputs.info("encoder_hidden_states"));
    if (text->shape.size() >= 2) batch = text->shape[0];
  }
  const nlohmann::json config = nlohmann::json::parse(config_json, nullptr, false);
  if (config.is_discarded() || !config.is_object() || !config.contains("in_channels") ||
      !config["in_channels"].is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--latent-shape: cannot derive the channels: the model's config has no integer "
        "'in_channels'",
        fix));
  }
  return std::vector<int64_t>{batch, tokens, config["in_channels"].get<int64_t>()};
}

// GenerateRequest.cache from --cache and its parameters. INVALID_ARGUMENT for a parameter given
// without --cache.
absl::Status SetCache(const RemoteOptions& o, pb::GenerateRequest* request) {
  const bool any_parameter = o.cache_threshold || o.cache_interval ||
                             o.disable_cache_before_step || o.disable_cache_after_step ||
                             o.max_order || !o.taylor_factors_dtype.empty() || o.cache_lite;
  if (o.cache.empty()) {
    if (any_parameter) {
      return absl::InvalidArgumentError(
          "--cache_threshold / --cache_interval / --disable_cache_*_step / --max_order / "
          "--taylor_factors_dtype / --cache_lite need --cache TYPE (first_block_cache, "
          "taylorseer_cache)");
    }
    return absl::OkStatus();
  }
  pb::CacheConfig* c = request->mutable_cache();
  c->set_type(o.cache);
  if (o.cache_threshold) c->set_threshold(*o.cache_threshold);
  if (o.cache_interval) c->set_cache_interval(*o.cache_interval);
  if (o.disable_cache_before_step) c->set_disable_cache_before_step(*o.disable_cache_before_step);
  if (o.disable_cache_after_step) c->set_disable_cache_after_step(*o.disable_cache_after_step);
  if (o.max_order) c->set_max_order(*o.max_order);
  if (!o.taylor_factors_dtype.empty()) c->set_taylor_factors_dtype(o.taylor_factors_dtype);
  if (o.cache_lite) c->set_use_lite_mode(true);
  return absl::OkStatus();
}

absl::Status Generate(Client& client, const RemoteOptions& o) {
  const std::string command = "generate";
  if (o.prompt.empty()) {
    RETURN_IF_ERROR(Require(o.inputs, command, "--inputs",
                            "a safetensors file of the model's forward inputs (or --prompt on a "
                            "pipeline with text encoders)"));
  }
  RETURN_IF_ERROR(Require(o.output, command, "-o", "OUT.safetensors or OUT.png"));
  const std::string lower = absl::AsciiStrToLower(o.output);
  const bool png = absl::EndsWith(lower, ".png");
  if (!png && !absl::EndsWith(lower, ".safetensors")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "-o '", o.output, "': the output must end in .safetensors (latents) or .png (image)"));
  }
  pb::GenerateRequest request;
  for (const std::string& value : o.loras) {
    ASSIGN_OR_RETURN(*request.add_adapters(), ParseAdapterFlag(value));
  }
  for (const IPAdapterFlag& value : o.ip_adapters) {
    ASSIGN_OR_RETURN(*request.add_ip_adapters(), ParseIPAdapterFlag(value));
  }
  if (!o.latent_shape.empty()) {
    ASSIGN_OR_RETURN(std::vector<int64_t> shape, ParseLatentShape(o.latent_shape));
    for (int64_t d : shape) request.add_latent_shape(d);
  }
  std::shared_ptr<const SafetensorsFile> opened;
  if (!o.inputs.empty()) {
    auto file_or = SafetensorsFile::Open(o.inputs);
    if (!file_or.ok()) return Annotate(file_or.status(), "--inputs");
    opened = *std::move(file_or);
  }

  ASSIGN_OR_RETURN(const std::string model, ResolveModel(client, o.model));
  pb::GetMetadataRequest md_request;
  md_request.set_name(model);
  pb::GetMetadataResponse md;
  RETURN_IF_ERROR(client.Call(false, [&](grpc::ClientContext* ctx) {
    return client.stub().GetMetadata(ctx, md_request, &md);
  }));
  if (!md.has_instance()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model '", model, "' names a model class, not a loaded instance (see `models`)"));
  }

  const bool pipeline = !md.instance().pipeline_class().empty();
  if (pipeline) {
    // A pipeline instance: text conditioning (and optional noise) from the file, the image size
    // from the flags; the server runs the whole pipeline and returns PNGs (and latents on request).
    if (!o.latent_shape.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--latent-shape: '", model, "' is a ", md.instance().pipeline_class(),
          " instance, which takes --width/--height instead"));
    }
    using Field = pb::Tensor* (pb::GenerateRequest::*)();
    const std::vector<std::pair<std::string, Field>> fields = {
        {"prompt_embeds", &pb::GenerateRequest::mutable_prompt_embeds},
        {"pooled_prompt_embeds", &pb::GenerateRequest::mutable_pooled_prompt_embeds},
        {"negative_prompt_embeds", &pb::GenerateRequest::mutable_negative_prompt_embeds},
        {"negative_pooled_prompt_embeds",
         &pb::GenerateRequest::mutable_negative_pooled_prompt_embeds},
        {"noise", &pb::GenerateRequest::mutable_noise}};
    std::vector<std::string> sent;
    for (const auto& [name, field] : fields) {
      if (opened == nullptr) break;
      const SafetensorsFile& file = *opened;
      const std::string key = file.contains(name) ? name : "inputs/" + name;
      if (!file.contains(key)) {
        if (name == "prompt_embeds" && o.prompt.empty()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--inputs ", o.inputs, ": no tensor 'prompt_embeds' (or 'inputs/prompt_embeds'), "
              "which a ", md.instance().pipeline_class(), " instance needs"));
        }
        continue;  // optional: left unset
      }
      ASSIGN_OR_RETURN(torch::Tensor t, file.Get(key));
      RETURN_IF_ERROR(Annotate(server::TensorToProto(t, (request.*field)()),
                               absl::StrCat("--inputs ", o.inputs, ": '", key, "'")));
      sent.push_back(key);
    }
    if (!sent.empty()) {
      std::cerr << "note: sending " << absl::StrJoin(sent, ", ") << " from " << o.inputs << "\n";
    }
    if (!o.prompt.empty()) {
      request.add_prompt(o.prompt);
      if (!o.prompt_2.empty()) request.add_prompt_2(o.prompt_2);
      if (!o.negative_prompt.empty()) request.add_negative_prompt(o.negative_prompt);
    }
    request.set_max_sequence_length(o.max_sequence_length);
    request.set_width(o.width);
    request.set_height(o.height);
    request.set_num_images(o.num_images);
    request.set_true_cfg_scale(o.true_cfg_scale);
    request.set_output(png ? pb::GenerateRequest::OUTPUT_PNG : pb::GenerateRequest::OUTPUT_LATENTS);
  } else {
    if (!o.prompt.empty() || opened == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--prompt needs a pipeline instance with text encoders; '", model, "' is a bare ",
          md.class_name(), " (give --inputs with its forward inputs)"));
    }
    const SafetensorsFile& file = *opened;
    if (!o.ip_adapters.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(o.ip_adapters[0].embeds ? "--ip_adapter_embeds" : "--ip_adapter",
                       " needs a pipeline instance with IP-Adapters loaded; '", model,
                       "' is a bare ", md.class_name()));
    }
    if (o.width != 0 || o.height != 0 || o.num_images != 0 || o.true_cfg_scale != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--width/--height/--num-images/--true-cfg-scale need a pipeline instance; '", model,
          "' is a bare ", md.class_name(), " (it takes packed latents, see --latent-shape)"));
    }
    // The file's tensors that are the model's inputs; `latents` = the initial noise. The sampler
    // sets hidden_states and timestep itself, so a forward-pass file's are left out.
    std::set<std::string> accepted(md.required_inputs().begin(), md.required_inputs().end());
    accepted.insert(md.optional_inputs().begin(), md.optional_inputs().end());
    accepted.erase("hidden_states");
    accepted.erase("timestep");
    std::vector<std::string> ignored;
    for (const std::string& name : file.names()) {
      if (name == "latents" || accepted.count(name) > 0) {
        if (name == "guidance" && o.guidance != 0) {
          ignored.push_back("guidance (--guidance given)");
          continue;
        }
        ASSIGN_OR_RETURN(torch::Tensor t, file.Get(name));
        pb::Tensor* proto =
            name == "latents" ? request.mutable_latents() : &(*request.mutable_inputs())[name];
        RETURN_IF_ERROR(Annotate(server::TensorToProto(t, proto),
                                 absl::StrCat("--inputs ", o.inputs, ": '", name, "'")));
      } else {
        ignored.push_back(name);
      }
    }
    if (!ignored.empty()) {
      std::cerr << "note: tensors of " << o.inputs << " not sent (not among the " << md.class_name()
                << " inputs a request gives): " << absl::StrJoin(ignored, ", ") << "\n";
    }
    if (request.latent_shape().empty() && !request.has_latents()) {
      ASSIGN_OR_RETURN(std::vector<int64_t> shape, DeriveLatentShape(file, md.config_json()));
      for (int64_t d : shape) request.add_latent_shape(d);
    }
  }
  request.set_model(model);
  request.set_seed(o.seed);
  request.set_steps(o.steps);
  request.set_guidance(o.guidance);
  RETURN_IF_ERROR(SetCache(o, &request));
  request.set_return_latents(!png && !pipeline);

  ASSIGN_OR_RETURN(std::unique_ptr<grpc::ClientContext> ctx, client.Context(false));
  std::optional<pb::GenerateResult> result;
  grpc::Status status;
  {
    ProgressBar bar(stderr);
    auto reader = client.stub().Generate(ctx.get(), request);
    pb::GenerateResponse message;
    while (reader->Read(&message)) {
      if (message.has_progress()) {
        const pb::GenerateProgress& p = message.progress();
        bar.Update(p.step(), p.total_steps(), p.elapsed_seconds());
      } else if (message.has_result()) {
        result = std::move(*message.mutable_result());
      }
    }
    bar.Finish();
    status = reader->Finish();
  }
  if (!status.ok()) return RpcError(status);
  if (!result.has_value()) {
    return absl::InternalError("the server ended the Generate stream without a result");
  }

  for (const std::string& warning : result->warnings()) {
    std::cerr << "warning: " << warning << "\n";
  }
  std::vector<std::string> adapters;
  nlohmann::json adapters_json = nlohmann::json::array();
  for (const pb::AppliedAdapter& a : result->adapters()) {
    adapters.push_back(absl::StrCat(a.name(), ":", a.weight(), " (sha256 ", a.sha256(), ")"));
    adapters_json.push_back({{"name", a.name()}, {"weight", a.weight()}, {"sha256", a.sha256()}});
  }
  std::vector<std::string> ip_adapters;
  nlohmann::json ip_adapters_json = nlohmann::json::array();
  for (const pb::AppliedIPAdapter& a : result->ip_adapters()) {
    ip_adapters.push_back(absl::StrCat(
        a.name(), " (scale ", a.scale().empty() ? "1" : absl::StrJoin(a.scale(), ","), ")"));
    ip_adapters_json.push_back(
        {{"name", a.name()}, {"scale", std::vector<double>(a.scale().begin(), a.scale().end())}});
  }
  if (png) {
    if (result->png().empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "-o ", o.output, ": this server/model returned latents only (no decoded image); ",
          "write them with -o OUT.safetensors instead"));
    }
    // One file per image: OUT.png, then OUT_1.png, OUT_2.png, ... for further images.
    const int n = std::max(1, result->images_size());
    for (int i = 0; i < n; ++i) {
      const std::string& bytes = result->images_size() > 0 ? result->images(i) : result->png();
      const std::string path =
          i == 0 ? o.output
                 : absl::StrCat(o.output.substr(0, o.output.size() - 4), "_", i,
                                o.output.substr(o.output.size() - 4));
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      out.close();
      if (!out) return absl::InternalError(absl::StrCat("-o ", path, ": writing failed"));
      if (i > 0) std::cout << "wrote " << path << " (png)\n";
    }
  } else {
    if (!result->has_latents()) {
      return absl::FailedPreconditionError("the server's result carries no latents");
    }
    ASSIGN_OR_RETURN(torch::Tensor latents,
                     server::TensorFromProto(result->latents(), "result.latents"));
    const std::map<std::string, std::string> metadata = {
        {"model", result->model()},
        {"model_sha256", result->model_sha256()},
        {"seed", absl::StrCat(result->seed())},
        {"steps", absl::StrCat(result->steps())},
        {"guidance", absl::StrFormat("%.17g", result->guidance())},
        {"latent_shape", absl::StrJoin(result->latent_shape(), ",")},
        {"adapters", adapters_json.dump()},
        {"ip_adapters", ip_adapters_json.dump()},
        {"seconds", absl::StrFormat("%.6f", result->seconds())},
        {"queue_seconds", absl::StrFormat("%.6f", result->queue_seconds())},
        {"target", o.target},
    };
    RETURN_IF_ERROR(Annotate(WriteSafetensors(o.output, {{"latents", latents}}, metadata),
                             absl::StrCat("-o ", o.output)));
  }
  std::cout << "wrote " << o.output << (png ? " (png)" : " (tensor 'latents')") << "\n"
            << "model " << result->model() << " (sha256 "
            << (result->model_sha256().empty() ? "-" : result->model_sha256()) << ")\n"
            << "seed " << result->seed() << ", steps " << result->steps() << ", guidance "
            << result->guidance() << ", latent shape ["
            << absl::StrJoin(result->latent_shape(), ", ") << "]\n"
            << "adapters: " << (adapters.empty() ? "none" : absl::StrJoin(adapters, ", ")) << "\n";
  if (!ip_adapters.empty()) {
    std::cout << "ip-adapters: " << absl::StrJoin(ip_adapters, ", ")
              << absl::StrFormat(" (image encoding %.3f s)\n", result->image_encode_seconds());
  }
  if (request.has_cache()) {
    std::cout << "cache " << request.cache().type() << ": " << result->cache_skipped_steps()
              << " forwards skipped, " << result->cache_computed_steps() << " computed\n";
  }
  std::cout << absl::StrFormat("%.3f s (queued %.3f s)\n", result->seconds(),
                               result->queue_seconds());
  return absl::OkStatus();
}

}  // namespace

bool IsRemoteCommand(const std::string& command) {
  static const std::set<std::string> kCommands = {
      "models", "metadata",        "load-single-file",  "unload-model", "load-lora", "unload-lora",
      "loras",  "load-ip-adapter", "unload-ip-adapter", "health",       "generate"};
  return kCommands.count(command) > 0;
}

int RunRemoteCommand(const std::string& command, const std::vector<std::string>& positional,
                     const RemoteOptions& options) {
  absl::Status status;
  bool serving = true;
  auto run = [&]() -> absl::Status {
    if (command != "metadata" && !positional.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          command, " takes no positional arguments (got '", absl::StrJoin(positional, " "), "')"));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(options));
    if (command == "models") return Models(*client);
    if (command == "metadata") return Metadata(*client, positional, options);
    if (command == "load-single-file") return LoadSingleFile(*client, options);
    if (command == "unload-model") return UnloadModel(*client, options);
    if (command == "load-lora") return LoadLora(*client, options);
    if (command == "unload-lora") return UnloadLora(*client, options);
    if (command == "loras") return Loras(*client, options);
    if (command == "load-ip-adapter") return LoadIPAdapter(*client, options);
    if (command == "unload-ip-adapter") return UnloadIPAdapter(*client, options);
    if (command == "generate") return Generate(*client, options);
    if (command == "health") {
      ASSIGN_OR_RETURN(serving, Health(*client, options));
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat("'", command, "' is not a remote command"));
  };
  status = run();
  if (!status.ok()) {
    std::cout.flush();
    std::cerr << "error: " << absl::StatusCodeToString(status.code()) << ": " << status.message()
              << "\n";
    return IsRpcError(status) ? kExitRpcError : kExitLocalError;
  }
  return serving ? kExitOk : kExitNotServing;
}

}  // namespace ds::cli
