#include "models/autoencoder_kl/autoencoder_kl.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds::autoencoder_kl {

// ---------------------------------------------------------------------------------------------
// Modules

namespace {

torch::Tensor Param(torch::nn::Module& m, const char* name, at::IntArrayRef shape,
                    const torch::TensorOptions& options, double value = 0.0) {
  return m.register_parameter(name, ds::NewParameter(shape, options, value),
                              /*requires_grad=*/false);
}

}  // namespace

Conv2dImpl::Conv2dImpl(const Conv2dOptions& o) : stride(o.stride), padding(o.padding) {
  weight = Param(*this, "weight", {o.out_channels, o.in_channels, o.kernel_size, o.kernel_size},
                 o.tensor_options);
  bias = Param(*this, "bias", {o.out_channels}, o.tensor_options);
}

GroupNormImpl::GroupNormImpl(const GroupNormOptions& o) : groups(o.groups), eps(o.eps) {
  weight = Param(*this, "weight", {o.channels}, o.tensor_options, 1.0);
  bias = Param(*this, "bias", {o.channels}, o.tensor_options);
}

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features,
                       const torch::TensorOptions& options) {
  weight = Param(*this, "weight", {out_features, in_features}, options);
  bias = Param(*this, "bias", {out_features}, options);
}

namespace {

Conv2d MakeConv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding,
                const torch::TensorOptions& options) {
  return Conv2d(Conv2dOptions{in, out, kernel, stride, padding, options});
}

GroupNorm MakeNorm(int64_t groups, int64_t channels, const torch::TensorOptions& options) {
  return GroupNorm(GroupNormOptions{groups, channels, 1e-6, options});
}

}  // namespace

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& o) {
  const auto& to = o.tensor_options;
  norm1 = register_module("norm1", MakeNorm(o.groups, o.in_channels, to));
  conv1 = register_module("conv1", MakeConv(o.in_channels, o.out_channels, 3, 1, 1, to));
  norm2 = register_module("norm2", MakeNorm(o.groups, o.out_channels, to));
  conv2 = register_module("conv2", MakeConv(o.out_channels, o.out_channels, 3, 1, 1, to));
  if (o.in_channels != o.out_channels) {
    conv_shortcut =
        register_module("conv_shortcut", MakeConv(o.in_channels, o.out_channels, 1, 1, 0, to));
  }
}

AttentionImpl::AttentionImpl(const AttentionOptions& o) {
  const auto& to = o.tensor_options;
  group_norm = register_module("group_norm", MakeNorm(o.groups, o.channels, to));
  to_q = register_module("to_q", Linear(o.channels, o.channels, to));
  to_k = register_module("to_k", Linear(o.channels, o.channels, to));
  to_v = register_module("to_v", Linear(o.channels, o.channels, to));
  to_out_0 = Linear(o.channels, o.channels, to);
  to_out = register_module("to_out", torch::nn::ModuleList(to_out_0, torch::nn::Identity()));
}

UNetMidBlock2DImpl::UNetMidBlock2DImpl(const MidBlockOptions& o) {
  attentions = register_module("attentions", torch::nn::ModuleList());
  if (o.attention) {
    attention = Attention(AttentionOptions{o.channels, o.groups, o.tensor_options});
    attentions->push_back(attention);
  }
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int i = 0; i < 2; ++i) {
    resnet_list.emplace_back(
        ResnetBlock2DOptions{o.channels, o.channels, o.groups, o.tensor_options});
    resnets->push_back(resnet_list.back());
  }
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, const torch::TensorOptions& options) {
  conv = register_module("conv", MakeConv(channels, channels, 3, 2, 0, options));
}

Upsample2DImpl::Upsample2DImpl(int64_t channels, const torch::TensorOptions& options) {
  conv = register_module("conv", MakeConv(channels, channels, 3, 1, 1, options));
}

