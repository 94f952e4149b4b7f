#pragma once
/// @file types.hpp
/// Plain value types shared by every part of moex, the CUDA kernels included (no STL containers,
/// no virtual functions, nothing that nvcc device code cannot see).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN

/// Upper bound on the experts a router may select per token (DeepSeek-V3: 8, Qwen3: 8).
inline constexpr std::uint32_t kMaxTopK = 16;

/// One expert of one MoE layer.
struct ExpertKey {
  std::uint32_t layer = 0;
  std::uint32_t expert = 0;

  friend constexpr bool operator==(ExpertKey a, ExpertKey b) noexcept {
    return a.layer == b.layer && a.expert == b.expert;
  }
  friend constexpr bool operator<(ExpertKey a, ExpertKey b) noexcept {
    return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
  }
  /// A dense 64-bit id, usable as a hash key.
  constexpr std::uint64_t packed() const noexcept { return (static_cast<std::uint64_t>(layer) << 32) | expert; }
};

/// Numeric storage precision of a weight matrix. Values are pinned (cache files store them).
enum class Precision : std::uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kInt8 = 3,  ///< group-quantized, 8 bits
  kInt4 = 4,  ///< group-quantized, 4 bits
  kInt2 = 5,  ///< group-quantized, 2 bits
  // Block formats read in place from checkpoints (decoded by quant/ggml.hpp); bit-exact to their
  // specifications. Rows are sequences of self-contained blocks.
  kQ8_0 = 6,      ///< GGUF Q8_0: 32 weights, f16 scale + 32 int8
  kQ4_0 = 7,      ///< GGUF Q4_0: 32 weights, f16 scale + 16 bytes of nibbles
  kQ4_K = 8,      ///< GGUF Q4_K: 256-weight super-blocks
  kQ5_K = 9,      ///< GGUF Q5_K: 256-weight super-blocks
  kQ6_K = 10,     ///< GGUF Q6_K: 256-weight super-blocks
  kFp8E4M3 = 11,  ///< fp8 e4m3, one f32 scale per 128x128 block (DeepSeek-V3; layout.hpp)
  kMxfp4 = 12,    ///< OCP MXFP4: 32 e2m1 weights + one e8m0 shared scale (gpt-oss)
};
inline constexpr std::size_t kPrecisionCount = 13;

/// How a group-quantized matrix maps integers back to reals (see quant/layout.hpp).
enum class QuantScheme : std::uint8_t {
  kSymmetric = 0,   ///< x = d * (u - 2^(b-1)); one f16 scale per group
  kAsymmetric = 1,  ///< x = d * u + m; an f16 scale and an f16 minimum per group
};

/// Bits per stored element.
constexpr std::uint32_t precision_bits(Precision p) noexcept {
  switch (p) {
    case Precision::kF32:
      return 32;
    case Precision::kF16:
      return 16;
    case Precision::kBF16:
      return 16;
    case Precision::kInt8:
      return 8;
    case Precision::kInt4:
      return 4;
    case Precision::kInt2:
      return 2;
    case Precision::kQ8_0:
      return 8;
    case Precision::kQ4_0:
      return 4;
    case Precision::kQ4_K:
      return 4;
    case Precision::kQ5_K:
      return 5;
    case Precision::kQ6_K:
      return 6;
    case Precision::kFp8E4M3:
      return 8;
    case Precision::kMxfp4:
      return 4;
  }
  return 0;
}

/// True for the block formats of checkpoints (GGUF, fp8, MXFP4), whose layouts quant/ggml.hpp owns.
constexpr bool is_block_format(Precision p) noexcept {
  return static_cast<std::uint8_t>(p) >= static_cast<std::uint8_t>(Precision::kQ8_0) &&
         static_cast<std::uint8_t>(p) < kPrecisionCount;
}

/// True for moex's own group-quantized integer precisions (int8/int4/int2).
constexpr bool is_quantized(Precision p) noexcept {
  return p == Precision::kInt8 || p == Precision::kInt4 || p == Precision::kInt2;
}

/// Short lower-case name: "f32", "bf16", "int4"...
constexpr std::string_view to_string(Precision p) noexcept {
  switch (p) {
    case Precision::kF32:
      return "f32";
    case Precision::kF16:
      return "f16";
    case Precision::kBF16:
      return "bf16";
    case Precision::kInt8:
      return "int8";
    case Precision::kInt4:
      return "int4";
    case Precision::kInt2:
      return "int2";
    case Precision::kQ8_0:
      return "q8_0";
    case Precision::kQ4_0:
      return "q4_0";
    case Precision::kQ4_K:
      return "q4_k";
    case Precision::kQ5_K:
      return "q5_k";
    case Precision::kQ6_K:
      return "q6_k";
    case Precision::kFp8E4M3:
      return "fp8_e4m3";
    case Precision::kMxfp4:
      return "mxfp4";
  }
  return "?";
}

/// The storage format of one weight matrix: precision and, for integers, scheme and group size.
struct WeightFormat {
  Precision precision = Precision::kBF16;
  QuantScheme scheme = QuantScheme::kSymmetric;
  std::uint16_t group_size = 0;  ///< 32, 64 or 128 for integer precisions; 0 for floats

  friend constexpr bool operator==(const WeightFormat& a, const WeightFormat& b) noexcept {
    return a.precision == b.precision &&
           (!is_quantized(a.precision) || (a.scheme == b.scheme && a.group_size == b.group_size));
  }
};

/// Shorthands: float formats and the usual quantized ones.
constexpr WeightFormat float_format(Precision p) noexcept { return {p, QuantScheme::kSymmetric, 0}; }
constexpr WeightFormat quant_format(Precision p, std::uint16_t group = 64,
                                    QuantScheme s = QuantScheme::kSymmetric) noexcept {
  return {p, s, group};
}

/// Shape of a SwiGLU expert: w1 (gate) and w3 (up) are [ffn x hidden], w2 (down) is [hidden x ffn].
struct ExpertShape {
  std::uint32_t hidden = 0;
  std::uint32_t ffn = 0;
  friend constexpr bool operator==(ExpertShape a, ExpertShape b) noexcept {
    return a.hidden == b.hidden && a.ffn == b.ffn;
  }
};

/// Where a copy of an expert lives, slowest first.
enum class Tier : std::uint8_t {
  kDisk = 0,    ///< a memory-mapped file
  kHost = 1,    ///< host RAM (pinned when a GPU backend is in use)
  kDevice = 2,  ///< GPU memory
};

MOEX_NAMESPACE_END

template <>
struct std::hash<moex::ExpertKey> {
  std::size_t operator()(moex::ExpertKey k) const noexcept {
    std::uint64_t x = k.packed() * 0x9E3779B97F4A7C15ull;
    return static_cast<std::size_t>(x ^ (x >> 29));
  }
};
