#pragma once
/// @file gemv.cuh
/// Device templates of the fused dequantize-GEMV family (dequant_gemv, swiglu_gemv,
/// down_scatter_gemv). Raw pointers and sizes only.
///
/// Work split: a warp owns NR rows; each lane streams 16 bytes of every row per step (coalesced:
/// the warp reads 512 contiguous bytes of each row), U steps unrolled so that NR*U independent
/// 16-byte loads are in flight per lane before the first use. Quantized codes are decoded with
/// a mantissa trick (f = 1 + u/2^b built by one shift and one and-or; no I2F, no FADD); each 32-bit
/// word of codes is multiplied by the x values it covers, then scaled once by its group's scale:
///   sum_j (d*u_j + m)*x_j = (2^b d)*F + (m - 2^b d)*X      (symmetric: m = -2^(b-1) d)
/// with F = sum_j f_j*x_j and X = sum_j x_j (X is shared by the warp's rows).

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moex/types.hpp"

#include "device_math.cuh"
#include "kernels.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline constexpr int kGemvWarps = 4;  ///< warps per block

/// Compile-time facts of a storage precision.
template <Precision P>
struct FormatTraits;
template <>
struct FormatTraits<Precision::kBF16> {
  static constexpr int kBits = 16, kRows = 1, kUnroll = 4;
  static constexpr bool kQuant = false;
};
template <>
struct FormatTraits<Precision::kF16> {
  static constexpr int kBits = 16, kRows = 1, kUnroll = 4;
  static constexpr bool kQuant = false;
};
template <>
struct FormatTraits<Precision::kInt8> {
  static constexpr int kBits = 8, kRows = 2, kUnroll = 2;
  static constexpr bool kQuant = true;
};
template <>
struct FormatTraits<Precision::kInt4> {
  static constexpr int kBits = 4, kRows = 4, kUnroll = 1;
  static constexpr bool kQuant = true;
};
template <>
struct FormatTraits<Precision::kInt2> {
  static constexpr int kBits = 2, kRows = 4, kUnroll = 1;
  static constexpr bool kQuant = true;
};

/// Elements in one 16-byte load / one 32-bit word.
template <Precision P>
inline constexpr int kPerLoad = 128 / FormatTraits<P>::kBits;
template <Precision P>
inline constexpr int kPerWord = 32 / FormatTraits<P>::kBits;

/// Row pointers of one matrix row: codes, and (quantized) the row's scales and mins.
struct RowPtr {
  const std::uint8_t* codes;
  const __half* scales;
  const __half* mins;  ///< null for symmetric
};

__device__ __forceinline__ uint4 load_stream(const void* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));  // read once: evict-first
}

__device__ __forceinline__ std::uint32_t word_of(const uint4& v, int q) {
  return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w;
}

/// Decodes word `w` into f[kPerWord] (integer codes as exact floats; floats as themselves).
template <Precision P>
__device__ __forceinline__ void decode_word(std::uint32_t w, float (&f)[kPerWord<P>]) {
  if constexpr (P == Precision::kBF16) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  } else if constexpr (P == Precision::kF16) {
    __half2 h;
    static_assert(sizeof(h) == sizeof(w));
    memcpy(&h, &w, sizeof(w));
    const float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
  } else {
    // Code u goes to the top b mantissa bits of 1.0f: f = 1 + u / 2^b, exactly, in one shift and
    // one LOP3 (and-or). The caller removes the 1s with X = sum x (see dot_rows).
    constexpr int b = FormatTraits<P>::kBits;
    constexpr std::uint32_t top = ((1u << b) - 1u) << (23 - b);
#pragma unroll
    for (int j = 0; j < kPerWord<P>; ++j) {
      constexpr int kTop = 23 - b;
      const int sh = kTop - b * j;
      const std::uint32_t moved = sh >= 0 ? (w << sh) : (w >> -sh);
      f[j] = __uint_as_float((moved & top) | 0x3F800000u);
    }
  }
}

/// Loads n (2, 4, 8 or 16) consecutive floats of x.
template <int N>
__device__ __forceinline__ void load_x(const float* p, float (&xs)[N]) {
  if constexpr (N == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    xs[0] = v.x;
    xs[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p) + i);
      xs[4 * i] = v.x;
      xs[4 * i + 1] = v.y;
      xs[4 * i + 2] = v.z;
      xs[4 * i + 3] = v.w;
    }
  }
}