namespace {

// The resnets of one level: the first takes in_channels, the others out_channels.
torch::nn::ModuleList LevelResnets(const LevelBlockOptions& o, std::vector<ResnetBlock2D>* typed) {
  torch::nn::ModuleList list;
  for (int64_t j = 0; j < o.num_layers; ++j) {
    typed->emplace_back(ResnetBlock2DOptions{j == 0 ? o.in_channels : o.out_channels,
                                             o.out_channels, o.groups, o.tensor_options});
    list->push_back(typed->back());
  }
  return list;
}

}  // namespace

DownEncoderBlock2DImpl::DownEncoderBlock2DImpl(const LevelBlockOptions& o) {
  resnets = register_module("resnets", LevelResnets(o, &resnet_list));
  if (o.resample) {
    downsampler = Downsample2D(o.out_channels, o.tensor_options);
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  }
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(const LevelBlockOptions& o) {
  resnets = register_module("resnets", LevelResnets(o, &resnet_list));
  if (o.resample) {
    upsampler = Upsample2D(o.out_channels, o.tensor_options);
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

EncoderImpl::EncoderImpl(const AutoencoderKLConfig& c, const torch::TensorOptions& to) {
  const std::vector<int64_t>& b = c.block_out_channels;
  const int64_t n = c.num_levels();
  const int64_t g = c.norm_num_groups;
  conv_in = register_module("conv_in", MakeConv(c.in_channels, b[0], 3, 1, 1, to));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t channels = b[0];
  for (int64_t i = 0; i < n; ++i) {
    blocks.emplace_back(
        LevelBlockOptions{channels, b[i], c.layers_per_block, g, /*resample=*/i != n - 1, to});
    down_blocks->push_back(blocks.back());
    channels = b[i];
  }
  mid_block = register_module(
      "mid_block", UNetMidBlock2D(MidBlockOptions{b.back(), g, c.mid_block_add_attention, to}));
  conv_norm_out = register_module("conv_norm_out", MakeNorm(g, b.back(), to));
  conv_out = register_module("conv_out", MakeConv(b.back(), 2 * c.latent_channels, 3, 1, 1, to));
}

DecoderImpl::DecoderImpl(const AutoencoderKLConfig& c, const torch::TensorOptions& to) {
  const std::vector<int64_t>& b = c.block_out_channels;
  const int64_t n = c.num_levels();
  const int64_t g = c.norm_num_groups;
  conv_in = register_module("conv_in", MakeConv(c.latent_channels, b.back(), 3, 1, 1, to));
  mid_block = register_module(
      "mid_block", UNetMidBlock2D(MidBlockOptions{b.back(), g, c.mid_block_add_attention, to}));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  int64_t channels = b.back();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t out = b[n - 1 - i];
    blocks.emplace_back(
        LevelBlockOptions{channels, out, c.layers_per_block + 1, g, /*resample=*/i != n - 1, to});
    up_blocks->push_back(blocks.back());
    channels = out;
  }
  conv_norm_out = register_module("conv_norm_out", MakeNorm(g, b[0], to));
  conv_out = register_module("conv_out", MakeConv(b[0], c.out_channels, 3, 1, 1, to));
}

AutoencoderKLImpl::AutoencoderKLImpl(const AutoencoderKLOptions& o) : options_(o) {
  const absl::Status valid = o.config.Validate();
  TORCH_CHECK(valid.ok(), std::string(valid.message()));
  TORCH_CHECK(
      o.dtype == torch::kFloat32 || o.dtype == torch::kBFloat16 || o.dtype == torch::kFloat16,
      "AutoencoderKL: unsupported dtype ", o.dtype);
  TORCH_CHECK(o.max_attention_scores > 0, "AutoencoderKL: max_attention_scores must be positive");
  const auto to = torch::TensorOptions().dtype(o.dtype).device(o.device);
  const AutoencoderKLConfig& c = o.config;
  encoder = register_module("encoder", Encoder(c, to));
  decoder = register_module("decoder", Decoder(c, to));
  const int64_t moments = 2 * c.latent_channels;
  if (c.use_quant_conv) {
    quant_conv = register_module("quant_conv", MakeConv(moments, moments, 1, 1, 0, to));
  }
  if (c.use_post_quant_conv) {
    post_quant_conv = register_module("post_quant_conv",
                                      MakeConv(c.latent_channels, c.latent_channels, 1, 1, 0, to));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

using torch::Tensor;

// Numerics of one encode/decode.
struct Ctx {
  torch::ScalarType dtype;  // the model dtype
  bool emulate;             // float32 arithmetic rounded to `dtype` after every operation
  Intermediates* sink;
  int64_t max_scores;   // attention scores per chunk
  bool differentiable;  // out-of-place, autograd-supported operations only (float32)

  // Rounds `t` (a fresh result) to the model dtype in place when emulating.
  Tensor R(Tensor t) const {
    if (emulate) t.copy_(t.to(dtype));
    return t;
  }
  // A parameter in the activations' dtype.
  Tensor W(const Tensor& p) const { return emulate ? p.to(torch::kFloat) : p; }
  void Capture(const std::string& name, const Tensor& t) const {
    if (sink != nullptr) (*sink)[name] = t.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  }
};

Tensor Conv(const Ctx& c, const Conv2dImpl& m, const Tensor& x) {
  return c.R(torch::conv2d(x, c.W(m.weight), c.W(m.bias), m.stride, m.padding));
}

Tensor Norm(const Ctx& c, const GroupNormImpl& m, const Tensor& x) {
  return c.R(torch::group_norm(x, m.groups, c.W(m.weight), c.W(m.bias), m.eps));
}

Tensor Act(const Ctx& c, const Tensor& x) { return c.R(torch::silu(x)); }

Tensor Lin(const Ctx& c, const LinearImpl& m, const Tensor& x) {
  return c.R(torch::linear(x, c.W(m.weight), c.W(m.bias)));
}

Tensor Resnet(const Ctx& c, const ResnetBlock2DImpl& m, const Tensor& x) {
  Tensor h = Conv(c, *m.conv1, Act(c, Norm(c, *m.norm1, x)));
  h = Conv(c, *m.conv2, Act(c, Norm(c, *m.norm2, h)));
  const Tensor shortcut = m.conv_shortcut ? Conv(c, *m.conv_shortcut, x) : x;
  return c.R(shortcut + h);  // output_scale_factor 1
}

// Query rows are processed in chunks of at most c.max_scores scores (the full [HW, HW] matrix of a
// 1024² FLUX decode would be 16384² floats per image).
Tensor SelfAttention(const Ctx& c, const AttentionImpl& m, const Tensor& x) {
  const int64_t b = x.size(0), ch = x.size(1), hgt = x.size(2), wid = x.size(3);
  const int64_t tokens = hgt * wid;
  // [B, C, H, W] -> [B, HW, C]; GroupNorm over [B, C, HW] equals GroupNorm over [B, C, H, W].
  const Tensor h = Norm(c, *m.group_norm, x).view({b, ch, tokens}).transpose(1, 2);
  const Tensor q = Lin(c, *m.to_q, h);
  const Tensor k = Lin(c, *m.to_k, h);
  const Tensor v = Lin(c, *m.to_v, h);
  const Tensor kt = k.transpose(1, 2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(ch));  // one head of width C
  const int64_t rows =
      std::clamp<int64_t>(c.max_scores / std::max<int64_t>(1, b * tokens), 1, tokens);
  std::vector<Tensor> outs;
  for (int64_t r = 0; r < tokens; r += rows) {
    const int64_t n = std::min(rows, tokens - r);
    const Tensor qr = q.narrow(1, r, n);
    // diffusers: baddbmm(empty, q, kᵀ, beta=0, alpha=scale), softmax upcast to float32. The scores
    // are written into a zeroed buffer that is also the input: LibTorch 1.13's small-matrix CPU
    // baddbmm computes result * beta + ... even for beta = 0, reading its (otherwise
    // uninitialized) result buffer, so NaN garbage there leaked into the decode.
    Tensor scores;
    if (c.differentiable) {
      scores = torch::bmm(qr, kt) * scale;  // out= ops have no autograd formula
    } else {
      scores = torch::zeros({b, n, tokens}, q.options());
      at::baddbmm_out(scores, scores, qr, kt, /*beta=*/0, /*alpha=*/scale);
    }
    scores = c.R(scores);
    const Tensor probs = c.R(torch::softmax(scores.to(torch::kFloat), -1).to(q.scalar_type()));
    scores = Tensor();
    outs.push_back(c.R(torch::bmm(probs, v)));
  }
  Tensor a = outs.size() == 1 ? outs[0] : torch::cat(outs, 1);
  a = Lin(c, *m.to_out_0, a);
  a = a.transpose(1, 2).reshape({b, ch, hgt, wid});
  return c.R(a + x);  // residual_connection, rescale_output_factor 1
}

Tensor Mid(const Ctx& c, const UNetMidBlock2DImpl& m, Tensor x) {
  x = Resnet(c, *m.resnet_list[0], x);
  if (m.attention) x = SelfAttention(c, *m.attention, x);
  return Resnet(c, *m.resnet_list[1], x);
}

Tensor Down(const Ctx& c, const DownEncoderBlock2DImpl& m, Tensor x) {
  for (const auto& r : m.resnet_list) x = Resnet(c, *r, x);
  if (m.downsampler) {
    // Downsample2D with padding=0 pads right and bottom by one, then convolves with stride 2.
    x = Conv(c, *m.downsampler->conv, torch::constant_pad_nd(x, {0, 1, 0, 1}, 0));
  }
  return x;
}

Tensor Up(const Ctx& c, const UpDecoderBlock2DImpl& m, Tensor x) {
  for (const auto& r : m.resnet_list) x = Resnet(c, *r, x);
  if (m.upsampler) {
    x = torch::upsample_nearest2d(x, {2 * x.size(2), 2 * x.size(3)});
    x = Conv(c, *m.upsampler->conv, x);
  }
  return x;
}

Ctx MakeCtx(const AutoencoderKLOptions& o, Intermediates* sink, bool differentiable) {
  TORCH_CHECK(!differentiable || o.dtype == torch::kFloat32,
              "AutoencoderKL: differentiable mode needs a float32 model, got ", o.dtype);
  // LibTorch 1.13's CPU kernels for 16-bit floats are missing or slow: emulate them.
  const bool emulate = o.device.is_cpu() && o.dtype != torch::kFloat32;
  return Ctx{o.dtype, emulate, sink, o.max_attention_scores, differentiable};
}

// The input in the activations' dtype on the model's device (rounded through the model dtype when
// emulating, as a native run would see it).
Tensor Prepare(const Ctx& c, const Tensor& t, const torch::Device& device) {
  return c.emulate ? t.to(device, c.dtype).to(torch::kFloat) : t.to(device, c.dtype);
}

}  // namespace

void AutoencoderKLImpl::set_differentiable(bool on) {
  differentiable_ = on;
  for (Tensor& p : parameters()) p.requires_grad_(on);
}

Tensor AutoencoderKLImpl::decode(const Tensor& z, Intermediates* sink) const {
  std::optional<c10::InferenceMode> inference;
  if (!differentiable_) inference.emplace();
  const Ctx c = MakeCtx(options_, sink, differentiable_);
  Tensor x = Prepare(c, z, options_.device);
  if (post_quant_conv) {
    x = Conv(c, *post_quant_conv, x);
    c.Capture("post_quant_conv", x);
  }
  const DecoderImpl& d = *decoder;
  x = Conv(c, *d.conv_in, x);
  c.Capture("decoder.conv_in", x);
  x = Mid(c, *d.mid_block, x);
  c.Capture("decoder.mid_block", x);
  for (size_t i = 0; i < d.blocks.size(); ++i) {
    x = Up(c, *d.blocks[i], x);
    c.Capture(absl::StrCat("decoder.up_blocks.", i), x);
  }
  x = Norm(c, *d.conv_norm_out, x);
  c.Capture("decoder.conv_norm_out", x);
  x = Conv(c, *d.conv_out, Act(c, x));
  c.Capture("decoder.conv_out", x);
  return c.emulate ? x.to(c.dtype) : x;
}

Posterior AutoencoderKLImpl::encode(const Tensor& image, Intermediates* sink) const {
  std::optional<c10::InferenceMode> inference;
  if (!differentiable_) inference.emplace();
  const Ctx c = MakeCtx(options_, sink, differentiable_);
  const EncoderImpl& e = *encoder;
  Tensor x = Conv(c, *e.conv_in, Prepare(c, image, options_.device));
  c.Capture("encoder.conv_in", x);
  for (size_t i = 0; i < e.blocks.size(); ++i) {
    x = Down(c, *e.blocks[i], x);
    c.Capture(absl::StrCat("encoder.down_blocks.", i), x);
  }
  x = Mid(c, *e.mid_block, x);
  c.Capture("encoder.mid_block", x);
  x = Norm(c, *e.conv_norm_out, x);
  c.Capture("encoder.conv_norm_out", x);
  x = Conv(c, *e.conv_out, Act(c, x));
  c.Capture("encoder.conv_out", x);
  if (quant_conv) {
    x = Conv(c, *quant_conv, x);
    c.Capture("quant_conv", x);
  }
  // DiagonalGaussianDistribution: mean, logvar = chunk(moments, 2, dim=1); logvar clamped.
  const auto moments = x.chunk(2, 1);
  Posterior p{moments[0].contiguous(), moments[1].clamp(-30.0, 20.0)};
  if (c.emulate) {
    p.mean = p.mean.to(c.dtype);
    p.logvar = p.logvar.to(c.dtype);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// AutoencoderKLModel

namespace {

constexpr char kSample[] = "sample";

std::string Shape(const Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

// A defined floating [B, channels, H, W] tensor with B >= 1 and H, W >= min_side.
absl::Status CheckImageLike(absl::string_view what, absl::string_view name, const Tensor& t,
                            int64_t channels, absl::string_view channels_field, int64_t min_side) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": '", name, "' is undefined"));
  }
  if (!t.is_floating_point()) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": '", name, "' must be a floating tensor, got ", c10::toString(t.scalar_type())));
  }
  const bool ok = t.dim() == 4 && t.size(0) >= 1 && t.size(1) == channels &&
                  t.size(2) >= min_side && t.size(3) >= min_side;
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": '", name, "' must be [B, ", channels, ", H, W] (", channels_field,
                     " ", channels, ", B >= 1, H and W >= ", min_side, "), got ", Shape(t)));
  }
  return absl::OkStatus();
}

}  // namespace

