#include "models/autoencoder_kl/config.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/config_json.h"
#include "handlers/status.h"

namespace ds::autoencoder_kl {
namespace {

// The field readers of this config ("AutoencoderKLConfig.<field>: ..." errors).
const ConfigFields& Fields() {
  static const auto* fields = new ConfigFields("AutoencoderKLConfig", int64_t{1} << 20);
  return *fields;
}

// 2^(levels-1) must stay a sane scale factor.
constexpr int64_t kMaxLevels = 16;

absl::Status ReadNumber(const nlohmann::json& value, const char* field, double* out) {
  if (!value.is_number()) {
    return Fields().Error(field, absl::StrCat("expected a number, got ", value.dump()));
  }
  *out = value.get<double>();
  return absl::OkStatus();
}

// An optional list of numbers (null = unset).
absl::Status ReadNumbers(const nlohmann::json& json, const char* field,
                         std::optional<std::vector<double>>* out) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array()) {
    return Fields().Error(field,
                          absl::StrCat("expected a list of numbers or null, got ", it->dump()));
  }
  std::vector<double> values;
  for (const auto& v : *it) {
    double d = 0;
    if (!v.is_number()) {
      return Fields().Error(field,
                            absl::StrCat("expected a list of numbers or null, got ", it->dump()));
    }
    RETURN_IF_ERROR(ReadNumber(v, field, &d));
    values.push_back(d);
  }
  *out = std::move(values);
  return absl::OkStatus();
}

