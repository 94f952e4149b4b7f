// AVX2 + FMA + F16C instantiation of the matmul_rows kernel (matmul_kernel.hpp). Only the
// functions below carry the AVX2 target; expert_ffn.cpp calls them after checking the CPU.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#  if defined(__clang__)
#    pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#  else
#    pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#    pragma GCC diagnostic push
#    pragma GCC diagnostic ignored "-Wuninitialized"
#    pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#    pragma GCC target("avx2,fma,f16c")
#  endif

#  include "moex/cpu/matmul_kernel.hpp"

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

}  // namespace

namespace detail {

void matmul_rows_avx2(const MatmulArgs& a) noexcept { matmul_rows_generic<Avx2>(a); }

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
void matmul_rows_avx2(const MatmulArgs& a) noexcept { matmul_rows_scalar(a); }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
