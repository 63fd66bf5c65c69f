#include "handlers/lora_host.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/layerwise_casting.h"
#include "handlers/mapping_guard.h"
#include "handlers/state_dict.h"
#include "handlers/status.h"
#include "handlers/tensor_checks.h"

namespace ds {
namespace {

constexpr size_t kMaxNameLength = 128;

int64_t Bytes(const torch::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.numel() * t.element_size()) : 0;
}

// Copies `t` into `dest` (allocated, the model dtype and device, t's shape) and checks the copy
// for NaN/Inf while it is still in cache. Same-dtype contiguous CPU copies are a memcpy on the
// calling thread (no intra-op pool).
absl::Status CopyChecked(const torch::Tensor& t, torch::Tensor& dest, const ModelOptions& o,
                         const std::string& what) {
  RETURN_IF_ERROR(TorchCallVoid("LoRA tensor copy", [&] {
    if (t.is_cpu() && dest.is_cpu() && t.scalar_type() == dest.scalar_type() &&
        t.is_contiguous()) {
      if (t.numel() > 0) {
        std::memcpy(dest.data_ptr(), t.data_ptr(),
                    static_cast<size_t>(t.numel()) * t.element_size());
      }
    } else {
      dest.copy_(t);
    }
  }));
  ASSIGN_OR_RETURN(bool finite, AllFinite(dest));
  if (finite) return absl::OkStatus();
  // Widening and same-type copies keep NaN/Inf as they are; only a narrowing one can create Inf.
  ASSIGN_OR_RETURN(bool source_finite, AllFinite(t));
  if (!source_finite) return absl::InvalidArgumentError(what + " contains NaN or Inf values");
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": a value overflows the model dtype ", c10::toString(o.dtype)));
}

}  // namespace

absl::Status ValidateAdapterName(const std::string& name) {
  if (name.empty() || name.size() > kMaxNameLength) {
    return absl::InvalidArgumentError(absl::StrCat("adapter name must have 1 to ", kMaxNameLength,
                                                   " characters, got ", name.size()));
  }
  for (char ch : name) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter name '", name, "' may only contain letters, digits, '.', '_', '-'"));
    }
  }
  return absl::OkStatus();
}


absl::StatusOr<torch::Tensor> CopyLoraTensor(const torch::Tensor& t, const ModelOptions& o,
                                             const std::string& what) {
  if (!t.defined()) return t;
  ASSIGN_OR_RETURN(torch::Tensor out, TorchCall("LoRA tensor allocation", [&] {
                     return torch::empty(t.sizes(),
                                         torch::TensorOptions().dtype(o.dtype).device(o.device));
                   }));
  RETURN_IF_ERROR(CopyChecked(t, out, o, what));
  return out;
}

LoraHost::LoraHost(std::shared_ptr<DiffusionModel> model, const LoraHandler* handler,
                   LoraHostOptions options)
    : model_(std::move(model)), handler_(handler), options_(options) {
  for (auto& [name, tensor] : NamedTensors(model_->module())) {
    param_shapes_[name] = tensor.sizes().vec();
    params_.emplace(name, tensor);
  }
}

LoraHost::~LoraHost() = default;

