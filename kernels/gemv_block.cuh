#pragma once
/// @file gemv_block.cuh
/// Device templates of the block-format GEMV family (block_gemv, block_swiglu_gemv,
/// block_down_scatter_gemv): GGUF Q8_0, Q4_0, Q4_K read in their exact byte layout
/// (moex/quant/ggml.hpp), and fp8 e4m3 with f32 block scales kept apart (DeepSeek-V3).
///
/// ## Streaming: bulk copies into a per-warp ring (sm_90)
/// A warp owns R = 4 rows at a time (a row group) and walks them in tiles of 1024 columns: one
/// stage of its ring holds the tile's bytes of all R rows (Q8_0 1088, Q4_0/Q4_K 576, fp8 1024
/// bytes a row). Lane r (r < R) brings row r's part of a stage in with one `cp.async.bulk` (the copy
/// engine, no registers), arriving on the stage's mbarrier (R arrivals) with its byte count; the
/// lanes wait on it, decode from shared memory, and lanes 0..R-1 refill the stage with the tile
/// kStages steps ahead. The grid is
/// persistent and a warp's stream of (row group, tile) steps runs on across its row groups, so the
/// ring stays full from the first tile to the last. The previous design staged each tile through
/// registers (48 of 128 registers a thread) and was latency bound on the H100 (ncu: 16 warps per SM,
/// 36% of cycles without an eligible warp, DRAM 64%).
///
/// Rows of 34- or 18-byte blocks need not start 16-byte aligned (what a bulk copy needs): a row's
/// tile is copied from its start rounded down to 16 bytes, up to its end rounded up, never past
/// the allocation (the matrix's last < 16 bytes, when its size is no multiple of 16, are copied by
/// the row's lane with plain loads); the decoders start at the tile's offset inside the copied range.
///
/// ## Dependent launches
/// The q8 GEMV is launched as a programmatic dependent of its x-quantize kernel, and each grouped
/// launch after the first as a dependent of the one before (launch_util.hpp's launch_kernel): a
/// warp fills its ring with weights, which existed before that kernel started, then waits
/// (`griddepcontrol.wait`) before it reads the kernel's output or writes anything. Worth about 1%
/// of the copy ceiling on the H100 (bench rows gemv_block_nopdl).
///
/// ## q8 path (GGUF formats; GemvArgs::workspace given, exact == false): one unit a lane
/// x is first quantized to int8 per 32-column group with the CPU's Q8 rule (quantize_rows,
/// kernels/quantize_x32.cu) together with each group's sum of codes. Lane u of a tile takes the
/// tile's 32-weight unit u of each row (Q4_K: sub-block u % 8 of super-block u / 8): it reads the
/// unit's bytes from shared memory with aligned 4- or 16-byte loads, forms its 32 codes as 8 words in
/// column order (funnel shifts and masks), and per token takes 8 dp4a against the group's codes,
/// which it reads as two 16-byte loads: the workspace keeps each tile's codes interleaved (bytes
/// 0-15 of every unit, then bytes 16-31), so a warp's load is 512 contiguous bytes. A unit's
/// dot is d_x (dw * sum c q + mn * sum q): Q8_0 dw = d, mn = 0; Q4_0 dw = d, mn = -8 d; Q4_K
/// dw = d sc, mn = -dmin m. About one instruction per weight and row.
///
/// ## f32 path (fp8, and the GGUF formats with exact or without a workspace): parts of 8
/// Four lanes share a unit, each decoding 8 weights (decode8: bit moves for integer codes, the
/// hardware e4m3x2 -> f16x2 conversion for fp8) and taking f32 x with 16-byte loads that are
/// contiguous across the warp; weight = d f + mn per unit (unit_scale), so a part adds
/// d * sum f x + mn * sum x. Exact to f32 rounding.

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

#include "block_decode.cuh"
#include "device_math.cuh"
#include "kernels.hpp"
#include "launch_util.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

/// Dynamic shared memory of one block of the block-format kernels.
template <Precision P>
constexpr std::size_t block_smem_bytes() {
  return static_cast<std::size_t>(kBlockWarps) * kWarpBytes<P>;
}

