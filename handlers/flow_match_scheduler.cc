#include "handlers/flow_match_scheduler.h"

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"

namespace ds {
namespace {

constexpr char kClassName[] = "FlowMatchEulerDiscreteScheduler";

// Each operation rounded on its own, as numpy evaluates one ufunc per operator: a product that
// feeds a sum must not be contracted into a fused multiply-add (which the compiler may do on
// targets with FMA), or the last bit can differ from diffusers.
template <typename T>
T Rounded(T x) {
  volatile T r = x;
  return r;
}

// ---- Config parsing --------------------------------------------------------------------------

std::string TypeName(const nlohmann::json& v) { return v.type_name(); }

absl::Status WrongType(const std::string& key, const char* want, const nlohmann::json& v) {
  return absl::InvalidArgumentError(absl::StrCat("scheduler config field '", key, "' must be ",
                                                 want, ", got ", TypeName(v), " ", v.dump()));
}

absl::Status ReadBool(const nlohmann::json& j, const std::string& key, bool* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (!it->is_boolean()) return WrongType(key, "a boolean", *it);
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadDouble(const nlohmann::json& j, const std::string& key, double* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (!it->is_number()) return WrongType(key, "a number", *it);
  *out = it->get<double>();
  if (!std::isfinite(*out)) return WrongType(key, "a finite number", *it);
  return absl::OkStatus();
}

// A number or null (null: unset).
absl::Status ReadOptionalDouble(const nlohmann::json& j, const std::string& key,
                                std::optional<double>* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (it->is_null()) {
    out->reset();
    return absl::OkStatus();
  }
  double v = 0;
  RETURN_IF_ERROR(ReadDouble(j, key, &v));
  *out = v;
  return absl::OkStatus();
}

// An integer; a float with an integral value (e.g. 1000.0) is accepted as Python would use it.
absl::Status ReadInt(const nlohmann::json& j, const std::string& key, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end()) return absl::OkStatus();
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) {
      *out = static_cast<int64_t>(d);
      return absl::OkStatus();
    }
  }
  return WrongType(key, "an integer", *it);
}

absl::Status Validate(const FlowMatchEulerConfig& c) {
  auto bad = [](const std::string& key, const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("scheduler config field '", key, "' ", why));
  };
  if (c.num_train_timesteps < 1) {
    return bad("num_train_timesteps", absl::StrCat("must be >= 1, got ", c.num_train_timesteps));
  }
  if (!(c.shift > 0) || !std::isfinite(c.shift)) {
    return bad("shift", absl::StrCat("must be a finite number > 0, got ", c.shift));
  }
  if (c.shift_terminal.has_value() && *c.shift_terminal >= 1.0) {
    return bad("shift_terminal", absl::StrCat("must be < 1, got ", *c.shift_terminal));
  }
  if (c.base_image_seq_len == c.max_image_seq_len) {
    return bad("max_image_seq_len",
               absl::StrCat("must differ from base_image_seq_len (both ", c.base_image_seq_len,
                            "): calculate_shift divides by their difference"));
  }
  const int flags = static_cast<int>(c.use_karras_sigmas) +
                    static_cast<int>(c.use_exponential_sigmas) +
                    static_cast<int>(c.use_beta_sigmas);
  if (flags > 1) {
    return bad("use_karras_sigmas",
               "conflicts: only one of use_beta_sigmas, use_exponential_sigmas, "
               "use_karras_sigmas can be true");
  }
  const std::pair<bool, const char*> unimplemented[] = {
      {c.use_karras_sigmas, "use_karras_sigmas"},
      {c.use_exponential_sigmas, "use_exponential_sigmas"},
      {c.use_beta_sigmas, "use_beta_sigmas"},
      {c.stochastic_sampling, "stochastic_sampling"}};
  for (const auto& [flag, key] : unimplemented) {
    if (flag) {
      return absl::UnimplementedError(
          absl::StrCat("scheduler config field '", key,
                       "' is true; this FlowMatchEulerDiscreteScheduler implements only the "
                       "default sigma schedule and the deterministic Euler step"));
    }
  }
  return absl::OkStatus();
}

// ---- Schedule arithmetic ---------------------------------------------------------------------
// `Real` is float for diffusers' float32 numpy path (sigmas given) and double for its float64 path
// (plain set_timesteps). Python scalars meet a float32 array as float32 values (numpy promotion).

template <typename Real>
Real StaticShift(Real shift, Real shift_minus_one, Real s) {
  const Real num = Rounded<Real>(shift * s);
  const Real den = Rounded<Real>(Real(1) + Rounded<Real>(shift_minus_one * s));
  return num / den;
}

