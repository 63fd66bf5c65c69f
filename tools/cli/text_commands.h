// diffusion-cli's offline text commands.
//
//   tokenize --tokenizer DIR [--max_sequence_length N] TEXT...
//       Loads the tokenizer folder DIR (a diffusers pipeline's tokenizer/ or tokenizer_2/; the kind
//       comes from the folder) and prints one line per TEXT: the token ids separated by spaces,
//       padded and truncated as FluxPipeline does: CLIP to the tokenizer's model_max_length (77),
//       T5 to --max_sequence_length (default 512). Each truncated text also gets a note on stderr.
//
// Thread-compatible; runs on the calling thread.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace ds::cli {

struct TokenizeOptions {
  std::string tokenizer_dir;  // --tokenizer; required
  // --max_sequence_length: the T5 length in tokens; 0 = not given (512, FluxPipeline's default).
  // CLIP always uses its model_max_length, so giving it there is an error.
  int64_t max_sequence_length = 0;
};

// Runs `tokenize` on `texts` (the positional arguments after the command), writing ids to `out`
// and truncation notes to `err`. INVALID_ARGUMENT without --tokenizer or texts, for a negative
// --max_sequence_length or one given for a CLIP tokenizer, or a text that is not UTF-8; the
// loader's NOT_FOUND / INVALID_ARGUMENT for a bad folder (see handlers/tokenizers/tokenizer.h).
absl::Status RunTokenize(const std::vector<std::string>& texts, const TokenizeOptions& options,
                         std::ostream& out, std::ostream& err);

}  // namespace ds::cli
