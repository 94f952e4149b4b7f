#pragma once
/// @file vnni_kernel.hpp
/// Internal (moex::detail): the AVX512-VNNI int8-activation matmul_rows kernel for group-quantized
/// weights (int8/int4/int2, symmetric and asymmetric, group 32/64/128). Included only by
/// src/cpu/kernels_avx512bf16.cpp after its target pragmas (AVX-512 F/BW/VL + VNNI + F16C); every
/// function here is inline and instantiated in that TU's anonymous-namespace callers only.
///
/// ## Method
/// Activations are quantized per weight group exactly as in q8_kernel.hpp (d_x = max|x| / 127,
/// q = round(x / d_x)), once per call, into a per-thread buffer. The weight stream is read 64
/// bytes (one cache line) per row at a time: KB = 512 / b columns ("a block"). The P = 8 / b bit
/// planes of those 64 bytes are unpacked with one shift and one AND each ((c >> k*b) & mask; no
/// shuffles), and the activations are stored permuted to match (plane k, byte p holds column
/// P*p + k). All P planes of a block feed the SAME int32 accumulator: int32 lane i of every plane
/// covers columns [4P*i, 4P*i + 4P) of the block, which lie in one group. So per row, token and
/// block there is exactly one int->float conversion and one FMA, whatever b is:
///   acc += cvt(sum_planes dpbusd(u, q)) * (d_w[lane] * d_x[lane]).
/// The per-lane scales d_w[lane] and d_x[lane] come from 16 consecutive groups' values held in
/// one register (one vcvtph2ps per row per 16 groups) through one vpermps each.
/// The offset term (-2^(b-1) * d_w * d_x * sum q for symmetric, m_w * d_x * sum q for
/// asymmetric) is one FMA per row and token per 16 groups, against a per-token vector of
/// c_g = coef * d_x[g] * sum q[g] computed at quantization time.
///
/// Batching: an R x T tile decodes each weight block once for T tokens and loads each activation
/// block once for R rows. Streaming: for every row and block the kernel prefetches (into L2) the
/// same position R rows further, i.e. the next row tile, so R independent line streams are in
/// flight whatever the row length (hardware prefetchers stop at 4 KiB pages; int4/int2 rows are
/// only 2 KiB / 1 KiB on a 4096-column matrix).
///
/// Determinism: every accumulator sees the same operations in the same order whatever R, T and
/// the row range are; column chunks depend on (cols, group, n) only. So results do not depend on
/// how rows are split across threads.

#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/layout.hpp"

#ifndef MOEX_KERNEL_UNROLL
#  define MOEX_KERNEL_UNROLL _Pragma("GCC unroll 16")
#endif

MOEX_NAMESPACE_BEGIN

namespace detail {

/// Per-token bytes the chunking allows (columns are cut so one token's buffer fits).
inline constexpr std::size_t kVnniTokenBytes = std::size_t{64} << 10;
/// Largest number of tokens quantized at once (more are run in several passes).
inline constexpr std::size_t kVnniMaxTokens = 16;

/// A 64-aligned per-thread scratch buffer that only grows (nothrow; null when allocation fails).
inline std::uint8_t* vnni_scratch(std::size_t bytes) noexcept {
  struct Scratch {
    std::uint8_t* p = nullptr;
    std::size_t size = 0;
    ~Scratch() { ::operator delete[](p, std::align_val_t{64}); }
  };
  thread_local Scratch s;
  if (s.size < bytes) {
    ::operator delete[](s.p, std::align_val_t{64});
    s.p = static_cast<std::uint8_t*>(::operator new[](bytes, std::align_val_t{64}, std::nothrow));
    s.size = s.p ? bytes : 0;
  }
  return s.p;
}

/// Geometry of one column chunk's activations, per token: q (permuted int8), d_x per group,
/// c per group.
struct VnniGeometry {
  std::size_t chunk = 0;    ///< columns per chunk (a multiple of 2048, or all columns)
  std::size_t q_bytes = 0;  ///< per token, whole blocks, 64-aligned
  std::size_t groups = 0;   ///< per token, padded to a multiple of 16
  std::size_t stride = 0;   ///< bytes per token

  static constexpr std::size_t a64(std::size_t v) noexcept { return (v + 63) & ~std::size_t{63}; }

