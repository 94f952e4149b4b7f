#pragma once
/// @file gemv_q8.cuh
/// Device templates of q8_gemv: the integer-weight GEMV (int8/int4/int2 group-quantized) with
/// activations quantized to int8 per weight group and integer dot products (dp4a).
///
/// ## Method (the CPU's Q8 rule, include/moex/cpu/q8_kernel.hpp)
/// Each block first quantizes every token's x into shared memory, per weight group of G columns:
/// d_x = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)) in [-127, 127] (all in f32,
/// exactly the CPU's arithmetic). The block is persistent: it then streams as many row groups as
/// the grid spreads over it, so the quantization is paid once per block, not once per row.
///
/// A lane's 16-byte load holds E = 128/b codes (a "unit"). A unit is cut into slices of
/// S = min(E, G) columns, each inside one group; per slice the lane forms the exact int32 sum
/// sum_j u_j q_j with `dp4a.u32.s32`, and then
///   symmetric:  acc += float(sum u q - 2^(b-1) sum q) * (d_w d_x)        (one I2F, one FMA)
///   asymmetric: acc += float(sum u q) * (d_w d_x) + m_w * (d_x sum q)
/// where sum q and d_x sum q are precomputed per slice.
///
/// Unpacking is masks only: the activation bytes are stored permuted within each 32-bit word of
/// codes into the order the masks expose them. int4: w & 0x0F0F0F0F holds the even elements of
/// the word, w & 0xF0F0F0F0 the odd ones times 16; int2: w & (0x03030303 << 2i) holds elements
/// 4k+i times 4^i. The scaled partial sums are multiples of 16 / 4^i and are shifted back exactly
/// (arithmetic shift of an exact multiple). Per 8 int4 codes: 2 LOP + 2 dp4a.
///
/// Shared memory per token: the int8 activations in a lane-interleaved order (unit u, 16-byte part
/// j at ((u/32)*P + j)*512 + (u%32)*16, P = E/16), so each warp-wide 16-byte read is conflict free,
/// then one float2 {d_x, sum q (sym, int bits) | d_x sum q (asym)} per slice.

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

#include "device_math.cuh"
#include "kernels.hpp"
#include "launch_util.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline constexpr int kQ8Warps = 8;  ///< warps per block of q8_gemv
inline constexpr int kQ8Rows = 4;   ///< rows per warp

/// Compile-time geometry of q8_gemv for b-bit codes and group G.
template <int B, int G>
struct Q8Geo {
  static constexpr int kE = 128 / B;          ///< columns per 16-byte load (unit)
  static constexpr int kParts = kE / 16;      ///< 16-byte activation parts per unit
  static constexpr int kS = kE < G ? kE : G;  ///< columns per slice
  static constexpr int kSpu = kE / kS;        ///< slices per unit
  static constexpr int kOff = 1 << (B - 1);   ///< symmetric offset
  static constexpr int kWordCols = 32 / B;    ///< columns per 32-bit word of codes

  /// Offset of column p (0..kE-1) of a unit inside the unit's kE permuted activation bytes.
  __host__ __device__ static constexpr int perm(int p) {
    const int w = p / kWordCols, i = p % kWordCols;
    if constexpr (B == 8)
      return p;
    else if constexpr (B == 4)
      return w * 8 + (i & 1) * 4 + (i >> 1);
    else
      return w * 16 + (i & 3) * 4 + (i >> 2);
  }
};

/// Shared-memory bytes of one token (activations, then slice metadata).
template <int B, int G>
constexpr std::size_t q8_act_bytes(std::size_t cols) {
  using Geo = Q8Geo<B, G>;
  const std::size_t units = cols / Geo::kE;
  return ((units + 31) / 32) * 32 * Geo::kE;
}
template <int B, int G>
constexpr std::size_t q8_token_bytes(std::size_t cols) {
  return q8_act_bytes<B, G>(cols) + (cols / Q8Geo<B, G>::kS) * 8;
}

