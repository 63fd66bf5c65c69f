#include "handlers/prompt_cache.h"

#include <algorithm>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace ds {

PromptEmbeddingCache::PromptEmbeddingCache(int64_t max_entries, int64_t max_bytes)
    : max_entries_(std::max<int64_t>(0, max_entries)),
      max_bytes_(std::max<int64_t>(0, max_bytes)) {}

// Length-prefixed fields, so no choice of texts can make two keys collide.
std::string PromptEmbeddingCache::FlatKey(const PromptCacheKey& key) {
  return absl::StrCat(key.encoder.size(), ":", key.encoder, ":", key.max_length, ":", key.text);
}

int64_t PromptEmbeddingCache::Bytes(const CachedPromptEncoding& value) {
  if (!value.embeds.defined()) return 0;
  return static_cast<int64_t>(value.embeds.numel()) *
         static_cast<int64_t>(value.embeds.element_size());
}

std::optional<CachedPromptEncoding> PromptEmbeddingCache::Lookup(const PromptCacheKey& key) {
  absl::MutexLock lock(&mu_);
  if (max_entries_ == 0) {
    ++misses_;
    return std::nullopt;
  }
  auto it = index_.find(FlatKey(key));
  if (it == index_.end()) {
    ++misses_;
    return std::nullopt;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second);
  return it->second->second;
}

void PromptEmbeddingCache::EraseLocked(std::list<Entry>::iterator it) {
  bytes_ -= Bytes(it->second);
  index_.erase(it->first);
  lru_.erase(it);
}

void PromptEmbeddingCache::Insert(const PromptCacheKey& key, CachedPromptEncoding value) {
  const int64_t bytes = Bytes(value);
  if (max_entries_ == 0 || !value.embeds.defined() || (max_bytes_ > 0 && bytes > max_bytes_)) {
    return;
  }
  std::string flat = FlatKey(key);
  absl::MutexLock lock(&mu_);
  if (auto it = index_.find(flat); it != index_.end()) EraseLocked(it->second);
  lru_.emplace_front(flat, std::move(value));
  index_.emplace(std::move(flat), lru_.begin());
  bytes_ += bytes;
  while (static_cast<int64_t>(lru_.size()) > max_entries_ ||
         (max_bytes_ > 0 && bytes_ > max_bytes_)) {
    EraseLocked(std::prev(lru_.end()));
    ++evictions_;
  }
}

PromptCacheStats PromptEmbeddingCache::stats() const {
  absl::MutexLock lock(&mu_);
  PromptCacheStats s;
  s.hits = hits_;
  s.misses = misses_;
  s.evictions = evictions_;
  s.entries = static_cast<int64_t>(lru_.size());
  s.bytes = bytes_;
  s.capacity_entries = max_entries_;
  return s;
}

}  // namespace ds
