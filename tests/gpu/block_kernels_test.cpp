// The block-format CUDA kernels (GGUF Q8_0, Q4_0, Q4_K; fp8 e4m3 with f32 block scales) against
// float64 references of the weights as the CPU decodes them (moex/quant/ggml.hpp), on fresh random
// data, outputs poisoned (NaN) before every launch.
//
// moex has no encoder for these formats (they are read in place from checkpoints; quantize_matrix
// rejects them), so each matrix is random bytes in the format's exact layout: random f16 scales
// of realistic size, random codes (Q4_K: random 6-bit sub-block scales and mins too), fp8 bytes
// drawn from every finite code. The reference decodes those bytes with decode_block_row /
// fp8_e4m3_to_float, the CPU's own decoders.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

#include "block_decode.cuh"
#include "gpu_test_support.hpp"
#include "kernels.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Precision;
namespace mc = moex::cuda;

// Kernel and reference use the same decoded weights; what differs is the f32 accumulation over
// <= 2304 products and the per-32-weight factoring d * sum(q x) (Q4_K: - dmin m sum x): 1e-4 in
// norm leaves ~100x margin over f32 rounding, while any byte-order or indexing error is O(1).
constexpr double kBlockGemvTol = 1e-4;
// q8 path (GGUF formats with a workspace): integer dot products are exact, so against the float64
// product with the CPU-rule quantized x only f32 rounding of scales and sums remains.
constexpr double kBlockGemvQ8Tol = 1e-4;
// ... and against the exact product: x's rounding, |err| <= d_x/2 per element, is about 4e-3
// norm-wise on random data; a generous bound that still catches a wrong group or scale.
constexpr double kBlockGemvQ8ExactTol = 3e-2;
// Grouped experts add __expf (a few ulp) and atomics in any order to the same sums: same bound.
constexpr double kBlockExpertTol = 1e-4;
// Grouped experts on the q8 path against float64 experts fed activations quantized by the CPU's
// rule twice (x, then the SwiGLU activation h): integer sums are exact; what is left is f32
// rounding and, rarely, an element of h whose f32 value rounds to the other int8 code than the
// float64 one (one step of 1/127 of its group's max): 1e-3 norm-wise, as for int4/int2.
constexpr double kBlockExpertQ8Tol = 1e-3;
// ... and against the exact experts: two activation roundings, each about 4e-3 for one GEMV: 3e-2,
// and 5e-2 for Q4_K, whose q8 result measured 0.0317 from the exact experts on these random
// matrices (H100, 2026-12-07, seed 20261125) while within 1e-3 of the float64 q8 rule: the rule's
// own error there, not the kernel's (the test prints the rule's error per format).
constexpr double kBlockExpertQ8ExactTol = 3e-2;
constexpr double kBlockExpertQ8ExactTolQ4K = 5e-2;
// The fp8 block-scale side of DeepSeek-V3 (weight_block_size [128, 128]).
constexpr std::uint32_t kFp8ScaleBlock = 128;

/// A random matrix in block format p: its bytes (rows back to back), its fp8 block scales (empty
/// for the GGUF formats) and its weights as the CPU decodes them.
struct BlockMatrix {
  std::size_t rows = 0, cols = 0;
  std::vector<std::byte> bytes;
  std::vector<float> scales;
  std::vector<float> w;
};

std::size_t row_bytes(Precision p, std::size_t cols) {
  return cols / moex::block_format_block_size(p) * moex::block_format_block_bytes(p);
}

