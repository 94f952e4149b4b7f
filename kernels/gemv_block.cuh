#pragma once
/// @file gemv_block.cuh
/// Device templates of the block-format GEMV family (block_gemv, block_swiglu_gemv,
/// block_down_scatter_gemv): GGUF Q8_0, Q4_0, Q4_K read in their exact byte layout
/// (moex/quant/ggml.hpp), and fp8 e4m3 with f32 block scales kept apart (DeepSeek-V3).
///
/// Work split: a warp owns a group of R rows (kBlockRows: 2-4), so that each x load and each x sum
/// serves all of them. Rows are sequences of self-contained blocks whose size (34 and 18 bytes for
/// Q8_0/Q4_0) is no multiple of 16, so a row need not start 16-byte aligned. The warp therefore
/// streams each row in tiles of 1024 or 2048 weights (about 1 KB): every lane issues up to three
/// 16-byte loads per row of the tile's aligned-down byte range into registers, the registers go to
/// per-warp shared memory, each unit's scale pair (d, mn) is decoded once into shared memory, and
/// each lane then decodes 8-weight parts of the tile from shared memory (32 lanes: 256 consecutive
/// columns, one contiguous 1 KB of x per token). The next tile's loads are issued before the current
/// tile is decoded, so one tile per row is always in flight. Sums are f32: codes decode by bit moves
/// only (no I2F; see decode8) to f_j with weight = d f_j + mn, and per part
/// acc += d * sum f_j x_j + mn * sum x_j. The grouped kernels are bounded to 168 registers (3 blocks
/// per SM).
///
/// q8 path (GGUF formats, GemvArgs::workspace given, exact == false): x is first quantized to int8
/// per 32-column group by quantize_x32 (kernels/quantize_x32.cu, the CPU's Q8 rule), so that every
/// 8-weight part costs two dp4a per row instead of eight decodes and FMAs; a unit's dot is
/// d_x * (dw * sum c_j q_j + mn * sum q_j) (BlockX, unit_scale_q8, q8_words). ncu on the H100
/// (Q4_0, the 256 MB benchmark matrix): the f32 path is issue bound (73% of
/// issue slots, DRAM 47%); the q8 path is latency bound (issue 64%, 36% of cycles with no eligible
/// warp, 16 warps per SM: 128 registers, 48 of them the register-staged tiles).

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

#include "device_math.cuh"
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
  static constexpr int kBlockWeights = 32, kBlockBytes = 34, kUnitsPerLane = 1, kRows = 2;
};
template <>
struct BlockTraits<Precision::kQ4_0> {
  static constexpr int kBlockWeights = 32, kBlockBytes = 18, kUnitsPerLane = 2, kRows = 4;
};
template <>
struct BlockTraits<Precision::kQ4_K> {
  static constexpr int kBlockWeights = 256, kBlockBytes = 144, kUnitsPerLane = 2, kRows = 4;
};
template <>
struct BlockTraits<Precision::kFp8E4M3> {  // "blocks" of 32 bytes; the scales live apart
  static constexpr int kBlockWeights = 32, kBlockBytes = 32, kUnitsPerLane = 1, kRows = 4;
};

template <Precision P>
inline constexpr int kTileWeights = 32 * 32 * BlockTraits<P>::kUnitsPerLane;
template <Precision P>
inline constexpr int kTileBytes = kTileWeights<P> / BlockTraits<P>::kBlockWeights* BlockTraits<P>::kBlockBytes;
/// 16-byte chunks that one tile can touch (one more for a misaligned start), per lane.
template <Precision P>
inline constexpr int kChunksPerLane = ((kTileBytes<P> + 15) / 16 + 1 + 31) / 32;
/// Shared-memory chunks per warp and row (the largest over the formats).
inline constexpr int kWarpChunks = 96;
/// Most rows a warp decodes at once, and most 32-weight units in a tile.
inline constexpr int kMaxBlockRows = 4, kMaxTileUnits = 64;
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

/// Row-group height: rows a warp decodes together, so that each x load and x sum serves them
/// all. Fewer rows at batch >= 4, where the decoded weights of every row stay live across tokens.
template <Precision P, int T>
inline constexpr int kBlockRows = T >= 4 ? 2 : BlockTraits<P>::kRows;

