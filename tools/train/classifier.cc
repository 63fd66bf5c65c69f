#include "tools/train/classifier.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/safetensors.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds::train {

// The CNN: three stride-2 convolutions, each with batch normalization and ReLU, global average
// pooling, a linear classifier.
class ShapeNet : public torch::nn::Module {
 public:
  static constexpr std::array<int64_t, 3> kChannels = {16, 32, 64};
  static constexpr std::array<int64_t, 3> kKernels = {5, 3, 3};

  ShapeNet() {
    int64_t in = 1;
    for (size_t i = 0; i < kChannels.size(); ++i) {
      convs_.push_back(
          register_module(absl::StrCat("conv", i + 1),
                          torch::nn::Conv2d(torch::nn::Conv2dOptions(in, kChannels[i], kKernels[i])
                                                .stride(2)
                                                .padding(kKernels[i] / 2))));
      norms_.push_back(
          register_module(absl::StrCat("norm", i + 1), torch::nn::BatchNorm2d(kChannels[i])));
      in = kChannels[i];
    }
    fc_ = register_module("fc", torch::nn::Linear(in, static_cast<int64_t>(kShapes.size())));
  }

  // Deterministic initialization from `seed`: convolutions and the linear layer as PyTorch's
  // default (U(±1/√fan_in)), normalizations as identity.
  void Initialize(uint64_t seed) {
    InitRandomWeights(*this, seed);
    torch::NoGradGuard no_grad;
    for (auto& norm : norms_) {
      norm->weight.fill_(1);
      norm->bias.zero_();
    }
  }

  // [N, 1, side, side] float32 -> logits [N, 5].
  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < convs_.size(); ++i) {
      x = torch::relu(norms_[i]->forward(convs_[i]->forward(x)));
    }
    return fc_->forward(x.mean({2, 3}));
  }

 private:
  std::vector<torch::nn::Conv2d> convs_;
  std::vector<torch::nn::BatchNorm2d> norms_;
  torch::nn::Linear fc_{nullptr};
};

namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr char kFormat[] = "ds-shape-classifier";
constexpr char kVersion[] = "1";

double Dist2(const double* p, const std::array<uint8_t, 3>& c) {
  double d = 0;
  for (int ch = 0; ch < 3; ++ch) {
    const double e = p[ch] - c[ch];
    d += e * e;
  }
  return d;
}

// Squared distance from p to the segment a→b (a ≠ b); `t` receives the position of the nearest
// point (0 at a, 1 at b).
double SegmentDist2(const double* p, const std::array<uint8_t, 3>& a,
                    const std::array<uint8_t, 3>& b, double* t) {
  double dot = 0, len2 = 0;
  for (int ch = 0; ch < 3; ++ch) {
    const double ab = static_cast<double>(b[ch]) - a[ch];
    dot += (p[ch] - a[ch]) * ab;
    len2 += ab * ab;
  }
  *t = std::clamp(dot / len2, 0.0, 1.0);
  double d = 0;
  for (int ch = 0; ch < 3; ++ch) {
    const double e = p[ch] - (a[ch] + *t * (static_cast<double>(b[ch]) - a[ch]));
    d += e * e;
  }
  return d;
}

