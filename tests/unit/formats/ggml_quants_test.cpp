// GGUF block decoders on hand-built blocks whose values are known (encoders written from the
// ggml block layouts, independent of the decoders). Values are small integers times powers of
// two, so every expected float is exact and the comparison is bitwise.

#include <cmath>
#include <cstring>
#include <vector>

#include <doctest/doctest.h>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

#include "support/test_support.hpp"

using namespace moex;

namespace {

void put_f16(std::vector<std::byte>& b, std::size_t at, float v) {
  const std::uint16_t h = float_to_f16(v);
  b[at] = std::byte(h & 0xff);
  b[at + 1] = std::byte(h >> 8);
}

std::uint64_t lcg(std::uint64_t& x) {
  x = x * 6364136223846793005ull + 1442695040888963407ull;
  return x >> 33;
}

// Packs 8 six-bit scales and mins the way Q4_K/Q5_K store them (12 bytes).
void pack_scales_k4(std::byte* out, const int sc[8], const int m[8]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = std::byte(static_cast<std::uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6)));
    out[j + 4] = std::byte(static_cast<std::uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6)));
    out[j + 8] = std::byte(static_cast<std::uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)));
  }
}

}  // namespace

TEST_SUITE("formats") {

TEST_CASE("block sizes and bytes match ggml") {
  CHECK(block_format_block_size(Precision::kQ8_0) == 32);
  CHECK(block_format_block_bytes(Precision::kQ8_0) == 34);
  CHECK(block_format_block_bytes(Precision::kQ4_0) == 18);
  CHECK(block_format_block_size(Precision::kQ4_K) == 256);
  CHECK(block_format_block_bytes(Precision::kQ4_K) == 144);
  CHECK(block_format_block_bytes(Precision::kQ5_K) == 176);
  CHECK(block_format_block_bytes(Precision::kQ6_K) == 210);
  CHECK(block_format_block_bytes(Precision::kMxfp4) == 17);
  CHECK(block_format_block_size(Precision::kBF16) == 0);
}

TEST_CASE("Q8_0 and Q4_0 decode hand-built blocks") {
  std::vector<std::byte> b(34);
  put_f16(b, 0, 0.5f);
  for (int j = 0; j < 32; ++j) b[2 + j] = std::byte(static_cast<std::uint8_t>(static_cast<std::int8_t>(j * 8 - 128)));
  float y[64];
  decode_block_row(Precision::kQ8_0, b.data(), 32, y);
  for (int j = 0; j < 32; ++j) CHECK(y[j] == static_cast<float>(j * 8 - 128) * 0.5f);

  std::vector<std::byte> q(36);  // two Q4_0 blocks
  put_f16(q, 0, 2.f);
  put_f16(q, 18, -0.25f);
  for (int j = 0; j < 16; ++j) {
    q[2 + j] = std::byte(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
    q[20 + j] = std::byte(static_cast<std::uint8_t>((j / 2) | (j << 4)));
  }
  decode_block_row(Precision::kQ4_0, q.data(), 64, y);
  for (int j = 0; j < 16; ++j) {
    CAPTURE(j);
    CHECK(y[j] == static_cast<float>(j - 8) * 2.f);
    CHECK(y[j + 16] == static_cast<float>(7 - j) * 2.f);
    CHECK(y[32 + j] == static_cast<float>(j / 2 - 8) * -0.25f);
    CHECK(y[48 + j] == static_cast<float>(j - 8) * -0.25f);
  }
}

TEST_CASE("Q4_K and Q5_K decode hand-built super-blocks") {
  std::uint64_t x = test::seed();
  CAPTURE(test::seed());
  for (int trial = 0; trial < 20; ++trial) {
    int sc[8], m[8], q[256];
    for (int s = 0; s < 8; ++s) {
      sc[s] = static_cast<int>(lcg(x) % 64);
      m[s] = static_cast<int>(lcg(x) % 64);
    }
    for (int& v : q) v = static_cast<int>(lcg(x) % 32);  // 5 bits; Q4_K uses the low 4
    const float d = 0.125f, dmin = 0.5f;
    // Q4_K: d, dmin, scales[12], qs[128]: sub-block 2k in the low nibbles of qs[32k..], 2k+1 high.
    std::vector<std::byte> b4(144);
    put_f16(b4, 0, d);
    put_f16(b4, 2, dmin);
    pack_scales_k4(b4.data() + 4, sc, m);
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l)
        b4[16 + 32 * k + l] =
            std::byte(static_cast<std::uint8_t>((q[64 * k + l] & 15) | ((q[64 * k + 32 + l] & 15) << 4)));
    // Q5_K: d, dmin, scales[12], qh[32], qs[128]; bit s of qh[l] is the 5th bit of element l of sub-block s.
    std::vector<std::byte> b5(176);
    put_f16(b5, 0, d);
    put_f16(b5, 2, dmin);
    pack_scales_k4(b5.data() + 4, sc, m);
    for (int l = 0; l < 32; ++l) {
      int h = 0;
      for (int s = 0; s < 8; ++s) h |= ((q[32 * s + l] >> 4) & 1) << s;
      b5[16 + l] = std::byte(static_cast<std::uint8_t>(h));
    }
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < 32; ++l)
        b5[48 + 32 * k + l] =
            std::byte(static_cast<std::uint8_t>((q[64 * k + l] & 15) | ((q[64 * k + 32 + l] & 15) << 4)));
    float y4[256], y5[256];
    decode_block_row(Precision::kQ4_K, b4.data(), 256, y4);
    decode_block_row(Precision::kQ5_K, b5.data(), 256, y5);
    for (int i = 0; i < 256; ++i) {
      CAPTURE(trial);
      CAPTURE(i);
      const int s = i / 32;
      CHECK(y4[i] == d * static_cast<float>(sc[s]) * static_cast<float>(q[i] & 15) - dmin * static_cast<float>(m[s]));
      CHECK(y5[i] == d * static_cast<float>(sc[s]) * static_cast<float>(q[i]) - dmin * static_cast<float>(m[s]));
    }
  }
}

