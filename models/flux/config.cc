#include "models/flux/config.h"

#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds::flux {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("FluxConfig.", field, ": ", what));
}

// JSON integers only (1.0 is rejected: diffusers writes sizes as integers).
absl::Status ReadInt(const nlohmann::json& json, const char* field, int64_t* out) {
  auto it = json.find(field);
  if (it == json.end()) return absl::OkStatus();
  if (!it->is_number_integer()) {
    return FieldError(field, absl::StrCat("expected an integer, got ", it->dump()));
  }
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

// Far above any real model; keeps products such as inner_dim() · inner_dim() inside int64.
constexpr int64_t kMaxSize = int64_t{1} << 20;

absl::Status Positive(const char* field, int64_t value) {
  if (value <= 0) return FieldError(field, absl::StrCat("must be positive, got ", value));
  if (value > kMaxSize) return FieldError(field, absl::StrCat("too large: ", value));
  return absl::OkStatus();
}

}  // namespace

absl::Status FluxConfig::Validate() const {
  RETURN_IF_ERROR(Positive("patch_size", patch_size));
  RETURN_IF_ERROR(Positive("in_channels", in_channels));
  if (out_channels.has_value()) RETURN_IF_ERROR(Positive("out_channels", *out_channels));
  if (num_layers < 0 || num_layers > kMaxSize) {
    return FieldError("num_layers", absl::StrCat("must be >= 0, got ", num_layers));
  }
  if (num_single_layers < 0 || num_single_layers > kMaxSize) {
    return FieldError("num_single_layers", absl::StrCat("must be >= 0, got ", num_single_layers));
  }
  RETURN_IF_ERROR(Positive("attention_head_dim", attention_head_dim));
  RETURN_IF_ERROR(Positive("num_attention_heads", num_attention_heads));
  RETURN_IF_ERROR(Positive("joint_attention_dim", joint_attention_dim));
  RETURN_IF_ERROR(Positive("pooled_projection_dim", pooled_projection_dim));
  if (axes_dims_rope.empty()) return FieldError("axes_dims_rope", "must not be empty");
  for (size_t i = 0; i < axes_dims_rope.size(); ++i) {
    if (axes_dims_rope[i] <= 0 || axes_dims_rope[i] % 2 != 0) {
      return FieldError(
          "axes_dims_rope",
          absl::StrCat("entry ", i, " must be positive and even, got ", axes_dims_rope[i]));
    }
  }
  const int64_t sum = std::accumulate(axes_dims_rope.begin(), axes_dims_rope.end(), int64_t{0});
  if (sum != attention_head_dim) {
    return FieldError("axes_dims_rope",
                      absl::StrCat("sum [", absl::StrJoin(axes_dims_rope, ", "), "] = ", sum,
                                   " must equal attention_head_dim ", attention_head_dim));
  }
  return absl::OkStatus();
}

absl::StatusOr<FluxConfig> FluxConfig::FromJson(const nlohmann::json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("FluxConfig: expected a JSON object, got ", json.type_name()));
  }
  if (auto it = json.find("_class_name"); it != json.end()) {
    if (!it->is_string() || it->get<std::string>() != kFluxClassName) {
      return FieldError("_class_name",
                        absl::StrCat("expected \"", kFluxClassName, "\", got ", it->dump()));
    }
  }
  FluxConfig c;
  RETURN_IF_ERROR(ReadInt(json, "patch_size", &c.patch_size));
  RETURN_IF_ERROR(ReadInt(json, "in_channels", &c.in_channels));
  if (auto it = json.find("out_channels"); it != json.end() && !it->is_null()) {
    int64_t out = 0;
    RETURN_IF_ERROR(ReadInt(json, "out_channels", &out));
    c.out_channels = out;
  }
  RETURN_IF_ERROR(ReadInt(json, "num_layers", &c.num_layers));
  RETURN_IF_ERROR(ReadInt(json, "num_single_layers", &c.num_single_layers));
  RETURN_IF_ERROR(ReadInt(json, "attention_head_dim", &c.attention_head_dim));
  RETURN_IF_ERROR(ReadInt(json, "num_attention_heads", &c.num_attention_heads));
  RETURN_IF_ERROR(ReadInt(json, "joint_attention_dim", &c.joint_attention_dim));
  RETURN_IF_ERROR(ReadInt(json, "pooled_projection_dim", &c.pooled_projection_dim));
  if (auto it = json.find("guidance_embeds"); it != json.end()) {
    if (!it->is_boolean()) {
      return FieldError("guidance_embeds", absl::StrCat("expected a boolean, got ", it->dump()));
    }
    c.guidance_embeds = it->get<bool>();
  }
  if (auto it = json.find("axes_dims_rope"); it != json.end()) {
    if (!it->is_array()) {
      return FieldError("axes_dims_rope",
                        absl::StrCat("expected a list of integers, got ", it->dump()));
    }
    c.axes_dims_rope.clear();
    for (const auto& v : *it) {
      if (!v.is_number_integer()) {
        return FieldError("axes_dims_rope",
                          absl::StrCat("expected a list of integers, got ", it->dump()));
      }
      c.axes_dims_rope.push_back(v.get<int64_t>());
    }
  }
  RETURN_IF_ERROR(c.Validate());
  return c;
}

nlohmann::json FluxConfig::ToJson() const {
  nlohmann::json j = nlohmann::json::object();
  j["_class_name"] = kFluxClassName;
  j["patch_size"] = patch_size;
  j["in_channels"] = in_channels;
  j["out_channels"] = out_channels.has_value() ? nlohmann::json(*out_channels) : nlohmann::json();
  j["num_layers"] = num_layers;
  j["num_single_layers"] = num_single_layers;
  j["attention_head_dim"] = attention_head_dim;
  j["num_attention_heads"] = num_attention_heads;
  j["joint_attention_dim"] = joint_attention_dim;
  j["pooled_projection_dim"] = pooled_projection_dim;
  j["guidance_embeds"] = guidance_embeds;
  j["axes_dims_rope"] = axes_dims_rope;
  return j;
}

}  // namespace ds::flux