/// acc[r][t] = partial (per lane) dot products of NR rows with T token vectors over `cols`.
template <Precision P, int G, int T, int NR>
__device__ __forceinline__ void dot_rows(const RowPtr (&row)[NR], std::size_t cols, const float* const (&xp)[T],
                                         float (&acc)[NR][T], int lane) {
  using Tr = FormatTraits<P>;
  // Two matrices at once (swiglu) already double the loads in flight: halve the unroll there.
  constexpr int kU = NR > Tr::kRows && Tr::kUnroll > 1 ? Tr::kUnroll / 2 : Tr::kUnroll;
  constexpr int kE = kPerLoad<P>;
  constexpr int kW = kPerWord<P>;
  constexpr int kGroups = Tr::kQuant ? (kE > G ? kE / G : 1) : 1;  // groups one load spans
  constexpr float kOffset = Tr::kQuant ? static_cast<float>(1u << (Tr::kBits - 1)) : 0.f;
  constexpr float kLevels = Tr::kQuant ? static_cast<float>(1u << Tr::kBits) : 0.f;
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.f;

  for (std::size_t c0 = static_cast<std::size_t>(lane) * kE; c0 < cols; c0 += static_cast<std::size_t>(32) * kE * kU) {
    uint4 v[kU][NR];
    float d[kU][NR][kGroups];
    float m[kU][NR][kGroups];
    // Phase 1: issue every load of this step.
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const std::size_t c = c0 + static_cast<std::size_t>(u) * 32 * kE;
      if (c < cols) {
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          v[u][r] = load_stream(row[r].codes + c * Tr::kBits / 8);
          if constexpr (Tr::kQuant) {
#pragma unroll
            for (int g = 0; g < kGroups; ++g) {
              const std::size_t gi = c / G + g;
              // With f = 1 + u/2^b: sum_j (d*u_j + m)*x_j = (2^b d)*F + (m - 2^b d)*X, where
              // F = sum f_j x_j and X = sum x_j; symmetric has m = -2^(b-1) d.
              const float dd = __half2float(row[r].scales[gi]);
              const float mm = row[r].mins ? __half2float(row[r].mins[gi]) : -kOffset * dd;
              d[u][r][g] = kLevels * dd;
              m[u][r][g] = mm - kLevels * dd;
            }
          }
        }
      }
    }
    // Phase 2: decode and multiply.
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const std::size_t c = c0 + static_cast<std::size_t>(u) * 32 * kE;
      if (c >= cols) continue;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int g = Tr::kQuant ? (q * kW) / (G > 0 ? G : 1) : 0;
        float wf[NR][kW];
#pragma unroll
        for (int r = 0; r < NR; ++r) decode_word<P>(word_of(v[u][r], q), wf[r]);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          float xs[kW];
          load_x<kW>(xp[t] + c + q * kW, xs);
          float sx = 0.f;
          if constexpr (Tr::kQuant) {
#pragma unroll
            for (int j = 0; j < kW; ++j) sx += xs[j];
          }
#pragma unroll
          for (int r = 0; r < NR; ++r) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < kW; ++j) s = fmaf(wf[r][j], xs[j], s);
            if constexpr (Tr::kQuant) {
              acc[r][t] = fmaf(d[u][r][g], s, fmaf(m[u][r][g], sx, acc[r][t]));
            } else {
              acc[r][t] += s;
            }
          }
        }
      }
    }
  }
}

/// Offsets of one matrix's sections (layout.hpp).
struct MatrixOffsets {
  std::size_t scales = 0;
  std::size_t mins = 0;  ///< 0: symmetric
};

__device__ __forceinline__ RowPtr row_ptr(const std::byte* base, MatrixOffsets off, std::size_t row,
                                          std::size_t row_bytes, std::size_t groups_per_row) {
  const auto* b = reinterpret_cast<const std::uint8_t*>(base);
  RowPtr p;
  p.codes = b + row * row_bytes;
  p.scales = off.scales ? reinterpret_cast<const __half*>(b + off.scales) + row * groups_per_row : nullptr;
  p.mins = off.mins ? reinterpret_cast<const __half*>(b + off.mins) + row * groups_per_row : nullptr;
  return p;
}