BlockMatrix random_block_matrix(Precision p, std::size_t rows, std::size_t cols, std::uint64_t salt) {
  std::mt19937_64 gen(moex::test::seed() ^ (salt * 0x9E3779B97F4A7C15ull));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.2f, 1.f);
  BlockMatrix m;
  m.rows = rows;
  m.cols = cols;
  const std::size_t rb = row_bytes(p, cols);
  m.bytes.resize(rows * rb);
  for (auto& b : m.bytes) b = static_cast<std::byte>(byte(gen));
  auto put_f16 = [&](std::size_t at, float v) {
    const std::uint16_t h = moex::float_to_f16(v);
    m.bytes[at] = static_cast<std::byte>(h & 0xff);
    m.bytes[at + 1] = static_cast<std::byte>(h >> 8);
  };
  const std::size_t bb = moex::block_format_block_bytes(p);
  switch (p) {
    case Precision::kQ8_0:
    case Precision::kQ4_0:
      for (std::size_t at = 0; at < m.bytes.size(); at += bb) put_f16(at, 0.01f * scale(gen));
      break;
    case Precision::kQ4_K:
      for (std::size_t at = 0; at < m.bytes.size(); at += bb) {
        put_f16(at, 0.002f * scale(gen));      // d
        put_f16(at + 2, 0.004f * scale(gen));  // dmin
      }
      break;
    case Precision::kFp8E4M3: {
      for (auto& b : m.bytes)
        if ((std::to_integer<unsigned>(b) & 0x7fu) == 0x7fu) b = std::byte{0};  // no NaN codes
      const std::size_t sr = (rows + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
      const std::size_t sc = (cols + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
      m.scales.resize(sr * sc);
      for (auto& s : m.scales) s = 1e-3f * scale(gen);
      break;
    }
    default:
      FAIL("not a block format");
  }
  m.w.resize(rows * cols);
  for (std::size_t r = 0; r < rows; ++r) {
    moex::decode_block_row(p, m.bytes.data() + r * rb, cols, m.w.data() + r * cols);
    if (p == Precision::kFp8E4M3) {
      const std::size_t sc = (cols + kFp8ScaleBlock - 1) / kFp8ScaleBlock;
      for (std::size_t c = 0; c < cols; ++c)
        m.w[r * cols + c] *= m.scales[(r / kFp8ScaleBlock) * sc + c / kFp8ScaleBlock];
    }
  }
  return m;
}

moex::MatrixLayout block_layout(Precision p, std::size_t rows, std::size_t cols) {
  moex::MatrixLayout l;
  l.rows = rows;
  l.cols = cols;
  l.format = moex::float_format(Precision::kBF16);
  l.format.precision = p;
  l.codes_bytes = rows * row_bytes(p, cols);
  l.total_bytes = l.codes_bytes;
  return l;
}

constexpr Precision kBlockFormats[] = {Precision::kQ8_0, Precision::kQ4_0, Precision::kQ4_K, Precision::kFp8E4M3};

}  // namespace

TEST_SUITE("cuda") {
TEST_CASE("block-format dispatch: column multiples, fp8 needs its scales in GEMV and grouped experts") {
  CHECK(mc::gemv_supported({Precision::kQ8_0, moex::QuantScheme::kSymmetric, 0}, 1440));
  CHECK(mc::gemv_supported({Precision::kQ4_0, moex::QuantScheme::kSymmetric, 0}, 96));
  CHECK_FALSE(mc::gemv_supported({Precision::kQ4_0, moex::QuantScheme::kSymmetric, 0}, 100));
  CHECK(mc::gemv_supported({Precision::kQ4_K, moex::QuantScheme::kSymmetric, 0}, 2304));
  CHECK_FALSE(mc::gemv_supported({Precision::kQ4_K, moex::QuantScheme::kSymmetric, 0}, 1440));
  CHECK(mc::gemv_supported({Precision::kFp8E4M3, moex::QuantScheme::kSymmetric, 0}, 7168));
  CHECK_FALSE(mc::gemv_supported({Precision::kQ6_K, moex::QuantScheme::kSymmetric, 0}, 4096));
  std::vector<float> dummy(64);
  mc::GemvArgs a;
  a.w = reinterpret_cast<const std::byte*>(dummy.data());
  a.x = dummy.data();
  a.y = dummy.data();
  a.ldx = 256;
  a.ldy = 16;
  a.layout = block_layout(Precision::kFp8E4M3, 16, 256);
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kInvalidArgument);  // no block_scales
  a.block_scales = dummy.data();
  a.scale_block = 100;
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kInvalidArgument);  // not a multiple of 32
  a.layout = block_layout(Precision::kQ4_0, 16, 256);
  a.workspace = reinterpret_cast<std::byte*>(dummy.data()) + 4;
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kInvalidArgument);  // misaligned workspace
  a.workspace = nullptr;
  // Codes in whole 1024-column tiles, then an even count of (d_x, sum q) pairs per token.
  CHECK(mc::gemv_workspace_bytes(256, 1) == 1024 + 8 * 2 * sizeof(float));
  CHECK(mc::gemv_workspace_bytes(1440, 3) == 3 * (2048 + 46 * 2 * sizeof(float)));
  CHECK(mc::grouped_expert_workspace_bytes({512, 768}, 2) ==
        2 * 8 * 768 * sizeof(float) + mc::q8_rows_bytes(512, 16) + mc::q8_rows_bytes(768, 16));
  mc::ExpertTask t;
  t.w1 = t.w3 = t.w2 = a.w;
  t.n = 1;
  mc::GroupedExpertArgs g;
  g.layout.shape = {256, 256};
  g.layout.format.precision = Precision::kFp8E4M3;
  g.tasks = &t;
  g.count = 1;
  g.x = dummy.data();
  g.ldx = 256;
  g.out = dummy.data();
  g.ldo = 256;
  g.workspace = dummy.data();
  CHECK(mc::grouped_expert_ffn(g, nullptr).code() == moex::StatusCode::kInvalidArgument);  // no scale sections
}

