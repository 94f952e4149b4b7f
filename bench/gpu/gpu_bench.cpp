// GPU microbenchmarks: weight-streaming bandwidth of every GEMV format (moex's own and the
// checkpoints' block formats Q8_0/Q4_0/Q4_K/fp8) at batch 1 against a
// device-to-device copy ceiling measured in the same run, bf16 against cuBLAS, slot uploads against
// the pinned host-to-device ceiling, and an upload with kernels running at once.
// Timing: cudaEvents around each iteration, warm-up first, median over iterations; counters GBps
// and ratio (to the ceiling). Inputs are random (never zeros).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include "moex/backend/cuda_backend.hpp"
#include "moex/backend/cuda_execution_backend.hpp"
#include "moex/quant/layout.hpp"

#include "kernels.hpp"
#include "launchers.hpp"

namespace {

namespace mc = moex::cuda;
using moex::Precision;

constexpr std::size_t kStreamBytes = 256ull << 20;  // >> 50 MB of L2: every pass streams from HBM
constexpr std::size_t kCols = 4096;

double g_d2d_gbps = 0;  // device-to-device copy ceiling, (read + write) bytes / s
double g_h2d_gbps = 0;  // pinned host-to-device ceiling

bool ok(cudaError_t e) {
  if (e != cudaSuccess) std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Median milliseconds of fn() over reps runs on `s`, after 3 warm-up runs.
template <class F>
double time_ms(cudaStream_t s, int reps, F&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, s);
    fn();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return median(t);
}

/// Random bytes with valid scales / floats for a matrix of `l` (no NaN, no zeros).
std::vector<std::byte> random_matrix(const moex::MatrixLayout& l, std::uint64_t seed) {
  std::vector<std::byte> m(l.total_bytes);
  std::mt19937_64 rng(seed);
  auto* w = reinterpret_cast<std::uint64_t*>(m.data());
  for (std::size_t i = 0; i < m.size() / 8; ++i) w[i] = rng();
  auto fix16 = [&](std::size_t off, std::size_t count, std::uint16_t keep, std::uint16_t set) {
    auto* h = reinterpret_cast<std::uint16_t*>(m.data() + off);
    for (std::size_t i = 0; i < count; ++i) h[i] = static_cast<std::uint16_t>((h[i] & keep) | set);
  };
  const std::size_t n = l.rows * l.cols;
  if (l.format.precision == Precision::kBF16)
    fix16(0, n, 0x807F, 0x3F00);  // |x| in [0.5, 1)
  else if (l.format.precision == Precision::kF16)
    fix16(0, n, 0x83FF, 0x3800);  // |x| in [0.5, 1)
  else {
    const std::size_t groups = l.rows * l.groups_per_row();
    fix16(l.scales_offset, groups, 0x03FF, 0x2000);  // small positive
    if (l.mins_offset) fix16(l.mins_offset, groups, 0x83FF, 0x2000);
  }
  return m;
}

struct FormatCase {
  const char* name;
  moex::WeightFormat f;
};
const FormatCase kFormats[] = {
    {"bf16", moex::float_format(Precision::kBF16)},
    {"f16", moex::float_format(Precision::kF16)},
    {"int8_g64", moex::quant_format(Precision::kInt8, 64)},
    {"int8_g128_asym", moex::quant_format(Precision::kInt8, 128, moex::QuantScheme::kAsymmetric)},
    {"int4_g32", moex::quant_format(Precision::kInt4, 32)},
    {"int4_g64", moex::quant_format(Precision::kInt4, 64)},
    {"int4_g128_asym", moex::quant_format(Precision::kInt4, 128, moex::QuantScheme::kAsymmetric)},
    {"int2_g32", moex::quant_format(Precision::kInt2, 32)},
    {"int2_g64_asym", moex::quant_format(Precision::kInt2, 64, moex::QuantScheme::kAsymmetric)},
    {"int2_g128", moex::quant_format(Precision::kInt2, 128)},
    {"int2_g64", moex::quant_format(Precision::kInt2, 64)},
};

/// A ~256 MB matrix of format f on the device, with x and y for 8 tokens.
struct GemvSetup {
  moex::MatrixLayout l;
  void* w = nullptr;
  float* x = nullptr;
  float* y = nullptr;
  explicit GemvSetup(moex::WeightFormat f) {
    const std::size_t row_bytes = moex::matrix_layout(1, kCols, f).total_bytes;
    l = moex::matrix_layout(kStreamBytes / row_bytes, kCols, f);
    const auto host = random_matrix(l, 42);
    ok(cudaMalloc(&w, l.total_bytes));
    ok(cudaMemcpy(w, host.data(), l.total_bytes, cudaMemcpyHostToDevice));
    std::vector<float> hx(8 * kCols);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    for (float& v : hx) v = nd(rng);
    ok(cudaMalloc(&x, hx.size() * sizeof(float)));
    ok(cudaMemcpy(x, hx.data(), hx.size() * sizeof(float), cudaMemcpyHostToDevice));
    ok(cudaMalloc(&y, 8 * l.rows * sizeof(float)));
  }
  ~GemvSetup() {
    cudaFree(w);
    cudaFree(x);
    cudaFree(y);
  }
  mc::GemvArgs args(std::uint32_t n) const {
    mc::GemvArgs a;
    a.w = static_cast<const std::byte*>(w);
    a.layout = l;
    a.x = x;
    a.ldx = kCols;
    a.y = y;
    a.ldy = l.rows;
    a.n = n;
    return a;
  }
};

void report(benchmark::State& state, const std::vector<double>& ms, double bytes, double ceiling) {
  const double med = median(ms);
  state.counters["GBps"] = bytes / (med * 1e-3) / 1e9;
  state.counters["ratio"] = bytes / (med * 1e-3) / 1e9 / ceiling;
  state.counters["us"] = med * 1e3;
}

/// Runs fn once per iteration between events on s; reports the median.
template <class F>
void timed_loop(benchmark::State& state, cudaStream_t s, double bytes, double ceiling, F&& fn) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) fn();  // warm-up
  cudaStreamSynchronize(s);
  std::vector<double> ms;
  for (auto _ : state) {
    cudaEventRecord(a, s);
    fn();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
    state.SetIterationTime(t * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  report(state, ms, bytes, ceiling);
}

void BM_gemv(benchmark::State& state) {
  const FormatCase& fc = kFormats[state.range(0)];
  const auto n = static_cast<std::uint32_t>(state.range(1));
  const bool exact = state.range(2) != 0;
  // Only int4/int2 have the q8 path (int8 always runs its f32 kernel).
  const bool quant = fc.f.precision == Precision::kInt4 || fc.f.precision == Precision::kInt2;
  state.SetLabel(std::string(fc.name) + (quant ? (exact ? " exact-f32" : " q8-dp4a") : ""));
  GemvSetup g(fc.f);
  mc::GemvArgs a = g.args(n);
  a.exact = exact;
  bool good = true;
  timed_loop(state, nullptr, static_cast<double>(g.l.total_bytes), g_d2d_gbps,
             [&] { good = good && mc::gemv(a, nullptr).is_ok(); });
  if (!good) state.SkipWithError("gemv failed");
}

/// The block formats of checkpoints (kernels/gemv_block.cuh): GGUF Q8_0 / Q4_0 / Q4_K in their byte
/// layout, fp8 e4m3 with one f32 scale per 128x128 block (the scales' bytes count as streamed).
struct BlockCase {
  const char* name;
  Precision p;
  std::size_t block_weights, block_bytes;
};
const BlockCase kBlockFormats[] = {
    {"q8_0", Precision::kQ8_0, 32, 34},
    {"q4_0", Precision::kQ4_0, 32, 18},
    {"q4_k", Precision::kQ4_K, 256, 144},
    {"fp8_e4m3_b128", Precision::kFp8E4M3, 32, 32},
};
constexpr std::uint32_t kFp8Block = 128;

/// Random bytes of a block-format matrix of `rows` x `cols` (small positive f16 scales; fp8
/// without NaN codes), and fp8's f32 block scales (empty for the GGUF formats).
struct BlockBytes {
  std::vector<std::byte> codes;
  std::vector<float> scales;
};
BlockBytes random_block_bytes(const BlockCase& bc, std::size_t rows, std::size_t cols, std::uint64_t seed) {
  BlockBytes b;
  b.codes.resize(rows * (cols / bc.block_weights * bc.block_bytes));
  std::mt19937_64 rng(seed);
  auto* words = reinterpret_cast<std::uint64_t*>(b.codes.data());
  for (std::size_t i = 0; i < b.codes.size() / 8; ++i) words[i] = rng();
  auto set_f16 = [&](std::size_t at) {  // small positive: (h & 0x03FF) | 0x2000 (high byte at + 1)
    b.codes[at + 1] = static_cast<std::byte>((std::to_integer<unsigned>(b.codes[at + 1]) & 0x03u) | 0x20u);
  };
  if (bc.p == Precision::kFp8E4M3) {
    for (auto& c : b.codes)
      if ((std::to_integer<unsigned>(c) & 0x7fu) == 0x7fu) c = std::byte{0x38};  // no NaN codes
    const std::size_t sr = (rows + kFp8Block - 1) / kFp8Block, sc = (cols + kFp8Block - 1) / kFp8Block;
    b.scales.resize(sr * sc);
    std::uniform_real_distribution<float> ud(0.5f, 1.f);
    for (float& v : b.scales) v = ud(rng);
  } else {
    for (std::size_t at = 0; at < b.codes.size(); at += bc.block_bytes) {
      set_f16(at);
      if (bc.p == Precision::kQ4_K) set_f16(at + 2);
    }
  }
  return b;
}

/// A ~256 MB block-format matrix on the device, its fp8 scales, and x and y for 8 tokens.
struct BlockSetup {
  moex::MatrixLayout l;
  void* w = nullptr;
  float* scales = nullptr;
  std::size_t scale_bytes = 0;
  float* x = nullptr;
  float* y = nullptr;
  explicit BlockSetup(const BlockCase& bc) {
    const std::size_t row_bytes = kCols / bc.block_weights * bc.block_bytes;
    l.rows = kStreamBytes / row_bytes;
    l.cols = kCols;
    l.format.precision = bc.p;
    l.codes_bytes = l.total_bytes = l.rows * row_bytes;
    const BlockBytes b = random_block_bytes(bc, l.rows, kCols, 42);
    if (!b.scales.empty()) {
      scale_bytes = b.scales.size() * sizeof(float);
      ok(cudaMalloc(&scales, scale_bytes));
      ok(cudaMemcpy(scales, b.scales.data(), scale_bytes, cudaMemcpyHostToDevice));
    }
    ok(cudaMalloc(&w, l.total_bytes));
    ok(cudaMemcpy(w, b.codes.data(), l.total_bytes, cudaMemcpyHostToDevice));
    std::vector<float> hx(8 * kCols);
    std::mt19937 xr(7);
    std::normal_distribution<float> nd;
    for (float& v : hx) v = nd(xr);
    ok(cudaMalloc(&x, hx.size() * sizeof(float)));
    ok(cudaMemcpy(x, hx.data(), hx.size() * sizeof(float), cudaMemcpyHostToDevice));
    ok(cudaMalloc(&y, 8 * l.rows * sizeof(float)));
  }
  ~BlockSetup() {
    cudaFree(w);
    cudaFree(scales);
    cudaFree(x);
    cudaFree(y);
  }
  BlockSetup(const BlockSetup&) = delete;
  BlockSetup& operator=(const BlockSetup&) = delete;
};

/// Batch-n GEMV of one block format (the bytes counted: weights, plus fp8's block scales); arg 2:
/// 1 = the q8 path (GGUF formats: x quantized in a separate launch, timed with the GEMV), 0 = f32.
void BM_gemv_block(benchmark::State& state) {
  const BlockCase& bc = kBlockFormats[state.range(0)];
  const auto n = static_cast<std::uint32_t>(state.range(1));
  const bool q8 = state.range(2) != 0;
  const int variant = static_cast<int>(state.range(3));  // 1: no dependent launch
  state.SetLabel(std::string(bc.name) + (q8 ? " q8-dp4a" : " exact-f32") + (variant ? " no-pdl" : ""));
  BlockSetup g(bc);
  void* ws = nullptr;
  if (q8) ok(cudaMalloc(&ws, mc::gemv_workspace_bytes(kCols, n)));
  mc::GemvArgs a;
  a.w = static_cast<const std::byte*>(g.w);
  a.layout = g.l;
  a.x = g.x;
  a.ldx = kCols;
  a.y = g.y;
  a.ldy = g.l.rows;
  a.n = n;
  a.block_scales = g.scales;
  a.scale_block = kFp8Block;
  a.workspace = ws;
  bool good = true;
  timed_loop(state, nullptr, static_cast<double>(g.l.total_bytes + g.scale_bytes), g_d2d_gbps, [&] {
    good = good && (variant ? mc::gemv_block_variant(a, variant, nullptr) : mc::gemv(a, nullptr)).is_ok();
  });
  cudaFree(ws);
  if (!good) state.SkipWithError("block gemv failed");
}

/// One named variant of the q8 kernel at batch 1 (launch_gemv_q8_variant), int4/int2 formats.
void BM_gemv_variant(benchmark::State& state) {
  const FormatCase& fc = kFormats[state.range(0)];
  const int variant = static_cast<int>(state.range(1));
  state.SetLabel(std::string(fc.name) + " v" + std::to_string(variant));
  GemvSetup g(fc.f);
  const mc::GemvArgs a = g.args(1);
  bool good = true;
  timed_loop(state, nullptr, static_cast<double>(g.l.total_bytes), g_d2d_gbps,
             [&] { good = good && mc::gemv_q8_variant(a, variant, nullptr).is_ok(); });
  if (!good) state.SkipWithError("gemv variant failed");
}

void BM_cublas_bf16(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  GemvSetup g(moex::float_format(Precision::kBF16));
  std::uint16_t* xb = nullptr;
  ok(cudaMalloc(&xb, 8 * kCols * 2));
  if (!mc::convert_f32_to_bf16(g.x, xb, 8 * kCols, nullptr).is_ok()) state.SkipWithError("convert");
  cublasContext* h = nullptr;
  if (!mc::cublas_create(&h).is_ok()) state.SkipWithError("cublas");
  mc::GemmBf16Args a{static_cast<const std::uint16_t*>(g.w), g.l.rows, kCols, xb, kCols, g.y, g.l.rows, n};
  bool good = true;
  timed_loop(state, nullptr, static_cast<double>(g.l.total_bytes), g_d2d_gbps,
             [&] { good = good && mc::gemm_bf16(h, a, nullptr).is_ok(); });
  if (!good) state.SkipWithError("gemm failed");
  mc::cublas_destroy(h);
  cudaFree(xb);
}

/// cuBLAS (cublasGemmEx, bf16 only) against cuBLASLt (bf16 / f16) at Mixtral shapes: w1/w3
/// (14336 x 4096) and w2 (4096 x 14336), n tokens; bytes = the weight matrix (weights dominate).
/// range(0): 0 cuBLAS bf16, 1 cuBLASLt bf16, 2 cuBLASLt f16; range(1): n; range(2): 0 up, 1 down.
void BM_gemm_mixtral(benchmark::State& state) {
  const int lib = static_cast<int>(state.range(0));
  const auto n = static_cast<std::size_t>(state.range(1));
  const bool down = state.range(2) != 0;
  const std::size_t rows = down ? 4096 : 14336, cols = down ? 14336 : 4096;
  state.SetLabel(std::string(lib == 0   ? "cublas bf16"
                             : lib == 1 ? "cublasLt bf16"
                                        : "cublasLt f16") +
                 (down ? " w2 4096x14336" : " w1 14336x4096"));
  const std::size_t wbytes = rows * cols * 2;
  void *w = nullptr, *x = nullptr;
  float* y = nullptr;
  ok(cudaMalloc(&w, wbytes));
  ok(cudaMalloc(&x, 16 * cols * 2));
  ok(cudaMalloc(&y, 16 * rows * sizeof(float)));
  ok(cudaMemset(w, 0x3c, wbytes));  // 0x3c3c: ~0.0115 in bf16 and ~1.06 in f16 (finite, not zero)
  ok(cudaMemset(x, 0x3c, 16 * cols * 2));
  cublasContext* h = nullptr;
  mc::LtContext* lt = nullptr;
  if (!mc::cublas_create(&h).is_ok() || !mc::lt_create(&lt, 32ull << 20).is_ok()) state.SkipWithError("handles");
  const auto* w16 = static_cast<const std::uint16_t*>(w);
  const auto* x16 = static_cast<const std::uint16_t*>(x);
  mc::GemmBf16Args a{w16, rows, cols, x16, cols, y, rows, n};
  mc::GemmLtArgs b;
  b.type = lib == 2 ? Precision::kF16 : Precision::kBF16;
  b.w = w;
  b.rows = rows;
  b.cols = cols;
  b.x = x;
  b.ldx = cols;
  b.y = y;
  b.ldy = rows;
  b.n = n;
  bool good = true;
  timed_loop(state, nullptr, static_cast<double>(wbytes), g_d2d_gbps,
             [&] { good = good && (lib == 0 ? mc::gemm_bf16(h, a, nullptr) : mc::gemm_lt(lt, b, nullptr)).is_ok(); });
  if (!good) state.SkipWithError("gemm failed");
  mc::cublas_destroy(h);
  mc::lt_destroy(lt);
  cudaFree(w);
  cudaFree(x);
  cudaFree(y);
}

/// Launch overhead of one MoE layer step on CudaExecutionBackend, all experts resident: 2 experts
/// (top-2), 1 token each, expert_ffn x 2 + sync(), cycling 4 layers of different slot pairs;
/// wall time per step with and without CUDA graphs. range(0): 0 Qwen3-30B-A3B expert (2048 x 768),
/// 1 Mixtral expert (4096 x 14336); range(1): graphs off / on. int4 g64.
void BM_executor_step(benchmark::State& state) {
  const bool mixtral = state.range(0) != 0;
  const bool graphs = state.range(1) != 0;
  const moex::ExpertShape shape = mixtral ? moex::ExpertShape{4096, 14336} : moex::ExpertShape{2048, 768};
  state.SetLabel(std::string(mixtral ? "mixtral 4096x14336" : "qwen3-30b 2048x768") + " int4_g64" +
                 (graphs ? " graphs" : " eager"));
  const moex::WeightFormat f = moex::quant_format(Precision::kInt4, 64);
  const moex::ExpertLayout l = moex::expert_layout(shape, f);
  moex::CudaExecutionBackendConfig bc;
  bc.max_shape = shape;
  bc.max_tokens = 8;
  bc.max_rows_per_step = 64;
  bc.use_cuda_graphs = graphs;
  bc.pcie_bytes_per_s = 50'000'000'000ull;
  auto be = moex::CudaExecutionBackend::create(bc);
  if (!be.is_ok()) {
    state.SkipWithError(be.status().to_string().c_str());
    return;
  }
  constexpr std::size_t kSlots = 8;
  if (!be->allocate_slots(Precision::kInt4, l.total_bytes, kSlots).is_ok()) state.SkipWithError("slots");
  std::vector<std::byte> blob(l.total_bytes);
  {
    const moex::MatrixLayout* ms[3] = {&l.w1, &l.w3, &l.w2};
    const std::size_t offs[3] = {l.w1_offset, l.w3_offset, l.w2_offset};
    for (int k = 0; k < 3; ++k) {
      const auto m = random_matrix(*ms[k], 500 + k);
      std::memcpy(blob.data() + offs[k], m.data(), m.size());
    }
  }
  for (std::size_t s = 0; s < kSlots; ++s) {
    moex::LoadTicket t = 0;
    if (!be->start_load(Precision::kInt4, s, moex::ExpertView::contiguous(blob.data(), l), t).is_ok() ||
        !be->wait_load(t).is_ok())
      state.SkipWithError("load");
  }
  std::vector<float> x(shape.hidden, 0.25f), y0(shape.hidden), y1(shape.hidden);
  std::size_t layer = 0;
  bool good = true;
  auto step = [&] {
    const std::size_t a = (2 * layer) % kSlots, b = (2 * layer + 1) % kSlots;
    layer = (layer + 1) % 4;
    good = good && be->expert_ffn(be->slot_view(Precision::kInt4, a, l), x.data(), 1, y0.data()).is_ok();
    good = good && be->expert_ffn(be->slot_view(Precision::kInt4, b, l), x.data(), 1, y1.data()).is_ok();
    good = good && be->sync().is_ok();
  };
  for (int i = 0; i < 8; ++i) step();  // warm-up (captures)
  std::vector<double> us;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    const double dt = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    us.push_back(dt);
    state.SetIterationTime(dt * 1e-6);
  }
  if (!good) state.SkipWithError("step failed");
  state.counters["us_per_step"] = median(us);
  state.counters["graph_launches"] = static_cast<double>(be->counters().graph_launches);
  state.counters["gemm_GBps"] = 2.0 * static_cast<double>(l.total_bytes) / (median(us) * 1e-6) / 1e9;
}