Colour NearestColour(const double* p, Colour exclude, bool use_exclude) {
  Colour best = kColours[0];
  double best_d = std::numeric_limits<double>::infinity();
  for (Colour c : kColours) {
    if (use_exclude && c == exclude) continue;
    const double d = Dist2(p, ColourRgb(c));
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

// SplitMix64 (as scenes.cc): platform-independent sampling of pool indices and symmetries.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

std::string ClassesString() {
  std::vector<std::string> names;
  for (Shape s : kShapes) names.push_back(ShapeName(s));
  return absl::StrJoin(names, ",");
}

std::map<std::string, std::string> Metadata(int64_t side) {
  return {{"format", kFormat},
          {"version", kVersion},
          {"side", absl::StrCat(side)},
          {"channels", absl::StrJoin(ShapeNet::kChannels, ",")},
          {"kernels", absl::StrJoin(ShapeNet::kKernels, ",")},
          {"norm", "batch"},
          {"classes", ClassesString()}};
}

// Augmentation ranges (see ShapeClassifier::Train): each mask draws its own blur σ, contrast,
// noise σ and, for a third of the masks, speckle share uniformly from these.
constexpr double kMaxBlur = 1.5;  // px
constexpr double kMinContrast = 0.7;
constexpr double kMaxNoise = 0.2;
constexpr double kMaxSpeckle = 0.05;
constexpr int64_t kBlurRadius = 3;  // kernel taps: 2·3 + 1 = 7, ±2σ at σ = 1.5

// Per-sample Gaussian blur of masks [B, 1, S, S] with standard deviations `sigma` [B] (0 = none),
// zero padding (the mask's background value).
torch::Tensor Blur(const torch::Tensor& x, const torch::Tensor& sigma) {
  const int64_t b = x.size(0), s = x.size(2), taps = 2 * kBlurRadius + 1;
  const torch::Tensor offsets = torch::arange(-kBlurRadius, kBlurRadius + 1, torch::kFloat32);
  const torch::Tensor sg = sigma.clamp_min(1e-3).view({b, 1});
  torch::Tensor g = torch::exp(-(offsets * offsets).view({1, taps}) / (2 * sg * sg));  // [B, taps]
  g = g / g.sum(1, true);
  const torch::Tensor kernel =
      (g.view({b, taps, 1}) * g.view({b, 1, taps})).view({b, 1, taps, taps});
  return torch::conv2d(x.view({1, b, s, s}), kernel, {}, 1, kBlurRadius, 1, b).view({b, 1, s, s});
}

// Training-time degradation of clean masks [B, 1, S, S] (see ShapeClassifier::Train).
torch::Tensor Degrade(torch::Tensor x, at::Generator& gen) {
  const int64_t b = x.size(0);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  auto per_mask = [&] { return torch::rand({b, 1, 1, 1}, gen, f32); };
  x = Blur(x, kMaxBlur * torch::rand({b}, gen, f32));
  x = x * (kMinContrast + (1 - kMinContrast) * per_mask());
  x = x + torch::randn(x.sizes(), gen, f32) * (kMaxNoise * per_mask());
  // Salt and pepper (half each) on about a third of the masks.
  const torch::Tensor chosen = (per_mask() < 1.0 / 3).to(torch::kFloat32);
  const torch::Tensor p = chosen * kMaxSpeckle * per_mask();
  const torch::Tensor r = torch::rand(x.sizes(), gen, f32);
  x = torch::where(r < p / 2, torch::ones_like(x), x);
  x = torch::where((r >= p / 2) & (r < p), torch::zeros_like(x), x);
  return x.clamp(0, 1);
}

absl::Status CheckOptions(const ClassifierTrainOptions& o) {
  if (o.side < 8)
    return absl::InvalidArgumentError(absl::StrCat("classifier: side ", o.side, " < 8"));
  if (o.steps < 1)
    return absl::InvalidArgumentError(absl::StrCat("classifier: steps ", o.steps, " < 1"));
  if (o.batch < 1)
    return absl::InvalidArgumentError(absl::StrCat("classifier: batch ", o.batch, " < 1"));
  if (o.pool < 0)
    return absl::InvalidArgumentError(absl::StrCat("classifier: pool ", o.pool, " < 0"));
  if (!std::isfinite(o.learning_rate) || o.learning_rate <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("classifier: learning rate ", o.learning_rate, " is not positive"));
  }
  return absl::OkStatus();
}

// Renders `count` scenes of all combinations as clean masks [count, 1, side, side] with their
// labels [count] (int64, index in kShapes).
absl::StatusOr<std::pair<torch::Tensor, torch::Tensor>> RenderPool(uint64_t seed, int64_t count,
                                                                   int64_t side) {
  const std::vector<Combination> all = AllCombinations();
  std::vector<Scene> scenes;
  scenes.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(Scene scene, SampleScene(all, seed, i, side));
    scenes.push_back(scene);
  }
  ASSIGN_OR_RETURN(
      auto tensors, TorchCall("classifier pool", [&] {
        torch::Tensor labels = torch::empty({count}, torch::kInt64);
        for (int64_t i = 0; i < count; ++i) {
          labels[i] = static_cast<int64_t>(scenes[static_cast<size_t>(i)].combination.shape);
        }
        return std::make_pair(torch::empty({count, 1, side, side}, torch::kFloat32), labels);
      }));
  float* dst = tensors.first.data_ptr<float>();
  // Rendering dominates; the scenes are independent (the body throws nothing).
  std::vector<absl::Status> errors(static_cast<size_t>(count));
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Scene& scene = scenes[static_cast<size_t>(i)];
      absl::StatusOr<std::vector<uint8_t>> image = RenderScene(scene, side);
      if (!image.ok()) {
        errors[static_cast<size_t>(i)] = image.status();
        continue;
      }
      absl::StatusOr<torch::Tensor> mask = ForegroundMask(
          image->data(), side, scene.combination.background, scene.combination.colour);
      if (!mask.ok()) {
        errors[static_cast<size_t>(i)] = mask.status();
        continue;
      }
      std::memcpy(dst + i * side * side, mask->data_ptr<float>(),
                  static_cast<size_t>(side * side) * sizeof(float));
    }
  });
  for (const absl::Status& e : errors) RETURN_IF_ERROR(e);
  return tensors;
}

}  // namespace

