#include "handlers/tokenizers/unicode_text.h"

#include <algorithm>
#include <iterator>

namespace ds::tokenizers {
namespace {

struct FlagRange {
  char32_t first;
  uint8_t flags;
};
struct LowerRun {
  char32_t first;
  char32_t last;
  int32_t delta;
  int32_t stride;
};
struct LowerMulti {
  char32_t cp;
  int n;
  char32_t lower[3];
};
struct CccRun {
  char32_t first;
  char32_t last;
  uint8_t ccc;
};
struct Decomposition {
  char32_t cp;
  uint16_t offset;
  uint8_t length;
};
struct Composition {
  char32_t first;
  char32_t second;
  char32_t composite;
};

#include "handlers/tokenizers/unicode_tables.inc"

// Flag bits, as gen_unicode_tables.py writes them.
constexpr uint8_t kLetter = 1;
constexpr uint8_t kNumber = 2;
constexpr uint8_t kOtherC = 4;
constexpr uint8_t kZs = 8;
constexpr uint8_t kPySpace = 16;
constexpr uint8_t kCased = 32;
constexpr uint8_t kCaseIgnorable = 64;
constexpr uint8_t kNfcMaybe = 128;

// Hangul syllable composition constants (Unicode ch. 3.12).
constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr int kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
              kSCount = kLCount * kNCount;

uint8_t Flags(char32_t cp) {
  if (cp < 0x80) {
    // Binary search is cheap, but ASCII is the hot path.
    static const auto* ascii = [] {
      auto* t = new uint8_t[128];
      for (char32_t c = 0; c < 128; ++c) {
        auto it = std::upper_bound(std::begin(kFlagRanges), std::end(kFlagRanges), c,
                                   [](char32_t v, const FlagRange& r) { return v < r.first; });
        t[c] = std::prev(it)->flags;
      }
      return t;
    }();
    return ascii[cp];
  }
  if (cp > 0x10FFFF) return kOtherC;
  auto it = std::upper_bound(std::begin(kFlagRanges), std::end(kFlagRanges), cp,
                             [](char32_t v, const FlagRange& r) { return v < r.first; });
  return std::prev(it)->flags;
}

int Ccc(char32_t cp) {
  if (cp < 0x300) return 0;
  auto it = std::upper_bound(std::begin(kCccRuns), std::end(kCccRuns), cp,
                             [](char32_t v, const CccRun& r) { return v < r.first; });
  if (it == std::begin(kCccRuns)) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

void AppendLower(char32_t cp, std::u32string* out) {
  if (cp < 0x80) {
    out->push_back(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
    return;
  }
  auto multi = std::lower_bound(std::begin(kLowerMulti), std::end(kLowerMulti), cp,
                                [](const LowerMulti& m, char32_t v) { return m.cp < v; });
  if (multi != std::end(kLowerMulti) && multi->cp == cp) {
    out->append(multi->lower, multi->n);
    return;
  }
  auto it = std::upper_bound(std::begin(kLowerRuns), std::end(kLowerRuns), cp,
                             [](char32_t v, const LowerRun& r) { return v < r.first; });
  if (it != std::begin(kLowerRuns)) {
    --it;
    if (cp <= it->last && (cp - it->first) % static_cast<char32_t>(it->stride) == 0) {
      out->push_back(static_cast<char32_t>(static_cast<int64_t>(cp) + it->delta));
      return;
    }
  }
  out->push_back(cp);
}

// CPython's handle_capital_sigma: U+03A3 at `i` is final when preceded by a cased code point
// (skipping case-ignorable ones) and not followed by one.
bool IsFinalSigma(std::u32string_view text, std::size_t i) {
  std::size_t j = i;
  char32_t c = 0;
  bool found = false;
  while (j > 0) {
    c = text[--j];
    if (!(Flags(c) & kCaseIgnorable)) {
      found = true;
      break;
    }
  }
  if (!found || !(Flags(c) & kCased)) return false;
  for (j = i + 1; j < text.size(); ++j) {
    c = text[j];
    if (!(Flags(c) & kCaseIgnorable)) return !(Flags(c) & kCased);
  }
  return true;
}

void AppendDecomposed(char32_t cp, std::u32string* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const int s = static_cast<int>(cp - kSBase);
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  auto it = std::lower_bound(std::begin(kDecompositions), std::end(kDecompositions), cp,
                             [](const Decomposition& d, char32_t v) { return d.cp < v; });
  if (it != std::end(kDecompositions) && it->cp == cp) {
    out->append(kDecompositionPool + it->offset, it->length);
  } else {
    out->push_back(cp);
  }
}

// The primary composite of (a, b), or 0 when there is none.
char32_t Compose(char32_t a, char32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  auto it = std::lower_bound(std::begin(kCompositions), std::end(kCompositions),
                             Composition{a, b, 0}, [](const Composition& x, const Composition& y) {
                               return x.first != y.first ? x.first < y.first : x.second < y.second;
                             });
  if (it != std::end(kCompositions) && it->first == a && it->second == b) return it->composite;
  return 0;
}

}  // namespace

bool DecodeUtf8(std::string_view bytes, std::u32string* out, std::size_t* error_offset) {
  out->clear();
  out->reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char b0 = s[i];
    if (b0 < 0x80) {
      out->push_back(b0);
      ++i;
      continue;
    }
    int len;
    char32_t cp;
    char32_t min;
    if ((b0 & 0xE0) == 0xC0) {
      len = 2, cp = b0 & 0x1F, min = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      len = 3, cp = b0 & 0x0F, min = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      len = 4, cp = b0 & 0x07, min = 0x10000;
    } else {
      *error_offset = i;
      return false;
    }
    if (i + len > n) {
      *error_offset = i;
      return false;
    }
    for (int k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) {
        *error_offset = i;
        return false;
      }
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      *error_offset = i;
      return false;
    }
    out->push_back(cp);
    i += len;
  }
  return true;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string EncodeUtf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t cp : text) AppendUtf8(cp, &out);
  return out;
}

