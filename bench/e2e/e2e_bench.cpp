// moex_e2e_bench: decode through a stack of MoE layers of real model shapes on one GPU, the
// experts' master copies in pinned host RAM, under GPU budgets of a fraction of the expert bytes;
// one row per policy combination, each beside the floor and the simulator's prediction of the
// very same executor configuration (issue 9). See bench/e2e/README.md for the method.
//
// Usage: moex_e2e_bench --shape mixtral|qwen3 [--trace FILE]... [--live] [--layers 8]
//          [--layer-stride S] [--batches 1,4,16] [--budgets 0.1,0.25,0.5] [--live-budgets 0.25]
//          [--steps 24] [--warmup 6] [--recall 0.9] [--gate-keep 0.875] [--host-threads N]
//          [--rows lru,prefetch,...] [--no-low] [--no-timeline] [--out DIR]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

#include "moex/backend/cuda_execution_backend.hpp"
#include "moex/backend/sim_execution_backend.hpp"
#include "moex/cache/layer_budget.hpp"
#include "moex/executor/moe_layer_executor.hpp"
#include "moex/formats/trace.hpp"
#include "moex/gate/sensitivity_gate.hpp"
#include "moex/policies/cost_model_miss.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/route/pre_gate_router.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using moex::ExpertKey;
using moex::LoadTicket;
using moex::Precision;
using moex::Status;

double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

struct Args {
  std::string shape = "mixtral";
  std::vector<std::string> traces;
  bool live = false;
  std::uint32_t layers = 8, stride = 0, steps = 24, warmup = 6, host_threads = 0;
  std::vector<std::uint32_t> batches{1, 4, 16};
  std::vector<double> budgets{0.1, 0.25, 0.5};
  std::vector<double> live_budgets{0.25};
  float recall = 0.9f;
  double gate_keep = 0.875;
  bool low = true;
  bool timeline = true;
  bool dry_run = false;        // no GPU: simulated rows only, nominal H100 rates (checks the pipeline)
  std::set<std::string> rows;  // empty = all
  std::string out = ".";
};

template <class T>
std::vector<T> parse_list(const std::string& s) {
  std::vector<T> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if constexpr (std::is_same_v<T, std::string>)
      v.push_back(item);
    else
      v.push_back(static_cast<T>(std::stod(item)));
  }
  return v;
}

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
  return false;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// ---- the rows ---------------------------------------------------------------------------------
struct RowSpec {
  const char* key;
  const char* label;
  bool resident, prefetch, layers, gate, low, cpu, spare;
  const char* fidelity;  // static: measured on the shared tiny models (bench/RESULTS-quality.md)
};
constexpr RowSpec kRows[] = {
    {"resident", "all resident (floor)", true, false, false, false, false, false, false, "exact"},
    {"lru", "on-demand LRU (baseline)", false, false, false, false, false, false, false, "exact"},
    {"prefetch", "+ speculative prefetch", false, true, false, false, false, false, false, "exact"},
    {"layers", "+ per-layer budgets, best eviction", false, false, true, false, false, false, false, "exact"},
    {"gate", "+ adaptive gating", false, false, false, true, false, false, false, "[a]"},
    {"low", "+ int4 on miss (HOBBIT)", false, false, false, false, true, false, false, "[b]"},
    {"cpu", "+ CPU compute of misses", false, false, false, false, false, true, false, "exact"},
    {"exact2", "exact: CPU + link, prefetch on spare link", false, true, false, false, false, true, true, "exact"},
    {"all", "everything", false, true, true, true, true, true, false, "[a]+[b]"},
};

// ---- timelines (chrome://tracing) --------------------------------------------------------------
enum Tid : int { kTidCopy = 0, kTidGpu = 1, kTidHost = 2, kTidLayer = 3 };
struct TlEvent {
  std::string name;
  int tid = 0;
  std::uint64_t t0 = 0, t1 = 0;  // ns, backend clock
};
struct Timeline {
  std::string process;
  std::uint64_t origin = 0;
  std::vector<TlEvent> ev;
};

// ---- shared context ----------------------------------------------------------------------------
struct EventPool {
  std::vector<cudaEvent_t> ev;
  std::size_t next = 0;
};

struct Ctx {
  Args args;
  const moex::ExpertStore* store = nullptr;
  moex::ExpertShape shape{};
  std::uint32_t E = 8, K = 2, L = 8, model_layers = 32;
  std::uint64_t expert_bytes = 0, low_bytes = 0;
  std::uint64_t pcie_rate = 0, host_rate = 0;
  moex::DeviceProfile profile;                                     // from the rates measured in this run
  std::unordered_map<const std::byte*, std::uint32_t> key_of_ptr;  // master / int4 w1 pointer -> packed key
  EventPool* events = nullptr;
  std::vector<float> hidden;  // [max batch x hidden], replayed runs
};

std::uint32_t pack(ExpertKey k) { return k.layer << 16 | k.expert; }
std::string key_name(std::uint32_t p) { return "L" + std::to_string(p >> 16) + "/E" + std::to_string(p & 0xFFFFu); }

// ---- backends with a timeline ------------------------------------------------------------------
struct Snap {
  std::uint64_t now = 0, link_bytes = 0, link_busy_ns = 0, host_busy_ns = 0;
};

// CudaExecutionBackend with cudaEvents around its operations on its own streams (only while a
// timeline step is recorded). Loads are drawn ending at their event, lasting bytes / PCIe rate;
// GPU experts from the later of their launch and their slot's fill. Host experts: the host
// worker's busy time between two syncs shared equally among the experts it ran (approximate).
class CudaTraced {
 public:
  static constexpr bool kHasData = true;
  CudaTraced(moex::CudaExecutionBackend b, const Ctx* c) : b_(std::move(b)), c_(c) {}

  std::uint64_t now_ns() const noexcept { return b_.now_ns(); }
  Status allocate_slots(Precision p, std::size_t bytes, std::size_t n) noexcept {
    return b_.allocate_slots(p, bytes, n);
  }
  std::size_t slot_count(Precision p) const noexcept { return b_.slot_count(p); }
  Status start_load(Precision pool, std::size_t slot, const moex::ExpertView& src, LoadTicket& t) noexcept {
    const std::uint64_t sk = slot_id(pool, slot);
    const auto it = c_->key_of_ptr.find(src.w1_data);
    slot_key_[sk] = it == c_->key_of_ptr.end() ? 0xFFFFFFFFu : it->second;
    if (!tracing_) return b_.start_load(pool, slot, src, t);
    const int e0 = record(b_.copy_stream());
    Status s = b_.start_load(pool, slot, src, t);
    const int e1 = record(b_.copy_stream());
    if (e0 >= 0 && e1 >= 0) {
      fill_[sk] = gpu_.size();
      gpu_.push_back({"load " + key_name(slot_key_[sk]) + " " + std::string(moex::to_string(pool)), kTidCopy, e0, e1,
                      src.layout.total_bytes, SIZE_MAX});
    }
    return s;
  }
  Status wait_load(LoadTicket t) noexcept { return b_.wait_load(t); }
  bool load_done(LoadTicket t) noexcept { return b_.load_done(t); }
  void cancel_load(LoadTicket t) noexcept { b_.cancel_load(t); }
  moex::ExpertView slot_view(Precision p, std::size_t slot, const moex::ExpertLayout& l) const noexcept {
    return b_.slot_view(p, slot, l);
  }
  Status expert_ffn(const moex::ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    if (!tracing_) return b_.expert_ffn(e, x, n, y);
    // The executor passes slot_view(p, slot, ...); find the slot by its device pointer.
    const int e0 = record(b_.compute_stream());
    Status s = b_.expert_ffn(e, x, n, y);
    const int e1 = record(b_.compute_stream());
    std::uint32_t key = 0xFFFFFFFFu;
    std::size_t fill = SIZE_MAX;
    const Precision p = e.layout.format.precision;
    for (std::size_t slot = 0; slot < b_.slot_count(p); ++slot)
      if (b_.slot_view(p, slot, e.layout).w1_data == e.w1_data) {
        const std::uint64_t sk = slot_id(p, slot);
        if (auto k = slot_key_.find(sk); k != slot_key_.end()) key = k->second;
        if (auto f = fill_.find(sk); f != fill_.end()) fill = f->second;
        break;
      }
    if (e0 >= 0 && e1 >= 0)
      gpu_.push_back({key_name(key) + " " + std::string(moex::to_string(p)) + " n=" + std::to_string(n), kTidGpu, e0,
                      e1, 0, fill});
    return s;
  }
  Status expert_ffn_at_source(const moex::ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    if (tracing_) {
      const auto it = c_->key_of_ptr.find(e.w1_data);
      host_q_.push_back(
          {"host " + key_name(it == c_->key_of_ptr.end() ? 0xFFFFFFFFu : it->second) + " n=" + std::to_string(n),
           kTidHost, b_.now_ns(), 0});
    }
    return b_.expert_ffn_at_source(e, x, n, y);
  }
  Status sync() noexcept {
    const std::uint64_t busy0 = b_.counters().host_busy_ns;
    Status s = b_.sync();
    if (tracing_ && !host_q_.empty()) {
      const std::uint64_t busy = b_.counters().host_busy_ns - std::min(busy0, b_.counters().host_busy_ns);
      const std::uint64_t each = busy / host_q_.size();
      std::uint64_t t = 0;
      for (TlEvent& h : host_q_) {
        h.t0 = std::max(h.t0, t);
        h.t1 = h.t0 + each;
        t = h.t1;
        host_.push_back(h);
      }
      host_q_.clear();
    }
    return s;
  }
  std::uint64_t load_eta_ns(std::size_t bytes) const noexcept { return b_.load_eta_ns(bytes); }
  std::uint64_t source_eta_ns(const moex::ExpertLayout& l, std::size_t n) const noexcept {
    return b_.source_eta_ns(l, n);
  }

