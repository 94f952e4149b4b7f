// The simulation grid: trace replays through MoeLayerExecutor over SimExecutionBackend.

#include "moex/sim/grid.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "moex/backend/sim_execution_backend.hpp"
#include "moex/cache/layer_budget.hpp"
#include "moex/executor/moe_layer_executor.hpp"
#include "moex/formats/model_config.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/policies/static_hot_set_eviction.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

// Per-layer budgets in the executor, detected so this file builds before and after they land.
template <class C>
concept HasLayerCacheBytes = requires(C c) {
  c.layer_cache_bytes = std::vector<std::uint64_t>{};
};
constexpr bool kLayerBudgets = HasLayerCacheBytes<ExecutorConfig>;

// Sets the per-layer budgets where the executor has them (a template, so the discarded branch is
// never instantiated against an ExecutorConfig without the field).
template <class C>
void set_layer_cache_bytes(C& cfg, std::vector<std::uint64_t> bytes) {
  if constexpr (HasLayerCacheBytes<C>) cfg.layer_cache_bytes = std::move(bytes);
}

struct PolicyName {
  SimPolicy policy;
  std::string_view name;
};
constexpr PolicyName kPolicyNames[] = {
    {SimPolicy::kLru, "lru"},
    {SimPolicy::kLfu, "lfu"},
    {SimPolicy::kLrfu, "lrfu"},
    {SimPolicy::kHobbit, "hobbit"},
    {SimPolicy::kStaticHot, "static-hot"},
    {SimPolicy::kBelady, "belady"},
    {SimPolicy::kLruLayerDp, "lru-dp"},
};

template <class E>
struct SimPoliciesOf : DefaultPolicies {
  using Eviction = E;
  using Backend = SimExecutionBackend;
};

// The store format holding experts in precision p.
WeightFormat format_of(Precision p) noexcept { return is_quantized(p) ? quant_format(p) : float_format(p); }

// Replays [begin, end) of the trace through a fresh executor; fills the measured part of `r`.
template <class E>
Status replay(const RoutingTrace& trace, std::size_t begin, std::size_t end, const ExpertStore& store,
              ExecutorConfig cfg, const DeviceProfile& profile, E policy, SimRunResult& r) {
  auto ex = MoeLayerExecutor<SimPoliciesOf<E>>::create(store, std::move(cfg), SimExecutionBackend(profile),
                                                       std::move(policy));
  if (!ex) return ex.status();
  TokenRouting routing;
  std::uint64_t calls = 0;
  for (std::size_t t = begin; t < end; ++t) {
    for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
      if (!routing_at(trace, t, l, routing)) continue;
      MOEX_RETURN_IF_ERROR(ex->forward_routed(l, std::span<const TokenRouting>(&routing, 1), nullptr, 1, nullptr));
      ++calls;
    }
  }
  record_sim_counters(ex->stats().total(), ex->backend().sim(), calls, r);
  return Status::ok();
}

// AdapMoE's DP split of `total_slots` over layers from LRU miss curves of tokens [begin, end).
Result<std::vector<std::uint32_t>> dp_slots_of(const RoutingTrace& trace, std::size_t begin, std::size_t end,
                                               std::uint64_t total_slots) {
  if (total_slots < trace.n_layers)
    return invalid_argument("lru-dp: the budget holds " + std::to_string(total_slots) +
                            " experts, fewer than one per layer (" + std::to_string(trace.n_layers) + ")");
  auto part = trace_slice(trace, begin, end);
  if (!part) return part.status();
  auto curves = profile_miss_curves(*part, trace.n_experts);
  if (!curves) return curves.status();
  const auto total = static_cast<std::uint32_t>(std::min<std::uint64_t>(total_slots, 0xFFFFFFFFu));
  return dp_layer_split(*curves, total, 1);
}

std::string fmt_double(double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(s);
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

}  // namespace

std::string_view to_string(SimPolicy p) noexcept {
  for (const auto& n : kPolicyNames)
    if (n.policy == p) return n.name;
  return "?";
}

