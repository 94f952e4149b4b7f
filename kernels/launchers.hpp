#pragma once
/// @file launchers.hpp
/// The explicitly instantiated launcher templates behind the runtime dispatch (kernels/dispatch.cu).
/// Definitions live in gemv.cuh and gemv_q8.cuh; kernels/gemv_<precision>.cu instantiate the offered set
/// (G = 0 for float precisions; 32, 64, 128 for integers; T = 1, 2, 4, 8 tokens).

#include <cuda_runtime_api.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {

/// Fused dequantize-GEMV for precision P, group G, token bucket T (n <= T).
template <Precision P, int G, int T>
Status launch_gemv(const GemvArgs& args, cudaStream_t stream) noexcept;

/// The int8-activation (dp4a) GEMV for integer precision P, group G, token bucket T
/// (kernels/gemv_q8.cuh); falls back to launch_gemv when the quantized x does not fit.
template <Precision P, int G, int T>
Status launch_gemv_q8(const GemvArgs& args, cudaStream_t stream) noexcept;

/// The same at batch 1 in a named variant of the q8 kernel (benchmarks): 0 = one 16-byte unit per
/// lane in flight per row, 1 = two units per lane loaded before the first is used (launch_gemv_q8
/// picks one of them per format).
template <Precision P, int G>
Status launch_gemv_q8_variant(const GemvArgs& args, int variant, cudaStream_t stream) noexcept;

/// The q8 (int8-activation, dp4a) grouped SwiGLU experts for integer precision P (int4/int2): x
/// and the SwiGLU activation h are each quantized per weight group by the CPU's rule; falls back
/// to launch_grouped_expert when the quantized activations do not fit one block's shared memory.
template <Precision P, int G, int T>
Status launch_grouped_expert_q8(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

/// Grouped SwiGLU experts for precision P, group G, token bucket T (every task's n <= T).
template <Precision P, int G, int T>
Status launch_grouped_expert(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

/// Block-format GEMV (kernels/gemv_block.cuh) for P in Q8_0, Q4_0, Q4_K, fp8 e4m3, token bucket T.
template <Precision P, int T>
Status launch_gemv_block(const GemvArgs& args, cudaStream_t stream) noexcept;

/// Quantizes n tokens of x (cols % 32 == 0) into `ws` (the q8 path of the block formats).
Status launch_quantize_x32(const float* x, std::size_t ldx, std::size_t cols, std::uint32_t n,
                           const BlockQ8Workspace& ws, cudaStream_t stream) noexcept;

/// Grouped SwiGLU experts in block format P (Q8_0, Q4_0, Q4_K), token bucket T.
template <Precision P, int T>
Status launch_grouped_expert_block(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

}  // namespace cuda
MOEX_NAMESPACE_END