// ---- the copy engine and mbarriers (PTX, sm_90) ----

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// An mbarrier that completes a phase on `count` arrivals plus the bytes announced with them.
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, std::uint32_t count) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#endif
}
/// Makes initialized mbarriers visible to the copy engine (after mbar_init, before any copy).
__device__ __forceinline__ void mbar_init_fence() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
/// Arrives on bar and announces `bytes` more bytes for its current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
}
/// True once the phase of bar with the given parity has completed.
__device__ __forceinline__ bool mbar_try_wait(std::uint64_t* bar, std::uint32_t parity) {
  std::uint32_t done = 1;
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.b32 %0, 1, 0, p;\n\t}"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
#endif
  return done != 0;
}
/// Copies `bytes` (a multiple of 16; src and dst 16-byte aligned) from global to shared memory with
/// the copy engine; completion counts the bytes on bar.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, std::uint32_t bytes, std::uint64_t* bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
#else
  __trap();
#endif
}

// ---- decoding ----

__device__ __forceinline__ std::uint32_t lds16(const std::uint8_t* p) {
  return *reinterpret_cast<const std::uint16_t*>(p);
}

/// 1 + n / 2^8 (n < 256 in bits 15..22 of `bits`, the rest zero): the mantissa trick of gemv.cuh, one
/// LOP3 instead of an I2F (quarter rate on sm_90, too slow for 4-bit weights at HBM speed).
__device__ __forceinline__ float one_plus(std::uint32_t bits) { return __uint_as_float(0x3F800000u | bits); }

/// f32 path: (d, mn) of 32-weight unit u of a tile (shared memory at s: the tile's first byte) such
/// that every weight of the unit is d * f + mn, f as decode8 makes it. fp8: the block scale at
/// scale_row[sblk] (sblk: the scale block of the unit's columns).
template <Precision P>
__device__ __forceinline__ float2 unit_scale(const std::uint8_t* s, int u, const float* scale_row,
                                             std::uint32_t sblk) {
  if constexpr (P == Precision::kQ8_0) {
    const float dh = half_bits(lds16(s + 34 * u));
    return make_float2(256.f * dh, -384.f * dh);  // q = 256 f - 384
  } else if constexpr (P == Precision::kQ4_0) {
    const float dh = half_bits(lds16(s + 18 * u));
    return make_float2(16.f * dh, -24.f * dh);  // q = 16 f - 24
  } else if constexpr (P == Precision::kQ4_K) {
    const uint4 head = *reinterpret_cast<const uint4*>(s + 144 * (u / 8));
    std::uint32_t scale, mins;
    q4k_scale_min_words(head.y, head.z, head.w, u % 8, scale, mins);
    const float dsc = half_bits(head.x & 0xffffu) * small_int_to_float(static_cast<int>(scale));
    const float dm = half_bits(head.x >> 16) * small_int_to_float(static_cast<int>(mins));
    return make_float2(16.f * dsc, -(16.f * dsc + dm));  // (d sc) 16 (f - 1) - dmin m
  } else {
    static_assert(P == Precision::kFp8E4M3);
    (void)s;
    (void)u;
    return make_float2(__ldg(scale_row + sblk), 0.f);
  }
}

/// f32 path: decodes weights 8p..8p+7 of 32-weight unit u of a tile into f (weights = d f + mn,
/// with d and mn from unit_scale). Integer codes n decode by bit moves only, f = 1 + n/2^b (the
/// mantissa trick of gemv.cuh: one shift and one LOP3, no I2F, which is quarter rate on sm_90); fp8
/// e4m3 through the hardware's e4m3x2 -> f16x2 conversion (exact: every e4m3 value is an f16 value).
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
    const uint2 w = *reinterpret_cast<const uint2*>(s + 32 * u + 8 * p);
    const std::uint32_t ws[2] = {w.x, w.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const __half2_raw hr =
            __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(ws[i] >> (16 * k)), __NV_E4M3);
        const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&hr));
        f[4 * i + 2 * k] = v.x;
        f[4 * i + 2 * k + 1] = v.y;
      }
    }
  }
}