/// Per-warp shared memory: each row's staged tile and the (d, mn) pair of each of its 32-weight
/// units.
struct BlockWarpSmem {
  uint4 chunks[kMaxBlockRows][kWarpChunks];
  float2 unit[kMaxBlockRows][kMaxTileUnits];
};

/// (d, mn) of 32-weight unit u of a tile (shared memory at s: the tile's first byte; col: the
/// unit's first column) such that every weight of the unit is d * f + mn, f as decode8 makes it.
template <Precision P>
__device__ __forceinline__ float2 unit_scale(const std::uint8_t* s, int u, const BlockMatrix& m, std::size_t row,
                                             std::size_t col) {
  if constexpr (P == Precision::kQ8_0) {
    const float dh = half_bits(lds16(s + 34 * u));
    return make_float2(256.f * dh, -384.f * dh);  // q = 256 f - 384
  } else if constexpr (P == Precision::kQ4_0) {
    const float dh = half_bits(lds16(s + 18 * u));
    return make_float2(16.f * dh, -24.f * dh);  // q = 16 f - 24
  } else if constexpr (P == Precision::kQ4_K) {
    const std::uint8_t* b = s + 144 * (u / 8);
    const std::uint32_t dd = *reinterpret_cast<const std::uint32_t*>(b);
    std::uint32_t scale, mins;
    q4k_scale_min(b + 4, u % 8, scale, mins);
    const float dsc = half_bits(dd & 0xffffu) * static_cast<float>(scale);
    const float dm = half_bits(dd >> 16) * static_cast<float>(mins);
    return make_float2(16.f * dsc, -(16.f * dsc + dm));  // (d sc) 16 (f - 1) - dmin m
  } else {
    static_assert(P == Precision::kFp8E4M3);
    (void)s;
    (void)u;
    return make_float2(__ldg(m.scales + (row / m.scale_b) * m.scale_ld + col / m.scale_b), 0.f);
  }
}

/// Decodes weights 8p..8p+7 of 32-weight unit u of a tile into f (weights = d f + mn, with d and
/// mn from unit_scale). Integer codes n decode by bit moves only, f = 1 + n/2^b (the mantissa
/// trick of gemv.cuh: one shift and one LOP3, no I2F, which is quarter rate on sm_90); fp8 e4m3
/// through the hardware's e4m3x2 -> f16x2 conversion (exact: every e4m3 value is an f16 value).
template <Precision P>
__device__ __forceinline__ void decode8(const std::uint8_t* s, int u, int p, float (&f)[8]) {
  if constexpr (P == Precision::kQ8_0) {
    const std::uint8_t* q = s + 34 * u + 2 + 8 * p;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const std::uint32_t h = lds16(q + 2 * i) ^ 0x8080u;
      f[2 * i] = one_plus((h & 0xFFu) << 15);
      f[2 * i + 1] = one_plus((h & 0xFF00u) << 7);
    }
  } else if constexpr (P == Precision::kQ4_0) {
    const std::uint8_t* q = s + 18 * u + 2 + 8 * (p & 1);
    const int sh = (p >> 1) * 4;  // weights 16..31 of a block are the high nibbles
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const std::uint32_t h = lds16(q + 2 * i) >> sh;
      f[2 * i] = one_plus((h & 0xFu) << 19);
      f[2 * i + 1] = one_plus((h & 0xF00u) << 11);
    }
  } else if constexpr (P == Precision::kQ4_K) {
    const int j = u % 8;
    const std::uint8_t* q = s + 144 * (u / 8) + 16 + 32 * (j / 2) + 8 * p;
    const int sh = (j & 1) * 4;  // odd sub-blocks are the high nibbles
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const std::uint32_t w = *reinterpret_cast<const std::uint32_t*>(q + 4 * i) >> sh;
      f[4 * i] = one_plus((w & 0xFu) << 19);
      f[4 * i + 1] = one_plus((w & 0xF00u) << 11);
      f[4 * i + 2] = one_plus((w & 0xF0000u) << 3);
      f[4 * i + 3] = one_plus((w & 0xF000000u) >> 5);
    }
  } else {
    static_assert(P == Precision::kFp8E4M3);
    const std::uint8_t* q = s + 32 * u + 8 * p;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const std::uint32_t w = *reinterpret_cast<const std::uint32_t*>(q + 4 * i);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> (16 * k)), __NV_E4M3);
        const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&hr));
        f[4 * i + 2 * k] = v.x;
        f[4 * i + 2 * k + 1] = v.y;
      }
    }
  }
}

