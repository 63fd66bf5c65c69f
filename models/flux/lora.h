// The Flux LoRA handler: format markers and pure conversion of every Flux LoRA format to diffusers
// naming (FluxTransformer2DModel module names, without the "transformer." prefix).
//
// Formats (detection by key prefixes/markers over suffix-normalized names, in this order):
//   diffusers  PEFT naming, "transformer."-prefixed (or bare diffusers module names), optional
//              `.alpha` keys and `lora_adapter_metadata`; shared rules of ds::PlanPeftLora.
//   xlabs      `[diffusion_model.]{double,single}_blocks.<i>.processor.{qkv,proj}_lora[1|2]`.
//   kohya      sd-scripts `lora_unet_<bfl_name_with_underscores>`, the ComfyUI spelling
//              `diffusion_model.<bfl.name>`, and the "mixture" `lora_transformer_<diffusers_name>`;
//              `.alpha` per module (missing = rank); text-encoder keys are reported, not applied.
//   kontext    fal Kontext: BFL names under `base_model.model.` (checked before bfl).
//   bfl        original BFL module names with lora_A/lora_B (weights and biases), incl. Control
//              LoRAs: q/k norm scales become parameter overlays, a widened `img_in` widens
//              x_embedder's input.
// Fused modules split along the output rows with lora_A shared: qkv into q, k, v (equal thirds) and
// single-block linear1 into q, k, v, proj_mlp ([D, D, D, rest], D = linear1's input width, read
// from its lora_A). Layer indices and widths come from the keys and shapes, never constants.
//
// Where diffusers (main, 58eb52c) is wrong, this handler does the mathematically right thing:
//   1. kohya img_in/txt_in/time_in/vector_in/guidance_in/final_layer LoRAs are kept and applied
//      (diffusers converts them without the "transformer." prefix, so its loader drops them);
//   2. final_layer.adaLN_modulation.1 -> norm_out.linear swaps the (shift, scale) halves of lora_B
//      and its bias only, never lora_A (diffusers' BFL path swaps lora_A too);
//   3. kohya final-layer alphas are applied like every other module's (diffusers ignores them);
//   4. kontext is detected before bfl (its keys contain the bfl markers diffusers' PR tests first).
//
// The handler is pure (names, shapes, alpha values) and stateless: immutable and thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "handlers/lora_format.h"

namespace ds::flux {

// A linear module in BFL (original FLUX) naming and the diffusers linear modules its weight's rows
// feed, in row order: one module, or a fused one split as the handler splits it (qkv into to_q,
// to_k, to_v; a single block's linear1 into to_q, to_k, to_v, proj_mlp). For writers of BFL-named
// adapters (kohya `lora_unet_<bfl_name with '_'>`), e.g. the training tool's LoRA.
struct BflLinearModule {
  std::string bfl;                     // "double_blocks.0.img_attn.qkv"
  std::string kohya;                   // "lora_unet_double_blocks_0_img_attn_qkv"
  std::vector<std::string> diffusers;  // "transformer_blocks.0.attn.to_q", ...
};

// The block modules (every double and single block's linears, modulation included) of a
// transformer with `num_double` double and `num_single` single blocks, blocks in order. The global
// modules (img_in, final_layer, ...) are not listed.
std::vector<BflLinearModule> BflBlockLinearModules(int64_t num_double, int64_t num_single);

class FluxLora : public LoraHandler {
 public:
  // "bfl", "kohya", "kontext", "xlabs" (derived from the detection table).
  std::vector<std::string> FormatNames() const override;
  std::optional<std::string> DetectFormat(const KeyShapes& keys) const override;
  absl::StatusOr<LoraPlan> PlanConversion(const LoraKeys& keys,
                                          const std::string& format) const override;
};

// The handler object the Flux spec wires (static lifetime).
const FluxLora& FluxLoraHandler();

}  // namespace ds::flux
