// fp8 e4m3 experts as three block-scaled GEMVs around an f32 SwiGLU activation (see fp8_expert.hpp).
#include "fp8_expert.hpp"

#include <cuda_runtime.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda_detail {

namespace {

std::size_t part_bytes(std::size_t max_ffn, std::size_t elem) noexcept {
  return align_up(std::size_t{cuda::kMaxGemvTokens} * max_ffn * elem, 256);
}

Status matrix_gemv(const std::byte* w, const MatrixLayout& l, const float* x, std::size_t ldx, std::uint32_t n,
                   float* y, std::size_t ldy, cudaStream_t stream) noexcept {
  cuda::GemvArgs a;
  a.w = w;
  a.layout = l;
  a.x = x;
  a.ldx = ldx;
  a.y = y;
  a.ldy = ldy;
  a.n = n;
  a.block_scales = reinterpret_cast<const float*>(w + l.scales_offset);
  a.scale_block = static_cast<std::uint32_t>(kFp8ScaleBlockSize);
  return cuda::gemv(a, stream);
}

}  // namespace

std::size_t fp8_scratch_bytes(std::size_t max_ffn) noexcept { return 2 * part_bytes(max_ffn, sizeof(float)); }

Fp8Scratch fp8_scratch_at(std::byte* base, std::size_t max_ffn) noexcept {
  Fp8Scratch s;
  s.gate = reinterpret_cast<float*>(base);
  s.up = reinterpret_cast<float*>(base + part_bytes(max_ffn, sizeof(float)));
  return s;
}

Status fp8_expert(const ExpertView& v, const float* x, std::size_t ldx, std::uint32_t n, float* y, std::size_t ldy,
                  const Fp8Scratch& s, cudaStream_t stream) noexcept {
  const ExpertLayout& l = v.layout;
  if (l.format.precision != Precision::kFp8E4M3) return invalid_argument("fp8_expert: not an fp8 e4m3 expert");
  if (n == 0 || n > cuda::kMaxGemvTokens) return invalid_argument("fp8_expert: n must be 1..8");
  const std::size_t f = l.shape.ffn;
  MOEX_RETURN_IF_ERROR(matrix_gemv(v.w1_data, l.w1, x, ldx, n, s.gate, f, stream));
  MOEX_RETURN_IF_ERROR(matrix_gemv(v.w3_data, l.w3, x, ldx, n, s.up, f, stream));
  MOEX_RETURN_IF_ERROR(cuda::swiglu_f32(s.gate, s.up, s.gate, n * f, stream));  // h in place of gate
  return matrix_gemv(v.w2_data, l.w2, s.gate, f, n, y, ldy, stream);
}

}  // namespace cuda_detail
MOEX_NAMESPACE_END
