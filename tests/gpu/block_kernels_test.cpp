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
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

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
// ... and against the exact experts: two activation roundings, each about 4e-3 for one GEMV.
constexpr double kBlockExpertQ8ExactTol = 3e-2;
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
    const std::vector<Shape> shapes =
        p == Precision::kQ4_K ? std::vector<Shape>{{37, 1536}, {131, 2304}, {20011, 768}}
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
    const moex::ExpertShape shape = p == Precision::kQ4_K ? moex::ExpertShape{1280, 2304} : moex::ExpertShape{1312, 2336};
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
        CHECK(moex::test::rel_error(delta, ref_delta) < kBlockExpertQ8ExactTol);
      }
    }
  }
}
}  // TEST_SUITE("gpu"*doctest::skip(!moex::test::gpu_available()
