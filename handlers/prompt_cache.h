// PromptEmbeddingCache: a bounded, thread-safe LRU of encoded prompts, so that a pipeline skips
// its text encoders for prompts it has seen (PipelineOptions::prompt_cache_entries /
// prompt_cache_max_bytes). Model-agnostic: an entry is one prompt's encoder output (any tensor)
// keyed by (encoder component, prompt text, max length); pipelines own one cache each.
//
// Entries are shared tensor handles: callers must treat a looked-up tensor as read-only (never
// modify it in place). Bytes are counted as numel * element size of each stored tensor.
//
// Thread-safety: every method may be called concurrently (one internal mutex; the encoder runs
// outside it, so two threads that miss on the same key both encode and the second Insert
// replaces the first entry).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "handlers/pipeline.h"

namespace ds {

struct PromptCacheKey {
  std::string encoder;     // the text-encoder component, e.g. "text_encoder_2"
  std::string text;        // the prompt, byte for byte
  int64_t max_length = 0;  // the token length it was padded / truncated to
};

struct CachedPromptEncoding {
  torch::Tensor embeds;            // the encoder output for this one prompt (read-only)
  bool truncated = false;          // the tokenizer dropped tokens
  int64_t untruncated_length = 0;  // tokens (special tokens included) before truncation
};

class PromptEmbeddingCache {
 public:
  // `max_entries` 0 = disabled (Lookup always misses, Insert keeps nothing); `max_bytes` 0 = no
  // byte bound. Negative values are treated as 0.
  PromptEmbeddingCache(int64_t max_entries, int64_t max_bytes);

  PromptEmbeddingCache(const PromptEmbeddingCache&) = delete;
  PromptEmbeddingCache& operator=(const PromptEmbeddingCache&) = delete;

  // The entry for `key` (now the most recently used), counted as a hit; nullopt counted as a miss.
  std::optional<CachedPromptEncoding> Lookup(const PromptCacheKey& key);

  // Stores `value` as the most recently used entry (replacing one with the same key), then drops
  // least recently used entries until both bounds hold. A value larger than max_bytes alone, or
  // with an undefined tensor, is not stored.
  void Insert(const PromptCacheKey& key, CachedPromptEncoding value);

  PromptCacheStats stats() const;
  bool enabled() const { return max_entries_ > 0; }

 private:
  using Entry = std::pair<std::string, CachedPromptEncoding>;
  static std::string FlatKey(const PromptCacheKey& key);
  static int64_t Bytes(const CachedPromptEncoding& value);
  void EraseLocked(std::list<Entry>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int64_t max_entries_;
  const int64_t max_bytes_;
  mutable absl::Mutex mu_;
  std::list<Entry> lru_ ABSL_GUARDED_BY(mu_);  // front = most recently used
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ds
