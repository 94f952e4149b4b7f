// Encoding and decoding of moex's weight formats (layout.hpp), plus the block-format dispatch.
// Nothing here allocates: rows are processed through fixed-size stack chunks.
#include "moex/quant/quantize.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

// Columns decoded/encoded per step of a row: a multiple of every group size (128) and block
// size (256), small enough for the stack of any worker thread.
constexpr std::size_t kChunk = 1024;

// Round to nearest, ties to even, for |v| < 2^22, without SSE4.1 (std::nearbyint is a libm call
// on baseline x86-64): adding 1.5 * 2^23 pushes the fraction bits out of the mantissa.
inline float round_nearest(float v) noexcept {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}

inline bool f16_finite(std::uint16_t h) noexcept { return (h & 0x7c00u) != 0x7c00u; }

// The largest binary16 value <= v (v finite); may be -inf when v < -65504.
inline std::uint16_t f16_round_down(float v) noexcept {
  std::uint16_t h = float_to_f16(v);
  if (f16_to_float(h) > v) {
    if (h == 0x0000u) {
      h = 0x8001u;  // +0 -> the smallest negative subnormal
    } else if (h & 0x8000u) {
      ++h;  // negative: one step away from zero
    } else {
      --h;
    }
  }
  return h;
}

inline std::uint16_t load_u16(const std::uint8_t* p) noexcept {
  std::uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

inline void store_u16(std::uint8_t* p, std::uint16_t h) noexcept { std::memcpy(p, &h, 2); }

// Packs g codes (each < 2^bits) into g*bits/8 bytes, lower column in the lower bits.
inline void pack_codes(const std::uint8_t* u, std::size_t g, std::uint32_t bits, std::uint8_t* out) noexcept {
  switch (bits) {
    case 8:
      std::memcpy(out, u, g);
      return;
    case 4:
      for (std::size_t j = 0; j < g / 2; ++j) out[j] = static_cast<std::uint8_t>(u[2 * j] | (u[2 * j + 1] << 4));
      return;
    default:
      for (std::size_t j = 0; j < g / 4; ++j)
        out[j] = static_cast<std::uint8_t>(u[4 * j] | (u[4 * j + 1] << 2) | (u[4 * j + 2] << 4) | (u[4 * j + 3] << 6));
      return;
  }
}

// Encodes one group of g values; false when its scale or minimum overflows binary16.
bool encode_group(const float* x, std::size_t g, std::uint32_t bits, bool asym, std::uint8_t* codes,
                  std::uint16_t* scale, std::uint16_t* min) noexcept {
  const float levels = static_cast<float>((1u << bits) - 1u);
  const float half_range = static_cast<float>(1u << (bits - 1));
  std::uint8_t u[128];
  if (asym) {
    float mn = x[0], mx = x[0];
    for (std::size_t i = 1; i < g; ++i) {
      mn = std::min(mn, x[i]);
      mx = std::max(mx, x[i]);
    }
    // m rounds down and d up, so [m, m + d*levels] covers the group: every element is within d/2
    // of its decoded value (no clamping error).
    const std::uint16_t mh = f16_round_down(mn);
    if (!f16_finite(mh)) return false;
    const float m = f16_to_float(mh);
    const double span = static_cast<double>(mx) - static_cast<double>(m);
    std::uint16_t dh = float_to_f16(static_cast<float>(span / levels));
    while (f16_finite(dh) && static_cast<double>(f16_to_float(dh)) * levels < span) ++dh;
    if (!f16_finite(dh)) return false;
    const float d = f16_to_float(dh);
    const float inv = d > 0.f ? 1.f / d : 0.f;
    for (std::size_t i = 0; i < g; ++i) {
      const float q = std::clamp(round_nearest((x[i] - m) * inv), 0.f, levels);
      u[i] = static_cast<std::uint8_t>(q);
    }
    *scale = dh;
    *min = mh;
  } else {
    float amax = 0.f, ext = 0.f;
    for (std::size_t i = 0; i < g; ++i) {
      if (std::fabs(x[i]) > amax) {
        amax = std::fabs(x[i]);
        ext = x[i];
      }
    }
    // The element of largest magnitude maps to code 0 (value -2^(b-1) d): ggml's Q4_0 rule.
    const std::uint16_t dh = float_to_f16(ext / -half_range);
    if (!f16_finite(dh)) return false;
    const float d = f16_to_float(dh);
    const float inv = d != 0.f ? 1.f / d : 0.f;
    for (std::size_t i = 0; i < g; ++i) {
      const float q = std::clamp(round_nearest(x[i] * inv) + half_range, 0.f, levels);
      u[i] = static_cast<std::uint8_t>(q);
    }
    *scale = dh;
  }
  pack_codes(u, g, bits, codes);
  return true;
}

// Encodes columns [c0, c0+len) of row r (c0, len multiples of the group size for integer
// formats). False when a value does not fit the format (overflow of f16/bf16 or of a scale).
bool encode_row_range(const float* src, const MatrixLayout& l, std::size_t r, std::size_t c0, std::size_t len,
                      std::byte* base) noexcept {
  const std::size_t cols = l.cols;
  auto* out = reinterpret_cast<std::uint8_t*>(base);
  switch (l.format.precision) {
    case Precision::kF32:
      std::memcpy(out + (r * cols + c0) * 4, src, len * 4);
      return true;
    case Precision::kBF16: {
      std::uint8_t* o = out + (r * cols + c0) * 2;
      bool ok = true;
      for (std::size_t c = 0; c < len; ++c) {
        const std::uint16_t h = float_to_bf16(src[c]);
        ok &= (h & 0x7f80u) != 0x7f80u;
        store_u16(o + 2 * c, h);
      }
      return ok;
    }
    case Precision::kF16: {
      std::uint8_t* o = out + (r * cols + c0) * 2;
      bool ok = true;
      for (std::size_t c = 0; c < len; ++c) {
        const std::uint16_t h = float_to_f16(src[c]);
        ok &= f16_finite(h);
        store_u16(o + 2 * c, h);
      }
      return ok;
    }
    default:
      break;
  }
  const std::uint32_t bits = precision_bits(l.format.precision);
  const std::size_t g = l.format.group_size;
  const std::size_t gpr = cols / g;
  const bool asym = l.format.scheme == QuantScheme::kAsymmetric;
  for (std::size_t k = 0; k < len / g; ++k) {
    const std::size_t gi = c0 / g + k;
    std::uint16_t dh = 0, mh = 0;
    std::uint8_t* codes = out + (r * cols + gi * g) * bits / 8;
    if (!encode_group(src + k * g, g, bits, asym, codes, &dh, &mh)) return false;
    store_u16(out + l.scales_offset + 2 * (r * gpr + gi), dh);
    if (asym) store_u16(out + l.mins_offset + 2 * (r * gpr + gi), mh);
  }
  return true;
}

bool all_finite(const float* p, std::size_t n) noexcept {
  // Branch-free scan (vectorizes): a NaN or infinity has all exponent bits set.
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, p + i, 4);
    bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// Encodes one f32 row (all columns) through kChunk steps.
bool encode_row(const float* src, const MatrixLayout& l, std::size_t r, std::byte* base) noexcept {
  for (std::size_t c0 = 0; c0 < l.cols; c0 += kChunk) {
    const std::size_t len = std::min(kChunk, l.cols - c0);
    if (!encode_row_range(src + c0, l, r, c0, len, base)) return false;
  }
  return true;
}

}  // namespace

