#pragma once
/// @file matmul_kernel.hpp
/// Internal (moex::detail): the register-tiled matmul_rows kernel, written once over a vector
/// traits type V and instantiated by each ISA translation unit (src/cpu/kernels_<isa>.cpp) under
/// that ISA's target attributes.
///
/// Rules for including it (both keep ISA-specific code out of functions other TUs may share):
///  - include it AFTER the TU's `#pragma GCC target` / `#pragma clang attribute push`, and after
///    every other header (this file includes nothing that is not already included then);
///  - V must be declared in an anonymous namespace, so every instantiation has internal linkage
///    and cannot be merged with another ISA's copy by the linker.
///
/// V provides: `L` (lanes), `R` (rows per tile), `T` (tokens per tile), vector type `F`, and
/// static functions zero, set1, load (f32), fma, hsum, half_to_float (scalar binary16), load_bf16,
/// load_f16 (L 16-bit values), codes8/codes4/codes2 (L unsigned codes from L, L/2, L/4 bytes, as
/// floats).
///
/// Tile: R rows x T tokens of f32 accumulators stay in registers; each weight vector is decoded
/// once per tile and used T times; each activation vector is loaded once and used R times. Every
/// accumulator sees the same sequence of operations whatever R, T and the row range are, so the
/// result is independent of how rows are split across threads.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#define MOEX_KERNEL_UNROLL _Pragma("GCC unroll 16")

MOEX_NAMESPACE_BEGIN

namespace detail {

/// Float rows (f32/f16/bf16): loads L weights of row r at column c.
template <class V, Precision P>
struct FloatRows {
  const std::uint8_t* base;
  std::size_t cols;

  typename V::F load(std::size_t r, std::size_t c) const noexcept {
    const std::uint8_t* p = base + (r * cols + c) * (P == Precision::kF32 ? 4 : 2);
    if constexpr (P == Precision::kF32) {
      return V::load(reinterpret_cast<const float*>(p));
    } else if constexpr (P == Precision::kBF16) {
      return V::load_bf16(p);
    } else {
      return V::load_f16(p);
    }
  }
  float scalar(std::size_t r, std::size_t c) const noexcept {
    std::uint16_t h;
    if constexpr (P == Precision::kF32) {
      float f;
      std::memcpy(&f, base + (r * cols + c) * 4, 4);
      return f;
    } else if constexpr (P == Precision::kBF16) {
      std::memcpy(&h, base + (r * cols + c) * 2, 2);
      return bf16_to_float(h);
    } else {
      std::memcpy(&h, base + (r * cols + c) * 2, 2);
      return f16_to_float(h);
    }
  }
};

/// R x T tile over float rows [r0, r0+R), tokens [0, T) of x/y (already offset).
template <class V, int R, int T, Precision P>
inline void float_tile(const FloatRows<V, P>& w, std::size_t r0, const float* x, std::size_t ldx, float* y,
                       std::size_t ldy) noexcept {
  using F = typename V::F;
  const std::size_t cols = w.cols;
  F acc[R][T];
  MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = V::zero();
  }
  const std::size_t cv = cols - cols % V::L;
  std::size_t c = 0;
  for (; c < cv; c += V::L) {
    F wv[R];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) wv[r] = w.load(r0 + r, c);
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      const F xv = V::load(x + t * ldx + c);
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = V::fma(wv[r], xv, acc[r][t]);
    }
  }
  if (c < cols) {  // column tail: zero-padded copies, same accumulators
    alignas(64) float wb[R][V::L];
    alignas(64) float xb[V::L];
    for (int r = 0; r < R; ++r)
      for (std::size_t i = 0; i < V::L; ++i) wb[r][i] = c + i < cols ? w.scalar(r0 + r, c + i) : 0.f;
    for (int t = 0; t < T; ++t) {
      for (std::size_t i = 0; i < V::L; ++i) xb[i] = c + i < cols ? x[t * ldx + c + i] : 0.f;
      const F xv = V::load(xb);
      for (int r = 0; r < R; ++r) acc[r][t] = V::fma(V::load(wb[r]), xv, acc[r][t]);
    }
  }
  MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) y[t * ldy + r0 + r] = V::hsum(acc[r][t]);
  }
}

/// Group-quantized rows: codes, f16 scales (and mins) as layout.hpp lays them out.
struct QuantRows {
  const std::uint8_t* base;
  std::size_t cols;
  std::size_t group;
  std::size_t groups_per_row;
  std::size_t scales_offset;
  std::size_t mins_offset;
  std::uint32_t bits;
  bool asym;
};