template <typename Real>
std::vector<Real> ApplyShift(std::vector<Real> s, const FlowMatchEulerConfig& c, double mu) {
  if (c.use_dynamic_shifting) {
    // time_shift(mu, 1.0, t): (1 / t - 1) ** 1.0 is the value itself.
    const Real a =
        static_cast<Real>(c.time_shift_type == TimeShiftType::kExponential ? std::exp(mu) : mu);
    for (Real& v : s) {
      const Real inv = Rounded<Real>(Real(1) / v);
      const Real d = Rounded<Real>(inv - Real(1));
      v = a / Rounded<Real>(a + d);
    }
  } else {
    const Real shift = static_cast<Real>(c.shift);
    const Real shift_minus_one = static_cast<Real>(c.shift - 1.0);
    for (Real& v : s) v = StaticShift<Real>(shift, shift_minus_one, v);
  }
  if (c.shift_terminal.has_value() && *c.shift_terminal != 0.0 && !s.empty()) {
    // stretch_shift_to_terminal. numpy 1.x (what diffusers ran with): one_minus_z[-1] (a numpy
    // scalar) / (1 - shift_terminal) (a Python float) is float64; dividing the array by it keeps
    // the array's dtype.
    std::vector<Real> one_minus_z(s.size());
    for (size_t i = 0; i < s.size(); ++i) one_minus_z[i] = Real(1) - s[i];
    const Real scale =
        static_cast<Real>(static_cast<double>(one_minus_z.back()) / (1.0 - *c.shift_terminal));
    for (size_t i = 0; i < s.size(); ++i) s[i] = Real(1) - Rounded<Real>(one_minus_z[i] / scale);
  }
  return s;
}

}  // namespace

// ---- Public API ------------------------------------------------------------------------------

FlowMatchEulerConfig FlowMatchEulerConfig::FluxDev() {
  FlowMatchEulerConfig c;
  c.shift = 3.0;
  c.use_dynamic_shifting = true;
  return c;
}

FlowMatchEulerConfig FlowMatchEulerConfig::FluxSchnell() { return FlowMatchEulerConfig(); }

absl::StatusOr<FlowMatchEulerConfig> ParseFlowMatchEulerConfig(const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("scheduler config must be a JSON object, got ", j.type_name()));
  }
  if (auto it = j.find("_class_name"); it != j.end()) {
    if (!it->is_string()) return WrongType("_class_name", "a string", *it);
    if (it->get<std::string>() != kClassName) {
      return absl::UnimplementedError(absl::StrCat("scheduler class '", it->get<std::string>(),
                                                   "' is not supported (only ", kClassName, ")"));
    }
  }
  FlowMatchEulerConfig c;
  RETURN_IF_ERROR(ReadInt(j, "num_train_timesteps", &c.num_train_timesteps));
  RETURN_IF_ERROR(ReadDouble(j, "shift", &c.shift));
  RETURN_IF_ERROR(ReadBool(j, "use_dynamic_shifting", &c.use_dynamic_shifting));
  RETURN_IF_ERROR(ReadOptionalDouble(j, "base_shift", &c.base_shift));
  RETURN_IF_ERROR(ReadOptionalDouble(j, "max_shift", &c.max_shift));
  RETURN_IF_ERROR(ReadInt(j, "base_image_seq_len", &c.base_image_seq_len));
  RETURN_IF_ERROR(ReadInt(j, "max_image_seq_len", &c.max_image_seq_len));
  RETURN_IF_ERROR(ReadBool(j, "invert_sigmas", &c.invert_sigmas));
  RETURN_IF_ERROR(ReadOptionalDouble(j, "shift_terminal", &c.shift_terminal));
  RETURN_IF_ERROR(ReadBool(j, "use_karras_sigmas", &c.use_karras_sigmas));
  RETURN_IF_ERROR(ReadBool(j, "use_exponential_sigmas", &c.use_exponential_sigmas));
  RETURN_IF_ERROR(ReadBool(j, "use_beta_sigmas", &c.use_beta_sigmas));
  RETURN_IF_ERROR(ReadBool(j, "stochastic_sampling", &c.stochastic_sampling));
  if (auto it = j.find("time_shift_type"); it != j.end()) {
    if (!it->is_string()) return WrongType("time_shift_type", "a string", *it);
    const std::string t = it->get<std::string>();
    if (t == "exponential") {
      c.time_shift_type = TimeShiftType::kExponential;
    } else if (t == "linear") {
      c.time_shift_type = TimeShiftType::kLinear;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "scheduler config field 'time_shift_type' must be \"exponential\" or \"linear\", got \"",
          t, "\""));
    }
  }
  RETURN_IF_ERROR(Validate(c));
  return c;
}

