#pragma once
/// @file launchers.hpp
/// The explicitly instantiated launcher templates behind the runtime dispatch (kernels/dispatch.cu).
/// Definitions live in gemv.cuh and gemv_q8.cuh; kernels/gemv_<precision>.cu instantiate the offered set
/// (G = 0 for float precisions; 32, 64, 128 for integers; T = 1, 2, 4, 8 tokens).

#include <cstddef>
#include <cstdint>

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

/// The same at batch 1 (every task's n == 1, else kUnsupported) in a named variant (benchmarks and
/// their tests): 0 = launch_grouped_expert_q8's choice (two 16-byte units per lane in flight),
/// 1 = one unit per lane.
template <Precision P, int G>
Status launch_grouped_expert_q8_variant(const GroupedExpertArgs& args, int variant, cudaStream_t stream) noexcept;

/// launch_gemv_q8_variant / launch_grouped_expert_q8_variant for the layout's format (dispatch.cu;
/// kUnsupported unless int4/int2 with group 32, 64 or 128).
Status gemv_q8_variant(const GemvArgs& args, int variant, cudaStream_t stream) noexcept;
Status grouped_expert_q8_variant(const GroupedExpertArgs& args, int variant, cudaStream_t stream) noexcept;

/// Grouped SwiGLU experts for precision P, group G, token bucket T (every task's n <= T).
template <Precision P, int G, int T>
Status launch_grouped_expert(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

/// Block-format GEMV (kernels/gemv_block.cuh) for P in Q8_0, Q4_0, Q4_K, fp8 e4m3, token bucket T
/// (needs compute capability 9.0: kUnsupported below). pdl false: the q8 path's GEMV is launched
/// after its x-quantize kernel has finished instead of as its programmatic dependent (benchmarks).
template <Precision P, int T>
Status launch_gemv_block(const GemvArgs& args, cudaStream_t stream, bool pdl = true) noexcept;

/// launch_gemv_block for the layout's format with pdl = (variant == 0) (benchmarks).
Status gemv_block_variant(const GemvArgs& args, int variant, cudaStream_t stream) noexcept;

/// Quantized activation rows in a workspace (the q8 path of the block formats): row i's int8
/// codes at q + i * ldq, each 1024-column tile's 32 units interleaved (bytes 0-15 of units 0..31,
/// then bytes 16-31: column c at (c / 1024) * 1024 + ((c / 16) % 2) * 512 + ((c / 32) % 32) * 16 +
/// c % 16), and one (d_x, sum of the group's codes) per 32-column group at m + i * ldm.
struct BlockQ8Rows {
  std::uint8_t* q = nullptr;
  float2* m = nullptr;
  std::size_t ldq = 0, ldm = 0;
};
/// `rows` rows of `cols` columns at base (16-byte aligned; q8_rows_bytes(cols, rows) bytes); the
/// GEMV's workspace holds token t in row t.
inline BlockQ8Rows q8_rows_at(void* base, std::size_t cols, std::size_t rows) noexcept {
  BlockQ8Rows r;
  r.ldq = q8_codes_ld(cols);
  r.ldm = q8_meta_ld(cols);
  r.q = static_cast<std::uint8_t*>(base);
  r.m = reinterpret_cast<float2*>(r.q + rows * r.ldq);
  return r;
}
/// The parts of GroupedExpertArgs::workspace (grouped_expert_workspace_bytes): h, the f32 SwiGLU
/// activations [count][kMaxGemvTokens][ffn]; then the quantized x and h of (expert e, token t) at
/// row e * kMaxGemvTokens + t of x8 and h8.
struct GroupedWorkspace {
  float* h = nullptr;
  BlockQ8Rows x, h8;
};
inline GroupedWorkspace grouped_workspace(float* ws, ExpertShape shape, std::uint32_t count) noexcept {
  const std::size_t rows = static_cast<std::size_t>(count) * kMaxGemvTokens;
  GroupedWorkspace g;
  g.h = ws;
  auto* base = reinterpret_cast<std::byte*>(ws) + grouped_h_bytes(shape, count);
  g.x = q8_rows_at(base, shape.hidden, rows);
  g.h8 = q8_rows_at(base + q8_rows_bytes(shape.hidden, rows), shape.ffn, rows);
  return g;
}

/// Quantizes n tokens of x (rows 0..n-1, cols % 32 == 0) into rows 0..n-1 of `out` (the q8 path
/// of the block-format GEMV).
Status launch_quantize_x32(const float* x, std::size_t ldx, std::size_t cols, std::uint32_t n, const BlockQ8Rows& out,
                           cudaStream_t stream) noexcept;
/// Quantizes the activations of `count` grouped tasks into row e * kMaxGemvTokens + t of `out`
/// for t < tasks[e].n: from row tasks[e].token[t] of x, or (h_rows) from row e * kMaxGemvTokens + t.
/// pdl: launched as a programmatic dependent of the kernel before it (launch_util.hpp's
/// launch_kernel), which must be this library's kernel of the same operation.
Status launch_quantize_task_rows(const float* x, std::size_t ldx, std::size_t cols, const ExpertTask* tasks,
                                 std::uint32_t count, bool h_rows, const BlockQ8Rows& out, cudaStream_t stream,
                                 bool pdl = false) noexcept;

/// Grouped SwiGLU experts in block format P (Q8_0, Q4_0, Q4_K, fp8 e4m3), token bucket T.
template <Precision P, int T>
Status launch_grouped_expert_block(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

}  // namespace cuda
MOEX_NAMESPACE_END
