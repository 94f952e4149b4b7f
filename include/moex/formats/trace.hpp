#pragma once
/// @file trace.hpp
/// Routing traces: per token, per layer, the selected experts and their gate weights, optionally
/// every router logit, with sequence boundaries. Readers for the real traces in ../shared and a
/// compact binary form plus a JSON Lines form of moex's own.
///
/// Binary form (little-endian), version 1:
///   char[8] magic "MOEXTRC\0" | u32 version = 1 | u32 flags (bit 0: logits present)
///   u32 n_layers | u32 n_experts | u32 top_k | u32 n_sequences | u64 n_tokens
///   u32 seq_start[n_sequences]                       (ascending, seq_start[0] = 0)
///   u32 experts[n_tokens][n_layers][top_k]           (kNoExpert pads unused positions)
///   f32 weights[n_tokens][n_layers][top_k]
///   f32 logits [n_tokens][n_layers][n_experts]       (only with flag bit 0)
/// The reader checks every size against the file length before allocating.
///
/// JSON Lines form: a header line
///   {"moex_trace":1,"n_layers":L,"n_experts":E,"top_k":K}
/// then one line per token, in order:
///   {"seq":s,"experts":[[...] x L],"weights":[[...] x L],"logits":[[...] x L]}   (logits optional)
/// where a token whose "seq" differs from the previous line's starts a new sequence.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "moex/route/router.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Pads the expert list of a (token, layer) that selected fewer than top_k experts.
inline constexpr std::uint32_t kNoExpert = 0xFFFFFFFFu;

/// A routing trace. Invariants (validate() checks them; every reader returns valid traces):
/// experts.size() == weights.size() == tokens * n_layers * top_k; logits empty or
/// tokens * n_layers * n_experts; seq_start ascending, starting at 0, all < tokens (or empty when
/// tokens == 0); every expert id < n_experts or kNoExpert, valid ids before padding.
struct RoutingTrace {
  std::uint32_t n_layers = 0;
  std::uint32_t n_experts = 0;
  std::uint32_t top_k = 0;
  std::vector<std::uint32_t> seq_start;   ///< first token of each sequence
  std::vector<std::uint32_t> expert_ids;  ///< [tokens][n_layers][top_k]
  std::vector<float> gate_weights;        ///< [tokens][n_layers][top_k]
  std::vector<float> router_logits;       ///< empty or [tokens][n_layers][n_experts]
  std::string source;                     ///< where it came from (free text)

  /// Number of tokens.
  std::size_t tokens() const noexcept {
    const std::size_t per = static_cast<std::size_t>(n_layers) * top_k;
    return per ? expert_ids.size() / per : 0;
  }
  /// Number of sequences.
  std::size_t sequences() const noexcept { return seq_start.size(); }
  /// The experts selected by `token` at `layer`, padding removed (so possibly fewer than top_k).
  /// Precondition: token < tokens(), layer < n_layers.
  std::span<const std::uint32_t> experts(std::size_t token, std::uint32_t layer) const noexcept {
    const std::size_t off = (token * n_layers + layer) * top_k;
    std::size_t n = 0;
    while (n < top_k && expert_ids[off + n] != kNoExpert) ++n;
    return {expert_ids.data() + off, n};
  }
  /// The gate weights matching experts(token, layer).
  std::span<const float> weights(std::size_t token, std::uint32_t layer) const noexcept {
    const std::size_t off = (token * n_layers + layer) * top_k;
    return {gate_weights.data() + off, experts(token, layer).size()};
  }
  /// True when router logits are present.
  bool has_logits() const noexcept { return !router_logits.empty(); }
  /// All n_experts router logits of `token` at `layer` (empty span without logits).
  std::span<const float> logits(std::size_t token, std::uint32_t layer) const noexcept {
    if (router_logits.empty()) return {};
    return {router_logits.data() + (token * n_layers + layer) * n_experts, n_experts};
  }
  /// The canonical step number of (token, layer) for driving caches and Belady:
  /// token * n_layers + layer (layers of one token run in order, tokens in order).
  std::uint64_t step(std::size_t token, std::uint32_t layer) const noexcept {
    return static_cast<std::uint64_t>(token) * n_layers + layer;
  }
  /// Index of the sequence containing `token`.
  std::size_t sequence_of(std::size_t token) const noexcept;