AutoencoderKLModel::AutoencoderKLModel(nlohmann::json config_json, ds::ModelOptions options,
                                       AutoencoderKL model)
    : config_json_(std::move(config_json)), options_(options), model_(std::move(model)) {}

absl::StatusOr<std::unique_ptr<AutoencoderKLModel>> AutoencoderKLModel::Create(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(AutoencoderKLConfig cfg, AutoencoderKLConfig::FromJson(config));
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kBFloat16 &&
      options.dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat("AutoencoderKL: unsupported dtype ",
                                                   c10::toString(options.dtype),
                                                   " (float32, bfloat16 or float16)"));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AutoencoderKL: unsupported device ", options.device.str(), " (cpu or cuda)"));
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    return absl::UnimplementedError(
        absl::StrCat("AutoencoderKL: ", options.device.str(),
                     " requested but CUDA is not available (LibTorch build or machine)"));
  }
  ASSIGN_OR_RETURN(
      AutoencoderKL model, TorchCall("building AutoencoderKL", [&] {
        ds::ScopedUninitializedParameters uninitialized(options.uninitialized_parameters);
        return AutoencoderKL(AutoencoderKLOptions{cfg, options.dtype, options.device});
      }));
  return std::unique_ptr<AutoencoderKLModel>(
      new AutoencoderKLModel(cfg.ToJson(), options, std::move(model)));
}

