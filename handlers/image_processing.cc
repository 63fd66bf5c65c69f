#include "handlers/image_processing.h"

#include <png.h>
#include <torch/torch.h>

#include <csetjmp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// libjpeg's header needs size_t and FILE declared first.
#include <jpeglib.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"

namespace ds {
namespace {

constexpr int64_t kMaxSide = int64_t{1} << 24;

std::string Shape(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes(), ", "), "]");
}

absl::Status CheckRgbUint8(absl::string_view what, const torch::Tensor& rgb) {
  if (!rgb.defined()) return absl::InvalidArgumentError(absl::StrCat(what, ": undefined image"));
  if (rgb.scalar_type() != torch::kUInt8 || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.size(0) < 1 ||
      rgb.size(1) < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected an RGB uint8 image [H, W, 3] with H, W >= 1, got ",
                     c10::toString(rgb.scalar_type()), " ", Shape(rgb)));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Pillow's convolution filters (Resample.c), evaluated in float64 exactly as written there.

constexpr double kPi = 3.14159265358979323846;

double BoxFilter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

double BilinearFilter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double HammingFilter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * kPi;
  // Pillow mixes float literals into the double expression; keep them float.
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}

double BicubicFilter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

double Sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * kPi;
  return std::sin(x) / x;
}

double LanczosFilter(double x) {
  if (-3.0 <= x && x < 3.0) return Sinc(x) * Sinc(x / 3);
  return 0.0;
}

struct Filter {
  double (*fn)(double);
  double support;
};

absl::StatusOr<Filter> FilterFor(PilResample resample) {
  switch (resample) {
    case PilResample::kBox:
      return Filter{BoxFilter, 0.5};
    case PilResample::kBilinear:
      return Filter{BilinearFilter, 1.0};
    case PilResample::kHamming:
      return Filter{HammingFilter, 1.0};
    case PilResample::kBicubic:
      return Filter{BicubicFilter, 2.0};
    case PilResample::kLanczos:
      return Filter{LanczosFilter, 3.0};
    case PilResample::kNearest:
      break;
  }
  return absl::UnimplementedError(
      absl::StrCat("PilResize: resample ", static_cast<int>(resample),
                   " (NEAREST) is not supported; supported: BOX, BILINEAR, HAMMING, BICUBIC, "
                   "LANCZOS"));
}

// 8 bits of result plus two bits of headroom for negative lobes and sums above 1.
constexpr int kPrecisionBits = 32 - 8 - 2;

// Fixed-point coefficients of one pass (Pillow's precompute_coeffs + normalize_coeffs_8bpc):
// output pixel i reads input pixels [bounds[2i], bounds[2i] + bounds[2i+1]) with weights
// kk[i * ksize + j].
struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;
  std::vector<int32_t> kk;
};

