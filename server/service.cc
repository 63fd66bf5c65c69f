#include "server/service.h"

#include <stdlib.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>
#include <functional>
#include <set>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "handlers/block_cache.h"
#include "handlers/flow_match.h"
#include "handlers/group_offloading.h"
#include "handlers/image_processing.h"
#include "handlers/model_metadata.h"
#include "handlers/pipeline.h"
#include "handlers/registry.h"
#include "handlers/status.h"
#include "server/grpc_status.h"
#include "server/logging.h"
#include "server/metrics.h"
#include "server/tensor_proto.h"

namespace ds::server {
namespace {

namespace pb = ::diffusion::v1;
using SteadyClock = std::chrono::steady_clock;

double SecondsSince(SteadyClock::time_point start) {
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

std::vector<std::string> AuthorizationValues(const grpc::CallbackServerContext& ctx) {
  std::vector<std::string> values;
  auto range = ctx.client_metadata().equal_range("authorization");
  for (auto it = range.first; it != range.second; ++it) {
    values.emplace_back(it->second.data(), it->second.size());
  }
  return values;
}

absl::Status Draining() {
  return absl::UnavailableError("the server is shutting down; retry on another replica");
}

pb::ModelState ToProto(InstanceState state) {
  switch (state) {
    case InstanceState::kLoading:
      return pb::LOADING;
    case InstanceState::kReady:
      return pb::READY;
    case InstanceState::kUnloading:
      return pb::UNLOADING;
    case InstanceState::kFailed:
      return pb::FAILED;
  }
  return pb::MODEL_STATE_UNSPECIFIED;
}

void FillLoRAInfo(const AdapterInfo& info, pb::LoRAInfo* out) {
  out->set_name(info.name);
  out->set_sha256(info.sha256);
  out->set_format(info.format);
  out->set_source(info.path);
  out->set_bytes(info.bytes);
  out->set_modules(info.modules);
  out->set_pinned(info.pinned);
  out->set_fused(info.fused);
  out->set_users(info.users);
  out->set_default_weight(info.default_weight);
}

void FillIPAdapterInfo(const IPAdapterInfo& info, pb::IPAdapterInfo* out) {
  out->set_name(info.name);
  out->set_path(info.path);
  out->set_format(info.format);
  out->set_num_tokens(info.num_tokens);
  out->set_image_embed_dim(info.image_embed_dim);
  out->set_num_layers(info.num_layers);
  out->set_memory_bytes(info.memory_bytes);
  out->set_image_encoder(info.image_encoder);
  out->set_image_size(info.image_size);
}

void FillLoRAReport(const LoraReport& report, pb::LoRAReport* out) {
  out->set_format(report.format);
  for (const LoraModuleReport& m : report.modules) {
    pb::LoRAModuleReport* r = out->add_modules();
    r->set_module(m.module);
    r->set_rank(m.rank);
    r->set_alpha(m.alpha);
    r->set_scale(m.scale);
    for (int64_t d : m.down_shape) r->add_lora_a_shape(d);
    for (int64_t d : m.up_shape) r->add_lora_b_shape(d);
    r->set_bias(m.bias);
  }
  for (const std::string& o : report.overlays) out->add_overlays(o);
  for (const LoraInputExpansion& e : report.expansions) out->add_expanded_modules(e.module);
  for (const auto& [key, why] : report.unmatched) (*out->mutable_unmatched())[key] = why;
  out->set_file_bytes(report.file_bytes);
  out->set_tensor_bytes(report.tensor_bytes);
  out->set_seconds(report.seconds);
  out->set_text(report.ToString());
}

void FillStoredAdapter(const AdapterDescriptor& d, pb::StoredAdapter* out) {
  out->set_name(d.name);
  out->set_sha256(d.sha256);
  out->set_format(d.format);
  out->set_file_bytes(d.file_bytes);
  out->set_pinned(d.pin);
  out->set_published_by(d.published_by);
  out->set_published_unix_ms(d.published_unix_ms);
  out->set_default_weight(d.default_weight);
}

void FillFeatureRow(const FeatureRow& row, pb::FeatureRow* out) {
  out->set_attribute(row.attribute);
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, bool>) {
          out->set_bool_value(v);
        } else {
          for (const std::string& s : v) out->mutable_list_value()->add_values(s);
        }
      },
      row.value);
  out->set_display(row.display);
  out->set_description(row.description);
  out->set_docs_url(row.docs_link);
}

