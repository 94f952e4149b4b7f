// Runtime dispatch: maps (precision, group, tokens) onto the explicitly instantiated launchers and
// answers kUnsupported for anything else.
#include <cstdint>
#include <string>

#include <cuda_runtime.h>

#include "kernels.hpp"
#include "launchers.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {

namespace {

/// Elements one 16-byte load holds, or 0 when the precision has no GEMV.
std::size_t per_load(Precision p) noexcept {
  switch (p) {
    case Precision::kBF16:
    case Precision::kF16:
      return 8;
    case Precision::kInt8:
      return 16;
    case Precision::kInt4:
      return 32;
    case Precision::kInt2:
      return 64;
    default:
      return 0;
  }
}

/// Column multiple that the block-format kernels need, or 0 when p has none.
std::size_t block_cols(Precision p) noexcept {
  switch (p) {
    case Precision::kQ8_0:
    case Precision::kQ4_0:
    case Precision::kFp8E4M3:
      return 32;
    case Precision::kQ4_K:
      return 256;
    default:
      return 0;
  }
}

/// Calls fn.template operator()<P, T>() for the block format P and token bucket T of n.
template <class F>
Status dispatch_block(Precision p, std::uint32_t n, F&& fn) noexcept;

int token_bucket(std::uint32_t n) noexcept { return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8; }

bool aligned16(const void* p) noexcept { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

/// Calls F::template call<P, G, T>() for the instantiated (P, G, T) matching the arguments.
template <class F>
Status dispatch(WeightFormat f, std::uint32_t n, F&& fn) noexcept {
  const int t = token_bucket(n);
  auto by_t = [&]<Precision P, int G>() -> Status {
    switch (t) {
      case 1:
        return fn.template operator()<P, G, 1>();
      case 2:
        return fn.template operator()<P, G, 2>();
      case 4:
        return fn.template operator()<P, G, 4>();
      default:
        return fn.template operator()<P, G, 8>();
    }
  };
  auto by_g = [&]<Precision P>() -> Status {
    switch (f.group_size) {
      case 32:
        return by_t.template operator()<P, 32>();
      case 64:
        return by_t.template operator()<P, 64>();
      case 128:
        return by_t.template operator()<P, 128>();
      default:
        return unsupported("group size " + std::to_string(f.group_size));
    }
  };
  switch (f.precision) {
    case Precision::kBF16:
      return by_t.template operator()<Precision::kBF16, 0>();
    case Precision::kF16:
      return by_t.template operator()<Precision::kF16, 0>();
    case Precision::kInt8:
      return by_g.template operator()<Precision::kInt8>();
    case Precision::kInt4:
      return by_g.template operator()<Precision::kInt4>();
    case Precision::kInt2:
      return by_g.template operator()<Precision::kInt2>();
    default:
      return unsupported(std::string("no CUDA GEMV for ") + std::string(to_string(f.precision)));
  }
}

/// Calls fn.template operator()<P, G>() for an int4/int2 format (the q8 kernels' variants, batch
/// 1), else kUnsupported naming `what`.
template <class F>
Status dispatch_q8(WeightFormat f, const char* what, F&& fn) noexcept {
  return dispatch(f, 1, [&]<Precision P, int G, int T>() -> Status {
    if constexpr (P == Precision::kInt4 || P == Precision::kInt2)
      return fn.template operator()<P, G>();
    else
      return unsupported(std::string(what) + ": int4/int2 only");
  });
}

template <class F>
Status dispatch_block(Precision p, std::uint32_t n, F&& fn) noexcept {
  const int t = token_bucket(n);
  auto by_t = [&]<Precision P>() -> Status {
    switch (t) {
      case 1:
        return fn.template operator()<P, 1>();
      case 2:
        return fn.template operator()<P, 2>();
      case 4:
        return fn.template operator()<P, 4>();
      default:
        return fn.template operator()<P, 8>();
    }
  };
  switch (p) {
    case Precision::kQ8_0:
      return by_t.template operator()<Precision::kQ8_0>();
    case Precision::kQ4_0:
      return by_t.template operator()<Precision::kQ4_0>();
    case Precision::kQ4_K:
      return by_t.template operator()<Precision::kQ4_K>();
    case Precision::kFp8E4M3:
      return by_t.template operator()<Precision::kFp8E4M3>();
    default:
      return unsupported(std::string("no CUDA block GEMV for ") + std::string(to_string(p)));
  }
}

}  // namespace

Status cuda_status(cudaError_t err, const char* what) noexcept {
  if (err == cudaSuccess) return Status::ok();
  return internal_error(std::string(what) + ": " + cudaGetErrorString(err));
}

bool gemv_supported(WeightFormat format, std::size_t cols) noexcept {
  if (const std::size_t b = block_cols(format.precision); b != 0) return cols != 0 && cols % b == 0;
  const std::size_t e = per_load(format.precision);
  if (e == 0 || cols == 0 || cols % e != 0) return false;
  if (is_quantized(format.precision) && !format_is_valid(format, cols)) return false;
  return true;
}

Status gemv(const GemvArgs& a, cudaStream_t stream) noexcept {
  if (!a.w || !a.x || !a.y) return invalid_argument("gemv: null pointer");
  if (a.n == 0 || a.n > kMaxGemvTokens) return invalid_argument("gemv: n must be 1..8");
  if (a.layout.rows == 0 || a.layout.cols == 0) return invalid_argument("gemv: empty matrix");
  if (!gemv_supported(a.layout.format, a.layout.cols))
    return unsupported("gemv: format/columns combination not instantiated");
  if (!aligned16(a.w) || !aligned16(a.x) || a.ldx % 4 != 0 || a.ldx < a.layout.cols || a.ldy < a.layout.rows)
    return invalid_argument("gemv: misaligned pointer or bad stride");
  if (block_cols(a.layout.format.precision) != 0) {
    if (a.workspace != nullptr && !aligned16(a.workspace))
      return invalid_argument("gemv: workspace must be 16-byte aligned");
    if (a.layout.format.precision == Precision::kFp8E4M3 &&
        (!a.block_scales || a.scale_block == 0 || a.scale_block % 32 != 0))
      return invalid_argument("gemv: fp8 e4m3 needs block_scales and a scale_block that is a multiple of 32");
    return dispatch_block(a.layout.format.precision, a.n,
                          [&]<Precision P, int T>() { return launch_gemv_block<P, T>(a, stream); });
  }
  return dispatch(a.layout.format, a.n, [&]<Precision P, int G, int T>() {
    // int8 stays on the f32 kernel: it already streams at the copy ceiling there, and its q8
    // variant measured slower (bench/RESULTS-gpu.md).
    if constexpr (P == Precision::kInt4 || P == Precision::kInt2) {
      if (!a.exact) return launch_gemv_q8<P, G, T>(a, stream);
    }
    return launch_gemv<P, G, T>(a, stream);
  });
}

Status grouped_expert_ffn(const GroupedExpertArgs& a, cudaStream_t stream) noexcept {
  if (!a.tasks || !a.x || !a.out || !a.workspace) return invalid_argument("grouped_expert_ffn: null pointer");
  if (a.count == 0 || a.count > kMaxGroupExperts) return invalid_argument("grouped_expert_ffn: count must be 1..32");
  const ExpertShape s = a.layout.shape;
  const Precision prec = a.layout.format.precision;
  const bool block = block_cols(prec) != 0;
  if (prec == Precision::kFp8E4M3 &&
      (a.layout.w1.scales_offset == 0 || a.layout.w3.scales_offset == 0 || a.layout.w2.scales_offset == 0))
    return invalid_argument("grouped_expert_ffn: fp8 e4m3 experts need the layout's block-scale sections");
  if (block ? (s.hidden == 0 || s.ffn == 0) : !expert_format_is_valid(s, a.layout.format))
    return invalid_argument("grouped_expert_ffn: bad layout");
  if (!gemv_supported(a.layout.format, s.hidden) || !gemv_supported(a.layout.format, s.ffn))
    return unsupported("grouped_expert_ffn: format/shape combination not instantiated");
  if (!aligned16(a.x) || a.ldx % 4 != 0 || a.ldx < s.hidden || a.ldo < s.hidden || !aligned16(a.workspace))
    return invalid_argument("grouped_expert_ffn: misaligned pointer or bad stride");
  std::uint32_t max_n = 0;
  for (std::uint32_t i = 0; i < a.count; ++i) {
    const ExpertTask& t = a.tasks[i];
    if (!t.w1 || !t.w3 || !t.w2 || !aligned16(t.w1) || !aligned16(t.w3) || !aligned16(t.w2))
      return invalid_argument("grouped_expert_ffn: null or misaligned expert");
    if (t.n == 0 || t.n > kMaxGemvTokens) return invalid_argument("grouped_expert_ffn: task n must be 1..8");
    if (t.n > max_n) max_n = t.n;
  }
  if (block) {
    return dispatch_block(prec, max_n,
                          [&]<Precision P, int T>() { return launch_grouped_expert_block<P, T>(a, stream); });
  }
  return dispatch(a.layout.format, max_n, [&]<Precision P, int G, int T>() {
    if constexpr (P == Precision::kInt4 || P == Precision::kInt2) {
      if (!a.exact) return launch_grouped_expert_q8<P, G, T>(a, stream);
    }
    return launch_grouped_expert<P, G, T>(a, stream);
  });
}

Status gemv_q8_variant(const GemvArgs& a, int variant, cudaStream_t stream) noexcept {
  return dispatch_q8(a.layout.format, "gemv_q8_variant",
                     [&]<Precision P, int G>() { return launch_gemv_q8_variant<P, G>(a, variant, stream); });
}

Status grouped_expert_q8_variant(const GroupedExpertArgs& a, int variant, cudaStream_t stream) noexcept {
  return dispatch_q8(a.layout.format, "grouped_expert_q8_variant",
                     [&]<Precision P, int G>() { return launch_grouped_expert_q8_variant<P, G>(a, variant, stream); });
}

Status gemv_block_variant(const GemvArgs& a, int variant, cudaStream_t stream) noexcept {
  return dispatch_block(a.layout.format.precision, a.n,
                        [&]<Precision P, int T>() { return launch_gemv_block<P, T>(a, stream, variant == 0); });
}

}  // namespace cuda
MOEX_NAMESPACE_END
