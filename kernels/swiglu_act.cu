// swiglu_to_bf16 / swiglu_to_f16: the SwiGLU activation between the cuBLAS products of the large-batch path.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace {

__device__ __forceinline__ std::uint16_t to_bf16_rne(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

__global__ void swiglu_to_bf16_kernel(const float* __restrict__ gate, const float* __restrict__ up,
                                      std::uint16_t* __restrict__ out, std::size_t count) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = to_bf16_rne(g / (1.f + __expf(-g)) * up[i]);
  }
}

__global__ void swiglu_to_f16_kernel(const float* __restrict__ gate, const float* __restrict__ up,
                                     std::uint16_t* __restrict__ out, std::size_t count) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = __half_as_ushort(__float2half_rn(g / (1.f + __expf(-g)) * up[i]));
  }
}

}  // namespace

Status swiglu_to_f16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                     cudaStream_t stream) noexcept {
  if (count == 0) return Status::ok();
  if (!gate || !up || !out) return invalid_argument("swiglu_to_f16: null pointer");
  const std::size_t want = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  swiglu_to_f16_kernel<<<blocks, 256, 0, stream>>>(gate, up, out, count);
  return cuda_status(cudaGetLastError(), "swiglu_to_f16 launch");
}

Status swiglu_to_bf16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                      cudaStream_t stream) noexcept {
  if (count == 0) return Status::ok();
  if (!gate || !up || !out) return invalid_argument("swiglu_to_bf16: null pointer");
  const std::size_t want = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  swiglu_to_bf16_kernel<<<blocks, 256, 0, stream>>>(gate, up, out, count);
  return cuda_status(cudaGetLastError(), "swiglu_to_bf16 launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END
