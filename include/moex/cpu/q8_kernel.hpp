#pragma once
/// @file q8_kernel.hpp
/// Internal (moex::detail): the int8-activation matmul_rows kernel for group-quantized weights
/// (int8/int4/int2, symmetric and asymmetric, group 32/64/128), written once over an integer
/// vector traits type Q and instantiated by src/cpu/kernels_avx2.cpp (vpmaddubsw). The AVX512-VNNI
/// level uses vnni_kernel.hpp instead (same activation quantization, 256-column blocks). Same
/// inclusion rules as matmul_kernel.hpp: include it after the TU's target pragmas, Q in an
/// anonymous namespace.
///
/// ## Method (llama.cpp's Q8 activation scheme)
/// Once per call and per column chunk, every token's activations are quantized per weight group
/// (the same G columns): d_x = max|x| / 127, q = round(x / d_x) in [-127, 127]. A weight group
/// then contributes d_w * d_x * sum((u - o) * q) (symmetric, o = 2^(b-1)) or
/// d_w * d_x * sum(u * q) + m_w * d_x * sum(q) (asymmetric), where the integer sums are exact in
/// int32 (u8 x s8 products, |sum| < 2^23, so also exact when converted to f32).
///  - The activation bytes are stored permuted within each block of Q::kBlock columns into the
///    order in which Q::decode<B> unpacks the weight codes (int4: low nibbles then high nibbles;
///    int2: the four 2-bit planes), so unpacking is shifts and masks only.
///  - Symmetric: the accumulator of each unit starts at -o * (sum of q per int32 lane),
///    precomputed per token, so the offset costs nothing per row.
///  - Asymmetric: sum_g m_w[g] * (d_x[g] * sum q[g]) is one short f32 dot per row and token.
///  - Per unit (max(G, kBlock) columns) and row/token: one int->float conversion, one multiply
///    of the scale vectors and one FMA; everything else is integer.
///
/// Accuracy: the only error beyond f32 accumulation is the activation rounding,
/// |x - d_x q| <= d_x / 2 per element, so |y - y_exact| <= sum_g (d_x[g]/2) sum_{c in g} |w_c|
/// plus f32 rounding (see tests/unit/cpu_kernels/matmul_test.cpp). Results do not depend on how
/// rows are split (the activation quantization and column chunks depend only on x, n and cols).
///
/// Q provides: kBlock (columns per integer vector), L (int32/f32 lanes = kBlock/4), R1/R2 (rows
/// per tile for n <= 2 / n > 2), T (tokens per tile, at most 4), types I and F, and
///   izero, iload, istore, iadd, ineg, dot<B>(acc, w, q), corr_dot(acc, off_u8, q), decode<B>(p),
///   permute<B>(int8 block in place), quantize_l(x, inv, out L int8), amax(x, len),
///   fzero, fset1, fload, fmul, ffma, cvt, hsum, fblend_g2<B>(lo, hi) (G < kBlock only),
///   load_h(p, count) (count <= L binary16 values as floats, zero-filled), half_to_float.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/layout.hpp"

MOEX_NAMESPACE_BEGIN

namespace detail {

/// Stack bytes of quantized activations per matmul_rows call (column chunks are cut to fit).
inline constexpr std::size_t kQ8Buffer = std::size_t{96} << 10;

/// Geometry of one column chunk's quantized activations (per token: q, dx pattern, correction,
/// per-group d_x * sum q).
template <class Q>
struct Q8Geometry {
  std::size_t unit = 0;     // max(G, kBlock)
  std::size_t chunk = 0;    // columns per chunk (multiple of 128, or all columns)
  std::size_t q_bytes = 0;  // per token
  std::size_t units = 0;    // per chunk (rounded up)
  std::size_t groups = 0;   // per chunk, padded to a multiple of 16
  std::size_t stride = 0;   // bytes per token

  static constexpr std::size_t a64(std::size_t v) noexcept { return (v + 63) & ~std::size_t{63}; }

