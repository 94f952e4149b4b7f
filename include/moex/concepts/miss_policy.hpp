#pragma once
/// @file miss_policy.hpp
/// The MissPolicy concept: what to do when a selected expert is not resident.

#include <concepts>
#include <cstdint>
#include <string_view>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// What the executor can do about a miss.
enum class MissAction : std::uint8_t {
  kLoad = 0,             ///< copy the expert into the fast tier in MissDecision::precision, then run it
  kComputeAtSource = 1,  ///< run it where its master copy lives (the host CPU), no copy
  kSkip = 2,             ///< drop it for this token (renormalizing the others): approximate
};

/// A decision for one missed expert.
struct MissDecision {
  MissAction action = MissAction::kLoad;
  Precision precision = Precision::kBF16;  ///< for kLoad
};

/// What a miss policy sees. Times are on the backend's clock; an ETA is when the work would finish
/// if queued now behind what is already queued (so the policy balances the two queues).
struct MissContext {
  ExpertKey key;
  std::uint32_t rank = 0;                        ///< 0 = the token's top expert
  float weight = 0.f;                            ///< the expert's normalized gate weight (largest over its tokens)
  float unimportance = 0.f;                      ///< HOBBIT's score: normalized weight of the experts ranked before it
  std::uint32_t tokens = 0;                      ///< tokens that use it this step
  Precision cache_precision = Precision::kBF16;  ///< the full-precision choice
  Precision low_precision = Precision::kBF16;    ///< the low-precision copy held, == cache_precision if none
  std::uint64_t now_ns = 0;
  std::uint64_t load_eta_ns = 0;      ///< ETA of loading in cache_precision
  std::uint64_t load_low_eta_ns = 0;  ///< ETA of loading the low-precision copy
  std::uint64_t source_eta_ns = 0;    ///< ETA of computing at the source; UINT64_MAX if impossible
};

/// MissPolicy — decides per missed expert per step. Called from the executor thread, once per
/// missed expert, in the order experts are served. Deterministic. `exact()` is true when the
/// policy never changes the model's function (kLoad at full precision, or kComputeAtSource, only).
template <class M>
concept MissPolicy = std::default_initializable<M> && std::move_constructible<M> &&
    requires(M& m, const M& cm, const MissContext& c) {
  { m.decide(c) }
  noexcept->std::same_as<MissDecision>;
  { cm.exact() }
  noexcept->std::same_as<bool>;
  { cm.name() }
  noexcept->std::convertible_to<std::string_view>;
};

/// Always load at full (cache) precision: on-demand loading, the exact baseline.
struct LoadOnMiss {
  MissDecision decide(const MissContext& c) noexcept { return {MissAction::kLoad, c.cache_precision}; }
  bool exact() const noexcept { return true; }
  std::string_view name() const noexcept { return "load-on-miss"; }
};
static_assert(MissPolicy<LoadOnMiss>);

MOEX_NAMESPACE_END