/// Signed 4 x 8-bit dot product (Q8_0 codes) and unsigned-by-signed (4-bit codes), into c.
__device__ __forceinline__ int dp4a_ss(std::uint32_t a, std::uint32_t b, int c) {
  return __dp4a(static_cast<int>(a), static_cast<int>(b), c);
}
__device__ __forceinline__ int dp4a_us4(std::uint32_t a, std::uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

/// Where the activations of T tokens come from: f32 rows (f32 path), or on the q8 path each
/// token's int8 codes (tile-interleaved, kernels.hpp) and its (d_x, sum q) per 32-column group.
template <int T>
struct BlockIn {
  const float* x[T];
  const std::uint8_t* q[T];
  const float2* m[T];
};

/// One row group: row r's bytes start at row[r]; its allocation ends at end[r] (exclusive), which
/// no copy reads past; fp8: the f32 block scales of its band of rows start at scale[r].
struct RowSet {
  const std::uint8_t* row[kBlockRows];
  const std::uint8_t* end[kBlockRows];
  const float* scale[kBlockRows];
};

/// q8 path over one stage: lane u takes unit u of the tile of every row.
template <Precision P, int T>
__device__ __forceinline__ void tile_dot_q8(const std::uint8_t* const (&sb)[kBlockRows], std::uint32_t col0,
                                            int units, const BlockIn<T>& in, int lane,
                                            float (&acc)[kBlockRows][T]) {
  constexpr int R = kBlockRows;
  constexpr bool kHasMin = P != Precision::kQ8_0;
  if (lane >= units) return;
  std::uint32_t c[R][8];
  float dw[R], mn[R];
#pragma unroll
  for (int r = 0; r < R; ++r) unit_codes<P>(sb[r], lane, c[r], dw[r], mn[r]);
  const std::uint32_t xo = q8_code_offset(col0 + 32u * static_cast<std::uint32_t>(lane));  // +512: bytes 16-31
  const std::uint32_t g = col0 / 32 + static_cast<std::uint32_t>(lane);
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const uint4 xa = __ldg(reinterpret_cast<const uint4*>(in.q[t] + xo));
    const uint4 xb = __ldg(reinterpret_cast<const uint4*>(in.q[t] + xo + 512));
    const float2 m = __ldg(in.m[t] + g);
    const std::uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    const float ms = m.x * m.y;  // d_x sum q
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int dot = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) dot = P == Precision::kQ8_0 ? dp4a_ss(c[r][i], xw[i], dot) : dp4a_us4(c[r][i], xw[i], dot);
      acc[r][t] = fmaf(dw[r] * m.x, small_int_to_float(dot), acc[r][t]);
      if constexpr (kHasMin) acc[r][t] = fmaf(mn[r], ms, acc[r][t]);
    }
  }
}