absl::StatusOr<LoraAdapterPtr> LoraHost::Prepare(const std::string& name, const std::string& path,
                                                 const AdapterLoadOptions& options) const {
  // Every file mapped while preparing is checked for truncation or in-place changes, also when
  // preparing failed (a torn file is DATA_LOSS, whatever the bytes it left made the parser say):
  // a torn read never becomes an adapter.
  MappedReadScope reads;
  auto prepare = [&]() -> absl::StatusOr<LoraAdapterPtr> {
    if (!std::isfinite(options.default_weight)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter '", name, "': default weight must be finite, got ", options.default_weight));
    }
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      const int err = errno;
      std::string msg = absl::StrCat("LoRA file ", path, ": ", std::strerror(err));
      return err == ENOENT ? absl::NotFoundError(msg) : absl::InvalidArgumentError(msg);
    }
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat("LoRA file ", path, ": not a regular file"));
    }
    if (static_cast<int64_t>(st.st_size) > options_.max_file_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("LoRA file ", path, " is ", st.st_size, " bytes, over the limit of ",
                       options_.max_file_bytes, " bytes (max_file_bytes)"));
    }
    // The file is hashed on another thread while it is converted, validated and copied here.
    std::unique_ptr<PendingDigest> digest;
    ASSIGN_OR_RETURN(
        LoadedLora loaded,
        LoadLoraHashing(path, *handler_, param_shapes_,
                        LoraLoadOptions{.allow_partial = options.allow_partial,
                                        .check_finite = false},  // checked while copying below
                        &digest));
    if (!options.format_hint.empty() && loaded.lora.format != options.format_hint) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA ", path, " is in format '", loaded.lora.format,
                       "', not the expected '", options.format_hint, "'"));
    }
    auto adapter = std::make_shared<LoraAdapter>();
    adapter->name = name;
    adapter->path = options.source.empty() ? path : options.source;
    adapter->format = loaded.lora.format;
    adapter->default_weight = options.default_weight;
    const ModelOptions& mo = model_->options();
    for (const LoraModule& m : loaded.lora.modules) {
      LoraModule copy = m;
      const std::string what = absl::StrCat("LoRA '", path, "': module ", m.module);
      ASSIGN_OR_RETURN(copy.down, CopyLoraTensor(m.down, mo, what + ": lora_A"));
      ASSIGN_OR_RETURN(copy.up, CopyLoraTensor(m.up, mo, what + ": lora_B"));
      ASSIGN_OR_RETURN(copy.bias, CopyLoraTensor(m.bias, mo, what + ": lora_B bias"));
      adapter->bytes += Bytes(copy.down) + Bytes(copy.up) + Bytes(copy.bias);
      adapter->modules.push_back(std::move(copy));
    }
    for (const LoraOverlay& o : loaded.lora.overlays) {
      LoraOverlay copy = o;
      ASSIGN_OR_RETURN(copy.value, CopyLoraTensor(o.value, mo,
                                                  absl::StrCat("LoRA '", path, "': parameter ",
                                                               o.param)));
      adapter->bytes += Bytes(copy.value);
      adapter->overlays.push_back(std::move(copy));
    }
    adapter->sha256 = loaded.report.sha256 = loaded.lora.sha256 = digest->Join();
    adapter->report = std::move(loaded.report);
    return LoraAdapterPtr(std::move(adapter));
  };
  absl::StatusOr<LoraAdapterPtr> prepared = prepare();
  RETURN_IF_ERROR(reads.Check());
  return prepared;
}

absl::StatusOr<AdapterLoadResult> LoraHost::Load(const std::string& name, const std::string& path,
                                                 const AdapterLoadOptions& options) {
  RETURN_IF_ERROR(ValidateAdapterName(name));
  if (handler_ == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat(model_->class_name(), " does not support LoRA adapters"));
  }
  {
    // Fail fast on a taken name before the (slow) conversion; checked again at insertion.
    std::shared_lock lock(store_mu_);
    if (!options.replace && store_.count(name) > 0) {
      return absl::AlreadyExistsError(absl::StrCat(
          "adapter '", name, "' is already loaded; unload it first or load with replace"));
    }
  }
  // Read, convert, validate and copy with no lock held: requests are not affected.
  ASSIGN_OR_RETURN(LoraAdapterPtr adapter, Prepare(name, path, options));

  AdapterLoadResult result;
  result.report = adapter->report;
  result.bytes = adapter->bytes;
  std::unique_lock lock(store_mu_);
  auto it = store_.find(name);
  if (it != store_.end()) {
    if (!options.replace) {
      return absl::AlreadyExistsError(absl::StrCat(
          "adapter '", name, "' is already loaded; unload it first or load with replace"));
    }
    for (const AdapterStack::Use& u : fused_) {
      if (u.adapter == it->second->adapter) {
        return absl::FailedPreconditionError(
            absl::StrCat("adapter '", name, "' is fused; unfuse it before replacing it"));
      }
    }
  }
  const int64_t freed = it != store_.end() ? it->second->adapter->bytes : 0;
  const int64_t over = used_bytes_ - freed + adapter->bytes - options_.memory_budget_bytes;
  std::vector<std::string> evict;
  if (over > 0) {
    std::set<const LoraAdapter*> fused_set;
    for (const AdapterStack::Use& u : fused_) fused_set.insert(u.adapter.get());
    std::vector<std::pair<uint64_t, std::string>> candidates;
    std::vector<std::string> pinned, busy;
    for (const auto& [n, e] : store_) {
      if (n == name) continue;
      if (e->pinned) {
        pinned.push_back(n);
      } else if (e->adapter.use_count() > 1 || fused_set.count(e->adapter.get()) > 0) {
        busy.push_back(n);
      } else {
        candidates.emplace_back(e->last_used.load(), n);
      }
    }
    std::sort(candidates.begin(), candidates.end());
    int64_t room = 0;
    for (const auto& [used, n] : candidates) {
      if (room >= over) break;
      evict.push_back(n);
      room += store_.at(n)->adapter->bytes;
    }
    if (room < over) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "adapter '", name, "' needs ", adapter->bytes, " bytes; the LoRA memory budget is ",
          options_.memory_budget_bytes, " bytes with ", used_bytes_ - freed,
          " in use, and evicting every idle unpinned adapter frees only ", room,
          " (pinned: ", pinned.empty() ? "none" : absl::StrJoin(pinned, ", "),
          "; in use by requests or fused: ", busy.empty() ? "none" : absl::StrJoin(busy, ", "),
          ")"));
    }
  }
  for (const std::string& n : evict) {
    auto e = store_.find(n);
    used_bytes_ -= e->second->adapter->bytes;
    if (e->second->adapter.use_count() > 1) retired_.push_back(e->second->adapter);
    store_.erase(e);
  }
  result.evicted = evict;
  if (it != store_.end()) {
    used_bytes_ -= it->second->adapter->bytes;
    if (it->second->adapter.use_count() > 1) retired_.push_back(it->second->adapter);
    result.replaced = true;
    it->second->adapter = adapter;
    it->second->pinned = options.pin;
  } else {
    it = store_.emplace(name, std::make_unique<Entry>()).first;
    it->second->adapter = adapter;
    it->second->pinned = options.pin;
  }
  it->second->last_used = ++clock_;
  used_bytes_ += adapter->bytes;
  PruneRetiredLocked();
  return result;
}

