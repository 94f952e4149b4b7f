#pragma once
/// @file cpu_kernels.hpp
/// Internal (moex::detail): the per-ISA entry points behind matmul_rows and the row decoders
/// shared by quantize.cpp and expert_ffn.cpp. Users call matmul_rows / dequantize_row instead.

#include <cstddef>

#include "moex/quant/layout.hpp"

MOEX_NAMESPACE_BEGIN

namespace detail {

/// One matmul_rows call: y[t*ldy + r] = sum_c W[r][c] x[t*ldx + c], t < n, r in [row_begin,
/// row_end). `layout.format` is one of moex's own formats (f32/f16/bf16/int8/int4/int2), or for the
/// block kernels (src/cpu/block_kernel.hpp) Q8_0/Q4_0/Q4_K/fp8 e4m3.
struct MatmulArgs {
  const std::byte* w = nullptr;
  MatrixLayout layout{};
  const float* x = nullptr;
  std::size_t n = 0;
  std::size_t ldx = 0;
  float* y = nullptr;
  std::size_t ldy = 0;
  std::size_t row_begin = 0;
  std::size_t row_end = 0;
};

/// Portable kernel (any CPU).
void matmul_rows_scalar(const MatmulArgs& a) noexcept;
/// AVX2 + FMA + F16C kernel (src/cpu/kernels_avx2.cpp).
void matmul_rows_avx2(const MatmulArgs& a) noexcept;
/// AVX-512 F/BW/VL kernel (src/cpu/kernels_avx512.cpp).
void matmul_rows_avx512(const MatmulArgs& a) noexcept;
/// AVX-512-BF16 kernel for bf16 weights only: x rounded to bf16, vdpbf16ps with f32 accumulation
/// (src/cpu/kernels_avx512bf16.cpp).
void matmul_rows_avx512bf16(const MatmulArgs& a) noexcept;

/// AVX512-VNNI int8-activation kernel for int8/int4/int2 weights (vnni_kernel.hpp, in
/// src/cpu/kernels_avx512vnni.cpp); returns false (doing nothing) for other formats.
bool matmul_rows_avx512vnni(const MatmulArgs& a) noexcept;
/// The same kernel unpacking int4/int2 codes with GFNI (src/cpu/kernels_avx512vnni_gfni.cpp);
/// bit-identical results to matmul_rows_avx512vnni.
bool matmul_rows_avx512vnni_gfni(const MatmulArgs& a) noexcept;

/// True when the CPU has AVX512-VNNI (CPUID leaf 7, ECX bit 11) on top of detected AVX-512:
/// the kAvx512Bf16 level then runs integer weight formats through the int8-activation kernel.
bool cpu_has_avx512vnni() noexcept;

/// True when the CPU has GFNI (CPUID leaf 7, ECX bit 8) on top of detected AVX-512: the VNNI
/// kernel then unpacks int4/int2 codes with one vgf2p8affineqb per bit plane.
bool cpu_has_gfni() noexcept;

/// Decodes columns [c0, c0+len) of row `row` into dst. c0 and len are multiples of the group size
/// (integer formats) or block size (block formats); any value for float formats.
/// Precondition: the view passed check_matrix_view().
void decode_row_range(const MatrixView& m, std::size_t row, std::size_t c0, std::size_t len, float* dst) noexcept;

}  // namespace detail

MOEX_NAMESPACE_END