/// f32 path over one stage: lane l takes 8-weight parts l, l + 32, l + 64, l + 96 of the tile.
template <Precision P, int T>
__device__ __forceinline__ void tile_dot_f32(const std::uint8_t* const (&sb)[kBlockRows], const RowSet& rs,
                                             std::uint32_t col0, int units, BlockDiv scale_b,
                                             const BlockIn<T>& in, int lane, float (&acc)[kBlockRows][T]) {
  constexpr int R = kBlockRows;
  constexpr bool kHasMin = P != Precision::kFp8E4M3;
#pragma unroll 2
  for (int i = 0; i < 4; ++i) {
    const int c = lane + 32 * i;
    const int u = c >> 2;
    if (u >= units) break;
    const std::uint32_t col = col0 + 8u * static_cast<std::uint32_t>(c);
    const std::uint32_t sblk = kHasMin ? 0u : scale_b(col);  // fp8: one division for the R rows
    float f[R][8];
    float2 ds[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      decode8<P>(sb[r], u, c & 3, f[r]);
      ds[r] = unit_scale<P>(sb[r], u, rs.scale[r], sblk);
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

/// Streams this warp's steps `sr` through its ring and hands each row group's sums over the steps
/// taken to sink(rg, acc) (every lane holds them; whole warp). rows_of(rg) names a group's rows (it
/// must accept any rg up to one past the last: rows past a matrix repeat its last row); cols and
/// row_bytes are shared by them. Q: the q8 path.
template <Precision P, int T, bool Q, class RowsOf, class Sink>
__device__ __forceinline__ void block_stream(const RowsOf& rows_of, const StepRange& sr, std::uint32_t cols,
                                             std::size_t row_bytes, BlockDiv scale_b, const BlockIn<T>& in,
                                             unsigned char* ring, int lane, Sink&& sink) {
  constexpr int R = kBlockRows, S = kStages<P>;
  pdl_trigger();
  if (sr.steps == 0) {  // whole warp; it still waits, so this grid ends only after the one before it
    pdl_wait();
    return;
  }
  auto* bars = reinterpret_cast<std::uint64_t*>(ring + kRingBytes<P>);
  const std::uint32_t tiles = row_tiles(cols);
  const std::uint64_t steps = sr.steps;
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) mbar_init(bars + s, R);
    mbar_init_fence();
  }
  __syncwarp();

  // Producers (lanes 0..R-1, lane r bringing in row r): the next step to bring in, its row group's
  // rows and tile. One lane per row keeps the serial part of a step short: a single producer lane
  // took about 40% of the warp's issue slots (ncu, Q4_0 q8: 18 of 32 lanes active on average).
  std::uint32_t p_rg = sr.rg0, p_k = sr.k0;
  RowSet p_rows = rows_of(p_rg);
  auto issue = [&](int stage) {
    unsigned char* buf = ring + stage * kStageBytes<P> + lane * kRowBuf<P>;
    const std::uint8_t* row = p_rows.row[0];
    const std::uint8_t* end = p_rows.end[0];
#pragma unroll
    for (int r = 1; r < R; ++r)
      if (lane == r) {
        row = p_rows.row[r];
        end = p_rows.end[r];
      }
    const TileSpan sp = tile_span<P>(row, end, row_bytes, p_k);
    // The allocation's last < 16 bytes, stored before the arrival, whose release makes them
    // visible to the lanes that wait on the barrier.
    for (std::uintptr_t a = sp.a1; a < sp.te; ++a) buf[a - sp.a0] = *reinterpret_cast<const std::uint8_t*>(a);
    mbar_arrive_expect_tx(bars + stage, static_cast<std::uint32_t>(sp.a1 - sp.a0));
    if (sp.a1 > sp.a0)
      bulk_load(buf, reinterpret_cast<const void*>(sp.a0), static_cast<std::uint32_t>(sp.a1 - sp.a0), bars + stage);
    if (++p_k == tiles) {
      p_k = 0;
      p_rg += sr.stride;
      p_rows = rows_of(p_rg);
    }
  };
  if (lane < R) {
    const int pro = steps < static_cast<std::uint64_t>(S) ? static_cast<int>(steps) : S;
    for (int s = 0; s < pro; ++s) issue(s);
  }
  __syncwarp();  // the warp reconverges after the producers' prologue
  // Launched as a dependent of the activations' quantization (launch_kernel), the ring fills with
  // weights while that kernel still runs; its outputs are read, and ours written, only after this.
  pdl_wait();

  float acc[R][T];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  std::uint32_t rg = sr.rg0, k = sr.k0, phase = 0;
  int stage = 0;
  RowSet rows = rows_of(rg);
  for (std::uint64_t j = 0; j < steps; ++j) {
    while (!mbar_try_wait(bars + stage, phase)) {
    }
    const unsigned char* buf = ring + stage * kStageBytes<P>;
    const std::uint8_t* sb[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const std::uintptr_t tb =
          reinterpret_cast<std::uintptr_t>(rows.row[r]) + static_cast<std::uintptr_t>(k) * kTileBytes<P>;
      sb[r] = buf + r * kRowBuf<P> + (tb & 15u);
    }
    const std::uint32_t col0 = k * kTileWeights;
    const std::uint32_t left = cols - col0;
    const int units = left >= static_cast<std::uint32_t>(kTileWeights) ? kTileUnits : static_cast<int>(left / 32);
    if constexpr (Q) {
      tile_dot_q8<P, T>(sb, col0, units, in, lane, acc);
    } else {
      tile_dot_f32<P, T>(sb, rows, col0, units, scale_b, in, lane, acc);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
    if (lane < R && j + S < steps) issue(stage);
    const bool group_end = ++k == tiles;
    if (group_end || j + 1 == steps) {
      warp_sum<R, T>(acc);
      sink(rg, acc);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
    }
    if (group_end) {
      k = 0;
      rg += sr.stride;
      rows = rows_of(rg);
    }
    if (++stage == S) {
      stage = 0;
      phase ^= 1u;
    }
  }
}

/// Launch parameters of block_gemv.
struct BlockGemvParams {
  const std::uint8_t* w;
  std::uint32_t rows, cols;
  std::size_t row_bytes;
  const float* scales;     ///< fp8: [ceil(rows/B) x scale_ld] f32 block scales
  std::size_t scale_ld;    ///< fp8: ceil(cols/B)
  BlockDiv scale_b;        ///< fp8: B
  const float* x;          ///< f32 path
  std::size_t ldx;
  const std::uint8_t* xq;  ///< q8 path: token t's codes at xq + t * ldq
  const float2* xm;        ///< q8 path: token t's (d_x, sum q) at xm + t * ldm
  std::size_t ldq, ldm;
  float* y;
  std::size_t ldy;
  std::uint32_t n;
  bool accumulate;
};

/// The row group's rows of one matrix of `rows` rows (rows past the end repeat the last row, so a
/// partial group reads valid memory; its results are not stored).
__device__ __forceinline__ RowSet matrix_rows(const std::uint8_t* w, std::uint32_t rows, std::size_t row_bytes,
                                              const float* scales, std::size_t scale_ld, BlockDiv scale_b,
                                              std::uint32_t row0) {
  RowSet rs;
  const std::uint8_t* end = w + static_cast<std::size_t>(rows) * row_bytes;
#pragma unroll
  for (int r = 0; r < kBlockRows; ++r) {
    const std::uint32_t row = row0 + r < rows ? row0 + r : rows - 1;
    rs.row[r] = w + static_cast<std::size_t>(row) * row_bytes;
    rs.end[r] = end;
    rs.scale[r] = scales ? scales + static_cast<std::size_t>(scale_b(row)) * scale_ld : nullptr;
  }
  return rs;
}

template <Precision P, int T, bool Q>
__global__ void __launch_bounds__(kBlockWarps * 32) block_gemv(const BlockGemvParams p) {
  constexpr int R = kBlockRows;
  extern __shared__ __align__(16) unsigned char block_smem[];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  BlockIn<T> in;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const std::size_t tt = t < static_cast<int>(p.n) ? static_cast<std::size_t>(t) : 0;
    in.x[t] = p.x + tt * p.ldx;
    in.q[t] = p.xq + tt * p.ldq;
    in.m[t] = p.xm + tt * p.ldm;
  }
  auto rows_of = [&](std::uint32_t rg) {
    return matrix_rows(p.w, p.rows, p.row_bytes, p.scales, p.scale_ld, p.scale_b, rg * R);
  };
  auto sink = [&](std::uint32_t rg, const float (&acc)[R][T]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const std::uint32_t row = rg * R + r;
        if (lane == (r * T + t) % 32 && row < p.rows && t < static_cast<int>(p.n)) {
          float* o = p.y + t * p.ldy + row;
          *o = p.accumulate ? *o + acc[r][t] : acc[r][t];
        }
      }
  };
  const StepRange sr =
      strided_groups(blockIdx.x * kBlockWarps + warp, gridDim.x * kBlockWarps, (p.rows + R - 1) / R, row_tiles(p.cols));
  block_stream<P, T, Q>(rows_of, sr, p.cols, p.row_bytes, p.scale_b, in, block_smem + warp * kWarpBytes<P>, lane, sink);
}