TEST_CASE("Q6_K decodes hand-built super-blocks") {
  std::uint64_t x = test::seed() ^ 6;
  CAPTURE(test::seed());
  int q[256];
  std::int8_t sc[16];
  for (int& v : q) v = static_cast<int>(lcg(x) % 64);
  for (auto& s : sc) s = static_cast<std::int8_t>(static_cast<int>(lcg(x) % 255) - 127);
  const float d = 0.0625f;
  // ql[128], qh[64], scales[16], d. Element 128n + 32t + l: low 4 bits in ql[64n + l + 32(t&1)]
  // (low nibble for t<2, high for t>=2), high 2 bits in qh[32n + l] bits 2t..2t+1, scale 8n + l/16 + 2t.
  std::vector<std::byte> b(210);
  std::vector<std::uint8_t> ql(128, 0), qh(64, 0);
  for (int n = 0; n < 2; ++n)
    for (int t = 0; t < 4; ++t)
      for (int l = 0; l < 32; ++l) {
        const int v = q[128 * n + 32 * t + l];
        auto& lo = ql[static_cast<std::size_t>(64 * n + l + 32 * (t & 1))];
        lo = static_cast<std::uint8_t>(lo | ((v & 15) << (t >= 2 ? 4 : 0)));
        auto& hi = qh[static_cast<std::size_t>(32 * n + l)];
        hi = static_cast<std::uint8_t>(hi | ((v >> 4) << (2 * t)));
      }
  std::memcpy(b.data(), ql.data(), 128);
  std::memcpy(b.data() + 128, qh.data(), 64);
  std::memcpy(b.data() + 192, sc, 16);
  put_f16(b, 208, d);
  float y[256];
  decode_block_row(Precision::kQ6_K, b.data(), 256, y);
  for (int n = 0; n < 2; ++n)
    for (int t = 0; t < 4; ++t)
      for (int l = 0; l < 32; ++l) {
        const int i = 128 * n + 32 * t + l;
        CAPTURE(i);
        CHECK(y[i] == d * static_cast<float>(sc[8 * n + l / 16 + 2 * t]) * static_cast<float>(q[i] - 32));
      }
}

TEST_CASE("MXFP4 decodes e2m1 with an e8m0 scale") {
  static constexpr float kFp4[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int e : {1, 100, 127, 128, 140, 254}) {
    std::vector<std::byte> b(17);
    b[0] = std::byte(static_cast<std::uint8_t>(e));
    for (int j = 0; j < 16; ++j) b[1 + j] = std::byte(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
    float y[32];
    decode_block_row(Precision::kMxfp4, b.data(), 32, y);
    for (int j = 0; j < 16; ++j) {
      CAPTURE(e);
      CAPTURE(j);
      CHECK(y[j] == std::ldexp(kFp4[j], e - 127));
      CHECK(y[j + 16] == std::ldexp(kFp4[15 - j], e - 127));
    }
  }
}

TEST_CASE("fp8 e4m3 and e5m2 decode exactly") {
  CHECK(fp8_e4m3_to_float(0x38) == 1.f);
  CHECK(fp8_e4m3_to_float(0xB8) == -1.f);
  CHECK(fp8_e4m3_to_float(0x7E) == 448.f);
  CHECK(fp8_e4m3_to_float(0x01) == std::ldexp(1.f, -9));
  CHECK(fp8_e4m3_to_float(0x08) == std::ldexp(1.f, -6));
  CHECK(std::isnan(fp8_e4m3_to_float(0x7F)));
  CHECK(std::isnan(fp8_e4m3_to_float(0xFF)));
  CHECK(fp8_e4m3_to_float(0x78) == 256.f);  // S.1111.000 is a number in the fn variant
  CHECK(fp8_e5m2_to_float(0x3C) == 1.f);
  CHECK(fp8_e5m2_to_float(0x7B) == 57344.f);
  CHECK(std::isinf(fp8_e5m2_to_float(0x7C)));
  CHECK(fp8_e5m2_to_float(0x01) == std::ldexp(1.f, -16));
  // every e4m3 code: value = (-1)^s * 2^(e-7) * (1 + m/8), subnormals 2^-6 * m/8
  for (int v = 0; v < 256; ++v) {
    const int s = v >> 7, e = (v >> 3) & 15, m = v & 7;
    if (e == 15 && m == 7) continue;
    const double ref = (s ? -1.0 : 1.0) * (e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6));
    CAPTURE(v);
    CHECK(static_cast<double>(fp8_e4m3_to_float(static_cast<std::uint8_t>(v))) == ref);
  }
}

}  // TEST_SUITE("formats")
