#pragma once
/// @file gemv_block.cuh
/// Device templates of the block-format GEMV family (block_gemv, block_swiglu_gemv,
/// block_down_scatter_gemv): GGUF Q8_0, Q4_0, Q4_K read in their exact byte layout
/// (moex/quant/ggml.hpp), and fp8 e4m3 with f32 block scales kept apart (DeepSeek-V3).
///
/// Work split: a warp owns one row. Rows are sequences of self-contained blocks whose size (34 and
/// 18 bytes for Q8_0/Q4_0) is no multiple of 16, so a row need not start 16-byte aligned. The warp
/// therefore streams its row in tiles of 1024 or 2048 weights (about 1 KB): every lane issues up
/// to three 16-byte loads of the tile's aligned-down byte range into registers, the registers go
/// to a per-warp shared-memory buffer, and each lane then decodes one or two 32-weight units (a
/// Q8_0/Q4_0 block, a Q4_K sub-block, 32 fp8 bytes) from shared memory. The next tile's loads are
/// issued before the current tile is decoded, so one tile per warp is always in flight. Sums are
/// f32: codes decode by bit moves only (no I2F; see tile_chunk) to f_j with weight = d f_j + mn, and
/// per unit acc += d * sum f_j x_j + mn * sum x_j. The grouped kernels are bounded to 168
/// registers (3 blocks per SM): below that ptxas spills at batch 4 and 8.

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

#include "kernels.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline constexpr int kBlockWarps = 4;  ///< warps per block of the block-format kernels

/// Compile-time facts of a block format: weights and bytes per block, 32-weight units per lane
/// and tile.
template <Precision P>
struct BlockTraits;
template <>
struct BlockTraits<Precision::kQ8_0> {
  static constexpr int kBlockWeights = 32, kBlockBytes = 34, kUnitsPerLane = 1;
};
template <>
struct BlockTraits<Precision::kQ4_0> {
  static constexpr int kBlockWeights = 32, kBlockBytes = 18, kUnitsPerLane = 2;
};
template <>
struct BlockTraits<Precision::kQ4_K> {
  static constexpr int kBlockWeights = 256, kBlockBytes = 144, kUnitsPerLane = 2;
};
template <>
struct BlockTraits<Precision::kFp8E4M3> {  // "blocks" of 32 bytes; the scales live apart
  static constexpr int kBlockWeights = 32, kBlockBytes = 32, kUnitsPerLane = 1;
};

template <Precision P>
inline constexpr int kTileWeights = 32 * 32 * BlockTraits<P>::kUnitsPerLane;
template <Precision P>
inline constexpr int kTileBytes = kTileWeights<P> / BlockTraits<P>::kBlockWeights* BlockTraits<P>::kBlockBytes;
/// 16-byte chunks that one tile can touch (one more for a misaligned start), per lane.
template <Precision P>
inline constexpr int kChunksPerLane = ((kTileBytes<P> + 15) / 16 + 1 + 31) / 32;
/// Shared-memory chunks per warp (the largest over the formats).
inline constexpr int kWarpChunks = 96;
static_assert(32 * kChunksPerLane<Precision::kQ8_0> <= kWarpChunks);
static_assert(32 * kChunksPerLane<Precision::kQ4_0> <= kWarpChunks);
static_assert(32 * kChunksPerLane<Precision::kQ4_K> <= kWarpChunks);
static_assert(32 * kChunksPerLane<Precision::kFp8E4M3> <= kWarpChunks);

/// One matrix in a block format: `rows` rows of `row_bytes` bytes each, back to back from `w`.
struct BlockMatrix {
  const std::uint8_t* w;
  std::size_t rows, cols, row_bytes;
  const float* scales;    ///< fp8 only: [ceil(rows/B) x scale_ld] f32 block scales
  std::size_t scale_ld;   ///< fp8 only: ceil(cols/B)
  std::uint32_t scale_b;  ///< fp8 only: B, a multiple of 32
};

