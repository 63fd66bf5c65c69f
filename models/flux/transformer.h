// FluxTransformer2DModel (diffusers) in LibTorch.
//
// Every parameter is registered under its diffusers name (transformer_blocks.0.attn.to_q.weight,
// ...), so a diffusers state dict loads with ds::LoadStateDict and no renaming. The forward pass
// follows diffusers' FluxTransformer2DModel.forward (main at 58eb52c), including its
// mixed-precision rules: timestep/guidance ×1000 in the model dtype, the timestep sinusoid in
// float32, RoPE frequencies in float64 and its rotation in float32, RMSNorm normalized in float32
// then scaled in the model dtype, float16 activations clipped to ±65504 after every block.
//
// Weights are created directly in the requested dtype and device, zero-filled (RMSNorm scales 1),
// with no float32 initialization pass; load a state dict (or call InitRandomWeights) before
// running.
//
// Thread-safety: forward() is const and may run concurrently from many threads; it only reads the
// parameters. Changing parameters (loading, LoRA fusing) needs exclusive access. The module keeps
// no tensors derived from its parameters, so in-place weight updates take effect on the next
// forward.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "handlers/block_cache.h"
#include "handlers/group_offloading.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "models/flux/config.h"
#include "models/flux/ip_adapter.h"

namespace ds::flux {

// Tensors captured during a forward pass (copies, in the model dtype), keyed like the golden
// fixtures' "intermediate/<key>" tensors:
//   x_embedder, context_embedder, time_text_embed, pos_embed.0 / pos_embed.1 (RoPE cos / sin,
//   [S_txt + S_img, head_dim], float32),
//   transformer_blocks.<i>.norm1.0 (modulated image tokens), norm1.1..4 (gate_msa, shift_mlp,
//   scale_mlp, gate_mlp), the same for norm1_context, .attn.0 / .attn.1 (image / text attention
//   outputs after to_out.0 / to_add_out), .0 / .1 (text / image block outputs),
//   single_transformer_blocks.<i>.norm.0 / norm.1 (modulated joint tokens, gate), .attn (attention
//   output before proj_out), .0 / .1 (text / image block outputs), norm_out, proj_out.
// With a FirstBlockCache state (FluxInputs::cache) also cache.0 / cache.1: the text / image streams
// after the blocks (on a skipped forward: the head block's outputs plus the cached tail
// residuals; the skipped blocks then capture nothing).
using Intermediates = std::map<std::string, torch::Tensor>;

// ---------------------------------------------------------------------------------------------
// Building blocks. Each takes the TensorOptions (dtype, device) its parameters are created with.

// y = x Wᵀ + b, with torch.nn.Linear's parameter names and shapes (weight [out, in], bias [out]).
struct LinearOptions {
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool bias = true;
  torch::TensorOptions tensor_options;
};
class LinearImpl : public torch::nn::Module {
 public:
  explicit LinearImpl(const LinearOptions& options);
  torch::Tensor weight;
  torch::Tensor bias;  // undefined without bias
  // The module's name in the model ("transformer_blocks.0.attn.to_q"), set by the model once it is
  // built; the key under which a LoraContext holds this module's deltas and overlays.
  std::string path;
  // 8-bit float storage (handlers/layerwise_casting.h): `weight` holds uint8 codes of
  // `weight_format` and this is its float32 [out_features] scale (the buffer "weight_scale");
  // undefined otherwise. Set by FluxTransformer::Create.
  torch::Tensor weight_scale;
  ds::Float8Format weight_format = ds::Float8Format::kE4M3FN;
};
TORCH_MODULE(Linear);

// RMSNorm over the last dimension with a learned scale (`weight` [dim]); eps 1e-6 in Flux.
struct RMSNormOptions {
  int64_t dim = 0;
  double eps = 1e-6;
  torch::TensorOptions tensor_options;
};
class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(const RMSNormOptions& options);
  torch::Tensor weight;
  double eps;
  std::string path;  // as LinearImpl::path
};
TORCH_MODULE(RMSNorm);

// Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0): the sinusoidal timestep
// embedding [cos(t·f_j), sin(t·f_j)], f_j = exp(-ln(10000)·j/128), computed in float32. No
// parameters.
class TimestepsImpl : public torch::nn::Module {
 public:
  static constexpr int64_t kChannels = 256;
  // t [B] (any floating dtype) -> [B, 256] float32.
  torch::Tensor forward(const torch::Tensor& t) const;
};
TORCH_MODULE(Timesteps);