absl::Status ReadStrings(const nlohmann::json& json, const char* field,
                         std::vector<std::string>* out) {
  auto it = json.find(field);
  if (it == json.end()) return absl::OkStatus();
  if (!it->is_array()) {
    return Fields().Error(field, absl::StrCat("expected a list of strings, got ", it->dump()));
  }
  out->clear();
  for (const auto& v : *it) {
    if (!v.is_string()) {
      return Fields().Error(field, absl::StrCat("expected a list of strings, got ", it->dump()));
    }
    out->push_back(v.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status ReadInts(const nlohmann::json& json, const char* field, std::vector<int64_t>* out) {
  auto it = json.find(field);
  if (it == json.end()) return absl::OkStatus();
  if (!it->is_array()) {
    return Fields().Error(field, absl::StrCat("expected a list of integers, got ", it->dump()));
  }
  out->clear();
  for (const auto& v : *it) {
    if (!v.is_number_integer()) {
      return Fields().Error(field, absl::StrCat("expected a list of integers, got ", it->dump()));
    }
    out->push_back(v.get<int64_t>());
  }
  return absl::OkStatus();
}

absl::Status CheckTypes(const std::vector<std::string>& types, const char* field,
                        const char* expected, std::size_t levels) {
  if (types.size() != levels) {
    return Fields().Error(
        field, absl::StrCat("has ", types.size(), " entries but block_out_channels has ", levels,
                            " (one block per level)"));
  }
  for (std::size_t i = 0; i < types.size(); ++i) {
    if (types[i] != expected) {
      return Fields().Error(field, absl::StrCat("entry ", i, ": unknown block type \"", types[i],
                                                "\" (AutoencoderKL supports \"", expected, "\")"));
    }
  }
  return absl::OkStatus();
}

nlohmann::json Nullable(const std::optional<std::vector<double>>& v) {
  return v.has_value() ? nlohmann::json(*v) : nlohmann::json();
}

}  // namespace

absl::Status AutoencoderKLConfig::Validate() const {
  RETURN_IF_ERROR(Fields().Positive("in_channels", in_channels));
  RETURN_IF_ERROR(Fields().Positive("out_channels", out_channels));
  RETURN_IF_ERROR(Fields().Positive("latent_channels", latent_channels));
  RETURN_IF_ERROR(Fields().Positive("layers_per_block", layers_per_block));
  RETURN_IF_ERROR(Fields().Positive("norm_num_groups", norm_num_groups));
  if (block_out_channels.empty()) return Fields().Error("block_out_channels", "must not be empty");
  if (num_levels() > kMaxLevels) {
    return Fields().Error("block_out_channels", absl::StrCat("too many levels: ", num_levels(),
                                                             " (at most ", kMaxLevels, ")"));
  }
  for (std::size_t i = 0; i < block_out_channels.size(); ++i) {
    const int64_t c = block_out_channels[i];
    if (c <= 0 || c > Fields().max_size()) {
      return Fields().Error("block_out_channels",
                            absl::StrCat("entry ", i, " must be positive, got ", c));
    }
    if (c % norm_num_groups != 0) {
      return Fields().Error("norm_num_groups",
                            absl::StrCat(norm_num_groups, " does not divide block_out_channels[", i,
                                         "] = ", c, " (GroupNorm needs whole groups)"));
    }
  }
  RETURN_IF_ERROR(CheckTypes(down_block_types, "down_block_types", kDownEncoderBlock2D,
                             block_out_channels.size()));
  RETURN_IF_ERROR(
      CheckTypes(up_block_types, "up_block_types", kUpDecoderBlock2D, block_out_channels.size()));
  if (act_fn != "silu" && act_fn != "swish") {
    return Fields().Error("act_fn", absl::StrCat("unsupported activation \"", act_fn,
                                                 "\" (supported: \"silu\", \"swish\")"));
  }
  if (sample_size.empty() || sample_size.size() > 2) {
    return Fields().Error("sample_size", "expected an integer or [height, width]");
  }
  for (int64_t s : sample_size) RETURN_IF_ERROR(Fields().Positive("sample_size", s));
  if (!std::isfinite(scaling_factor) || scaling_factor == 0) {
    return Fields().Error("scaling_factor",
                          absl::StrCat("must be finite and non-zero, got ", scaling_factor));
  }
  if (shift_factor.has_value() && !std::isfinite(*shift_factor)) {
    return Fields().Error("shift_factor", absl::StrCat("must be finite, got ", *shift_factor));
  }
  return absl::OkStatus();
}

absl::StatusOr<AutoencoderKLConfig> AutoencoderKLConfig::FromJson(const nlohmann::json& json) {
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("AutoencoderKLConfig: expected a JSON object, got ", json.type_name()));
  }
  if (auto it = json.find("_class_name"); it != json.end()) {
    if (!it->is_string() || it->get<std::string>() != kAutoencoderKLClassName) {
      return Fields().Error("_class_name", absl::StrCat("expected \"", kAutoencoderKLClassName,
                                                        "\", got ", it->dump()));
    }
  }
  AutoencoderKLConfig c;
  RETURN_IF_ERROR(Fields().ReadInt(json, "in_channels", &c.in_channels));
  RETURN_IF_ERROR(Fields().ReadInt(json, "out_channels", &c.out_channels));
  RETURN_IF_ERROR(ReadStrings(json, "down_block_types", &c.down_block_types));
  RETURN_IF_ERROR(ReadStrings(json, "up_block_types", &c.up_block_types));
  RETURN_IF_ERROR(ReadInts(json, "block_out_channels", &c.block_out_channels));
  RETURN_IF_ERROR(Fields().ReadInt(json, "layers_per_block", &c.layers_per_block));
  if (auto it = json.find("act_fn"); it != json.end()) {
    if (!it->is_string()) {
      return Fields().Error("act_fn", absl::StrCat("expected a string, got ", it->dump()));
    }
    c.act_fn = it->get<std::string>();
  }
  RETURN_IF_ERROR(Fields().ReadInt(json, "latent_channels", &c.latent_channels));
  RETURN_IF_ERROR(Fields().ReadInt(json, "norm_num_groups", &c.norm_num_groups));
  if (auto it = json.find("sample_size"); it != json.end()) {
    if (it->is_number_integer()) {
      c.sample_size = {it->get<int64_t>()};
    } else {
      RETURN_IF_ERROR(ReadInts(json, "sample_size", &c.sample_size));
    }
  }
  if (auto it = json.find("scaling_factor"); it != json.end()) {
    RETURN_IF_ERROR(ReadNumber(*it, "scaling_factor", &c.scaling_factor));
  }
  if (auto it = json.find("shift_factor"); it != json.end() && !it->is_null()) {
    double shift = 0;
    RETURN_IF_ERROR(ReadNumber(*it, "shift_factor", &shift));
    c.shift_factor = shift;
  }
  RETURN_IF_ERROR(ReadNumbers(json, "latents_mean", &c.latents_mean));
  RETURN_IF_ERROR(ReadNumbers(json, "latents_std", &c.latents_std));
  RETURN_IF_ERROR(Fields().ReadBool(json, "force_upcast", &c.force_upcast));
  RETURN_IF_ERROR(Fields().ReadBool(json, "use_quant_conv", &c.use_quant_conv));
  RETURN_IF_ERROR(Fields().ReadBool(json, "use_post_quant_conv", &c.use_post_quant_conv));
  RETURN_IF_ERROR(Fields().ReadBool(json, "mid_block_add_attention", &c.mid_block_add_attention));
  RETURN_IF_ERROR(c.Validate());
  return c;
}

