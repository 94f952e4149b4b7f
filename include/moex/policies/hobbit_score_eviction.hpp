#pragma once
/// @file hobbit_score_eviction.hpp
/// HOBBIT's multidimensional cache score (Tang et al., "HOBBIT: A Mixed Precision Expert
/// Offloading System for Fast MoE Inference", 2024, §4.3).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

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
class HobbitScoreEviction {
 public:
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

  /// O(n): two passes (normalizers, then scores).
  std::size_t choose_victim(std::span<const SlotView> candidates) const noexcept {
    std::uint64_t oldest = candidates[0].last_step;
    std::uint32_t max_hits = 0;
    std::uint32_t max_hp = 0;
    for (const SlotView& c : candidates) {
      oldest = std::min(oldest, c.last_step);
      max_hits = std::max(max_hits, c.hits);
      max_hp = std::max(max_hp, c.hp_uses);
    }
    const std::uint64_t now = std::max(now_, newest(candidates));
    const double r_span = static_cast<double>(now - oldest) + 1.0;
    const double f_norm = max_hits ? 1.0 / max_hits : 0.0;
    const double h_norm = max_hp ? 1.0 / max_hp : 0.0;
    std::size_t best = 0;
    double best_score = 0;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
      const double s = score(candidates[i], now, r_span, f_norm, h_norm);
      if (i == 0 || s < best_score || (s == best_score && candidates[i].last_use < candidates[best].last_use)) {
        best = i;
        best_score = s;
      }
    }
    return best;
  }

  std::string_view name() const noexcept { return "hobbit"; }

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
  double score(const SlotView& c, std::uint64_t now, double r_span, double f_norm, double h_norm) const noexcept {
    const double r = 1.0 - static_cast<double>(now - c.last_step) / r_span;
    return config_.w_recency * r + config_.w_frequency * c.hits * f_norm +
           config_.w_high_precision * c.hp_uses * h_norm +
           config_.w_layer_distance * layer_distance_term(c.key.layer, layer_, config_.n_layers);
  }

  HobbitScoreConfig config_{};
  std::uint64_t now_ = 0;
  std::uint32_t layer_ = 0;
};

static_assert(KeyedEviction<HobbitScoreEviction> && StepAwareEviction<HobbitScoreEviction>);

MOEX_NAMESPACE_END