/// Launch parameters of the grouped block-format expert kernels (blockIdx.y = task).
struct BlockGroupParams {
  ExpertTask tasks[kMaxGroupExperts];
  std::uint32_t hidden, ffn;
  std::size_t up_row_bytes, down_row_bytes;
  std::size_t up_scales, down_scales;      ///< fp8: offset of a matrix's block scales from its codes
  std::size_t up_scale_ld, down_scale_ld;  ///< fp8: ceil(cols / B)
  BlockDiv scale_b;                        ///< fp8: B
  const float* x;                          ///< f32 path: token rows
  std::size_t ldx;
  float* h;  ///< [count][kMaxGemvTokens][ffn]: the SwiGLU activations (f32)
  /// q8 path: codes and (d_x, sum q) of x for (task e, token t) at row e * kMaxGemvTokens + t of
  /// xq / xm, and of h likewise in hq / hm.
  const std::uint8_t* xq;
  const float2* xm;
  std::size_t xq_ld, xm_ld;
  const std::uint8_t* hq;
  const float2* hm;
  std::size_t hq_ld, hm_ld;
  float* out;
  std::size_t ldo;
};

/// h[e][t][j] = silu(W1[j] . x[token]) * (W3[j] . x[token]): a row group is rows j, j+1 of w1 and of w3.
template <Precision P, int T, bool Q>
__global__ void __launch_bounds__(kBlockWarps * 32) block_swiglu_gemv(const __grid_constant__ BlockGroupParams p) {
  constexpr int R = kBlockRows;
  extern __shared__ __align__(16) unsigned char block_smem[];
  const std::uint32_t e = blockIdx.y;
  const ExpertTask& task = p.tasks[e];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int n = static_cast<int>(task.n);
  BlockIn<T> in;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const int tt = t < n ? t : 0;
    in.x[t] = p.x + task.token[tt] * p.ldx;
    const std::size_t qrow = static_cast<std::size_t>(e) * kMaxGemvTokens + static_cast<std::size_t>(tt);
    in.q[t] = p.xq + qrow * p.xq_ld;
    in.m[t] = p.xm + qrow * p.xm_ld;
  }
  const auto* w1 = reinterpret_cast<const std::uint8_t*>(task.w1);
  const auto* w3 = reinterpret_cast<const std::uint8_t*>(task.w3);
  const float* s1 = P == Precision::kFp8E4M3 ? reinterpret_cast<const float*>(w1 + p.up_scales) : nullptr;
  const float* s3 = P == Precision::kFp8E4M3 ? reinterpret_cast<const float*>(w3 + p.up_scales) : nullptr;
  auto rows_of = [&](std::uint32_t rg) {
    const RowSet a = matrix_rows(w1, p.ffn, p.up_row_bytes, s1, p.up_scale_ld, p.scale_b, 2 * rg);
    const RowSet b = matrix_rows(w3, p.ffn, p.up_row_bytes, s3, p.up_scale_ld, p.scale_b, 2 * rg);
    RowSet rs;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      rs.row[i] = a.row[i];
      rs.end[i] = a.end[i];
      rs.scale[i] = a.scale[i];
      rs.row[2 + i] = b.row[i];
      rs.end[2 + i] = b.end[i];
      rs.scale[2 + i] = b.scale[i];
    }
    return rs;
  };
  float* h = p.h + static_cast<std::size_t>(e) * kMaxGemvTokens * p.ffn;
  auto sink = [&](std::uint32_t rg, const float (&acc)[R][T]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const std::uint32_t j = 2 * rg + i;
        if (lane == (i * T + t) % 32 && j < p.ffn && t < n) h[t * p.ffn + j] = silu(acc[i][t]) * acc[2 + i][t];
      }
  };
  const StepRange sr =
      strided_groups(blockIdx.x * kBlockWarps + warp, gridDim.x * kBlockWarps, (p.ffn + 1) / 2, row_tiles(p.hidden));
  block_stream<P, T, Q>(rows_of, sr, p.hidden, p.up_row_bytes, p.scale_b, in, block_smem + warp * kWarpBytes<P>, lane,
                        sink);
}