/// Launch parameters of dequant_gemv.
struct GemvParams {
  const std::byte* w;
  MatrixOffsets off;
  std::size_t rows, cols;
  const float* x;
  std::size_t ldx;
  float* y;
  std::size_t ldy;
  std::uint32_t n;
  bool accumulate;
};

template <Precision P, int G, int T>
__global__ void __launch_bounds__(kGemvWarps * 32) dequant_gemv(const GemvParams p) {
  constexpr int R = FormatTraits<P>::kRows;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32) * R;
  if (row0 >= p.rows) return;  // whole warp
  const std::size_t row_bytes = p.cols * FormatTraits<P>::kBits / 8;
  const std::size_t gpr = FormatTraits<P>::kQuant ? p.cols / G : 0;
  RowPtr rp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const std::size_t row = row0 + r < p.rows ? row0 + r : p.rows - 1;
    rp[r] = row_ptr(p.w, p.off, row, row_bytes, gpr);
  }
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = p.x + (t < static_cast<int>(p.n) ? t : 0) * p.ldx;
  float acc[R][T];
  dot_rows<P, G, T, R>(rp, p.cols, xp, acc, lane);
  warp_sum<R, T>(acc);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (row0 + r < p.rows && t < static_cast<int>(p.n)) {
          float* o = p.y + t * p.ldy + row0 + r;
          *o = p.accumulate ? *o + acc[r][t] : acc[r][t];
        }
      }
  }
}

/// Launch parameters of the grouped expert kernels.
struct GroupParams {
  ExpertTask tasks[kMaxGroupExperts];
  std::uint32_t count;
  std::size_t hidden, ffn;
  MatrixOffsets up_off;    ///< w1 and w3 (same layout)
  MatrixOffsets down_off;  ///< w2
  const float* x;
  std::size_t ldx;
  float* h;  ///< workspace [count][kMaxGemvTokens][ffn]
  float* out;
  std::size_t ldo;
};

/// h[e][t][r] = silu(W1[r] . x[token]) * (W3[r] . x[token]); w1 and w3 rows stream together.
template <Precision P, int G, int T>
__global__ void __launch_bounds__(kGemvWarps * 32) swiglu_gemv(const __grid_constant__ GroupParams p) {
  constexpr int R = FormatTraits<P>::kRows;
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32) * R;
  if (row0 >= p.ffn) return;
  const std::size_t row_bytes = p.hidden * FormatTraits<P>::kBits / 8;
  const std::size_t gpr = FormatTraits<P>::kQuant ? p.hidden / G : 0;
  RowPtr rp[2 * R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const std::size_t row = row0 + r < p.ffn ? row0 + r : p.ffn - 1;
    rp[r] = row_ptr(task.w1, p.up_off, row, row_bytes, gpr);
    rp[R + r] = row_ptr(task.w3, p.up_off, row, row_bytes, gpr);
  }
  const int n = static_cast<int>(task.n);
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = p.x + task.token[t < n ? t : 0] * p.ldx;
  float acc[2 * R][T];
  if constexpr (2 * R * kPerWord < P >> 64) {
    // int2: decoding 2R rows at once would spill; stream w1 then w3.
    RowPtr r1[R], r3[R];
    float a1[R][T], a3[R][T];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      r1[r] = rp[r];
      r3[r] = rp[R + r];
    }
    dot_rows<P, G, T, R>(r1, p.hidden, xp, a1, lane);
    dot_rows<P, G, T, R>(r3, p.hidden, xp, a3, lane);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        acc[r][t] = a1[r][t];
        acc[R + r][t] = a3[r][t];
      }
  } else {
    dot_rows<P, G, T, 2 * R>(rp, p.hidden, xp, acc, lane);
  }
  warp_sum<2 * R, T>(acc);
  if (lane == 0) {
    float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (row0 + r < p.ffn && t < n) h[t * p.ffn + row0 + r] = silu(acc[r][t]) * acc[R + r][t];
  }
}

