#pragma once
/// @file device_math.cuh
/// Device helpers shared by the kernel families (gemv.cuh, gemv_q8.cuh, gemv_block.cuh,
/// quantize_x32.cu, swiglu_act.cu): the warp reduction, SiLU, and the CPU's Q8 rule for activations
/// (include/moex/cpu/q8_kernel.hpp): d = max|x| / 127, q = rne(x * (127 / max|x|)), all zero for an
/// all-zero group.

#include <cuda_runtime.h>

#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

/// Programmatic dependent launch (sm_90+; both are no-ops before sm_90, and pdl_wait returns at
/// once when the grid was launched without the attribute, see launch_kernel). pdl_wait blocks
/// until the grid launched before this one in the stream has completed and its writes are
/// visible: a PDL-launched kernel may read only data that existed before that grid started (the
/// weights) until it has waited, and writes nothing before. pdl_trigger lets the next PDL-launched
/// grid start once every block of this one has called it or exited.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Sums acc over the warp; every lane ends with the totals.
template <int NR, int T>
__device__ __forceinline__ void warp_sum(float (&acc)[NR][T]) {
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) {
      float s = acc[r][t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      acc[r][t] = s;
    }
}

/// silu(v) = v * sigmoid(v), with the fast exponential (a few ulp).
__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

/// 127 / amax for the Q8 rule, 0 for an all-zero group.
__device__ __forceinline__ float q8_inv_scale(float amax) { return amax > 0.f ? 127.f / amax : 0.f; }
/// The Q8 code of v with q8_inv_scale's `inv`, clamped to int8.
__device__ __forceinline__ int q8_code(float v, float inv) { return max(-128, min(127, __float2int_rn(v * inv))); }

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