absl::StatusOr<ColourReading> ReadColours(const uint8_t* hwc, int64_t side) {
  if (hwc == nullptr) return absl::InvalidArgumentError("ReadColours: null image");
  if (side < 8) return absl::InvalidArgumentError(absl::StrCat("ReadColours: side ", side, " < 8"));
  auto pixel = [&](int64_t y, int64_t x, double* p) {
    const uint8_t* q = hwc + (y * side + x) * 3;
    for (int ch = 0; ch < 3; ++ch) p[ch] = q[ch];
  };
  // Background: per-channel median of the outer 2-pixel ring.
  std::array<std::vector<uint8_t>, 3> ring;
  for (int64_t y = 0; y < side; ++y) {
    for (int64_t x = 0; x < side; ++x) {
      if (y >= 2 && y < side - 2 && x >= 2 && x < side - 2) continue;
      for (int ch = 0; ch < 3; ++ch) ring[ch].push_back(hwc[(y * side + x) * 3 + ch]);
    }
  }
  double median[3];
  for (int ch = 0; ch < 3; ++ch) {
    auto mid = ring[ch].begin() + static_cast<int64_t>(ring[ch].size() / 2);
    std::nth_element(ring[ch].begin(), mid, ring[ch].end());
    median[ch] = *mid;
  }
  ColourReading out;
  out.background = NearestColour(median, Colour::kBlack, /*use_exclude=*/false);
  const std::array<uint8_t, 3> bg = ColourRgb(out.background);

  std::array<int64_t, kColours.size()> votes{};
  int64_t far = 0;
  double farthest_d = -1;
  double farthest[3] = {0, 0, 0};
  for (int64_t y = 0; y < side; ++y) {
    for (int64_t x = 0; x < side; ++x) {
      double p[3];
      pixel(y, x, p);
      const double d = Dist2(p, bg);
      if (d > farthest_d) {
        farthest_d = d;
        std::copy(p, p + 3, farthest);
      }
      size_t best = 0;
      double best_d = std::numeric_limits<double>::infinity(), best_t = 0;
      for (size_t c = 0; c < kColours.size(); ++c) {
        if (kColours[c] == out.background) continue;
        double t = 0;
        const double sd = SegmentDist2(p, bg, ColourRgb(kColours[c]), &t);
        if (sd < best_d) {
          best_d = sd;
          best_t = t;
          best = c;
        }
      }
      if (best_t <= kForegroundShare) continue;
      ++far;
      ++votes[best];
    }
  }
  out.foreground_fraction = static_cast<double>(far) / static_cast<double>(side * side);
  if (far == 0) {
    out.foreground = NearestColour(farthest, out.background, /*use_exclude=*/true);
  } else {
    size_t best = 0;
    for (size_t c = 1; c < kColours.size(); ++c) {
      if (votes[c] > votes[best]) best = c;
    }
    out.foreground = kColours[best];
  }
  return out;
}

absl::StatusOr<torch::Tensor> ForegroundMask(const uint8_t* hwc, int64_t side, Colour background,
                                             Colour foreground) {
  if (hwc == nullptr) return absl::InvalidArgumentError("ForegroundMask: null image");
  if (side < 1)
    return absl::InvalidArgumentError(absl::StrCat("ForegroundMask: side ", side, " < 1"));
  if (background == foreground) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ForegroundMask: background and foreground are both ", ColourName(background)));
  }
  ASSIGN_OR_RETURN(torch::Tensor mask, TorchCall("ForegroundMask", [&] {
                     return torch::empty({1, side, side}, torch::kFloat32);
                   }));
  const std::array<uint8_t, 3> b = ColourRgb(background), f = ColourRgb(foreground);
  double dir[3], len2 = 0;
  for (int ch = 0; ch < 3; ++ch) {
    dir[ch] = static_cast<double>(f[ch]) - b[ch];
    len2 += dir[ch] * dir[ch];
  }
  float* out = mask.data_ptr<float>();
  for (int64_t i = 0; i < side * side; ++i) {
    double dot = 0;
    for (int ch = 0; ch < 3; ++ch) dot += (static_cast<double>(hwc[i * 3 + ch]) - b[ch]) * dir[ch];
    out[i] = static_cast<float>(std::clamp(dot / len2, 0.0, 1.0));
  }
  return mask;
}