__device__ __forceinline__ float half_bits(std::uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

__device__ __forceinline__ std::uint32_t lds16(const std::uint8_t* p) {
  return *reinterpret_cast<const std::uint16_t*>(p);
}

/// Loads this lane's chunks of the tile starting at byte `a0` (16-aligned) into v; chunks at or
/// past `end` (bytes from the matrix start, exclusive) are not loaded, a chunk crossing the matrix
/// end `total` is read byte by byte.
template <Precision P>
__device__ __forceinline__ void load_tile(const std::uint8_t* w, std::size_t a0, std::size_t end, std::size_t total,
                                          uint4 (&v)[kChunksPerLane<P>], int lane) {
#pragma unroll
  for (int i = 0; i < kChunksPerLane<P>; ++i) {
    const std::size_t at = a0 + static_cast<std::size_t>(lane + 32 * i) * 16;
    if (at >= end) continue;
    if (at + 16 <= total) {
      v[i] = __ldcs(reinterpret_cast<const uint4*>(w + at));
    } else {
      uint4 r = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        if (at + static_cast<std::size_t>(b) >= total) break;
        const std::uint32_t byte = static_cast<std::uint32_t>(w[at + static_cast<std::size_t>(b)]) << (8 * (b % 4));
        if (b < 4) {
          r.x |= byte;
        } else if (b < 8) {
          r.y |= byte;
        } else if (b < 12) {
          r.z |= byte;
        } else {
          r.w |= byte;
        }
      }
      v[i] = r;
    }
  }
}

/// 1 + n / 2^8 (n < 256 in bits 15..22 of `bits`, the rest zero): the mantissa trick of gemv.cuh, one
/// LOP3 instead of an I2F (quarter rate on sm_90, too slow for 4-bit weights at HBM speed).
__device__ __forceinline__ float one_plus(std::uint32_t bits) { return __uint_as_float(0x3F800000u | bits); }

