// Block formats of checkpoints, decoded exactly as ggml's reference dequantizers define them
// (ggml-quants.c: dequantize_row_q8_0, _q4_0, _q4_K, _q5_K, _q6_K, _mxfp4), and the OCP fp8
// formats. Arithmetic is done in float in the same order as ggml, so results are bit-identical.

#include <cmath>
#include <cstring>
#include <limits>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

constexpr std::size_t kQK = 32;    // weights per block of Q8_0, Q4_0, MXFP4
constexpr std::size_t kQKK = 256;  // weights per super-block of the K formats

std::uint16_t load_u16(const std::byte* p) noexcept {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(p[0]) | (std::to_integer<unsigned>(p[1]) << 8));
}
std::uint8_t u8(const std::byte* p, std::size_t i) noexcept { return std::to_integer<std::uint8_t>(p[i]); }
float half_at(const std::byte* p) noexcept { return f16_to_float(load_u16(p)); }

// Q8_0: { f16 d; int8 qs[32]; } -> d * qs[j]
void decode_q8_0(const std::byte* b, float* y) noexcept {
  const float d = half_at(b);
  for (std::size_t j = 0; j < kQK; ++j) {
    y[j] = static_cast<float>(static_cast<std::int8_t>(u8(b + 2, j))) * d;
  }
}

// Q4_0: { f16 d; u8 qs[16]; } -> element j from the low nibble of qs[j], element j+16 from the high
// nibble, both minus 8, times d.
void decode_q4_0(const std::byte* b, float* y) noexcept {
  const float d = half_at(b);
  for (std::size_t j = 0; j < kQK / 2; ++j) {
    const int x0 = (u8(b + 2, j) & 0x0F) - 8;
    const int x1 = (u8(b + 2, j) >> 4) - 8;
    y[j] = static_cast<float>(x0) * d;
    y[j + kQK / 2] = static_cast<float>(x1) * d;
  }
}

// The 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4).
void scale_min_k4(std::size_t j, const std::byte* q, std::uint8_t& d, std::uint8_t& m) noexcept {
  if (j < 4) {
    d = static_cast<std::uint8_t>(u8(q, j) & 63);
    m = static_cast<std::uint8_t>(u8(q, j + 4) & 63);
  } else {
    d = static_cast<std::uint8_t>((u8(q, j + 4) & 0xF) | ((u8(q, j - 4) >> 6) << 4));
    m = static_cast<std::uint8_t>((u8(q, j + 4) >> 4) | ((u8(q, j) >> 6) << 4));
  }
}

// Q4_K: { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
void decode_q4_k(const std::byte* b, float* y) noexcept {
  const float d = half_at(b);
  const float dmin = half_at(b + 2);
  const std::byte* scales = b + 4;
  const std::byte* q = b + 16;
  std::size_t is = 0;
  for (std::size_t j = 0; j < kQKK; j += 64) {
    std::uint8_t sc = 0, m = 0;
    scale_min_k4(is + 0, scales, sc, m);
    const float d1 = d * static_cast<float>(sc);
    const float m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc);
    const float m2 = dmin * static_cast<float>(m);
    for (std::size_t l = 0; l < 32; ++l) {
      const float p = d1 * static_cast<float>(u8(q, l) & 0xF);
      *y++ = p - m1;
    }
    for (std::size_t l = 0; l < 32; ++l) {
      const float p = d2 * static_cast<float>(u8(q, l) >> 4);
      *y++ = p - m2;
    }
    q += 32;
    is += 2;
  }
}

// Q5_K: { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
void decode_q5_k(const std::byte* b, float* y) noexcept {
  const float d = half_at(b);
  const float dmin = half_at(b + 2);
  const std::byte* scales = b + 4;
  const std::byte* qh = b + 16;
  const std::byte* ql = b + 48;
  std::size_t is = 0;
  unsigned u1 = 1, u2 = 2;
  for (std::size_t j = 0; j < kQKK; j += 64) {
    std::uint8_t sc = 0, m = 0;
    scale_min_k4(is + 0, scales, sc, m);
    const float d1 = d * static_cast<float>(sc);
    const float m1 = dmin * static_cast<float>(m);
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * static_cast<float>(sc);
    const float m2 = dmin * static_cast<float>(m);
    for (std::size_t l = 0; l < 32; ++l) {
      const int v = (u8(ql, l) & 0xF) + ((u8(qh, l) & u1) ? 16 : 0);
      const float p = d1 * static_cast<float>(v);
      *y++ = p - m1;
    }
    for (std::size_t l = 0; l < 32; ++l) {
      const int v = (u8(ql, l) >> 4) + ((u8(qh, l) & u2) ? 16 : 0);
      const float p = d2 * static_cast<float>(v);
      *y++ = p - m2;
    }
    ql += 32;
    is += 2;
    u1 <<= 2;
    u2 <<= 2;
  }
}

