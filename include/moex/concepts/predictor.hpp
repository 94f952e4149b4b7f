#pragma once
/// @file predictor.hpp
/// The Predictor concept: which experts the next layers will select, known before they run.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moex/route/router.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ExpertStore;

/// One predicted expert of a later layer.
struct Prediction {
  ExpertKey key;
  std::uint32_t depth = 1;  ///< layers ahead of the layer that made the prediction (1 = next)
  float score = 0.f;        ///< confidence in [0, 1]: the largest predicted gate weight over tokens
};

/// What a predictor sees after a layer is routed.
struct PredictContext {
  std::uint32_t layer = 0;                ///< the layer just routed
  const float* hidden = nullptr;          ///< its input hidden states [n x hidden]; null in simulation
  std::size_t n = 0;                      ///< tokens
  std::span<const TokenRouting> routing;  ///< its actual routing (after the gate)
  std::uint64_t step = 0;                 ///< the executor step of this layer's call
  const ExpertStore* store = nullptr;
};

/// Predictor — predicts the experts of layers layer+1 .. layer+depth().
///
/// Contract: `predict(ctx, out)` appends predictions for later layers only (never ctx.layer or
/// earlier, never past the last layer), at most once per (layer, expert) and depth; it is called
/// by the executor thread once per forward call, after routing, before any expert of the layer
/// runs, so the predicted experts' transfers overlap this layer's compute. Deterministic.
/// `depth()` == 0 disables prediction.
///
/// Performance considerations: runs once per layer; a speculative predictor costs a router
/// product per predicted layer (O(n * E * hidden)), tiny next to an expert.
template <class P>
concept Predictor = std::move_constructible<P> &&
    requires(P& p, const P& cp, const PredictContext& c, std::vector<Prediction>& out) {
  { p.predict(c, out) } -> std::same_as<Status>;
  { cp.depth() }
  noexcept->std::same_as<std::uint32_t>;
  { cp.name() }
  noexcept->std::convertible_to<std::string_view>;
};

/// A predictor that can also supply a layer's routing itself (Pre-gated MoE: the pre-gate in
/// block i selects block i+1's experts). `take_routing(layer, out)` fills the routing of `layer`
/// for the tokens of the last predict call and returns true, or returns false to let the layer's
/// own router decide.
/// `routes_layers()` says whether it does so at all (then the executor is not exact).
template <class P>
concept RoutingPredictor = Predictor<P> &&
    requires(P& p, const P& cp, std::uint32_t layer, std::span<TokenRouting> out) {
  { p.take_routing(layer, out) } -> std::same_as<bool>;
  { cp.routes_layers() }
  noexcept->std::same_as<bool>;
};

/// No prediction (on-demand loading only).
struct NoPredictor {
  Status predict(const PredictContext&, std::vector<Prediction>&) { return Status::ok(); }
  std::uint32_t depth() const noexcept { return 0; }
  std::string_view name() const noexcept { return "none"; }
};
static_assert(Predictor<NoPredictor>);

MOEX_NAMESPACE_END
