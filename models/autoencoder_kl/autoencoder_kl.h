// AutoencoderKL (diffusers) in LibTorch: the KL-regularized VAE of latent diffusion models (the
// FLUX.1 VAE is one configuration of it: 16 latent channels, no quant/post-quant conv).
//
// Every parameter is registered under its diffusers name
// (decoder.up_blocks.0.resnets.1.conv2.weight, decoder.mid_block.attentions.0.to_q.weight, ...), so
// a diffusers `vae/` folder loads with ds::LoadStateDict and no renaming. The numerics follow
// diffusers' AutoencoderKL / Encoder / Decoder (main at 58eb52c): GroupNorm eps 1e-6, SiLU,
// ResnetBlock2D with output_scale_factor 1 and a 1x1 conv_shortcut when the channel count changes,
// single-head self-attention over the H·W tokens in the mid blocks (scale 1/sqrt(C), softmax in
// float32, residual, rescale_output_factor 1), nearest ×2 upsampling then a 3x3 conv, downsampling
// by a stride-2 3x3 conv after zero padding (0, 1, 0, 1), DiagonalGaussianDistribution with logvar
// clamped to [-30, 20].
//
// Weights are created directly in the requested dtype and device (GroupNorm scales 1, everything
// else 0, or uninitialized under ScopedUninitializedParameters); load a state dict (or call
// InitRandomWeights) before running. float32, bfloat16 and float16 are supported; on CPU the two
// 16-bit types are emulated as in the Flux transformer (float32 arithmetic rounded to the model
// dtype after every operation; LibTorch 1.13 has almost no fast 16-bit CPU kernels), on CUDA they
// run natively with the softmax in float32.
//
// Thread-safety: decode()/encode() are const and may run concurrently from many threads; they only
// read the parameters. Loading weights and set_differentiable() need exclusive access.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
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
#include "handlers/image_decoder.h"
#include "handlers/model.h"
#include "handlers/safetensors.h"
#include "models/autoencoder_kl/config.h"

namespace ds::autoencoder_kl {

// Tensors captured during encode/decode (copies in the model dtype), keyed by the module whose
// forward output they are: decoder.conv_in, decoder.mid_block, decoder.up_blocks.<i>,
// decoder.conv_norm_out (before the activation), decoder.conv_out, post_quant_conv (when
// configured); likewise encoder.conv_in, encoder.down_blocks.<i>, encoder.mid_block,
// encoder.conv_norm_out, encoder.conv_out, quant_conv.
using Intermediates = std::map<std::string, torch::Tensor>;

// ---------------------------------------------------------------------------------------------
// Building blocks (parameters only; the forward math lives in autoencoder_kl.cc). Each takes the
// TensorOptions (dtype, device) its parameters are created with.

// torch.nn.Conv2d's parameters: weight [out, in, k, k], bias [out]; stride and padding.
struct Conv2dOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t kernel_size = 3;
  int64_t stride = 1;
  int64_t padding = 1;
  torch::TensorOptions tensor_options;
};
class Conv2dImpl : public torch::nn::Module {
 public:
  explicit Conv2dImpl(const Conv2dOptions& options);
  int64_t stride;
  int64_t padding;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(Conv2d);

// torch.nn.GroupNorm(groups, channels, eps, affine=True): weight (1) and bias (0) [channels].
struct GroupNormOptions {
  int64_t groups = 0;
  int64_t channels = 0;
  double eps = 1e-6;
  torch::TensorOptions tensor_options;
};
class GroupNormImpl : public torch::nn::Module {
 public:
  explicit GroupNormImpl(const GroupNormOptions& options);
  int64_t groups;
  double eps;
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(GroupNorm);

// torch.nn.Linear's parameters: weight [out, in], bias [out].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, const torch::TensorOptions& options);
  torch::Tensor weight;
  torch::Tensor bias;
};
TORCH_MODULE(Linear);

// ResnetBlock2D (no time embedding): norm1, conv1, norm2, conv2 and conv_shortcut (1x1) when
// in_channels != out_channels.
struct ResnetBlock2DOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t groups = 0;
  torch::TensorOptions tensor_options;
};
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);
  GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr};
  Conv2d conv_shortcut{nullptr};  // null when the channel count is unchanged
};
TORCH_MODULE(ResnetBlock2D);

