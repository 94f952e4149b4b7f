#pragma once
/// @file block_decode.cuh
/// The geometry and the host-checkable pieces of the block-format kernels (gemv_block.cuh): tile
/// and ring sizes, the q8 path's unit decoders, the byte span a bulk copy brings in for a row's
/// tile, how warps share the (row group, tile) steps, and where quantize_rows puts a column's code.
/// Everything here is __host__ __device__, so the CPU test suite checks it against the CPU's own
/// decoders (tests/gpu/block_kernels_test.cpp) on machines without a GPU.

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"
#include "moex/types.hpp"

#define MOEX_HD __host__ __device__ __forceinline__
/// `#pragma unroll` in the device pass only (the host compiler does not know it).
#ifdef __CUDA_ARCH__
#define MOEX_DEVICE_UNROLL _Pragma("unroll")
#else
#define MOEX_DEVICE_UNROLL
#endif

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

inline constexpr int kBlockWarps = 4;      ///< warps per block of the block-format kernels
inline constexpr int kBlockRows = 4;       ///< rows a warp streams at once (a row group)
inline constexpr int kTileWeights = 1024;  ///< columns of one row in one stage: 32 units of 32
inline constexpr int kTileUnits = kTileWeights / 32;

/// Stages of a warp's ring (about 10-13 KB a warp, so that 4-5 blocks of 4 warps fit an SM with
/// 100+ KB in flight).
template <Precision P>
inline constexpr int kStages = P == Precision::kQ8_0 || P == Precision::kFp8E4M3 ? 3 : 4;

/// Bytes of one row's tile, of its buffer in a stage (room for the rounding to 16 bytes at both
/// ends), of a stage (kBlockRows buffers), and of a warp's ring with its mbarriers.
template <Precision P>
inline constexpr int kTileBytes = static_cast<int>(kTileWeights / block_geometry(P).weights * block_geometry(P).bytes);
template <Precision P>
inline constexpr int kRowBuf = kTileBytes<P> + 32;
// clang-format 14 reads `a * b<P>` below as a pointer declaration.
// clang-format off
template <Precision P>
inline constexpr int kStageBytes = kBlockRows * kRowBuf<P>;
template <Precision P>
inline constexpr int kRingBytes = kStages<P> * kStageBytes<P>;
// clang-format on
template <Precision P>
inline constexpr int kWarpBytes = (kRingBytes<P> + kStages<P> * 8 + 15) / 16 * 16;
static_assert(kTileBytes<Precision::kQ8_0> % 16 == 0 && kTileBytes<Precision::kQ4_0> % 16 == 0 &&
              kTileBytes<Precision::kQ4_K> % 16 == 0 && kTileBytes<Precision::kFp8E4M3> % 16 == 0);

/// f32 value of the f16 bits h.
MOEX_HD float half_bits(std::uint32_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  return f16_to_float(static_cast<std::uint16_t>(h));
#endif
}

/// The low 32 bits of (hi:lo) >> min(shift, 32) (PTX shf.r.clamp).
MOEX_HD std::uint32_t funnel_rc(std::uint32_t lo, std::uint32_t hi, std::uint32_t shift) {
#ifdef __CUDA_ARCH__
  return __funnelshift_rc(lo, hi, shift);
#else
  const std::uint64_t v = (static_cast<std::uint64_t>(hi) << 32) | lo;
  return static_cast<std::uint32_t>(v >> (shift < 32u ? shift : 32u));
#endif
}

/// Q4_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes of ggml's layout, given
/// as three words (w0 = bytes 0-3, w1 = 4-7, w2 = 8-11); branch-free, since the lanes of a warp take
/// different sub-blocks and the rules of j < 4 and j >= 4 would diverge.
MOEX_HD void q4k_scale_min_words(std::uint32_t w0, std::uint32_t w1, std::uint32_t w2, int j, std::uint32_t& scale,
                                 std::uint32_t& mins) {
  const std::uint32_t sh = 8u * static_cast<std::uint32_t>(j & 3);
  const std::uint32_t a = (w0 >> sh) & 0xFFu, b = (w1 >> sh) & 0xFFu, c = (w2 >> sh) & 0xFFu;
  const bool hi = j >= 4;
  scale = hi ? (c & 0xFu) | ((a >> 6) << 4) : a & 63u;
  mins = hi ? (c >> 4) | ((b >> 6) << 4) : b & 63u;
}

