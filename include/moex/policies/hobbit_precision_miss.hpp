#pragma once
/// @file hobbit_precision_miss.hpp
/// HOBBIT's token-level dynamic mixed-precision loading (Tang et al., 2024).

#include <string_view>

#include "moex/concepts/miss_policy.hpp"

MOEX_NAMESPACE_BEGIN

/// On a miss, HOBBIT ranks the token's experts by normalized gate weight; an expert's
/// unimportance is the weight of the experts ranked before it (the top expert scores 0). Then:
/// s <= t_high: load full precision; t_high < s <= t_skip: load the low-precision copy;
/// s > t_skip: skip it. The paper uses t_high = 0.6, t_skip = 0.9 for Mixtral (a reproduction
/// found Mixtral's near-balanced top-2 needs lower t_high to use int4 at all: treat them as
/// model-specific calibration). Approximate unless the low copy is never used and nothing skipped.
struct HobbitPrecisionMiss {
  float t_high = 0.6f;
  float t_skip = 0.9f;

  MissDecision decide(const MissContext& c) noexcept {
    if (c.unimportance <= t_high || c.low_precision == c.cache_precision) {
      if (c.unimportance > t_skip) return {MissAction::kSkip, c.cache_precision};
      return {MissAction::kLoad, c.cache_precision};
    }
    if (c.unimportance <= t_skip) return {MissAction::kLoad, c.low_precision};
    return {MissAction::kSkip, c.cache_precision};
  }
  bool exact() const noexcept { return t_high >= 1.f && t_skip >= 1.f; }
  std::string_view name() const noexcept { return "hobbit-precision"; }
};
static_assert(MissPolicy<HobbitPrecisionMiss>);

MOEX_NAMESPACE_END