TEST_CASE("block kernels' host-checkable parts: q8 unit decoders, tile spans, step shares, code offsets") {
  namespace d = moex::cuda::detail;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  // unit_codes (the q8 path's decoder) against the CPU's decode_block_row, with the row starting 0
  // or 2 bytes past a 4-byte boundary (shared-memory tiles of 34/18-byte blocks start at either).
  auto check_units = [&]<Precision P>() {
    const std::size_t cols = 2304;  // 72 units: 9 Q4_K super-blocks
    const BlockMatrix m = random_block_matrix(P, 1, cols, 77);
    for (const std::size_t off : {std::size_t{0}, std::size_t{2}}) {
      if (P == Precision::kQ4_K && off != 0) continue;  // Q4_K rows are whole 144-byte super-blocks
      CAPTURE(moex::to_string(P));
      CAPTURE(off);
      std::vector<uint4> storage(m.bytes.size() / 16 + 8);  // 16-byte aligned, padded past the row
      auto* base = reinterpret_cast<std::uint8_t*>(storage.data()) + off;
      std::memcpy(base, m.bytes.data(), m.bytes.size());
      double worst = 0;
      for (int u = 0; u < static_cast<int>(cols / 32); ++u) {
        std::uint32_t c[8];
        float dw = 0, mn = 0;
        d::unit_codes<P>(base, u, c, dw, mn);
        for (int j = 0; j < 32; ++j) {
          const std::uint32_t byte = (c[j / 4] >> (8 * (j % 4))) & 0xFFu;
          const double code = P == Precision::kQ8_0 ? double(static_cast<std::int8_t>(byte)) : double(byte);
          if (P != Precision::kQ8_0) REQUIRE(byte < 16u);
          const double want = m.w[static_cast<std::size_t>(u) * 32 + static_cast<std::size_t>(j)];
          worst = std::max(worst, std::fabs(double(dw) * code + double(mn) - want) / std::max(1e-3, std::fabs(want)));
        }
      }
      CHECK(worst < 1e-6);  // the same f32 products and sums as the CPU decoder
    }
  };
  check_units.operator()<Precision::kQ8_0>();
  check_units.operator()<Precision::kQ4_0>();
  check_units.operator()<Precision::kQ4_K>();

  // tile_span: 16-byte aligned copies that cover each tile, never past the allocation's last whole 16
  // bytes (the rest, only at its very end, is the tail), and fit a row buffer.
  auto check_spans = [&]<Precision P>(std::size_t rows, std::size_t cols) {
    CAPTURE(moex::to_string(P));
    CAPTURE(cols);
    const std::size_t rb = row_bytes(P, cols);
    const std::uintptr_t base = 0x10000;
    const auto* end = reinterpret_cast<const std::uint8_t*>(base + rows * rb);
    const std::uintptr_t lim = (base + rows * rb) & ~std::uintptr_t{15};
    const std::uint32_t tiles = static_cast<std::uint32_t>((cols + d::kTileWeights - 1) / d::kTileWeights);
    std::size_t covered = 0, tails = 0;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::uint32_t k = 0; k < tiles; ++k) {
        const auto sp = d::tile_span<P>(reinterpret_cast<const std::uint8_t*>(base + r * rb), end, rb, k);
        CHECK(sp.a0 % 16 == 0);
        CHECK(sp.a1 % 16 == 0);
        CHECK(sp.a0 <= sp.tb);
        CHECK(sp.a1 <= lim);
        CHECK(sp.te - sp.a0 <= static_cast<std::uintptr_t>(d::kRowBuf<P>));
        CHECK(sp.a1 - sp.a0 <= static_cast<std::uintptr_t>(d::kRowBuf<P>));
        if (sp.a1 < sp.te) {
          CHECK(sp.a1 == lim);
          ++tails;
        }
        CHECK(sp.tb == base + r * rb + std::size_t{k} * d::kTileBytes<P>);
        covered += sp.te - sp.tb;
      }
    CHECK(covered == rows * rb);  // tiles partition every row
    CHECK(tails == ((rows * rb) % 16 != 0 ? 1u : 0u));
  };
  check_spans.operator()<Precision::kQ4_0>(37, 1440);
  check_spans.operator()<Precision::kQ8_0>(37, 1440);
  check_spans.operator()<Precision::kQ8_0>(5, 32);
  check_spans.operator()<Precision::kQ4_K>(131, 2304);
  check_spans.operator()<Precision::kFp8E4M3>(20, 800);

  // BlockDiv (the fp8 scale block's division by multiply-high): exact for every 32-bit v, at the
  // edges (multiples of b and their neighbours, the top of the range) and on random values.
  std::mt19937_64 div_rng(0xd1d1);
  for (const std::uint32_t b : {1u, 2u, 3u, 7u, 32u, 96u, 100u, 128u, 160u, 4096u, 1000003u, 0x7FFFFFFFu, 0x80000000u,
                                0xFFFFFFFFu}) {
    CAPTURE(b);
    const d::BlockDiv div = d::BlockDiv::of(b);
    for (const std::uint32_t v : {0u, 1u, 31u, 127u, 128u, 129u, 4095u, 4096u, 123457u, 0x7FFFFFFFu, 0x80000000u,
                                  0xFFFFFFF0u, 0xFFFFFFFFu, b - 1, b, b + 1, 2 * b - 1, 2 * b, 3 * b + 1})
      CHECK(div(v) == v / b);
    int wrong = 0;
    for (int i = 0; i < 20000; ++i) {
      const auto v = static_cast<std::uint32_t>(div_rng());
      wrong += div(v) != v / b;
    }
    CHECK(wrong == 0);
  }
  CHECK(d::BlockDiv::of(0)(7u) == 7u);  // never a division by zero
  CHECK(d::BlockDiv{}(0xFFFFFFFFu) == 0xFFFFFFFFu);  // default-constructed: b = 1 (the GGUF formats)

  // Step shares: even_steps partitions all steps in order, balanced to one; strided_groups covers
  // whole groups.
  for (const std::uint32_t count : {1u, 7u, 1024u, 5003u})
    for (const std::uint32_t tiles : {1u, 3u, 14u})
      for (const std::uint32_t W : {1u, 5u, 328u, 4096u}) {
        std::uint64_t next = 0, lo = ~std::uint64_t{0}, hi = 0;
        for (std::uint32_t w = 0; w < W; ++w) {
          const d::StepRange sr = d::even_steps(w, W, count, tiles);
          if (sr.steps != 0) CHECK(std::uint64_t{sr.rg0} * tiles + sr.k0 == next);
          CHECK(sr.stride == 1u);
          next += sr.steps;
          lo = std::min(lo, sr.steps);
          hi = std::max(hi, sr.steps);
        }
        CHECK(next == std::uint64_t{count} * tiles);
        CHECK(hi - lo <= 1);
        std::uint64_t strided = 0;
        for (std::uint32_t w = 0; w < W; ++w) {
          const d::StepRange sr = d::strided_groups(w, W, count, tiles);
          CHECK(sr.k0 == 0u);
          CHECK(sr.steps % tiles == 0);
          strided += sr.steps;
        }
        CHECK(strided == std::uint64_t{count} * tiles);
      }

  // Code offsets: a bijection on each tile, lane u's two 16-byte loads holding its unit's columns in order.
  std::set<std::uint32_t> seen;
  for (std::uint32_t c = 0; c < 3072; ++c) {
    const std::uint32_t tile = c / 1024, u = (c % 1024) / 32, b = c % 32;
    CHECK(d::q8_code_offset(c) == tile * 1024 + (b < 16 ? 0u : 512u) + 16 * u + b % 16);
    seen.insert(d::q8_code_offset(c));
  }
  CHECK(seen.size() == 3072);
  CHECK(*seen.rbegin() == 3071);
}
}  // TEST_SUITE("cuda")

