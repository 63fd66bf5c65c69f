#include "models/flux/transformer.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/layerwise_casting.h"
#include "handlers/status.h"

namespace ds::flux {

// ---------------------------------------------------------------------------------------------
// Modules

LinearImpl::LinearImpl(const LinearOptions& o) {
  weight = register_parameter("weight",
                              ds::NewParameter({o.out_features, o.in_features}, o.tensor_options),
                              /*requires_grad=*/false);
  if (o.bias) {
    bias = register_parameter("bias", ds::NewParameter({o.out_features}, o.tensor_options),
                              /*requires_grad=*/false);
  }
}

RMSNormImpl::RMSNormImpl(const RMSNormOptions& o) : eps(o.eps) {
  weight = register_parameter("weight", ds::NewParameter({o.dim}, o.tensor_options, 1.0),
                              /*requires_grad=*/false);
}

namespace {

// LayerNorm(dim, elementwise_affine=False, eps=1e-6): no parameters.
torch::nn::LayerNorm PlainLayerNorm(int64_t dim) {
  return torch::nn::LayerNorm(
      torch::nn::LayerNormOptions({dim}).elementwise_affine(false).eps(1e-6));
}

}  // namespace

torch::Tensor TimestepsImpl::forward(const torch::Tensor& t) const {
  constexpr int64_t kHalf = kChannels / 2;
  // As diffusers: exponent = -ln(10000)·arange(half) / (half - downscale_freq_shift), in float32.
  torch::Tensor exponent =
      torch::arange(0, kHalf, t.options().dtype(torch::kFloat)) * -std::log(10000.0);
  exponent = exponent / static_cast<double>(kHalf);
  const torch::Tensor arg = t.to(torch::kFloat).unsqueeze(1) * exponent.exp().unsqueeze(0);
  return torch::cat({arg.cos(), arg.sin()}, 1);  // flip_sin_to_cos: [cos, sin]
}

std::pair<torch::Tensor, torch::Tensor> FluxPosEmbedImpl::forward(const torch::Tensor& ids) const {
  const torch::Tensor pos = ids.to(torch::kFloat).to(torch::kDouble);
  std::vector<torch::Tensor> cos, sin;
  for (size_t i = 0; i < options.axes_dim.size(); ++i) {
    const int64_t d = options.axes_dim[i];
    const torch::Tensor freqs =
        torch::pow(options.theta, torch::arange(0, d, 2, pos.options()) / static_cast<double>(d))
            .reciprocal();
    const torch::Tensor f = torch::outer(pos.select(1, static_cast<int64_t>(i)), freqs);
    cos.push_back(f.cos().to(torch::kFloat));
    sin.push_back(f.sin().to(torch::kFloat));
  }
  return {torch::cat(cos, 1), torch::cat(sin, 1)};
}

EmbedderImpl::EmbedderImpl(const EmbedderOptions& o) {
  linear_1 = register_module("linear_1",
                             Linear(LinearOptions{o.in_features, o.dim, true, o.tensor_options}));
  linear_2 =
      register_module("linear_2", Linear(LinearOptions{o.dim, o.dim, true, o.tensor_options}));
}

TimeTextEmbedImpl::TimeTextEmbedImpl(const TimeTextEmbedOptions& o) {
  // diffusers' Timesteps(num_channels=256) feeds the timestep and guidance embedders.
  constexpr int64_t kSinusoidChannels = TimestepsImpl::kChannels;
  time_proj = register_module("time_proj", Timesteps());
  timestep_embedder = register_module(
      "timestep_embedder", Embedder(EmbedderOptions{kSinusoidChannels, o.dim, o.tensor_options}));
  if (o.guidance_embeds) {
    guidance_embedder = register_module(
        "guidance_embedder", Embedder(EmbedderOptions{kSinusoidChannels, o.dim, o.tensor_options}));
  }
  text_embedder = register_module(
      "text_embedder", Embedder(EmbedderOptions{o.pooled_projection_dim, o.dim, o.tensor_options}));
}

AdaNormImpl::AdaNormImpl(const AdaNormOptions& o) {
  linear = register_module("linear",
                           Linear(LinearOptions{o.dim, o.chunks * o.dim, true, o.tensor_options}));
  norm = register_module("norm", PlainLayerNorm(o.dim));
}

GeluProjImpl::GeluProjImpl(const LinearOptions& o) { proj = register_module("proj", Linear(o)); }

FeedForwardImpl::FeedForwardImpl(const FeedForwardOptions& o) {
  net_0 = GeluProj(LinearOptions{o.dim, o.hidden, true, o.tensor_options});
  net_2 = Linear(LinearOptions{o.hidden, o.dim, true, o.tensor_options});
  net = register_module("net", torch::nn::ModuleList(net_0, torch::nn::Identity(), net_2));
}

FluxAttentionImpl::FluxAttentionImpl(const FluxAttentionOptions& o)
    : heads(o.heads), head_dim(o.head_dim) {
  const LinearOptions proj{o.dim, o.heads * o.head_dim, true, o.tensor_options};
  const RMSNormOptions norm{o.head_dim, 1e-6, o.tensor_options};
  to_q = register_module("to_q", Linear(proj));
  to_k = register_module("to_k", Linear(proj));
  to_v = register_module("to_v", Linear(proj));
  norm_q = register_module("norm_q", RMSNorm(norm));
  norm_k = register_module("norm_k", RMSNorm(norm));
  if (o.joint) {
    add_q_proj = register_module("add_q_proj", Linear(proj));
    add_k_proj = register_module("add_k_proj", Linear(proj));
    add_v_proj = register_module("add_v_proj", Linear(proj));
    norm_added_q = register_module("norm_added_q", RMSNorm(norm));
    norm_added_k = register_module("norm_added_k", RMSNorm(norm));
    const LinearOptions out{o.heads * o.head_dim, o.dim, true, o.tensor_options};
    to_out_0 = Linear(out);
    to_out = register_module("to_out", torch::nn::ModuleList(to_out_0, torch::nn::Identity()));
    to_add_out = register_module("to_add_out", Linear(out));
  }
}

FluxTransformerBlockImpl::FluxTransformerBlockImpl(const FluxBlockOptions& o) {
  const AdaNormOptions ada{o.dim, 6, o.tensor_options};
  norm1 = register_module("norm1", AdaNorm(ada));
  norm1_context = register_module("norm1_context", AdaNorm(ada));
  attn = register_module("attn", FluxAttention(FluxAttentionOptions{o.dim, o.heads, o.head_dim,
                                                                    true, o.tensor_options}));
  norm2 = register_module("norm2", PlainLayerNorm(o.dim));
  norm2_context = register_module("norm2_context", PlainLayerNorm(o.dim));
  const FeedForwardOptions ffo{o.dim, 4 * o.dim, o.tensor_options};
  ff = register_module("ff", FeedForward(ffo));
  ff_context = register_module("ff_context", FeedForward(ffo));
}

FluxSingleTransformerBlockImpl::FluxSingleTransformerBlockImpl(const FluxBlockOptions& o) {
  const int64_t mlp = 4 * o.dim;
  norm = register_module("norm", AdaNorm(AdaNormOptions{o.dim, 3, o.tensor_options}));
  proj_mlp = register_module("proj_mlp", Linear(LinearOptions{o.dim, mlp, true, o.tensor_options}));
  attn = register_module("attn", FluxAttention(FluxAttentionOptions{o.dim, o.heads, o.head_dim,
                                                                    false, o.tensor_options}));
  proj_out = register_module("proj_out",
                             Linear(LinearOptions{o.dim + mlp, o.dim, true, o.tensor_options}));
}

FluxTransformer2DModelImpl::FluxTransformer2DModelImpl(const FluxTransformer2DModelOptions& o)
    : options_(o) {
  const absl::Status valid = o.config.Validate();
  TORCH_CHECK(valid.ok(), std::string(valid.message()));
  TORCH_CHECK(
      o.dtype == torch::kFloat32 || o.dtype == torch::kBFloat16 || o.dtype == torch::kFloat16,
      "FluxTransformer2DModel: unsupported dtype ", o.dtype);
  const FluxConfig& c = o.config;
  const auto to = torch::TensorOptions().dtype(o.dtype).device(o.device);
  const int64_t dim = c.inner_dim();

  pos_embed =
      register_module("pos_embed", FluxPosEmbed(FluxPosEmbedOptions{10000, c.axes_dims_rope}));
  time_text_embed = register_module(
      "time_text_embed",
      TimeTextEmbed(TimeTextEmbedOptions{dim, c.pooled_projection_dim, c.guidance_embeds, to}));
  context_embedder = register_module("context_embedder",
                                     Linear(LinearOptions{c.joint_attention_dim, dim, true, to}));
  x_embedder = register_module("x_embedder", Linear(LinearOptions{c.in_channels, dim, true, to}));

  const FluxBlockOptions block{dim, c.num_attention_heads, c.attention_head_dim, to};
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) {
    blocks.emplace_back(block);
    transformer_blocks->push_back(blocks.back());
  }
  single_transformer_blocks = register_module("single_transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_single_layers; ++i) {
    single_blocks.emplace_back(block);
    single_transformer_blocks->push_back(single_blocks.back());
  }
  norm_out = register_module("norm_out", AdaNorm(AdaNormOptions{dim, 2, to}));
  proj_out = register_module(
      "proj_out", Linear(LinearOptions{dim, c.patch_size * c.patch_size * c.resolved_out_channels(),
                                       true, to}));
  // Name every linear and norm after its place in the module tree (the LoRA context keys).
  for (const auto& item : named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    if (auto* l = dynamic_cast<LinearImpl*>(item.value().get())) l->path = item.key();
    if (auto* n = dynamic_cast<RMSNormImpl*>(item.value().get())) n->path = item.key();
  }
}

