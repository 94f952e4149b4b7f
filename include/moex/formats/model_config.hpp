#pragma once
/// @file model_config.hpp
/// ModelConfig: the shape and routing rule of an MoE model, read from Hugging Face config.json or
/// GGUF metadata. See docs/formats.md for how each architecture's keys map onto it.

#include <cstdint>
#include <string>
#include <string_view>

#include "moex/route/router_config.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// The MoE architectures moex reads (by config.json `model_type` and GGUF `general.architecture`).
enum class Architecture : std::uint8_t {
  kMixtral = 0,     ///< mixtral (GGUF: "llama" with expert_count > 0)
  kQwen2Moe = 1,    ///< qwen2_moe (GGUF: qwen2moe)
  kQwen3Moe = 2,    ///< qwen3_moe (GGUF: qwen3moe)
  kDeepseekV2 = 3,  ///< deepseek_v2 (GGUF: deepseek2)
  kDeepseekV3 = 4,  ///< deepseek_v3 (GGUF: deepseek2 with sigmoid gating)
  kOlmoe = 5,       ///< olmoe (GGUF: olmoe)
  kGptOss = 6,      ///< gpt_oss (GGUF: gpt-oss)
};

/// The config.json `model_type` spelling: "mixtral", "qwen2_moe", ..., "gpt_oss".
std::string_view to_string(Architecture a) noexcept;

/// Everything moex needs to know about a model's shape and routing.
struct ModelConfig {
  Architecture arch = Architecture::kMixtral;
  std::string architecture;  ///< to_string(arch)
  std::uint32_t n_layers = 0;
  std::uint32_t n_experts = 0;
  std::uint32_t top_k = 0;
  std::uint32_t hidden = 0;
  std::uint32_t expert_ffn = 0;        ///< intermediate size of one routed expert
  std::uint32_t dense_ffn = 0;         ///< intermediate size of dense (non-MoE) layers' MLP
  std::uint32_t n_shared_experts = 0;  ///< 0: none
  std::uint32_t shared_ffn = 0;        ///< intermediate size of the (merged) shared expert
  std::uint32_t first_moe_layer = 0;   ///< leading dense layers (DeepSeek first_k_dense_replace)
  std::uint32_t moe_layer_step = 1;    ///< every step-th layer from first_moe_layer is MoE
  RouterKind router = RouterKind::kSoftmaxTopKRenorm;
  float routed_scaling = 1.f;
  std::uint32_t n_group = 1;
  std::uint32_t topk_group = 1;
  bool norm_topk_prob = true;
  /// gpt-oss's clamp of its SwiGLU (config.json `swiglu_limit`; llama.cpp fixes it at 7).
  float swiglu_limit = 7.f;
  // attention etc. (for the mini engine)
  std::uint32_t n_heads = 0;
  std::uint32_t n_kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t vocab = 0;
  float rope_theta = 10000.f;
  float rms_eps = 1e-6f;
  std::uint32_t max_pos = 0;
  bool tie_embeddings = false;
  /// fp8 block size from quantization_config.weight_block_size (DeepSeek-V3: 128); 0 if none.
  std::uint32_t fp8_block = 0;

  /// True when layer `l` has routed experts.
  bool is_moe_layer(std::uint32_t l) const noexcept {
    return l < n_layers && l >= first_moe_layer && moe_layer_step != 0 && (l - first_moe_layer) % moe_layer_step == 0;
  }
  /// The router configuration of this model.
  RouterConfig router_config() const noexcept {
    RouterConfig r;
    r.kind = router;
    r.n_experts = n_experts;
    r.top_k = top_k;
    r.routed_scaling = routed_scaling;
    r.n_group = n_group;
    r.topk_group = topk_group;
    r.norm_topk_prob = norm_topk_prob;
    return r;
  }
};

/// Parses a Hugging Face config.json text. `source` names the file in error messages. An unknown
/// `model_type` or a missing key is an error naming the key; values are range-checked.
Result<ModelConfig> parse_model_config(std::string_view json_text, std::string_view source = "config.json");

/// Checks the internal consistency of a config (non-zero sizes, top_k <= n_experts, groups...).
Status validate_model_config(const ModelConfig& c, std::string_view source);

MOEX_NAMESPACE_END
