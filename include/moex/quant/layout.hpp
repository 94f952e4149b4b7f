#pragma once
/// @file layout.hpp
/// Byte layouts of weight matrices and experts. CPU kernels, CUDA kernels, the expert store and
/// cache files all share these layouts, so they are part of the stable format of moex.
///
/// ## A matrix
/// A weight matrix has `rows` outputs and `cols` inputs and is stored row-major (Hugging Face
/// `[out, in]` order): y = W x, with y[r] = sum_c W[r][c] * x[c].
///
/// **Float precisions** (f32, f16, bf16): `rows*cols` little-endian elements, row-major. f16 is
/// IEEE binary16, bf16 the upper 16 bits of an IEEE binary32.
///
/// **Group-quantized precisions** (int8, int4, int2; b bits): each row is cut into `cols / G`
/// groups of G consecutive columns (G = group_size, one of 32, 64, 128; `cols % G == 0`). The
/// matrix occupies three sections, each starting at a multiple of kSectionAlign bytes from the
/// start of the matrix:
///  1. **codes**: `rows*cols*b/8` bytes, row-major. Codes are unsigned b-bit integers u packed
///     little-end first: in each byte, the element with the lower column index sits in the lower
///     bits (int4: element 2j in bits 0-3, 2j+1 in bits 4-7; int2: element 4j+i in bits 2i..2i+1).
///  2. **scales**: `rows * (cols/G)` IEEE binary16 values d, row-major ([row][group]).
///  3. **mins** (asymmetric only): `rows * (cols/G)` binary16 values m, same order.
///
/// Decoding an element with code u in a group with scale d (and minimum m):
///  - symmetric:  x = d * (u - 2^(b-1))        (u - 2^(b-1) ranges over [-2^(b-1), 2^(b-1)-1])
///  - asymmetric: x = d * u + m                (u ranges over [0, 2^b - 1])
/// Encoding (quantize.hpp): symmetric takes the element of largest magnitude a (with its sign) and
/// sets d = a / -2^(b-1), so that element maps exactly to the most negative code (ggml's Q4_0 rule,
/// which uses every level); asymmetric sets m = min, d = (max - min) / (2^b - 1). Codes are
/// round-to-nearest of the inverse, clamped. Both use the binary16-rounded d and m, so decoding is
/// exactly what the encoder assumed.
///
/// **Block formats** (read from checkpoints and kept as they are; decoding in quant/ggml.hpp):
///  - GGUF Q8_0 (34-byte blocks of 32 weights), Q4_0 (18 bytes / 32 weights) and Q4_K (144 bytes /
///    256 weights; `cols` a multiple of the block's weights): one section, **codes**, of
///    `rows * (cols / block_weights) * block_bytes` bytes: each row is its blocks in column order,
///    exactly as ggml stores them (bit-exact ggml layout), rows back to back with no padding.
///    There is no scale section (each block carries its own scales); scales_offset = mins_offset = 0.
///  - fp8 e4m3 (OCP "fn", DeepSeek-V3; `cols % 32 == 0`, what the CUDA kernels need): **codes** are
///    `rows*cols` bytes, row-major, one byte per weight; then, at scales_offset =
///    align_up(codes_bytes, kSectionAlign), **scales**: f32 [ceil(rows/B)] x [ceil(cols/B)]
///    row-major with B = kFp8ScaleBlockSize (128), one per BxB block (the checkpoint's
///    `weight_scale_inv`). Weight (r, c) = fp8(code(r, c)) * scales[(r/B)*ceil(cols/B) + c/B].
/// Other block precisions of types.hpp (Q5_K, Q6_K, MXFP4) have no moex layout (format_is_valid is
/// false): the store decodes them.
/// In every format, total_bytes is the end of the last section rounded up to kSectionAlign.
///
/// ## An expert
/// A SwiGLU expert is three matrices in one contiguous blob, each starting at a multiple of
/// kMatrixAlign: w1 (gate, [ffn x hidden]), w3 (up, [ffn x hidden]), w2 (down, [hidden x ffn]),
/// all in the same WeightFormat. One blob per expert per precision means one copy per expert.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Alignment of the sections inside a quantized matrix.
inline constexpr std::size_t kSectionAlign = 64;
/// Alignment of each matrix inside an expert blob (and of the blob's size).
inline constexpr std::size_t kMatrixAlign = 256;

/// Rounds n up to a multiple of a (a power of two).
constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) & ~(a - 1); }

