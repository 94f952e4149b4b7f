// Reference-quality CPU kernels. Scalar for now: decode a row, dot it with every token.
#include "moex/cpu/expert_ffn.hpp"

#include <cmath>
#include <vector>

#include "moex/quant/quantize.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

void matmul_rows(const MatrixView& w, const float* x, std::size_t n, std::size_t ldx, float* y,
                 std::size_t ldy, std::size_t row_begin, std::size_t row_end) noexcept {
  const std::size_t cols = w.layout.cols;
  std::vector<float> row(cols);
  for (std::size_t r = row_begin; r < row_end; ++r) {
    dequantize_row(w, r, row.data());
    for (std::size_t t = 0; t < n; ++t) {
      const float* xt = x + t * ldx;
      float acc = 0.f;
      for (std::size_t c = 0; c < cols; ++c) acc += row[c] * xt[c];
      y[t * ldy + r] = acc;
    }
  }
}

Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y,
                  std::span<float> workspace, ThreadPool* pool) noexcept {
  const ExpertShape s = e.layout.shape;
  if (!e.valid() || x == nullptr || y == nullptr) return invalid_argument("expert_ffn: null pointer");
  if (n == 0) return Status::ok();
  if (workspace.size() < expert_ffn_workspace(s, n)) return invalid_argument("expert_ffn: workspace too small");
  float* g = workspace.data();       // [n x ffn] gate, then the activation
  float* u = g + std::size_t{s.ffn} * n;  // [n x ffn] up
  auto up = [&](std::size_t b, std::size_t end) {
    matmul_rows(e.w1(), x, n, s.hidden, g, s.ffn, b, end);
    matmul_rows(e.w3(), x, n, s.hidden, u, s.ffn, b, end);
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t r = b; r < end; ++r) {
        const float a = g[t * s.ffn + r];
        g[t * s.ffn + r] = a / (1.f + std::exp(-a)) * u[t * s.ffn + r];
      }
  };
  auto down = [&](std::size_t b, std::size_t end) { matmul_rows(e.w2(), g, n, s.ffn, y, s.hidden, b, end); };
  if (pool) {
    pool->parallel_for(s.ffn, 16, up);
    pool->parallel_for(s.hidden, 16, down);
  } else {
    up(0, s.ffn);
    down(0, s.hidden);
  }
  return Status::ok();
}

const char* cpu_kernel_isa() noexcept { return "scalar"; }

MOEX_NAMESPACE_END
