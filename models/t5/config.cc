#include "models/t5/config.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "handlers/config_json.h"
#include "handlers/status.h"

namespace ds::t5 {
namespace {

// The field readers of this config ("T5Config.<field>: ..." errors).
const ConfigFields& Fields() {
  static const auto* fields = new ConfigFields("T5Config", int64_t{1} << 24);
  return *fields;
}

bool SupportedActivation(const std::string& act) {
  return act == "relu" || act == "gelu" || act == "gelu_new" || act == "gelu_pytorch_tanh" ||
         act == "silu" || act == "swish";
}

}  // namespace

absl::Status T5Config::Validate() const {
  RETURN_IF_ERROR(Fields().Positive("vocab_size", vocab_size));
  RETURN_IF_ERROR(Fields().Positive("d_model", d_model));
  RETURN_IF_ERROR(Fields().Positive("d_kv", d_kv));
  RETURN_IF_ERROR(Fields().Positive("d_ff", d_ff));
  RETURN_IF_ERROR(Fields().Positive("num_layers", num_layers));
  RETURN_IF_ERROR(Fields().Positive("num_heads", num_heads));
  RETURN_IF_ERROR(
      Fields().Positive("relative_attention_num_buckets", relative_attention_num_buckets));
  if (relative_attention_num_buckets < 4) {
    // Bidirectional bucketing halves the buckets, then uses half of those for exact distances.
    return Fields().Error("relative_attention_num_buckets",
                          absl::StrCat("must be at least 4, got ", relative_attention_num_buckets));
  }
  RETURN_IF_ERROR(
      Fields().Positive("relative_attention_max_distance", relative_attention_max_distance));
  if (!SupportedActivation(dense_act_fn)) {
    return Fields().Error(
        "dense_act_fn",
        absl::StrCat("unsupported activation \"", dense_act_fn,
                     "\" (supported: relu, gelu, gelu_new, gelu_pytorch_tanh, silu, "
                     "swish)"));
  }
  if (!std::isfinite(layer_norm_epsilon) || layer_norm_epsilon <= 0) {
    return Fields().Error("layer_norm_epsilon",
                          absl::StrCat("must be positive and finite, got ", layer_norm_epsilon));
  }
  return absl::OkStatus();
}

absl::StatusOr<T5Config> T5Config::FromJson(const nlohmann::json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("T5Config: expected a JSON object, got ", json.type_name()));
  }
  T5Config c;
  RETURN_IF_ERROR(Fields().ReadInt(json, "vocab_size", &c.vocab_size));
  RETURN_IF_ERROR(Fields().ReadInt(json, "d_model", &c.d_model));
  RETURN_IF_ERROR(Fields().ReadInt(json, "d_kv", &c.d_kv));
  RETURN_IF_ERROR(Fields().ReadInt(json, "d_ff", &c.d_ff));
  RETURN_IF_ERROR(Fields().ReadInt(json, "num_layers", &c.num_layers));
  if (auto it = json.find("num_decoder_layers"); it != json.end() && !it->is_null()) {
    RETURN_IF_ERROR(Fields().ReadInt(json, "num_decoder_layers", &c.num_decoder_layers));
  }
  RETURN_IF_ERROR(Fields().ReadInt(json, "num_heads", &c.num_heads));
  RETURN_IF_ERROR(
      Fields().ReadInt(json, "relative_attention_num_buckets", &c.relative_attention_num_buckets));
  RETURN_IF_ERROR(Fields().ReadInt(json, "relative_attention_max_distance",
                                   &c.relative_attention_max_distance));
  RETURN_IF_ERROR(Fields().ReadDouble(json, "dropout_rate", &c.dropout_rate));
  RETURN_IF_ERROR(Fields().ReadDouble(json, "layer_norm_epsilon", &c.layer_norm_epsilon));
  RETURN_IF_ERROR(Fields().ReadDouble(json, "initializer_factor", &c.initializer_factor));
  RETURN_IF_ERROR(Fields().ReadString(json, "feed_forward_proj", &c.feed_forward_proj));
  // T5Config.__init__: "[gated-]ACT"; "gated-gelu" means gelu_new.
  const std::vector<std::string> parts = absl::StrSplit(c.feed_forward_proj, '-');
  if (parts.empty() || parts.back().empty() || (parts.size() > 1 && parts[0] != "gated") ||
      parts.size() > 2) {
    return Fields().Error("feed_forward_proj",
                          absl::StrCat("\"", c.feed_forward_proj,
                                       "\" is not a valid activation; use \"gated-{ACT}\" or "
                                       "\"{ACT}\", e.g. \"gated-gelu\" or \"relu\""));
  }
  c.dense_act_fn = parts.back();
  c.is_gated_act = parts[0] == "gated";
  if (c.feed_forward_proj == "gated-gelu") c.dense_act_fn = "gelu_new";
  RETURN_IF_ERROR(Fields().ReadString(json, "dense_act_fn", &c.dense_act_fn));
  if (auto it = json.find("is_gated_act"); it != json.end()) {
    if (!it->is_boolean()) {
      return Fields().Error("is_gated_act", absl::StrCat("expected a boolean, got ", it->dump()));
    }
    c.is_gated_act = it->get<bool>();
  }
  RETURN_IF_ERROR(Fields().ReadInt(json, "pad_token_id", &c.pad_token_id));
  RETURN_IF_ERROR(Fields().ReadInt(json, "eos_token_id", &c.eos_token_id));
  RETURN_IF_ERROR(c.Validate());
  return c;
}

