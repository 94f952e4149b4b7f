// cuBLASLt path for bf16/f16 weights at larger batches (cublasLtMatmul, f32 accumulation and output),
// with the heuristic's plan cached per problem shape.
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN
namespace cuda {

namespace {

constexpr int kPlanCache = 32;  ///< problem shapes remembered (oldest replaced first)

Status lt_status(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::ok();
  return internal_error(std::string(what) + ": " + cublasGetStatusString(st));
}

/// One cached problem: its descriptors and the algorithm the heuristic chose.
struct LtPlan {
  bool used = false;
  Precision type = Precision::kBF16;
  std::size_t rows = 0, cols = 0, n = 0, ldx = 0, ldy = 0;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};

  void release() noexcept {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    op = nullptr;
    a = b = c = nullptr;
    used = false;
  }
};

}  // namespace

struct LtContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  LtPlan plans[kPlanCache];
  int next = 0;  ///< slot replaced next

  ~LtContext() {
    for (LtPlan& p : plans) p.release();
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }

  /// The plan of a problem, made (descriptors + heuristic) on first use.
  Status plan_for(const GemmLtArgs& g, LtPlan*& out) noexcept {
    for (LtPlan& p : plans)
      if (p.used && p.type == g.type && p.rows == g.rows && p.cols == g.cols && p.n == g.n && p.ldx == g.ldx &&
          p.ldy == g.ldy) {
        out = &p;
        return Status::ok();
      }
    LtPlan& p = plans[next];
    next = (next + 1) % kPlanCache;
    p.release();
    const cudaDataType_t t = g.type == Precision::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
    // Column-major view: C[rows x n] = A^T B, A = W^T ([cols x rows], lda = cols), B = x^T
    // ([cols x n], ldb = ldx), C = y^T (ldc = ldy), as in gemm_bf16.
    MOEX_RETURN_IF_ERROR(lt_status(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "Lt desc"));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    MOEX_RETURN_IF_ERROR(
        lt_status(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), "Lt transa"));
    MOEX_RETURN_IF_ERROR(
        lt_status(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), "Lt transb"));
    MOEX_RETURN_IF_ERROR(
        lt_status(cublasLtMatrixLayoutCreate(&p.a, t, g.cols, g.rows, static_cast<int64_t>(g.cols)), "Lt layout A"));
    MOEX_RETURN_IF_ERROR(
        lt_status(cublasLtMatrixLayoutCreate(&p.b, t, g.cols, g.n, static_cast<int64_t>(g.ldx)), "Lt layout B"));
    MOEX_RETURN_IF_ERROR(lt_status(
        cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32F, g.rows, g.n, static_cast<int64_t>(g.ldy)), "Lt layout C"));
    cublasLtMatmulPreference_t pref = nullptr;
    MOEX_RETURN_IF_ERROR(lt_status(cublasLtMatmulPreferenceCreate(&pref), "Lt preference"));
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             &workspace_bytes, sizeof(workspace_bytes));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
      st = cublasLtMatmulAlgoGetHeuristic(handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &heur, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    MOEX_RETURN_IF_ERROR(lt_status(st, "cublasLtMatmulAlgoGetHeuristic"));
    if (found < 1) return unsupported("gemm_lt: no cuBLASLt algorithm for this problem");
    p.algo = heur.algo;
    p.type = g.type;
    p.rows = g.rows;
    p.cols = g.cols;
    p.n = g.n;
    p.ldx = g.ldx;
    p.ldy = g.ldy;
    p.used = true;
    out = &p;
    return Status::ok();
  }
};

Status lt_create(LtContext** ctx, std::size_t workspace_bytes) noexcept {
  if (!ctx) return invalid_argument("lt_create: null");
  *ctx = nullptr;
  std::unique_ptr<LtContext> c(new (std::nothrow) LtContext());
  if (!c) return out_of_memory("lt_create");
  MOEX_RETURN_IF_ERROR(lt_status(cublasLtCreate(&c->handle), "cublasLtCreate"));
  if (workspace_bytes) {
    if (cudaMalloc(&c->workspace, workspace_bytes) != cudaSuccess) {
      cudaGetLastError();
      return out_of_memory("lt_create: workspace");
    }
    c->workspace_bytes = workspace_bytes;
  }
  *ctx = c.release();
  return Status::ok();
}

void lt_destroy(LtContext* ctx) noexcept { delete ctx; }

Status gemm_lt(LtContext* ctx, const GemmLtArgs& g, cudaStream_t stream) noexcept {
  if (!ctx || !g.w || !g.x || !g.y) return invalid_argument("gemm_lt: null pointer");
  if (g.type != Precision::kBF16 && g.type != Precision::kF16) return unsupported("gemm_lt: bf16 or f16 weights only");
  if (g.rows == 0 || g.cols == 0 || g.n == 0) return invalid_argument("gemm_lt: empty problem");
  if (g.ldx < g.cols || g.ldy < g.rows) return invalid_argument("gemm_lt: bad stride");
  constexpr std::size_t kIntMax = 0x7fffffff;
  if (g.rows > kIntMax || g.cols > kIntMax || g.n > kIntMax || g.ldx > kIntMax || g.ldy > kIntMax)
    return unsupported("gemm_lt: dimension beyond int");
  LtPlan* p = nullptr;
  MOEX_RETURN_IF_ERROR(ctx->plan_for(g, p));
  const float alpha = 1.f, beta = 0.f;
  return lt_status(cublasLtMatmul(ctx->handle, p->op, &alpha, g.w, p->a, g.x, p->b, &beta, g.y, p->c, g.y, p->c,
                                  &p->algo, ctx->workspace, ctx->workspace_bytes, stream),
                   "cublasLtMatmul");
}

}  // namespace cuda
MOEX_NAMESPACE_END