/// The activations of T tokens as block_rows_dot reads them: f32 rows (the exact path), or, on the
/// q8 path (Q = true), int8 codes q[t][c] with one f32 scale d[t][c / 32] per 32-column group,
/// made by quantize_x32 with the CPU's Q8 rule (moex/cpu/q8_kernel.hpp).
template <int T, bool Q>
struct BlockX {
  const float* x[T];
  const std::int8_t* q[T];
  const float* d[T];
};

/// Signed 4 x 8-bit dot product (Q8_0 codes) and unsigned-by-signed (4-bit codes), into c.
__device__ __forceinline__ int dp4a_ss(std::uint32_t a, std::uint32_t b, int c) {
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
}
__device__ __forceinline__ int dp4a_us4(std::uint32_t a, std::uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
/// float(i) for |i| < 2^22 at full rate (I2F is quarter rate on sm_90): the integer is placed in
/// the mantissa of 1.5 * 2^23 and the bias subtracted.
__device__ __forceinline__ float small_int_to_float(int i) { return __int_as_float(i + 0x4B400000) - 12582912.f; }

/// (dw, mn) of 32-weight unit u for the q8 path: the unit's dot with a quantized group is
/// d_x * (dw * sum c_j q_j + mn * sum q_j) with c_j the codes as q8_words yields them.
template <Precision P>
__device__ __forceinline__ float2 unit_scale_q8(const std::uint8_t* s, int u) {
  if constexpr (P == Precision::kQ8_0) {
    return make_float2(half_bits(lds16(s + 34 * u)), 0.f);
  } else if constexpr (P == Precision::kQ4_0) {
    const float dh = half_bits(lds16(s + 18 * u));
    return make_float2(dh, -8.f * dh);
  } else {
    static_assert(P == Precision::kQ4_K);
    const std::uint8_t* b = s + 144 * (u / 8);
    const std::uint32_t dd = *reinterpret_cast<const std::uint32_t*>(b);
    std::uint32_t scale, mins;
    q4k_scale_min(b + 4, u % 8, scale, mins);
    return make_float2(half_bits(dd & 0xffffu) * static_cast<float>(scale),
                       -half_bits(dd >> 16) * static_cast<float>(mins));
  }
}

/// The codes of weights 8p..8p+7 of unit u as 8 bytes in column order (Q8_0: signed; 4-bit:
/// unsigned nibbles 0..15).
template <Precision P>
__device__ __forceinline__ uint2 q8_words(const std::uint8_t* s, int u, int p) {
  if constexpr (P == Precision::kQ8_0) {
    const std::uint8_t* q = s + 34 * u + 2 + 8 * p;
    return make_uint2(lds16(q) | (lds16(q + 2) << 16), lds16(q + 4) | (lds16(q + 6) << 16));
  } else if constexpr (P == Precision::kQ4_0) {
    const std::uint8_t* q = s + 18 * u + 2 + 8 * (p & 1);
    const int sh = (p >> 1) * 4;  // weights 16..31 of a block are the high nibbles
    const std::uint32_t a = lds16(q) | (lds16(q + 2) << 16), b = lds16(q + 4) | (lds16(q + 6) << 16);
    return make_uint2((a >> sh) & 0x0F0F0F0Fu, (b >> sh) & 0x0F0F0F0Fu);
  } else {
    static_assert(P == Precision::kQ4_K);
    const int j = u % 8;
    const std::uint8_t* q = s + 144 * (u / 8) + 16 + 32 * (j / 2) + 8 * p;
    const int sh = (j & 1) * 4;  // odd sub-blocks are the high nibbles
    const uint2 w = *reinterpret_cast<const uint2*>(q);
    return make_uint2((w.x >> sh) & 0x0F0F0F0Fu, (w.y >> sh) & 0x0F0F0F0Fu);
  }
}

/// acc[r][t] = the dot product of row min(row0 + r, rows - 1) of m with token t of `in` (f32, or
/// int8 groups on the q8 path), for R rows at once; every lane ends with the totals. sm: this
/// warp's shared memory.
template <Precision P, int T, int R, bool Q>
__device__ __forceinline__ void block_rows_dot(const BlockMatrix& m, std::size_t row0, const BlockX<T, Q>& in,
                                               float (&acc)[R][T], int lane, BlockWarpSmem& sm) {
  using Tr = BlockTraits<P>;
  constexpr int kL = kChunksPerLane<P>;
  constexpr bool kHasMin = P != Precision::kFp8E4M3;
  static_assert(R <= kMaxBlockRows);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  const std::size_t total = m.rows * m.row_bytes;
  const std::size_t tiles = (m.cols + kTileWeights<P> - 1) / kTileWeights<P>;
  std::size_t row[R], row_begin[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row[r] = row0 + r < m.rows ? row0 + r : m.rows - 1;
    row_begin[r] = row[r] * m.row_bytes;
  }
  auto tile_begin = [&](int r, std::size_t k) { return row_begin[r] + k * static_cast<std::size_t>(kTileBytes<P>); };
  auto tile_end = [&](int r, std::size_t k) {
    const std::size_t e = tile_begin(r, k) + kTileBytes<P>, re = row_begin[r] + m.row_bytes;
    return e < re ? e : re;
  };
  uint4 v[R][kL];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int i = 0; i < kL; ++i) v[r][i] = make_uint4(0, 0, 0, 0);
    load_tile<P>(m.w, tile_begin(r, 0) & ~std::size_t{15}, tile_end(r, 0), total, v[r], lane);
  }
  for (std::size_t k = 0; k < tiles; ++k) {
    const std::uint8_t* sb[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const std::size_t tb = tile_begin(r, k), a0 = tb & ~std::size_t{15}, te = tile_end(r, k);
#pragma unroll
      for (int i = 0; i < kL; ++i)
        if (a0 + static_cast<std::size_t>(lane + 32 * i) * 16 < te) sm.chunks[r][lane + 32 * i] = v[r][i];
      sb[r] = reinterpret_cast<const std::uint8_t*>(sm.chunks[r]) + (tb - a0);
    }
    __syncwarp();
    if (k + 1 < tiles) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        load_tile<P>(m.w, tile_begin(r, k + 1) & ~std::size_t{15}, tile_end(r, k + 1), total, v[r], lane);
    }
    const std::size_t col0 = k * static_cast<std::size_t>(kTileWeights<P>);
    const std::size_t left = m.cols - col0;
    const int units =
        left >= static_cast<std::size_t>(kTileWeights<P>) ? 32 * Tr::kUnitsPerLane : static_cast<int>(left / 32);
    // Each unit's scale once per row (not once per 8-weight part).
