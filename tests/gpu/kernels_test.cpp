// The CUDA kernels against float64 references on the CPU, on fresh random data, outputs poisoned
// (NaN) before every launch.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/half.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/route/router.hpp"

#include "gpu_test_support.hpp"
#include "launchers.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Precision;
using moex::QuantScheme;
using moex::WeightFormat;
namespace mc = moex::cuda;

// Kernels and reference use the same dequantized weights; what differs is f32 accumulation order
// over <= 1408 products and the per-word scale factoring d*S + m*X: 1e-4 in norm leaves ~100x
// margin over the f32 rounding while any indexing error shows up as O(1).
constexpr double kGemvTol = 1e-4;
// SwiGLU adds __expf (a few ulp) and atomics in any order: same bound.
constexpr double kExpertTol = 1e-4;
// Router: softmax/sigmoid in f32 against f64; weights are O(0.1).
constexpr double kRouterTol = 1e-5;
// q8 GEMV against the float64 product of the same weights with the activations quantized by the
// CPU's rule: the integer dot products are exact, what is left is f32 rounding of d_w*d_x and of
// the accumulation over <= 88 slices (~1e-6): 1e-4 keeps the exact kernel's margin.
constexpr double kGemvQ8Tol = 1e-4;
// q8 GEMV against the exact product: per output |err| <= sum_g (d_x[g]/2) sum_{c in g} |w_c|
// (activation rounding) plus f32 rounding, checked elementwise with this relative slack.
constexpr double kGemvQ8BoundSlack = 1.01;
// Grouped q8 experts (int4/int2 default path) against the float64 experts fed activations quantized
// by the CPU's rule twice (x before w1/w3, the f32 SwiGLU activation h before w2): the integer sums
// are exact; what is left is f32 rounding and, rarely, an element of h whose f32 value rounds to the
// other int8 code than the float64 one (one step d_h of 1/127 of its group's max): 1e-3 norm-wise.
constexpr double kGroupedQ8Tol = 1e-3;
// ... and against the exact (unquantized-activation) experts: two activation roundings, each
// measured <= 1e-2 norm-wise for one GEMV (RESULTS-gpu.md): 3e-2, the backend tests' bound.
constexpr double kGroupedQ8ExactTol = 3e-2;
// cuBLAS bf16 x bf16 products are exact in f32; only accumulation order differs.
constexpr double kGemmTol = 1e-5;

std::vector<WeightFormat> all_formats() {
  std::vector<WeightFormat> f = {moex::float_format(Precision::kBF16), moex::float_format(Precision::kF16)};
  for (Precision p : {Precision::kInt8, Precision::kInt4, Precision::kInt2})
    for (const std::uint16_t g : {std::uint16_t{32}, std::uint16_t{64}, std::uint16_t{128}})
      for (QuantScheme s : {QuantScheme::kSymmetric, QuantScheme::kAsymmetric})
        f.push_back(moex::quant_format(p, g, s));
  return f;
}

std::vector<std::byte> encode(const std::vector<float>& w, std::size_t rows, std::size_t cols, WeightFormat f) {
  std::vector<std::byte> blob(moex::matrix_layout(rows, cols, f).total_bytes);
  REQUIRE(moex::quantize_matrix(w.data(), rows, cols, f, blob).is_ok());
  return blob;
}

/// The matrix as the kernels must read it (decoded from its bytes), in f32.
std::vector<float> decode(const std::vector<std::byte>& blob, std::size_t rows, std::size_t cols, WeightFormat f) {
  std::vector<float> w(rows * cols);
  moex::dequantize_matrix({blob.data(), moex::matrix_layout(rows, cols, f)}, w.data());
  return w;
}

/// y = W2 (silu(W1 x) * (W3 x)) in float64 (row-major f32 weights of `shape`); with q8, x and then
/// h pass through the CPU's q8 rule (groups of G) first, as on the q8 path.
std::vector<double> swiglu_expert_f64(const std::vector<float>& w1, const std::vector<float>& w3,
                                      const std::vector<float>& w2, moex::ExpertShape shape,
                                      const std::vector<double>& xt, bool q8, std::size_t G) {
  const std::vector<double> xin = q8 ? moex::test::q8_round(xt.data(), shape.hidden, G) : xt;
  std::vector<double> h(shape.ffn);
  for (std::size_t r = 0; r < shape.ffn; ++r) {
    double g = 0, u = 0;
    for (std::size_t c = 0; c < shape.hidden; ++c) {
      g += double(w1[r * shape.hidden + c]) * xin[c];
      u += double(w3[r * shape.hidden + c]) * xin[c];
    }
    h[r] = g / (1 + std::exp(-g)) * u;
  }
  if (q8) h = moex::test::q8_round(h.data(), shape.ffn, G);
  std::vector<double> y(shape.hidden);
  for (std::size_t r = 0; r < shape.hidden; ++r) {
    double s = 0;
    for (std::size_t c = 0; c < shape.ffn; ++c) s += double(w2[r * shape.ffn + c]) * h[c];
    y[r] = s;
  }
  return y;
}