/// Rows and columns of the weight blocks that share one f32 scale in the fp8 e4m3 layout.
inline constexpr std::size_t kFp8ScaleBlockSize = 128;

/// Weights and bytes of one block of a block format that has a moex layout (Q8_0, Q4_0, Q4_K; fp8
/// e4m3 counts as blocks of one byte); {0, 0} for every other precision.
struct BlockGeometry {
  std::size_t weights = 0;
  std::size_t bytes = 0;
};
constexpr BlockGeometry block_geometry(Precision p) noexcept {
  switch (p) {
    case Precision::kQ8_0:
      return {32, 34};
    case Precision::kQ4_0:
      return {32, 18};
    case Precision::kQ4_K:
      return {256, 144};
    case Precision::kFp8E4M3:
      return {1, 1};
    default:
      return {};
  }
}

/// Offsets and sizes of one matrix's sections, in bytes from the start of the matrix.
struct MatrixLayout {
  std::size_t rows = 0;
  std::size_t cols = 0;
  WeightFormat format{};
  std::size_t codes_bytes = 0;    ///< float data, quantized codes, or a block format's blocks
  std::size_t scales_offset = 0;  ///< 0 for floats and GGUF block formats
  std::size_t mins_offset = 0;    ///< 0 unless asymmetric
  std::size_t total_bytes = 0;

  std::size_t groups_per_row() const noexcept { return format.group_size ? cols / format.group_size : 0; }
};

/// True when `format` is a valid storage format for a matrix with `cols` columns.
constexpr bool format_is_valid(WeightFormat f, std::size_t cols) noexcept {
  if (is_block_format(f.precision)) {
    const std::size_t w = block_geometry(f.precision).weights;
    if (w == 0) return false;  // Q5_K, Q6_K, MXFP4: no moex layout
    return cols % (f.precision == Precision::kFp8E4M3 ? 32 : w) == 0;
  }
  if (!is_quantized(f.precision)) return static_cast<std::uint8_t>(f.precision) <= 2;
  if (f.group_size != 32 && f.group_size != 64 && f.group_size != 128) return false;
  if (f.scheme != QuantScheme::kSymmetric && f.scheme != QuantScheme::kAsymmetric) return false;
  return cols % f.group_size == 0;
}