void FluxTransformer2DModelImpl::set_differentiable(bool on) {
  differentiable_ = on;
  for (torch::Tensor& p : parameters()) {
    if (p.is_floating_point()) p.set_requires_grad(on);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward

namespace {

using torch::Tensor;

// Numerics of one forward pass.
struct Ctx {
  torch::ScalarType dtype;  // the model dtype
  torch::ScalarType act;    // activations: the model dtype, or float32 when emulating
  bool emulate;  // float32 arithmetic rounded to `dtype`, see FluxTransformer2DModelImpl::forward
  Intermediates* sink;
  const ds::LoraContext* lora;  // nullptr: no adapters
  // Differentiable mode (FluxTransformer2DModelImpl::set_differentiable): out-of-place,
  // autograd-supported operations only.
  bool grad = false;
  // Attention score workspace, reused by every block of this forward (see Attention()).
  mutable Tensor scores;

  // Rounds `t` to the model dtype in place when emulating (a no-op otherwise).
  Tensor R(Tensor t) const {
    if (emulate) t.copy_(t.to(dtype));
    return t;
  }
  // A parameter as the activations' dtype. Also the per-layer upcast of layerwise casting: a
  // weight stored narrower than the activations is converted for the one product that uses it
  // (the copy lives only as long as that layer's call).
  Tensor W(const Tensor& p) const { return p.scalar_type() == act ? p : p.to(act); }
  // The weight of linear `l` (`w`: l.weight or its overlay) as the activations' dtype: 8-bit
  // codes are decoded and scaled per row for this one product.
  Tensor LW(const LinearImpl& l, const Tensor& w) const {
    if (w.scalar_type() != torch::kByte) return W(w);
    return ds::DequantizeFloat8(w, l.weight_scale, l.weight_format, act);
  }

  // Stores a copy of the activation `t` in the model dtype; `keep_dtype` keeps t's own dtype.
  void Capture(const std::string& name, const Tensor& t, bool keep_dtype = false) const {
    if (sink == nullptr) return;
    (*sink)[name] = t.to(keep_dtype ? t.scalar_type() : dtype, /*non_blocking=*/false,
                         /*copy=*/true);
  }
  bool capturing() const { return sink != nullptr; }

  // Parameter `p` of the module at `path` (`suffix` ".weight" / ".bias"), or its LoRA overlay.
  const Tensor& P(const std::string& path, const char* suffix, const Tensor& p) const {
    if (lora == nullptr || lora->overlays().empty() || !p.defined()) return p;
    const Tensor* overlay = lora->Overlay(path + suffix);
    return overlay != nullptr ? *overlay : p;
  }
  // The LoRA deltas on linear module `l`, or nullptr.
  const ds::LinearLora* Deltas(const LinearImpl& l) const {
    return lora == nullptr ? nullptr : lora->Find(l.path);
  }
};

// The first `width` features of x (x itself when it is that wide).
Tensor Leading(const Tensor& x, int64_t width) {
  return x.size(-1) == width ? x : x.narrow(-1, 0, width);
}

// y += Σ scale · (B (A x) + bias) over the deltas, accumulated in place into y [..., out] (whose
// last dimension must be contiguous with rows of stride y.size(-1) or wider).
void AddLora(const Ctx& c, const ds::LinearLora& lora, const Tensor& x, Tensor& y) {
  if (c.grad) {
    for (const ds::LoraDelta& d : lora.deltas) {
      Tensor t = at::linear(at::linear(Leading(x, d.down.size(1)), d.down), d.up);
      if (d.bias.defined()) t = t + d.bias;
      y = y + t * d.scale;
    }
    return;
  }
  const int64_t out = y.size(-1);
  Tensor y2 = y.dim() == 2 ? y : y.view({-1, out});
  for (const ds::LoraDelta& d : lora.deltas) {
    const Tensor xd = Leading(x, d.down.size(1));
    const Tensor t = c.R(at::linear(xd, c.W(d.down)));
    at::addmm_out(y2, y2, t.reshape({-1, t.size(-1)}), c.W(d.up).t(), /*beta=*/1,
                  /*alpha=*/d.scale);
    if (d.bias.defined()) y2.add_(c.W(d.bias), d.scale);
    c.R(y2);
  }
}

Tensor Lin(const Ctx& c, const LinearImpl& l, const Tensor& x_in) {
  const Tensor& w = c.P(l.path, ".weight", l.weight);
  // Device map: the input follows the weight (a no-op on one device).
  const Tensor x = x_in.device() == w.device() ? x_in : x_in.to(w.device());
  const Tensor& b = c.P(l.path, ".bias", l.bias);
  Tensor y = c.R(at::linear(Leading(x, w.size(1)), c.LW(l, w), b.defined() ? c.W(b) : Tensor()));
  if (const ds::LinearLora* lora = c.Deltas(l)) AddLora(c, *lora, x, y);
  return y;
}

Tensor SiLU(const Ctx& c, const Tensor& x) { return c.R(at::silu(x)); }

// tanh-approximated GELU of the fresh tensor `x`: in place, or out of place when differentiable.
Tensor GeluTanh(const Ctx& c, Tensor x) {
  if (c.grad) return at::gelu(x, "tanh");
  at::gelu_(x, "tanh");
  return c.R(x);
}

Tensor LayerNorm(const Ctx& c, const torch::nn::LayerNormImpl& norm, const Tensor& x) {
  return c.R(at::layer_norm(x, norm.options.normalized_shape(), {}, {}, norm.options.eps()));
}

// x_norm · (1 + scale) + shift, in place on the fresh tensor `x_norm` [B, S, D]; scale and shift
// are [B, D].
Tensor Modulate(const Ctx& c, Tensor x_norm, const Tensor& scale, const Tensor& shift) {
  const Tensor scale1 = c.R(scale.unsqueeze(1) + 1);
  if (c.grad) return at::addcmul(shift.unsqueeze(1), x_norm, scale1);
  at::addcmul_out(x_norm, shift.unsqueeze(1), x_norm, scale1);
  return c.R(x_norm);
}

// x += gate[:, None] · y, in place.
void GatedAdd(const Ctx& c, Tensor& x, const Tensor& gate, const Tensor& y) {
  if (c.grad) {
    x = at::addcmul(x, gate.unsqueeze(1), y);
    return;
  }
  x.addcmul_(gate.unsqueeze(1), y);
  c.R(x);
}

// torch.nn.RMSNorm / diffusers RMSNorm over the last dimension: normalized in float32, cast to
// the model dtype, then multiplied by the weight in the model dtype.
Tensor RMS(const Ctx& c, const RMSNormImpl& n, const Tensor& x) {
  const Tensor xf = x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat);
  if (c.grad) {
    const Tensor inv = (xf.square().mean(-1, /*keepdim=*/true) + n.eps).rsqrt();
    return xf * inv * c.W(c.P(n.path, ".weight", n.weight));
  }
  // mean(x²) as ‖x‖²/d: one pass over x without materializing x².
  const Tensor inv = at::linalg_vector_norm(xf, 2, {-1}, /*keepdim=*/true)
                         .square_()
                         .div_(static_cast<double>(x.size(-1)))
                         .add_(n.eps)
                         .rsqrt_();
  Tensor y = xf * inv;
  if (y.scalar_type() != c.act) y = y.to(c.act);
  c.R(y);
  y.mul_(c.W(c.P(n.path, ".weight", n.weight)));
  return c.R(y);
}

// Interleaved RoPE on x [B, S, H, d] (contiguous) with `freqs` = cos + i·sin as complex64
// [1, S, 1, d/2]: the pairs (x0, x1), (x2, x3), ... rotate as complex numbers, which is
// diffusers' x·cos + rotate(x)·sin with repeat-interleaved cos/sin. Computed in float32.
Tensor Rope(const Ctx& c, const Tensor& x, const Tensor& freqs) {
  const Tensor xf = x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat);
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  shape.push_back(2);
  Tensor out = torch::view_as_real(torch::view_as_complex(xf.view(shape)) * freqs).view(x.sizes());
  if (out.scalar_type() != c.act) out = out.to(c.act);
  return c.R(out);
}

// softmax(q kᵀ / √d) v for q, k, v [B, S, H, d] (contiguous), written into `out` [B, S, H, d]
// (any strides, e.g. a slice of a wider buffer). The 1/√d scale is folded into the QKᵀ product
// (baddbmm alpha) and the softmax runs in place on the score buffer.
//
// On CPU each task is one (batch element, head): tasks are handed out dynamically to the intra-op
// threads, each running its products single-threaded on its own score buffer (which stays in
// cache), so a layer's attention is a single parallel region in which a preempted thread does not
// hold the others back. Elsewhere (CUDA) a task is all heads of a batch element, as one batched
// product each, run from the calling thread.
void Attention(const Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out) {
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const bool cpu = q.is_cpu();
  const int64_t per_task = cpu ? 1 : heads;
  const int64_t tasks_per_batch = heads / per_task;
  const int64_t tasks = batch * tasks_per_batch;
  const int64_t workers = cpu ? std::clamp<int64_t>(at::get_num_threads(), 1, tasks) : 1;
  // One buffer per worker, zero-filled when allocated so that beta = 0 never meets uninitialized
  // memory (later uses hold finite probabilities); reused by every block of the forward.
  if (!c.scores.defined() || c.scores.size(0) < workers || c.scores.size(1) != per_task ||
      c.scores.size(2) != seq || c.scores.scalar_type() != q.scalar_type()) {
    c.scores = torch::zeros({workers, per_task, seq, seq}, q.options());
  }
  std::atomic<int64_t> next{0};
  auto work = [&](int64_t worker) {
    Tensor s = c.scores[worker];
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t b = t / tasks_per_batch, h0 = (t % tasks_per_batch) * per_task;
      // [per_task, S, d] views (heads first) into q, k, v and out.
      auto heads_of = [&](const Tensor& x) { return x[b].narrow(1, h0, per_task).transpose(0, 1); };
      at::baddbmm_out(s, s, heads_of(q), heads_of(k).transpose(1, 2), /*beta=*/0,
                      /*alpha=*/scale);
      c.R(s);
      at::_softmax_out(s, s, -1, /*half_to_float=*/false);
      c.R(s);
      Tensor o = heads_of(out);
      at::bmm_out(o, s, heads_of(v));
    }
  };
  if (workers > 1) {
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) work(w);
    });
  } else {
    work(0);
  }
  c.R(out);
}