std::uint64_t salt_of(WeightFormat f, std::uint64_t k) {
  return (static_cast<std::uint64_t>(f.precision) << 32) ^ (static_cast<std::uint64_t>(f.group_size) << 16) ^
         (static_cast<std::uint64_t>(f.scheme) << 8) ^ k;
}

}  // namespace

TEST_SUITE("cuda") {
TEST_CASE("the GEMV dispatch rejects combinations that are not instantiated") {
  std::vector<float> dummy(16);
  mc::GemvArgs a;
  a.w = reinterpret_cast<const std::byte*>(dummy.data());
  a.x = dummy.data();
  a.y = dummy.data();
  a.ldx = 256;
  a.ldy = 16;
  a.layout = moex::matrix_layout(16, 256, {Precision::kQ5_K, QuantScheme::kSymmetric, 0});
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kUnsupported);
  a.layout = moex::matrix_layout(16, 96, moex::quant_format(Precision::kInt2, 32));
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kUnsupported);  // 96 % 64 != 0
  a.layout = moex::matrix_layout(16, 256, moex::quant_format(Precision::kInt4, 64));
  a.n = 9;
  CHECK(mc::gemv(a, nullptr).code() == moex::StatusCode::kInvalidArgument);
  CHECK(mc::gemv_supported(moex::quant_format(Precision::kInt4, 128), 4096));
  CHECK_FALSE(mc::gemv_supported(moex::float_format(Precision::kF32), 4096));
}
}  // TEST_SUITE("cuda")

TEST_SUITE("gpu" * doctest::skip(!moex::test::gpu_available())) {
TEST_CASE("dequant_gemv matches the float64 reference in every format, batch 1..8") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Shape {
    std::size_t rows, cols;
  };
  for (const WeightFormat f : all_formats()) {
    for (const Shape sh : {Shape{37, 1408}, Shape{130, 640}}) {
      for (const std::uint32_t n : {1u, 3u, 8u}) {
        CAPTURE(moex::to_string(f.precision));
        CAPTURE(f.group_size);
        CAPTURE(static_cast<int>(f.scheme));
        CAPTURE(sh.rows);
        CAPTURE(sh.cols);
        CAPTURE(n);
        const std::size_t rows = sh.rows, cols = sh.cols, ldx = cols + 4, ldy = rows + 3;
        const auto wf = moex::test::random_normal(rows * cols, 0.05f, salt_of(f, rows + n));
        const auto blob = encode(wf, rows, cols, f);
        const auto w = decode(blob, rows, cols, f);
        const auto x = moex::test::random_normal(n * ldx, 1.f, salt_of(f, 7 + n));
        const auto ref = moex::test::reference_gemv(w, rows, cols, x, n, ldx);
        moex::test::DeviceBuffer<std::byte> dw(blob.size());
        moex::test::DeviceBuffer<float> dx(x.size()), dy(n * ldy);
        REQUIRE(dw.upload(blob));
        REQUIRE(dx.upload(x));
        REQUIRE(dy.poison());
        mc::GemvArgs a;
        a.w = dw.get();
        a.layout = moex::matrix_layout(rows, cols, f);
        a.x = dx.get();
        a.ldx = ldx;
        a.y = dy.get();
        a.ldy = ldy;
        a.n = n;
        a.exact = true;
        const moex::Status st = mc::gemv(a, nullptr);
        INFO(st.to_string());
        REQUIRE(st.is_ok());
        MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
        const auto y = dy.download(n * ldy);
        const auto got = moex::test::strided_rows(y, n, rows, ldy);
        CHECK(std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); }));
        CHECK(moex::test::rel_error(got, ref) < kGemvTol);
        // Padding between rows of y stays poisoned: nothing writes outside [rows).
        CHECK(std::isnan(y[rows]));
      }
    }
  }
}

