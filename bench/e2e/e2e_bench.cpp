// moex_e2e_bench: decode through a stack of Mixtral-8x7B-shaped MoE layers on one GPU with the
// experts' master copies in pinned host RAM, routing replayed from the real Mixtral trace, under
// GPU budgets of a fraction of the expert bytes; one row per policy combination, each beside the
// floor and the simulator's prediction (issue 9). See bench/RESULTS-gpu.md for the method.
//
// Usage: moex_e2e_bench --trace FILE [--layers 8] [--layer-stride 4] [--batches 1,4,16]
//          [--budgets 0.1,0.25,0.5] [--steps 48] [--warmup 8] [--recall 0.9] [--host-threads 14]
//          [--no-low] [--out DIR]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "moex/backend/cuda_execution_backend.hpp"
#include "moex/cache/layer_budget.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/executor/moe_layer_executor.hpp"
#include "moex/formats/trace.hpp"
#include "moex/policies/cost_model_miss.hpp"
#include "moex/policies/hobbit_precision_miss.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/route/pre_gate_router.hpp"
#include "moex/sim/grid.hpp"
#include "moex/thread_pool.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

struct Args {
  std::string trace;
  std::uint32_t layers = 8, stride = 4, steps = 48, warmup = 8, host_threads = 0;
  std::vector<std::uint32_t> batches{1, 4, 16};
  std::vector<double> budgets{0.1, 0.25, 0.5};
  float recall = 0.9f;
  bool low = true;
  std::string out = ".";
  std::uint32_t model_layers = 32;
};

template <class T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(static_cast<T>(std::stod(item)));
  return v;
}

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return false;
}

// ---- workload: the replayed routing of the measured layers ----------------------------------
struct Workload {
  std::uint32_t batch = 1;
  std::uint32_t steps = 0;  // warmup + measured
  std::uint32_t warmup = 0;
  // routing[step][layer][b]
  std::vector<std::vector<std::vector<moex::TokenRouting>>> routing;
  moex::RoutingTrace replay;   // one "token" per step: the union of the batch's experts (for PreGateRouter::replay)
  moex::RoutingTrace profile;  // batch-1 trace of the tokens used (miss curves for per-layer budgets)
};

// ---- a Belady cache over the step sequence: misses in the measured steps -----------------------
std::uint64_t belady_misses(const Workload& w, std::uint32_t layers, std::uint32_t experts, std::size_t slots) {
  std::vector<std::uint32_t> seq;  // accesses, layer*experts+e, in executor order
  std::vector<std::uint8_t> measured;
  for (std::uint32_t s = 0; s < w.steps; ++s)
    for (std::uint32_t l = 0; l < layers; ++l) {
      std::set<std::uint32_t> u;
      for (const auto& r : w.routing[s][l])
        for (std::uint32_t j = 0; j < r.k; ++j) u.insert(r.experts[j]);
      for (auto e : u) {
        seq.push_back(l * experts + e);
        measured.push_back(s >= w.warmup);
      }
    }
  const std::size_t n = seq.size();
  std::vector<std::size_t> next(n, SIZE_MAX);
  std::map<std::uint32_t, std::size_t> last;
  for (std::size_t i = n; i-- > 0;) {
    auto it = last.find(seq[i]);
    next[i] = it == last.end() ? SIZE_MAX : it->second;
    last[seq[i]] = i;
  }
  std::map<std::uint32_t, std::size_t> cache;  // key -> next use
  std::uint64_t misses = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto it = cache.find(seq[i]);
    if (it != cache.end()) {
      it->second = next[i];
      continue;
    }
    misses += measured[i];
    if (cache.size() >= slots) {
      auto victim = cache.begin();
      for (auto c = cache.begin(); c != cache.end(); ++c)
        if (c->second > victim->second) victim = c;
      cache.erase(victim);
    }
    cache[seq[i]] = next[i];
  }
  return misses;
}

