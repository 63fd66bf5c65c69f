// The shared adapter store: LoRA adapters that every replica of a deployment serves alike.
//
// Replicas behind a load balancer share one folder (`--adapter_store`; a ReadWriteMany volume in
// Kubernetes). LoadLoRA on any replica writes the adapter there before it answers; a replica that
// is asked for an adapter it does not hold loads it from there on demand; UnloadLoRA removes it
// there; every replica polls the folder and follows changes (a replaced digest is reloaded, a
// removed adapter is dropped) within one poll interval.
//
// Layout (version 1; only these files are ever read):
//   <root>/v1/<instance>.d/<adapter>.adapter.json   the descriptor (JSON, see AdapterDescriptor)
//   <root>/v1/<instance>.d/<adapter>.<sha256>.safetensors
//                                                   the adapter file, byte for byte as loaded
//   <root>/v1/<instance>.d/.tmp-*                   files being written (never read)
// Entries belong to a model *instance name*: replicas that serve the same model under the same
// instance name (the preload ConfigMap gives them the same names) share its adapters. Instance
// and adapter names are [A-Za-z0-9._-] (validated), so every name is one path component; the
// ".d" suffix keeps the instance names "." and ".." inside the store.
//
// Atomicity. Every file is written under a temporary name in the same folder, fsync'ed, renamed
// into place (link() instead when the name must not exist yet) and the folder fsync'ed, so a
// reader sees either the old or the new complete file, never a partial one, also after a crash.
// The adapter file is written before the descriptor that names it, so a descriptor never names a
// file that is not complete. A replaced or removed adapter's file is deleted after its
// descriptor; a replica that read the old descriptor just before re-reads it and loads the new one.
//
// Integrity. A descriptor records the adapter file's SHA-256 and size. Loading from the store
// checks both (hashing the file) before the adapter is inserted into the model: a truncated,
// altered or unreadable file, or a descriptor that does not parse, is DATA_LOSS naming the file
// (relative to the store root) and is never served.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "handlers/lora_host.h"
#include "server/model_manager.h"

namespace ds::server {

class Metrics;

// One adapter of the store (the descriptor file's fields).
struct AdapterDescriptor {
  std::string instance;  // model instance name
  std::string name;      // adapter name
  std::string sha256;    // lower-case hex SHA-256 of the adapter file: its content address
  int64_t file_bytes = 0;
  std::string format;          // the detected LoRA format; replicas require the same detection
  bool allow_partial = false;  // as LoadLoRA asked (replicas load it the same way)
  bool pin = false;            // never evicted on any replica
  double default_weight = 1.0;  // the weight of a Generate that names it without one
  std::string blob;            // the adapter file's name inside the instance folder
  std::string source;          // what the publishing replica loaded it from ("inline", a path)
  std::string published_by;    // host name of the publishing replica
  int64_t published_unix_ms = 0;
};

// The store folder: descriptors and adapter files. No model, no LibTorch besides hashing.
//
// Thread-safety: all methods are thread-safe (the filesystem is the only state); concurrent
// writers of one entry (in this or other processes) are safe: the last rename wins.
class AdapterStore {
 public:
  // Opens (creating <root>/v1 when missing) the store at `root`. INVALID_ARGUMENT for an empty
  // root; FAILED_PRECONDITION when it is not a writable folder (the message names it).
  // Temporary files are named ".tmp-<host>-<pid>-<random>"; Open deletes those that a writer of
  // this host left when it died mid-publish (last modified before this process started, and
  // their pid is not running or is this process's). Other hosts' temporary files are left to
  // Sweep.
  static absl::StatusOr<std::unique_ptr<AdapterStore>> Open(const std::string& root);

  const std::string& root() const { return root_; }