Coefficients PrecomputeCoefficients(int in_size, int out_size, const Filter& filter) {
  // Pillow passes the box edges as float (0 and in_size here).
  const float in0 = 0.0f, in1 = static_cast<float>(in_size);
  const double scale = static_cast<double>(in1 - in0) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = filter.support * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (xx + 0.5) * scale;
    double ww = 0.0;
    const double ss = 1.0 / filterscale;
    // (int) truncates toward zero, as in C.
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = filter.fn((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = k[x] * (1 << kPrecisionBits);
      c.kk[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(k[x] < 0 ? -0.5 + v : 0.5 + v);
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t Clip8(int64_t acc) {
  const int64_t v = acc >> kPrecisionBits;  // arithmetic shift: floor
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Horizontal pass: rows [row0, row0 + out_rows) of `in` [H, W, 3] -> out [out_rows, out_w, 3].
void ResampleHorizontal(const uint8_t* in, int in_w, int row0, int out_rows, int out_w,
                        const Coefficients& c, uint8_t* out) {
  for (int yy = 0; yy < out_rows; ++yy) {
    const uint8_t* src = in + static_cast<size_t>(yy + row0) * in_w * 3;
    uint8_t* dst = out + static_cast<size_t>(yy) * out_w * 3;
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
      const int32_t* k = &c.kk[static_cast<size_t>(xx) * c.ksize];
      int64_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < xmax; ++x) {
        const uint8_t* p = src + static_cast<size_t>(x + xmin) * 3;
        s0 += static_cast<int64_t>(p[0]) * k[x];
        s1 += static_cast<int64_t>(p[1]) * k[x];
        s2 += static_cast<int64_t>(p[2]) * k[x];
      }
      dst[3 * xx + 0] = Clip8(s0);
      dst[3 * xx + 1] = Clip8(s1);
      dst[3 * xx + 2] = Clip8(s2);
    }
  }
}

// Vertical pass: `in` [in_rows, w, 3] -> out [out_h, w, 3]; bounds relative to `in`'s rows.
void ResampleVertical(const uint8_t* in, int w, int out_h, const Coefficients& c,
                      const std::vector<int>& bounds, uint8_t* out) {
  const size_t row = static_cast<size_t>(w) * 3;
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = bounds[2 * yy], ymax = bounds[2 * yy + 1];
    const int32_t* k = &c.kk[static_cast<size_t>(yy) * c.ksize];
    uint8_t* dst = out + static_cast<size_t>(yy) * row;
    for (int xx = 0; xx < w; ++xx) {
      int64_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int y = 0; y < ymax; ++y) {
        const uint8_t* p = in + static_cast<size_t>(y + ymin) * row + static_cast<size_t>(xx) * 3;
        s0 += static_cast<int64_t>(p[0]) * k[y];
        s1 += static_cast<int64_t>(p[1]) * k[y];
        s2 += static_cast<int64_t>(p[2]) * k[y];
      }
      dst[3 * xx + 0] = Clip8(s0);
      dst[3 * xx + 1] = Clip8(s1);
      dst[3 * xx + 2] = Clip8(s2);
    }
  }
}

int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

// ---------------------------------------------------------------------------------------------
// preprocessor_config.json

absl::Status ConfigError(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("preprocessor config: '", field, "': ", what));
}

