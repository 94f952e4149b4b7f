// Quantized formats: half conversions (exhaustive), round-trip bounds per format/scheme/group,
// expert packing/conversion, block-format dispatch, bad input.
#include "moex/quant/quantize.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"
#include "moex/thread_pool.hpp"

#include "support/test_support.hpp"

namespace {

using moex::Precision;
using moex::QuantScheme;
using moex::WeightFormat;

// Double-based decoders written from the IEEE definitions (independent of half.hpp).
double ref_f16(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(1024.0 + man, exp - 25);
  }
  return sign ? -v : v;
}

double ref_bf16(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 7) & 0xff, man = h & 0x7f;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), -133);
  } else if (exp == 255) {
    v = man ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(128.0 + man, exp - 134);
  }
  return sign ? -v : v;
}

std::uint16_t load_u16(const std::byte* p) {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

const WeightFormat kIntFormats[] = {
    {Precision::kInt8, QuantScheme::kSymmetric, 32},  {Precision::kInt8, QuantScheme::kSymmetric, 64},
    {Precision::kInt8, QuantScheme::kSymmetric, 128}, {Precision::kInt8, QuantScheme::kAsymmetric, 32},
    {Precision::kInt8, QuantScheme::kAsymmetric, 64}, {Precision::kInt8, QuantScheme::kAsymmetric, 128},
    {Precision::kInt4, QuantScheme::kSymmetric, 32},  {Precision::kInt4, QuantScheme::kSymmetric, 64},
    {Precision::kInt4, QuantScheme::kSymmetric, 128}, {Precision::kInt4, QuantScheme::kAsymmetric, 32},
    {Precision::kInt4, QuantScheme::kAsymmetric, 64}, {Precision::kInt4, QuantScheme::kAsymmetric, 128},
    {Precision::kInt2, QuantScheme::kSymmetric, 32},  {Precision::kInt2, QuantScheme::kSymmetric, 64},
    {Precision::kInt2, QuantScheme::kSymmetric, 128}, {Precision::kInt2, QuantScheme::kAsymmetric, 32},
    {Precision::kInt2, QuantScheme::kAsymmetric, 64}, {Precision::kInt2, QuantScheme::kAsymmetric, 128},
};

}  // namespace