  // Publishes `file` (whose SHA-256 the caller computed as d.sha256; d.instance, d.name, d.format
  // etc. filled; blob/file_bytes/published_* are set here) and returns the descriptor written.
  // The file is copied while it is hashed again: ABORTED when its bytes no longer match d.sha256
  // (it changed since it was loaded). With !replace, ALREADY_EXISTS when the entry exists (also
  // when another replica created it concurrently). INVALID_ARGUMENT for a bad name;
  // RESOURCE_EXHAUSTED when the store's filesystem is full (ENOSPC, EDQUOT) and INTERNAL for
  // another I/O error, both naming the store file; after an error the entry is as it was and no
  // temporary file of this call remains (a complete adapter file whose descriptor could not be
  // written stays unnamed until Sweep deletes it).
  absl::StatusOr<AdapterDescriptor> Publish(AdapterDescriptor d, const std::string& file,
                                            bool replace);

  // The descriptor of `name` under `instance`. NOT_FOUND when there is none; DATA_LOSS when the
  // descriptor does not parse or contradicts its name (naming the file).
  absl::StatusOr<AdapterDescriptor> Read(const std::string& instance,
                                         const std::string& name) const;

  struct Listing {
    std::map<std::string, AdapterDescriptor> adapters;  // by adapter name
    std::map<std::string, absl::Status> bad;            // adapter name -> DATA_LOSS
  };
  // Every descriptor of `instance` (an instance with no folder has none). INTERNAL when the
  // folder cannot be read.
  absl::StatusOr<Listing> List(const std::string& instance) const;

  // Removes the descriptor of `name`, then its adapter file. NOT_FOUND when there is none.
  absl::Status Remove(const std::string& instance, const std::string& name);

  // The adapter file of `d` after checking it: it exists with d.file_bytes bytes and SHA-256
  // d.sha256 (the digest is remembered by file identity, so loading the path right after does
  // not hash it again). NOT_FOUND when the file is gone (replaced or removed meanwhile: re-read
  // the descriptor); DATA_LOSS for a size or digest mismatch or an unreadable file.
  absl::StatusOr<std::string> VerifiedBlob(const AdapterDescriptor& d) const;

  // Deletes adapter files no descriptor names and temporary files, both only when older than
  // `min_age` (a publish in progress on another replica writes the file before its descriptor).
  // Best effort; returns how many files were deleted.
  int Sweep(const std::string& instance, absl::Duration min_age);

  // "<instance>.d/<file>": how messages name a store file (never the server-side root).
  static std::string Shown(const std::string& instance, const std::string& file);

 private:
  explicit AdapterStore(std::string root) : root_(std::move(root)) {}
  std::string InstanceDir(const std::string& instance) const;

  const std::string root_;
};

struct AdapterSyncOptions {
  // How often every replica re-reads the store and follows it (replaced digests are reloaded,
  // removed adapters dropped). Bounds how long a change takes to reach every replica.
  absl::Duration poll_interval = absl::Seconds(1);
  // Orphaned adapter files and temporary files older than this are deleted by Sweep.
  absl::Duration orphan_age = absl::Minutes(10);
};

// AdapterSync: the replica side of the store for a ModelManager's instances.
//
//  - Published / Removed: LoadLoRA and UnloadLoRA call them (under Lock()) after changing the
//    local instance, so the store holds what the local instance holds before the RPC answers.
//  - EnsureLoaded: a request naming adapters the instance does not hold loads them from the store
//    first: once per (instance, adapter) however many requests wait (single flight: the waiters
//    share the one load's outcome), digest verified before the adapter is inserted.
//  - A poller thread (Start/Stop) follows the store every poll_interval for every READY instance:
//    an adapter held locally whose descriptor names another digest is reloaded from the store
//    (replace: requests already running keep the adapter they started with); one that came from
//    the store (or was published here) and is no longer described there is unloaded (LoraHost
//    frees it when the last request using it ends). Adapters that never were in the store (e.g.
//    preloaded ones with no descriptor) are left alone. It also refreshes the listing Stored()
//    returns, and sweeps orphaned files now and then.
//
// Thread-safety: every method is thread-safe. Lock() serializes every change of one
// (instance, adapter) across LoadLoRA, UnloadLoRA, on-demand loads and the poller.
class AdapterSync {
 public:
  // `models` must outlive this object. `metrics` may be null.
  AdapterSync(std::unique_ptr<AdapterStore> store, std::shared_ptr<ModelManager> models,
              AdapterSyncOptions options, std::shared_ptr<Metrics> metrics);
  // Stop().
  ~AdapterSync();
  AdapterSync(const AdapterSync&) = delete;
  AdapterSync& operator=(const AdapterSync&) = delete;

