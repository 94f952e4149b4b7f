#pragma once
/// @file version.hpp
/// Compile-time version of moex and the ABI inline namespace.

#define MOEX_VERSION_MAJOR 0
#define MOEX_VERSION_MINOR 2
#define MOEX_VERSION_PATCH 0
/// zstd's formula: major*10000 + minor*100 + patch.
#define MOEX_VERSION_NUMBER (MOEX_VERSION_MAJOR * 10000 + MOEX_VERSION_MINOR * 100 + MOEX_VERSION_PATCH)

#ifndef MOEX_HAS_CUDA
#define MOEX_HAS_CUDA 0
#endif

// The ABI inline namespace encodes the version and every configuration tag that changes layouts,
// so two differently-configured copies of moex in one program fail to link instead of corrupting
// memory (nlohmann's abi_macros.hpp).
#if MOEX_HAS_CUDA
#define MOEX_ABI_NS v0_2_cuda
#else
#define MOEX_ABI_NS v0_2
#endif

/// Opens namespace moex and its ABI inline namespace.
#define MOEX_NAMESPACE_BEGIN \
  namespace moex {           \
  inline namespace MOEX_ABI_NS {
/// Closes what MOEX_NAMESPACE_BEGIN opened.
#define MOEX_NAMESPACE_END \
  }                        \
  }

#if defined(__CUDACC__)
#define MOEX_HOST_DEVICE __host__ __device__
#else
#define MOEX_HOST_DEVICE
#endif