/// Q4_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at sc (ggml's layout).
__device__ __forceinline__ void q4k_scale_min(const std::uint8_t* sc, int j, std::uint32_t& scale,
                                              std::uint32_t& mins) {
  if (j < 4) {
    scale = sc[j] & 63u;
    mins = sc[j + 4] & 63u;
  } else {
    scale = (sc[j + 4] & 0xFu) | ((sc[j - 4] >> 6) << 4);
    mins = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

/// Decodes 4-weight chunk `part` (0..7) of 32-weight unit u of a tile (shared memory at s: the
/// tile's first byte) and accumulates it, so that the 32 lanes of a warp cover 128 consecutive
/// columns and their x loads are one contiguous 512 B. Every format decodes to f_j with the
/// weights = d * f_j + mn: integer codes n as f = 1 + n/2^b (so that d and mn absorb the offsets;
/// Q8_0: q = 256 f - 384, Q4_0: q = 16 f - 24, Q4_K: (d sc) 16 (f - 1) - dmin m), fp8 as its bits
/// moved into an f32 with the exponent bias left at 7 (value * 2^-120; d carries the 2^120; NaN
/// codes read as 480 instead of NaN).
template <Precision P, int T>
__device__ __forceinline__ void tile_chunk(const std::uint8_t* s, int u, int part, const BlockMatrix& m,
                                           std::size_t row, std::size_t col, const float* const (&xp)[T],
                                           float (&acc)[T]) {
  (void)m;
  (void)row;
  float f[4];
  float d = 0.f, mn = 0.f;
  if constexpr (P == Precision::kQ8_0) {
    const std::uint8_t* b = s + 34 * u;
    const float dh = half_bits(lds16(b));
    const std::uint32_t h0 = lds16(b + 2 + 4 * part) ^ 0x8080u, h1 = lds16(b + 4 + 4 * part) ^ 0x8080u;
    f[0] = one_plus((h0 & 0xFFu) << 15);
    f[1] = one_plus((h0 & 0xFF00u) << 7);
    f[2] = one_plus((h1 & 0xFFu) << 15);
    f[3] = one_plus((h1 & 0xFF00u) << 7);
    d = 256.f * dh;
    mn = -384.f * dh;
  } else if constexpr (P == Precision::kQ4_0) {
    const std::uint8_t* b = s + 18 * u;
    const float dh = half_bits(lds16(b));
    const int sh = part >= 4 ? 4 : 0;
    const std::uint32_t h0 = lds16(b + 2 + 4 * (part & 3)) >> sh, h1 = lds16(b + 4 + 4 * (part & 3)) >> sh;
    f[0] = one_plus((h0 & 0xFu) << 19);
    f[1] = one_plus(((h0 >> 8) & 0xFu) << 19);
    f[2] = one_plus((h1 & 0xFu) << 19);
    f[3] = one_plus(((h1 >> 8) & 0xFu) << 19);
    d = 16.f * dh;
    mn = -24.f * dh;
  } else if constexpr (P == Precision::kQ4_K) {
    const std::uint8_t* b = s + 144 * (u / 8);
    const int j = u % 8;
    const std::uint32_t dd = *reinterpret_cast<const std::uint32_t*>(b);
    const std::uint8_t* sc = b + 4;
    std::uint32_t scale, mins;
    q4k_scale_min(sc, j, scale, mins);
    const float dsc = half_bits(dd & 0xffffu) * static_cast<float>(scale);
    const float dm = half_bits(dd >> 16) * static_cast<float>(mins);
    d = 16.f * dsc;
    mn = -(16.f * dsc + dm);
    const std::uint32_t w = *reinterpret_cast<const std::uint32_t*>(b + 16 + 32 * (j / 2) + 4 * part);
    const std::uint32_t nib = (w >> ((j & 1) * 4)) & 0x0F0F0F0Fu;
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = one_plus(((nib >> (8 * e)) & 0xFu) << 19);
  } else {
    static_assert(P == Precision::kFp8E4M3);
    const std::uint32_t w = *reinterpret_cast<const std::uint32_t*>(s + 32 * u + 4 * part);
    d = __ldg(m.scales + (row / m.scale_b) * m.scale_ld + col / m.scale_b) * __uint_as_float(0x7B800000u);  // 2^120
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const std::uint32_t byte = (w >> (8 * e)) & 0xFFu;
      f[e] = __uint_as_float(((byte & 0x80u) << 24) | ((byte & 0x7Fu) << 20));
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(xp[t] + col));
    float sum = f[0] * x.x;
    sum = fmaf(f[1], x.y, sum);
    sum = fmaf(f[2], x.z, sum);
    sum = fmaf(f[3], x.w, sum);
    if constexpr (P != Precision::kFp8E4M3) {
      acc[t] = fmaf(d, sum, fmaf(mn, (x.x + x.y) + (x.z + x.w), acc[t]));
    } else {
      acc[t] = fmaf(d, sum, acc[t]);
    }
  }
}

/// acc[t] = the dot product of row `row` of m with the T token vectors xp[t]; every lane ends with
/// the totals. `smem`: this warp's kWarpChunks 16-byte chunks.
template <Precision P, int T>
__device__ __forceinline__ void block_row_dot(const BlockMatrix& m, std::size_t row, const float* const (&xp)[T],
                                              float (&acc)[T], int lane, uint4* smem) {
  using Tr = BlockTraits<P>;
  constexpr int kL = kChunksPerLane<P>;
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.f;
  const std::size_t total = m.rows * m.row_bytes;
  const std::size_t row_begin = row * m.row_bytes, row_end = row_begin + m.row_bytes;
  const std::size_t tiles = (m.cols + kTileWeights<P> - 1) / kTileWeights<P>;
  uint4 v[kL];
#pragma unroll
  for (int i = 0; i < kL; ++i) v[i] = make_uint4(0, 0, 0, 0);
  auto tile_begin = [&](std::size_t k) { return row_begin + k * static_cast<std::size_t>(kTileBytes<P>); };
  auto tile_end = [&](std::size_t k) {
    const std::size_t e = tile_begin(k) + kTileBytes<P>;
    return e < row_end ? e : row_end;
  };
  load_tile<P>(m.w, tile_begin(0) & ~std::size_t{15}, tile_end(0), total, v, lane);
  const auto* sb = reinterpret_cast<const std::uint8_t*>(smem);
  for (std::size_t k = 0; k < tiles; ++k) {
    const std::size_t tb = tile_begin(k), a0 = tb & ~std::size_t{15}, te = tile_end(k);
#pragma unroll
    for (int i = 0; i < kL; ++i)
      if (a0 + static_cast<std::size_t>(lane + 32 * i) * 16 < te) smem[lane + 32 * i] = v[i];
    __syncwarp();
    if (k + 1 < tiles) load_tile<P>(m.w, tile_begin(k + 1) & ~std::size_t{15}, tile_end(k + 1), total, v, lane);
    const std::size_t col0 = k * static_cast<std::size_t>(kTileWeights<P>);
    const std::size_t left = m.cols - col0;
    const int units =
        left >= static_cast<std::size_t>(kTileWeights<P>) ? 32 * Tr::kUnitsPerLane : static_cast<int>(left / 32);
#pragma unroll 4
    for (int i = 0; i < 8 * Tr::kUnitsPerLane; ++i) {
      const int c = lane + 32 * i;  // 4-weight chunk of the tile
      if (c < 8 * units)
        tile_chunk<P, T>(sb + (tb - a0), c >> 3, c & 7, m, row, col0 + 4 * static_cast<std::size_t>(c), xp, acc);
    }
    __syncwarp();
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float s = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    acc[t] = s;
  }
}

/// Launch parameters of block_gemv.
struct BlockGemvParams {
  BlockMatrix m;
  const float* x;
  std::size_t ldx;
  float* y;
  std::size_t ldy;
  std::uint32_t n;
  bool accumulate;
};

template <Precision P, int T>
__global__ void __launch_bounds__(kBlockWarps * 32) block_gemv(const BlockGemvParams p) {
  __shared__ uint4 smem[kBlockWarps][kWarpChunks];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row = static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp);
  if (row >= p.m.rows) return;  // whole warp
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = p.x + (t < static_cast<int>(p.n) ? t : 0) * p.ldx;
  float acc[T];
  block_row_dot<P, T>(p.m, row, xp, acc, lane, smem[warp]);
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < T; ++t)
      if (t < static_cast<int>(p.n)) {
        float* o = p.y + t * p.ldy + row;
        *o = p.accumulate ? *o + acc[t] : acc[t];
      }
  }
}