#pragma unroll
    for (int i = 0; i < Tr::kUnitsPerLane; ++i) {
      const int u = lane + 32 * i;
      if (u < units) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (Q) {
            sm.unit[r][u] = unit_scale_q8<P>(sb[r], u);
          } else {
            sm.unit[r][u] = unit_scale<P>(sb[r], u, m, row[r], col0 + 32 * static_cast<std::size_t>(u));
          }
        }
      }
    }
    __syncwarp();
    // 8-weight parts: the 32 lanes cover 256 consecutive columns, so the x loads of a warp are one
    // contiguous 1 KB per token, shared by the R rows.
#pragma unroll 2
    for (int i = 0; i < 4 * Tr::kUnitsPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c >= 4 * units) break;
      const int u = c >> 2, part = c & 3;
      const std::size_t col = col0 + 8 * static_cast<std::size_t>(c);
      if constexpr (Q) {
        // q8: per row two dp4a over the part's 8 codes; the sum of the part's x codes is shared.
        uint2 w[R];
        float2 ds[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          w[r] = q8_words<P>(sb[r], u, part);
          ds[r] = sm.unit[r][u];
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
          const uint2 xq = __ldg(reinterpret_cast<const uint2*>(in.q[t] + col));
          const float dx = __ldg(in.d[t] + col / 32);
          float qs = 0.f;
          if constexpr (P != Precision::kQ8_0)
            qs = dx * small_int_to_float(dp4a_ss(xq.y, 0x01010101u, dp4a_ss(xq.x, 0x01010101u, 0)));
#pragma unroll
          for (int r = 0; r < R; ++r) {
            int dot;
            if constexpr (P == Precision::kQ8_0) {
              dot = dp4a_ss(w[r].y, xq.y, dp4a_ss(w[r].x, xq.x, 0));
            } else {
              dot = dp4a_us4(w[r].y, xq.y, dp4a_us4(w[r].x, xq.x, 0));
            }
            acc[r][t] = fmaf(ds[r].x * dx, small_int_to_float(dot), acc[r][t]);
            if constexpr (P != Precision::kQ8_0) acc[r][t] = fmaf(ds[r].y, qs, acc[r][t]);
          }
        }
      } else {
        float f[R][8];
        float2 ds[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          decode8<P>(sb[r], u, part, f[r]);
          ds[r] = sm.unit[r][u];
        }
#pragma unroll
        for (int t = 0; t < T; ++t) {
          const float4 xa = __ldg(reinterpret_cast<const float4*>(in.x[t] + col));
          const float4 xb = __ldg(reinterpret_cast<const float4*>(in.x[t] + col + 4));
          const float xs = kHasMin ? ((xa.x + xa.y) + (xa.z + xa.w)) + ((xb.x + xb.y) + (xb.z + xb.w)) : 0.f;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float sum = f[r][0] * xa.x;
            sum = fmaf(f[r][1], xa.y, sum);
            sum = fmaf(f[r][2], xa.z, sum);
            sum = fmaf(f[r][3], xa.w, sum);
            sum = fmaf(f[r][4], xb.x, sum);
            sum = fmaf(f[r][5], xb.y, sum);
            sum = fmaf(f[r][6], xb.z, sum);
            sum = fmaf(f[r][7], xb.w, sum);
            acc[r][t] = kHasMin ? fmaf(ds[r].x, sum, fmaf(ds[r].y, xs, acc[r][t])) : fmaf(ds[r].x, sum, acc[r][t]);
          }
        }
      }
    }
    __syncwarp();
  }
  warp_sum<R, T>(acc);
}

