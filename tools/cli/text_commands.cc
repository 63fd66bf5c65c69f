#include "tools/cli/text_commands.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "handlers/status.h"
#include "handlers/tokenizers/tokenizer.h"

namespace ds::cli {
namespace {

// FluxPipeline's default max_sequence_length for the T5 prompt.
constexpr int64_t kDefaultT5Length = 512;

}  // namespace

absl::Status RunTokenize(const std::vector<std::string>& texts, const TokenizeOptions& options,
                         std::ostream& out, std::ostream& err) {
  if (options.tokenizer_dir.empty()) {
    return absl::InvalidArgumentError("tokenize needs --tokenizer DIR");
  }
  if (texts.empty()) return absl::InvalidArgumentError("tokenize takes at least one TEXT");
  if (options.max_sequence_length < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_sequence_length must be positive, got ", options.max_sequence_length));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<tokenizers::Tokenizer> tokenizer,
                   tokenizers::LoadTokenizerFromFolder(options.tokenizer_dir));
  tokenizers::TokenizerOptions encode;
  if (tokenizer->kind() == "t5") {
    encode.max_length =
        options.max_sequence_length > 0 ? options.max_sequence_length : kDefaultT5Length;
  } else if (options.max_sequence_length > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_sequence_length applies to T5 tokenizers; ", options.tokenizer_dir, " holds a ",
        tokenizer->kind(), " tokenizer, which the pipeline pads to its model_max_length"));
  }
  for (std::size_t i = 0; i < texts.size(); ++i) {
    auto encoded = tokenizer->Encode(texts[i], encode);
    if (!encoded.ok()) return Annotate(encoded.status(), absl::StrCat("text ", i + 1));
    if (encoded->truncated) {
      err << "note: text " << i + 1 << " truncated to " << encoded->ids.size() << " of "
          << encoded->untruncated_length << " tokens\n";
    }
    out << absl::StrJoin(encoded->ids, " ") << "\n";
  }
  out.flush();
  return absl::OkStatus();
}

}  // namespace ds::cli
