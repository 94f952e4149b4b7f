#pragma once
/// @file launchers.hpp
/// The explicitly instantiated launcher templates behind the runtime dispatch (kernels/dispatch.cu).
/// Definitions live in gemv.cuh; kernels/gemv_<precision>.cu instantiate the offered set
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

/// Grouped SwiGLU experts for precision P, group G, token bucket T (every task's n <= T).
template <Precision P, int G, int T>
Status launch_grouped_expert(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

}  // namespace cuda
MOEX_NAMESPACE_END
