#pragma once
/// @file gate.hpp
/// The GatePolicy concept: how many of the router's experts a token really uses at a layer.

#include <concepts>
#include <cstdint>
#include <string_view>

#include "moex/route/router.hpp"

MOEX_NAMESPACE_BEGIN

/// GatePolicy — may drop trailing experts of a token's routing (and renormalize what remains).
///
/// Contract
/// - `apply(layer, routing)` is called by the executor once per token per layer, after routing and
///   before any expert is fetched; it may only lower `routing.k` and rewrite the weights.
///   Returns the number of experts dropped.
/// - Deterministic; called from the executor thread only.
/// - `exact()` is true when the policy never changes the routing (the default path is exact).
///
/// Performance considerations: runs per token per layer; O(k) work, no allocation.
template <class G>
concept GatePolicy = std::default_initializable<G> && std::move_constructible<G> &&
    requires(G& g, const G& cg, std::uint32_t layer, TokenRouting& r) {
  { g.apply(layer, r) }
  noexcept->std::same_as<std::uint32_t>;
  { cg.exact() }
  noexcept->std::same_as<bool>;
  { cg.name() }
  noexcept->std::convertible_to<std::string_view>;
};

/// The router's own top-k, unchanged (the exact path).
struct FixedTopKGate {
  std::uint32_t apply(std::uint32_t /*layer*/, TokenRouting& /*r*/) noexcept { return 0; }
  bool exact() const noexcept { return true; }
  std::string_view name() const noexcept { return "fixed-top-k"; }
};
static_assert(GatePolicy<FixedTopKGate>);

MOEX_NAMESPACE_END