TEST_SUITE("cpu") {

TEST_CASE("f16 and bf16 decode every bit pattern exactly") {
  for (std::uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    CAPTURE(i);
    const double f = ref_f16(h), b = ref_bf16(h);
    if (std::isnan(f)) {
      CHECK(std::isnan(moex::f16_to_float(h)));
    } else {
      CHECK(static_cast<double>(moex::f16_to_float(h)) == f);
      CHECK(std::signbit(moex::f16_to_float(h)) == std::signbit(f));
      CHECK(moex::float_to_f16(moex::f16_to_float(h)) == h);  // encode(decode(h)) == h
    }
    if (std::isnan(b)) {
      CHECK(std::isnan(moex::bf16_to_float(h)));
      CHECK(std::isnan(moex::bf16_to_float(moex::float_to_bf16(moex::bf16_to_float(h)))));
    } else {
      CHECK(static_cast<double>(moex::bf16_to_float(h)) == b);
      CHECK(moex::float_to_bf16(moex::bf16_to_float(h)) == h);
    }
  }
}

TEST_CASE("f16 and bf16 encoders round to nearest even at every midpoint") {
  // Between each pair of adjacent finite non-negative values: the midpoint goes to the even code,
  // the floats just below/above it to the lower/upper code. Midpoints are exact in f32.
  for (std::uint32_t i = 0; i < 0x7c00u; ++i) {
    const auto lo = static_cast<std::uint16_t>(i), hi = static_cast<std::uint16_t>(i + 1);
    const double mid = (ref_f16(lo) + ref_f16(hi)) / 2;  // hi may be +inf for 0x7bff
    CAPTURE(i);
    if (std::isinf(mid)) {
      CHECK(moex::float_to_f16(65520.f) == 0x7c00u);  // rounds to inf
      CHECK(moex::float_to_f16(std::nextafter(65520.f, 0.f)) == 0x7bffu);
      continue;
    }
    const auto m = static_cast<float>(mid);
    REQUIRE(static_cast<double>(m) == mid);
    CHECK(moex::float_to_f16(m) == ((lo & 1u) ? hi : lo));
    CHECK(moex::float_to_f16(std::nextafter(m, 0.f)) == lo);
    CHECK(moex::float_to_f16(std::nextafter(m, 1e30f)) == hi);
    CHECK(moex::float_to_f16(-m) == static_cast<std::uint16_t>(((lo & 1u) ? hi : lo) | 0x8000u));
  }
  for (std::uint32_t i = 0; i < 0x7f7fu; ++i) {
    const auto lo = static_cast<std::uint16_t>(i), hi = static_cast<std::uint16_t>(i + 1);
    const double mid = (ref_bf16(lo) + ref_bf16(hi)) / 2;
    const auto m = static_cast<float>(mid);
    CAPTURE(i);
    REQUIRE(static_cast<double>(m) == mid);
    CHECK(moex::float_to_bf16(m) == ((lo & 1u) ? hi : lo));
    CHECK(moex::float_to_bf16(std::nextafter(m, 0.f)) == lo);
    CHECK(moex::float_to_bf16(std::nextafter(m, std::numeric_limits<float>::infinity())) == hi);
  }
}

TEST_CASE("float formats round-trip within their rounding error") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const std::size_t rows = 5, cols = 100;
  std::vector<float> w = moex::test::random_normal(rows * cols, 1.f, 1);
  w[3] = 1e-6f;  // an f16 subnormal
  w[4] = -3e-8f;
  for (Precision p : {Precision::kF32, Precision::kF16, Precision::kBF16}) {
    CAPTURE(moex::to_string(p));
    const WeightFormat f = moex::float_format(p);
    const auto l = moex::matrix_layout(rows, cols, f);
    std::vector<std::byte> blob(l.total_bytes);
    REQUIRE(moex::quantize_matrix(w.data(), rows, cols, f, blob).is_ok());
    std::vector<float> back(rows * cols);
    moex::dequantize_matrix({blob.data(), l}, back.data());
    for (std::size_t i = 0; i < w.size(); ++i) {
      CAPTURE(i);
      const double x = w[i], err = std::fabs(x - back[i]);
      // Round to nearest: half an ulp, i.e. 2^-11 (f16) / 2^-8 (bf16) relative for normals;
      // f16 subnormals have an absolute spacing of 2^-24.
      if (p == Precision::kF32) CHECK(err == 0.0);
      if (p == Precision::kF16) CHECK(err <= std::max(std::fabs(x) * 0x1p-11, 0x1p-25));
      if (p == Precision::kBF16) CHECK(err <= std::fabs(x) * 0x1p-8);
    }
  }
}