__device__ __forceinline__ int dp4a_us(std::uint32_t a, std::uint32_t b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

/// Exact sum_j u_j q_j over slice s of one unit: v holds the unit's codes, a its activations.
template <int B, int G>
__device__ __forceinline__ int slice_dot(const uint4& v, const uint4 (&a)[Q8Geo<B, G>::kParts], int s) {
  using Geo = Q8Geo<B, G>;
  const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
  constexpr int kWords = 4 / Geo::kSpu;  // words of codes per slice
  if constexpr (B == 8) {
    const std::uint32_t q[4] = {a[0].x, a[0].y, a[0].z, a[0].w};
    int acc = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) acc = dp4a_us(w[k], q[k], acc);
    return acc;
  } else if constexpr (B == 4) {
    const std::uint32_t q[8] = {a[0].x, a[0].y, a[0].z, a[0].w, a[1].x, a[1].y, a[1].z, a[1].w};
    int lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lo = dp4a_us(w[k] & 0x0F0F0F0Fu, q[2 * k], lo);
      hi = dp4a_us(w[k] & 0xF0F0F0F0u, q[2 * k + 1], hi);
    }
    return lo + (hi >> 4);
  } else {
    int p0 = 0, p1 = 0, p2 = 0, p3 = 0;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int wi = s * kWords + k;
      const uint4 q = a[wi];
      p0 = dp4a_us(w[wi] & 0x03030303u, q.x, p0);
      p1 = dp4a_us(w[wi] & 0x0C0C0C0Cu, q.y, p1);
      p2 = dp4a_us(w[wi] & 0x30303030u, q.z, p2);
      p3 = dp4a_us(w[wi] & 0xC0C0C0C0u, q.w, p3);
    }
    return p0 + (p1 >> 2) + (p2 >> 4) + (p3 >> 6);
  }
}

/// Quantizes T tokens of x (token t >= n reads token 0) into the block's shared memory. Token t
/// is row `rows[t]` of x when `rows` is given (the grouped kernels' token lists), else row t.
template <int B, int G, int T>
__device__ __forceinline__ void q8_quantize(const float* x, std::size_t ldx, std::uint32_t n, std::size_t cols,
                                            bool asym, unsigned char* smem, const std::uint32_t* rows = nullptr) {
  using Geo = Q8Geo<B, G>;
  constexpr int kGL = G / 4;        // lanes per group (4 columns a lane)
  constexpr int kSL = Geo::kS / 4;  // lanes per slice
  const std::size_t act = q8_act_bytes<B, G>(cols);
  const std::size_t stride = q8_token_bytes<B, G>(cols);
  const std::size_t per_token = cols / 4;
  const std::size_t total = per_token * T;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  constexpr int kBatch = 4;  // float4 loads in flight per thread before the first use
  for (std::size_t base = 0; base < total; base += static_cast<std::size_t>(blockDim.x) * kBatch) {
    float4 v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const std::size_t i = base + static_cast<std::size_t>(k) * blockDim.x + threadIdx.x;
      v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i < total) {
        const std::size_t t = i / per_token;
        const std::size_t tt = t < n ? t : 0;
        const std::size_t src = rows ? rows[tt] : tt;
        v[k] = __ldg(reinterpret_cast<const float4*>(x + src * ldx) + (i - t * per_token));
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      // Whole warps take the same path (total and blockDim are multiples of 32... or not: the
      // shuffles below run on every lane regardless; out-of-range lanes carry zeros).
      const std::size_t i = base + static_cast<std::size_t>(k) * blockDim.x + threadIdx.x;
      float amax = fmaxf(fmaxf(fabsf(v[k].x), fabsf(v[k].y)), fmaxf(fabsf(v[k].z), fabsf(v[k].w)));
#pragma unroll
      for (int o = kGL / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float inv = q8_inv_scale(amax);
      const float d = amax / 127.f;
      const float xs[4] = {v[k].x, v[k].y, v[k].z, v[k].w};
      int q[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) q[j] = q8_code(xs[j], inv);
      int sq = q[0] + q[1] + q[2] + q[3];
#pragma unroll
      for (int o = kSL / 2; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      if (i < total) {
        const std::size_t t = i / per_token;
        const std::size_t c = (i - t * per_token) * 4;
        unsigned char* tok = smem + t * stride;
        const std::size_t u = c / Geo::kE;
        const int p0 = static_cast<int>(c % Geo::kE);
        unsigned char* unit = tok + ((u >> 5) * Geo::kParts) * 512 + (u & 31u) * 16;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int o = Geo::perm(p0 + j);
          unit[(o >> 4) * 512 + (o & 15)] = static_cast<unsigned char>(static_cast<signed char>(q[j]));
        }
        if ((lane % kSL) == 0) {
          float2 meta;
          meta.x = d;
          meta.y = asym ? d * static_cast<float>(sq) : __int_as_float(sq);
          reinterpret_cast<float2*>(tok + act)[c / Geo::kS] = meta;
        }
      }
    }
  }
}

