#pragma once
// A float64 reference of one MoE block of every architecture moex opens, written from the
// published model definitions (Hugging Face's modeling_mixtral, modeling_qwen2_moe,
// modeling_qwen3_moe, modeling_deepseek (V2, V3), modeling_olmoe, modeling_gpt_oss) and read
// straight from a Checkpoint's tensors, apart from the store, the router and the executor:
//
//   Mixtral      p = softmax(z); top-k of p; w = p / sum(p over the top-k)
//   Qwen2-MoE    p = softmax(z); top-k; w = p (renormalized when norm_topk_prob)
//                + sigmoid(shared_expert_gate . x) * shared_expert(x)
//   Qwen3-MoE    as Qwen2-MoE without a shared expert (norm_topk_prob usually true)
//   OLMoE        as Qwen3-MoE (norm_topk_prob usually false)
//   DeepSeek-V2  p = softmax(z); group_limited_greedy: group score = max p in the group, keep the
//                topk_group best groups, p of the others masked to 0; top-k; w = p / sum(p) when
//                top_k > 1 and norm_topk_prob, else w = p * routed_scaling_factor
//                + shared_experts(x) (merged)
//   DeepSeek-V3  s = sigmoid(z); c = s + e_score_correction_bias; group score = sum of the best
//                two c of the group; keep topk_group groups, c of the others masked to 0; top-k of
//                c; w = s of those / sum (when norm_topk_prob), times routed_scaling_factor
//                + shared_experts(x)
//   gpt-oss      z = W x + b; top-k of z; w = softmax over the k logits; each expert
//                g = W1 x + b1, u = W3 x + b3, g = min(g, limit), u = clamp(u, -limit, limit),
//                y = W2 (g * sigmoid(1.702 g) * (u + 1)) + b2
// Every other expert: y = W2 (silu(W1 x) * (W3 x)). Ties in top-k go to the lower expert id.
// Header-only (see checkpoint_writer.hpp for why).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

#include <doctest/doctest.h>

#include "moex/formats/checkpoint.hpp"

namespace moex::test {

/// A tensor of a checkpoint decoded to double, row-major by its logical shape.
inline std::vector<double> ref_tensor(const TensorRef& t) {
  std::vector<float> f(t.numel());
  REQUIRE(tensor_to_f32(t, f).is_ok());
  return {f.begin(), f.end()};
}
inline std::vector<double> ref_tensor(const std::optional<TensorRef>& t, std::size_t n) {
  return t ? ref_tensor(*t) : std::vector<double>(n, 0.0);
}

/// y = W x for W [rows x cols].
inline std::vector<double> ref_matvec(const std::vector<double>& w, std::size_t rows, std::size_t cols,
                                      const double* x) {
  std::vector<double> y(rows, 0.0);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) y[r] += w[r * cols + c] * x[c];
  return y;
}

/// The experts one token uses and their weights, as the reference model computes them.
struct RefRouting {
  std::vector<std::uint32_t> experts;
  std::vector<double> weights;
};

/// Indices of the k largest of v (value descending, lower index first on ties).
inline std::vector<std::uint32_t> ref_top_k(const std::vector<double>& v, std::uint32_t k) {
  std::vector<std::uint32_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0u);
  std::stable_sort(idx.begin(), idx.end(), [&](std::uint32_t a, std::uint32_t b) { return v[a] > v[b]; });
  idx.resize(k);
  return idx;
}

/// Keeps the topk_group best groups of `key` (a group scores the sum of its best `take` keys) and
/// masks the keys of the others to 0, as the DeepSeek models do.
inline void ref_group_mask(const ModelConfig& c, std::vector<double>& key, std::uint32_t take) {
  if (c.n_group <= 1) return;
  const std::uint32_t per = c.n_experts / c.n_group;
  std::vector<double> gs(c.n_group, 0.0);
  for (std::uint32_t g = 0; g < c.n_group; ++g) {
    std::vector<double> part(key.begin() + g * per, key.begin() + (g + 1) * per);
    for (std::uint32_t i : ref_top_k(part, std::min(take, per))) gs[g] += part[i];
  }
  std::vector<bool> kept(c.n_group, false);
  for (std::uint32_t g : ref_top_k(gs, c.topk_group)) kept[g] = true;
  for (std::uint32_t e = 0; e < c.n_experts; ++e)
    if (!kept[e / per]) key[e] = 0.0;
}