// FluxPosEmbed(theta=10000, axes_dim): rotary position embedding of id columns. No parameters.
struct FluxPosEmbedOptions {
  double theta = 10000;
  std::vector<int64_t> axes_dim;  // one even dim per id column; they sum to the head dim
};
class FluxPosEmbedImpl : public torch::nn::Module {
 public:
  explicit FluxPosEmbedImpl(FluxPosEmbedOptions options) : options(std::move(options)) {}
  // ids [S, len(axes_dim)] (any real dtype, used as float32) -> (cos, sin), each
  // [S, sum(axes_dim) / 2] float32: for axis i, positions times the float64 frequencies
  // theta^(-2j/d_i), cos/sin cast to float32. One value per rotated pair; diffusers returns them
  // repeat-interleaved to the full head dim.
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& ids) const;
  FluxPosEmbedOptions options;
};
TORCH_MODULE(FluxPosEmbed);

// Linear → SiLU → Linear (diffusers' TimestepEmbedding and, with act_fn="silu",
// PixArtAlphaTextProjection): linear_1, linear_2.
struct EmbedderOptions {
  int64_t in_features = 0;
  int64_t dim = 0;
  torch::TensorOptions tensor_options;
};
class EmbedderImpl : public torch::nn::Module {
 public:
  explicit EmbedderImpl(const EmbedderOptions& options);
  Linear linear_1{nullptr};
  Linear linear_2{nullptr};
};
TORCH_MODULE(Embedder);

// CombinedTimestep[Guidance]TextProjEmbeddings: time_proj (no parameters), timestep_embedder,
// guidance_embedder (only with guidance_embeds), text_embedder.
struct TimeTextEmbedOptions {
  int64_t dim = 0;
  int64_t pooled_projection_dim = 0;
  bool guidance_embeds = false;
  torch::TensorOptions tensor_options;
};
class TimeTextEmbedImpl : public torch::nn::Module {
 public:
  explicit TimeTextEmbedImpl(const TimeTextEmbedOptions& options);
  Timesteps time_proj{nullptr};
  Embedder timestep_embedder{nullptr};
  Embedder guidance_embedder{nullptr};  // null without guidance_embeds
  Embedder text_embedder{nullptr};
};
TORCH_MODULE(TimeTextEmbed);

// AdaLayerNormZero (chunks 6), AdaLayerNormZeroSingle (3) and AdaLayerNormContinuous (2): the
// modulation SiLU → linear (dim → chunks·dim) and `norm`, a LayerNorm without parameters
// (eps 1e-6) that the modulation scales and shifts.
struct AdaNormOptions {
  int64_t dim = 0;
  int64_t chunks = 0;
  torch::TensorOptions tensor_options;
};
class AdaNormImpl : public torch::nn::Module {
 public:
  explicit AdaNormImpl(const AdaNormOptions& options);
  Linear linear{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(AdaNorm);

// FeedForward(dim, activation_fn="gelu-approximate"): net.0.proj (dim → 4·dim), tanh-GELU,
// net.1 (dropout, no parameters), net.2 (4·dim → dim).
struct FeedForwardOptions {
  int64_t dim = 0;
  int64_t hidden = 0;
  torch::TensorOptions tensor_options;
};
class GeluProjImpl : public torch::nn::Module {
 public:
  explicit GeluProjImpl(const LinearOptions& options);
  Linear proj{nullptr};
};
TORCH_MODULE(GeluProj);
class FeedForwardImpl : public torch::nn::Module {
 public:
  explicit FeedForwardImpl(const FeedForwardOptions& options);
  torch::nn::ModuleList net{nullptr};
  GeluProj net_0{nullptr};  // == net[0]
  Linear net_2{nullptr};    // == net[2]
};
TORCH_MODULE(FeedForward);

// FluxAttention: to_q/k/v, norm_q/k; with `joint` also the text-stream projections add_q/k/v_proj,
// norm_added_q/k and the output projections to_out.0 (image) and to_add_out (text).
struct FluxAttentionOptions {
  int64_t dim = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  bool joint = false;
  torch::TensorOptions tensor_options;
};
class FluxAttentionImpl : public torch::nn::Module {
 public:
  explicit FluxAttentionImpl(const FluxAttentionOptions& options);
  int64_t heads;
  int64_t head_dim;
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};
  // Only when joint:
  Linear add_q_proj{nullptr}, add_k_proj{nullptr}, add_v_proj{nullptr};
  RMSNorm norm_added_q{nullptr}, norm_added_k{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [Linear, dropout]
  Linear to_out_0{nullptr};               // == to_out[0]
  Linear to_add_out{nullptr};
};
TORCH_MODULE(FluxAttention);

struct FluxBlockOptions {
  int64_t dim = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  torch::TensorOptions tensor_options;
};

// FluxTransformerBlock (double stream): norm1, norm1_context, attn, norm2 / norm2_context
// (LayerNorms without parameters), ff, ff_context.
class FluxTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit FluxTransformerBlockImpl(const FluxBlockOptions& options);
  AdaNorm norm1{nullptr}, norm1_context{nullptr};
  FluxAttention attn{nullptr};
  torch::nn::LayerNorm norm2{nullptr}, norm2_context{nullptr};
  FeedForward ff{nullptr}, ff_context{nullptr};
};
TORCH_MODULE(FluxTransformerBlock);

// FluxSingleTransformerBlock: norm, proj_mlp (dim → 4·dim), attn (no output projection),
// proj_out (5·dim → dim).
class FluxSingleTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit FluxSingleTransformerBlockImpl(const FluxBlockOptions& options);
  AdaNorm norm{nullptr};
  Linear proj_mlp{nullptr};
  FluxAttention attn{nullptr};
  Linear proj_out{nullptr};
};
TORCH_MODULE(FluxSingleTransformerBlock);

