#pragma once
/// @file prefetch_scheduler.hpp
/// PrefetchScheduler: the queue of predicted transfers — priorities, deadlines, deduplication,
/// bounded bytes in flight, and the dropping of stale predictions.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "moex/concepts/prefetch_precision.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// One transfer the scheduler wants.
struct PrefetchRequest {
  ExpertKey key;
  Precision precision = Precision::kBF16;
  std::uint32_t deadline_layer = 0;  ///< the layer that needs it (== key.layer)
  float score = 0.f;
  std::uint64_t bytes = 0;
};

/// Settings of a PrefetchScheduler.
struct PrefetchConfig {
  std::uint64_t max_bytes_in_flight = 0;  ///< 0 = unbounded
  std::uint32_t max_pending = 1024;       ///< requests kept waiting at most (oldest dropped)
};

/// The scheduler decides *what* to fetch and *when*; the executor asks it which requests to issue
/// and reports what is in flight. Ordering: the nearest deadline first (layer distance from the
/// layer being served, cyclically), then the higher score, then the key: deterministic.
///
/// Thread: the executor's only.
template <PrefetchPrecisionPolicy PP = PrefetchFullPrecision>
class PrefetchScheduler {
 public:
  PrefetchScheduler() = default;
  explicit PrefetchScheduler(PrefetchConfig config, PP precision = {})
      : config_(config), precision_(std::move(precision)) {}

  /// Queues a prediction. `resident_or_in_flight` says the expert needs no transfer (deduplicated
  /// against the cache and in-flight work by the caller, which owns both); a request already
  /// pending for the key is merged (higher score kept). Returns true when queued.
  bool request(const Prediction& p, Precision full, Precision low, std::uint64_t bytes_full, std::uint64_t bytes_low,
               bool resident_or_in_flight) {
    if (resident_or_in_flight) return false;
    for (PrefetchRequest& r : pending_)
      if (r.key == p.key) {
        r.score = std::max(r.score, p.score);
        return false;
      }
    const Precision prec = precision_.choose(p, full, low);
    if (pending_.size() >= config_.max_pending) pending_.erase(pending_.begin());
    pending_.push_back({p.key, prec, p.key.layer, p.score, prec == full ? bytes_full : bytes_low});
    return true;
  }

  /// Drops every pending request for `layer`: its real routing is known, so they are stale
  /// (the executor handles the ones in flight). Returns how many were dropped.
  std::size_t drop_layer(std::uint32_t layer) {
    const auto n = pending_.size();
    pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                  [&](const PrefetchRequest& r) { return r.deadline_layer == layer; }),
                   pending_.end());
    return n - pending_.size();
  }

  /// Moves into `out` the requests to issue now, best first, while the bytes in flight stay
  /// within the bound (one request always goes when nothing is in flight). `current_layer` and
  /// `n_layers` order deadlines cyclically.
  void take_issuable(std::uint64_t bytes_in_flight, std::uint32_t current_layer, std::uint32_t n_layers,
                     std::vector<PrefetchRequest>& out) {
    auto distance = [&](const PrefetchRequest& r) {
      return (r.deadline_layer + n_layers - current_layer) % (n_layers ? n_layers : 1);
    };
    std::sort(pending_.begin(), pending_.end(), [&](const PrefetchRequest& a, const PrefetchRequest& b) {
      if (distance(a) != distance(b)) return distance(a) < distance(b);
      if (a.score != b.score) return a.score > b.score;
      return a.key < b.key;
    });
    std::size_t i = 0;
    for (; i < pending_.size(); ++i) {
      const std::uint64_t b = pending_[i].bytes;
      if (config_.max_bytes_in_flight && bytes_in_flight > 0 && bytes_in_flight + b > config_.max_bytes_in_flight)
        break;
      bytes_in_flight += b;
      out.push_back(pending_[i]);
    }
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  std::span<const PrefetchRequest> pending() const noexcept { return pending_; }
  const PrefetchConfig& config() const noexcept { return config_; }
  const PP& precision_policy() const noexcept { return precision_; }
  void clear() noexcept { pending_.clear(); }

 private:
  PrefetchConfig config_{};
  [[no_unique_address]] PP precision_{};
  std::vector<PrefetchRequest> pending_;
};

MOEX_NAMESPACE_END