// A private temporary file holding client bytes, removed on destruction.
class TempFile {
 public:
  ~TempFile() {
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  absl::Status Write(const std::string& bytes) {
    const char* dir = std::getenv("TMPDIR");
    std::string pattern = absl::StrCat(dir != nullptr && *dir != '\0' ? dir : "/tmp",
                                       "/ds-inline-lora-XXXXXX.safetensors");
    const int fd = ::mkstemps(pattern.data(), static_cast<int>(sizeof(".safetensors") - 1));
    if (fd < 0) return absl::InternalError("cannot create a temporary file for inline bytes");
    path_ = pattern;  // mkstemps creates it with mode 0600
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (n <= 0) {
        ::close(fd);
        return absl::InternalError("cannot write the inline bytes to a temporary file");
      }
      done += static_cast<size_t>(n);
    }
    if (::close(fd) != 0) return absl::InternalError("cannot close the temporary file");
    return absl::OkStatus();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Per-call metrics and the access log.

class DiffusionService::CallLog {
 public:
  CallLog(std::shared_ptr<Metrics> metrics, const char* rpc, const grpc::CallbackServerContext& ctx)
      : metrics_(std::move(metrics)), start_(SteadyClock::now()) {
    entry_.rpc = rpc;
    entry_.peer = ctx.peer();
  }
  // The model the call names, as the client spelled it (logged as is). It becomes the metrics
  // label only once mark_model_known() confirms it names an instance or registered model, so
  // arbitrary client strings cannot grow the label set without bound.
  void set_model(std::string model) {
    entry_.model = std::move(model);
    model_known_ = false;
  }
  void mark_model_known() { model_known_ = true; }
  void set_adapters(std::vector<std::string> adapters) { entry_.adapters = std::move(adapters); }
  const std::string& model() const { return entry_.model; }

  // Once per call, with its final status.
  void Done(const absl::Status& status) {
    entry_.code = status.code();
    entry_.message = std::string(status.message());
    entry_.seconds = SecondsSince(start_);
    if (metrics_ != nullptr) {
      metrics_->RecordRequest(model_known_ ? entry_.model : "", entry_.rpc, entry_.code,
                              entry_.seconds);
    }
    LogRpc(entry_);
  }

 private:
  const std::shared_ptr<Metrics> metrics_;
  const SteadyClock::time_point start_;
  RpcLogEntry entry_;
  bool model_known_ = false;
};

// ------------------------------------------------------------------------------------------------
// Generate: the job a worker runs, and the write reactor that streams its events.

struct DiffusionService::GenerateJob {
  std::string model_name;
  InstancePtr instance;
  AdapterStackPtr stack;
  TensorMap inputs;
  torch::Tensor latents;  // undefined: drawn from `seed` with `latent_shape`
  std::vector<int64_t> latent_shape;
  int64_t seed = 0;
  int steps = 0;
  double guidance = 0;  // echoed
  // Pipeline instances: the request (adapters are set from `stack` when it runs), what to return
  // and the resolved size.
  PipelineRequest pipeline_request;
  // IP-Adapter images as sent (PNG bytes), decoded by the worker (never on the gRPC thread) into
  // pipeline_request.ip_adapters[index].image / negative_image.
  struct IPImage {
    size_t index = 0;
    bool negative = false;
    std::string bytes;
  };
  std::vector<IPImage> ip_images;
  int64_t max_ip_image_pixels = 0;
  bool want_png = false;
  bool want_latents = false;
  int64_t width = 0;
  int64_t height = 0;
  std::chrono::system_clock::time_point deadline;
  SteadyClock::time_point arrived;
};

// Streams the messages a worker posts, one write at a time, then finishes with the status the
// worker completes with. Send/Complete may be called from any thread; after Complete the caller
// must not touch the reactor (it deletes itself in OnDone).
class DiffusionService::GenerateReactor final
    : public grpc::ServerWriteReactor<pb::GenerateResponse> {
 public:
  explicit GenerateReactor(std::unique_ptr<CallLog> log) : log_(std::move(log)) {}

  CallLog* log() { return log_.get(); }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

  void Send(pb::GenerateResponse message) {
    const pb::GenerateResponse* to_write = nullptr;
    {
      std::lock_guard lock(mu_);
      if (broken_ || completed_) return;
      pending_.push_back(std::move(message));
      to_write = NextWriteLocked();
    }
    if (to_write != nullptr) StartWrite(to_write);
  }

  void Complete(const absl::Status& status) {
    {
      std::lock_guard lock(mu_);
      if (completed_) return;
      completed_ = true;
      final_ = status;
      if (writing_) return;  // OnWriteDone finishes
      finished_ = true;
    }
    Finish(ToGrpcStatus(status));
  }

  void OnWriteDone(bool ok) override {
    const pb::GenerateResponse* to_write = nullptr;
    grpc::Status finish;
    bool do_finish = false;
    {
      std::lock_guard lock(mu_);
      writing_ = false;
      if (!ok) {
        broken_ = true;  // the call is gone (cancelled); later messages are dropped
        pending_.clear();
      }
      to_write = NextWriteLocked();
      if (to_write == nullptr && completed_ && !finished_) {
        finished_ = true;
        do_finish = true;
        finish = ToGrpcStatus(final_);
      }
    }
    if (to_write != nullptr) StartWrite(to_write);
    if (do_finish) Finish(finish);
  }

  void OnCancel() override { cancelled_.store(true, std::memory_order_release); }

  void OnDone() override {
    absl::Status final_status;
    {
      std::lock_guard lock(mu_);
      final_status = final_;
    }
    log_->Done(final_status);
    delete this;
  }

 private:
  const pb::GenerateResponse* NextWriteLocked() {
    if (writing_ || pending_.empty() || broken_) return nullptr;
    current_ = std::move(pending_.front());
    pending_.pop_front();
    writing_ = true;
    return &current_;
  }

  std::unique_ptr<CallLog> log_;
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::deque<pb::GenerateResponse> pending_;
  pb::GenerateResponse current_;  // the message being written
  bool writing_ = false;
  bool broken_ = false;
  bool completed_ = false;
  bool finished_ = false;
  absl::Status final_;
};

// ------------------------------------------------------------------------------------------------

DiffusionService::DiffusionService(ServerOptions options, std::shared_ptr<ModelManager> models,
                                   AdminAuth auth, std::shared_ptr<Metrics> metrics,
                                   std::shared_ptr<AdapterSync> adapter_sync)
    : options_(std::move(options)),
      models_(std::move(models)),
      auth_(std::move(auth)),
      metrics_(std::move(metrics)),
      adapter_sync_(std::move(adapter_sync)) {
  // Management calls read files; a few at a time, never on gRPC's callback threads.
  management_ = std::make_unique<Scheduler>(
      SchedulerOptions{.name = "management", .workers = 2, .queue_capacity = 64}, nullptr);
  if (adapter_sync_ != nullptr) {
    // Requests waiting for one adapter share its single load, so a few workers suffice; the
    // queue admits what the device queues could take.
    store_loader_ = std::make_unique<Scheduler>(
        SchedulerOptions{.name = "adapter-store",
                         .workers = 4,
                         .queue_capacity = std::max(64, 4 * options_.queue_capacity_per_device)},
        nullptr);
  }
}

DiffusionService::~DiffusionService() { ShutdownSchedulers(absl::InfinitePast()); }

void DiffusionService::BeginDrain() { draining_.store(true); }

void DiffusionService::ShutdownSchedulers(absl::Time deadline) {
  // Store loads first: what they let through still reaches the device queues while those drain.
  if (store_loader_ != nullptr) store_loader_->Shutdown(deadline);
  std::vector<Scheduler*> all;
  {
    std::lock_guard lock(schedulers_mu_);
    schedulers_closed_ = true;
    for (auto& [device, s] : schedulers_) all.push_back(s.get());
  }
  all.push_back(management_.get());
  // Schedulers are never removed, so the pointers stay valid.
  for (Scheduler* s : all) s->Shutdown(deadline);
}

absl::StatusOr<Scheduler*> DiffusionService::SchedulerFor(const std::string& device) {
  std::lock_guard lock(schedulers_mu_);
  if (schedulers_closed_) return Draining();
  std::unique_ptr<Scheduler>& s = schedulers_[device];
  if (s == nullptr) {
    s = std::make_unique<Scheduler>(
        SchedulerOptions{.name = device,
                         .workers = options_.workers_per_device,
                         .queue_capacity = options_.queue_capacity_per_device},
        metrics_);
  }
  return s.get();
}

absl::StatusOr<std::string> DiffusionService::ResolveModelName(const std::string& requested,
                                                               const std::string& field) const {
  if (!requested.empty()) return requested;
  std::vector<std::string> names;
  for (const InstanceStatus& s : models_->List()) {
    if (s.state == InstanceState::kUnloading) continue;
    if (s.name == kDefaultInstanceName) return s.name;
    names.push_back(s.name);
  }
  if (names.size() == 1) return names[0];
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": required (no instance named '", kDefaultInstanceName,
                   "'; instances: ", names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
}

void DiffusionService::UpdateAdapterMetrics(const std::string& model,
                                            const ModelInstance& instance) const {
  if (metrics_ == nullptr) return;
  metrics_->SetAdapters(model, static_cast<int64_t>(instance.host->adapter_count()),
                        instance.host->memory_used_bytes());
}

void DiffusionService::FillInstance(const InstanceStatus& status, pb::ModelInstance* out) const {
  out->set_name(status.name);
  out->set_state(ToProto(status.state));
  out->set_state_reason(status.reason);
  const ModelInstance* inst = status.instance.get();
  if (inst == nullptr) return;
  out->set_class_name(inst->spec->class_name);
  out->set_family(inst->spec->name);
  out->set_variant(inst->variant);
  out->set_dtype(inst->dtype);
  out->set_device(inst->device);
  out->set_storage_dtype(inst->storage_dtype);
  if (const GroupOffloader* offloader = inst->model().group_offloader(); offloader != nullptr) {
    const GroupOffloadingStats stats = offloader->stats();
    pb::GroupOffloadStatus* g = out->mutable_group_offload();
    g->mutable_config()->set_blocks_per_group(
        static_cast<int32_t>(offloader->options().blocks_per_group));
    g->mutable_config()->set_prefetch(offloader->options().prefetch);
    g->mutable_config()->set_offload_to(GroupOffloadTargetName(offloader->options().target));
    g->set_groups(stats.groups);
    g->set_offloaded_bytes(stats.offloaded_bytes);
    g->set_resident_bytes(stats.resident_bytes);
    g->set_onloads(stats.onloads);
  }
  out->set_device_map(inst->device_map);
  if (const DemoPipelineRecipe* demo = inst->demo; demo != nullptr) {
    pb::DemoModelInfo* d = out->mutable_demo();
    d->set_name(demo->name);
    d->set_synthetic(true);  // every demo recipe: synthetic data or random weights
    d->set_description(demo->description);
    d->set_prompt_template(demo->prompt_template);
    for (const std::string& word : demo->vocabulary) d->add_vocabulary(word);
    bool trained = false;
    for (const DemoComponent& c : demo->components) trained = trained || !c.weights.empty();
    d->set_trained(trained);
  }
  out->set_parameter_bytes(inst->parameter_bytes);
  out->set_adapter_bytes(inst->host->memory_used_bytes());
  for (const AdapterInfo& a : inst->host->List()) FillLoRAInfo(a, out->add_adapters());
  out->set_source(inst->source);
  out->set_sha256(inst->sha256);
  if (adapter_sync_ != nullptr) {
    for (const AdapterDescriptor& d : adapter_sync_->Stored(inst->name)) {
      FillStoredAdapter(d, out->add_stored_adapters());
    }
  }
  if (inst->pipeline != nullptr) {
    for (const IPAdapterInfo& a : inst->pipeline->ListIPAdapters()) {
      FillIPAdapterInfo(a, out->add_ip_adapters());
    }
    out->set_pipeline_class(inst->pipeline->class_name());
    const PipelineDescription d = inst->pipeline->describe();
    for (const auto& [name, class_name] : d.classes) {
      pb::PipelineComponent* c = out->add_components();
      c->set_name(name);
      c->set_class_name(class_name);
      if (auto it = d.sources.find(name); it != d.sources.end()) c->set_source(it->second);
      c->set_loaded(true);
    }
    for (const auto& [name, why] : d.not_loaded) {
      pb::PipelineComponent* c = out->add_components();
      c->set_name(name);
      c->set_loaded(false);
      c->set_reason(why);
    }
  }
}

void DiffusionService::FillLimits(pb::GenerateLimits* out) const {
  out->set_max_steps(options_.max_steps);
  out->set_default_steps(options_.default_steps);
  out->set_default_guidance(options_.default_guidance);
  out->set_max_batch(options_.max_batch);
  out->set_max_image_tokens(options_.max_image_tokens);
  out->set_max_text_tokens(options_.max_text_tokens);
  out->set_max_inline_lora_bytes(options_.max_inline_lora_bytes);
}

// ------------------------------------------------------------------------------------------------
// Unary RPCs.

grpc::ServerUnaryReactor* DiffusionService::ListModels(grpc::CallbackServerContext* ctx,
                                                       const pb::ListModelsRequest* /*request*/,
                                                       pb::ListModelsResponse* response) {
  CallLog log(metrics_, "ListModels", *ctx);
  for (const InstanceStatus& s : models_->List()) FillInstance(s, response->add_models());
  log.Done(absl::OkStatus());
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

absl::Status DiffusionService::DoGetMetadata(const pb::GetMetadataRequest& request,
                                             pb::GetMetadataResponse* response,
                                             CallLog* log) const {
  const std::string& name = request.name();
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "name: required (a model instance, a model class name or a registry name)");
  }
  log->set_model(name);
  const ModelSpec* spec = nullptr;
  std::shared_ptr<const DiffusionPipeline> pipeline;  // of a pipeline instance
  std::vector<std::string> instance_names;
  for (const InstanceStatus& s : models_->List()) {
    if (s.state == InstanceState::kUnloading) continue;
    instance_names.push_back(s.name);
    if (s.name != name) continue;
    if (s.instance == nullptr) return models_->Get(name).status();  // LOADING / FAILED
    const ModelInstance& inst = *s.instance;
    spec = inst.spec;
    pipeline = inst.pipeline;
    FillInstance(s, response->mutable_instance());
    response->set_config_json(inst.model().config().dump());
    for (const std::string& in : inst.model().required_inputs()) {
      response->add_required_inputs(in);
    }
    for (const std::string& in : inst.model().optional_inputs()) {
      response->add_optional_inputs(in);
    }
  }
  if (spec == nullptr) {
    auto found = ModelRegistry::Global().Find(name);
    if (!found.ok()) {
      return absl::NotFoundError(
          absl::StrCat("name: '", name, "' is neither a model instance (instances: ",
                       instance_names.empty() ? "none" : absl::StrJoin(instance_names, ", "),
                       ") nor a registered model: ", found.status().message()));
    }
    spec = *found;
  }
  log->mark_model_known();
  const ModelMetadata metadata = BuildModelMetadata(*spec);
  response->set_class_name(spec->class_name);
  response->set_family(spec->name);
  for (const FeatureRow& row : metadata.rows()) FillFeatureRow(row, response->add_features());
  response->set_table(metadata.Render(request.verbose()));
  FillLimits(response->mutable_limits());
  if (pipeline != nullptr) {
    const PipelineLimits l = pipeline->limits();
    pb::GenerateLimits* out = response->mutable_limits();
    out->set_max_steps(std::min(options_.max_steps, l.options.max_inference_steps));
    out->set_max_batch(std::min(options_.max_batch, l.options.max_batch));
    out->set_image_size_multiple(l.image_size_multiple);
    out->set_max_image_side(l.options.max_image_side);
    out->set_default_width(l.default_width);
    out->set_default_height(l.default_height);
    out->set_prompt_embeds_dim(l.prompt_embeds_dim);
    out->set_pooled_prompt_embeds_dim(l.pooled_prompt_embeds_dim);
    out->set_latent_channels(l.latent_channels);
    out->set_guidance_embeds(l.guidance_embeds);
    out->set_accepts_text_prompt(l.accepts_text_prompt);
    out->set_max_sequence_length(l.accepts_text_prompt ? l.max_sequence_length_limit : 0);
    out->set_supports_ip_adapter(l.supports_ip_adapter);
    for (const std::string& type : l.cache_types) out->add_cache_types(type);
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* DiffusionService::GetMetadata(grpc::CallbackServerContext* ctx,
                                                        const pb::GetMetadataRequest* request,
                                                        pb::GetMetadataResponse* response) {
  CallLog log(metrics_, "GetMetadata", *ctx);
  const absl::Status status = DoGetMetadata(*request, response, &log);
  log.Done(status);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* DiffusionService::ListLoRAs(grpc::CallbackServerContext* ctx,
                                                      const pb::ListLoRAsRequest* request,
                                                      pb::ListLoRAsResponse* response) {
  CallLog log(metrics_, "ListLoRAs", *ctx);
  auto run = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string model, ResolveModelName(request->model(), "model"));
    log.set_model(model);
    ASSIGN_OR_RETURN(InstancePtr inst, models_->Get(model));
    log.mark_model_known();
    for (const AdapterInfo& a : inst->host->List()) FillLoRAInfo(a, response->add_adapters());
    response->set_memory_used_bytes(inst->host->memory_used_bytes());
    response->set_memory_budget_bytes(inst->host->options().memory_budget_bytes);
    if (adapter_sync_ != nullptr) {
      for (const AdapterDescriptor& d : adapter_sync_->Stored(model)) {
        FillStoredAdapter(d, response->add_stored());
      }
    }
    return absl::OkStatus();
  };
  const absl::Status status = run();
  log.Done(status);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

template <typename Work>
grpc::ServerUnaryReactor* DiffusionService::Management(grpc::CallbackServerContext* ctx,
                                                       const char* rpc, std::string model,
                                                       Work work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  auto log = std::make_shared<CallLog>(metrics_, rpc, *ctx);
  log->set_model(std::move(model));
  auto finish = [reactor, log](const absl::Status& status) {
    log->Done(status);
    reactor->Finish(ToGrpcStatus(status));
  };
  absl::Status status = auth_.Check(AuthorizationValues(*ctx));
  if (status.ok() && draining_.load()) status = Draining();
  if (status.ok()) {
    status =
        management_->Submit(
            [work, finish, log, rpc]() mutable {
              // As in RunGenerate: an escaped exception fails the call, not the worker.
              absl::Status done;
              absl::Status thrown = TorchCallVoid(rpc, [&] { done = work(log.get()); });
              finish(thrown.ok() ? done : thrown);
            },
            finish);
  }
  if (!status.ok()) finish(status);
  return reactor;
}

absl::Status DiffusionService::DoLoadSingleFile(const pb::LoadSingleFileRequest& request,
                                                pb::LoadSingleFileResponse* response) {
  RETURN_IF_ERROR(Annotate(ValidateInstanceName(request.name()), "name"));
  if (request.path().empty()) return absl::InvalidArgumentError("path: required");
  if (options_.model_root.empty()) {
    return absl::FailedPreconditionError(
        "path: the server has no --model_root, so it loads no server-side checkpoints");
  }
  ASSIGN_OR_RETURN(std::string path,
                   ConfinePath(options_.model_root, request.path(), "--model_root"));
  LoadModelRequest load;
  load.name = request.name();
  load.path = path;
  load.dtype = request.dtype();
  load.device = request.device();
  load.replace = request.replace();
  load.storage_dtype = request.storage_dtype();
  load.layerwise_casting_skip_patterns.assign(request.layerwise_casting_skip_patterns().begin(),
                                              request.layerwise_casting_skip_patterns().end());
  if (request.has_group_offload()) {
    GroupOffloadingOptions offloading;
    offloading.blocks_per_group = request.group_offload().blocks_per_group();
    offloading.prefetch = request.group_offload().prefetch();
    auto target = ParseGroupOffloadTarget(request.group_offload().offload_to());
    if (!target.ok()) return Annotate(target.status(), "group_offload");
    offloading.target = *target;
    load.group_offloading = offloading;
  }
  load.device_map = request.device_map();
  load.max_memory_bytes.insert(request.max_memory_bytes().begin(),
                               request.max_memory_bytes().end());
  if (!request.config_json().empty()) {
    load.config_override = nlohmann::json::parse(request.config_json(), nullptr,
                                                 /*allow_exceptions=*/false);
    if (!load.config_override.is_object()) {
      return absl::InvalidArgumentError("config_json: not a JSON object");
    }
  }
  const auto start = SteadyClock::now();
  absl::StatusOr<LoadModelResult> result = models_->Load(load);
  if (metrics_ != nullptr) metrics_->ObserveModelLoad(request.name(), SecondsSince(start));
  if (!result.ok()) {
    // The resolved path is ours; the client named the requested one.
    return absl::Status(result.status().code(),
                        absl::StrReplaceAll(result.status().message(), {{path, request.path()}}));
  }
  InstanceStatus status;
  status.name = result->instance->name;
  status.state = InstanceState::kReady;
  status.instance = result->instance;
  FillInstance(status, response->mutable_instance());
  response->set_report(result->report);
  response->set_seconds(result->seconds);
  UpdateAdapterMetrics(request.name(), *result->instance);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* DiffusionService::LoadSingleFile(grpc::CallbackServerContext* ctx,
                                                           const pb::LoadSingleFileRequest* request,
                                                           pb::LoadSingleFileResponse* response) {
  return Management(ctx, "LoadSingleFile", request->name(),
                    [this, request, response](CallLog* log) {
                      absl::Status status = DoLoadSingleFile(*request, response);
                      if (status.ok()) log->mark_model_known();
                      return status;
                    });
}

grpc::ServerUnaryReactor* DiffusionService::UnloadModel(grpc::CallbackServerContext* ctx,
                                                        const pb::UnloadModelRequest* request,
                                                        pb::UnloadModelResponse* /*response*/) {
  return Management(ctx, "UnloadModel", request->name(), [this, request](CallLog* log) {
    if (request->name().empty()) return absl::InvalidArgumentError("name: required");
    RETURN_IF_ERROR(models_->Unload(request->name()));
    log->mark_model_known();
    if (metrics_ != nullptr) metrics_->ForgetModel(request->name());
    return absl::OkStatus();
  });
}

absl::Status DiffusionService::DoLoadIPAdapter(const pb::LoadIPAdapterRequest& request,
                                               pb::LoadIPAdapterResponse* response, CallLog* log) {
  ASSIGN_OR_RETURN(std::string model, ResolveModelName(request.model(), "model"));
  log->set_model(model);
  log->set_adapters({request.name()});
  RETURN_IF_ERROR(Annotate(ValidateAdapterName(request.name()), "name"));
  ASSIGN_OR_RETURN(InstancePtr inst, models_->Get(model));
  log->mark_model_known();
  if (inst->pipeline == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model: '", model, "' is a bare ", inst->spec->class_name,
        " instance; IP-Adapters need a pipeline instance (a pipeline folder with "
        "model_index.json)"));
  }
  if (!inst->pipeline->limits().supports_ip_adapter) {
    return absl::UnimplementedError(absl::StrCat("model: '", model, "' (",
                                                 inst->pipeline->class_name(),
                                                 ") does not take IP-Adapters"));
  }
  if (request.path().empty()) return absl::InvalidArgumentError("path: required");
  if (options_.adapter_root.empty()) {
    return absl::FailedPreconditionError(
        "path: the server has no --adapter_root, so it loads no server-side adapters");
  }
  ASSIGN_OR_RETURN(std::string path,
                   ConfinePath(options_.adapter_root, request.path(), "--adapter_root"));
  IPAdapterLoadOptions options;
  options.replace = request.replace();
  options.source = request.path();
  options.image_encoder_source = request.image_encoder_path();
  std::vector<std::pair<std::string, std::string>> shown = {{path, request.path()}};
  if (!request.image_encoder_path().empty()) {
    if (options_.model_root.empty()) {
      return absl::FailedPreconditionError(
          "image_encoder_path: the server has no --model_root, so it loads no server-side "
          "models");
    }
    ASSIGN_OR_RETURN(options.image_encoder_path,
                     ConfinePath(options_.model_root, request.image_encoder_path(),
                                 "--model_root"));
    shown.emplace_back(options.image_encoder_path, request.image_encoder_path());
  }
  bool replaced = false;
  for (const IPAdapterInfo& a : inst->pipeline->ListIPAdapters()) {
    replaced = replaced || a.name == request.name();
  }
  const auto start = SteadyClock::now();
  absl::StatusOr<IPAdapterInfo> info =
      inst->pipeline->LoadIPAdapter(request.name(), path, options);
  if (!info.ok()) {
    return absl::Status(info.status().code(),
                        absl::StrReplaceAll(info.status().message(), shown));
  }
  FillIPAdapterInfo(*info, response->mutable_adapter());
  response->set_replaced(replaced && request.replace());
  response->set_seconds(SecondsSince(start));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* DiffusionService::LoadIPAdapter(grpc::CallbackServerContext* ctx,
                                                          const pb::LoadIPAdapterRequest* request,
                                                          pb::LoadIPAdapterResponse* response) {
  return Management(ctx, "LoadIPAdapter", request->model(),
                    [this, request, response](CallLog* log) {
                      return DoLoadIPAdapter(*request, response, log);
                    });
}

grpc::ServerUnaryReactor* DiffusionService::UnloadIPAdapter(
    grpc::CallbackServerContext* ctx, const pb::UnloadIPAdapterRequest* request,
    pb::UnloadIPAdapterResponse* /*response*/) {
  return Management(ctx, "UnloadIPAdapter", request->model(), [this, request](CallLog* log) {
    ASSIGN_OR_RETURN(std::string model, ResolveModelName(request->model(), "model"));
    log->set_model(model);
    log->set_adapters({request->name()});
    if (request->name().empty()) return absl::InvalidArgumentError("name: required");
    ASSIGN_OR_RETURN(InstancePtr inst, models_->Get(model));
    log->mark_model_known();
    if (inst->pipeline == nullptr) {
      return absl::NotFoundError(absl::StrCat("IP-Adapter '", request->name(),
                                              "' is not loaded: '", model,
                                              "' is a bare model instance"));
    }
    return inst->pipeline->UnloadIPAdapter(request->name());
  });
}

absl::Status DiffusionService::DoLoadLoRA(const pb::LoadLoRARequest& request,
                                          pb::LoadLoRAResponse* response, CallLog* log) {
  ASSIGN_OR_RETURN(std::string model, ResolveModelName(request.model(), "model"));
  log->set_model(model);
  log->set_adapters({request.name()});
  ASSIGN_OR_RETURN(InstancePtr inst, models_->Get(model));
  log->mark_model_known();
  AdapterLoadOptions options;
  options.allow_partial = request.allow_partial();
  options.replace = request.replace();
  options.pin = request.pin();
  options.format_hint = request.format_hint();
  if (request.has_default_weight()) {
    if (!std::isfinite(request.default_weight())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "default_weight: must be finite, got ", request.default_weight()));
    }
    options.default_weight = request.default_weight();
  }
  std::string path;
  TempFile temp;
  switch (request.source_case()) {
    case pb::LoadLoRARequest::kPath: {
      if (request.path().empty()) return absl::InvalidArgumentError("path: empty");
      if (options_.adapter_root.empty()) {
        return absl::FailedPreconditionError(
            "path: the server has no --adapter_root, so it loads no server-side adapters (send "
            "inline_bytes)");
      }
      ASSIGN_OR_RETURN(path, ConfinePath(options_.adapter_root, request.path(), "--adapter_root"));
      break;
    }
    case pb::LoadLoRARequest::kInlineBytes: {
      const int64_t size = static_cast<int64_t>(request.inline_bytes().size());
      if (size == 0) return absl::InvalidArgumentError("inline_bytes: empty");
      if (size > options_.max_inline_lora_bytes) {
        return absl::ResourceExhaustedError(
            absl::StrCat("inline_bytes: ", size, " bytes, over the cap of ",
                         options_.max_inline_lora_bytes, " (--max_inline_lora_bytes)"));
      }
      RETURN_IF_ERROR(temp.Write(request.inline_bytes()));
      path = temp.path();
      options.source = "inline";
      break;
    }
    case pb::LoadLoRARequest::SOURCE_NOT_SET:
      return absl::InvalidArgumentError("source: set path or inline_bytes");
  }
  const std::string shown = options.source.empty() ? request.path() : options.source;
  auto hide_path = [&](absl::string_view text) {
    return absl::StrReplaceAll(text, {{path, shown}});
  };
  // With a shared store the local load and the store's entry change together: the entry's lock
  // keeps the poller and on-demand loads of this adapter out meanwhile.
  std::unique_lock<std::mutex> entry;
  if (adapter_sync_ != nullptr) {
    entry = adapter_sync_->Lock(model, request.name());
    if (!request.replace()) {
      absl::StatusOr<AdapterDescriptor> stored = adapter_sync_->store().Read(model, request.name());
      if (stored.ok()) {
        return absl::AlreadyExistsError(
            absl::StrCat("adapter '", request.name(), "' is already in the adapter store (sha256 ",
                         stored->sha256, "); unload it first or load with replace"));
      }
      if (!absl::IsNotFound(stored.status())) {
        return absl::AlreadyExistsError(
            absl::StrCat("adapter '", request.name(), "' has an entry in the adapter store (",
                         stored.status().message(), "); load with replace to overwrite it"));
      }
    }
  }
  const auto start = SteadyClock::now();
  absl::StatusOr<AdapterLoadResult> loaded = inst->host->Load(request.name(), path, options);
  if (metrics_ != nullptr) metrics_->ObserveAdapterLoad(model, SecondsSince(start));
  if (!loaded.ok())
    return absl::Status(loaded.status().code(), hide_path(loaded.status().message()));
  ASSIGN_OR_RETURN(AdapterInfo info, inst->host->Info(request.name()));
  if (adapter_sync_ != nullptr) {
    absl::StatusOr<AdapterDescriptor> published = adapter_sync_->Published(
        *inst, info, path, request.allow_partial(), request.pin(), request.replace());
    if (!published.ok()) {
      // The store keeps its previous entry (if any), and this replica follows the store.
      (void)inst->host->Unload(request.name());
      UpdateAdapterMetrics(model, *inst);
      return absl::Status(published.status().code(),
                          hide_path(absl::StrCat("adapter store: ", published.status().message())));
    }
  }
  FillLoRAInfo(info, response->mutable_adapter());
  FillLoRAReport(loaded->report, response->mutable_report());
  response->mutable_report()->set_text(hide_path(response->report().text()));
  response->set_replaced(loaded->replaced);
  for (const std::string& e : loaded->evicted) response->add_evicted(e);
  if (metrics_ != nullptr)
    metrics_->AdapterEvictions(model, static_cast<int64_t>(loaded->evicted.size()));
  UpdateAdapterMetrics(model, *inst);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* DiffusionService::LoadLoRA(grpc::CallbackServerContext* ctx,
                                                     const pb::LoadLoRARequest* request,
                                                     pb::LoadLoRAResponse* response) {
  return Management(ctx, "LoadLoRA", request->model(), [this, request, response](CallLog* log) {
    return DoLoadLoRA(*request, response, log);
  });
}

grpc::ServerUnaryReactor* DiffusionService::UnloadLoRA(grpc::CallbackServerContext* ctx,
                                                       const pb::UnloadLoRARequest* request,
                                                       pb::UnloadLoRAResponse* /*response*/) {
  return Management(ctx, "UnloadLoRA", request->model(), [this, request](CallLog* log) {
    ASSIGN_OR_RETURN(std::string model, ResolveModelName(request->model(), "model"));
    log->set_model(model);
    log->set_adapters({request->name()});
    if (request->name().empty()) return absl::InvalidArgumentError("name: required");
    ASSIGN_OR_RETURN(InstancePtr inst, models_->Get(model));
    log->mark_model_known();
    if (adapter_sync_ == nullptr) {
      RETURN_IF_ERROR(inst->host->Unload(request->name()));
      UpdateAdapterMetrics(model, *inst);
      return absl::OkStatus();
    }
    std::unique_lock<std::mutex> entry = adapter_sync_->Lock(model, request->name());
    const absl::Status local = inst->host->Unload(request->name());
    if (!local.ok() && !absl::IsNotFound(local)) return local;  // e.g. fused: nothing changed
    UpdateAdapterMetrics(model, *inst);
    const absl::Status stored = adapter_sync_->Removed(model, request->name());
    if (absl::IsNotFound(stored)) {
      if (absl::IsNotFound(local)) {
        return absl::NotFoundError(absl::StrCat("adapter '", request->name(),
                                                "' is neither loaded on '", model,
                                                "' nor in the adapter store"));
      }
      return absl::OkStatus();
    }
    return stored;
  });
}

// ------------------------------------------------------------------------------------------------
// Generate.

absl::StatusOr<std::shared_ptr<DiffusionService::GenerateJob>> DiffusionService::PrepareGenerate(
    const pb::GenerateRequest& request, CallLog* log, int store_loaded) {
  auto job = std::make_shared<GenerateJob>();
  job->arrived = SteadyClock::now();
  ASSIGN_OR_RETURN(job->model_name, ResolveModelName(request.model(), "model"));
  log->set_model(job->model_name);

  std::vector<AdapterRequest> adapters;
  std::vector<std::string> adapter_names;
  for (int i = 0; i < request.adapters_size(); ++i) {
    const pb::AdapterWeight& a = request.adapters(i);
    if (a.name().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("adapters[", i, "].name: required"));
    }
    AdapterRequest adapter{a.name(), std::nullopt};  // unset: the adapter's default weight
    if (a.has_weight()) {
      if (!std::isfinite(a.weight())) {
        return absl::InvalidArgumentError(
            absl::StrCat("adapters[", i, "].weight: must be finite, got ", a.weight()));
      }
      adapter.weight = a.weight();
    }
    adapters.push_back(adapter);
    adapter_names.push_back(a.name());
  }
  log->set_adapters(adapter_names);

  ASSIGN_OR_RETURN(job->instance, models_->Get(job->model_name));
  log->mark_model_known();
  const DiffusionModel& model = job->instance->model();

  if (request.steps() < 0 || request.steps() > options_.max_steps) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps: must be between 1 and ", options_.max_steps, " (0 = the default ",
                     options_.default_steps, "), got ", request.steps()));
  }
  job->steps = static_cast<int>(request.steps() == 0 ? options_.default_steps : request.steps());
  if (!std::isfinite(request.guidance()) || request.guidance() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("guidance: must be finite and >= 0 (0 = the default ",
                     options_.default_guidance, "), got ", request.guidance()));
  }

  // The request's one adapter snapshot, used for every step.
  auto snapshot = [&]() -> absl::Status {
    absl::StatusOr<AdapterStackPtr> stack = job->instance->host->Snapshot(adapters);
    if (metrics_ != nullptr && !adapters.empty()) {
      if (stack.ok()) {
        for (size_t i = static_cast<size_t>(store_loaded); i < adapters.size(); ++i) {
          metrics_->AdapterLookup(job->model_name, true);
        }
      } else if (absl::IsNotFound(stack.status())) {
        metrics_->AdapterLookup(job->model_name, false);
      }
    }
    if (!stack.ok()) return Annotate(stack.status(), "adapters");
    job->stack = *std::move(stack);
    return absl::OkStatus();
  };

  if (job->instance->pipeline != nullptr) {
    RETURN_IF_ERROR(PreparePipelineGenerate(request, job.get()));
    RETURN_IF_ERROR(snapshot());
    return job;
  }
  // A bare model takes latents and forward inputs only.
  {
    const char* pipeline_field = nullptr;
    if (request.has_prompt_embeds()) pipeline_field = "prompt_embeds";
    if (request.has_pooled_prompt_embeds()) pipeline_field = "pooled_prompt_embeds";
    if (request.has_negative_prompt_embeds()) pipeline_field = "negative_prompt_embeds";
    if (request.has_negative_pooled_prompt_embeds()) {
      pipeline_field = "negative_pooled_prompt_embeds";
    }
    if (request.has_noise()) pipeline_field = "noise";
    if (request.prompt_size() > 0) pipeline_field = "prompt";
    if (request.prompt_2_size() > 0) pipeline_field = "prompt_2";
    if (request.negative_prompt_size() > 0) pipeline_field = "negative_prompt";
    if (request.negative_prompt_2_size() > 0) pipeline_field = "negative_prompt_2";
    if (request.max_sequence_length() != 0) pipeline_field = "max_sequence_length";
    if (request.ip_adapters_size() > 0) pipeline_field = "ip_adapters";
    if (request.has_cache()) pipeline_field = "cache";
    if (request.width() != 0) pipeline_field = "width";
    if (request.height() != 0) pipeline_field = "height";
    if (request.num_images() != 0) pipeline_field = "num_images";
    if (request.true_cfg_scale() != 0) pipeline_field = "true_cfg_scale";
    if (request.output() == pb::GenerateRequest::OUTPUT_PNG ||
        request.output() == pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS) {
      pipeline_field = "output";
    }
    if (pipeline_field != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          pipeline_field, ": only pipeline instances take it; '", job->model_name,
          "' is a bare ", model.class_name(),
          " (give `inputs` and `latents`/`latent_shape`, or load a diffusers pipeline folder with "
          "model_index.json)"));
    }
  }

  // Forward inputs by name.
  const std::vector<std::string> required = model.required_inputs();
  const std::vector<std::string> optional = model.optional_inputs();
  std::set<std::string> known(required.begin(), required.end());
  known.insert(optional.begin(), optional.end());
  for (const auto& [name, tensor] : request.inputs()) {
    const std::string field = absl::StrCat("inputs['", name, "']");
    if (name == "hidden_states" || name == "timestep") {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": set by the sampler (give the initial noise as `latents` or `latent_shape`)"));
    }
    if (known.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": not an input of ", model.class_name(),
                       " (inputs: ", absl::StrJoin(known, ", "), ")"));
    }
    ASSIGN_OR_RETURN(job->inputs[name], TensorFromProto(tensor, field));
  }
  const bool has_guidance_input = known.count("guidance") > 0;
  for (const std::string& name : required) {
    if (name == "hidden_states" || name == "timestep" || name == "guidance") continue;
    if (job->inputs.count(name) == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("inputs['", name, "']: required by ", model.class_name()));
    }
  }

  // Initial noise.
  const std::vector<int64_t> shape(request.latent_shape().begin(), request.latent_shape().end());
  if (request.has_latents()) {
    ASSIGN_OR_RETURN(job->latents, TensorFromProto(request.latents(), "latents"));
    if (!job->latents.is_floating_point()) {
      return absl::InvalidArgumentError("latents.dtype: must be a floating-point type");
    }
    job->latent_shape = job->latents.sizes().vec();
    if (!shape.empty() && shape != job->latent_shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("latent_shape: [", absl::StrJoin(shape, ", "), "] contradicts latents [",
                       absl::StrJoin(job->latent_shape, ", "), "] (give one of them)"));
    }
  } else {
    if (shape.empty()) {
      return absl::InvalidArgumentError(
          "latent_shape: required when latents is not given (packed: [batch, image_tokens, "
          "channels])");
    }
    job->latent_shape = shape;
  }
  int64_t elements = 1;
  for (int64_t d : job->latent_shape) {
    if (d < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          request.has_latents() ? "latents.shape" : "latent_shape",
          ": every dimension must be >= 1, got [", absl::StrJoin(job->latent_shape, ", "), "]"));
    }
    elements = d > (int64_t{1} << 40) / elements ? (int64_t{1} << 40) : elements * d;
  }
  const std::string shape_field = request.has_latents() ? "latents.shape" : "latent_shape";
  const int64_t batch = job->latent_shape[0];
  if (batch > options_.max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat(shape_field, ": batch ", batch, " exceeds max_batch ", options_.max_batch));
  }
  if (job->latent_shape.size() >= 2 && job->latent_shape[1] > options_.max_image_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(shape_field, ": ", job->latent_shape[1],
                                                   " image tokens exceed max_image_tokens ",
                                                   options_.max_image_tokens));
  }
  const int64_t max_elements = options_.max_batch * options_.max_image_tokens * 1024;
  if (elements > max_elements) {
    return absl::InvalidArgumentError(
        absl::StrCat(shape_field, ": ", elements, " elements exceed the limit ", max_elements));
  }
  if (auto it = job->inputs.find("encoder_hidden_states");
      it != job->inputs.end() && it->second.dim() >= 2 &&
      it->second.size(1) > options_.max_text_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs['encoder_hidden_states']: ", it->second.size(1),
                     " text tokens exceed max_text_tokens ", options_.max_text_tokens));
  }
  job->seed = request.seed();

  // Guidance: from the inputs when given, else from the request (or its default).
  if (has_guidance_input) {
    if (auto it = job->inputs.find("guidance"); it != job->inputs.end()) {
      ASSIGN_OR_RETURN(job->guidance, TorchCall(
                                          "inputs['guidance']",
                                          [&] { return it->second.flatten()[0].item<double>(); },
                                          absl::StatusCode::kInvalidArgument));
    } else {
      job->guidance = request.guidance() == 0 ? options_.default_guidance : request.guidance();
      ASSIGN_OR_RETURN(job->inputs["guidance"], TorchCall("guidance", [&] {
                         return torch::full({batch}, job->guidance, torch::kFloat32);
                       }));
    }
  }

  RETURN_IF_ERROR(snapshot());
  return job;
}