  /// Checks the invariants above; kCorrupt names the first one broken.
  Status validate() const;
};

/// Options of the readers that need them.
struct TraceLoadOptions {
  /// NumPy logits: experts per token; 0 reads num_experts_per_tok from config.json beside the file.
  std::uint32_t top_k = 0;
  /// NumPy logits: tokens per sequence (the shared models' traces use 512).
  std::uint32_t sequence_length = 512;
  /// NumPy logits: keep all router logits in the trace (else only experts and weights).
  bool keep_logits = true;
};

/// Routing from logits: softmax over all experts, top-k (ties to the lower id), renormalized over
/// the k (Mixtral). Writes k ids and k weights. k <= logits.size().
void route_softmax_topk(std::span<const float> logits, std::uint32_t k, std::uint32_t* ids, float* weights) noexcept;

/// Reads moex's binary form.
Result<RoutingTrace> read_trace_binary(const std::filesystem::path& path);
/// Writes moex's binary form (validates first).
Status write_trace_binary(const RoutingTrace& trace, const std::filesystem::path& path);
/// Reads moex's JSON Lines form.
Result<RoutingTrace> read_trace_jsonl(const std::filesystem::path& path);
/// Writes moex's JSON Lines form (validates first).
Status write_trace_jsonl(const RoutingTrace& trace, const std::filesystem::path& path);
/// Reads a NumPy .npy float16 [tokens, layers, experts] router-logit file (the shared models'
/// router_logits_code.npy) and routes it with route_softmax_topk.
Result<RoutingTrace> read_npy_router_logits(const std::filesystem::path& path, const TraceLoadOptions& options = {});
/// Reads the Mixtral-8x7B routing JSON Lines of speculative-moe (one line per token and layer:
/// problem_id, token_idx, layer, experts, gating_probs). Each problem is a sequence; a
/// (token, layer) missing from the file gets no experts.
Result<RoutingTrace> read_mixtral_routing_jsonl(const std::filesystem::path& path);
/// Reads the FLAME-MoE CSV (seq,pos,token_id,layer,expert0..5,prob0..5); layers are renumbered
/// from 0 in ascending order (2..9 -> 0..7); n_experts is max(64, largest id + 1); weights are the
/// file's probabilities (softmax over all experts, not renormalized).
Result<RoutingTrace> read_flame_csv(const std::filesystem::path& path);
/// Detects the format from the content (binary magic, NumPy magic, moex JSONL header, Mixtral
/// JSONL fields, FLAME CSV header) and reads it.
Result<RoutingTrace> load_trace(const std::filesystem::path& path, const TraceLoadOptions& options = {});

/// Access counts per expert, [n_layers * n_experts] (a profile for StaticHotSetEviction).
std::vector<double> expert_access_counts(const RoutingTrace& trace, std::size_t begin = 0, std::size_t end = SIZE_MAX);

/// The routing of token `t` at layer `l` as the executor takes it (at most kMaxTopK experts);
/// false when the trace has no expert there (a missing cell).
inline bool routing_at(const RoutingTrace& trace, std::size_t t, std::uint32_t l, TokenRouting& out) noexcept {
  const auto ids = trace.experts(t, l);
  if (ids.empty()) return false;
  const auto w = trace.weights(t, l);
  out.k = static_cast<std::uint32_t>(std::min<std::size_t>(ids.size(), kMaxTopK));
  for (std::uint32_t j = 0; j < out.k; ++j) {
    out.experts[j] = ids[j];
    out.weights[j] = w[j];
  }
  return true;
}

MOEX_NAMESPACE_END
