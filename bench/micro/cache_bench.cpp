// MixedPrecisionCache microbenchmarks: one lookup+update, one eviction decision per policy, at
// realistic sizes (Mixtral 32 layers x 8 experts; a 48 x 128 fine-grained model), and a trace
// replay in layer-steps per second. Targets (issue 8): < 100 ns per lookup (BM_LookupHit: a hit,
// including the victim index's update), < 1 us per eviction decision.
// BM_EvictionDecision measures the decision the cache makes in insert: peek_victim(0), i.e. the
// victim index's answer (rank heap top for LRU/LFU/LRFU/static-hot-set/Belady, including Belady's
// refresh of expired ranks; HOBBIT's skyline index) or choose_victim where a policy has no index,
// on a cache half full whose state came from 20000 random hits. Group 0 is the whole pool
// (args .../0) or layer 0 (args .../1). BM_ChooseVictimScan measures the policy's linear
// choose_victim over the same candidates (the reference, and what the cache did before issue 8).
// BM_IndexCrossover replays random skewed accesses through one group of G candidates with the
// victim index always on (threshold 0) or never (linear scan): where the index starts to pay is
// CacheConfig::kDefaultVictimIndexMinCandidates. BM_Replay's second arg: the index threshold
// (-1 = the default, 0 = always indexed, 1000000 = never).
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <type_traits>
#include <vector>

#include <benchmark/benchmark.h>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/formats/trace.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/policies/static_hot_set_eviction.hpp"