Result<SimPolicy> parse_sim_policy(std::string_view name) {
  for (const auto& n : kPolicyNames)
    if (n.name == name) return n.policy;
  std::string known;
  for (const auto& n : kPolicyNames) known += (known.empty() ? "" : ", ") + std::string(n.name);
  return invalid_argument("unknown policy '" + std::string(name) + "' (known: " + known + ")");
}

bool sim_layer_budgets_supported() noexcept { return kLayerBudgets; }

std::vector<SimPolicy> default_sim_policies() {
  std::vector<SimPolicy> p = {SimPolicy::kLru, SimPolicy::kLfu, SimPolicy::kLrfu, SimPolicy::kHobbit,
                              SimPolicy::kStaticHot};
  if (kLayerBudgets) p.push_back(SimPolicy::kLruLayerDp);
  p.push_back(SimPolicy::kBelady);
  return p;
}

std::string_view to_string(TraceSplit s) noexcept { return s == TraceSplit::kHalf ? "half" : "none"; }

Result<TraceSplit> parse_trace_split(std::string_view name) {
  if (name == "half") return TraceSplit::kHalf;
  if (name == "none") return TraceSplit::kNone;
  return invalid_argument("unknown split '" + std::string(name) + "' (known: half, none)");
}

Result<NamedShape> resolve_sim_shape(std::string_view spec, const std::filesystem::path& trace_path,
                                     const RoutingTrace& trace) {
  if (spec == "mixtral" || spec == "mixtral-8x7b") return NamedShape{"mixtral", {4096, 14336}};
  if (spec == "qwen3-30b-a3b" || spec == "qwen3") return NamedShape{"qwen3-30b-a3b", {2048, 768}};
  if (spec == "model-native" || spec == "native") {
    const std::filesystem::path cfg = trace_path.parent_path() / "config.json";
    std::error_code ec;
    if (std::filesystem::is_regular_file(cfg, ec)) {
      std::ifstream in(cfg, std::ios::binary);
      if (!in) return io_error("model-native: cannot read " + cfg.string());
      std::stringstream ss;
      ss << in.rdbuf();
      auto mc = parse_model_config(ss.str(), cfg.string());
      if (!mc) return mc.status();
      if (mc->hidden == 0 || mc->expert_ffn == 0)
        return invalid_argument("model-native: " + cfg.string() + " gives no expert shape");
      return NamedShape{"native-" + std::to_string(mc->hidden) + "x" + std::to_string(mc->expert_ffn),
                        {mc->hidden, mc->expert_ffn}};
    }
    if (trace.n_layers == 32 && trace.n_experts == 8 && trace.top_k == 2)
      return NamedShape{"native-mixtral", {4096, 14336}};
    return invalid_argument("model-native: no config.json beside " + trace_path.string() + " and no known model with " +
                            std::to_string(trace.n_layers) + " layers x " + std::to_string(trace.n_experts) +
                            " experts; pass --shape mixtral, qwen3-30b-a3b or HxF");
  }
  const std::size_t x = spec.find('x');
  if (x != std::string_view::npos && x > 0 && x + 1 < spec.size()) {
    std::uint64_t dims[2] = {0, 0};
    const std::string_view parts[2] = {spec.substr(0, x), spec.substr(x + 1)};
    bool ok = true;
    for (int i = 0; i < 2 && ok; ++i) {
      if (parts[i].empty() || parts[i].size() > 7) ok = false;
      for (char c : parts[i]) {
        if (c < '0' || c > '9') {
          ok = false;
          break;
        }
        dims[i] = dims[i] * 10 + static_cast<std::uint64_t>(c - '0');
      }
    }
    if (ok && dims[0] > 0 && dims[1] > 0)
      return NamedShape{std::string(spec), {static_cast<std::uint32_t>(dims[0]), static_cast<std::uint32_t>(dims[1])}};
  }
  return invalid_argument("unknown shape '" + std::string(spec) +
                          "' (known: mixtral, qwen3-30b-a3b, model-native, or HIDDENxFFN such as 4096x14336)");
}