/// acc[r][t] = per-lane partial sums of R rows (codes / scales / mins of each row given; mins
/// null when symmetric) with the T tokens quantized in shared memory (`smem`, token stride
/// `stride`, metadata at `act`), over `units` 16-byte units. U units per lane are loaded before the
/// first is used (U = 2: twice the bytes in flight per warp and half the round trips).
template <int B, int G, int T, bool Asym, int R, int U>
__device__ __forceinline__ void q8_dot(const uint4* const (&codes)[R], const __half* const (&sc)[R],
                                       const __half* const (&mn)[R], std::size_t units, const unsigned char* smem,
                                       std::size_t stride, std::size_t act, int lane, float (&acc)[R][T]) {
  using Geo = Q8Geo<B, G>;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;
  for (std::size_t u0 = static_cast<std::size_t>(lane); u0 < units; u0 += 32 * U) {
    uint4 v[U][R];
    float dw[U][R][Geo::kSpu], mw[U][R][Geo::kSpu];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const std::size_t u = u0 + 32 * k;
      const bool in = U == 1 || u < units;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        v[k][r] = in ? __ldcs(codes[r] + u) : make_uint4(0u, 0u, 0u, 0u);
        if constexpr (Geo::kSpu == 2) {
          // Two groups per unit (int2, G = 32): groups 2u, 2u+1 are one aligned 4-byte load (gpr
          // is even since cols % 64 == 0, and the sections are 64-byte aligned).
          const std::size_t g = in ? 2 * u : 0;
          const float2 d2 = __half22float2(*reinterpret_cast<const __half2*>(sc[r] + g));
          dw[k][r][0] = d2.x;
          dw[k][r][1] = d2.y;
          if constexpr (Asym) {
            const float2 m2 = __half22float2(*reinterpret_cast<const __half2*>(mn[r] + g));
            mw[k][r][0] = m2.x;
            mw[k][r][1] = m2.y;
          } else {
            mw[k][r][0] = mw[k][r][1] = 0.f;
          }
        } else {
          const std::size_t g = in ? u * Geo::kE / G : 0;
          dw[k][r][0] = __half2float(sc[r][g]);
          mw[k][r][0] = Asym ? __half2float(mn[r][g]) : 0.f;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const std::size_t u = u0 + 32 * k;
      if (U > 1 && u >= units) break;
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const unsigned char* tok = smem + static_cast<std::size_t>(t) * stride;
        const unsigned char* ua = tok + ((u >> 5) * Geo::kParts) * 512 + (u & 31u) * 16;
        uint4 a[Geo::kParts];
#pragma unroll
        for (int j = 0; j < Geo::kParts; ++j) a[j] = *reinterpret_cast<const uint4*>(ua + j * 512);
        float2 meta[Geo::kSpu];
#pragma unroll
        for (int s = 0; s < Geo::kSpu; ++s) meta[s] = reinterpret_cast<const float2*>(tok + act)[u * Geo::kSpu + s];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int s = 0; s < Geo::kSpu; ++s) {
            int dot = slice_dot<B, G>(v[k][r], a, s);
            if constexpr (Asym) {
              acc[r][t] = fmaf(static_cast<float>(dot), dw[k][r][s] * meta[s].x, acc[r][t]);
              acc[r][t] = fmaf(mw[k][r][s], meta[s].y, acc[r][t]);
            } else {
              dot -= Geo::kOff * __float_as_int(meta[s].y);
              acc[r][t] = fmaf(static_cast<float>(dot), dw[k][r][s] * meta[s].x, acc[r][t]);
            }
          }
      }
    }
  }
  warp_sum<R, T>(acc);
}

