#pragma once
/// @file stats.hpp
/// What the executor counts, per layer and in total.

#include <cstdint>
#include <string>
#include <vector>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Counters of one MoE layer (or their sum over layers). Times in nanoseconds of the backend's
/// clock (wall time on real backends, virtual time on SimBackend).
struct LayerStats {
  std::uint64_t steps = 0;                                  ///< forward calls
  std::uint64_t tokens = 0;                                 ///< tokens routed
  std::uint64_t expert_calls = 0;                           ///< (expert, step) pairs computed
  std::uint64_t hits = 0;                                   ///< expert lookups served from the fast tier
  std::uint64_t misses = 0;                                 ///< lookups that were not
  std::uint64_t misses_by_precision[kPrecisionCount] = {};  ///< misses by the precision loaded
  std::uint64_t bytes_loaded = 0;                           ///< bytes moved from the slow tier into the fast tier
  std::uint64_t evictions = 0;
  std::uint64_t skipped = 0;                ///< experts dropped by the gate or the miss policy
  std::uint64_t computed_at_source = 0;     ///< misses computed where the master copy lives
  std::uint64_t prefetches = 0;             ///< prefetches issued
  std::uint64_t prefetch_hits = 0;          ///< prefetched experts that were then used
  std::uint64_t prefetch_wasted_bytes = 0;  ///< bytes prefetched and evicted unused
  std::uint64_t predicted = 0;              ///< experts predicted for this layer
  std::uint64_t predicted_correct = 0;      ///< of those, actually selected (recall numerator)
  std::uint64_t selected = 0;               ///< experts selected at layers a predictor reaches (recall denominator)
  std::uint64_t stall_ns = 0;               ///< time spent waiting for loads
  std::uint64_t compute_ns = 0;             ///< time spent computing experts
  std::uint64_t route_ns = 0;               ///< time spent routing
  std::uint64_t total_ns = 0;               ///< time in forward, all included

  /// hits / (hits + misses); 0 when nothing was looked up.
  double hit_rate() const noexcept {
    const auto n = hits + misses;
    return n ? static_cast<double>(hits) / static_cast<double>(n) : 0.0;
  }
  /// predicted_correct / selected; 0 when nothing was predicted.
  double recall() const noexcept {
    return selected && predicted ? static_cast<double>(predicted_correct) / static_cast<double>(selected) : 0.0;
  }
  LayerStats& operator+=(const LayerStats& o) noexcept;
};

/// Prediction quality at one look-ahead depth: of the experts selected at layers that received
/// predictions made d layers earlier, how many those predictions named (recall@k at depth d).
struct DepthStats {
  std::uint64_t selected = 0;
  std::uint64_t predicted_correct = 0;
  double recall() const noexcept {
    return selected ? static_cast<double>(predicted_correct) / static_cast<double>(selected) : 0.0;
  }
};

/// Per-layer counters plus their total, and prediction recall per depth (depths[d-1]).
struct ExecutorStats {
  std::vector<LayerStats> layers;
  std::vector<DepthStats> depths;
  /// Bytes of the model's shared experts, resident in the store's memory beside the routed cache
  /// (not counted in its budget; 0 for models without shared experts). Not cleared by reset().
  std::uint64_t resident_shared_bytes = 0;

  LayerStats total() const noexcept;
  void reset() noexcept;
  /// {"total": {...}, "layers": [{...}, ...]} with every counter and the derived rates (and
  /// "resident_shared_bytes" when the model has shared experts).
  std::string to_json() const;
};

MOEX_NAMESPACE_END