absl::StatusOr<FlowMatchEulerConfig> LoadFlowMatchEulerConfig(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path file = path;
  if (fs::is_directory(file, ec)) file /= "scheduler_config.json";
  if (!fs::is_regular_file(file, ec)) {
    return absl::NotFoundError(absl::StrCat("scheduler config ", file.string(), " not found"));
  }
  std::ifstream in(file);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", file.string()));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(file.string(), ": not valid JSON"));
  }
  absl::StatusOr<FlowMatchEulerConfig> c = ParseFlowMatchEulerConfig(j);
  if (!c.ok()) return Annotate(c.status(), file.string());
  return c;
}

absl::StatusOr<double> CalculateShift(int64_t image_seq_len, const FlowMatchEulerConfig& c) {
  if (image_seq_len < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("image_seq_len must be >= 1, got ", image_seq_len));
  }
  if (!c.base_shift.has_value() || !c.max_shift.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scheduler config field '", c.base_shift.has_value() ? "max_shift" : "base_shift",
        "' is null; the resolution-dependent shift (mu) needs base_shift and max_shift"));
  }
  if (c.base_image_seq_len == c.max_image_seq_len) {
    return absl::InvalidArgumentError(
        "scheduler config: base_image_seq_len equals max_image_seq_len");
  }
  // Python evaluates these in float64 with ints promoted; the seq-len difference is exact.
  const double m = (*c.max_shift - *c.base_shift) /
                   static_cast<double>(c.max_image_seq_len - c.base_image_seq_len);
  const double b = *c.base_shift - Rounded<double>(m * static_cast<double>(c.base_image_seq_len));
  return Rounded<double>(static_cast<double>(image_seq_len) * m) + b;
}

std::vector<double> NumpyLinspace(double start, double stop, int64_t num) {
  std::vector<double> y;
  if (num < 1) return y;
  y.resize(static_cast<size_t>(num));
  const int64_t div = num - 1;
  const double delta = stop - start;
  if (div > 0) {
    const double step = delta / static_cast<double>(div);
    for (int64_t i = 0; i < num; ++i) {
      // numpy: y = arange(num) * step (or, for a zero step, arange / div * delta); y += start.
      const double yi = step == 0 ? Rounded<double>(static_cast<double>(i) / div) * delta
                                  : Rounded<double>(static_cast<double>(i) * step);
      y[static_cast<size_t>(i)] = yi + start;
    }
    y.back() = stop;
  } else {
    y[0] = Rounded<double>(0.0 * delta) + start;
  }
  return y;
}

std::vector<double> FluxPipelineSigmas(int64_t n) {
  if (n < 1) return {};
  return NumpyLinspace(1.0, 1.0 / static_cast<double>(n), n);
}

absl::StatusOr<FlowMatchEulerScheduler> FlowMatchEulerScheduler::Create(
    const FlowMatchEulerConfig& config) {
  RETURN_IF_ERROR(Validate(config));
  return FlowMatchEulerScheduler(config);
}