namespace detail {

void decode_row_range(const MatrixView& m, std::size_t row, std::size_t c0, std::size_t len, float* dst) noexcept {
  const MatrixLayout& l = m.layout;
  const std::size_t cols = l.cols;
  const auto* in = reinterpret_cast<const std::uint8_t*>(m.data);
  const Precision p = l.format.precision;
  if (is_block_format(p)) {
    const std::size_t bs = block_format_block_size(p);
    const std::size_t bb = block_format_block_bytes(p);
    if (bs == 0) {
      std::fill(dst, dst + len, 0.f);
      return;
    }
    if (p == Precision::kFp8E4M3) {  // codes, then the f32 128x128 block scales (layout.hpp)
      // fp8_e4m3_to_float through a table of all 256 codes (the same exact values).
      static const auto lut = [] {
        std::array<float, 256> t{};
        for (unsigned v = 0; v < 256; ++v) t[v] = fp8_e4m3_to_float(static_cast<std::uint8_t>(v));
        return t;
      }();
      constexpr std::size_t kB = kFp8ScaleBlockSize;
      const std::byte* scales = m.data + l.scales_offset + (row / kB) * ((cols + kB - 1) / kB) * sizeof(float);
      const std::uint8_t* codes = in + row * cols + c0;
      for (std::size_t c = 0; c < len;) {
        const std::size_t block = (c0 + c) / kB;
        const std::size_t end = std::min(len, (block + 1) * kB - c0);
        float s;
        std::memcpy(&s, scales + block * sizeof(float), sizeof s);
        for (; c < end; ++c) dst[c] = lut[codes[c]] * s;
      }
      return;
    }
    const std::byte* row_ptr = m.data + row * (cols / bs) * bb + (c0 / bs) * bb;
    decode_block_row(p, row_ptr, len, dst);
    return;
  }
  switch (p) {
    case Precision::kF32:
      std::memcpy(dst, in + (row * cols + c0) * 4, len * 4);
      return;
    case Precision::kBF16: {
      const std::uint8_t* s = in + (row * cols + c0) * 2;
      for (std::size_t c = 0; c < len; ++c) dst[c] = bf16_to_float(load_u16(s + 2 * c));
      return;
    }
    case Precision::kF16: {
      const std::uint8_t* s = in + (row * cols + c0) * 2;
      for (std::size_t c = 0; c < len; ++c) dst[c] = f16_to_float(load_u16(s + 2 * c));
      return;
    }
    default:
      break;
  }
  const std::uint32_t bits = precision_bits(p);
  const std::size_t g = l.format.group_size;
  const std::size_t gpr = cols / g;
  const bool asym = l.format.scheme == QuantScheme::kAsymmetric;
  const float half_range = static_cast<float>(1u << (bits - 1));
  const std::uint32_t mask = (1u << bits) - 1u;
  const std::uint32_t per_byte = 8 / bits;
  for (std::size_t k = 0; k < len / g; ++k) {
    const std::size_t gi = c0 / g + k;
    const float d = f16_to_float(load_u16(in + l.scales_offset + 2 * (row * gpr + gi)));
    const float off = asym ? f16_to_float(load_u16(in + l.mins_offset + 2 * (row * gpr + gi))) : -half_range * d;
    const std::uint8_t* codes = in + (row * cols + gi * g) * bits / 8;
    float* o = dst + k * g;
    for (std::size_t i = 0; i < g; ++i) {
      const std::uint32_t u = (codes[i / per_byte] >> ((i % per_byte) * bits)) & mask;
      // Symmetric: d*(u - 2^(b-1)) rounds once, as the SIMD kernels' fma(u, d, -2^(b-1) d) does.
      o[i] = asym ? d * static_cast<float>(u) + off : d * (static_cast<float>(u) - half_range);
    }
  }
}

}  // namespace detail

