#pragma once
// Random matrices and experts in the block formats that have a moex layout (GGUF Q8_0, Q4_0, Q4_K;
// fp8 e4m3 with 128x128 f32 block scales), with the f32 weights they decode to, computed through
// quant/ggml.hpp's decode_block_row (checked against ggml in tests/unit/formats) and, for fp8, the
// scales applied here: an independent reference for the store's and the kernels' decoding.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"

#include "support/test_support.hpp"

namespace moex::test {

/// Random bytes from a 64-bit LCG seeded by seed() and `salt`.
inline std::vector<std::byte> random_bytes(std::size_t n, std::uint64_t salt) {
  std::vector<std::byte> out(n);
  std::uint64_t x = seed() ^ (salt * 0x9E3779B97F4A7C15ull);
  for (auto& b : out) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    b = std::byte{static_cast<std::uint8_t>(x >> 56)};
  }
  return out;
}

/// `rows` rows of random blocks of GGUF format p (Q8_0, Q4_0 or Q4_K; cols a multiple of its block),
/// rows back to back: random codes, f16 scales (and Q4_K minima) of magnitude in [2^-10, 2^-6).
/// `vals` receives the [rows x cols] weights they decode to.
inline std::vector<std::byte> random_gguf_blocks(Precision p, std::size_t rows, std::size_t cols, std::uint64_t salt,
                                                 std::vector<float>& vals) {
  const std::size_t bw = block_format_block_size(p), bb = block_format_block_bytes(p);
  std::vector<std::byte> out = random_bytes(rows * cols / bw * bb, salt);
  const std::size_t halves = p == Precision::kQ4_K ? 2 : 1;  // d (and Q4_K's dmin) lead each block
  for (std::size_t at = 0; at < out.size(); at += bb) {
    for (std::size_t k = 0; k < halves; ++k) {
      const auto lo = std::to_integer<std::uint16_t>(out[at + 2 * k]);
      const auto hi = std::to_integer<std::uint16_t>(out[at + 2 * k + 1]);
      // sign from hi, exponent field 5..8 (2^-10..2^-7), mantissa bits from lo.
      const auto h = static_cast<std::uint16_t>((hi & 0x80u) << 8 | (0x1400u + (hi & 0x3u) * 0x400u) | lo);
      std::memcpy(&out[at + 2 * k], &h, 2);
    }
  }
  vals.resize(rows * cols);
  for (std::size_t r = 0; r < rows; ++r)
    decode_block_row(p, out.data() + r * (cols / bw) * bb, cols, vals.data() + r * cols);
  return out;
}

/// A random fp8 e4m3 [rows x cols] matrix (no NaN codes) with f32 block scales
/// [ceil(rows/128) x ceil(cols/128)] in [1e-3, 3e-3); `vals` receives the weights they decode to.
inline void random_fp8(std::size_t rows, std::size_t cols, std::uint64_t salt, std::vector<std::byte>& codes,
                       std::vector<float>& scales, std::vector<float>& vals) {
  constexpr std::size_t kB = kFp8ScaleBlockSize;
  codes = random_bytes(rows * cols, salt);
  for (auto& b : codes)
    if ((std::to_integer<unsigned>(b) & 0x7fu) == 0x7fu) b = std::byte{0};
  const std::size_t sc = (cols + kB - 1) / kB;
  scales.resize((rows + kB - 1) / kB * sc);
  const auto sb = random_bytes(scales.size(), salt + 1);
  for (std::size_t i = 0; i < scales.size(); ++i)
    scales[i] = 1e-3f * (1.f + static_cast<float>(std::to_integer<unsigned>(sb[i])) / 128.f);
  vals.resize(rows * cols);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c)
      vals[r * cols + c] =
          fp8_e4m3_to_float(std::to_integer<std::uint8_t>(codes[r * cols + c])) * scales[(r / kB) * sc + c / kB];
}

/// One expert in block format p, laid out by expert_layout(), and its decoded matrices.
struct BlockExpert {
  ExpertLayout layout{};
  std::vector<std::byte> blob;
  std::vector<float> w[3];  ///< w1, w3 [ffn x hidden], w2 [hidden x ffn]

  ExpertView view() const { return ExpertView::contiguous(blob.data(), layout); }
};

/// A random expert of `shape` in block format p (Q8_0, Q4_0, Q4_K or fp8 e4m3).
inline BlockExpert random_block_expert(ExpertShape shape, Precision p, std::uint64_t salt) {
  BlockExpert e;
  e.layout = expert_layout(shape, float_format(p));
  e.blob.assign(e.layout.total_bytes, std::byte{0});
  const MatrixLayout* mats[3] = {&e.layout.w1, &e.layout.w3, &e.layout.w2};
  const std::size_t offsets[3] = {e.layout.w1_offset, e.layout.w3_offset, e.layout.w2_offset};
  for (int i = 0; i < 3; ++i) {
    const MatrixLayout& l = *mats[i];
    std::byte* dst = e.blob.data() + offsets[i];
    if (p == Precision::kFp8E4M3) {
      std::vector<std::byte> codes;
      std::vector<float> scales;
      random_fp8(l.rows, l.cols, salt + 16 * static_cast<std::uint64_t>(i), codes, scales, e.w[i]);
      std::memcpy(dst, codes.data(), codes.size());
      std::memcpy(dst + l.scales_offset, scales.data(), scales.size() * sizeof(float));
    } else {
      const auto b = random_gguf_blocks(p, l.rows, l.cols, salt + 16 * static_cast<std::uint64_t>(i), e.w[i]);
      std::memcpy(dst, b.data(), b.size());
    }
  }
  return e;
}

/// float64 SwiGLU expert on decoded weights: y[t] = W2 (silu(W1 x[t]) * (W3 x[t])), [n x hidden].
inline std::vector<double> reference_expert(const std::vector<float> (&w)[3], ExpertShape s, const float* x,
                                            std::size_t n) {
  std::vector<double> y(n * s.hidden, 0.0), h(s.ffn);
  for (std::size_t t = 0; t < n; ++t) {
    for (std::size_t r = 0; r < s.ffn; ++r) {
      double g = 0, u = 0;
      for (std::size_t c = 0; c < s.hidden; ++c) {
        g += static_cast<double>(w[0][r * s.hidden + c]) * x[t * s.hidden + c];
        u += static_cast<double>(w[1][r * s.hidden + c]) * x[t * s.hidden + c];
      }
      h[r] = g / (1.0 + std::exp(-g)) * u;
    }
    for (std::size_t r = 0; r < s.hidden; ++r) {
      double acc = 0;
      for (std::size_t c = 0; c < s.ffn; ++c) acc += static_cast<double>(w[2][r * s.ffn + c]) * h[c];
      y[t * s.hidden + r] = acc;
    }
  }
  return y;
}

}  // namespace moex::test