/// out[token][r] += weight * (W2[r] . h[e][t]) (atomic: several experts share a token).
template <Precision P, int G, int T>
__global__ void __launch_bounds__(kGemvWarps * 32) down_scatter_gemv(const __grid_constant__ GroupParams p) {
  constexpr int R = FormatTraits<P>::kRows;
  const ExpertTask& task = p.tasks[blockIdx.y];
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const std::size_t row0 = (static_cast<std::size_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32) * R;
  if (row0 >= p.hidden) return;
  const std::size_t row_bytes = p.ffn * FormatTraits<P>::kBits / 8;
  const std::size_t gpr = FormatTraits<P>::kQuant ? p.ffn / G : 0;
  RowPtr rp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const std::size_t row = row0 + r < p.hidden ? row0 + r : p.hidden - 1;
    rp[r] = row_ptr(task.w2, p.down_off, row, row_bytes, gpr);
  }
  const int n = static_cast<int>(task.n);
  const float* h = p.h + static_cast<std::size_t>(blockIdx.y) * kMaxGemvTokens * p.ffn;
  const float* xp[T];
#pragma unroll
  for (int t = 0; t < T; ++t) xp[t] = h + (t < n ? t : 0) * p.ffn;
  float acc[R][T];
  dot_rows<P, G, T, R>(rp, p.ffn, xp, acc, lane);
  warp_sum<R, T>(acc);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int t = 0; t < T; ++t)
        if (row0 + r < p.hidden && t < n)
          atomicAdd(p.out + task.token[t] * p.ldo + row0 + r, task.weight[t] * acc[r][t]);
  }
}

inline MatrixOffsets offsets_of(const MatrixLayout& l) { return {l.scales_offset, l.mins_offset}; }

template <Precision P>
inline unsigned blocks_for(std::size_t rows) {
  constexpr std::size_t per_block = static_cast<std::size_t>(kGemvWarps) * FormatTraits<P>::kRows;
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
}

}  // namespace detail

template <Precision P, int G, int T>
Status launch_gemv(const GemvArgs& a, cudaStream_t stream) noexcept {
  detail::GemvParams p{
      a.w, detail::offsets_of(a.layout), a.layout.rows, a.layout.cols, a.x, a.ldx, a.y, a.ldy, a.n, a.accumulate};
  detail::dequant_gemv<P, G, T><<<detail::blocks_for<P>(a.layout.rows), detail::kGemvWarps * 32, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "dequant_gemv launch");
}

template <Precision P, int G, int T>
Status launch_grouped_expert(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  detail::GroupParams p{};
  for (std::uint32_t i = 0; i < a.count; ++i) p.tasks[i] = a.tasks[i];
  p.count = a.count;
  p.hidden = a.layout.shape.hidden;
  p.ffn = a.layout.shape.ffn;
  p.up_off = detail::offsets_of(a.layout.w1);
  p.down_off = detail::offsets_of(a.layout.w2);
  p.x = a.x;
  p.ldx = a.ldx;
  p.h = a.workspace;
  p.out = a.out;
  p.ldo = a.ldo;
  const dim3 up_grid(detail::blocks_for<P>(p.ffn), a.count);
  detail::swiglu_gemv<P, G, T><<<up_grid, detail::kGemvWarps * 32, 0, stream>>>(p);
  MOEX_RETURN_IF_ERROR(cuda_status(cudaGetLastError(), "swiglu_gemv launch"));
  const dim3 down_grid(detail::blocks_for<P>(p.hidden), a.count);
  detail::down_scatter_gemv<P, G, T><<<down_grid, detail::kGemvWarps * 32, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "down_scatter_gemv launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END

/// Explicit instantiations of one (precision, group) for every token bucket (1, 2, 4, 8).
#define MOEX_INSTANTIATE_GEMV(P, G)                                                                                    \
  template ::moex::Status moex::cuda::launch_gemv<P, G, 1>(const GemvArgs&, cudaStream_t) noexcept;                    \
  template ::moex::Status moex::cuda::launch_gemv<P, G, 2>(const GemvArgs&, cudaStream_t) noexcept;                    \
  template ::moex::Status moex::cuda::launch_gemv<P, G, 4>(const GemvArgs&, cudaStream_t) noexcept;                    \
  template ::moex::Status moex::cuda::launch_gemv<P, G, 8>(const GemvArgs&, cudaStream_t) noexcept;                    \
  template ::moex::Status moex::cuda::launch_grouped_expert<P, G, 1>(const GroupedExpertArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_grouped_expert<P, G, 2>(const GroupedExpertArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_grouped_expert<P, G, 4>(const GroupedExpertArgs&, cudaStream_t) noexcept; \
  template ::moex::Status moex::cuda::launch_grouped_expert<P, G, 8>(const GroupedExpertArgs&, cudaStream_t) noexcept;