/// Times grouped_expert_ffn over `experts` experts of layout l, back to back from w on the device,
/// one token each (the bytes counted: every expert's blob).
void time_grouped(benchmark::State& state, const moex::ExpertLayout& l, void* w, std::uint32_t experts, bool exact,
                  int variant = -1) {
  const moex::ExpertShape shape = l.shape;
  float *x = nullptr, *out = nullptr, *ws = nullptr;
  ok(cudaMalloc(&x, 8 * shape.hidden * sizeof(float)));
  ok(cudaMemset(x, 0x3c, 8 * shape.hidden * sizeof(float)));  // 0x3c3c3c3c = 0.0115f, not zero
  ok(cudaMalloc(&out, 8 * shape.hidden * sizeof(float)));
  ok(cudaMalloc(&ws, mc::grouped_expert_workspace_bytes(shape, experts)));
  std::vector<mc::ExpertTask> tasks(experts);
  for (std::uint32_t e = 0; e < experts; ++e) {
    const auto v = moex::ExpertView::contiguous(static_cast<std::byte*>(w) + e * l.total_bytes, l);
    tasks[e].w1 = v.w1_data;
    tasks[e].w3 = v.w3_data;
    tasks[e].w2 = v.w2_data;
    tasks[e].n = 1;
    tasks[e].token[0] = e % 8;
    tasks[e].weight[0] = 0.125f;
  }
  mc::GroupedExpertArgs a;
  a.layout = l;
  a.tasks = tasks.data();
  a.count = experts;
  a.x = x;
  a.ldx = shape.hidden;
  a.out = out;
  a.ldo = shape.hidden;
  a.workspace = ws;
  a.exact = exact;
  bool good = true;
  // variant >= 0: the q8 path's named variant (grouped_expert_q8_variant, int4/int2, batch 1).
  timed_loop(state, nullptr, static_cast<double>(experts * l.total_bytes), g_d2d_gbps, [&] {
    good =
        good &&
        (variant < 0 ? mc::grouped_expert_ffn(a, nullptr) : mc::grouped_expert_q8_variant(a, variant, nullptr)).is_ok();
  });
  if (!good) state.SkipWithError("grouped expert failed");
  cudaFree(x);
  cudaFree(out);
  cudaFree(ws);
}