TEST_CASE("integer formats round-trip within half a step of their group scale") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const std::size_t rows = 6, cols = 384;
  std::vector<float> w = moex::test::random_normal(rows * cols, 0.5f, 2);
  w[7] = 9.f;  // outliers set the scale of their group
  w[500] = -7.f;
  for (std::size_t i = 0; i < 32; ++i) w[cols + 128 + i] = 0.25f;  // a constant group
  for (const WeightFormat& f : kIntFormats) {
    const std::uint32_t bits = moex::precision_bits(f.precision);
    const bool asym = f.scheme == QuantScheme::kAsymmetric;
    CAPTURE(bits);
    CAPTURE(asym);
    CAPTURE(f.group_size);
    const auto l = moex::matrix_layout(rows, cols, f);
    std::vector<std::byte> blob(l.total_bytes + 7, std::byte{0xAB});
    REQUIRE(moex::quantize_matrix(w.data(), rows, cols, f, blob).is_ok());
    for (std::size_t i = l.total_bytes; i < blob.size(); ++i) CHECK(blob[i] == std::byte{0xAB});
    std::vector<float> back(rows * cols);
    moex::dequantize_matrix({blob.data(), l}, back.data());
    const double half = std::ldexp(1.0, static_cast<int>(bits) - 1);
    const std::size_t gpr = cols / f.group_size;
    for (std::size_t r = 0; r < rows; ++r) {
      for (std::size_t gi = 0; gi < gpr; ++gi) {
        const double d = moex::f16_to_float(load_u16(blob.data() + l.scales_offset + 2 * (r * gpr + gi)));
        const double m = asym ? moex::f16_to_float(load_u16(blob.data() + l.mins_offset + 2 * (r * gpr + gi))) : 0.0;
        for (std::size_t k = 0; k < f.group_size; ++k) {
          const std::size_t i = r * cols + gi * f.group_size + k;
          const double x = w[i], err = std::fabs(x - back[i]);
          CAPTURE(i);
          // Half a step, plus f32 rounding of the code computation (a few ulps of the code) and
          // of the decode. Symmetric: the side opposite the extreme clamps at 2^(b-1)-1, one
          // step (plus the scale's f16 rounding, 2^-11 of the range).
          const double slack = std::fabs(d) * 1e-4 + (std::fabs(x) + std::fabs(m)) * 1e-6 + 1e-30;
          double bound = std::fabs(d) / 2 + slack;
          if (!asym && d != 0 && x / d > half - 1.5) bound = std::fabs(d) * (1 + half * 0x1p-10) + slack;
          if (asym) CHECK(x >= m);  // the minimum rounds down: no clamping below
          CHECK(err <= bound);
        }
      }
    }
  }
}

TEST_CASE("quantize_matrix rejects bad input with kInvalidArgument") {
  std::vector<float> w(4 * 64, 0.5f);
  const WeightFormat q4 = moex::quant_format(Precision::kInt4, 32);
  std::vector<std::byte> blob(moex::matrix_layout(4, 64, q4).total_bytes);
  using moex::StatusCode;
  auto code = [&](const float* src, std::size_t rows, std::size_t cols, WeightFormat f, std::span<std::byte> dst) {
    return moex::quantize_matrix(src, rows, cols, f, dst).code();
  };
  CHECK(code(nullptr, 4, 64, q4, blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 0, 64, q4, blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 0, q4, blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, moex::quant_format(Precision::kInt4, 48), blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 2, 96, moex::quant_format(Precision::kInt4, 64), blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, {static_cast<Precision>(200), QuantScheme::kSymmetric, 0}, blob) ==
        StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, {Precision::kInt4, static_cast<QuantScheme>(7), 32}, blob) ==
        StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, q4, std::span<std::byte>(blob).first(blob.size() - 1)) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, q4, {}) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), std::numeric_limits<std::size_t>::max() / 2, 64, q4, blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, moex::float_format(Precision::kQ4_0), blob) == StatusCode::kUnsupported);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    w[77] = bad;
    CHECK(code(w.data(), 4, 64, q4, blob) == StatusCode::kInvalidArgument);
    CHECK(code(w.data(), 4, 64, moex::float_format(Precision::kF32), blob) == StatusCode::kInvalidArgument);
  }
  w[77] = 1e30f;  // finite, but its f16 scale (and f16 value) overflows
  CHECK(code(w.data(), 4, 64, q4, blob) == StatusCode::kInvalidArgument);
  CHECK(code(w.data(), 4, 64, moex::float_format(Precision::kF16), blob) == StatusCode::kInvalidArgument);
  std::vector<std::byte> big(4 * 64 * 4);
  CHECK(code(w.data(), 4, 64, moex::float_format(Precision::kBF16), big) == StatusCode::kOk);
  CHECK(code(w.data(), 4, 64, moex::float_format(Precision::kF32), big) == StatusCode::kOk);
}

