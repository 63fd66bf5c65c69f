// Reading a model's config.json fields with precise errors (header-only, no LibTorch).
//
// Every model folder parses a diffusers/transformers config.json into its own config struct; this
// is the shared part: a missing field keeps the struct's default, a present field must have the
// JSON type the reference library writes (integers for sizes and ids, booleans, strings), and
// every error is INVALID_ARGUMENT naming "<ConfigClass>.<field>" and what was found.
//
// Thread-safety: immutable after construction; safe to share.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace ds {

class ConfigFields {
 public:
  // `config_class` prefixes every error ("CLIPTextConfig"); `max_size` bounds Positive() (far
  // above any real model, so that products of sizes stay inside int64).
  ConfigFields(std::string config_class, int64_t max_size)
      : config_class_(std::move(config_class)), max_size_(max_size) {}

  // INVALID_ARGUMENT "<ConfigClass>.<field>: <what>".
  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(config_class_, ".", field, ": ", what));
  }

  // OK for 1..max_size; otherwise "must be positive, got v" / "too large: v".
  absl::Status Positive(absl::string_view field, int64_t value) const {
    if (value <= 0) return Error(field, absl::StrCat("must be positive, got ", value));
    if (value > max_size_) return Error(field, absl::StrCat("too large: ", value));
    return absl::OkStatus();
  }

  // Each reads `field` of `json` into *out when present (JSON null counts as present and is a
  // type error); absent leaves *out unchanged. Integers must be JSON integers (1.0 is refused:
  // the reference libraries write sizes as integers); doubles accept any JSON number.
  absl::Status ReadInt(const nlohmann::json& json, const char* field, int64_t* out) const {
    return Read(json, field, out, &nlohmann::json::is_number_integer, "an integer");
  }
  absl::Status ReadDouble(const nlohmann::json& json, const char* field, double* out) const {
    return Read(json, field, out, &nlohmann::json::is_number, "a number");
  }
  absl::Status ReadString(const nlohmann::json& json, const char* field, std::string* out) const {
    return Read(json, field, out, &nlohmann::json::is_string, "a string");
  }
  absl::Status ReadBool(const nlohmann::json& json, const char* field, bool* out) const {
    return Read(json, field, out, &nlohmann::json::is_boolean, "a boolean");
  }

  const std::string& config_class() const { return config_class_; }
  int64_t max_size() const { return max_size_; }

 private:
  template <typename T>
  absl::Status Read(const nlohmann::json& json, const char* field, T* out,
                    bool (nlohmann::json::*is_type)() const noexcept,
                    absl::string_view expected) const {
    auto it = json.find(field);
    if (it == json.end()) return absl::OkStatus();
    if (!((*it).*is_type)()) {
      return Error(field, absl::StrCat("expected ", expected, ", got ", it->dump()));
    }
    *out = it->get<T>();
    return absl::OkStatus();
  }

  std::string config_class_;
  int64_t max_size_;
};

}  // namespace ds
