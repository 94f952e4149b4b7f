#pragma once
/// @file kernels.hpp
/// Host-visible declarations of moex's CUDA kernels (moex::cuda). Every launcher takes an Args
/// struct and the caller's stream, never allocates, and returns a Status: kInvalidArgument for a
/// malformed request, kUnsupported for a valid one whose format/size combination is not
/// instantiated, kInternal when the launch itself fails.
///
/// Conventions shared by every kernel:
///  - Weights use the byte layouts of moex/quant/layout.hpp (row-major [rows x cols]).
///  - Activations are f32 in device memory: x is [n x cols] with row stride ldx, y is [n x rows]
///    with row stride ldy (elements). f32 keeps the kernels exact references of the CPU ones and
///    costs nothing measurable at batch <= 8, where the weights dominate the bytes moved.
///  - x must be 16-byte aligned with ldx a multiple of 4 (the kernels read it with 16-byte loads).
///  - int4/int2 weights take, by default, the q8 path: each token's x is quantized
///    to int8 per weight group with the CPU's rule (include/moex/cpu/q8_kernel.hpp: d_x =
///    max|x|/127, q = round-to-nearest-even(x * 127/max|x|)) and the dot products are integer
///    (dp4a), one f32 FMA per group slice. Its only error beyond f32 rounding is the activation
///    rounding, |x - d_x q| <= d_x/2 per element, so |y - y_exact| <= sum_g (d_x[g]/2) sum_{c in g}
///    |w_c| (norm-wise about 4e-3 relative on random data); GemvArgs::exact selects the f32-activation
///    kernel (exact to f32 rounding).

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

struct cublasContext;  // cuBLAS's handle type (cublasHandle_t), so users need no cuBLAS header

