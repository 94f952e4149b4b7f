// CPU expert kernels: expert_ffn per format at batch 1, 2, 4, 8, 16, single thread and all threads,
// reported as weight bytes streamed per second and as a percentage of a read-bandwidth ceiling
// measured in this binary (pct_of_ceiling). Experts are cycled through enough copies to exceed
// the last-level cache, so every call streams its weights from DRAM as an offloaded expert would.
//
//   moex_bench_cpu_kernels --benchmark_min_time=0.3 --benchmark_out=cpu_kernels.json
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/thread_pool.hpp"

namespace {

using moex::Precision;
using moex::WeightFormat;

constexpr std::size_t kColdBytes = std::size_t{256} << 20;  // > any LLC here: forces DRAM reads

// Read ceiling: sums a 256 MiB array with 8 independent 64-bit accumulators (plain x86-64 code
// that issues two 8-byte loads per cycle, well above one core's DRAM bandwidth), split over
// `threads` threads of the pool. Best of 5 passes.
double read_ceiling_bytes_per_s(moex::ThreadPool* pool) {
  static std::vector<std::uint64_t> buf(kColdBytes / 8, 1);
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<std::uint64_t> partial(64, 0);
    const auto t0 = std::chrono::steady_clock::now();
    auto body = [&](std::size_t b, std::size_t e) {
      std::uint64_t a[8] = {};
      const std::uint64_t* p = buf.data();
      for (std::size_t i = b * 8; i < e * 8; i += 8)
        for (int k = 0; k < 8; ++k) a[k] += p[i + k];
      std::uint64_t s = 0;
      for (auto v : a) s += v;
      partial[b % 64] += s;
    };
    const std::size_t blocks = buf.size() / 8;
    if (pool) {
      pool->parallel_for(blocks, blocks / pool->size(), body);
    } else {
      body(0, blocks);
    }
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    benchmark::DoNotOptimize(partial.data());
    best = std::max(best, static_cast<double>(kColdBytes) / dt.count());
  }
  return best;
}

double ceiling(bool all_threads) {
  static const double single = read_ceiling_bytes_per_s(nullptr);
  static const double all = read_ceiling_bytes_per_s(&moex::ThreadPool::global());
  return all_threads ? all : single;
}

struct Shape {
  const char* name;
  moex::ExpertShape s;
};
const Shape kShapes[] = {{"1024x3584", {1024, 3584}}, {"mixtral_4096x14336", {4096, 14336}}};

struct Fmt {
  const char* name;
  WeightFormat f;
};
const Fmt kFormats[] = {
    {"f32", moex::float_format(Precision::kF32)},
    {"bf16", moex::float_format(Precision::kBF16)},
    {"int8_g64", moex::quant_format(Precision::kInt8, 64)},
    {"int4_g64", moex::quant_format(Precision::kInt4, 64)},
    {"int4_asym_g32", moex::quant_format(Precision::kInt4, 32, moex::QuantScheme::kAsymmetric)},
    {"int2_g64", moex::quant_format(Precision::kInt2, 64)},
    // The remaining int4/int2 group sizes and schemes (appended: indices above stay stable).
    {"int4_g32", moex::quant_format(Precision::kInt4, 32)},
    {"int4_g128", moex::quant_format(Precision::kInt4, 128)},
    {"int4_asym_g128", moex::quant_format(Precision::kInt4, 128, moex::QuantScheme::kAsymmetric)},
    {"int2_g32", moex::quant_format(Precision::kInt2, 32)},
    {"int2_asym_g64", moex::quant_format(Precision::kInt2, 64, moex::QuantScheme::kAsymmetric)},
    {"int2_asym_g128", moex::quant_format(Precision::kInt2, 128, moex::QuantScheme::kAsymmetric)},
};

// One packed expert, copied enough times to exceed kColdBytes (single-entry cache: benchmarks
// run in registration order, grouped by format and shape).
struct ColdExperts {
  int fmt = -1, shape = -1;
  moex::ExpertLayout layout{};
  std::vector<std::byte> blob;  // copies * layout.total_bytes
  std::size_t copies = 0;
  std::string error;
};

