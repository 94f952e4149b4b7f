// Technique rows: the baseline and each technique of issue 4 replayed through the executor on
// SimExecutionBackend (docs/simulator.md, "Technique rows").

#include "moex/sim/techniques.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <type_traits>
#include <utility>

#include <nlohmann/json.hpp>

#include "moex/backend/sim_execution_backend.hpp"
#include "moex/cache/layer_budget.hpp"
#include "moex/executor/moe_layer_executor.hpp"
#include "moex/gate/sensitivity_gate.hpp"
#include "moex/policies/cost_model_miss.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/route/pre_gate_router.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct TechniqueName {
  SimTechnique t;
  std::string_view name, label;
};
constexpr TechniqueName kTechniqueNames[] = {
    {SimTechnique::kBaseline, "baseline", "on-demand LRU"},
    {SimTechnique::kPrefetch, "prefetch", "+ prefetch"},
    {SimTechnique::kPreGateRouting, "pregate-routing", "+ pre-gated routing"},
    {SimTechnique::kLayerBudgets, "layer-budgets", "+ per-layer budgets"},
    {SimTechnique::kAdaptiveGate, "adaptive-gate", "+ adaptive gating"},
    {SimTechnique::kLowPrecision, "low-precision", "+ low precision on miss"},
    {SimTechnique::kCpuCompute, "cpu-compute", "+ CPU compute of misses"},
    {SimTechnique::kCombined, "combined", "all combined"},
};

// Prefetch predictions replayed from the measured tokens of the trace. Wraps PreGateRouter's
// replay mode (one router per predicting layer when recalls differ) and tells it the token being
// replayed, so that (token, layer) pairs the replay skips (no experts) do not shift its steps.
class SimReplayPredictor {
 public:
  SimReplayPredictor() = default;
  SimReplayPredictor(std::vector<PreGateRouter> routers, const std::size_t* token, std::uint32_t n_layers,
                     std::uint32_t depth)
      : routers_(std::move(routers)), token_(token), n_layers_(n_layers), depth_(depth) {}

  Status predict(const PredictContext& c, std::vector<Prediction>& out) {
    if (depth_ == 0 || routers_.empty() || token_ == nullptr) return Status::ok();
    PredictContext c2 = c;
    c2.step = std::uint64_t{*token_} * n_layers_ + c.layer;
    const std::size_t i = routers_.size() == 1 ? 0 : std::min<std::size_t>(c.layer, routers_.size() - 1);
    return routers_[i].predict(c2, out);
  }
  std::uint32_t depth() const noexcept { return depth_; }
  std::string_view name() const noexcept { return "replay"; }

 private:
  std::vector<PreGateRouter> routers_;
  const std::size_t* token_ = nullptr;
  std::uint32_t n_layers_ = 0, depth_ = 0;
};
static_assert(Predictor<SimReplayPredictor>);

template <class E>
struct TechniquePolicies : DefaultPolicies {
  using Eviction = E;
  using Gate = SensitivityGate;
  using Backend = SimExecutionBackend;
  using Predictor = SimReplayPredictor;
  using Miss = CostModelMiss;
};

WeightFormat format_of(Precision p) noexcept { return is_quantized(p) ? quant_format(p) : float_format(p); }

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// What one technique row runs.
struct RowSetup {
  bool prefetch = false, layer_budgets = false, gate = false, low = false, cpu = false;
  bool routes = false;  // the predictions are the routing (pre-gated routing): recall 1
};

RowSetup setup_of(SimTechnique t) {
  RowSetup s;
  s.prefetch = t == SimTechnique::kPrefetch || t == SimTechnique::kCombined || t == SimTechnique::kPreGateRouting;
  s.routes = t == SimTechnique::kPreGateRouting;
  s.layer_budgets = t == SimTechnique::kLayerBudgets || t == SimTechnique::kCombined;
  s.gate = t == SimTechnique::kAdaptiveGate || t == SimTechnique::kCombined;
  s.low = t == SimTechnique::kLowPrecision || t == SimTechnique::kCombined;
  s.cpu = t == SimTechnique::kCpuCompute || t == SimTechnique::kCombined;
  return s;
}

