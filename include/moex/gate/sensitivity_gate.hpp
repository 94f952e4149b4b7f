#pragma once
/// @file sensitivity_gate.hpp
/// SensitivityGate: AdapMoE's sensitivity-based adaptive gating (Zhong et al., ICCAD 2024),
/// generalized to top-k and to batches.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "moex/concepts/gate.hpp"
#include "moex/formats/trace.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Drops a token's trailing experts where the layer tolerates it.
///
/// AdapMoE expands the loss change of dropping the 2nd expert of a top-2 mixture to second order
/// and approximates the Hessian by the layer's Fisher information F_l: drop it when
/// (1 - alpha)^2 * F_l <= T, i.e. when its normalized weight w_2 <= sqrt(T / F_l). For top-k this
/// gate drops experts from the tail while the normalized weight they carry together, w_tail,
/// satisfies w_tail^2 * F_l <= T, always keeping the first expert; the remaining weights are
/// renormalized to their original sum. It applies per token, so it works at any batch size
/// (AdapMoE's own code handles batch 1 only).
///
/// Sensitivities F_l come from calibration (estimate_sensitivity); the global threshold T from
/// calibrate_threshold for a target average number of experts per token. With T = 0 (the
/// default) nothing is ever dropped.
class SensitivityGate {
 public:
  SensitivityGate() = default;
  /// Per-layer sensitivities (non-negative, finite) and the threshold T >= 0.
  SensitivityGate(std::vector<float> sensitivities, float threshold) : sens_(std::move(sensitivities)), t_(threshold) {}

  std::uint32_t apply(std::uint32_t layer, TokenRouting& r) noexcept {
    if (t_ <= 0.f || r.k <= 1) return 0;
    const float f = layer < sens_.size() ? sens_[layer] : 1.f;
    float total = 0.f;
    for (std::uint32_t j = 0; j < r.k; ++j) total += r.weights[j];
    if (!(total > 0.f)) return 0;
    std::uint32_t keep = r.k;
    float tail = 0.f;
    while (keep > 1) {
      const float w = tail + r.weights[keep - 1] / total;
      if (w * w * f > t_) break;
      tail = w;
      --keep;
    }
    const std::uint32_t dropped = r.k - keep;
    if (dropped == 0) return 0;
    float kept = 0.f;
    for (std::uint32_t j = 0; j < keep; ++j) kept += r.weights[j];
    for (std::uint32_t j = 0; j < keep; ++j) r.weights[j] = r.weights[j] / kept * total;
    for (std::uint32_t j = keep; j < r.k; ++j) r.weights[j] = 0.f;
    r.k = keep;
    return dropped;
  }
  bool exact() const noexcept { return t_ <= 0.f; }
  std::string_view name() const noexcept { return "adapmoe-sensitivity"; }

  float threshold() const noexcept { return t_; }
  void set_threshold(float t) noexcept { t_ = std::max(0.f, t); }
  std::span<const float> sensitivities() const noexcept { return sens_; }
  Status set_sensitivities(std::vector<float> s) {
    for (float f : s)
      if (!std::isfinite(f) || f < 0.f)
        return invalid_argument("SensitivityGate: sensitivities must be finite and >= 0");
    sens_ = std::move(s);
    return Status::ok();
  }

  /// Average experts per token this gate would leave on `trace` (its gate weights), per layer
  /// sensitivities as set.
  double average_k(const RoutingTrace& trace) const noexcept {
    std::uint64_t kept = 0, n = 0;
    SensitivityGate g = *this;
    for (std::size_t t = 0; t < trace.tokens(); ++t)
      for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
        TokenRouting r;
        if (!routing_at(trace, t, l, r)) continue;
        g.apply(l, r);
        kept += r.k;
        ++n;
      }
    return n ? static_cast<double>(kept) / static_cast<double>(n) : 0.0;
  }

  /// Picks T so that the average experts per token on `trace` comes as close to `target_k` as the
  /// data allows (average_k is monotone in T: bisection to 1e-4 in k). Sensitivities must be set
  /// (empty: all 1). Returns the average reached.
  Result<double> calibrate_threshold(const RoutingTrace& trace, double target_k) {
    if (trace.tokens() == 0) return invalid_argument("calibrate_threshold: empty trace");
    if (!(target_k >= 1.0) || target_k > trace.top_k)
      return invalid_argument("calibrate_threshold: target must lie in [1, top_k]");
    float lo = 0.f;
    float hi = 1.f;
    const float fmax = sens_.empty() ? 1.f : std::max(1.f, *std::max_element(sens_.begin(), sens_.end()));
    hi = fmax;  // (w_tail <= 1)^2 * F <= T drops everything droppable
    set_threshold(hi);
    if (average_k(trace) > target_k) return average_k(trace);  // cannot go lower
    for (int it = 0; it < 60; ++it) {
      const float mid = 0.5f * (lo + hi);
      set_threshold(mid);
      if (average_k(trace) > target_k)
        lo = mid;
      else
        hi = mid;
      if (hi - lo <= 1e-7f * fmax) break;
    }
    set_threshold(hi);
    return average_k(trace);
  }

  /// Gradient-free sensitivity of one layer from calibration data (AdapMoE's Fisher proxy):
  /// F_l = sum ||y_full - y_reduced||^2 / sum (w_dropped^2 * ||y_full||^2), where y_reduced drops
  /// each token's last expert (renormalized) and w_dropped is its normalized weight. A layer whose
  /// output barely moves when experts are dropped gets a small F and drops more.
  static double estimate_sensitivity(std::span<const float> y_full, std::span<const float> y_reduced,
                                     std::span<const float> dropped_weight, std::size_t hidden) noexcept {
    double num = 0, den = 0;
    const std::size_t n = dropped_weight.size();
    for (std::size_t t = 0; t < n && (t + 1) * hidden <= y_full.size() && (t + 1) * hidden <= y_reduced.size(); ++t) {
      double d2 = 0, y2 = 0;
      for (std::size_t c = 0; c < hidden; ++c) {
        const double d = double(y_full[t * hidden + c]) - y_reduced[t * hidden + c];
        d2 += d * d;
        y2 += double(y_full[t * hidden + c]) * y_full[t * hidden + c];
      }
      num += d2;
      den += double(dropped_weight[t]) * dropped_weight[t] * y2;
    }
    return den > 0 ? num / den : 0.0;
  }

 private:
  std::vector<float> sens_;
  float t_ = 0.f;
};
static_assert(GatePolicy<SensitivityGate>);

MOEX_NAMESPACE_END
