#pragma once
// Internal (moex::detail, private to src/cpu): matmul_rows on the checkpoint block formats (GGUF
// Q8_0, Q4_0, Q4_K; fp8 e4m3 with f32 128x128 block scales; layouts in quant/layout.hpp) with f32
// activations, written once over a vector traits type V and instantiated by
// src/cpu/kernels_block_<isa>.cpp under that ISA's target pragmas. Include it like
// moex/cpu/matmul_kernel.hpp: after the TU's target pragma and every other header, with V in an
// anonymous namespace.
//
// V provides what matmul_kernel.hpp's traits do that is used here (L, F, zero, set1, load, fma,
// hsum, half_to_float) plus: mul(a, b); add(a, b); fms(a, b, c) = a*b - c; s8(p): L signed bytes
// as floats; nibbles<Off>(p, lo, hi): L bytes' low and high nibbles plus Off as floats;
// fp8x256(p, lo, hi): 2L fp8 e4m3 codes (no NaN) as floats times 2^-8 (exact), the first L in lo;
// scale_bytes(p, a, b, out): out[j] = p[j] * a for j < 8, p[j] * b for 8 <= j < 16. T: tokens per
// tile at most; R: rows per tile at 4 tokens or more (1 or 2). kNibbleTables: V::L == 16 and
// V has iota() (0..15) and nibbles_lookup(p, tlo, thi, lo, hi): lo[j] = tlo[p[j] & 15], hi[j] =
// thi[p[j] >> 4].
//
// Each row is cut into units of 32 (Q4_K: 64) columns, each decoded to f32 vectors once and dotted
// with up to V::T tokens. Units with one scale (Q8_0, Q4_0, fp8: kRawUnits) are decoded unscaled:
// at 1-2 tokens each unit's dot product is scaled once, else each vector is scaled before use.
// Every row sees the same operations whatever the row range, so results do not depend on how
// callers split rows across threads.
//
// Decoding is exact to f32 rounding: Q8_0, Q4_0 and fp8 weights are those of quant/ggml.hpp's
// decoders, the scale applied to the vector or to the unit's dot product; Q4_K weights are
// d*sc*q - dmin*m with one rounding (fma) where the decoder rounds twice. fp8 NaN codes
// (S.1111.111) decode as +-480 times the scale (checkpoints have none).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/cpu/matmul_kernel.hpp"  // MOEX_KERNEL_UNROLL
#include "moex/quant/layout.hpp"

// The decoders must inline into the token loop (decoded vectors stay in registers); GCC's
// heuristics otherwise keep the larger ones out of line.
#if defined(__GNUC__)
#define MOEX_BLOCK_INLINE [[gnu::always_inline]] inline
#else
#define MOEX_BLOCK_INLINE inline
#endif

MOEX_NAMESPACE_BEGIN

namespace detail {

// Helpers are templates on V (declared in an anonymous namespace) so each ISA's copy keeps
// internal linkage, like everything in this header.
template <class V>
inline std::uint16_t block_u16(const std::uint8_t* p) noexcept {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

/// GGUF Q8_0 rows: 34-byte blocks {f16 d; int8 q[32]}, weight d * q.
template <class V>
struct BlockQ8_0 {
  static constexpr std::size_t kUnit = 32;
  static constexpr bool kRawUnits = true;  // unit_raw, no unit
  static constexpr float kOutScale = 1.f;
  const std::uint8_t* row;
  /// The codes as floats, unscaled; returns d.
  MOEX_BLOCK_INLINE float unit_raw(std::size_t u, typename V::F* w) const noexcept {
    const std::uint8_t* b = row + u * 34;
    MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < kUnit / V::L; ++i) w[i] = V::s8(b + 2 + i * V::L);
    return V::half_to_float(block_u16<V>(b));
  }
};

/// GGUF Q4_0 rows: 18-byte blocks {f16 d; u8 q[16]}, weight j from q[j]'s low nibble, j + 16 from
/// its high nibble, (nibble - 8) * d.
template <class V>
struct BlockQ4_0 {
  static constexpr std::size_t kUnit = 32;
  static constexpr bool kRawUnits = true;  // unit_raw, no unit
  static constexpr float kOutScale = 1.f;
  const std::uint8_t* row;
  /// The nibbles minus 8 as floats; returns d.
  MOEX_BLOCK_INLINE float unit_raw(std::size_t u, typename V::F* w) const noexcept {
    const std::uint8_t* b = row + u * 18;
    MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < 16 / V::L; ++i)
        V::template nibbles<-8>(b + 2 + i * V::L, w[i], w[16 / V::L + i]);
    return V::half_to_float(block_u16<V>(b));
  }
};

