#pragma once
/// @file prefetch_precision.hpp
/// The PrefetchPrecisionPolicy concept: in which precision to prefetch a predicted expert.

#include <concepts>
#include <string_view>

#include "moex/concepts/predictor.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// PrefetchPrecisionPolicy — `choose(prediction, full, low)` returns the precision to fetch a
/// predicted expert in (`low == full` when the store has no low-precision copy). Deterministic;
/// called on the executor thread per prediction. `exact()`: never chooses `low`.
template <class P>
concept PrefetchPrecisionPolicy = std::default_initializable<P> && std::move_constructible<P> &&
    requires(P& p, const P& cp, const Prediction& pr, Precision full, Precision low) {
  { p.choose(pr, full, low) }
  noexcept->std::same_as<Precision>;
  { cp.exact() }
  noexcept->std::same_as<bool>;
  { cp.name() }
  noexcept->std::convertible_to<std::string_view>;
};

/// Prefetch at full precision (exact).
struct PrefetchFullPrecision {
  Precision choose(const Prediction&, Precision full, Precision) noexcept { return full; }
  bool exact() const noexcept { return true; }
  std::string_view name() const noexcept { return "full"; }
};
static_assert(PrefetchPrecisionPolicy<PrefetchFullPrecision>);

/// HOBBIT: a wrong prefetch of a low-precision copy wastes a quarter of the link time; fetch low
/// precision unless the prediction is confident (score >= `full_above`).
struct PrefetchByConfidence {
  float full_above = 0.5f;
  Precision choose(const Prediction& p, Precision full, Precision low) noexcept {
    return p.score >= full_above ? full : low;
  }
  bool exact() const noexcept { return full_above <= 0.f; }
  std::string_view name() const noexcept { return "by-confidence"; }
};
static_assert(PrefetchPrecisionPolicy<PrefetchByConfidence>);

MOEX_NAMESPACE_END