struct Context {
  const RoutingTrace* trace = nullptr;
  RoutingTrace measured;  // the measured tokens, for the replayed predictor
  std::size_t begin = 0, end = 0;
  const ExpertStore* store = nullptr;
  const SimTechniqueConfig* cfg = nullptr;
  SimTechniqueParams params;
  std::vector<std::uint32_t> low_layer_slots;  // DP split where every layer's two pools hold an expert
  std::uint64_t expert_bytes = 0, slots = 0;
};

template <class E>
constexpr std::string_view eviction_name_of() noexcept {
  if constexpr (std::is_same_v<E, LruEviction>)
    return "lru";
  else if constexpr (std::is_same_v<E, LfuEviction>)
    return "lfu";
  else if constexpr (std::is_same_v<E, LrfuEviction>)
    return "lrfu";
  else
    return "hobbit";
}

// Replays the measured tokens through one executor built for `setup` with eviction E.
template <class E>
Result<SimTechniqueResult> run_row(const Context& cx, const RowSetup& setup, E eviction) {
  const RoutingTrace& trace = *cx.trace;
  const SimTechniqueSettings& st = cx.cfg->settings;
  ExecutorConfig ec;
  ec.cache_precision = cx.cfg->cache_precision;
  ec.check_finite = false;
  ec.cache_bytes = cx.slots * cx.expert_bytes;
  if (setup.layer_budgets)
    ec.layer_cache_bytes = slots_to_bytes(setup.low ? cx.low_layer_slots : cx.params.layer_slots, cx.expert_bytes);
  if (setup.low) {
    ec.low_precision = st.low_precision;
    ec.low_precision_share = st.low_precision_share;
  }
  std::size_t token = 0;
  SimReplayPredictor pred;
  if (setup.prefetch) {
    std::vector<PreGateRouter> routers;
    const auto& rec = cx.params.layer_recall;
    const bool uniform = std::all_of(rec.begin(), rec.end(), [&](float r) { return r == rec.front(); });
    for (std::size_t i = 0; i < (uniform || setup.routes ? std::size_t{1} : rec.size()); ++i) {
      auto r = PreGateRouter::replay(cx.measured, st.prefetch_depth, setup.routes ? 1.f : rec[i], st.replay_seed);
      if (!r) return r.status();
      routers.push_back(std::move(*r));
    }
    pred = SimReplayPredictor(std::move(routers), &token, trace.n_layers, st.prefetch_depth);
  }
  SensitivityGate gate;
  if (setup.gate) gate = SensitivityGate(cx.params.sensitivities, cx.params.gate_threshold);
  CostModelMiss miss;
  miss.allow_source_compute = setup.cpu;
  miss.mixed_precision = setup.low;
  miss.hobbit.t_high = cx.params.hobbit_t_high;
  miss.hobbit.t_skip = cx.params.hobbit_t_skip;

  auto ex =
      MoeLayerExecutor<TechniquePolicies<E>>::create(*cx.store, std::move(ec), SimExecutionBackend(cx.cfg->profile),
                                                     std::move(eviction), std::move(gate), std::move(pred), miss);
  if (!ex) return ex.status();
  TokenRouting routing;
  std::uint64_t calls = 0;
  for (std::size_t t = cx.begin; t < cx.end; ++t) {
    token = t - cx.begin;
    for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
      if (!routing_at(trace, t, l, routing)) continue;
      MOEX_RETURN_IF_ERROR(ex->forward_routed(l, std::span<const TokenRouting>(&routing, 1), nullptr, 1, nullptr));
      ++calls;
    }
  }
  const LayerStats s = ex->stats().total();
  const SimBackend& sim = ex->backend().sim();
  SimTechniqueResult row;
  SimRunResult& r = row.run;
  r.policy = std::string(eviction_name_of<E>());
  r.profile = cx.cfg->profile.name;
  r.shape = cx.cfg->shape.name;
  r.expert_shape = cx.cfg->shape.shape;
  r.budget_fraction = cx.cfg->budget_fraction;
  r.expert_bytes = cx.expert_bytes;
  r.cache_slots = cx.slots;
  r.cache_bytes = cx.slots * cx.expert_bytes;
  r.tokens = cx.end - cx.begin;
  record_sim_counters(s, sim, calls, r);
  derive_sim_rates(r);
  row.host_busy_ns = sim.device_stats(SimDevice::kHostCpu).busy_ns;
  row.cpu_busy_fraction = r.sim_ns ? static_cast<double>(row.host_busy_ns) / static_cast<double>(r.sim_ns) : 0.0;
  row.skipped = s.skipped;
  row.computed_at_source = s.computed_at_source;
  row.low_precision_loads = setup.low ? s.misses_by_precision[static_cast<std::size_t>(st.low_precision)] : 0;
  row.prefetches = s.prefetches;
  row.prefetch_hits = s.prefetch_hits;
  row.prefetch_wasted_bytes = s.prefetch_wasted_bytes;
  // Recall over the layers a prediction can reach (layer 0 is never predicted).
  std::uint64_t sel = 0, correct = 0;
  for (std::size_t l = 1; l < ex->stats().layers.size(); ++l) {
    sel += ex->stats().layers[l].selected;
    correct += ex->stats().layers[l].predicted_correct;
  }
  row.recall = setup.prefetch && sel ? static_cast<double>(correct) / static_cast<double>(sel) : 0.0;
  row.avg_k = calls ? static_cast<double>(s.expert_calls) / static_cast<double>(calls) : 0.0;
  row.exact = ex->exact() && !setup.routes;
  return row;
}

