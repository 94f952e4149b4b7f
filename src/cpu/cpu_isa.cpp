// Run-time instruction-set selection for the CPU kernels (cpu_isa.hpp).
#include "moex/cpu/cpu_isa.hpp"

#include <atomic>
#include <cstdlib>
#include <string>

#include "moex/cpu/cpu_kernels.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

MOEX_NAMESPACE_BEGIN

namespace {

CpuIsa detect() noexcept {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state (XGETBV).
  // F16C: CPUID leaf 1, ECX bit 29 (clang 14's __builtin_cpu_supports lacks "f16c").
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  const bool f16c = __get_cpuid(1, &a1, &b1, &c1, &d1) != 0 && (c1 & (1u << 29)) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (!avx2) return CpuIsa::kScalar;
  const bool avx512 =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!avx512) return CpuIsa::kAvx2;
  // clang 14 does not know "avx512bf16" in __builtin_cpu_supports: read CPUID leaf 7 subleaf 1,
  // EAX bit 5 (AVX512_BF16). The OS saves ZMM state: checked by the avx512f test above.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0) return CpuIsa::kAvx512Bf16;
  return CpuIsa::kAvx512;
#else
  return CpuIsa::kScalar;
#endif
}

constexpr int kUnset = -1;
std::atomic<int> g_active{kUnset};

}  // namespace

namespace detail {

bool cpu_has_avx512vnni() noexcept {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    if (detected_cpu_isa() < CpuIsa::kAvx512) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 11)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_gfni() noexcept {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = [] {
    if (detected_cpu_isa() < CpuIsa::kAvx512) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 8)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace detail

Result<CpuIsa> parse_cpu_isa(std::string_view name) noexcept {
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (name == to_string(isa)) return isa;
  return invalid_argument("unknown CPU ISA name (expected scalar, avx2, avx512 or avx512bf16)");
}

CpuIsa detected_cpu_isa() noexcept {
  static const CpuIsa best = detect();
  return best;
}

CpuIsa active_cpu_isa() noexcept {
  int v = g_active.load(std::memory_order_relaxed);
  if (v != kUnset) return static_cast<CpuIsa>(v);
  CpuIsa isa = detected_cpu_isa();
  if (const char* env = std::getenv("MOEX_CPU_ISA")) {
    Result<CpuIsa> want = parse_cpu_isa(env);
    // An unknown name is ignored; a level above the CPU's is clamped to the CPU's.
    if (want.is_ok() && *want < isa) isa = *want;
  }
  int expected = kUnset;
  g_active.compare_exchange_strong(expected, static_cast<int>(isa), std::memory_order_relaxed);
  return static_cast<CpuIsa>(g_active.load(std::memory_order_relaxed));
}

Status set_cpu_isa(CpuIsa isa) noexcept {
  if (static_cast<int>(isa) > static_cast<int>(detected_cpu_isa()))
    return unsupported("set_cpu_isa: this CPU does not support " + std::string(to_string(isa)));
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return Status::ok();
}

MOEX_NAMESPACE_END