/// Q4_K's eight 6-bit scales sc[0..7] then eight minima m[0..7] from the 12 packed bytes s (ggml's
/// get_scale_min_k4, four bytes at a time): bytes 0-3 hold sc[0..3] and the top bits of sc[4..7],
/// bytes 4-7 m[0..3] and the top bits of m[4..7], bytes 8-11 the low 4 bits of sc[4..7] and m[4..7].
template <class V>
MOEX_BLOCK_INLINE void q4k_scales_mins(const std::uint8_t* s, std::uint8_t* out) noexcept {
  std::uint32_t a, b, c;
  std::memcpy(&a, s, 4);
  std::memcpy(&b, s + 4, 4);
  std::memcpy(&c, s + 8, 4);
  const std::uint32_t v[4] = {a & 0x3F3F3F3Fu, (c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u), b & 0x3F3F3F3Fu,
                              ((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u)};
  std::memcpy(out, v, 16);  // little-endian x86-64: byte i of v[k] is entry 4k + i
}

/// GGUF Q4_K rows: 144-byte blocks {f16 d; f16 dmin; u8 scales[12]; u8 q[128]} of 256 weights.
/// Unit u is 64 weights (32 bytes of q): sub-block 2k from the low nibbles, 2k + 1 from the high
/// ones, weight d*sc*nibble - dmin*m. Units are visited in order (block_row), so a block's d*sc and
/// dmin*m are computed once, at its first unit, 16 lanes at a time (V::scale_bytes).
template <class V>
struct BlockQ4_K {
  static constexpr std::size_t kUnit = 64;
  static constexpr bool kRawUnits = false;  // unit
  static constexpr float kOutScale = 1.f;
  const std::uint8_t* row;
  alignas(64) mutable float sm_[16] = {};  // d*sc[0..7], dmin*m[0..7] of the current block

  MOEX_BLOCK_INLINE void unit(std::size_t u, typename V::F* w) const noexcept {
    const std::uint8_t* b = row + (u / 4) * 144;
    const std::size_t k = u % 4;
    if (k == 0) {
      alignas(16) std::uint8_t sm[16];
      q4k_scales_mins<V>(b + 4, sm);
      V::scale_bytes(sm, V::half_to_float(block_u16<V>(b)), V::half_to_float(block_u16<V>(b + 2)), sm_);
    }
    const auto d0 = V::set1(sm_[2 * k]), o0 = V::set1(sm_[8 + 2 * k]);
    const auto d1 = V::set1(sm_[2 * k + 1]), o1 = V::set1(sm_[8 + 2 * k + 1]);
    const std::uint8_t* q = b + 16 + 32 * k;
    if constexpr (V::kNibbleTables) {  // the 16 weights each sub-block's nibbles map to
      const auto t0 = V::fms(V::iota(), d0, o0), t1 = V::fms(V::iota(), d1, o1);
      MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < 32 / V::L; ++i)
          V::nibbles_lookup(q + i * V::L, t0, t1, w[i], w[32 / V::L + i]);
    } else {
      MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < 32 / V::L; ++i) {
        typename V::F lo, hi;
        V::template nibbles<0>(q + i * V::L, lo, hi);
        w[i] = V::fms(lo, d0, o0);
        w[32 / V::L + i] = V::fms(hi, d1, o1);
      }
    }
  }
};

/// fp8 e4m3 rows with the f32 128x128 block scales of layout.hpp: unit u is 32 codes sharing one
/// scale s. The kernel works on weights (code * 2^-8) * s and scales each dot product by 2^8 at
/// the end (kOutScale): exact powers of two, so the results equal those of the weights code * s.
template <class V>
struct BlockFp8 {
  static constexpr std::size_t kUnit = 32;
  static constexpr bool kRawUnits = true;  // unit_raw, no unit
  static constexpr float kOutScale = 256.f;
  const std::uint8_t* row;
  const std::uint8_t* scales;  // this row's row of f32 block scales (any alignment)
  /// The codes times 2^-8; returns s.
  MOEX_BLOCK_INLINE float unit_raw(std::size_t u, typename V::F* w) const noexcept {
    MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < kUnit / (2 * V::L); ++i)
        V::fp8x256(row + u * kUnit + 2 * i * V::L, w[2 * i], w[2 * i + 1]);
    float s;
    std::memcpy(&s, scales + (u * kUnit / kFp8ScaleBlockSize) * sizeof(float), sizeof s);
    return s;
  }
};