absl::Status ReadBool(const nlohmann::json& j, const char* field, bool* out) {
  auto it = j.find(field);
  if (it == j.end()) return absl::OkStatus();
  if (!it->is_boolean())
    return ConfigError(field, absl::StrCat("expected a boolean, got ", it->dump()));
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::StatusOr<int64_t> PositiveSize(const char* field, const nlohmann::json& v) {
  if (!v.is_number_integer()) {
    return ConfigError(field, absl::StrCat("expected a positive integer, got ", v.dump()));
  }
  const int64_t n = v.get<int64_t>();
  if (n < 1 || n > kMaxSide) {
    return ConfigError(field, absl::StrCat("must be in [1, ", kMaxSide, "], got ", n));
  }
  return n;
}

absl::Status ReadChannels(const nlohmann::json& j, const char* field, bool positive,
                          std::array<double, 3>* out) {
  auto it = j.find(field);
  if (it == j.end()) return absl::OkStatus();
  std::vector<double> values;
  if (it->is_number()) {
    values.assign(3, it->get<double>());  // transformers repeats a scalar per channel
  } else if (it->is_array() && it->size() == 3) {
    for (const auto& v : *it) {
      if (!v.is_number()) break;
      values.push_back(v.get<double>());
    }
  }
  if (values.size() != 3) {
    return ConfigError(field,
                       absl::StrCat("expected 3 numbers (one per RGB channel), got ", it->dump()));
  }
  for (double v : values) {
    if (!std::isfinite(v) || (positive && v == 0.0)) {
      return ConfigError(
          field, absl::StrCat("values must be finite", positive ? " and non-zero" : "", ", got ",
                              it->dump()));
    }
  }
  std::copy(values.begin(), values.end(), out->begin());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<torch::Tensor> PilResize(const torch::Tensor& rgb, int64_t height, int64_t width,
                                        PilResample resample) {
  RETURN_IF_ERROR(CheckRgbUint8("PilResize", rgb));
  if (height < 1 || width < 1 || height > kMaxSide || width > kMaxSide) {
    return absl::InvalidArgumentError(absl::StrCat("PilResize: target size ", height, " x ", width,
                                                   " must be in [1, ", kMaxSide, "] per side"));
  }
  if (rgb.size(0) > kMaxSide || rgb.size(1) > kMaxSide) {
    return absl::InvalidArgumentError(absl::StrCat("PilResize: image too large: ", Shape(rgb)));
  }
  ASSIGN_OR_RETURN(const Filter filter, FilterFor(resample));
  const int in_h = static_cast<int>(rgb.size(0)), in_w = static_cast<int>(rgb.size(1));
  const int out_h = static_cast<int>(height), out_w = static_cast<int>(width);
  return TorchCall("PilResize", [&]() -> torch::Tensor {
    torch::Tensor in = rgb.to(torch::kCPU).contiguous();
    // Image.resize returns a copy when nothing changes.
    if (in_h == out_h && in_w == out_w) return in.clone();
    const bool need_horizontal = out_w != in_w;
    const bool need_vertical = out_h != in_h;
    const Coefficients vert = PrecomputeCoefficients(in_h, out_h, filter);
    std::vector<int> vert_bounds = vert.bounds;
    // The rows the vertical pass reads; the horizontal pass produces only those.
    const int first_row = vert_bounds[0];
    const int last_row = vert_bounds[2 * out_h - 2] + vert_bounds[2 * out_h - 1];
    if (need_horizontal) {
      const Coefficients horiz = PrecomputeCoefficients(in_w, out_w, filter);
      for (int i = 0; i < out_h; ++i) vert_bounds[2 * i] -= first_row;
      torch::Tensor tmp = torch::empty({last_row - first_row, out_w, 3}, torch::kUInt8);
      ResampleHorizontal(in.data_ptr<uint8_t>(), in_w, first_row, last_row - first_row, out_w,
                         horiz, tmp.data_ptr<uint8_t>());
      in = tmp;
    }
    if (!need_vertical) return in;
    torch::Tensor out = torch::empty({out_h, in.size(1), 3}, torch::kUInt8);
    ResampleVertical(in.data_ptr<uint8_t>(), static_cast<int>(in.size(1)), out_h, vert, vert_bounds,
                     out.data_ptr<uint8_t>());
    return out;
  });
}

std::pair<int64_t, int64_t> ClipResizeOutputSize(int64_t height, int64_t width,
                                                 int64_t shortest_edge) {
  const bool portrait = width <= height;
  const int64_t short_side = portrait ? width : height;
  const int64_t long_side = portrait ? height : width;
  // Python: int(size * long / short) -- exact integer product, float64 true division, truncation.
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(shortest_edge * long_side) /
                                                static_cast<double>(short_side));
  return portrait ? std::make_pair(new_long, shortest_edge)
                  : std::make_pair(shortest_edge, new_long);
}

absl::StatusOr<torch::Tensor> CenterCrop(const torch::Tensor& image, int64_t crop_height,
                                         int64_t crop_width) {
  if (!image.defined() || image.dim() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat("CenterCrop: expected an image [H, W, C], got ",
                     image.defined() ? Shape(image) : std::string("an undefined tensor")));
  }
  if (crop_height < 1 || crop_width < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("CenterCrop: crop size ", crop_height, " x ", crop_width, " must be >= 1"));
  }
  const int64_t h = image.size(0), w = image.size(1);
  return TorchCall("CenterCrop", [&]() -> torch::Tensor {
    int64_t top = FloorDiv(h - crop_height, 2), left = FloorDiv(w - crop_width, 2);
    if (top >= 0 && top + crop_height <= h && left >= 0 && left + crop_width <= w) {
      return image.narrow(0, top, crop_height).narrow(1, left, crop_width).contiguous().clone();
    }
    // transformers pads the image to at least the crop size, centred with ceil() before.
    const int64_t new_h = std::max(crop_height, h), new_w = std::max(crop_width, w);
    torch::Tensor padded = torch::zeros({new_h, new_w, image.size(2)}, image.options());
    const int64_t top_pad = (new_h - h + 1) / 2, left_pad = (new_w - w + 1) / 2;
    padded.narrow(0, top_pad, h).narrow(1, left_pad, w).copy_(image);
    top += top_pad;
    left += left_pad;
    const int64_t r0 = std::max<int64_t>(0, top), r1 = std::min(new_h, top + crop_height);
    const int64_t c0 = std::max<int64_t>(0, left), c1 = std::min(new_w, left + crop_width);
    return padded.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0).contiguous();
  });
}

ClipImageProcessorConfig ClipImageProcessorConfig::ForImageSize(int64_t image_size) {
  ClipImageProcessorConfig c;
  c.shortest_edge = image_size;
  c.resize_to.reset();
  c.crop_height = c.crop_width = image_size;
  return c;
}