ShapeClassifier::ShapeClassifier(int64_t side, std::shared_ptr<ShapeNet> net)
    : side_(side), net_(std::move(net)) {}

ShapeClassifier::~ShapeClassifier() = default;

absl::StatusOr<std::unique_ptr<ShapeClassifier>> ShapeClassifier::Train(
    const ClassifierTrainOptions& o) {
  RETURN_IF_ERROR(CheckOptions(o));
  const int64_t pool_size = o.pool > 0 ? o.pool : std::min<int64_t>(o.steps * o.batch, 3000);
  ASSIGN_OR_RETURN(auto pool, RenderPool(o.seed, pool_size, o.side));
  const torch::Tensor& masks = pool.first;
  const torch::Tensor& labels = pool.second;

  auto net = std::make_shared<ShapeNet>();
  absl::Status trained = TorchCallVoid("classifier training", [&] {
    net->Initialize(Mix(o.seed ^ 0x636c617373696679ULL));
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(Mix(o.seed + 1));
    torch::optim::Adam optimizer(net->parameters(), torch::optim::AdamOptions(o.learning_rate));
    net->train();
    uint64_t state = Mix(o.seed + 2);
    std::array<std::vector<int64_t>, 8> groups;  // pool indices by symmetry
    for (int64_t step = 0; step < o.steps; ++step) {
      for (auto& g : groups) g.clear();
      for (int64_t i = 0; i < o.batch; ++i) {
        state = Mix(state);
        groups[state & 7].push_back(
            static_cast<int64_t>((state >> 3) % static_cast<uint64_t>(pool_size)));
      }
      std::vector<torch::Tensor> xs, ys;
      for (size_t k = 0; k < groups.size(); ++k) {
        if (groups[k].empty()) continue;
        const torch::Tensor idx = torch::tensor(groups[k], torch::kInt64);
        torch::Tensor x = masks.index_select(0, idx);
        if (k % 4 != 0) x = torch::rot90(x, static_cast<int64_t>(k % 4), {2, 3});
        if (k >= 4) x = x.flip({3});
        xs.push_back(x);
        ys.push_back(labels.index_select(0, idx));
      }
      const torch::Tensor x = Degrade(torch::cat(xs), gen);
      const torch::Tensor y = torch::cat(ys);
      const double progress = static_cast<double>(step) / static_cast<double>(o.steps);
      const double lr = o.learning_rate * (0.05 + 0.95 * 0.5 * (1 + std::cos(kPi * progress)));
      for (auto& group : optimizer.param_groups()) {
        static_cast<torch::optim::AdamOptions&>(group.options()).lr(lr);
      }
      optimizer.zero_grad();
      const torch::Tensor logits = net->forward(x);
      const torch::Tensor loss = torch::nn::functional::cross_entropy(logits, y);
      loss.backward();
      optimizer.step();
      if (o.progress) {
        const double acc = logits.argmax(1).eq(y).to(torch::kFloat64).mean().item<double>();
        o.progress(step, loss.item<double>(), acc);
      }
    }
    net->eval();
  });
  RETURN_IF_ERROR(trained);
  return std::unique_ptr<ShapeClassifier>(new ShapeClassifier(o.side, std::move(net)));
}

absl::Status ShapeClassifier::Save(const std::string& path) const {
  return WriteSafetensors(path, NamedTensors(*net_), Metadata(side_));
}

