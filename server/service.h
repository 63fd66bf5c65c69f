// DiffusionService: the gRPC edge of diffusion.v1.DiffusionService (callback API).
//
// Request path. Every RPC validates its request on the gRPC callback thread (precise
// INVALID_ARGUMENT naming the field) and never blocks it: cheap reads (ListModels, GetMetadata,
// ListLoRAs) answer inline; management calls (which read files) run on a small management
// scheduler; Generate takes its adapter snapshot and instance snapshot at once, then queues on the
// bounded scheduler of the instance's device (full: RESOURCE_EXHAUSTED at once) and streams
// progress events through a write reactor, then one result. Between denoising steps the worker
// checks client cancellation, the call's deadline and server shutdown, so it stops within one step.
//
// Security: management RPCs (LoadSingleFile, UnloadModel, LoadLoRA, UnloadLoRA, LoadIPAdapter,
// UnloadIPAdapter) pass AdminAuth with the call's "authorization" metadata first; server-side paths are confined to the configured
// roots (ConfinePath); inline LoRA bytes are capped and written to a private temporary file
// (mode 0600) that is removed after loading.
//
// Adapter store (optional AdapterSync, see adapter_store.h): LoadLoRA / UnloadLoRA also change the
// shared store before they answer (under the entry's lock, so the poller and on-demand loads of
// the same adapter wait); a Generate naming adapters its instance does not hold first loads them
// from the store on a small loader scheduler (never on the callback thread; single flight), then
// proceeds as usual; ListLoRAs / GetMetadata / ListModels also list the store's adapters.
//
// Every RPC is counted in Metrics (model, rpc, status code, duration) and logged with LogRpc.
// absl::Status is turned into grpc::Status only through ToGrpcStatus.
//
// Thread-safety: gRPC calls the methods concurrently; all state is internally synchronized. The
// service must outlive the grpc::Server it is registered with (destroy the server first).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "diffusion/v1/diffusion.grpc.pb.h"
#include "server/adapter_store.h"
#include "server/auth.h"
#include "server/model_manager.h"
#include "server/scheduler.h"
#include "server/server_options.h"

namespace ds::server {

class Metrics;

class DiffusionService final : public diffusion::v1::DiffusionService::CallbackService {
 public:
  // `metrics` and `adapter_sync` (no shared adapter store) may be null.
  DiffusionService(ServerOptions options, std::shared_ptr<ModelManager> models, AdminAuth auth,
                   std::shared_ptr<Metrics> metrics,
                   std::shared_ptr<AdapterSync> adapter_sync = nullptr);
  ~DiffusionService() override;

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const diffusion::v1::ListModelsRequest* request,
                                       diffusion::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* GetMetadata(grpc::CallbackServerContext* ctx,
                                        const diffusion::v1::GetMetadataRequest* request,
                                        diffusion::v1::GetMetadataResponse* response) override;
  grpc::ServerUnaryReactor* LoadSingleFile(
      grpc::CallbackServerContext* ctx, const diffusion::v1::LoadSingleFileRequest* request,
      diffusion::v1::LoadSingleFileResponse* response) override;
  grpc::ServerUnaryReactor* UnloadModel(grpc::CallbackServerContext* ctx,
                                        const diffusion::v1::UnloadModelRequest* request,
                                        diffusion::v1::UnloadModelResponse* response) override;
  grpc::ServerUnaryReactor* LoadLoRA(grpc::CallbackServerContext* ctx,
                                     const diffusion::v1::LoadLoRARequest* request,
                                     diffusion::v1::LoadLoRAResponse* response) override;
  grpc::ServerUnaryReactor* UnloadLoRA(grpc::CallbackServerContext* ctx,
                                       const diffusion::v1::UnloadLoRARequest* request,
                                       diffusion::v1::UnloadLoRAResponse* response) override;
  grpc::ServerUnaryReactor* ListLoRAs(grpc::CallbackServerContext* ctx,
                                      const diffusion::v1::ListLoRAsRequest* request,
                                      diffusion::v1::ListLoRAsResponse* response) override;
  grpc::ServerUnaryReactor* LoadIPAdapter(grpc::CallbackServerContext* ctx,
                                          const diffusion::v1::LoadIPAdapterRequest* request,
                                          diffusion::v1::LoadIPAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadIPAdapter(
      grpc::CallbackServerContext* ctx, const diffusion::v1::UnloadIPAdapterRequest* request,
      diffusion::v1::UnloadIPAdapterResponse* response) override;
  grpc::ServerWriteReactor<diffusion::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const diffusion::v1::GenerateRequest* request) override;