nlohmann::json AutoencoderKLConfig::ToJson() const {
  nlohmann::json j = nlohmann::json::object();
  j["_class_name"] = kAutoencoderKLClassName;
  j["in_channels"] = in_channels;
  j["out_channels"] = out_channels;
  j["down_block_types"] = down_block_types;
  j["up_block_types"] = up_block_types;
  j["block_out_channels"] = block_out_channels;
  j["layers_per_block"] = layers_per_block;
  j["act_fn"] = act_fn;
  j["latent_channels"] = latent_channels;
  j["norm_num_groups"] = norm_num_groups;
  j["sample_size"] =
      sample_size.size() == 1 ? nlohmann::json(sample_size[0]) : nlohmann::json(sample_size);
  j["scaling_factor"] = scaling_factor;
  j["shift_factor"] = shift_factor.has_value() ? nlohmann::json(*shift_factor) : nlohmann::json();
  j["latents_mean"] = Nullable(latents_mean);
  j["latents_std"] = Nullable(latents_std);
  j["force_upcast"] = force_upcast;
  j["use_quant_conv"] = use_quant_conv;
  j["use_post_quant_conv"] = use_post_quant_conv;
  j["mid_block_add_attention"] = mid_block_add_attention;
  return j;
}

// ---------------------------------------------------------------------------------------------
// The state-dict layout

namespace {

using Shape = std::vector<int64_t>;

class ParameterList {
 public:
  explicit ParameterList(std::vector<VaeParameter>* out) : out_(out) {}

  // A parameter whose shape is the same in both namings.
  void Add(const std::string& diffusers, const std::string& original, Shape shape) {
    out_->push_back({diffusers, original, shape, shape});
  }
  // weight [out, in, k, k] and bias [out].
  void Conv(const std::string& d, const std::string& o, int64_t in, int64_t out, int64_t k) {
    Add(d + ".weight", o + ".weight", {out, in, k, k});
    Add(d + ".bias", o + ".bias", {out});
  }
  void Norm(const std::string& d, const std::string& o, int64_t channels) {
    Add(d + ".weight", o + ".weight", {channels});
    Add(d + ".bias", o + ".bias", {channels});
  }
  // A diffusers Linear [c, c] that the original stores as a 1x1 conv [c, c, 1, 1].
  void AttentionLinear(const std::string& d, const std::string& o, int64_t c) {
    out_->push_back({d + ".weight", o + ".weight", {c, c}, {c, c, 1, 1}});
    Add(d + ".bias", o + ".bias", {c});
  }
  // ResnetBlock2D: norm1, conv1, norm2, conv2, conv_shortcut (original: nin_shortcut) when the
  // channel count changes.
  void Resnet(const std::string& d, const std::string& o, int64_t in, int64_t out) {
    Norm(d + ".norm1", o + ".norm1", in);
    Conv(d + ".conv1", o + ".conv1", in, out, 3);
    Norm(d + ".norm2", o + ".norm2", out);
    Conv(d + ".conv2", o + ".conv2", out, out, 3);
    if (in != out) Conv(d + ".conv_shortcut", o + ".nin_shortcut", in, out, 1);
  }
  // UNetMidBlock2D (one layer): resnets.0, attentions.0, resnets.1 (original: block_1, attn_1,
  // block_2).
  void Mid(const std::string& side, int64_t c, bool attention) {
    const std::string d = side + ".mid_block", o = side + ".mid";
    Resnet(d + ".resnets.0", o + ".block_1", c, c);
    if (attention) {
      const std::string da = d + ".attentions.0", oa = o + ".attn_1";
      Norm(da + ".group_norm", oa + ".norm", c);
      AttentionLinear(da + ".to_q", oa + ".q", c);
      AttentionLinear(da + ".to_k", oa + ".k", c);
      AttentionLinear(da + ".to_v", oa + ".v", c);
      AttentionLinear(da + ".to_out.0", oa + ".proj_out", c);
    }
    Resnet(d + ".resnets.1", o + ".block_2", c, c);
  }