// softmax(q kᵀ / √d) v for q, k, v [B, S, H, d] as out-of-place, differentiable products;
// returns [B, S, H, d].
Tensor DifferentiableAttention(const Tensor& q, const Tensor& k, const Tensor& v) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  const Tensor s = at::matmul(q.transpose(1, 2), k.permute({0, 2, 3, 1})) * scale;
  return at::matmul(at::softmax(s, -1), v.transpose(1, 2)).transpose(1, 2);
}

Tensor Embed(const Ctx& c, const EmbedderImpl& e, const Tensor& x) {
  Tensor h = Lin(c, *e.linear_1, x);
  if (c.grad) return Lin(c, *e.linear_2, at::silu(h)).to(x.device());
  at::silu_(h);
  return Lin(c, *e.linear_2, c.R(h)).to(x.device());  // device map: back beside the input
}

// Heads view [B, S, H, d] of a [B, S, H·d] tensor.
Tensor Heads(const Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads});
}

// TaylorSeer keeps and predicts a hooked module's outputs in the model dtype (the module's output
// dtype in diffusers); emulated activations are float32 holding model-dtype values, so the
// conversions both ways are exact.
void TaylorUpdate(const Ctx& c, ds::TaylorSeerState& taylor, int64_t slot,
                  std::vector<Tensor> outputs) {
  if (c.emulate) {
    for (Tensor& t : outputs) t = t.to(c.dtype);
  }
  taylor.Update(slot, outputs);
}
std::vector<Tensor> TaylorPredict(const Ctx& c, const ds::TaylorSeerState& taylor, int64_t slot) {
  std::vector<Tensor> outputs = taylor.Predict(slot);
  if (c.emulate) {
    for (Tensor& t : outputs) t = t.to(c.act);
  }
  return outputs;
}

