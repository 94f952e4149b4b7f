#pragma once
/// @file lfu_eviction.hpp
/// Least frequently used eviction (in-cache frequency).

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Evicts the candidate with the fewest hits since it was inserted (SlotView::hits); ties go to
/// the least recently used (SlotView::last_use). Counts restart when an expert is re-inserted
/// ("in-cache LFU"), which keeps it from pinning experts that were hot long ago. Stateless.
struct LfuEviction {
  /// Groups of more candidates than this keep a rank heap (measured crossover with the scan).
  static constexpr std::uint32_t kVictimIndexMinCandidates = 48;
  void on_access(const SlotView&) noexcept {}
  void on_insert(const SlotView&) noexcept {}
  void on_evict(const SlotView&) noexcept {}

  /// O(n) scan for the smallest (hits, last_use).
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::size_t best = 0;
    for (std::size_t i = 1; i < candidates.size(); ++i) {
      const SlotView& c = candidates[i];
      const SlotView& b = candidates[best];
      if (c.hits < b.hits || (c.hits == b.hits && c.last_use < b.last_use)) best = i;
    }
    return best;
  }

  /// RankedEviction: (hits, last_use).
  LastUseRank<std::uint32_t> rank(const SlotView& s) const noexcept { return {s.hits, s.last_use}; }

  std::string_view name() const noexcept { return "lfu"; }
};

static_assert(RankedEviction<LfuEviction>);

MOEX_NAMESPACE_END