absl::Status DiffusionService::PreparePipelineGenerate(const pb::GenerateRequest& request,
                                                       GenerateJob* job) const {
  const DiffusionPipeline& pipeline = *job->instance->pipeline;
  const PipelineLimits limits = pipeline.limits();
  const std::string what =
      absl::StrCat("'", job->model_name, "' is a ", pipeline.class_name(),
                   " instance (give prompt or prompt_embeds + pooled_prompt_embeds, width, "
                   "height; `noise` for explicit initial noise)");
  if (!request.inputs().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("inputs: not used: ", what));
  }
  if (request.has_latents() || request.latent_shape_size() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        request.has_latents() ? "latents" : "latent_shape", ": not used: ", what));
  }
  PipelineRequest& r = job->pipeline_request;
  // Text prompts (the pipeline validates them against its encoders: FAILED_PRECONDITION without
  // text encoders, INVALID_ARGUMENT for prompt + prompt_embeds, counts, lengths).
  r.prompt.assign(request.prompt().begin(), request.prompt().end());
  r.prompt_2.assign(request.prompt_2().begin(), request.prompt_2().end());
  r.negative_prompt.assign(request.negative_prompt().begin(), request.negative_prompt().end());
  r.negative_prompt_2.assign(request.negative_prompt_2().begin(),
                             request.negative_prompt_2().end());
  if (request.max_sequence_length() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_sequence_length: must be >= 0 (0 = 512), got ", request.max_sequence_length()));
  }
  if (request.max_sequence_length() != 0) {
    r.max_sequence_length = request.max_sequence_length();
  }
  if (!request.has_prompt_embeds() && r.prompt.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_embeds: required", limits.accepts_text_prompt ? " (or prompt)" : "",
                     ": ", what));
  }
  if (request.has_prompt_embeds()) {
    ASSIGN_OR_RETURN(r.prompt_embeds, TensorFromProto(request.prompt_embeds(), "prompt_embeds"));
  }
  if (r.prompt_embeds.defined() && r.prompt_embeds.dim() >= 2 &&
      r.prompt_embeds.size(-2) > options_.max_text_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt_embeds: ", r.prompt_embeds.size(-2),
                                                   " text tokens exceed max_text_tokens ",
                                                   options_.max_text_tokens));
  }
  if (request.has_pooled_prompt_embeds()) {
    ASSIGN_OR_RETURN(r.pooled_prompt_embeds,
                     TensorFromProto(request.pooled_prompt_embeds(), "pooled_prompt_embeds"));
  } else if (limits.needs_pooled_prompt_embeds && r.prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("pooled_prompt_embeds: required: ", what));
  }
  if (request.has_negative_prompt_embeds()) {
    ASSIGN_OR_RETURN(r.negative_prompt_embeds,
                     TensorFromProto(request.negative_prompt_embeds(), "negative_prompt_embeds"));
    if (r.negative_prompt_embeds.dim() >= 2 &&
        r.negative_prompt_embeds.size(-2) > options_.max_text_tokens) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative_prompt_embeds: ", r.negative_prompt_embeds.size(-2),
                       " text tokens exceed max_text_tokens ", options_.max_text_tokens));
    }
  }
  if (request.has_negative_pooled_prompt_embeds()) {
    ASSIGN_OR_RETURN(r.negative_pooled_prompt_embeds,
                     TensorFromProto(request.negative_pooled_prompt_embeds(),
                                     "negative_pooled_prompt_embeds"));
  }
  if (!std::isfinite(request.true_cfg_scale()) || request.true_cfg_scale() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "true_cfg_scale: must be finite and >= 0 (0 = off), got ", request.true_cfg_scale()));
  }
  r.true_cfg_scale = request.true_cfg_scale() == 0 ? 1.0 : request.true_cfg_scale();
  for (const auto& [field, value] : {std::pair<const char*, int64_t>{"width", request.width()},
                                     {"height", request.height()}}) {
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, ": must be >= 0 (0 = the default ", limits.default_width, "x",
          limits.default_height, "), got ", value));
    }
  }
  job->width = request.width() == 0 ? limits.default_width : request.width();
  job->height = request.height() == 0 ? limits.default_height : request.height();
  r.width = job->width;
  r.height = job->height;
  if (request.num_images() < 0 || request.num_images() > options_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat("num_images: must be in [0, ",
                                                   options_.max_batch, "] (0 = 1), got ",
                                                   request.num_images()));
  }
  r.num_images_per_prompt = request.num_images() == 0 ? 1 : request.num_images();
  r.num_inference_steps = job->steps;
  job->guidance = request.guidance() == 0 ? options_.default_guidance : request.guidance();
  r.guidance_scale = job->guidance;
  if (request.has_noise()) {
    ASSIGN_OR_RETURN(r.latents, TensorFromProto(request.noise(), "noise"));
    job->seed = 0;
  } else {
    job->seed = request.seed();
    r.seed = static_cast<uint64_t>(request.seed());
  }
  // Image prompts: names, embeddings and scales here; PNG bytes are decoded by the worker.
  if (request.ip_adapters_size() > 0 && !limits.supports_ip_adapter) {
    return absl::UnimplementedError(absl::StrCat("ip_adapters: '", job->model_name, "' (",
                                                 pipeline.class_name(),
                                                 ") does not take IP-Adapters"));
  }
  job->max_ip_image_pixels = limits.options.max_image_side * limits.options.max_image_side;
  for (int i = 0; i < request.ip_adapters_size(); ++i) {
    const pb::IPAdapterInput& in = request.ip_adapters(i);
    const std::string field = absl::StrCat("ip_adapters[", i, "]");
    IPAdapterRequestInput ip;
    if (in.name().empty()) return absl::InvalidArgumentError(absl::StrCat(field, ".name: required"));
    ip.name = in.name();
    switch (in.input_case()) {
      case pb::IPAdapterInput::kImage:
        if (in.image().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(field, ".image: empty"));
        }
        job->ip_images.push_back({static_cast<size_t>(i), false, in.image()});
        break;
      case pb::IPAdapterInput::kImageEmbeds: {
        ASSIGN_OR_RETURN(ip.image_embeds,
                         TensorFromProto(in.image_embeds(), field + ".image_embeds"));
        break;
      }
      case pb::IPAdapterInput::INPUT_NOT_SET:
        break;  // allowed with a negative image (the positive side is then black, as diffusers)
    }
    switch (in.negative_case()) {
      case pb::IPAdapterInput::kNegativeImage:
        if (in.negative_image().empty()) {
          return absl::InvalidArgumentError(absl::StrCat(field, ".negative_image: empty"));
        }
        job->ip_images.push_back({static_cast<size_t>(i), true, in.negative_image()});
        break;
      case pb::IPAdapterInput::kNegativeImageEmbeds: {
        ASSIGN_OR_RETURN(ip.negative_image_embeds,
                         TensorFromProto(in.negative_image_embeds(),
                                         field + ".negative_image_embeds"));
        break;
      }
      case pb::IPAdapterInput::NEGATIVE_NOT_SET:
        break;
    }
    if (in.input_case() == pb::IPAdapterInput::INPUT_NOT_SET &&
        in.negative_case() == pb::IPAdapterInput::NEGATIVE_NOT_SET) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": set image or image_embeds (the image prompt)"));
    }
    if (in.scale_size() > 0) ip.scales.assign(in.scale().begin(), in.scale().end());
    for (int j = 0; j < in.scale_size(); ++j) {
      if (!std::isfinite(in.scale(j))) {
        return absl::InvalidArgumentError(
            absl::StrCat(field, ".scale[", j, "]: must be finite, got ", in.scale(j)));
      }
    }
    r.ip_adapters.push_back(std::move(ip));
  }
  // Step caching: checked here so that a bad config never queues.
  if (request.has_cache()) {
    const pb::CacheConfig& in = request.cache();
    BlockCacheConfig cache;
    cache.type = in.type();
    // A field of the other cache type is a mistake, not something to ignore silently.
    const bool taylor = cache.type == kTaylorSeerCacheType;
    struct Field {
      const char* name;
      bool set;
      bool taylor;
    };
    const Field fields[] = {{"threshold", in.has_threshold(), false},
                            {"cache_interval", in.has_cache_interval(), true},
                            {"disable_cache_before_step", in.has_disable_cache_before_step(), true},
                            {"disable_cache_after_step", in.has_disable_cache_after_step(), true},
                            {"max_order", in.has_max_order(), true},
                            {"taylor_factors_dtype", in.has_taylor_factors_dtype(), true},
                            {"use_lite_mode", in.has_use_lite_mode(), true}};
    if (taylor || cache.type == kFirstBlockCacheType) {
      for (const Field& f : fields) {
        if (f.set && f.taylor != taylor) {
          return absl::InvalidArgumentError(absl::StrCat(
              "cache.", f.name, ": only for cache.type '",
              f.taylor ? kTaylorSeerCacheType : kFirstBlockCacheType, "', not '", cache.type, "'"));
        }
      }
    }
    if (in.has_threshold()) cache.threshold = in.threshold();
    if (in.has_cache_interval()) cache.cache_interval = in.cache_interval();
    if (in.has_disable_cache_before_step()) {
      cache.disable_cache_before_step = in.disable_cache_before_step();
    }
    if (in.has_disable_cache_after_step()) {
      cache.disable_cache_after_step = in.disable_cache_after_step();
    }
    if (in.has_max_order()) cache.max_order = in.max_order();
    if (in.has_taylor_factors_dtype()) cache.taylor_factors_dtype = in.taylor_factors_dtype();
    if (in.has_use_lite_mode()) cache.use_lite_mode = in.use_lite_mode();
    RETURN_IF_ERROR(ValidateBlockCacheConfig(cache, limits.cache_types));
    r.cache = cache;
  }
  switch (request.output()) {
    case pb::GenerateRequest::OUTPUT_DEFAULT:
      job->want_png = limits.can_decode;
      job->want_latents = request.return_latents() || !limits.can_decode;
      break;
    case pb::GenerateRequest::OUTPUT_PNG:
      job->want_png = true;
      job->want_latents = request.return_latents();
      break;
    case pb::GenerateRequest::OUTPUT_LATENTS:
      job->want_latents = true;
      break;
    case pb::GenerateRequest::OUTPUT_PNG_AND_LATENTS:
      job->want_png = job->want_latents = true;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("output: unknown value ", static_cast<int>(request.output())));
  }
  if (job->want_png && !limits.can_decode) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output: '", job->model_name, "' has no vae component, so it cannot make images; "
        "request OUTPUT_LATENTS"));
  }
  r.decode = r.png = job->want_png;
  return absl::OkStatus();
}