// `ip` (nullptr: none) adds the IP-Adapter term of block `index` (see ip_adapter.h). `taylor`
// (nullptr: none): TaylorSeer hooks the attention (slot `index`), whose outputs (image, text and,
// with an active IP-Adapter, its term) are predicted when the state is not computing.
std::pair<Tensor, Tensor> DoubleBlock(const Ctx& c, const FluxTransformerBlockImpl& blk, Tensor h,
                                      Tensor e, const Tensor& silu_temb, const Tensor& freqs,
                                      const std::string& name, const FluxIPAdapterRun* ip,
                                      int64_t index, ds::TaylorSeerState* taylor = nullptr) {
  const FluxAttentionImpl& attn = *blk.attn;
  const int64_t s_txt = e.size(1), s_img = h.size(1), batch = h.size(0);
  // Modulation chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
  const auto m = Lin(c, *blk.norm1->linear, silu_temb).chunk(6, 1);
  const auto mc = Lin(c, *blk.norm1_context->linear, silu_temb).chunk(6, 1);
  const Tensor nh = Modulate(c, LayerNorm(c, *blk.norm1->norm, h), m[1], m[0]);
  const Tensor ne = Modulate(c, LayerNorm(c, *blk.norm1_context->norm, e), mc[1], mc[0]);
  if (c.capturing()) {
    c.Capture(name + ".norm1.0", nh);
    c.Capture(name + ".norm1_context.0", ne);
    for (int i = 1; i <= 4; ++i) {
      c.Capture(absl::StrCat(name, ".norm1.", i), m[i + 1]);
      c.Capture(absl::StrCat(name, ".norm1_context.", i), mc[i + 1]);
    }
  }

  // Joint attention over [text, image].
  const bool ip_active = ip != nullptr && ip->active(index);
  Tensor attn_h, attn_e, ip_out;
  if (taylor != nullptr && !taylor->computing()) {
    const std::vector<Tensor> predicted = TaylorPredict(c, *taylor, index);
    attn_h = predicted.at(0);
    attn_e = predicted.at(1);
    if (ip_active) ip_out = predicted.at(2);
  } else {
    const int64_t heads = attn.heads;
    // The image stream's query after QK-norm, before RoPE: also the IP-Adapter's query.
    const Tensor img_q = RMS(c, *attn.norm_q, Heads(Lin(c, *attn.to_q, nh), heads));
    const Tensor q = torch::cat(
        {RMS(c, *attn.norm_added_q, Heads(Lin(c, *attn.add_q_proj, ne), heads)), img_q}, 1);
    const Tensor k =
        torch::cat({RMS(c, *attn.norm_added_k, Heads(Lin(c, *attn.add_k_proj, ne), heads)),
                    RMS(c, *attn.norm_k, Heads(Lin(c, *attn.to_k, nh), heads))},
                   1);
    const Tensor v = torch::cat(
        {Heads(Lin(c, *attn.add_v_proj, ne), heads), Heads(Lin(c, *attn.to_v, nh), heads)}, 1);
    Tensor o;
    if (c.grad) {
      o = DifferentiableAttention(Rope(c, q, freqs), Rope(c, k, freqs), v).contiguous();
    } else {
      o = torch::empty({batch, s_txt + s_img, heads, attn.head_dim}, q.options());
      Attention(c, Rope(c, q, freqs), Rope(c, k, freqs), v, o);
    }
    o = o.view({batch, s_txt + s_img, heads * attn.head_dim});
    attn_h = Lin(c, *attn.to_out_0, o.narrow(1, s_txt, s_img));
    attn_e = Lin(c, *attn.to_add_out, o.narrow(1, 0, s_txt));
    // diffusers' IP-Adapter processor returns its term as the attention's third output.
    if (ip_active) ip_out = ip->AttentionOutput(index, img_q);
    if (taylor != nullptr) {
      TaylorUpdate(c, *taylor, index,
                   ip_active ? std::vector<Tensor>{attn_h, attn_e, ip_out}
                             : std::vector<Tensor>{attn_h, attn_e});
    }
  }
  c.Capture(name + ".attn.0", attn_h);
  c.Capture(name + ".attn.1", attn_e);

  GatedAdd(c, h, m[2], attn_h);
  {
    const Tensor x = GeluTanh(
        c, Lin(c, *blk.ff->net_0->proj, Modulate(c, LayerNorm(c, *blk.norm2, h), m[4], m[3])));
    GatedAdd(c, h, m[5], Lin(c, *blk.ff->net_2, x));
  }
  if (ip_active) {
    // diffusers: hidden_states + ip_attn_output after the MLP, ungated.
    c.Capture(name + ".attn.ip_attn_output", ip_out);
    if (c.grad) {
      h = h + ip_out;
    } else {
      h.add_(ip_out);
      c.R(h);
    }
  }
  GatedAdd(c, e, mc[2], attn_e);
  {
    const Tensor x =
        GeluTanh(c, Lin(c, *blk.ff_context->net_0->proj,
                        Modulate(c, LayerNorm(c, *blk.norm2_context, e), mc[4], mc[3])));
    GatedAdd(c, e, mc[5], Lin(c, *blk.ff_context->net_2, x));
  }
  if (c.dtype == torch::kHalf) e.clamp_(-65504, 65504);
  c.Capture(name + ".0", e);
  c.Capture(name + ".1", h);
  return {h, e};
}

