#pragma once
/// @file lru_eviction.hpp
/// Least recently used eviction.

#include <cstddef>
#include <span>
#include <string_view>

#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Evicts the candidate whose last access is oldest, by the cache's access counter
/// (SlotView::last_use), so ties between experts of one step are broken by access order: the
/// classic LRU of a sequence of accesses. Stateless: costs zero bytes inside a cache.
struct LruEviction {
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

  /// RankedEviction: the cache keeps candidates ordered by last_use.
  std::uint64_t rank(const SlotView& s) const noexcept { return s.last_use; }

  std::string_view name() const noexcept { return "lru"; }
};

static_assert(RankedEviction<LruEviction>);

MOEX_NAMESPACE_END
