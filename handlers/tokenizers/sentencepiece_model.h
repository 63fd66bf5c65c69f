// A SentencePiece model, run by Debian's libsentencepiece.
//
// The library is reached only through libds_sentencepiece_shim.so (sentencepiece_shim.cc),
// which is dlopen()ed locally with deep binding on first use: libsentencepiece.so.0 exports the
// symbols of its own bundled protobuf-lite, which would otherwise interpose the system libprotobuf
// that LibTorch and gRPC use and crash the process at start-up. The shim is looked up at
// $DS_SENTENCEPIECE_SHIM, next to the executable, in ../lib from it, and where the build wrote it.
// (Keeping <sentencepiece_processor.h> out of this header also keeps its
// `namespace absl { using std::string_view; }` away from Debian's Abseil.)
//
// Thread-safety: immutable after Load(); Encode/PieceToId may run concurrently.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ds::tokenizers {

class SentencePieceModel {
 public:
  ~SentencePieceModel();

  // Parses a serialized ModelProto (the bytes of spiece.model). With `add_dummy_prefix` false the
  // model's normalizer spec is overridden to add no dummy "▁" prefix (what transformers'
  // non-legacy T5Tokenizer does before loading). Returns null and sets *error on failure (bad
  // model bytes, or the shim cannot be loaded).
  static std::unique_ptr<SentencePieceModel> Load(const std::string& serialized,
                                                  bool add_dummy_prefix, std::string* error);

  // Trains a model with Debian's SentencePieceTrainer on `sentences` (in memory, no input file)
  // and returns the serialized ModelProto (the bytes of an spiece.model) in *model. `args` are
  // spm_train's flags without "--" (e.g. {"model_type", "unigram"}, {"vocab_size", "256"});
  // "input" and "model_prefix" are not needed. Training is serialized process-wide (the trainer
  // keeps global state: its log level and random generator). Returns false and sets *error on
  // failure (an unknown flag, a vocabulary larger than the sentences allow, the shim missing).
  static bool Train(const std::vector<std::string>& sentences,
                    const std::vector<std::pair<std::string, std::string>>& args,
                    std::string* model, std::string* error);

  // sp.encode(text, out_type=str): the pieces (unknown spans as their surface text). Returns
  // false and sets *error on failure.
  bool Encode(std::string_view text, std::vector<std::string>* pieces, std::string* error) const;

  // sp.piece_to_id(piece): the id of a vocabulary piece, else unk_id().
  int PieceToId(std::string_view piece) const;
  // Number of pieces in the model (len(sp_model)).
  int size() const;
  int unk_id() const;

 private:
  struct Impl;
  explicit SentencePieceModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ds::tokenizers