// Q6_K: { u8 ql[128]; u8 qh[64]; int8 scales[16]; f16 d; }
void decode_q6_k(const std::byte* b, float* y) noexcept {
  const float d = half_at(b + 208);
  const std::byte* ql = b;
  const std::byte* qh = b + 128;
  const std::byte* sc = b + 192;
  for (std::size_t n = 0; n < kQKK; n += 128) {
    for (std::size_t l = 0; l < 32; ++l) {
      const std::size_t is = l / 16;
      const int q1 = ((u8(ql, l) & 0xF) | (((u8(qh, l) >> 0) & 3) << 4)) - 32;
      const int q2 = ((u8(ql, l + 32) & 0xF) | (((u8(qh, l) >> 2) & 3) << 4)) - 32;
      const int q3 = ((u8(ql, l) >> 4) | (((u8(qh, l) >> 4) & 3) << 4)) - 32;
      const int q4 = ((u8(ql, l + 32) >> 4) | (((u8(qh, l) >> 6) & 3) << 4)) - 32;
      const auto s = [&](std::size_t i) { return d * static_cast<float>(static_cast<std::int8_t>(u8(sc, i))); };
      y[l + 0] = s(is + 0) * static_cast<float>(q1);
      y[l + 32] = s(is + 2) * static_cast<float>(q2);
      y[l + 64] = s(is + 4) * static_cast<float>(q3);
      y[l + 96] = s(is + 6) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// ggml's GGML_E8M0_TO_FP32_HALF: 2^(e-127) / 2, with e < 2 giving the subnormals 2^-128, 2^-127.
float e8m0_to_float_half(std::uint8_t e) noexcept {
  const std::uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<std::uint32_t>(e - 1) << 23);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// MXFP4 (ggml block_mxfp4): { u8 e; u8 qs[16]; }; element j from the low nibble of qs[j], j+16
// from the high nibble; e2m1 values doubled (kvalues_mxfp4) times half the e8m0 scale.
void decode_mxfp4(const std::byte* b, float* y) noexcept {
  static constexpr std::int8_t kValues[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const float d = e8m0_to_float_half(u8(b, 0));
  for (std::size_t j = 0; j < kQK / 2; ++j) {
    const std::uint8_t q = u8(b + 1, j);
    y[j] = static_cast<float>(kValues[q & 0x0F]) * d;
    y[j + kQK / 2] = static_cast<float>(kValues[q >> 4]) * d;
  }
}

}  // namespace

std::size_t block_format_block_size(Precision p) noexcept {
  switch (p) {
    case Precision::kQ8_0:
    case Precision::kQ4_0:
    case Precision::kMxfp4:
      return kQK;
    case Precision::kQ4_K:
    case Precision::kQ5_K:
    case Precision::kQ6_K:
      return kQKK;
    case Precision::kFp8E4M3:
      return 1;  // one byte per weight; the 128x128 scales live apart
    default:
      return 0;
  }
}

std::size_t block_format_block_bytes(Precision p) noexcept {
  switch (p) {
    case Precision::kQ8_0:
      return 2 + 32;
    case Precision::kQ4_0:
      return 2 + 16;
    case Precision::kQ4_K:
      return 2 + 2 + 12 + 128;
    case Precision::kQ5_K:
      return 2 + 2 + 12 + 32 + 128;
    case Precision::kQ6_K:
      return 128 + 64 + 16 + 2;
    case Precision::kMxfp4:
      return 1 + 16;
    case Precision::kFp8E4M3:
      return 1;
    default:
      return 0;
  }
}

void decode_block_row(Precision p, const std::byte* src, std::size_t n, float* dst) noexcept {
  const std::size_t bs = block_format_block_size(p);
  const std::size_t bb = block_format_block_bytes(p);
  if (bs == 0 || src == nullptr || dst == nullptr) return;
  if (p == Precision::kFp8E4M3) {  // unscaled: the caller applies the block scales
    for (std::size_t i = 0; i < n; ++i) dst[i] = fp8_e4m3_to_float(u8(src, i));
    return;
  }
  for (std::size_t i = 0; i + bs <= n; i += bs, src += bb, dst += bs) {
    switch (p) {
      case Precision::kQ8_0:
        decode_q8_0(src, dst);
        break;
      case Precision::kQ4_0:
        decode_q4_0(src, dst);
        break;
      case Precision::kQ4_K:
        decode_q4_k(src, dst);
        break;
      case Precision::kQ5_K:
        decode_q5_k(src, dst);
        break;
      case Precision::kQ6_K:
        decode_q6_k(src, dst);
        break;
      case Precision::kMxfp4:
        decode_mxfp4(src, dst);
        break;
      default:
        return;
    }
  }
}

float fp8_e4m3_to_float(std::uint8_t v) noexcept {
  const bool neg = (v & 0x80) != 0;
  const int e = (v >> 3) & 0xF;
  const int m = v & 0x7;
  float r;
  if (e == 0xF && m == 0x7) {
    r = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    r = std::ldexp(static_cast<float>(m), -9);  // m/8 * 2^-6
  } else {
    r = std::ldexp(static_cast<float>(8 + m), e - 7 - 3);
  }
  return neg ? -r : r;
}

float fp8_e5m2_to_float(std::uint8_t v) noexcept {
  // e5m2 is the upper byte of an IEEE binary16.
  return f16_to_float(static_cast<std::uint16_t>(v << 8));
}

MOEX_NAMESPACE_END