/// Row pointers of one quantized matrix (layout.hpp sections) for q8_dot.
struct Q8Matrix {
  const std::uint8_t* base;
  std::size_t scales_off, mins_off;  ///< mins_off 0: symmetric
  std::size_t row_bytes, gpr;

  __device__ __forceinline__ const uint4* codes(std::size_t row) const {
    return reinterpret_cast<const uint4*>(base + row * row_bytes);
  }
  __device__ __forceinline__ const __half* scales(std::size_t row) const {
    return reinterpret_cast<const __half*>(base + scales_off) + row * gpr;
  }
  __device__ __forceinline__ const __half* mins(std::size_t row) const {
    return mins_off ? reinterpret_cast<const __half*>(base + mins_off) + row * gpr : nullptr;
  }
};

/// The code, scale and min pointers of rows row0 .. row0 + R - 1 of m (rows past `rows` repeat the
/// last row, so a partial group reads valid memory; its results are not stored).
template <int R>
__device__ __forceinline__ void q8_row_group(const Q8Matrix& m, std::size_t row0, std::size_t rows,
                                             const uint4* (&codes)[R], const __half* (&sc)[R], const __half* (&mn)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const std::size_t row = row0 + r < rows ? row0 + r : rows - 1;
    codes[r] = m.codes(row);
    sc[r] = m.scales(row);
    mn[r] = m.mins(row);
  }
}

template <int B, int G>
__device__ __forceinline__ Q8Matrix q8_matrix(const std::byte* w, std::size_t scales_off, std::size_t mins_off,
                                              std::size_t cols) {
  return {reinterpret_cast<const std::uint8_t*>(w), scales_off, mins_off, cols * B / 8, cols / G};
}

/// Launch parameters of q8_gemv (the rows of a persistent grid).
struct Q8Params {
  const std::byte* w;
  std::size_t scales_off, mins_off;  ///< mins_off 0: symmetric
  std::size_t rows, cols;
  const float* x;
  std::size_t ldx;
  float* y;
  std::size_t ldy;
  std::uint32_t n;
  bool accumulate;
};

/// Units per lane in flight (q8_dot's U) by default. Measured (bench/RESULTS-gpu.md, ncu): at
/// batch 1 the kernel is latency bound (about 80% of warp stalls wait on global loads, DRAM at
/// 68% for int2 g32), and two units in flight raise int2 g32 0.76 -> 0.89, int2 g64 0.87 -> 0.94,
/// int2 g64-asym 0.75 -> 0.82, int4 g32 0.94 -> 0.97, int4 g128-asym 0.88 -> 0.91 of the copy
/// ceiling, but lower int2 g128 0.93 -> 0.90; T > 1 keeps one (registers).
template <int B, int G, int T, bool Asym>
inline constexpr int kQ8Units = T == 1 && ((B == 2 && G <= 64) || (B == 4 && G == 32) || (B == 4 && G == 128 && Asym))
                                    ? 2
                                    : 1;

