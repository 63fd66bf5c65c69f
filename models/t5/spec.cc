// THE one place that declares T5EncoderModel: names, structural facts, wired capability handlers
// and the factory. Everything the metadata table shows is derived from this spec.
#include "models/t5/spec.h"

#include "handlers/registry.h"
#include "models/t5/t5_encoder.h"
#include "models/t5/weight_mapping.h"

namespace ds::t5 {

ModelSpec MakeT5EncoderModelSpec() {
  ModelSpec spec;
  spec.name = "t5-encoder";
  spec.class_name = kT5EncoderModelClassName;
  spec.aliases = {"t5", "t5xxl"};
  spec.description =
      "T5 encoder (transformers T5EncoderModel; T5-XXL of FLUX.1 / SD3): token ids -> hidden "
      "states";
  // transformers' T5PreTrainedModel: _no_split_modules ["T5Block"], and "wo" kept in float32 when
  // loading in float16 (T5TextEncoder builds it so).
  spec.structure.no_split_modules = {ModuleClassName<T5BlockImpl>()};
  spec.structure.keep_in_fp32_modules = {"wo"};
  // Capabilities wired (rows derived from the handlers): single-file loading only; no LoRA.
  spec.weight_mapping = &T5WeightMappingHandler();
  spec.adapt_state_dict = AdaptT5StateDict;
  spec.factory = CreateT5EncoderModel;
  return spec;
}

DS_REGISTER_MODEL(MakeT5EncoderModelSpec());

}  // namespace ds::t5
