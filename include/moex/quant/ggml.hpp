#pragma once
/// @file ggml.hpp
/// Block formats read in place from checkpoints: GGUF Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, fp8 e4m3 with
/// 128x128 block scales, and MXFP4. Decoding is bit-exact to the ggml / OCP definitions.

#include <cstddef>
#include <cstdint>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Weights per block of a block format (32 or 256); 0 for other precisions.
std::size_t block_format_block_size(Precision p) noexcept;

/// Bytes per block of a block format; 0 for other precisions.
std::size_t block_format_block_bytes(Precision p) noexcept;

/// Decodes `n` consecutive weights starting at a block boundary (`n` a multiple of the block size)
/// from `src` into `dst`. Precondition: is_block_format(p) and p != kFp8E4M3 (whose scales are
/// kept apart: see decode_fp8_e4m3).
void decode_block_row(Precision p, const std::byte* src, std::size_t n, float* dst) noexcept;

/// fp8 e4m3 (OCP, "fn": no infinities, NaN = S.1111.111) -> float, exact.
float fp8_e4m3_to_float(std::uint8_t v) noexcept;
/// fp8 e5m2 -> float, exact.
float fp8_e5m2_to_float(std::uint8_t v) noexcept;

MOEX_NAMESPACE_END