TEST_CASE("q8 GEMV (int8 activations, dp4a; int4/int2) matches the CPU quantization rule and its error bound") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Shape {
    std::size_t rows, cols;
  };
  double worst_exact = 0;  // norm-wise error against the exact product, over every case
  for (const WeightFormat f : all_formats()) {
    if (f.precision != Precision::kInt4 && f.precision != Precision::kInt2) continue;  // the q8 path's formats
    for (const Shape sh : {Shape{37, 1408}, Shape{130, 640}, Shape{9, 4096}}) {
      for (const std::uint32_t n : {1u, 2u, 3u, 8u}) {
        CAPTURE(moex::to_string(f.precision));
        CAPTURE(f.group_size);
        CAPTURE(static_cast<int>(f.scheme));
        CAPTURE(sh.rows);
        CAPTURE(sh.cols);
        CAPTURE(n);
        const std::size_t rows = sh.rows, cols = sh.cols, ldx = cols + 4, ldy = rows + 3, G = f.group_size;
        const auto wf = moex::test::random_normal(rows * cols, 0.05f, salt_of(f, 1000 + rows + n));
        const auto blob = encode(wf, rows, cols, f);
        const auto w = decode(blob, rows, cols, f);
        const auto x = moex::test::random_normal(n * ldx, 1.f, salt_of(f, 2000 + n));
        // The CPU's rule (q8_kernel.hpp), in the same f32 arithmetic.
        std::vector<double> xq(n * cols), dxc(n * cols);
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t g = 0; g < cols / G; ++g) {
            float amax = 0.f;
            for (std::size_t c = g * G; c < (g + 1) * G; ++c) amax = std::max(amax, std::fabs(x[t * ldx + c]));
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            const float d = amax / 127.f;
            for (std::size_t c = g * G; c < (g + 1) * G; ++c) {
              const float q = std::nearbyint(x[t * ldx + c] * inv);
              xq[t * cols + c] = double(d) * q;
              dxc[t * cols + c] = d;
            }
          }
        std::vector<double> ref(n * rows), exact(n * rows), bound(n * rows);
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t r = 0; r < rows; ++r) {
            double s = 0, e = 0, b = 0;
            for (std::size_t c = 0; c < cols; ++c) {
              const double wv = w[r * cols + c];
              s += wv * xq[t * cols + c];
              e += wv * x[t * ldx + c];
              b += std::fabs(wv) * dxc[t * cols + c] / 2;
            }
            ref[t * rows + r] = s;
            exact[t * rows + r] = e;
            bound[t * rows + r] = b;
          }
        moex::test::DeviceBuffer<std::byte> dw(blob.size());
        moex::test::DeviceBuffer<float> dx(x.size()), dy(n * ldy);
        REQUIRE(dw.upload(blob));
        REQUIRE(dx.upload(x));
        REQUIRE(dy.poison());
        mc::GemvArgs a;
        a.w = dw.get();
        a.layout = moex::matrix_layout(rows, cols, f);
        a.x = dx.get();
        a.ldx = ldx;
        a.y = dy.get();
        a.ldy = ldy;
        a.n = n;
        const moex::Status st = mc::gemv(a, nullptr);
        INFO(st.to_string());
        REQUIRE(st.is_ok());
        MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
        const auto y = dy.download(n * ldy);
        const auto got = moex::test::strided_rows(y, n, rows, ldy);
        CHECK(std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); }));
        CHECK(moex::test::rel_error(got, ref) < kGemvQ8Tol);
        std::size_t over = 0;
        for (std::size_t i = 0; i < got.size(); ++i)
          if (std::fabs(got[i] - exact[i]) > kGemvQ8BoundSlack * bound[i] + 1e-6) ++over;
        CHECK(over == 0);
        worst_exact = std::max(worst_exact, moex::test::rel_error(got, exact));
        CHECK(std::isnan(y[rows]));
        // accumulate adds onto y
        if (n == 1) {
          a.accumulate = true;
          REQUIRE(mc::gemv(a, nullptr).is_ok());
          MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
          const auto y2 = dy.download(ldy);
          std::vector<float> g2(rows);
          std::vector<double> r2(rows);
          for (std::size_t r = 0; r < rows; ++r) {
            g2[r] = y2[r];
            r2[r] = 2 * ref[r];
          }
          CHECK(moex::test::rel_error(g2, r2) < kGemvQ8Tol);
        }
      }
    }
  }
  MESSAGE("q8 GEMV: worst norm-wise error against the exact product over all cases: " << worst_exact);
}

