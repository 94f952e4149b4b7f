// AVX-512 F/BW/VL instantiation of the matmul_rows kernel (matmul_kernel.hpp). Compiled for
// plain x86-64 like the rest of moex; only the functions below carry the AVX-512 target, and they
// run only after expert_ffn.cpp has checked the CPU (__builtin_cpu_supports).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif

#include "moex/cpu/matmul_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct Avx512 {
  using F = __m512;
  static constexpr std::size_t L = 16;
  static constexpr int R = 4;
  static constexpr int T = 4;

  static F zero() noexcept { return _mm512_setzero_ps(); }
  static F set1(float v) noexcept { return _mm512_set1_ps(v); }
  static F load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F v) noexcept {
    // Fixed tree: 16 -> 8 -> 4 -> 2 -> 1 (deterministic).
    const __m256 s8 =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    return _mm_cvtss_f32(s1);
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static F load_bf16(const std::uint8_t* p) noexcept {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static F load_f16(const std::uint8_t* p) noexcept {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F codes8(const std::uint8_t* p) noexcept {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F codes4(const std::uint8_t* p) noexcept {
    // 8 bytes = 16 nibbles; lane j takes dword j/8 shifted right by 4*(j%8).
    std::uint64_t q;
    std::memcpy(&q, p, 8);
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i v = _mm512_permutexvar_epi32(idx, _mm512_set1_epi64(static_cast<long long>(q)));
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(15)));
  }
  static F codes2(const std::uint8_t* p) noexcept {
    // 4 bytes = 16 two-bit codes; lane j takes the dword shifted right by 2j.
    std::uint32_t q;
    std::memcpy(&q, p, 4);
    const __m512i sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i v = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(q)), sh);
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(3)));
  }
};

}  // namespace

namespace detail {

void matmul_rows_avx512(const MatmulArgs& a) noexcept { matmul_rows_generic<Avx512>(a); }

}  // namespace detail

MOEX_NAMESPACE_END

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected (detected_cpu_isa() is kScalar)

MOEX_NAMESPACE_BEGIN
namespace detail {
void matmul_rows_avx512(const MatmulArgs& a) noexcept { matmul_rows_scalar(a); }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