ColdExperts& experts(int fi, int si) {
  static ColdExperts c;
  if (c.fmt == fi && c.shape == si) return c;
  c = ColdExperts{};
  c.fmt = fi;
  c.shape = si;
  const moex::ExpertShape s = kShapes[si].s;
  const WeightFormat f = kFormats[fi].f;
  const std::size_t nw = std::size_t{s.hidden} * s.ffn;
  std::vector<float> w(nw);
  std::uint64_t st = 0x9E3779B97F4A7C15ull;
  for (auto& v : w) {  // xorshift: cheap uniform [-0.05, 0.05)
    st ^= st << 13;
    st ^= st >> 7;
    st ^= st << 17;
    v = (static_cast<float>(st >> 40) / 16777216.f - 0.5f) * 0.1f;
  }
  c.layout = moex::expert_layout(s, f);
  c.copies = std::max<std::size_t>(1, (kColdBytes + c.layout.total_bytes - 1) / c.layout.total_bytes);
  c.blob.resize(c.copies * c.layout.total_bytes);
  // w serves as w1, w3 ([ffn x hidden]) and w2 ([hidden x ffn]): same element count.
  const moex::Status st1 =
      moex::pack_expert(w.data(), w.data(), w.data(), s, f, std::span<std::byte>(c.blob).first(c.layout.total_bytes));
  if (!st1.is_ok()) c.error = st1.to_string();
  for (std::size_t k = 1; k < c.copies; ++k)
    std::memcpy(c.blob.data() + k * c.layout.total_bytes, c.blob.data(), c.layout.total_bytes);
  return c;
}

