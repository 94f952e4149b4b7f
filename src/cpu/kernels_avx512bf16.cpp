// The CpuIsa::kAvx512Bf16 level (AVX-512 F/BW/VL + BF16 + VNNI):
//  - bf16 weights: vdpbf16ps multiplies 32 bf16 weight/activation pairs per instruction with f32
//    accumulation. Activations are rounded to bf16 (round to nearest even, vcvtne2ps2bf16) once
//    per tile of rows and reused across its R rows.
//  - int8/int4/int2 weights: activations quantized to int8 per group, vpdpbusd (vnni_kernel.hpp,
//    instantiated in kernels_avx512vnni.cpp and, with GFNI unpacking, kernels_avx512vnni_gfni.cpp).
// Only the functions below carry the target; expert_ffn.cpp calls them after checking the CPU.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#endif

#include "moex/cpu/matmul_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct Bf16Traits {
  static constexpr int R = 4;
  static constexpr int T = 4;
};

inline float hsum16(__m512 v) noexcept {
  const __m256 s8 =
      _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

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
    if (cpu_has_avx512vnni() && (cpu_has_gfni() ? matmul_rows_avx512vnni_gfni(a) : matmul_rows_avx512vnni(a))) return;
    return matmul_rows_avx512(a);
  }
  const Bf16DotTile tile{reinterpret_cast<const std::uint8_t*>(a.w), a.layout.cols, a.ldx, a.ldy};
  row_tiles<Bf16Traits>(tile, a);
}

}  // namespace detail

MOEX_NAMESPACE_END

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected

MOEX_NAMESPACE_BEGIN
namespace detail {
void matmul_rows_avx512bf16(const MatmulArgs& a) noexcept { matmul_rows_scalar(a); }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
