#pragma once
/// @file quality.hpp
/// Quality of approximate policies on a real checkpoint: the relative error of each MoE layer's
/// output against the exact path, measured with the real executor on the CPU backend, for the
/// quality column of moex-sim's technique rows (docs/simulator.md, "Quality").
///
/// Inputs: real text bytes embedded by the checkpoint's own embedding table. The model's
/// attention is not run (moex runs MoE layers only): the residual stream of each token goes
/// x <- x + MoE_l(RMSNorm_l(x)) through the MoE layers, RMSNorm_l with the layer's
/// post-attention norm weights, driven by the exact executor. The approximate executor computes
/// each layer on the very same normalized input, so each layer's error is its own (not
/// accumulated from earlier layers).

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "moex/status.hpp"
#include "moex/store/open_expert_store.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// The approximate policy of a quality run (the exact shadow always loads at full precision).
struct QualityPolicy {
  double budget_fraction = 0.25;           ///< fast tier as a fraction of all expert bytes
  std::string eviction = "lru";            ///< lru, lfu, lrfu or hobbit
  std::vector<std::uint32_t> layer_slots;  ///< per-layer budgets in experts; empty = one pool
  /// AdapMoE's gate: on when gate_threshold > 0.
  std::vector<float> sensitivities;
  float gate_threshold = 0.f;
  /// HOBBIT on a miss: low-precision copies in a second pool and skipping.
  bool low_precision_on_miss = false;
  Precision low_precision = Precision::kInt4;
  double low_precision_share = 0.25;
  float t_high = 0.6f, t_skip = 0.9f;
};

/// What a quality run measured.
struct QualityResult {
  double rel_error = 0;                 ///< sqrt(sum ||d||^2 / sum ||y||^2) over all layers and tokens
  std::vector<double> layer_rel_error;  ///< the same per layer
  double avg_k = 0;                     ///< experts computed per (token, layer)
  std::uint64_t misses = 0, low_precision_loads = 0, skipped = 0;
  std::size_t tokens = 0;
};

/// Bytes of real text: the `.py` files directly in `dir`, sorted by name, concatenated, cut at
/// `max_bytes`. kNotFound when the folder holds none.
Result<std::vector<std::uint8_t>> read_text_corpus(const std::filesystem::path& dir, std::size_t max_bytes);

/// Rows of the checkpoint's embedding table (model.embed_tokens.weight) for each byte: [n x hidden].
Result<std::vector<float>> embed_bytes(const OpenedModel& model, std::span<const std::uint8_t> bytes);

/// Per-layer sensitivity of the model on `inputs` (embeddings, [n x hidden]): the gradient-free
/// estimate of SensitivityGate::estimate_sensitivity with y_reduced keeping each token's top expert.
Result<std::vector<float>> estimate_model_sensitivities(const OpenedModel& model, std::span<const float> inputs);

/// Runs `inputs` (embeddings, [n x hidden]) token by token through the MoE layers twice — the exact
/// executor and one with `policy` — and compares their layer outputs. Builds the low-precision
/// copy in the store when the policy needs it and the store lacks it.
Result<QualityResult> measure_moe_quality(OpenedModel& model, std::span<const float> inputs,
                                          const QualityPolicy& policy);

MOEX_NAMESPACE_END