absl::Status LoraHost::Unload(const std::string& name) {
  std::unique_lock lock(store_mu_);
  auto it = store_.find(name);
  if (it == store_.end()) {
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "' is loaded"));
  }
  for (const AdapterStack::Use& u : fused_) {
    if (u.adapter == it->second->adapter) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter '", name, "' is fused; unfuse it before unloading it"));
    }
  }
  used_bytes_ -= it->second->adapter->bytes;
  if (it->second->adapter.use_count() > 1) retired_.push_back(it->second->adapter);
  store_.erase(it);
  PruneRetiredLocked();
  return absl::OkStatus();
}

absl::Status LoraHost::SetPinned(const std::string& name, bool pinned) {
  std::unique_lock lock(store_mu_);
  auto it = store_.find(name);
  if (it == store_.end()) {
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "' is loaded"));
  }
  it->second->pinned = pinned;
  return absl::OkStatus();
}

AdapterInfo LoraHost::InfoLocked(const std::string& name, const Entry& e) const {
  AdapterInfo info;
  info.name = name;
  info.sha256 = e.adapter->sha256;
  info.path = e.adapter->path;
  info.format = e.adapter->format;
  info.bytes = e.adapter->bytes;
  info.modules = static_cast<int64_t>(e.adapter->modules.size());
  info.pinned = e.pinned;
  info.default_weight = e.adapter->default_weight;
  for (const AdapterStack::Use& u : fused_) info.fused |= u.adapter == e.adapter;
  info.users = e.adapter.use_count() - 1;
  info.last_used = e.last_used.load();
  return info;
}

std::vector<AdapterInfo> LoraHost::List() const {
  std::shared_lock lock(store_mu_);
  std::vector<AdapterInfo> out;
  for (const auto& [name, e] : store_) out.push_back(InfoLocked(name, *e));
  return out;
}

absl::StatusOr<AdapterInfo> LoraHost::Info(const std::string& name) const {
  std::shared_lock lock(store_mu_);
  auto it = store_.find(name);
  if (it == store_.end()) {
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "' is loaded"));
  }
  return InfoLocked(name, *it->second);
}

absl::StatusOr<LoraAdapterPtr> LoraHost::Get(const std::string& name) const {
  std::shared_lock lock(store_mu_);
  auto it = store_.find(name);
  if (it == store_.end()) {
    return absl::NotFoundError(absl::StrCat("no adapter named '", name, "' is loaded"));
  }
  return it->second->adapter;
}

