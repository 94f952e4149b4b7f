#pragma once
/// @file hobbit_score_eviction.hpp
/// HOBBIT's multidimensional cache score (Tang et al., "HOBBIT: A Mixed Precision Expert
/// Offloading System for Fast MoE Inference", 2024, §4.3).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "moex/cache/hobbit_victim_index.hpp"
#include "moex/concepts/eviction.hpp"

MOEX_NAMESPACE_BEGIN

/// Weights of the four terms of HobbitScoreEviction's score, and the model's layer count.
struct HobbitScoreConfig {
  double w_recency = 0.25;         ///< LRU term
  double w_frequency = 0.25;       ///< LFU term
  double w_high_precision = 0.25;  ///< LHU term: uses at high precision
  double w_layer_distance = 0.25;  ///< FLD term: how soon the expert's layer runs again
  /// Layers of the model for FLD; 0 takes n_layers from reserve_keys (the cache's config).
  std::uint32_t n_layers = 0;
};

/// Evicts the candidate with the lowest value
///   score = w_r R + w_f F + w_h H + w_d FLD
/// where, over the candidates, R = 1 - (now - last_step) / (now - oldest_last_step + 1) (recent is
/// near 1), F = hits / max hits, H = hp_uses / max hp_uses (each 0 when the max is 0) and
/// FLD = 1 - ((l_t - l_cur + L) mod L) / L: an expert of the layer about to run scores 1, one of
/// the layer that just ran scores 1/L, because in decoding layers run in a cycle and the next
/// use of a just-used layer is a full cycle away. Ties go to the least recently used.
/// `now` and `l_cur` come from on_step; without it they stay 0 (then FLD ranks by layer index).
/// IndexedEviction: inside a MixedPrecisionCache the victim comes from a HobbitVictimIndex (per
/// layer skylines and score bounds), which provably picks the same entry as choose_victim.
class HobbitScoreEviction {
 public:
  /// The victim index MixedPrecisionCache keeps for this policy.
  using VictimIndex = HobbitVictimIndex;
  /// Groups of more candidates than this keep the index (the score scan is costly: crossover low).
  static constexpr std::uint32_t kVictimIndexMinCandidates = 8;

  /// The normalizers of one decision (see the class comment).
  struct Norms {
    std::uint64_t now = 0;  ///< max(step from on_step, newest last_step)
    double r_span = 1;      ///< now - oldest last_step + 1
    double f_norm = 0;      ///< 1 / max hits, 0 when max hits is 0
    double h_norm = 0;      ///< 1 / max hp_uses, 0 when it is 0
  };

  HobbitScoreEviction() = default;
  /// A policy with the given weights.
  explicit HobbitScoreEviction(HobbitScoreConfig config) noexcept : config_(config) {}

  /// Takes the layer count for FLD when the config left it 0. Never fails.
  Status reserve_keys(std::uint32_t n_layers, std::uint32_t /*n_experts*/) {
    if (config_.n_layers == 0) config_.n_layers = n_layers;
    return Status::ok();
  }

  void on_step(std::uint64_t step, std::uint32_t layer) noexcept {
    now_ = step;
    layer_ = layer;
  }
  void on_access(const SlotView&) noexcept {}
  void on_insert(const SlotView&) noexcept {}
  void on_evict(const SlotView&) noexcept {}

  /// O(n): two passes (normalizers, then scores). The reference the victim index must match.
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::uint64_t oldest = candidates[0].last_step;
    std::uint32_t max_hits = 0;
    std::uint32_t max_hp = 0;
    for (const SlotView& c : candidates) {
      oldest = std::min(oldest, c.last_step);
      max_hits = std::max(max_hits, c.hits);
      max_hp = std::max(max_hp, c.hp_uses);
    }
    const Norms n = norms(oldest, newest(candidates), max_hits, max_hp);
    std::size_t best = 0;
    double best_score = 0;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      const SlotView& c = candidates[i];
      const double s = score_of(c.last_step, c.hits, c.hp_uses, layer_term(c.key.layer), n);
      if (i == 0 || s < best_score || (s == best_score && candidates[i].last_use < candidates[best].last_use)) {
        best = i;
        best_score = s;
      }
    }
    return best;
  }

  std::string_view name() const noexcept { return "hobbit"; }

  /// The normalizers over candidates with these extremes (oldest/newest last_step, largest hits
  /// and hp_uses).
  Norms norms(std::uint64_t oldest, std::uint64_t newest, std::uint32_t max_hits, std::uint32_t max_hp) const noexcept {
    Norms n;
    n.now = std::max(now_, newest);
    n.r_span = static_cast<double>(n.now - oldest) + 1.0;
    n.f_norm = max_hits ? 1.0 / max_hits : 0.0;
    n.h_norm = max_hp ? 1.0 / max_hp : 0.0;
    return n;
  }
  /// The score of an entry, given its layer's weighted-in FLD value `fld` (layer_term).
  double score_of(std::uint64_t last_step, std::uint32_t hits, std::uint32_t hp_uses, double fld,
                  const Norms& n) const noexcept {
    const double r = 1.0 - static_cast<double>(n.now - last_step) / n.r_span;
    return config_.w_recency * r + config_.w_frequency * hits * n.f_norm +
           config_.w_high_precision * hp_uses * n.h_norm + config_.w_layer_distance * fld;
  }
  /// FLD of layer `l` at the current layer.
  double layer_term(std::uint32_t l) const noexcept { return layer_distance_term(l, layer_, config_.n_layers); }
  /// True when the weights are finite and non-negative, so that HobbitVictimIndex is exact.
  bool index_exact() const noexcept {
    const double w[] = {config_.w_recency, config_.w_frequency, config_.w_high_precision, config_.w_layer_distance};
    for (double x : w)
      if (!(x >= 0) || !std::isfinite(x)) return false;
    return true;
  }

  /// FLD of an expert of layer `l` when layer `cur` runs next, for a model of `n` layers.
  static double layer_distance_term(std::uint32_t l, std::uint32_t cur, std::uint32_t n) noexcept {
    if (n == 0) return 0.0;
    const std::uint32_t d = ((l % n) + n - (cur % n)) % n;
    return 1.0 - static_cast<double>(d) / n;
  }

 private:
  static std::uint64_t newest(std::span<const SlotView> c) noexcept {
    std::uint64_t m = 0;
    for (const SlotView& s : c) m = std::max(m, s.last_step);
    return m;
  }
  HobbitScoreConfig config_{};
  std::uint64_t now_ = 0;
  std::uint32_t layer_ = 0;
};

static_assert(KeyedEviction<HobbitScoreEviction> && StepAwareEviction<HobbitScoreEviction> &&
              IndexedEviction<HobbitScoreEviction>);

MOEX_NAMESPACE_END