absl::Status FlowMatchEulerScheduler::SetTimesteps(int64_t n,
                                                   const std::optional<std::vector<double>>& sigmas,
                                                   std::optional<double> mu) {
  if (n < 1 || n > kMaxInferenceSteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_inference_steps must be in [1, ", kMaxInferenceSteps, "], got ", n));
  }
  if (sigmas.has_value()) {
    if (static_cast<int64_t>(sigmas->size()) != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("sigmas has ", sigmas->size(), " values; num_inference_steps is ", n));
    }
    for (size_t i = 0; i < sigmas->size(); ++i) {
      if (!std::isfinite((*sigmas)[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("sigmas[", i, "] is not finite: ", (*sigmas)[i]));
      }
    }
  }
  double mu_value = 0;
  if (config_.use_dynamic_shifting) {
    if (!mu.has_value()) {
      return absl::InvalidArgumentError(
          "mu must be given when the scheduler config has use_dynamic_shifting true");
    }
    if (!std::isfinite(*mu)) return absl::InvalidArgumentError(absl::StrCat("mu is ", *mu));
    mu_value = *mu;
  }
  const FlowMatchEulerConfig& c = config_;
  const double T = static_cast<double>(c.num_train_timesteps);

  std::vector<float> shifted;
  if (sigmas.has_value()) {
    // np.array(sigmas).astype(np.float32), then float32 arithmetic throughout.
    std::vector<float> s(sigmas->begin(), sigmas->end());
    shifted = ApplyShift<float>(std::move(s), c, mu_value);
  } else {
    // The constructor's schedule (torch float32): sigma = t / T for t = T..1, shifted when static.
    // Only its ends matter here.
    const float t_f = static_cast<float>(c.num_train_timesteps);
    float sigma_max = t_f / t_f;
    float sigma_min = 1.0f / t_f;
    if (!c.use_dynamic_shifting) {
      const float shift = static_cast<float>(c.shift);
      const float shift_minus_one = static_cast<float>(c.shift - 1.0);
      sigma_max = StaticShift<float>(shift, shift_minus_one, sigma_max);
      sigma_min = StaticShift<float>(shift, shift_minus_one, sigma_min);
    }
    // float64 numpy: linspace over timesteps, / T, shift, then float32.
    std::vector<double> s =
        NumpyLinspace(static_cast<double>(sigma_max) * T, static_cast<double>(sigma_min) * T, n);
    for (double& v : s) v = v / T;
    s = ApplyShift<double>(std::move(s), c, mu_value);
    shifted.assign(s.begin(), s.end());
  }

  // torch float32: timesteps = sigmas * T; terminal value appended.
  const float t_f = static_cast<float>(c.num_train_timesteps);
  std::vector<float> out_sigmas(shifted.size() + 1);
  std::vector<float> out_timesteps(shifted.size());
  for (size_t i = 0; i < shifted.size(); ++i) {
    const float s = c.invert_sigmas ? 1.0f - shifted[i] : shifted[i];
    out_sigmas[i] = s;
    out_timesteps[i] = s * t_f;
  }
  out_sigmas.back() = c.invert_sigmas ? 1.0f : 0.0f;
  sigmas_ = std::move(out_sigmas);
  timesteps_ = std::move(out_timesteps);
  return absl::OkStatus();
}

absl::Status FlowMatchEulerScheduler::SetTimestepsLikeFluxPipeline(int64_t n,
                                                                   int64_t image_seq_len) {
  if (n < 1 || n > kMaxInferenceSteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_inference_steps must be in [1, ", kMaxInferenceSteps, "], got ", n));
  }
  std::optional<double> mu;
  // FluxPipeline always computes mu; it only matters (and may only fail) with dynamic shifting.
  if (config_.use_dynamic_shifting) {
    ASSIGN_OR_RETURN(mu, CalculateShift(image_seq_len, config_));
  }
  return SetTimesteps(n, FluxPipelineSigmas(n), mu);
}

absl::StatusOr<torch::Tensor> FlowMatchEulerScheduler::Step(const torch::Tensor& model_output,
                                                            int64_t step_index,
                                                            const torch::Tensor& sample) const {
  if (timesteps_.empty()) {
    return absl::FailedPreconditionError("scheduler step before SetTimesteps");
  }
  if (step_index < 0 || step_index >= num_inference_steps()) {
    return absl::OutOfRangeError(
        absl::StrCat("step index ", step_index, " outside [0, ", num_inference_steps(), ")"));
  }
  if (!model_output.defined() || !sample.defined() || !model_output.is_floating_point() ||
      !sample.is_floating_point()) {
    return absl::InvalidArgumentError(
        "scheduler step needs floating-point model_output and sample tensors");
  }
  if (model_output.sizes() != sample.sizes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("model_output shape [", absl::StrJoin(model_output.sizes(), ", "),
                     "] differs from sample shape [", absl::StrJoin(sample.sizes(), ", "), "]"));
  }
  const float dt =
      sigmas_[static_cast<size_t>(step_index) + 1] - sigmas_[static_cast<size_t>(step_index)];
  return TorchCall("scheduler step", [&] {
    torch::NoGradGuard no_grad;
    const torch::ScalarType out_dtype = model_output.scalar_type();
    torch::Tensor product;
    if (out_dtype == torch::kFloat32 || out_dtype == torch::kFloat64) {
      product = model_output * static_cast<double>(dt);  // dt is exact in either
    } else {
      // dt meets a reduced-precision tensor: it is rounded to that dtype, and so is the product.
      const double dt_rounded =
          torch::scalar_tensor(dt, torch::kFloat32).to(out_dtype).item<double>();
      product = (model_output.to(torch::kFloat32) * dt_rounded).to(out_dtype);
    }
    const torch::ScalarType sum_dtype =
        out_dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
    torch::Tensor prev = sample.to(torch::kFloat32).to(sum_dtype) + product.to(sum_dtype);
    return prev.to(out_dtype);
  });
}

}  // namespace ds