MOEX_NAMESPACE_BEGIN
namespace cuda {

/// Most tokens one GEMV / expert launch serves (decode batches); larger batches go to cuBLAS.
inline constexpr std::uint32_t kMaxGemvTokens = 8;
/// Most experts one grouped launch runs.
inline constexpr std::uint32_t kMaxGroupExperts = 32;

/// y[t*ldy + r] = sum_c W[r][c] * x[t*ldx + c] for t < n, r < rows (or y += ... when accumulate).
struct GemvArgs {
  const std::byte* w = nullptr;  ///< device pointer to the matrix
  MatrixLayout layout{};         ///< its layout (rows, cols, format)
  const float* x = nullptr;
  std::size_t ldx = 0;
  float* y = nullptr;
  std::size_t ldy = 0;
  std::uint32_t n = 1;  ///< tokens, 1..kMaxGemvTokens
  bool accumulate = false;
  /// int4/int2: true keeps f32 activations (exact kernel); false (default) quantizes x to int8 per
  /// group and uses integer dot products (see the file comment for its error bound). Float
  /// formats and int8 (whose f32 kernel already streams at the copy ceiling) ignore it. The q8 path also falls back to
  /// the exact kernel when n tokens of quantized x do not fit one block's shared memory (about 150k columns at n = 1).
  bool exact = false;
  /// fp8 e4m3 only (required there): the f32 block scales that the store keeps apart from the
  /// weights (DeepSeek-V3 `weight_scale_inv`), device memory, [ceil(rows/B) x ceil(cols/B)]
  /// row-major with B = scale_block; weight (r, c) is fp8(r, c) * block_scales[(r/B)*ceil(cols/B) + c/B].
  const float* block_scales = nullptr;
  std::uint32_t scale_block = 128;  ///< B: a multiple of 32
  /// GGUF Q8_0/Q4_0/Q4_K: device scratch of gemv_workspace_bytes(cols, n) bytes (16-byte aligned).
  /// Given and exact == false, x is quantized to int8 per 32-column group (CPU Q8 rule, in a
  /// separate launch) and the kernel uses integer dot products (the q8 path; error bound as for
  /// int4/int2 above); null keeps the f32-activation kernel. Other formats ignore it.
  void* workspace = nullptr;
};

/// Bytes of int8 codes that one quantized activation row of `cols` columns takes in a workspace
/// (whole 1024-column tiles: the block kernels read each tile's codes interleaved).
constexpr std::size_t q8_codes_ld(std::size_t cols) noexcept { return (cols + 1023) / 1024 * 1024; }
/// (d_x, sum of codes) pairs of f32 per quantized row: one per 32-column group, rounded up to even.
constexpr std::size_t q8_meta_ld(std::size_t cols) noexcept { return (cols / 32 + 1) / 2 * 2; }
/// Bytes of `rows` quantized activation rows of `cols` columns (codes, then the pairs).
constexpr std::size_t q8_rows_bytes(std::size_t cols, std::size_t rows) noexcept {
  return rows * (q8_codes_ld(cols) + q8_meta_ld(cols) * 2 * sizeof(float));
}

/// Bytes of GemvArgs::workspace for n tokens of `cols` columns (cols % 32 == 0).
constexpr std::size_t gemv_workspace_bytes(std::size_t cols, std::uint32_t n) noexcept {
  return q8_rows_bytes(cols, n);
}

/// True when gemv() serves `format` for a matrix of `cols` columns on this build (bf16, f16 and
/// int8/int4/int2 with group 32/64/128, either scheme; cols a multiple of the elements that one
/// 16-byte load holds: 8 for 16-bit, 16/32/64 for int8/int4/int2), and the block formats in the
/// byte layout of moex/quant/ggml.hpp: GGUF Q8_0, Q4_0 (cols % 32 == 0), Q4_K (cols % 256 == 0)
/// and fp8 e4m3 with separate block scales (cols % 32 == 0; GemvArgs::block_scales). A block-format
/// matrix is rows * (cols / block) * block_bytes bytes, rows back to back (GemvArgs::layout needs
/// only rows, cols and the precision).
bool gemv_supported(WeightFormat format, std::size_t cols) noexcept;

/// Fused dequantize-GEMV (kernel family dequant_gemv).
Status gemv(const GemvArgs& args, cudaStream_t stream) noexcept;

/// One expert's share of a grouped launch: its three matrices (laid out by the shared
/// ExpertLayout) and the tokens routed to it with their gate weights.
struct ExpertTask {
  const std::byte* w1 = nullptr;
  const std::byte* w3 = nullptr;
  const std::byte* w2 = nullptr;
  std::uint32_t n = 0;                       ///< tokens, 1..kMaxGemvTokens
  std::uint32_t token[kMaxGemvTokens] = {};  ///< row of x (and of out) of each token
  float weight[kMaxGemvTokens] = {};         ///< gate weight of each token
};

/// All experts of one step in two launches (fused SwiGLU over w1/w3, then w2 with the weighted
/// scatter-add): out[token] += weight * W2 (silu(W1 x[token]) * (W3 x[token])).
/// `out` accumulates (the caller initializes it: zeros, or the residual); additions from several
/// experts into one token use atomics, so the order of the f32 sums is not fixed.
struct GroupedExpertArgs {
  ExpertLayout layout{};              ///< shared by every task
  const ExpertTask* tasks = nullptr;  ///< host array, copied into the launch parameters
  std::uint32_t count = 0;            ///< 1..kMaxGroupExperts
  const float* x = nullptr;           ///< [tokens x hidden]
  std::size_t ldx = 0;
  float* out = nullptr;  ///< [tokens x hidden]
  std::size_t ldo = 0;
  float* workspace = nullptr;  ///< grouped_expert_workspace_bytes(); 16-byte aligned
  /// int4/int2 and GGUF Q8_0/Q4_0/Q4_K: true keeps the f32-activation kernels; false (default)
  /// quantizes x, and the SwiGLU activation h before w2, to int8 per weight group (32 columns for
  /// the GGUF formats) with the CPU's rule (the q8 path of GemvArgs, twice). Float formats and fp8
  /// always run f32 activations.
  bool exact = false;
};

/// The first part of grouped_expert_ffn's scratch: the f32 SwiGLU activations
/// [count][kMaxGemvTokens][ffn], rounded up to 256 bytes.
constexpr std::size_t grouped_h_bytes(ExpertShape shape, std::uint32_t count) noexcept {
  return align_up(static_cast<std::size_t>(count) * kMaxGemvTokens * shape.ffn * sizeof(float), 256);
}
/// Device scratch that grouped_expert_ffn needs for `count` experts of `shape`: the f32 SwiGLU
/// activations, then (q8 path of the GGUF formats) the quantized x and h of every (expert, token).
constexpr std::size_t grouped_expert_workspace_bytes(ExpertShape shape, std::uint32_t count) noexcept {
  const std::size_t rows = static_cast<std::size_t>(count) * kMaxGemvTokens;
  return grouped_h_bytes(shape, count) + q8_rows_bytes(shape.hidden, rows) + q8_rows_bytes(shape.ffn, rows);
}

/// Fused SwiGLU experts (kernel family swiglu_gemv + down_scatter_gemv; int4/int2 by default
/// q8_swiglu + q8_down_scatter, see GroupedExpertArgs::exact; the block formats Q8_0/Q4_0/Q4_K/fp8
/// block_swiglu_gemv + block_down_scatter_gemv, reading each matrix from its task pointer as rows of
/// blocks, with quantize launches before each on the GGUF q8 path). fp8 e4m3 experts take each
/// matrix's block scales from the layout: at w + layout.w1.scales_offset (w1, w3) and
/// w + layout.w2.scales_offset (w2), as expert_layout() places them (kInvalidArgument without them).
Status grouped_expert_ffn(const GroupedExpertArgs& args, cudaStream_t stream) noexcept;

/// Router variants (all of the CPU router's).
enum class RouterScore : std::uint8_t {
  kSoftmax = 0,  ///< p = softmax(logits); select top-k of p (Mixtral, Qwen2-MoE)
  kSigmoid = 1,  ///< s = sigmoid(logits); select top-k of s + bias; weights from s (DeepSeek-V3)
};

/// Top-k routing, one warp per token: idx[t*k + j], weight[t*k + j] for j < k, ordered by
/// decreasing selection score (ties: lower expert first).
///  - Mixtral:     kSoftmax, renormalize = true,  scaling = 1
///  - Qwen2-MoE:   kSoftmax, renormalize = false, scaling = 1
///  - DeepSeek-V3: kSigmoid, bias = e_score_correction_bias, renormalize = true, scaling = 2.5
/// Group-limited selection (DeepSeek-V3: n_group = 8, topk_group = 4): the experts are cut into
/// n_group equal groups; a group's score is the sum of its best two selection scores (kSigmoid)
/// or its best one (kSoftmax), as in the CPU router (src/route/router.cpp); only the experts of
/// the topk_group best groups (ties: lower group first) can be selected.
struct RouterArgs {
  const float* logits = nullptr;  ///< [tokens x experts], row stride ld
  std::size_t ld = 0;
  std::uint32_t tokens = 0;
  std::uint32_t experts = 0;  ///< 1..256
  std::uint32_t k = 0;        ///< 1..min(kMaxTopK, experts)
  RouterScore score = RouterScore::kSoftmax;
  const float* bias = nullptr;   ///< [experts], selection only; null: none
  bool renormalize = true;       ///< divide the k weights by their sum
  float scaling = 1.f;           ///< multiplies the final weights
  std::uint32_t n_group = 1;     ///< 1..32, divides experts
  std::uint32_t topk_group = 1;  ///< 1..n_group; k <= topk_group * experts / n_group
  std::int32_t* idx = nullptr;   ///< [tokens x k]
  float* weight = nullptr;       ///< [tokens x k]
};
Status route_topk(const RouterArgs& args, cudaStream_t stream) noexcept;

/// Weighted combine: out[t*ldo + c] (+)= sum_{j<k} weight[t*k + j] * eo[(t*k + j)*ld_eo + c].
struct CombineArgs {
  const float* eo = nullptr;  ///< expert outputs, one row per (token, choice)
  std::size_t ld_eo = 0;
  const float* weight = nullptr;  ///< [tokens x k]
  std::uint32_t tokens = 0;
  std::uint32_t k = 0;
  std::uint32_t hidden = 0;
  float* out = nullptr;
  std::size_t ldo = 0;
  bool accumulate = false;
};
Status weighted_combine(const CombineArgs& args, cudaStream_t stream) noexcept;

/// dst[i] = bf16(src[i]) (round to nearest even), for i < count.
Status convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count, cudaStream_t stream) noexcept;