constexpr moex::ExpertShape kMixtral{4096, 14336};
constexpr std::uint32_t kGroupExperts = 8;

/// Calls fn(matrix layout, byte offset from the start of the experts, seed) for w1, w3 and w2 of
/// each of kGroupExperts experts of layout l laid out back to back (seeds 0, 1, 2, ...).
template <class F>
void for_each_matrix(const moex::ExpertLayout& l, F&& fn) {
  for (std::uint32_t e = 0; e < kGroupExperts; ++e) {
    const moex::MatrixLayout* ms[3] = {&l.w1, &l.w3, &l.w2};
    const std::size_t offs[3] = {l.w1_offset, l.w3_offset, l.w2_offset};
    for (int k = 0; k < 3; ++k) fn(*ms[k], e * l.total_bytes + offs[k], std::uint64_t{e} * 3 + k);
  }
}

/// All of a step's experts in one grouped launch: 8 Mixtral-shaped experts, one token each. Arg 1:
/// 1 = exact f32 activations, 0 = the q8 path; arg 2 (grouped_q8_variant rows, else -1): the q8
/// path's variant (launch_grouped_expert_q8_variant).
void BM_grouped_experts(benchmark::State& state) {
  const FormatCase& fc = kFormats[state.range(0)];
  const bool exact = state.range(1) != 0;
  const int variant = state.range(2) >= 0 ? static_cast<int>(state.range(2)) : -1;
  const bool quant = fc.f.precision == Precision::kInt4 || fc.f.precision == Precision::kInt2;
  state.SetLabel(std::string(fc.name) + (quant ? (exact ? " exact-f32" : " q8-dp4a") : "") +
                 (variant >= 0 ? " v" + std::to_string(variant) : ""));
  const moex::ExpertLayout l = moex::expert_layout(kMixtral, fc.f);
  void* w = nullptr;
  ok(cudaMalloc(&w, kGroupExperts * l.total_bytes));
  // Each matrix's scales must be valid: build per-matrix random data.
  for_each_matrix(l, [&](const moex::MatrixLayout& m, std::size_t at, std::uint64_t seed) {
    const auto bytes = random_matrix(m, 100 + seed);
    ok(cudaMemcpy(static_cast<std::byte*>(w) + at, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  });
  time_grouped(state, l, w, kGroupExperts, exact, variant);
  cudaFree(w);
}

/// The same for the block formats of checkpoints (fp8 with each matrix's scale section); arg 1:
/// 1 = exact f32 activations, 0 = the q8 path (GGUF formats).
void BM_grouped_block_experts(benchmark::State& state) {
  const BlockCase& bc = kBlockFormats[state.range(0)];
  const bool exact = state.range(1) != 0;
  state.SetLabel(std::string(bc.name) + (bc.p == Precision::kFp8E4M3 ? "" : exact ? " exact-f32" : " q8-dp4a"));
  moex::WeightFormat f = moex::float_format(Precision::kBF16);
  f.precision = bc.p;
  const moex::ExpertLayout l = moex::expert_layout(kMixtral, f);
  void* w = nullptr;
  ok(cudaMalloc(&w, kGroupExperts * l.total_bytes));
  for_each_matrix(l, [&](const moex::MatrixLayout& m, std::size_t at, std::uint64_t seed) {
    const BlockBytes b = random_block_bytes(bc, m.rows, m.cols, 200 + seed);
    std::byte* dst = static_cast<std::byte*>(w) + at;
    ok(cudaMemcpy(dst, b.codes.data(), b.codes.size(), cudaMemcpyHostToDevice));
    if (!b.scales.empty())
      ok(cudaMemcpy(dst + m.scales_offset, b.scales.data(), b.scales.size() * sizeof(float), cudaMemcpyHostToDevice));
  });
  time_grouped(state, l, w, kGroupExperts, exact);
  cudaFree(w);
}

/// A slot upload from registered (pinned) host memory, or pageable memory through the staging
/// buffer (range(0) == 1).
void BM_slot_upload(benchmark::State& state) {
  const bool pageable = state.range(0) == 1;
  state.SetLabel(pageable ? "pageable-staged" : "registered");
  const std::size_t bytes = kStreamBytes;
  moex::CudaBackendConfig cfg;
  cfg.slot_bytes = bytes;
  cfg.slot_count = 2;
  cfg.max_shape = {4096, 14336};
  auto be = moex::CudaBackend::create(cfg);
  if (!be.is_ok()) {
    state.SkipWithError(be.status().to_string().c_str());
    return;
  }
  std::vector<std::byte> host(bytes);
  std::mt19937_64 rng(1);
  for (std::size_t i = 0; i < bytes / 8; ++i) {
    const std::uint64_t r = rng();
    std::memcpy(host.data() + 8 * i, &r, 8);
  }
  if (!pageable && !(*be)->register_host(host.data(), bytes).is_ok()) state.SkipWithError("register");
  auto copy = static_cast<cudaStream_t>((*be)->copy_stream());
  std::uint32_t slot = 0;
  bool good = true;
  timed_loop(state, copy, static_cast<double>(bytes), g_h2d_gbps, [&] {
    good = good && (*be)->upload_slot(slot, host.data(), bytes).is_ok();
    slot ^= 1;
  });
  if (!good) state.SkipWithError("upload failed");
  if (!pageable) (void)(*be)->unregister_host(host.data());
}

/// An upload (copy stream) while GEMV kernels stream weights (compute stream): each one's
/// bandwidth during the overlap, against its own ceiling.
void BM_upload_with_gemv(benchmark::State& state) {
  const FormatCase& fc = kFormats[state.range(0)];
  state.SetLabel(fc.name);
  const std::size_t bytes = kStreamBytes;
  moex::CudaBackendConfig cfg;
  cfg.slot_bytes = bytes;
  cfg.slot_count = 1;
  cfg.max_shape = {4096, 14336};
  auto be = moex::CudaBackend::create(cfg);
  if (!be.is_ok()) {
    state.SkipWithError(be.status().to_string().c_str());
    return;
  }
  std::vector<std::byte> host(bytes, std::byte{0x5a});
  if (!(*be)->register_host(host.data(), bytes).is_ok()) state.SkipWithError("register");
  GemvSetup g(fc.f);
  const mc::GemvArgs a = g.args(1);
  auto copy = static_cast<cudaStream_t>((*be)->copy_stream());
  auto comp = static_cast<cudaStream_t>((*be)->compute_stream());
  // Enough launches to cover the upload: upload time / kernel time at the ceilings.
  const int launches = std::max(
      1, static_cast<int>(g_d2d_gbps / g_h2d_gbps * static_cast<double>(bytes) / static_cast<double>(g.l.total_bytes)));
  cudaEvent_t c0, c1, k0, k1;
  cudaEventCreate(&c0);
  cudaEventCreate(&c1);
  cudaEventCreate(&k0);
  cudaEventCreate(&k1);
  std::vector<double> copy_ms, kern_ms;
  bool good = true;
  for (auto _ : state) {
    cudaEventRecord(c0, copy);
    cudaEventRecord(k0, comp);
    good = good && (*be)->upload_slot(0, host.data(), bytes).is_ok();
    cudaEventRecord(c1, copy);
    for (int i = 0; i < launches; ++i) good = good && mc::gemv(a, comp).is_ok();
    cudaEventRecord(k1, comp);
    cudaEventSynchronize(c1);
    cudaEventSynchronize(k1);
    float tc = 0, tk = 0;
    cudaEventElapsedTime(&tc, c0, c1);
    cudaEventElapsedTime(&tk, k0, k1);
    copy_ms.push_back(tc);
    kern_ms.push_back(tk);
    state.SetIterationTime(std::max(tc, tk) * 1e-3);
  }
  if (!good) state.SkipWithError("overlap run failed");
  const double mc_ = median(copy_ms), mk = median(kern_ms);
  state.counters["copy_GBps"] = static_cast<double>(bytes) / (mc_ * 1e-3) / 1e9;
  state.counters["copy_ratio"] = static_cast<double>(bytes) / (mc_ * 1e-3) / 1e9 / g_h2d_gbps;
  state.counters["gemv_GBps"] = launches * static_cast<double>(g.l.total_bytes) / (mk * 1e-3) / 1e9;
  state.counters["gemv_ratio"] = launches * static_cast<double>(g.l.total_bytes) / (mk * 1e-3) / 1e9 / g_d2d_gbps;
  cudaEventDestroy(c0);
  cudaEventDestroy(c1);
  cudaEventDestroy(k0);
  cudaEventDestroy(k1);
  (void)(*be)->unregister_host(host.data());
}

void measure_ceilings() {
  void *a = nullptr, *b = nullptr, *h = nullptr;
  ok(cudaMalloc(&a, kStreamBytes));
  ok(cudaMalloc(&b, kStreamBytes));
  ok(cudaMemset(a, 0x5a, kStreamBytes));
  const double d2d = time_ms(nullptr, 20, [&] { cudaMemcpyAsync(b, a, kStreamBytes, cudaMemcpyDeviceToDevice); });
  g_d2d_gbps = 2.0 * kStreamBytes / (d2d * 1e-3) / 1e9;
  ok(cudaHostAlloc(&h, kStreamBytes, cudaHostAllocDefault));
  std::memset(h, 0x5a, kStreamBytes);
  const double h2d = time_ms(nullptr, 10, [&] { cudaMemcpyAsync(a, h, kStreamBytes, cudaMemcpyHostToDevice); });
  g_h2d_gbps = kStreamBytes / (h2d * 1e-3) / 1e9;
  cudaFreeHost(h);
  cudaFree(a);
  cudaFree(b);
  cudaDeviceProp p{};
  cudaGetDeviceProperties(&p, 0);
  std::printf("device: %s, %d SMs, L2 %d MB\n", p.name, p.multiProcessorCount, p.l2CacheSize >> 20);
  std::printf("ceiling d2d_copy_GBps=%.1f (read+write, %zu MB, median of 20)\n", g_d2d_gbps, kStreamBytes >> 20);
  std::printf("ceiling h2d_pinned_GBps=%.1f (%zu MB, median of 10)\n", g_h2d_gbps, kStreamBytes >> 20);
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: GPU benchmarks skipped\n");
    return 0;
  }
  measure_ceilings();
  const int nf = static_cast<int>(std::size(kFormats));
  // Every format at batch 1 on its default path (q8 for integers), then the integers' exact path,
  // then the default path repeated (run-to-run spread of the same kernel).
  for (int f = 0; f < nf; ++f)
    benchmark::RegisterBenchmark("gemv/batch1", BM_gemv)
        ->Args({f, 1, 0})
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  // The block formats of checkpoints at batch 1 (their only path).
  for (int f = 0; f < static_cast<int>(std::size(kBlockFormats)); ++f)
    for (int q8 : {1, 0}) {
      if (q8 && kBlockFormats[f].p == Precision::kFp8E4M3) continue;
      benchmark::RegisterBenchmark("gemv/batch1", BM_gemv_block)
          ->Args({f, 1, q8, 0})
          ->UseManualTime()
          ->Iterations(50)
          ->Unit(benchmark::kMicrosecond);
    }
  for (int f = 2; f < nf; ++f)
    benchmark::RegisterBenchmark("gemv/batch1", BM_gemv)
        ->Args({f, 1, 1})
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  // The q8 block GEMV launched after its quantize kernel has finished (no programmatic dependent
  // launch): what the dependent launch gains.
  for (int f = 0; f < 3; ++f)
    benchmark::RegisterBenchmark("gemv_block_nopdl", BM_gemv_block)
        ->Args({f, 1, 1, 1})
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  for (int f = 2; f < nf; ++f)
    benchmark::RegisterBenchmark("gemv/batch1-rerun", BM_gemv)
        ->Args({f, 1, 0})
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  for (int f : {5, 7})
    for (int n : {2, 4, 8})
      benchmark::RegisterBenchmark("gemv/batchN", BM_gemv)
          ->Args({f, n, 0})
          ->UseManualTime()
          ->Iterations(30)
          ->Unit(benchmark::kMicrosecond);
  for (int f = 0; f < static_cast<int>(std::size(kBlockFormats)); ++f)
    benchmark::RegisterBenchmark("gemv/batch8", BM_gemv_block)
        ->Args({f, 8, kBlockFormats[f].p == Precision::kFp8E4M3 ? 0 : 1, 0})
        ->UseManualTime()
        ->Iterations(30)
        ->Unit(benchmark::kMicrosecond);
  for (int f : {0, 5, 7})
    benchmark::RegisterBenchmark("gemv/batch8", BM_gemv)
        ->Args({f, 8, 1})
        ->UseManualTime()
        ->Iterations(30)
        ->Unit(benchmark::kMicrosecond);
  for (int n : {1, 8, 64})
    benchmark::RegisterBenchmark("cublas_bf16", BM_cublas_bf16)
        ->Arg(n)
        ->UseManualTime()
        ->Iterations(50)
        ->Unit(benchmark::kMicrosecond);
  // The batch-1 variants of the q8 kernel (int2 g32 / g64 / g64-asym / g128, int4 g32 / g128-asym).
  for (int f : {7, 10, 8, 9, 4, 6})
    for (int v : {0, 1})
      benchmark::RegisterBenchmark("gemv_variant", BM_gemv_variant)
          ->Args({f, v})
          ->UseManualTime()
          ->Iterations(50)
          ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("grouped_experts8", BM_grouped_experts)
      ->Args({0, 0, -1})
      ->UseManualTime()
      ->Iterations(20)
      ->Unit(benchmark::kMicrosecond);
  for (int f : {4, 5, 6, 7, 9})
    for (int exact : {1, 0})
      benchmark::RegisterBenchmark("grouped_experts8", BM_grouped_experts)
          ->Args({f, exact, -1})
          ->UseManualTime()
          ->Iterations(20)
          ->Unit(benchmark::kMicrosecond);
  // The q8 grouped path's batch-1 variants (two or one 16-byte units per lane in flight), int4
  // g32 / g64 / g128-asym, int2 g32 / g128.
  for (int f : {4, 5, 6, 7, 9})
    for (int v : {0, 1})
      benchmark::RegisterBenchmark("grouped_q8_variant", BM_grouped_experts)
          ->Args({f, 0, v})
          ->UseManualTime()
          ->Iterations(20)
          ->Unit(benchmark::kMicrosecond);
  for (int f = 0; f < static_cast<int>(std::size(kBlockFormats)); ++f)
    for (int exact : {0, 1}) {
      if (!exact && kBlockFormats[f].p == Precision::kFp8E4M3) continue;
      benchmark::RegisterBenchmark("grouped_block8", BM_grouped_block_experts)
          ->Args({f, exact})
          ->UseManualTime()
          ->Iterations(20)
          ->Unit(benchmark::kMicrosecond);
    }
  for (int lib : {0, 1, 2})
    for (int n : {1, 2, 4, 8, 16})
      for (int down : {0, 1})
        benchmark::RegisterBenchmark("gemm_mixtral", BM_gemm_mixtral)
            ->Args({lib, n, down})
            ->UseManualTime()
            ->Iterations(30)
            ->Unit(benchmark::kMicrosecond);
  for (int shape : {0, 1})
    for (int graphs : {0, 1})
      benchmark::RegisterBenchmark("executor_step", BM_executor_step)
          ->Args({shape, graphs})
          ->UseManualTime()
          ->Iterations(200)
          ->Unit(benchmark::kMicrosecond);
  for (int p : {0, 1})
    benchmark::RegisterBenchmark("slot_upload", BM_slot_upload)
        ->Arg(p)
        ->UseManualTime()
        ->Iterations(10)
        ->Unit(benchmark::kMillisecond);
  for (int f : {0, 5})
    benchmark::RegisterBenchmark("upload_with_gemv", BM_upload_with_gemv)
        ->Arg(f)
        ->UseManualTime()
        ->Iterations(8)
        ->Unit(benchmark::kMillisecond);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
