// quant/layout.hpp for the block formats kept from checkpoints: which shapes they can hold, their
// section sizes and offsets, and the encoders refusing them.
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/ggml.hpp"
#include "moex/quant/layout.hpp"
#include "moex/quant/quantize.hpp"

#include "support/block_expert.hpp"

namespace {
using moex::Precision;
constexpr moex::WeightFormat fmt(Precision p) { return moex::float_format(p); }
}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("format_is_valid accepts Q8_0, Q4_0, Q4_K and fp8 e4m3 in whole blocks only") {
  CHECK(moex::format_is_valid(fmt(Precision::kQ8_0), 64));
  CHECK_FALSE(moex::format_is_valid(fmt(Precision::kQ8_0), 48));
  CHECK(moex::format_is_valid(fmt(Precision::kQ4_0), 96));
  CHECK_FALSE(moex::format_is_valid(fmt(Precision::kQ4_0), 100));
  CHECK(moex::format_is_valid(fmt(Precision::kQ4_K), 512));
  CHECK_FALSE(moex::format_is_valid(fmt(Precision::kQ4_K), 384));
  CHECK(moex::format_is_valid(fmt(Precision::kFp8E4M3), 160));  // the CUDA kernels need cols % 32
  CHECK_FALSE(moex::format_is_valid(fmt(Precision::kFp8E4M3), 144));
  for (Precision p : {Precision::kQ5_K, Precision::kQ6_K, Precision::kMxfp4}) {
    CAPTURE(moex::to_string(p));
    CHECK_FALSE(moex::format_is_valid(fmt(p), 4096));
  }
  CHECK(moex::expert_format_is_valid({256, 512}, fmt(Precision::kQ4_K)));
  CHECK_FALSE(moex::expert_format_is_valid({256, 320}, fmt(Precision::kQ4_K)));  // w2 has 320 columns
}

TEST_CASE("matrix_layout sizes block formats as ggml rows and fp8 codes plus a scale section") {
  // GGUF: rows * blocks per row * block bytes, no scale section; total rounded to kSectionAlign.
  struct G {
    Precision p;
    std::size_t rows, cols, codes;
  };
  for (const G g : {G{Precision::kQ8_0, 3, 64, 3 * 2 * 34}, G{Precision::kQ4_0, 5, 96, 5 * 3 * 18},
                    G{Precision::kQ4_K, 7, 512, 7 * 2 * 144}}) {
    CAPTURE(moex::to_string(g.p));
    const auto l = moex::matrix_layout(g.rows, g.cols, fmt(g.p));
    CHECK(l.codes_bytes == g.codes);
    CHECK(l.codes_bytes == g.rows * g.cols / moex::block_format_block_size(g.p) * moex::block_format_block_bytes(g.p));
    CHECK(l.scales_offset == 0);
    CHECK(l.mins_offset == 0);
    CHECK(l.total_bytes == moex::align_up(g.codes, moex::kSectionAlign));
  }
  // fp8 [300 x 160]: 48000 code bytes, then f32 scales [3 x 2] at the next 64-byte boundary.
  const auto f = moex::matrix_layout(300, 160, fmt(Precision::kFp8E4M3));
  CHECK(f.codes_bytes == 48000);
  CHECK(f.scales_offset == 48000);
  CHECK(f.total_bytes == moex::align_up(48000 + 6 * 4, 64));
  const auto f2 = moex::matrix_layout(3, 32, fmt(Precision::kFp8E4M3));
  CHECK(f2.scales_offset == 128);
  CHECK(f2.total_bytes == 192);
  // An expert: matrices at kMatrixAlign offsets, as for every format.
  const auto e = moex::expert_layout({256, 512}, fmt(Precision::kQ4_K));
  CHECK(e.w1.codes_bytes == 512 * 144);
  CHECK(e.w2.codes_bytes == 256 * 2 * 144);
  CHECK(e.w3_offset == moex::align_up(512 * 144, moex::kMatrixAlign));
  CHECK(e.total_bytes == moex::expert_bytes({256, 512}, fmt(Precision::kQ4_K)));
}

TEST_CASE("block formats are read, never encoded") {
  std::vector<float> w(64 * 64, 0.5f);
  std::vector<std::byte> dst(1 << 16);
  CHECK(moex::quantize_matrix(w.data(), 64, 64, fmt(Precision::kQ8_0), dst).code() == moex::StatusCode::kUnsupported);
  CHECK(moex::pack_expert(w.data(), w.data(), w.data(), {64, 64}, fmt(Precision::kFp8E4M3), dst).code() ==
        moex::StatusCode::kUnsupported);
  const auto e = moex::test::random_block_expert({64, 64}, Precision::kQ8_0, 5);
  CHECK(moex::convert_expert(e.view(), fmt(Precision::kQ4_0), dst).code() == moex::StatusCode::kUnsupported);
  // ... but decoded into moex's own formats.
  CHECK(moex::convert_expert(e.view(), moex::quant_format(Precision::kInt8, 32), dst).is_ok());
}
}  // TEST_SUITE("cpu")