/// Routes one token from its router logits z (and the router's bias, empty when none).
inline RefRouting ref_route(const ModelConfig& c, std::vector<double> z, const std::vector<double>& bias) {
  RefRouting r;
  auto softmax = [](const std::vector<double>& v) {
    const double mx = *std::max_element(v.begin(), v.end());
    std::vector<double> p(v.size());
    double s = 0;
    for (std::size_t i = 0; i < v.size(); ++i) s += p[i] = std::exp(v[i] - mx);
    for (double& x : p) x /= s;
    return p;
  };
  auto normalize = [](std::vector<double>& w) {
    const double s = std::accumulate(w.begin(), w.end(), 0.0) + 1e-20;
    for (double& x : w) x /= s;
  };
  switch (c.arch) {
    case Architecture::kGptOss: {
      for (std::size_t e = 0; e < z.size() && !bias.empty(); ++e) z[e] += bias[e];
      r.experts = ref_top_k(z, c.top_k);
      std::vector<double> sel;
      for (auto e : r.experts) sel.push_back(z[e]);
      r.weights = softmax(sel);
      return r;
    }
    case Architecture::kDeepseekV3: {
      std::vector<double> s(z.size()), key(z.size());
      for (std::size_t e = 0; e < z.size(); ++e) {
        s[e] = 1.0 / (1.0 + std::exp(-z[e]));
        key[e] = s[e] + (bias.empty() ? 0.0 : bias[e]);
      }
      ref_group_mask(c, key, 2);
      r.experts = ref_top_k(key, c.top_k);
      for (auto e : r.experts) r.weights.push_back(s[e]);
      if (c.norm_topk_prob) normalize(r.weights);
      for (double& w : r.weights) w *= c.routed_scaling;
      return r;
    }
    case Architecture::kDeepseekV2: {
      std::vector<double> p = softmax(z), key = p;
      ref_group_mask(c, key, 1);
      r.experts = ref_top_k(key, c.top_k);
      for (auto e : r.experts) r.weights.push_back(key[e]);
      if (c.top_k > 1 && c.norm_topk_prob) {
        normalize(r.weights);
      } else {
        for (double& w : r.weights) w *= c.routed_scaling;
      }
      return r;
    }
    default: {  // Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE
      const std::vector<double> p = softmax(z);
      r.experts = ref_top_k(p, c.top_k);
      for (auto e : r.experts) r.weights.push_back(p[e]);
      if (c.arch == Architecture::kMixtral || c.norm_topk_prob) normalize(r.weights);
      return r;
    }
  }
}

/// One expert (or shared expert) of the checkpoint in double, with its biases.
struct RefExpert {
  std::vector<double> w1, w3, w2, b1, b3, b2;
  std::size_t ffn = 0, hidden = 0;

  RefExpert(const ExpertTensors& t, std::size_t hidden_size, std::size_t ffn_size)
      : w1(ref_tensor(t.w1)),
        w3(ref_tensor(t.w3)),
        w2(ref_tensor(t.w2)),
        b1(ref_tensor(t.b1, ffn_size)),
        b3(ref_tensor(t.b3, ffn_size)),
        b2(ref_tensor(t.b2, hidden_size)),
        ffn(ffn_size),
        hidden(hidden_size) {}

  std::vector<double> operator()(const ModelConfig& c, const double* x) const {
    std::vector<double> g = ref_matvec(w1, ffn, hidden, x), u = ref_matvec(w3, ffn, hidden, x);
    for (std::size_t r = 0; r < ffn; ++r) {
      double gr = g[r] + b1[r], ur = u[r] + b3[r];
      if (c.arch == Architecture::kGptOss) {
        const double lim = c.swiglu_limit;
        gr = std::min(gr, lim);
        ur = std::clamp(ur, -lim, lim);
        g[r] = gr / (1.0 + std::exp(-1.702 * gr)) * (ur + 1.0);
      } else {
        g[r] = gr / (1.0 + std::exp(-gr)) * ur;
      }
    }
    std::vector<double> y = ref_matvec(w2, hidden, ffn, g.data());
    for (std::size_t i = 0; i < hidden; ++i) y[i] += b2[i];
    return y;
  }
};

/// The MoE block of checkpoint layer `layer` (an MoE layer) on n tokens x [n x hidden]: the
/// routing of each token and the block's output [n x hidden] (routed plus shared).
struct RefBlock {
  std::vector<RefRouting> routing;
  std::vector<double> out;
};

inline RefBlock ref_moe_block(const Checkpoint& ck, std::uint32_t layer, const std::vector<float>& x, std::size_t n) {
  const ModelConfig& c = ck.config();
  const std::size_t h = c.hidden;
  auto router = ck.router(layer);
  REQUIRE(router.is_ok());
  const std::vector<double> wr = ref_tensor(*router);
  std::vector<double> bias;
  if (auto b = ck.router_bias(layer); b.is_ok()) bias = ref_tensor(*b);
  std::vector<std::optional<RefExpert>> experts(c.n_experts);
  std::optional<RefExpert> shared;
  if (c.n_shared_experts) {
    auto s = ck.shared_expert(layer);
    REQUIRE(s.is_ok());
    shared.emplace(*s, h, c.shared_ffn);
  }
  std::vector<double> sgate;
  if (auto g = ck.shared_expert_gate(layer); g.is_ok()) sgate = ref_tensor(*g);
  RefBlock blk;
  blk.out.assign(n * h, 0.0);
  for (std::size_t t = 0; t < n; ++t) {
    const std::vector<double> xt(x.begin() + static_cast<std::ptrdiff_t>(t * h),
                                 x.begin() + static_cast<std::ptrdiff_t>((t + 1) * h));
    RefRouting r = ref_route(c, ref_matvec(wr, c.n_experts, h, xt.data()), bias);
    double* o = &blk.out[t * h];
    for (std::size_t j = 0; j < r.experts.size(); ++j) {
      auto& ex = experts[r.experts[j]];
      if (!ex) {
        auto tensors = ck.expert(layer, r.experts[j]);
        REQUIRE(tensors.is_ok());
        ex.emplace(*tensors, h, c.expert_ffn);
      }
      const std::vector<double> y = (*ex)(c, xt.data());
      for (std::size_t i = 0; i < h; ++i) o[i] += r.weights[j] * y[i];
    }
    if (shared) {
      double scale = 1.0;
      if (!sgate.empty()) {
        double zg = 0;
        for (std::size_t i = 0; i < h; ++i) zg += sgate[i] * xt[i];
        scale = 1.0 / (1.0 + std::exp(-zg));
      }
      const std::vector<double> y = (*shared)(c, xt.data());
      for (std::size_t i = 0; i < h; ++i) o[i] += scale * y[i];
    }
    blk.routing.push_back(std::move(r));
  }
  return blk;
}

}  // namespace moex::test
