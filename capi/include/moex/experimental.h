#ifndef MOEX_EXPERIMENTAL_H
#define MOEX_EXPERIMENTAL_H
/**
 * @file moex/experimental.h
 * Experimental additions to the moex C ABI. Unlike moex.h, nothing here is stable: functions and
 * structs may change or disappear in any minor release (their symbols carry the prefix
 * moex_experimental_). Opt in by defining MOEX_EXPERIMENTAL before including this header.
 *
 * Contents: CUDA device and stream selection. The CUDA execution backend has not landed in this
 * library yet: in this build every CUDA entry point returns MOEX_ERR_UNSUPPORTED (the device count
 * is 0), so embedders can write and test the calls now.
 *
 * Valid C99 and C++; includes only moex.h.
 */
#ifndef MOEX_EXPERIMENTAL
#error "moex/experimental.h declares unstable API: define MOEX_EXPERIMENTAL to use it"
#endif

#include "moex.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Where a CUDA executor runs. Size-versioned like moex.h's params (initialize with
 * moex_experimental_cuda_params_init_size(&p, sizeof p)). 24 bytes on 64-bit platforms.
 */
typedef struct moex_cuda_params {
  uint64_t struct_size;
  int32_t device; /* CUDA device ordinal */
  uint32_t flags; /* must be 0 */
  void* stream;   /* a cudaStream_t to enqueue on, borrowed (must outlive the executor);
                     NULL = the executor creates its own */
} moex_cuda_params;

/** Fills the first `size` bytes of `params` with defaults; size < 8 or > 4096, or NULL: no-op. */
MOEX_API void moex_experimental_cuda_params_init_size(moex_cuda_params* params, uint64_t size);

/** Number of CUDA devices this library can run on into `*count` (0 in builds without CUDA). */
MOEX_API moex_status moex_experimental_cuda_device_count(int32_t* count);

/**
 * moex_executor_create on a CUDA device and stream (params->backend must be 0 or
 * MOEX_BACKEND_CUDA). MOEX_ERR_UNSUPPORTED until the CUDA execution backend is built in.
 */
MOEX_API moex_status moex_experimental_executor_create_cuda(const moex_model* model, const moex_executor_params* params,
                                                            const moex_cuda_params* cuda, moex_executor** out);

/**
 * Moves a CUDA executor's work onto `stream` (a cudaStream_t, borrowed). MOEX_ERR_INVALID_ARGUMENT
 * for an executor on another backend; MOEX_ERR_UNSUPPORTED in builds without CUDA.
 */
MOEX_API moex_status moex_experimental_executor_set_cuda_stream(moex_executor* executor, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* MOEX_EXPERIMENTAL_H */
