#pragma once
/// @file router.hpp
/// Top-k routing over expert logits, in every variant of RouterConfig, and router logits.

#include <cstddef>
#include <cstdint>
#include <span>

#include "moex/route/router_config.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// The experts one token uses at one layer, best first (ties: lower expert id first).
struct TokenRouting {
  std::uint32_t k = 0;
  std::uint32_t experts[kMaxTopK] = {};
  float weights[kMaxTopK] = {};
};

/// Checks a RouterConfig: kInvalidArgument naming the bad field.
Status validate(const RouterConfig& cfg) noexcept;

/// Routes one token. `logits` has cfg.n_experts entries; `bias` is empty or has n_experts entries:
/// for kSigmoidBiasScaled a selection bias (DeepSeek-V3's e_score_correction_bias: it ranks the
/// experts, the weights come from the unbiased scores); for the softmax kinds the router's own
/// bias, added to the logits before the softmax (gpt-oss). Group-limited routing follows the
/// reference models: the experts of groups not kept get a selection key of 0 (not minus
/// infinity). Non-finite logits are kInvalidArgument. Deterministic; O(n_experts * top_k).
Status route_token(const RouterConfig& cfg, std::span<const float> logits, std::span<const float> bias,
                   TokenRouting& out) noexcept;

/// logits[t * n_experts + e] = sum_c w[e * hidden + c] * x[t * hidden + c], accumulated in double
/// per output (the router is tiny; exactness here keeps routing identical across backends).
void router_logits(const float* w, std::size_t n_experts, std::size_t hidden, const float* x, std::size_t n_tokens,
                   float* logits) noexcept;

MOEX_NAMESPACE_END