/// float(i) for |i| < 2^22 at full rate (I2F is quarter rate on sm_90): the integer is placed in
/// the mantissa of 1.5 * 2^23 and the bias subtracted.
MOEX_HD float small_int_to_float(int i) {
#ifdef __CUDA_ARCH__
  return __int_as_float(i + 0x4B400000) - 12582912.f;
#else
  return static_cast<float>(i);
#endif
}

/// Division by a launch-time constant b (the fp8 scale block), branch-free for every b: a
/// multiply-high, two adds and two shifts (Granlund and Montgomery, PLDI 1994, fig. 4.1), exact for
/// every 32-bit v. (A 32-bit division is some twenty instructions; a uniform branch between a shift
/// and a division measured slower on the H100: fp8 GEMV 0.79 -> 0.73 of the copy ceiling, with a
/// third of the issued lanes predicated off.)
struct BlockDiv {
  std::uint32_t m = 1;    ///< floor(2^32 (2^l - b) / b) + 1, l = ceil(log2 b)
  std::uint32_t sh1 = 0;  ///< min(l, 1)
  std::uint32_t sh2 = 0;  ///< max(l - 1, 0)
  /// The divider for b (b = 0 is taken as 1: never a division by zero); default-constructed, b = 1.
  static BlockDiv of(std::uint32_t b) {
    const std::uint64_t d = b == 0 ? 1 : b;
    std::uint32_t l = 0;
    while ((std::uint64_t{1} << l) < d) ++l;
    BlockDiv q;
    q.m = static_cast<std::uint32_t>(((std::uint64_t{1} << 32) * ((std::uint64_t{1} << l) - d)) / d + 1);
    q.sh1 = l < 1 ? l : 1;
    q.sh2 = l > 1 ? l - 1 : 0;
    return q;
  }
  MOEX_HD std::uint32_t operator()(std::uint32_t v) const {
#ifdef __CUDA_ARCH__
    const std::uint32_t t = __umulhi(m, v);
#else
    const auto t = static_cast<std::uint32_t>((static_cast<std::uint64_t>(m) * v) >> 32);
#endif
    return (t + ((v - t) >> sh1)) >> sh2;
  }
};

/// The 4-byte-aligned word at or below p.
MOEX_HD const std::uint32_t* word_at_or_below(const std::uint8_t* p) {
  return reinterpret_cast<const std::uint32_t*>(reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t{3});
}

