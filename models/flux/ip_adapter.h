// The Flux IP-Adapter: the per-model mixin that conditions FluxTransformer2DModel on image
// embeddings (diffusers' FluxIPAdapterMixin / FluxTransformer2DLoadersMixin /
// FluxIPAdapterAttnProcessor at 58eb52c, XLabs' flux-ip-adapter weights).
//
// What it computes, per forward pass, for each adapter of the request:
//   ip_hidden_states = LayerNorm(Linear(image_embeds) reshaped to [num_tokens, C])
//     (ImageProjection: image_embeds [B, N_img, E] -> [B, N_img, num_tokens, C], LayerNorm eps
//     1e-5, C = the transformer's joint_attention_dim);
//   in every double-stream block i, with q = norm_q(to_q(norm1(h))) — the image stream's query
//   after QK-norm, before RoPE and before the concatenation with the text stream —
//     k = to_k_ip[i](ip tokens), v = to_v_ip[i](ip tokens) (no norm, no RoPE; N_img·num_tokens
//     tokens, split into heads), ip_attn = softmax(q kᵀ / √head_dim) v (no output projection),
//   and the block's image-stream output gains  Σ_adapters scale_i · ip_attn  after the MLP
//   (ungated). Single-stream blocks are unchanged. A scale of 0 skips the branch, so an all-zero
//   request is bit for bit the plain forward (as diffusers' 0·x is).
//
// Usage (the pipeline):
//   ASSIGN_OR_RETURN(FluxIPAdapterPtr adapter,
//                    FluxIPAdapter::Load(path, transformer.flux_config(), dtype, device));  // once
//   image_embeds = ImageEncoder::EncodeImages(ClipPixelValues(image, processor))  // [B, E]
//   FluxIPAdapterConditioning ip;                                                // per request
//   ip.adapters.push_back({adapter, image_embeds.unsqueeze(1), {scale}});
//   transformer.ForwardWithIPAdapter(inputs, lora, &ip);                          // every step
// The adapter is immutable and shared (any number of concurrent requests); the conditioning is a
// per-request value; the transformer's weights are never touched.
//
// Weight layouts accepted by Load (FormatNames(): "xlabs", "diffusers"), exactly what diffusers'
// FluxIPAdapterMixin.load_ip_adapter reads:
//   image projection: `ip_adapter_proj_model.{proj,norm}.{weight,bias}` (XLabs) or
//     `image_proj.{proj,norm}.{weight,bias}`;
//   per double block N: `double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.{weight,
//     bias}` (XLabs) or `ip_adapter.N.to_{k,v}_ip.{weight,bias}`.
// Shapes: proj.weight [num_tokens·C, E], proj.bias [num_tokens·C], norm.* [C], to_{k,v}_ip.weight
// [inner_dim, C], .bias [inner_dim], one pair for every double block 0..num_layers-1. num_tokens is
// derived from the shapes (proj rows / C); diffusers hard-codes 4 (16 for 65536 rows), which every
// published Flux adapter satisfies.
//
// Thread-safety: FluxIPAdapter is immutable after loading; share it freely. A conditioning is
// read-only during a forward and may be shared by concurrent forwards.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "handlers/ip_adapter_handler.h"
#include "handlers/safetensors.h"
#include "models/flux/config.h"

namespace ds::flux {

inline constexpr char kIPAdapterFormatXLabs[] = "xlabs";
inline constexpr char kIPAdapterFormatDiffusers[] = "diffusers";

// Where each tensor of an adapter file goes (pure: names and shapes only).
struct FluxIPAdapterPlan {
  std::string format;  // kIPAdapterFormatXLabs or kIPAdapterFormatDiffusers
  int64_t num_tokens = 0;
  int64_t image_embed_dim = 0;      // E
  int64_t cross_attention_dim = 0;  // C (= joint_attention_dim)
  int64_t inner_dim = 0;            // heads · head_dim
  // Source keys in the file.
  std::string proj_weight, proj_bias, norm_weight, norm_bias;
  struct Layer {
    std::string k_weight, k_bias, v_weight, v_bias;
  };
  std::vector<Layer> layers;  // one per double block, in order
};

// Plans loading an adapter with keys/shapes `keys` into a transformer of `config`.
// INVALID_ARGUMENT naming the key with the expected and the found shape for any mismatch (an
// adapter for another width, another joint_attention_dim or image encoder width), a missing key
// (e.g. a double block without its to_k_ip), a key that is neither layout nor in range ("unexpected
// key"), both spellings of the same tensor, or no adapter keys at all.
absl::StatusOr<FluxIPAdapterPlan> PlanFluxIPAdapter(const KeyShapes& keys,
                                                    const FluxConfig& config);

class FluxIPAdapter;
using FluxIPAdapterPtr = std::shared_ptr<const FluxIPAdapter>;

class FluxIPAdapter {
 public:
  // Loads a safetensors file. NOT_FOUND for a missing file; errors of FromStateDict otherwise.
  static absl::StatusOr<FluxIPAdapterPtr> Load(const std::string& path, const FluxConfig& config,
                                               torch::Dtype dtype = torch::kFloat32,
                                               torch::Device device = torch::kCPU);
  // Builds an adapter from tensors (copied to `dtype` / `device`; the source may be freed
  // afterwards). INVALID_ARGUMENT as PlanFluxIPAdapter (prefixed with `source`), or for a
  // non-floating or non-finite tensor (naming it); INTERNAL if LibTorch fails.
  static absl::StatusOr<FluxIPAdapterPtr> FromStateDict(const TensorMap& state_dict,
                                                        const FluxConfig& config,
                                                        torch::Dtype dtype = torch::kFloat32,
                                                        torch::Device device = torch::kCPU,
                                                        const std::string& source = "IP-Adapter");

