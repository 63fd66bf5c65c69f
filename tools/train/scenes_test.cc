#include "tools/train/scenes.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <tuple>

namespace ds::train {
namespace {

using ::testing::HasSubstr;

TEST(ScenesTest, CaptionsNameShapeColourAndBackground) {
  EXPECT_EQ(Caption({Shape::kCircle, Colour::kRed, Colour::kBlue}),
            "a red circle on a blue background");
  std::set<std::string> captions;
  for (const Combination& c : AllCombinations()) {
    EXPECT_NE(c.colour, c.background);
    const std::string caption = Caption(c);
    EXPECT_THAT(caption, HasSubstr(" " + ShapeName(c.shape) + " on a "));
    captions.insert(caption);
  }
  EXPECT_EQ(captions.size(), 5u * 6u * 5u);  // all distinct
}

// The split: disjoint, complete, 15 held out, and training still shows every (shape, colour),
// every (shape, background) and every (colour, background) pair, so held-out captions are new
// combinations of seen parts.
TEST(ScenesTest, HeldOutSplitKeepsEveryPairInTraining) {
  const auto held = HeldOutCombinations();
  const auto train = TrainingCombinations();
  EXPECT_EQ(held.size(), 15u);
  EXPECT_EQ(held.size() + train.size(), AllCombinations().size());
  std::set<std::tuple<int, int, int>> seen;
  std::set<std::pair<int, int>> shape_fg, shape_bg, fg_bg;
  for (const Combination& c : train) {
    EXPECT_FALSE(IsHeldOut(c));
    const int s = static_cast<int>(c.shape), f = static_cast<int>(c.colour),
              b = static_cast<int>(c.background);
    seen.insert({s, f, b});
    shape_fg.insert({s, f});
    shape_bg.insert({s, b});
    fg_bg.insert({f, b});
  }
  for (const Combination& c : held) {
    EXPECT_TRUE(IsHeldOut(c));
    EXPECT_NE(c.colour, c.background);
    EXPECT_EQ(seen.count({static_cast<int>(c.shape), static_cast<int>(c.colour),
                          static_cast<int>(c.background)}),
              0u);
  }
  EXPECT_EQ(shape_fg.size(), 5u * 6u);
  EXPECT_EQ(shape_bg.size(), 5u * 6u);
  EXPECT_EQ(fg_bg.size(), 6u * 5u);
}

TEST(ScenesTest, SamplingIsDeterministicAndVisitsEveryCombinationPerEpoch) {
  const auto train = TrainingCombinations();
  std::set<std::string> epoch;
  for (int64_t i = 0; i < static_cast<int64_t>(train.size()); ++i) {
    auto a = SampleScene(train, 7, i, 32);
    auto b = SampleScene(train, 7, i, 32);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(Caption(a->combination), Caption(b->combination));
    EXPECT_EQ(a->center_x, b->center_x);
    EXPECT_EQ(a->radius, b->radius);
    EXPECT_GE(a->radius, 32.0 * kMinRadius);
    EXPECT_LE(a->radius, 32.0 * kMaxRadius);
    EXPECT_LE(std::abs(a->center_x - 16), 32.0 * kMaxOffset);
    EXPECT_LE(std::abs(a->rotation), kMaxRotation);
    EXPECT_GE(a->center_x - a->radius, 0.0);
    EXPECT_LE(a->center_y + a->radius, 32.0);
    epoch.insert(Caption(a->combination));
  }
  EXPECT_EQ(epoch.size(), train.size());
  auto other = SampleScene(train, 8, 0, 32);
  auto first = SampleScene(train, 7, 0, 32);
  ASSERT_TRUE(other.ok() && first.ok());
  EXPECT_NE(other->center_x, first->center_x);
  EXPECT_FALSE(SampleScene({}, 1, 0, 32).ok());
  EXPECT_FALSE(SampleScene(train, 1, 0, 4).ok());
}

// Rendering: only the two colours (and their blends on edges); the shape's covered area matches
// its geometry (circle πr², square 2r², triangle (3√3/4)r², cross, star) within the
// supersampling error; deterministic.
TEST(ScenesTest, RendersShapesWithTheirAreasAndColours) {
  const int64_t side = 64;
  const double r = 20;
  const double pi = std::acos(-1.0);
  const double star_area = 5 * r * 0.4 * r * std::sin(pi / 5);  // 10 triangles r·0.4r·sin(36°)/2
  const struct {
    Shape shape;
    double area;
  } cases[] = {{Shape::kCircle, pi * r * r},
               {Shape::kSquare, 2 * r * r},
               {Shape::kTriangle, 3 * std::sqrt(3.0) / 4 * r * r},
               {Shape::kCross, 2 * (2 * r) * (0.7 * r) - (0.7 * r) * (0.7 * r)},
               {Shape::kStar, star_area}};
  for (const auto& c : cases) {
    Scene scene;
    scene.combination = {c.shape, Colour::kYellow, Colour::kBlue};
    scene.center_x = scene.center_y = 32;
    scene.radius = r;
    scene.rotation = 0.3;
    auto image = RenderScene(scene, side);
    ASSERT_TRUE(image.ok()) << image.status();
    ASSERT_EQ(image->size(), static_cast<size_t>(side * side * 3));
    double coverage = 0;
    for (int64_t p = 0; p < side * side; ++p) {
      const uint8_t red = (*image)[p * 3], green = (*image)[p * 3 + 1], blue = (*image)[p * 3 + 2];
      EXPECT_EQ(red, green) << ShapeName(c.shape);  // yellow over blue: R = G = 255·a
      // B = 255·(1 - a): 255 - R up to the rounding of a half level.
      EXPECT_NEAR(static_cast<int>(blue), 255 - red, 1) << ShapeName(c.shape);
      coverage += red / 255.0;
    }
    EXPECT_NEAR(coverage, c.area, 0.02 * c.area) << ShapeName(c.shape);
    EXPECT_EQ(*RenderScene(scene, side), *image);
  }
  Scene bad;
  bad.radius = -1;
  EXPECT_FALSE(RenderScene(bad, 32).ok());
  EXPECT_FALSE(RenderScene(Scene{}, 4).ok());
}

}  // namespace
}  // namespace ds::train
