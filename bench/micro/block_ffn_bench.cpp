// CPU expert FFN on block-format experts as the store keeps them with keep_block_formats (GGUF
// Q8_0/Q4_0/Q4_K, fp8 e4m3 with its scale section; quant/layout.hpp): the SIMD kernels of
// src/cpu/kernels_block_*.cpp at the CPU's level, and (isa "scalar") the portable decode path of
// matmul_rows (rows decoded to f32 scratch, then dotted). bf16 (the decoded master's format) is
// the comparison row. Bytes/s are weight bytes streamed; BM_ReadRate sums the same amount of cold
// memory, and each expert row's `of_read` counter is its bytes/s over that read rate (measured
// once per thread count, best of 8 passes, in the same process): its fraction of the memory
// bandwidth. The project target is of_read >= 0.8 at batch 1. BM_BlockMatmulRows times
// matmul_rows alone on one matrix (w1) per copy; BM_BlockExpertFfn the whole SwiGLU expert.
//
//   moex_bench_block_ffn --benchmark_min_time=0.3
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/thread_pool.hpp"

namespace {

using moex::Precision;

constexpr std::size_t kColdBytes = std::size_t{256} << 20;  // > any LLC here: experts stream from DRAM
constexpr moex::ExpertShape kShape{1024, 3584};             // Q4_K-compatible (256 | both)

struct Fmt {
  const char* name;
  Precision p;
};
constexpr Fmt kFormats[] = {{"bf16", Precision::kBF16},
                            {"q8_0", Precision::kQ8_0},
                            {"q4_0", Precision::kQ4_0},
                            {"q4_k", Precision::kQ4_K},
                            {"fp8_e4m3", Precision::kFp8E4M3}};

std::uint64_t next(std::uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

// Writes one random matrix in block format p (valid scales, no fp8 NaN codes) at dst.
void fill_block_matrix(Precision p, const moex::MatrixLayout& l, std::byte* dst, std::uint64_t& s) {
  for (std::size_t i = 0; i < l.codes_bytes; ++i) dst[i] = std::byte{static_cast<std::uint8_t>(next(s) >> 56)};
  const std::uint16_t d = moex::float_to_f16(1.f / 1024.f);
  if (p == Precision::kFp8E4M3) {
    for (std::size_t i = 0; i < l.codes_bytes; ++i)
      if ((std::to_integer<unsigned>(dst[i]) & 0x7fu) == 0x7fu) dst[i] = std::byte{0};
    const float scale = 1e-3f;
    for (std::size_t at = l.scales_offset; at + 4 <= l.total_bytes; at += 4) std::memcpy(dst + at, &scale, 4);
    return;
  }
  const moex::BlockGeometry g = moex::block_geometry(p);
  for (std::size_t at = 0; at < l.codes_bytes; at += g.bytes) {
    std::memcpy(dst + at, &d, 2);
    if (p == Precision::kQ4_K) std::memcpy(dst + at + 2, &d, 2);
  }
}

struct ColdExperts {
  int fmt = -1;
  moex::ExpertLayout layout{};
  std::vector<std::byte> blob;
  std::size_t copies = 0;
  std::string error;
};

ColdExperts& experts(int fi) {
  static ColdExperts c;
  if (c.fmt == fi) return c;
  c = ColdExperts{};
  c.fmt = fi;
  const Precision p = kFormats[fi].p;
  c.layout = moex::expert_layout(kShape, moex::float_format(p));
  c.copies = (kColdBytes + c.layout.total_bytes - 1) / c.layout.total_bytes;
  c.blob.assign(c.copies * c.layout.total_bytes, std::byte{0});
  std::uint64_t s = 0x9E3779B97F4A7C15ull;
  if (p == Precision::kBF16) {
    std::vector<float> w(std::size_t{kShape.hidden} * kShape.ffn);
    for (auto& v : w) v = (static_cast<float>(next(s) >> 40) / 16777216.f - 0.5f) * 0.1f;
    const moex::Status st = moex::pack_expert(w.data(), w.data(), w.data(), kShape, c.layout.format,
                                              std::span<std::byte>(c.blob).first(c.layout.total_bytes));
    if (!st.is_ok()) c.error = st.to_string();
  } else {
    fill_block_matrix(p, c.layout.w1, c.blob.data() + c.layout.w1_offset, s);
    fill_block_matrix(p, c.layout.w3, c.blob.data() + c.layout.w3_offset, s);
    fill_block_matrix(p, c.layout.w2, c.blob.data() + c.layout.w2_offset, s);
  }
  for (std::size_t k = 1; k < c.copies; ++k)
    std::memcpy(c.blob.data() + k * c.layout.total_bytes, c.blob.data(), c.layout.total_bytes);
  return c;
}

moex::ThreadPool* pool_for(bool all) { return all ? &moex::ThreadPool::global() : nullptr; }

// Sums kColdBytes of memory (split over the pool's threads when all_threads) into sums.
void sum_cold(bool all, std::vector<std::uint64_t>& sums) {
  static const std::vector<std::uint64_t> buf(kColdBytes / 8, 1);
  auto body = [&](std::size_t b, std::size_t e) {
    sums[b % sums.size()] += std::accumulate(buf.begin() + static_cast<std::ptrdiff_t>(b),
                                             buf.begin() + static_cast<std::ptrdiff_t>(e), std::uint64_t{0});
  };
  if (moex::ThreadPool* p = pool_for(all)) {
    p->parallel_for(buf.size(), buf.size() / p->size(), body);
  } else {
    body(0, buf.size());
  }
}

// Bytes/s of sum_cold(all): best of 8 passes after a warm-up one, measured once per process (other
// load on the machine only lowers a pass, so the best one is the ceiling).
double read_rate(bool all) {
  static double rate[2] = {0, 0};
  double& r = rate[all ? 1 : 0];
  if (r > 0) return r;
  std::vector<std::uint64_t> sums(256, 0);
  sum_cold(all, sums);
  for (int i = 0; i < 8; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    sum_cold(all, sums);
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    r = std::max(r, static_cast<double>(kColdBytes) / dt.count());
  }
  benchmark::DoNotOptimize(sums.data());
  return r;
}

// Bytes/s of weights (bytes per iteration), of_read against read_rate(all), and the label
// "<format>/n<batch>/<threads>/<isa>".
void report(benchmark::State& state, std::size_t bytes_per_iter, bool all, int fi, std::size_t n,
            const std::string& isa) {
  const double bytes = static_cast<double>(state.iterations()) * static_cast<double>(bytes_per_iter);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  // A rate counter divides by the elapsed time: (bytes / ceiling) / seconds = (bytes/s) / ceiling.
  state.counters["of_read"] = benchmark::Counter(bytes / read_rate(all), benchmark::Counter::kIsRate);
  std::string label = kFormats[fi].name;
  label.append("/n").append(std::to_string(n)).append(all ? "/all_threads/" : "/1_thread/").append(isa);
  state.SetLabel(label);
}

// Args: format, batch, all_threads, portable (1: the scalar decode path).
void BM_BlockExpertFfn(benchmark::State& state) {
  const int fi = static_cast<int>(state.range(0));
  const auto n = static_cast<std::size_t>(state.range(1));
  const bool all = state.range(2) != 0;
  const bool portable = state.range(3) != 0;
  ColdExperts& c = experts(fi);
  if (!c.error.empty()) {
    state.SkipWithError(c.error.c_str());
    return;
  }
  (void)read_rate(all);  // measured before the timed loop
  const moex::CpuIsa saved = moex::active_cpu_isa();
  if (portable) (void)moex::set_cpu_isa(moex::CpuIsa::kScalar);
  const std::string isa = moex::cpu_kernel_isa();
  std::vector<float> x(n * kShape.hidden, 0.01f), y(n * kShape.hidden), ws(moex::expert_ffn_workspace(kShape, n));
  std::size_t k = 0;
  for (auto _ : state) {
    const auto ev = moex::ExpertView::contiguous(c.blob.data() + k * c.layout.total_bytes, c.layout);
    k = (k + 1) % c.copies;
    const moex::Status st = moex::expert_ffn(ev, x.data(), n, y.data(), ws, pool_for(all));
    if (!st.is_ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(y.data());
  }
  (void)moex::set_cpu_isa(saved);
  report(state, c.layout.total_bytes, all, fi, n, isa);
}

// matmul_rows alone (the kernel, no SwiGLU): all rows of each cold copy's w1 [ffn x hidden] in
// turn, one thread. Args: format, batch, portable.
void BM_BlockMatmulRows(benchmark::State& state) {
  const int fi = static_cast<int>(state.range(0));
  const auto n = static_cast<std::size_t>(state.range(1));
  const bool portable = state.range(2) != 0;
  ColdExperts& c = experts(fi);
  if (!c.error.empty()) {
    state.SkipWithError(c.error.c_str());
    return;
  }
  (void)read_rate(false);  // measured before the timed loop
  const moex::CpuIsa saved = moex::active_cpu_isa();
  if (portable) (void)moex::set_cpu_isa(moex::CpuIsa::kScalar);
  const std::string isa = moex::cpu_kernel_isa();
  const moex::MatrixLayout& l = c.layout.w1;
  std::vector<float> x(n * l.cols, 0.01f), y(n * l.rows);
  std::size_t k = 0;
  for (auto _ : state) {
    const moex::MatrixView w{c.blob.data() + k * c.layout.total_bytes + c.layout.w1_offset, l};
    k = (k + 1) % c.copies;
    moex::matmul_rows(w, x.data(), n, l.cols, y.data(), l.rows, 0, l.rows);
    benchmark::DoNotOptimize(y.data());
  }
  (void)moex::set_cpu_isa(saved);
  report(state, l.total_bytes, false, fi, n, isa);
}

// The read ceiling as a row of its own. Args: all_threads.
void BM_ReadRate(benchmark::State& state) {
  const bool all = state.range(0) != 0;
  std::vector<std::uint64_t> sums(256, 0);
  for (auto _ : state) {
    sum_cold(all, sums);
    benchmark::DoNotOptimize(sums.data());
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * kColdBytes));
  state.SetLabel(all ? "all_threads" : "1_thread");
}

void block_args(benchmark::internal::Benchmark* b) {
  for (int all : {0, 1})
    for (int f = 0; f < static_cast<int>(std::size(kFormats)); ++f)
      for (int n : {1, 8}) b->Args({f, n, all, 0});
  // The portable decode path, single thread, for comparison.
  for (int f = 1; f < static_cast<int>(std::size(kFormats)); ++f) b->Args({f, 1, 0, 1});
}

}  // namespace

BENCHMARK(BM_ReadRate)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_BlockMatmulRows)
    ->ArgsProduct({{0, 1, 2, 3, 4}, {1, 8}, {0}})
    ->Args({1, 1, 1})
    ->Args({2, 1, 1})
    ->Args({3, 1, 1})
    ->Args({4, 1, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_BlockExpertFfn)->Apply(block_args)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
