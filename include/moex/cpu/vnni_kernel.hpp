#pragma once
/// @file vnni_kernel.hpp
/// Internal (moex::detail): the AVX512-VNNI int8-activation matmul_rows kernel for group-quantized
/// weights (int8/int4/int2, symmetric and asymmetric, group 32/64/128). Included only by
/// src/cpu/kernels_avx512vnni.cpp (Gfni = false) and src/cpu/kernels_avx512vnni_gfni.cpp
/// (Gfni = true: int4/int2 bit planes unpacked with one vgf2p8affineqb instead of shift + AND;
/// same results), after their target pragmas; everything here is in an anonymous namespace, so
/// each TU keeps its own copy compiled for its own target.
///
/// ## Method
/// Activations are quantized per weight group exactly as in q8_kernel.hpp (d_x = max|x| / 127,
/// q = round(x / d_x)), once per call, into a per-thread buffer. Weights are read in blocks of
/// KB columns: 64 for int8 (one 64-byte line), 256 for int4 (two lines) and int2 (one line).
/// Every int32 lane of a block covers CL = KB / 16 consecutive columns (4 for int8, 16 for
/// int4/int2), which always lie in one group; the block's bit planes are unpacked with an AND,
/// shift + AND or one vgf2p8affineqb each (int4: the two lines are first interleaved by dword
/// with vpermt2d so that lane i sees code bytes 8i..8i+7), and the activations are stored
/// permuted to match (permute_block). All NV = KB / 64 vpdpbusd of a block feed ONE int32
/// accumulator, so per row, token and block there is one int->float conversion and one FMA:
///   acc += cvt(sum_k dpbusd(u_k, q_k)) * (d_w[lane] * d_x[lane]),
/// i.e. one epilogue per 64 (int8) or 256 (int4/int2) weights. The per-lane scales come from
/// 16 consecutive groups' values held in one register (one vcvtph2ps per row per 16 groups,
/// a "window") through one vpermps. For n == 1 the products d_w[g] * d_x[g] are formed once per
/// window (the same products, so bit-identical to n > 1).
/// The offset term (-2^(b-1) * d_w * d_x * sum q for symmetric, m_w * d_x * sum q for
/// asymmetric) is one FMA per row and token per window, against a per-token vector of
/// c_g = coef * d_x[g] * sum q[g] computed at quantization time.
///
/// Batching: an R x T tile (8 x 1 for n == 1, 2 x 8 for n > 1) decodes each weight block once
/// for T tokens. From n ~ 4 on the kernel is bound by vpdpbusd throughput (n * cols * rows / 64
/// of them), not by the weight stream.
///
/// Streaming: for every row and block the kernel prefetches (into L2) the same position R rows
/// further, i.e. the next row tile, so R independent line streams are in flight whatever the row
/// length (hardware prefetchers stop at 4 KiB pages; int4/int2 rows are only 2 KiB / 1 KiB on a
/// 4096-column matrix).
///
/// Determinism: every accumulator sees the same operations in the same order whatever R, T and
/// the row range are; column chunks depend on (cols, group, b) only; n == 1 tiles form the same
/// per-lane scale products as n > 1 tiles (so a token's result does not depend on how many
/// tokens share its tile or pass either). So results do not depend on
/// how rows are split across threads.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <new>
#include <type_traits>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/layout.hpp"

#ifndef MOEX_KERNEL_UNROLL
#define MOEX_KERNEL_UNROLL _Pragma("GCC unroll 16")
#endif

MOEX_NAMESPACE_BEGIN