TEST_CASE("convert_expert equals quantizing the decoded source, with or without a pool") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const moex::ExpertShape shape{96, 352};
  const auto w1 = moex::test::random_normal(std::size_t{352} * 96, 0.1f, 3);
  const auto w3 = moex::test::random_normal(std::size_t{352} * 96, 0.1f, 4);
  const auto w2 = moex::test::random_normal(std::size_t{352} * 96, 0.1f, 5);
  const WeightFormat bf16 = moex::float_format(Precision::kBF16);
  const auto src_l = moex::expert_layout(shape, bf16);
  std::vector<std::byte> src(src_l.total_bytes);
  REQUIRE(moex::pack_expert(w1.data(), w3.data(), w2.data(), shape, bf16, src).is_ok());
  const auto sv = moex::ExpertView::contiguous(src.data(), src_l);
  moex::ThreadPool pool(3);
  for (const WeightFormat& f : kIntFormats) {
    if (!moex::expert_format_is_valid(shape, f)) continue;  // 96 columns: group 32 only
    CAPTURE(moex::to_string(f.precision));
    CAPTURE(f.group_size);
    const auto l = moex::expert_layout(shape, f);
    std::vector<std::byte> a(l.total_bytes), b(l.total_bytes), want(l.total_bytes);
    REQUIRE(moex::convert_expert(sv, f, a).is_ok());
    REQUIRE(moex::convert_expert(sv, f, b, &pool).is_ok());
    CHECK(a == b);
    std::vector<float> d1(w1.size()), d3(w3.size()), d2(w2.size());
    moex::dequantize_matrix(sv.w1(), d1.data());
    moex::dequantize_matrix(sv.w3(), d3.data());
    moex::dequantize_matrix(sv.w2(), d2.data());
    REQUIRE(moex::pack_expert(d1.data(), d3.data(), d2.data(), shape, f, want).is_ok());
    CHECK(a == want);
  }
  std::vector<std::byte> dst(moex::expert_bytes(shape, bf16));
  CHECK(moex::convert_expert(moex::ExpertView{}, bf16, dst).code() == moex::StatusCode::kInvalidArgument);
  CHECK(moex::convert_expert(sv, bf16, std::span<std::byte>(dst).first(10)).code() ==
        moex::StatusCode::kInvalidArgument);
  CHECK(moex::convert_expert(sv, moex::quant_format(Precision::kInt4, 64), dst).code() ==
        moex::StatusCode::kInvalidArgument);  // 96 % 64 != 0
  CHECK(moex::pack_expert(nullptr, w3.data(), w2.data(), shape, bf16, dst).code() ==
        moex::StatusCode::kInvalidArgument);
}

TEST_CASE("dequantize_row decodes block formats through decode_block_row") {
  // Q8_0 by hand: per 32 weights an f16 scale d and 32 int8 q; x = d * q.
  const std::size_t rows = 3, cols = 64;
  const std::size_t bs = moex::block_format_block_size(Precision::kQ8_0);
  const std::size_t bb = moex::block_format_block_bytes(Precision::kQ8_0);
  REQUIRE(bs == 32);
  REQUIRE(bb == 34);
  std::vector<std::byte> blob(rows * cols / bs * bb);
  std::vector<double> want(rows * cols);
  for (std::size_t blk = 0; blk < rows * cols / bs; ++blk) {
    const std::uint16_t d = moex::float_to_f16(0.125f * static_cast<float>(blk + 1));
    std::memcpy(blob.data() + blk * bb, &d, 2);
    for (std::size_t i = 0; i < bs; ++i) {
      const auto q = static_cast<std::int8_t>(static_cast<int>((blk * 37 + i * 11) % 255) - 127);
      std::memcpy(blob.data() + blk * bb + 2 + i, &q, 1);
      want[blk * bs + i] = 0.125 * static_cast<double>(blk + 1) * q;
    }
  }
  moex::MatrixView m{blob.data(), {}};
  m.layout.rows = rows;
  m.layout.cols = cols;
  m.layout.format = moex::float_format(Precision::kQ8_0);
  std::vector<float> row(cols);
  for (std::size_t r = 0; r < rows; ++r) {
    moex::dequantize_row(m, r, row.data());
    for (std::size_t c = 0; c < cols; ++c) CHECK(static_cast<double>(row[c]) == want[r * cols + c]);
  }
}
}  // TEST_SUITE("cpu")