absl::StatusOr<std::unique_ptr<ShapeClassifier>> ShapeClassifier::Load(const std::string& path) {
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  const std::map<std::string, std::string>& meta = file->metadata();
  auto value = [&](const std::string& key) -> std::string {
    auto it = meta.find(key);
    return it == meta.end() ? std::string("<missing>") : it->second;
  };
  auto bad = [&](const std::string& key, const std::string& want) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": metadata key \"", key, "\" is \"",
                                                   value(key), "\", expected ", want,
                                                   " (not a shape classifier of this version)"));
  };
  if (value("format") != kFormat) return bad("format", absl::StrCat("\"", kFormat, "\""));
  if (value("version") != kVersion) return bad("version", absl::StrCat("\"", kVersion, "\""));
  int64_t side = 0;
  if (!absl::SimpleAtoi(value("side"), &side) || side < 8) return bad("side", "an integer >= 8");
  const std::map<std::string, std::string> expected = Metadata(side);
  for (const char* key : {"channels", "kernels", "norm", "classes"}) {
    if (value(key) != expected.at(key)) return bad(key, absl::StrCat("\"", expected.at(key), "\""));
  }
  ASSIGN_OR_RETURN(TensorMap weights, file->GetAll());
  for (const auto& [name, tensor] : weights) {
    const torch::Tensor& t = tensor;  // (a structured binding cannot be captured in C++17)
    ASSIGN_OR_RETURN(bool finite, TorchCall("classifier load", [&] {
                       return !t.is_floating_point() || t.isfinite().all().item<bool>();
                     }));
    if (!finite) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor \"", name, "\" has non-finite values"));
    }
  }
  auto net = std::make_shared<ShapeNet>();
  RETURN_IF_ERROR(LoadStateDict(*net, weights, path));
  net->eval();
  return std::unique_ptr<ShapeClassifier>(new ShapeClassifier(side, std::move(net)));
}

absl::StatusOr<torch::Tensor> ShapeClassifier::Probabilities(
    const std::vector<torch::Tensor>& masks) const {
  if (masks.empty()) return absl::InvalidArgumentError("ShapeClassifier: no masks");
  for (size_t i = 0; i < masks.size(); ++i) {
    const torch::Tensor& m = masks[i];
    if (!m.defined() || m.dim() != 3 || m.size(0) != 1 || m.size(1) != side_ ||
        m.size(2) != side_) {
      return absl::InvalidArgumentError(
          absl::StrCat("ShapeClassifier: mask ", i, " has shape ",
                       m.defined() ? absl::StrJoin(m.sizes(), ", ") : std::string("undefined"),
                       ", expected [1, ", side_, ", ", side_, "]"));
    }
  }
  return TorchCall("ShapeClassifier", [&] {
    torch::InferenceMode guard;
    const torch::Tensor x = torch::stack(masks).to(torch::kCPU, torch::kFloat32);
    return torch::softmax(net_->forward(x), 1);
  });
}

absl::StatusOr<std::vector<Shape>> ShapeClassifier::Classify(
    const std::vector<torch::Tensor>& masks) const {
  ASSIGN_OR_RETURN(torch::Tensor probs, Probabilities(masks));
  ASSIGN_OR_RETURN(torch::Tensor best, TorchCall("ShapeClassifier", [&] {
                     torch::InferenceMode guard;
                     return probs.argmax(1).contiguous();
                   }));
  std::vector<Shape> out;
  out.reserve(masks.size());
  const int64_t* b = best.data_ptr<int64_t>();
  for (int64_t i = 0; i < best.size(0); ++i) out.push_back(kShapes[static_cast<size_t>(b[i])]);
  return out;
}

absl::StatusOr<SceneReading> ShapeClassifier::Read(const uint8_t* hwc, int64_t side) const {
  if (side != side_) {
    return absl::InvalidArgumentError(
        absl::StrCat("ShapeClassifier: image side ", side, ", trained for ", side_));
  }
  SceneReading out;
  ASSIGN_OR_RETURN(out.colours, ReadColours(hwc, side));
  ASSIGN_OR_RETURN(torch::Tensor mask,
                   ForegroundMask(hwc, side, out.colours.background, out.colours.foreground));
  ASSIGN_OR_RETURN(torch::Tensor probs, Probabilities({mask}));
  ASSIGN_OR_RETURN(auto best, TorchCall("ShapeClassifier", [&] {
                     torch::InferenceMode guard;
                     const auto [p, i] = probs[0].max(0);
                     return std::make_pair(p.item<double>(), i.item<int64_t>());
                   }));
  out.shape = kShapes[static_cast<size_t>(best.second)];
  out.shape_probability = best.first;
  return out;
}

}  // namespace ds::train