  Snap snap() const noexcept {
    const auto& k = b_.counters();
    return {b_.now_ns(), k.load_bytes,
            c_->pcie_rate ? static_cast<std::uint64_t>(double(k.load_bytes) * 1e9 / double(c_->pcie_rate)) : 0,
            k.host_busy_ns};
  }
  void begin_trace() noexcept {
    if (c_->events == nullptr) return;
    cudaDeviceSynchronize();
    base_ = record(b_.compute_stream());
    if (base_ < 0) return;
    cudaEventSynchronize(c_->events->ev[static_cast<std::size_t>(base_)]);
    base_host_ = b_.now_ns();
    tracing_ = true;
  }
  void end_trace(Timeline& tl) noexcept {
    if (!tracing_) return;
    tracing_ = false;
    cudaDeviceSynchronize();
    auto at = [&](int e) -> std::uint64_t {
      float ms = 0;
      cudaEventElapsedTime(&ms, c_->events->ev[static_cast<std::size_t>(base_)],
                           c_->events->ev[static_cast<std::size_t>(e)]);
      return base_host_ + static_cast<std::uint64_t>(std::max(0.0, double(ms) * 1e6));
    };
    std::vector<std::uint64_t> ends(gpu_.size());
    for (std::size_t i = 0; i < gpu_.size(); ++i) {
      const Pending& g = gpu_[i];
      const std::uint64_t a = at(g.e0), b = at(g.e1);
      ends[i] = b;
      std::uint64_t start = a;
      if (g.tid == kTidCopy && c_->pcie_rate)
        start = std::max(a, b - std::min(b, static_cast<std::uint64_t>(double(g.bytes) * 1e9 / double(c_->pcie_rate))));
      if (g.tid == kTidGpu && g.fill < i) start = std::max(a, ends[g.fill]);
      tl.ev.push_back({g.name, g.tid, std::min(start, b), b});
    }
    for (TlEvent& h : host_) tl.ev.push_back(h);
    gpu_.clear();
    host_.clear();
    host_q_.clear();
    c_->events->next = 0;
  }
  moex::CudaExecutionBackend& inner() noexcept { return b_; }

 private:
  struct Pending {
    std::string name;
    int tid;
    int e0, e1;
    std::uint64_t bytes;
    std::size_t fill;  // index of the load that filled the slot (GPU compute), SIZE_MAX: none traced
  };
  static std::uint64_t slot_id(Precision p, std::size_t slot) {
    return std::uint64_t{static_cast<std::uint8_t>(p)} << 40 | slot;
  }
  int record(void* stream) noexcept {
    EventPool* pool = c_->events;
    if (pool == nullptr || pool->next >= pool->ev.size()) return -1;
    const std::size_t i = pool->next++;
    if (cudaEventRecord(pool->ev[i], static_cast<cudaStream_t>(stream)) != cudaSuccess) return -1;
    return static_cast<int>(i);
  }

  moex::CudaExecutionBackend b_;
  const Ctx* c_;
  bool tracing_ = false;
  int base_ = -1;
  std::uint64_t base_host_ = 0;
  std::unordered_map<std::uint64_t, std::uint32_t> slot_key_;
  std::unordered_map<std::uint64_t, std::size_t> fill_;
  std::vector<Pending> gpu_;
  std::vector<TlEvent> host_q_, host_;
};
static_assert(moex::ExecutionBackend<CudaTraced>);

// SimExecutionBackend with its queue times recorded, plus a fixed host overhead per layer step
// (sync) calibrated from the measured all-resident row of the same batch.
class SimTraced {
 public:
  static constexpr bool kHasData = false;
  SimTraced(moex::DeviceProfile p, std::uint64_t overhead_ns, const Ctx* c)
      : b_(std::move(p)), overhead_(overhead_ns), c_(c) {}

  std::uint64_t now_ns() const noexcept { return b_.now_ns(); }
  Status allocate_slots(Precision p, std::size_t bytes, std::size_t n) noexcept {
    return b_.allocate_slots(p, bytes, n);
  }
  std::size_t slot_count(Precision p) const noexcept { return b_.slot_count(p); }
  Status start_load(Precision pool, std::size_t slot, const moex::ExpertView& src, LoadTicket& t) noexcept {
    const auto it = c_->key_of_ptr.find(src.w1_data);
    const std::uint32_t key = it == c_->key_of_ptr.end() ? 0xFFFFFFFFu : it->second;
    slot_key_[std::uint64_t{static_cast<std::uint8_t>(pool)} << 40 | slot] = key;
    Status s = b_.start_load(pool, slot, src, t);
    if (tracing_ && s.is_ok()) {
      const auto& lp = b_.sim().profile().links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)];
      const std::uint64_t end = b_.sim().link_free_at(moex::SimLink::kHostToDevice);
      const std::uint64_t dur = lp.latency_ns + moex::sim_duration_ns(src.layout.total_bytes, lp.bytes_per_s);
      ev_.push_back({"load " + key_name(key) + " " + std::string(moex::to_string(pool)), kTidCopy,
                     end - std::min(end, dur), end});
    }
    return s;
  }
  Status wait_load(LoadTicket t) noexcept { return b_.wait_load(t); }
  bool load_done(LoadTicket t) noexcept { return b_.load_done(t); }
  void cancel_load(LoadTicket t) noexcept { b_.cancel_load(t); }
  moex::ExpertView slot_view(Precision p, std::size_t slot, const moex::ExpertLayout& l) const noexcept {
    moex::ExpertView v = b_.slot_view(p, slot, l);
    // A fake, unique pointer so that expert_ffn can name the slot (never dereferenced).
    v.w1_data = reinterpret_cast<const std::byte*>(std::uintptr_t{1} +
                                                   (std::uintptr_t{static_cast<std::uint8_t>(p)} << 40 | slot));
    return v;
  }
  Status expert_ffn(const moex::ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    Status s = b_.expert_ffn(e, x, n, y);
    if (tracing_) {
      const std::uint64_t sk = reinterpret_cast<std::uintptr_t>(e.w1_data) - 1;
      const auto it = slot_key_.find(sk);
      add_compute(moex::SimDevice::kGpu, e, n,
                  key_name(it == slot_key_.end() ? 0xFFFFFFFFu : it->second) + " " +
                      std::string(moex::to_string(e.layout.format.precision)) + " n=" + std::to_string(n),
                  kTidGpu);
    }
    return s;
  }
  Status expert_ffn_at_source(const moex::ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    Status s = b_.expert_ffn_at_source(e, x, n, y);
    if (tracing_) {
      const auto it = c_->key_of_ptr.find(e.w1_data);
      add_compute(moex::SimDevice::kHostCpu, e, n,
                  "host " + key_name(it == c_->key_of_ptr.end() ? 0xFFFFFFFFu : it->second) + " n=" + std::to_string(n),
                  kTidHost);
    }
    return s;
  }
  Status sync() noexcept {
    Status s = b_.sync();
    b_.sim().advance_to(b_.sim().now() + overhead_);
    return s;
  }
  std::uint64_t load_eta_ns(std::size_t bytes) const noexcept { return b_.load_eta_ns(bytes); }
  std::uint64_t source_eta_ns(const moex::ExpertLayout& l, std::size_t n) const noexcept {
    return b_.source_eta_ns(l, n);
  }

  Snap snap() const noexcept {
    const auto& sim = b_.sim();
    return {sim.now(), sim.link_stats(moex::SimLink::kHostToDevice).bytes,
            sim.link_stats(moex::SimLink::kHostToDevice).busy_ns, sim.device_stats(moex::SimDevice::kHostCpu).busy_ns};
  }
  void begin_trace() noexcept { tracing_ = true; }
  void end_trace(Timeline& tl) noexcept {
    tracing_ = false;
    for (TlEvent& e : ev_) tl.ev.push_back(std::move(e));
    ev_.clear();
  }

 private:
  void add_compute(moex::SimDevice d, const moex::ExpertView& e, std::size_t n, std::string name, int tid) {
    const std::uint64_t end = b_.sim().device_free_at(d);
    const std::uint64_t dur =
        b_.sim().compute_ns(d, e.layout.format.precision, e.layout.total_bytes, moex::expert_flops(e.layout.shape, n));
    ev_.push_back({std::move(name), tid, end - std::min(end, dur), end});
  }

  moex::SimExecutionBackend b_;
  std::uint64_t overhead_;
  const Ctx* c_;
  bool tracing_ = false;
  std::unordered_map<std::uint64_t, std::uint32_t> slot_key_;
  std::vector<TlEvent> ev_;
};
static_assert(moex::ExecutionBackend<SimTraced>);

// ---- predictor: a PreGateRouter, optionally only while the link has nothing queued -------------
struct BenchPredictor {
  moex::PreGateRouter inner;
  std::function<bool()> link_idle;  // empty: always predict

