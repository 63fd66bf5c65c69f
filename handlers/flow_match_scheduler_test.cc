// FlowMatchEulerScheduler against diffusers' own values ($DS_GOLDEN_DIR/pipeline/scheduler/, see
// ../shared/golden/README.md): every schedule case of schedules.safetensors and every step case of
// step.safetensors, discovered from the files' keys and described by cases.json. Schedules and
// steps are computed with diffusers' dtype flow and must be bit-identical (the README's tolerance,
// sigmas atol 1e-6 / timesteps atol 1e-3, is reported too, but exactness is what is asserted).
// Plus config parsing and errors.
#include "handlers/flow_match_scheduler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "handlers/safetensors.h"
#include "testing/test_util.h"

namespace ds {
namespace {

using ::ds::test::GoldenDir;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

fs::path SchedulerDir() { return fs::path(GoldenDir()) / "pipeline" / "scheduler"; }

nlohmann::json ReadJson(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
}

const nlohmann::json& Cases() {
  static const nlohmann::json* cases = new nlohmann::json(ReadJson(SchedulerDir() / "cases.json"));
  return *cases;
}

// The config a cases.json entry names ("flux_dev" -> scheduler_flux_dev/scheduler_config.json).
FlowMatchEulerConfig ConfigNamed(const std::string& name) {
  const fs::path file = SchedulerDir() / Cases()["scheduler_configs"][name].get<std::string>();
  auto c = LoadFlowMatchEulerConfig(file.string());
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : FlowMatchEulerConfig();
}

std::vector<float> ToFloats(const torch::Tensor& t) {
  torch::Tensor c = t.to(torch::kFloat32).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Names <x> of keys "<prefix><x>/..." in a safetensors file.
std::set<std::string> KeyGroups(const SafetensorsFile& f, const std::string& prefix) {
  std::set<std::string> out;
  for (const std::string& k : f.names()) {
    if (k.rfind(prefix, 0) != 0) continue;
    const size_t slash = k.find('/', prefix.size());
    if (slash != std::string::npos) out.insert(k.substr(prefix.size(), slash - prefix.size()));
  }
  return out;
}

// ---- Config ---------------------------------------------------------------------------------

TEST(FlowMatchConfigTest, ParsesTheGoldenConfigsFieldByField) {
  const auto& configs = Cases()["scheduler_configs"];
  ASSERT_FALSE(configs.empty());
  for (const auto& [name, rel] : configs.items()) {
    SCOPED_TRACE(name);
    const nlohmann::json j = ReadJson(SchedulerDir() / rel.get<std::string>());
    const FlowMatchEulerConfig c = ConfigNamed(name);
    EXPECT_EQ(c.num_train_timesteps, j["num_train_timesteps"].get<int64_t>());
    EXPECT_EQ(c.shift, j["shift"].get<double>());
    EXPECT_EQ(c.use_dynamic_shifting, j["use_dynamic_shifting"].get<bool>());
    EXPECT_EQ(c.base_shift, j["base_shift"].get<double>());
    EXPECT_EQ(c.max_shift, j["max_shift"].get<double>());
    EXPECT_EQ(c.base_image_seq_len, j["base_image_seq_len"].get<int64_t>());
    EXPECT_EQ(c.max_image_seq_len, j["max_image_seq_len"].get<int64_t>());
    EXPECT_EQ(c.invert_sigmas, j["invert_sigmas"].get<bool>());
    EXPECT_EQ(c.shift_terminal.has_value(), !j["shift_terminal"].is_null());
    EXPECT_EQ(c.time_shift_type == TimeShiftType::kExponential,
              j["time_shift_type"].get<std::string>() == "exponential");
    // The folder and the file itself load the same.
    auto from_dir =
        LoadFlowMatchEulerConfig((SchedulerDir() / rel.get<std::string>()).parent_path().string());
    ASSERT_TRUE(from_dir.ok()) << from_dir.status();
    EXPECT_EQ(from_dir->shift, c.shift);
  }
}

void ExpectSameConfig(const FlowMatchEulerConfig& a, const FlowMatchEulerConfig& b) {
  EXPECT_EQ(a.num_train_timesteps, b.num_train_timesteps);
  EXPECT_EQ(a.shift, b.shift);
  EXPECT_EQ(a.use_dynamic_shifting, b.use_dynamic_shifting);
  EXPECT_EQ(a.base_shift, b.base_shift);
  EXPECT_EQ(a.max_shift, b.max_shift);
  EXPECT_EQ(a.base_image_seq_len, b.base_image_seq_len);
  EXPECT_EQ(a.max_image_seq_len, b.max_image_seq_len);
  EXPECT_EQ(a.invert_sigmas, b.invert_sigmas);
  EXPECT_EQ(a.shift_terminal, b.shift_terminal);
  EXPECT_EQ(a.time_shift_type, b.time_shift_type);
}

TEST(FlowMatchConfigTest, FluxDefaultsAreThePublishedConfigs) {
  // The README: flux_dev / flux_schnell are FLUX.1-dev's / FLUX.1-schnell's published configs.
  ExpectSameConfig(FlowMatchEulerConfig::FluxDev(), ConfigNamed("flux_dev"));
  ExpectSameConfig(FlowMatchEulerConfig::FluxSchnell(), ConfigNamed("flux_schnell"));
  // And an empty config is diffusers' defaults.
  auto empty = ParseFlowMatchEulerConfig(nlohmann::json::object());
  ASSERT_TRUE(empty.ok());
  ExpectSameConfig(*empty, FlowMatchEulerConfig::FluxSchnell());
}

TEST(FlowMatchConfigTest, UnknownKeysAreIgnoredAndNullsAccepted) {
  auto c =
      ParseFlowMatchEulerConfig(nlohmann::json{{"_class_name", "FlowMatchEulerDiscreteScheduler"},
                                               {"_diffusers_version", "0.30.0"},
                                               {"some_future_option", {1, 2, 3}},
                                               {"shift", 2},
                                               {"num_train_timesteps", 1000.0},
                                               {"shift_terminal", nullptr},
                                               {"base_shift", nullptr}});
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->shift, 2.0);
  EXPECT_FALSE(c->base_shift.has_value());
  EXPECT_FALSE(c->shift_terminal.has_value());
  // mu needs base_shift.
  auto mu = CalculateShift(256, *c);
  EXPECT_EQ(mu.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mu.status().message(), HasSubstr("base_shift"));
}

TEST(FlowMatchConfigTest, BadFieldsAreNamed) {
  struct Bad {
    nlohmann::json json;
    absl::StatusCode code;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {{{"shift", "3.0"}}, absl::StatusCode::kInvalidArgument, "shift"},
      {{{"shift", 0}}, absl::StatusCode::kInvalidArgument, "shift"},
      {{{"use_dynamic_shifting", 1}}, absl::StatusCode::kInvalidArgument, "use_dynamic_shifting"},
      {{{"num_train_timesteps", 0}}, absl::StatusCode::kInvalidArgument, "num_train_timesteps"},
      {{{"num_train_timesteps", 10.5}}, absl::StatusCode::kInvalidArgument, "num_train_timesteps"},
      {{{"base_image_seq_len", "256"}}, absl::StatusCode::kInvalidArgument, "base_image_seq_len"},
      {{{"max_image_seq_len", 256}}, absl::StatusCode::kInvalidArgument, "max_image_seq_len"},
      {{{"max_shift", true}}, absl::StatusCode::kInvalidArgument, "max_shift"},
      {{{"time_shift_type", "cubic"}}, absl::StatusCode::kInvalidArgument, "time_shift_type"},
      {{{"time_shift_type", 1}}, absl::StatusCode::kInvalidArgument, "time_shift_type"},
      {{{"shift_terminal", 1.0}}, absl::StatusCode::kInvalidArgument, "shift_terminal"},
      {{{"invert_sigmas", "no"}}, absl::StatusCode::kInvalidArgument, "invert_sigmas"},
      {{{"use_karras_sigmas", true}, {"use_beta_sigmas", true}},
       absl::StatusCode::kInvalidArgument,
       "use_beta_sigmas"},
      {{{"use_karras_sigmas", true}}, absl::StatusCode::kUnimplemented, "use_karras_sigmas"},
      {{{"use_exponential_sigmas", true}},
       absl::StatusCode::kUnimplemented,
       "use_exponential_sigmas"},
      {{{"use_beta_sigmas", true}}, absl::StatusCode::kUnimplemented, "use_beta_sigmas"},
      {{{"stochastic_sampling", true}}, absl::StatusCode::kUnimplemented, "stochastic_sampling"},
      {{{"_class_name", "EulerDiscreteScheduler"}},
       absl::StatusCode::kUnimplemented,
       "EulerDiscreteScheduler"},
      {nlohmann::json::array(), absl::StatusCode::kInvalidArgument, "object"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.json.dump());
    auto c = ParseFlowMatchEulerConfig(b.json);
    EXPECT_EQ(c.status().code(), b.code) << c.status();
    EXPECT_THAT(c.status().message(), HasSubstr(b.field));
  }
}

TEST(FlowMatchConfigTest, LoadErrorsNameTheFile) {
  test::TempDir dir;
  EXPECT_EQ(LoadFlowMatchEulerConfig(dir.path()).status().code(), absl::StatusCode::kNotFound);
  const std::string file = dir.File("scheduler_config.json");
  std::ofstream(file) << "{\"shift\": 3.0,";
  auto broken = LoadFlowMatchEulerConfig(dir.path());
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(broken.status().message(), HasSubstr(file));
  std::ofstream(file) << "{\"shift\": \"x\"}";
  auto typed = LoadFlowMatchEulerConfig(file);
  EXPECT_EQ(typed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(typed.status().message(), HasSubstr(file));
  EXPECT_THAT(typed.status().message(), HasSubstr("'shift'"));
}

// ---- Schedules ------------------------------------------------------------------------------

TEST(FlowMatchScheduleTest, EveryGoldenScheduleIsBitIdentical) {
  auto file = SafetensorsFile::Open((SchedulerDir() / "schedules.safetensors").string());
  ASSERT_TRUE(file.ok()) << file.status();
  const std::set<std::string> names = KeyGroups(**file, "case/");
  ASSERT_FALSE(names.empty());
  std::set<std::string> described;
  for (const auto& [name, unused] : Cases()["cases"].items()) described.insert(name);
  EXPECT_EQ(names, described) << "schedules.safetensors and cases.json list different cases";

  double worst_sigma = 0, worst_timestep = 0;
  int exact = 0;
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    const nlohmann::json& spec = Cases()["cases"][name];
    const std::string mode = spec["mode"].get<std::string>();
    const int64_t n = spec["num_inference_steps"].get<int64_t>();
    auto scheduler =
        FlowMatchEulerScheduler::Create(ConfigNamed(spec["scheduler_config"].get<std::string>()));
    ASSERT_TRUE(scheduler.ok()) << scheduler.status();
    std::optional<double> mu;
    if (!spec["mu"].is_null()) {
      // mu as FluxPipeline computes it: exactly the float64 the reference recorded.
      auto ours = CalculateShift(spec["image_seq_len"].get<int64_t>(), scheduler->config());
      ASSERT_TRUE(ours.ok()) << ours.status();
      EXPECT_EQ(*ours, spec["mu"].get<double>());
      mu = *ours;
    }
    absl::Status set;
    if (mode == "pipeline") {
      set = scheduler->SetTimesteps(n, FluxPipelineSigmas(n), mu);
      // The one-call form is the same.
      auto again = FlowMatchEulerScheduler::Create(scheduler->config());
      ASSERT_TRUE(
          again->SetTimestepsLikeFluxPipeline(n, spec["image_seq_len"].get<int64_t>()).ok());
      EXPECT_EQ(again->sigmas(), scheduler->sigmas());
    } else if (mode == "plain") {
      set = scheduler->SetTimesteps(n);
    } else if (mode == "plain_mu") {
      set = scheduler->SetTimesteps(n, std::nullopt, mu);
    } else {
      ADD_FAILURE() << "unknown mode " << mode;
      continue;
    }
    ASSERT_TRUE(set.ok()) << set;
    auto sig = (*file)->Get("case/" + name + "/sigmas");
    auto ts = (*file)->Get("case/" + name + "/timesteps");
    ASSERT_TRUE(sig.ok() && ts.ok());
    const std::vector<float> golden_sigmas = ToFloats(*sig), golden_ts = ToFloats(*ts);
    ASSERT_EQ(scheduler->sigmas().size(), golden_sigmas.size());
    ASSERT_EQ(scheduler->timesteps().size(), golden_ts.size());
    ASSERT_EQ(static_cast<int64_t>(golden_ts.size()), n);
    bool all_exact = true;
    for (size_t i = 0; i < golden_sigmas.size(); ++i) {
      worst_sigma = std::max(worst_sigma,
                             std::fabs(double(scheduler->sigmas()[i]) - double(golden_sigmas[i])));
      all_exact &= SameBits(scheduler->sigmas()[i], golden_sigmas[i]);
      EXPECT_TRUE(SameBits(scheduler->sigmas()[i], golden_sigmas[i]))
          << "sigma " << i << ": ours " << scheduler->sigmas()[i] << " golden " << golden_sigmas[i];
      // The JSON copy agrees with the tensor.
      EXPECT_EQ(static_cast<float>(spec["sigmas"][i].get<double>()), golden_sigmas[i]);
    }
    for (size_t i = 0; i < golden_ts.size(); ++i) {
      worst_timestep = std::max(
          worst_timestep, std::fabs(double(scheduler->timesteps()[i]) - double(golden_ts[i])));
      all_exact &= SameBits(scheduler->timesteps()[i], golden_ts[i]);
      EXPECT_TRUE(SameBits(scheduler->timesteps()[i], golden_ts[i]))
          << "timestep " << i << ": ours " << scheduler->timesteps()[i] << " golden "
          << golden_ts[i];
    }
    exact += all_exact;
  }
  // The README's tolerances (looser than the exactness asserted above).
  EXPECT_LE(worst_sigma, 1e-6);
  EXPECT_LE(worst_timestep, 1e-3);
  std::cout << exact << " of " << names.size()
            << " schedules bit-identical; max |sigma diff| = " << worst_sigma
            << ", max |timestep diff| = " << worst_timestep << "\n";
}

TEST(FlowMatchScheduleTest, NumpyLinspace) {
  for (int64_t n : {1, 2, 3, 7, 28, 1000}) {
    const std::vector<double> s = FluxPipelineSigmas(n);
    ASSERT_EQ(static_cast<int64_t>(s.size()), n);
    EXPECT_EQ(s.front(), 1.0);
    EXPECT_EQ(s.back(), 1.0 / static_cast<double>(n));
    for (size_t i = 1; i < s.size(); ++i) EXPECT_LT(s[i], s[i - 1]);
  }
  EXPECT_TRUE(FluxPipelineSigmas(0).empty());
  EXPECT_EQ(NumpyLinspace(5, 5, 3), std::vector<double>({5, 5, 5}));
  EXPECT_EQ(NumpyLinspace(2, 7, 1), std::vector<double>({2}));
}

// Configurations the goldens do not cover, checked against their defining formulas (in double;
// our values are float32, hence the tolerance).
TEST(FlowMatchScheduleTest, InvertShiftTerminalAndLinearFollowTheirFormulas) {
  FlowMatchEulerConfig base = FlowMatchEulerConfig::FluxDev();
  const int64_t n = 8;
  const std::vector<double> in = FluxPipelineSigmas(n);
  const double mu = 0.8;
  auto plain = FlowMatchEulerScheduler::Create(base);
  ASSERT_TRUE(plain->SetTimesteps(n, in, mu).ok());

  FlowMatchEulerConfig inv = base;
  inv.invert_sigmas = true;
  auto inverted = FlowMatchEulerScheduler::Create(inv);
  ASSERT_TRUE(inverted->SetTimesteps(n, in, mu).ok());
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(inverted->sigmas()[i], 1.0f - plain->sigmas()[i]);
    EXPECT_EQ(inverted->timesteps()[i], inverted->sigmas()[i] * 1000.0f);
  }
  EXPECT_EQ(inverted->sigmas()[n], 1.0f);

