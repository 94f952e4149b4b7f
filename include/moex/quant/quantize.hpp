#pragma once
/// @file quantize.hpp
/// Encoding and decoding of weight matrices and experts on the CPU (layouts in layout.hpp).

#include <cstddef>
#include <span>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ThreadPool;

/// Encodes a row-major f32 [rows x cols] matrix into `dst` (at least
/// matrix_layout(rows, cols, format).total_bytes bytes; padding bytes are zeroed).
/// Errors: kInvalidArgument for a bad format/shape, a short dst or non-finite input.
Status quantize_matrix(const float* src, std::size_t rows, std::size_t cols, WeightFormat format,
                       std::span<std::byte> dst) noexcept;

/// Decodes row `row` of `m` into dst[0, cols). Precondition: row < m.layout.rows.
void dequantize_row(const MatrixView& m, std::size_t row, float* dst) noexcept;

/// Decodes a whole matrix into dst[rows*cols], row-major.
void dequantize_matrix(const MatrixView& m, float* dst) noexcept;

/// Packs an expert from f32 matrices (w1, w3: [ffn x hidden]; w2: [hidden x ffn]) into one blob of
/// expert_bytes(shape, format) bytes.
Status pack_expert(const float* w1, const float* w3, const float* w2, ExpertShape shape, WeightFormat format,
                   std::span<std::byte> dst) noexcept;

/// Re-encodes an expert blob into another format (decode each row to f32, encode again): how the
/// store builds low-precision copies. `pool` may be null (single-threaded).
Status convert_expert(const ExpertView& src, WeightFormat format, std::span<std::byte> dst,
                      ThreadPool* pool = nullptr) noexcept;

MOEX_NAMESPACE_END