// Attention as the VAE mid block builds it: one head of width `channels`, group_norm, to_q, to_k,
// to_v, to_out.0 (to_out.1 is a parameterless dropout).
struct AttentionOptions {
  int64_t channels = 0;
  int64_t groups = 0;
  torch::TensorOptions tensor_options;
};
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  GroupNorm group_norm{nullptr};
  Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // [Linear, Dropout]
  Linear to_out_0{nullptr};               // == to_out[0]
};
TORCH_MODULE(Attention);

// UNetMidBlock2D with one layer: resnets.0, attentions.0 (optional), resnets.1.
struct MidBlockOptions {
  int64_t channels = 0;
  int64_t groups = 0;
  bool attention = true;
  torch::TensorOptions tensor_options;
};
class UNetMidBlock2DImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlock2DImpl(const MidBlockOptions& options);
  torch::nn::ModuleList attentions{nullptr};  // empty without attention
  torch::nn::ModuleList resnets{nullptr};
  std::vector<ResnetBlock2D> resnet_list;  // typed views of `resnets`
  Attention attention{nullptr};            // == attentions[0], or null
};
TORCH_MODULE(UNetMidBlock2D);

// Downsample2D(use_conv=True, padding=0): pad (0, 1, 0, 1), then conv (3x3, stride 2).
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, const torch::TensorOptions& options);
  Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// Upsample2D(use_conv=True): nearest ×2, then conv (3x3).
class Upsample2DImpl : public torch::nn::Module {
 public:
  Upsample2DImpl(int64_t channels, const torch::TensorOptions& options);
  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

struct LevelBlockOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;
  int64_t num_layers = 0;
  int64_t groups = 0;
  bool resample = false;  // add the downsampler / upsampler
  torch::TensorOptions tensor_options;
};

// DownEncoderBlock2D: resnets, downsamplers.0 (not on the last level).
class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit DownEncoderBlock2DImpl(const LevelBlockOptions& options);
  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList downsamplers{nullptr};  // registered only with a downsampler
  std::vector<ResnetBlock2D> resnet_list;
  Downsample2D downsampler{nullptr};
};
TORCH_MODULE(DownEncoderBlock2D);

// UpDecoderBlock2D: resnets, upsamplers.0 (not on the last level).
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit UpDecoderBlock2DImpl(const LevelBlockOptions& options);
  torch::nn::ModuleList resnets{nullptr};
  torch::nn::ModuleList upsamplers{nullptr};  // registered only with an upsampler
  std::vector<ResnetBlock2D> resnet_list;
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

// Encoder (double_z): conv_in, down_blocks, mid_block, conv_norm_out, conv_out (2·latent
// channels: mean and logvar).
class EncoderImpl : public torch::nn::Module {
 public:
  EncoderImpl(const AutoencoderKLConfig& config, const torch::TensorOptions& options);
  Conv2d conv_in{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  std::vector<DownEncoderBlock2D> blocks;
  UNetMidBlock2D mid_block{nullptr};
  GroupNorm conv_norm_out{nullptr};
  Conv2d conv_out{nullptr};
};
TORCH_MODULE(Encoder);

// Decoder: conv_in, mid_block, up_blocks (lowest resolution first), conv_norm_out, conv_out.
class DecoderImpl : public torch::nn::Module {
 public:
  DecoderImpl(const AutoencoderKLConfig& config, const torch::TensorOptions& options);
  Conv2d conv_in{nullptr};
  UNetMidBlock2D mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  std::vector<UpDecoderBlock2D> blocks;
  GroupNorm conv_norm_out{nullptr};
  Conv2d conv_out{nullptr};
};
TORCH_MODULE(Decoder);

// ---------------------------------------------------------------------------------------------

struct AutoencoderKLOptions {
  AutoencoderKLConfig config;            // must be valid (AutoencoderKLConfig::Validate)
  torch::Dtype dtype = torch::kFloat32;  // weights and compute: float32, bfloat16 or float16
  torch::Device device = torch::kCPU;    // CPU or CUDA
  // Attention scores computed at once per mid-block attention (query rows are processed in chunks
  // of at most this many scores; 2^26 floats = 256 MiB). Bounds memory only: rows are independent,
  // so the result does not depend on it beyond summation order.
  int64_t max_attention_scores = int64_t{1} << 26;
};

// The diagonal Gaussian posterior of encode(): mean and logvar [B, latent_channels, h, w], logvar
// clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
struct Posterior {
  torch::Tensor mean;
  torch::Tensor logvar;
};

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  // Throws c10::Error for an invalid config or an unsupported dtype.
  explicit AutoencoderKLImpl(const AutoencoderKLOptions& options);