Result<RoutingTrace> trace_slice(const RoutingTrace& trace, std::size_t begin, std::size_t end) {
  if (begin > end || end > trace.tokens())
    return invalid_argument("trace_slice: range [" + std::to_string(begin) + ", " + std::to_string(end) +
                            ") outside the trace's " + std::to_string(trace.tokens()) + " tokens");
  RoutingTrace out;
  out.n_layers = trace.n_layers;
  out.n_experts = trace.n_experts;
  out.top_k = trace.top_k;
  out.source = trace.source + " [tokens " + std::to_string(begin) + ", " + std::to_string(end) + ")";
  const std::size_t per = std::size_t{trace.n_layers} * trace.top_k;
  out.expert_ids.assign(trace.expert_ids.begin() + static_cast<std::ptrdiff_t>(begin * per),
                        trace.expert_ids.begin() + static_cast<std::ptrdiff_t>(end * per));
  out.gate_weights.assign(trace.gate_weights.begin() + static_cast<std::ptrdiff_t>(begin * per),
                          trace.gate_weights.begin() + static_cast<std::ptrdiff_t>(end * per));
  if (trace.has_logits()) {
    const std::size_t pl = std::size_t{trace.n_layers} * trace.n_experts;
    out.router_logits.assign(trace.router_logits.begin() + static_cast<std::ptrdiff_t>(begin * pl),
                             trace.router_logits.begin() + static_cast<std::ptrdiff_t>(end * pl));
  }
  if (end > begin) {
    out.seq_start.push_back(0);
    for (std::uint32_t s : trace.seq_start)
      if (s > begin && s < end) out.seq_start.push_back(static_cast<std::uint32_t>(s - begin));
  }
  return out;
}

void record_sim_counters(const LayerStats& totals, const SimBackend& sim, std::uint64_t layer_steps,
                         SimRunResult& r) noexcept {
  r.layer_steps = layer_steps;
  r.hits = totals.hits;
  r.misses = totals.misses;
  r.bytes_loaded = sim.link_stats(SimLink::kHostToDevice).bytes;  // demand loads and prefetches
  r.stall_ns = totals.stall_ns;
  r.compute_ns = sim.device_stats(SimDevice::kGpu).busy_ns + sim.device_stats(SimDevice::kHostCpu).busy_ns;
  r.sim_ns = std::max({sim.now(), sim.device_free_at(SimDevice::kGpu), sim.device_free_at(SimDevice::kHostCpu),
                       sim.link_free_at(SimLink::kHostToDevice)});
  r.link_busy_ns = sim.link_stats(SimLink::kHostToDevice).busy_ns;
}

void derive_sim_rates(SimRunResult& r) noexcept {
  const std::uint64_t lookups = r.hits + r.misses;
  r.hit_rate = lookups ? static_cast<double>(r.hits) / static_cast<double>(lookups) : 0.0;
  const double tok = static_cast<double>(r.tokens);
  r.tokens_per_s = r.sim_ns ? tok * 1e9 / static_cast<double>(r.sim_ns) : 0.0;
  r.ms_per_token = r.tokens ? static_cast<double>(r.sim_ns) / 1e6 / tok : 0.0;
  r.stall_ms_per_token = r.tokens ? static_cast<double>(r.stall_ns) / 1e6 / tok : 0.0;
  r.compute_ms_per_token = r.tokens ? static_cast<double>(r.compute_ns) / 1e6 / tok : 0.0;
  r.bytes_per_token = r.tokens ? static_cast<double>(r.bytes_loaded) / tok : 0.0;
  r.pcie_busy_fraction = r.sim_ns ? static_cast<double>(r.link_busy_ns) / static_cast<double>(r.sim_ns) : 0.0;
}

