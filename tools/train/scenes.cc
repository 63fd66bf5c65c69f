#include "tools/train/scenes.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ds::train {
namespace {

constexpr double kPi = 3.14159265358979323846;

// SplitMix64: a small, fully specified generator, so scenes are the same on every platform.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [0, 1) from 53 random bits.
double Uniform(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

// Sign of the cross product (b - a) × (p - a).
double Cross(double ax, double ay, double bx, double by, double px, double py) {
  return (bx - ax) * (py - ay) - (by - ay) * (px - ax);
}

// Point in a polygon (even-odd rule), vertices in order.
bool InPolygon(const std::vector<std::pair<double, double>>& v, double x, double y) {
  bool inside = false;
  for (size_t i = 0, j = v.size() - 1; i < v.size(); j = i++) {
    const auto [xi, yi] = v[i];
    const auto [xj, yj] = v[j];
    if ((yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

}  // namespace

std::string ShapeName(Shape shape) {
  switch (shape) {
    case Shape::kCircle:
      return "circle";
    case Shape::kSquare:
      return "square";
    case Shape::kTriangle:
      return "triangle";
    case Shape::kCross:
      return "cross";
    case Shape::kStar:
      return "star";
  }
  return "?";
}

std::string ColourName(Colour colour) {
  switch (colour) {
    case Colour::kRed:
      return "red";
    case Colour::kGreen:
      return "green";
    case Colour::kBlue:
      return "blue";
    case Colour::kYellow:
      return "yellow";
    case Colour::kBlack:
      return "black";
    case Colour::kWhite:
      return "white";
  }
  return "?";
}

std::array<uint8_t, 3> ColourRgb(Colour colour) {
  switch (colour) {
    case Colour::kRed:
      return {255, 0, 0};
    case Colour::kGreen:
      return {0, 255, 0};
    case Colour::kBlue:
      return {0, 0, 255};
    case Colour::kYellow:
      return {255, 255, 0};
    case Colour::kBlack:
      return {0, 0, 0};
    case Colour::kWhite:
      return {255, 255, 255};
  }
  return {0, 0, 0};
}

std::string Caption(const Combination& c) {
  return absl::StrCat("a ", ColourName(c.colour), " ", ShapeName(c.shape), " on a ",
                      ColourName(c.background), " background");
}

std::vector<Combination> AllCombinations() {
  std::vector<Combination> out;
  for (Shape s : kShapes) {
    for (Colour fg : kColours) {
      for (Colour bg : kColours) {
        if (fg != bg) out.push_back({s, fg, bg});
      }
    }
  }
  return out;
}

// For shape s (0..4) and k = 0, 1, 2: colour (s + 2k) mod 6 on background (colour + 1 + s) mod 6.
// The foregrounds of one shape differ, so each (shape, colour) keeps 4 of its 5 backgrounds; the
// background offset 1 + s differs per shape, so each (colour, background) pair is held out for at
// most one shape.
std::vector<Combination> HeldOutCombinations() {
  std::vector<Combination> out;
  for (size_t s = 0; s < kShapes.size(); ++s) {
    for (size_t k = 0; k < 3; ++k) {
      const size_t fg = (s + 2 * k) % kColours.size();
      const size_t bg = (fg + 1 + s) % kColours.size();
      out.push_back({kShapes[s], kColours[fg], kColours[bg]});
    }
  }
  return out;
}

bool IsHeldOut(const Combination& c) {
  const std::vector<Combination> held = HeldOutCombinations();
  return std::find(held.begin(), held.end(), c) != held.end();
}

std::vector<Combination> TrainingCombinations() {
  std::vector<Combination> out;
  for (const Combination& c : AllCombinations()) {
    if (!IsHeldOut(c)) out.push_back(c);
  }
  return out;
}

absl::StatusOr<Scene> SampleScene(const std::vector<Combination>& combinations, uint64_t seed,
                                  int64_t index, int64_t side) {
  if (combinations.empty()) return absl::InvalidArgumentError("SampleScene: no combinations");
  if (side < 8) return absl::InvalidArgumentError(absl::StrCat("SampleScene: side ", side, " < 8"));
  if (index < 0) return absl::InvalidArgumentError("SampleScene: negative index");
  const auto n = static_cast<uint64_t>(combinations.size());
  const auto i = static_cast<uint64_t>(index);
  // Epoch e visits every combination once, in an order drawn from (seed, e): slot j of the epoch
  // is the combination with the j-th smallest key.
  const uint64_t epoch = i / n, slot = i % n;
  std::vector<std::pair<uint64_t, uint64_t>> keys;
  keys.reserve(n);
  for (uint64_t c = 0; c < n; ++c) keys.push_back({Mix(seed ^ Mix(epoch * n + c + 1)), c});
  std::nth_element(keys.begin(), keys.begin() + static_cast<int64_t>(slot), keys.end());
  Scene scene;
  scene.combination = combinations[keys[slot].second];
  uint64_t state = Mix(seed + 0x5851f42d4c957f2dULL * (i + 1));
  auto next = [&state] { return Uniform(state = Mix(state)); };
  const double s = static_cast<double>(side);
  scene.radius = s * (kMinRadius + next() * (kMaxRadius - kMinRadius));
  scene.center_x = s / 2 + (2 * next() - 1) * kMaxOffset * s;
  scene.center_y = s / 2 + (2 * next() - 1) * kMaxOffset * s;
  scene.rotation = scene.combination.shape == Shape::kCircle
                       ? 0.0
                       : (2 * next() - 1) * kMaxRotation;
  return scene;
}

bool InsideShape(const Scene& scene, double x, double y) {
  const double dx = x - scene.center_x, dy = y - scene.center_y, r = scene.radius;
  // Rotate the point into the shape's frame.
  const double c = std::cos(-scene.rotation), s = std::sin(-scene.rotation);
  const double u = c * dx - s * dy, v = s * dx + c * dy;
  switch (scene.combination.shape) {
    case Shape::kCircle:
      return dx * dx + dy * dy <= r * r;
    case Shape::kSquare: {
      const double h = r / std::sqrt(2.0);  // half side: the square's circumradius is r
      return std::fabs(u) <= h && std::fabs(v) <= h;
    }
    case Shape::kTriangle: {
      // Equilateral, circumradius r, apex at angle -π/2 (up) before rotation.
      double px[3], py[3];
      for (int k = 0; k < 3; ++k) {
        const double a = -kPi / 2 + 2 * kPi * k / 3;
        px[k] = r * std::cos(a);
        py[k] = r * std::sin(a);
      }
      const double d0 = Cross(px[0], py[0], px[1], py[1], u, v);
      const double d1 = Cross(px[1], py[1], px[2], py[2], u, v);
      const double d2 = Cross(px[2], py[2], px[0], py[0], u, v);
      return (d0 >= 0 && d1 >= 0 && d2 >= 0) || (d0 <= 0 && d1 <= 0 && d2 <= 0);
    }
    case Shape::kCross: {
      const double arm = r * 0.35;  // half width of each bar; bars reach r
      return (std::fabs(u) <= arm && std::fabs(v) <= r) ||
             (std::fabs(v) <= arm && std::fabs(u) <= r);
    }
    case Shape::kStar: {
      // Five points at radius r, inner vertices at 0.4 r.
      std::vector<std::pair<double, double>> poly;
      for (int k = 0; k < 10; ++k) {
        const double a = -kPi / 2 + kPi * k / 5;
        const double rr = k % 2 == 0 ? r : 0.4 * r;
        poly.push_back({rr * std::cos(a), rr * std::sin(a)});
      }
      return InPolygon(poly, u, v);
    }
  }
  return false;
}

absl::StatusOr<std::vector<uint8_t>> RenderScene(const Scene& scene, int64_t side) {
  if (side < 8) return absl::InvalidArgumentError(absl::StrCat("RenderScene: side ", side, " < 8"));
  if (!std::isfinite(scene.radius) || scene.radius <= 0 || !std::isfinite(scene.center_x) ||
      !std::isfinite(scene.center_y) || !std::isfinite(scene.rotation)) {
    return absl::InvalidArgumentError("RenderScene: non-finite or non-positive placement");
  }
  const std::array<uint8_t, 3> fg = ColourRgb(scene.combination.colour);
  const std::array<uint8_t, 3> bg = ColourRgb(scene.combination.background);
  constexpr int kSub = 4;
  std::vector<uint8_t> out(static_cast<size_t>(side * side * 3));
  for (int64_t y = 0; y < side; ++y) {
    for (int64_t x = 0; x < side; ++x) {
      int covered = 0;
      for (int sy = 0; sy < kSub; ++sy) {
        for (int sx = 0; sx < kSub; ++sx) {
          covered += InsideShape(scene, static_cast<double>(x) + (sx + 0.5) / kSub,
                                 static_cast<double>(y) + (sy + 0.5) / kSub);
        }
      }
      const double a = static_cast<double>(covered) / (kSub * kSub);
      for (int ch = 0; ch < 3; ++ch) {
        const double v = a * fg[ch] + (1 - a) * bg[ch];
        out[static_cast<size_t>((y * side + x) * 3 + ch)] = static_cast<uint8_t>(std::lround(v));
      }
    }
  }
  return out;
}

}  // namespace ds::train