// ---------------------------------------------------------------------------------------------

struct FluxTransformer2DModelOptions {
  FluxConfig config;                     // must be valid (FluxConfig::Validate)
  torch::Dtype dtype = torch::kFloat32;  // weights and compute: float32, bfloat16 or float16
  torch::Device device = torch::kCPU;    // CPU or CUDA
};

// The forward inputs, as in diffusers' forward(). Floating inputs of any float dtype and device are
// converted to the model's; ids may be any real dtype (used as float32, as diffusers does).
struct FluxInputs {
  torch::Tensor hidden_states;          // [B, S_img, in_channels] packed latents
  torch::Tensor encoder_hidden_states;  // [B or 1, S_txt, joint_attention_dim]
  torch::Tensor pooled_projections;     // [B or 1, pooled_projection_dim]
  torch::Tensor timestep;               // [B or 1], sigma in [0, 1] (the model multiplies by 1000)
  torch::Tensor img_ids;                // [S_img, len(axes_dims_rope)] (3-D: [0] is used)
  torch::Tensor txt_ids;                // [S_txt, len(axes_dims_rope)] (3-D: [0] is used)
  torch::Tensor guidance;               // [B or 1]; defined iff config.guidance_embeds
  // Optional IP-Adapter conditioning (ip_adapter.h), not owned; must outlive the forward and be
  // valid for it (ValidateIPAdapterConditioning). nullptr, or no non-zero scale: the plain forward.
  const FluxIPAdapterConditioning* ip_adapter = nullptr;
  // Optional step-cache state of the request's guidance branch (handlers/block_cache.h), not
  // owned; the forward reads and updates it, so one state must not be used by two forwards at
  // once. nullptr: the plain forward, bit for bit.
  //  * FirstBlockCacheState: the head block is the first block (transformer_blocks.0, or
  //    single_transformer_blocks.0 without double blocks); when the state says skip, the cached
  //    tail residuals are added to its hidden_states and encoder_hidden_states outputs instead of
  //    running the other blocks. A model with a single block ignores it.
  //  * TaylorSeerState (each forward is one step: BeginForward): as diffusers'
  //    apply_taylorseer_cache with its default identifiers, every block's attention module is
  //    hooked (slot = block index in forward order, transformer_blocks then
  //    single_transformer_blocks): a double block's image and text attention outputs (after
  //    to_out.0 / to_add_out) plus, with an active IP-Adapter, its term; a single block's attention
  //    output (before proj_out). On a predicted step they are the state's prediction and the
  //    projections and attention are not computed; everything else (modulation, MLPs, norms) runs.
  //    With use_lite_mode (diffusers' lite: blocks inactive, proj_out hooked), the model output
  //    itself is hooked (slot 0) and a predicted step returns the prediction without running any
  //    layer. Captured intermediates on a predicted step hold the predicted tensors.
  ds::BlockCacheState* cache = nullptr;
  // Group offloading of the model (handlers/group_offloading.h), not owned; nullptr = every weight
  // resident. The forward enters block i (transformer_blocks.0.. then single_transformer_blocks..,
  // the order GroupOffloader numbers them) before running it. FluxTransformer's forwards set it to
  // the model's DiffusionModel::group_offloader().
  const ds::GroupOffloader* offload = nullptr;
};