// Args: format, shape, batch, all_threads, isa (-1: default).
void BM_ExpertFfn(benchmark::State& state) {
  const int fi = static_cast<int>(state.range(0)), si = static_cast<int>(state.range(1));
  const auto n = static_cast<std::size_t>(state.range(2));
  const bool all = state.range(3) != 0;
  const int isa = static_cast<int>(state.range(4));
  const moex::CpuIsa saved = moex::active_cpu_isa();
  if (isa >= 0 && !moex::set_cpu_isa(static_cast<moex::CpuIsa>(isa)).is_ok()) {
    state.SkipWithError("ISA not supported on this CPU");
    return;
  }
  ColdExperts& c = experts(fi, si);
  if (!c.error.empty()) {
    state.SkipWithError(c.error.c_str());
    return;
  }
  const moex::ExpertShape s = kShapes[si].s;
  std::vector<float> x(n * s.hidden, 0.01f), y(n * s.hidden);
  std::vector<float> ws(moex::expert_ffn_workspace(s, n));
  moex::ThreadPool* pool = all ? &moex::ThreadPool::global() : nullptr;
  const double ceil_bps = ceiling(all);
  std::size_t k = 0;
  double elapsed = 0;
  for (auto _ : state) {
    const auto ev = moex::ExpertView::contiguous(c.blob.data() + k * c.layout.total_bytes, c.layout);
    k = (k + 1) % c.copies;
    const auto t0 = std::chrono::steady_clock::now();
    const moex::Status st = moex::expert_ffn(ev, x.data(), n, y.data(), ws, pool);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    elapsed += dt.count();
    state.SetIterationTime(dt.count());
    if (!st.is_ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(y.data());
  }
  (void)moex::set_cpu_isa(saved);
  const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(c.layout.total_bytes);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["pct_of_ceiling"] = elapsed > 0 ? 100.0 * bytes / elapsed / ceil_bps : 0.0;
  state.counters["ceiling_GBps"] = ceil_bps / 1e9;
  state.counters["GFLOPs"] = elapsed > 0 ? 6.0 * s.hidden * s.ffn * static_cast<double>(n) *
                                               static_cast<double>(state.iterations()) / elapsed / 1e9
                                         : 0.0;
  std::string label = kFormats[fi].name;  // appended piecewise: GCC 12 -Wrestrict false positive
  label.append("/").append(kShapes[si].name).append("/n").append(std::to_string(n));
  label.append(all ? "/all_threads" : "/1_thread");
  if (isa >= 0) label.append("/").append(moex::to_string(static_cast<moex::CpuIsa>(isa)));
  state.SetLabel(label);
}

// matmul_rows on one cache-resident [256 x 4096] matrix (compute rate, no DRAM): weights per
// second. Args: format, batch, isa (-1: default).
void BM_MatmulHot(benchmark::State& state) {
  const int fi = static_cast<int>(state.range(0));
  const auto n = static_cast<std::size_t>(state.range(1));
  const int isa = static_cast<int>(state.range(2));
  const moex::CpuIsa saved = moex::active_cpu_isa();
  if (isa >= 0 && !moex::set_cpu_isa(static_cast<moex::CpuIsa>(isa)).is_ok()) {
    state.SkipWithError("ISA not supported on this CPU");
    return;
  }
  constexpr std::size_t rows = 256, cols = 4096;
  std::vector<float> w(rows * cols);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>((i * 7919) % 201) * 1e-3f - 0.1f;
  const auto l = moex::matrix_layout(rows, cols, kFormats[fi].f);
  std::vector<std::byte> blob(l.total_bytes);
  if (!moex::quantize_matrix(w.data(), rows, cols, kFormats[fi].f, blob).is_ok()) {
    state.SkipWithError("quantize failed");
    return;
  }
  const moex::MatrixView m{blob.data(), l};
  std::vector<float> x(n * cols, 0.01f), y(n * rows);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 13) * 0.01f - 0.06f;
  for (auto _ : state) {
    moex::matmul_rows(m, x.data(), n, cols, y.data(), rows, 0, rows);
    benchmark::DoNotOptimize(y.data());
  }
  (void)moex::set_cpu_isa(saved);
  state.counters["Gweights_per_s"] = benchmark::Counter(
      static_cast<double>(rows * cols) * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.SetBytesProcessed(static_cast<std::int64_t>(l.total_bytes) * static_cast<std::int64_t>(state.iterations()));
  std::string label = kFormats[fi].name;
  label.append("/n").append(std::to_string(n));
  if (isa >= 0) label.append("/").append(moex::to_string(static_cast<moex::CpuIsa>(isa)));
  state.SetLabel(label);
}

void register_all() {
  benchmark::AddCustomContext("cpu_kernel_isa", moex::cpu_kernel_isa());
  benchmark::AddCustomContext("threads_all", std::to_string(moex::ThreadPool::global().size()));
  const int nf = static_cast<int>(std::size(kFormats));
  for (int si = 0; si < 2; ++si)
    for (int fi = 0; fi < nf; ++fi)
      for (int n : {1, 2, 4, 8, 16})
        for (int all : {0, 1})
          benchmark::RegisterBenchmark("BM_ExpertFfn", BM_ExpertFfn)
              ->Args({fi, si, n, all, -1})
              ->UseManualTime()
              ->Unit(benchmark::kMillisecond);
  // bf16 weights: f32-FMA path (avx512) vs vdpbf16ps with bf16 activations (avx512bf16).
  for (int n : {1, 8, 16})
    for (int isa : {2, 3})
      benchmark::RegisterBenchmark("BM_ExpertFfn_bf16_isa", BM_ExpertFfn)
          ->Args({1, 0, n, 0, isa})
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
}

void register_hot() {
  for (int fi = 0; fi < static_cast<int>(std::size(kFormats)); ++fi)
    for (int n : {1, 8})
      for (int isa : {-1, 1, 2})
        benchmark::RegisterBenchmark("BM_MatmulHot", BM_MatmulHot)->Args({fi, n, isa})->Unit(benchmark::kMicrosecond);
}

const bool kRegisteredHot = (register_hot(), true);
const bool kRegistered = (register_all(), true);

}  // namespace

BENCHMARK_MAIN();