/// The layout of a [rows x cols] matrix. Precondition: format_is_valid(format, cols).
constexpr MatrixLayout matrix_layout(std::size_t rows, std::size_t cols, WeightFormat format) noexcept {
  MatrixLayout l;
  l.rows = rows;
  l.cols = cols;
  l.format = format;
  if (const BlockGeometry b = block_geometry(format.precision); b.weights != 0) {
    l.codes_bytes = rows * (cols / b.weights) * b.bytes;
    std::size_t end = l.codes_bytes;
    if (format.precision == Precision::kFp8E4M3) {
      const std::size_t sr = (rows + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize;
      const std::size_t sc = (cols + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize;
      l.scales_offset = align_up(l.codes_bytes, kSectionAlign);
      end = l.scales_offset + sr * sc * sizeof(float);
    }
    l.total_bytes = align_up(end, kSectionAlign);
    return l;
  }
  l.codes_bytes = rows * cols * precision_bits(format.precision) / 8;
  if (!is_quantized(format.precision)) {
    l.total_bytes = l.codes_bytes;
    return l;
  }
  const std::size_t scale_bytes = rows * (cols / format.group_size) * 2;
  l.scales_offset = align_up(l.codes_bytes, kSectionAlign);
  std::size_t end = l.scales_offset + scale_bytes;
  if (format.scheme == QuantScheme::kAsymmetric) {
    l.mins_offset = align_up(end, kSectionAlign);
    end = l.mins_offset + scale_bytes;
  }
  l.total_bytes = align_up(end, kSectionAlign);
  return l;
}

/// Offsets of the three matrices of an expert blob.
struct ExpertLayout {
  ExpertShape shape{};
  WeightFormat format{};
  MatrixLayout w1{}, w3{}, w2{};
  std::size_t w1_offset = 0, w3_offset = 0, w2_offset = 0;
  std::size_t total_bytes = 0;
};

/// The layout of one expert. Precondition: format_is_valid(format, hidden) and (format, ffn).
constexpr ExpertLayout expert_layout(ExpertShape shape, WeightFormat format) noexcept {
  ExpertLayout e;
  e.shape = shape;
  e.format = format;
  e.w1 = matrix_layout(shape.ffn, shape.hidden, format);
  e.w3 = matrix_layout(shape.ffn, shape.hidden, format);
  e.w2 = matrix_layout(shape.hidden, shape.ffn, format);
  e.w1_offset = 0;
  e.w3_offset = align_up(e.w1.total_bytes, kMatrixAlign);
  e.w2_offset = e.w3_offset + align_up(e.w3.total_bytes, kMatrixAlign);
  e.total_bytes = e.w2_offset + align_up(e.w2.total_bytes, kMatrixAlign);
  return e;
}

/// Bytes of one expert blob in `format`.
constexpr std::size_t expert_bytes(ExpertShape shape, WeightFormat format) noexcept {
  return expert_layout(shape, format).total_bytes;
}

/// True when both matrices of an expert of `shape` can be stored in `format`.
constexpr bool expert_format_is_valid(ExpertShape shape, WeightFormat format) noexcept {
  return shape.hidden > 0 && shape.ffn > 0 && format_is_valid(format, shape.hidden) &&
         format_is_valid(format, shape.ffn);
}

/// A read-only view of one matrix in some format.
struct MatrixView {
  const std::byte* data = nullptr;
  MatrixLayout layout{};
};

/// The activation between an expert's up and down projections.
enum class FfnActivation : std::uint8_t {
  /// silu(W1 x) * (W3 x): Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE.
  kSwiGlu = 0,
  /// gpt-oss: g = min(W1 x, limit), u = clamp(W3 x, -limit, limit), g * sigmoid(alpha * g) * (u + 1).
  kClampedSwiGlu = 1,
};

/// "swiglu", "clamped_swiglu".
constexpr std::string_view to_string(FfnActivation a) noexcept {
  return a == FfnActivation::kSwiGlu ? "swiglu" : a == FfnActivation::kClampedSwiGlu ? "clamped_swiglu" : "?";
}

/// What an expert computes beyond Mixtral's bias-free SwiGLU: its activation and its biases
/// (gpt-oss). Biases are f32 and live apart from the weight blob (they do not move with the expert
/// into a cache slot: the store keeps them, and every precision of the expert shares them).
///   y = W2 act(W1 x + b1, W3 x + b3) + b2
/// Null bias pointers mean zero. A view without ExpertMath (ExpertView::math == nullptr) computes
/// silu(W1 x) * (W3 x) with no biases.
struct ExpertMath {
  FfnActivation activation = FfnActivation::kSwiGlu;
  float alpha = 1.702f;       ///< kClampedSwiGlu: the sigmoid's slope
  float limit = 7.f;          ///< kClampedSwiGlu: the clamp (gpt-oss swiglu_limit)
  const float* b1 = nullptr;  ///< [ffn], added to W1 x
  const float* b3 = nullptr;  ///< [ffn], added to W3 x
  const float* b2 = nullptr;  ///< [hidden], added to the output
  /// True when this computes exactly Mixtral's expert (no bias, plain SwiGLU).
  constexpr bool plain() const noexcept {
    return activation == FfnActivation::kSwiGlu && b1 == nullptr && b3 == nullptr && b2 == nullptr;
  }
};

/// A read-only view of one expert: three matrices that may live apart (a checkpoint read in place
/// keeps w1, w3 and w2 wherever the file has them) or in one blob (a cache slot, a built copy),
/// and, where the architecture has them, its activation and biases (`math`, not owned).
struct ExpertView {
  const std::byte* w1_data = nullptr;
  const std::byte* w3_data = nullptr;
  const std::byte* w2_data = nullptr;
  ExpertLayout layout{};
  /// Null: Mixtral's expert (silu(W1 x) * (W3 x), no biases). Kept alive by its owner (the store).
  const ExpertMath* math = nullptr;

  /// A view of a contiguous blob laid out by expert_layout().
  static ExpertView contiguous(const std::byte* blob, const ExpertLayout& l,
                               const ExpertMath* math = nullptr) noexcept {
    return {blob + l.w1_offset, blob + l.w3_offset, blob + l.w2_offset, l, math};
  }
  bool valid() const noexcept { return w1_data && w3_data && w2_data; }
  MatrixView w1() const noexcept { return {w1_data, layout.w1}; }
  MatrixView w3() const noexcept { return {w3_data, layout.w3}; }
  MatrixView w2() const noexcept { return {w2_data, layout.w2}; }
};

MOEX_NAMESPACE_END
