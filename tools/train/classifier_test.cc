#include "tools/train/classifier.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "handlers/safetensors.h"
#include "testing/test_util.h"

namespace ds::train {
namespace {

using ::ds::test::TempDir;
using ::testing::HasSubstr;

constexpr int64_t kSide = 32;

std::vector<uint8_t> Render(const Scene& scene) {
  absl::StatusOr<std::vector<uint8_t>> image = RenderScene(scene, kSide);
  EXPECT_TRUE(image.ok()) << image.status();
  return image.ok() ? *image : std::vector<uint8_t>(kSide * kSide * 3);
}

Scene Sample(uint64_t seed, int64_t index) {
  absl::StatusOr<Scene> scene = SampleScene(AllCombinations(), seed, index, kSide);
  EXPECT_TRUE(scene.ok()) << scene.status();
  return scene.ok() ? *scene : Scene{};
}

uint8_t Clamp8(double v) { return static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L)); }

// Degrades an RGB render the way generation does: a Gaussian blur of standard deviation `blur`
// px, a per-image colour shift of up to ±`shift` per channel, per-pixel Gaussian noise of
// standard deviation `noise`, and a `speckle` share of pixels replaced by random colours.
std::vector<uint8_t> Degrade(const std::vector<uint8_t>& image, double blur, double shift,
                             double noise, double speckle, std::mt19937_64& rng) {
  std::vector<double> work(image.begin(), image.end());
  if (blur > 0) {
    std::array<double, 5> k{};
    double sum = 0;
    for (int i = 0; i < 5; ++i) sum += k[i] = std::exp(-(i - 2) * (i - 2) / (2 * blur * blur));
    for (double& v : k) v /= sum;
    for (int pass = 0; pass < 2; ++pass) {  // horizontal then vertical, edge pixels replicated
      std::vector<double> out(work.size());
      for (int64_t y = 0; y < kSide; ++y) {
        for (int64_t x = 0; x < kSide; ++x) {
          for (int ch = 0; ch < 3; ++ch) {
            double acc = 0;
            for (int i = -2; i <= 2; ++i) {
              const int64_t xx = pass == 0 ? std::clamp<int64_t>(x + i, 0, kSide - 1) : x;
              const int64_t yy = pass == 1 ? std::clamp<int64_t>(y + i, 0, kSide - 1) : y;
              acc += k[i + 2] * work[(yy * kSide + xx) * 3 + ch];
            }
            out[(y * kSide + x) * 3 + ch] = acc;
          }
        }
      }
      work = out;
    }
  }
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::normal_distribution<double> gauss(0, 1);
  std::uniform_real_distribution<double> unit(0, 1);
  const double shifts[3] = {shift * uniform(rng), shift * uniform(rng), shift * uniform(rng)};
  std::vector<uint8_t> out(image.size());
  for (int64_t i = 0; i < kSide * kSide; ++i) {
    const bool speck = unit(rng) < speckle;
    for (int ch = 0; ch < 3; ++ch) {
      const double v = speck ? 255 * unit(rng) : work[i * 3 + ch] + shifts[ch] + noise * gauss(rng);
      out[i * 3 + ch] = Clamp8(v);
    }
  }
  return out;
}

TEST(ReadColoursTest, ExactOnRendersOfEveryCombination) {
  // Two epochs of the stream: every combination twice, at different placements.
  for (int64_t i = 0; i < 300; ++i) {
    const Scene scene = Sample(7, i);
    const std::vector<uint8_t> image = Render(scene);
    absl::StatusOr<ColourReading> r = ReadColours(image.data(), kSide);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->background, scene.combination.background) << Caption(scene.combination);
    EXPECT_EQ(r->foreground, scene.combination.colour) << Caption(scene.combination);
    // The far-from-background share is the shape's area up to its anti-aliased edge.
    int64_t inside = 0;
    for (int64_t y = 0; y < kSide; ++y) {
      for (int64_t x = 0; x < kSide; ++x) inside += InsideShape(scene, x + 0.5, y + 0.5);
    }
    const double area = static_cast<double>(inside) / (kSide * kSide);
    EXPECT_GT(r->foreground_fraction, 0.3 * area) << Caption(scene.combination);
    EXPECT_LT(r->foreground_fraction, 1.7 * area + 0.02) << Caption(scene.combination);
  }
}