// One single-stream block on the joint sequence x = [text, image] (updated in place): the
// attention output and the MLP activations are written side by side into one [B, S, 5·D] buffer
// so that proj_out is a single product over their concatenation.
//
// `taylor` (nullptr: none): TaylorSeer hooks the attention (slot `slot`), whose output is predicted
// when the state is not computing.
void SingleBlock(const Ctx& c, const FluxSingleTransformerBlockImpl& blk, Tensor& x,
                 const Tensor& silu_temb, const Tensor& freqs, int64_t s_txt,
                 const std::string& name, ds::TaylorSeerState* taylor = nullptr, int64_t slot = 0) {
  const FluxAttentionImpl& attn = *blk.attn;
  const int64_t batch = x.size(0), seq = x.size(1), dim = x.size(2);
  const int64_t mlp = blk.proj_mlp->weight.size(0);
  // Chunks: shift, scale, gate.
  const auto m = Lin(c, *blk.norm->linear, silu_temb).chunk(3, 1);
  const Tensor nx = Modulate(c, LayerNorm(c, *blk.norm->norm, x), m[1], m[0]);
  c.Capture(name + ".norm.0", nx);
  c.Capture(name + ".norm.1", m[2]);

  if (c.grad) {
    const int64_t heads = attn.heads;
    const Tensor q = Rope(c, RMS(c, *attn.norm_q, Heads(Lin(c, *attn.to_q, nx), heads)), freqs);
    const Tensor k = Rope(c, RMS(c, *attn.norm_k, Heads(Lin(c, *attn.to_k, nx), heads)), freqs);
    const Tensor v = Heads(Lin(c, *attn.to_v, nx), heads);
    const Tensor a = DifferentiableAttention(q, k, v).reshape({batch, seq, dim});
    c.Capture(name + ".attn", a);
    const Tensor joint = torch::cat({a, GeluTanh(c, Lin(c, *blk.proj_mlp, nx))}, 2);
    GatedAdd(c, x, m[2], Lin(c, *blk.proj_out, joint));
    if (c.capturing()) {
      c.Capture(name + ".0", x.narrow(1, 0, s_txt));
      c.Capture(name + ".1", x.narrow(1, s_txt, seq - s_txt));
    }
    return;
  }

  Tensor joint = torch::empty({batch, seq, dim + mlp}, nx.options());
  {
    Tensor act = joint.view({batch * seq, dim + mlp}).narrow(1, dim, mlp);
    const LinearImpl& pm = *blk.proj_mlp;
    const Tensor nx2 = nx.reshape({batch * seq, dim});
    at::addmm_out(act, c.W(c.P(pm.path, ".bias", pm.bias)), nx2,
                  c.LW(pm, c.P(pm.path, ".weight", pm.weight)).t());
    c.R(act);
    if (const ds::LinearLora* lora = c.Deltas(pm)) AddLora(c, *lora, nx2, act);
    at::gelu_(act, "tanh");
    c.R(act);
  }
  if (taylor != nullptr && !taylor->computing()) {
    joint.narrow(2, 0, dim).copy_(TaylorPredict(c, *taylor, slot).at(0));
  } else {
    const int64_t heads = attn.heads;
    const Tensor q = Rope(c, RMS(c, *attn.norm_q, Heads(Lin(c, *attn.to_q, nx), heads)), freqs);
    const Tensor k = Rope(c, RMS(c, *attn.norm_k, Heads(Lin(c, *attn.to_k, nx), heads)), freqs);
    const Tensor v = Heads(Lin(c, *attn.to_v, nx), heads);
    Attention(c, q, k, v, joint.narrow(2, 0, dim).view({batch, seq, heads, attn.head_dim}));
    if (taylor != nullptr) TaylorUpdate(c, *taylor, slot, {joint.narrow(2, 0, dim)});
  }
  c.Capture(name + ".attn", joint.narrow(2, 0, dim));

  GatedAdd(c, x, m[2], Lin(c, *blk.proj_out, joint));
  if (c.dtype == torch::kHalf) x.clamp_(-65504, 65504);
  if (c.capturing()) {
    c.Capture(name + ".0", x.narrow(1, 0, s_txt));
    c.Capture(name + ".1", x.narrow(1, s_txt, seq - s_txt));
  }
}

Tensor Ids(const Tensor& ids) { return ids.dim() == 3 ? ids[0] : ids; }

// `t` on `device` (itself when it is there already): activations follow a device map.
Tensor On(const Tensor& t, const torch::Device& device) {
  return t.device() == device ? t : t.to(device);
}

// Whether LibTorch's bfloat16 matrix products are fast on this CPU. Without AVX512-BF16 or AMX
// they run far slower than float32 ones (~50× on AVX2), so bfloat16 is emulated there.
bool CpuHasFastBFloat16() {
#if defined(__x86_64__) || defined(__i386__)
  // AMX-BF16 through CPUID (leaf 7, sub-leaf 0, EDX bit 22): clang 14's __builtin_cpu_supports
  // does not know "amx-bf16".
  static const bool fast = [] {
    if (__builtin_cpu_supports("avx512bf16")) return true;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && (edx & (1u << 22)) != 0;
  }();
  return fast;
#else
  return false;
#endif
}

}  // namespace

