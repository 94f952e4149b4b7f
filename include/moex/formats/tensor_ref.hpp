#pragma once
/// @file tensor_ref.hpp
/// Element types of checkpoint tensors and TensorRef, a read-only view of one tensor (or a slice of
/// one) living inside a memory-mapped checkpoint file.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Element type of a stored tensor: the safetensors dtypes, then the GGUF block types.
enum class DType : std::uint8_t {
  kF64,
  kF32,
  kF16,
  kBF16,
  kF8E4M3,
  kF8E5M2,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
  // GGUF block types (rows are sequences of self-contained blocks; see quant/ggml.hpp)
  kQ8_0,
  kQ4_0,
  kQ4_K,
  kQ5_K,
  kQ6_K,
  kMxfp4,
};

/// Name as safetensors spells it ("BF16", "F8_E4M3"...) or as ggml does ("Q4_K", "MXFP4").
std::string_view to_string(DType t) noexcept;
/// Parses a safetensors dtype name; nullopt for anything unknown.
std::optional<DType> parse_safetensors_dtype(std::string_view name) noexcept;
/// True for the block types (kQ8_0 ... kMxfp4).
bool is_block_dtype(DType t) noexcept;
/// Weights per block: 1 for element types, 32 or 256 for block types.
std::size_t dtype_block_size(DType t) noexcept;
/// Bytes per block (bytes per element for element types; bool is 1 byte).
std::size_t dtype_block_bytes(DType t) noexcept;
/// The moex Precision for a weight dtype (f32, f16, bf16, fp8 e4m3, block types); nullopt otherwise.
std::optional<Precision> dtype_precision(DType t) noexcept;

/// Bytes of a dense row-major tensor of `shape` (innermost dimension last) in `t`, or an error when
/// the innermost dimension is not a whole number of blocks or the size overflows 64 bits.
Result<std::uint64_t> dtype_tensor_bytes(DType t, std::span<const std::uint64_t> shape) noexcept;

/// A read-only view of a tensor inside a memory-mapped checkpoint (never owns memory; valid while
/// the Checkpoint that produced it lives).
///
/// Shape is in row-major order, innermost (fastest) dimension last, as in safetensors and NumPy;
/// GGUF's ne[] is reversed into this order. A 2-D weight is [out, in].
///
/// Most refs are dense row-major tensors (`is_dense()`). Two kinds of view are not:
///  - **strided** 2-D views (`row_stride`/`col_stride` non-zero, in elements of `dtype`): element
///    (r, c) lives at element offset r*row_stride + c*col_stride from `bytes.data()`. gpt-oss's
///    fused `gate_up_proj` is exposed this way: its gate and up halves are interleaved (gate at even,
///    up at odd positions of the fused output dimension). For block dtypes only row_stride may be
///    set (col_stride must be 1 then) and must be a multiple of the block size.
///  - **scaled** tensors (`scales` non-empty): fp8 weights with DeepSeek's `weight_scale_inv`
///    (f32, one per 128x128 block: scales_shape = [ceil(out/128), ceil(in/128)], weight = fp8 *
///    scale), and gpt-oss MXFP4 tensors whose e8m0 scales are a separate u8 tensor (`bytes` hold
///    the 16-byte nibble blocks, low nibble = even element, as OpenAI stores them).
struct TensorRef {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::uint64_t> shape;
  std::span<const std::byte> bytes;   ///< points into the mmap
  std::string file;                   ///< the file it was read from
  std::uint64_t row_stride = 0;       ///< 0: dense
  std::uint64_t col_stride = 0;       ///< 0: dense
  std::span<const std::byte> scales;  ///< empty unless scaled (see above)
  std::vector<std::uint64_t> scales_shape;
  std::uint32_t scale_block = 0;  ///< fp8: 128 (weight_block_size); mxfp4: 32

  /// Number of elements (product of the shape; 1 for a scalar).
  std::uint64_t numel() const noexcept;
  /// True when bytes hold the tensor densely, row-major, with no separate scales.
  bool is_dense() const noexcept { return row_stride == 0 && col_stride == 0 && scales.empty(); }
};

/// The three matrices of a SwiGLU expert, each [out, in]: w1 = gate [ffn, hidden], w3 = up
/// [ffn, hidden], w2 = down [hidden, ffn]. Biases (gpt-oss) are present only where the model has
/// them; each is a 1-D view of length out.
struct ExpertTensors {
  TensorRef w1, w3, w2;
  std::optional<TensorRef> b1, b3, b2;
};

/// Decodes any TensorRef (every dtype and view above) into f32, row-major by its logical shape.
/// `out.size()` must equal ref.numel(). Integer and bool tensors convert by value.
Status tensor_to_f32(const TensorRef& ref, std::span<float> out);

MOEX_NAMESPACE_END