template <class V, int R, int T, std::uint32_t B, bool Asym>
inline void quant_tile(const QuantRows& q, std::size_t r0, const float* x, std::size_t ldx, float* y,
                       std::size_t ldy) noexcept {
  using F = typename V::F;
  constexpr float kHalf = static_cast<float>(1u << (B - 1));
  F acc[R][T];
  MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = V::zero();
  }
  const std::uint8_t* codes[R];
  const std::uint8_t* scales[R];
  const std::uint8_t* mins[R];
  MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
    const std::size_t row = r0 + r;
    codes[r] = q.base + row * q.cols * B / 8;
    scales[r] = q.base + q.scales_offset + 2 * row * q.groups_per_row;
    mins[r] = q.base + q.mins_offset + 2 * row * q.groups_per_row;
  }
  for (std::size_t g = 0; g < q.groups_per_row; ++g) {
    F dv[R], ov[R];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      std::uint16_t h;
      std::memcpy(&h, scales[r] + 2 * g, 2);
      const float d = V::half_to_float(h);
      float off = -kHalf * d;  // exact: a power-of-two multiple
      if constexpr (Asym) {
        std::memcpy(&h, mins[r] + 2 * g, 2);
        off = V::half_to_float(h);
      }
      dv[r] = V::set1(d);
      ov[r] = V::set1(off);
    }
    const std::size_t c_end = (g + 1) * q.group;
    for (std::size_t c = g * q.group; c < c_end; c += V::L) {
      F wv[R];
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        const std::uint8_t* p = codes[r] + c * B / 8;
        F u;
        if constexpr (B == 8) {
          u = V::codes8(p);
        } else if constexpr (B == 4) {
          u = V::codes4(p);
        } else {
          u = V::codes2(p);
        }
        wv[r] = V::fma(u, dv[r], ov[r]);
      }
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
        const F xv = V::load(x + t * ldx + c);
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = V::fma(wv[r], xv, acc[r][t]);
      }
    }
  }
  MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) y[t * ldy + r0 + r] = V::hsum(acc[r][t]);
  }
}

/// Calls tile<R, T>(r0, x, y) for every token block of a (T = V::T, then the remainder 1..3).
template <class V, int R, class Tile>
inline void token_blocks(const Tile& tile, std::size_t r0, const MatmulArgs& a) noexcept {
  static_assert(V::T == 4, "the remainder switch below assumes 4 tokens per tile");
  std::size_t t = 0;
  for (; t + 4 <= a.n; t += 4) tile.template run<R, 4>(r0, a.x + t * a.ldx, a.y + t * a.ldy);
  switch (a.n - t) {
    case 1:
      tile.template run<R, 1>(r0, a.x + t * a.ldx, a.y + t * a.ldy);
      break;
    case 2:
      tile.template run<R, 2>(r0, a.x + t * a.ldx, a.y + t * a.ldy);
      break;
    case 3:
      tile.template run<R, 3>(r0, a.x + t * a.ldx, a.y + t * a.ldy);
      break;
    default:
      break;
  }
}

/// Rows in tiles of V::R, then single rows.
template <class V, class Tile>
inline void row_tiles(const Tile& tile, const MatmulArgs& a) noexcept {
  std::size_t r = a.row_begin;
  for (; r + V::R <= a.row_end; r += V::R) token_blocks<V, V::R>(tile, r, a);
  for (; r < a.row_end; ++r) token_blocks<V, 1>(tile, r, a);
}

template <class V, Precision P>
struct FloatTile {
  FloatRows<V, P> w;
  std::size_t ldx, ldy;
  template <int R, int T>
  void run(std::size_t r0, const float* x, float* y) const noexcept {
    float_tile<V, R, T, P>(w, r0, x, ldx, y, ldy);
  }
};

template <class V, std::uint32_t B, bool Asym>
struct QuantTile {
  QuantRows q;
  std::size_t ldx, ldy;
  template <int R, int T>
  void run(std::size_t r0, const float* x, float* y) const noexcept {
    quant_tile<V, R, T, B, Asym>(q, r0, x, ldx, y, ldy);
  }
};

template <class V, std::uint32_t B, bool Asym>
inline void run_quant(const MatmulArgs& a) noexcept {
  const MatrixLayout& l = a.layout;
  const QuantRows q{reinterpret_cast<const std::uint8_t*>(a.w),
                    l.cols,
                    l.format.group_size,
                    l.cols / l.format.group_size,
                    l.scales_offset,
                    l.mins_offset,
                    B,
                    Asym};
  row_tiles<V>(QuantTile<V, B, Asym>{q, a.ldx, a.ldy}, a);
}

/// The whole matmul_rows for one ISA's traits V (moex's own formats).
template <class V>
inline void matmul_rows_generic(const MatmulArgs& a) noexcept {
  const MatrixLayout& l = a.layout;
  const auto* base = reinterpret_cast<const std::uint8_t*>(a.w);
  const bool asym = l.format.scheme == QuantScheme::kAsymmetric;
  switch (l.format.precision) {
    case Precision::kF32:
      row_tiles<V>(FloatTile<V, Precision::kF32>{{base, l.cols}, a.ldx, a.ldy}, a);
      return;
    case Precision::kBF16:
      row_tiles<V>(FloatTile<V, Precision::kBF16>{{base, l.cols}, a.ldx, a.ldy}, a);
      return;
    case Precision::kF16:
      row_tiles<V>(FloatTile<V, Precision::kF16>{{base, l.cols}, a.ldx, a.ldy}, a);
      return;
    case Precision::kInt8:
      return asym ? run_quant<V, 8, true>(a) : run_quant<V, 8, false>(a);
    case Precision::kInt4:
      return asym ? run_quant<V, 4, true>(a) : run_quant<V, 4, false>(a);
    case Precision::kInt2:
      return asym ? run_quant<V, 2, true>(a) : run_quant<V, 2, false>(a);
    default:
      return;
  }
}

}  // namespace detail

MOEX_NAMESPACE_END