/// N units from u0 (columns from c = u0 * kUnit) of R rows into the accumulators of T tokens.
/// Raw (R == 1): each unit's dot with a token is summed unscaled and scaled once (one multiply per
/// unit instead of one per vector; used at T <= 2, where the decode dominates); else every vector
/// is scaled, then used by every token, each activation vector loaded once for the R rows.
template <class V, std::size_t R, std::size_t T, std::size_t A, std::size_t N, bool Raw, class Row>
MOEX_BLOCK_INLINE void block_units(const Row* rows, std::size_t u0, const float* x, std::size_t ldx,
                                   typename V::F (&acc)[R][T][A]) noexcept {
  using F = typename V::F;
  constexpr std::size_t K = Row::kUnit / V::L;  // vectors per unit
  const std::size_t c = u0 * Row::kUnit;
  F w[R][N * K];
  if constexpr (Raw) {
    static_assert(R == 1, "raw units are for one row at a time");
    float sc[N];
    MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < N; ++i) sc[i] = rows[0].unit_raw(u0 + i, w[0] + i * K);
    MOEX_KERNEL_UNROLL for (std::size_t t = 0; t < T; ++t) {
      MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < N; ++i) {
        const float* xt = x + t * ldx + c + i * K * V::L;
        F p = V::mul(w[0][i * K], V::load(xt));
        MOEX_KERNEL_UNROLL for (std::size_t k = 1; k < K; ++k) p = V::fma(w[0][i * K + k], V::load(xt + k * V::L), p);
        acc[0][t][i % A] = V::fma(p, V::set1(sc[i]), acc[0][t][i % A]);
      }
    }
  } else {
    MOEX_KERNEL_UNROLL for (std::size_t r = 0; r < R; ++r) {
      MOEX_KERNEL_UNROLL for (std::size_t i = 0; i < N; ++i) {
        if constexpr (Row::kRawUnits) {  // scale every vector
          const F sv = V::set1(rows[r].unit_raw(u0 + i, w[r] + i * K));
          MOEX_KERNEL_UNROLL for (std::size_t k = 0; k < K; ++k) w[r][i * K + k] = V::mul(w[r][i * K + k], sv);
        } else {
          rows[r].unit(u0 + i, w[r] + i * K);
        }
      }
    }
    MOEX_KERNEL_UNROLL for (std::size_t t = 0; t < T; ++t) {
      MOEX_KERNEL_UNROLL for (std::size_t k = 0; k < N * K; ++k) {
        const F xv = V::load(x + t * ldx + c + k * V::L);
        MOEX_KERNEL_UNROLL for (std::size_t r = 0; r < R; ++r) acc[r][t][k % A] = V::fma(w[r][k], xv, acc[r][t][k % A]);
      }
    }
  }
}

/// R rows, T tokens: units decoded two at a time for one row (one where a unit is 8 vectors) or
/// one at a time for two rows, each decoded vector used by every token; A accumulator chains per
/// token (4 in all at least, to cover the FMA latency at small T). Two rows take the same steps as
/// one at T >= 4 (A == 1, vectors in column order), so pairing does not change results.
template <class V, std::size_t R, int T, class Row>
inline void block_row(const Row* rows, std::size_t cols, const float* x, std::size_t ldx, float* y,
                      std::size_t ldy) noexcept {
  using F = typename V::F;
  constexpr std::size_t K = Row::kUnit / V::L;             // vectors per unit
  constexpr std::size_t P = R == 1 && 2 * K <= 8 ? 2 : 1;  // units decoded per step: <= 8 vectors
  constexpr auto kT = static_cast<std::size_t>(T);
  constexpr std::size_t A = kT >= 4 ? 1 : 4 / kT;
  static_assert(R == 1 || A == 1, "two rows only where one accumulator chain per token suffices");
  F acc[R][kT][A];
  MOEX_KERNEL_UNROLL for (std::size_t r = 0; r < R; ++r) {
    MOEX_KERNEL_UNROLL for (std::size_t t = 0; t < kT; ++t) {
      MOEX_KERNEL_UNROLL for (std::size_t j = 0; j < A; ++j) acc[r][t][j] = V::zero();
    }
  }
  constexpr bool kRaw = kT <= 2 && Row::kRawUnits;
  const std::size_t units = cols / Row::kUnit;
  std::size_t u = 0;
  for (; u + P <= units; u += P) block_units<V, R, kT, A, P, kRaw>(rows, u, x, ldx, acc);
  if (u < units) block_units<V, R, kT, A, 1, kRaw>(rows, u, x, ldx, acc);  // P == 2, odd unit count
  MOEX_KERNEL_UNROLL for (std::size_t r = 0; r < R; ++r) {
    MOEX_KERNEL_UNROLL for (std::size_t t = 0; t < kT; ++t) {
      F s = acc[r][t][0];
      MOEX_KERNEL_UNROLL for (std::size_t j = 1; j < A; ++j) s = V::add(s, acc[r][t][j]);
      if constexpr (Row::kOutScale != 1.f) {
        y[t * ldy + r] = V::hsum(s) * Row::kOutScale;
      } else {
        y[t * ldy + r] = V::hsum(s);
      }
    }
  }
}

