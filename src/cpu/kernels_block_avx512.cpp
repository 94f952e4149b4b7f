// AVX-512 F/BW instantiation of the block-format matmul_rows kernel (block_kernel.hpp): GGUF Q8_0,
// Q4_0, Q4_K and fp8 e4m3 weights decoded 16 lanes at a time, f32 activations and accumulation.
// Compiled for plain x86-64 like the rest of moex; only the functions below carry the AVX-512
// target, and expert_ffn.cpp calls them after checking the CPU (active_cpu_isa()).
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

#include "block_kernel.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct BlockAvx512 {
  using F = __m512;
  static constexpr std::size_t L = 16;
  static constexpr int T = 8;  // 2 rows x 8 tokens x 1 accumulator + 2 x 4 decoded vectors: 24 of 32 zmm
  static constexpr std::size_t R = 2;

  static F zero() noexcept { return _mm512_setzero_ps(); }
  static F set1(float v) noexcept { return _mm512_set1_ps(v); }
  static F load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static F fma(F a, F b, F c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) noexcept { return _mm512_mul_ps(a, b); }
  static F fms(F a, F b, F c) noexcept { return _mm512_fmsub_ps(a, b, c); }
  static void scale_bytes(const std::uint8_t* p, float a, float b, float* out) noexcept {
    const F ab = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b));
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(p))), ab));
  }
  static F add(F a, F b) noexcept { return _mm512_add_ps(a, b); }
  static float hsum(F v) noexcept { return _mm512_reduce_add_ps(v); }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static __m128i load16(const std::uint8_t* p) noexcept { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static F s8(const std::uint8_t* p) noexcept { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p))); }
  static constexpr bool kNibbleTables = true;
  static F iota() noexcept { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static void nibbles_lookup(const std::uint8_t* p, F tlo, F thi, F& lo, F& hi) noexcept {
    // vpermps reads the low 4 bits of each index: mask, conversion and mapping in one instruction.
    const __m512i b = _mm512_cvtepu8_epi32(load16(p));
    lo = _mm512_permutexvar_ps(b, tlo);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), thi);
  }
  template <int Off>
  static void nibbles(const std::uint8_t* p, F& lo, F& hi) noexcept {
    const F t = _mm512_add_ps(iota(), _mm512_set1_ps(static_cast<float>(Off)));
    nibbles_lookup(p, t, t, lo, hi);
  }
  static void fp8x256(const std::uint8_t* p, F& lo, F& hi) noexcept {
    // Sign-extended S.EEEE.MMM shifted left 7 puts MMM and EEEE where f16 keeps its top mantissa
    // bits and low exponent bits and a copy of S at bit 15; bit 14 (the other S copy) is cleared.
    // The f16 read is the e4m3 value times 2^(7-15), subnormals included. 16 codes per ymm (cheaper
    // on Zen 4 than 32 per zmm and an extract).
    const __m256i k = _mm256_set1_epi16(static_cast<short>(0xBFFF));
    const __m256i a = _mm256_cvtepi8_epi16(load16(p)), b = _mm256_cvtepi8_epi16(load16(p + 16));
    lo = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(a, 7), k));
    hi = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(b, 7), k));
  }
};

}  // namespace

namespace detail {

bool matmul_rows_block_avx512(const MatmulArgs& a) noexcept { return matmul_rows_block_generic<BlockAvx512>(a); }

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
bool matmul_rows_block_avx512(const MatmulArgs&) noexcept { return false; }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
