// DenoiseFlowMatchEuler on a model whose velocity is known in closed form, so every step can be
// checked against hand-computed values, plus the stop-within-one-step contract of the callback.
#include "handlers/flow_match.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "handlers/lora_host.h"
#include "handlers/model.h"

namespace ds {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// v(x, t, c) = w * x + t + c, with a parameter w, a per-row timestep t and an extra input c
// ("conditioning", broadcast). Counts its forwards.
class LinearVelocityModel final : public DiffusionModel {
 public:
  explicit LinearVelocityModel(double w, bool wrong_output_shape = false)
      : wrong_output_shape_(wrong_output_shape) {
    module_.register_parameter("w", torch::full({1}, w), /*requires_grad=*/false);
  }
  const std::string& class_name() const override { return name_; }
  const nlohmann::json& config() const override { return config_; }
  const ModelOptions& options() const override { return options_; }
  torch::nn::Module& module() override { return module_; }
  const torch::nn::Module& module() const override { return module_; }
  std::vector<std::string> required_inputs() const override {
    return {"hidden_states", "timestep", "conditioning"};
  }
  std::vector<std::string> optional_inputs() const override { return {}; }
  absl::StatusOr<torch::Tensor> Forward(const TensorMap& inputs,
                                        const LoraContext* /*lora*/) const override {
    ++forwards;
    for (const auto& name : required_inputs()) {
      if (inputs.count(name) == 0) return absl::InvalidArgumentError("missing " + name);
    }
    timesteps.push_back(inputs.at("timestep").clone());
    const torch::Tensor& x = inputs.at("hidden_states");
    torch::Tensor v = module_.named_parameters()["w"] * x + inputs.at("timestep").view({-1, 1, 1}) +
                      inputs.at("conditioning");
    if (wrong_output_shape_) v = v.narrow(2, 0, 1);
    return v;
  }

  mutable std::atomic<int> forwards{0};
  mutable std::vector<torch::Tensor> timesteps;

 private:
  std::string name_ = "LinearVelocityModel";
  nlohmann::json config_ = nlohmann::json::object();
  ModelOptions options_;
  torch::nn::Module module_;
  bool wrong_output_shape_;
};

struct Fixture {
  std::shared_ptr<LinearVelocityModel> model;
  std::unique_ptr<LoraHost> host;
};

Fixture Make(double w, bool wrong_output_shape = false) {
  Fixture f;
  f.model = std::make_shared<LinearVelocityModel>(w, wrong_output_shape);
  f.host = std::make_unique<LoraHost>(f.model, /*handler=*/nullptr);
  return f;
}

TEST(FlowMatchTest, TwoStepsMatchTheHandComputedEulerUpdate) {
  const double w = 0.5, c = 0.25;
  Fixture f = Make(w);
  // Two batch rows, 3 tokens, 2 channels.
  torch::Tensor x0 =
      torch::tensor({1.0f, -2.0f, 0.5f, 3.0f, 0.0f, -1.0f, 2.0f, 1.5f, -0.5f, 4.0f, -3.0f, 0.25f})
          .view({2, 3, 2});
  TensorMap inputs = {{"conditioning", torch::full({1}, c)}};
  std::vector<std::pair<int, int>> calls;
  auto out = DenoiseFlowMatchEuler(*f.host, inputs, x0, 2, nullptr, [&](int step, int total) {
    calls.emplace_back(step, total);
    return absl::OkStatus();
  });
  ASSERT_TRUE(out.ok()) << out.status();
  // The default schedule for 2 steps (FluxPipeline's linspace(1, 1/2, 2), shift 1) has sigmas
  // 1, 0.5, 0: x1 = x0 - 0.5 (w x0 + 1 + c); x2 = x1 - 0.5 (w x1 + 0.5 + c).
  const torch::Tensor x1 = x0 - 0.5 * (w * x0 + 1.0 + c);
  const torch::Tensor x2 = x1 - 0.5 * (w * x1 + 0.5 + c);
  // Element 0 by hand: x1 = 1 - 0.5 (0.5 + 1.25) = 0.125; x2 = 0.125 - 0.5 (0.0625 + 0.75).
  EXPECT_FLOAT_EQ(x2.view(-1)[0].item<float>(), -0.28125f);
  EXPECT_TRUE(torch::equal(*out, x2)) << *out << x2;
  EXPECT_EQ(f.model->forwards.load(), 2);
  ASSERT_EQ(f.model->timesteps.size(), 2u);
  EXPECT_TRUE(torch::equal(f.model->timesteps[0], torch::full({2}, 1.0f)));
  EXPECT_TRUE(torch::equal(f.model->timesteps[1], torch::full({2}, 0.5f)));
  EXPECT_THAT(calls, ElementsAre(std::make_pair(0, 2), std::make_pair(1, 2), std::make_pair(2, 2)));
}

// With a configured scheduler the model sees timesteps[i] / 1000 and the latents follow
// x <- x + (sigma_{i+1} - sigma_i) v with the scheduler's sigmas; the observer sees each step.
TEST(FlowMatchTest, FollowsTheSchedulersSigmasAndTimesteps) {
  const double w = -0.25, c = 0.5;
  Fixture f = Make(w);
  auto scheduler = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig::FluxDev());
  ASSERT_TRUE(scheduler.ok());
  ASSERT_TRUE(scheduler->SetTimestepsLikeFluxPipeline(3, /*image_seq_len=*/1024).ok());
  const torch::Tensor x0 = torch::linspace(-1.0, 2.0, 12).view({2, 3, 2});
  TensorMap inputs = {{"conditioning", torch::full({1}, c)}};
  std::vector<torch::Tensor> seen;
  auto out = DenoiseFlowMatchEuler(*f.host, inputs, x0, *scheduler, nullptr, nullptr,
                                   [&](int step, const torch::Tensor& x) {
                                     EXPECT_EQ(step, static_cast<int>(seen.size()));
                                     seen.push_back(x.clone());
                                   });
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(seen.size(), 3u);
  ASSERT_EQ(f.model->timesteps.size(), 3u);
  torch::Tensor x = x0;
  for (int i = 0; i < 3; ++i) {
    const torch::Tensor t = torch::full({2}, scheduler->timesteps()[i]) / 1000;
    EXPECT_TRUE(torch::equal(f.model->timesteps[i], t)) << i;
    const torch::Tensor v = w * x + t.view({-1, 1, 1}) + c;
    x = x + (scheduler->sigmas()[i + 1] - scheduler->sigmas()[i]) * v;
    EXPECT_TRUE(torch::allclose(seen[i], x, 1e-6, 1e-6)) << i;
  }
  EXPECT_TRUE(torch::equal(*out, seen.back()));
  // A shifted schedule is not the unshifted one: the first step is shorter.
  EXPECT_LT(scheduler->sigmas()[0] - scheduler->sigmas()[1], 1.0f / 3.0f);