/// Units per lane in flight in the grouped kernels (q8_swiglu, q8_down_scatter). Measured
/// (bench/RESULTS-gpu.md, 2026-12-07, H100, 8 Mixtral experts, grouped_q8_variant): two at batch 1
/// in every format, int4 g64 0.83 -> 0.92 and int2 g128 0.76 -> 0.88 of the copy ceiling, the
/// formats that already had two unchanged; T > 1 keeps one (registers).
template <int T>
inline constexpr int kQ8GroupUnits = T == 1 ? 2 : 1;

template <Precision P, int G, int T, bool Asym, int U, int MinBlocks = 1>
__global__ void __launch_bounds__(kQ8Warps * 32, MinBlocks) q8_gemv(const Q8Params p) {
  constexpr int B = static_cast<int>(precision_bits(P));
  using Geo = Q8Geo<B, G>;
  constexpr int R = kQ8Rows;
  extern __shared__ __align__(16) unsigned char q8_smem[];
  q8_quantize<B, G, T>(p.x, p.ldx, p.n, p.cols, Asym, q8_smem);
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x & 31u);
  const std::size_t act = q8_act_bytes<B, G>(p.cols);
  const std::size_t stride = q8_token_bytes<B, G>(p.cols);
  const std::size_t units = p.cols / Geo::kE;
  const Q8Matrix m = q8_matrix<B, G>(p.w, p.scales_off, p.mins_off, p.cols);
  const std::size_t row_groups = (p.rows + R - 1) / R;
  for (std::size_t rg = static_cast<std::size_t>(blockIdx.x) * kQ8Warps + threadIdx.x / 32; rg < row_groups;
       rg += static_cast<std::size_t>(gridDim.x) * kQ8Warps) {
    const std::size_t row0 = rg * R;
    const uint4* codes[R];
    const __half* sc[R];
    const __half* mn[R];
    q8_row_group<R>(m, row0, p.rows, codes, sc, mn);
    float acc[R][T];
    q8_dot<B, G, T, Asym, R, U>(codes, sc, mn, units, q8_smem, stride, act, lane, acc);
    // Lane r*T + t writes (row0 + r, token t): the stores spread over the warp.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (lane == (r * T + t) % 32 && row0 + r < p.rows && t < static_cast<int>(p.n)) {
          float* o = p.y + t * p.ldy + row0 + r;
          *o = p.accumulate ? *o + acc[r][t] : acc[r][t];
        }
  }
}

/// Launch parameters of the q8 grouped expert kernels (blockIdx.y = task).
struct Q8GroupParams {
  ExpertTask tasks[kMaxGroupExperts];
  std::size_t hidden, ffn;
  std::size_t up_scales, up_mins;      ///< w1 / w3 sections (mins 0: symmetric)
  std::size_t down_scales, down_mins;  ///< w2 sections
  const float* x;
  std::size_t ldx;
  float* h;  ///< workspace [count][kMaxGemvTokens][ffn]
  float* out;
  std::size_t ldo;
};