// Runs a row with the eviction named `name`.
Result<SimTechniqueResult> run_row_named(const Context& cx, const RowSetup& setup, std::string_view name) {
  if (name == "lfu") return run_row(cx, setup, LfuEviction{});
  if (name == "lrfu") return run_row(cx, setup, LrfuEviction{});
  if (name == "hobbit") return run_row(cx, setup, HobbitScoreEviction{});
  return run_row(cx, setup, LruEviction{});
}

// HOBBIT unimportance of every non-top expert of tokens [begin, end).
float median_unimportance(const RoutingTrace& trace, std::size_t begin, std::size_t end) {
  std::vector<float> u;
  for (std::size_t t = begin; t < end; ++t)
    for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
      const auto w = trace.weights(t, l);
      float total = 0.f;
      for (float x : w) total += x;
      if (!(total > 0.f)) continue;
      float before = 0.f;
      for (std::size_t j = 0; j < w.size(); ++j) {
        if (j > 0) u.push_back(before / total);
        before += w[j];
      }
    }
  if (u.empty()) return 0.6f;
  std::nth_element(u.begin(), u.begin() + static_cast<std::ptrdiff_t>(u.size() / 2), u.end());
  return u[u.size() / 2];
}

}  // namespace

std::string_view to_string(SimTechnique t) noexcept {
  for (const auto& n : kTechniqueNames)
    if (n.t == t) return n.name;
  return "?";
}

std::string_view technique_label(SimTechnique t) noexcept {
  for (const auto& n : kTechniqueNames)
    if (n.t == t) return n.label;
  return "?";
}

Result<SimTechnique> parse_sim_technique(std::string_view name) {
  std::string known;
  for (const auto& n : kTechniqueNames) {
    if (n.name == name) return n.t;
    known += (known.empty() ? "" : ", ") + std::string(n.name);
  }
  return invalid_argument("unknown technique '" + std::string(name) + "' (known: " + known + ")");
}

std::vector<SimTechnique> all_sim_techniques() {
  std::vector<SimTechnique> v;
  for (const auto& n : kTechniqueNames) v.push_back(n.t);
  return v;
}