  // Shutdown, step 1: Generate and management calls arriving from now on are UNAVAILABLE;
  // running and queued ones continue. Idempotent.
  void BeginDrain();
  // Shutdown, step 2: drains every scheduler until `deadline`, then makes running generations
  // stop at their next step (UNAVAILABLE) and joins the workers. Idempotent; blocks.
  void ShutdownSchedulers(absl::Time deadline);

  // The instance name a request's `model` field means: itself when non-empty; for "" the
  // instance "default" when it exists, else the only instance; INVALID_ARGUMENT naming `field`
  // otherwise.
  absl::StatusOr<std::string> ResolveModelName(const std::string& requested,
                                               const std::string& field) const;

 private:
  class GenerateReactor;
  struct GenerateJob;
  class CallLog;

  absl::Status DoGetMetadata(const diffusion::v1::GetMetadataRequest& request,
                             diffusion::v1::GetMetadataResponse* response, CallLog* log) const;
  absl::Status DoLoadSingleFile(const diffusion::v1::LoadSingleFileRequest& request,
                                diffusion::v1::LoadSingleFileResponse* response);
  absl::Status DoLoadLoRA(const diffusion::v1::LoadLoRARequest& request,
                          diffusion::v1::LoadLoRAResponse* response, CallLog* log);
  absl::Status DoLoadIPAdapter(const diffusion::v1::LoadIPAdapterRequest& request,
                               diffusion::v1::LoadIPAdapterResponse* response, CallLog* log);
  // `store_loaded`: adapters of the request just loaded from the adapter store (counted as cache
  // misses, not hits).
  absl::StatusOr<std::shared_ptr<GenerateJob>> PrepareGenerate(
      const diffusion::v1::GenerateRequest& request, CallLog* log, int store_loaded = 0);
  // Generate after any adapter-store loads: prepares the job and queues it (or completes the
  // reactor with the error).
  void StartGenerate(grpc::CallbackServerContext* ctx,
                     const diffusion::v1::GenerateRequest* request, GenerateReactor* reactor,
                     int store_loaded);
  // The pipeline-instance part of PrepareGenerate: validates the image fields and fills
  // job->pipeline_request (INVALID_ARGUMENT naming the field; FAILED_PRECONDITION for PNG output
  // without a VAE). Size and embedding shapes are checked by the pipeline when the job runs.
  absl::Status PreparePipelineGenerate(const diffusion::v1::GenerateRequest& request,
                                       GenerateJob* job) const;
  void RunGenerate(GenerateJob& job, GenerateReactor* reactor, const Scheduler& scheduler);

  // Runs `work` (returning the call's status) for a management RPC: auth, drain check, then on
  // the management scheduler. Finishes the reactor and logs.
  template <typename Work>
  grpc::ServerUnaryReactor* Management(grpc::CallbackServerContext* ctx, const char* rpc,
                                       std::string model, Work work);

  absl::StatusOr<Scheduler*> SchedulerFor(const std::string& device);
  void UpdateAdapterMetrics(const std::string& model, const ModelInstance& instance) const;
  void FillInstance(const InstanceStatus& status, diffusion::v1::ModelInstance* out) const;
  void FillLimits(diffusion::v1::GenerateLimits* out) const;

  const ServerOptions options_;
  const std::shared_ptr<ModelManager> models_;
  const AdminAuth auth_;
  const std::shared_ptr<Metrics> metrics_;
  const std::shared_ptr<AdapterSync> adapter_sync_;
  std::atomic<bool> draining_{false};

  std::unique_ptr<Scheduler> management_;
  // Loads of adapters from the store for Generate (with an adapter store only).
  std::unique_ptr<Scheduler> store_loader_;
  mutable std::mutex schedulers_mu_;
  // device -> its generation scheduler, created on first use.
  std::map<std::string, std::unique_ptr<Scheduler>> schedulers_ ABSL_GUARDED_BY(schedulers_mu_);
  bool schedulers_closed_ ABSL_GUARDED_BY(schedulers_mu_) = false;
};

}  // namespace ds::server