// ---- one measured row -----------------------------------------------------------------------
struct Row {
  std::string name;
  std::uint32_t batch = 1;
  double budget = 0;
  bool ok = false;
  std::string error;
  double ms_per_token = 0;  // scaled to the model's layers
  double tok_s = 0;
  double hit_rate = 0;
  double pcie_mb_per_token = 0;
  double stall_ms_per_token = 0;
  double pcie_busy = 0;
  double cpu_busy = 0;
  double floor_ms = 0;
  double sim_ms = -1;
  std::string sim_policy;
  std::uint64_t at_source = 0, low_loads = 0, skipped = 0;
};

struct Ctx {
  Args args;
  const moex::ExpertStore* store = nullptr;
  moex::ExpertShape shape{};
  std::uint64_t expert_bytes = 0;
  std::uint64_t pcie_rate = 0, host_rate = 0;
  std::vector<float> hidden;  // [max batch x hidden]
};

struct LruP : moex::DefaultPolicies {
  using Backend = moex::CudaExecutionBackend;
};
struct PrefetchP : LruP {
  using Predictor = moex::PreGateRouter;
};
struct HobbitP : PrefetchP {
  using Miss = moex::HobbitPrecisionMiss;
};
struct CostP : PrefetchP {
  using Miss = moex::CostModelMiss;
};
struct CostNoPfP : LruP {
  using Miss = moex::CostModelMiss;
};

template <class P>
Row run_row(const Ctx& c, const Workload& w, std::string name, double budget, moex::ExecutorConfig ec,
            typename P::Predictor pred, typename P::Miss miss) {
  Row row;
  row.name = std::move(name);
  row.batch = w.batch;
  row.budget = budget;
  moex::CudaExecutionBackendConfig bc;
  bc.max_shape = c.shape;
  bc.max_tokens = 64;
  bc.max_rows_per_step = 256;
  bc.pcie_bytes_per_s = c.pcie_rate;
  bc.host_bytes_per_s = c.host_rate;
  bc.host_threads = c.args.host_threads;
  auto be = moex::CudaExecutionBackend::create(bc);
  if (!be) {
    row.error = be.status().to_string();
    return row;
  }
  auto ex = moex::MoeLayerExecutor<P>::create(*c.store, ec, std::move(*be), {}, {}, std::move(pred), std::move(miss));
  if (!ex) {
    row.error = ex.status().to_string();
    return row;
  }
  const std::size_t h = c.shape.hidden;
  std::vector<float> out(std::size_t{w.batch} * h);
  const std::uint32_t L = c.args.layers;
  auto run_steps = [&](std::uint32_t from, std::uint32_t to) -> moex::Status {
    for (std::uint32_t s = from; s < to; ++s)
      for (std::uint32_t l = 0; l < L; ++l)
        MOEX_RETURN_IF_ERROR(ex->forward_routed(l, w.routing[s][l], c.hidden.data(), w.batch, out.data()));
    return moex::Status::ok();
  };
  // "all resident": touch every expert first (budget = all expert bytes).
  if (budget >= 1.0) {
    for (std::uint32_t l = 0; l < L; ++l)
      for (std::uint32_t e = 0; e + 1 < c.store->spec().n_experts; e += 2) {
        moex::TokenRouting r;
        r.k = 2;
        r.experts[0] = e;
        r.experts[1] = e + 1;
        r.weights[0] = r.weights[1] = 0.5f;
        std::vector<moex::TokenRouting> rs(w.batch, r);
        if (auto s = ex->forward_routed(l, rs, c.hidden.data(), w.batch, out.data()); !s.is_ok()) {
          row.error = s.to_string();
          return row;
        }
      }
  }
  if (auto s = run_steps(0, w.warmup); !s.is_ok()) {
    row.error = s.to_string();
    return row;
  }
  cudaDeviceSynchronize();
  ex->reset_stats();
  ex->backend().reset_counters();
  const auto t0 = Clock::now();
  if (auto s = run_steps(w.warmup, w.steps); !s.is_ok()) {
    row.error = s.to_string();
    return row;
  }
  const double wall = secs(t0, Clock::now());
  const double tokens = double(w.steps - w.warmup) * w.batch;
  const double scale = double(c.args.model_layers) / double(L);
  const auto t = ex->stats().total();
  const auto& k = ex->backend().counters();
  row.ok = true;
  row.ms_per_token = wall * 1e3 / tokens * scale;
  row.tok_s = 1e3 / row.ms_per_token;
  row.hit_rate = t.hits + t.misses ? double(t.hits) / double(t.hits + t.misses) : 1.0;
  row.pcie_mb_per_token = double(k.load_bytes) / tokens * scale / 1e6;
  row.stall_ms_per_token = double(t.stall_ns) / 1e6 / tokens * scale;
  row.pcie_busy = double(k.load_bytes) / double(c.pcie_rate) / wall;
  row.cpu_busy = double(k.host_busy_ns) * 1e-9 / wall;
  row.at_source = t.computed_at_source;
  for (std::size_t p = 0; p < moex::kPrecisionCount; ++p)
    if (p != static_cast<std::size_t>(moex::Precision::kBF16)) row.low_loads += t.misses_by_precision[p];
  row.skipped = t.skipped;
  return row;
}

