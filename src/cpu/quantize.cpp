#include "moex/quant/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "moex/quant/half.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

inline void put_code(std::uint8_t* codes, std::size_t idx, std::uint32_t bits, std::uint32_t u) noexcept {
  const std::size_t per_byte = 8 / bits;
  const std::size_t byte = idx / per_byte;
  const std::uint32_t shift = static_cast<std::uint32_t>(idx % per_byte) * bits;
  codes[byte] = static_cast<std::uint8_t>(codes[byte] | (u << shift));
}

inline std::uint32_t get_code(const std::uint8_t* codes, std::size_t idx, std::uint32_t bits) noexcept {
  const std::size_t per_byte = 8 / bits;
  const std::uint32_t shift = static_cast<std::uint32_t>(idx % per_byte) * bits;
  return (codes[idx / per_byte] >> shift) & ((1u << bits) - 1u);
}

void encode_row(const float* src, const MatrixLayout& l, std::size_t r, std::byte* base) noexcept {
  const std::size_t cols = l.cols;
  auto* out = reinterpret_cast<std::uint8_t*>(base);
  switch (l.format.precision) {
    case Precision::kF32: std::memcpy(out + r * cols * 4, src, cols * 4); return;
    case Precision::kBF16: {
      auto* o = out + r * cols * 2;
      for (std::size_t c = 0; c < cols; ++c) {
        const std::uint16_t h = float_to_bf16(src[c]);
        std::memcpy(o + 2 * c, &h, 2);
      }
      return;
    }
    case Precision::kF16: {
      auto* o = out + r * cols * 2;
      for (std::size_t c = 0; c < cols; ++c) {
        const std::uint16_t h = float_to_f16(src[c]);
        std::memcpy(o + 2 * c, &h, 2);
      }
      return;
    }
    default: break;
  }
  const std::uint32_t bits = precision_bits(l.format.precision);
  const std::size_t g = l.format.group_size;
  const std::size_t gpr = cols / g;
  const bool asym = l.format.scheme == QuantScheme::kAsymmetric;
  const float levels = static_cast<float>((1u << bits) - 1u);
  const float half_range = static_cast<float>(1u << (bits - 1));
  std::uint8_t* codes = out;
  for (std::size_t gi = 0; gi < gpr; ++gi) {
    const float* x = src + gi * g;
    float d = 0.f, m = 0.f;
    std::uint16_t dh = 0, mh = 0;
    if (asym) {
      const auto [mn, mx] = std::minmax_element(x, x + g);
      mh = float_to_f16(*mn);
      m = f16_to_float(mh);
      dh = float_to_f16((*mx - m) / levels);
      d = f16_to_float(dh);
    } else {
      float amax = 0.f, ext = 0.f;
      for (std::size_t i = 0; i < g; ++i)
        if (std::fabs(x[i]) > amax) {
          amax = std::fabs(x[i]);
          ext = x[i];
        }
      dh = float_to_f16(ext / -half_range);
      d = f16_to_float(dh);
    }
    const float inv = d != 0.f ? 1.f / d : 0.f;
    for (std::size_t i = 0; i < g; ++i) {
      float q = asym ? std::nearbyint((x[i] - m) * inv) : std::nearbyint(x[i] * inv) + half_range;
      q = std::clamp(q, 0.f, levels);
      put_code(codes, r * cols + gi * g + i, bits, static_cast<std::uint32_t>(q));
    }
    std::memcpy(out + l.scales_offset + 2 * (r * gpr + gi), &dh, 2);
    if (asym) std::memcpy(out + l.mins_offset + 2 * (r * gpr + gi), &mh, 2);
  }
}

}  // namespace

Status quantize_matrix(const float* src, std::size_t rows, std::size_t cols, WeightFormat format,
                       std::span<std::byte> dst) noexcept {
  if (src == nullptr) return invalid_argument("quantize_matrix: src is null");
  if (rows == 0 || cols == 0) return invalid_argument("quantize_matrix: zero-sized matrix");
  if (!format_is_valid(format, cols))
    return invalid_argument("quantize_matrix: format " + std::string(to_string(format.precision)) +
                            " with group " + std::to_string(format.group_size) +
                            " cannot store a matrix with " + std::to_string(cols) + " columns");
  const MatrixLayout l = matrix_layout(rows, cols, format);
  if (dst.size() < l.total_bytes)
    return invalid_argument("quantize_matrix: destination has " + std::to_string(dst.size()) +
                            " bytes, needs " + std::to_string(l.total_bytes));
  for (std::size_t i = 0; i < rows * cols; ++i)
    if (!std::isfinite(src[i]))
      return invalid_argument("quantize_matrix: non-finite value at row " + std::to_string(i / cols) +
                              ", column " + std::to_string(i % cols));
  std::memset(dst.data(), 0, l.total_bytes);
  for (std::size_t r = 0; r < rows; ++r) encode_row(src + r * cols, l, r, dst.data());
  return Status::ok();
}