Result<std::vector<SimTechniqueResult>> run_techniques(const SimTechniqueConfig& c, SimTechniqueParams* params_out) {
  if (c.trace == nullptr) return invalid_argument("run_techniques: no trace");
  const RoutingTrace& trace = *c.trace;
  MOEX_RETURN_IF_ERROR(trace.validate());
  const SimTechniqueSettings& st = c.settings;
  if (!(c.budget_fraction > 0.0 && c.budget_fraction <= 1.0))
    return invalid_argument("run_techniques: budget fraction " + fmt("%g", c.budget_fraction) + " is outside (0, 1]");
  if (!(st.recall >= 0.f && st.recall <= 1.f)) return invalid_argument("run_techniques: recall must lie in [0, 1]");
  if (trace.n_layers < 2) return invalid_argument("run_techniques: the trace needs at least two layers");
  if (st.prefetch_depth == 0 || st.prefetch_depth >= trace.n_layers)
    return invalid_argument("run_techniques: prefetch depth must lie in 1..n_layers-1");
  if (!(st.gate_keep_fraction > 0.0 && st.gate_keep_fraction <= 1.0))
    return invalid_argument("run_techniques: gate keep fraction must lie in (0, 1]");
  if (!(st.low_precision_share > 0.0 && st.low_precision_share < 1.0))
    return invalid_argument("run_techniques: low-precision share must lie strictly between 0 and 1");
  if (!is_quantized(st.low_precision) && st.low_precision != Precision::kF16 && st.low_precision != Precision::kBF16)
    return invalid_argument("run_techniques: the low precision must be int8, int4, int2 or a 16-bit float");
  if (!st.layer_recall.empty() && st.layer_recall.size() != trace.n_layers - 1)
    return invalid_argument("run_techniques: " + std::to_string(st.layer_recall.size()) + " per-layer recalls for " +
                            std::to_string(trace.n_layers - 1) + " predicting layers");
  for (float r : st.layer_recall)
    if (!(r >= 0.f && r <= 1.f)) return invalid_argument("run_techniques: a per-layer recall lies outside [0, 1]");
  if (!st.sensitivities.empty() && st.sensitivities.size() != trace.n_layers)
    return invalid_argument("run_techniques: " + std::to_string(st.sensitivities.size()) + " sensitivities for " +
                            std::to_string(trace.n_layers) + " layers");

  Context cx;
  cx.trace = &trace;
  cx.cfg = &c;
  const std::size_t T = trace.tokens();
  const std::size_t mid = c.split == TraceSplit::kHalf ? T / 2 : 0;
  const std::size_t prof_end = c.split == TraceSplit::kHalf ? mid : T;
  if (T == 0 || mid >= T || (c.split == TraceSplit::kHalf && mid == 0))
    return invalid_argument("run_techniques: the trace has too few tokens (" + std::to_string(T) + ")");
  cx.begin = mid;
  cx.end = T;
  auto measured = trace_slice(trace, mid, T);
  if (!measured) return measured.status();
  cx.measured = std::move(*measured);
  auto profile = trace_slice(trace, 0, prof_end);
  if (!profile) return profile.status();

  // The store: shapes only, with the low-precision copy for HOBBIT's pool.
  MoeModelSpec spec;
  spec.n_layers = trace.n_layers;
  spec.n_experts = trace.n_experts;
  spec.shape = c.shape.shape;
  spec.router.n_experts = trace.n_experts;
  spec.router.top_k = std::max<std::uint32_t>(1, std::min(trace.top_k, trace.n_experts));
  const WeightFormat cache_fmt = format_of(c.cache_precision);
  const WeightFormat low_fmt = format_of(st.low_precision);
  if (!expert_format_is_valid(spec.shape, cache_fmt) || !expert_format_is_valid(spec.shape, low_fmt))
    return invalid_argument("run_techniques: the cache or low precision cannot hold experts of shape " + c.shape.name);
  std::vector<WeightFormat> extra;
  if (c.cache_precision != Precision::kBF16) extra.push_back(cache_fmt);
  if (st.low_precision != Precision::kBF16 && st.low_precision != c.cache_precision) extra.push_back(low_fmt);
  auto store = ExpertStore::create_virtual(spec, float_format(Precision::kBF16), extra);
  if (!store) return store.status();
  cx.store = &*store;
  cx.expert_bytes = store->expert_bytes(c.cache_precision);
  if (cx.expert_bytes == 0) return internal_error("run_techniques: zero-byte expert");
  const long double all = static_cast<long double>(trace.n_layers) * trace.n_experts * cx.expert_bytes;
  cx.slots =
      static_cast<std::uint64_t>(std::floor(all * static_cast<long double>(c.budget_fraction))) / cx.expert_bytes;
  if (cx.slots == 0)
    return invalid_argument("run_techniques: a budget of " + fmt("%g", c.budget_fraction) + " holds no whole expert");

  // Parameters, calibrated on the profile tokens.
  std::vector<SimTechnique> want = c.techniques.empty() ? all_sim_techniques() : c.techniques;
  if (std::find(want.begin(), want.end(), SimTechnique::kBaseline) == want.end())
    want.insert(want.begin(), SimTechnique::kBaseline);
  const auto order = [](SimTechnique t) {
    const auto it = std::find_if(std::begin(kTechniqueNames), std::end(kTechniqueNames),
                                 [&](const TechniqueName& n) { return n.t == t; });
    return it - std::begin(kTechniqueNames);
  };
  std::sort(want.begin(), want.end(), [&](SimTechnique a, SimTechnique b) { return order(a) < order(b); });
  want.erase(std::unique(want.begin(), want.end()), want.end());
  const bool need_layers =
      std::any_of(want.begin(), want.end(), [](SimTechnique t) { return setup_of(t).layer_budgets; });
  if (need_layers && cx.slots < trace.n_layers)
    return invalid_argument("run_techniques: a budget of " + fmt("%g", c.budget_fraction) + " holds " +
                            std::to_string(cx.slots) + " experts, fewer than one per layer (" +
                            std::to_string(trace.n_layers) + "); per-layer budgets need more");

  SimTechniqueParams& p = cx.params;
  p.layer_recall = st.layer_recall.empty() ? std::vector<float>(trace.n_layers - 1, st.recall) : st.layer_recall;
  p.sensitivities = st.sensitivities;
  if (p.sensitivities.empty()) {
    for (std::uint32_t l = 0; l < trace.n_layers; ++l)
      p.sensitivities.push_back(1.f - 0.75f * static_cast<float>(l) / static_cast<float>(trace.n_layers - 1));
  }
  SensitivityGate g;
  MOEX_RETURN_IF_ERROR(g.set_sensitivities(p.sensitivities));
  p.gate_target_k = std::max(1.0, st.gate_keep_fraction * static_cast<double>(trace.top_k));
  auto reached = g.calibrate_threshold(*profile, p.gate_target_k);
  if (!reached) return reached.status();
  p.gate_profile_k = *reached;
  p.gate_threshold = g.threshold();
  p.hobbit_t_high = st.hobbit_t_high >= 0.f ? st.hobbit_t_high : median_unimportance(trace, 0, prof_end);
  p.hobbit_t_skip = st.hobbit_t_skip;
  if (need_layers) {
    auto curves = profile_miss_curves(*profile, trace.n_experts);
    if (!curves) return curves.status();
    auto split = dp_layer_split(*curves, static_cast<std::uint32_t>(std::min<std::uint64_t>(cx.slots, 0xFFFFFFFFu)), 1);
    if (!split) return split.status();
    p.layer_slots = std::move(*split);
    // With a low-precision pool each layer's budget is split in two, and each part must hold one
    // expert of its precision (the cache rejects an expert larger than its group's budget).
    const double share = st.low_precision_share;
    const double lb = static_cast<double>(store->expert_bytes(st.low_precision));
    const double eb = static_cast<double>(cx.expert_bytes);
    const auto min_slots = static_cast<std::uint32_t>(
        std::max({1.0, std::ceil(1.0 / (1.0 - share) - 1e-9), std::ceil(lb / (share * eb) - 1e-9)}));
    if (std::uint64_t{min_slots} * trace.n_layers <= cx.slots) {
      auto s2 = dp_layer_split(*curves, static_cast<std::uint32_t>(std::min<std::uint64_t>(cx.slots, 0xFFFFFFFFu)),
                               min_slots);
      if (!s2) return s2.status();
      cx.low_layer_slots = std::move(*s2);
      p.combined_layer_slots = cx.low_layer_slots;
    }
  }

  std::vector<SimTechniqueResult> rows;
  for (SimTechnique t : want) {
    RowSetup setup = setup_of(t);
    bool layers_dropped = false;
    if (setup.layer_budgets && setup.low && cx.low_layer_slots.empty()) {
      setup.layer_budgets = false;  // no split gives every layer room in both pools
      layers_dropped = true;
    }
    Result<SimTechniqueResult> row = internal_error("unset");
    if (t == SimTechnique::kLayerBudgets) {
      // The best online eviction under the DP split (lowest stall).
      for (std::string_view e : {"lru", "lfu", "lrfu", "hobbit"}) {
        auto r = run_row_named(cx, setup, e);
        if (!r) return Status(r.status().code(), "layer-budgets (" + std::string(e) + "): " + r.status().message());
        if (!row || r->run.stall_ns < row->run.stall_ns) row = std::move(r);
      }
      p.best_eviction = row->run.policy;
    } else {
      std::string_view e = "lru";
      if (setup.layer_budgets) {
        if (p.best_eviction.empty()) {
          // Combined without the per-layer row: pick the eviction the same way.
          Result<SimTechniqueResult> best = internal_error("unset");
          const RowSetup only{false, true, false, false, false};
          for (std::string_view en : {"lru", "lfu", "lrfu", "hobbit"}) {
            auto r = run_row_named(cx, only, en);
            if (!r) return r.status();
            if (!best || r->run.stall_ns < best->run.stall_ns) best = std::move(r);
          }
          p.best_eviction = best->run.policy;
        }
        e = p.best_eviction;
      }
      row = run_row_named(cx, setup, e);
      if (!row) return Status(row.status().code(), std::string(to_string(t)) + ": " + row.status().message());
    }
    row->technique = t;
    std::string d;
    auto add = [&](const std::string& s) { d += (d.empty() ? "" : "; ") + s; };
    if (setup.routes) {
      add("depth " + std::to_string(st.prefetch_depth) +
          ": the pre-gate's choice is the routing, so every prefetch is right (measured recall " +
          fmt("%.2f", row->recall) + ")");
    } else if (setup.prefetch) {
      const bool uniform = std::all_of(p.layer_recall.begin(), p.layer_recall.end(),
                                       [&](float r) { return r == p.layer_recall.front(); });
      double mean = 0;
      for (float r : p.layer_recall) mean += r;
      mean /= static_cast<double>(p.layer_recall.size());
      add("replay depth " + std::to_string(st.prefetch_depth) + ", recall " +
          (uniform ? fmt("%.2f", mean) : fmt("%.2f", mean) + " mean per layer") + " (measured " +
          fmt("%.2f", row->recall) + ")");
    }
    if (setup.layer_budgets)
      add(row->run.policy + ", DP split" + (setup.low ? " (each layer with room in both pools)" : ""));
    if (layers_dropped) add("no per-layer budgets (the budget cannot give every layer room in both pools)");
    if (setup.gate) add("T=" + fmt("%.3g", p.gate_threshold) + ", avg k " + fmt("%.2f", row->avg_k));
    if (setup.low)
      add(std::string(to_string(st.low_precision)) + " pool " + fmt("%.0f%%", 100 * st.low_precision_share) +
          ", t_high " + fmt("%.2f", p.hobbit_t_high) + ", t_skip " + fmt("%.2f", p.hobbit_t_skip) + ", " +
          fmt("%.0f%%", row->run.misses ? 100.0 * static_cast<double>(row->low_precision_loads) /
                                              static_cast<double>(row->run.misses)
                                        : 0.0) +
          " of misses low");
    if (setup.cpu)
      add(fmt("%.0f%%", row->run.misses ? 100.0 * static_cast<double>(row->computed_at_source) /
                                              static_cast<double>(row->run.misses)
                                        : 0.0) +
          " of misses on CPU");
    if (t == SimTechnique::kBaseline) d = "one pool, load on miss";
    row->detail = d;
    rows.push_back(std::move(*row));
  }
  const SimRunResult& base = rows.front().run;
  for (auto& r : rows) {
    r.speedup = r.run.ms_per_token > 0 ? base.ms_per_token / r.run.ms_per_token : 1.0;
    r.stall_cut = base.stall_ns ? 1.0 - static_cast<double>(r.run.stall_ns) / static_cast<double>(base.stall_ns) : 0.0;
  }
  if (params_out) *params_out = p;
  return rows;
}