  AdapterStore& store() { return *store_; }
  const AdapterSyncOptions& options() const { return options_; }

  // Starts / stops the poller (Stop is idempotent and waits for a pass in progress).
  void Start();
  void Stop();

  // One poll pass over every READY instance (what the poller runs each interval).
  void SyncOnce();

  // The lock of one (instance, adapter) entry; hold it across a local change and its store half.
  std::unique_lock<std::mutex> Lock(const std::string& instance, const std::string& adapter);

  // The store half of LoadLoRA, called under Lock() after `instance`'s host loaded `adapter`
  // from `file`. Errors as AdapterStore::Publish; the caller then unloads the local copy so the
  // replica follows the store (whose entry is unchanged).
  absl::StatusOr<AdapterDescriptor> Published(const ModelInstance& instance,
                                              const AdapterInfo& adapter, const std::string& file,
                                              bool allow_partial, bool pin, bool replace);
  // The store half of UnloadLoRA, called under Lock(): removes the entry. NOT_FOUND when there
  // is none.
  absl::Status Removed(const std::string& instance, const std::string& adapter);

  // The names of `adapters` that `instance` does not hold.
  static std::vector<std::string> Missing(const ModelInstance& instance,
                                          const std::vector<std::string>& adapters);

  // Loads each of `adapters` that `instance` does not hold from the store (see the class
  // comment). Blocks (file I/O): never call it on a gRPC callback thread. NOT_FOUND naming the
  // adapter when neither the instance nor the store has it; DATA_LOSS for a corrupt entry
  // (naming the file); other codes as LoraHost::Load (e.g. RESOURCE_EXHAUSTED over the memory
  // budget, INVALID_ARGUMENT when the stored file does not fit this instance's model).
  absl::Status EnsureLoaded(const InstancePtr& instance, const std::vector<std::string>& adapters);

  // The store's descriptors of `instance` as of the last poll (or the last change made here).
  std::vector<AdapterDescriptor> Stored(const std::string& instance) const;

 private:
  using Key = std::pair<std::string, std::string>;  // (instance, adapter)
  struct Flight {
    bool done = false;
    absl::Status status;
  };

  // Loads `adapter` from the store into `instance` (replacing a local copy when `replace`),
  // verified; the caller holds Lock(instance.name, adapter).
  absl::Status LoadFromStoreLocked(const ModelInstance& instance, const std::string& adapter,
                                   bool replace);
  absl::Status EnsureOne(const InstancePtr& instance, const std::string& adapter);
  void Reconcile(const ModelInstance& instance, const AdapterStore::Listing& listing);
  void SetManaged(const Key& key, bool managed);
  bool IsManaged(const Key& key) const;
  void RememberStored(const AdapterDescriptor& d, bool present);
  void PollLoop();

  const std::unique_ptr<AdapterStore> store_;
  const std::shared_ptr<ModelManager> models_;
  const AdapterSyncOptions options_;
  const std::shared_ptr<Metrics> metrics_;

  mutable std::mutex mu_;
  std::map<Key, std::shared_ptr<std::mutex>> locks_ ABSL_GUARDED_BY(mu_);
  // On-demand loads in progress, keyed by the instance object and adapter name.
  std::map<std::pair<const void*, std::string>, std::shared_ptr<Flight>> flights_
      ABSL_GUARDED_BY(mu_);
  std::condition_variable flight_cv_;
  // Adapters that came from (or went to) the store, so the poller drops them when it loses them.
  std::set<Key> managed_ ABSL_GUARDED_BY(mu_);
  // The last listing of each instance (Stored()).
  std::map<std::string, std::map<std::string, AdapterDescriptor>> stored_ ABSL_GUARDED_BY(mu_);

  std::mutex poll_mu_;
  std::condition_variable poll_cv_;
  bool stopping_ ABSL_GUARDED_BY(poll_mu_) = false;
  std::thread poller_;
  int64_t passes_ = 0;  // poller thread only
};

}  // namespace ds::server