  void set(std::size_t chunk_cols, std::size_t group) noexcept {
    unit = group > Q::kBlock ? group : Q::kBlock;
    chunk = chunk_cols;
    units = (chunk_cols + unit - 1) / unit;
    q_bytes = a64(units * unit);
    groups = ((chunk_cols / group) + 15) & ~std::size_t{15};
    stride = q_bytes + 2 * a64(units * Q::L * 4) + a64(groups * 4);
  }
};

template <class Q, std::uint32_t B, bool Asym>
struct Q8Kernel {
  using I = typename Q::I;
  using F = typename Q::F;

  const std::uint8_t* base;
  std::size_t cols, group, gpr, scales_offset, mins_offset;
  std::uint8_t* buf;  // kQ8Buffer bytes, 64-aligned
  Q8Geometry<Q> geo;

  static constexpr std::uint8_t kOff = static_cast<std::uint8_t>(1u << (B - 1));

  std::int8_t* qp(std::size_t t) const noexcept { return reinterpret_cast<std::int8_t*>(buf + t * geo.stride); }
  float* dxv(std::size_t t) const noexcept { return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes); }
  std::int32_t* corr(std::size_t t) const noexcept {
    return reinterpret_cast<std::int32_t*>(buf + t * geo.stride + geo.q_bytes +
                                           Q8Geometry<Q>::a64(geo.units * Q::L * 4));
  }
  float* cs(std::size_t t) const noexcept {
    return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes + 2 * Q8Geometry<Q>::a64(geo.units * Q::L * 4));
  }

  // Quantizes columns [c0, c0+len) of token t's x into the buffer.
  void quantize_token(const float* x, std::size_t t, std::size_t c0, std::size_t len) const noexcept {
    std::int8_t* q = qp(t);
    float* cst = cs(t);
    float dx_group[2];  // d_x of the groups of one unit (1 or 2 groups)
    const std::size_t ng = len / group;
    const std::size_t gpu = geo.unit / group;  // groups per unit (1 or 2)
    std::memset(q + ng * group, 0, geo.q_bytes - ng * group);
    for (std::size_t i = ng; i < geo.groups; ++i) cst[i] = 0.f;
    for (std::size_t u = 0; u < geo.units; ++u) {
      for (std::size_t k = 0; k < gpu; ++k) {
        const std::size_t g = u * gpu + k;
        if (g >= ng) {
          dx_group[k] = 0.f;
          continue;
        }
        const float* xg = x + c0 + g * group;
        const float amax = Q::amax(xg, group);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        const float d = amax / 127.f;
        dx_group[k] = d;
        std::int8_t* qg = q + g * group;
        for (std::size_t c = 0; c < group; c += Q::L) Q::quantize_l(xg + c, inv, qg + c);
        if constexpr (Asym) {
          std::int32_t s = 0;
          for (std::size_t c = 0; c < group; ++c) s += qg[c];
          cst[g] = d * static_cast<float>(s);
        }
      }
      // Permute each block of the unit into decode order; per-lane offset correction.
      I cacc = Q::izero();
      for (std::size_t b = 0; b < geo.unit; b += Q::kBlock) {
        std::int8_t* blk = q + u * geo.unit + b;
        Q::template permute<B>(blk);
        if constexpr (Q::template corr_off<B, Asym>() != 0)
          cacc = Q::corr_dot(cacc, Q::template corr_off<B, Asym>(), Q::iload(blk));
      }
      if constexpr (Q::template corr_off<B, Asym>() != 0) {
        Q::istore(corr(t) + u * Q::L, Q::template corr_neg<B, Asym>() ? Q::ineg(cacc) : cacc);
      }
      float* dv = dxv(t) + u * Q::L;
      if (gpu == 1) {
        for (std::size_t i = 0; i < Q::L; ++i) dv[i] = dx_group[0];
      } else {
        const unsigned m = Q::template g2_mask<B>();
        for (std::size_t i = 0; i < Q::L; ++i) dv[i] = ((m >> i) & 1u) ? dx_group[1] : dx_group[0];
      }
    }
  }

  float scale(const std::uint8_t* row_scales, std::size_t g) const noexcept {
    if (g >= gpr) return 0.f;
    std::uint16_t h;
    std::memcpy(&h, row_scales + 2 * g, 2);
    return Q::half_to_float(h);
  }

  // R rows from r0, T tokens from t0 (buffer and y already offset by t0 via tb / yt), chunk
  // columns [c0, c0 + len). first: y = result, else y += result.
  template <int R, int T>
  void tile(std::size_t r0, std::size_t tb, float* y, std::size_t ldy, std::size_t c0, std::size_t len,
            bool first) const noexcept {
    F acc[R][T];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = Q::fzero();
    }
    const std::uint8_t* codes[R];
    const std::uint8_t* sc[R];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      codes[r] = base + (r0 + static_cast<std::size_t>(r)) * cols * B / 8 + c0 * B / 8;
      sc[r] = base + scales_offset + 2 * (r0 + static_cast<std::size_t>(r)) * gpr;
    }
    const std::size_t g0 = c0 / group;
    const std::size_t gpu = geo.unit / group;
    const std::size_t units = (len + geo.unit - 1) / geo.unit;
    const std::int8_t* qt[T];
    const float* dt[T];
    const std::int32_t* ct[T];
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      qt[t] = qp(tb + static_cast<std::size_t>(t));
      dt[t] = dxv(tb + static_cast<std::size_t>(t));
      ct[t] = corr(tb + static_cast<std::size_t>(t));
    }
    for (std::size_t u = 0; u < units; ++u) {
      F dw[R];
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        if constexpr (Q::kBlock > 32) {
          if (gpu == 2) {
            dw[r] =
                Q::template fblend_g2<B>(Q::fset1(scale(sc[r], g0 + 2 * u)), Q::fset1(scale(sc[r], g0 + 2 * u + 1)));
            continue;
          }
        }
        dw[r] = Q::fset1(scale(sc[r], g0 + u));
      }
      I is[R][T];
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
        I init = Q::izero();
        if constexpr (Q::template corr_off<B, Asym>() != 0) init = Q::iload(ct[t] + u * Q::L);
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) is[r][t] = init;
      }
      const std::size_t cu = u * geo.unit;
      for (std::size_t b = 0; b < geo.unit; b += Q::kBlock) {
        I w[R];
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) w[r] = Q::template decode<B>(codes[r] + (cu + b) * B / 8);
        MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
          const I qv = Q::iload(qt[t] + cu + b);
          MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) is[r][t] = Q::template dot<B>(is[r][t], w[r], qv);
        }
      }
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
        const F dx = Q::fload(dt[t] + u * Q::L);
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) acc[r][t] =
            Q::ffma(Q::cvt(is[r][t]), Q::fmul(dw[r], dx), acc[r][t]);
      }
    }
    if constexpr (Asym) {  // + sum_g m[g] * d_x[g] * sum q[g]
      const std::size_t ng = len / group;
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        const std::uint8_t* mn = base + mins_offset + 2 * ((r0 + static_cast<std::size_t>(r)) * gpr + g0);
        for (std::size_t g = 0; g < ng; g += Q::L) {
          const std::size_t cnt = ng - g < Q::L ? ng - g : Q::L;
          const F m = Q::load_h(mn + 2 * g, cnt);
          MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] =
              Q::ffma(m, Q::fload(cs(tb + static_cast<std::size_t>(t)) + g), acc[r][t]);
        }
      }
    }
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        float& out = y[static_cast<std::size_t>(t) * ldy + r0 + static_cast<std::size_t>(r)];
        const float v = Q::hsum(acc[r][t]);
        out = first ? v : out + v;
      }
    }
  }

  template <int R>
  void token_blocks(std::size_t r0, const MatmulArgs& a, std::size_t c0, std::size_t len, bool first) const noexcept {
    std::size_t t = 0;
    for (; t + Q::T <= a.n; t += Q::T) tile<R, Q::T>(r0, t, a.y + t * a.ldy, a.ldy, c0, len, first);
    switch (a.n - t) {
      case 1:
        tile<R, 1>(r0, t, a.y + t * a.ldy, a.ldy, c0, len, first);
        break;
      case 2:
        if constexpr (Q::T > 2) tile<R, 2>(r0, t, a.y + t * a.ldy, a.ldy, c0, len, first);
        break;
      case 3:
        if constexpr (Q::T > 3) tile<R, 3>(r0, t, a.y + t * a.ldy, a.ldy, c0, len, first);
        break;
      default:
        break;
    }
  }

  template <int R>
  void rows(const MatmulArgs& a, std::size_t c0, std::size_t len, bool first) const noexcept {
    std::size_t r = a.row_begin;
    for (; r + R <= a.row_end; r += R) token_blocks<R>(r, a, c0, len, first);
    for (; r < a.row_end; ++r) token_blocks<1>(r, a, c0, len, first);
  }

  void run(const MatmulArgs& a) noexcept {
    for (std::size_t c0 = 0; c0 < cols; c0 += geo.chunk) {
      const std::size_t len = cols - c0 < geo.chunk ? cols - c0 : geo.chunk;
      for (std::size_t t = 0; t < a.n; ++t) quantize_token(a.x + t * a.ldx, t, c0, len);
      if (a.n <= 2) {
        rows<Q::R1>(a, c0, len, c0 == 0);
      } else {
        rows<Q::R2>(a, c0, len, c0 == 0);
      }
    }
  }
};