/// out[token][r] += weight * (W2[r] . h[e][t]) (atomic: several experts share a token).
template <Precision P, int T, bool Q>
__global__ void __launch_bounds__(kBlockWarps * 32)
    block_down_scatter_gemv(const __grid_constant__ BlockGroupParams p) {
  constexpr int R = kBlockRows;
  extern __shared__ __align__(16) unsigned char block_smem[];
  const std::uint32_t e = blockIdx.y;
  const ExpertTask& task = p.tasks[e];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int n = static_cast<int>(task.n);
  BlockIn<T> in;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const std::size_t row = static_cast<std::size_t>(e) * kMaxGemvTokens + static_cast<std::size_t>(t < n ? t : 0);
    in.x[t] = p.h + row * p.ffn;
    in.q[t] = p.hq + row * p.hq_ld;
    in.m[t] = p.hm + row * p.hm_ld;
  }
  const auto* w2 = reinterpret_cast<const std::uint8_t*>(task.w2);
  const float* s2 = P == Precision::kFp8E4M3 ? reinterpret_cast<const float*>(w2 + p.down_scales) : nullptr;
  auto rows_of = [&](std::uint32_t rg) {
    return matrix_rows(w2, p.hidden, p.down_row_bytes, s2, p.down_scale_ld, p.scale_b, rg * R);
  };
  auto sink = [&](std::uint32_t rg, const float (&acc)[R][T]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const std::uint32_t row = rg * R + r;
        if (lane == (r * T + t) % 32 && row < p.hidden && t < n)
          atomicAdd(p.out + task.token[t] * p.ldo + row, task.weight[t] * acc[r][t]);
      }
  };
  // Partial sums add atomically, so the warps split all (row group, tile) steps evenly: whole
  // groups per warp left the last round of a task's groups a fraction full (8 Mixtral experts: 1024
  // groups each over about 300 warps, 3.4 rounds in 4).
  const StepRange sr =
      even_steps(blockIdx.x * kBlockWarps + warp, gridDim.x * kBlockWarps, (p.hidden + R - 1) / R, row_tiles(p.ffn));
  block_stream<P, T, Q>(rows_of, sr, p.ffn, p.down_row_bytes, p.scale_b, in, block_smem + warp * kWarpBytes<P>, lane,
                        sink);
}