TEST_CASE("grouped SwiGLU experts scatter-add their weighted outputs like the float64 reference") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const moex::ExpertShape shape{640, 1408};
  const std::size_t tokens = 6, experts = 5, ld = shape.hidden + 4;
  double worst_q8_exact = 0;
  for (const WeightFormat f : all_formats()) {
    const bool has_q8 = f.precision == Precision::kInt4 || f.precision == Precision::kInt2;
    for (const bool exact : {true, false}) {
      if (!exact && !has_q8) continue;
      CAPTURE(moex::to_string(f.precision));
      CAPTURE(f.group_size);
      CAPTURE(static_cast<int>(f.scheme));
      CAPTURE(exact);
      const std::size_t G = f.group_size;
      const moex::ExpertLayout l = moex::expert_layout(shape, f);
      std::vector<std::vector<std::byte>> blobs(experts);
      std::vector<std::vector<float>> w1(experts), w3(experts), w2(experts);
      for (std::size_t e = 0; e < experts; ++e) {
        const auto a = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, salt_of(f, 100 + e + 10 * exact));
        const auto b = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, salt_of(f, 200 + e + 10 * exact));
        const auto c = moex::test::random_normal(shape.hidden * shape.ffn, 0.05f, salt_of(f, 300 + e + 10 * exact));
        blobs[e].resize(l.total_bytes);
        REQUIRE(moex::pack_expert(a.data(), b.data(), c.data(), shape, f, blobs[e]).is_ok());
        const moex::ExpertView v = moex::ExpertView::contiguous(blobs[e].data(), l);
        w1[e].resize(a.size());
        w3[e].resize(b.size());
        w2[e].resize(c.size());
        moex::dequantize_matrix(v.w1(), w1[e].data());
        moex::dequantize_matrix(v.w3(), w3[e].data());
        moex::dequantize_matrix(v.w2(), w2[e].data());
      }
      const auto x = moex::test::random_normal(tokens * ld, 1.f, salt_of(f, 400 + exact));
      const auto out0 = moex::test::random_normal(tokens * ld, 1.f, salt_of(f, 401 + exact));
      const auto gate = moex::test::random_normal(experts * 8, 0.5f, salt_of(f, 402 + exact));
      // Expert e serves tokens e, e+1, ... (wrapping), e+1 of them (capped at 6): counts 1..5.
      std::vector<mc::ExpertTask> tasks(experts);
      std::vector<double> ref(out0.begin(), out0.end()), ref_q8(out0.begin(), out0.end());
      moex::test::DeviceBuffer<std::byte> dw(experts * l.total_bytes);
      auto expert_ref = [&](std::size_t e, const std::vector<double>& xt, bool q8) {
        return swiglu_expert_f64(w1[e], w3[e], w2[e], shape, xt, q8, G);
      };
      for (std::size_t e = 0; e < experts; ++e) {
        MOEX_CUDA_REQUIRE(
            cudaMemcpy(dw.get() + e * l.total_bytes, blobs[e].data(), l.total_bytes, cudaMemcpyHostToDevice));
        const moex::ExpertView v = moex::ExpertView::contiguous(dw.get() + e * l.total_bytes, l);
        tasks[e].w1 = v.w1_data;
        tasks[e].w3 = v.w3_data;
        tasks[e].w2 = v.w2_data;
        tasks[e].n = static_cast<std::uint32_t>(std::min<std::size_t>(e + 1, tokens));
        for (std::uint32_t j = 0; j < tasks[e].n; ++j) {
          const std::size_t t = (e + j) % tokens;
          tasks[e].token[j] = static_cast<std::uint32_t>(t);
          tasks[e].weight[j] = gate[e * 8 + j];
          const std::vector<double> xt(x.begin() + static_cast<std::ptrdiff_t>(t * ld),
                                       x.begin() + static_cast<std::ptrdiff_t>(t * ld + shape.hidden));
          const auto y = expert_ref(e, xt, false);
          for (std::size_t r = 0; r < shape.hidden; ++r) ref[t * ld + r] += double(gate[e * 8 + j]) * y[r];
          if (!exact) {
            const auto yq = expert_ref(e, xt, true);
            for (std::size_t r = 0; r < shape.hidden; ++r) ref_q8[t * ld + r] += double(gate[e * 8 + j]) * yq[r];
          }
        }
      }
      // Compare the delta (out - out0) so the check is not diluted by the initial contents.
      const auto delta = moex::test::run_grouped_delta(l, tasks, x, ld, out0, exact);
      std::vector<double> ref_delta(delta.size()), ref_q8_delta(delta.size());
      for (std::size_t i = 0; i < delta.size(); ++i) {
        ref_delta[i] = ref[i] - out0[i];
        ref_q8_delta[i] = ref_q8[i] - out0[i];
      }
      if (exact) {
        CHECK(moex::test::rel_error(delta, ref_delta) < kExpertTol);
      } else {
        CHECK(moex::test::rel_error(delta, ref_q8_delta) < kGroupedQ8Tol);
        const double err = moex::test::rel_error(delta, ref_delta);
        CHECK(err < kGroupedQ8ExactTol);
        worst_q8_exact = std::max(worst_q8_exact, err);
      }
    }
  }
  MESSAGE("grouped q8 experts: worst norm-wise error against the exact experts: " << worst_q8_exact);
}