void DiffusionService::RunGenerate(GenerateJob& job, GenerateReactor* reactor,
                                   const Scheduler& scheduler) {
  const auto started = SteadyClock::now();
  const double queue_seconds = std::chrono::duration<double>(started - job.arrived).count();
  if (metrics_ != nullptr) metrics_->ObserveQueueWait(job.model_name, queue_seconds);
  auto run = [&]() -> absl::Status {
    const ModelInstance& inst = *job.instance;
    const ModelOptions& mo = inst.model().options();
    if (!mo.device.is_cpu()) {
      // Wire tensors arrive on the CPU; the model's dtype rules stay the model's business.
      for (auto& entry : job.inputs) {
        torch::Tensor& t = entry.second;  // (a structured binding cannot be captured in C++17)
        ASSIGN_OR_RETURN(t, TorchCall(absl::StrCat("moving inputs['", entry.first, "'] to ",
                                                   mo.device.str()),
                                      [&] { return t.to(mo.device); }));
      }
    }
    auto last = started;
    auto on_step = [&](int step, int total) -> absl::Status {
      if (step > 0) {
        const auto now = SteadyClock::now();
        if (metrics_ != nullptr) {
          metrics_->ObserveDenoiseStep(job.model_name,
                                       std::chrono::duration<double>(now - last).count());
        }
        last = now;
        pb::GenerateResponse progress;
        progress.mutable_progress()->set_step(step);
        progress.mutable_progress()->set_total_steps(total);
        progress.mutable_progress()->set_elapsed_seconds(SecondsSince(started));
        reactor->Send(std::move(progress));
      }
      if (std::chrono::system_clock::now() >= job.deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("deadline exceeded after step ", step, " of ", total));
      }
      if (reactor->cancelled()) {
        return absl::CancelledError(
            absl::StrCat("the call was cancelled after step ", step, " of ", total));
      }
      if (scheduler.aborting()) {
        return absl::UnavailableError(absl::StrCat(
            "the server shut down during the request (after step ", step, " of ", total, ")"));
      }
      return absl::OkStatus();
    };
    pb::GenerateResponse message;
    pb::GenerateResult* result = message.mutable_result();
    if (inst.pipeline != nullptr) {
      PipelineRequest request = job.pipeline_request;
      request.adapters = job.stack;
      for (const GenerateJob::IPImage& image : job.ip_images) {
        const std::string field = absl::StrCat("ip_adapters[", image.index, "].",
                                               image.negative ? "negative_image" : "image");
        absl::StatusOr<torch::Tensor> rgb = DecodeImageToRgb(image.bytes, job.max_ip_image_pixels);
        if (!rgb.ok()) return Annotate(rgb.status(), field);
        IPAdapterRequestInput& ip = request.ip_adapters[image.index];
        (image.negative ? ip.negative_image : ip.image) = *std::move(rgb);
      }
      ASSIGN_OR_RETURN(PipelineResult out, inst.pipeline->Generate(request, on_step));
      if (job.want_latents) {
        ASSIGN_OR_RETURN(torch::Tensor cpu, TorchCall("copying the latents to the CPU", [&] {
                           return out.latents.to(torch::kCPU).contiguous();
                         }));
        RETURN_IF_ERROR(TensorToProto(cpu, result->mutable_latents()));
      }
      for (std::string& png : out.png) result->add_images(std::move(png));
      if (result->images_size() > 0) result->set_png(result->images(0));
      result->set_seed(out.seed.has_value() ? static_cast<int64_t>(*out.seed) : 0);
      result->set_steps(out.steps);
      result->set_guidance(out.guidance_scale);
      result->set_guidance_applied(out.guidance_applied);
      result->set_true_cfg_applied(out.true_cfg_applied);
      result->set_width(job.width);
      result->set_height(job.height);
      result->set_decode_seconds(out.decode_seconds);
      result->set_encode_seconds(out.encode_seconds);
      result->set_image_encode_seconds(out.image_encode_seconds);
      result->set_cache_skipped_steps(out.cache_skipped_steps);
      result->set_cache_computed_steps(out.cache_computed_steps);
      for (const IPAdapterRequestInput& ip : request.ip_adapters) {
        pb::AppliedIPAdapter* a = result->add_ip_adapters();
        a->set_name(ip.name);
        for (double scale : ip.scales) a->add_scale(scale);
      }
      if (metrics_ != nullptr) {
        metrics_->ObservePromptEncoding(job.model_name, out.prompt_cache_hits,
                                        out.prompt_cache_misses, out.encode_seconds);
      }
      for (const PipelineResult::PromptTruncation& t : out.truncated_prompts) {
        pb::TruncatedPrompt* p = result->add_truncated_prompts();
        p->set_field(t.field);
        p->set_index(t.index);
        p->set_tokenizer(t.component);
        p->set_tokens(t.tokens);
        p->set_max_length(t.max_length);
      }
      for (const std::string& w : out.warnings) result->add_warnings(w);
      for (int64_t d : out.latents.sizes()) result->add_latent_shape(d);
    } else {
      torch::Tensor latents = job.latents;
      if (!latents.defined()) {
        ASSIGN_OR_RETURN(latents, SeededNoise(job.latent_shape, static_cast<uint64_t>(job.seed),
                                              mo.dtype, mo.device));
      }
      ASSIGN_OR_RETURN(torch::Tensor out,
                       DenoiseFlowMatchEuler(*inst.host, job.inputs, latents, job.steps,
                                             job.stack.get(), on_step));
      RETURN_IF_ERROR(TensorToProto(out, result->mutable_latents()));
      result->set_seed(job.seed);
      result->set_steps(job.steps);
      result->set_guidance(job.guidance);
      result->set_guidance_applied(job.inputs.count("guidance") > 0);
      for (int64_t d : job.latent_shape) result->add_latent_shape(d);
    }
    result->set_model(job.model_name);
    result->set_model_sha256(inst.sha256);
    for (const AdapterStack::Use& use : job.stack->adapters) {
      pb::AppliedAdapter* a = result->add_adapters();
      a->set_name(use.adapter->name);
      a->set_weight(use.weight);
      a->set_sha256(use.adapter->sha256);
    }
    result->set_seconds(SecondsSince(started));
    result->set_queue_seconds(queue_seconds);
    reactor->Send(std::move(message));
    return absl::OkStatus();
  };
  // An exception that escaped a LibTorch call outside TorchCall (e.g. the memory budget refusing
  // an allocation) fails this request, not the worker thread.
  absl::Status status;
  if (absl::Status thrown = TorchCallVoid("Generate", [&] { status = run(); }); !thrown.ok()) {
    status = thrown;
  }
  // Release the snapshots before reporting completion, so an unloaded instance or adapter is
  // freed as soon as the last request using it has finished.
  job.stack.reset();
  job.instance.reset();
  job.inputs.clear();
  job.latents = torch::Tensor();
  job.pipeline_request = PipelineRequest();
  job.ip_images.clear();
  reactor->Complete(status);
}

