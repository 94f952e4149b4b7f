#pragma once
// Internal to moex::cuda (src/cuda): the per-expert path for fp8 e4m3 experts, shared by
// CudaBackend and CudaExecutionBackend. grouped_expert_ffn cannot run fp8 (ExpertTask carries no
// block scales), so an fp8 expert is three gemv() calls with the scale section of each matrix
// (quant/layout.hpp) as GemvArgs::block_scales, around the SwiGLU activation.

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda_detail {

/// Device scratch of fp8_expert: gate and up hold kMaxGemvTokens * ffn floats each (16-byte
/// aligned); the activation overwrites gate.
struct Fp8Scratch {
  float* gate = nullptr;
  float* up = nullptr;
};

/// Bytes of Fp8Scratch for experts up to `max_ffn` (each part rounded up to 256 bytes).
std::size_t fp8_scratch_bytes(std::size_t max_ffn) noexcept;
/// Cuts `base` (fp8_scratch_bytes(max_ffn) bytes, 256-byte aligned) into an Fp8Scratch.
Fp8Scratch fp8_scratch_at(std::byte* base, std::size_t max_ffn) noexcept;

/// y[t*ldy + r] = expert(x[t*ldx ...])[r] for t < n (1..kMaxGemvTokens), all device memory, on
/// `stream`: gate = W1 x and up = W3 x (gemv with their block scales), h = silu(gate) * up in f32
/// (swiglu_f32, in place of gate), y = W2 h: the CPU expert's arithmetic, to f32 rounding.
/// `v` is a device view of an fp8 expert laid out by expert_layout().
Status fp8_expert(const ExpertView& v, const float* x, std::size_t ldx, std::uint32_t n, float* y, std::size_t ldy,
                  const Fp8Scratch& s, cudaStream_t stream) noexcept;

}  // namespace cuda_detail
MOEX_NAMESPACE_END