TEST_CASE("grouped q8 variants (two or one units per lane in flight) match the float64 reference") {
  // 32 one-token tasks on one expert (a small grid each: warps stream several row groups); ffn
  // 4224 gives every down row 2-5 rounds of 32U units, the last one partial.
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const moex::ExpertShape shape{1024, 4224};
  const std::size_t tokens = 8, ld = shape.hidden;
  const std::uint32_t count = mc::kMaxGroupExperts;
  const WeightFormat formats[] = {moex::quant_format(Precision::kInt4, 32),
                                  moex::quant_format(Precision::kInt4, 64),
                                  moex::quant_format(Precision::kInt4, 128, QuantScheme::kAsymmetric),
                                  moex::quant_format(Precision::kInt2, 32),
                                  moex::quant_format(Precision::kInt2, 64, QuantScheme::kAsymmetric),
                                  moex::quant_format(Precision::kInt2, 128)};
  for (const WeightFormat f : formats) {
    CAPTURE(moex::to_string(f.precision));
    CAPTURE(f.group_size);
    CAPTURE(static_cast<int>(f.scheme));
    const moex::ExpertLayout l = moex::expert_layout(shape, f);
    const auto a = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, salt_of(f, 500));
    const auto b = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, salt_of(f, 501));
    const auto c = moex::test::random_normal(shape.hidden * shape.ffn, 0.05f, salt_of(f, 502));
    std::vector<std::byte> blob(l.total_bytes);
    REQUIRE(moex::pack_expert(a.data(), b.data(), c.data(), shape, f, blob).is_ok());
    const moex::ExpertView hv = moex::ExpertView::contiguous(blob.data(), l);
    std::vector<float> w1(a.size()), w3(b.size()), w2(c.size());
    moex::dequantize_matrix(hv.w1(), w1.data());
    moex::dequantize_matrix(hv.w3(), w3.data());
    moex::dequantize_matrix(hv.w2(), w2.data());
    moex::test::DeviceBuffer<std::byte> dw(l.total_bytes);
    MOEX_CUDA_REQUIRE(cudaMemcpy(dw.get(), blob.data(), l.total_bytes, cudaMemcpyHostToDevice));
    const moex::ExpertView v = moex::ExpertView::contiguous(dw.get(), l);
    const auto x = moex::test::random_normal(tokens * ld, 1.f, salt_of(f, 503));
    const auto out0 = moex::test::random_normal(tokens * ld, 1.f, salt_of(f, 504));
    const auto gate = moex::test::random_normal(count, 0.5f, salt_of(f, 505));
    // Task e: the one expert on token e % 8 with gate weight gate[e].
    std::vector<mc::ExpertTask> tasks(count);
    std::vector<double> ref_delta(tokens * ld, 0.0), ref_q8_delta(tokens * ld, 0.0);
    std::vector<std::vector<double>> y(tokens), yq(tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::vector<double> xt(x.begin() + static_cast<std::ptrdiff_t>(t * ld),
                                   x.begin() + static_cast<std::ptrdiff_t>(t * ld + shape.hidden));
      y[t] = swiglu_expert_f64(w1, w3, w2, shape, xt, false, f.group_size);
      yq[t] = swiglu_expert_f64(w1, w3, w2, shape, xt, true, f.group_size);
    }
    for (std::uint32_t e = 0; e < count; ++e) {
      const std::size_t t = e % tokens;
      tasks[e].w1 = v.w1_data;
      tasks[e].w3 = v.w3_data;
      tasks[e].w2 = v.w2_data;
      tasks[e].n = 1;
      tasks[e].token[0] = static_cast<std::uint32_t>(t);
      tasks[e].weight[0] = gate[e];
      for (std::size_t r = 0; r < shape.hidden; ++r) {
        ref_delta[t * ld + r] += double(gate[e]) * y[t][r];
        ref_q8_delta[t * ld + r] += double(gate[e]) * yq[t][r];
      }
    }
    for (int variant = 0; variant < 2; ++variant) {
      CAPTURE(variant);
      const auto delta = moex::test::run_grouped_delta(
          l, tasks, x, ld, out0, false,
          [&](const mc::GroupedExpertArgs& g) { return mc::grouped_expert_q8_variant(g, variant, nullptr); });
      CHECK(moex::test::rel_error(delta, ref_q8_delta) < kGroupedQ8Tol);
      CHECK(moex::test::rel_error(delta, ref_delta) < kGroupedQ8ExactTol);
    }
  }
  // Batch-1 only: a two-token task is refused, not run.
  mc::GroupedExpertArgs g;
  mc::ExpertTask two;
  two.n = 2;
  g.tasks = &two;
  g.count = 1;
  g.layout = moex::expert_layout(shape, moex::quant_format(Precision::kInt4, 32));
  CHECK(mc::grouped_expert_q8_variant(g, 0, nullptr).code() == moex::StatusCode::kUnsupported);
  // ... and so is a format without a q8 path.
  two.n = 1;
  g.layout = moex::expert_layout(shape, moex::float_format(Precision::kBF16));
  CHECK(mc::grouped_expert_q8_variant(g, 0, nullptr).code() == moex::StatusCode::kUnsupported);
}

