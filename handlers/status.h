// Status helpers used at every fallible boundary of the project.
//
// Abseil 20220623 (Debian 12) ships no RETURN_IF_ERROR / ASSIGN_OR_RETURN, so they live here.
// Note: Debian's Abseil is built with its own absl::string_view (not std::string_view), so
// absl::StrCat and absl::Status messages take absl::string_view / std::string, not
// std::string_view.
//
// Also: TorchCall(), which runs a LibTorch call and turns any c10::Error / std::exception into an
// absl::Status, so that exceptions never cross a layer boundary.
#pragma once

#include <exception>
#include <new>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

#define DS_STATUS_CONCAT_INNER_(a, b) a##b
#define DS_STATUS_CONCAT_(a, b) DS_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if not OK.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status ds_status_ = (expr);      \
    if (!ds_status_.ok()) return ds_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, F());` evaluates F() (an absl::StatusOr<T>); on error returns its
// status, otherwise move-assigns the value to the left-hand side.
#define ASSIGN_OR_RETURN(lhs, expr) \
  DS_ASSIGN_OR_RETURN_IMPL_(DS_STATUS_CONCAT_(ds_statusor_, __LINE__), lhs, expr)
#define DS_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = std::move(tmp).value()

namespace ds {

// Put in the message of an exception thrown because the process memory budget refused an
// allocation (handlers/memory_budget.h), so that TorchCall recognises it even after LibTorch
// rethrew it as a c10::Error (at::parallel_for does).
inline constexpr char kMemoryBudgetMarker[] = "[memory budget exceeded]";

// Prefixes a status message with context, keeping the code. OK passes through.
inline absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

// Runs `fn` (which may throw c10::Error or any std::exception) and returns its result as a
// StatusOr. Exceptions become INTERNAL (or INVALID_ARGUMENT when `bad_input_code` says so) with
// `context` prefixed. An allocation that failed becomes RESOURCE_EXHAUSTED: std::bad_alloc,
// LibTorch's "DefaultCPUAllocator: can't allocate memory", or a message carrying kMemoryBudgetMarker.
// Use it exactly where LibTorch is called.
template <typename Fn>
auto TorchCall(absl::string_view context, Fn&& fn,
               absl::StatusCode code = absl::StatusCode::kInternal)
    -> absl::StatusOr<decltype(fn())> {
  try {
    return fn();
  } catch (const std::bad_alloc& e) {
    return absl::ResourceExhaustedError(absl::StrCat(context, ": out of memory: ", e.what()));
  } catch (const std::exception& e) {
    std::string what = e.what();
    // c10::Error appends a C++ backtrace after the first line; keep the message only.
    if (auto pos = what.find("\nException raised from"); pos != std::string::npos) {
      what.resize(pos);
    }
    const bool out_of_memory = what.find(kMemoryBudgetMarker) != std::string::npos ||
                               what.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos;
    return absl::Status(out_of_memory ? absl::StatusCode::kResourceExhausted : code,
                        absl::StrCat(context, ": ", what));
  }
}

// Same for calls that return nothing.
template <typename Fn>
absl::Status TorchCallVoid(absl::string_view context, Fn&& fn,
                           absl::StatusCode code = absl::StatusCode::kInternal) {
  auto r = TorchCall(
      context,
      [&]() {
        fn();
        return 0;
      },
      code);
  return r.status();
}

}  // namespace ds