const std::string& AutoencoderKLModel::class_name() const {
  static const std::string* const kName = new std::string(kAutoencoderKLClassName);
  return *kName;
}

std::vector<std::string> AutoencoderKLModel::required_inputs() const { return {kSample}; }

std::vector<std::string> AutoencoderKLModel::optional_inputs() const { return {}; }

absl::StatusOr<torch::Tensor> AutoencoderKLModel::Decode(const torch::Tensor& z,
                                                         Intermediates* intermediates) const {
  const AutoencoderKLConfig& cfg = vae_config();
  RETURN_IF_ERROR(
      CheckImageLike("AutoencoderKL decode", "z", z, cfg.latent_channels, "latent_channels", 1));
  return TorchCall("AutoencoderKL decode", [&] { return model_->decode(z, intermediates); });
}

absl::StatusOr<Posterior> AutoencoderKLModel::Encode(const torch::Tensor& x,
                                                     Intermediates* intermediates) const {
  const AutoencoderKLConfig& cfg = vae_config();
  RETURN_IF_ERROR(CheckImageLike("AutoencoderKL encode", "x", x, cfg.in_channels, "in_channels",
                                 cfg.scale_factor()));
  return TorchCall("AutoencoderKL encode", [&] { return model_->encode(x, intermediates); });
}

