// The CpuIsa::kAvx512Bf16 level (AVX-512 F/BW/VL + BF16 + VNNI):
//  - bf16 weights: vdpbf16ps multiplies 32 bf16 weight/activation pairs per instruction with f32
//    accumulation. Activations are rounded to bf16 (round to nearest even, vcvtne2ps2bf16) once
//    per tile of rows and reused across its R rows.
//  - int8/int4/int2 weights: activations quantized to int8 per group, vpdpbusd (q8_kernel.hpp).
// Only the functions below carry the target; expert_ffn.cpp calls them after checking the CPU.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#  if defined(__clang__)
#    pragma clang attribute push( \
        __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx2,fma,f16c"))), \
        apply_to = function)
#  else
#    pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#    pragma GCC diagnostic push
#    pragma GCC diagnostic ignored "-Wuninitialized"
#    pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#    pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx2,fma,f16c")
#  endif

#  include "moex/cpu/matmul_kernel.hpp"
#  include "moex/cpu/q8_kernel.hpp"
#  include "moex/cpu/vnni_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct Bf16Traits {
  static constexpr int R = 4;
  static constexpr int T = 4;
};

inline float hsum16(__m512 v) noexcept {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// AVX512-VNNI traits of the int8-activation kernel (q8_kernel.hpp): 64 columns per vector.
struct Vnni {
  using I = __m512i;
  using F = __m512;
  static constexpr std::size_t kBlock = 64;
  static constexpr std::size_t L = 16;
  static constexpr int R1 = 4;  // n <= 2: 4 rows x 2 tokens x (int32 + f32) = 16 accumulators
  static constexpr int R2 = 2;  // n > 2: 2 rows x 4 tokens
  static constexpr int T = 4;

  static I izero() noexcept { return _mm512_setzero_si512(); }
  static I iload(const void* p) noexcept { return _mm512_loadu_si512(p); }
  static void istore(void* p, I v) noexcept { _mm512_storeu_si512(p, v); }
  static I ineg(I v) noexcept { return _mm512_sub_epi32(_mm512_setzero_si512(), v); }
  // Symmetric formats fold -2^(b-1) * sum(q) into the accumulator's start.
  template <std::uint32_t B, bool Asym>
  static constexpr std::uint8_t corr_off() noexcept {
    return Asym ? 0 : static_cast<std::uint8_t>(1u << (B - 1));
  }
  template <std::uint32_t B, bool Asym>
  static constexpr bool corr_neg() noexcept { return true; }
  static I corr_dot(I acc, std::uint8_t off, I q) noexcept {
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(static_cast<char>(off)), q);
  }
  template <std::uint32_t B>
  static I dot(I acc, I w, I q) noexcept { return _mm512_dpbusd_epi32(acc, w, q); }
  // 64 codes in decode order: int8 as stored; int4 low nibbles of the 32 bytes, then high
  // nibbles; int2 the four 2-bit planes of the 16 bytes.
  template <std::uint32_t B>
  static I decode(const std::uint8_t* p) noexcept {
    if constexpr (B == 8) {
      return _mm512_loadu_si512(p);
    } else if constexpr (B == 4) {
      const __m512i c = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512i v = _mm512_srlv_epi64(c, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
      return _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
    } else {
      const __m512i c = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i v = _mm512_srlv_epi64(c, _mm512_set_epi64(6, 6, 4, 4, 2, 2, 0, 0));
      return _mm512_and_si512(v, _mm512_set1_epi8(0x03));
    }
  }
  // Natural column order -> decode order (position p holds column 2(p%32)+p/32 for int4,
  // 4(p%16)+p/16 for int2).
  template <std::uint32_t B>
  static void permute(std::int8_t* blk) noexcept {
    if constexpr (B == 4) {
      const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m512i v = _mm512_shuffle_epi8(_mm512_loadu_si512(blk), sh);
      _mm512_storeu_si512(blk, _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), v));
    } else if constexpr (B == 2) {
      const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
      const __m512i v = _mm512_shuffle_epi8(_mm512_loadu_si512(blk), sh);
      _mm512_storeu_si512(blk, _mm512_permutexvar_epi32(
                                   _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v));
    } else {
      (void)blk;
    }
  }
  // Group 32: int32 lanes whose 4 bytes come from columns 32..63 of the block.
  template <std::uint32_t B>
  static constexpr unsigned g2_mask() noexcept {
    return B == 8 ? 0xFF00u : B == 4 ? 0xF0F0u : 0xCCCCu;
  }
  template <std::uint32_t B>
  static F fblend_g2(F lo, F hi) noexcept {
    return _mm512_mask_blend_ps(static_cast<__mmask16>(g2_mask<B>()), lo, hi);
  }
  static void quantize_l(const float* x, float inv, std::int8_t* out) noexcept {
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(i));
  }
  static float amax(const float* x, std::size_t len) noexcept {
    __m512 m = _mm512_setzero_ps();
    for (std::size_t c = 0; c < len; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
    return _mm512_reduce_max_ps(m);
  }
  static F fzero() noexcept { return _mm512_setzero_ps(); }
  static F fset1(float v) noexcept { return _mm512_set1_ps(v); }
  static F fload(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static F fmul(F a, F b) noexcept { return _mm512_mul_ps(a, b); }
  static F ffma(F a, F b, F c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static F cvt(I v) noexcept { return _mm512_cvtepi32_ps(v); }
  static float hsum(F v) noexcept { return hsum16(v); }
  static F load_h(const std::uint8_t* p, std::size_t count) noexcept {
    const auto m = static_cast<__mmask16>((1u << count) - 1u);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
};

struct Bf16DotTile {
  const std::uint8_t* base;
  std::size_t cols;
  std::size_t ldx, ldy;

  template <int R, int T>
  void run(std::size_t r0, const float* x, float* y) const noexcept {
    __m512 acc[R][T];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) {
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    const std::uint8_t* rows[R];
    MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) rows[r] = base + (r0 + r) * cols * 2;
    const std::size_t cv = cols - cols % 32;
    std::size_t c = 0;
    for (; c < cv; c += 32) {
      __m512bh wv[R];
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(rows[r] + 2 * c);
      MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
        const float* xt = x + t * ldx + c;
        const __m512bh xb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xt + 16), _mm512_loadu_ps(xt));
        MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xb);
      }
    }
    // Column tail (< 32): exact bf16 weights times f32 activations, 16 lanes at a time.
    for (; c < cols; c += 16) {
      alignas(64) float wb[R][16];
      alignas(64) float xb[16];
      for (int r = 0; r < R; ++r) {
        for (std::size_t i = 0; i < 16; ++i) {
          std::uint16_t h = 0;
          if (c + i < cols) std::memcpy(&h, rows[r] + 2 * (c + i), 2);
          wb[r][i] = bf16_to_float(h);
        }
      }
      for (int t = 0; t < T; ++t) {
        for (std::size_t i = 0; i < 16; ++i) xb[i] = c + i < cols ? x[t * ldx + c + i] : 0.f;
        const __m512 xv = _mm512_load_ps(xb);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(_mm512_load_ps(wb[r]), xv, acc[r][t]);
      }
    }
    MOEX_KERNEL_UNROLL for (int t = 0; t < T; ++t) {
      MOEX_KERNEL_UNROLL for (int r = 0; r < R; ++r) y[t * ldy + r0 + r] = hsum16(acc[r][t]);
    }
  }
};

}  // namespace

namespace detail {

void matmul_rows_avx512bf16(const MatmulArgs& a) noexcept {
  if (a.layout.format.precision != Precision::kBF16) {
    if (cpu_has_avx512vnni() && matmul_rows_vnni(a)) return;
    return matmul_rows_avx512(a);
  }
  const Bf16DotTile tile{reinterpret_cast<const std::uint8_t*>(a.w), a.layout.cols, a.ldx, a.ldy};
  row_tiles<Bf16Traits>(tile, a);
}

}  // namespace detail

MOEX_NAMESPACE_END

#  if defined(__clang__)
#    pragma clang attribute pop
#  else
#    pragma GCC diagnostic pop
#    pragma GCC pop_options
#  endif

#else  // not x86-64: never selected

MOEX_NAMESPACE_BEGIN
namespace detail {
void matmul_rows_avx512bf16(const MatmulArgs& a) noexcept { matmul_rows_scalar(a); }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
