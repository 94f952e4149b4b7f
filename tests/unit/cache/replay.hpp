#pragma once
// Test helpers: replaying a routing trace through a MixedPrecisionCache.
#include <cstdint>
#include <random>
#include <vector>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/formats/trace.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"

namespace moex::test {

/// Every (step, key) access of a trace, in replay order.
inline std::vector<FutureAccess> trace_accesses(const RoutingTrace& t) {
  std::vector<FutureAccess> out;
  for (std::size_t tok = 0; tok < t.tokens(); ++tok)
    for (std::uint32_t l = 0; l < t.n_layers; ++l)
      for (std::uint32_t e : t.experts(tok, l)) out.push_back({t.step(tok, l), ExpertKey{l, e}});
  return out;
}

/// Replays `trace` through `cache` (insert on every miss, 1 byte per expert unless `bytes` given);
/// returns hits. Checks the budget after every insert through `budget_ok`.
template <class Cache>
std::uint64_t replay(const RoutingTrace& trace, Cache& cache, bool& budget_ok, std::uint64_t bytes = 1) {
  std::uint64_t hits = 0;
  budget_ok = true;
  for (std::size_t tok = 0; tok < trace.tokens(); ++tok) {
    for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
      const std::uint64_t step = trace.step(tok, l);
      for (std::uint32_t e : trace.experts(tok, l)) {
        const ExpertKey key{l, e};
        if (cache.lookup(key, step)) {
          ++hits;
          continue;
        }
        auto r = cache.insert(key, Precision::kBF16, bytes, step);
        if (!r) budget_ok = false;
        for (std::size_t g = 0; g < cache.group_count(); ++g)
          if (cache.group_used(g) > cache.group_budget(g)) budget_ok = false;
      }
    }
  }
  return hits;
}

/// A random trace with skewed (Zipf-like) expert popularity per layer.
inline RoutingTrace random_trace(std::mt19937_64& rng, std::uint32_t n_layers, std::uint32_t n_experts,
                                 std::uint32_t top_k, std::size_t tokens) {
  RoutingTrace t;
  t.n_layers = n_layers;
  t.n_experts = n_experts;
  t.top_k = top_k;
  t.seq_start = {0};
  std::vector<double> w(n_experts);
  for (std::uint32_t e = 0; e < n_experts; ++e) w[e] = 1.0 / (1.0 + e);
  for (std::size_t tok = 0; tok < tokens; ++tok) {
    for (std::uint32_t l = 0; l < n_layers; ++l) {
      std::vector<double> ww = w;
      for (std::uint32_t j = 0; j < top_k; ++j) {
        std::discrete_distribution<std::uint32_t> d(ww.begin(), ww.end());
        const std::uint32_t e = (d(rng) + l * 3) % n_experts;
        // take e, or the next free id if taken
        std::uint32_t pick = e;
        auto taken = [&](std::uint32_t x) {
          for (std::size_t q = t.expert_ids.size() - j; q < t.expert_ids.size(); ++q)
            if (t.expert_ids[q] == x) return true;
          return false;
        };
        while (taken(pick)) pick = (pick + 1) % n_experts;
        t.expert_ids.push_back(pick);
        t.gate_weights.push_back(1.0f / static_cast<float>(top_k));
      }
    }
  }
  return t;
}

}  // namespace moex::test