  Status predict(const moex::PredictContext& c, std::vector<moex::Prediction>& out) {
    if (inner.depth() == 0 || (link_idle && !link_idle())) return Status::ok();
    return inner.predict(c, out);
  }
  std::uint32_t depth() const noexcept { return inner.depth(); }
  std::string_view name() const noexcept { return link_idle ? "spare-link" : inner.name(); }
};
static_assert(moex::Predictor<BenchPredictor>);

template <class E, class B>
struct BenchP : moex::DefaultPolicies {
  using Eviction = E;
  using Gate = moex::SensitivityGate;
  using Backend = B;
  using Predictor = BenchPredictor;
  using Miss = moex::CostModelMiss;
};

// ---- workload: the routing of the measured layers, step by step --------------------------------
struct Workload {
  std::string name;
  std::uint32_t batch = 1;
  std::uint32_t warmup = 0, measured = 0, steps = 0;                  // steps = warmup + measured + 1 (timeline step)
  std::vector<std::vector<std::vector<moex::TokenRouting>>> routing;  // [step][layer][b]
  moex::RoutingTrace replay;   // one "token" per step: the union of the batch's experts (PreGateRouter::replay)
  moex::RoutingTrace profile;  // batch-1 trace of the tokens used (miss curves, gate, HOBBIT thresholds)
  bool live = false;
};

Workload make_workload(const moex::RoutingTrace& tr, const std::vector<std::uint32_t>& tokens,
                       const std::vector<std::uint32_t>& layer_ids, std::uint32_t batch, std::uint32_t warmup,
                       std::uint32_t measured) {
  Workload w;
  w.batch = batch;
  const std::uint32_t L = static_cast<std::uint32_t>(layer_ids.size());
  const std::uint32_t avail = static_cast<std::uint32_t>(tokens.size() / batch);
  w.warmup = std::min(warmup, avail / 4);
  w.measured = std::min(measured, avail > w.warmup + 1 ? avail - w.warmup - 1 : 0);
  w.steps = w.warmup + w.measured + 1;
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
        moex::TokenRouting r;
        moex::routing_at(tr, tokens[s * batch + b], layer_ids[li], r);
        for (std::uint32_t j = 0; j < r.k; ++j) u[r.experts[j]] = std::max(u[r.experts[j]], r.weights[j]);
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
      moex::TokenRouting r;
      moex::routing_at(tr, tokens[s], layer_ids[li], r);
      for (std::uint32_t j = 0; j < tr.top_k; ++j) {
        w.profile.expert_ids.push_back(j < r.k ? r.experts[j] : moex::kNoExpert);
        w.profile.gate_weights.push_back(j < r.k ? r.weights[j] : 0.f);
      }
    }
  return w;
}

// The fixed rule mapping a coarser trace (E_s experts, top-k_s) onto E_t experts top-k_t (E_t a
// multiple of E_s): fine-grained segmentation (DeepSeekMoE, Qwen3) splits each source expert e
// into m = E_t / E_s experts m*e .. m*e+m-1, each with 1/m of its gate weight; a token takes the
// sub-experts of its source experts in the source's weight order until it has k_t (so the top
// k_t / m source experts, every sub-expert of each), weights renormalized to sum 1.
moex::Result<moex::RoutingTrace> map_fine_grained(const moex::RoutingTrace& src, std::uint32_t et, std::uint32_t kt) {
  if (src.n_experts == 0 || et % src.n_experts != 0)
    return moex::invalid_argument("trace mapping: " + std::to_string(et) +
                                  " experts is not a multiple of the trace's " + std::to_string(src.n_experts));
  const std::uint32_t m = et / src.n_experts;
  if (src.top_k * m < kt)
    return moex::invalid_argument("trace mapping: top-" + std::to_string(src.top_k) + " x " + std::to_string(m) +
                                  " sub-experts is fewer than top-" + std::to_string(kt));
  moex::RoutingTrace t;
  t.n_layers = src.n_layers;
  t.n_experts = et;
  t.top_k = kt;
  t.seq_start = src.seq_start;
  t.source = src.source + " (segmented x" + std::to_string(m) + ", top-" + std::to_string(kt) + ")";
  for (std::size_t tok = 0; tok < src.tokens(); ++tok)
    for (std::uint32_t l = 0; l < src.n_layers; ++l) {
      moex::TokenRouting r;
      std::vector<std::pair<float, std::uint32_t>> by_w;
      if (moex::routing_at(src, tok, l, r))
        for (std::uint32_t j = 0; j < r.k; ++j) by_w.emplace_back(-r.weights[j], r.experts[j]);
      std::stable_sort(by_w.begin(), by_w.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      std::vector<std::pair<std::uint32_t, float>> picked;
      for (const auto& [nw, e] : by_w)
        for (std::uint32_t j = 0; j < m && picked.size() < kt; ++j) picked.emplace_back(m * e + j, -nw / float(m));
      float sum = 0.f;
      for (const auto& p : picked) sum += p.second;
      for (std::uint32_t j = 0; j < kt; ++j) {
        t.expert_ids.push_back(j < picked.size() ? picked[j].first : moex::kNoExpert);
        t.gate_weights.push_back(j < picked.size() && sum > 0.f ? picked[j].second / sum : 0.f);
      }
    }
  return t;
}

// Belady misses over the step sequence (warm-up included, measured misses counted).
std::uint64_t belady_misses(const Workload& w, std::uint32_t L, std::uint32_t E, std::size_t slots) {
  std::vector<std::uint32_t> seq;
  std::vector<std::uint8_t> measured;
  for (std::uint32_t s = 0; s < w.warmup + w.measured; ++s)
    for (std::uint32_t l = 0; l < L; ++l) {
      std::set<std::uint32_t> u;
      for (const auto& r : w.routing[s][l])
        for (std::uint32_t j = 0; j < r.k; ++j) u.insert(r.experts[j]);
      for (auto e : u) {
        seq.push_back(l * E + e);
        measured.push_back(s >= w.warmup);
      }
    }
  const std::size_t n = seq.size();
  std::vector<std::size_t> next(n, SIZE_MAX);
  std::unordered_map<std::uint32_t, std::size_t> last;
  for (std::size_t i = n; i-- > 0;) {
    auto it = last.find(seq[i]);
    next[i] = it == last.end() ? SIZE_MAX : it->second;
    last[seq[i]] = i;
  }
  std::set<std::pair<std::size_t, std::uint32_t>> by_next;  // (next use, key)
  std::unordered_map<std::uint32_t, std::size_t> cache;     // key -> next use
  std::uint64_t misses = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto it = cache.find(seq[i]);
    if (it != cache.end()) {
      by_next.erase({it->second, seq[i]});
      it->second = next[i];
      by_next.insert({next[i], seq[i]});
      continue;
    }
    misses += measured[i];
    if (cache.size() >= slots && !by_next.empty()) {
      auto victim = std::prev(by_next.end());
      cache.erase(victim->second);
      by_next.erase(victim);
    }
    cache[seq[i]] = next[i];
    by_next.insert({next[i], seq[i]});
  }
  return misses;
}

// HOBBIT's unimportance of every non-top expert of the profile tokens: their median.
float median_unimportance(const moex::RoutingTrace& tr) {
  std::vector<float> u;
  for (std::size_t t = 0; t < tr.tokens(); ++t)
    for (std::uint32_t l = 0; l < tr.n_layers; ++l) {
      moex::TokenRouting r;
      if (!moex::routing_at(tr, t, l, r)) continue;
      float total = 0.f, before = 0.f;
      for (std::uint32_t j = 0; j < r.k; ++j) total += r.weights[j];
      for (std::uint32_t j = 0; j + 1 < r.k; ++j) {
        before += r.weights[j];
        if (total > 0.f) u.push_back(before / total);
      }
    }
  if (u.empty()) return 0.6f;
  std::nth_element(u.begin(), u.begin() + static_cast<std::ptrdiff_t>(u.size() / 2), u.end());
  return u[u.size() / 2];
}

// ---- one executor run --------------------------------------------------------------------------
struct Setup {
  moex::ExecutorConfig ec;
  moex::SensitivityGate gate;
  moex::CostModelMiss miss;
  std::function<BenchPredictor()> predictor;  // empty: none
  bool spare = false, resident = false;
};

struct RunOut {
  bool ok = false;
  std::string error;
  double seconds = 0;  // measured steps, backend clock
  moex::LayerStats total;
  Snap delta;
  double recall = 0;
  moex::RoutingTrace recorded;  // routing used (live runs)
};

