#pragma once
/// @file eviction.hpp
/// The EvictionPolicy concept: which resident expert a MixedPrecisionCache gives up when it needs
/// room, and the SlotView it decides from.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

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
/// layer with per-layer budgets, or the whole pool); a linear scan over SlotView is expected, and
/// at 128–256 candidates stays well under a microsecond.
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

MOEX_NAMESPACE_END