/// Tokens [t0, n) of R rows: a tile of V::T tokens, or the remainder (1 .. V::T - 1) in one tile;
/// y points at y[0][first row]. Two rows share a tile only at 4 tokens or more.
template <class V, std::size_t R, int T, class Row>
inline void block_row_tokens(const Row* rows, std::size_t cols, const MatmulArgs& a, std::size_t t0,
                             float* y) noexcept {
  if constexpr (T > 0) {
    if (a.n - t0 >= static_cast<std::size_t>(T)) {
      const float* x = a.x + t0 * a.ldx;
      if constexpr (R > 1 && T < 4) {
        MOEX_KERNEL_UNROLL for (std::size_t r = 0; r < R; ++r)
            block_row<V, 1, T>(rows + r, cols, x, a.ldx, y + t0 * a.ldy + r, a.ldy);
      } else {
        block_row<V, R, T>(rows, cols, x, a.ldx, y + t0 * a.ldy, a.ldy);
      }
    } else {
      block_row_tokens<V, R, T - 1>(rows, cols, a, t0, y);
    }
  }
}

/// Rows in pairs (V::R == 2) and then singly, tokens in tiles of V::T.
template <class V, class MakeRow>
inline void block_rows(const MakeRow& make_row, const MatmulArgs& a) noexcept {
  std::size_t r = a.row_begin;
  if constexpr (V::R == 2) {
    for (; r + 2 <= a.row_end; r += 2) {
      const decltype(make_row(r)) rows[2] = {make_row(r), make_row(r + 1)};
      for (std::size_t t = 0; t < a.n; t += V::T) block_row_tokens<V, 2, V::T>(rows, a.layout.cols, a, t, a.y + r);
    }
  }
  for (; r < a.row_end; ++r) {
    const auto row = make_row(r);
    for (std::size_t t = 0; t < a.n; t += V::T) block_row_tokens<V, 1, V::T>(&row, a.layout.cols, a, t, a.y + r);
  }
}

/// matmul_rows for a block-format view (the caller checked it with check_matrix_view); false
/// (nothing done) for a precision without a kernel here.
template <class V>
inline bool matmul_rows_block_generic(const MatmulArgs& a) noexcept {
  const MatrixLayout& l = a.layout;
  const auto* base = reinterpret_cast<const std::uint8_t*>(a.w);
  const std::size_t cols = l.cols;
  switch (l.format.precision) {
    case Precision::kQ8_0:
      block_rows<V>([&](std::size_t r) { return BlockQ8_0<V>{base + r * (cols / 32) * 34}; }, a);
      return true;
    case Precision::kQ4_0:
      block_rows<V>([&](std::size_t r) { return BlockQ4_0<V>{base + r * (cols / 32) * 18}; }, a);
      return true;
    case Precision::kQ4_K:
      block_rows<V>([&](std::size_t r) { return BlockQ4_K<V>{base + r * (cols / 256) * 144}; }, a);
      return true;
    case Precision::kFp8E4M3: {
      constexpr std::size_t kB = kFp8ScaleBlockSize;
      const std::size_t scale_row = (cols + kB - 1) / kB * sizeof(float);
      block_rows<V>(
          [&](std::size_t r) {
            return BlockFp8<V>{base + r * cols, base + l.scales_offset + (r / kB) * scale_row};
          },
          a);
      return true;
    }
    default:
      return false;
  }
}

}  // namespace detail

MOEX_NAMESPACE_END
