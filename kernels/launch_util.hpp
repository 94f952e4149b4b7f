#pragma once
/// @file launch_util.hpp
/// Host helpers that the launchers of persistent-grid kernels share (gemv_q8.cuh, gemv_block.cuh):
/// the device facts a grid is sized by, and how many blocks of a kernel fit on the device at once.

#include <cstddef>
#include <utility>

#include <cuda_runtime.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

/// Facts of the current device that launchers size their grids by.
struct DeviceFacts {
  int sms = 0;       ///< multiprocessors
  int optin = 0;     ///< most dynamic shared memory one block may opt in to (bytes)
  int cc_major = 0;  ///< compute capability, major
};

inline Status device_facts(DeviceFacts& d) noexcept {
  int dev = 0;
  MOEX_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&dev), "cudaGetDevice"));
  MOEX_RETURN_IF_ERROR(cuda_status(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "SM count"));
  MOEX_RETURN_IF_ERROR(
      cuda_status(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability"));
  return cuda_status(cudaDeviceGetAttribute(&d.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                     "shared memory limit");
}

/// Blocks of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) that fit on the
/// device at once (>= 1), into cap. Raises the kernel's dynamic shared-memory limit first when
/// smem is over the default 48 KB.
template <class K>
Status resident_blocks(K* kernel, int threads, std::size_t smem, const DeviceFacts& d, std::size_t& cap) noexcept {
  if (smem > 48 * 1024)
    MOEX_RETURN_IF_ERROR(
        cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                    "kernel shared memory"));
  int per_sm = 0;
  MOEX_RETURN_IF_ERROR(
      cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem), "kernel occupancy"));
  if (per_sm < 1) per_sm = 1;
  cap = static_cast<std::size_t>(d.sms) * static_cast<std::size_t>(per_sm);
  return Status::ok();
}

/// Blocks per task of a grouped persistent launch: each of `count` tasks gets floor(cap / count)
/// (at least one), no more than its `needed`, so that the whole grid is one wave (rounding up put
/// 400 blocks on 396 resident slots for 8 tasks on the H100: a second wave of 4 blocks, ncu: DRAM
/// 52%).
inline unsigned blocks_per_task(std::size_t cap, std::size_t count, std::size_t needed) noexcept {
  std::size_t share = cap / count;
  if (share < 1) share = 1;
  return static_cast<unsigned>(needed < share ? needed : share);
}

/// Launches kernel<<<grid, block, smem, stream>>>(args...); with pdl, as a programmatic dependent
/// launch: the kernel may start while the kernel before it in the stream still runs, so it must
/// call pdl_wait (device_math.cuh) before reading that kernel's results or writing anything. Only
/// a launch that follows one of this library's own kernels of the same operation may pass pdl (the
/// kernel before it was launched after everything earlier in the stream had finished, so the
/// weights are in place).
template <class... KArgs, class... Args>
Status launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, bool pdl,
                     const char* what, Args&&... args) noexcept {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1] = {};
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cuda_status(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...), what);
}

}  // namespace detail
}  // namespace cuda
MOEX_NAMESPACE_END