/// Picks the column chunk so that n tokens of quantized activations fit kQ8Buffer.
template <class Q>
inline Q8Geometry<Q> q8_geometry(std::size_t cols, std::size_t group, std::size_t n) noexcept {
  Q8Geometry<Q> g;
  std::size_t chunk = (cols + 127) & ~std::size_t{127};
  for (;;) {
    g.set(chunk < cols ? chunk : cols, group);
    if (g.stride * n <= kQ8Buffer || chunk <= 128) return g;
    chunk -= 128;
  }
}

template <class Q, std::uint32_t B, bool Asym>
inline void run_q8(const MatmulArgs& a, std::uint8_t* buf) noexcept {
  const MatrixLayout& l = a.layout;
  Q8Kernel<Q, B, Asym> k{reinterpret_cast<const std::uint8_t*>(a.w),
                         l.cols,
                         l.format.group_size,
                         l.cols / l.format.group_size,
                         l.scales_offset,
                         l.mins_offset,
                         buf,
                         q8_geometry<Q>(l.cols, l.format.group_size, a.n)};
  k.run(a);
}

/// Largest token count matmul_rows_q8 takes in one pass (more are split into several passes).
inline constexpr std::size_t kQ8MaxTokens = 16;

/// The int8-activation matmul_rows for integer weight formats (returns false for others).
template <class Q>
inline bool matmul_rows_q8(const MatmulArgs& a) noexcept {
  const Precision p = a.layout.format.precision;
  if (p != Precision::kInt8 && p != Precision::kInt4 && p != Precision::kInt2) return false;
  alignas(64) std::uint8_t buf[kQ8Buffer];
  const bool asym = a.layout.format.scheme == QuantScheme::kAsymmetric;
  for (std::size_t t0 = 0; t0 < a.n; t0 += kQ8MaxTokens) {
    MatmulArgs s = a;
    s.n = a.n - t0 < kQ8MaxTokens ? a.n - t0 : kQ8MaxTokens;
    s.x = a.x + t0 * a.ldx;
    s.y = a.y + t0 * a.ldy;
    switch (p) {
      case Precision::kInt8:
        asym ? run_q8<Q, 8, true>(s, buf) : run_q8<Q, 8, false>(s, buf);
        break;
      case Precision::kInt4:
        asym ? run_q8<Q, 4, true>(s, buf) : run_q8<Q, 4, false>(s, buf);
        break;
      default:
        asym ? run_q8<Q, 2, true>(s, buf) : run_q8<Q, 2, false>(s, buf);
        break;
    }
  }
  return true;
}

}  // namespace detail

MOEX_NAMESPACE_END