  void set(std::size_t chunk_cols, std::size_t group, std::size_t kb) noexcept {
    chunk = chunk_cols;
    q_bytes = a64((chunk_cols + kb - 1) / kb * kb);
    groups = ((chunk_cols / group) + 15) & ~std::size_t{15};
    stride = q_bytes + 8 * groups;
  }
};

inline VnniGeometry vnni_geometry(std::size_t cols, std::size_t group, std::size_t kb) noexcept {
  VnniGeometry g;
  std::size_t chunk = (cols + 2047) & ~std::size_t{2047};
  for (;;) {
    g.set(chunk < cols ? chunk : cols, group, kb);
    if (g.stride <= kVnniTokenBytes || chunk <= 2048) return g;
    chunk -= 2048;
  }
}

template <std::uint32_t B, bool Asym>
struct VnniKernel {
  static constexpr std::size_t P = 8 / B;        // bit planes per byte
  static constexpr std::size_t KB = 64 * P;      // columns per 64-byte block
  static constexpr std::size_t RowTile1 = 8;     // rows per tile when n == 1
  static constexpr std::size_t RowTileN = 4;     // rows per tile when n > 1
  static constexpr int TokTile = 4;              // tokens per tile when n > 1

  const std::uint8_t* base;
  std::size_t cols, group, gpr, scales_offset, mins_offset, row_bytes;
  std::uint8_t* buf;  // n * geo.stride bytes, 64-aligned
  VnniGeometry geo;

