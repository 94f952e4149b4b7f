#pragma once
/// @file expert_ffn.hpp
/// CPU kernels: matrix-times-tokens in every storage format, the SwiGLU expert FFN, combine.
/// Instruction sets are chosen at run time (AVX-512 / AVX-512-BF16 / AVX2 / scalar; see
/// cpu_isa.hpp, MOEX_CPU_ISA forces a lower one).
///
/// Weights are decoded on the fly, a few rows at a time in registers: no dequantized matrix is
/// ever materialized, so at batch 1 the kernels stream the stored bytes once. Accumulation is f32.
/// Accuracy (against float64 math on the decoded weights): f32 FMA accumulation in every path,
/// except:
///  - bf16 weights under CpuIsa::kAvx512Bf16: activations are rounded to bf16 once per use
///    (relative error of a dot product about 2^-9 / sqrt(cols) for random data, 3e-3 bound);
///  - int8/int4/int2 weights under CpuIsa::kAvx2 and (with AVX512-VNNI) CpuIsa::kAvx512Bf16 --
///    the default on AVX2 and AVX-512-BF16 CPUs: activations are quantized to int8 per weight
///    group, as llama.cpp does (d_x = max|x_g| / 127, q = round(x / d_x)), and each group's dot
///    product is exact integer math, so |y - y_exact| <= sum_g (d_x[g] / 2) sum_{c in g} |w_c|
///    plus f32 rounding; about 0.3% rms relative error per matmul on Gaussian data, ~1% through a
///    whole expert. CpuIsa::kAvx512 (MOEX_CPU_ISA=avx512) and kScalar keep f32 activations.
/// Results do not depend on how rows are split across threads (bit-identical).

#include <cstddef>
#include <span>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ThreadPool;

/// Checks that `m` can be read by matmul_rows / dequantize_row: non-null data, rows and cols > 0,
/// a layout equal to matrix_layout(rows, cols, format) for moex's own formats and fp8 e4m3, or a
/// GGUF block format whose block size divides cols. Errors: kInvalidArgument; kUnsupported for
/// an fp8 e4m3 layout other than matrix_layout()'s (e.g. a checkpoint's fp8 bytes, scales apart).
Status check_matrix_view(const MatrixView& m) noexcept;

/// y[t*ldy + r] = sum_c W[r][c] * x[t*ldx + c] for tokens t in [0, n) and rows r in
/// [row_begin, row_end). Accumulates in f32. The building block of every CPU expert kernel.
/// Preconditions: check_matrix_view(w) is ok, row_end <= rows, x holds n rows of ldx >= cols
/// floats, y holds n rows of ldy >= row_end floats. Null pointers make it return without writing.
/// Block formats, f32 activations at every level: Q8_0, Q4_0, Q4_K and fp8 e4m3 (its 128x128
/// block scales from the layout's scale section) run SIMD kernels from kAvx2 up
/// (src/cpu/kernels_block_avx2.cpp, kernels_block_avx512.cpp: each block decoded once in
/// registers, shared by up to 8 tokens); Q5_K/Q6_K/MXFP4, and every block format at kScalar, are
/// decoded 1024 columns at a time into f32 scratch (decode_block_row), then dotted in f32 (the
/// portable path). Both are exact to f32 rounding of the decoded weights; rates in
/// bench/micro/block_ffn_bench.cpp.
void matmul_rows(const MatrixView& w, const float* x, std::size_t n, std::size_t ldx, float* y, std::size_t ldy,
                 std::size_t row_begin, std::size_t row_end) noexcept;

/// Scratch floats expert_ffn needs for n tokens of `shape`.
constexpr std::size_t expert_ffn_workspace(ExpertShape shape, std::size_t n) noexcept {
  return 2 * static_cast<std::size_t>(shape.ffn) * n;
}

/// SwiGLU expert: y = W2 (silu(W1 x) * (W3 x)) for n tokens; x is [n x hidden], y is
/// [n x hidden], both row-major f32. With `e.math` set, its activation and biases apply:
/// y = W2 act(W1 x + b1, W3 x + b3) + b2 (gpt-oss's clamped SwiGLU; ExpertMath in layout.hpp),
/// computed in f32. `workspace` holds expert_ffn_workspace(shape, n) floats.
/// Rows are split across `pool` (null: the calling thread only); w1 and w3 rows are computed
/// together with the SwiGLU activation in one pass. y may alias x.
/// Errors: kInvalidArgument for null pointers, views whose layouts do not match the shape, an
/// invalid format or a short workspace; kUnsupported for fp8 e4m3 weights not in the moex layout
/// (see check_matrix_view). Block-format experts take the decode path of matmul_rows.
Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y, std::span<float> workspace,
                  ThreadPool* pool = nullptr) noexcept;

/// The instruction set the kernels use now (active_cpu_isa()): "avx512bf16", "avx512", "avx2",
/// "scalar". Never null; static storage.
const char* cpu_kernel_isa() noexcept;

MOEX_NAMESPACE_END
