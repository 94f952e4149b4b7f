#pragma once
/// @file eviction.hpp
/// The EvictionPolicy concept: which resident expert a MixedPrecisionCache gives up when it needs
/// room, and the SlotView it decides from.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>

#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

namespace detail {
/// Runs `f` (which may allocate) and reports whether it completed: false when it threw
/// std::bad_alloc (or anything). Lets header code that must not throw work both with exceptions
/// and under -fno-exceptions (where allocation failure terminates anyway).
template <class F>
bool try_alloc(F&& f) noexcept {
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS)
  try {
    f();
  } catch (...) {
    return false;
  }
  return true;
#else
  f();
  return true;
#endif
}
}  // namespace detail

/// What an eviction policy may look at for one resident entry. The cache owns these views and
/// keeps them up to date; a policy only reads them.
struct SlotView {
  ExpertKey key;                           ///< the resident expert
  Precision precision = Precision::kBF16;  ///< the precision it is resident in
  std::uint64_t last_step = 0;             ///< step of the last access (insertion counts as an access)
  std::uint64_t last_use = 0;              ///< cache-wide access counter at the last access: unique, a
                                           ///< total order finer than steps (exact LRU order)
  std::uint64_t inserted_step = 0;         ///< step at which it was inserted
  std::uint64_t bytes = 0;                 ///< bytes it occupies in fast memory
  std::uint32_t hits = 0;                  ///< hits since insertion (the insertion itself not counted)
  std::uint32_t hp_uses = 0;               ///< uses at high precision since insertion (HOBBIT's LHU)
};

/// EvictionPolicy — picks the resident entry to give up when the cache is full.
///
/// Contract
/// - Called by MixedPrecisionCache from the executor thread only; no locking is needed.
/// - `on_access(s)`: `s` was hit (its view already updated). `on_insert(s)`: `s` became resident.
///   `on_evict(s)`: `s` is about to leave (also when it is erased or replaced).
/// - `choose_victim(candidates)` returns an index `< candidates.size()` into the candidates, which
///   are never empty and never contain protected entries. It must not change which entries are
///   resident; the cache evicts the chosen one and calls `on_evict`.
/// - Optional hook, detected with StepAwareEviction: `on_step(step, layer)` is called before each
///   lookup or insertion with the current step and the layer being served, so that policies that
///   need "now" (LRFU, HOBBIT's layer distance, Belady) know it.
/// - Optional hook, detected with KeyedEviction: `reserve_keys(n_layers, n_experts) -> Status`.
/// - Deterministic: the same call sequence gives the same victims (SimBackend replays traces and
///   the executor must reproduce them on the GPU). No randomness, no addresses, no clocks.
/// - `name()` is static text used in tables and plots.
///
/// Performance considerations
/// `on_access` runs on every cache hit (target: tens of nanoseconds, no allocation).
/// `choose_victim` runs once per eviction over every evictable entry of one eviction group (a
/// layer with per-layer budgets, or the whole pool); a linear scan over SlotView stays well under a
/// microsecond at 128–256 candidates but not at thousands (one shared pool of a 48 x 128 model).
/// A policy can let the cache decide faster without changing its victims through one of two
/// optional capabilities: RankedEviction (a per-entry key the cache keeps in an indexed heap) or
/// IndexedEviction (the policy supplies its own victim index). choose_victim stays the contract
/// and the reference: both capabilities must pick exactly the entry it picks. The cache keeps such
/// an index only for groups of more candidates than a threshold (keeping it costs on every hit;
/// small groups are scanned): CacheConfig::victim_index_min_candidates, else the policy's optional
/// `static constexpr std::uint32_t kVictimIndexMinCandidates`, else a cache default.
///
/// Example
/// @code
///   struct OldestFirst {
///     void on_access(const SlotView&) noexcept {}
///     void on_insert(const SlotView&) noexcept {}
///     void on_evict(const SlotView&) noexcept {}
///     std::size_t choose_victim(std::span<const SlotView> c) const noexcept { return 0; }
///     std::string_view name() const noexcept { return "oldest-first"; }
///   };
///   static_assert(moex::EvictionPolicy<OldestFirst>);
/// @endcode
template <class P>
concept EvictionPolicy = std::default_initializable<P> && std::move_constructible<P> &&
    requires(P& p, const P& cp, const SlotView& s, std::span<const SlotView> candidates) {
  { p.on_access(s) }
  noexcept;
  { p.on_insert(s) }
  noexcept;
  { p.on_evict(s) }
  noexcept;
  { p.choose_victim(candidates) }
  noexcept->std::same_as<std::size_t>;
  { cp.name() }
  noexcept->std::convertible_to<std::string_view>;
};

/// An EvictionPolicy with per-key state in dense arrays: the cache calls
/// `reserve_keys(n_layers, n_experts)` once when it is created (keys are then `layer < n_layers`,
/// `expert < n_experts`) and fails creation with the returned Status if that fails.
template <class P>
concept KeyedEviction = EvictionPolicy<P> && requires(P& p, std::uint32_t n_layers, std::uint32_t n_experts) {
  { p.reserve_keys(n_layers, n_experts) } -> std::same_as<Status>;
};