/// out[i] = bf16(silu(gate[i]) * up[i]) for i < count (the SwiGLU activation of the cuBLAS path,
/// rounded to bf16 as the next product's input).
Status swiglu_to_bf16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                      cudaStream_t stream) noexcept;

/// cuBLAS path for larger batches: y[t*ldy + r] = sum_c W[r][c] x[t*ldx + c] with W bf16
/// [rows x cols] row-major, x bf16 [n x cols], y f32; f32 accumulation (cublasGemmEx).
struct GemmBf16Args {
  const std::uint16_t* w = nullptr;
  std::size_t rows = 0;
  std::size_t cols = 0;
  const std::uint16_t* x = nullptr;
  std::size_t ldx = 0;
  float* y = nullptr;
  std::size_t ldy = 0;
  std::size_t n = 0;
};
/// Creates / destroys a cuBLAS handle (so callers need no cuBLAS header).
Status cublas_create(cublasContext** handle) noexcept;
void cublas_destroy(cublasContext* handle) noexcept;
Status gemm_bf16(cublasContext* handle, const GemmBf16Args& args, cudaStream_t stream) noexcept;

/// dst[i] = f16(src[i]) (round to nearest even), for i < count.
Status convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count, cudaStream_t stream) noexcept;
/// out[i] = f16(silu(gate[i]) * up[i]) for i < count (the f16 twin of swiglu_to_bf16).
Status swiglu_to_f16(const float* gate, const float* up, std::uint16_t* out, std::size_t count,
                     cudaStream_t stream) noexcept;