nlohmann::json T5Config::ToJson() const {
  nlohmann::json j = nlohmann::json::object();
  j["architectures"] = {kT5EncoderModelClassName};
  j["model_type"] = "t5";
  j["vocab_size"] = vocab_size;
  j["d_model"] = d_model;
  j["d_kv"] = d_kv;
  j["d_ff"] = d_ff;
  j["num_layers"] = num_layers;
  j["num_decoder_layers"] =
      num_decoder_layers < 0 ? nlohmann::json() : nlohmann::json(num_decoder_layers);
  j["num_heads"] = num_heads;
  j["relative_attention_num_buckets"] = relative_attention_num_buckets;
  j["relative_attention_max_distance"] = relative_attention_max_distance;
  j["dropout_rate"] = dropout_rate;
  j["layer_norm_epsilon"] = layer_norm_epsilon;
  j["initializer_factor"] = initializer_factor;
  j["feed_forward_proj"] = feed_forward_proj;
  j["dense_act_fn"] = dense_act_fn;
  j["is_gated_act"] = is_gated_act;
  j["pad_token_id"] = pad_token_id;
  j["eos_token_id"] = eos_token_id;
  return j;
}

std::vector<T5Parameter> T5EncoderParameters(const T5Config& c) {
  std::vector<T5Parameter> out;
  const int64_t d = c.d_model, inner = c.inner_dim();
  out.push_back({"shared.weight", {c.vocab_size, d}});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string b = absl::StrCat("encoder.block.", i, ".layer.");
    for (const char* p : {"q", "k", "v"}) {
      out.push_back({absl::StrCat(b, "0.SelfAttention.", p, ".weight"), {inner, d}});
    }
    out.push_back({b + "0.SelfAttention.o.weight", {d, inner}});
    if (i == 0) {
      out.push_back({b + "0.SelfAttention.relative_attention_bias.weight",
                     {c.relative_attention_num_buckets, c.num_heads}});
    }
    out.push_back({b + "0.layer_norm.weight", {d}});
    if (c.is_gated_act) {
      out.push_back({b + "1.DenseReluDense.wi_0.weight", {c.d_ff, d}});
      out.push_back({b + "1.DenseReluDense.wi_1.weight", {c.d_ff, d}});
    } else {
      out.push_back({b + "1.DenseReluDense.wi.weight", {c.d_ff, d}});
    }
    out.push_back({b + "1.DenseReluDense.wo.weight", {d, c.d_ff}});
    out.push_back({b + "1.layer_norm.weight", {d}});
  }
  out.push_back({"encoder.final_layer_norm.weight", {d}});
  return out;
}

}  // namespace ds::t5