Result<SimRunResult> run_simulation(const SimRunConfig& c) {
  if (c.trace == nullptr) return invalid_argument("run_simulation: no trace");
  const RoutingTrace& trace = *c.trace;
  const std::size_t end = std::min(c.end_token, trace.tokens());
  const std::size_t begin = c.begin_token;
  if (begin >= end)
    return invalid_argument("run_simulation: empty token range [" + std::to_string(begin) + ", " + std::to_string(end) +
                            ")");
  if (!(c.budget_fraction > 0.0 && c.budget_fraction <= 1.0))
    return invalid_argument("run_simulation: budget fraction " + fmt_double(c.budget_fraction) + " is outside (0, 1]");
  if (c.policy == SimPolicy::kLruLayerDp && !kLayerBudgets)
    return unsupported("lru-dp: this build's executor has no per-layer budgets (ExecutorConfig::layer_cache_bytes)");

  MoeModelSpec spec;
  spec.n_layers = trace.n_layers;
  spec.n_experts = trace.n_experts;
  spec.shape = c.shape.shape;
  spec.router.n_experts = trace.n_experts;
  spec.router.top_k = std::max<std::uint32_t>(1, std::min(trace.top_k, trace.n_experts));
  const WeightFormat master = float_format(Precision::kBF16);
  const WeightFormat cache_fmt = format_of(c.cache_precision);
  if (!expert_format_is_valid(spec.shape, cache_fmt))
    return invalid_argument("run_simulation: " + std::string(to_string(c.cache_precision)) +
                            " cannot hold experts of shape " + c.shape.name);
  std::vector<WeightFormat> extra;
  if (c.cache_precision != Precision::kBF16) extra.push_back(cache_fmt);
  auto store = ExpertStore::create_virtual(spec, master, extra);
  if (!store) return store.status();

  SimRunResult r;
  r.policy = std::string(to_string(c.policy));
  r.profile = c.profile.name;
  r.shape = c.shape.name;
  r.expert_shape = c.shape.shape;
  r.budget_fraction = c.budget_fraction;
  r.expert_bytes = store->expert_bytes(c.cache_precision);
  r.tokens = end - begin;
  if (r.expert_bytes == 0) return internal_error("run_simulation: zero-byte expert");
  const long double all = static_cast<long double>(trace.n_layers) * trace.n_experts * r.expert_bytes;
  const auto budget = static_cast<std::uint64_t>(std::floor(all * static_cast<long double>(c.budget_fraction)));
  const std::uint64_t slots = budget / r.expert_bytes;
  if (slots == 0)
    return invalid_argument("run_simulation: a budget of " + fmt_double(c.budget_fraction) +
                            " of all expert bytes holds no whole expert");

  r.cache_slots = slots;
  ExecutorConfig cfg;
  cfg.cache_bytes = slots * r.expert_bytes;
  cfg.cache_precision = c.cache_precision;
  cfg.check_finite = false;
  const DeviceProfile& prof = c.profile;
  Status s;
  switch (c.policy) {
    case SimPolicy::kLru:
      s = replay(trace, begin, end, *store, cfg, prof, LruEviction{}, r);
      break;
    case SimPolicy::kLfu:
      s = replay(trace, begin, end, *store, cfg, prof, LfuEviction{}, r);
      break;
    case SimPolicy::kLrfu:
      s = replay(trace, begin, end, *store, cfg, prof, LrfuEviction{}, r);
      break;
    case SimPolicy::kHobbit:
      s = replay(trace, begin, end, *store, cfg, prof, HobbitScoreEviction{}, r);
      break;
    case SimPolicy::kStaticHot: {
      std::vector<double> scores = c.static_scores.empty() ? expert_access_counts(trace, begin, end) : c.static_scores;
      if (scores.size() != std::size_t{trace.n_layers} * trace.n_experts)
        return invalid_argument("static-hot: the profile has " + std::to_string(scores.size()) +
                                " scores, not n_layers * n_experts");
      s = replay(trace, begin, end, *store, cfg, prof, StaticHotSetEviction(std::move(scores), trace.n_experts), r);
      break;
    }
    case SimPolicy::kBelady: {
      BeladyOracleEviction b;
      MOEX_RETURN_IF_ERROR(b.set_future(replay_future(trace, begin, end), trace.n_layers, trace.n_experts));
      s = replay(trace, begin, end, *store, cfg, prof, std::move(b), r);
      break;
    }
    case SimPolicy::kLruLayerDp: {
      if constexpr (kLayerBudgets) {
        std::vector<std::uint32_t> split = c.layer_slots;
        if (split.empty()) {
          auto dp = dp_slots_of(trace, begin, end, slots);
          if (!dp) return dp.status();
          split = std::move(*dp);
        }
        if (split.size() != trace.n_layers)
          return invalid_argument("lru-dp: " + std::to_string(split.size()) + " layer budgets for " +
                                  std::to_string(trace.n_layers) + " layers");
        std::uint64_t used = 0;
        for (std::uint32_t x : split) used += x;
        if (used == 0 || used > slots)
          return invalid_argument("lru-dp: the layer budgets hold " + std::to_string(used) + " experts, not 1.." +
                                  std::to_string(slots));
        r.cache_slots = used;
        set_layer_cache_bytes(cfg, slots_to_bytes(split, r.expert_bytes));
        s = replay(trace, begin, end, *store, cfg, prof, LruEviction{}, r);
      }
      break;
    }
  }
  if (!s.is_ok()) return s;
  r.cache_bytes = r.cache_slots * r.expert_bytes;
  derive_sim_rates(r);
  return r;
}

