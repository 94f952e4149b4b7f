// x quantized to int8 per 32-column group for the q8 path of the block-format GEMV (gemv_block.cuh).
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "device_math.cuh"
#include "kernels.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace {

/// Quantizes n tokens of x (row t at x + t * ldx, `cols` a multiple of 32) to int8 per 32-column
/// group with the CPU's Q8 rule: d = max|x| / 127, q = rne(x * (127 / max|x|)) (all zero for an
/// all-zero group). One warp per group, one lane per column; grid (groups / 8 rounded up, n).
__global__ void __launch_bounds__(256) quantize_x32(const float* x, std::size_t ldx, std::size_t cols, std::int8_t* q,
                                                    std::size_t ldq, float* d, std::size_t ldd) {
  const std::size_t g = static_cast<std::size_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const std::size_t t = blockIdx.y;
  if (g * 32 >= cols) return;  // whole warp
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const float v = x[t * ldx + g * 32 + static_cast<std::size_t>(lane)];
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  q[t * ldq + g * 32 + static_cast<std::size_t>(lane)] = static_cast<std::int8_t>(q8_code(v, q8_inv_scale(amax)));
  if (lane == 0) d[t * ldd + g] = amax / 127.f;
}

}  // namespace
}  // namespace detail

Status launch_quantize_x32(const float* x, std::size_t ldx, std::size_t cols, std::uint32_t n,
                           const BlockQ8Workspace& ws, cudaStream_t stream) noexcept {
  detail::quantize_x32<<<dim3(static_cast<unsigned>((cols / 32 + 7) / 8), n), 256, 0, stream>>>(x, ldx, cols, ws.q,
                                                                                                ws.ldq, ws.d, ws.ldd);
  return cuda_status(cudaGetLastError(), "quantize_x32 launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END