/// q8 path: the 32 codes of unit u of a tile (shared memory at s, 2-byte aligned) as 8 words in
/// column order (word i: columns 4i..4i+3; Q8_0 signed bytes, 4-bit formats unsigned 0..15), and
/// (dw, mn) with the unit's dot against a quantized group = d_x (dw sum c q + mn sum q).
template <Precision P>
MOEX_HD void unit_codes(const std::uint8_t* s, int u, std::uint32_t (&c)[8], float& dw, float& mn) {
  if constexpr (P == Precision::kQ8_0 || P == Precision::kQ4_0) {
    // A block starts 0 or 2 bytes past a word; its codes start 2 bytes into it. Aligned words
    // and funnel shifts (a shift of 32 takes the high word whole) give the code words.
    constexpr int kBytes = P == Precision::kQ8_0 ? 34 : 18;
    constexpr int kWords = P == Precision::kQ8_0 ? 9 : 5;
    const std::uint8_t* b = s + kBytes * u;
    const std::uint32_t* w = word_at_or_below(b);
    const std::uint32_t sh = static_cast<std::uint32_t>(reinterpret_cast<std::uintptr_t>(b) & 3u) * 8u;
    std::uint32_t v[kWords];
    MOEX_DEVICE_UNROLL
    for (int i = 0; i < kWords; ++i) v[i] = w[i];
    const float d = half_bits((v[0] >> sh) & 0xffffu);
    if constexpr (P == Precision::kQ8_0) {
      MOEX_DEVICE_UNROLL
      for (int i = 0; i < 8; ++i) c[i] = funnel_rc(v[i], v[i + 1], sh + 16u);
      dw = d;
      mn = 0.f;
    } else {
      MOEX_DEVICE_UNROLL
      for (int i = 0; i < 4; ++i) {
        const std::uint32_t q = funnel_rc(v[i], v[i + 1], sh + 16u);
        c[i] = q & 0x0F0F0F0Fu;             // weights 4i..4i+3: low nibbles
        c[4 + i] = (q >> 4) & 0x0F0F0F0Fu;  // weights 16+4i..: high nibbles
      }
      dw = d;
      mn = -8.f * d;
    }
  } else {
    static_assert(P == Precision::kQ4_K);
    const std::uint8_t* b = s + 144 * (u / 8);  // 16-byte aligned: Q4_K rows are whole 144-byte super-blocks
    const int j = u % 8;
    const uint4 head = *reinterpret_cast<const uint4*>(b);  // d, dmin (f16) and the 12 scale bytes
    const std::uint32_t dd = head.x;
    std::uint32_t scale, mins;
    q4k_scale_min_words(head.y, head.z, head.w, j, scale, mins);
    const uint4* q = reinterpret_cast<const uint4*>(b + 16 + 32 * (j / 2));
    const uint4 qa = q[0], qb = q[1];
    const std::uint32_t words[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
    const int sh = (j & 1) * 4;  // odd sub-blocks are the high nibbles
    MOEX_DEVICE_UNROLL
    for (int i = 0; i < 8; ++i) c[i] = (words[i] >> sh) & 0x0F0F0F0Fu;
    dw = half_bits(dd & 0xffffu) * small_int_to_float(static_cast<int>(scale));
    mn = -half_bits(dd >> 16) * small_int_to_float(static_cast<int>(mins));
  }
}

/// The byte range a bulk copy brings in for one row's tile: [a0, a1) (16-byte aligned ends), the
/// tile's own bytes [tb, te), and the bytes [a1, te) past the last whole 16 bytes of the allocation.
struct TileSpan {
  std::uintptr_t a0, a1, tb, te;
};
template <Precision P>
MOEX_HD TileSpan tile_span(const std::uint8_t* row, const std::uint8_t* end, std::size_t row_bytes, std::uint32_t k) {
  TileSpan s;
  const auto r0 = reinterpret_cast<std::uintptr_t>(row);
  s.tb = r0 + static_cast<std::uintptr_t>(k) * kTileBytes<P>;
  const std::uintptr_t re = r0 + row_bytes;
  s.te = s.tb + kTileBytes<P> < re ? s.tb + kTileBytes<P> : re;
  s.a0 = s.tb & ~std::uintptr_t{15};
  const std::uintptr_t up = (s.te + 15) & ~std::uintptr_t{15};
  const std::uintptr_t lim = reinterpret_cast<std::uintptr_t>(end) & ~std::uintptr_t{15};
  s.a1 = up < lim ? up : lim;
  if (s.a1 < s.a0) s.a1 = s.a0;
  return s;
}

/// A warp's share of the (row group, tile) steps of a matrix set: `steps` steps from tile k0 of row
/// group rg0, going on to row group rg + stride after a group's last tile.
struct StepRange {
  std::uint32_t rg0 = 0, k0 = 0, stride = 1;
  std::uint64_t steps = 0;
};
/// Whole row groups first, first + stride, ... (< count): every group's full sums reach the sink
/// (the GEMV, whose output is stored, and SwiGLU, which is not linear in its partial sums).
MOEX_HD StepRange strided_groups(std::uint32_t first, std::uint32_t stride, std::uint32_t count, std::uint32_t tiles) {
  StepRange r;
  r.rg0 = first;
  r.stride = stride;
  r.steps = first < count ? static_cast<std::uint64_t>((count - first + stride - 1) / stride) * tiles : 0;
  return r;
}
/// Warp w of W takes the w-th of W equal contiguous parts of all count x tiles steps: balanced to
/// one step, with partial sums of the groups cut at either end (sinks that add atomically).
MOEX_HD StepRange even_steps(std::uint32_t w, std::uint32_t W, std::uint32_t count, std::uint32_t tiles) {
  const std::uint64_t total = static_cast<std::uint64_t>(count) * tiles;
  const std::uint64_t s0 = total * w / W, s1 = total * (w + 1) / W;
  StepRange r;
  r.rg0 = static_cast<std::uint32_t>(s0 / tiles);
  r.k0 = static_cast<std::uint32_t>(s0 % tiles);
  r.steps = s1 - s0;
  return r;
}

/// Tiles of a row of `cols` columns.
MOEX_HD std::uint32_t row_tiles(std::uint32_t cols) { return (cols + kTileWeights - 1) / kTileWeights; }

/// Byte offset of column c's int8 code in a quantized activation row (BlockQ8Rows): each
/// 1024-column tile holds bytes 0-15 of its 32 units, then bytes 16-31, so that lane u of a warp
/// reads its unit's codes as two 16-byte loads at tile + 16 u and tile + 512 + 16 u.
MOEX_HD std::uint32_t q8_code_offset(std::uint32_t c) {
  return (c & ~1023u) + ((c >> 4) & 1u) * 512u + ((c >> 5) & 31u) * 16u + (c & 15u);
}

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