/// Bytes of one row of `cols` columns in block format P.
template <Precision P>
constexpr std::size_t block_row_bytes(std::size_t cols) {
  return cols / block_geometry(P).weights * block_geometry(P).bytes;
}

/// Row groups of a matrix of `rows` rows.
inline std::size_t row_groups(std::size_t rows) { return (rows + kBlockRows - 1) / kBlockRows; }

/// Device facts and a check that the device has the copy engine these kernels use (sm_90+).
inline Status block_device(DeviceFacts& d) noexcept {
  MOEX_RETURN_IF_ERROR(device_facts(d));
  if (d.cc_major < 9) return unsupported("block-format kernels need compute capability 9.0 (cp.async.bulk)");
  return Status::ok();
}

}  // namespace detail

template <Precision P, int T>
Status launch_gemv_block(const GemvArgs& a, cudaStream_t stream, bool pdl) noexcept {
  const std::size_t rows = a.layout.rows, cols = a.layout.cols;
  if (rows > 0xFFFFFFF0u || cols > 0xFFFFFFF0u) return unsupported("block gemv: more than 2^32 rows or columns");
  detail::DeviceFacts d;
  MOEX_RETURN_IF_ERROR(detail::block_device(d));
  detail::BlockGemvParams p{};
  p.w = reinterpret_cast<const std::uint8_t*>(a.w);
  p.rows = static_cast<std::uint32_t>(rows);
  p.cols = static_cast<std::uint32_t>(cols);
  p.row_bytes = detail::block_row_bytes<P>(cols);
  if constexpr (P == Precision::kFp8E4M3) {
    p.scales = a.block_scales;
    p.scale_b = detail::BlockDiv::of(a.scale_block);
    p.scale_ld = (cols + a.scale_block - 1) / a.scale_block;
  }
  p.x = a.x;
  p.ldx = a.ldx;
  p.y = a.y;
  p.ldy = a.ldy;
  p.n = a.n;
  p.accumulate = a.accumulate;
  constexpr std::size_t smem = detail::block_smem_bytes<P>();
  const std::size_t needed = (detail::row_groups(rows) + detail::kBlockWarps - 1) / detail::kBlockWarps;
  // pdl: launched as a dependent of the quantize kernel before it (launch_kernel).
  auto run = [&](auto* kernel, bool pdl, const char* what) -> Status {
    std::size_t cap = 0;
    MOEX_RETURN_IF_ERROR(detail::resident_blocks(kernel, detail::kBlockWarps * 32, smem, d, cap));
    return detail::launch_kernel(kernel, dim3(detail::blocks_per_task(cap, 1, needed)), dim3(detail::kBlockWarps * 32),
                                 smem, stream, pdl, what, p);
  };
  if constexpr (P != Precision::kFp8E4M3) {
    if (!a.exact && a.workspace != nullptr) {  // q8 path: quantize x once, then integer dot products
      const BlockQ8Rows ws = q8_rows_at(a.workspace, cols, a.n);
      p.xq = ws.q;
      p.xm = ws.m;
      p.ldq = ws.ldq;
      p.ldm = ws.ldm;
      MOEX_RETURN_IF_ERROR(launch_quantize_x32(a.x, a.ldx, cols, a.n, ws, stream));
      return run(detail::block_gemv<P, T, true>, pdl, "block_gemv (q8) launch");
    }
  }
  return run(detail::block_gemv<P, T, false>, false, "block_gemv launch");
}

