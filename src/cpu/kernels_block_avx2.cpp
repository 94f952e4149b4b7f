// AVX2 + FMA + F16C instantiation of the block-format matmul_rows kernel (block_kernel.hpp): GGUF
// Q8_0, Q4_0, Q4_K and fp8 e4m3 weights decoded 8 lanes at a time, f32 activations and
// accumulation. Only the functions below carry the AVX2 target; expert_ffn.cpp calls them after
// checking the CPU (active_cpu_isa()).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#include "block_kernels_isa.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#endif

#include "block_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct BlockAvx2 {
  using F = __m256;
  static constexpr std::size_t L = 8;
  static constexpr int T = 4;  // 16 ymm registers: 4 accumulators, a unit pair of up to 8 vectors
  static constexpr std::size_t R = 1;
  static constexpr bool kNibbleTables = false;  // no 16-entry permute in 8 lanes

  static F zero() noexcept { return _mm256_setzero_ps(); }
  static F set1(float v) noexcept { return _mm256_set1_ps(v); }
  static F load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static F fma(F a, F b, F c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) noexcept { return _mm256_mul_ps(a, b); }
  static F fms(F a, F b, F c) noexcept { return _mm256_fmsub_ps(a, b, c); }
  static void scale_bytes(const std::uint8_t* p, float a, float b, float* out) noexcept {
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8(p))), _mm256_set1_ps(a)));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8(p + 8))), _mm256_set1_ps(b)));
  }
  static F add(F a, F b) noexcept { return _mm256_add_ps(a, b); }
  static float hsum(F v) noexcept {
    alignas(32) float e[8];
    _mm256_store_ps(e, v);
    return ((e[0] + e[4]) + (e[1] + e[5])) + ((e[2] + e[6]) + (e[3] + e[7]));
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static __m128i load8(const std::uint8_t* p) noexcept { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
  static F s8(const std::uint8_t* p) noexcept { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p))); }
  template <int Off>
  static void nibbles(const std::uint8_t* p, F& lo, F& hi) noexcept {
    const __m256i b = _mm256_cvtepu8_epi32(load8(p)), off = _mm256_set1_epi32(Off);
    lo = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), off));
    hi = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_srli_epi32(b, 4), off));
  }
  static void fp8x256(const std::uint8_t* p, F& lo, F& hi) noexcept {
    // Same bit moves as the AVX-512 traits (kernels_block_avx512.cpp), 16 codes at a time.
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
    lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  }
};

}  // namespace

namespace detail {

bool matmul_rows_block_avx2(const MatmulArgs& a) noexcept { return matmul_rows_block_generic<BlockAvx2>(a); }

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
bool matmul_rows_block_avx2(const MatmulArgs&) noexcept { return false; }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
