// ModelManager: the embedded default, atomic replacement (old instance serves until the new one is
// READY and stays alive for its requests, shown UNLOADING), failed loads, unload, the serving
// listener; and the preload config.
#include "server/model_manager.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "server/preload.h"
#include "testing/test_util.h"

namespace ds::server {
namespace {

using ::ds::test::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

struct Recorder {
  std::vector<std::pair<std::string, bool>> events;
  ModelManager::ServingListener listener() {
    return [this](const std::string& name, bool serving) { events.emplace_back(name, serving); };
  }
};

TEST(ModelManagerTest, EmbeddedDefaultServesAndRuns) {
  ModelManager m;
  Recorder rec;
  m.SetServingListener(rec.listener());
  auto loaded = m.LoadEmbedded();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto inst = m.Get("default");
  ASSERT_TRUE(inst.ok());
  EXPECT_EQ(*inst, loaded->instance);
  EXPECT_EQ((*inst)->spec->name, "flux");
  EXPECT_EQ((*inst)->source, "embedded");
  EXPECT_EQ((*inst)->dtype, "float32");
  EXPECT_GT((*inst)->parameter_bytes, 0);
  EXPECT_THAT((*inst)->model().required_inputs(), ::testing::Contains("guidance"));
  EXPECT_THAT(rec.events, ElementsAre(Pair("default", true)));
  // Deterministic weights: a second manager builds the identical model.
  ModelManager other;
  auto again = other.LoadEmbedded();
  ASSERT_TRUE(again.ok());
  const auto& a = (*inst)->model().module().named_parameters();
  const auto& b = again->instance->model().module().named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].value(), b[i].value()));
  EXPECT_GT(a[0].value().abs().sum().item<double>(), 0) << "weights are not initialized";
}

TEST(ModelManagerTest, ReplaceIsAtomicAndTheOldInstanceLivesForItsRequests) {
  ModelManager m;
  ASSERT_TRUE(m.LoadEmbedded().ok());
  InstancePtr old = *m.Get("default");  // a running request's snapshot
  EXPECT_EQ(m.LoadEmbedded().status().code(), absl::StatusCode::kAlreadyExists);
  auto replaced = m.LoadEmbedded("default", /*replace=*/true);
  ASSERT_TRUE(replaced.ok());
  EXPECT_TRUE(replaced->replaced);
  InstancePtr now = *m.Get("default");
  EXPECT_NE(now, old);
  std::vector<InstanceStatus> list = m.List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].state, InstanceState::kReady);
  EXPECT_EQ(list[0].instance, now);
  EXPECT_EQ(list[1].state, InstanceState::kUnloading);
  EXPECT_EQ(list[1].instance, old);
  list.clear();
  old.reset();  // the request ends
  EXPECT_EQ(m.List().size(), 1u);
}

TEST(ModelManagerTest, FailedLoadsAndUnload) {
  TempDir tmp;
  const std::string junk = tmp.File("junk.safetensors");
  std::ofstream(junk) << "not a checkpoint";
  ModelManager m;
  Recorder rec;
  m.SetServingListener(rec.listener());
  LoadModelRequest bad;
  bad.name = "bad name";
  bad.path = junk;
  EXPECT_EQ(m.Load(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.name = "x";
  bad.dtype = "int8";
  EXPECT_EQ(m.Load(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.dtype = "float32";
  bad.path = tmp.File("missing.safetensors");
  EXPECT_EQ(m.Load(bad).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(m.List().empty());  // argument errors never create an entry

  bad.path = junk;
  EXPECT_EQ(m.Load(bad).status().code(), absl::StatusCode::kInvalidArgument);
  auto failed = m.Get("x");
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(failed.status().message()), HasSubstr("FAILED"));
  ASSERT_EQ(m.List().size(), 1u);
  EXPECT_EQ(m.List()[0].state, InstanceState::kFailed);
  EXPECT_FALSE(m.List()[0].reason.empty());

  // A failed replacement leaves the old instance serving.
  ASSERT_TRUE(m.LoadEmbedded().ok());
  InstancePtr before = *m.Get("default");
  LoadModelRequest replace = bad;
  replace.name = "default";
  replace.replace = true;
  EXPECT_FALSE(m.Load(replace).ok());
  EXPECT_EQ(*m.Get("default"), before);

  EXPECT_TRUE(m.Unload("x").ok());
  EXPECT_TRUE(m.Unload("default").ok());
  EXPECT_EQ(m.Unload("default").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Get("default").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(rec.events,
              ElementsAre(Pair("x", false), Pair("default", true), Pair("default", false)));
}

TEST(PreloadTest, ParsesValidatesAndLoads) {
  auto config = ParsePreloadConfig(nlohmann::json::parse(R"({
      "models": [{"name": "demo", "embedded": true},
                 {"name": "file", "path": "sub/model.safetensors", "dtype": "bfloat16",
                  "config": {"axes_dims_rope": [4, 4, 8]}}],
      "adapters": [{"model": "file", "name": "a", "path": "a.safetensors", "weight": 0.5}]})"),
                                   "/models", "/adapters");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->models.size(), 2u);
  EXPECT_TRUE(config->models[0].embedded);
  EXPECT_EQ(config->models[1].path, "/models/sub/model.safetensors");
  EXPECT_EQ(config->models[1].dtype, "bfloat16");
  ASSERT_EQ(config->adapters.size(), 1u);
  EXPECT_EQ(config->adapters[0].path, "/adapters/a.safetensors");
  EXPECT_EQ(config->adapters[0].weight, 0.5);

  for (const char* bad :
       {R"({"modles": []})", R"({"models": [{"path": "x"}]})", R"({"models": [{"name": "x"}]})",
        R"({"models": [{"name": "x", "embedded": true, "path": "y"}]})",
        R"({"adapters": [{"model": "m", "name": "a", "path": "p", "weight": "1"}]})"}) {
    EXPECT_EQ(ParsePreloadConfig(nlohmann::json::parse(bad), "", "").status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }

  // Loading: the embedded model loads; the missing file fails without stopping the rest.
  ModelManager m;
  absl::Status s = Preload(*config, m, nullptr);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("file"));
  EXPECT_TRUE(m.Get("demo").ok());
}

}  // namespace
}  // namespace ds::server
