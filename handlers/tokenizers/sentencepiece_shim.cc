// libds_sentencepiece_shim.so: a C interface over Debian's libsentencepiece, loaded by
// sentencepiece_model.cc with dlopen(RTLD_LOCAL | RTLD_DEEPBIND).
//
// Why a separately loaded module: Debian's libsentencepiece.so.0 carries its own copy of
// protobuf-lite and exports those symbols. Linked into a process that also uses the system
// libprotobuf (LibTorch, gRPC), the two copies interpose each other and libprotobuf crashes in
// its static initializers. Loaded locally with deep binding, sentencepiece keeps to its own copy
// and the rest of the process never sees it.
//
// No Abseil header may be included here: <sentencepiece_processor.h> defines
// `namespace absl { using std::string_view; }`, which collides with Debian's Abseil.
#include <sentencepiece_processor.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

void SetError(const std::string& message, char* error, std::size_t capacity) {
  if (error == nullptr || capacity == 0) return;
  const std::size_t n = std::min(message.size(), capacity - 1);
  std::memcpy(error, message.data(), n);
  error[n] = '\0';
}

}  // namespace

extern "C" {

struct DsSpmModel {
  sentencepiece::SentencePieceProcessor processor;
};

__attribute__((visibility("default"))) DsSpmModel* ds_spm_load(const char* bytes, std::size_t size,
                                                               char* error,
                                                               std::size_t error_capacity) {
  auto model = std::make_unique<DsSpmModel>();
  const auto status = model->processor.LoadFromSerializedProto(std::string_view(bytes, size));
  if (!status.ok()) {
    SetError(status.ToString(), error, error_capacity);
    return nullptr;
  }
  return model.release();
}

__attribute__((visibility("default"))) void ds_spm_free(DsSpmModel* model) { delete model; }

__attribute__((visibility("default"))) int ds_spm_encode(
    const DsSpmModel* model, const char* text, std::size_t size,
    void (*emit)(void* context, const char* piece, std::size_t length), void* context, char* error,
    std::size_t error_capacity) {
  std::vector<std::string> pieces;
  const auto status = model->processor.Encode(std::string_view(text, size), &pieces);
  if (!status.ok()) {
    SetError(status.ToString(), error, error_capacity);
    return 1;
  }
  for (const std::string& p : pieces) emit(context, p.data(), p.size());
  return 0;
}

__attribute__((visibility("default"))) int ds_spm_piece_to_id(const DsSpmModel* model,
                                                              const char* piece, std::size_t size) {
  return model->processor.PieceToId(std::string_view(piece, size));
}

__attribute__((visibility("default"))) int ds_spm_size(const DsSpmModel* model) {
  return model->processor.GetPieceSize();
}

__attribute__((visibility("default"))) int ds_spm_unk_id(const DsSpmModel* model) {
  return model->processor.unk_id();
}

}  // extern "C"