namespace {

using namespace moex;

constexpr double kLookupTargetNs = 100.0;
constexpr double kEvictTargetNs = 1000.0;

// ../shared beside the source tree, or $MOEX_SHARED_DIR.
std::filesystem::path shared_dir() {
  if (const char* e = std::getenv("MOEX_SHARED_DIR")) return e;
  return std::filesystem::path(__FILE__).parent_path() / "../../../shared";
}

// Filled cache: every layer holds `per_layer` experts (uniform sizes), one shared budget.
template <class P>
MixedPrecisionCache<P> filled(std::uint32_t layers, std::uint32_t experts, std::uint32_t per_layer,
                              bool per_layer_groups) {
  CacheConfig cfg;
  cfg.n_layers = layers;
  cfg.n_experts = experts;
  if (per_layer_groups)
    cfg.layer_budget_bytes.assign(layers, per_layer);
  else
    cfg.budget_bytes = std::uint64_t{layers} * per_layer;
  auto c = MixedPrecisionCache<P>::create(cfg);
  std::uint64_t step = 0;
  for (std::uint32_t l = 0; l < layers; ++l)
    for (std::uint32_t e = 0; e < per_layer; ++e) (void)c->insert({l, e}, Precision::kBF16, 1, step++);
  return std::move(c).value();
}

template <class P>
void BM_LookupHit(benchmark::State& state) {
  const auto layers = static_cast<std::uint32_t>(state.range(0));
  const auto experts = static_cast<std::uint32_t>(state.range(1));
  const std::uint32_t per_layer = experts / 2;
  auto c = filled<P>(layers, experts, per_layer, false);
  std::mt19937_64 rng(1);
  std::vector<ExpertKey> keys(4096);
  for (auto& k : keys) k = {static_cast<std::uint32_t>(rng() % layers), static_cast<std::uint32_t>(rng() % per_layer)};
  std::uint64_t step = 1u << 20;
  std::size_t i = 0;
  for (auto _ : state) {
    auto r = c.lookup(keys[i++ & 4095], step++);
    benchmark::DoNotOptimize(r);
  }
  state.counters["target_ns"] = kLookupTargetNs;
  state.SetLabel(std::string(c.policy().name()));
}

// A filled cache whose hit/recency state comes from 20000 random hits.
template <class P>
MixedPrecisionCache<P> warmed(benchmark::State& state) {
  const auto layers = static_cast<std::uint32_t>(state.range(0));
  const auto experts = static_cast<std::uint32_t>(state.range(1));
  const bool per_layer = state.range(2) != 0;
  auto c = filled<P>(layers, experts, experts / 2, per_layer);
  std::mt19937_64 rng(2);
  std::uint64_t step = 1u << 20;
  for (int i = 0; i < 20000; ++i) {  // realistic hit/recency state
    (void)c.lookup({static_cast<std::uint32_t>(rng() % layers), static_cast<std::uint32_t>(rng() % (experts / 2))},
                   step++);
  }
  return c;
}

// One eviction decision as the cache makes it (peek_victim of group 0).
template <class P>
void BM_EvictionDecision(benchmark::State& state) {
  auto c = warmed<P>(state);
  for (auto _ : state) {
    auto v = c.peek_victim(0);
    benchmark::DoNotOptimize(v);
  }
  state.counters["candidates"] = static_cast<double>(c.group_candidates(0).size());
  state.counters["target_ns"] = kEvictTargetNs;
  state.SetLabel(std::string(c.policy().name()));
}

// The policy's linear choose_victim over the same candidates (the reference).
template <class P>
void BM_ChooseVictimScan(benchmark::State& state) {
  auto c = warmed<P>(state);
  const auto views = c.group_candidates(0);
  P& p = c.policy();
  for (auto _ : state) {
    auto v = p.choose_victim(views);
    benchmark::DoNotOptimize(v);
  }
  state.counters["candidates"] = static_cast<double>(views.size());
  state.SetLabel(std::string(p.name()));
}

// Replays a trace, insert on every miss, per-layer budgets of half the experts.
constexpr const char* kTraces[] = {
    "traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl",
    "traces/flame-moe-290m/flame_moe_290m_seq0-1_x_512tok_top6.csv",
    "models/tiny-mixtral-32e/router_logits_code.npy",
};

// One group of G candidates (1 layer, 4G experts, budget G), random skewed accesses, insert on
// every miss; range(0) = G, range(1) = index threshold. Reports ns per access.
template <class P>
void BM_IndexCrossover(benchmark::State& state) {
  const auto group = static_cast<std::uint32_t>(state.range(0));
  const std::uint32_t experts = 4 * group;
  std::mt19937_64 rng(3);
  std::vector<ExpertKey> keys(1 << 16);
  for (auto& k : keys) {
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    k = {0, static_cast<std::uint32_t>(static_cast<double>(experts) * u * u) % experts};
  }
  CacheConfig cfg;
  cfg.n_layers = 1;
  cfg.n_experts = experts;
  cfg.budget_bytes = group;
  cfg.victim_index_min_candidates = static_cast<std::uint32_t>(state.range(1));
  auto c = MixedPrecisionCache<P>::create(cfg);
  std::uint64_t step = 0;
  std::size_t i = 0;
  for (auto _ : state) {
    const ExpertKey k = keys[i++ & 0xFFFF];
    if (!c->lookup(k, step)) (void)c->insert(k, Precision::kBF16, 1, step);
    ++step;
  }
  state.counters["hit_rate"] = c->stats().hit_rate();
  state.SetLabel(std::string(c->policy().name()) + (state.range(1) == 0 ? " indexed" : " linear"));
}

template <class P>
void BM_Replay(benchmark::State& state) {
  const char* rel = kTraces[state.range(0)];
  const std::filesystem::path path = shared_dir() / rel;
  TraceLoadOptions o;
  o.keep_logits = false;
  auto t = load_trace(path, o);
  if (!t) {
    state.SkipWithError(t.status().to_string().c_str());
    return;
  }
  state.SetLabel(rel);
  std::uint64_t layer_steps = 0;
  for (auto _ : state) {
    CacheConfig cfg;
    cfg.n_layers = t->n_layers;
    cfg.n_experts = t->n_experts;
    cfg.layer_budget_bytes.assign(t->n_layers, std::max(t->top_k, t->n_experts / 2));
    if (state.range(1) >= 0) cfg.victim_index_min_candidates = static_cast<std::uint32_t>(state.range(1));
    P policy{};
    if constexpr (std::is_same_v<P, BeladyOracleEviction>) {
      std::vector<FutureAccess> f;
      for (std::size_t tok = 0; tok < t->tokens(); ++tok)
        for (std::uint32_t l = 0; l < t->n_layers; ++l)
          for (std::uint32_t e : t->experts(tok, l)) f.push_back({t->step(tok, l), ExpertKey{l, e}});
      (void)policy.set_future(f, t->n_layers, t->n_experts);
    }
    auto c = MixedPrecisionCache<P>::create(cfg, std::move(policy));
    for (std::size_t tok = 0; tok < t->tokens(); ++tok)
      for (std::uint32_t l = 0; l < t->n_layers; ++l) {
        const std::uint64_t step = t->step(tok, l);
        for (std::uint32_t e : t->experts(tok, l))
          if (!c->lookup({l, e}, step)) (void)c->insert({l, e}, Precision::kBF16, 1, step);
      }
    layer_steps += t->tokens() * t->n_layers;
    benchmark::DoNotOptimize(c->stats().hits);
  }
  state.counters["layer_steps_per_s"] =
      benchmark::Counter(static_cast<double>(layer_steps), benchmark::Counter::kIsRate);
}

#define MOEX_CACHE_BENCH(P)                                                                                    \
  BENCHMARK_TEMPLATE(BM_LookupHit, P)->Args({32, 8})->Args({48, 128});                                         \
  BENCHMARK_TEMPLATE(BM_EvictionDecision, P)->Args({32, 8, 0})->Args({48, 128, 1})->Args({48, 128, 0});        \
  BENCHMARK_TEMPLATE(BM_ChooseVictimScan, P)->Args({48, 128, 0});                                              \
  BENCHMARK_TEMPLATE(BM_Replay, P)->ArgsProduct({{0, 1, 2}, {-1, 0, 1000000}})->Unit(benchmark::kMillisecond); \
  BENCHMARK_TEMPLATE(BM_IndexCrossover, P)->ArgsProduct({{8, 16, 32, 64, 128, 256}, {0, 1000000}})

MOEX_CACHE_BENCH(LruEviction);
MOEX_CACHE_BENCH(LfuEviction);
MOEX_CACHE_BENCH(LrfuEviction);
MOEX_CACHE_BENCH(HobbitScoreEviction);
MOEX_CACHE_BENCH(StaticHotSetEviction);
MOEX_CACHE_BENCH(BeladyOracleEviction);

}  // namespace

BENCHMARK_MAIN();
