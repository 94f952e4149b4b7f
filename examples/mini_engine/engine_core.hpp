#pragma once
/// @file engine_core.hpp
/// The dense half of the mini engine: everything of a Mixtral- or Qwen3-MoE-architecture decoder
/// except the MoE blocks (token embedding, RMSNorm, rotary attention with a KV cache, final norm,
/// lm_head). The MoE block of each layer is a callback, so the same core runs over moex's C++
/// API (engine.hpp) and over its C API (moex_engine_capi.cpp). It depends on no part of moex.
///
/// Errors are values: functions return an error message, empty on success.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

namespace moex_engine {

/// The shape of a Mixtral- or Qwen3-MoE-architecture model, from its config.json.
struct ModelShape {
  /// Qwen3-MoE: RMSNorm over each head of q and k (self_attn.{q,k}_norm.weight, [head_dim])
  /// before the rotary embedding; otherwise the attention is Mixtral's.
  bool qk_norm = false;
  std::uint32_t n_layers = 0;
  std::uint32_t hidden = 0;
  std::uint32_t n_heads = 0;
  std::uint32_t n_kv_heads = 0;
  std::uint32_t head_dim = 0;
  std::uint32_t vocab = 0;
  std::uint32_t max_pos = 0;
  std::uint32_t n_experts = 0;
  std::uint32_t top_k = 0;
  std::uint32_t expert_ffn = 0;
  float rope_theta = 10000.f;
  float rms_eps = 1e-6f;
  bool tie_embeddings = false;
};

/// Parses a Hugging Face Mixtral or Qwen3-MoE config.json text into `out` (Qwen3-MoE: every
/// layer an MoE layer, no attention bias); returns an error message or "".
std::string parse_config(const std::string& json_text, ModelShape& out);
/// Reads `<dir>/config.json`; returns an error message or "".
std::string read_config(const std::string& dir, ModelShape& out);

/// Loads the tensor `name` as f32 (row-major, innermost dimension last) into `out`, which it
/// resizes; it must hold exactly `numel` elements. Returns an error message or "".
using TensorLoader = std::function<std::string(const std::string& name, std::size_t numel, std::vector<float>& out)>;

/// The MoE block of `layer` for n tokens: out[n x hidden] = MoE(x) (no residual; x is the
/// post-attention-normed hidden state). Returns an error message or "".
using MoeFn = std::function<std::string(std::uint32_t layer, const float* x, std::size_t n, float* out)>;

/// The dense weights and the KV cache of one sequence.
///
/// Not thread-safe; one Transformer per sequence being decoded.
class Transformer {
 public:
  /// Loads every non-expert tensor by its Hugging Face name (Mixtral's; Qwen3-MoE adds the q/k
  /// norms). Returns an error or "".
  std::string load(const ModelShape& shape, const TensorLoader& loader);

  const ModelShape& shape() const noexcept { return shape_; }
  /// Forgets the KV cache: the next token is at position 0.
  void reset() noexcept { pos_ = 0; }
  /// The position the next token will take.
  std::size_t position() const noexcept { return pos_; }

  /// Runs `tokens` at positions position() ... position()+n-1, appending to the KV cache, and
  /// writes logits[n x vocab] (null: skip the lm_head). Fails when the cache would overflow
  /// max_pos or a token is outside the vocabulary.
  std::string forward(std::span<const std::uint32_t> tokens, const MoeFn& moe, float* logits);

 private:
  ModelShape shape_{};
  std::size_t pos_ = 0;
  std::vector<float> embed_, final_norm_, lm_head_;
  struct Layer {
    std::vector<float> in_norm, post_norm, wq, wk, wv, wo, q_norm, k_norm;
    std::vector<float> k_cache, v_cache;  // [max_pos x n_kv_heads*head_dim]
  };
  std::vector<Layer> layers_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_pos x head_dim/2]
  // Scratch.
  std::vector<float> x_, xn_, q_, k_, v_, att_, o_, y_, scores_;
};

/// Bits per byte of a sequence from its logits: the mean over i of -log2 softmax(logits_i)[t_{i+1}],
/// as a sum (bits) and a count (predictions), accumulated in double.
void accumulate_bits(const float* logits, std::size_t vocab, std::span<const std::uint32_t> tokens, double& bits,
                     std::size_t& count);

/// The bytes of the Python standard library's .py files directly in `dir` (Debian 12:
/// /usr/lib/python3.11), sorted by file name and concatenated; empty when none are found.
std::vector<std::uint8_t> read_stdlib_text(const std::string& dir);
/// Splits text into consecutive non-overlapping windows of `window` bytes (the last partial one
/// dropped) and returns windows [first, first+count).
std::vector<std::vector<std::uint32_t>> make_windows(const std::vector<std::uint8_t>& text, std::size_t window,
                                                     std::size_t first, std::size_t count);

/// Picks the next token: greedy when temperature <= 0, else sampled from softmax(logits / T)
/// with the generator state `rng` (xorshift64*; never 0).
std::uint32_t sample_token(const float* logits, std::size_t vocab, float temperature, std::uint64_t& rng);

}  // namespace moex_engine
