#include "handlers/tokenizers/sentencepiece_model.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace ds::tokenizers {
namespace {

// The C interface of sentencepiece_shim.cc.
struct ShimApi {
  void* (*load)(const char*, std::size_t, char*, std::size_t) = nullptr;
  void (*free)(void*) = nullptr;
  int (*encode)(const void*, const char*, std::size_t, void (*)(void*, const char*, std::size_t),
                void*, char*, std::size_t) = nullptr;
  int (*piece_to_id)(const void*, const char*, std::size_t) = nullptr;
  int (*size)(const void*) = nullptr;
  int (*unk_id)(const void*) = nullptr;
  int (*train)(const char* const*, const char* const*, std::size_t, const char* const*,
               const std::size_t*, std::size_t, void (*)(void*, const char*, std::size_t), void*,
               char*, std::size_t) = nullptr;
  std::string error;  // why the shim could not be loaded; empty when it was
};

constexpr char kShimName[] = "libds_sentencepiece_shim.so";

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DS_SANITIZER_RUNTIME 1
#endif
#endif

// dlopen, except in sanitizer builds: their dlopen interceptor refuses RTLD_DEEPBIND outright
// (google/sanitizers#611: a deep-bound library's own malloc/free could bypass the sanitizer's).
// The shim's C interface passes no allocation across (opaque handles freed by the shim, caller
// buffers, callbacks), and the shim is compiled without instrumentation there (its
// CMakeLists), so the C library's own dlopen, behind the interceptor, is safe for it.
void* OpenModule(const char* path, int flags) {
#ifdef DS_SANITIZER_RUNTIME
  using DlopenFn = void* (*)(const char*, int);
  static const auto real = reinterpret_cast<DlopenFn>(dlsym(RTLD_NEXT, "dlopen"));
  if (real != nullptr) return real(path, flags);
#endif
  return dlopen(path, flags);
}

// Where the shim may be: $DS_SENTENCEPIECE_SHIM, next to the executable, ../lib of it, and where
// the build put it.
std::vector<std::string> ShimCandidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("DS_SENTENCEPIECE_SHIM"); env != nullptr && *env != '\0') {
    out.emplace_back(env);
  }
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    out.push_back((exe.parent_path() / kShimName).string());
    out.push_back((exe.parent_path().parent_path() / "lib" / kShimName).string());
  }
#ifdef DS_SENTENCEPIECE_SHIM_PATH
  out.emplace_back(DS_SENTENCEPIECE_SHIM_PATH);
#endif
  return out;
}

const ShimApi& Shim() {
  static const ShimApi* api = [] {
    auto* a = new ShimApi();
    void* handle = nullptr;
    std::string tried;
    for (const std::string& path : ShimCandidates()) {
      std::error_code ec;
      if (!std::filesystem::exists(path, ec)) {
        tried += " " + path;
        continue;
      }
      // RTLD_LOCAL: the module's symbols (and its bundled protobuf) stay out of the global scope;
      // RTLD_DEEPBIND: inside it, its own definitions win over the process's libprotobuf.
      handle = OpenModule(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle == nullptr) {
        a->error = std::string("cannot load ") + path + ": " + dlerror();
        return a;
      }
      break;
    }
    if (handle == nullptr) {
      a->error = std::string("the SentencePiece module ") + kShimName +
                 " was not found (set DS_SENTENCEPIECE_SHIM; tried" + tried + ")";
      return a;
    }
    auto sym = [&](const char* name) {
      void* p = dlsym(handle, name);
      if (p == nullptr && a->error.empty()) a->error = std::string("missing symbol ") + name;
      return p;
    };
    a->load = reinterpret_cast<decltype(a->load)>(sym("ds_spm_load"));
    a->free = reinterpret_cast<decltype(a->free)>(sym("ds_spm_free"));
    a->encode = reinterpret_cast<decltype(a->encode)>(sym("ds_spm_encode"));
    a->piece_to_id = reinterpret_cast<decltype(a->piece_to_id)>(sym("ds_spm_piece_to_id"));
    a->size = reinterpret_cast<decltype(a->size)>(sym("ds_spm_size"));
    a->unk_id = reinterpret_cast<decltype(a->unk_id)>(sym("ds_spm_unk_id"));
    a->train = reinterpret_cast<decltype(a->train)>(sym("ds_spm_train"));
    return a;
  }();
  return *api;
}

}  // namespace

