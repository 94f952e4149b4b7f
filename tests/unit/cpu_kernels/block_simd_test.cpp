// matmul_rows on block-format matrices (GGUF Q8_0/Q4_0/Q4_K, fp8 e4m3 with its 128x128 f32 scale
// section) at every CPU level this machine has: the SIMD kernels (src/cpu/kernels_block_*.cpp)
// and the portable decode path, against float64 math on the decoded weights (fresh random data).
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/cpu/expert_ffn.hpp"

#include "support/block_expert.hpp"
#include "support/test_support.hpp"

namespace {

using moex::CpuIsa;
using moex::Precision;

// Every level decodes weights exactly (Q4_K: one f32 rounding) and accumulates in f32 over at most
// 1024 columns: norm-wise error a few f32 ulps (6e-8) times sqrt(1024); 2e-5 is ~10x that.
constexpr double kBlockSimdTol = 2e-5;

// Restores the ISA the process had when the test began.
struct IsaGuard {
  CpuIsa saved = moex::active_cpu_isa();
  ~IsaGuard() { (void)moex::set_cpu_isa(saved); }
};

struct Shape {
  std::size_t rows, cols;
};

// A single block row, odd row counts, odd unit counts per row, partial fp8 scale blocks.
std::vector<Shape> shapes_for(Precision p) {
  const std::size_t b = p == Precision::kFp8E4M3 ? 32 : moex::block_format_block_size(p);
  return {{1, b}, {7, 3 * b}, {33, 1024}, {131, p == Precision::kQ4_K ? std::size_t{768} : std::size_t{288}}};
}

struct BlockMatrix {
  moex::MatrixLayout layout{};
  std::vector<std::byte> bytes;
  std::vector<float> vals;  // [rows x cols] decoded weights
  moex::MatrixView view() const { return {bytes.data(), layout}; }
};

BlockMatrix random_block_matrix(Precision p, Shape s, std::uint64_t salt) {
  BlockMatrix m;
  m.layout = moex::matrix_layout(s.rows, s.cols, moex::float_format(p));
  m.bytes.assign(m.layout.total_bytes, std::byte{0});
  if (p == Precision::kFp8E4M3) {
    std::vector<std::byte> codes;
    std::vector<float> scales;
    moex::test::random_fp8(s.rows, s.cols, salt, codes, scales, m.vals);
    std::memcpy(m.bytes.data(), codes.data(), codes.size());
    std::memcpy(m.bytes.data() + m.layout.scales_offset, scales.data(), scales.size() * sizeof(float));
  } else {
    const auto b = moex::test::random_gguf_blocks(p, s.rows, s.cols, salt, m.vals);
    std::memcpy(m.bytes.data(), b.data(), b.size());
  }
  return m;
}

// y = W x in float64 for n tokens of stride ldx; [n x rows].
std::vector<double> reference(const BlockMatrix& m, const std::vector<float>& x, std::size_t n, std::size_t ldx) {
  const std::size_t rows = m.layout.rows, cols = m.layout.cols;
  std::vector<double> y(n * rows, 0.0);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t r = 0; r < rows; ++r) {
      double acc = 0;
      for (std::size_t c = 0; c < cols; ++c) acc += static_cast<double>(m.vals[r * cols + c]) * x[t * ldx + c];
      y[t * rows + r] = acc;
    }
  return y;
}

// matmul_rows over all rows (in two calls split at `split`), y packed [n x rows] from ldy.
std::vector<float> run(const BlockMatrix& m, const std::vector<float>& x, std::size_t n, std::size_t ldx,
                       std::size_t split) {
  const std::size_t rows = m.layout.rows, ldy = rows + 3;
  std::vector<float> y(n * ldy, -1.f), out(n * rows);
  moex::matmul_rows(m.view(), x.data(), n, ldx, y.data(), ldy, 0, split);
  moex::matmul_rows(m.view(), x.data(), n, ldx, y.data(), ldy, split, rows);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t r = 0; r < rows; ++r) out[t * rows + r] = y[t * ldy + r];
  return out;
}

std::vector<CpuIsa> isas_here() {
  std::vector<CpuIsa> v;
  for (CpuIsa i : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (i <= moex::detected_cpu_isa()) v.push_back(i);
  return v;
}

constexpr Precision kFormats[] = {Precision::kQ8_0, Precision::kQ4_0, Precision::kQ4_K, Precision::kFp8E4M3};

}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("block-format matmul_rows matches float64 at every CPU level, SIMD and portable agree") {
  IsaGuard guard;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  std::uint64_t salt = 900;
  for (Precision p : kFormats) {
    CAPTURE(moex::to_string(p));
    for (const Shape& s : shapes_for(p)) {
      CAPTURE(s.rows);
      CAPTURE(s.cols);
      const BlockMatrix m = random_block_matrix(p, s, salt++);
      for (std::size_t n : {1u, 2u, 3u, 8u, 11u}) {
        CAPTURE(n);
        const std::size_t ldx = s.cols + 5;
        const auto x = moex::test::random_normal(n * ldx, 1.f, salt++);
        const auto ref = reference(m, x, n, ldx);
        REQUIRE(moex::set_cpu_isa(CpuIsa::kScalar).is_ok());
        const auto portable = run(m, x, n, ldx, s.rows);
        CHECK(moex::test::rel_error(portable, ref) < kBlockSimdTol);
        for (CpuIsa isa : isas_here()) {
          CAPTURE(moex::to_string(isa));
          REQUIRE(moex::set_cpu_isa(isa).is_ok());
          const auto y = run(m, x, n, ldx, s.rows);
          CHECK(moex::test::rel_error(y, ref) < kBlockSimdTol);
          // SIMD against portable: both within tolerance of float64, so within 2x of each other.
          std::vector<double> pd(portable.begin(), portable.end());
          CHECK(moex::test::rel_error(y, pd) < 2 * kBlockSimdTol);
          // Rows split between two calls: bit-identical to one call.
          CHECK(run(m, x, n, ldx, s.rows / 2) == y);
        }
      }
    }
  }
}

TEST_CASE("fp8 e4m3 matmul_rows with block scales near the f32 range") {
  // Scale * 2^8 overflows f32 here, so the SIMD kernels apply 2^8 and the scale in turn.
  IsaGuard guard;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  BlockMatrix m = random_block_matrix(Precision::kFp8E4M3, {130, 160}, 77);
  const std::size_t rows = 130, cols = 160, sc = 2;
  for (std::size_t i = 0; i < rows * cols; ++i)  // exponent field <= 7: |code| < 2
    m.bytes[i] &= std::byte{0xB7};
  const float scales[4] = {1.5e36f, -2.5e36f, 3e36f, 1e-3f};
  std::memcpy(m.bytes.data() + m.layout.scales_offset, scales, sizeof scales);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c)
      m.vals[r * cols + c] = moex::fp8_e4m3_to_float(std::to_integer<std::uint8_t>(m.bytes[r * cols + c])) *
                             scales[(r / 128) * sc + c / 128];
  const auto x = moex::test::random_normal(cols, 1e-3f, 78);
  const auto ref = reference(m, x, 1, cols);
  for (CpuIsa isa : isas_here()) {
    CAPTURE(moex::to_string(isa));
    REQUIRE(moex::set_cpu_isa(isa).is_ok());
    const auto y = run(m, x, 1, cols, rows);
    for (float v : y) REQUIRE(std::isfinite(v));
    CHECK(moex::test::rel_error(y, ref) < kBlockSimdTol);
  }
}
}  // TEST_SUITE("cpu")