  // diffusers' AutoencoderKL.decode(z).sample: z [B, latent_channels, h, w] (any float dtype and
  // device; already `latents / scaling_factor + shift_factor`, as pipelines pass it) -> image
  // [B, out_channels, h·s, w·s] (s = config().scale_factor()) in the model dtype, roughly in
  // [-1, 1]. Runs under torch::InferenceMode (unless differentiable()). Shapes are not validated
  // here (AutoencoderKLModel does); LibTorch throws c10::Error on a mismatch.
  torch::Tensor decode(const torch::Tensor& z, Intermediates* intermediates = nullptr) const;

  // diffusers' AutoencoderKL.encode(x).latent_dist: x [B, in_channels, H, W] (any float dtype and
  // device, values in [-1, 1]) -> the posterior, [B, latent_channels, ⌊H/s⌋, ⌊W/s⌋] in the model
  // dtype. Same conditions as decode().
  Posterior encode(const torch::Tensor& x, Intermediates* intermediates = nullptr) const;

  const AutoencoderKLConfig& config() const { return options_.config; }
  torch::Dtype dtype() const { return options_.dtype; }
  torch::Device device() const { return options_.device; }

  // Differentiable mode (training): when on, forward passes run outside InferenceMode with
  // autograd-supported, out-of-place operations only, so gradients flow to the parameters (and
  // inputs); the results equal the default path's (float32) up to rounding. Off by default.
  // Not thread-safe: set it before running, never while forwards run.
  //
  // Both encode() and decode() honour it (training runs encode -> Posterior -> reparameterized
  // sample -> decode; the posterior's mean and logvar carry gradients). The only operation that
  // differs is the mid-block attention's score product (bmm then scale instead of baddbmm into a
  // reused buffer). Parameters are created with requires_grad false; setting the mode also sets
  // every parameter's requires_grad to `on` (freeze parameters selectively afterwards). float32
  // models only: encode()/decode() throw c10::Error in differentiable mode for a 16-bit model (the
  // CPU emulation rounds in place). Intermediates captured in this mode are part of the graph.
  void set_differentiable(bool on);
  bool differentiable() const { return differentiable_; }

  Encoder encoder{nullptr};
  Decoder decoder{nullptr};
  Conv2d quant_conv{nullptr};       // null unless config.use_quant_conv
  Conv2d post_quant_conv{nullptr};  // null unless config.use_post_quant_conv

 private:
  AutoencoderKLOptions options_;
  bool differentiable_ = false;
};
TORCH_MODULE(AutoencoderKL);

// ---------------------------------------------------------------------------------------------