Status quantize_matrix(const float* src, std::size_t rows, std::size_t cols, WeightFormat format,
                       std::span<std::byte> dst) noexcept {
  if (src == nullptr) return invalid_argument("quantize_matrix: src is null");
  if (rows == 0 || cols == 0) return invalid_argument("quantize_matrix: zero-sized matrix");
  if (is_block_format(format.precision))
    return unsupported("quantize_matrix: block formats are read from checkpoints, not encoded");
  if (!format_is_valid(format, cols))
    return invalid_argument("quantize_matrix: format " + std::string(to_string(format.precision)) + " with group " +
                            std::to_string(format.group_size) + " cannot store a matrix with " + std::to_string(cols) +
                            " columns");
  if (rows > std::numeric_limits<std::size_t>::max() / 8 / cols)
    return invalid_argument("quantize_matrix: matrix size overflows");
  const MatrixLayout l = matrix_layout(rows, cols, format);
  if (dst.data() == nullptr || dst.size() < l.total_bytes)
    return invalid_argument("quantize_matrix: destination has " + std::to_string(dst.size()) + " bytes, needs " +
                            std::to_string(l.total_bytes));
  if (!all_finite(src, rows * cols)) return invalid_argument("quantize_matrix: input has a NaN or infinity");
  std::memset(dst.data(), 0, l.total_bytes);
  for (std::size_t r = 0; r < rows; ++r) {
    if (!encode_row(src + r * cols, l, r, dst.data()))
      return invalid_argument("quantize_matrix: row " + std::to_string(r) + " exceeds the range of " +
                              std::string(to_string(format.precision)) + " (or of its f16 scales)");
  }
  return Status::ok();
}

void dequantize_row(const MatrixView& m, std::size_t row, float* dst) noexcept {
  if (dst == nullptr) return;
  const std::size_t cols = m.layout.cols;
  if (m.data == nullptr || row >= m.layout.rows || !check_matrix_view(m).is_ok()) {
    std::fill(dst, dst + cols, 0.f);
    return;
  }
  detail::decode_row_range(m, row, 0, cols, dst);
}