Tensor FluxTransformer2DModelImpl::forward(const FluxInputs& in, Intermediates* sink,
                                           const ds::LoraContext* lora) const {
  std::optional<c10::InferenceMode> inference;
  if (!differentiable_) inference.emplace();
  const FluxConfig& cfg = options_.config;
  const torch::Device dev = options_.device;
  Ctx c{options_.dtype, options_.dtype, false, sink,
        lora != nullptr && !lora->empty() ? lora : nullptr};
  c.grad = differentiable_;
  if (dev.is_cpu() && (options_.dtype == torch::kHalf ||
                       (options_.dtype == torch::kBFloat16 && !CpuHasFastBFloat16()))) {
    c.emulate = true;
    c.act = torch::kFloat;
  }
  TORCH_CHECK(!c.grad || !c.emulate,
              "FluxTransformer2DModel: differentiable mode needs float32 (or native 16-bit) "
              "weights, not CPU 16-bit emulation");
  TORCH_CHECK(!c.grad || (in.cache == nullptr && in.ip_adapter == nullptr && in.offload == nullptr),
              "FluxTransformer2DModel: differentiable mode runs without step caches, IP-Adapters "
              "and group offloading");
  // Inputs in the model dtype (rounded through float16 when emulating).
  auto prepare = [&](const Tensor& t) {
    return c.emulate ? t.to(dev, c.dtype).to(torch::kFloat) : t.to(dev, c.act);
  };

  // Step caches (handlers/block_cache.h): the request branch's state, of either type.
  auto* const first_block_cache = dynamic_cast<ds::FirstBlockCacheState*>(in.cache);
  auto* const taylor = dynamic_cast<ds::TaylorSeerState*>(in.cache);
  const bool taylor_lite = taylor != nullptr && taylor->use_lite_mode();
  // TaylorSeer lite (diffusers' use_lite_mode: proj_out hooked, the blocks inactive): on a skipped
  // step the output is proj_out's predicted output, and nothing else contributes to it.
  if (taylor != nullptr && !taylor->BeginForward() && taylor_lite) {
    Tensor out = taylor->Predict(0).at(0);
    c.Capture("proj_out", out);
    return out;
  }
  // Otherwise every block's attention is hooked (diffusers' default identifiers
  // ^transformer_blocks.*attn and ^single_transformer_blocks.*attn), slot = the block's index in
  // forward order.
  ds::TaylorSeerState* const taylor_blocks = taylor_lite ? nullptr : taylor;

  const int64_t batch = std::max({in.hidden_states.size(0), in.encoder_hidden_states.size(0),
                                  in.pooled_projections.size(0), in.timestep.size(0),
                                  in.guidance.defined() ? in.guidance.size(0) : int64_t{1}});

  Tensor h = Lin(c, *x_embedder, prepare(in.hidden_states));
  c.Capture("x_embedder", h);

  // The ×1000 happens after the cast to the model dtype (so it rounds in bfloat16/float16).
  const auto scaled = [&](const Tensor& t) { return c.R(prepare(t) * 1000); };
  const Tensor pooled = prepare(in.pooled_projections);
  const TimeTextEmbedImpl& tte = *time_text_embed;
  Tensor temb =
      Embed(c, *tte.timestep_embedder, prepare(tte.time_proj->forward(scaled(in.timestep))));
  if (cfg.guidance_embeds) {
    TORCH_CHECK(in.guidance.defined(), "guidance is required when guidance_embeds is set");
    temb = c.R(temb + Embed(c, *tte.guidance_embedder,
                            prepare(tte.time_proj->forward(scaled(in.guidance)))));
  } else {
    TORCH_CHECK(!in.guidance.defined(), "guidance given but guidance_embeds is not set");
  }
  temb = c.R(temb + Embed(c, *tte.text_embedder, pooled));
  c.Capture("time_text_embed", temb);

  Tensor e = Lin(c, *context_embedder, prepare(in.encoder_hidden_states));
  c.Capture("context_embedder", e);
  // Batch-1 inputs broadcast; blocks update h and e in place, so they must own their memory.
  if (h.size(0) != batch) h = h.expand({batch, -1, -1}).contiguous();
  if (e.size(0) != batch) e = e.expand({batch, -1, -1}).contiguous();

  // Text first, as in diffusers: ids = cat(txt_ids, img_ids).
  const Tensor ids = torch::cat({Ids(in.txt_ids).to(dev), Ids(in.img_ids).to(dev)}, 0);
  const auto [rope_cos, rope_sin] = pos_embed->forward(ids);
  if (c.capturing()) {
    c.Capture("pos_embed.0", rope_cos.repeat_interleave(2, 1), /*keep_dtype=*/true);
    c.Capture("pos_embed.1", rope_sin.repeat_interleave(2, 1), /*keep_dtype=*/true);
  }
  const Tensor freqs =
      torch::complex(rope_cos, rope_sin).view({1, ids.size(0), 1, rope_cos.size(1)});

  // IP-Adapter image tokens and keys/values, once per forward (only with a non-zero scale).
  std::optional<FluxIPAdapterRun> ip;
  if (in.ip_adapter != nullptr && in.ip_adapter->active()) {
    ip.emplace(*in.ip_adapter, batch, cfg.num_attention_heads, c.act,
               c.emulate ? std::optional<torch::ScalarType>(c.dtype) : std::nullopt, dev);
    for (size_t i = 0; i < ip->ip_hidden_states().size(); ++i) {
      c.Capture(absl::StrCat("ip_hidden_states.", i), ip->ip_hidden_states()[i]);
    }
  }

  // Every AdaNorm applies SiLU to temb first; compute it once.
  const Tensor silu_temb = SiLU(c, temb);
  const int64_t s_txt = e.size(1);
  // Runs blocks [begin, end) of the block sequence: the double blocks on (h, e), then the single
  // blocks on the joint sequence [text, image], split back into e and h.
  const size_t num_double = blocks.size();
  const size_t num_blocks = num_double + single_blocks.size();
  // Group offloading: each block's group is onloaded while it runs (no-op when not offloaded).
  ds::GroupOffloadSession offload(in.offload);
  const auto run_blocks = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < std::min(end, num_double); ++i) {
      offload.Enter(static_cast<int64_t>(i));
      const torch::Device bd = blocks[i]->norm1->linear->weight.device();  // device map
      h = On(h, bd);
      e = On(e, bd);
      std::tie(h, e) =
          DoubleBlock(c, *blocks[i], h, e, On(silu_temb, bd), On(freqs, bd),
                      absl::StrCat("transformer_blocks.", i), ip.has_value() ? &*ip : nullptr,
                      static_cast<int64_t>(i), taylor_blocks);
    }
    if (end > num_double) {
      Tensor x = torch::cat({e, On(h, e.device())}, 1);
      for (size_t i = std::max(begin, num_double); i < end; ++i) {
        offload.Enter(static_cast<int64_t>(i));
        const torch::Device bd = single_blocks[i - num_double]->norm->linear->weight.device();
        x = On(x, bd);  // device map
        SingleBlock(c, *single_blocks[i - num_double], x, On(silu_temb, bd), On(freqs, bd), s_txt,
                    absl::StrCat("single_transformer_blocks.", i - num_double), taylor_blocks,
                    static_cast<int64_t>(i));
      }
      h = x.narrow(1, s_txt, x.size(1) - s_txt);
      e = x.narrow(1, 0, s_txt);
    }
  };
  if (first_block_cache == nullptr || num_blocks < 2) {
    run_blocks(0, num_blocks);
  } else {
    // FirstBlockCache (diffusers' FBCHeadBlockHook / FBCBlockHook): the head block always runs;
    // the others only when its image-stream residual changed enough since they last ran.
    ds::FirstBlockCacheState& cache = *first_block_cache;
    const Tensor h_in = h.clone();  // the blocks update h in place
    run_blocks(0, 1);
    // Residuals in the model dtype, as diffusers subtracts them (emulation holds float32 values
    // rounded to it; the decision then rounds like the native kernels, see RelativeL1Change).
    Tensor head_residual = c.R(h - h_in);
    if (c.emulate) head_residual = head_residual.to(c.dtype);
    if (!cache.ShouldComputeRemaining(head_residual)) {
      const std::vector<Tensor>& tail = cache.tail_residuals();
      h = c.R(h + tail[0]);
      e = c.R(e + tail[1]);
    } else {
      const Tensor head_h = h.clone(), head_e = e.clone();
      run_blocks(1, num_blocks);
      cache.StoreComputed(std::move(head_residual), {c.R(h - head_h), c.R(e - head_e)});
    }
    c.Capture("cache.0", e);
    c.Capture("cache.1", h);
  }

  // AdaLayerNormContinuous: chunks are scale, shift (the reverse of the blocks).
  h = On(h, norm_out->linear->weight.device());  // device map
  const auto m = Lin(c, *norm_out->linear, silu_temb).chunk(2, 1);
  h = Modulate(c, LayerNorm(c, *norm_out->norm, h), m[0], m[1]);
  c.Capture("norm_out", h);
  Tensor out = Lin(c, *proj_out, h);
  c.Capture("proj_out", out);
  out = On(out, dev);  // device map: outputs on the model's device
  if (c.emulate) out = out.to(c.dtype);
  if (taylor_lite) taylor->Update(0, {out});  // the hooked proj_out's output is the model's
  return out;
}

