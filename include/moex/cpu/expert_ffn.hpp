#pragma once
/// @file expert_ffn.hpp
/// CPU kernels: matrix-times-tokens in every storage format, the SwiGLU expert FFN, combine.
/// Instruction sets are chosen at run time (AVX-512 / AVX-512-BF16 / AVX2 / scalar).

#include <cstddef>
#include <span>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ThreadPool;

/// y[t*ldy + r] = sum_c W[r][c] * x[t*ldx + c] for tokens t in [0, n) and rows r in
/// [row_begin, row_end). Accumulates in f32. The building block of every CPU expert kernel.
void matmul_rows(const MatrixView& w, const float* x, std::size_t n, std::size_t ldx, float* y,
                 std::size_t ldy, std::size_t row_begin, std::size_t row_end) noexcept;

/// Scratch floats expert_ffn needs for n tokens of `shape`.
constexpr std::size_t expert_ffn_workspace(ExpertShape shape, std::size_t n) noexcept {
  return 2 * static_cast<std::size_t>(shape.ffn) * n;
}

/// SwiGLU expert: y = W2 (silu(W1 x) * (W3 x)) for n tokens; x is [n x hidden], y is
/// [n x hidden], both row-major f32. `workspace` holds expert_ffn_workspace(shape, n) floats.
/// Rows are split across `pool` (null: the calling thread only).
Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y,
                  std::span<float> workspace, ThreadPool* pool = nullptr) noexcept;

/// The instruction set the kernels picked on this machine: "avx512bf16", "avx512", "avx2",
/// "scalar".
const char* cpu_kernel_isa() noexcept;

MOEX_NAMESPACE_END
