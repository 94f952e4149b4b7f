// Activations quantized to int8 per 32-column group for the q8 path of the block formats
// (gemv_block.cuh): the GEMV's tokens, and the grouped experts' x and SwiGLU activations.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "block_decode.cuh"
#include "device_math.cuh"
#include "kernels.hpp"
#include "launch_util.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {
namespace {

/// Which rows quantize_rows reads and writes: output row e * kMaxGemvTokens + t, for t < n[e],
/// from row src[e][t] of x.
struct QuantizeRowsParams {
  const float* x;
  std::size_t ldx;
  std::uint32_t cols;
  BlockQ8Rows out;
  std::uint32_t n[kMaxGroupExperts];
  std::uint32_t src[kMaxGroupExperts][kMaxGemvTokens];
};

/// The CPU's Q8 rule per 32-column group: d = max|x| / 127, q = rne(x * (127 / max|x|)) (all zero
/// for an all-zero group), and the group's sum of codes. One warp per group, one lane per column;
/// grid (groups / 8 rounded up, most rows of a task, tasks). Codes land in the tile-interleaved
/// order of BlockQ8Rows, so lanes 0-15 and 16-31 each write 16 contiguous bytes.
__global__ void __launch_bounds__(256) quantize_rows(const __grid_constant__ QuantizeRowsParams p) {
  pdl_trigger();
  pdl_wait();  // as a dependent launch (the SwiGLU activations h), after the kernel writing them
  const std::uint32_t g = blockIdx.x * 8 + threadIdx.x / 32;
  const std::uint32_t t = blockIdx.y, e = blockIdx.z;
  if (g * 32 >= p.cols || t >= p.n[e]) return;  // whole warp
  const auto lane = static_cast<std::uint32_t>(threadIdx.x & 31u);
  const std::uint32_t col = g * 32 + lane;
  const float v = p.x[static_cast<std::size_t>(p.src[e][t]) * p.ldx + col];
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const int q = q8_code(v, q8_inv_scale(amax));
  int sum = q;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const std::size_t row = static_cast<std::size_t>(e) * kMaxGemvTokens + t;
  p.out.q[row * p.out.ldq + q8_code_offset(col)] = static_cast<std::uint8_t>(static_cast<std::int8_t>(q));
  if (lane == 0) p.out.m[row * p.out.ldm + g] = make_float2(amax / 127.f, static_cast<float>(sum));
}

QuantizeRowsParams params(const float* x, std::size_t ldx, std::size_t cols, const BlockQ8Rows& out) noexcept {
  QuantizeRowsParams p{};
  p.x = x;
  p.ldx = ldx;
  p.cols = static_cast<std::uint32_t>(cols);
  p.out = out;
  return p;
}

Status launch(const QuantizeRowsParams& p, std::uint32_t tasks, std::uint32_t max_rows, cudaStream_t stream,
              bool pdl) noexcept {
  if (max_rows == 0) return Status::ok();
  return launch_kernel(quantize_rows, dim3((p.cols / 32 + 7) / 8, max_rows, tasks), dim3(256), 0, stream, pdl,
                       "quantize_rows launch", p);
}

}  // namespace
}  // namespace detail

Status launch_quantize_x32(const float* x, std::size_t ldx, std::size_t cols, std::uint32_t n, const BlockQ8Rows& out,
                           cudaStream_t stream) noexcept {
  detail::QuantizeRowsParams p = detail::params(x, ldx, cols, out);
  p.n[0] = n;
  for (std::uint32_t t = 0; t < n && t < kMaxGemvTokens; ++t) p.src[0][t] = t;
  return detail::launch(p, 1, n, stream, false);
}

Status launch_quantize_task_rows(const float* x, std::size_t ldx, std::size_t cols, const ExpertTask* tasks,
                                 std::uint32_t count, bool h_rows, const BlockQ8Rows& out, cudaStream_t stream,
                                 bool pdl) noexcept {
  detail::QuantizeRowsParams p = detail::params(x, ldx, cols, out);
  std::uint32_t max_rows = 0;
  for (std::uint32_t e = 0; e < count; ++e) {
    p.n[e] = tasks[e].n;
    if (tasks[e].n > max_rows) max_rows = tasks[e].n;
    for (std::uint32_t t = 0; t < tasks[e].n; ++t) p.src[e][t] = h_rows ? e * kMaxGemvTokens + t : tasks[e].token[t];
  }
  return detail::launch(p, count, max_rows, stream, pdl);
}

}  // namespace cuda
MOEX_NAMESPACE_END