  // The steps overload is the default-config scheduler set like FluxPipeline.
  auto plain = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig());
  ASSERT_TRUE(plain->SetTimestepsLikeFluxPipeline(3, 1).ok());
  auto a = DenoiseFlowMatchEuler(*f.host, inputs, x0, 3, nullptr, nullptr);
  auto b = DenoiseFlowMatchEuler(*f.host, inputs, x0, *plain, nullptr, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(torch::equal(*a, *b));
  EXPECT_FALSE(torch::equal(*a, *out));
  // A scheduler without timesteps is refused.
  auto unset = FlowMatchEulerScheduler::Create(FlowMatchEulerConfig());
  EXPECT_EQ(DenoiseFlowMatchEuler(*f.host, inputs, x0, *unset, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FlowMatchTest, CallbackErrorStopsWithinOneStep) {
  Fixture f = Make(0.1);
  TensorMap inputs = {{"conditioning", torch::zeros({1})}};
  auto out = DenoiseFlowMatchEuler(
      *f.host, inputs, torch::ones({1, 2, 2}), 50, nullptr, [](int step, int) {
        return step == 3 ? absl::CancelledError("client cancelled") : absl::OkStatus();
      });
  EXPECT_EQ(out.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(f.model->forwards.load(), 3);
  // Refused before any forward.
  Fixture g = Make(0.1);
  auto early = DenoiseFlowMatchEuler(*g.host, inputs, torch::ones({1, 2, 2}), 50, nullptr,
                                     [](int, int) { return absl::DeadlineExceededError("late"); });
  EXPECT_EQ(early.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(g.model->forwards.load(), 0);
}

TEST(FlowMatchTest, BadArguments) {
  Fixture f = Make(0.1);
  TensorMap inputs = {{"conditioning", torch::zeros({1})}};
  const torch::Tensor x = torch::ones({1, 2, 2});
  auto zero = DenoiseFlowMatchEuler(*f.host, inputs, x, 0, nullptr, nullptr);
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(zero.status().message(), HasSubstr("steps"));
  auto ints = DenoiseFlowMatchEuler(*f.host, inputs, torch::ones({1, 2, 2}, torch::kLong), 1,
                                    nullptr, nullptr);
  EXPECT_EQ(ints.status().code(), absl::StatusCode::kInvalidArgument);
  TensorMap reserved = inputs;
  reserved["timestep"] = torch::zeros({1});
  auto r = DenoiseFlowMatchEuler(*f.host, reserved, x, 1, nullptr, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("timestep"));
  auto missing = DenoiseFlowMatchEuler(*f.host, {}, x, 1, nullptr, nullptr);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("conditioning"));
  Fixture wrong = Make(0.1, /*wrong_output_shape=*/true);
  auto shape = DenoiseFlowMatchEuler(*wrong.host, inputs, x, 1, nullptr, nullptr);
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kUnimplemented);
}

TEST(FlowMatchTest, SeededNoiseIsReproducible) {
  auto a = SeededNoise({2, 3, 4}, 42, torch::kFloat32, torch::kCPU);
  auto b = SeededNoise({2, 3, 4}, 42, torch::kFloat32, torch::kCPU);
  auto c = SeededNoise({2, 3, 4}, 43, torch::kFloat32, torch::kCPU);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_TRUE(torch::equal(*a, *b));
  EXPECT_FALSE(torch::equal(*a, *c));
  // The same draw as a seeded torch.randn in float32, converted.
  auto half = SeededNoise({2, 3, 4}, 42, torch::kBFloat16, torch::kCPU);
  ASSERT_TRUE(half.ok());
  EXPECT_TRUE(torch::equal(*half, a->to(torch::kBFloat16)));
  EXPECT_EQ(SeededNoise({2, 0}, 1, torch::kFloat32, torch::kCPU).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ds