TEST_CASE("route_topk matches the Mixtral, Qwen2-MoE and DeepSeek-V3 routers") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Variant {
    const char* name;
    std::uint32_t experts, k;
    mc::RouterScore score;
    bool bias, renorm;
    float scaling;
  };
  const Variant variants[] = {{"mixtral", 8, 2, mc::RouterScore::kSoftmax, false, true, 1.f},
                              {"qwen2-moe", 60, 4, mc::RouterScore::kSoftmax, false, false, 1.f},
                              {"deepseek-v3", 256, 8, mc::RouterScore::kSigmoid, true, true, 2.5f}};
  const std::uint32_t tokens = 37;
  for (const Variant& v : variants) {
    CAPTURE(v.name);
    const std::size_t ld = v.experts + 1;
    const auto logits = moex::test::random_normal(tokens * ld, 2.f, v.experts);
    const auto bias = moex::test::random_normal(v.experts, 0.1f, v.experts + 1);
    moex::test::DeviceBuffer<float> dl(logits.size()), db(bias.size()), dw(tokens * v.k);
    moex::test::DeviceBuffer<std::int32_t> di(tokens * v.k);
    REQUIRE(dl.upload(logits));
    REQUIRE(db.upload(bias));
    REQUIRE(dw.poison());
    REQUIRE(di.poison());
    mc::RouterArgs a;
    a.logits = dl.get();
    a.ld = ld;
    a.tokens = tokens;
    a.experts = v.experts;
    a.k = v.k;
    a.score = v.score;
    a.bias = v.bias ? db.get() : nullptr;
    a.renormalize = v.renorm;
    a.scaling = v.scaling;
    a.idx = di.get();
    a.weight = dw.get();
    REQUIRE(mc::route_topk(a, nullptr).is_ok());
    MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
    const auto idx = di.download(tokens * v.k);
    const auto wt = dw.download(tokens * v.k);
    for (std::uint32_t t = 0; t < tokens; ++t) {
      CAPTURE(t);
      std::vector<double> score(v.experts), sel(v.experts);
      double mx = -1e300, sum = 0;
      for (std::uint32_t e = 0; e < v.experts; ++e) mx = std::max(mx, double(logits[t * ld + e]));
      for (std::uint32_t e = 0; e < v.experts; ++e) sum += std::exp(double(logits[t * ld + e]) - mx);
      for (std::uint32_t e = 0; e < v.experts; ++e) {
        const double l = logits[t * ld + e];
        score[e] = v.score == mc::RouterScore::kSoftmax ? std::exp(l - mx) / sum : 1 / (1 + std::exp(-l));
        sel[e] = score[e] + (v.bias ? double(bias[e]) : 0.0);
      }
      std::vector<std::uint32_t> order(v.experts);
      std::iota(order.begin(), order.end(), 0u);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::uint32_t a1, std::uint32_t b1) { return sel[a1] > sel[b1]; });
      double total = 0;
      for (std::uint32_t j = 0; j < v.k; ++j) total += score[order[j]];
      for (std::uint32_t j = 0; j < v.k; ++j) {
        CHECK(idx[t * v.k + j] == static_cast<std::int32_t>(order[j]));
        const double want = score[order[j]] * (v.renorm ? v.scaling / total : v.scaling);
        CHECK(std::fabs(wt[t * v.k + j] - want) <= kRouterTol * std::max(1.0, std::fabs(want)));
      }
    }
  }
}