/// An EvictionPolicy that also wants to know the current step and layer (see on_step above).
/// Steps passed to on_step never decrease.
template <class P>
concept StepAwareEviction = EvictionPolicy<P> && requires(P& p, std::uint64_t step, std::uint32_t layer) {
  { p.on_step(step, layer) }
  noexcept;
};

/// RankedEviction — an EvictionPolicy whose choice is "the candidate of smallest rank".
///
/// `rank(s)` returns a totally ordered value (operator<) such that choose_victim(candidates)
/// picks exactly the candidate of smallest rank; ranks of distinct entries must differ (end the
/// key with SlotView::last_use, which is unique). A rank may change only through the entry's own
/// events: the cache reads it after on_insert, after on_access, and when an entry becomes a
/// candidate again (unprotect), and keeps the candidates of each eviction group in an indexed
/// binary heap (victim in O(1), updates in O(log n)). `rank` is non-const so that it may advance
/// lazy state (Belady's cursors); it must not change any other entry's rank.
template <class P>
concept RankedEviction = EvictionPolicy<P> && requires(P& p, const SlotView& s) {
  { p.rank(s) }
  noexcept;
  { p.rank(s) < p.rank(s) } -> std::convertible_to<bool>;
};

/// A ready-made rank: `primary` first, then SlotView::last_use (less recently used first), the
/// order of "smallest primary; ties to the least recently used" that most policies use.
template <class T>
struct LastUseRank {
  T primary{};                 ///< the policy's own key (smaller is evicted first)
  std::uint64_t last_use = 0;  ///< SlotView::last_use, the tie-break
  friend bool operator<(const LastUseRank& a, const LastUseRank& b) noexcept {
    return a.primary < b.primary || (a.primary == b.primary && a.last_use < b.last_use);
  }
};

/// The rank type of a RankedEviction policy.
template <class P>
using eviction_rank_t = std::remove_cvref_t<decltype(std::declval<P&>().rank(std::declval<const SlotView&>()))>;

/// A RankedEviction whose ranks also go stale with time (Belady: an expected use that did not
/// happen). `rank_expiry(r)` is the last step at which `r` is still exact: when the cache's current
/// step (the one it last passed to on_step) is larger, the cache recomputes the rank before
/// choosing. Exactness of the expiring fast path needs non-decreasing steps; otherwise the cache
/// falls back to choose_victim.
template <class P>
concept ExpiringRankEviction = RankedEviction<P> && requires(const P& cp, const eviction_rank_t<P>& r) {
  { cp.rank_expiry(r) }
  noexcept->std::same_as<std::uint64_t>;
};

/// The shape of a cache's eviction groups, handed to a victim index when the cache is created.
/// Keys are `layer < n_layers`, `expert < n_experts`; dense key index = layer * n_experts + expert.
/// Group g holds keys of layer `g / pools` only when `per_layer_groups`, else of every layer.
struct VictimIndexShape {
  std::uint32_t n_groups = 0;
  std::uint32_t n_layers = 0;
  std::uint32_t n_experts = 0;
  std::uint32_t pools = 1;
  bool per_layer_groups = false;
};

/// What the cache knows about "now" when it asks a victim index for a victim.
struct VictimQuery {
  std::uint64_t now = 0;       ///< the step the cache last passed to on_step
  bool steps_monotone = true;  ///< every step the cache was driven with so far was >= the previous one
};

/// IndexedEviction — an EvictionPolicy that supplies its own victim index type `P::VictimIndex`,
/// which the cache owns (one per cache) and keeps informed of each group's candidates:
/// - `Status reserve(const VictimIndexShape&)`: once at creation.
/// - `reserve_add(group, key, group_size)`: before an insert of `key` into `group`, which will then
///   hold at most `group_size` entries; may allocate (and throw std::bad_alloc: the cache calls it
///   inside its own reservation), so that nothing below allocates.
/// - `add(p, group, s)`: `s` became a candidate (inserted unprotected, unprotected, or its first
///   hit lifted protection); `update(p, group, s)`: candidate `s` was hit (view updated, after
///   on_access); `remove(p, group, s)`: `s` stops being a candidate (protected, evicted, erased,
///   replaced). All noexcept, no allocation. `p` is the cache's policy.
/// - `victim(p, group, query, view_of, out) -> bool`: writes the key choose_victim would pick among
///   the group's candidates (`view_of(key)` gives the current SlotView of a candidate) and returns
///   true, or returns false to let the cache call choose_victim (e.g. when exactness cannot be
///   guaranteed).
template <class P>
concept IndexedEviction = EvictionPolicy<P> && requires {
  typename P::VictimIndex;
} && std::default_initializable<typename P::VictimIndex> && std::move_constructible<typename P::VictimIndex> &&
    requires(typename P::VictimIndex& ix, P& p, const SlotView& s, std::uint32_t g, const VictimIndexShape& shape) {
  { ix.reserve(shape) } -> std::same_as<Status>;
  ix.reserve_add(g, s.key, std::size_t{1});
  { ix.add(p, g, s) }
  noexcept;
  { ix.update(p, g, s) }
  noexcept;
  { ix.remove(p, g, s) }
  noexcept;
};

MOEX_NAMESPACE_END