absl::StatusOr<ClipImageProcessorConfig> ClipImageProcessorConfig::FromJson(
    const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("preprocessor config: expected a JSON object, got ", j.type_name()));
  }
  for (const char* type_key : {"image_processor_type", "feature_extractor_type"}) {
    auto it = j.find(type_key);
    if (it == j.end() || it->is_null()) continue;
    const std::string type = it->is_string() ? it->get<std::string>() : it->dump();
    // Fast/slow variants name the same steps.
    if (type != "CLIPImageProcessor" && type != "CLIPFeatureExtractor" &&
        type != "CLIPImageProcessorFast") {
      return ConfigError(type_key, absl::StrCat("expected CLIPImageProcessor, got ", it->dump()));
    }
  }
  ClipImageProcessorConfig c;
  RETURN_IF_ERROR(ReadBool(j, "do_convert_rgb", &c.do_convert_rgb));
  RETURN_IF_ERROR(ReadBool(j, "do_resize", &c.do_resize));
  RETURN_IF_ERROR(ReadBool(j, "do_center_crop", &c.do_center_crop));
  RETURN_IF_ERROR(ReadBool(j, "do_rescale", &c.do_rescale));
  RETURN_IF_ERROR(ReadBool(j, "do_normalize", &c.do_normalize));
  if (auto it = j.find("size"); it != j.end() && !it->is_null()) {
    if (it->is_number_integer()) {
      ASSIGN_OR_RETURN(c.shortest_edge, PositiveSize("size", *it));
      c.resize_to.reset();
    } else if (it->is_object() && it->contains("shortest_edge")) {
      ASSIGN_OR_RETURN(c.shortest_edge,
                       PositiveSize("size.shortest_edge", it->at("shortest_edge")));
      c.resize_to.reset();
    } else if (it->is_object() && it->contains("height") && it->contains("width")) {
      ASSIGN_OR_RETURN(const int64_t hh, PositiveSize("size.height", it->at("height")));
      ASSIGN_OR_RETURN(const int64_t ww, PositiveSize("size.width", it->at("width")));
      c.resize_to = std::make_pair(hh, ww);
      c.shortest_edge.reset();
    } else {
      return ConfigError("size", absl::StrCat("expected an integer, {\"shortest_edge\": N} or "
                                              "{\"height\": H, \"width\": W}, got ",
                                              it->dump()));
    }
  }
  if (auto it = j.find("crop_size"); it != j.end() && !it->is_null()) {
    if (it->is_number_integer()) {
      ASSIGN_OR_RETURN(c.crop_height, PositiveSize("crop_size", *it));
      c.crop_width = c.crop_height;
    } else if (it->is_object() && it->contains("height") && it->contains("width")) {
      ASSIGN_OR_RETURN(c.crop_height, PositiveSize("crop_size.height", it->at("height")));
      ASSIGN_OR_RETURN(c.crop_width, PositiveSize("crop_size.width", it->at("width")));
    } else {
      return ConfigError("crop_size", absl::StrCat("expected an integer or {\"height\": H, "
                                                   "\"width\": W}, got ",
                                                   it->dump()));
    }
  }
  if (auto it = j.find("resample"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > 5) {
      return ConfigError("resample",
                         absl::StrCat("expected a PIL resampling filter 0..5, got ", it->dump()));
    }
    c.resample = static_cast<PilResample>(it->get<int>());
  }
  if (auto it = j.find("rescale_factor"); it != j.end() && !it->is_null()) {
    if (!it->is_number() || !std::isfinite(it->get<double>())) {
      return ConfigError("rescale_factor",
                         absl::StrCat("expected a finite number, got ", it->dump()));
    }
    c.rescale_factor = it->get<double>();
  }
  RETURN_IF_ERROR(ReadChannels(j, "image_mean", /*positive=*/false, &c.image_mean));
  RETURN_IF_ERROR(ReadChannels(j, "image_std", /*positive=*/true, &c.image_std));
  return c;
}

absl::StatusOr<ClipImageProcessorConfig> ClipImageProcessorConfig::FromFile(
    const std::string& path) {
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  auto c = FromJson(j);
  if (!c.ok()) return Annotate(c.status(), path);
  return c;
}

std::pair<int64_t, int64_t> ClipImageProcessorConfig::OutputSize(int64_t height,
                                                                 int64_t width) const {
  if (do_center_crop) return {crop_height, crop_width};
  if (!do_resize) return {height, width};
  if (resize_to.has_value()) return *resize_to;
  return ClipResizeOutputSize(height, width, shortest_edge.value_or(224));
}