/// h[e][t][j] = silu(W1[j] . q8(x[token])) * (W3[j] . q8(x[token])): a warp streams rows j, j+1 of
/// w1 and of w3 together (4 rows in flight, as in q8_gemv).
template <Precision P, int G, int T, bool Asym, int U>
__global__ void __launch_bounds__(kQ8Warps * 32) q8_swiglu(const __grid_constant__ Q8GroupParams p) {
  constexpr int B = static_cast<int>(precision_bits(P));
  using Geo = Q8Geo<B, G>;
  const ExpertTask& task = p.tasks[blockIdx.y];
  extern __shared__ __align__(16) unsigned char q8_smem[];
  q8_quantize<B, G, T>(p.x, p.ldx, task.n, p.hidden, Asym, q8_smem, task.token);
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int n = static_cast<int>(task.n);
  const std::size_t act = q8_act_bytes<B, G>(p.hidden);
  const std::size_t stride = q8_token_bytes<B, G>(p.hidden);
  const std::size_t units = p.hidden / Geo::kE;
  const Q8Matrix m1 = q8_matrix<B, G>(task.w1, p.up_scales, p.up_mins, p.hidden);
  const Q8Matrix m3 = q8_matrix<B, G>(task.w3, p.up_scales, p.up_mins, p.hidden);
  float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
  const std::size_t row_groups = (p.ffn + 1) / 2;
  for (std::size_t rg = static_cast<std::size_t>(blockIdx.x) * kQ8Warps + threadIdx.x / 32; rg < row_groups;
       rg += static_cast<std::size_t>(gridDim.x) * kQ8Warps) {
    const std::size_t j0 = rg * 2;
    const std::size_t j1 = j0 + 1 < p.ffn ? j0 + 1 : p.ffn - 1;
    const uint4* codes[4] = {m1.codes(j0), m1.codes(j1), m3.codes(j0), m3.codes(j1)};
    const __half* sc[4] = {m1.scales(j0), m1.scales(j1), m3.scales(j0), m3.scales(j1)};
    const __half* mn[4] = {m1.mins(j0), m1.mins(j1), m3.mins(j0), m3.mins(j1)};
    float acc[4][T];
    q8_dot<B, G, T, Asym, 4, U>(codes, sc, mn, units, q8_smem, stride, act, lane, acc);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (lane == (i * T + t) % 32 && j0 + i < p.ffn && t < n) {
          const float g = acc[i][t];
          h[t * p.ffn + j0 + i] = silu(g) * acc[2 + i][t];
        }
  }
}

/// out[token][r] += weight * (W2[r] . q8(h[e][t])) (atomic: several experts share a token).
template <Precision P, int G, int T, bool Asym, int U>
__global__ void __launch_bounds__(kQ8Warps * 32) q8_down_scatter(const __grid_constant__ Q8GroupParams p) {
  constexpr int B = static_cast<int>(precision_bits(P));
  using Geo = Q8Geo<B, G>;
  constexpr int R = kQ8Rows;
  const ExpertTask& task = p.tasks[blockIdx.y];
  extern __shared__ __align__(16) unsigned char q8_smem[];
  const float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
  q8_quantize<B, G, T>(h, p.ffn, task.n, p.ffn, Asym, q8_smem);
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int n = static_cast<int>(task.n);
  const std::size_t act = q8_act_bytes<B, G>(p.ffn);
  const std::size_t stride = q8_token_bytes<B, G>(p.ffn);
  const std::size_t units = p.ffn / Geo::kE;
  const Q8Matrix m2 = q8_matrix<B, G>(task.w2, p.down_scales, p.down_mins, p.ffn);
  const std::size_t row_groups = (p.hidden + R - 1) / R;
  for (std::size_t rg = static_cast<std::size_t>(blockIdx.x) * kQ8Warps + threadIdx.x / 32; rg < row_groups;
       rg += static_cast<std::size_t>(gridDim.x) * kQ8Warps) {
    const std::size_t row0 = rg * R;
    const uint4* codes[R];
    const __half* sc[R];
    const __half* mn[R];
    q8_row_group<R>(m2, row0, p.hidden, codes, sc, mn);
    float acc[R][T];
    q8_dot<B, G, T, Asym, R, U>(codes, sc, mn, units, q8_smem, stride, act, lane, acc);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (lane == (r * T + t) % 32 && row0 + r < p.hidden && t < n)
          atomicAdd(p.out + task.token[t] * p.ldo + row0 + r, task.weight[t] * acc[r][t]);
  }
}

/// Dynamic shared memory one q8_gemv block needs for T tokens of `cols` columns.
template <Precision P, int G, int T>
constexpr std::size_t q8_smem_bytes(std::size_t cols) {
  return T * q8_token_bytes<static_cast<int>(precision_bits(P)), G>(cols);
}

