#pragma once
/// @file static_hot_set_eviction.hpp
/// Eviction by a fixed popularity profile measured offline (a "static hot set").

#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Evicts the candidate with the lowest profiled popularity; ties go to the least recently used.
/// With a cache of C slots this keeps the C most popular experts resident once they have been
/// seen: the static placement of systems that pin a profiled hot set (e.g. MoE-Infinity's
/// activation-frequency placement, llama.cpp-style "hot experts on GPU" splits). The profile is a
/// dense [n_layers x n_experts] array of scores (for instance access counts from a calibration
/// trace, see profile_from_trace in formats/trace.hpp users); without one it degenerates to LRU.
/// NaN scores count as 0 (so that the order is total).
class StaticHotSetEviction {
 public:
  StaticHotSetEviction() = default;
  /// A policy over `scores[layer * n_experts + expert]`; keys outside score 0.
  StaticHotSetEviction(std::vector<double> scores, std::uint32_t n_experts) noexcept
      : n_experts_(n_experts), scores_(std::move(scores)) {
    for (double& s : scores_)
      if (s != s) s = 0.0;
  }

  void on_access(const SlotView&) noexcept {}
  void on_insert(const SlotView&) noexcept {}
  void on_evict(const SlotView&) noexcept {}

  /// O(n) scan for the smallest (score, last_use).
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::size_t best = 0;
    double best_s = score(candidates[0].key);
    for (std::size_t i = 1; i < candidates.size(); ++i) {
      const double s = score(candidates[i].key);
      if (s < best_s || (s == best_s && candidates[i].last_use < candidates[best].last_use)) {
        best = i;
        best_s = s;
      }
    }
    return best;
  }

  /// RankedEviction: (score, last_use).
  LastUseRank<double> rank(const SlotView& s) const noexcept { return {score(s.key), s.last_use}; }

  std::string_view name() const noexcept { return "static-hot-set"; }

  /// The profiled score of a key (0 outside the profile).
  double score(ExpertKey k) const noexcept {
    if (k.expert >= n_experts_) return 0.0;
    const std::size_t i = static_cast<std::size_t>(k.layer) * n_experts_ + k.expert;
    return i < scores_.size() ? scores_[i] : 0.0;
  }

 private:
  std::uint32_t n_experts_ = 0;
  std::vector<double> scores_;
};

static_assert(RankedEviction<StaticHotSetEviction>);

MOEX_NAMESPACE_END