// The ds::DiffusionModel for AutoencoderKL: the module plus validated entry points. It is also a
// ds::LatentImageDecoder (handlers/image_decoder.h), which is how pipelines of other model folders
// reach it.
class AutoencoderKLModel final : public ds::DiffusionModel, public ds::LatentImageDecoder {
 public:
  // INVALID_ARGUMENT for an invalid config (naming the field), an unsupported dtype
  // (float32/bfloat16/float16 only) or device type (cpu/cuda only); UNIMPLEMENTED for CUDA when
  // LibTorch or the machine has none; INTERNAL if LibTorch fails (e.g. out of memory).
  static absl::StatusOr<std::unique_ptr<AutoencoderKLModel>> Create(
      const nlohmann::json& config, const ds::ModelOptions& options);

  const std::string& class_name() const override;
  const nlohmann::json& config() const override { return config_json_; }
  const ds::ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return *model_; }
  const torch::nn::Module& module() const override { return *model_; }
  // "sample" (diffusers' forward argument); nothing optional.
  std::vector<std::string> required_inputs() const override;
  std::vector<std::string> optional_inputs() const override;

  // diffusers' AutoencoderKL.forward(sample, sample_posterior=False): decode(encode(sample).mean).
  // INVALID_ARGUMENT naming the input for a missing, unknown or badly shaped one (as Encode);
  // UNIMPLEMENTED for a non-empty `lora` (no LoRA handler is wired); INTERNAL if LibTorch fails.
  using ds::DiffusionModel::Forward;
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const ds::LoraContext* lora) const override;

  // AutoencoderKLImpl::decode with validation: INVALID_ARGUMENT naming `z` and its shape unless z
  // is a defined floating tensor [B, latent_channels, h, w] with B, h, w >= 1; INTERNAL if
  // LibTorch fails (e.g. out of memory).
  absl::StatusOr<torch::Tensor> Decode(const torch::Tensor& z,
                                       Intermediates* intermediates = nullptr) const;
  // AutoencoderKLImpl::encode with validation: INVALID_ARGUMENT naming `x` and its shape unless x
  // is a defined floating tensor [B, in_channels, H, W] with B >= 1 and H, W >= scale_factor (each
  // stride-2 level needs at least 2 rows and columns); INTERNAL if LibTorch fails.
  absl::StatusOr<Posterior> Encode(const torch::Tensor& x,
                                   Intermediates* intermediates = nullptr) const;

  // ds::LatentImageDecoder: Decode(z); the config's scaling_factor, shift_factor (0 when null),
  // scale_factor() and latent_channels.
  absl::StatusOr<torch::Tensor> DecodeLatents(const torch::Tensor& z) const override {
    return Decode(z);
  }
  double latent_scaling_factor() const override { return vae_config().scaling_factor; }
  double latent_shift_factor() const override { return vae_config().shift_factor.value_or(0.0); }
  int64_t spatial_scale_factor() const override { return vae_config().scale_factor(); }
  int64_t latent_channels() const override { return vae_config().latent_channels; }

  const AutoencoderKLConfig& vae_config() const { return model_->config(); }
  AutoencoderKL& autoencoder() { return model_; }
  const AutoencoderKL& autoencoder() const { return model_; }

 private:
  AutoencoderKLModel(nlohmann::json config_json, ds::ModelOptions options, AutoencoderKL model);
  nlohmann::json config_json_;
  ds::ModelOptions options_;
  AutoencoderKL model_;
};

// The registry-facing factory: AutoencoderKLModel::Create as a ds::DiffusionModel.
absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateAutoencoderKL(
    const nlohmann::json& config, const ds::ModelOptions& options);

// Loads a diffusers-format AutoencoderKL folder (config.json +
// diffusion_pytorch_model.safetensors), or a pipeline root whose `vae/` subfolder is one, strictly.
// NOT_FOUND when neither has the files; INVALID_ARGUMENT for a bad config (naming the field) or a
// state dict that does not match (missing / unexpected / shape-mismatched keys named); errors of
// Create otherwise.
absl::StatusOr<std::unique_ptr<AutoencoderKLModel>> LoadAutoencoderKL(
    const std::string& dir, const ds::ModelOptions& options = {});

}  // namespace ds::autoencoder_kl
