#pragma once
/// @file router.cuh
/// Device template of the top-k router (route_topk): one warp per token, up to 8 experts per lane.

#include <cstdint>

#include <cuda_runtime.h>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline constexpr int kRouterWarps = 4;
inline constexpr int kRouterPerLane = 8;  ///< experts per lane: 256 experts at most

struct RouterParams {
  const float* logits;
  std::size_t ld;
  std::uint32_t tokens, experts, k;
  bool sigmoid;
  const float* bias;
  bool renormalize;
  float scaling;
  std::uint32_t n_group, topk_group;
  std::int32_t* idx;
  float* weight;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_add(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kRouterWarps * 32) route_topk_kernel(const RouterParams p) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const std::size_t tok = static_cast<std::size_t>(blockIdx.x) * kRouterWarps + threadIdx.x / 32;
  if (tok >= p.tokens) return;
  const float* lg = p.logits + tok * p.ld;
  const float kNegInf = -__int_as_float(0x7f800000);
  float sel[kRouterPerLane], wt[kRouterPerLane];
#pragma unroll
  for (int i = 0; i < kRouterPerLane; ++i) {
    const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
    sel[i] = e < p.experts ? lg[e] : kNegInf;
  }
  if (!p.sigmoid) {
    float mx = kNegInf;
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) mx = fmaxf(mx, sel[i]);
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) {
      const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
      wt[i] = e < p.experts ? expf(sel[i] - mx) : 0.f;
      sum += wt[i];
    }
    sum = warp_add(sum);
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) {
      const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
      wt[i] /= sum;
      sel[i] = e < p.experts ? wt[i] : kNegInf;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) {
      const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
      if (e < p.experts) {
        wt[i] = 1.f / (1.f + expf(-sel[i]));
        sel[i] = wt[i] + (p.bias ? p.bias[e] : 0.f);
      } else {
        wt[i] = 0.f;
      }
    }
  }
  if (p.n_group > 1) {
    // Group-limited selection (the CPU router's rule): group score = best selection score
    // (softmax) or the sum of the best two (sigmoid); keep the topk_group best groups (ties: lower
    // group first); experts of other groups cannot be selected.
    const std::uint32_t per_group = p.experts / p.n_group;
    const bool two = p.sigmoid && per_group >= 2;
    float gscore = kNegInf;  // lane g holds group g's score
    for (std::uint32_t g = 0; g < p.n_group; ++g) {
      float b1 = kNegInf, b2 = kNegInf;
#pragma unroll
      for (int i = 0; i < kRouterPerLane; ++i) {
        const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
        if (e < p.experts && e / per_group == g) {
          const float v = sel[i];
          if (v > b1) {
            b2 = b1;
            b1 = v;
          } else if (v > b2) {
            b2 = v;
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {  // merge the top two of disjoint sets
        const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
        const float lo = fminf(b1, o1);
        b1 = fmaxf(b1, o1);
        b2 = fmaxf(lo, fmaxf(b2, o2));
      }
      if (lane == static_cast<int>(g)) gscore = two ? b1 + b2 : b1;
    }
    std::uint32_t kept = 0;  // bit g: group g kept
    for (std::uint32_t j = 0; j < p.topk_group; ++j) {
      float bv = lane < static_cast<int>(p.n_group) && !((kept >> lane) & 1u) ? gscore : kNegInf;
      int bi = lane < static_cast<int>(p.n_group) && !((kept >> lane) & 1u) ? lane : 0x7fffffff;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (bi < 32) kept |= 1u << bi;
    }
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) {
      const std::uint32_t e = static_cast<std::uint32_t>(lane + 32 * i);
      if (e < p.experts && !((kept >> (e / per_group)) & 1u)) sel[i] = kNegInf;
    }
  }
  float total = 0.f;
  for (std::uint32_t j = 0; j < p.k; ++j) {
    float bv = kNegInf, bw = 0.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i) {
      const int e = lane + 32 * i;
      if (sel[i] > bv) {  // strict: the lower index of a lane wins ties
        bv = sel[i];
        bi = e;
        bw = wt[i];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      const float ow = __shfl_xor_sync(0xffffffffu, bw, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
        bw = ow;
      }
    }
#pragma unroll
    for (int i = 0; i < kRouterPerLane; ++i)
      if (bi == lane + 32 * i) sel[i] = kNegInf;
    total += bw;
    if (lane == 0) {
      p.idx[tok * p.k + j] = bi;
      p.weight[tok * p.k + j] = bw;
    }
  }
  __syncwarp();
  const float scale = p.renormalize ? p.scaling / total : p.scaling;
  for (std::uint32_t j = static_cast<std::uint32_t>(lane); j < p.k; j += 32) p.weight[tok * p.k + j] *= scale;
}

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