TEST(ReadColoursTest, RobustToBlurShiftNoiseAndSpeckle) {
  std::mt19937_64 rng(11);
  int wrong = 0;
  for (int64_t i = 0; i < 300; ++i) {
    const Scene scene = Sample(8, i);
    const std::vector<uint8_t> image = Degrade(Render(scene), 0.8, 30, 25, 0.02, rng);
    absl::StatusOr<ColourReading> r = ReadColours(image.data(), kSide);
    ASSERT_TRUE(r.ok()) << r.status();
    const bool ok =
        r->background == scene.combination.background && r->foreground == scene.combination.colour;
    if (!ok) {
      ++wrong;
      ADD_FAILURE() << Caption(scene.combination) << " read as " << ColourName(r->foreground)
                    << " on " << ColourName(r->background);
    }
  }
  EXPECT_EQ(wrong, 0);
}

TEST(ReadColoursTest, EmptyImageAndBadArguments) {
  std::vector<uint8_t> image(kSide * kSide * 3, 0);
  for (size_t i = 2; i < image.size(); i += 3) image[i] = 250;  // all (nearly) blue
  absl::StatusOr<ColourReading> r = ReadColours(image.data(), kSide);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->background, Colour::kBlue);
  EXPECT_NE(r->foreground, Colour::kBlue);
  EXPECT_EQ(r->foreground_fraction, 0);
  EXPECT_EQ(ReadColours(nullptr, kSide).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadColours(image.data(), 7).status().code(), absl::StatusCode::kInvalidArgument);
}

// On a render the mask is the shape's coverage: blending the two colours by it gives the render
// back up to rounding, interior pixels are 1 and far pixels 0.
TEST(ForegroundMaskTest, IsTheCoverageOfARender) {
  for (int64_t i = 0; i < 150; ++i) {
    const Scene scene = Sample(9, i);
    const std::vector<uint8_t> image = Render(scene);
    absl::StatusOr<torch::Tensor> mask =
        ForegroundMask(image.data(), kSide, scene.combination.background, scene.combination.colour);
    ASSERT_TRUE(mask.ok()) << mask.status();
    ASSERT_EQ(mask->sizes(), (std::vector<int64_t>{1, kSide, kSide}));
    ASSERT_EQ(mask->scalar_type(), torch::kFloat32);
    auto m = mask->accessor<float, 3>();
    const auto fg = ColourRgb(scene.combination.colour),
               bg = ColourRgb(scene.combination.background);
    int64_t ones = 0;
    for (int64_t y = 0; y < kSide; ++y) {
      for (int64_t x = 0; x < kSide; ++x) {
        const float a = m[0][y][x];
        ASSERT_GE(a, 0.f);
        ASSERT_LE(a, 1.f);
        for (int ch = 0; ch < 3; ++ch) {
          EXPECT_NEAR(a * fg[ch] + (1 - a) * bg[ch], image[(y * kSide + x) * 3 + ch], 1.0);
        }
        bool all_in = true;
        for (double dy : {0.0, 1.0}) {
          for (double dx : {0.0, 1.0}) {
            const bool in = InsideShape(scene, x + dx, y + dy);
            all_in = all_in && in;
          }
        }
        // Pixels wholly inside a convex shape, or farther than a pixel from it, are exact.
        if (all_in && scene.combination.shape != Shape::kStar &&
            scene.combination.shape != Shape::kCross) {
          EXPECT_EQ(a, 1.f);
        }
        ones += a == 1.f;
        const double d = std::hypot(x + 0.5 - scene.center_x, y + 0.5 - scene.center_y);
        if (d > 1.1 * scene.radius + 1) {  // a cross's bar ends reach 1.06 r
          EXPECT_EQ(a, 0.f);
        }
      }
    }
    EXPECT_GT(ones, 0) << Caption(scene.combination);
  }
}

