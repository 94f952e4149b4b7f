#pragma once
/// @file cpu_isa.hpp
/// Run-time choice of the instruction set the CPU kernels (matmul_rows, expert_ffn) use.
///
/// moex is built for plain x86-64; the fast kernels are compiled with per-function target
/// attributes and picked at run time from what the CPU reports (`__builtin_cpu_supports`). The
/// environment variable `MOEX_CPU_ISA=scalar|avx2|avx512|avx512bf16` forces a lower level (it is
/// read once, at the first kernel call); a level above what the CPU supports is clamped to the
/// best supported one. Tests and benchmarks may also call set_cpu_isa().

#include <cstdint>
#include <string_view>

#include "moex/status.hpp"
#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN

/// Instruction-set levels of the CPU kernels, lowest first. Values are ordered: a level
/// implies every level below it.
///
/// Which arithmetic each level uses (exact = f32 activations, f32 accumulation; see expert_ffn.hpp):
///
/// | level       | f32 / f16 weights | bf16 weights             | int8 / int4 / int2 weights          |
/// |-------------|-------------------|--------------------------|-------------------------------------|
/// | kScalar     | exact             | exact                    | exact (the reference)               |
/// | kAvx2       | exact             | exact                    | int8 activations (vpmaddubsw)       |
/// | kAvx512     | exact             | exact                    | exact (f32 FMA; the exact SIMD path)|
/// | kAvx512Bf16 | exact             | bf16 activations         | int8 activations (VNNI vpdpbusd)    |
///
/// Checkpoint block formats (Q8_0/Q4_0/Q4_K/fp8 e4m3) are exact at every level: a portable decode
/// at kScalar, the AVX2 kernel at kAvx2, the AVX-512 kernel at kAvx512 and kAvx512Bf16.
///
/// kAvx512Bf16 uses int8 activations only where the CPU has AVX512-VNNI (every CPU with
/// AVX512-BF16 does); otherwise its integer formats take the exact kAvx512 path. To keep exact
/// activations on a fast CPU, set `MOEX_CPU_ISA=avx512` or call set_cpu_isa(CpuIsa::kAvx512).
enum class CpuIsa : std::uint8_t {
  kScalar = 0,      ///< portable C++ (any x86-64 or other CPU), exact
  kAvx2 = 1,        ///< AVX2 + FMA + F16C; integer weights with int8-quantized activations
  kAvx512 = 2,      ///< AVX-512 F/BW/VL, 16-lane f32 accumulation, exact activations everywhere
  kAvx512Bf16 = 3,  ///< kAvx512 plus vdpbf16ps for bf16 weights (activations rounded to bf16)
                    ///< and, with VNNI, vpdpbusd for integer weights (activations to int8)
};

/// "scalar", "avx2", "avx512", "avx512bf16".
constexpr std::string_view to_string(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kScalar:
      return "scalar";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
  }
  return "scalar";
}

/// Parses a name written by to_string(CpuIsa). Errors: kInvalidArgument for any other text.
Result<CpuIsa> parse_cpu_isa(std::string_view name) noexcept;

/// The best level this CPU supports (ignores MOEX_CPU_ISA and set_cpu_isa).
CpuIsa detected_cpu_isa() noexcept;

/// The level the kernels use now: MOEX_CPU_ISA (clamped to detected_cpu_isa()) or, when unset,
/// detected_cpu_isa(); or the last successful set_cpu_isa().
CpuIsa active_cpu_isa() noexcept;

/// Forces the kernels to `isa` from now on, process-wide (meant for tests and benchmarks; calls
/// running concurrently on other threads may use either level). Errors: kUnsupported when the
/// CPU lacks `isa` (nothing changes).
Status set_cpu_isa(CpuIsa isa) noexcept;

MOEX_NAMESPACE_END