/// Launch parameters of block_gemv.
struct BlockGemvParams {
  BlockMatrix m;
  const float* x;
  std::size_t ldx;
  const std::int8_t* xq;  ///< q8 path: token t's codes at xq + t * ldq
  const float* xd;        ///< q8 path: token t's group scales at xd + t * ldd
  std::size_t ldq, ldd;
  float* y;
  std::size_t ldy;
  std::uint32_t n;
  bool accumulate;
};

template <Precision P, int T, bool Q>
__global__ void __launch_bounds__(kBlockWarps * 32) block_gemv(const BlockGemvParams p) {
  constexpr int R = kBlockRows<P, T>;
  __shared__ BlockWarpSmem smem[kBlockWarps];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp)) * R;
  if (row0 >= p.m.rows) return;  // whole warp
  BlockX<T, Q> in;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const std::size_t tt = t < static_cast<int>(p.n) ? static_cast<std::size_t>(t) : 0;
    in.x[t] = p.x + tt * p.ldx;
    in.q[t] = p.xq + tt * p.ldq;
    in.d[t] = p.xd + tt * p.ldd;
  }
  float acc[R][T];
  block_rows_dot<P, T, R, Q>(p.m, row0, in, acc, lane, smem[warp]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (t < static_cast<int>(p.n) && row0 + r < p.m.rows) {
          float* o = p.y + t * p.ldy + row0 + r;
          *o = p.accumulate ? *o + acc[r][t] : acc[r][t];
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

template <Precision P, int T>
__global__ void __launch_bounds__(kBlockWarps * 32, 3) block_swiglu_gemv(const __grid_constant__ BlockGroupParams p) {
  constexpr int R = kBlockRows<P, T>;
  __shared__ BlockWarpSmem smem[kBlockWarps];
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp)) * R;
  if (row0 >= p.ffn) return;
  const int n = static_cast<int>(task.n);
  BlockX<T, false> in{};
#pragma unroll
  for (int t = 0; t < T; ++t) in.x[t] = p.x + task.token[t < n ? t : 0] * p.ldx;
  float a1[R][T], a3[R][T];
  // One copy of the row loop for both matrices (two inlined copies made ptxas spill).
#pragma unroll 1
  for (int k = 0; k < 2; ++k) {
    float acc[R][T];
    const BlockMatrix w{reinterpret_cast<const std::uint8_t*>(k == 0 ? task.w1 : task.w3),
                        p.ffn,
                        p.hidden,
                        p.up_row_bytes,
                        nullptr,
                        0,
                        0};
    block_rows_dot<P, T, R, false>(w, row0, in, acc, lane, smem[warp]);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (k == 0) {
          a1[r][t] = acc[r][t];
        } else {
          a3[r][t] = acc[r][t];
        }
      }
  }
  if (lane == 0) {
    float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (t < n && row0 + r < p.ffn) h[t * p.ffn + row0 + r] = silu(a1[r][t]) * a3[r][t];
  }
}

