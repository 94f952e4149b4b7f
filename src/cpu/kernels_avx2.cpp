// AVX2 + FMA + F16C level of matmul_rows: float weights through matmul_kernel.hpp (f32 FMA),
// int8/int4/int2 weights through q8_kernel.hpp (activations quantized to int8 per group,
// vpmaddubsw + vpmaddwd). Only the functions below carry the AVX2 target; expert_ffn.cpp calls
// them after checking the CPU.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#endif

#include "moex/cpu/matmul_kernel.hpp"
#include "moex/cpu/q8_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct Avx2 {
  using F = __m256;
  static constexpr std::size_t L = 8;
  static constexpr int R = 2;  // 2 x 4 accumulators + 2 weights + scales fit 16 ymm registers
  static constexpr int T = 4;

  static F zero() noexcept { return _mm256_setzero_ps(); }
  static F set1(float v) noexcept { return _mm256_set1_ps(v); }
  static F load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F v) noexcept {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    return _mm_cvtss_f32(s1);
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static F load_bf16(const std::uint8_t* p) noexcept {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static F load_f16(const std::uint8_t* p) noexcept {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F codes8(const std::uint8_t* p) noexcept {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F codes4(const std::uint8_t* p) noexcept {
    std::uint32_t q;
    std::memcpy(&q, p, 4);
    const __m256i sh = _mm256_set_epi32(28, 24, 20, 16, 12, 8, 4, 0);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(q)), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
  static F codes2(const std::uint8_t* p) noexcept {
    std::uint16_t q;
    std::memcpy(&q, p, 2);
    const __m256i sh = _mm256_set_epi32(14, 12, 10, 8, 6, 4, 2, 0);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(q), sh);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3)));
  }
};

inline float hsum8(__m256 v) noexcept {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// AVX2 traits of the int8-activation kernel (q8_kernel.hpp): 32 columns per vector. vpmaddubsw
// saturates int16 pair sums, so int8 weights go through the sign trick: |u-128| (<= 128) times
// q * sign(u-128), pair sums <= 2 * 128 * 127 < 2^15. That computes sum((u-128) q), the
// symmetric int8 sum directly; asymmetric int8 adds back 128 * sum(q).
struct Avx2Q8 {
  using I = __m256i;
  using F = __m256;
  static constexpr std::size_t kBlock = 32;
  static constexpr std::size_t L = 8;
  static constexpr int R1 = 2;
  static constexpr int R2 = 2;
  static constexpr int T = 2;  // 2 x 2 x (int32 + f32) accumulators: 16 ymm registers in all

  static I izero() noexcept { return _mm256_setzero_si256(); }
  static I iload(const void* p) noexcept { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void istore(void* p, I v) noexcept { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static I ineg(I v) noexcept { return _mm256_sub_epi32(_mm256_setzero_si256(), v); }
  template <std::uint32_t B, bool Asym>
  static constexpr std::uint8_t corr_off() noexcept {
    if constexpr (B == 8) return Asym ? 128 : 0;
    return Asym ? 0 : static_cast<std::uint8_t>(1u << (B - 1));
  }
  template <std::uint32_t B, bool Asym>
  static constexpr bool corr_neg() noexcept {
    return B != 8;
  }
  static I madd_u8s8(I u, I q) noexcept { return _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)); }
  static I corr_dot(I acc, std::uint8_t off, I q) noexcept {
    return _mm256_add_epi32(acc, madd_u8s8(_mm256_set1_epi8(static_cast<char>(off)), q));
  }
  template <std::uint32_t B>
  static I dot(I acc, I w, I q) noexcept {
    if constexpr (B == 8) {
      const I ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));  // u - 128
      return _mm256_add_epi32(acc, madd_u8s8(_mm256_abs_epi8(ws), _mm256_sign_epi8(q, ws)));
    } else {
      return _mm256_add_epi32(acc, madd_u8s8(w, q));
    }
  }
  template <std::uint32_t B>
  static I decode(const std::uint8_t* p) noexcept {
    if constexpr (B == 8) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else if constexpr (B == 4) {
      const __m256i c = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i v = _mm256_srlv_epi64(c, _mm256_set_epi64x(4, 4, 0, 0));
      return _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
    } else {
      std::int64_t q;
      std::memcpy(&q, p, 8);
      const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(q), _mm256_set_epi64x(6, 4, 2, 0));
      return _mm256_and_si256(v, _mm256_set1_epi8(0x03));
    }
  }
  // Natural column order -> decode order (int4: 2(p%16)+p/16; int2: 4(p%8)+p/8).
  template <std::uint32_t B>
  static void permute(std::int8_t* blk) noexcept {
    if constexpr (B == 4) {
      const __m256i sh =
          _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m256i v = _mm256_shuffle_epi8(iload(blk), sh);
      istore(blk, _mm256_permute4x64_epi64(v, 0xD8));  // qwords 0, 2, 1, 3
    } else if constexpr (B == 2) {
      const __m256i sh =
          _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
      const __m256i v = _mm256_shuffle_epi8(iload(blk), sh);
      istore(blk, _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    } else {
      (void)blk;
    }
  }
  template <std::uint32_t B>
  static constexpr unsigned g2_mask() noexcept {
    return 0;
  }  // groups never share a block
  static void quantize_l(const float* x, float inv, std::int8_t* out) noexcept {
    const __m256i i = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(inv)));
    const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(p16, p16));
  }
  static float amax(const float* x, std::size_t len) noexcept {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (std::size_t c = 0; c < len; c += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + c), abs_mask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
  static F fzero() noexcept { return _mm256_setzero_ps(); }
  static F fset1(float v) noexcept { return _mm256_set1_ps(v); }
  static F fload(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static F fmul(F a, F b) noexcept { return _mm256_mul_ps(a, b); }
  static F ffma(F a, F b, F c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static F cvt(I v) noexcept { return _mm256_cvtepi32_ps(v); }
  static float hsum(F v) noexcept { return hsum8(v); }
  static F load_h(const std::uint8_t* p, std::size_t count) noexcept {
    alignas(16) std::uint16_t h[8] = {};
    std::memcpy(h, p, 2 * count);
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
};

}  // namespace

namespace detail {

void matmul_rows_avx2(const MatmulArgs& a) noexcept {
  if (matmul_rows_q8<Avx2Q8>(a)) return;
  matmul_rows_generic<Avx2>(a);
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
void matmul_rows_avx2(const MatmulArgs& a) noexcept { matmul_rows_scalar(a); }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