/// Launch parameters of the grouped block-format expert kernels (no fp8: tasks carry no scales).
struct BlockGroupParams {
  ExpertTask tasks[kMaxGroupExperts];
  std::uint32_t count;
  std::size_t hidden, ffn;
  std::size_t up_row_bytes, down_row_bytes;
  const float* x;
  std::size_t ldx;
  float* h;  ///< workspace [count][kMaxGemvTokens][ffn]
  float* out;
  std::size_t ldo;
};

__device__ __forceinline__ float block_silu(float v) { return v / (1.f + __expf(-v)); }

template <Precision P, int T>
__global__ void __launch_bounds__(kBlockWarps * 32, 3) block_swiglu_gemv(const __grid_constant__ BlockGroupParams p) {
  __shared__ uint4 smem[kBlockWarps][kWarpChunks];
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row = static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp);
  if (row >= p.ffn) return;
  const int n = static_cast<int>(task.n);
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = p.x + task.token[t < n ? t : 0] * p.ldx;
  float a1[T], a3[T];
  // One copy of the row loop for both matrices (two inlined copies made ptxas spill).
#pragma unroll 1
  for (int k = 0; k < 2; ++k) {
    float acc[T];
    const BlockMatrix w{reinterpret_cast<const std::uint8_t*>(k == 0 ? task.w1 : task.w3),
                        p.ffn,
                        p.hidden,
                        p.up_row_bytes,
                        nullptr,
                        0,
                        0};
    block_row_dot<P, T>(w, row, xp, acc, lane, smem[warp]);
#pragma unroll
    for (int t = 0; t < T; ++t) {
      if (k == 0) {
        a1[t] = acc[t];
      } else {
        a3[t] = acc[t];
      }
    }
  }
  if (lane == 0) {
    float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
#pragma unroll
    for (int t = 0; t < T; ++t)
      if (t < n) h[t * p.ffn + row] = block_silu(a1[t]) * a3[t];
  }
}