TEST(ForegroundMaskTest, BadArguments) {
  std::vector<uint8_t> image(kSide * kSide * 3, 0);
  EXPECT_EQ(ForegroundMask(nullptr, kSide, Colour::kRed, Colour::kBlue).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ForegroundMask(image.data(), 0, Colour::kRed, Colour::kBlue).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ForegroundMask(image.data(), kSide, Colour::kRed, Colour::kRed).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ShapeClassifierTest, RejectsBadOptions) {
  ClassifierTrainOptions o;
  o.side = 4;
  EXPECT_EQ(ShapeClassifier::Train(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.steps = 0;
  EXPECT_EQ(ShapeClassifier::Train(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.batch = 0;
  EXPECT_EQ(ShapeClassifier::Train(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.learning_rate = std::nan("");
  EXPECT_EQ(ShapeClassifier::Train(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// Same options, same weights; another seed, other weights.
TEST(ShapeClassifierTest, TrainingIsDeterministic) {
  ClassifierTrainOptions o;
  o.seed = 5;
  o.steps = 4;
  o.batch = 16;
  o.pool = 40;
  int64_t calls = 0;
  o.progress = [&](int64_t step, double loss, double accuracy) {
    EXPECT_EQ(step, calls++);
    EXPECT_TRUE(std::isfinite(loss));
    EXPECT_GE(accuracy, 0);
    EXPECT_LE(accuracy, 1);
  };
  auto a = ShapeClassifier::Train(o);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(calls, 4);
  o.progress = nullptr;
  auto b = ShapeClassifier::Train(o);
  ASSERT_TRUE(b.ok()) << b.status();
  o.seed = 6;
  auto c = ShapeClassifier::Train(o);
  ASSERT_TRUE(c.ok()) << c.status();
  std::vector<torch::Tensor> masks;
  for (int64_t i = 0; i < 10; ++i) {
    const Scene scene = Sample(1, i);
    const std::vector<uint8_t> image = Render(scene);
    auto mask =
        ForegroundMask(image.data(), kSide, scene.combination.background, scene.combination.colour);
    ASSERT_TRUE(mask.ok()) << mask.status();
    masks.push_back(*mask);
  }
  auto pa = (*a)->Probabilities(masks), pb = (*b)->Probabilities(masks),
       pc = (*c)->Probabilities(masks);
  ASSERT_TRUE(pa.ok() && pb.ok() && pc.ok());
  EXPECT_TRUE(torch::equal(*pa, *pb));
  EXPECT_FALSE(torch::equal(*pa, *pc));
}

// One classifier trained for the accuracy tests (the suite's main cost).
class TrainedClassifierTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ClassifierTrainOptions o;
    o.seed = 2024;
    o.steps = kSteps;
    double last_acc = 0;
    o.progress = [&](int64_t, double, double acc) { last_acc = acc; };
    const auto start = std::chrono::steady_clock::now();
    auto trained = ShapeClassifier::Train(o);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    ASSERT_TRUE(trained.ok()) << trained.status();
    std::printf("trained %lld steps × %lld in %.1f s (last batch accuracy %.3f)\n",
                static_cast<long long>(o.steps), static_cast<long long>(o.batch), seconds,
                last_acc);
    classifier_ = trained->release();
  }
  static void TearDownTestSuite() {
    delete classifier_;
    classifier_ = nullptr;
  }
  // Fewer than the default 1500 to keep the test fast; enough for the accuracy bounds.
  static constexpr int64_t kSteps = 600;
  static ShapeClassifier* classifier_;
};
ShapeClassifier* TrainedClassifierTest::classifier_ = nullptr;

// Fresh renders (a seed the training never used), through the whole Read() pipeline.
TEST_F(TrainedClassifierTest, ReadsCleanRenders) {
  ASSERT_NE(classifier_, nullptr);
  int shapes_right = 0, all_right = 0;
  for (int64_t i = 0; i < 300; ++i) {
    const Scene scene = Sample(777, i);
    const std::vector<uint8_t> image = Render(scene);
    absl::StatusOr<SceneReading> r = classifier_->Read(image.data(), kSide);
    ASSERT_TRUE(r.ok()) << r.status();
    shapes_right += r->shape == scene.combination.shape;
    all_right += r->shape == scene.combination.shape &&
                 r->colours.foreground == scene.combination.colour &&
                 r->colours.background == scene.combination.background;
    EXPECT_GT(r->shape_probability, 0.2);
    EXPECT_LE(r->shape_probability, 1.0);
  }
  std::printf("clean renders: shape %d/300, shape+colours %d/300\n", shapes_right, all_right);
  EXPECT_GE(shapes_right, 291);  // ≥ 97%
  EXPECT_EQ(all_right, shapes_right);
}

TEST_F(TrainedClassifierTest, ReadsDegradedRenders) {
  ASSERT_NE(classifier_, nullptr);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> blur(0.3, 1.0), noise(5, 25);
  int shapes_right = 0, all_right = 0;
  for (int64_t i = 0; i < 300; ++i) {
    const Scene scene = Sample(778, i);
    const std::vector<uint8_t> image = Degrade(Render(scene), blur(rng), 20, noise(rng), 0.01, rng);
    absl::StatusOr<SceneReading> r = classifier_->Read(image.data(), kSide);
    ASSERT_TRUE(r.ok()) << r.status();
    shapes_right += r->shape == scene.combination.shape;
    all_right += r->shape == scene.combination.shape &&
                 r->colours.foreground == scene.combination.colour &&
                 r->colours.background == scene.combination.background;
  }
  std::printf("degraded renders: shape %d/300, shape+colours %d/300\n", shapes_right, all_right);
  EXPECT_GE(shapes_right, 270);  // ≥ 90%
  EXPECT_GE(all_right, 270);
}

// Batch classification gives what one-image Read() gives.
TEST_F(TrainedClassifierTest, BatchClassifyAgreesWithRead) {
  ASSERT_NE(classifier_, nullptr);
  std::vector<torch::Tensor> masks;
  std::vector<Shape> read;
  for (int64_t i = 0; i < 40; ++i) {
    const std::vector<uint8_t> image = Render(Sample(31, i));
    auto r = classifier_->Read(image.data(), kSide);
    ASSERT_TRUE(r.ok()) << r.status();
    read.push_back(r->shape);
    auto mask = ForegroundMask(image.data(), kSide, r->colours.background, r->colours.foreground);
    ASSERT_TRUE(mask.ok()) << mask.status();
    masks.push_back(*mask);
  }
  auto batch = classifier_->Classify(masks);
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(*batch, read);
}

TEST_F(TrainedClassifierTest, RejectsBadInputs) {
  ASSERT_NE(classifier_, nullptr);
  EXPECT_EQ(classifier_->Classify({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(classifier_->Classify({torch::zeros({1, 16, 16})}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(classifier_->Classify({torch::Tensor()}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> image(16 * 16 * 3, 0);
  EXPECT_EQ(classifier_->Read(image.data(), 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(classifier_->Read(nullptr, kSide).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TrainedClassifierTest, SaveLoadRoundTripGivesIdenticalPredictions) {
  ASSERT_NE(classifier_, nullptr);
  TempDir dir;
  const std::string path = dir.File("classifier.safetensors");
  ASSERT_TRUE(classifier_->Save(path).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "ds-shape-classifier");
  EXPECT_EQ((*file)->metadata().at("side"), "32");
  EXPECT_EQ((*file)->metadata().at("channels"), "16,32,64");
  auto loaded = ShapeClassifier::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->side(), kSide);
  std::vector<torch::Tensor> masks;
  std::mt19937_64 rng(5);
  for (int64_t i = 0; i < 50; ++i) {
    const Scene scene = Sample(40, i);
    const std::vector<uint8_t> image = Degrade(Render(scene), 0.7, 10, 15, 0.01, rng);
    auto mask =
        ForegroundMask(image.data(), kSide, scene.combination.background, scene.combination.colour);
    ASSERT_TRUE(mask.ok()) << mask.status();
    masks.push_back(*mask);
  }
  auto before = classifier_->Probabilities(masks);
  auto after = (*loaded)->Probabilities(masks);
  ASSERT_TRUE(before.ok() && after.ok());
  EXPECT_TRUE(torch::equal(*before, *after));
}

TEST_F(TrainedClassifierTest, LoadRejectsOtherFiles) {
  ASSERT_NE(classifier_, nullptr);
  TempDir dir;
  // Not a classifier at all.
  const std::string other = dir.File("other.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(other, {{"conv1.weight", torch::zeros({16, 1, 5, 5})}}, {{"format", "pt"}})
          .ok());
  auto r = ShapeClassifier::Load(other);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(other));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("\"format\""));

  // The right format but another architecture.
  const std::string saved = dir.File("saved.safetensors");
  ASSERT_TRUE(classifier_->Save(saved).ok());
  auto file = SafetensorsFile::Open(saved);
  ASSERT_TRUE(file.ok()) << file.status();
  auto weights = (*file)->GetAll();
  ASSERT_TRUE(weights.ok()) << weights.status();
  auto meta = (*file)->metadata();
  meta["channels"] = "8,16,32";
  const std::string arch = dir.File("arch.safetensors");
  ASSERT_TRUE(WriteSafetensors(arch, *weights, meta).ok());
  r = ShapeClassifier::Load(arch);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("\"channels\""));

  // The right metadata but a tensor missing.
  TensorMap partial = *weights;
  partial.erase("fc.bias");
  const std::string missing = dir.File("missing.safetensors");
  ASSERT_TRUE(WriteSafetensors(missing, partial, (*file)->metadata()).ok());
  r = ShapeClassifier::Load(missing);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("fc.bias"));

  EXPECT_EQ(ShapeClassifier::Load(dir.File("absent.safetensors")).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ds::train
