#pragma once
/// @file default_policies.hpp
/// DefaultPolicies: every replaceable piece of the executor, with its default. Override by deriving:
/// @code
///   struct LfuPolicies : moex::DefaultPolicies { using Eviction = moex::LfuEviction; };
///   auto ex = moex::MoeLayerExecutor<LfuPolicies>::create(store, {.cache_bytes = 1 << 30});
/// @endcode

#include "moex/backend/cpu_backend.hpp"
#include "moex/concepts/gate.hpp"
#include "moex/concepts/miss_policy.hpp"
#include "moex/concepts/predictor.hpp"
#include "moex/concepts/prefetch_precision.hpp"
#include "moex/policies/lru_eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// The exact path: the router's top-k, no prediction, on-demand loading at full precision,
/// least-recently-used eviction, on the CPU backend.
struct DefaultPolicies {
  using Eviction = LruEviction;
  using Gate = FixedTopKGate;
  using Backend = CpuBackend;
  using Predictor = NoPredictor;
  using Miss = LoadOnMiss;
  using PrefetchPrecision = PrefetchFullPrecision;
};

MOEX_NAMESPACE_END