Result<std::vector<SimRunResult>> run_grid(const RoutingTrace& trace, const SimGridConfig& config,
                                           const SimProgressFn& progress) {
  MOEX_RETURN_IF_ERROR(trace.validate());
  const std::vector<SimPolicy> policies = config.policies.empty() ? default_sim_policies() : config.policies;
  const std::vector<double> budgets = config.budgets.empty() ? std::vector<double>{0.1, 0.25, 0.5} : config.budgets;
  if (config.profiles.empty()) return invalid_argument("run_grid: no device profile");
  if (config.shapes.empty()) return invalid_argument("run_grid: no expert shape");
  for (double b : budgets)
    if (!(b > 0.0 && b <= 1.0))
      return invalid_argument("run_grid: budget fraction " + fmt_double(b) + " is outside (0, 1]");
  const std::size_t T = trace.tokens();
  const std::size_t mid = config.split == TraceSplit::kHalf ? T / 2 : 0;
  const std::size_t prof_end = config.split == TraceSplit::kHalf ? mid : T;
  if (T == 0 || mid >= T) return invalid_argument("run_grid: the trace has too few tokens (" + std::to_string(T) + ")");
  if (config.split == TraceSplit::kHalf && mid == 0)
    return invalid_argument("run_grid: the trace has too few tokens to split");

  const std::vector<double> scores = expert_access_counts(trace, 0, prof_end);
  const std::size_t total = policies.size() * budgets.size() * config.profiles.size() * config.shapes.size();
  std::vector<SimRunResult> out;
  out.reserve(total);
  std::size_t done = 0;
  for (const NamedShape& shape : config.shapes) {
    for (const DeviceProfile& prof : config.profiles) {
      for (SimPolicy pol : policies) {
        for (double b : budgets) {
          SimRunConfig rc;
          rc.trace = &trace;
          rc.begin_token = mid;
          rc.end_token = T;
          rc.shape = shape;
          rc.profile = prof;
          rc.policy = pol;
          rc.budget_fraction = b;
          rc.cache_precision = config.cache_precision;
          if (pol == SimPolicy::kStaticHot) rc.static_scores = scores;
          const std::string what =
              shape.name + " " + prof.name + " " + std::string(to_string(pol)) + " " + fmt_double(b);
          if (progress) progress(done, total, what);
          if (pol == SimPolicy::kLruLayerDp) {
            // The DP needs the slot count, which depends on the shape and budget only.
            const WeightFormat f = format_of(config.cache_precision);
            const std::uint64_t eb = expert_bytes(shape.shape, f);
            if (eb == 0) return invalid_argument("run_grid: zero-byte expert");
            const long double all = static_cast<long double>(trace.n_layers) * trace.n_experts * eb;
            const auto slots = static_cast<std::uint64_t>(std::floor(all * static_cast<long double>(b))) / eb;
            if (slots < trace.n_layers) {  // a layer with no slot cannot load: no lru-dp row here
              ++done;
              continue;
            }
            auto dp = dp_slots_of(trace, 0, prof_end, slots);
            if (!dp) return Status(dp.status().code(), what + ": " + dp.status().message());
            rc.layer_slots = std::move(*dp);
          }
          auto r = run_simulation(rc);
          if (!r) return Status(r.status().code(), what + ": " + r.status().message());
          out.push_back(std::move(*r));
          ++done;
        }
      }
    }
  }
  if (progress) progress(done, total, "done");
  return out;
}