absl::StatusOr<torch::Tensor> AutoencoderKLModel::Forward(const TensorMap& inputs,
                                                          const ds::LoraContext* lora) const {
  if (lora != nullptr && !lora->empty()) {
    return absl::UnimplementedError("AutoencoderKL has no LoRA support (no LoRA handler wired)");
  }
  for (const auto& [name, t] : inputs) {
    if (name != kSample) {
      return absl::InvalidArgumentError(
          absl::StrCat("AutoencoderKL forward: unknown input '", name, "' (inputs: sample)"));
    }
  }
  auto it = inputs.find(kSample);
  if (it == inputs.end()) {
    return absl::InvalidArgumentError("AutoencoderKL forward: missing input 'sample'");
  }
  const AutoencoderKLConfig& cfg = vae_config();
  RETURN_IF_ERROR(CheckImageLike("AutoencoderKL forward", kSample, it->second, cfg.in_channels,
                                 "in_channels", cfg.scale_factor()));
  return TorchCall("AutoencoderKL forward",
                   [&] { return model_->decode(model_->encode(it->second).mean); });
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateAutoencoderKL(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<AutoencoderKLModel> model,
                   AutoencoderKLModel::Create(config, options));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

absl::StatusOr<std::unique_ptr<AutoencoderKLModel>> LoadAutoencoderKL(
    const std::string& dir, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(ModelFolder folder, OpenModelFolder(dir, "vae"));
  // The strict load below assigns every parameter or fails (and the model is then discarded).
  ds::ModelOptions build = options;
  build.uninitialized_parameters = true;
  auto model = AutoencoderKLModel::Create(folder.config, build);
  if (!model.ok()) return Annotate(model.status(), absl::StrCat(folder.dir, "/config.json"));
  RETURN_IF_ERROR(LoadStateDict((*model)->module(), folder.weights, folder.dir));
  return std::move(model).value();
}

}  // namespace ds::autoencoder_kl