const char* UnicodeDataVersion() { return kUnicodeVersion; }

bool IsLetter(char32_t cp) { return Flags(cp) & kLetter; }
bool IsNumber(char32_t cp) { return Flags(cp) & kNumber; }
bool IsOtherCategory(char32_t cp) { return Flags(cp) & kOtherC; }
bool IsSpaceSeparator(char32_t cp) { return Flags(cp) & kZs; }
bool IsPythonSpace(char32_t cp) { return Flags(cp) & kPySpace; }

std::u32string PythonLower(std::u32string_view text) {
  std::u32string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char32_t cp = text[i];
    if (cp == 0x3A3) {
      out.push_back(IsFinalSigma(text, i) ? 0x3C2 : 0x3C3);
    } else {
      AppendLower(cp, &out);
    }
  }
  return out;
}

std::u32string NormalizeNfc(std::u32string_view text) {
  // Quick check: text without any code point that may change or combine is already NFC.
  if (std::none_of(text.begin(), text.end(), [](char32_t cp) { return Flags(cp) & kNfcMaybe; })) {
    return std::u32string(text);
  }
  // 1. Full canonical decomposition.
  std::u32string d;
  d.reserve(text.size() + 8);
  for (char32_t cp : text) AppendDecomposed(cp, &d);
  // 2. Canonical ordering: stable sort of each run of non-starters by combining class.
  for (std::size_t i = 0; i < d.size();) {
    if (Ccc(d[i]) == 0) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < d.size() && Ccc(d[j]) != 0) ++j;
    std::stable_sort(d.begin() + static_cast<std::ptrdiff_t>(i),
                     d.begin() + static_cast<std::ptrdiff_t>(j),
                     [](char32_t a, char32_t b) { return Ccc(a) < Ccc(b); });
    i = j;
  }
  // 3. Canonical composition: a code point combines with the last starter unless a code point
  // in between has combining class 0 or >= its own (it is "blocked").
  std::u32string out;
  out.reserve(d.size());
  std::ptrdiff_t starter = -1;
  int last_ccc = -1;  // ccc of the last code point kept after the starter; -1: none yet
  for (char32_t cp : d) {
    const int ccc = Ccc(cp);
    if (starter >= 0 && (last_ccc == -1 || (last_ccc != 0 && last_ccc < ccc))) {
      if (char32_t c = Compose(out[static_cast<std::size_t>(starter)], cp); c != 0) {
        out[static_cast<std::size_t>(starter)] = c;
        continue;
      }
    }
    if (ccc == 0) {
      starter = static_cast<std::ptrdiff_t>(out.size());
      last_ccc = -1;
    } else {
      last_ccc = ccc;
    }
    out.push_back(cp);
  }
  return out;
}

}  // namespace ds::tokenizers