 private:
  std::vector<VaeParameter>* out_;
};

}  // namespace

std::vector<VaeParameter> VaeParameters(const AutoencoderKLConfig& c) {
  std::vector<VaeParameter> out;
  ParameterList p(&out);
  const std::vector<int64_t>& b = c.block_out_channels;
  const int64_t n = c.num_levels();
  const int64_t top = b.back();

  // Encoder: levels from the highest resolution down.
  p.Conv("encoder.conv_in", "encoder.conv_in", c.in_channels, b[0], 3);
  int64_t channels = b[0];
  for (int64_t i = 0; i < n; ++i) {
    const std::string d = absl::StrCat("encoder.down_blocks.", i);
    const std::string o = absl::StrCat("encoder.down.", i);
    for (int64_t j = 0; j < c.layers_per_block; ++j) {
      p.Resnet(absl::StrCat(d, ".resnets.", j), absl::StrCat(o, ".block.", j), channels, b[i]);
      channels = b[i];
    }
    if (i != n - 1) p.Conv(d + ".downsamplers.0.conv", o + ".downsample.conv", b[i], b[i], 3);
  }
  p.Mid("encoder", top, c.mid_block_add_attention);
  p.Norm("encoder.conv_norm_out", "encoder.norm_out", top);
  p.Conv("encoder.conv_out", "encoder.conv_out", top, 2 * c.latent_channels, 3);

  // Decoder: diffusers numbers levels from the lowest resolution up (reversed channels), the
  // original numbers them like the encoder.
  p.Conv("decoder.conv_in", "decoder.conv_in", c.latent_channels, top, 3);
  p.Mid("decoder", top, c.mid_block_add_attention);
  channels = top;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t out_channels = b[n - 1 - i];
    const std::string d = absl::StrCat("decoder.up_blocks.", i);
    const std::string o = absl::StrCat("decoder.up.", n - 1 - i);
    for (int64_t j = 0; j <= c.layers_per_block; ++j) {
      p.Resnet(absl::StrCat(d, ".resnets.", j), absl::StrCat(o, ".block.", j), channels,
               out_channels);
      channels = out_channels;
    }
    if (i != n - 1) {
      p.Conv(d + ".upsamplers.0.conv", o + ".upsample.conv", out_channels, out_channels, 3);
    }
  }
  p.Norm("decoder.conv_norm_out", "decoder.norm_out", b[0]);
  p.Conv("decoder.conv_out", "decoder.conv_out", b[0], c.out_channels, 3);

  if (c.use_quant_conv) {
    p.Conv("quant_conv", "quant_conv", 2 * c.latent_channels, 2 * c.latent_channels, 1);
  }
  if (c.use_post_quant_conv) {
    p.Conv("post_quant_conv", "post_quant_conv", c.latent_channels, c.latent_channels, 1);
  }
  return out;
}

}  // namespace ds::autoencoder_kl
