// weighted_combine and convert_f32_to_bf16 / _f16: launchers and argument checks.
#include "combine.cuh"
#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {

Status weighted_combine(const CombineArgs& a, cudaStream_t stream) noexcept {
  if (!a.eo || !a.weight || !a.out) return invalid_argument("weighted_combine: null pointer");
  if (a.ld_eo < a.hidden || a.ldo < a.hidden) return invalid_argument("weighted_combine: bad stride");
  const std::size_t total = static_cast<std::size_t>(a.tokens) * a.hidden;
  if (total == 0 || a.k == 0) return Status::ok();
  detail::CombineParams p{a.eo, a.ld_eo, a.weight, a.tokens, a.k, a.hidden, a.out, a.ldo, a.accumulate};
  const unsigned blocks = static_cast<unsigned>((total + 255) / 256);
  detail::weighted_combine_kernel<<<blocks, 256, 0, stream>>>(p);
  return cuda_status(cudaGetLastError(), "weighted_combine launch");
}

Status convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count, cudaStream_t stream) noexcept {
  if (count == 0) return Status::ok();
  if (!src || !dst) return invalid_argument("convert_f32_to_bf16: null pointer");
  const std::size_t want = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  detail::f32_to_bf16_kernel<<<blocks, 256, 0, stream>>>(src, dst, count);
  return cuda_status(cudaGetLastError(), "f32_to_bf16 launch");
}

Status convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count, cudaStream_t stream) noexcept {
  if (count == 0) return Status::ok();
  if (!src || !dst) return invalid_argument("convert_f32_to_f16: null pointer");
  const std::size_t want = (count + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  detail::f32_to_f16_kernel<<<blocks, 256, 0, stream>>>(src, dst, count);
  return cuda_status(cudaGetLastError(), "f32_to_f16 launch");
}

}  // namespace cuda
MOEX_NAMESPACE_END