std::string sim_results_to_csv(std::string_view trace_name, std::span<const SimRunResult> results) {
  std::string s =
      "trace,shape,hidden,ffn,profile,policy,budget_fraction,expert_bytes,cache_slots,cache_bytes,tokens,"
      "layer_steps,hits,misses,hit_rate,sim_ms,tokens_per_s,ms_per_token,stall_ms_per_token,"
      "compute_ms_per_token,gb_per_token,pcie_busy_pct\n";
  for (const SimRunResult& r : results) {
    s += csv_field(trace_name) + ',' + csv_field(r.shape) + ',' + std::to_string(r.expert_shape.hidden) + ',' +
         std::to_string(r.expert_shape.ffn) + ',' + csv_field(r.profile) + ',' + csv_field(r.policy) + ',' +
         fmt_double(r.budget_fraction) + ',' + std::to_string(r.expert_bytes) + ',' + std::to_string(r.cache_slots) +
         ',' + std::to_string(r.cache_bytes) + ',' + std::to_string(r.tokens) + ',' + std::to_string(r.layer_steps) +
         ',' + std::to_string(r.hits) + ',' + std::to_string(r.misses) + ',' + fmt_double(r.hit_rate) + ',' +
         fmt_double(static_cast<double>(r.sim_ns) / 1e6) + ',' + fmt_double(r.tokens_per_s) + ',' +
         fmt_double(r.ms_per_token) + ',' + fmt_double(r.stall_ms_per_token) + ',' +
         fmt_double(r.compute_ms_per_token) + ',' + fmt_double(r.bytes_per_token / 1e9) + ',' +
         fmt_double(100.0 * r.pcie_busy_fraction) + '\n';
  }
  return s;
}

std::string sim_results_to_json(std::string_view trace_name, const RoutingTrace& trace, TraceSplit split,
                                std::span<const SimRunResult> results) {
  nlohmann::json j;
  j["trace"] = std::string(trace_name);
  j["source"] = trace.source;
  j["n_layers"] = trace.n_layers;
  j["n_experts"] = trace.n_experts;
  j["top_k"] = trace.top_k;
  j["tokens"] = trace.tokens();
  j["split"] = std::string(to_string(split));
  nlohmann::json runs = nlohmann::json::array();
  for (const SimRunResult& r : results) {
    nlohmann::json o;
    o["shape"] = r.shape;
    o["hidden"] = r.expert_shape.hidden;
    o["ffn"] = r.expert_shape.ffn;
    o["profile"] = r.profile;
    o["policy"] = r.policy;
    o["budget_fraction"] = r.budget_fraction;
    o["expert_bytes"] = r.expert_bytes;
    o["cache_slots"] = r.cache_slots;
    o["cache_bytes"] = r.cache_bytes;
    o["tokens"] = r.tokens;
    o["layer_steps"] = r.layer_steps;
    o["hits"] = r.hits;
    o["misses"] = r.misses;
    o["hit_rate"] = r.hit_rate;
    o["bytes_loaded"] = r.bytes_loaded;
    o["sim_ns"] = r.sim_ns;
    o["stall_ns"] = r.stall_ns;
    o["compute_ns"] = r.compute_ns;
    o["link_busy_ns"] = r.link_busy_ns;
    o["tokens_per_s"] = r.tokens_per_s;
    o["ms_per_token"] = r.ms_per_token;
    o["stall_ms_per_token"] = r.stall_ms_per_token;
    o["compute_ms_per_token"] = r.compute_ms_per_token;
    o["bytes_per_token"] = r.bytes_per_token;
    o["pcie_busy_fraction"] = r.pcie_busy_fraction;
    runs.push_back(std::move(o));
  }
  j["runs"] = std::move(runs);
  return j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
}

MOEX_NAMESPACE_END
