// The model-agnostic pipeline interface (handlers/pipeline.h) as Flux implements it: a diffusers
// pipeline folder loads through the PipelineRegistry by model_index.json's "_class_name" (spec.cc
// registers FluxPipeline), the DiffusionPipeline it returns generates exactly what FluxPipeline
// does, and its limits/description are derived from the loaded components. Plus the registry's
// and LoadPipelineFromFolder's errors.
#include "handlers/pipeline.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "handlers/safetensors.h"
#include "models/flux/pipeline.h"
#include "testing/test_util.h"

namespace ds {
namespace {

namespace fs = std::filesystem;
using ::ds::test::GoldenDir;

fs::path GoldenPipelineDir() { return fs::path(GoldenDir()) / "pipeline" / "flux_pipeline"; }

TEST(PipelineRegistryTest, FluxPipelineIsRegistered) {
  auto spec = PipelineRegistry::Global().Find("FluxPipeline");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ((*spec)->class_name, "FluxPipeline");
  auto missing = PipelineRegistry::Global().Find("NoSuchPipeline");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing.status().message(), "FluxPipeline")) << missing.status();
}

TEST(PipelineRegistryTest, RegisterRejectsDuplicatesAndEmptySpecs) {
  PipelineRegistry registry;
  PipelineSpec spec;
  spec.class_name = "TestPipeline";
  EXPECT_EQ(registry.Register(spec).code(), absl::StatusCode::kInvalidArgument);  // no factory
  spec.from_pretrained = [](const std::string& folder, const PipelineLoadOptions&)
      -> absl::StatusOr<std::unique_ptr<DiffusionPipeline>> {
    return absl::UnimplementedError(folder);
  };
  EXPECT_TRUE(registry.Register(spec).ok());
  EXPECT_EQ(registry.Register(spec).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_EQ(registry.List().size(), 1u);
}

TEST(PipelineRegistryTest, LoadFolderErrorsNameTheProblem) {
  const fs::path dir = fs::path(::testing::TempDir()) / "pipeline_registry_test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  EXPECT_FALSE(IsPipelineFolder(dir.string()));
  auto missing_index = LoadPipelineFromFolder(dir.string(), {});
  EXPECT_EQ(missing_index.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(missing_index.status().message(), "model_index.json"));
  auto missing_dir = LoadPipelineFromFolder((dir / "nope").string(), {});
  EXPECT_EQ(missing_dir.status().code(), absl::StatusCode::kNotFound);

  std::ofstream(dir / "model_index.json") << "[1, 2]";
  EXPECT_TRUE(IsPipelineFolder(dir.string()));
  EXPECT_EQ(LoadPipelineFromFolder(dir.string(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::ofstream(dir / "model_index.json") << R"({"transformer": ["diffusers", "X"]})";
  auto no_class = LoadPipelineFromFolder(dir.string(), {});
  EXPECT_EQ(no_class.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(no_class.status().message(), "_class_name")) << no_class.status();
  std::ofstream(dir / "model_index.json") << R"({"_class_name": "StableDiffusion9Pipeline"})";
  auto unknown = LoadPipelineFromFolder(dir.string(), {});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(absl::StrContains(unknown.status().message(), "StableDiffusion9Pipeline"))
      << unknown.status();
  fs::remove_all(dir);
}

TEST(PipelineRegistryTest, FolderLoadsAsFluxPipelineAndGeneratesLikeIt) {
  const fs::path folder = GoldenPipelineDir() / "dev";
  ASSERT_TRUE(IsPipelineFolder(folder.string()));
  auto loaded = LoadPipelineFromFolder(folder.string(), {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const DiffusionPipeline& pipeline = **loaded;
  EXPECT_EQ(pipeline.class_name(), "FluxPipeline");
  const auto* flux = dynamic_cast<const flux::FluxPipeline*>(&pipeline);
  ASSERT_NE(flux, nullptr);

  // Limits derive from the loaded components.
  const PipelineLimits limits = pipeline.limits();
  EXPECT_EQ(limits.image_size_multiple, 2 * flux->vae_scale_factor());
  EXPECT_EQ(limits.default_height, 128 * flux->vae_scale_factor());
  EXPECT_EQ(limits.prompt_embeds_dim, flux->transformer_config().joint_attention_dim);
  EXPECT_EQ(limits.pooled_prompt_embeds_dim, flux->transformer_config().pooled_projection_dim);
  EXPECT_EQ(limits.guidance_embeds, flux->transformer_config().guidance_embeds);
  EXPECT_EQ(limits.latent_channels, flux->num_channels_latents());
  EXPECT_TRUE(limits.can_decode);
  EXPECT_EQ(limits.options.max_inference_steps, flux->options().max_inference_steps);

  const PipelineDescription d = pipeline.describe();
  EXPECT_EQ(d.classes.at("transformer"), "FluxTransformer2DModel");
  EXPECT_EQ(d.classes.at("vae"), "AutoencoderKL");
  EXPECT_EQ(d.classes.at("scheduler"), "FlowMatchEulerDiscreteScheduler");
  EXPECT_EQ(d.sources, flux->components().sources);
  EXPECT_EQ(d.variant, flux->variant());
  EXPECT_EQ(&pipeline.transformer_host(), &flux->transformer_host());

  // Through the interface: the same bytes as FluxPipeline loaded directly.
  auto inputs = LoadSafetensorsWeights((GoldenPipelineDir() / "dev_dynamic_n2.safetensors").string());
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  PipelineRequest request;
  request.prompt_embeds = inputs->at("inputs/prompt_embeds");
  request.pooled_prompt_embeds = inputs->at("inputs/pooled_prompt_embeds");
  request.height = 32;
  request.width = 48;
  request.num_inference_steps = 2;
  request.seed = 7;
  request.png = true;
  int steps_seen = 0;
  auto via_interface = pipeline.Generate(request, [&](int step, int total) {
    EXPECT_EQ(total, 2);
    steps_seen = step;
    return absl::OkStatus();
  });
  ASSERT_TRUE(via_interface.ok()) << via_interface.status();
  EXPECT_EQ(steps_seen, 2);
  auto direct = flux::FluxPipeline::FromPretrained(folder.string());
  ASSERT_TRUE(direct.ok()) << direct.status();
  auto expected = (*direct)->Generate(request);
  ASSERT_TRUE(expected.ok()) << expected.status();
  ASSERT_EQ(via_interface->png.size(), 1u);
  EXPECT_EQ(via_interface->png, expected->png);
  EXPECT_TRUE(torch::equal(via_interface->latents, expected->latents));
  EXPECT_EQ(via_interface->seed, std::optional<uint64_t>(7));

  // A step callback's error stops the run and comes back unchanged.
  auto cancelled = pipeline.Generate(request, [](int step, int) {
    return step >= 1 ? absl::CancelledError("stop") : absl::OkStatus();
  });
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace ds