TEST_SUITE("gpu" * doctest::skip(!moex::test::gpu_available())) {
TEST_CASE("block-format GEMV (Q8_0, Q4_0, Q4_K, fp8 e4m3) matches the float64 reference, batch 1..8") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Shape {
    std::size_t rows, cols;
  };
  for (const Precision p : kBlockFormats) {
    // Odd row counts; 1440 columns end in a partial tile (and, for fp8, a partial scale block),
    // and Q8_0/Q4_0 rows of 1440 or 800 columns start off 16-byte boundaries (the matrix then ends
    // off one too: its last bytes are not reachable by a 16-byte bulk copy). 20011 rows are more row
    // groups than the device holds warps at once, so warps stream several groups through one ring.
    const std::vector<Shape> shapes = p == Precision::kQ4_K
                                          ? std::vector<Shape>{{37, 1536}, {131, 2304}, {20011, 768}}
                                          : std::vector<Shape>{{37, 1440}, {131, 2304}, {5, 32}, {20011, 800}};
    for (const Shape sh : shapes) {
      const std::vector<std::uint32_t> ns =
          sh.rows > 1000 ? std::vector<std::uint32_t>{1, 8} : std::vector<std::uint32_t>{1, 2, 3, 8};
      for (const std::uint32_t n : ns)
        for (const bool q8 : {false, true}) {
          if (q8 && p == Precision::kFp8E4M3) continue;  // fp8 has no q8 path
          CAPTURE(q8);
          CAPTURE(moex::to_string(p));
          CAPTURE(sh.rows);
          CAPTURE(sh.cols);
          CAPTURE(n);
          const std::size_t rows = sh.rows, cols = sh.cols, ldx = cols + 4, ldy = rows + 3;
          const BlockMatrix m = random_block_matrix(p, rows, cols, static_cast<std::uint64_t>(p) * 1000 + rows + n);
          const auto x = moex::test::random_normal(n * ldx, 1.f, static_cast<std::uint64_t>(p) * 1000 + 7 + n);
          const auto exact_ref = moex::test::reference_gemv(m.w, rows, cols, x, n, ldx);
          std::vector<double> ref = exact_ref;
          if (q8) {  // the CPU's q8 rule per 32 columns, in the same f32 arithmetic, then float64 sums
            for (std::size_t t = 0; t < n; ++t) {
              const std::vector<double> xt(x.begin() + t * ldx, x.begin() + t * ldx + cols);
              const std::vector<double> xq = moex::test::q8_round(xt.data(), cols, 32);
              for (std::size_t r = 0; r < rows; ++r) {
                double acc = 0;
                for (std::size_t c = 0; c < cols; ++c) acc += double(m.w[r * cols + c]) * xq[c];
                ref[t * rows + r] = acc;
              }
            }
          }
          // Exactly the matrix's bytes: a read past its end would show under compute-sanitizer.
          moex::test::DeviceBuffer<std::byte> dw(m.bytes.size());
          moex::test::DeviceBuffer<float> dx(x.size()), dy(n * ldy), ds(std::max<std::size_t>(1, m.scales.size()));
          REQUIRE(dw.upload(m.bytes));
          REQUIRE(dx.upload(x));
          if (!m.scales.empty()) REQUIRE(ds.upload(m.scales));
          REQUIRE(dy.poison());
          mc::GemvArgs a;
          a.w = dw.get();
          a.layout = block_layout(p, rows, cols);
          a.x = dx.get();
          a.ldx = ldx;
          a.y = dy.get();
          a.ldy = ldy;
          a.n = n;
          if (p == Precision::kFp8E4M3) {
            a.block_scales = ds.get();
            a.scale_block = kFp8ScaleBlock;
          }
          moex::test::DeviceBuffer<std::byte> dws(mc::gemv_workspace_bytes(cols, n));
          if (q8) a.workspace = dws.get();
          const moex::Status st = mc::gemv(a, nullptr);
          INFO(st.to_string());
          REQUIRE(st.is_ok());
          MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
          const auto y = dy.download(n * ldy);
          const auto got = moex::test::strided_rows(y, n, rows, ldy);
          CHECK(std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); }));
          CHECK(moex::test::rel_error(got, ref) < (q8 ? kBlockGemvQ8Tol : kBlockGemvTol));
          if (q8) CHECK(moex::test::rel_error(got, exact_ref) < kBlockGemvQ8ExactTol);
          CHECK(std::isnan(y[rows]));  // padding between rows of y stays poisoned
        }
    }
  }
}

