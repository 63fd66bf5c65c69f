// A scorer for generated scenes (issue 11 quality check): reads the background and foreground
// colours of a side × side RGB image with fixed rules, and classifies the shape with a tiny CNN
// trained on rendered scenes (tools/train/scenes.h) over a colour-invariant foreground mask.
//
// Generated images are noisier than renders (soft edges, colour shifts, speckle), so the colour
// rules use robust statistics (a border median, votes over many pixels) and the CNN is trained
// with blur, noise, contrast and speckle augmentation.
//
// Thread-safety: the free functions share no state. A ShapeClassifier is immutable after Train()
// or Load(): its const methods (Classify, Probabilities, Read, Save) may run concurrently. Train()
// and Load() use their own random generator and never touch LibTorch's global seed; they use
// LibTorch's intra-op thread pool as configured by the caller (they do not change its size).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tools/train/scenes.h"

namespace ds::train {

// The colours of a scene as ReadColours sees them.
struct ColourReading {
  Colour background = Colour::kBlack;
  Colour foreground = Colour::kWhite;
  // Share of the image's pixels that read as foreground (see ReadColours): about the shape's area
  // fraction on a render, 0 for an image of the background colour alone.
  double foreground_fraction = 0;
};

// How far along the segment background→colour a pixel must lie to count as that colour.
inline constexpr double kForegroundShare = 0.5;

// Reads the colours of a side × side RGB image (row-major HWC, `hwc` holds side·side·3 bytes):
//  * background: the palette colour (ColourRgb) nearest in RGB to the per-channel median of the
//    border pixels (the outer 2-pixel ring);
//  * foreground: each pixel is matched to the palette colour c ≠ background whose RGB segment
//    background→c passes nearest to it, and counts as foreground when its projection onto that
//    segment lies beyond kForegroundShare of the way to c (so it is at least 127.5 away from the
//    background colour, and more like c than like the background). An anti-aliased or blurred
//    edge pixel that blends background and c thus counts for c, not for whatever palette colour
//    happens to lie near the blend, and noisy or colour-shifted background pixels do not count at
//    all. The most counted colour wins (ties: lower enum value). With no foreground pixel, the
//    non-background palette colour nearest to the pixel farthest from the background;
//  * foreground_fraction: the share of foreground pixels.
// INVALID_ARGUMENT for a null pointer or side < 8.
absl::StatusOr<ColourReading> ReadColours(const uint8_t* hwc, int64_t side);

// The colour-invariant foreground mask of a side × side RGB image: float32 [1, side, side], each
// pixel's projection onto the RGB segment background→foreground, clamped to [0, 1] (0 = the
// background colour, 1 = the foreground colour). INVALID_ARGUMENT for a null pointer, side < 1 or
// background == foreground; INTERNAL if LibTorch fails to allocate.
absl::StatusOr<torch::Tensor> ForegroundMask(const uint8_t* hwc, int64_t side, Colour background,
                                             Colour foreground);

// What Read() sees in a scene.
struct SceneReading {
  Shape shape = Shape::kCircle;
  double shape_probability = 0;  // the classifier's softmax probability of `shape`
  ColourReading colours;
};

struct ClassifierTrainOptions {
  int64_t side = 32;            // image side the classifier is trained for (≥ 8)
  uint64_t seed = 0;            // everything (weights, scenes, augmentation) derives from it
  int64_t steps = 1500;         // optimizer steps (≥ 1)
  int64_t batch = 64;           // masks per step (≥ 1)
  double learning_rate = 3e-3;  // Adam, cosine-decayed to 5% over the steps (> 0)
  // Distinct rendered scenes the batches are drawn from (each then randomly flipped/rotated by a
  // multiple of 90° and degraded); 0 = min(steps · batch, 3000). Rendering dominates start-up.
  int64_t pool = 0;
  // Called after every step with the step index (0-based), the batch's cross-entropy and the
  // batch's accuracy (of the predictions before the update). May be empty.
  std::function<void(int64_t step, double loss, double accuracy)> progress;
};

class ShapeNet;  // the CNN (classifier.cc)

// A tiny CNN over a foreground mask: conv 5×5 stride 2 (1→16), conv 3×3 stride 2 (16→32), conv 3×3
// stride 2 (32→64), each followed by batch normalization and ReLU, global average pooling, linear
// 64→5 (classes in kShapes order). About 24k parameters.
class ShapeClassifier {
 public:
  // Trains a classifier on ForegroundMask()s of RenderScene() outputs of all 150 combinations
  // (SampleScene with the options' seed; `pool` distinct scenes, rendered once), augmented to look
  // like generated images: random flips/rotations by multiples of 90° (label-preserving), then per
  // mask a Gaussian blur (σ uniform in [0, 1.5] px), contrast scaling (×[0.7, 1]), additive
  // Gaussian noise (σ uniform in [0, 0.2]), salt-and-pepper speckles (up to 5% of the pixels) on
  // about a third of the masks, and clamping to [0, 1]. (The ranges are a little wider than the
  // artefacts expected, which made the classifier markedly more robust to heavier degradation at
  // no cost on clean renders.) Batch normalization uses batch statistics while training and the
  // running ones afterwards. Deterministic given the options and LibTorch's thread count.
  // Cost: with one intra-op thread about 30 ms per step of 64 (1500 steps ≈ 40–55 s including
  // rendering); on a busy machine more threads can be several times slower, so callers on shared
  // CPUs should set torch::set_num_threads(1) (ctest runs tests with OMP_NUM_THREADS=1).
  // INVALID_ARGUMENT for bad options; INTERNAL if LibTorch fails.
  static absl::StatusOr<std::unique_ptr<ShapeClassifier>> Train(const ClassifierTrainOptions& o);

  // Writes the parameters and buffers (names as the module's: conv1.weight, norm1.running_mean,
  // ..., fc.bias; float32, the batch-normalization counters int64) as safetensors with metadata:
  // format "ds-shape-classifier", version "1", side, channels "16,32,64", kernels "5,3,3", norm
  // "batch", classes "circle,square,triangle,cross,star". INTERNAL for I/O errors.
  absl::Status Save(const std::string& path) const;
  // Reads a file written by Save(). NOT_FOUND if absent; INVALID_ARGUMENT naming the file and the
  // metadata key or tensor at fault for anything else (another format, other architecture,
  // missing/extra/mis-shaped tensors).
  static absl::StatusOr<std::unique_ptr<ShapeClassifier>> Load(const std::string& path);

  int64_t side() const { return side_; }

  // Softmax class probabilities, float32 [N, 5] (kShapes order), of masks each float32-convertible
  // [1, side, side] (as ForegroundMask gives). INVALID_ARGUMENT for an empty list or a mask of
  // another shape. Runs under torch::InferenceMode.
  absl::StatusOr<torch::Tensor> Probabilities(const std::vector<torch::Tensor>& masks) const;
  // The most probable shape of each mask; errors as Probabilities().
  absl::StatusOr<std::vector<Shape>> Classify(const std::vector<torch::Tensor>& masks) const;
  // ReadColours + ForegroundMask + Classify for one side × side RGB image. INVALID_ARGUMENT for a
  // null pointer or a side other than side().
  absl::StatusOr<SceneReading> Read(const uint8_t* hwc, int64_t side) const;

  ~ShapeClassifier();

 private:
  ShapeClassifier(int64_t side, std::shared_ptr<ShapeNet> net);
  int64_t side_;
  std::shared_ptr<ShapeNet> net_;  // never null; not mutated after construction
};

}  // namespace ds::train