  const std::string& format() const { return plan_.format; }
  int64_t num_tokens() const { return plan_.num_tokens; }
  int64_t image_embed_dim() const { return plan_.image_embed_dim; }
  int64_t cross_attention_dim() const { return plan_.cross_attention_dim; }
  int64_t inner_dim() const { return plan_.inner_dim; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  torch::Dtype dtype() const { return dtype_; }
  torch::Device device() const { return device_; }
  int64_t memory_bytes() const;

  // The image projection (diffusers' MultiIPAdapterImageProjection entry): image_embeds
  // [B, N_img, E] (or [B, E] = one image) -> ip_hidden_states [B, N_img, num_tokens, C] in the
  // adapter's dtype. INVALID_ARGUMENT naming the shape otherwise; INTERNAL if LibTorch fails.
  absl::StatusOr<torch::Tensor> ProjectImageEmbeds(const torch::Tensor& image_embeds) const;

  // Parameters, diffusers naming: image_proj.{proj,norm}.{weight,bias},
  // ip_adapter.<i>.to_{k,v}_ip.{weight,bias}.
  struct Layer {
    torch::Tensor k_weight, k_bias, v_weight, v_bias;
  };
  const torch::Tensor& proj_weight() const { return proj_weight_; }
  const torch::Tensor& proj_bias() const { return proj_bias_; }
  const torch::Tensor& norm_weight() const { return norm_weight_; }
  const torch::Tensor& norm_bias() const { return norm_bias_; }
  const Layer& layer(int64_t i) const { return layers_[static_cast<size_t>(i)]; }
  TensorMap DiffusersStateDict() const;

 private:
  FluxIPAdapter() = default;
  FluxIPAdapterPlan plan_;
  torch::Dtype dtype_ = torch::kFloat32;
  torch::Device device_ = torch::kCPU;
  torch::Tensor proj_weight_, proj_bias_, norm_weight_, norm_bias_;
  std::vector<Layer> layers_;
};

// One adapter's part of a request.
struct FluxIPAdapterInput {
  FluxIPAdapterPtr adapter;
  // [B or 1, N_img, E] (or [B or 1, E]): the image encoder's image_embeds, as diffusers'
  // prepare_ip_adapter_image_embeds passes them (batch-1 embeds broadcast over the batch).
  torch::Tensor image_embeds;
  // One scale for every double block, or one per double block (diffusers' set_ip_adapter_scale
  // with a float or a list). Finite.
  std::vector<double> scales = {1.0};

  double scale(int64_t layer) const {
    return scales.size() == 1 ? scales[0] : scales[static_cast<size_t>(layer)];
  }
};

// The IP-Adapter conditioning of one request (several adapters add up, as diffusers' list form).
struct FluxIPAdapterConditioning {
  std::vector<FluxIPAdapterInput> adapters;
  // Whether any adapter has a non-zero scale somewhere (otherwise the forward is the plain one).
  bool active() const;
};

// Checks `conditioning` against a transformer of `config` and a forward of batch `batch`.
// INVALID_ARGUMENT naming the adapter index and the field: a null adapter, one built for another
// config (num_layers, inner_dim or joint_attention_dim differ), image_embeds of the wrong rank,
// width or batch (not 1 or `batch`), non-floating embeds, a scale list that is neither 1 nor
// num_layers long, or a non-finite scale.
absl::Status ValidateIPAdapterConditioning(const FluxIPAdapterConditioning& conditioning,
                                           const FluxConfig& config, int64_t batch);

// ---------------------------------------------------------------------------------------------
// Used by the transformer's forward (transformer.cc); not needed by callers.

// The per-forward state of a conditioning: the projected image tokens and every active block's
// keys/values, computed once per forward pass. LibTorch errors propagate as c10::Error (the
// forward runs inside TorchCall).
class FluxIPAdapterRun {
 public:
  // `conditioning` must be valid (ValidateIPAdapterConditioning) for `batch`. Activations are
  // computed in `compute` on `device`; with `round_to` set (emulated 16-bit), every intermediate
  // result is rounded through that dtype, as the transformer's forward does.
  FluxIPAdapterRun(const FluxIPAdapterConditioning& conditioning, int64_t batch, int64_t heads,
                   torch::ScalarType compute, std::optional<torch::ScalarType> round_to,
                   torch::Device device);

  // Whether block `layer` gets an IP-Adapter term.
  bool active(int64_t layer) const;
  // Σ_adapters scale · softmax(ip_query kᵀ / √d) v for block `layer`: ip_query [B, S_img, H, d]
  // -> [B, S_img, H·d] in `compute`. Only for active layers.
  torch::Tensor AttentionOutput(int64_t layer, const torch::Tensor& ip_query) const;
  // Each adapter's ip_hidden_states [B', N_img, num_tokens, C] (diffusers' names:
  // ip_hidden_states.<i>).
  const std::vector<torch::Tensor>& ip_hidden_states() const { return projected_; }

 private:
  struct KV {
    torch::Tensor k, v;  // [B, T, H, d]
    double scale;
  };
  torch::Tensor R(torch::Tensor t) const;
  std::optional<torch::ScalarType> round_to_;
  std::vector<torch::Tensor> projected_;
  std::vector<std::vector<KV>> layers_;  // per block: the adapters with a non-zero scale there
};

// The Flux IP-Adapter handler for ModelSpec (metadata row and header checks).
const ds::IPAdapterHandler& FluxIPAdapterHandler();

}  // namespace ds::flux