// ---------------------------------------------------------------------------------------------
// FluxTransformer (ds::DiffusionModel)

namespace {

constexpr const char* kRequired[] = {
    "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
    "txt_ids"};
constexpr const char* kGuidance = "guidance";

std::string Shape(const Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

absl::Status InputError(absl::string_view name, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("input '", name, "': ", what));
}

}  // namespace

FluxTransformer::FluxTransformer(nlohmann::json config_json, ds::ModelOptions options,
                                 FluxTransformer2DModel model)
    : config_json_(std::move(config_json)), options_(options), model_(std::move(model)) {}

absl::StatusOr<std::unique_ptr<FluxTransformer>> FluxTransformer::Create(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(FluxConfig cfg, FluxConfig::FromJson(config));
  if (options.dtype != torch::kFloat32 && options.dtype != torch::kBFloat16 &&
      options.dtype != torch::kFloat16) {
    return absl::InvalidArgumentError(absl::StrCat("FluxTransformer2DModel: unsupported dtype ",
                                                   c10::toString(options.dtype),
                                                   " (float32, bfloat16 or float16)"));
  }
  if (!options.device.is_cpu() && !options.device.is_cuda()) {
    return absl::InvalidArgumentError(absl::StrCat("FluxTransformer2DModel: unsupported device ",
                                                   options.device.str(), " (cpu or cuda)"));
  }
  if (options.device.is_cuda() && !torch::cuda::is_available()) {
    return absl::UnimplementedError(
        absl::StrCat("FluxTransformer2DModel: ", options.device.str(),
                     " requested but CUDA is not available (LibTorch build or machine)"));
  }
  ASSIGN_OR_RETURN(
      FluxTransformer2DModel model, TorchCall("building FluxTransformer2DModel", [&] {
        ds::ScopedUninitializedParameters uninitialized(options.uninitialized_parameters);
        return FluxTransformer2DModel(
            FluxTransformer2DModelOptions{cfg, options.dtype, options.device});
      }));
  if (options.storage_dtype.has_value()) {
    RETURN_IF_ERROR(ds::ValidateStorageDtype(options));
    const std::vector<std::string> patterns =
        ds::LayerwiseCastingSkipPatterns(options, SkipLayerwiseCastingPatterns());
    RETURN_IF_ERROR(ds::ApplyLayerwiseCasting(*model, *options.storage_dtype, patterns,
                                              options.uninitialized_parameters,
                                              options.float8_format)
                        .status());
    // 8-bit storage: each linear keeps a handle on its scale buffer (the buffer object stays the
    // same when loaders, LoRA fusing or a device map replace its data).
    for (const auto& item : model->named_modules("", /*include_self=*/false)) {
      auto* l = dynamic_cast<LinearImpl*>(item.value().get());
      if (l == nullptr || l->weight.scalar_type() != torch::kByte) continue;
      const auto buffers = l->named_buffers(/*recurse=*/false);
      const torch::Tensor* scale = buffers.find(ds::Float8ScaleName("weight"));
      if (scale == nullptr) {
        return absl::InternalError(absl::StrCat(item.key(), ": 8-bit weight without a scale"));
      }
      l->weight_scale = *scale;
      l->weight_format = options.float8_format;
    }
  }
  return std::unique_ptr<FluxTransformer>(
      new FluxTransformer(cfg.ToJson(), options, std::move(model)));
}

const std::vector<std::string>& SkipLayerwiseCastingPatterns() {
  static const auto* const kPatterns = new std::vector<std::string>{"pos_embed", "norm"};
  return *kPatterns;
}

const std::string& FluxTransformer::class_name() const {
  static const std::string* const kName = new std::string(kFluxClassName);
  return *kName;
}

std::vector<std::string> FluxTransformer::required_inputs() const {
  std::vector<std::string> out(std::begin(kRequired), std::end(kRequired));
  if (flux_config().guidance_embeds) out.push_back(kGuidance);
  return out;
}

std::vector<std::string> FluxTransformer::optional_inputs() const { return {}; }

