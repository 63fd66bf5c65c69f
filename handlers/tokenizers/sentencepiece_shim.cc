// libds_sentencepiece_shim.so: a C interface over Debian's libsentencepiece (and its trainer,
// libsentencepiece_train), loaded by
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
#include <sentencepiece_trainer.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

void SetError(const std::string& message, char* error, std::size_t capacity) {
  if (error == nullptr || capacity == 0) return;
  const std::size_t n = std::min(message.size(), capacity - 1);
  std::memcpy(error, message.data(), n);
  error[n] = '\0';
}

// Feeds the trainer from memory (no input file).
class VectorSentenceIterator : public sentencepiece::SentenceIterator {
 public:
  VectorSentenceIterator(const char* const* sentences, const std::size_t* lengths, std::size_t n)
      : sentences_(sentences), lengths_(lengths), n_(n) {
    Load();
  }
  bool done() const override { return index_ >= n_; }
  void Next() override {
    ++index_;
    Load();
  }
  const std::string& value() const override { return value_; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  void Load() {
    if (index_ < n_) value_.assign(sentences_[index_], lengths_[index_]);
  }
  const char* const* sentences_;
  const std::size_t* lengths_;
  std::size_t n_;
  std::size_t index_ = 0;
  std::string value_;
};

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

// SentencePieceTrainer::Train(kwargs, iterator, &serialized) over `num_sentences` in-memory
// sentences; `keys`/`values` are spm_train's flags without "--". On success calls
// emit(context, model bytes) once and returns 0; otherwise sets `error` and returns 1.
__attribute__((visibility("default"))) int ds_spm_train(
    const char* const* keys, const char* const* values, std::size_t num_args,
    const char* const* sentences, const std::size_t* lengths, std::size_t num_sentences,
    void (*emit)(void* context, const char* bytes, std::size_t length), void* context,
    char* error, std::size_t error_capacity) {
  std::unordered_map<std::string, std::string> kwargs;
  for (std::size_t i = 0; i < num_args; ++i) kwargs[keys[i]] = values[i];
  VectorSentenceIterator iterator(sentences, lengths, num_sentences);
  std::string serialized;
  const auto status = sentencepiece::SentencePieceTrainer::Train(kwargs, &iterator, &serialized);
  if (!status.ok()) {
    SetError(status.ToString(), error, error_capacity);
    return 1;
  }
  emit(context, serialized.data(), serialized.size());
  return 0;
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