// Live hidden states: token (s, b)'s input is a fixed random vector; each layer adds its MoE
// output to the residual stream and feeds the layer its RMS-normalized value.
void live_input(std::uint32_t s, std::uint32_t b, std::size_t h, float* x) {
  std::uint64_t st = 0x9E3779B97F4A7C15ull * (std::uint64_t{s} * 131 + b + 1);
  auto next = [&]() {
    st += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = st;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return double((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
  };
  for (std::size_t i = 0; i < h; ++i) {
    const double u1 = std::max(next(), 1e-300), u2 = next();
    x[i] = static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
}
void rms_norm(const float* h, std::size_t n, float* x) {
  double ss = 0;
  for (std::size_t i = 0; i < n; ++i) ss += double(h[i]) * h[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / double(n) + 1e-6));
  for (std::size_t i = 0; i < n; ++i) x[i] = h[i] * inv;
}

template <class E, class B>
RunOut run_exec(const Ctx& c, const Workload& w, Setup su, B backend, Timeline* tl, E eviction) {
  RunOut o;
  BenchPredictor pred;
  if (su.predictor) pred = su.predictor();
  auto ex = moex::MoeLayerExecutor<BenchP<E, B>>::create(*c.store, su.ec, std::move(backend), std::move(eviction),
                                                         su.gate, std::move(pred), su.miss);
  if (!ex) {
    o.error = ex.status().to_string();
    return o;
  }
  auto& x = *ex;
  if (su.spare) {
    B* be = &x.backend();
    x.predictor().link_idle = [be]() { return be->load_eta_ns(0) <= be->now_ns() + 1000; };
  }
  constexpr bool data = B::kHasData;
  const std::size_t h = c.shape.hidden;
  const std::uint32_t n = w.batch;
  std::vector<float> hs(data ? std::size_t{n} * h : 0), xs(hs.size()), ys(hs.size());
  const bool live = w.live && data;
  Timeline* spans = nullptr;  // layer spans: the timeline step only
  auto run_step = [&](std::uint32_t s) -> Status {
    if (live)
      for (std::uint32_t b = 0; b < n; ++b) live_input(s, b, h, &hs[std::size_t{b} * h]);
    for (std::uint32_t l = 0; l < c.L; ++l) {
      const std::uint64_t t0 = spans ? x.backend().now_ns() : 0;
      if (live) {
        for (std::uint32_t b = 0; b < n; ++b) rms_norm(&hs[std::size_t{b} * h], h, &xs[std::size_t{b} * h]);
        MOEX_RETURN_IF_ERROR(x.forward(l, xs.data(), n, ys.data()));
        for (std::size_t i = 0; i < hs.size(); ++i) hs[i] += ys[i];
      } else {
        MOEX_RETURN_IF_ERROR(
            x.forward_routed(l, w.routing[s][l], data ? c.hidden.data() : nullptr, n, data ? ys.data() : nullptr));
      }
      if (spans) spans->ev.push_back({"layer " + std::to_string(l), kTidLayer, t0, x.backend().now_ns()});
    }
    return Status::ok();
  };
  if (su.resident) {  // load every expert first (the budget holds them all)
    std::vector<moex::TokenRouting> rs(n);
    for (std::uint32_t l = 0; l < c.L; ++l)
      for (std::uint32_t e0 = 0; e0 < c.E; e0 += c.K) {
        moex::TokenRouting r;
        r.k = std::min(c.K, c.E - e0);
        for (std::uint32_t j = 0; j < r.k; ++j) {
          r.experts[j] = e0 + j;
          r.weights[j] = 1.f / float(r.k);
        }
        std::fill(rs.begin(), rs.end(), r);
        if (Status s = x.forward_routed(l, rs, data ? c.hidden.data() : nullptr, n, data ? ys.data() : nullptr);
            !s.is_ok()) {
          o.error = s.to_string();
          return o;
        }
      }
  }
  if (w.live) x.record_trace(true);
  for (std::uint32_t s = 0; s < w.warmup; ++s)
    if (Status st = run_step(s); !st.is_ok()) {
      o.error = st.to_string();
      return o;
    }
  if constexpr (data) cudaDeviceSynchronize();
  x.reset_stats();
  const Snap a = x.backend().snap();
  for (std::uint32_t s = w.warmup; s < w.warmup + w.measured; ++s)
    if (Status st = run_step(s); !st.is_ok()) {
      o.error = st.to_string();
      return o;
    }
  const Snap b = x.backend().snap();
  o.total = x.stats().total();
  o.recall = o.total.recall();
  o.seconds = double(b.now - a.now) * 1e-9;
  o.delta = {b.now - a.now, b.link_bytes - a.link_bytes, b.link_busy_ns - a.link_busy_ns,
             b.host_busy_ns - a.host_busy_ns};
  if (tl) {
    spans = tl;
    x.backend().begin_trace();
    tl->origin = x.backend().now_ns();
    if (Status st = run_step(w.steps - 1); !st.is_ok()) {
      o.error = st.to_string();
      return o;
    }
    x.backend().end_trace(*tl);
  } else if (w.live) {
    (void)run_step(w.steps - 1);  // so the recorded trace has every step
  }
  if (w.live) o.recorded = x.recorded_trace();
  o.ok = true;
  return o;
}

template <class B, class F>
RunOut with_eviction(const std::string& name, F&& f) {
  if (name == "lfu") return f(moex::LfuEviction{});
  if (name == "lrfu") return f(moex::LrfuEviction{});
  if (name == "hobbit") return f(moex::HobbitScoreEviction{});
  return f(moex::LruEviction{});
}

// ---- a printed row -----------------------------------------------------------------------------
struct Row {
  std::string workload, name, key, eviction, fidelity, error, detail;
  std::uint32_t batch = 1;
  double budget = 0;
  bool ok = false, sim_ok = false;
  double ms = 0, tok_s = 0, hit = 0, pcie_mb = 0, pcie_busy = 0, cpu_busy = 0, stall_ms = 0, floor_ms = 0;
  double sim_ms = 0, sim_hit = 0, sim_pcie_mb = 0, sim_pcie_busy = 0, sim_cpu_busy = 0;
  double recall = 0, avg_k = 0;
  std::uint64_t at_source = 0, low_loads = 0, skipped = 0;
};

void fill_measured(Row& r, const Ctx& c, const Workload& w, const RunOut& o, bool sim) {
  const double tokens = double(w.measured) * w.batch;
  const double scale = double(c.model_layers) / double(c.L);
  const double ms = o.seconds * 1e3 / tokens * scale;
  const double hit = o.total.hits + o.total.misses ? double(o.total.hits) / double(o.total.hits + o.total.misses) : 1.0;
  const double mb = double(o.delta.link_bytes) / tokens * scale / 1e6;
  const double pb = o.seconds > 0 ? double(o.delta.link_busy_ns) * 1e-9 / o.seconds : 0;
  const double cb = o.seconds > 0 ? double(o.delta.host_busy_ns) * 1e-9 / o.seconds : 0;
  if (sim) {
    r.sim_ok = o.ok;
    r.sim_ms = ms;
    r.sim_hit = hit;
    r.sim_pcie_mb = mb;
    r.sim_pcie_busy = pb;
    r.sim_cpu_busy = cb;
    return;
  }
  r.ok = o.ok;
  r.error = o.error;
  r.ms = ms;
  r.tok_s = ms > 0 ? 1e3 / ms : 0;
  r.hit = hit;
  r.pcie_mb = mb;
  r.pcie_busy = pb;
  r.cpu_busy = cb;
  r.stall_ms = double(o.total.stall_ns) / 1e6 / tokens * scale;
  r.recall = o.recall;
  r.avg_k = o.total.steps ? double(o.total.expert_calls) / double(o.total.steps) : 0;
  r.at_source = o.total.computed_at_source;
  for (std::size_t p = 0; p < moex::kPrecisionCount; ++p)
    if (p != static_cast<std::size_t>(Precision::kBF16)) r.low_loads += o.total.misses_by_precision[p];
  r.skipped = o.total.skipped;
}

// ---- a workload's rows -------------------------------------------------------------------------
struct Output {
  std::vector<Row> rows;
  std::vector<Timeline> timelines;
};

bool want_row(const Ctx& c, const RowSpec& rs) {
  if (rs.resident) return true;
  if (rs.low && !c.args.low && std::string(rs.key) == "low") return false;
  return c.args.rows.empty() || c.args.rows.count(rs.key);
}

moex::CudaExecutionBackendConfig backend_config(const Ctx& c) {
  moex::CudaExecutionBackendConfig bc;
  bc.max_shape = c.shape;
  bc.max_tokens = 64;
  bc.max_rows_per_step = std::max<std::uint32_t>(256, 16 * c.K * 2);
  bc.pcie_bytes_per_s = c.pcie_rate;
  bc.host_bytes_per_s = c.host_rate;
  bc.host_threads = c.args.host_threads;
  return bc;
}

// Runs one configuration measured (CUDA) and predicted (simulator), both with a timeline.
// For a live workload the simulator replays the routing the measured run recorded, with the
// measured run's prediction recall (the gate already applied in that routing).
// With `calibrate` set, the per-layer-step host overhead of the simulator is first derived from
// this (measured) run and written there: (measured - simulated) / layer steps, at least 0.
void run_config(const Ctx& c, const Workload& w, const RowSpec& rs, const Setup& su, const std::string& eviction,
                double budget, std::uint64_t overhead_ns, Output& out, Row& row, RunOut* measured_out,
                std::uint64_t* calibrate = nullptr) {
  row.workload = w.name;
  row.name = rs.label;
  row.key = rs.key;
  row.batch = w.batch;
  row.budget = budget;
  row.eviction = eviction;
  row.fidelity = rs.fidelity;
  const std::string tag = w.name + " b" + std::to_string(w.batch) + " " + fmt("%.0f%%", budget * 100) + " " + rs.label;
  if (c.args.dry_run) {  // simulated only, shown in both column groups
    Timeline st;
    st.process = tag + " (sim, dry run)";
    RunOut s = with_eviction<SimTraced>(eviction, [&](auto ev) {
      return run_exec(c, w, su, SimTraced(c.profile, overhead_ns, &c), c.args.timeline ? &st : nullptr, std::move(ev));
    });
    fill_measured(row, c, w, s, false);
    if (s.ok) fill_measured(row, c, w, s, true);
    if (c.args.timeline && s.ok) out.timelines.push_back(std::move(st));
    if (measured_out) *measured_out = std::move(s);
    if (calibrate) *calibrate = 0;
    return;
  }
  Timeline tl;
  tl.process = tag + " (measured)";
  auto be = moex::CudaExecutionBackend::create(backend_config(c));
  RunOut m;
  if (!be) {
    m.error = be.status().to_string();
  } else {
    m = with_eviction<CudaTraced>(eviction, [&](auto ev) {
      return run_exec(c, w, su, CudaTraced(std::move(*be), &c), c.args.timeline ? &tl : nullptr, std::move(ev));
    });
  }
  fill_measured(row, c, w, m, false);
  if (c.args.timeline && m.ok) out.timelines.push_back(std::move(tl));
  // The simulator: same configuration, same steps.
  Workload ws;
  const Workload* wp = &w;
  Setup ss = su;
  if (w.live) {
    if (!m.ok) return;
    std::vector<std::uint32_t> toks(m.recorded.tokens()), lids(c.L);
    for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<std::uint32_t>(i);
    for (std::uint32_t l = 0; l < c.L; ++l) lids[l] = l;
    ws = make_workload(m.recorded, toks, lids, w.batch, w.warmup, w.measured);
    ws.name = w.name;
    wp = &ws;
    ss.gate = moex::SensitivityGate{};  // the recorded routing is after the gate
    if (su.predictor) {
      const std::uint32_t depth = su.predictor().depth();
      const float recall = static_cast<float>(std::clamp(m.recall, 0.0, 1.0));
      moex::RoutingTrace rep = ws.replay;
      ss.predictor = [rep, depth, recall]() {
        BenchPredictor p;
        if (auto r = moex::PreGateRouter::replay(rep, depth, recall, 7)) p.inner = std::move(*r);
        return p;
      };
    }
  }
  if (calibrate) {
    RunOut s0 = with_eviction<SimTraced>(
        eviction, [&](auto ev) { return run_exec(c, *wp, ss, SimTraced(c.profile, 0, &c), nullptr, std::move(ev)); });
    const double steps = double(wp->measured) * c.L;
    overhead_ns = s0.ok && m.ok ? static_cast<std::uint64_t>(std::max(0.0, (m.seconds - s0.seconds) / steps * 1e9)) : 0;
    *calibrate = overhead_ns;
    if (s0.ok)
      row.detail = "simulator from rates alone: " +
                   fmt("%.2f", s0.seconds * 1e3 / (double(wp->measured) * w.batch) * c.model_layers / c.L) +
                   " ms/token; its per-layer-step overhead (" + fmt("%.1f", double(overhead_ns) / 1e3) +
                   " us) is calibrated on this row";
  }
  Timeline st;
  st.process = tag + " (sim)";
  RunOut s = with_eviction<SimTraced>(eviction, [&](auto ev) {
    return run_exec(c, *wp, ss, SimTraced(c.profile, overhead_ns, &c), c.args.timeline ? &st : nullptr, std::move(ev));
  });
  if (s.ok) {
    fill_measured(row, c, *wp, s, true);
    if (c.args.timeline) out.timelines.push_back(std::move(st));
  } else {
    row.detail += " sim: " + s.error;
  }
  if (measured_out) *measured_out = std::move(m);
}

// Predicted seconds of one setup on the simulator only (to pick the eviction of per-layer rows).
double sim_seconds(const Ctx& c, const Workload& w, const Setup& su, const std::string& eviction,
                   std::uint64_t overhead_ns) {
  RunOut s = with_eviction<SimTraced>(eviction, [&](auto ev) {
    return run_exec(c, w, su, SimTraced(c.profile, overhead_ns, &c), nullptr, std::move(ev));
  });
  return s.ok ? s.seconds : 1e30;
}

void run_workload(const Ctx& c, Workload w, const std::vector<double>& budgets, Output& out,
                  const std::function<BenchPredictor(std::uint32_t depth)>& make_pred) {
  std::printf("\n== %s, batch %u: %u warm-up + %u measured steps (+1 timeline step)\n", w.name.c_str(), w.batch,
              w.warmup, w.measured);
  std::fflush(stdout);
  const std::uint64_t all_bytes = std::uint64_t{c.L} * c.E * c.expert_bytes;
  // 1. The floor, measured; the simulator's per-layer-step overhead calibrated on it.
  Setup res;
  res.ec.cache_bytes = all_bytes;
  res.resident = true;
  res.miss.allow_source_compute = false;
  Row floor_row;
  RunOut floor_m;
  std::uint64_t overhead = 0;
  run_config(c, w, kRows[0], res, "lru", 1.0, 0, out, floor_row, &floor_m, &overhead);
  floor_row.floor_ms = floor_row.ms;
  out.rows.push_back(floor_row);
  if (!floor_row.ok) {
    std::printf("  all resident: %s\n", floor_row.error.c_str());
    return;
  }
  std::printf("  all resident: %.2f ms/token measured, %.2f simulated; %s\n", floor_row.ms, floor_row.sim_ms,
              floor_row.detail.c_str());
  if (w.live) {  // the reference routing: what the exact floor row routed
    std::vector<std::uint32_t> toks(floor_m.recorded.tokens()), lids(c.L);
    for (std::size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<std::uint32_t>(i);
    for (std::uint32_t l = 0; l < c.L; ++l) lids[l] = l;
    Workload ref = make_workload(floor_m.recorded, toks, lids, w.batch, w.warmup, w.measured);
    w.profile = std::move(ref.profile);
    w.routing = std::move(ref.routing);
    w.replay = std::move(ref.replay);
  }
  const double scale = double(c.model_layers) / double(c.L);
  const double tokens = double(w.measured) * w.batch;
  const double floor_ms = floor_row.ms;

  // 2. Parameters from the workload's own tokens (its profile trace).
  std::vector<float> sens;
  for (std::uint32_t l = 0; l < c.L; ++l)
    sens.push_back(c.L > 1 ? 1.f - 0.75f * static_cast<float>(l) / static_cast<float>(c.L - 1) : 1.f);
  moex::SensitivityGate gate(sens, 0.f);
  const double target_k = std::max(1.0, c.args.gate_keep * c.K);
  const auto reached = gate.calibrate_threshold(w.profile, target_k);
  const float t_high = median_unimportance(w.profile);
  auto curves = moex::profile_miss_curves(w.profile, c.E);
  std::printf(
      "  gate: T %.4g for k %.2f (reached %.2f); HOBBIT t_high %.3f (median unimportance), t_skip 1 (no skip)\n",
      double(gate.threshold()), target_k, reached ? *reached : 0.0, double(t_high));

  for (double budget : budgets) {
    const std::uint64_t cb = static_cast<std::uint64_t>(budget * double(all_bytes));
    const std::uint64_t slots = cb / c.expert_bytes;
    const double belady_bytes = double(belady_misses(w, c.L, c.E, slots)) * double(c.expert_bytes) / tokens * scale;
    const double fl = std::max(floor_ms, belady_bytes / double(c.pcie_rate + c.host_rate) * 1e3);
    std::vector<std::uint64_t> split, low_split;
    if (curves) {
      if (auto s = moex::dp_layer_split(*curves, static_cast<std::uint32_t>(slots), 1))
        split = moex::slots_to_bytes(*s, c.expert_bytes);
      const double share = 0.25;
      const auto min_slots = static_cast<std::uint32_t>(
          std::max({1.0, std::ceil(1.0 / (1.0 - share) - 1e-9),
                    std::ceil(double(c.low_bytes) / (share * double(c.expert_bytes)) - 1e-9)}));
      if (c.args.low && std::uint64_t{min_slots} * c.L <= slots)
        if (auto s = moex::dp_layer_split(*curves, static_cast<std::uint32_t>(slots), min_slots))
          low_split = moex::slots_to_bytes(*s, c.expert_bytes);
    }
    auto setup_of = [&](const RowSpec& rs) {
      Setup s;
      s.ec.cache_bytes = cb;
      if (rs.layers) s.ec.layer_cache_bytes = (rs.low && c.args.low) ? low_split : split;
      if (rs.low && c.args.low) {
        s.ec.low_precision = Precision::kInt4;
        s.ec.low_precision_share = 0.25;
        s.miss.mixed_precision = true;
        s.miss.hobbit.t_high = t_high;
        s.miss.hobbit.t_skip = 1.f;
      }
      s.miss.allow_source_compute = rs.cpu;
      if (rs.gate) s.gate = gate;
      if (rs.prefetch) {
        const std::uint32_t depth = rs.spare ? 2 : 1;
        s.predictor = [make_pred, depth]() { return make_pred(depth); };
      }
      if (rs.spare) {
        s.spare = true;
        s.ec.max_prefetch_bytes_in_flight = c.expert_bytes;
      }
      return s;
    };
    // Best online eviction under the DP split, judged by the simulator (lowest predicted time).
    std::string best = "lru";
    if (!split.empty()) {
      double bt = 1e300;
      for (const char* e : {"lru", "lfu", "lrfu", "hobbit"}) {
        const double t = sim_seconds(c, w, setup_of(kRows[3]), e, overhead);
        if (t < bt) {
          bt = t;
          best = e;
        }
      }
    }
    std::printf(
        "  budget %.0f%%: %llu experts; Belady-unavoidable %.0f MB/token -> floor %.2f ms/token; per-layer "
        "eviction %s\n",
        budget * 100, static_cast<unsigned long long>(slots), belady_bytes / 1e6, fl, best.c_str());
    std::fflush(stdout);
    if (slots == 0) continue;
    for (const RowSpec& rs : kRows) {
      if (rs.resident || !want_row(c, rs)) continue;
      if (std::string(rs.key) == "layers" && split.empty()) continue;
      Setup s = setup_of(rs);
      const std::string ev = rs.layers ? best : "lru";
      Row r;
      run_config(c, w, rs, s, ev, budget, overhead, out, r, nullptr);
      if (!r.ok && rs.layers && !s.ec.layer_cache_bytes.empty()) {  // per-layer budgets cannot combine: one pool
        s.ec.layer_cache_bytes.clear();
        Row r2;
        run_config(c, w, rs, s, "lru", budget, overhead, out, r2, nullptr);
        r2.detail = "one pool (" + r.error + ")";
        r = r2;
      }
      if (rs.layers && s.ec.layer_cache_bytes.empty() && r.detail.empty()) r.detail = "one pool";
      r.floor_ms = fl;
      std::printf("    %-44s %8.2f ms/tok (sim %8.2f) hit %.3f\n", rs.label, r.ms, r.sim_ms, r.hit);
      std::fflush(stdout);
      out.rows.push_back(r);
    }
  }
}

// ---- outputs -----------------------------------------------------------------------------------
std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o;
}

void write_timeline(const std::string& path, const std::vector<Timeline>& tls) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) return;
  std::fprintf(f, "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
  bool first = true;
  auto sep = [&]() {
    if (!first) std::fprintf(f, ",\n");
    first = false;
  };
  const char* threads[] = {"PCIe copy (H2D)", "GPU compute", "host CPU experts", "executor: layers"};
  for (std::size_t p = 0; p < tls.size(); ++p) {
    const Timeline& t = tls[p];
    sep();
    std::fprintf(f, "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%zu,\"args\":{\"name\":\"%s\"}}", p + 1,
                 json_escape(t.process).c_str());
    sep();
    std::fprintf(f, "{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":%zu,\"args\":{\"sort_index\":%zu}}", p + 1,
                 p + 1);
    for (int th = 0; th < 4; ++th) {
      sep();
      std::fprintf(f, "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%zu,\"tid\":%d,\"args\":{\"name\":\"%s\"}}",
                   p + 1, th, threads[th]);
    }
    for (const TlEvent& e : t.ev) {
      sep();
      const double ts = (double(e.t0) - double(t.origin)) / 1e3;
      const double dur = double(e.t1 - std::min(e.t1, e.t0)) / 1e3;
      std::fprintf(f, "{\"name\":\"%s\",\"ph\":\"X\",\"pid\":%zu,\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f}",
                   json_escape(e.name).c_str(), p + 1, e.tid, ts, dur);
    }
  }
  std::fprintf(f, "\n]}\n");
  std::fclose(f);
}

void write_outputs(const Ctx& c, const Output& out) {
  const std::string base = c.args.out + "/e2e-" + c.args.shape;
  std::FILE* csv = std::fopen((base + ".csv").c_str(), "w");
  if (csv)
    std::fprintf(csv,
                 "shape,workload,batch,budget,row,eviction,tok_s,ms_per_token,hit_rate,pcie_mb_per_token,pcie_busy,"
                 "cpu_busy,stall_ms_per_token,floor_ms,ratio_to_floor,sim_ms,sim_diff,sim_hit_rate,"
                 "sim_pcie_mb_per_token,sim_pcie_busy,sim_cpu_busy,recall,experts_per_layer_step,at_source,low_loads,"
                 "skipped,fidelity,detail,error\n");
  std::printf(
      "\nper token scaled to %u layers (measured on %u); floor = max(all resident, Belady-unavoidable bytes / (PCIe "
      "%.1f + host %.1f GB/s)); sim = the same executor configuration on SimExecutionBackend (profile from this run's "
      "rates); diff = (measured - sim) / sim\n",
      c.model_layers, c.L, double(c.pcie_rate) / 1e9, double(c.host_rate) / 1e9);
  std::string last;
  for (const Row& r : out.rows) {
    const std::string head = r.workload + " / batch " + std::to_string(r.batch);
    if (head != last) {
      std::printf(
          "\n### %s\n| budget | row | tok/s | ms/token | hit | PCIe MB/tok | PCIe busy | CPU busy | stall ms/tok | x "
          "floor | sim ms/token | diff | sim hit | sim PCIe MB/tok | fidelity |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
          head.c_str());
      last = head;
    }
    const double ratio = r.floor_ms > 0 ? r.ms / r.floor_ms : 0;
    const double diff = r.sim_ok && r.sim_ms > 0 ? (r.ms - r.sim_ms) / r.sim_ms * 100 : 0;
    const std::string label = r.name + (r.key == "layers" || r.key == "all" ? " (" + r.eviction + ")" : "") +
                              (r.detail.empty() || r.key == "resident" ? "" : " [" + r.detail + "]");
    if (!r.ok)
      std::printf("| %.0f%% | %s | error: %s |\n", r.budget * 100, label.c_str(), r.error.c_str());
    else
      std::printf("| %.0f%% | %s | %.2f | %.2f | %.3f | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s | %s | %s | %s |\n",
                  r.budget * 100, label.c_str(), r.tok_s, r.ms, r.hit, r.pcie_mb, r.pcie_busy, r.cpu_busy, r.stall_ms,
                  ratio, r.sim_ok ? fmt("%.2f", r.sim_ms).c_str() : "-", r.sim_ok ? fmt("%+.1f%%", diff).c_str() : "-",
                  r.sim_ok ? fmt("%.3f", r.sim_hit).c_str() : "-", r.sim_ok ? fmt("%.0f", r.sim_pcie_mb).c_str() : "-",
                  r.fidelity.c_str());
    if (csv)
      std::fprintf(csv,
                   "%s,\"%s\",%u,%.3f,\"%s\",%s,%.4f,%.4f,%.4f,%.2f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.2f,%.4f,"
                   "%.4f,%.4f,%.3f,%llu,%llu,%llu,\"%s\",\"%s\",\"%s\"\n",
                   c.args.shape.c_str(), r.workload.c_str(), r.batch, r.budget, r.name.c_str(), r.eviction.c_str(),
                   r.tok_s, r.ms, r.hit, r.pcie_mb, r.pcie_busy, r.cpu_busy, r.stall_ms, r.floor_ms, ratio,
                   r.sim_ok ? r.sim_ms : -1.0, diff / 100, r.sim_hit, r.sim_pcie_mb, r.sim_pcie_busy, r.sim_cpu_busy,
                   r.recall, r.avg_k, static_cast<unsigned long long>(r.at_source),
                   static_cast<unsigned long long>(r.low_loads), static_cast<unsigned long long>(r.skipped),
                   r.fidelity.c_str(), json_escape(r.detail).c_str(), json_escape(r.error).c_str());
  }
  if (csv) std::fclose(csv);
  std::printf(
      "\nfidelity (static, from bench/RESULTS-quality.md: bits/byte change vs exact on the shared tiny models, CPU "
      "engine; not measured here):\n"
      "  [a] adaptive gating (AdapMoE sensitivity gate) at keep %.3f of top-k: 8e (top-2) k 1.75: +0.010 bpb; 32e "
      "(top-4) k 3.625: +0.016, k 3.25: +0.036\n"
      "  [b] int4 g64 on miss, HOBBIT rule, no skip: at most HOBBIT t_high 0 (all non-top experts int4): 8e -0.002 "
      "(noise), 32e +0.006; every expert int4: 8e +0.0014, 32e +0.021\n",
      c.args.gate_keep);

  // gnuplot: one panel per workload and batch, measured and simulated ms/token per row.
  std::FILE* dat = std::fopen((base + ".dat").c_str(), "w");
  std::vector<std::string> titles;
  if (dat) {
    last.clear();
    for (const Row& r : out.rows) {
      const std::string head = r.workload + ", batch " + std::to_string(r.batch);
      if (head != last) {
        if (!last.empty()) std::fprintf(dat, "\n\n");
        std::fprintf(dat, "# %s\n# label measured_ms sim_ms\n", head.c_str());
        titles.push_back(head);
        last = head;
      }
      if (r.ok)
        std::fprintf(dat, "\"%.0f%% %s\" %.4f %.4f\n", r.budget * 100, r.key.c_str(), r.ms, r.sim_ok ? r.sim_ms : 0.0);
    }
    std::fclose(dat);
  }
  std::FILE* gp = std::fopen((base + ".gp").c_str(), "w");
  if (gp) {
    const std::string name = "e2e-" + c.args.shape;
    std::fprintf(gp,
                 "# gnuplot %s.gp (from the folder holding %s.dat) writes %s.png\n"
                 "set terminal pngcairo size 1600,%zu font ',9' noenhanced\nset output '%s.png'\n"
                 "set multiplot layout %zu,1\nset style data histograms\nset style histogram clustered gap 1\n"
                 "set style fill solid 0.8 border -1\nset logscale y\nset ylabel 'ms/token'\nset grid ytics\n"
                 "set xtics rotate by -40 font ',8'\nset key top right\n",
                 name.c_str(), name.c_str(), name.c_str(), 380 * std::max<std::size_t>(1, titles.size()), name.c_str(),
                 std::max<std::size_t>(1, titles.size()));
    for (std::size_t i = 0; i < titles.size(); ++i)
      std::fprintf(gp,
                   "set title '%s: measured vs simulator (%s shapes, per token over %u layers)'\n"
                   "plot '%s.dat' index %zu using 2:xtic(1) title 'measured', '' index %zu using 3 title 'simulator'\n",
                   titles[i].c_str(), c.args.shape.c_str(), c.model_layers, name.c_str(), i, i);
    std::fprintf(gp, "unset multiplot\n");
    std::fclose(gp);
  }
  if (c.args.timeline) write_timeline(base + "-timeline.json", out.timelines);
}

// A routed workload source: a trace with its measured layers and usable tokens.
struct Src {
  std::string name;
  moex::RoutingTrace trace;
  std::vector<std::uint32_t> layer_ids, tokens;
};

// Every workload of the shape at every batch, then the outputs.
int run_all(Ctx& c, const std::vector<Src>& srcs) {
  Args& a = c.args;
  // ---- workloads -------------------------------------------------------------------------------
  Output out;
  std::FILE* routing_out = nullptr;
  if (a.shape == "mixtral" && !srcs.empty()) routing_out = std::fopen((a.out + "/routing.txt").c_str(), "w");
  for (std::uint32_t batch : a.batches) {
    const std::uint32_t measured = batch == 1 ? a.steps : std::max<std::uint32_t>(6, a.steps * 2 / (batch + 2));
    const std::uint32_t warmup = batch == 1 ? a.warmup : std::max(2u, a.warmup / batch);
    for (std::size_t si = 0; si < srcs.size(); ++si) {
      const Src& s = srcs[si];
      Workload w = make_workload(s.trace, s.tokens, s.layer_ids, batch, warmup, measured);
      w.name = s.name;
      if (si == 0 && routing_out)  // for bench/e2e/torch_peer.py (Mixtral top-2)
        for (std::uint32_t st = 0; st < w.steps; ++st)
          for (std::uint32_t l = 0; l < c.L; ++l)
            for (std::uint32_t b = 0; b < batch; ++b) {
              const auto& r = w.routing[st][l][b];
              std::fprintf(routing_out, "%u %u %u %u %u %u %u %.6f %.6f\n", batch, st,
                           st >= w.warmup && st < w.warmup + w.measured ? 1 : 0, l, b, r.experts[0], r.experts[1],
                           r.weights[0], r.weights[1]);
            }
      const moex::RoutingTrace rep = w.replay;
      const float recall = a.recall;
      run_workload(c, std::move(w), a.budgets, out, [rep, recall](std::uint32_t depth) {
        BenchPredictor p;
        if (auto r = moex::PreGateRouter::replay(rep, depth, recall, 7)) p.inner = std::move(*r);
        return p;
      });
    }
    if (a.live) {
      Workload w;
      w.name = "live (random routers, speculative prefetch)";
      w.live = true;
      w.batch = batch;
      w.warmup = warmup;
      w.measured = measured;
      w.steps = warmup + measured + 1;
      w.routing.assign(w.steps, std::vector<std::vector<moex::TokenRouting>>(c.L));
      const moex::ExpertStore* st = c.store;
      run_workload(c, std::move(w), a.live_budgets, out, [st](std::uint32_t depth) {
        BenchPredictor p;
        if (auto r = moex::PreGateRouter::speculative(*st, depth)) p.inner = std::move(*r);
        return p;
      });
    }
  }
  if (routing_out) std::fclose(routing_out);
  write_outputs(c, out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Ctx c;
  Args& a = c.args;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto val = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (k == "--shape")
      a.shape = val();
    else if (k == "--trace")
      a.traces.push_back(val());
    else if (k == "--live")
      a.live = true;
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
    else if (k == "--live-budgets")
      a.live_budgets = parse_list<double>(val());
    else if (k == "--recall")
      a.recall = std::stof(val());
    else if (k == "--gate-keep")
      a.gate_keep = std::stod(val());
    else if (k == "--rows") {
      for (const std::string& r : parse_list<std::string>(val())) a.rows.insert(r);
    } else if (k == "--no-low")
      a.low = false;
    else if (k == "--dry-run")
      a.dry_run = true;
    else if (k == "--no-timeline")
      a.timeline = false;
    else if (k == "--out")
      a.out = val();
    else {
      std::fprintf(stderr, "unknown argument %s (see the usage at the top of bench/e2e/e2e_bench.cpp)\n", k.c_str());
      return 2;
    }
  }
  if (a.shape == "mixtral") {
    c.shape = {4096, 14336};
    c.E = 8;
    c.K = 2;
    c.model_layers = 32;
  } else if (a.shape == "qwen3") {
    c.shape = {2048, 768};
    c.E = 128;
    c.K = 8;
    c.model_layers = 48;
  } else {
    std::fprintf(stderr, "--shape must be mixtral (Mixtral-8x7B) or qwen3 (Qwen3-30B-A3B)\n");
    return 2;
  }
  if (a.traces.empty() && !a.live) {
    std::fprintf(stderr, "usage: moex_e2e_bench --shape mixtral|qwen3 --trace FILE [--trace FILE]... [--live] ...\n");
    return 2;
  }
  c.L = a.layers;
  if (a.dry_run) {
    a.live = false;
    std::printf(
        "DRY RUN: no GPU used; every row is the simulator's, with nominal rates (PCIe 54 GB/s, GPU 2.3 TB/s, "
        "host CPU 75 GB/s of weights); live routing needs real data and is left out\n");
  } else if (!moex::CudaExecutionBackend::device_available()) {
    std::fprintf(stderr,
                 "moex_e2e_bench: no CUDA device visible to this process: nothing to measure (run it on a GPU "
                 "machine, e.g. through scripts/e2e-bench)\n");
    return 3;
  }

  // ---- workloads' traces ----------------------------------------------------------------------
  std::vector<Src> srcs;
  for (const std::string& path : a.traces) {
    moex::TraceLoadOptions lo;
    lo.keep_logits = false;
    auto tr = moex::load_trace(path, lo);
    if (!tr) {
      std::fprintf(stderr, "trace %s: %s\n", path.c_str(), tr.status().to_string().c_str());
      return 1;
    }
    Src s;
    s.name = std::filesystem::path(path).parent_path().filename().string() + "/" +
             std::filesystem::path(path).filename().string();
    std::string how = "as recorded";
    if (tr->n_experts != c.E || tr->top_k != c.K) {
      auto m = map_fine_grained(*tr, c.E, c.K);
      if (!m) {
        std::fprintf(stderr, "trace %s: %s\n", path.c_str(), m.status().to_string().c_str());
        return 1;
      }
      how = "mapped " + std::to_string(tr->n_experts) + "e top-" + std::to_string(tr->top_k) + " -> " +
            std::to_string(c.E) + "e top-" + std::to_string(c.K) + " by segmentation x" +
            std::to_string(c.E / tr->n_experts);
      s.trace = std::move(*m);
    } else {
      s.trace = std::move(*tr);
    }
    if (s.trace.n_layers < c.L) {
      std::fprintf(stderr, "trace %s has %u layers, fewer than --layers %u\n", path.c_str(), s.trace.n_layers, c.L);
      return 1;
    }
    const std::uint32_t stride = a.stride ? a.stride : std::max(1u, s.trace.n_layers / c.L);
    for (std::uint32_t i = 0; i < c.L; ++i) s.layer_ids.push_back((i * stride) % s.trace.n_layers);
    for (std::uint32_t t = 0; t < s.trace.tokens(); ++t) {
      bool full = true;
      for (auto l : s.layer_ids) full = full && s.trace.experts(t, l).size() == s.trace.top_k;
      if (full) s.tokens.push_back(t);
    }
    std::printf("trace %s: %zu tokens, %zu usable, %s; layers", path.c_str(), s.trace.tokens(), s.tokens.size(),
                how.c_str());
    for (auto l : s.layer_ids) std::printf(" %u", l);
    std::printf("\n");
    srcs.push_back(std::move(s));
  }

  // ---- store: random bf16 experts in pinned host memory ------------------------------------
  const moex::MoeModelSpec spec{c.L, c.E, c.shape, {moex::RouterKind::kSoftmaxTopKRenorm, c.E, c.K}};
  if (a.dry_run) {
    const moex::WeightFormat extra[] = {moex::quant_format(Precision::kInt4, 64)};
    auto vs = moex::ExpertStore::create_virtual(
        spec, moex::float_format(Precision::kBF16),
        a.low ? std::span<const moex::WeightFormat>(extra) : std::span<const moex::WeightFormat>());
    if (!vs) {
      std::fprintf(stderr, "virtual store: %s\n", vs.status().to_string().c_str());
      return 1;
    }
    c.store = &*vs;
    c.expert_bytes = vs->expert_bytes(Precision::kBF16);
    c.low_bytes = a.low ? vs->expert_bytes(Precision::kInt4) : 0;
    c.pcie_rate = 54'000'000'000ull;
    c.host_rate = 75'000'000'000ull;
    c.profile.name = "nominal (dry run)";
    c.profile.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, c.pcie_rate};
    c.profile.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)].read_bytes_per_s = 2'300'000'000'000ull;
    c.profile.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)].read_bytes_per_s = c.host_rate;
    return run_all(c, srcs);
  }
  auto store = moex::ExpertStore::create(spec, moex::float_format(Precision::kBF16));
  if (!store) {
    std::fprintf(stderr, "store: %s\n", store.status().to_string().c_str());
    return 1;
  }
  const moex::ExpertLayout layout = moex::expert_layout(c.shape, moex::float_format(Precision::kBF16));
  c.expert_bytes = layout.total_bytes;
  const std::size_t n_exp = std::size_t{c.L} * c.E;
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
  for (std::uint32_t l = 0; l < c.L; ++l)
    for (std::uint32_t e = 0; e < c.E; ++e) {
      const auto v = moex::ExpertView::contiguous(base + (std::size_t{l} * c.E + e) * stride, layout);
      if (auto s = store->set_expert_view({l, e}, v, moex::Tier::kHost); !s.is_ok()) {
        std::fprintf(stderr, "set_expert_view: %s\n", s.to_string().c_str());
        return 1;
      }
    }
  // Random routers (live routing): N(0, 1/hidden) so that logits of an RMS-normalized state have unit scale.
  {
    std::vector<float> w(std::size_t{c.E} * c.shape.hidden);
    for (std::uint32_t l = 0; l < c.L; ++l) {
      for (std::uint32_t e = 0; e < c.E; ++e)
        live_input(100000 + l, e, c.shape.hidden, &w[std::size_t{e} * c.shape.hidden]);
      const float sc = static_cast<float>(1.0 / std::sqrt(double(c.shape.hidden)));
      for (float& v : w) v *= sc;
      if (auto s = store->set_router(l, w); !s.is_ok()) {
        std::fprintf(stderr, "set_router: %s\n", s.to_string().c_str());
        return 1;
      }
    }
  }
  std::printf("masters: %zu experts x %.1f MB pinned bf16 (%.1f GB) in %.1f s\n", n_exp,
              double(layout.total_bytes) / 1e6, double(stride * n_exp) / 1e9, secs(t0, Clock::now()));
  if (a.low) {
    t0 = Clock::now();
    if (auto s = store->build_precision(moex::quant_format(Precision::kInt4, 64)); !s.is_ok()) {
      std::printf("int4 copy: %s: rows with int4 are left out\n", s.to_string().c_str());
      a.low = false;
    } else {
      c.low_bytes = store->expert_bytes(Precision::kInt4);
      std::printf("int4 g64 copies (%.1f MB an expert) built in %.1f s\n", double(c.low_bytes) / 1e6,
                  secs(t0, Clock::now()));
    }
  }
  t0 = Clock::now();
  {
    auto s2 = moex::CudaExecutionBackend::register_store(*store);
    std::printf("register_store: %s in %.1f s\n", s2.to_string().c_str(), secs(t0, Clock::now()));
  }
  c.store = &*store;
  for (std::uint32_t l = 0; l < c.L; ++l)
    for (std::uint32_t e = 0; e < c.E; ++e) {
      for (Precision p : {Precision::kBF16, Precision::kInt4}) {
        if (p == Precision::kInt4 && !a.low) continue;
        if (auto v = store->view({l, e}, p)) c.key_of_ptr[v->w1_data] = pack({l, e});
      }
    }

  // ---- rates measured in this run: PCIe, GPU and host expert times -------------------------
  {
    void* d = nullptr;
    if (!cuda_ok(cudaMalloc(&d, layout.total_bytes), "cudaMalloc probe")) return 1;
    cudaStream_t st;
    cudaStreamCreate(&st);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> ms;
    const int reps = c.expert_bytes < (64u << 20) ? 20 : 6;
    for (int i = 0; i < reps; ++i) {
      cudaEventRecord(e0, st);
      cudaMemcpyAsync(d, base + (static_cast<std::size_t>(i) % n_exp) * stride, layout.total_bytes,
                      cudaMemcpyHostToDevice, st);
      cudaEventRecord(e1, st);
      cudaEventSynchronize(e1);
      float m = 0;
      cudaEventElapsedTime(&m, e0, e1);
      if (i > 0) ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    c.pcie_rate = static_cast<std::uint64_t>(double(layout.total_bytes) / (double(ms[ms.size() / 2]) * 1e-3));
    cudaFree(d);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(st);
  }
  const std::uint32_t max_batch = *std::max_element(a.batches.begin(), a.batches.end());
  {
    std::uint64_t x = 12345;
    c.hidden.resize(std::size_t{std::max(max_batch, 16u)} * c.shape.hidden);
    for (auto& v : c.hidden) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      v = static_cast<float>(static_cast<double>(x >> 11) * 0x1.0p-53 * 2.0 - 1.0);
    }
  }
  // Expert time per call: t(n) on the GPU (bf16 and int4 slots) and on the host worker.
  auto time_calls = [&](moex::CudaExecutionBackend& be, bool host, Precision p, std::uint32_t n) -> double {
    std::vector<float> y(std::size_t{n} * c.shape.hidden);
    auto v = host ? store->master({0, 0})
                  : moex::Result<moex::ExpertView>(be.slot_view(p, 0, moex::expert_layout(c.shape, *store->format(p))));
    if (!v) return 0;
    const int reps = host ? 4 : 20;
    for (int r = 0; r < 2; ++r) {
      (void)(host ? be.expert_ffn_at_source(*v, c.hidden.data(), n, y.data())
                  : be.expert_ffn(*v, c.hidden.data(), n, y.data()));
      (void)be.sync();
    }
    const auto s0 = Clock::now();
    for (int r = 0; r < reps; ++r) {
      (void)(host ? be.expert_ffn_at_source(*v, c.hidden.data(), n, y.data())
                  : be.expert_ffn(*v, c.hidden.data(), n, y.data()));
      if (host) (void)be.sync();  // one at a time: the executor's host path runs experts in turn
    }
    (void)be.sync();
    return secs(s0, Clock::now()) / reps;
  };
  {
    auto be = moex::CudaExecutionBackend::create(backend_config(c));
    if (!be) {
      std::fprintf(stderr, "CudaExecutionBackend: %s\n", be.status().to_string().c_str());
      return 1;
    }
    for (Precision p : {Precision::kBF16, Precision::kInt4}) {
      if (p == Precision::kInt4 && !a.low) continue;
      const std::size_t bytes = store->expert_bytes(p);
      if (!be->allocate_slots(p, bytes, 1).is_ok()) return 1;
      LoadTicket t = 0;
      auto v = store->view({0, 0}, p);
      if (!v || !be->start_load(p, 0, *v, t).is_ok() || !be->wait_load(t).is_ok()) return 1;
    }
    auto& gpu = c.profile.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)];
    auto& cpu = c.profile.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)];
    const std::uint32_t nmax = std::max(2u, std::min(max_batch, 16u));
    const double g1 = time_calls(*be, false, Precision::kBF16, 1), gn = time_calls(*be, false, Precision::kBF16, nmax);
    const double h1 = time_calls(*be, true, Precision::kBF16, 1), hn = time_calls(*be, true, Precision::kBF16, nmax);
    gpu.read_bytes_per_s = static_cast<std::uint64_t>(double(c.expert_bytes) / g1);
    if (gn > 1.05 * g1) gpu.flops_per_s = static_cast<std::uint64_t>(double(moex::expert_flops(c.shape, nmax)) / gn);
    cpu.read_bytes_per_s = static_cast<std::uint64_t>(double(c.expert_bytes) / h1);
    if (hn > 1.05 * h1) cpu.flops_per_s = static_cast<std::uint64_t>(double(moex::expert_flops(c.shape, nmax)) / hn);
    c.host_rate = cpu.read_bytes_per_s;
    double g4 = 0;
    if (a.low) {  // int4 at batch 1 as a FLOP rate of its own (the roofline's byte term uses the smaller int4 bytes)
      g4 = time_calls(*be, false, Precision::kInt4, 1);
      gpu.flops_per_s_by_precision[static_cast<std::size_t>(Precision::kInt4)] =
          static_cast<std::uint64_t>(double(moex::expert_flops(c.shape, 1)) / g4);
    }
    c.profile.name = "measured in this run";
    c.profile.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, c.pcie_rate};
    std::printf(
        "measured: pinned PCIe H2D %.1f GB/s (one %.1f MB expert, median); GPU expert bf16 n=1 %.3f ms (%.0f GB/s), "
        "n=%u %.3f ms, int4 n=1 %.3f ms; host CPU expert (backend's host worker) n=1 %.2f ms (%.1f GB/s), n=%u "
        "%.2f ms\n",
        double(c.pcie_rate) / 1e9, double(c.expert_bytes) / 1e6, g1 * 1e3, double(c.expert_bytes) / g1 / 1e9, nmax,
        gn * 1e3, g4 * 1e3, h1 * 1e3, double(c.host_rate) / 1e9, nmax, hn * 1e3);
  }
  std::fflush(stdout);
  EventPool pool;
  if (a.timeline) {
    pool.ev.resize(16384);
    for (auto& e : pool.ev)
      if (cudaEventCreate(&e) != cudaSuccess) {
        a.timeline = false;
        break;
      }
    c.events = &pool;
  }

  const int rc = run_all(c, srcs);
  for (auto& e : pool.ev) cudaEventDestroy(e);
  (void)moex::CudaExecutionBackend::unregister_store(*store);
  // The pinned masters are released at exit (the store's views point into them).
  return rc;
}