TEST_CASE("block-format grouped SwiGLU experts (Q8_0, Q4_0, Q4_K, fp8) match the float64 reference") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const std::size_t tokens = 5, experts = 3;
  for (const Precision p : kBlockFormats) {
    // 1312 / 2336 columns: rows of 41 / 73 blocks, so Q8_0/Q4_0 rows start off 16-byte boundaries,
    // two and three tiles a row (the last partial), and fp8 ends in partial 128x128 scale blocks.
    const moex::ExpertShape shape =
        p == Precision::kQ4_K ? moex::ExpertShape{1280, 2304} : moex::ExpertShape{1312, 2336};
    const std::size_t ld = shape.hidden + 4;
    moex::WeightFormat fmt = moex::float_format(Precision::kBF16);
    fmt.precision = p;
    const moex::ExpertLayout layout = moex::expert_layout(shape, fmt);
    for (const bool exact : {false, true}) {
      if (p == Precision::kFp8E4M3 && !exact) continue;  // fp8 always runs f32 activations
      CAPTURE(moex::to_string(p));
      CAPTURE(exact);
      const std::uint64_t salt = static_cast<std::uint64_t>(p) * 100 + (exact ? 50 : 0);
      std::vector<BlockMatrix> w1, w3, w2;
      for (std::size_t e = 0; e < experts; ++e) {
        w1.push_back(random_block_matrix(p, shape.ffn, shape.hidden, salt + 10 * e + 1));
        w3.push_back(random_block_matrix(p, shape.ffn, shape.hidden, salt + 10 * e + 2));
        w2.push_back(random_block_matrix(p, shape.hidden, shape.ffn, salt + 10 * e + 3));
      }
      const auto x = moex::test::random_normal(tokens * ld, 1.f, salt + 91);
      const auto out0 = moex::test::random_normal(tokens * ld, 1.f, salt + 92);
      const auto gate = moex::test::random_normal(experts * 8, 0.5f, salt + 93);
      // y = W2 (silu(W1 x) * (W3 x)) in float64; q8: x and h rounded by the CPU's Q8 rule first.
      auto expert_ref = [&](std::size_t e, const float* xt, bool q8) {
        std::vector<double> xin(xt, xt + shape.hidden);
        if (q8) xin = moex::test::q8_round(xin.data(), shape.hidden, 32);
        std::vector<double> h(shape.ffn);
        for (std::size_t r = 0; r < shape.ffn; ++r) {
          double g = 0, u = 0;
          for (std::size_t c = 0; c < shape.hidden; ++c) {
            g += double(w1[e].w[r * shape.hidden + c]) * xin[c];
            u += double(w3[e].w[r * shape.hidden + c]) * xin[c];
          }
          h[r] = g / (1 + std::exp(-g)) * u;
        }
        if (q8) h = moex::test::q8_round(h.data(), shape.ffn, 32);
        std::vector<double> y(shape.hidden);
        for (std::size_t r = 0; r < shape.hidden; ++r) {
          double s = 0;
          for (std::size_t c = 0; c < shape.ffn; ++c) s += double(w2[e].w[r * shape.ffn + c]) * h[c];
          y[r] = s;
        }
        return y;
      };
      // Each matrix in its own allocation of exactly its layout's bytes (codes, then fp8's scale
      // section at its offset), as a store reading a checkpoint in place would hold it.
      std::vector<std::unique_ptr<moex::test::DeviceBuffer<std::byte>>> dev;
      auto upload = [&](const BlockMatrix& m, const moex::MatrixLayout& l) {
        std::vector<std::byte> blob(l.total_bytes);
        std::memcpy(blob.data(), m.bytes.data(), m.bytes.size());
        if (!m.scales.empty()) std::memcpy(blob.data() + l.scales_offset, m.scales.data(), m.scales.size() * 4);
        dev.push_back(std::make_unique<moex::test::DeviceBuffer<std::byte>>(blob.size()));
        REQUIRE(dev.back()->upload(blob));
        return static_cast<const std::byte*>(dev.back()->get());
      };
      std::vector<mc::ExpertTask> tasks(experts);
      std::vector<double> ref_delta(tokens * ld, 0.0), ref_q8_delta(tokens * ld, 0.0);
      for (std::size_t e = 0; e < experts; ++e) {
        tasks[e].w1 = upload(w1[e], layout.w1);
        tasks[e].w3 = upload(w3[e], layout.w3);
        tasks[e].w2 = upload(w2[e], layout.w2);
        tasks[e].n = static_cast<std::uint32_t>(e + 2);  // 2, 3, 4 tokens, wrapping
        for (std::uint32_t j = 0; j < tasks[e].n; ++j) {
          const std::size_t t = (e + j) % tokens;
          tasks[e].token[j] = static_cast<std::uint32_t>(t);
          tasks[e].weight[j] = gate[e * 8 + j];
          const auto y = expert_ref(e, x.data() + t * ld, false);
          for (std::size_t r = 0; r < shape.hidden; ++r) ref_delta[t * ld + r] += double(gate[e * 8 + j]) * y[r];
          if (!exact) {
            const auto yq = expert_ref(e, x.data() + t * ld, true);
            for (std::size_t r = 0; r < shape.hidden; ++r) ref_q8_delta[t * ld + r] += double(gate[e * 8 + j]) * yq[r];
          }
        }
      }
      const auto delta = moex::test::run_grouped_delta(layout, tasks, x, ld, out0, exact);
      if (exact) {
        CHECK(moex::test::rel_error(delta, ref_delta) < kBlockExpertTol);
      } else {
        CHECK(moex::test::rel_error(delta, ref_q8_delta) < kBlockExpertQ8Tol);
        const double bound = p == Precision::kQ4_K ? kBlockExpertQ8ExactTolQ4K : kBlockExpertQ8ExactTol;
        CHECK(moex::test::rel_error(delta, ref_delta) < bound);
        const std::vector<float> rule(ref_q8_delta.begin(), ref_q8_delta.end());
        MESSAGE(moex::to_string(p) << ": the q8 rule's (float64) error against the exact experts: "
                                   << moex::test::rel_error(rule, ref_delta));
      }
    }
  }
}
}  // TEST_SUITE("gpu"*doctest::skip(!moex::test::gpu_available()
