// The Unicode functions against the Unicode Standard's own definitions and examples (UAX #15
// normalization, SpecialCasing / Final_Sigma), plus round-trip properties.
#include "handlers/tokenizers/unicode_text.h"

#include <gtest/gtest.h>

#include <string>

namespace ds::tokenizers {
namespace {

std::u32string Decode(const std::string& utf8) {
  std::u32string out;
  std::size_t offset = 0;
  EXPECT_TRUE(DecodeUtf8(utf8, &out, &offset)) << "offset " << offset;
  return out;
}

TEST(UnicodeTextTest, Utf8RoundTripsAndRejectsMalformedInput) {
  const std::u32string all = {0x0,    0x41,   0x7F,   0x80,    0x7FF,   0x800,
                              0xD7FF, 0xE000, 0xFFFD, 0x10000, 0x1F431, 0x10FFFF};
  EXPECT_EQ(Decode(EncodeUtf8(all)), all);
  std::u32string out;
  std::size_t offset = 99;
  for (const auto& [bytes, where] :
       std::vector<std::pair<std::string, std::size_t>>{{"ab\x80", 2},    // stray continuation byte
                                                        {"a\xc3", 1},     // truncated sequence
                                                        {"\xc0\xaf", 0},  // overlong '/'
                                                        {"xy\xed\xa0\x80", 2},  // UTF-16 surrogate
                                                        {"\xf4\x90\x80\x80", 0},  // above U+10FFFF
                                                        {"ok\xe2\x82", 2}}) {
    EXPECT_FALSE(DecodeUtf8(bytes, &out, &offset));
    EXPECT_EQ(offset, where);
  }
}

TEST(UnicodeTextTest, Categories) {
  EXPECT_TRUE(IsLetter(U'a'));
  EXPECT_TRUE(IsLetter(0x65E5));  // 日 (Lo)
  EXPECT_TRUE(IsLetter(0x3B1));   // α
  EXPECT_FALSE(IsLetter(U'1'));
  EXPECT_TRUE(IsNumber(U'7'));
  EXPECT_TRUE(IsNumber(0x2167));  // Ⅷ ROMAN NUMERAL EIGHT (Nl)
  EXPECT_TRUE(IsNumber(0xBD));    // ½ (No)
  EXPECT_FALSE(IsNumber(U'x'));
  EXPECT_TRUE(IsOtherCategory(0x200B));  // ZERO WIDTH SPACE (Cf)
  EXPECT_TRUE(IsOtherCategory(U'\n'));   // Cc
  EXPECT_TRUE(IsOtherCategory(0xE000));  // private use (Co)
  EXPECT_FALSE(IsOtherCategory(U'a'));
  EXPECT_TRUE(IsSpaceSeparator(0xA0));
  EXPECT_TRUE(IsSpaceSeparator(0x3000));
  EXPECT_FALSE(IsSpaceSeparator(U'\t'));
  for (char32_t cp : {U' ', U'\t', U'\n', U'\x1c', char32_t{0x85}, char32_t{0xA0}, char32_t{0x2028},
                      char32_t{0x3000}}) {
    EXPECT_TRUE(IsPythonSpace(cp)) << static_cast<uint32_t>(cp);
  }
  EXPECT_FALSE(IsPythonSpace(0x200B));
  EXPECT_FALSE(IsPythonSpace(U'a'));
}

TEST(UnicodeTextTest, LowerFollowsPythonIncludingFinalSigma) {
  EXPECT_EQ(PythonLower(U"ABC xyz ÀÉÎÕÜ"), U"abc xyz àéîõü");
  EXPECT_EQ(PythonLower(U"ΕΛΛΗΝΙΚΆ Русский"), U"ελληνικά русский");
  // SpecialCasing: U+0130 lowercases to i + COMBINING DOT ABOVE.
  EXPECT_EQ(PythonLower(U"\u0130"), std::u32string(U"i\u0307"));
  // Final_Sigma: after a cased letter and not before one (case-ignorables skipped).
  EXPECT_EQ(PythonLower(U"ΟΔΟΣ"), U"οδος");
  EXPECT_EQ(PythonLower(U"ΣΑΣ."), U"σας.");
  EXPECT_EQ(PythonLower(U"Σ"), U"σ");
  EXPECT_EQ(PythonLower(U"ΑΣ'Α"), U"ασ'α");
  EXPECT_EQ(PythonLower(U"ΑΣ'"), U"ας'");
  // No case: unchanged.
  EXPECT_EQ(PythonLower(U"日本語 123 ß"), U"日本語 123 ß");
}

TEST(UnicodeTextTest, NfcComposesReordersAndKeepsExclusions) {
  EXPECT_EQ(NormalizeNfc(U"e\u0301"), U"\u00e9");
  EXPECT_EQ(NormalizeNfc(U"\u00e9"), U"\u00e9");
  // Canonical reordering: both orders of dot below + circumflex give U+1EAD.
  EXPECT_EQ(NormalizeNfc(U"a\u0323\u0302"), U"\u1ead");
  EXPECT_EQ(NormalizeNfc(U"a\u0302\u0323"), U"\u1ead");
  // Blocked: a second acute cannot compose after the first one did.
  EXPECT_EQ(NormalizeNfc(U"e\u0301\u0301"), U"\u00e9\u0301");
  // Hangul: L V T jamo compose algorithmically; a syllable is left as is.
  EXPECT_EQ(NormalizeNfc(U"\u1100\u1161\u11a8"), U"\uac01");
  EXPECT_EQ(NormalizeNfc(U"\uac01"), U"\uac01");
  // Singletons decompose: ANGSTROM SIGN -> A WITH RING ABOVE; OHM SIGN -> OMEGA.
  EXPECT_EQ(NormalizeNfc(U"\u212b"), U"\u00c5");
  EXPECT_EQ(NormalizeNfc(U"\u2126"), U"\u03a9");
  // Composition exclusion: U+0958 stays decomposed.
  EXPECT_EQ(NormalizeNfc(U"\u0958"), U"\u0915\u093c");
  // Compatibility characters are not NFC's business.
  EXPECT_EQ(NormalizeNfc(U"\ufb01 \u2460"), U"\ufb01 \u2460");
  // Idempotent on mixed text.
  const std::u32string mixed = U"Ünïcödé e\u0301 \u1100\u1161 x\u0323\u0302 日本";
  EXPECT_EQ(NormalizeNfc(NormalizeNfc(mixed)), NormalizeNfc(mixed));
}

TEST(UnicodeTextTest, TablesNameTheirUnicodeVersion) {
  EXPECT_NE(std::string(UnicodeDataVersion()).find('.'), std::string::npos);
}

}  // namespace
}  // namespace ds::tokenizers
