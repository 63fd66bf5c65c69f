#include "models/clip/config.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "handlers/config_json.h"
#include "handlers/status.h"

namespace ds::clip {
namespace {

// The field readers of this config ("CLIPTextConfig.<field>: ..." errors).
const ConfigFields& Fields() {
  static const auto* fields = new ConfigFields("CLIPTextConfig", int64_t{1} << 24);
  return *fields;
}

bool SupportedActivation(const std::string& act) {
  return act == "quick_gelu" || act == "gelu" || act == "gelu_new" || act == "gelu_pytorch_tanh" ||
         act == "relu" || act == "silu" || act == "swish";
}

}  // namespace

absl::Status CLIPTextConfig::Validate() const {
  RETURN_IF_ERROR(Fields().Positive("vocab_size", vocab_size));
  RETURN_IF_ERROR(Fields().Positive("hidden_size", hidden_size));
  RETURN_IF_ERROR(Fields().Positive("intermediate_size", intermediate_size));
  RETURN_IF_ERROR(Fields().Positive("projection_dim", projection_dim));
  RETURN_IF_ERROR(Fields().Positive("num_hidden_layers", num_hidden_layers));
  RETURN_IF_ERROR(Fields().Positive("num_attention_heads", num_attention_heads));
  RETURN_IF_ERROR(Fields().Positive("max_position_embeddings", max_position_embeddings));
  if (hidden_size % num_attention_heads != 0) {
    return Fields().Error(
        "num_attention_heads",
        absl::StrCat(num_attention_heads, " does not divide hidden_size ", hidden_size));
  }
  if (!SupportedActivation(hidden_act)) {
    return Fields().Error(
        "hidden_act", absl::StrCat("unsupported activation \"", hidden_act,
                                   "\" (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, "
                                   "relu, silu, swish)"));
  }
  if (!std::isfinite(layer_norm_eps) || layer_norm_eps <= 0) {
    return Fields().Error("layer_norm_eps",
                          absl::StrCat("must be positive and finite, got ", layer_norm_eps));
  }
  return absl::OkStatus();
}

absl::StatusOr<CLIPTextConfig> CLIPTextConfig::FromJson(const nlohmann::json& root) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPTextConfig: expected a JSON object, got ", root.type_name()));
  }
  const nlohmann::json* json = &root;
  // A CLIPConfig (text + vision): its text half, as CLIPTextConfig.from_pretrained takes it.
  if (auto it = root.find("text_config"); it != root.end()) {
    if (!it->is_object()) {
      return Fields().Error("text_config", absl::StrCat("expected an object, got ", it->dump()));
    }
    json = &*it;
  }
  CLIPTextConfig c;
  RETURN_IF_ERROR(Fields().ReadInt(*json, "vocab_size", &c.vocab_size));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "hidden_size", &c.hidden_size));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "intermediate_size", &c.intermediate_size));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "projection_dim", &c.projection_dim));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "num_hidden_layers", &c.num_hidden_layers));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "num_attention_heads", &c.num_attention_heads));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "max_position_embeddings", &c.max_position_embeddings));
  RETURN_IF_ERROR(Fields().ReadString(*json, "hidden_act", &c.hidden_act));
  RETURN_IF_ERROR(Fields().ReadDouble(*json, "layer_norm_eps", &c.layer_norm_eps));
  RETURN_IF_ERROR(Fields().ReadDouble(*json, "attention_dropout", &c.attention_dropout));
  RETURN_IF_ERROR(Fields().ReadDouble(*json, "initializer_range", &c.initializer_range));
  RETURN_IF_ERROR(Fields().ReadDouble(*json, "initializer_factor", &c.initializer_factor));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "pad_token_id", &c.pad_token_id));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "bos_token_id", &c.bos_token_id));
  RETURN_IF_ERROR(Fields().ReadInt(*json, "eos_token_id", &c.eos_token_id));
  RETURN_IF_ERROR(c.Validate());
  return c;
}

nlohmann::json CLIPTextConfig::ToJson(const std::string& class_name) const {
  nlohmann::json j = nlohmann::json::object();
  j["architectures"] = {class_name};
  j["model_type"] = "clip_text_model";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["projection_dim"] = projection_dim;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["max_position_embeddings"] = max_position_embeddings;
  j["hidden_act"] = hidden_act;
  j["layer_norm_eps"] = layer_norm_eps;
  j["attention_dropout"] = attention_dropout;
  j["initializer_range"] = initializer_range;
  j["initializer_factor"] = initializer_factor;
  j["pad_token_id"] = pad_token_id;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  return j;
}

std::vector<ClipParameter> ClipTextParameters(const CLIPTextConfig& c, bool with_projection) {
  std::vector<ClipParameter> out;
  const int64_t d = c.hidden_size;
  out.push_back({"text_model.embeddings.token_embedding.weight", {c.vocab_size, d}});
  out.push_back(
      {"text_model.embeddings.position_embedding.weight", {c.max_position_embeddings, d}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = absl::StrCat("text_model.encoder.layers.", i, ".");
    for (const char* proj : {"k_proj", "v_proj", "q_proj", "out_proj"}) {
      out.push_back({absl::StrCat(l, "self_attn.", proj, ".weight"), {d, d}});
      out.push_back({absl::StrCat(l, "self_attn.", proj, ".bias"), {d}});
    }
    out.push_back({l + "layer_norm1.weight", {d}});
    out.push_back({l + "layer_norm1.bias", {d}});
    out.push_back({l + "mlp.fc1.weight", {c.intermediate_size, d}});
    out.push_back({l + "mlp.fc1.bias", {c.intermediate_size}});
    out.push_back({l + "mlp.fc2.weight", {d, c.intermediate_size}});
    out.push_back({l + "mlp.fc2.bias", {d}});
    out.push_back({l + "layer_norm2.weight", {d}});
    out.push_back({l + "layer_norm2.bias", {d}});
  }
  out.push_back({"text_model.final_layer_norm.weight", {d}});
  out.push_back({"text_model.final_layer_norm.bias", {d}});
  if (with_projection) out.push_back({"text_projection.weight", {c.projection_dim, d}});
  return out;
}

}  // namespace ds::clip
