// swiglu_to_bf16 / swiglu_to_f16: the SwiGLU activation between two products (the cuBLAS path of
// large batches).
#include <string>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_math.cuh"
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

/// How each activation is stored.
struct ToBf16 {
  using Out = std::uint16_t;
  __device__ static Out store(float v) { return to_bf16_rne(v); }
};
struct ToF16 {
  using Out = std::uint16_t;
  __device__ static Out store(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <class C>
__global__ void swiglu_kernel(const float* gate, const float* __restrict__ up, typename C::Out* out,
                              std::size_t count) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x)
    out[i] = C::store(detail::silu(gate[i]) * up[i]);
}

template <class C>
Status launch_swiglu(const float* gate, const float* up, typename C::Out* out, std::size_t count, cudaStream_t stream,
                     const char* what) noexcept {
  if (count == 0) return Status::ok();
  if (!gate || !up || !out) return invalid_argument(std::string(what) + ": null pointer");
  const std::size_t want = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  swiglu_kernel<C><<<blocks, 256, 0, stream>>>(gate, up, out, count);
  return cuda_status(cudaGetLastError(), (std::string(what) + " launch").c_str());
}

}  // namespace

Status swiglu_to_f16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                     cudaStream_t stream) noexcept {
  return launch_swiglu<ToF16>(gate, up, out, count, stream, "swiglu_to_f16");
}

Status swiglu_to_bf16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                      cudaStream_t stream) noexcept {
  return launch_swiglu<ToBf16>(gate, up, out, count, stream, "swiglu_to_bf16");
}

}  // namespace cuda
MOEX_NAMESPACE_END