grpc::ServerWriteReactor<pb::GenerateResponse>* DiffusionService::Generate(
    grpc::CallbackServerContext* ctx, const pb::GenerateRequest* request) {
  auto* reactor = new GenerateReactor(std::make_unique<CallLog>(metrics_, "Generate", *ctx));
  if (draining_.load()) {
    reactor->Complete(Draining());
    return reactor;
  }
  if (adapter_sync_ != nullptr && request->adapters_size() > 0) {
    // Adapters this replica does not hold come from the shared store first (file I/O: on the
    // loader scheduler, never here). Errors resolving the model are left to PrepareGenerate.
    absl::StatusOr<std::string> model = ResolveModelName(request->model(), "model");
    absl::StatusOr<InstancePtr> instance =
        model.ok() ? models_->Get(*model) : absl::StatusOr<InstancePtr>(model.status());
    if (instance.ok()) {
      std::vector<std::string> names;
      for (const pb::AdapterWeight& a : request->adapters()) names.push_back(a.name());
      std::vector<std::string> missing = AdapterSync::Missing(**instance, names);
      if (!missing.empty()) {
        const InstancePtr inst = *instance;
        const absl::Status submitted = store_loader_->Submit(
            [this, ctx, request, reactor, inst, missing, names] {
              if (metrics_ != nullptr) {
                for (size_t i = 0; i < missing.size(); ++i) {
                  metrics_->AdapterLookup(inst->name, false);
                }
              }
              const absl::Status loaded = adapter_sync_->EnsureLoaded(inst, missing);
              if (!loaded.ok()) {
                reactor->log()->set_model(inst->name);
                reactor->log()->mark_model_known();
                reactor->log()->set_adapters(names);
                reactor->Complete(Annotate(loaded, "adapters"));
                return;
              }
              StartGenerate(ctx, request, reactor, static_cast<int>(missing.size()));
            },
            [reactor](const absl::Status& why) { reactor->Complete(why); });
        if (!submitted.ok()) reactor->Complete(submitted);
        return reactor;
      }
    }
  }
  StartGenerate(ctx, request, reactor, /*store_loaded=*/0);
  return reactor;
}

void DiffusionService::StartGenerate(grpc::CallbackServerContext* ctx,
                                     const pb::GenerateRequest* request, GenerateReactor* reactor,
                                     int store_loaded) {
  absl::StatusOr<std::shared_ptr<GenerateJob>> job =
      PrepareGenerate(*request, reactor->log(), store_loaded);
  if (!job.ok()) {
    reactor->Complete(job.status());
    return;
  }
  (*job)->deadline = ctx->deadline();
  absl::StatusOr<Scheduler*> scheduler = SchedulerFor((*job)->instance->device);
  if (!scheduler.ok()) {
    reactor->Complete(scheduler.status());
    return;
  }
  std::shared_ptr<GenerateJob> shared = *std::move(job);
  Scheduler* s = *scheduler;
  const absl::Status submitted =
      s->Submit([this, shared, reactor, s] { RunGenerate(*shared, reactor, *s); },
                [reactor](const absl::Status& why) { reactor->Complete(why); });
  if (!submitted.ok()) reactor->Complete(submitted);
}

}  // namespace ds::server
