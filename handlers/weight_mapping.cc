#include "handlers/weight_mapping.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ds {
namespace {

std::string ShapeString(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// Prefix -> what a key under it is, for bundled components of all-in-one checkpoints.
const std::vector<std::pair<std::string, std::string>>& BundledPrefixes() {
  static const auto* kBundled = new std::vector<std::pair<std::string, std::string>>{
      {"vae.", "bundled VAE"},
      {"first_stage_model.", "bundled VAE"},
      {"text_encoders.", "bundled text encoder"},
      {"text_encoder.", "bundled text encoder"},
      {"text_encoder_2.", "bundled text encoder"},
      {"cond_stage_model.", "bundled text encoder"},
      {"conditioner.", "bundled text encoder"},
      {"model_ema.", "EMA copy of the weights"},
  };
  return *kBundled;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string BundledReason(const std::string& key) {
  for (const auto& [prefix, reason] : BundledPrefixes()) {
    if (StartsWith(key, prefix)) return reason;
  }
  return "";
}

}  // namespace

const std::vector<std::string>& KnownModelPrefixes() {
  static const auto* kPrefixes =
      new std::vector<std::string>{"model.diffusion_model.", "diffusion_model."};
  return *kPrefixes;
}

SingleFileKeys SplitSingleFileKeys(const KeyShapes& keys) {
  SingleFileKeys out;
  // The prefix carried by the most keys wins ("model.diffusion_model." also contains
  // "diffusion_model." but not at the start, so they never both match one key).
  std::size_t best = 0;
  for (const std::string& prefix : KnownModelPrefixes()) {
    std::size_t n = 0;
    for (const auto& [k, shape] : keys) n += StartsWith(k, prefix);
    if (n > best) {
      best = n;
      out.prefix = prefix;
    }
  }
  for (const auto& [key, shape] : keys) {
    if (!out.prefix.empty()) {
      if (StartsWith(key, out.prefix)) {
        const std::string stripped = key.substr(out.prefix.size());
        out.model_keys[stripped] = shape;
        out.source[stripped] = key;
      } else {
        std::string reason = BundledReason(key);
        out.bundled[key] =
            reason.empty() ? absl::StrCat("outside the model prefix '", out.prefix, "'") : reason;
      }
      continue;
    }
    std::string reason = BundledReason(key);
    if (!reason.empty()) {
      out.bundled[key] = reason;
    } else {
      out.model_keys[key] = shape;
      out.source[key] = key;
    }
  }
  return out;
}

SingleFileKeys SplitComponentKeys(const KeyShapes& keys, const std::string& prefix) {
  SingleFileKeys out;
  out.prefix = prefix;
  for (const auto& [key, shape] : keys) {
    if (!prefix.empty() && StartsWith(key, prefix)) {
      const std::string stripped = key.substr(prefix.size());
      out.model_keys[stripped] = shape;
      out.source[stripped] = key;
    } else {
      std::string reason = BundledReason(key);
      out.bundled[key] =
          reason.empty() ? absl::StrCat("outside the component prefix '", prefix, "'") : reason;
    }
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> PlannedShape(const TensorRecipe& recipe,
                                                  const KeyShapes& sources) {
  if (recipe.sources.empty()) return absl::InvalidArgumentError("recipe has no source tensor");
  std::vector<const std::vector<int64_t>*> shapes;
  for (const std::string& key : recipe.sources) {
    auto it = sources.find(key);
    if (it == sources.end()) {
      return absl::InvalidArgumentError(absl::StrCat("source key '", key, "' is missing"));
    }
    shapes.push_back(&it->second);
  }
  const std::string& first = recipe.sources[0];
  std::vector<int64_t> out = *shapes[0];
  switch (recipe.op) {
    case TensorRecipe::Op::kCopy:
      return out;
    case TensorRecipe::Op::kRows:
      if (out.empty() || recipe.row_begin < 0 || recipe.row_count < 0 ||
          recipe.row_begin > out[0] || recipe.row_count > out[0] - recipe.row_begin) {
        return absl::InvalidArgumentError(
            absl::StrCat("key '", first, "' ", ShapeString(out), ": rows ", recipe.row_begin, "..",
                         recipe.row_begin + recipe.row_count, " are out of range"));
      }
      out[0] = recipe.row_count;
      return out;
    case TensorRecipe::Op::kSwapHalves:
      if (out.empty() || out[0] % 2 != 0) {
        return absl::InvalidArgumentError(absl::StrCat("key '", first, "' ", ShapeString(out),
                                                       ": cannot swap halves of an odd row count"));
      }
      return out;
    case TensorRecipe::Op::kReshape: {
      int64_t from = 1, to = 1;
      bool valid = true;
      for (int64_t d : out) from *= d;
      for (int64_t d : recipe.shape) {
        valid = valid && d >= 0;
        to *= d;
      }
      if (!valid || from != to) {
        return absl::InvalidArgumentError(absl::StrCat("key '", first, "' ", ShapeString(out),
                                                       " cannot be viewed as ",
                                                       ShapeString(recipe.shape)));
      }
      return recipe.shape;
    }
    case TensorRecipe::Op::kConcatRows:
      if (out.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("key '", first, "' is a scalar"));
      }
      for (std::size_t i = 1; i < shapes.size(); ++i) {
        const auto& s = *shapes[i];
        if (s.size() != out.size() || !std::equal(s.begin() + 1, s.end(), out.begin() + 1)) {
          return absl::InvalidArgumentError(absl::StrCat("cannot concatenate '", recipe.sources[i],
                                                         "' ", ShapeString(s), " with '", first,
                                                         "' ", ShapeString(*shapes[0])));
        }
        out[0] += s[0];
      }
      return out;
  }
  return absl::InternalError("unknown recipe op");
}

}  // namespace ds
