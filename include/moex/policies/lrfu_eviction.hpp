#pragma once
/// @file lrfu_eviction.hpp
/// LRFU: a continuum between LRU and LFU (Lee et al., "LRFU: A Spectrum of Policies that Subsumes
/// the Least Recently Used and Least Frequently Used Policies", IEEE TC 2001).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <span>
#include <string_view>
#include <vector>

#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Parameters of LrfuEviction.
struct LrfuConfig {
  /// Decay per step: CRF(now) = sum over past accesses of 2^(-lambda * (now - t_i)).
  /// 0 behaves as LFU (counting), large values as LRU.
  double lambda = 0.05;
};

/// Evicts the candidate with the smallest combined recency and frequency (CRF).
/// Every access at step t adds 2^(-lambda (now - t)) to the expert's CRF. The state is kept in
/// the log domain relative to step 0, a = log2(CRF(now)) + lambda * now, which does not change
/// with time, so choosing a victim compares stored numbers only (no exp per candidate); one
/// exp2/log2 pair per access updates it. State lives in a dense per-key array (KeyedEviction);
/// keys outside it are treated as never accessed.
class LrfuEviction {
 public:
  LrfuEviction() = default;
  /// A policy with the given decay.
  explicit LrfuEviction(LrfuConfig config) noexcept : config_(config) {}

  /// Allocates per-key state for n_layers x n_experts keys.
  Status reserve_keys(std::uint32_t n_layers, std::uint32_t n_experts) {
    n_experts_ = n_experts;
    if (!detail::try_alloc([&] {
          a_.assign(static_cast<std::size_t>(n_layers) * n_experts, -std::numeric_limits<double>::infinity());
        })) {
      n_experts_ = 0;
      return out_of_memory("LrfuEviction state");
    }
    return Status::ok();
  }

  void on_step(std::uint64_t step, std::uint32_t /*layer*/) noexcept { now_ = step; }
  void on_access(const SlotView& s) noexcept { touch(s); }
  void on_insert(const SlotView& s) noexcept {
    if (double* a = state(s.key)) *a = -std::numeric_limits<double>::infinity();
    touch(s);
  }
  void on_evict(const SlotView& s) noexcept {
    if (double* a = state(s.key)) *a = -std::numeric_limits<double>::infinity();
  }

  /// O(n): smallest stored a; ties to the least recently used.
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::size_t best = 0;
    double best_a = value(candidates[0].key);
    for (std::size_t i = 1; i < candidates.size(); ++i) {
      const double a = value(candidates[i].key);
      if (a < best_a || (a == best_a && candidates[i].last_use < candidates[best].last_use)) {
        best = i;
        best_a = a;
      }
    }
    return best;
  }

  /// RankedEviction: (stored a, last_use); a changes only in on_insert/on_access of its key.
  LastUseRank<double> rank(const SlotView& s) const noexcept { return {value(s.key), s.last_use}; }

  std::string_view name() const noexcept { return "lrfu"; }

  /// The current CRF of a key (0 when unknown); for tests and reports.
  double crf(ExpertKey k) const noexcept {
    const double a = value(k);
    return std::exp2(a - config_.lambda * static_cast<double>(now_));
  }

 private:
  double* state(ExpertKey k) noexcept {
    if (k.expert >= n_experts_) return nullptr;
    const std::size_t i = static_cast<std::size_t>(k.layer) * n_experts_ + k.expert;
    return i < a_.size() ? &a_[i] : nullptr;
  }
  double value(ExpertKey k) const noexcept {
    if (k.expert >= n_experts_) return -std::numeric_limits<double>::infinity();
    const std::size_t i = static_cast<std::size_t>(k.layer) * n_experts_ + k.expert;
    return i < a_.size() ? a_[i] : -std::numeric_limits<double>::infinity();
  }
  void touch(const SlotView& s) noexcept {
    double* a = state(s.key);
    if (a == nullptr) return;
    const double t = config_.lambda * static_cast<double>(now_);
    // a' = log2(2^(a - t) + 1) + t, computed stably.
    const double d = *a - t;
    *a = (d > 0 ? d + std::log2(1.0 + std::exp2(-d)) : std::log2(1.0 + std::exp2(d))) + t;
  }

  LrfuConfig config_{};
  std::uint32_t n_experts_ = 0;
  std::uint64_t now_ = 0;
  std::vector<double> a_;
};

static_assert(KeyedEviction<LrfuEviction> && StepAwareEviction<LrfuEviction> && RankedEviction<LrfuEviction>);

MOEX_NAMESPACE_END
