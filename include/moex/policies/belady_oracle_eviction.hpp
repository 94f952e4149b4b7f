#pragma once
/// @file belady_oracle_eviction.hpp
/// Belady's optimal replacement (MIN), an offline oracle that reads the future from a trace.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/concepts/eviction.hpp"
#include "moex/formats/trace.hpp"

MOEX_NAMESPACE_BEGIN

/// One future use of an expert: at `step` (the same step numbering the cache is driven with;
/// RoutingTrace::step(token, layer) = token * n_layers + layer for trace replays).
struct FutureAccess {
  std::uint64_t step = 0;
  ExpertKey key;
};

/// Evicts the candidate whose next use lies furthest in the future (never used again first);
/// ties go to the least recently used. Belady (1966) proved this minimises misses for a cache of
/// equal-sized entries that loads on every miss, so it bounds every online policy in the
/// simulator. Uses at the current step count as "now" unless the candidate was already used at
/// this step (SlotView::last_step == now): the experts of one token at one layer form a set.
/// Needs on_step (StepAwareEviction) to know "now", and the future via set_future; without a
/// future every candidate is "never used again" and it degenerates to LRU.
class BeladyOracleEviction {
 public:
  BeladyOracleEviction() = default;

  /// Loads the future: every access the cache will see, in any order. Keys must satisfy
  /// layer < n_layers and expert < n_experts (kInvalidArgument otherwise); n_layers * n_experts
  /// is capped at 2^26 keys.
  Status set_future(std::span<const FutureAccess> accesses, std::uint32_t n_layers, std::uint32_t n_experts) {
    const std::uint64_t n_keys = static_cast<std::uint64_t>(n_layers) * n_experts;
    if (n_keys == 0 || n_keys > (std::uint64_t{1} << 26))
      return invalid_argument("BeladyOracleEviction: n_layers * n_experts out of range");
    for (const FutureAccess& a : accesses) {
      if (a.key.layer >= n_layers || a.key.expert >= n_experts)
        return invalid_argument("BeladyOracleEviction: access key out of range");
    }
    n_experts_ = n_experts;
    const bool ok = detail::try_alloc([&] {
      begin_.assign(n_keys + 1, 0);
      for (const FutureAccess& a : accesses) ++begin_[index(a.key) + 1];
      for (std::size_t i = 1; i < begin_.size(); ++i) begin_[i] += begin_[i - 1];
      steps_.assign(accesses.size(), 0);
      std::vector<std::size_t> fill(begin_.begin(), begin_.end() - 1);
      for (const FutureAccess& a : accesses) steps_[fill[index(a.key)]++] = a.step;
      for (std::size_t k = 0; k < n_keys; ++k)
        std::sort(steps_.begin() + static_cast<std::ptrdiff_t>(begin_[k]),
                  steps_.begin() + static_cast<std::ptrdiff_t>(begin_[k + 1]));
      cursor_.assign(begin_.begin(), begin_.end() - 1);
    });
    if (!ok) {
      n_experts_ = 0;
      begin_.clear();
      return out_of_memory("BeladyOracleEviction future");
    }
    now_ = 0;
    return Status::ok();
  }

  void on_step(std::uint64_t step, std::uint32_t /*layer*/) noexcept { now_ = step; }
  void on_access(const SlotView&) noexcept {}
  void on_insert(const SlotView&) noexcept {}
  void on_evict(const SlotView&) noexcept {}

  /// O(n) over candidates; cursors move forward only, so all calls together cost
  /// O(future length) extra.
  std::size_t choose_victim(std::span<const SlotView> candidates) noexcept {
    std::size_t best = 0;
    std::uint64_t best_next = next_use(candidates[0]);
    for (std::size_t i = 1; i < candidates.size(); ++i) {
      const std::uint64_t n = next_use(candidates[i]);
      if (n > best_next || (n == best_next && candidates[i].last_use < candidates[best].last_use)) {
        best = i;
        best_next = n;
      }
    }
    return best;
  }

  std::string_view name() const noexcept { return "belady"; }

  /// ExpiringRankEviction: (kNever - next use, last_use), so the furthest next use ranks first.
  /// The next use found at an access stays exact until a step passes it without the access
  /// (a use the run skipped); rank_expiry tells the cache when to read it again.
  LastUseRank<std::uint64_t> rank(const SlotView& s) noexcept { return {kNever - next_use(s), s.last_use}; }
  /// The last step at which `r` is exact: its next use.
  std::uint64_t rank_expiry(const LastUseRank<std::uint64_t>& r) const noexcept { return kNever - r.primary; }

  /// The step of the next use of `s` at or after now (see the class comment), or
  /// kNever when it is not used again.
  std::uint64_t next_use(const SlotView& s) noexcept {
    if (s.key.expert >= n_experts_) return kNever;
    const std::size_t k = index(s.key);
    if (k + 1 >= begin_.size()) return kNever;
    std::size_t& c = cursor_[k];
    const std::size_t end = begin_[k + 1];
    while (c < end && steps_[c] < now_) ++c;
    std::size_t i = c;
    while (i < end && steps_[i] == now_ && s.last_step == now_) ++i;
    return i < end ? steps_[i] : kNever;
  }

  /// "Never used again".
  static constexpr std::uint64_t kNever = std::numeric_limits<std::uint64_t>::max();

 private:
  std::size_t index(ExpertKey k) const noexcept { return static_cast<std::size_t>(k.layer) * n_experts_ + k.expert; }

  std::uint32_t n_experts_ = 0;
  std::uint64_t now_ = 0;
  std::vector<std::size_t> begin_;    // [n_keys + 1] offsets into steps_
  std::vector<std::uint64_t> steps_;  // per key, ascending
  std::vector<std::size_t> cursor_;   // per key, first step >= now (lazily advanced)
};

static_assert(StepAwareEviction<BeladyOracleEviction> && ExpiringRankEviction<BeladyOracleEviction>);

/// The future a replay of tokens [begin, end) of `trace` presents, one executor call per
/// (token, layer) that has experts, step k being the k-th call (what MoeLayerExecutor::step counts).
inline std::vector<FutureAccess> replay_future(const RoutingTrace& trace, std::size_t begin = 0,
                                               std::size_t end = SIZE_MAX) {
  std::vector<FutureAccess> f;
  std::uint64_t step = 0;
  end = std::min(end, trace.tokens());
  for (std::size_t t = begin; t < end; ++t)
    for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
      const auto ids = trace.experts(t, l);
      if (ids.empty()) continue;
      for (std::uint32_t e : ids) f.push_back({step, ExpertKey{l, e}});
      ++step;
    }
  return f;
}

MOEX_NAMESPACE_END