absl::StatusOr<ClipPreprocessed> PreprocessClipImage(const torch::Tensor& rgb,
                                                     const ClipImageProcessorConfig& config) {
  RETURN_IF_ERROR(CheckRgbUint8("PreprocessClipImage", rgb));
  ClipPreprocessed out;
  torch::Tensor image = rgb;
  if (config.do_resize) {
    std::pair<int64_t, int64_t> size;
    if (config.resize_to.has_value()) {
      size = *config.resize_to;
    } else {
      size = ClipResizeOutputSize(rgb.size(0), rgb.size(1), config.shortest_edge.value_or(224));
    }
    ASSIGN_OR_RETURN(image, PilResize(rgb, size.first, size.second, config.resample));
  } else {
    ASSIGN_OR_RETURN(
        image, TorchCall("PreprocessClipImage", [&] { return rgb.to(torch::kCPU).contiguous(); }));
  }
  out.resized = image;
  if (config.do_center_crop) {
    ASSIGN_OR_RETURN(image, CenterCrop(image, config.crop_height, config.crop_width));
  }
  out.cropped = image;
  ASSIGN_OR_RETURN(out.pixel_values, TorchCall("PreprocessClipImage", [&] {
                     const torch::Tensor u8 = image.contiguous();
                     const int64_t h = u8.size(0), w = u8.size(1);
                     torch::Tensor pv = torch::empty({3, h, w}, torch::kFloat32);
                     const uint8_t* src = u8.data_ptr<uint8_t>();
                     float* dst = pv.data_ptr<float>();
                     for (int64_t ch = 0; ch < 3; ++ch) {
                       const float mean = static_cast<float>(config.image_mean[ch]);
                       const float std = static_cast<float>(config.image_std[ch]);
                       for (int64_t i = 0; i < h * w; ++i) {
                         const uint8_t v = src[i * 3 + ch];
                         // rescale: float64 product, then float32 (transformers' rescale).
                         float x = config.do_rescale ? static_cast<float>(static_cast<double>(v) *
                                                                          config.rescale_factor)
                                                     : static_cast<float>(v);
                         // normalize: float32 subtraction, then float32 division.
                         if (config.do_normalize) {
                           const float centered = x - mean;
                           x = centered / std;
                         }
                         dst[ch * h * w + i] = x;
                       }
                     }
                     return pv;
                   }));
  return out;
}

absl::StatusOr<torch::Tensor> ClipPixelValues(const torch::Tensor& rgb,
                                              const ClipImageProcessorConfig& config) {
  ASSIGN_OR_RETURN(ClipPreprocessed p, PreprocessClipImage(rgb, config));
  return p.pixel_values.unsqueeze(0);
}

