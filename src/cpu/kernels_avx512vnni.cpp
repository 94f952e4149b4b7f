// AVX512-VNNI int8-activation kernel for int8/int4/int2 weights (vnni_kernel.hpp), shift + AND
// unpacking. Used by the kAvx512Bf16 level on CPUs with VNNI but without GFNI.
// Only the functions below carry the target; kernels_avx512bf16.cpp calls them after checking
// the CPU (cpu_has_avx512vnni, cpu_has_gfni).
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <new>
#include <type_traits>

#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/layout.hpp"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
// GCC 12's AVX-512 headers initialize _mm512_undefined_*() from themselves, which -Wuninitialized
// reports at every inlined use (GCC PR 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif

#include "moex/cpu/vnni_kernel.hpp"

MOEX_NAMESPACE_BEGIN
namespace detail {

bool matmul_rows_avx512vnni(const MatmulArgs& a) noexcept { return matmul_rows_vnni<false>(a); }

}  // namespace detail
MOEX_NAMESPACE_END

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected

MOEX_NAMESPACE_BEGIN
namespace detail {
bool matmul_rows_avx512vnni(const MatmulArgs&) noexcept { return false; }
}  // namespace detail
MOEX_NAMESPACE_END

#endif