namespace detail {
namespace {

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

/// The gf2p8affineqb matrix that moves bits [s, s + w) of every byte to bits [0, w) and clears the
/// rest: output bit i is the parity of (matrix byte 7 - i) AND the input byte.
constexpr std::uint64_t gf_extract_bits(unsigned s, unsigned w) noexcept {
  std::uint64_t a = 0;
  for (unsigned i = 0; i < w; ++i) a |= std::uint64_t{1u << (s + i)} << (8 * (7 - i));
  return a;
}

template <std::uint32_t B, bool Asym, bool Gfni>
struct VnniKernel {
  static constexpr std::size_t CL = B == 8 ? 4 : 16;  // columns per int32 lane
  static constexpr std::size_t KB = 16 * CL;          // columns per block
  static constexpr std::size_t NV = KB / 64;          // activation vectors (dpbusd) per block
  static constexpr std::size_t NL = KB * B / 8 / 64;  // 64-byte code lines per block
  static constexpr std::size_t RowTile1 = 8;          // rows per tile when n == 1
  static constexpr std::size_t RowTileN = 2;          // rows per tile when n > 1 (2 x 8 measured best)
  static constexpr int TokTile = 8;                   // tokens per tile when n > 1

  const std::uint8_t* base;
  std::size_t cols, group, gpr, scales_offset, mins_offset, row_bytes;
  std::uint8_t* buf;  // n * geo.stride bytes, 64-aligned
  VnniGeometry geo;

  std::int8_t* qp(std::size_t t) const noexcept { return reinterpret_cast<std::int8_t*>(buf + t * geo.stride); }
  float* dxp(std::size_t t) const noexcept { return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes); }
  float* csp(std::size_t t) const noexcept {
    return reinterpret_cast<float*>(buf + t * geo.stride + geo.q_bytes + 4 * geo.groups);
  }

  // Natural column order -> decode order, in place, for one block of KB (256) bytes: vector k,
  // int32 lane i holds 4 of the 16 columns [16i, 16i + 16) (int4: k = 0/1 the low/high nibbles
  // of code bytes 8i..8i+3, k = 2/3 of 8i+4..8i+7, i.e. columns 16i + {0,2,4,6} / {1,3,5,7} /
  // {8,..,14} / {9,..,15}; int2: plane k of code bytes 4i..4i+3, columns 16i + {k, 4+k, 8+k, 12+k}).
  static void permute_block(std::int8_t* blk) noexcept {
    if constexpr (B != 8) {
      const __m512i sh =
          B == 4 ? _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15))
                 : _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
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

