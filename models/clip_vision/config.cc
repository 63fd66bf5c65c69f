#include "models/clip_vision/config.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "handlers/config_json.h"
#include "handlers/status.h"

namespace ds::clip_vision {
namespace {

// The field readers of this config ("CLIPVisionConfig.<field>: ..." errors).
const ConfigFields& Fields() {
  static const auto* fields = new ConfigFields("CLIPVisionConfig", int64_t{1} << 20);
  return *fields;
}

constexpr char kActivations[][20] = {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh",
                                     "gelu_fast",  "relu", "silu",     "swish"};

}  // namespace

absl::Status ClipVisionConfig::Validate() const {
  RETURN_IF_ERROR(Fields().Positive("hidden_size", hidden_size));
  RETURN_IF_ERROR(Fields().Positive("intermediate_size", intermediate_size));
  RETURN_IF_ERROR(Fields().Positive("projection_dim", projection_dim));
  RETURN_IF_ERROR(Fields().Positive("num_hidden_layers", num_hidden_layers));
  RETURN_IF_ERROR(Fields().Positive("num_attention_heads", num_attention_heads));
  RETURN_IF_ERROR(Fields().Positive("num_channels", num_channels));
  RETURN_IF_ERROR(Fields().Positive("image_size", image_size));
  RETURN_IF_ERROR(Fields().Positive("patch_size", patch_size));
  if (hidden_size % num_attention_heads != 0) {
    return Fields().Error(
        "num_attention_heads",
        absl::StrCat(num_attention_heads, " does not divide hidden_size ", hidden_size));
  }
  if (image_size % patch_size != 0) {
    return Fields().Error("patch_size",
                          absl::StrCat(patch_size, " does not divide image_size ", image_size));
  }
  if (std::none_of(std::begin(kActivations), std::end(kActivations),
                   [&](const char* a) { return hidden_act == a; })) {
    return Fields().Error(
        "hidden_act", absl::StrCat("unsupported activation \"", hidden_act,
                                   "\" (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, "
                                   "relu, silu, swish)"));
  }
  if (!std::isfinite(layer_norm_eps) || layer_norm_eps <= 0) {
    return Fields().Error("layer_norm_eps",
                          absl::StrCat("must be finite and positive, got ", layer_norm_eps));
  }
  return absl::OkStatus();
}

absl::StatusOr<ClipVisionConfig> ClipVisionConfig::FromJson(const nlohmann::json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CLIPVisionConfig: expected a JSON object, got ", json.type_name()));
  }
  const nlohmann::json* j = &json;
  if (auto mt = json.find("model_type"); mt != json.end()) {
    if (!mt->is_string()) return Fields().Error("model_type", "expected a string");
    const std::string type = mt->get<std::string>();
    if (type == "clip") {
      // A full CLIPModel config: transformers' CLIPVisionConfig.from_pretrained takes its
      // vision_config.
      auto vc = json.find("vision_config");
      if (vc == json.end() || !vc->is_object()) {
        return Fields().Error("vision_config", "a \"clip\" config needs a vision_config object");
      }
      j = &*vc;
    } else if (type != kClipVisionModelType) {
      return Fields().Error("model_type", absl::StrCat("expected \"", kClipVisionModelType,
                                                       "\" (or \"clip\"), got \"", type, "\""));
    } else if (auto arch = json.find("architectures"); arch != json.end() && !arch->is_null()) {
      const bool ok =
          arch->is_array() && std::any_of(arch->begin(), arch->end(), [](const nlohmann::json& a) {
            return a.is_string() && a.get<std::string>() == kClipVisionClassName;
          });
      if (!ok) {
        return Fields().Error("architectures", absl::StrCat("expected [\"", kClipVisionClassName,
                                                            "\"], got ", arch->dump()));
      }
    }
  }
  ClipVisionConfig c;
  RETURN_IF_ERROR(Fields().ReadInt(*j, "hidden_size", &c.hidden_size));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "intermediate_size", &c.intermediate_size));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "projection_dim", &c.projection_dim));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "num_hidden_layers", &c.num_hidden_layers));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "num_attention_heads", &c.num_attention_heads));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "num_channels", &c.num_channels));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "image_size", &c.image_size));
  RETURN_IF_ERROR(Fields().ReadInt(*j, "patch_size", &c.patch_size));
  if (auto it = j->find("hidden_act"); it != j->end()) {
    if (!it->is_string()) {
      return Fields().Error("hidden_act", absl::StrCat("expected a string, got ", it->dump()));
    }
    c.hidden_act = it->get<std::string>();
  }
  if (auto it = j->find("layer_norm_eps"); it != j->end()) {
    if (!it->is_number()) {
      return Fields().Error("layer_norm_eps", absl::StrCat("expected a number, got ", it->dump()));
    }
    c.layer_norm_eps = it->get<double>();
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

nlohmann::json ClipVisionConfig::ToJson() const {
  return {{"architectures", {kClipVisionClassName}},
          {"model_type", kClipVisionModelType},
          {"hidden_size", hidden_size},
          {"intermediate_size", intermediate_size},
          {"projection_dim", projection_dim},
          {"num_hidden_layers", num_hidden_layers},
          {"num_attention_heads", num_attention_heads},
          {"num_channels", num_channels},
          {"image_size", image_size},
          {"patch_size", patch_size},
          {"hidden_act", hidden_act},
          {"layer_norm_eps", layer_norm_eps}};
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ClipVisionParameters(
    const ClipVisionConfig& c) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  const int64_t d = c.hidden_size;
  const std::string e = "vision_model.embeddings.";
  out.push_back({e + "class_embedding", {d}});
  out.push_back({e + "patch_embedding.weight", {d, c.num_channels, c.patch_size, c.patch_size}});
  out.push_back({e + "position_embedding.weight", {c.num_positions(), d}});
  out.push_back({"vision_model.pre_layrnorm.weight", {d}});
  out.push_back({"vision_model.pre_layrnorm.bias", {d}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string l = absl::StrCat("vision_model.encoder.layers.", i, ".");
    for (const char* p : {"k_proj", "v_proj", "q_proj", "out_proj"}) {
      out.push_back({absl::StrCat(l, "self_attn.", p, ".weight"), {d, d}});
      out.push_back({absl::StrCat(l, "self_attn.", p, ".bias"), {d}});
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
  out.push_back({"vision_model.post_layernorm.weight", {d}});
  out.push_back({"vision_model.post_layernorm.bias", {d}});
  out.push_back({"visual_projection.weight", {c.projection_dim, d}});
  return out;
}

}  // namespace ds::clip_vision
