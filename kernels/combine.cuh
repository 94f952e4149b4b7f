#pragma once
/// @file combine.cuh
/// Device templates of weighted_combine and the f32 -> bf16 / f16 conversions.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

struct CombineParams {
  const float* eo;
  std::size_t ld_eo;
  const float* weight;
  std::uint32_t tokens, k, hidden;
  float* out;
  std::size_t ldo;
  bool accumulate;
};

/// One thread per output element; the k rows are summed in order (deterministic).
__global__ void weighted_combine_kernel(const CombineParams p) {
  const std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t total = static_cast<std::size_t>(p.tokens) * p.hidden;
  if (i >= total) return;
  const std::size_t t = i / p.hidden, c = i % p.hidden;
  float s = 0.f;
  for (std::uint32_t j = 0; j < p.k; ++j) s = fmaf(p.weight[t * p.k + j], p.eo[(t * p.k + j) * p.ld_eo + c], s);
  float* o = p.out + t * p.ldo + c;
  *o = p.accumulate ? *o + s : s;
}

__global__ void f32_to_bf16_kernel(const float* src, std::uint16_t* dst, std::size_t count) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
}

__global__ void f32_to_f16_kernel(const float* src, std::uint16_t* dst, std::size_t count) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = __half_as_ushort(__float2half_rn(src[i]));
}

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