  std::int8_t* qp(std::size_t t) const noexcept { return reinterpret_cast<std::int8_t*>(buf + t * geo.stride); }
  float* dxp(std::size_t t) const noexcept { return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes); }
  float* csp(std::size_t t) const noexcept {
    return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes + 4 * geo.groups);
  }

  // Natural column order -> plane order, in place, for one block of KB bytes.
  static void permute_block(std::int8_t* blk) noexcept {
    if constexpr (B == 4) {
      const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m512i ix = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
      const __m512i a = _mm512_permutexvar_epi64(ix, _mm512_shuffle_epi8(_mm512_loadu_si512(blk), sh));
      const __m512i b = _mm512_permutexvar_epi64(ix, _mm512_shuffle_epi8(_mm512_loadu_si512(blk + 64), sh));
      _mm512_storeu_si512(blk, _mm512_shuffle_i64x2(a, b, 0x44));
      _mm512_storeu_si512(blk + 64, _mm512_shuffle_i64x2(a, b, 0xEE));
    } else if constexpr (B == 2) {
      const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
      const __m512i ix = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      __m512i c[4];
      for (int k = 0; k < 4; ++k)
        c[k] = _mm512_permutexvar_epi32(ix, _mm512_shuffle_epi8(_mm512_loadu_si512(blk + 64 * k), sh));
      const __m512i t01a = _mm512_shuffle_i64x2(c[0], c[1], 0x44), t01b = _mm512_shuffle_i64x2(c[0], c[1], 0xEE);
      const __m512i t23a = _mm512_shuffle_i64x2(c[2], c[3], 0x44), t23b = _mm512_shuffle_i64x2(c[2], c[3], 0xEE);
      _mm512_storeu_si512(blk, _mm512_shuffle_i64x2(t01a, t23a, 0x88));
      _mm512_storeu_si512(blk + 64, _mm512_shuffle_i64x2(t01a, t23a, 0xDD));
      _mm512_storeu_si512(blk + 128, _mm512_shuffle_i64x2(t01b, t23b, 0x88));
      _mm512_storeu_si512(blk + 192, _mm512_shuffle_i64x2(t01b, t23b, 0xDD));
    } else {
      (void)blk;
    }
  }

  // Quantizes columns [c0, c0 + len) of x (one token) into token t's buffer.
  void quantize_token(const float* x, std::size_t t, std::size_t c0, std::size_t len) const noexcept {
    std::int8_t* q = qp(t);
    float* dx = dxp(t);
    float* cs = csp(t);
    const std::size_t ng = len / group;
    constexpr float kCoef = Asym ? 1.f : -static_cast<float>(1u << (B - 1));
    for (std::size_t g = 0; g < ng; ++g) {
      const float* xg = x + c0 + g * group;
      __m512 m = _mm512_setzero_ps();
      for (std::size_t c = 0; c < group; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xg + c)));
      const float amax = _mm512_reduce_max_ps(m);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const float d = amax / 127.f;
      __m512i s = _mm512_setzero_si512();
      for (std::size_t c = 0; c < group; c += 16) {
        const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + c), inv));
        s = _mm512_add_epi32(s, i);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * group + c), _mm512_cvtsepi32_epi8(i));
      }
      dx[g] = d;
      cs[g] = kCoef * (d * static_cast<float>(_mm512_reduce_add_epi32(s)));
    }
    std::memset(q + ng * group, 0, geo.q_bytes - ng * group);
    for (std::size_t g = ng; g < geo.groups; ++g) dx[g] = cs[g] = 0.f;
    if constexpr (B != 8) {
      for (std::size_t c = 0; c < len; c += KB) permute_block(q + c);
    }
  }

  template <int R, int T>
  void tile(std::size_t r0, std::size_t tb, float* y, std::size_t ldy, std::size_t c0, std::size_t len,
            bool first, bool prefetch) const noexcept {
    __m512 acc[R][T];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    const std::size_t g0 = c0 / group;
    const std::uint8_t* codes[R];
    const std::uint8_t* sc[R];
    const std::uint8_t* mn[R];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      const std::size_t row = r0 + static_cast<std::size_t>(r);
      codes[r] = base + row * row_bytes + c0 * B / 8;
      sc[r] = base + scales_offset + 2 * (row * gpr + g0);
      mn[r] = base + mins_offset + 2 * (row * gpr + g0);
    }
    const std::int8_t* qt[T];
    const float* dt[T];
    const float* ct[T];
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      qt[t] = qp(tb + static_cast<std::size_t>(t));
      dt[t] = dxp(tb + static_cast<std::size_t>(t));
      ct[t] = csp(tb + static_cast<std::size_t>(t));
    }
    const std::size_t ahead = static_cast<std::size_t>(R) * row_bytes;      // next row tile
    const std::size_t sahead = static_cast<std::size_t>(R) * 2 * gpr;
    const std::size_t ng = len / group;
    const std::size_t wcols = 16 * group;
    // lane i -> group offset (4P*i)/G within the block's first group (blocks never straddle a
    // window: KB <= 256 <= 16*G/2 and both are powers of two).
    alignas(64) std::int32_t lg[16];
    for (std::size_t i = 0; i < 16; ++i) lg[i] = static_cast<std::int32_t>(4 * P * i / group);
    const __m512i lane_g = _mm512_load_si512(lg);
    const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << B) - 1u));
    for (std::size_t w0 = 0, gw = 0; w0 < len; w0 += wcols, gw += 16) {
      const std::size_t cnt = ng - gw < 16 ? ng - gw : 16;
      const auto m16 = static_cast<__mmask16>((1u << cnt) - 1u);
      __m512 sv[R];
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        sv[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, sc[r] + 2 * gw));
        if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(sc[r] + 2 * gw + sahead), _MM_HINT_T1);
        const __m512 off = Asym ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, mn[r] + 2 * gw)) : sv[r];
        MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_fmadd_ps(off, _mm512_loadu_ps(ct[t] + gw), acc[r][t]);
      }
      if constexpr (Asym) {
        if (prefetch) {
          MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(mn[r] + 2 * gw + sahead), _MM_HINT_T1);
        }
      }
      const std::size_t wend = len - w0 < wcols ? len : w0 + wcols;
      for (std::size_t c = w0; c < wend; c += KB) {
        const __m512i idx = _mm512_add_epi32(lane_g, _mm512_set1_epi32(static_cast<int>((c - w0) / group)));
        __m512 dxl[T];
        MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) dxl[t] = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(dt[t] + gw));
        const bool partial = c + KB > len;
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
          const std::uint8_t* p = codes[r] + c * B / 8;
          __m512i raw;
          if (!partial) {
            raw = _mm512_loadu_si512(p);
          } else {
            const std::size_t nb = (len - c) * B / 8;
            raw = _mm512_maskz_loadu_epi8(static_cast<__mmask64>((~std::uint64_t{0}) >> (64 - nb)), p);
          }
          if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
          __m512i pl[P];
          MOEX_KERNEL_UNROLL for (std::size_t k = 0; k < P; ++k) {
            if constexpr (B == 8) {
              pl[k] = raw;
            } else {
              pl[k] = _mm512_and_si512(k == 0 ? raw : _mm512_srli_epi16(raw, static_cast<unsigned>(k * B)), mask);
            }
          }
          const __m512 dw = _mm512_permutexvar_ps(idx, sv[r]);
          MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
            const std::int8_t* qb = qt[t] + c;
            __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), pl[0], _mm512_load_si512(qb));
            MOEX_KERNEL_UNROLL for (std::size_t k = 1; k < P; ++k)
              is = _mm512_dpbusd_epi32(is, pl[k], _mm512_load_si512(qb + 64 * k));
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(dw, dxl[t]), acc[r][t]);
          }
        }
      }
    }
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        float& out = y[static_cast<std::size_t>(t) * ldy + r0 + static_cast<std::size_t>(r)];
        const float v = _mm512_reduce_add_ps(acc[r][t]);
        out = first ? v : out + v;
      }
    }
  }

  // Rows [row_begin, row_end) x tokens [t0, t0 + n) of the buffer, chunk [c0, c0 + len).
  template <int R>
  void rows_n(const MatmulArgs& a, std::size_t tb, std::size_t n, std::size_t c0, std::size_t len,
              bool first) const noexcept {
    auto run_tokens = [&](auto rtag, std::size_t r) {
      constexpr int RR = decltype(rtag)::value;
      float* y = a.y + tb * a.ldy;
      std::size_t t = 0;
      if (n == 1) {
        this->template tile<RR, 1>(r, tb, y, a.ldy, c0, len, first, true);
        return;
      }
      bool pf = true;
      for (; t + TokTile <= n; t += TokTile, pf = false)
        this->template tile<RR, TokTile>(r, tb + t, y + t * a.ldy, a.ldy, c0, len, first, pf);
      switch (n - t) {
        case 1: this->template tile<RR, 1>(r, tb + t, y + t * a.ldy, a.ldy, c0, len, first, pf); break;
        case 2: this->template tile<RR, 2>(r, tb + t, y + t * a.ldy, a.ldy, c0, len, first, pf); break;
        case 3: this->template tile<RR, 3>(r, tb + t, y + t * a.ldy, a.ldy, c0, len, first, pf); break;
        default: break;
      }
    };
    std::size_t r = a.row_begin;
    for (; r + R <= a.row_end; r += R) run_tokens(std::integral_constant<int, R>{}, r);
    for (; r < a.row_end; ++r) run_tokens(std::integral_constant<int, 1>{}, r);
  }

  void run(const MatmulArgs& a, std::size_t tokens_per_pass) const noexcept {
    for (std::size_t c0 = 0; c0 < cols; c0 += geo.chunk) {
      const std::size_t len = cols - c0 < geo.chunk ? cols - c0 : geo.chunk;
      for (std::size_t t0 = 0; t0 < a.n; t0 += tokens_per_pass) {
        const std::size_t n = a.n - t0 < tokens_per_pass ? a.n - t0 : tokens_per_pass;
        for (std::size_t t = 0; t < n; ++t) quantize_token(a.x + (t0 + t) * a.ldx, t, c0, len);
        MatmulArgs s = a;
        s.y = a.y + t0 * a.ldy;
        if (n == 1) {
          rows_n<static_cast<int>(RowTile1)>(s, 0, 1, c0, len, c0 == 0);
        } else {
          rows_n<static_cast<int>(RowTileN)>(s, 0, n, c0, len, c0 == 0);
        }
      }
    }
  }
};