Workload make_workload(const moex::RoutingTrace& tr, const std::vector<std::uint32_t>& tokens,
                       const std::vector<std::uint32_t>& layer_ids, std::uint32_t batch, std::uint32_t steps,
                       std::uint32_t warmup) {
  Workload w;
  w.batch = batch;
  const std::uint32_t L = static_cast<std::uint32_t>(layer_ids.size());
  const std::uint32_t avail = static_cast<std::uint32_t>(tokens.size() / batch);
  w.steps = std::min(steps + warmup, avail);
  w.warmup = std::min(warmup, w.steps / 4);
  w.routing.resize(w.steps);
  w.replay.n_layers = w.profile.n_layers = L;
  w.replay.n_experts = w.profile.n_experts = tr.n_experts;
  w.replay.top_k = std::min<std::uint32_t>(tr.n_experts, tr.top_k * batch);
  w.profile.top_k = tr.top_k;
  w.replay.seq_start = w.profile.seq_start = {0};
  for (std::uint32_t s = 0; s < w.steps; ++s) {
    w.routing[s].resize(L);
    for (std::uint32_t li = 0; li < L; ++li) {
      std::map<std::uint32_t, float> u;
      for (std::uint32_t b = 0; b < batch; ++b) {
        const std::uint32_t tok = tokens[s * batch + b];
        const auto ids = tr.experts(tok, layer_ids[li]);
        const auto ws = tr.weights(tok, layer_ids[li]);
        moex::TokenRouting r;
        r.k = static_cast<std::uint32_t>(ids.size());
        for (std::uint32_t j = 0; j < r.k; ++j) {
          r.experts[j] = ids[j];
          r.weights[j] = ws[j];
          u[ids[j]] = std::max(u[ids[j]], ws[j]);
        }
        w.routing[s][li].push_back(r);
      }
      std::vector<std::pair<float, std::uint32_t>> by_w;
      for (auto [e, wt] : u) by_w.emplace_back(-wt, e);
      std::sort(by_w.begin(), by_w.end());
      for (std::uint32_t j = 0; j < w.replay.top_k; ++j) {
        w.replay.expert_ids.push_back(j < by_w.size() ? by_w[j].second : moex::kNoExpert);
        w.replay.gate_weights.push_back(j < by_w.size() ? -by_w[j].first : 0.f);
      }
    }
  }
  for (std::uint32_t s = 0; s < w.steps * batch; ++s)
    for (std::uint32_t li = 0; li < L; ++li) {
      const auto ids = tr.experts(tokens[s], layer_ids[li]);
      const auto ws = tr.weights(tokens[s], layer_ids[li]);
      for (std::uint32_t j = 0; j < tr.top_k; ++j) {
        w.profile.expert_ids.push_back(j < ids.size() ? ids[j] : moex::kNoExpert);
        w.profile.gate_weights.push_back(j < ids.size() ? ws[j] : 0.f);
      }
    }
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  Ctx c;
  Args& a = c.args;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (k == "--trace")
      a.trace = val();
    else if (k == "--layers")
      a.layers = static_cast<std::uint32_t>(std::stoul(val()));
    else if (k == "--layer-stride")
      a.stride = static_cast<std::uint32_t>(std::stoul(val()));
    else if (k == "--steps")
      a.steps = static_cast<std::uint32_t>(std::stoul(val()));
    else if (k == "--warmup")
      a.warmup = static_cast<std::uint32_t>(std::stoul(val()));
    else if (k == "--host-threads")
      a.host_threads = static_cast<std::uint32_t>(std::stoul(val()));
    else if (k == "--batches")
      a.batches = parse_list<std::uint32_t>(val());
    else if (k == "--budgets")
      a.budgets = parse_list<double>(val());
    else if (k == "--recall")
      a.recall = std::stof(val());
    else if (k == "--no-low")
      a.low = false;
    else if (k == "--out")
      a.out = val();
    else {
      std::fprintf(stderr, "unknown argument %s\n", k.c_str());
      return 2;
    }
  }
  if (a.trace.empty()) {
    std::fprintf(stderr, "usage: moex_e2e_bench --trace gsm8k_2_routing.jsonl [options]\n");
    return 2;
  }
  if (!moex::CudaExecutionBackend::device_available()) {
    std::fprintf(stderr, "no CUDA device: nothing to measure\n");
    return 0;
  }
  std::filesystem::create_directories(a.out);
  auto tr = moex::read_mixtral_routing_jsonl(a.trace);
  if (!tr) {
    std::fprintf(stderr, "trace: %s\n", tr.status().to_string().c_str());
    return 1;
  }
  std::vector<std::uint32_t> layer_ids;
  for (std::uint32_t i = 0; i < a.layers; ++i) layer_ids.push_back((i * a.stride) % tr->n_layers);
  std::vector<std::uint32_t> tokens;  // tokens with experts at every measured layer
  for (std::uint32_t t = 0; t < tr->tokens(); ++t) {
    bool full = true;
    for (auto l : layer_ids) full = full && tr->experts(t, l).size() == tr->top_k;
    if (full) tokens.push_back(t);
  }
  std::printf("trace %s: %zu tokens, %zu usable; layers", a.trace.c_str(), tr->tokens(), tokens.size());
  for (auto l : layer_ids) std::printf(" %u", l);
  std::printf("\n");

  // ---- store: random bf16 experts in pinned host memory ------------------------------------
  c.shape = {4096, 14336};
  const moex::MoeModelSpec spec{a.layers, 8, c.shape, {moex::RouterKind::kSoftmaxTopKRenorm, 8, 2}};
  auto store = moex::ExpertStore::create(spec, moex::float_format(moex::Precision::kBF16));
  if (!store) return 1;
  const moex::ExpertLayout layout = moex::expert_layout(c.shape, moex::float_format(moex::Precision::kBF16));
  c.expert_bytes = layout.total_bytes;
  const std::size_t n_exp = std::size_t{a.layers} * 8;
  const std::size_t stride = (layout.total_bytes + 4095) / 4096 * 4096;
  auto t0 = Clock::now();
  void* pinned = nullptr;
  if (!cuda_ok(cudaHostAlloc(&pinned, stride * n_exp, cudaHostAllocDefault), "cudaHostAlloc masters")) return 1;
  auto* base = static_cast<std::byte*>(pinned);
  {
    const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::thread> th;
    const std::size_t words = stride * n_exp / 2;
    for (unsigned t = 0; t < nt; ++t)
      th.emplace_back([&, t] {
        auto* p = reinterpret_cast<std::uint16_t*>(base);
        std::uint64_t x = 0x9E3779B97F4A7C15ull * (t + 1);
        for (std::size_t i = words * t / nt; i < words * (t + 1) / nt; ++i) {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          // |w| in [2^-8, 2^-5): exponent 119..121, random mantissa and sign (finite, no zeros)
          p[i] = static_cast<std::uint16_t>(((x >> 20) & 0x8000u) | ((119u + (x >> 40) % 3u) << 7) | (x & 0x7Fu));
        }
      });
    for (auto& x : th) x.join();
  }
  for (std::uint32_t l = 0; l < a.layers; ++l)
    for (std::uint32_t e = 0; e < 8; ++e) {
      const auto v = moex::ExpertView::contiguous(base + (std::size_t{l} * 8 + e) * stride, layout);
      if (auto s = store->set_expert_view({l, e}, v, moex::Tier::kHost); !s.is_ok()) {
        std::fprintf(stderr, "set_expert_view: %s\n", s.to_string().c_str());
        return 1;
      }
    }
  std::printf("masters: %zu experts x %.1f MB pinned bf16 in %.1f s\n", n_exp, double(layout.total_bytes) / 1e6,
              secs(t0, Clock::now()));
  if (a.low) {
    t0 = Clock::now();
    if (auto s = store->build_precision(moex::quant_format(moex::Precision::kInt4, 64)); !s.is_ok()) {
      std::fprintf(stderr, "int4 copy: %s\n", s.to_string().c_str());
      a.low = false;
    } else {
      std::printf("int4 g64 copies built in %.1f s\n", secs(t0, Clock::now()));
      t0 = Clock::now();
      auto s2 = moex::CudaExecutionBackend::register_store(*store);
      std::printf("register_store: %s in %.1f s\n", s2.to_string().c_str(), secs(t0, Clock::now()));
    }
  }
  c.store = &*store;

  // ---- rates measured in this run ----------------------------------------------------------
  {
    void* d = nullptr;
    if (!cuda_ok(cudaMalloc(&d, layout.total_bytes), "cudaMalloc probe")) return 1;
    cudaStream_t st;
    cudaStreamCreate(&st);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> ms;
    for (int i = 0; i < 6; ++i) {
      cudaEventRecord(e0, st);
      cudaMemcpyAsync(d, base + (i % n_exp) * stride, layout.total_bytes, cudaMemcpyHostToDevice, st);
      cudaEventRecord(e1, st);
      cudaEventSynchronize(e1);
      float m = 0;
      cudaEventElapsedTime(&m, e0, e1);
      if (i > 0) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    c.pcie_rate = static_cast<std::uint64_t>(double(layout.total_bytes) / (ms[ms.size() / 2] * 1e-3));
    cudaFree(d);
    cudaStreamDestroy(st);
  }
  {
    const std::size_t threads = a.host_threads ? a.host_threads : std::max(1u, std::thread::hardware_concurrency() - 2);
    moex::ThreadPool pool(threads);
    std::vector<float> x(c.shape.hidden, 0.01f), y(c.shape.hidden);
    std::vector<float> ws(moex::expert_ffn_workspace(c.shape, 1));
    std::vector<double> ts;
    for (int i = 0; i < 7; ++i) {
      auto v = store->master({static_cast<std::uint32_t>(i % a.layers), static_cast<std::uint32_t>((i * 3) % 8)});
      const auto s0 = Clock::now();
      (void)moex::expert_ffn(*v, x.data(), 1, y.data(), ws, &pool);
      if (i > 0) ts.push_back(secs(s0, Clock::now()));
    }
    std::sort(ts.begin(), ts.end());
    c.host_rate = static_cast<std::uint64_t>(double(layout.total_bytes) / ts[ts.size() / 2]);
    std::printf(
        "measured: pinned PCIe H2D %.1f GB/s (one %.0f MB expert, median of 5); host CPU bf16 expert at batch 1: "
        "%.2f ms = %.1f GB/s of weights (%zu threads, median of 6)\n",
        double(c.pcie_rate) / 1e9, double(layout.total_bytes) / 1e6, ts[ts.size() / 2] * 1e3, double(c.host_rate) / 1e9,
        threads);
  }
  const std::uint32_t max_batch = *std::max_element(a.batches.begin(), a.batches.end());
  {
    std::uint64_t x = 12345;
    c.hidden.resize(std::size_t{max_batch} * c.shape.hidden);
    for (auto& v : c.hidden) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      v = static_cast<float>(static_cast<double>(x >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
  }

  // ---- rows ----------------------------------------------------------------------------------
  std::vector<Row> rows;
  const std::uint64_t all_bytes = std::uint64_t{a.layers} * 8 * c.expert_bytes;
  std::FILE* routing_out = std::fopen((a.out + "/routing.txt").c_str(), "w");
  for (std::uint32_t batch : a.batches) {
    const std::uint32_t steps = batch == 1 ? a.steps : std::max<std::uint32_t>(8, a.steps * 2 / (batch + 2));
    Workload w =
        make_workload(*tr, tokens, layer_ids, batch, steps, batch == 1 ? a.warmup : std::max(2u, a.warmup / batch));
    if (routing_out)
      for (std::uint32_t s = 0; s < w.steps; ++s)
        for (std::uint32_t l = 0; l < a.layers; ++l)
          for (std::uint32_t b = 0; b < batch; ++b) {
            const auto& r = w.routing[s][l][b];
            std::fprintf(routing_out, "%u %u %u %u %u %u %u %.6f %.6f\n", batch, s, s < w.warmup ? 0 : 1, l, b,
                         r.experts[0], r.experts[1], r.weights[0], r.weights[1]);
          }
    std::printf("\n== batch %u: %u warm-up + %u measured steps\n", batch, w.warmup, w.steps - w.warmup);
    std::fflush(stdout);
    moex::ExecutorConfig full;
    full.cache_bytes = all_bytes;
    Row res = run_row<LruP>(c, w, "all resident (compute floor)", 1.0, full, {}, {});
    rows.push_back(res);
    const double tokens_measured = double(w.steps - w.warmup) * batch;
    const double scale = double(a.model_layers) / a.layers;
    for (double budget : a.budgets) {
      const std::uint64_t cb = static_cast<std::uint64_t>(budget * double(all_bytes));
      const std::size_t slots = cb / c.expert_bytes;
      const double belady_bytes =
          double(belady_misses(w, a.layers, 8, slots)) * double(c.expert_bytes) / tokens_measured * scale;
      const double floor_ms =
          std::max(res.ok ? res.ms_per_token : 0.0, belady_bytes / double(c.pcie_rate + c.host_rate) * 1e3);
      moex::ExecutorConfig ec;
      ec.cache_bytes = cb;
      auto replay = [&]() {
        auto r = moex::PreGateRouter::replay(w.replay, 1, a.recall, 7);
        return r ? std::move(*r) : moex::PreGateRouter{};
      };
      std::vector<Row> br;
      br.push_back(run_row<LruP>(c, w, "on-demand LRU (baseline)", budget, ec, {}, {}));
      br.push_back(run_row<PrefetchP>(c, w, "+ prefetch (replay)", budget, ec, replay(), {}));
      // Per-layer budgets: AdapMoE's DP over LRU miss curves of the replayed tokens.
      moex::ExecutorConfig lb = ec;
      if (auto curves = moex::profile_miss_curves(w.profile, 8); curves) {
        if (auto split = moex::dp_layer_split(*curves, static_cast<std::uint32_t>(slots), 1); split)
          lb.layer_cache_bytes = moex::slots_to_bytes(*split, c.expert_bytes);
      }
      if (!lb.layer_cache_bytes.empty())
        br.push_back(run_row<PrefetchP>(c, w, "+ per-layer budgets", budget, lb, replay(), {}));
      if (a.low) {
        moex::ExecutorConfig lo = ec;
        lo.low_precision = moex::Precision::kInt4;
        br.push_back(run_row<HobbitP>(c, w, "+ prefetch + int4 on miss (HOBBIT)", budget, lo, replay(), {}));
      }
      br.push_back(
          run_row<CostP>(c, w, "+ prefetch + CPU compute of misses", budget, ec, replay(), moex::CostModelMiss{}));
      // Without prefetch: at batch 1 the link is saturated and prefetches only displace residents.
      br.push_back(
          run_row<CostNoPfP>(c, w, "CPU compute of misses, no prefetch", budget, ec, {}, moex::CostModelMiss{}));
      {
        moex::ExecutorConfig all = lb;
        moex::CostModelMiss m;
        if (a.low) {
          all.low_precision = moex::Precision::kInt4;
          m.mixed_precision = true;
        }
        Row r = run_row<CostNoPfP>(c, w, "everything but prefetch", budget, all, {}, m);
        if (!r.ok) {
          all.layer_cache_bytes.clear();
          all.cache_bytes = cb;
          r = run_row<CostNoPfP>(c, w, "everything but prefetch (one pool)", budget, all, {}, m);
        }
        br.push_back(r);
      }
      {
        moex::ExecutorConfig all = lb;
        moex::CostModelMiss m;
        if (a.low) {
          all.low_precision = moex::Precision::kInt4;
          m.mixed_precision = true;
        }
        Row r = run_row<CostP>(c, w, "everything", budget, all, replay(), m);
        if (!r.ok) {  // per-layer budgets with a low-precision pool may not combine: say so, run without
          std::printf("  everything with per-layer budgets: %s; rerun with one pool\n", r.error.c_str());
          all.layer_cache_bytes.clear();
          all.cache_bytes = cb;
          r = run_row<CostP>(c, w, "everything (one pool)", budget, all, replay(), m);
        }
        br.push_back(r);
      }
      for (Row& r : br) {
        r.floor_ms = floor_ms;
        rows.push_back(r);
      }
      std::printf("  budget %.0f%%: Belady-unavoidable %.0f MB/token -> floor %.1f ms/token\n", budget * 100,
                  belady_bytes / 1e6, floor_ms);
      std::fflush(stdout);
    }
  }
  if (routing_out) std::fclose(routing_out);

  // ---- the simulator's predictions (batch 1; LRU, LRU + per-layer DP; resident = no link) ----
  double gpu_rate = 0;
  for (const Row& r : rows)
    if (r.batch == 1 && r.budget >= 1.0 && r.ok)
      gpu_rate = 2.0 * double(c.expert_bytes) * a.model_layers / (r.ms_per_token * 1e-3);  // top-2 per layer
  if (gpu_rate > 0) {
    Workload w1 = make_workload(*tr, tokens, layer_ids, 1, a.steps, a.warmup);
    moex::DeviceProfile prof;
    prof.name = "measured-in-run";
    prof.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, c.pcie_rate};
    prof.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)].read_bytes_per_s =
        static_cast<std::uint64_t>(gpu_rate);
    prof.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)].read_bytes_per_s = c.host_rate;
    for (Row& r : rows) {
      if (r.batch != 1) continue;
      moex::SimRunConfig sc;
      sc.trace = &w1.profile;
      sc.begin_token = w1.warmup;
      sc.end_token = w1.steps;
      sc.shape = {"mixtral", c.shape};
      sc.profile = prof;
      sc.budget_fraction = std::min(1.0, r.budget);
      if (r.budget >= 1.0) {
        sc.profile.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, 0};  // preloaded
        sc.policy = moex::SimPolicy::kLru;
        r.sim_policy = "lru, no link";
      } else if (r.name.rfind("on-demand", 0) == 0) {
        sc.policy = moex::SimPolicy::kLru;
        r.sim_policy = "lru";
      } else if (r.name == "+ per-layer budgets") {
        sc.policy = moex::SimPolicy::kLruLayerDp;
        r.sim_policy = "lru-dp (no prefetch)";
      } else {
        continue;
      }
      auto sr = moex::run_simulation(sc);
      if (sr)
        r.sim_ms = sr->ms_per_token * double(a.model_layers) / a.layers;
      else
        r.sim_policy += " (" + sr.status().to_string() + ")";
    }
  }

  // ---- output --------------------------------------------------------------------------------
  std::FILE* csv = std::fopen((a.out + "/e2e.csv").c_str(), "w");
  if (csv)
    std::fprintf(csv,
                 "batch,budget,row,tok_s,ms_per_token,hit_rate,pcie_mb_per_token,pcie_busy,cpu_busy,stall_ms_per_token,"
                 "floor_ms,ratio_to_floor,sim_policy,sim_ms,sim_diff,at_source,low_loads,skipped,error\n");
  std::printf(
      "\nper token scaled to %u layers (measured on %u); floor = max(all resident, Belady-unavoidable bytes / "
      "(PCIe %.1f + host %.1f GB/s))\n",
      a.model_layers, a.layers, double(c.pcie_rate) / 1e9, double(c.host_rate) / 1e9);
  std::printf(
      "| batch | budget | row | tok/s | ms/token | hit | PCIe MB/tok | PCIe busy | CPU busy | stall ms/tok | floor ms "
      "| "
      "x floor | sim ms (policy) | sim diff |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    const double ratio = r.floor_ms > 0 ? r.ms_per_token / r.floor_ms : (r.budget >= 1.0 ? 1.0 : 0.0);
    const double diff = r.sim_ms > 0 ? (r.ms_per_token - r.sim_ms) / r.sim_ms : 0.0;
    if (!r.ok) {
      std::printf("| %u | %.0f%% | %s | error: %s |\n", r.batch, r.budget * 100, r.name.c_str(), r.error.c_str());
    } else {
      std::printf("| %u | %.0f%% | %s | %.2f | %.1f | %.3f | %.0f | %.2f | %.2f | %.1f | %.1f | %.2f | %s | %s |\n",
                  r.batch, r.budget * 100, r.name.c_str(), r.tok_s, r.ms_per_token, r.hit_rate, r.pcie_mb_per_token,
                  r.pcie_busy, r.cpu_busy, r.stall_ms_per_token, r.floor_ms, ratio,
                  r.sim_ms > 0 ? (std::to_string(r.sim_ms).substr(0, 6) + " (" + r.sim_policy + ")").c_str() : "-",
                  r.sim_ms > 0 ? (std::to_string(diff * 100).substr(0, 5) + "%").c_str() : "-");
    }
    if (csv)
      std::fprintf(
          csv, "%u,%.2f,\"%s\",%.4f,%.3f,%.4f,%.1f,%.3f,%.3f,%.3f,%.3f,%.3f,\"%s\",%.3f,%.4f,%llu,%llu,%llu,\"%s\"\n",
          r.batch, r.budget, r.name.c_str(), r.tok_s, r.ms_per_token, r.hit_rate, r.pcie_mb_per_token, r.pcie_busy,
          r.cpu_busy, r.stall_ms_per_token, r.floor_ms, ratio, r.sim_policy.c_str(), r.sim_ms, diff,
          static_cast<unsigned long long>(r.at_source), static_cast<unsigned long long>(r.low_loads),
          static_cast<unsigned long long>(r.skipped), r.error.c_str());
  }
  if (csv) std::fclose(csv);
  (void)moex::CudaExecutionBackend::unregister_store(*store);
  // The pinned masters are released at exit (the store's views point into them).
  return 0;
}