  FlowMatchEulerConfig term = base;
  term.shift_terminal = 0.1;
  auto stretched = FlowMatchEulerScheduler::Create(term);
  ASSERT_TRUE(stretched->SetTimesteps(n, in, mu).ok());
  EXPECT_NEAR(stretched->sigmas()[n - 1], 0.1, 1e-6);
  EXPECT_EQ(stretched->sigmas()[n], 0.0f);
  const double last = 1.0 - plain->sigmas()[n - 1];
  for (int64_t i = 0; i < n; ++i) {
    const double want = 1.0 - (1.0 - plain->sigmas()[i]) / (last / 0.9);
    EXPECT_NEAR(stretched->sigmas()[i], want, 1e-6) << i;
  }

  FlowMatchEulerConfig lin = base;
  lin.time_shift_type = TimeShiftType::kLinear;
  auto linear = FlowMatchEulerScheduler::Create(lin);
  ASSERT_TRUE(linear->SetTimesteps(n, in, mu).ok());
  for (int64_t i = 0; i < n; ++i) {
    const double s = static_cast<float>(in[i]);
    EXPECT_NEAR(linear->sigmas()[i], mu / (mu + (1.0 / s - 1.0)), 1e-6) << i;
    EXPECT_NEAR(plain->sigmas()[i], std::exp(mu) / (std::exp(mu) + (1.0 / s - 1.0)), 1e-6) << i;
  }
}

TEST(FlowMatchScheduleTest, SetTimestepsErrors) {
  auto dev = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig::FluxDev());
  ASSERT_TRUE(dev.ok());
  absl::Status no_mu = dev->SetTimesteps(4, FluxPipelineSigmas(4));
  EXPECT_EQ(no_mu.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(no_mu.message(), HasSubstr("mu"));
  EXPECT_EQ(dev->SetTimesteps(0, std::nullopt, 0.5).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->SetTimesteps(3, FluxPipelineSigmas(4), 0.5).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->SetTimesteps(2, std::vector<double>{1.0, NAN}, 0.5).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->SetTimestepsLikeFluxPipeline(4, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->num_inference_steps(), 0);  // nothing was set by the failed calls
  // A static config ignores mu and needs none.
  auto schnell = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig::FluxSchnell());
  EXPECT_TRUE(schnell->SetTimesteps(4).ok());
  EXPECT_EQ(schnell->num_inference_steps(), 4);
  EXPECT_EQ(schnell->sigmas().size(), 5u);
}

// ---- Step -----------------------------------------------------------------------------------

TEST(FlowMatchStepTest, EveryGoldenStepCaseIsBitIdentical) {
  auto file = SafetensorsFile::Open((SchedulerDir() / "step.safetensors").string());
  ASSERT_TRUE(file.ok()) << file.status();
  const std::set<std::string> names = KeyGroups(**file, "step/");
  ASSERT_FALSE(names.empty());
  for (const std::string& name : names) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(Cases()["step_cases"].contains(name)) << "cases.json does not describe " << name;
    const nlohmann::json& spec = Cases()["step_cases"][name];
    const int64_t n = spec["num_inference_steps"].get<int64_t>();
    auto scheduler =
        FlowMatchEulerScheduler::Create(ConfigNamed(spec["scheduler_config"].get<std::string>()));
    ASSERT_TRUE(scheduler.ok());
    ASSERT_TRUE(
        scheduler->SetTimestepsLikeFluxPipeline(n, spec["image_seq_len"].get<int64_t>()).ok());
    const std::string prefix = "step/" + name + "/";
    auto sample = (*file)->Get(prefix + "sample.0");
    ASSERT_TRUE(sample.ok()) << sample.status();
    torch::Tensor x = *sample;
    for (int64_t i = 0; i < n; ++i) {
      auto v = (*file)->Get(prefix + "model_output." + std::to_string(i));
      auto want = (*file)->Get(prefix + "sample." + std::to_string(i + 1));
      ASSERT_TRUE(v.ok() && want.ok()) << "step " << i;
      auto got = scheduler->Step(*v, i, x);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->scalar_type(), want->scalar_type());
      EXPECT_TRUE(torch::equal(*got, *want))
          << "step " << i << ": max |diff| = "
          << (got->to(torch::kFloat64) - want->to(torch::kFloat64)).abs().max().item<double>();
      x = *got;
    }
    EXPECT_FALSE((*file)->contains(prefix + "sample." + std::to_string(n + 1)));
  }
}

TEST(FlowMatchStepTest, Errors) {
  auto s = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig::FluxSchnell());
  ASSERT_TRUE(s.ok());
  const torch::Tensor x = torch::ones({1, 4, 8});
  EXPECT_EQ(s->Step(x, 0, x).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(s->SetTimesteps(2).ok());
  EXPECT_EQ(s->Step(x, 2, x).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s->Step(x, -1, x).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(s->Step(torch::ones({1, 4, 7}), 0, x).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Step(torch::ones({1, 4, 8}, torch::kLong), 0, x).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s->Step(torch::Tensor(), 0, x).status().code(), absl::StatusCode::kInvalidArgument);
  // The last step lands on sigma 0: x + (0 - sigma) * v.
  auto last = s->Step(torch::full({1, 4, 8}, 2.0f), 1, x);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(torch::equal(*last, x - s->sigmas()[1] * torch::full({1, 4, 8}, 2.0f)));
}

}  // namespace
}  // namespace ds