template <Precision P, int T>
Status launch_grouped_expert_block(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  const std::size_t hidden = a.layout.shape.hidden, ffn = a.layout.shape.ffn;
  if (hidden > 0xFFFFFFF0u || ffn > 0xFFFFFFF0u) return unsupported("grouped block experts: shape too large");
  detail::DeviceFacts d;
  MOEX_RETURN_IF_ERROR(detail::block_device(d));
  detail::BlockGroupParams p{};
  for (std::uint32_t i = 0; i < a.count; ++i) p.tasks[i] = a.tasks[i];
  p.hidden = static_cast<std::uint32_t>(hidden);
  p.ffn = static_cast<std::uint32_t>(ffn);
  p.up_row_bytes = detail::block_row_bytes<P>(hidden);
  p.down_row_bytes = detail::block_row_bytes<P>(ffn);
  if constexpr (P == Precision::kFp8E4M3) {
    p.scale_b = detail::BlockDiv::of(static_cast<std::uint32_t>(kFp8ScaleBlockSize));
    p.up_scales = a.layout.w1.scales_offset;
    p.down_scales = a.layout.w2.scales_offset;
    p.up_scale_ld = (hidden + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize;
    p.down_scale_ld = (ffn + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize;
  }
  p.x = a.x;
  p.ldx = a.ldx;
  p.out = a.out;
  p.ldo = a.ldo;
  const GroupedWorkspace ws = grouped_workspace(a.workspace, a.layout.shape, a.count);
  p.h = ws.h;
  constexpr std::size_t smem = detail::block_smem_bytes<P>();
  // Blocks per task: as many as the resident share allows, up to one warp per `warp_work` items.
  // Every launch after the first is a dependent launch (launch_kernel): its ring fills with
  // weights while the kernel before it finishes.
  auto run = [&](auto* kernel, std::size_t warp_work, bool pdl, const char* what) -> Status {
    std::size_t cap = 0;
    MOEX_RETURN_IF_ERROR(detail::resident_blocks(kernel, detail::kBlockWarps * 32, smem, d, cap));
    const std::size_t needed = (warp_work + detail::kBlockWarps - 1) / detail::kBlockWarps;
    return detail::launch_kernel(kernel, dim3(detail::blocks_per_task(cap, a.count, needed), a.count),
                                 dim3(detail::kBlockWarps * 32), smem, stream, pdl, what, p);
  };
  // SwiGLU: whole row groups a warp. Down: even shares of its (group, tile) steps, at least
  // kMinDownSteps a warp (each warp's ring takes a few tiles' latency to fill).
  constexpr std::size_t kMinDownSteps = 4;
  const std::size_t up_groups = (ffn + 1) / 2;
  const std::size_t down_warps =
      (detail::row_groups(hidden) * detail::row_tiles(static_cast<std::uint32_t>(ffn)) + kMinDownSteps - 1) /
      kMinDownSteps;
  if constexpr (P != Precision::kFp8E4M3) {
    if (!a.exact) {  // q8 path: x, then h, quantized per 32 columns in launches of their own
      p.xq = ws.x.q;
      p.xm = ws.x.m;
      p.xq_ld = ws.x.ldq;
      p.xm_ld = ws.x.ldm;
      p.hq = ws.h8.q;
      p.hm = ws.h8.m;
      p.hq_ld = ws.h8.ldq;
      p.hm_ld = ws.h8.ldm;
      MOEX_RETURN_IF_ERROR(launch_quantize_task_rows(a.x, a.ldx, hidden, a.tasks, a.count, false, ws.x, stream));
      MOEX_RETURN_IF_ERROR(
          run(detail::block_swiglu_gemv<P, T, true>, up_groups, true, "block_swiglu_gemv (q8) launch"));
      MOEX_RETURN_IF_ERROR(launch_quantize_task_rows(ws.h, ffn, ffn, a.tasks, a.count, true, ws.h8, stream, true));
      return run(detail::block_down_scatter_gemv<P, T, true>, down_warps, true, "block_down_scatter_gemv (q8) launch");
    }
  }
  MOEX_RETURN_IF_ERROR(run(detail::block_swiglu_gemv<P, T, false>, up_groups, false, "block_swiglu_gemv launch"));
  return run(detail::block_down_scatter_gemv<P, T, false>, down_warps, true, "block_down_scatter_gemv launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END

/// Explicit instantiations of one block format for every token bucket (1, 2, 4, 8): the GEMV and
/// the grouped experts.
#define MOEX_INSTANTIATE_GEMV_BLOCK(P)                                                                 \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 1>(const GemvArgs&, cudaStream_t, bool) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 2>(const GemvArgs&, cudaStream_t, bool) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 4>(const GemvArgs&, cudaStream_t, bool) noexcept; \
  template ::moex::Status moex::cuda::launch_gemv_block<P, 8>(const GemvArgs&, cudaStream_t, bool) noexcept; \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 1>(const GroupedExpertArgs&,      \
                                                                        cudaStream_t) noexcept;        \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 2>(const GroupedExpertArgs&,      \
                                                                        cudaStream_t) noexcept;        \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 4>(const GroupedExpertArgs&,      \
                                                                        cudaStream_t) noexcept;        \
  template ::moex::Status moex::cuda::launch_grouped_expert_block<P, 8>(const GroupedExpertArgs&,      \
                                                                        cudaStream_t) noexcept;
