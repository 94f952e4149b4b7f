#pragma once
/// @file cost_model_miss.hpp
/// CostModelMiss: per missed expert, the path that finishes first — load it over the link (full or,
/// HOBBIT's rule permitting, low precision) or compute it on the host CPU where it lives (Fiddler,
/// llama.cpp) — judged by ETAs that include each queue's backlog, so both paths run at once.

#include <string_view>

#include "moex/concepts/miss_policy.hpp"
#include "moex/policies/hobbit_precision_miss.hpp"

MOEX_NAMESPACE_BEGIN

/// Cost-model miss handling. With `mixed_precision` off and `allow_skip` off it is exact (CPU
/// compute at the source computes the same function).
struct CostModelMiss {
  bool allow_source_compute = true;  ///< consider running the expert on the host CPU
  bool mixed_precision = false;      ///< apply HOBBIT's rule to pick low precision / skip
  HobbitPrecisionMiss hobbit{};      ///< thresholds for mixed_precision

  MissDecision decide(const MissContext& c) noexcept {
    MissDecision d{MissAction::kLoad, c.cache_precision};
    std::uint64_t load_eta = c.load_eta_ns;
    if (mixed_precision) {
      d = hobbit.decide(c);
      if (d.action == MissAction::kSkip) return d;
      if (d.precision != c.cache_precision) load_eta = c.load_low_eta_ns;
    }
    if (allow_source_compute && c.source_eta_ns < load_eta) return {MissAction::kComputeAtSource, c.cache_precision};
    return d;
  }
  bool exact() const noexcept { return !mixed_precision || hobbit.exact(); }
  std::string_view name() const noexcept { return "cost-model"; }
};
static_assert(MissPolicy<CostModelMiss>);

MOEX_NAMESPACE_END