void dequantize_row(const MatrixView& m, std::size_t row, float* dst) noexcept {
  const MatrixLayout& l = m.layout;
  const std::size_t cols = l.cols;
  const auto* in = reinterpret_cast<const std::uint8_t*>(m.data);
  switch (l.format.precision) {
    case Precision::kF32: std::memcpy(dst, in + row * cols * 4, cols * 4); return;
    case Precision::kBF16:
      for (std::size_t c = 0; c < cols; ++c) {
        std::uint16_t h;
        std::memcpy(&h, in + (row * cols + c) * 2, 2);
        dst[c] = bf16_to_float(h);
      }
      return;
    case Precision::kF16:
      for (std::size_t c = 0; c < cols; ++c) {
        std::uint16_t h;
        std::memcpy(&h, in + (row * cols + c) * 2, 2);
        dst[c] = f16_to_float(h);
      }
      return;
    default: break;
  }
  const std::uint32_t bits = precision_bits(l.format.precision);
  const std::size_t g = l.format.group_size;
  const std::size_t gpr = cols / g;
  const bool asym = l.format.scheme == QuantScheme::kAsymmetric;
  const float half_range = static_cast<float>(1u << (bits - 1));
  for (std::size_t gi = 0; gi < gpr; ++gi) {
    std::uint16_t dh, mh = 0;
    std::memcpy(&dh, in + l.scales_offset + 2 * (row * gpr + gi), 2);
    if (asym) std::memcpy(&mh, in + l.mins_offset + 2 * (row * gpr + gi), 2);
    const float d = f16_to_float(dh);
    const float mn = f16_to_float(mh);
    for (std::size_t i = 0; i < g; ++i) {
      const float u = static_cast<float>(get_code(in, row * cols + gi * g + i, bits));
      dst[gi * g + i] = asym ? d * u + mn : d * (u - half_range);
    }
  }
}

void dequantize_matrix(const MatrixView& m, float* dst) noexcept {
  for (std::size_t r = 0; r < m.layout.rows; ++r) dequantize_row(m, r, dst + r * m.layout.cols);
}

Status pack_expert(const float* w1, const float* w3, const float* w2, ExpertShape shape,
                   WeightFormat format, std::span<std::byte> dst) noexcept {
  if (!expert_format_is_valid(shape, format))
    return invalid_argument("pack_expert: format " + std::string(to_string(format.precision)) +
                            " cannot store an expert of hidden " + std::to_string(shape.hidden) +
                            ", ffn " + std::to_string(shape.ffn));
  const ExpertLayout e = expert_layout(shape, format);
  if (dst.size() < e.total_bytes) return invalid_argument("pack_expert: destination too small");
  std::memset(dst.data(), 0, e.total_bytes);
  MOEX_RETURN_IF_ERROR(quantize_matrix(w1, shape.ffn, shape.hidden, format, dst.subspan(e.w1_offset)));
  MOEX_RETURN_IF_ERROR(quantize_matrix(w3, shape.ffn, shape.hidden, format, dst.subspan(e.w3_offset)));
  return quantize_matrix(w2, shape.hidden, shape.ffn, format, dst.subspan(e.w2_offset));
}

Status convert_expert(const ExpertView& src, WeightFormat format, std::span<std::byte> dst,
                      ThreadPool* pool) noexcept {
  const ExpertShape shape = src.layout.shape;
  if (!expert_format_is_valid(shape, format))
    return invalid_argument("convert_expert: target format cannot store this expert's shape");
  const ExpertLayout e = expert_layout(shape, format);
  if (dst.size() < e.total_bytes) return invalid_argument("convert_expert: destination too small");
  std::memset(dst.data(), 0, e.total_bytes);
  struct Job {
    MatrixView in;
    MatrixLayout out;
    std::size_t offset;
  };
  const Job jobs[3] = {{src.w1(), e.w1, e.w1_offset}, {src.w3(), e.w3, e.w3_offset}, {src.w2(), e.w2, e.w2_offset}};
  for (const Job& j : jobs) {
    auto body = [&](std::size_t b, std::size_t end) {
      std::vector<float> row(j.in.layout.cols);
      for (std::size_t r = b; r < end; ++r) {
        dequantize_row(j.in, r, row.data());
        encode_row(row.data(), j.out, r, dst.data() + j.offset);
      }
    };
    if (pool) {
      pool->parallel_for(j.in.layout.rows, 16, body);
    } else {
      body(0, j.in.layout.rows);
    }
  }
  return Status::ok();
}

MOEX_NAMESPACE_END
