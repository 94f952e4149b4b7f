#pragma once
// Internal (moex::detail, private to src/cpu): the per-ISA entry points of the block-format
// matmul_rows kernels (block_kernel.hpp), called from expert_ffn.cpp's matmul_rows.

#include "moex/cpu/cpu_kernels.hpp"

MOEX_NAMESPACE_BEGIN

namespace detail {

/// AVX-512 F/BW kernel for Q8_0, Q4_0, Q4_K and fp8 e4m3 views (f32 activations; see
/// block_kernel.hpp; src/cpu/kernels_block_avx512.cpp). Precondition: check_matrix_view passed and
/// the CPU has AVX-512. Returns false (doing nothing) for other precisions.
bool matmul_rows_block_avx512(const MatmulArgs& a) noexcept;

/// The same on AVX2 + FMA + F16C (src/cpu/kernels_block_avx2.cpp).
bool matmul_rows_block_avx2(const MatmulArgs& a) noexcept;

}  // namespace detail

MOEX_NAMESPACE_END