template <Precision P, int G, int T, bool Asym, int U, int MinBlocks = 1>
Status launch_q8(const GemvArgs& a, cudaStream_t stream) noexcept {
  const std::size_t smem = detail::q8_smem_bytes<P, G, T>(a.layout.cols);
  DeviceFacts d;
  MOEX_RETURN_IF_ERROR(device_facts(d));
  if (smem > static_cast<std::size_t>(d.optin)) return launch_gemv<P, G, T>(a, stream);  // exact path
  auto* kernel = detail::q8_gemv<P, G, T, Asym, U, MinBlocks>;
  std::size_t cap = 0;
  MOEX_RETURN_IF_ERROR(resident_blocks(kernel, kQ8Warps * 32, smem, d, cap));
  const std::size_t row_groups = (a.layout.rows + detail::kQ8Rows - 1) / detail::kQ8Rows;
  const unsigned blocks = blocks_per_task(cap, 1, (row_groups + detail::kQ8Warps - 1) / detail::kQ8Warps);
  const detail::Q8Params p{a.w,
                           a.layout.scales_offset,
                           a.layout.mins_offset,
                           a.layout.rows,
                           a.layout.cols,
                           a.x,
                           a.ldx,
                           a.y,
                           a.ldy,
                           a.n,
                           a.accumulate};
  kernel<<<blocks, detail::kQ8Warps * 32, smem, stream>>>(p);
  return cuda_status(cudaGetLastError(), "q8_gemv launch");
}

/// The q8 grouped experts with U units per lane in flight in both kernels.
template <Precision P, int G, int T, bool Asym, int U = kQ8GroupUnits<T>>
Status launch_grouped_q8(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  const std::size_t hidden = a.layout.shape.hidden, ffn = a.layout.shape.ffn;
  const std::size_t smem_up = q8_smem_bytes<P, G, T>(hidden);
  const std::size_t smem_down = q8_smem_bytes<P, G, T>(ffn);
  DeviceFacts d;
  MOEX_RETURN_IF_ERROR(device_facts(d));
  if (smem_up > static_cast<std::size_t>(d.optin) || smem_down > static_cast<std::size_t>(d.optin))
    return launch_grouped_expert<P, G, T>(a, stream);  // exact path
  Q8GroupParams p{};
  for (std::uint32_t i = 0; i < a.count; ++i) p.tasks[i] = a.tasks[i];
  p.hidden = hidden;
  p.ffn = ffn;
  p.up_scales = a.layout.w1.scales_offset;
  p.up_mins = a.layout.w1.mins_offset;
  p.down_scales = a.layout.w2.scales_offset;
  p.down_mins = a.layout.w2.mins_offset;
  p.x = a.x;
  p.ldx = a.ldx;
  p.h = a.workspace;
  p.out = a.out;
  p.ldo = a.ldo;
  // Persistent grids shared by the tasks, one wave (blocks_per_task); each block quantizes its
  // task's activations once.
  auto grid_x = [&](std::size_t cap, std::size_t row_groups) {
    return blocks_per_task(cap, a.count, (row_groups + kQ8Warps - 1) / kQ8Warps);
  };
  auto* up = q8_swiglu<P, G, T, Asym, U>;
  std::size_t cap = 0;
  MOEX_RETURN_IF_ERROR(resident_blocks(up, kQ8Warps * 32, smem_up, d, cap));
  up<<<dim3(grid_x(cap, (ffn + 1) / 2), a.count), kQ8Warps * 32, smem_up, stream>>>(p);
  MOEX_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "q8_swiglu launch"));
  auto* down = q8_down_scatter<P, G, T, Asym, U>;
  MOEX_RETURN_IF_ERROR(resident_blocks(down, kQ8Warps * 32, smem_down, d, cap));
  down<<<dim3(grid_x(cap, (hidden + kQ8Rows - 1) / kQ8Rows), a.count), kQ8Warps * 32, smem_down, stream>>>(p);
  return cuda_status(cudaGetLastError(), "q8_down_scatter launch");
}

}  // namespace detail

