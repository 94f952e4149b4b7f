// matmul_rows dispatch (per-ISA kernels in kernels_*.cpp, block formats' in kernels_block_*.cpp,
// a portable one here), the SwiGLU expert FFN over a thread pool, and view validation.
#include "moex/cpu/expert_ffn.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/cpu/cpu_kernels.hpp"
#include "moex/quant/ggml.hpp"
#include "moex/thread_pool.hpp"

#include "block_kernels_isa.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

// Columns decoded per step by the portable kernel: a multiple of every group (128) and block
// (256) size; 4 KiB of stack.
constexpr std::size_t kScalarChunk = 1024;

// Portable kernel for any decodable view: decode a chunk of a row once, dot it with every token,
// accumulating the chunk partial sums into y.
void matmul_rows_decoded(const MatrixView& w, const detail::MatmulArgs& a) noexcept {
  float buf[kScalarChunk];
  const std::size_t cols = w.layout.cols;
  for (std::size_t r = a.row_begin; r < a.row_end; ++r) {
    for (std::size_t t = 0; t < a.n; ++t) a.y[t * a.ldy + r] = 0.f;
    for (std::size_t c0 = 0; c0 < cols; c0 += kScalarChunk) {
      const std::size_t len = std::min(kScalarChunk, cols - c0);
      detail::decode_row_range(w, r, c0, len, buf);
      for (std::size_t t = 0; t < a.n; ++t) {
        const float* xt = a.x + t * a.ldx + c0;
        float acc = 0.f;
        for (std::size_t c = 0; c < len; ++c) acc += buf[c] * xt[c];
        a.y[t * a.ldy + r] += acc;
      }
    }
  }
}

float silu(float v) noexcept { return v / (1.f + std::exp(-v)); }

// The activation of ExpertMath on one pair (gate, up), biases already added.
float activate(const ExpertMath& m, float g, float u) noexcept {
  if (m.activation == FfnActivation::kClampedSwiGlu) {
    g = std::min(g, m.limit);
    u = std::clamp(u, -m.limit, m.limit);
    return g / (1.f + std::exp(-m.alpha * g)) * (u + 1.f);
  }
  return silu(g) * u;
}

struct FfnJob {
  ExpertView e;
  const float* x;
  std::size_t n;
  float* gate;  // [n x ffn]: w1 x, then silu(w1 x) * (w3 x)
  float* up;    // [n x ffn]: w3 x
  float* y;

  void up_rows(std::size_t b, std::size_t end) const noexcept {
    const std::size_t hidden = e.layout.shape.hidden, ffn = e.layout.shape.ffn;
    matmul_rows(e.w1(), x, n, hidden, gate, ffn, b, end);
    matmul_rows(e.w3(), x, n, hidden, up, ffn, b, end);
    if (e.math == nullptr) {  // Mixtral's expert: the common path, unchanged
      for (std::size_t t = 0; t < n; ++t) {
        float* g = gate + t * ffn;
        const float* u = up + t * ffn;
        for (std::size_t r = b; r < end; ++r) g[r] = silu(g[r]) * u[r];
      }
      return;
    }
    const ExpertMath& m = *e.math;
    for (std::size_t t = 0; t < n; ++t) {
      float* g = gate + t * ffn;
      const float* u = up + t * ffn;
      for (std::size_t r = b; r < end; ++r)
        g[r] = activate(m, g[r] + (m.b1 ? m.b1[r] : 0.f), u[r] + (m.b3 ? m.b3[r] : 0.f));
    }
  }
  void down_rows(std::size_t b, std::size_t end) const noexcept {
    const std::size_t hidden = e.layout.shape.hidden, ffn = e.layout.shape.ffn;
    matmul_rows(e.w2(), gate, n, ffn, y, hidden, b, end);
    if (e.math != nullptr && e.math->b2 != nullptr)
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t r = b; r < end; ++r) y[t * hidden + r] += e.math->b2[r];
  }
};

// Rows per parallel_for chunk at least: a multiple of every kernel's row tile (4).
constexpr std::size_t kRowGrain = 16;

}  // namespace

namespace detail {

void matmul_rows_scalar(const MatmulArgs& a) noexcept {
  const MatrixView w{a.w, a.layout};
  matmul_rows_decoded(w, a);
}

}  // namespace detail

