#pragma once
/// @file warp_sum.cuh
/// The warp reduction shared by the GEMV kernel families (gemv.cuh, gemv_q8.cuh, gemv_block.cuh).

#include <cuda_runtime.h>

#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

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

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
