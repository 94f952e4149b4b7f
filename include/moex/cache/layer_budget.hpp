#pragma once
/// @file layer_budget.hpp
/// Splitting a cache budget across layers: uniformly, or by AdapMoE's dynamic program over
/// profiled per-layer miss curves (Zhong et al., "AdapMoE: Adaptive Sensitivity-based Expert
/// Gating and Management for Efficient MoE Inference", ICCAD 2024, §4.3), and the profiling of
/// those curves from a routing trace with MixedPrecisionCache + LRU.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/formats/trace.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Per-layer miss curves: curves[l][s] = misses of layer l given s expert slots, s = 0..size-1.
using MissCurves = std::vector<std::vector<std::uint64_t>>;

/// `total_slots` split over `n_layers` as evenly as possible; the first layers get the remainder.
inline std::vector<std::uint32_t> uniform_layer_split(std::uint32_t n_layers, std::uint32_t total_slots) {
  std::vector<std::uint32_t> out(n_layers, 0);
  for (std::uint32_t l = 0; l < n_layers; ++l) out[l] = total_slots / n_layers + (l < total_slots % n_layers ? 1u : 0u);
  return out;
}

/// AdapMoE's allocation: slots s_l per layer minimising sum_l curves[l][s_l] subject to
/// sum_l s_l <= total_slots and min_slots <= s_l <= curves[l].size() - 1. Exact dynamic program,
/// O(L * total_slots * max curve length). Ties go to the allocation found first with layers'
/// slot counts tried in ascending order (deterministic).
/// Errors: kInvalidArgument when a curve is shorter than min_slots + 1 or L * min_slots exceeds
/// total_slots.
inline Result<std::vector<std::uint32_t>> dp_layer_split(std::span<const std::vector<std::uint64_t>> curves,
                                                         std::uint32_t total_slots, std::uint32_t min_slots = 0) {
  const std::size_t n_layers = curves.size();
  if (n_layers == 0) return invalid_argument("dp_layer_split: no layers");
  if (static_cast<std::uint64_t>(n_layers) * min_slots > total_slots)
    return invalid_argument("dp_layer_split: total_slots below n_layers * min_slots");
  for (const auto& c : curves) {
    if (c.size() < static_cast<std::size_t>(min_slots) + 1)
      return invalid_argument("dp_layer_split: a miss curve is shorter than min_slots + 1");
  }
  constexpr std::uint64_t kInf = std::numeric_limits<std::uint64_t>::max();
  const std::size_t width = static_cast<std::size_t>(total_slots) + 1;
  // best[b] after layers [0, l] = least misses using exactly b slots; choice[l][b] = s_l.
  std::vector<std::uint64_t> best(width, kInf), next(width);
  std::vector<std::uint32_t> choice(n_layers * width, 0);
  best[0] = 0;
  for (std::size_t l = 0; l < n_layers; ++l) {
    std::fill(next.begin(), next.end(), kInf);
    const auto& c = curves[l];
    for (std::size_t b = 0; b < width; ++b) {
      if (best[b] == kInf) continue;
      for (std::size_t s = min_slots; s < c.size() && b + s < width; ++s) {
        const std::uint64_t v = best[b] + c[s];
        if (v < next[b + s]) {
          next[b + s] = v;
          choice[l * width + b + s] = static_cast<std::uint32_t>(s);
        }
      }
    }
    best.swap(next);
  }
  std::size_t b_best = 0;
  for (std::size_t b = 1; b < width; ++b) {
    if (best[b] < best[b_best]) b_best = b;
  }
  std::vector<std::uint32_t> out(n_layers, 0);
  for (std::size_t l = n_layers; l-- > 0;) {
    out[l] = choice[l * width + b_best];
    b_best -= out[l];
  }
  return out;
}

/// Bytes per layer for a slot split, each slot holding one expert of `expert_bytes`.
inline std::vector<std::uint64_t> slots_to_bytes(std::span<const std::uint32_t> slots, std::uint64_t expert_bytes) {
  std::vector<std::uint64_t> out(slots.size());
  for (std::size_t i = 0; i < slots.size(); ++i) out[i] = slots[i] * expert_bytes;
  return out;
}

/// Profiles miss curves from a trace: for each layer and each s in 1..max_slots, the misses of a
/// MixedPrecisionCache<LruEviction> with room for s experts that sees only that layer's accesses
/// (steps as RoutingTrace::step, inserting on every miss). curves[l][0] = all accesses of layer
/// l. max_slots is clamped to n_experts.
inline Result<MissCurves> profile_miss_curves(const RoutingTrace& trace, std::uint32_t max_slots) {
  MOEX_RETURN_IF_ERROR(trace.validate());
  if (max_slots > trace.n_experts) max_slots = trace.n_experts;
  MissCurves curves(trace.n_layers, std::vector<std::uint64_t>(max_slots + 1, 0));
  for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
    for (std::uint32_t s = 0; s <= max_slots; ++s) {
      std::uint64_t misses = 0;
      if (s == 0) {
        for (std::size_t t = 0; t < trace.tokens(); ++t) misses += trace.experts(t, l).size();
        curves[l][0] = misses;
        continue;
      }
      CacheConfig cfg;
      cfg.n_layers = trace.n_layers;
      cfg.n_experts = trace.n_experts;
      cfg.budget_bytes = s;
      auto cache = MixedPrecisionCache<LruEviction>::create(cfg);
      if (!cache) return cache.status();
      for (std::size_t t = 0; t < trace.tokens(); ++t) {
        const std::uint64_t step = trace.step(t, l);
        for (std::uint32_t e : trace.experts(t, l)) {
          const ExpertKey key{l, e};
          if (cache->lookup(key, step)) continue;
          ++misses;
          auto ins = cache->insert(key, Precision::kBF16, 1, step);
          if (!ins) return ins.status();
        }
      }
      curves[l][s] = misses;
    }
  }
  return curves;
}

MOEX_NAMESPACE_END