namespace {

// libjpeg reports fatal errors through error_exit, which must not return: it longjmps back into
// DecodeJpegRgb. Only plain C data lives between setjmp and longjmp there.
struct JpegErrorManager {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void JpegErrorExit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void JpegQuiet(j_common_ptr /*cinfo*/) {}  // warnings (e.g. extraneous bytes) are not errors

enum class JpegResult { kOk, kCorrupt, kTooLarge, kUnsupported, kNoMemory };

// Decodes a baseline or progressive JPEG to interleaved 8-bit RGB in a malloc'ed buffer (*out,
// freed by the caller), as libjpeg's defaults decode it (islow IDCT, fancy upsampling), which
// is what PIL's JPEG plugin uses. Grayscale is replicated to three channels (PIL's L -> RGB).
JpegResult DecodeJpegRgb(const unsigned char* data, size_t size, int64_t max_pixels,
                         unsigned char** out, unsigned* width, unsigned* height, char* message) {
  jpeg_decompress_struct cinfo;
  JpegErrorManager err;
  unsigned char* volatile buffer = nullptr;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = JpegErrorExit;
  err.mgr.output_message = JpegQuiet;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    std::free(buffer);
    return JpegResult::kCorrupt;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
      cinfo.jpeg_color_space != JCS_RGB) {
    std::snprintf(message, JMSG_LENGTH_MAX, "color space %d (CMYK/YCCK) is not supported",
                  static_cast<int>(cinfo.jpeg_color_space));
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kUnsupported;
  }
  *width = cinfo.image_width;
  *height = cinfo.image_height;
  if (*width < 1 || *height < 1 || *width > kMaxSide || *height > kMaxSide ||
      (max_pixels > 0 && static_cast<int64_t>(*width) * *height > max_pixels)) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kTooLarge;
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  const size_t row = static_cast<size_t>(cinfo.output_width) * 3;
  buffer = static_cast<unsigned char*>(std::malloc(row * cinfo.output_height));
  if (buffer == nullptr) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kNoMemory;
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW rows[1] = {buffer + row * cinfo.output_scanline};
    jpeg_read_scanlines(&cinfo, rows, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  *out = buffer;
  return JpegResult::kOk;
}

absl::StatusOr<torch::Tensor> DecodeJpegImage(std::string_view bytes, int64_t max_pixels) {
  unsigned char* pixels = nullptr;
  unsigned width = 0, height = 0;
  char message[JMSG_LENGTH_MAX] = {0};
  const JpegResult r =
      DecodeJpegRgb(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
                    max_pixels, &pixels, &width, &height, message);
  switch (r) {
    case JpegResult::kOk:
      break;
    case JpegResult::kCorrupt:
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeImageToRgb: invalid or corrupt JPEG: ", message));
    case JpegResult::kUnsupported:
      return absl::InvalidArgumentError(absl::StrCat("DecodeImageToRgb: JPEG ", message));
    case JpegResult::kTooLarge:
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeImageToRgb: a ", width, " x ", height, " JPEG image exceeds the limit of ",
          max_pixels > 0 ? max_pixels : kMaxSide, max_pixels > 0 ? " pixels" : " per side"));
    case JpegResult::kNoMemory:
      return absl::ResourceExhaustedError(absl::StrCat(
          "DecodeImageToRgb: no memory for a ", width, " x ", height, " image"));
  }
  auto rgb = TorchCall("DecodeImageToRgb", [&] {
    return torch::from_blob(pixels, {static_cast<int64_t>(height), static_cast<int64_t>(width), 3},
                            torch::kUInt8)
        .clone();
  });
  std::free(pixels);
  return rgb;
}

}  // namespace

absl::StatusOr<torch::Tensor> DecodeImageToRgb(std::string_view bytes, int64_t max_pixels) {
  static constexpr unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  static constexpr unsigned char kJpegSignature[3] = {0xFF, 0xD8, 0xFF};
  if (bytes.size() >= 3 && std::memcmp(bytes.data(), kJpegSignature, 3) == 0) {
    return DecodeJpegImage(bytes, max_pixels);
  }
  if (bytes.size() < 8 || std::memcmp(bytes.data(), kPngSignature, 8) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeImageToRgb: not a PNG or JPEG image (", bytes.size(),
                     " bytes; supported formats: PNG, JPEG)"));
  }
  png_image image;
  std::memset(&image, 0, sizeof(image));
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&image, bytes.data(), bytes.size())) {
    const std::string why = image.message;
    png_image_free(&image);
    return absl::InvalidArgumentError(absl::StrCat("DecodeImageToRgb: invalid PNG: ", why));
  }
  if (image.width < 1 || image.height < 1 || image.width > kMaxSide || image.height > kMaxSide) {
    png_image_free(&image);
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeImageToRgb: unsupported size ", image.width, " x ", image.height));
  }
  if (max_pixels > 0 &&
      static_cast<int64_t>(image.width) * static_cast<int64_t>(image.height) > max_pixels) {
    png_image_free(&image);
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeImageToRgb: a ", image.width, " x ", image.height,
                     " image exceeds the limit of ", max_pixels, " pixels"));
  }
  // 8-bit RGBA output of the simplified reader is not premultiplied, so dropping the alpha
  // channel afterwards is PIL's RGBA -> RGB conversion.
  image.format = PNG_FORMAT_RGBA;
  auto rgba = TorchCall("DecodeImageToRgb", [&] {
    return torch::empty({static_cast<int64_t>(image.height), static_cast<int64_t>(image.width), 4},
                        torch::kUInt8);
  });
  if (!rgba.ok()) {
    png_image_free(&image);
    return rgba.status();
  }
  if (!png_image_finish_read(&image, /*background=*/nullptr, rgba->data_ptr<uint8_t>(),
                             /*row_stride=*/0, /*colormap=*/nullptr)) {
    const std::string why = image.message;
    png_image_free(&image);
    return absl::InvalidArgumentError(absl::StrCat("DecodeImageToRgb: corrupt PNG data: ", why));
  }
  return TorchCall("DecodeImageToRgb", [&] { return rgba->narrow(2, 0, 3).contiguous(); });
}

}  // namespace ds