TEST_CASE("route_topk's group-limited selection agrees with the CPU router (DeepSeek-V3 and softmax kinds)") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Variant {
    const char* name;
    std::uint32_t experts, k, n_group, topk_group;
    moex::RouterKind kind;
  };
  const Variant variants[] = {{"deepseek-v3", 256, 8, 8, 4, moex::RouterKind::kSigmoidBiasScaled},
                              {"sigmoid 64e/16g", 64, 6, 16, 3, moex::RouterKind::kSigmoidBiasScaled},
                              {"softmax renorm 160e/8g", 160, 6, 8, 3, moex::RouterKind::kSoftmaxTopKRenorm},
                              {"softmax 64e/32g", 64, 4, 32, 2, moex::RouterKind::kSoftmaxTopK},
                              {"sigmoid 1 per group", 32, 4, 32, 5, moex::RouterKind::kSigmoidBiasScaled}};
  const std::uint32_t tokens = 41;
  for (const Variant& v : variants) {
    CAPTURE(v.name);
    moex::RouterConfig cfg;
    cfg.kind = v.kind;
    cfg.n_experts = v.experts;
    cfg.top_k = v.k;
    cfg.n_group = v.n_group;
    cfg.topk_group = v.topk_group;
    const bool sigmoid = v.kind == moex::RouterKind::kSigmoidBiasScaled;
    cfg.routed_scaling = sigmoid ? 2.5f : 1.f;
    REQUIRE(moex::validate(cfg).is_ok());
    const std::size_t ld = v.experts + 3;
    const auto logits = moex::test::random_normal(tokens * ld, 2.f, 900 + v.experts + v.n_group);
    const auto bias = moex::test::random_normal(v.experts, 0.1f, 901 + v.experts);
    moex::test::DeviceBuffer<float> dl(logits.size()), db(bias.size()), dw(tokens * v.k);
    moex::test::DeviceBuffer<std::int32_t> di(tokens * v.k);
    REQUIRE(dl.upload(logits));
    REQUIRE(db.upload(bias));
    REQUIRE(dw.poison());
    REQUIRE(di.poison());
    mc::RouterArgs a;
    a.logits = dl.get();
    a.ld = ld;
    a.tokens = tokens;
    a.experts = v.experts;
    a.k = v.k;
    a.score = sigmoid ? mc::RouterScore::kSigmoid : mc::RouterScore::kSoftmax;
    a.bias = sigmoid ? db.get() : nullptr;
    a.renormalize = v.kind != moex::RouterKind::kSoftmaxTopK;
    a.scaling = cfg.routed_scaling;
    a.n_group = v.n_group;
    a.topk_group = v.topk_group;
    a.idx = di.get();
    a.weight = dw.get();
    const moex::Status st = mc::route_topk(a, nullptr);
    INFO(st.to_string());
    REQUIRE(st.is_ok());
    MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
    const auto idx = di.download(tokens * v.k);
    const auto wt = dw.download(tokens * v.k);
    for (std::uint32_t t = 0; t < tokens; ++t) {
      CAPTURE(t);
      moex::TokenRouting ref;
      const std::span<const float> lg(logits.data() + t * ld, v.experts);
      REQUIRE(
          moex::route_token(cfg, lg, sigmoid ? std::span<const float>(bias) : std::span<const float>(), ref).is_ok());
      for (std::uint32_t j = 0; j < v.k; ++j) {
        CHECK(idx[t * v.k + j] == static_cast<std::int32_t>(ref.experts[j]));
        CHECK(std::fabs(wt[t * v.k + j] - ref.weights[j]) <= kRouterTol * std::max(1.f, std::fabs(ref.weights[j])));
      }
    }
  }
  // Invalid group settings are rejected before launch.
  mc::RouterArgs bad;
  std::vector<float> dummy(8);
  std::vector<std::int32_t> idummy(8);
  bad.logits = dummy.data();
  bad.idx = idummy.data();
  bad.weight = dummy.data();
  bad.ld = 64;
  bad.tokens = 1;
  bad.experts = 64;
  bad.k = 8;
  bad.n_group = 3;  // does not divide 64
  CHECK(mc::route_topk(bad, nullptr).code() == moex::StatusCode::kInvalidArgument);
  bad.n_group = 8;
  bad.topk_group = 1;  // 8 experts per kept group: k = 8 fits
  bad.k = 9;
  CHECK(mc::route_topk(bad, nullptr).code() == moex::StatusCode::kInvalidArgument);
}

TEST_CASE("weighted_combine sums k weighted rows per token, overwriting or accumulating") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const std::uint32_t tokens = 5, k = 3, hidden = 640;
  const std::size_t ld_eo = hidden + 8, ldo = hidden + 2;
  const auto eo = moex::test::random_normal(tokens * k * ld_eo, 1.f, 501);
  const auto w = moex::test::random_normal(tokens * k, 0.5f, 502);
  const auto base = moex::test::random_normal(tokens * ldo, 1.f, 503);
  moex::test::DeviceBuffer<float> deo(eo.size()), dw(w.size()), dout(base.size());
  REQUIRE(deo.upload(eo));
  REQUIRE(dw.upload(w));
  for (const bool acc : {false, true}) {
    CAPTURE(acc);
    if (acc) {
      REQUIRE(dout.upload(base));
    } else {
      REQUIRE(dout.poison());
    }
    mc::CombineArgs a{deo.get(), ld_eo, dw.get(), tokens, k, hidden, dout.get(), ldo, acc};
    REQUIRE(mc::weighted_combine(a, nullptr).is_ok());
    MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
    const auto out = dout.download(base.size());
    std::vector<float> got;
    std::vector<double> ref;
    for (std::uint32_t t = 0; t < tokens; ++t)
      for (std::uint32_t c = 0; c < hidden; ++c) {
        double s = acc ? base[t * ldo + c] : 0.0;
        for (std::uint32_t j = 0; j < k; ++j) s += double(w[t * k + j]) * eo[(t * k + j) * ld_eo + c];
        ref.push_back(s);
        got.push_back(out[t * ldo + c]);
      }
    CHECK(moex::test::rel_error(got, ref) < kGemvTol);
  }
}

