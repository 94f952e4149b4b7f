#pragma once
/// @file router_config.hpp
/// How a model's router turns expert logits into a selection (plain config, no code).

#include <cstdint>
#include <string_view>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// The routing rules real models use. Values are pinned (the C API exposes them).
enum class RouterKind : std::uint8_t {
  /// softmax over all experts, top-k, weights renormalized to sum to 1 (Mixtral; Qwen3-MoE and
  /// OLMoE with norm_topk_prob; gpt-oss applies softmax over the top-k logits, which is the same).
  kSoftmaxTopKRenorm = 0,
  /// softmax over all experts, top-k, weights kept as they are, times routed_scaling
  /// (Qwen1.5/Qwen2-MoE without norm_topk_prob, DeepSeek-V2).
  kSoftmaxTopK = 1,
  /// sigmoid scores; experts selected by score + selection bias; weights are the scores of the
  /// selected experts, normalized, times routed_scaling (DeepSeek-V3).
  kSigmoidBiasScaled = 2,
};

/// Short name: "softmax_topk_renorm", "softmax_topk", "sigmoid_bias_scaled".
constexpr std::string_view to_string(RouterKind k) noexcept {
  switch (k) {
    case RouterKind::kSoftmaxTopKRenorm:
      return "softmax_topk_renorm";
    case RouterKind::kSoftmaxTopK:
      return "softmax_topk";
    case RouterKind::kSigmoidBiasScaled:
      return "sigmoid_bias_scaled";
  }
  return "?";
}

/// A router's configuration.
struct RouterConfig {
  RouterKind kind = RouterKind::kSoftmaxTopKRenorm;
  std::uint32_t n_experts = 0;
  std::uint32_t top_k = 0;  ///< 1..kMaxTopK, <= n_experts
  /// Multiplies the final weights (DeepSeek's routed_scaling_factor); 1 elsewhere.
  float routed_scaling = 1.f;
  /// Group-limited routing (DeepSeek): experts form n_group equal groups; only the topk_group best
  /// groups compete. A group scores its best expert (softmax kinds) or the sum of its best two
  /// (sigmoid kind). n_group = 1 disables it.
  std::uint32_t n_group = 1;
  std::uint32_t topk_group = 1;
  /// For kSigmoidBiasScaled: normalize the selected scores to sum to 1 before scaling (V3: true).
  bool norm_topk_prob = true;
};

MOEX_NAMESPACE_END
