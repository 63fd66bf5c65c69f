// Demo pipelines: tiny pipelines with deterministic random weights that a model folder declares
// (PipelineSpec::demos) and that are written to real files — a diffusers pipeline folder plus the
// original-format single files of every component whose model has a single-file handler — so that
// the server's embedded default and the tests load them through the real loading code.
//
// Model-agnostic: a recipe names its components by registry class name with their config.json;
// WriteDemoPipeline builds each through the ModelRegistry, fills it with InitRandomWeights, saves
// the state dict, and asks the model's WeightMappingHandler for the reverse mapping
// (PlanFromDiffusers) to write the single file. A recipe may also declare tokenizers, whose files
// are generated from the recipe's corpus at write time (see DemoTokenizer).
//
// Layout written under `<root>/<recipe.name>/`:
//   pipeline/model_index.json, pipeline/scheduler/scheduler_config.json,
//   pipeline/<component>/{config.json, diffusion_pytorch_model.safetensors}   (library diffusers)
//   pipeline/<component>/{config.json, model.safetensors}                      (library transformers)
//   pipeline/<tokenizer>/...   CLIP BPE: vocab.json, merges.txt, tokenizer_config.json,
//                              special_tokens_map.json; T5 SentencePiece: spiece.model,
//                              tokenizer_config.json, special_tokens_map.json, added_tokens.json
//   single_file/<component single_file name>            (e.g. flux-tiny.safetensors, ae.safetensors)
//   example_inputs.safetensors                           (when the recipe lists example inputs)
//   manifest.json   (written last: the recipe's digest and every file's SHA-256)
//
// Determinism: the same recipe writes the same bytes (weights from fixed seeds; the BPE merges
// by a deterministic trainer; the SentencePiece model by Debian's trainer single-threaded on the
// whole corpus, which is bit-reproducible for a given libsentencepiece version).
//
// Thread- and process-safety: WriteDemoPipeline takes an exclusive flock on
// `<root>/.<name>.lock`, builds into a fresh temporary folder and renames it into place, so
// concurrent callers (threads or server processes sharing `root`) never see a partial folder.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace ds {

struct DemoComponent {
  std::string name;        // the model_index.json key: "transformer", "vae", "text_encoder", ...
  std::string class_name;  // registry class name: "FluxTransformer2DModel", "CLIPTextModel"
  nlohmann::json config;   // the component's config.json (without _class_name / architectures)
  // File name under single_file/ for the original-format single file; "" = none.
  std::string single_file;
  // The library whose folder layout the component is written in (the model_index.json entry's
  // first element): "diffusers" (config.json with "_class_name",
  // diffusion_pytorch_model.safetensors) or "transformers" (config.json with "architectures":
  // [class_name], model.safetensors), as each library's save_pretrained writes them.
  std::string library = "diffusers";
  // Trained weights (optional; not owned, e.g. embedded in the binary, must outlive the recipe):
  // the bytes of a safetensors file with the component's state dict under its diffusers names (any
  // floating dtype). When set they are written verbatim as the component's weights file and loaded
  // into the model built from `config` (names and shapes must match: INVALID_ARGUMENT otherwise)
  // instead of random weights, and the single file is mapped from them. Their SHA-256 is part of
  // the recipe digest.
  std::string_view weights;
};

enum class DemoTokenizerKind {
  // transformers' CLIPTokenizer files: a byte-level BPE vocabulary (the 256 byte symbols, their
  // "</w>" forms, vocab_size - 514 merges learned from the corpus, then <|startoftext|> and
  // <|endoftext|> as the two highest ids), merges.txt ("#version: 0.2"), tokenizer_config.json
  // (pad = unk = eos) and special_tokens_map.json.
  kClipBpe,
  // transformers' T5Tokenizer files: spiece.model, a unigram SentencePiece model of
  // vocab_size - extra_ids pieces trained on the corpus (pad 0, eos 1, unk 2, no bos; nmt_nfkc),
  // then extra_ids sentinels <extra_id_N> = vocab_size - 1 - N; tokenizer_config.json (legacy),
  // special_tokens_map.json, added_tokens.json.
  kT5SentencePiece,
};