Result<std::vector<float>> load_predictor_recall(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return not_found("no training report at " + path.string());
  std::ifstream f(path);
  const auto j = nlohmann::json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return corrupt(path.string() + ": not a JSON object");
  const auto td = j.find("trace_dev");
  if (td == j.end() || !td->is_object()) return not_found(path.string() + ": no trace_dev section");
  const auto rk = td->find("recall_at_k");
  if (rk == td->end() || !rk->is_array() || rk->empty() || rk->size() > 4096)
    return corrupt(path.string() + ": trace_dev.recall_at_k is not a non-empty array");
  std::vector<float> out;
  for (const auto& v : *rk) {
    if (!v.is_number()) return corrupt(path.string() + ": a recall is not a number");
    const double d = v.get<double>();
    if (!(d >= 0.0 && d <= 1.0)) return corrupt(path.string() + ": a recall lies outside [0, 1]");
    out.push_back(static_cast<float>(d));
  }
  return out;
}

namespace {
std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"') out += '"';
    out += ch;
  }
  return out + "\"";
}
std::string g6(double v) { return fmt("%.6g", v); }
}  // namespace

std::string sim_techniques_to_csv(std::string_view trace_name, std::span<const SimTechniqueResult> rows) {
  std::string s =
      "trace,shape,profile,budget_fraction,technique,detail,eviction,hit_rate,ms_per_token,stall_ms_per_token,"
      "gb_per_token,pcie_busy_pct,cpu_busy_pct,speedup,stall_cut_pct,avg_k,skipped,computed_at_source,"
      "low_precision_loads,prefetches,prefetch_hits,recall,exact,quality_rel_error,quality_note\n";
  for (const auto& r : rows) {
    s += csv_field(trace_name) + ',' + csv_field(r.run.shape) + ',' + csv_field(r.run.profile) + ',' +
         g6(r.run.budget_fraction) + ',' + std::string(to_string(r.technique)) + ',' + csv_field(r.detail) + ',' +
         r.run.policy + ',' + g6(r.run.hit_rate) + ',' + g6(r.run.ms_per_token) + ',' + g6(r.run.stall_ms_per_token) +
         ',' + g6(r.run.bytes_per_token / 1e9) + ',' + g6(100 * r.run.pcie_busy_fraction) + ',' +
         g6(100 * r.cpu_busy_fraction) + ',' + g6(r.speedup) + ',' + g6(100 * r.stall_cut) + ',' + g6(r.avg_k) + ',' +
         std::to_string(r.skipped) + ',' + std::to_string(r.computed_at_source) + ',' +
         std::to_string(r.low_precision_loads) + ',' + std::to_string(r.prefetches) + ',' +
         std::to_string(r.prefetch_hits) + ',' + g6(r.recall) + ',' + (r.exact ? "1" : "0") + ',' +
         (r.quality ? g6(*r.quality) : std::string()) + ',' + csv_field(r.quality_note) + '\n';
  }
  return s;
}