template <Precision P, int T>
__global__ void __launch_bounds__(kBlockWarps * 32, 3)
    block_down_scatter_gemv(const __grid_constant__ BlockGroupParams p) {
  constexpr int R = kBlockRows<P, T>;
  __shared__ BlockWarpSmem smem[kBlockWarps];
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kBlockWarps + static_cast<std::size_t>(warp)) * R;
  if (row0 >= p.hidden) return;
  const int n = static_cast<int>(task.n);
  const float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
  BlockX<T, false> in{};
#pragma unroll
  for (int t = 0; t < T; ++t) in.x[t] = h + (t < n ? t : 0) * p.ffn;
  const BlockMatrix w2{
      reinterpret_cast<const std::uint8_t*>(task.w2), p.hidden, p.ffn, p.down_row_bytes, nullptr, 0, 0};
  float acc[R][T];
  block_rows_dot<P, T, R, false>(w2, row0, in, acc, lane, smem[warp]);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (t < n && row0 + r < p.hidden)
          atomicAdd(p.out + task.token[t] * p.ldo + row0 + r, task.weight[t] * acc[r][t]);
  }
}

/// Blocks for `rows` rows in groups of kBlockRows<P, T> per warp.
template <Precision P, int T>
inline unsigned block_blocks_for(std::size_t rows) {
  const std::size_t per_block = static_cast<std::size_t>(kBlockWarps) * kBlockRows<P, T>;
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
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
  const unsigned grid = detail::block_blocks_for<P, T>(rows);
  if constexpr (P != Precision::kFp8E4M3) {
    if (!a.exact && a.workspace != nullptr) {  // q8 path: quantize x once, then integer dot products
      const BlockQ8Workspace ws = block_q8_workspace(a.workspace, cols, a.n);
      p.xq = ws.q;
      p.xd = ws.d;
      p.ldq = ws.ldq;
      p.ldd = ws.ldd;
      MOEX_RETURN_IF_ERROR(launch_quantize_x32(a.x, a.ldx, cols, a.n, ws, stream));
      detail::block_gemv<P, T, true><<<grid, detail::kBlockWarps * 32, 0, stream>>>(p);
      return cuda_status(cudaGetLastError(), "block_gemv (q8) launch");
    }
  }
  detail::block_gemv<P, T, false><<<grid, detail::kBlockWarps * 32, 0, stream>>>(p);
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
  const dim3 up_grid(detail::block_blocks_for<P, T>(p.ffn), a.count);
  detail::block_swiglu_gemv<P, T><<<up_grid, detail::kBlockWarps * 32, 0, stream>>>(p);
  MOEX_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "block_swiglu_gemv launch"));
  const dim3 down_grid(detail::block_blocks_for<P, T>(p.hidden), a.count);
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
