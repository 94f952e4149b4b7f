// Quantization throughput: quantize_matrix (f32 -> each format), dequantize_matrix, and
// convert_expert (bf16 -> int4, the store's low-precision build) on one thread and on the pool.
// pct_of_ceiling compares the f32 bytes read (quantize) or written (dequantize) per second to a
// host memcpy ceiling measured in this binary.
//
//   moex_bench_quantize --benchmark_min_time=0.3 --benchmark_out=quantize.json
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "moex/quant/quantize.hpp"
#include "moex/thread_pool.hpp"

namespace {

using moex::Precision;
using moex::WeightFormat;

constexpr std::size_t kRows = 4096, kCols = 4096;  // one 64 MiB f32 matrix

double memcpy_ceiling_bytes_per_s() {
  static const double v = [] {
    const std::size_t bytes = std::size_t{256} << 20;
    std::vector<std::uint8_t> a(bytes, 1), b(bytes, 2);
    double best = 0;
    for (int i = 0; i < 3; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      std::memcpy(b.data(), a.data(), bytes);
      benchmark::ClobberMemory();
      const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
      best = std::max(best, static_cast<double>(bytes) / dt.count());
    }
    return best;
  }();
  return v;
}

const std::vector<float>& weights() {
  static const std::vector<float> w = [] {
    std::vector<float> v(kRows * kCols);
    std::uint64_t s = 88172645463325252ull;
    for (auto& x : v) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      x = (static_cast<float>(s >> 40) / 16777216.f - 0.5f) * 0.1f;
    }
    return v;
  }();
  return w;
}

struct Fmt {
  const char* name;
  WeightFormat f;
};
const Fmt kFormats[] = {
    {"f16", moex::float_format(Precision::kF16)},
    {"bf16", moex::float_format(Precision::kBF16)},
    {"int8_g64", moex::quant_format(Precision::kInt8, 64)},
    {"int4_g32", moex::quant_format(Precision::kInt4, 32)},
    {"int4_asym_g64", moex::quant_format(Precision::kInt4, 64, moex::QuantScheme::kAsymmetric)},
    {"int2_g128", moex::quant_format(Precision::kInt2, 128)},
};

void BM_QuantizeMatrix(benchmark::State& state) {
  const Fmt& f = kFormats[state.range(0)];
  const auto& w = weights();
  std::vector<std::byte> dst(moex::matrix_layout(kRows, kCols, f.f).total_bytes);
  double elapsed = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const moex::Status st = moex::quantize_matrix(w.data(), kRows, kCols, f.f, dst);
    elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!st.is_ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
    benchmark::ClobberMemory();
  }
  const double bytes = static_cast<double>(state.iterations()) * kRows * kCols * 4;
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["Melem_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * kRows * kCols / 1e6, benchmark::Counter::kIsRate);
  state.counters["pct_of_ceiling"] = 100.0 * bytes / elapsed / memcpy_ceiling_bytes_per_s();
  state.SetLabel(f.name);
}

void BM_DequantizeMatrix(benchmark::State& state) {
  const Fmt& f = kFormats[state.range(0)];
  const auto l = moex::matrix_layout(kRows, kCols, f.f);
  std::vector<std::byte> blob(l.total_bytes);
  if (!moex::quantize_matrix(weights().data(), kRows, kCols, f.f, blob).is_ok()) {
    state.SkipWithError("quantize failed");
    return;
  }
  std::vector<float> out(kRows * kCols);
  double elapsed = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    moex::dequantize_matrix({blob.data(), l}, out.data());
    benchmark::ClobberMemory();
    elapsed += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double bytes = static_cast<double>(state.iterations()) * kRows * kCols * 4;  // f32 written
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["pct_of_ceiling"] = 100.0 * bytes / elapsed / memcpy_ceiling_bytes_per_s();
  state.SetLabel(f.name);
}

void BM_ConvertExpert(benchmark::State& state) {
  const moex::ExpertShape s{1024, 4096};  // 3 x 4M weights
  const bool pool = state.range(0) != 0;
  const auto bf16 = moex::float_format(Precision::kBF16);
  const auto q4 = moex::quant_format(Precision::kInt4, 64);
  const auto& w = weights();
  std::vector<std::byte> src(moex::expert_bytes(s, bf16)), dst(moex::expert_bytes(s, q4));
  if (!moex::pack_expert(w.data(), w.data(), w.data(), s, bf16, src).is_ok()) {
    state.SkipWithError("pack failed");
    return;
  }
  const auto sv = moex::ExpertView::contiguous(src.data(), moex::expert_layout(s, bf16));
  for (auto _ : state) {
    const moex::Status st = moex::convert_expert(sv, q4, dst, pool ? &moex::ThreadPool::global() : nullptr);
    if (!st.is_ok()) {
      state.SkipWithError(st.to_string().c_str());
      break;
    }
  }
  state.SetBytesProcessed(
      static_cast<std::int64_t>(static_cast<double>(state.iterations()) * static_cast<double>(src.size())));
  state.SetLabel(pool ? "bf16->int4_g64/all_threads" : "bf16->int4_g64/1_thread");
}

void register_all() {
  benchmark::AddCustomContext("memcpy_ceiling_GBps", std::to_string(memcpy_ceiling_bytes_per_s() / 1e9));
  for (int i = 0; i < static_cast<int>(std::size(kFormats)); ++i) {
    benchmark::RegisterBenchmark("BM_QuantizeMatrix", BM_QuantizeMatrix)->Arg(i)->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark("BM_DequantizeMatrix", BM_DequantizeMatrix)->Arg(i)->Unit(benchmark::kMillisecond);
  }
  for (int p : {0, 1})
    benchmark::RegisterBenchmark("BM_ConvertExpert", BM_ConvertExpert)->Arg(p)->Unit(benchmark::kMillisecond);
}

const bool kRegistered = (register_all(), true);

}  // namespace

BENCHMARK_MAIN();