class FluxTransformer2DModelImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for an invalid config (FluxConfig::Validate) or an unsupported dtype.
  explicit FluxTransformer2DModelImpl(const FluxTransformer2DModelOptions& options);

  // Runs the model under torch::InferenceMode and returns [B, S_img, patch²·out_channels] in the
  // model dtype, where B is the largest batch among the inputs (batch-1 inputs broadcast). If
  // `intermediates` is non-null it receives the tensors listed at Intermediates. Inputs must have
  // the documented shapes (FluxTransformer::Forward validates them and returns statuses); LibTorch
  // throws c10::Error otherwise.
  //
  // With a non-null `lora` every linear module adds the context's deltas (computed in the same
  // precision as the base product) and every parameter with an overlay uses it (see
  // handlers/lora_context.h); hidden_states may then be as wide as lora->InputWidth("x_embedder").
  //
  // On CPU, float16 (LibTorch 1.13 has almost no float16 CPU kernels) and bfloat16 unless the CPU
  // has AVX512-BF16 or AMX (elsewhere LibTorch's bfloat16 matrix products are ~50× slower than
  // float32 ones) are emulated: activations are computed in float32 and rounded to the model dtype
  // after every operation, which is what native kernels (float32 arithmetic, low-precision
  // results) produce up to summation order. Weights stay stored in the model dtype.
  torch::Tensor forward(const FluxInputs& inputs, Intermediates* intermediates = nullptr,
                        const ds::LoraContext* lora = nullptr) const;

  // The width of hidden_states the model accepts: x_embedder's weight width (in_channels, or wider
  // while an input-widening LoRA is fused).
  int64_t input_width() const { return x_embedder->weight.size(1); }

  const FluxConfig& config() const { return options_.config; }
  torch::Dtype dtype() const { return options_.dtype; }
  torch::Device device() const { return options_.device; }

  // Differentiable mode (training, tools/train): forward() then runs outside InferenceMode with
  // autograd-supported, out-of-place operations only (attention as matmul/softmax/matmul, no
  // reused buffers), so gradients reach the parameters, the inputs and the tensors of a LoRA
  // context; the result equals the default path's up to rounding. Setting it also sets every
  // parameter's requires_grad to `on`. float32 models only (CPU 16-bit emulation is not
  // differentiable): forward() throws c10::Error otherwise. Step caches and IP-Adapters are not
  // part of training. Off by default. Not thread-safe: set it before running, never while
  // forwards run.
  void set_differentiable(bool on);
  bool differentiable() const { return differentiable_; }

  FluxPosEmbed pos_embed{nullptr};
  TimeTextEmbed time_text_embed{nullptr};
  Linear context_embedder{nullptr};
  Linear x_embedder{nullptr};
  torch::nn::ModuleList transformer_blocks{nullptr};
  torch::nn::ModuleList single_transformer_blocks{nullptr};
  AdaNorm norm_out{nullptr};
  Linear proj_out{nullptr};

  // Typed views of the two ModuleLists (same module objects).
  std::vector<FluxTransformerBlock> blocks;
  std::vector<FluxSingleTransformerBlock> single_blocks;

 private:
  FluxTransformer2DModelOptions options_;
  bool differentiable_ = false;
};
TORCH_MODULE(FluxTransformer2DModel);

// ds::InitRandomWeights (handlers/state_dict.h), also reachable as ds::flux::InitRandomWeights.
using ::ds::InitRandomWeights;

// ---------------------------------------------------------------------------------------------

// The ds::DiffusionModel for Flux: FluxTransformer2DModel plus validation of named inputs.
// Inputs: hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids
// (required) and guidance (required when the config has guidance_embeds, rejected otherwise).
class FluxTransformer final : public ds::DiffusionModel {
 public:
  // INVALID_ARGUMENT for an invalid config (naming the field), an unsupported dtype
  // (float32/bfloat16/float16 only) or device type (cpu/cuda only); UNIMPLEMENTED for CUDA when
  // LibTorch or the machine has none; INTERNAL if LibTorch fails (e.g. out of memory).
  //
  // Layerwise casting: with options.storage_dtype the linears handlers/layerwise_casting.h selects
  // under SkipLayerwiseCastingPatterns() (or options.layerwise_casting_skip_patterns) are stored
  // in that dtype (INVALID_ARGUMENT for one not narrower than options.dtype or a bad pattern) and
  // the forward upcasts each to the compute dtype only for its own product, so the output equals
  // the compute-dtype model's with those weights rounded to the storage dtype, bit for bit (with
  // 8-bit storage, options.storage_dtype torch::kByte: with each weight replaced by its decoded
  // codes times its row scale, ds::DequantizeFloat8). LoRA
  // deltas and overlays stay in the compute dtype; a fused LoRA (LoraHost::Fuse) is computed in
  // float32 from the stored weights and rounded once to the storage dtype.
  static absl::StatusOr<std::unique_ptr<FluxTransformer>> Create(const nlohmann::json& config,
                                                                 const ds::ModelOptions& options);