template <Precision P, int T>
__global__ void __launch_bounds__(kBlockWarps * 32, 3)
    block_down_scatter_gemv(const __grid_constant__ BlockGroupParams p) {
  __shared__ uint4 smem[kBlockWarps][kWarpChunks];
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row = static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp);
  if (row >= p.hidden) return;
  const int n = static_cast<int>(task.n);
  const float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = h + (t < n ? t : 0) * p.ffn;
  const BlockMatrix w2{
      reinterpret_cast<const std::uint8_t*>(task.w2), p.hidden, p.ffn, p.down_row_bytes, nullptr, 0, 0};
  float acc[T];
  block_row_dot<P, T>(w2, row, xp, acc, lane, smem[warp]);
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < T; ++t)
      if (t < n) atomicAdd(p.out + task.token[t] * p.ldo + row, task.weight[t] * acc[t]);
  }
}

inline unsigned block_blocks_for(std::size_t rows) {
  return static_cast<unsigned>((rows + kBlockWarps - 1) / kBlockWarps);
}

}  // namespace detail

template <Precision P, int T>
Status launch_gemv_block(const GemvArgs& a, cudaStream_t stream) noexcept {
  using Tr = detail::BlockTraits<P>;
  const std::size_t rows = a.layout.rows, cols = a.layout.cols;
  detail::BlockGemvParams p{};
  p.m = {reinterpret_cast<const std::uint8_t*>(a.w),
         rows,
         cols,
         cols / Tr::kBlockWeights * Tr::kBlockBytes,
         a.block_scales,
         0,
         a.scale_block};
  if constexpr (P == Precision::kFp8E4M3) p.m.scale_ld = (cols + a.scale_block - 1) / a.scale_block;
  p.x = a.x;
  p.ldx = a.ldx;
  p.y = a.y;
  p.ldy = a.ldy;
  p.n = a.n;
  p.accumulate = a.accumulate;
  detail::block_gemv<P, T><<<detail::block_blocks_for(rows), detail::kBlockWarps * 32, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "block_gemv launch");
}

template <Precision P, int T>
Status launch_grouped_expert_block(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  using Tr = detail::BlockTraits<P>;
  detail::BlockGroupParams p{};
  for (std::uint32_t i = 0; i < a.count; ++i) p.tasks[i] = a.tasks[i];
  p.count = a.count;
  p.hidden = a.layout.shape.hidden;
  p.ffn = a.layout.shape.ffn;
  p.up_row_bytes = p.hidden / Tr::kBlockWeights * Tr::kBlockBytes;
  p.down_row_bytes = p.ffn / Tr::kBlockWeights * Tr::kBlockBytes;
  p.x = a.x;
  p.ldx = a.ldx;
  p.h = a.workspace;
  p.out = a.out;
  p.ldo = a.ldo;
  const dim3 up_grid(detail::block_blocks_for(p.ffn), a.count);
  detail::block_swiglu_gemv<P, T><<<up_grid, detail::kBlockWarps * 32, 0, stream>>>(p);
  MOEX_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "block_swiglu_gemv launch"));
  const dim3 down_grid(detail::block_blocks_for(p.hidden), a.count);
  detail::block_down_scatter_gemv<P, T><<<down_grid, detail::kBlockWarps * 32, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "block_down_scatter_gemv launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END

/// Explicit instantiations of one block format for every token bucket (1, 2, 4, 8).
#define MOEX_INSTANTIATE_GEMV_BLOCK(P)                                                                 \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 1>(const GemvArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 2>(const GemvArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 4>(const GemvArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 8>(const GemvArgs&, cudaStream_t) noexcept;

/// ... and of its grouped experts (not fp8, whose scales ExpertTask does not carry).
#define MOEX_INSTANTIATE_GROUPED_BLOCK(P)                                                         \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 1>(const GroupedExpertArgs&, \
                                                                        cudaStream_t) noexcept;   \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 2>(const GroupedExpertArgs&, \
                                                                        cudaStream_t) noexcept;   \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 4>(const GroupedExpertArgs&, \
                                                                        cudaStream_t) noexcept;   \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 8>(const GroupedExpertArgs&, \
                                                                        cudaStream_t) noexcept;
