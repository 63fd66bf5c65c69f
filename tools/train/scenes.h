// Synthetic scenes for the trained tiny default (issue 11): deterministic 32×32 (any side ≥ 8)
// RGB images of one shape in one colour on a background of another, with their captions
// "a {colour} {shape} on a {colour} background", and a fixed split of the caption combinations
// into training and held-out ones. No LibTorch: images are plain uint8 buffers.
//
// Thread-safety: free functions without shared state.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ds::train {

enum class Shape { kCircle, kSquare, kTriangle, kCross, kStar };
enum class Colour { kRed, kGreen, kBlue, kYellow, kBlack, kWhite };

inline constexpr std::array<Shape, 5> kShapes = {Shape::kCircle, Shape::kSquare, Shape::kTriangle,
                                                 Shape::kCross, Shape::kStar};
inline constexpr std::array<Colour, 6> kColours = {Colour::kRed,    Colour::kGreen, Colour::kBlue,
                                                   Colour::kYellow, Colour::kBlack, Colour::kWhite};

std::string ShapeName(Shape shape);     // "circle", "square", "triangle", "cross", "star"
std::string ColourName(Colour colour);  // "red", "green", "blue", "yellow", "black", "white"
// Pure RGB primaries and extremes: red (255,0,0), green (0,255,0), blue (0,0,255),
// yellow (255,255,0), black (0,0,0), white (255,255,255).
std::array<uint8_t, 3> ColourRgb(Colour colour);

// What a caption names: a shape, its colour and a different background colour.
struct Combination {
  Shape shape = Shape::kCircle;
  Colour colour = Colour::kRed;
  Colour background = Colour::kBlue;
  bool operator==(const Combination& o) const {
    return shape == o.shape && colour == o.colour && background == o.background;
  }
};

// "a red circle on a blue background".
std::string Caption(const Combination& c);

// All 150 combinations (5 shapes × 6 colours × 5 other backgrounds), in enum order.
std::vector<Combination> AllCombinations();
// The held-out combinations (never rendered for training, used to evaluate generalization): a fixed
// 15 of the 150, two or three per shape, chosen so that every shape, every colour as foreground and
// every colour as background still appears in training with each of the others.
std::vector<Combination> HeldOutCombinations();
bool IsHeldOut(const Combination& c);
// AllCombinations() without the held-out ones (135).
std::vector<Combination> TrainingCombinations();

// A scene: a combination plus the placement of the shape. Sizes in pixels of the image.
struct Scene {
  Combination combination;
  double center_x = 16, center_y = 16;  // shape centre
  double radius = 8;                    // circumradius-like size of the shape
  double rotation = 0;                  // radians; circles ignore it
};

// Placement of sampled scenes, as fractions of the side: radius in [kMinRadius, kMaxRadius], centre
// within kMaxOffset of the image centre on each axis (the shape always stays inside), rotation
// within ±kMaxRotation radians of upright (squares axis-aligned, triangles and stars pointing up).
// Varied enough to be a distribution, narrow enough for the 32×32 default's small transformer and
// 8×8 latents to learn each shape's outline in minutes (wider placements, e.g. radius 0.26–0.34,
// offset 0.1, rotation 15°, left it drawing blobs for held-out captions after 18 minutes).
inline constexpr double kMinRadius = 0.28;
inline constexpr double kMaxRadius = 0.32;
inline constexpr double kMaxOffset = 0.03;
inline constexpr double kMaxRotation = 0.0873;  // 5°

// The i-th scene of a seeded stream over `combinations` (cycling through them in a seeded order,
// random placement as above). Deterministic on every platform (own 64-bit generator, no std
// distributions). INVALID_ARGUMENT for an empty list or side < 8.
absl::StatusOr<Scene> SampleScene(const std::vector<Combination>& combinations, uint64_t seed,
                                  int64_t index, int64_t side);

// Renders `scene` as side × side RGB, row-major HWC, 4×4 supersampled coverage (edges blend the
// two colours, rounded to nearest). INVALID_ARGUMENT for side < 8 or a non-finite/non-positive
// radius.
absl::StatusOr<std::vector<uint8_t>> RenderScene(const Scene& scene, int64_t side);

// Whether the point (x, y) in pixel units lies inside the scene's shape.
bool InsideShape(const Scene& scene, double x, double y);

}  // namespace ds::train
