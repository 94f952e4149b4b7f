// matmul_rows and expert_ffn in every format and every ISA path this CPU has, against float64
// math on the DEQUANTIZED weights (so only the kernels' arithmetic error is measured).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/cpu/cpu_kernels.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/thread_pool.hpp"

#include "support/test_support.hpp"

namespace {

using moex::CpuIsa;
using moex::Precision;
using moex::QuantScheme;
using moex::WeightFormat;

// f32 accumulation: each output is a tree of <= cols/8 + 4 sequential f32 adds (SIMD) or chunked
// sequential sums (scalar); with cols <= 352 the rounding error stays well below 1e-5 of
// sum |w*x| (gamma_n ~ n * 2^-24 = 2.1e-5 only in the adversarial worst case, ~1e-6 typical).
constexpr double kF32AccumTol = 1e-5;
// bf16 weights on the avx512bf16 path: activations are rounded to bf16 (8 significant bits,
// relative error <= 2^-9 each), bounded by 2^-8 of sum |w*x| with room for the f32 sums.
constexpr double kBf16ActivationTol = 0x1p-8;
// Integer weights on the int8-activation paths (avx2: q8_kernel.hpp; avx512bf16 with VNNI:
// vnni_kernel.hpp):
// x is rounded to d_x * q with d_x = max|x_group| / 127, an error <= d_x / 2 per element, so
// |y - y_exact| <= sum_g (d_x[g] / 2) * sum_{c in g} |w_c| exactly (integer sums are exact); the
// factor leaves 1% for the f32 rounding of the d_w * d_x products, on top of kF32AccumTol * mag.
constexpr double kQ8StepBound = 1.01;
// Rows of up to 67584 columns: each output is an f32 sum of <= cols/16 + 32 sequential adds of
// 16-lane partial sums (SIMD) or of <= 1024-column chunks (scalar): gamma_(4256) = 2.5e-4 bound.
constexpr double kLongRowF32Tol = 2.6e-4;
// The same paths, norm-wise: the rounding error is ~uniform with rms d_x / sqrt(12), about 0.3%
// of a Gaussian group's rms for G = 32..128 (max ~2.5-3.2 sigma); 1e-2 gives 3x headroom.
constexpr double kQ8NormTol = 1e-2;
// expert_ffn, norm-wise relative error: two chained f32 matmuls plus f32 silu (std::exp, 1 ulp).
constexpr double kFfnF32Tol = 2e-5;
// expert_ffn with bf16 activations (x and the hidden activation each rounded to bf16, <= 2^-9
// each): compounded through silu and the second matmul, and norm-wise larger where sums of
// mixed-sign products cancel; measured up to 4.3e-3 over seeds 1-7 (MOEX_TEST_SEED): 8e-3.
constexpr double kFfnBf16Tol = 8e-3;
// expert_ffn on the int8-activation paths: x and the hidden activation each quantized per group
// (~0.3% rms each, see kQ8NormTol), compounded through silu and a second matmul; measured up to
// 2.1e-2 over seeds 1-7: 4e-2.
constexpr double kFfnQ8Tol = 4e-2;

std::vector<WeightFormat> all_formats() {
  std::vector<WeightFormat> v = {moex::float_format(Precision::kF32), moex::float_format(Precision::kF16),
                                 moex::float_format(Precision::kBF16)};
  for (Precision p : {Precision::kInt8, Precision::kInt4, Precision::kInt2})
    for (QuantScheme s : {QuantScheme::kSymmetric, QuantScheme::kAsymmetric})
      for (int g : {32, 64, 128}) v.push_back({p, s, static_cast<std::uint16_t>(g)});
  return v;
}

std::vector<CpuIsa> isas_here() {
  std::vector<CpuIsa> v;
  for (CpuIsa i : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (i <= moex::detected_cpu_isa()) v.push_back(i);
  return v;
}

// Restores the ISA the process had when the test began.
struct IsaGuard {
  CpuIsa saved = moex::active_cpu_isa();
  ~IsaGuard() { (void)moex::set_cpu_isa(saved); }
};

std::string fmt_name(const WeightFormat& f) {
  std::string s(moex::to_string(f.precision));
  if (moex::is_quantized(f.precision))
    s += (f.scheme == QuantScheme::kAsymmetric ? "_asym_g" : "_sym_g") + std::to_string(f.group_size);
  return s;
}

bool lowers_activations(CpuIsa isa, const WeightFormat& f) {
  return isa == CpuIsa::kAvx512Bf16 && f.precision == Precision::kBF16;
}

// Integer weights whose kernel quantizes activations to int8 (expert_ffn.hpp documents which).
bool int8_activations(CpuIsa isa, const WeightFormat& f) {
  if (!moex::is_quantized(f.precision)) return false;
  return isa == CpuIsa::kAvx2 || (isa == CpuIsa::kAvx512Bf16 && moex::detail::cpu_has_avx512vnni());
}

}  // namespace

TEST_SUITE("cpu") {

TEST_CASE("cpu ISA selection reports, forces and refuses levels") {
  IsaGuard guard;
  CHECK(std::string(moex::cpu_kernel_isa()) == moex::to_string(moex::active_cpu_isa()));
  for (CpuIsa isa : isas_here()) {
    REQUIRE(moex::set_cpu_isa(isa).is_ok());
    CHECK(moex::active_cpu_isa() == isa);
    CHECK(std::string(moex::cpu_kernel_isa()) == moex::to_string(isa));
    CHECK(*moex::parse_cpu_isa(moex::to_string(isa)) == isa);
  }
  if (moex::detected_cpu_isa() < CpuIsa::kAvx512Bf16)
    CHECK(moex::set_cpu_isa(CpuIsa::kAvx512Bf16).code() == moex::StatusCode::kUnsupported);
  CHECK(moex::parse_cpu_isa("sse9").status().code() == moex::StatusCode::kInvalidArgument);
  MESSAGE("detected CPU ISA: " << moex::to_string(moex::detected_cpu_isa()));
}

TEST_CASE("matmul_rows matches float64 math on the decoded weights in every format and ISA") {
  IsaGuard guard;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Shape {
    std::size_t rows, cols;
  };
  // hidden 64/96/256 and ffn 128/352 in both orientations, plus float-only column tails.
  const Shape shapes[] = {{128, 64}, {352, 96}, {96, 352}, {37, 256}, {13, 100}, {6, 7}};
  std::uint64_t salt = 100;
  for (const WeightFormat& f : all_formats()) {
    for (const Shape& sh : shapes) {
      if (!moex::format_is_valid(f, sh.cols)) continue;
      CAPTURE(fmt_name(f));
      CAPTURE(sh.rows);
      CAPTURE(sh.cols);
      const auto w = moex::test::random_normal(sh.rows * sh.cols, 0.2f, ++salt);
      const auto l = moex::matrix_layout(sh.rows, sh.cols, f);
      std::vector<std::byte> blob(l.total_bytes);
      REQUIRE(moex::quantize_matrix(w.data(), sh.rows, sh.cols, f, blob).is_ok());
      const moex::MatrixView m{blob.data(), l};
      std::vector<float> dq(sh.rows * sh.cols);
      moex::dequantize_matrix(m, dq.data());
      for (std::size_t n : {1, 2, 3, 8, 16}) {
        CAPTURE(n);
        const std::size_t ldx = sh.cols + 3, ldy = sh.rows + 5;  // strided on purpose
        const auto x = moex::test::random_normal(n * ldx, 1.f, ++salt);
        std::vector<double> ref(n * sh.rows), mag(n * sh.rows), q8b(n * sh.rows, 0.0);
        const std::size_t gs = f.group_size ? f.group_size : sh.cols;
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t r = 0; r < sh.rows; ++r) {
            double s = 0, a = 0;
            for (std::size_t c = 0; c < sh.cols; ++c) {
              const double p = static_cast<double>(dq[r * sh.cols + c]) * x[t * ldx + c];
              s += p;
              a += std::fabs(p);
            }
            ref[t * sh.rows + r] = s;
            mag[t * sh.rows + r] = a;
            if (sh.cols % gs != 0) continue;
            for (std::size_t c0 = 0; c0 < sh.cols; c0 += gs) {  // sum_g (d_x/2) sum |w|
              double amax = 0, wsum = 0;
              for (std::size_t c = c0; c < c0 + gs; ++c) {
                amax = std::max(amax, std::fabs(static_cast<double>(x[t * ldx + c])));
                wsum += std::fabs(static_cast<double>(dq[r * sh.cols + c]));
              }
              q8b[t * sh.rows + r] += amax / 127.0 / 2.0 * wsum;
            }
          }
        const std::size_t rb = sh.rows > 8 ? 3 : 0, re = sh.rows > 8 ? sh.rows - 2 : sh.rows;
        for (CpuIsa isa : isas_here()) {
          CAPTURE(moex::to_string(isa));
          REQUIRE(moex::set_cpu_isa(isa).is_ok());
          const float sentinel = -12345.f;
          std::vector<float> y(n * ldy, sentinel);
          moex::matmul_rows(m, x.data(), n, ldx, y.data(), ldy, rb, re);
          const double tol = lowers_activations(isa, f) ? kBf16ActivationTol : kF32AccumTol;
          const bool q8 = int8_activations(isa, f);
          std::size_t bad = 0;
          double err2 = 0, ref2 = 0;
          for (std::size_t t = 0; t < n; ++t)
            for (std::size_t r = 0; r < ldy; ++r) {
              const float got = y[t * ldy + r];
              if (r < rb || r >= re) {
                bad += got != sentinel;  // rows outside the range stay untouched
                continue;
              }
              const std::size_t i = t * sh.rows + r;
              const double err = std::fabs(got - ref[i]);
              err2 += err * err;
              ref2 += ref[i] * ref[i];
              const double bound = tol * mag[i] + (q8 ? kQ8StepBound * q8b[i] : 0.0);
              bad += !(err <= bound + 1e-30);
            }
          CHECK(bad == 0);
          if (q8) CHECK(std::sqrt(err2 / ref2) <= kQ8NormTol);
        }
      }
    }
  }
}

TEST_CASE("matmul_rows: long rows (many scale windows, column chunks, >16 tokens) and row splits are bit-identical") {
  // The VNNI kernel (vnni_kernel.hpp) works in windows of 16 groups, cuts rows longer than
  // ~48K-60K columns into chunks and quantizes at most 16 tokens per pass; a partial 256-column
  // block appears when cols % 256 != 0. Results must not depend on how rows are split.
  IsaGuard guard;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Shape {
    std::size_t rows, cols;
  };
  const Shape shapes[] = {{19, 2560}, {9, 2208}, {5, 67584}};
  std::uint64_t salt = 9000;
  for (const WeightFormat& f : all_formats()) {
    if (!moex::is_quantized(f.precision)) continue;
    for (const Shape& sh : shapes) {
      if (!moex::format_is_valid(f, sh.cols)) continue;
      CAPTURE(fmt_name(f));
      CAPTURE(sh.rows);
      CAPTURE(sh.cols);
      const auto w = moex::test::random_normal(sh.rows * sh.cols, 0.2f, ++salt);
      const auto l = moex::matrix_layout(sh.rows, sh.cols, f);
      std::vector<std::byte> blob(l.total_bytes);
      REQUIRE(moex::quantize_matrix(w.data(), sh.rows, sh.cols, f, blob).is_ok());
      const moex::MatrixView m{blob.data(), l};
      std::vector<float> dq(sh.rows * sh.cols);
      moex::dequantize_matrix(m, dq.data());
      for (std::size_t n : {1, 3, 17}) {
        if (sh.cols > 10000 && n == 3) continue;
        CAPTURE(n);
        const std::size_t ldx = sh.cols, ldy = sh.rows;
        const auto x = moex::test::random_normal(n * ldx, 1.f, ++salt);
        std::vector<double> ref(n * sh.rows), mag(n * sh.rows), q8b(n * sh.rows, 0.0);
        const std::size_t gs = f.group_size;
        for (std::size_t t = 0; t < n; ++t)
          for (std::size_t r = 0; r < sh.rows; ++r) {
            double s = 0, a = 0, b = 0;
            for (std::size_t c0 = 0; c0 < sh.cols; c0 += gs) {
              double amax = 0, wsum = 0;
              for (std::size_t c = c0; c < c0 + gs; ++c) {
                const double wv = dq[r * sh.cols + c], xv = x[t * ldx + c];
                s += wv * xv;
                a += std::fabs(wv * xv);
                amax = std::max(amax, std::fabs(xv));
                wsum += std::fabs(wv);
              }
              b += amax / 127.0 / 2.0 * wsum;
            }
            ref[t * sh.rows + r] = s;
            mag[t * sh.rows + r] = a;
            q8b[t * sh.rows + r] = b;
          }
        for (CpuIsa isa : isas_here()) {
          CAPTURE(moex::to_string(isa));
          REQUIRE(moex::set_cpu_isa(isa).is_ok());
          std::vector<float> y(n * ldy, -1.f), ys(n * ldy, -2.f);
          moex::matmul_rows(m, x.data(), n, ldx, y.data(), ldy, 0, sh.rows);
          const std::size_t cut = sh.rows / 2 + 1;  // odd split: not a multiple of any row tile
          moex::matmul_rows(m, x.data(), n, ldx, ys.data(), ldy, cut, sh.rows);
          moex::matmul_rows(m, x.data(), n, ldx, ys.data(), ldy, 0, cut);
          CHECK(std::memcmp(y.data(), ys.data(), y.size() * sizeof(float)) == 0);
          const bool q8 = int8_activations(isa, f);
          std::size_t bad = 0;
          for (std::size_t i = 0; i < n * sh.rows; ++i) {
            const double bound = kLongRowF32Tol * mag[i] + (q8 ? kQ8StepBound * q8b[i] : 0.0);
            bad += !(std::fabs(y[i] - ref[i]) <= bound + 1e-30);
          }
          CHECK(bad == 0);
        }
        if (moex::detail::cpu_has_avx512vnni()) {  // shift+AND vs GFNI unpacking: same bits
          std::vector<float> y1(n * ldy, -1.f), y2(n * ldy, -2.f);
          const moex::detail::MatmulArgs a1{blob.data(), l, x.data(), n, ldx, y1.data(), ldy, 0, sh.rows};
          REQUIRE(moex::detail::matmul_rows_avx512vnni(a1));
          if (moex::detail::cpu_has_gfni()) {
            const moex::detail::MatmulArgs a2{blob.data(), l, x.data(), n, ldx, y2.data(), ldy, 0, sh.rows};
            REQUIRE(moex::detail::matmul_rows_avx512vnni_gfni(a2));
            CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(float)) == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("expert_ffn matches float64 SwiGLU in every format and ISA, pool or not") {
  IsaGuard guard;
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  moex::ThreadPool pool(3);
  const moex::ExpertShape shapes[] = {{64, 128}, {96, 352}, {256, 352}};
  std::uint64_t salt = 5000;
  for (const moex::ExpertShape& s : shapes) {
    for (const WeightFormat& f : all_formats()) {
      if (!moex::expert_format_is_valid(s, f)) continue;
      CAPTURE(fmt_name(f));
      CAPTURE(s.hidden);
      CAPTURE(s.ffn);
      const std::size_t nw = std::size_t{s.hidden} * s.ffn;
      const float sd1 = 1.f / std::sqrt(static_cast<float>(s.hidden));
      const float sd2 = 1.f / std::sqrt(static_cast<float>(s.ffn));
      const auto w1 = moex::test::random_normal(nw, sd1, ++salt);
      const auto w3 = moex::test::random_normal(nw, sd1, ++salt);
      const auto w2 = moex::test::random_normal(nw, sd2, ++salt);
      const auto el = moex::expert_layout(s, f);
      std::vector<std::byte> blob(el.total_bytes);
      REQUIRE(moex::pack_expert(w1.data(), w3.data(), w2.data(), s, f, blob).is_ok());
      const auto ev = moex::ExpertView::contiguous(blob.data(), el);
      std::vector<float> d1(nw), d3(nw), d2(nw);
      moex::dequantize_matrix(ev.w1(), d1.data());
      moex::dequantize_matrix(ev.w3(), d3.data());
      moex::dequantize_matrix(ev.w2(), d2.data());
      for (std::size_t n : {1, 2, 3, 8, 16}) {
        CAPTURE(n);
        const auto x = moex::test::random_normal(n * s.hidden, 1.f, ++salt);
        std::vector<double> ref(n * s.hidden), act(s.ffn);
        for (std::size_t t = 0; t < n; ++t) {
          for (std::size_t r = 0; r < s.ffn; ++r) {
            double g = 0, u = 0;
            for (std::size_t c = 0; c < s.hidden; ++c) {
              g += static_cast<double>(d1[r * s.hidden + c]) * x[t * s.hidden + c];
              u += static_cast<double>(d3[r * s.hidden + c]) * x[t * s.hidden + c];
            }
            act[r] = g / (1 + std::exp(-g)) * u;
          }
          for (std::size_t r = 0; r < s.hidden; ++r) {
            double acc = 0;
            for (std::size_t c = 0; c < s.ffn; ++c) acc += static_cast<double>(d2[r * s.ffn + c]) * act[c];
            ref[t * s.hidden + r] = acc;
          }
        }
        std::vector<float> ws(moex::expert_ffn_workspace(s, n));
        for (CpuIsa isa : isas_here()) {
          CAPTURE(moex::to_string(isa));
          REQUIRE(moex::set_cpu_isa(isa).is_ok());
          std::vector<float> y1(n * s.hidden), yp(n * s.hidden);
          REQUIRE(moex::expert_ffn(ev, x.data(), n, y1.data(), ws, nullptr).is_ok());
          REQUIRE(moex::expert_ffn(ev, x.data(), n, yp.data(), ws, &pool).is_ok());
          CHECK(std::memcmp(y1.data(), yp.data(), y1.size() * sizeof(float)) == 0);
          const double tol = lowers_activations(isa, f) ? kFfnBf16Tol
                             : int8_activations(isa, f) ? kFfnQ8Tol
                                                        : kFfnF32Tol;
          CHECK(moex::test::rel_error(y1.data(), ref.data(), ref.size()) <= tol);
        }
      }
    }
  }
}

TEST_CASE("expert_ffn rejects bad input") {
  const moex::ExpertShape s{64, 128};
  const WeightFormat f = moex::quant_format(Precision::kInt4, 32);
  const auto el = moex::expert_layout(s, f);
  std::vector<std::byte> blob(el.total_bytes);
  const auto w = moex::test::random_normal(std::size_t{64} * 128, 0.1f, 9);
  REQUIRE(moex::pack_expert(w.data(), w.data(), w.data(), s, f, blob).is_ok());
  const auto ev = moex::ExpertView::contiguous(blob.data(), el);
  std::vector<float> x(2 * 64, 1.f), y(2 * 64), ws(moex::expert_ffn_workspace(s, 2));
  using moex::StatusCode;
  CHECK(moex::expert_ffn(ev, x.data(), 2, y.data(), ws).is_ok());
  CHECK(moex::expert_ffn(ev, x.data(), 0, y.data(), ws).is_ok());
  CHECK(moex::expert_ffn(ev, nullptr, 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
  CHECK(moex::expert_ffn(ev, x.data(), 2, nullptr, ws).code() == StatusCode::kInvalidArgument);
  CHECK(moex::expert_ffn(moex::ExpertView{}, x.data(), 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
  CHECK(moex::expert_ffn(ev, x.data(), 2, y.data(), std::span<float>(ws).first(ws.size() - 1)).code() ==
        StatusCode::kInvalidArgument);
  CHECK(moex::expert_ffn(ev, x.data(), 2, y.data(), {}).code() == StatusCode::kInvalidArgument);
  CHECK(moex::expert_ffn(ev, x.data(), std::numeric_limits<std::size_t>::max() / 4, y.data(), ws).code() ==
        StatusCode::kInvalidArgument);
  auto bad = ev;
  bad.layout.w2.cols = 64;  // w2 must be [hidden x ffn]
  CHECK(moex::expert_ffn(bad, x.data(), 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
  bad = ev;
  bad.layout.w1.format.group_size = 48;
  CHECK(moex::expert_ffn(bad, x.data(), 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
  bad = ev;
  bad.layout.w3.total_bytes -= 64;  // a layout that is not matrix_layout()'s
  CHECK(moex::expert_ffn(bad, x.data(), 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
  bad = ev;
  bad.layout.w1.format = moex::float_format(Precision::kFp8E4M3);
  CHECK(moex::expert_ffn(bad, x.data(), 2, y.data(), ws).code() == StatusCode::kUnsupported);
  bad = ev;
  bad.layout.shape = {0, 128};
  CHECK(moex::expert_ffn(bad, x.data(), 2, y.data(), ws).code() == StatusCode::kInvalidArgument);
}
}  // TEST_SUITE("cpu")