  // Loads the NL code lines of a block (masked to `bytes` valid bytes when partial) and unpacks
  // them into the NV vectors of unsigned codes matching permute_block's activation order.
  template <bool Partial>
  static void decode_block(const std::uint8_t* p, std::size_t bytes, __m512i (&pl)[NV]) noexcept {
    __m512i line[NL];
    MOEX_KERNEL_UNROLL for (std::size_t l = 0; l < NL; ++l) {
      if constexpr (!Partial) {
        line[l] = _mm512_loadu_si512(p + 64 * l);
      } else {
        const std::size_t nb = bytes > 64 * l ? (bytes - 64 * l < 64 ? bytes - 64 * l : 64) : 0;
        const auto m = static_cast<__mmask64>(nb == 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << nb) - 1u);
        line[l] = _mm512_maskz_loadu_epi8(m, p + 64 * l);
      }
    }
    if constexpr (B == 8) {
      pl[0] = line[0];
    } else if constexpr (B == 4) {
      const __m512i m4 = _mm512_set1_epi8(0x0f);
      const __m512i x = _mm512_permutex2var_epi32(
          line[0], _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), line[1]);
      const __m512i y = _mm512_permutex2var_epi32(
          line[0], _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), line[1]);
      pl[0] = _mm512_and_si512(x, m4);
      pl[2] = _mm512_and_si512(y, m4);
      if constexpr (Gfni) {
        const __m512i hi = _mm512_set1_epi64(static_cast<long long>(gf_extract_bits(4, 4)));
        pl[1] = _mm512_gf2p8affine_epi64_epi8(x, hi, 0);
        pl[3] = _mm512_gf2p8affine_epi64_epi8(y, hi, 0);
      } else {
        pl[1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
        pl[3] = _mm512_and_si512(_mm512_srli_epi16(y, 4), m4);
      }
    } else {
      const __m512i m2 = _mm512_set1_epi8(0x03);
      pl[0] = _mm512_and_si512(line[0], m2);
      if constexpr (Gfni) {
        pl[1] =
            _mm512_gf2p8affine_epi64_epi8(line[0], _mm512_set1_epi64(static_cast<long long>(gf_extract_bits(2, 2))), 0);
        pl[2] =
            _mm512_gf2p8affine_epi64_epi8(line[0], _mm512_set1_epi64(static_cast<long long>(gf_extract_bits(4, 2))), 0);
        pl[3] =
            _mm512_gf2p8affine_epi64_epi8(line[0], _mm512_set1_epi64(static_cast<long long>(gf_extract_bits(6, 2))), 0);
      } else {
        pl[1] = _mm512_and_si512(_mm512_srli_epi16(line[0], 2), m2);
        pl[2] = _mm512_and_si512(_mm512_srli_epi16(line[0], 4), m2);
        pl[3] = _mm512_and_si512(_mm512_srli_epi16(line[0], 6), m2);
      }
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
  void tile(std::size_t r0, std::size_t tb, float* y, std::size_t ldy, std::size_t c0, std::size_t len, bool first,
            bool prefetch) const noexcept {
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
    const std::size_t ahead = static_cast<std::size_t>(R) * row_bytes;  // next row tile (2 tiles: no gain)
    const std::size_t sahead = static_cast<std::size_t>(R) * 2 * gpr;
    const std::size_t ng = len / group;
    const std::size_t wcols = 16 * group;
    // lane i -> group offset (CL*i)/G from the block's first group (blocks never straddle a
    // window: KB <= 256 < 16*G and both are powers of two).
    alignas(64) std::int32_t lg[16];
    for (std::size_t i = 0; i < 16; ++i) lg[i] = static_cast<std::int32_t>(CL * i / group);
    const __m512i lane_g = _mm512_load_si512(lg);
    for (std::size_t w0 = 0, gw = 0; w0 < len; w0 += wcols, gw += 16) {
      const std::size_t cnt = ng - gw < 16 ? ng - gw : 16;
      const auto m16 = static_cast<__mmask16>((1u << cnt) - 1u);
      __m512 sv[R];
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
        sv[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, sc[r] + 2 * gw));
        if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(sc[r] + 2 * gw + sahead), _MM_HINT_T1);
        const __m512 off = Asym ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, mn[r] + 2 * gw)) : sv[r];
        MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] =
            _mm512_fmadd_ps(off, _mm512_loadu_ps(ct[t] + gw), acc[r][t]);
      }
      if constexpr (Asym) {
        if (prefetch) {
          MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r)
              _mm_prefetch(reinterpret_cast<const char*>(mn[r] + 2 * gw + sahead), _MM_HINT_T1);
        }
      }
      // n == 1: d_w[g] * d_x[g] once per window (the same products as per lane later, so the
      // result is bit-identical to the T > 1 path).
      __m512 sd[R];
      if constexpr (T == 1) {
        const __m512 dx16 = _mm512_loadu_ps(dt[0] + gw);
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) sd[r] = _mm512_mul_ps(sv[r], dx16);
      }
      const std::size_t wend = len - w0 < wcols ? len : w0 + wcols;
      for (std::size_t c = w0; c < wend; c += KB) {
        const __m512i idx = _mm512_add_epi32(lane_g, _mm512_set1_epi32(static_cast<int>((c - w0) / group)));
        const bool partial = c + KB > len;
        if constexpr (T == 1) {  // row by row: the decoded planes of one row stay in registers
          const std::int8_t* qb = qt[0] + c;
          MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
            const std::uint8_t* p = codes[r] + c * B / 8;
            __m512i pl[NV];
            if (!partial) {
              decode_block<false>(p, 0, pl);
            } else {
              decode_block<true>(p, (len - c) * B / 8, pl);
            }
            if (prefetch) {
              MOEX_KERNEL_UNROLL for (std::size_t l = 0; l < NL; ++l)
                  _mm_prefetch(reinterpret_cast<const char*>(p + 64 * l + ahead), _MM_HINT_T1);
            }
            __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), pl[0], _mm512_load_si512(qb));
            MOEX_KERNEL_UNROLL for (std::size_t k = 1; k < NV; ++k) is =
                _mm512_dpbusd_epi32(is, pl[k], _mm512_load_si512(qb + 64 * k));
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_permutexvar_ps(idx, sd[r]), acc[r][0]);
          }
          continue;
        }
        __m512i pl[R][NV];
        __m512 dw[R];
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
          const std::uint8_t* p = codes[r] + c * B / 8;
          if (!partial) {
            decode_block<false>(p, 0, pl[r]);
          } else {
            decode_block<true>(p, (len - c) * B / 8, pl[r]);
          }
          if (prefetch) {
            MOEX_KERNEL_UNROLL for (std::size_t l = 0; l < NL; ++l)
                _mm_prefetch(reinterpret_cast<const char*>(p + 64 * l + ahead), _MM_HINT_T1);
          }
          dw[r] = _mm512_permutexvar_ps(idx, sv[r]);
        }
        // Token-outer: each activation vector is loaded once and used by the R rows.
        MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
          const std::int8_t* qb = qt[t] + c;
          const __m512 dxl = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(dt[t] + gw));
          __m512i is[R];
          {
            const __m512i qv = _mm512_load_si512(qb);
            MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) is[r] =
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), pl[r][0], qv);
          }
          MOEX_KERNEL_UNROLL for (std::size_t k = 1; k < NV; ++k) {
            const __m512i qv = _mm512_load_si512(qb + 64 * k);
            MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) is[r] = _mm512_dpbusd_epi32(is[r], pl[r][k], qv);
          }
          MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) acc[r][t] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[r]), _mm512_mul_ps(dw[r], dxl), acc[r][t]);
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

  // One tile of `rem` (< TokTile) tokens.
  template <int RR, int T>
  void tail_tokens(std::size_t rem, std::size_t r, std::size_t tb, float* y, std::size_t ldy, std::size_t c0,
                   std::size_t len, bool first, bool pf) const noexcept {
    if constexpr (T >= 1) {
      if (rem == static_cast<std::size_t>(T)) {
        tile<RR, T>(r, tb, y, ldy, c0, len, first, pf);
      } else {
        tail_tokens<RR, T - 1>(rem, r, tb, y, ldy, c0, len, first, pf);
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
      if (n > t)
        this->template tail_tokens<RR, TokTile - 1>(n - t, r, tb + t, y + t * a.ldy, a.ldy, c0, len, first, pf);
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

template <std::uint32_t B, bool Asym, bool Gfni>
inline void run_vnni(const MatmulArgs& a) noexcept {
  const MatrixLayout& l = a.layout;
  const std::size_t G = l.format.group_size;
  VnniKernel<B, Asym, Gfni> k{reinterpret_cast<const std::uint8_t*>(a.w),
                              l.cols,
                              G,
                              l.cols / G,
                              l.scales_offset,
                              l.mins_offset,
                              l.cols * B / 8,
                              nullptr,
                              vnni_geometry(l.cols, G, VnniKernel<B, Asym, Gfni>::KB)};
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
template <bool Gfni>
inline bool matmul_rows_vnni(const MatmulArgs& a) noexcept {
  const Precision p = a.layout.format.precision;
  const bool asym = a.layout.format.scheme == QuantScheme::kAsymmetric;
  switch (p) {
    case Precision::kInt8:
      asym ? run_vnni<8, true, Gfni>(a) : run_vnni<8, false, Gfni>(a);
      return true;
    case Precision::kInt4:
      asym ? run_vnni<4, true, Gfni>(a) : run_vnni<4, false, Gfni>(a);
      return true;
    case Precision::kInt2:
      asym ? run_vnni<2, true, Gfni>(a) : run_vnni<2, false, Gfni>(a);
      return true;
    default:
      return false;
  }
}

}  // namespace
}  // namespace detail

MOEX_NAMESPACE_END
