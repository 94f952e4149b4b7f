// cuBLAS bf16 path for batches beyond the GEMV kernels (cublasGemmEx, f32 accumulation).
#include <string>

#include <cublas_v2.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {

Status cublas_create(cublasContext** handle) noexcept {
  if (!handle) return invalid_argument("cublas_create: null");
  const cublasStatus_t st = cublasCreate(handle);
  if (st != CUBLAS_STATUS_SUCCESS) return internal_error(std::string("cublasCreate: ") + cublasGetStatusString(st));
  return Status::ok();
}

void cublas_destroy(cublasContext* handle) noexcept {
  if (handle) cublasDestroy(handle);
}

Status gemm_bf16(cublasContext* handle, const GemmBf16Args& a, cudaStream_t stream) noexcept {
  if (!handle || !a.w || !a.x || !a.y) return invalid_argument("gemm_bf16: null pointer");
  if (a.rows == 0 || a.cols == 0 || a.n == 0) return invalid_argument("gemm_bf16: empty problem");
  if (a.ldx < a.cols || a.ldy < a.rows) return invalid_argument("gemm_bf16: bad stride");
  constexpr std::size_t kIntMax = 0x7fffffff;
  if (a.rows > kIntMax || a.cols > kIntMax || a.n > kIntMax || a.ldx > kIntMax || a.ldy > kIntMax)
    return unsupported("gemm_bf16: dimension beyond int");
  if (cublasSetStream(handle, stream) != CUBLAS_STATUS_SUCCESS) return internal_error("cublasSetStream");
  // Column-major view: C[rows x n] = A^T B with A = W^T ([cols x rows], lda = cols) and
  // B = x^T ([cols x n], ldb = ldx); C = y^T with ldc = ldy.
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st = cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(a.rows), static_cast<int>(a.n), static_cast<int>(a.cols),
      &alpha, a.w, CUDA_R_16BF, static_cast<int>(a.cols), a.x, CUDA_R_16BF, static_cast<int>(a.ldx), &beta, a.y,
      CUDA_R_32F, static_cast<int>(a.ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) return internal_error(std::string("cublasGemmEx: ") + cublasGetStatusString(st));
  return Status::ok();
}

}  // namespace cuda
MOEX_NAMESPACE_END