TEST_CASE("the cuBLAS bf16 path and the bf16 conversion agree with the reference") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const std::size_t rows = 300, cols = 640, n = 16;
  const auto wf = moex::test::random_normal(rows * cols, 0.05f, 601);
  const auto x = moex::test::random_normal(n * cols, 1.f, 602);
  std::vector<std::uint16_t> wb(rows * cols), xb(n * cols);
  for (std::size_t i = 0; i < wb.size(); ++i) wb[i] = moex::float_to_bf16(wf[i]);
  for (std::size_t i = 0; i < xb.size(); ++i) xb[i] = moex::float_to_bf16(x[i]);
  moex::test::DeviceBuffer<std::uint16_t> dw(wb.size()), dxb(xb.size());
  moex::test::DeviceBuffer<float> dx(x.size()), dy(n * rows);
  REQUIRE(dw.upload(wb));
  REQUIRE(dx.upload(x));
  REQUIRE(dxb.poison());
  REQUIRE(dy.poison());
  REQUIRE(mc::convert_f32_to_bf16(dx.get(), dxb.get(), xb.size(), nullptr).is_ok());
  MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
  CHECK(dxb.download(xb.size()) == xb);  // bit-exact round to nearest even
  cublasContext* handle = nullptr;
  REQUIRE(mc::cublas_create(&handle).is_ok());
  mc::GemmBf16Args a{dw.get(), rows, cols, dxb.get(), cols, dy.get(), rows, n};
  const moex::Status st = mc::gemm_bf16(handle, a, nullptr);
  INFO(st.to_string());
  REQUIRE(st.is_ok());
  MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
  mc::cublas_destroy(handle);
  const auto y = dy.download(n * rows);
  std::vector<double> ref(n * rows);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t r = 0; r < rows; ++r) {
      double s = 0;
      for (std::size_t c = 0; c < cols; ++c)
        s += double(moex::bf16_to_float(wb[r * cols + c])) * moex::bf16_to_float(xb[t * cols + c]);
      ref[t * rows + r] = s;
    }
  CHECK(moex::test::rel_error(y, ref) < kGemmTol);
}
TEST_CASE("the cuBLASLt bf16/f16 path and the f16 conversion agree with the reference (batch 2..16)") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  mc::LtContext* lt = nullptr;
  REQUIRE(mc::lt_create(&lt, 32ull << 20).is_ok());
  for (const Precision type : {Precision::kBF16, Precision::kF16}) {
    for (const std::size_t n : {std::size_t{2}, std::size_t{5}, std::size_t{16}}) {
      CAPTURE(moex::to_string(type));
      CAPTURE(n);
      const bool bf = type == Precision::kBF16;
      const std::size_t rows = 300, cols = 640, ldx = cols + 8, ldy = rows + 4;
      const auto wf = moex::test::random_normal(rows * cols, 0.05f, 611 + n + 100 * bf);
      const auto x = moex::test::random_normal(n * ldx, 1.f, 612 + n + 100 * bf);
      auto to16 = [&](float v) { return bf ? moex::float_to_bf16(v) : moex::float_to_f16(v); };
      auto from16 = [&](std::uint16_t v) { return bf ? moex::bf16_to_float(v) : moex::f16_to_float(v); };
      std::vector<std::uint16_t> wb(rows * cols), xb(n * ldx);
      for (std::size_t i = 0; i < wb.size(); ++i) wb[i] = to16(wf[i]);
      for (std::size_t i = 0; i < xb.size(); ++i) xb[i] = to16(x[i]);
      moex::test::DeviceBuffer<std::uint16_t> dw(wb.size()), dxb(xb.size());
      moex::test::DeviceBuffer<float> dx(x.size()), dy(n * ldy);
      REQUIRE(dw.upload(wb));
      REQUIRE(dx.upload(x));
      REQUIRE(dxb.poison());
      REQUIRE(dy.poison());
      REQUIRE((bf ? mc::convert_f32_to_bf16(dx.get(), dxb.get(), xb.size(), nullptr)
                  : mc::convert_f32_to_f16(dx.get(), dxb.get(), xb.size(), nullptr))
                  .is_ok());
      MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
      CHECK(dxb.download(xb.size()) == xb);  // bit-exact round to nearest even
      mc::GemmLtArgs a;
      a.type = type;
      a.w = dw.get();
      a.rows = rows;
      a.cols = cols;
      a.x = dxb.get();
      a.ldx = ldx;
      a.y = dy.get();
      a.ldy = ldy;
      a.n = n;
      for (int rep = 0; rep < 2; ++rep) {  // the second call takes the cached plan
        REQUIRE(dy.poison());
        const moex::Status st = mc::gemm_lt(lt, a, nullptr);
        INFO(st.to_string());
        REQUIRE(st.is_ok());
        MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
        const auto y = dy.download(n * ldy);
        std::vector<float> got(n * rows);
        std::vector<double> ref(n * rows);
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t r = 0; r < rows; ++r) {
            double s = 0;
            for (std::size_t c = 0; c < cols; ++c) s += double(from16(wb[r * cols + c])) * from16(xb[t * ldx + c]);
            ref[t * rows + r] = s;
            got[t * rows + r] = y[t * ldy + r];
          }
        CHECK(moex::test::rel_error(got, ref) < kGemmTol);
        CHECK(std::isnan(y[rows]));  // the stride gap stays untouched
      }
    }
  }
  mc::GemmLtArgs bad;
  bad.type = Precision::kInt4;
  CHECK(!mc::gemm_lt(lt, bad, nullptr).is_ok());
  mc::lt_destroy(lt);
}
}  // TEST_SUITE("gpu"*doctest::skip(!moex::test::gpu_available()