template <Precision P, int G, int T>
Status launch_gemv_q8(const GemvArgs& a, cudaStream_t stream) noexcept {
  constexpr int B = static_cast<int>(precision_bits(P));
  return a.layout.mins_offset ? detail::launch_q8<P, G, T, true, detail::kQ8Units<B, G, T, true>>(a, stream)
                              : detail::launch_q8<P, G, T, false, detail::kQ8Units<B, G, T, false>>(a, stream);
}

template <Precision P, int G>
Status launch_gemv_q8_variant(const GemvArgs& a, int variant, cudaStream_t stream) noexcept {
  if (a.n != 1) return unsupported("launch_gemv_q8_variant: batch 1 only");
  if (variant == 0)
    return a.layout.mins_offset ? detail::launch_q8<P, G, 1, true, 1>(a, stream)
                                : detail::launch_q8<P, G, 1, false, 1>(a, stream);
  if (variant == 1)
    return a.layout.mins_offset ? detail::launch_q8<P, G, 1, true, 2>(a, stream)
                                : detail::launch_q8<P, G, 1, false, 2>(a, stream);
  return unsupported("launch_gemv_q8_variant: unknown variant");
}

template <Precision P, int G, int T>
Status launch_grouped_expert_q8(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  return a.layout.w1.mins_offset ? detail::launch_grouped_q8<P, G, T, true>(a, stream)
                                 : detail::launch_grouped_q8<P, G, T, false>(a, stream);
}

template <Precision P, int G>
Status launch_grouped_expert_q8_variant(const GroupedExpertArgs& a, int variant, cudaStream_t stream) noexcept {
  for (std::uint32_t i = 0; i < a.count; ++i)
    if (a.tasks[i].n != 1) return unsupported("launch_grouped_expert_q8_variant: one token a task only");
  if (variant == 0) return launch_grouped_expert_q8<P, G, 1>(a, stream);
  if (variant == 1)
    return a.layout.w1.mins_offset ? detail::launch_grouped_q8<P, G, 1, true, 1>(a, stream)
                                   : detail::launch_grouped_q8<P, G, 1, false, 1>(a, stream);
  return unsupported("launch_grouped_expert_q8_variant: unknown variant");
}

}  // namespace cuda
MOEX_NAMESPACE_END

/// Explicit instantiations of q8_gemv and the q8 grouped experts for one (precision, group), token
/// buckets 1, 2, 4, 8, and of both's batch-1 variants (benchmarks).
#define MOEX_INSTANTIATE_GEMV_Q8(P, G)                                                                           \
  template ::moex::Status moex::cuda::launch_gemv_q8<P, G, 1>(const GemvArgs&, cudaStream_t) noexcept;           \
  template ::moex::Status moex::cuda::launch_gemv_q8<P, G, 2>(const GemvArgs&, cudaStream_t) noexcept;           \
  template ::moex::Status moex::cuda::launch_gemv_q8<P, G, 4>(const GemvArgs&, cudaStream_t) noexcept;           \
  template ::moex::Status moex::cuda::launch_gemv_q8<P, G, 8>(const GemvArgs&, cudaStream_t) noexcept;           \
  template ::moex::Status moex::cuda::launch_gemv_q8_variant<P, G>(const GemvArgs&, int, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_grouped_expert_q8<P, G, 1>(const GroupedExpertArgs&,                \
                                                                        cudaStream_t) noexcept;                  \
  template ::moex::Status moex::cuda::launch_grouped_expert_q8<P, G, 2>(const GroupedExpertArgs&,                \
                                                                        cudaStream_t) noexcept;                  \
  template ::moex::Status moex::cuda::launch_grouped_expert_q8<P, G, 4>(const GroupedExpertArgs&,                \
                                                                        cudaStream_t) noexcept;                  \
  template ::moex::Status moex::cuda::launch_grouped_expert_q8<P, G, 8>(const GroupedExpertArgs&,                \
                                                                        cudaStream_t) noexcept;                  \
  template ::moex::Status moex::cuda::launch_grouped_expert_q8_variant<P, G>(const GroupedExpertArgs&, int,      \
                                                                             cudaStream_t) noexcept;