template <std::uint32_t B, bool Asym>
inline void run_vnni(const MatmulArgs& a) noexcept {
  const MatrixLayout& l = a.layout;
  const std::size_t G = l.format.group_size;
  VnniKernel<B, Asym> k{reinterpret_cast<const std::uint8_t*>(a.w), l.cols, G, l.cols / G, l.scales_offset,
                        l.mins_offset, l.cols * B / 8, nullptr,
                        vnni_geometry(l.cols, G, VnniKernel<B, Asym>::KB)};
  std::uint8_t* heap = vnni_scratch(k.geo.stride * (a.n < kVnniMaxTokens ? a.n : kVnniMaxTokens));
  if (heap != nullptr) {
    k.buf = heap;
    k.run(a, kVnniMaxTokens);
  } else {  // out of memory: one token at a time from the stack (same results, more passes)
    alignas(64) std::uint8_t stack[kVnniTokenBytes];
    k.buf = stack;
    k.run(a, 1);
  }
}

/// The VNNI matmul_rows for integer weight formats (returns false for others).
inline bool matmul_rows_vnni(const MatmulArgs& a) noexcept {
  const Precision p = a.layout.format.precision;
  const bool asym = a.layout.format.scheme == QuantScheme::kAsymmetric;
  switch (p) {
    case Precision::kInt8: asym ? run_vnni<8, true>(a) : run_vnni<8, false>(a); return true;
    case Precision::kInt4: asym ? run_vnni<4, true>(a) : run_vnni<4, false>(a); return true;
    case Precision::kInt2: asym ? run_vnni<2, true>(a) : run_vnni<2, false>(a); return true;
    default: return false;
  }
}

}  // namespace detail

MOEX_NAMESPACE_END