// A tokenizer folder generated at write time from a corpus.
struct DemoTokenizer {
  std::string name;  // the model_index.json key and folder: "tokenizer", "tokenizer_2"
  DemoTokenizerKind kind = DemoTokenizerKind::kClipBpe;
  // len(tokenizer): one more than the largest id it produces; what the encoder's token-embedding
  // table must cover. CLIP: >= 514; T5: >= extra_ids + 4.
  int64_t vocab_size = 0;
  int64_t model_max_length = 77;  // tokenizer_config.json's model_max_length (CLIP 77, T5 512)
  int64_t extra_ids = 100;        // T5 only: the number of <extra_id_N> sentinel tokens
  // The component (text encoder) using this tokenizer: its config's "vocab_size" must equal
  // vocab_size. "" = none.
  std::string encoder;
  // Training text, one sentence per line (empty lines are skipped).
  std::string corpus;
};

struct DemoPipelineRecipe {
  std::string name;            // folder and instance name, e.g. "flux-tiny"
  std::string pipeline_class;  // model_index.json "_class_name", e.g. "FluxPipeline"
  std::string description;     // one line for listings
  std::vector<DemoComponent> components;
  // scheduler/scheduler_config.json (with its "_class_name"); null = no scheduler entry.
  nlohmann::json scheduler_config;
  // Tokenizer folders generated from their corpora (model_index.json ["transformers",
  // "CLIPTokenizer" | "T5Tokenizer"]).
  std::vector<DemoTokenizer> tokenizers;
  // model_index.json entries written as [null, null] (components the pipeline class lists but
  // the demo does not have, e.g. text encoders).
  std::vector<std::string> absent_components;
  uint64_t seed = 0;  // component i is initialized with InitRandomWeights(seed + i)
  // Request tensors written to example_inputs.safetensors, drawn from N(0, 1) with `seed` (e.g.
  // prompt_embeds for a pipeline without text encoders), so the demo can be run at once.
  std::vector<std::pair<std::string, std::vector<int64_t>>> example_inputs;
  // What the demo can be asked for (reported by GetMetadata): a prompt template and the words its
  // prompts are made of; empty for a demo without text conditioning or with random weights.
  std::string prompt_template;
  std::vector<std::string> vocabulary;
};

struct DemoPipelineFiles {
  std::string dir;                                  // <root>/<name>
  std::string pipeline_dir;                         // <root>/<name>/pipeline
  std::map<std::string, std::string> single_files;  // component name -> path
  std::string example_inputs;                       // path; "" when the recipe lists none
  bool written = false;  // false: an existing, verified copy was reused
  double seconds = 0;
};

// The canonical JSON of a recipe (what manifest.json records the digest of).
nlohmann::json DemoRecipeJson(const DemoPipelineRecipe& recipe);

// Makes sure `<root>/<recipe.name>` holds the recipe's files: reuses an existing copy whose
// manifest records the same recipe digest and whose files all have the recorded SHA-256;
// otherwise (first run, another recipe, a missing or modified file) writes it anew. Creates
// `root` if needed. INVALID_ARGUMENT for a recipe with an empty or unsafe name (not
// [A-Za-z0-9._-]+), no components, a duplicate component or tokenizer, an unknown component class
// or library (naming it), a tokenizer whose sizes are out of range, whose encoder is not a
// component or whose encoder's config "vocab_size" differs from the tokenizer's, or whose corpus
// is empty or too small for its vocabulary (naming the tokenizer); the model's own errors for a
// bad config (annotated with the component); INTERNAL / the
// filesystem's errors naming the path for I/O failures (e.g. PERMISSION_DENIED for an unwritable
// root).
absl::StatusOr<DemoPipelineFiles> WriteDemoPipeline(const DemoPipelineRecipe& recipe,
                                                    const std::string& root);

}  // namespace ds