  const std::string& class_name() const override;
  const nlohmann::json& config() const override { return config_json_; }
  const ds::ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *model_; }
  const torch::nn::Module& module() const override { return *model_; }
  std::vector<std::string> required_inputs() const override;
  std::vector<std::string> optional_inputs() const override;

  // INVALID_ARGUMENT naming the input for an unknown or missing name, an undefined tensor, a
  // non-floating tensor (ids may also be integral), or a shape that does not match the config or
  // the other inputs; for guidance given without guidance_embeds or missing with it. INTERNAL if
  // LibTorch fails.
  using ds::DiffusionModel::Forward;
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const ds::LoraContext* lora) const override;
  // Same, also capturing intermediates (see Intermediates) when `intermediates` is non-null.
  absl::StatusOr<torch::Tensor> ForwardWithIntermediates(
      const TensorMap& inputs, Intermediates* intermediates,
      const ds::LoraContext* lora = nullptr) const;

  // The forward with IP-Adapter conditioning (ip_adapter.h; nullptr = Forward). The
  // conditioning is per request: the model is not changed, so concurrent forwards may use
  // different adapters, images and scales. A conditioning without a non-zero scale gives the plain
  // forward bit for bit. With `intermediates`, also captures ip_hidden_states.<i> (each adapter's
  // projected image tokens) and transformer_blocks.<n>.attn.ip_attn_output (the scaled sum added to
  // block n's image stream). Errors as Forward(), plus ValidateIPAdapterConditioning's.
  absl::StatusOr<torch::Tensor> ForwardWithIPAdapter(const TensorMap& inputs,
                                                     const ds::LoraContext* lora,
                                                     const FluxIPAdapterConditioning* ip_adapter,
                                                     Intermediates* intermediates = nullptr) const;

  // Per-request extras of one forward, none owned (each must outlive the call; nullptr = none).
  struct ForwardExtras {
    const FluxIPAdapterConditioning* ip_adapter = nullptr;  // as ForwardWithIPAdapter
    ds::BlockCacheState* cache = nullptr;                   // as FluxInputs::cache
    Intermediates* intermediates = nullptr;
  };
  // The forward with any of the extras (the request's IP-Adapter conditioning and its branch's
  // step-cache state). With none it is Forward() bit for bit. Errors as ForwardWithIPAdapter.
  absl::StatusOr<torch::Tensor> ForwardWithExtras(const TensorMap& inputs,
                                                  const ds::LoraContext* lora,
                                                  const ForwardExtras& extras) const;

  // Validates named inputs and returns them as FluxInputs (tensors unchanged; 3-D ids reduced to
  // [0]). hidden_states must be input_width() wide, or as wide as `lora` widens x_embedder.
  // Errors as for Forward().
  absl::StatusOr<FluxInputs> PrepareInputs(const TensorMap& inputs,
                                           const ds::LoraContext* lora = nullptr) const;

  const FluxConfig& flux_config() const { return model_->config(); }
  FluxTransformer2DModel& transformer() { return model_; }
  const FluxTransformer2DModel& transformer() const { return model_; }

 private:
  FluxTransformer(nlohmann::json config_json, ds::ModelOptions options,
                  FluxTransformer2DModel model);
  nlohmann::json config_json_;
  ds::ModelOptions options_;
  FluxTransformer2DModel model_;
};

// diffusers' FluxTransformer2DModel._skip_layerwise_casting_patterns ("pos_embed", "norm"): with
// diffusers' defaults they keep the AdaLayerNorm modulation linears (norm1.linear, norm.linear,
// norm_out.linear) and the final proj_out in the compute dtype under layerwise casting. The spec
// declares them from here (spec.cc).
const std::vector<std::string>& SkipLayerwiseCastingPatterns();

// The Flux transformer's cache wiring (ModelSpec::cache): FirstBlockCache, its blocks returning
// hidden_states and encoder_hidden_states (diffusers' TransformerBlockRegistry for
// FluxTransformerBlock / FluxSingleTransformerBlock), and TaylorSeer (see FluxInputs::cache).
const ds::CacheHandler& FluxCacheHandler();

// The registry-facing factory: FluxTransformer::Create as a ds::DiffusionModel.
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateFluxTransformer(
    const nlohmann::json& config, const ds::ModelOptions& options);

}  // namespace ds::flux