Status check_matrix_view(const MatrixView& m) noexcept {
  if (m.data == nullptr) return invalid_argument("matrix view: null data");
  const MatrixLayout& l = m.layout;
  if (l.rows == 0 || l.cols == 0) return invalid_argument("matrix view: zero rows or columns");
  if (l.rows > std::numeric_limits<std::size_t>::max() / 8 / l.cols)
    return invalid_argument("matrix view: size overflows");
  const Precision p = l.format.precision;
  if (is_block_format(p)) {
    if (p == Precision::kFp8E4M3) {
      // The decoder reads the block scales at scales_offset: the layout must be matrix_layout()'s.
      if (!format_is_valid(l.format, l.cols))
        return invalid_argument("matrix view: fp8 e4m3 needs a multiple of 32 columns");
      const MatrixLayout want = matrix_layout(l.rows, l.cols, l.format);
      if (want.codes_bytes != l.codes_bytes || want.scales_offset != l.scales_offset ||
          want.total_bytes != l.total_bytes)
        return unsupported(
            "matrix view: fp8 e4m3 is read only in the moex layout, its 128x128 block scales after "
            "the codes (quant/layout.hpp)");
      return Status::ok();
    }
    // GGUF blocks carry their own scales: rows, cols and the precision are all a decoder needs.
    const std::size_t bs = block_format_block_size(p);
    if (bs == 0 || l.cols % bs != 0)
      return invalid_argument("matrix view: " + std::string(to_string(p)) + " rows must be whole blocks");
    return Status::ok();
  }
  if (!format_is_valid(l.format, l.cols))
    return invalid_argument("matrix view: invalid format for " + std::to_string(l.cols) + " columns");
  const MatrixLayout want = matrix_layout(l.rows, l.cols, l.format);
  if (want.codes_bytes != l.codes_bytes || want.scales_offset != l.scales_offset || want.mins_offset != l.mins_offset ||
      want.total_bytes != l.total_bytes)
    return invalid_argument("matrix view: layout differs from matrix_layout(rows, cols, format)");
  return Status::ok();
}

void matmul_rows(const MatrixView& w, const float* x, std::size_t n, std::size_t ldx, float* y, std::size_t ldy,
                 std::size_t row_begin, std::size_t row_end) noexcept {
  if (w.data == nullptr || x == nullptr || y == nullptr || n == 0) return;
  row_end = std::min(row_end, w.layout.rows);
  if (row_begin >= row_end) return;
  if (!check_matrix_view(w).is_ok()) return;
  const detail::MatmulArgs a{w.data, w.layout, x, n, ldx, y, ldy, row_begin, row_end};
  if (is_block_format(w.layout.format.precision)) {
    // f32 activations at every level (block_kernel.hpp); the decode path for the rest.
    const CpuIsa isa = active_cpu_isa();
    if (isa >= CpuIsa::kAvx512 && detail::matmul_rows_block_avx512(a)) return;
    if (isa == CpuIsa::kAvx2 && detail::matmul_rows_block_avx2(a)) return;
    matmul_rows_decoded(w, a);
    return;
  }
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512Bf16:
      detail::matmul_rows_avx512bf16(a);
      return;
    case CpuIsa::kAvx512:
      detail::matmul_rows_avx512(a);
      return;
    case CpuIsa::kAvx2:
      detail::matmul_rows_avx2(a);
      return;
    case CpuIsa::kScalar:
      break;
  }
  detail::matmul_rows_scalar(a);
}

Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y, std::span<float> workspace,
                  ThreadPool* pool) noexcept {
  const ExpertShape s = e.layout.shape;
  if (!e.valid() || x == nullptr || y == nullptr) return invalid_argument("expert_ffn: null pointer");
  if (s.hidden == 0 || s.ffn == 0) return invalid_argument("expert_ffn: empty expert shape");
  const MatrixView views[3] = {e.w1(), e.w3(), e.w2()};
  const std::size_t want_rows[3] = {s.ffn, s.ffn, s.hidden};
  const std::size_t want_cols[3] = {s.hidden, s.hidden, s.ffn};
  for (int i = 0; i < 3; ++i) {
    MOEX_RETURN_IF_ERROR(check_matrix_view(views[i]));
    if (views[i].layout.rows != want_rows[i] || views[i].layout.cols != want_cols[i])
      return invalid_argument("expert_ffn: a matrix does not match the expert shape");
  }
  if (n == 0) return Status::ok();
  if (n > std::numeric_limits<std::size_t>::max() / 2 / s.ffn)
    return invalid_argument("expert_ffn: token count overflows");
  if (workspace.data() == nullptr || workspace.size() < expert_ffn_workspace(s, n))
    return invalid_argument("expert_ffn: workspace too small");
  const FfnJob job{e, x, n, workspace.data(), workspace.data() + std::size_t{s.ffn} * n, y};
  const FfnJob* jp = &job;  // one pointer: fits std::function's local buffer, no allocation
  if (pool != nullptr && pool->size() > 1) {
    pool->parallel_for(s.ffn, kRowGrain, [jp](std::size_t b, std::size_t end) { jp->up_rows(b, end); });
    pool->parallel_for(s.hidden, kRowGrain, [jp](std::size_t b, std::size_t end) { jp->down_rows(b, end); });
  } else {
    job.up_rows(0, s.ffn);
    job.down_rows(0, s.hidden);
  }
  return Status::ok();
}

const char* cpu_kernel_isa() noexcept { return to_string(active_cpu_isa()).data(); }

MOEX_NAMESPACE_END