absl::StatusOr<FluxInputs> FluxTransformer::PrepareInputs(const TensorMap& inputs,
                                                          const ds::LoraContext* lora) const {
  const FluxConfig& cfg = flux_config();
  const std::vector<std::string> required = required_inputs();
  for (const auto& [name, t] : inputs) {
    if (std::find(required.begin(), required.end(), name) == required.end()) {
      if (name == kGuidance) {
        return InputError(name,
                          "this model has no guidance embedder (guidance_embeds is false); "
                          "do not pass guidance");
      }
      return InputError(
          name, absl::StrCat("unknown input (expected: ", absl::StrJoin(required, ", "), ")"));
    }
    if (!t.defined()) return InputError(name, "undefined tensor");
  }
  for (const auto& name : required) {
    if (inputs.find(name) == inputs.end()) {
      return InputError(name, name == kGuidance
                                  ? "required: this model has guidance_embeds (e.g. FLUX.1-dev)"
                                  : "missing required input");
    }
  }
  FluxInputs in;
  in.hidden_states = inputs.at("hidden_states");
  in.encoder_hidden_states = inputs.at("encoder_hidden_states");
  in.pooled_projections = inputs.at("pooled_projections");
  in.timestep = inputs.at("timestep");
  in.img_ids = inputs.at("img_ids");
  in.txt_ids = inputs.at("txt_ids");
  if (cfg.guidance_embeds) in.guidance = inputs.at(kGuidance);

  auto floating = [](absl::string_view name, const Tensor& t) -> absl::Status {
    if (!t.is_floating_point()) {
      return InputError(name, absl::StrCat("expected a floating-point tensor, got ",
                                           c10::toString(t.scalar_type())));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(floating("hidden_states", in.hidden_states));
  RETURN_IF_ERROR(floating("encoder_hidden_states", in.encoder_hidden_states));
  RETURN_IF_ERROR(floating("pooled_projections", in.pooled_projections));
  RETURN_IF_ERROR(floating("timestep", in.timestep));
  if (in.guidance.defined()) RETURN_IF_ERROR(floating(kGuidance, in.guidance));

  const Tensor& x = in.hidden_states;
  const int64_t base_width = model_->input_width();
  const int64_t width =
      lora == nullptr ? base_width : lora->InputWidth(model_->x_embedder->path, base_width);
  if (x.dim() != 3 || x.size(2) != width || x.size(0) < 1 || x.size(1) < 1) {
    std::string why;
    if (width != cfg.in_channels) {
      why = absl::StrCat(" (in_channels ", cfg.in_channels, " widened to ", width,
                         " by a LoRA on x_embedder)");
    }
    return InputError("hidden_states",
                      absl::StrCat("expected [batch, image_tokens, ", width,
                                   "] with batch, image_tokens >= 1", why, ", got ", Shape(x)));
  }
  const Tensor& ctx = in.encoder_hidden_states;
  if (ctx.dim() != 3 || ctx.size(2) != cfg.joint_attention_dim || ctx.size(0) < 1) {
    return InputError("encoder_hidden_states",
                      absl::StrCat("expected [batch, text_tokens, ", cfg.joint_attention_dim,
                                   "], got ", Shape(ctx)));
  }
  const Tensor& pooled = in.pooled_projections;
  if (pooled.dim() != 2 || pooled.size(1) != cfg.pooled_projection_dim || pooled.size(0) < 1) {
    return InputError(
        "pooled_projections",
        absl::StrCat("expected [batch, ", cfg.pooled_projection_dim, "], got ", Shape(pooled)));
  }
  for (const char* name : {"timestep", kGuidance}) {
    const Tensor& t = absl::string_view(name) == kGuidance ? in.guidance : in.timestep;
    if (t.defined() && (t.dim() != 1 || t.size(0) < 1)) {
      return InputError(name, absl::StrCat("expected [batch], got ", Shape(t)));
    }
  }
  // Batch sizes: all equal, or 1 (broadcast).
  int64_t batch = 1;
  std::vector<std::pair<const char*, const Tensor*>> batched = {
      {"hidden_states", &in.hidden_states},
      {"encoder_hidden_states", &in.encoder_hidden_states},
      {"pooled_projections", &in.pooled_projections},
      {"timestep", &in.timestep}};
  if (in.guidance.defined()) batched.push_back({kGuidance, &in.guidance});
  const char* batch_from = nullptr;
  for (const auto& [name, t] : batched) {
    if (t->size(0) == 1) continue;
    if (batch_from == nullptr) {
      batch = t->size(0);
      batch_from = name;
    } else if (t->size(0) != batch) {
      return InputError(
          name, absl::StrCat("batch size ", t->size(0), " does not match batch size ", batch,
                             " of '", batch_from, "' (batch sizes must be equal or 1)"));
    }
  }
  const int64_t axes = static_cast<int64_t>(cfg.axes_dims_rope.size());
  struct IdsSpec {
    const char* name;
    Tensor* ids;
    int64_t tokens;
    const char* what;
  };
  for (const IdsSpec& spec :
       {IdsSpec{"img_ids", &in.img_ids, x.size(1), "image_tokens (hidden_states.shape[1])"},
        IdsSpec{"txt_ids", &in.txt_ids, ctx.size(1),
                "text_tokens (encoder_hidden_states.shape[1])"}}) {
    Tensor& ids = *spec.ids;
    const std::string given = Shape(ids);
    if (ids.is_complex() || ids.scalar_type() == torch::kBool) {
      return InputError(spec.name, absl::StrCat("expected a real tensor, got ",
                                                c10::toString(ids.scalar_type())));
    }
    // diffusers accepts (deprecated) 3-D ids and uses ids[0].
    if (ids.dim() == 3 && ids.size(0) >= 1) ids = ids[0];
    if (ids.dim() != 2 || ids.size(0) != spec.tokens || ids.size(1) != axes) {
      return InputError(spec.name, absl::StrCat("expected [", spec.tokens, ", ", axes, "] (",
                                                spec.what, ", len(axes_dims_rope)), got ", given));
    }
  }
  return in;
}

absl::StatusOr<torch::Tensor> FluxTransformer::Forward(const TensorMap& inputs,
                                                       const ds::LoraContext* lora) const {
  return ForwardWithIntermediates(inputs, nullptr, lora);
}

absl::StatusOr<torch::Tensor> FluxTransformer::ForwardWithIntermediates(
    const TensorMap& inputs, Intermediates* intermediates, const ds::LoraContext* lora) const {
  ASSIGN_OR_RETURN(FluxInputs in, PrepareInputs(inputs, lora));
  in.offload = group_offloader();
  return TorchCall("FluxTransformer2DModel forward",
                   [&] { return model_->forward(in, intermediates, lora); });
}

absl::StatusOr<torch::Tensor> FluxTransformer::ForwardWithIPAdapter(
    const TensorMap& inputs, const ds::LoraContext* lora,
    const FluxIPAdapterConditioning* ip_adapter, Intermediates* intermediates) const {
  return ForwardWithExtras(inputs, lora, {ip_adapter, nullptr, intermediates});
}

absl::StatusOr<torch::Tensor> FluxTransformer::ForwardWithExtras(
    const TensorMap& inputs, const ds::LoraContext* lora, const ForwardExtras& extras) const {
  ASSIGN_OR_RETURN(FluxInputs in, PrepareInputs(inputs, lora));
  Intermediates* const intermediates = extras.intermediates;
  in.cache = extras.cache;
  in.offload = group_offloader();
  if (const FluxIPAdapterConditioning* ip_adapter = extras.ip_adapter; ip_adapter != nullptr) {
    const int64_t batch = std::max({in.hidden_states.size(0), in.encoder_hidden_states.size(0),
                                    in.pooled_projections.size(0), in.timestep.size(0),
                                    in.guidance.defined() ? in.guidance.size(0) : int64_t{1}});
    RETURN_IF_ERROR(ValidateIPAdapterConditioning(*ip_adapter, flux_config(), batch));
    in.ip_adapter = ip_adapter;
  }
  return TorchCall("FluxTransformer2DModel forward",
                   [&] { return model_->forward(in, intermediates, lora); });
}

absl::StatusOr<std::unique_ptr<ds::DiffusionModel>> CreateFluxTransformer(
    const nlohmann::json& config, const ds::ModelOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<FluxTransformer> model,
                   FluxTransformer::Create(config, options));
  return std::unique_ptr<ds::DiffusionModel>(std::move(model));
}

namespace {

class FluxCacheHandlerImpl final : public ds::CacheHandler {
 public:
  std::vector<std::string> CacheTypes() const override {
    return {ds::kFirstBlockCacheType, ds::kTaylorSeerCacheType};
  }
  std::vector<std::string> BlockStreams() const override {
    return {"hidden_states", "encoder_hidden_states"};
  }
};

}  // namespace

const ds::CacheHandler& FluxCacheHandler() {
  static const FluxCacheHandlerImpl* const kHandler = new FluxCacheHandlerImpl();
  return *kHandler;
}

}  // namespace ds::flux