absl::StatusOr<AdapterStackPtr> LoraHost::SnapshotLocked(
    const std::vector<AdapterRequest>& adapters, bool for_fuse) const {
  auto stack = std::make_shared<AdapterStack>();
  // param -> (adapter name, replacement)
  std::map<std::string, std::pair<std::string, torch::Tensor>> overlay_owner;
  std::set<std::string> seen;
  for (const AdapterRequest& r : adapters) {
    auto it = store_.find(r.name);
    if (it == store_.end()) {
      std::vector<std::string> names;
      for (const auto& [n, e] : store_) names.push_back(n);
      return absl::NotFoundError(
          absl::StrCat("no adapter named '", r.name, "' is loaded (loaded: ",
                       names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
    }
    if (!seen.insert(r.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", r.name, "' is named twice in one request"));
    }
    const LoraAdapterPtr& adapter = it->second->adapter;
    const double weight = r.weight.value_or(adapter->default_weight);
    if (!std::isfinite(weight)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", r.name, "': weight must be finite, got ", weight));
    }
    if (!for_fuse) {
      for (const AdapterStack::Use& u : fused_) {
        if (u.adapter == adapter) {
          return absl::FailedPreconditionError(absl::StrCat(
              "adapter '", r.name, "' is fused into the base weights; requests already get it"));
        }
      }
    }
    for (const LoraOverlay& o : adapter->overlays) {
      auto [owner, inserted] = overlay_owner.emplace(o.param, std::make_pair(r.name, o.value));
      // Two adapters may replace a parameter with the same value (e.g. one file loaded twice).
      if (!inserted && !(owner->second.second.sizes() == o.value.sizes() &&
                         torch::equal(owner->second.second, o.value))) {
        return absl::InvalidArgumentError(
            absl::StrCat("adapters '", owner->second.first, "' and '", r.name,
                         "' replace parameter ", o.param, " with different values; use one of them"));
      }
    }
    stack->adapters.push_back({adapter, weight});
  }
  for (const AdapterStack::Use& u : stack->adapters) {
    for (const LoraModule& m : u.adapter->modules) {
      stack->context.AddDelta(m.module, LoraDelta{m.down, m.up, m.bias, m.scale * u.weight});
    }
    for (const LoraOverlay& o : u.adapter->overlays) stack->context.SetOverlay(o.param, o.value);
  }
  const uint64_t now = ++clock_;
  for (const AdapterRequest& r : adapters) store_.at(r.name)->last_used = now;
  return AdapterStackPtr(std::move(stack));
}

absl::StatusOr<AdapterStackPtr> LoraHost::Snapshot(
    const std::vector<AdapterRequest>& adapters) const {
  if (!adapters.empty() && handler_ == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat(model_->class_name(), " does not support LoRA adapters"));
  }
  std::shared_lock lock(store_mu_);
  return SnapshotLocked(adapters, /*for_fuse=*/false);
}

absl::StatusOr<torch::Tensor> LoraHost::Forward(const TensorMap& inputs,
                                                const AdapterStack* stack) const {
  return ForwardWith(stack, [&](const DiffusionModel& model, const LoraContext* lora) {
    return model.Forward(inputs, lora);
  });
}

absl::StatusOr<torch::Tensor> LoraHost::ForwardWith(const AdapterStack* stack,
                                                    const ModelForward& forward) const {
  std::shared_lock lock(weights_mu_);
  if (stack != nullptr && !fused_in_weights_.empty()) {
    for (const AdapterStack::Use& u : stack->adapters) {
      const bool fused = std::any_of(fused_in_weights_.begin(), fused_in_weights_.end(),
                                     [&](const AdapterStack::Use& f) { return f.adapter == u.adapter; });
      if (fused) {
        return absl::AbortedError(absl::StrCat("adapter '", u.adapter->name,
                                               "' was fused while this request was queued; retry"));
      }
    }
  }
  return forward(*model_, stack != nullptr && !stack->empty() ? &stack->context : nullptr);
}

absl::Status LoraHost::Fuse(const std::vector<AdapterRequest>& adapters) {
  if (!adapters.empty() && handler_ == nullptr) {
    return absl::UnimplementedError(
        absl::StrCat(model_->class_name(), " does not support LoRA adapters"));
  }
  std::lock_guard fuse_lock(fuse_mu_);
  AdapterStackPtr stack;
  std::vector<AdapterStack::Use> previous;
  {
    // Claim the adapters: from here on they cannot be unloaded or replaced.
    std::unique_lock lock(store_mu_);
    ASSIGN_OR_RETURN(stack, SnapshotLocked(adapters, /*for_fuse=*/true));
    previous = fused_;
    fused_ = stack->adapters;
  }
  auto restore_claim = [&] {
    std::unique_lock lock(store_mu_);
    fused_ = previous;
  };
  // The pristine value of a parameter: its saved original while fused, else the live tensor
  // (only Fuse changes either, and fuse_mu_ is held).
  auto base = [&](const std::string& param) -> const torch::Tensor& {
    auto it = pristine_.find(param);
    return it != pristine_.end() ? it->second : params_.at(param);
  };
  std::map<std::string, torch::Tensor> next;  // param -> fused value
  int64_t extra = 0;
  const Float8Format float8_format = model_->options().float8_format;
  absl::Status quantized;  // re-encoding 8-bit fused weights
  absl::Status computed = TorchCallVoid("LoRA fuse", [&] {
    torch::NoGradGuard no_grad;
    // Accumulate in float32 and round once.
    std::map<std::string, torch::Tensor> acc;
    for (const AdapterStack::Use& u : stack->adapters) {
      for (const LoraModule& m : u.adapter->modules) {
        const std::string wname = m.module + ".weight";
        const torch::Tensor& w = base(wname);
        torch::Tensor& a = acc[wname];
        const int64_t in = std::max<int64_t>(m.down.size(1), a.defined() ? a.size(1) : w.size(1));
        if (!a.defined()) {
          // 8-bit stored weights (layerwise_casting.h) are decoded with their pristine scales.
          a = w.scalar_type() == torch::kByte
                  ? DequantizeFloat8(w, base(Float8ScaleName(wname)), float8_format)
                  : w.to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true);
        }
        if (a.size(1) < in) {
          a = torch::cat({a, torch::zeros({a.size(0), in - a.size(1)}, a.options())}, 1);
        }
        a.narrow(1, 0, m.down.size(1))
            .addmm_(m.up.to(torch::kFloat), m.down.to(torch::kFloat), 1.0, m.scale * u.weight);
        if (m.bias.defined()) {
          const std::string bname = m.module + ".bias";
          torch::Tensor& b = acc[bname];
          if (!b.defined()) b = base(bname).to(torch::kFloat, false, true);
          b.add_(m.bias.to(torch::kFloat), m.scale * u.weight);
        }
      }
      for (const LoraOverlay& o : u.adapter->overlays) acc[o.param] = o.value.to(torch::kFloat);
    }
    for (auto& [param, value] : acc) {
      if (params_.at(param).scalar_type() == torch::kByte) {
        // 8-bit storage: re-encoded with fresh per-row scales (the fused weight's own range).
        auto q = QuantizeFloat8(value, float8_format, param);
        if (!q.ok()) {
          quantized = q.status();
          return;
        }
        const std::string scale = Float8ScaleName(param);
        next[scale] = q->scale.to(params_.at(scale).device());
        extra += Bytes(next[scale]);
        next[param] = q->codes.to(params_.at(param).device());
      } else {
        next[param] = value.to(params_.at(param).scalar_type());
      }
      extra += Bytes(next[param]);
    }
  });
  if (computed.ok()) computed = quantized;
  if (!computed.ok()) {
    restore_claim();
    return computed;
  }
  {
    std::unique_lock weights_lock(weights_mu_);
    torch::NoGradGuard no_grad;
    for (auto it = pristine_.begin(); it != pristine_.end();) {
      if (next.count(it->first) == 0) {
        params_.at(it->first).set_data(it->second);
        it = pristine_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& [param, value] : next) {
      torch::Tensor& live = params_.at(param);
      if (pristine_.count(param) == 0) pristine_.emplace(param, live.detach());
      live.set_data(value);
    }
    fused_in_weights_ = stack->adapters;
  }
  fused_extra_bytes_ = extra;
  return absl::OkStatus();
}

absl::Status LoraHost::Unfuse() { return Fuse({}); }

std::vector<AdapterRequest> LoraHost::fused() const {
  std::shared_lock lock(store_mu_);
  std::vector<AdapterRequest> out;
  for (const AdapterStack::Use& u : fused_) out.push_back({u.adapter->name, u.weight});
  return out;
}

void LoraHost::PruneRetiredLocked() const {
  retired_.erase(std::remove_if(retired_.begin(), retired_.end(),
                                [](const std::weak_ptr<const LoraAdapter>& w) { return w.expired(); }),
                 retired_.end());
}

int64_t LoraHost::memory_used_bytes() const {
  std::shared_lock lock(store_mu_);
  return used_bytes_;
}

int64_t LoraHost::retired_bytes() const {
  std::unique_lock lock(store_mu_);
  PruneRetiredLocked();
  int64_t total = 0;
  for (const auto& w : retired_) {
    if (LoraAdapterPtr a = w.lock()) total += a->bytes;
  }
  return total;
}

int64_t LoraHost::fused_extra_bytes() const { return fused_extra_bytes_.load(); }

size_t LoraHost::adapter_count() const {
  std::shared_lock lock(store_mu_);
  return store_.size();
}

}  // namespace ds
