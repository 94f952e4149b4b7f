#pragma once
/// @file lru_eviction.hpp
/// Least recently used eviction.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "moex/cache/last_use_list_index.hpp"
#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Evicts the candidate whose last access is oldest, by the cache's access counter
/// (SlotView::last_use), so ties between experts of one step are broken by access order: the
/// classic LRU of a sequence of accesses. Stateless: costs zero bytes inside a cache.
/// IndexedEviction: inside a MixedPrecisionCache the victim is the head of a LastUseListIndex
/// (candidates linked in last_use order; O(1) per hit, insert and eviction).
struct LruEviction {
  /// The victim index MixedPrecisionCache keeps for this policy.
  using VictimIndex = LastUseListIndex;
  /// Groups of more candidates than this keep the list (measured crossover with the scan).
  static constexpr std::uint32_t kVictimIndexMinCandidates = 8;
  void on_access(const SlotView&) noexcept {}
  void on_insert(const SlotView&) noexcept {}
  void on_evict(const SlotView&) noexcept {}

  /// O(n) scan for the smallest last_use.
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::size_t best = 0;
    for (std::size_t i = 1; i < candidates.size(); ++i) {
      if (candidates[i].last_use < candidates[best].last_use) best = i;
    }
    return best;
  }

  /// RankedEviction: smaller last_use is evicted first (the list index keeps exactly this order).
  std::uint64_t rank(const SlotView& s) const noexcept { return s.last_use; }

  std::string_view name() const noexcept { return "lru"; }
};

static_assert(RankedEviction<LruEviction> && IndexedEviction<LruEviction>);

MOEX_NAMESPACE_END