struct SentencePieceModel::Impl {
  void* model = nullptr;
  ~Impl() {
    if (model != nullptr) Shim().free(model);
  }
};

SentencePieceModel::SentencePieceModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceModel::~SentencePieceModel() = default;

std::unique_ptr<SentencePieceModel> SentencePieceModel::Load(const std::string& serialized,
                                                             bool add_dummy_prefix,
                                                             std::string* error) {
  const ShimApi& shim = Shim();
  if (!shim.error.empty()) {
    *error = shim.error;
    return nullptr;
  }
  std::string proto = serialized;
  if (!add_dummy_prefix) {
    // Protobuf merges a repeated occurrence of a singular message field into the earlier one, so
    // appending `normalizer_spec { add_dummy_prefix: false }` (ModelProto field 3, NormalizerSpec
    // field 3, both as in sentencepiece_model.proto) is NormalizerSpec.MergeFrom, exactly what
    // transformers does through the Python protobuf classes.
    proto.append("\x1a\x02\x18\x00", 4);
  }
  char message[512] = {0};
  auto impl = std::make_unique<Impl>();
  impl->model = shim.load(proto.data(), proto.size(), message, sizeof(message));
  if (impl->model == nullptr) {
    *error = message;
    return nullptr;
  }
  return std::unique_ptr<SentencePieceModel>(new SentencePieceModel(std::move(impl)));
}

bool SentencePieceModel::Train(const std::vector<std::string>& sentences,
                               const std::vector<std::pair<std::string, std::string>>& args,
                               std::string* model, std::string* error) {
  const ShimApi& shim = Shim();
  if (!shim.error.empty()) {
    *error = shim.error;
    return false;
  }
  std::vector<const char*> keys, values, texts;
  std::vector<std::size_t> lengths;
  for (const auto& [key, value] : args) {
    keys.push_back(key.c_str());
    values.push_back(value.c_str());
  }
  for (const std::string& s : sentences) {
    texts.push_back(s.data());
    lengths.push_back(s.size());
  }
  auto emit = [](void* context, const char* bytes, std::size_t length) {
    static_cast<std::string*>(context)->assign(bytes, length);
  };
  char message[512] = {0};
  static std::mutex* train_mu = new std::mutex();
  std::lock_guard<std::mutex> lock(*train_mu);
  model->clear();
  if (shim.train(keys.data(), values.data(), keys.size(), texts.data(), lengths.data(),
                 texts.size(), emit, model, message, sizeof(message)) != 0) {
    *error = message;
    return false;
  }
  return true;
}

bool SentencePieceModel::Encode(std::string_view text, std::vector<std::string>* pieces,
                                std::string* error) const {
  pieces->clear();
  char message[512] = {0};
  auto emit = [](void* context, const char* piece, std::size_t length) {
    static_cast<std::vector<std::string>*>(context)->emplace_back(piece, length);
  };
  if (Shim().encode(impl_->model, text.data(), text.size(), emit, pieces, message,
                    sizeof(message)) != 0) {
    *error = message;
    return false;
  }
  return true;
}

int SentencePieceModel::PieceToId(std::string_view piece) const {
  return Shim().piece_to_id(impl_->model, piece.data(), piece.size());
}

int SentencePieceModel::size() const { return Shim().size(impl_->model); }

int SentencePieceModel::unk_id() const { return Shim().unk_id(impl_->model); }

}  // namespace ds::tokenizers
