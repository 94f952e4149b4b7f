#include "moex/route/router.hpp"

#include <algorithm>
#include <cmath>
#include <string>

MOEX_NAMESPACE_BEGIN

Status validate(const RouterConfig& cfg) noexcept {
  if (cfg.n_experts == 0) return invalid_argument("router: n_experts must be > 0");
  if (cfg.top_k == 0 || cfg.top_k > kMaxTopK)
    return invalid_argument("router: top_k must be in 1.." + std::to_string(kMaxTopK) + ", got " +
                            std::to_string(cfg.top_k));
  if (cfg.top_k > cfg.n_experts) return invalid_argument("router: top_k exceeds n_experts");
  if (cfg.kind != RouterKind::kSoftmaxTopKRenorm && cfg.kind != RouterKind::kSoftmaxTopK &&
      cfg.kind != RouterKind::kSigmoidBiasScaled)
    return invalid_argument("router: unknown kind");
  if (!std::isfinite(cfg.routed_scaling) || cfg.routed_scaling <= 0.f)
    return invalid_argument("router: routed_scaling must be finite and > 0");
  if (cfg.n_group == 0 || cfg.n_experts % cfg.n_group != 0)
    return invalid_argument("router: n_group must divide n_experts");
  if (cfg.topk_group == 0 || cfg.topk_group > cfg.n_group)
    return invalid_argument("router: topk_group must be in 1..n_group");
  if (cfg.n_group > 1 && cfg.top_k > cfg.topk_group * (cfg.n_experts / cfg.n_group))
    return invalid_argument("router: top_k exceeds the experts of the kept groups");
  return Status::ok();
}

namespace {

// Indices of the k largest values (value desc, index asc), among those with allowed[i].
template <class Allowed>
void top_k_indices(std::span<const float> v, std::uint32_t k, Allowed allowed, std::uint32_t* out) noexcept {
  std::uint32_t filled = 0;
  for (std::uint32_t i = 0; i < v.size(); ++i) {
    if (!allowed(i)) continue;
    // insertion into a sorted list of at most k
    std::uint32_t pos = filled;
    while (pos > 0 && v[out[pos - 1]] < v[i]) --pos;
    if (pos >= k) continue;
    const std::uint32_t last = std::min(filled, k - 1);
    for (std::uint32_t j = last; j > pos; --j) out[j] = out[j - 1];
    out[pos] = i;
    if (filled < k) ++filled;
  }
}

}  // namespace

Status route_token(const RouterConfig& cfg, std::span<const float> logits, std::span<const float> bias,
                   TokenRouting& out) noexcept {
  MOEX_RETURN_IF_ERROR(validate(cfg));
  const std::uint32_t n = cfg.n_experts;
  if (logits.size() != n) return invalid_argument("route_token: logits size differs from n_experts");
  if (!bias.empty() && bias.size() != n) return invalid_argument("route_token: bias size differs from n_experts");
  for (float l : logits)
    if (!std::isfinite(l)) return invalid_argument("route_token: non-finite router logit");

  // Scores (probabilities or sigmoid) and selection keys, on the stack for n <= 512.
  constexpr std::uint32_t kMaxExperts = 1024;
  if (n > kMaxExperts) return unsupported("route_token: more than 1024 experts");
  float scores[kMaxExperts];
  float keys[kMaxExperts];
  if (cfg.kind == RouterKind::kSigmoidBiasScaled) {
    for (std::uint32_t e = 0; e < n; ++e) {
      scores[e] = 1.f / (1.f + std::exp(-logits[e]));
      keys[e] = scores[e] + (bias.empty() ? 0.f : bias[e]);
    }
  } else {
    // A softmax router's bias is part of its linear layer (gpt-oss): it shifts the logits.
    float* z = keys;  // the biased logits, overwritten by the keys below
    for (std::uint32_t e = 0; e < n; ++e) z[e] = bias.empty() ? logits[e] : logits[e] + bias[e];
    float mx = z[0];
    for (std::uint32_t e = 1; e < n; ++e) mx = std::max(mx, z[e]);
    double sum = 0;
    for (std::uint32_t e = 0; e < n; ++e) sum += std::exp(static_cast<double>(z[e] - mx));
    for (std::uint32_t e = 0; e < n; ++e) {
      scores[e] = static_cast<float>(std::exp(static_cast<double>(z[e] - mx)) / sum);
      keys[e] = scores[e];
    }
  }

  // Group-limited selection.
  bool group_kept[kMaxExperts] = {};
  const std::uint32_t per_group = n / cfg.n_group;
  if (cfg.n_group > 1) {
    float group_score[kMaxExperts];
    for (std::uint32_t g = 0; g < cfg.n_group; ++g) {
      std::uint32_t best[2] = {0, 0};
      const std::span<const float> gk(keys + g * per_group, per_group);
      const std::uint32_t take = cfg.kind == RouterKind::kSigmoidBiasScaled ? std::min(2u, per_group) : 1u;
      top_k_indices(
          gk, take, [](std::uint32_t) { return true; }, best);
      group_score[g] = 0.f;
      for (std::uint32_t j = 0; j < take; ++j) group_score[g] += gk[best[j]];
    }
    std::uint32_t kept[kMaxExperts];
    top_k_indices(
        std::span<const float>(group_score, cfg.n_group), cfg.topk_group, [](std::uint32_t) { return true; }, kept);
    for (std::uint32_t j = 0; j < cfg.topk_group; ++j) group_kept[kept[j]] = true;
    // The experts of the other groups keep a key of 0, as the reference models mask them
    // (masked_fill(~mask, 0.0)): with a negative selection bias a kept expert can rank below them.
    for (std::uint32_t e = 0; e < n; ++e)
      if (!group_kept[e / per_group]) keys[e] = 0.f;
  }
  top_k_indices(
      std::span<const float>(keys, n), cfg.top_k, [](std::uint32_t) { return true; }, out.experts);
  out.k = cfg.top_k;

  double wsum = 0;
  for (std::uint32_t j = 0; j < cfg.top_k; ++j) wsum += scores[out.experts[j]];
  const bool renorm =
      cfg.kind == RouterKind::kSoftmaxTopKRenorm || (cfg.kind == RouterKind::kSigmoidBiasScaled && cfg.norm_topk_prob);
  for (std::uint32_t j = 0; j < cfg.top_k; ++j) {
    double w = scores[out.experts[j]];
    if (renorm) w = wsum > 0 ? w / wsum : 1.0 / cfg.top_k;
    if (cfg.kind != RouterKind::kSoftmaxTopKRenorm) w *= cfg.routed_scaling;
    out.weights[j] = static_cast<float>(w);
  }
  for (std::uint32_t j = cfg.top_k; j < kMaxTopK; ++j) {
    out.experts[j] = 0;
    out.weights[j] = 0.f;
  }
  return Status::ok();
}

void router_logits(const float* w, std::size_t n_experts, std::size_t hidden, const float* x, std::size_t n_tokens,
                   float* logits) noexcept {
  for (std::size_t t = 0; t < n_tokens; ++t)
    for (std::size_t e = 0; e < n_experts; ++e) {
      double acc = 0;
      const float* we = w + e * hidden;
      const float* xt = x + t * hidden;
      for (std::size_t c = 0; c < hidden; ++c) acc += static_cast<double>(we[c]) * xt[c];
      logits[t * n_experts + e] = static_cast<float>(acc);
    }
}

MOEX_NAMESPACE_END