void dequantize_matrix(const MatrixView& m, float* dst) noexcept {
  if (dst == nullptr) return;
  const std::size_t cols = m.layout.cols;
  if (m.data == nullptr || !check_matrix_view(m).is_ok()) {
    std::fill(dst, dst + m.layout.rows * cols, 0.f);
    return;
  }
  for (std::size_t r = 0; r < m.layout.rows; ++r) detail::decode_row_range(m, r, 0, cols, dst + r * cols);
}

Status pack_expert(const float* w1, const float* w3, const float* w2, ExpertShape shape, WeightFormat format,
                   std::span<std::byte> dst) noexcept {
  if (w1 == nullptr || w3 == nullptr || w2 == nullptr) return invalid_argument("pack_expert: null weight pointer");
  if (!expert_format_is_valid(shape, format))
    return invalid_argument("pack_expert: format " + std::string(to_string(format.precision)) +
                            " cannot store an expert of hidden " + std::to_string(shape.hidden) + ", ffn " +
                            std::to_string(shape.ffn));
  const ExpertLayout e = expert_layout(shape, format);
  if (dst.data() == nullptr || dst.size() < e.total_bytes)
    return invalid_argument("pack_expert: destination too small");
  std::memset(dst.data(), 0, e.total_bytes);
  MOEX_RETURN_IF_ERROR(quantize_matrix(w1, shape.ffn, shape.hidden, format, dst.subspan(e.w1_offset)));
  MOEX_RETURN_IF_ERROR(quantize_matrix(w3, shape.ffn, shape.hidden, format, dst.subspan(e.w3_offset)));
  return quantize_matrix(w2, shape.hidden, shape.ffn, format, dst.subspan(e.w2_offset));
}

namespace {

struct ConvertJob {
  MatrixView in;
  MatrixLayout out;
  std::byte* out_base = nullptr;
  std::atomic<bool>* failed = nullptr;

  void run(std::size_t begin, std::size_t end) const noexcept {
    float buf[kChunk];
    const std::size_t cols = in.layout.cols;
    for (std::size_t r = begin; r < end; ++r) {
      for (std::size_t c0 = 0; c0 < cols; c0 += kChunk) {
        const std::size_t len = std::min(kChunk, cols - c0);
        detail::decode_row_range(in, r, c0, len, buf);
        if (!all_finite(buf, len) || !encode_row_range(buf, out, r, c0, len, out_base)) {
          failed->store(true, std::memory_order_relaxed);
          return;
        }
      }
    }
  }
};

}  // namespace

Status convert_expert(const ExpertView& src, WeightFormat format, std::span<std::byte> dst, ThreadPool* pool) noexcept {
  const ExpertShape shape = src.layout.shape;
  if (!src.valid()) return invalid_argument("convert_expert: null source matrix");
  if (is_block_format(format.precision)) return unsupported("convert_expert: block formats cannot be encoded");
  if (!expert_format_is_valid(shape, format))
    return invalid_argument("convert_expert: target format cannot store this expert's shape");
  const MatrixView ins[3] = {src.w1(), src.w3(), src.w2()};
  const std::size_t want_rows[3] = {shape.ffn, shape.ffn, shape.hidden};
  const std::size_t want_cols[3] = {shape.hidden, shape.hidden, shape.ffn};
  for (int i = 0; i < 3; ++i) {
    MOEX_RETURN_IF_ERROR(check_matrix_view(ins[i]));
    if (ins[i].layout.rows != want_rows[i] || ins[i].layout.cols != want_cols[i])
      return invalid_argument("convert_expert: a source matrix does not match the expert shape");
  }
  const ExpertLayout e = expert_layout(shape, format);
  if (dst.data() == nullptr || dst.size() < e.total_bytes)
    return invalid_argument("convert_expert: destination too small");
  std::memset(dst.data(), 0, e.total_bytes);
  std::atomic<bool> failed{false};
  const ConvertJob jobs[3] = {{ins[0], e.w1, dst.data() + e.w1_offset, &failed},
                              {ins[1], e.w3, dst.data() + e.w3_offset, &failed},
                              {ins[2], e.w2, dst.data() + e.w2_offset, &failed}};
  for (const ConvertJob& j : jobs) {
    const ConvertJob* jp = &j;  // one pointer: fits std::function's local buffer, no allocation
    if (pool != nullptr) {
      pool->parallel_for(j.in.layout.rows, 16, [jp](std::size_t b, std::size_t end) { jp->run(b, end); });
    } else {
      j.run(0, j.in.layout.rows);
    }
  }
  if (failed.load()) return invalid_argument("convert_expert: source has values the target format cannot hold");
  return Status::ok();
}

MOEX_NAMESPACE_END