/// cuBLASLt path for larger batches: y[t*ldy + r] = sum_c W[r][c] x[t*ldx + c] with W bf16 or f16
/// [rows x cols] row-major, x of the same type [n x cols], y f32; f32 accumulation
/// (cublasLtMatmul, the heuristic's first algorithm, remembered per problem shape in the context).
struct GemmLtArgs {
  Precision type = Precision::kBF16;  ///< kBF16 or kF16 (w and x)
  const void* w = nullptr;
  std::size_t rows = 0;
  std::size_t cols = 0;
  const void* x = nullptr;
  std::size_t ldx = 0;
  float* y = nullptr;
  std::size_t ldy = 0;
  std::size_t n = 0;
};
/// A cuBLASLt handle, its device workspace and the cached plans (one thread at a time).
struct LtContext;
/// Creates a context with `workspace_bytes` of device workspace for the algorithms (e.g. 32 MB).
Status lt_create(LtContext** ctx, std::size_t workspace_bytes) noexcept;
void lt_destroy(LtContext* ctx) noexcept;
Status gemm_lt(LtContext* ctx, const GemmLtArgs& args, cudaStream_t stream) noexcept;

/// Status from a CUDA error code ("<what>: <cuda error string>"); ok for cudaSuccess.
Status cuda_status(cudaError_t err, const char* what) noexcept;

}  // namespace cuda
MOEX_NAMESPACE_END