std::string sim_techniques_to_json(std::string_view trace_name, const SimTechniqueParams& p,
                                   std::span<const SimTechniqueResult> rows) {
  nlohmann::json j;
  j["trace"] = std::string(trace_name);
  j["params"] = {{"layer_recall", p.layer_recall},     {"sensitivities", p.sensitivities},
                 {"gate_threshold", p.gate_threshold}, {"gate_target_k", p.gate_target_k},
                 {"gate_profile_k", p.gate_profile_k}, {"hobbit_t_high", p.hobbit_t_high},
                 {"hobbit_t_skip", p.hobbit_t_skip},   {"best_eviction", p.best_eviction},
                 {"layer_slots", p.layer_slots},       {"combined_layer_slots", p.combined_layer_slots}};
  nlohmann::json a = nlohmann::json::array();
  for (const auto& r : rows) {
    nlohmann::json o;
    o["technique"] = std::string(to_string(r.technique));
    o["label"] = std::string(technique_label(r.technique));
    o["detail"] = r.detail;
    o["shape"] = r.run.shape;
    o["profile"] = r.run.profile;
    o["budget_fraction"] = r.run.budget_fraction;
    o["eviction"] = r.run.policy;
    o["hit_rate"] = r.run.hit_rate;
    o["sim_ns"] = r.run.sim_ns;
    o["stall_ns"] = r.run.stall_ns;
    o["bytes_loaded"] = r.run.bytes_loaded;
    o["link_busy_ns"] = r.run.link_busy_ns;
    o["host_busy_ns"] = r.host_busy_ns;
    o["tokens"] = r.run.tokens;
    o["ms_per_token"] = r.run.ms_per_token;
    o["stall_ms_per_token"] = r.run.stall_ms_per_token;
    o["bytes_per_token"] = r.run.bytes_per_token;
    o["pcie_busy_fraction"] = r.run.pcie_busy_fraction;
    o["cpu_busy_fraction"] = r.cpu_busy_fraction;
    o["speedup"] = r.speedup;
    o["stall_cut"] = r.stall_cut;
    o["avg_k"] = r.avg_k;
    o["skipped"] = r.skipped;
    o["computed_at_source"] = r.computed_at_source;
    o["low_precision_loads"] = r.low_precision_loads;
    o["prefetches"] = r.prefetches;
    o["prefetch_hits"] = r.prefetch_hits;
    o["prefetch_wasted_bytes"] = r.prefetch_wasted_bytes;
    o["recall"] = r.recall;
    o["exact"] = r.exact;
    o["quality_rel_error"] = r.quality ? nlohmann::json(*r.quality) : nlohmann::json(nullptr);
    o["quality_note"] = r.quality_note;
    a.push_back(std::move(o));
  }
  j["rows"] = std::move(a);
  return j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
}

MOEX_NAMESPACE_END
