// The dense half of the mini engine (see engine_core.hpp).
#include "engine_core.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>

#include <Eigen/Core>
#include <nlohmann/json.hpp>

namespace moex_engine {
namespace {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// y[n x out] = x[n x in] * w[out x in]^T
void matmul_t(const float* x, std::size_t n, std::size_t in, const float* w, std::size_t out, float* y) {
  Eigen::Map<const RowMat> X(x, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(in));
  Eigen::Map<const RowMat> W(w, static_cast<Eigen::Index>(out), static_cast<Eigen::Index>(in));
  Eigen::Map<RowMat> Y(y, static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(out));
  Y.noalias() = X * W.transpose();
}

// HF MixtralRMSNorm: x * rsqrt(mean(x^2) + eps) * w, in f32.
void rms_norm(const float* x, std::size_t n, std::size_t h, const float* w, float eps, float* y) {
  for (std::size_t t = 0; t < n; ++t) {
    const float* xr = x + t * h;
    float ss = 0.f;
    for (std::size_t c = 0; c < h; ++c) ss += xr[c] * xr[c];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
    for (std::size_t c = 0; c < h; ++c) y[t * h + c] = w[c] * (xr[c] * r);
  }
}

template <class T>
std::string get_u32(const nlohmann::json& j, const char* key, T& out, bool required = true) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return required ? std::string("config.json: missing key ") + key : "";
  if (!it->is_number_integer() || it->template get<std::int64_t>() <= 0 ||
      it->template get<std::int64_t>() > (std::int64_t{1} << 24))
    return std::string("config.json: ") + key + " must be a positive integer below 2^24";
  out = static_cast<T>(it->template get<std::int64_t>());
  return "";
}

}  // namespace

std::string parse_config(const std::string& json_text, ModelShape& s) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return "config.json: not a JSON object";
  const std::string type = j.value("model_type", std::string());
  if (type != "mixtral" && type != "qwen3_moe")
    return "config.json: model_type must be \"mixtral\" or \"qwen3_moe\" (the architectures this engine runs)";
  const bool qwen3 = type == "qwen3_moe";
  s.qk_norm = qwen3;
  std::string e;
  if (!(e = get_u32(j, "num_hidden_layers", s.n_layers)).empty()) return e;
  if (!(e = get_u32(j, "hidden_size", s.hidden)).empty()) return e;
  if (!(e = get_u32(j, "num_attention_heads", s.n_heads)).empty()) return e;
  s.n_kv_heads = s.n_heads;
  if (!(e = get_u32(j, "num_key_value_heads", s.n_kv_heads, false)).empty()) return e;
  s.head_dim = s.n_heads ? s.hidden / s.n_heads : 0;
  if (!(e = get_u32(j, "head_dim", s.head_dim, false)).empty()) return e;
  if (!(e = get_u32(j, "vocab_size", s.vocab)).empty()) return e;
  if (!(e = get_u32(j, "max_position_embeddings", s.max_pos)).empty()) return e;
  if (!(e = get_u32(j, qwen3 ? "num_experts" : "num_local_experts", s.n_experts)).empty()) return e;
  if (!(e = get_u32(j, "num_experts_per_tok", s.top_k)).empty()) return e;
  if (!(e = get_u32(j, qwen3 ? "moe_intermediate_size" : "intermediate_size", s.expert_ffn)).empty()) return e;
  if (qwen3) {
    std::uint32_t step = 1;
    if (!(e = get_u32(j, "decoder_sparse_step", step, false)).empty()) return e;
    const auto mlp_only = j.find("mlp_only_layers");
    if (step != 1 || (mlp_only != j.end() && mlp_only->is_array() && !mlp_only->empty()))
      return "config.json: this engine needs every layer to be an MoE layer (decoder_sparse_step 1, no "
             "mlp_only_layers)";
    if (j.value("attention_bias", false)) return "config.json: attention_bias is not supported by this engine";
  }
  s.rope_theta = static_cast<float>(j.value("rope_theta", 10000.0));
  s.rms_eps = static_cast<float>(j.value("rms_norm_eps", 1e-6));
  s.tie_embeddings = j.value("tie_word_embeddings", false);
  if (s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0)
    return "config.json: num_attention_heads must be a multiple of num_key_value_heads";
  if (s.head_dim % 2 != 0) return "config.json: head_dim must be even (rotary embedding)";
  if (s.top_k > s.n_experts) return "config.json: num_experts_per_tok exceeds num_local_experts";
  if (s.max_pos > 65536) return "config.json: max_position_embeddings above 65536 (the KV cache is allocated for it)";
  if (!(s.rope_theta > 0.f) || !(s.rms_eps > 0.f)) return "config.json: rope_theta and rms_norm_eps must be positive";
  return "";
}

std::string read_config(const std::string& dir, ModelShape& out) {
  std::ifstream f(std::filesystem::path(dir) / "config.json", std::ios::binary);
  if (!f) return "cannot open " + (std::filesystem::path(dir) / "config.json").string();
  std::ostringstream ss;
  ss << f.rdbuf();
  return parse_config(ss.str(), out);
}

std::string Transformer::load(const ModelShape& s, const TensorLoader& loader) {
  shape_ = s;
  pos_ = 0;
  const std::size_t H = s.hidden, qd = std::size_t{s.n_heads} * s.head_dim,
                    kvd = std::size_t{s.n_kv_heads} * s.head_dim;
  std::string e;
  if (!(e = loader("model.embed_tokens.weight", std::size_t{s.vocab} * H, embed_)).empty()) return e;
  if (!(e = loader("model.norm.weight", H, final_norm_)).empty()) return e;
  if (s.tie_embeddings)
    lm_head_ = embed_;
  else if (!(e = loader("lm_head.weight", std::size_t{s.vocab} * H, lm_head_)).empty())
    return e;
  layers_.assign(s.n_layers, {});
  for (std::uint32_t l = 0; l < s.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Layer& L = layers_[l];
    if (!(e = loader(p + "input_layernorm.weight", H, L.in_norm)).empty()) return e;
    if (!(e = loader(p + "post_attention_layernorm.weight", H, L.post_norm)).empty()) return e;
    if (!(e = loader(p + "self_attn.q_proj.weight", qd * H, L.wq)).empty()) return e;
    if (!(e = loader(p + "self_attn.k_proj.weight", kvd * H, L.wk)).empty()) return e;
    if (!(e = loader(p + "self_attn.v_proj.weight", kvd * H, L.wv)).empty()) return e;
    if (!(e = loader(p + "self_attn.o_proj.weight", H * qd, L.wo)).empty()) return e;
    if (s.qk_norm) {
      if (!(e = loader(p + "self_attn.q_norm.weight", s.head_dim, L.q_norm)).empty()) return e;
      if (!(e = loader(p + "self_attn.k_norm.weight", s.head_dim, L.k_norm)).empty()) return e;
    }
    L.k_cache.assign(std::size_t{s.max_pos} * kvd, 0.f);
    L.v_cache.assign(std::size_t{s.max_pos} * kvd, 0.f);
  }
  // Rotary tables (HF rotate_half convention): angle(p, i) = p * theta^(-2i/d), computed in double.
  const std::size_t half = s.head_dim / 2;
  rope_cos_.resize(std::size_t{s.max_pos} * half);
  rope_sin_.resize(std::size_t{s.max_pos} * half);
  for (std::size_t p = 0; p < s.max_pos; ++p)
    for (std::size_t i = 0; i < half; ++i) {
      const float inv = static_cast<float>(1.0 / std::pow(double{s.rope_theta}, double(2 * i) / double(s.head_dim)));
      const double a = double(p) * double(inv);  // HF: f32 inv_freq times position
      rope_cos_[p * half + i] = static_cast<float>(std::cos(a));
      rope_sin_[p * half + i] = static_cast<float>(std::sin(a));
    }
  return "";
}

std::string Transformer::forward(std::span<const std::uint32_t> tokens, const MoeFn& moe, float* logits) {
  const ModelShape& s = shape_;
  const std::size_t n = tokens.size();
  if (n == 0) return "forward: no tokens";
  if (layers_.empty()) return "forward: no model loaded";
  if (pos_ + n > s.max_pos)
    return "forward: the sequence would exceed max_position_embeddings (" + std::to_string(s.max_pos) + ")";
  for (std::uint32_t t : tokens)
    if (t >= s.vocab) return "forward: token " + std::to_string(t) + " outside the vocabulary";
  const std::size_t H = s.hidden, hd = s.head_dim, nh = s.n_heads, nkv = s.n_kv_heads;
  const std::size_t qd = nh * hd, kvd = nkv * hd, half = hd / 2, group = nh / nkv;
  x_.resize(n * H);
  xn_.resize(n * H);
  q_.resize(n * qd);
  k_.resize(n * kvd);
  v_.resize(n * kvd);
  att_.resize(n * qd);
  o_.resize(n * H);
  y_.resize(n * H);
  scores_.resize(pos_ + n);
  for (std::size_t t = 0; t < n; ++t) std::copy_n(&embed_[std::size_t{tokens[t]} * H], H, &x_[t * H]);
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  auto rope = [&](float* v, std::size_t p) {
    const float* c = &rope_cos_[p * half];
    const float* sn = &rope_sin_[p * half];
    for (std::size_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * sn[i];
      v[i + half] = b * c[i] + a * sn[i];
    }
  };
  for (std::uint32_t l = 0; l < s.n_layers; ++l) {
    Layer& L = layers_[l];
    rms_norm(x_.data(), n, H, L.in_norm.data(), s.rms_eps, xn_.data());
    matmul_t(xn_.data(), n, H, L.wq.data(), qd, q_.data());
    matmul_t(xn_.data(), n, H, L.wk.data(), kvd, k_.data());
    matmul_t(xn_.data(), n, H, L.wv.data(), kvd, v_.data());
    if (s.qk_norm) {  // Qwen3: each head of q and k normalized before the rotary embedding
      rms_norm(q_.data(), n * nh, hd, L.q_norm.data(), s.rms_eps, q_.data());
      rms_norm(k_.data(), n * nkv, hd, L.k_norm.data(), s.rms_eps, k_.data());
    }
    for (std::size_t t = 0; t < n; ++t) {
      const std::size_t p = pos_ + t;
      for (std::size_t h = 0; h < nh; ++h) rope(&q_[t * qd + h * hd], p);
      for (std::size_t h = 0; h < nkv; ++h) rope(&k_[t * kvd + h * hd], p);
      std::copy_n(&k_[t * kvd], kvd, &L.k_cache[p * kvd]);
      std::copy_n(&v_[t * kvd], kvd, &L.v_cache[p * kvd]);
    }
    // Causal attention over the cache: token t sees positions 0 .. pos_+t.
    for (std::size_t t = 0; t < n; ++t) {
      const std::size_t len = pos_ + t + 1;
      for (std::size_t h = 0; h < nh; ++h) {
        const float* q = &q_[t * qd + h * hd];
        const std::size_t kh = h / group;
        float mx = -std::numeric_limits<float>::infinity();
        for (std::size_t j = 0; j < len; ++j) {
          const float* k = &L.k_cache[j * kvd + kh * hd];
          float d = 0.f;
          for (std::size_t c = 0; c < hd; ++c) d += q[c] * k[c];
          scores_[j] = d * scale;
          mx = std::max(mx, scores_[j]);
        }
        float sum = 0.f;
        for (std::size_t j = 0; j < len; ++j) {
          scores_[j] = std::exp(scores_[j] - mx);
          sum += scores_[j];
        }
        const float inv = 1.f / sum;
        float* a = &att_[t * qd + h * hd];
        std::fill_n(a, hd, 0.f);
        for (std::size_t j = 0; j < len; ++j) {
          const float w = scores_[j] * inv;
          const float* v = &L.v_cache[j * kvd + kh * hd];
          for (std::size_t c = 0; c < hd; ++c) a[c] += w * v[c];
        }
      }
    }
    matmul_t(att_.data(), n, qd, L.wo.data(), H, o_.data());
    for (std::size_t i = 0; i < n * H; ++i) x_[i] += o_[i];
    rms_norm(x_.data(), n, H, L.post_norm.data(), s.rms_eps, xn_.data());
    if (std::string e = moe(l, xn_.data(), n, y_.data()); !e.empty()) return "layer " + std::to_string(l) + ": " + e;
    for (std::size_t i = 0; i < n * H; ++i) x_[i] += y_[i];
  }
  pos_ += n;
  if (logits != nullptr) {
    rms_norm(x_.data(), n, H, final_norm_.data(), s.rms_eps, xn_.data());
    matmul_t(xn_.data(), n, H, lm_head_.data(), s.vocab, logits);
  }
  return "";
}

void accumulate_bits(const float* logits, std::size_t vocab, std::span<const std::uint32_t> tokens, double& bits,
                     std::size_t& count) {
  for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
    const float* z = logits + i * vocab;
    double mx = -std::numeric_limits<double>::infinity();
    for (std::size_t c = 0; c < vocab; ++c) mx = std::max(mx, double(z[c]));
    double sum = 0.0;
    for (std::size_t c = 0; c < vocab; ++c) sum += std::exp(double(z[c]) - mx);
    const double logp = double(z[tokens[i + 1]]) - mx - std::log(sum);
    bits += -logp / std::log(2.0);
    ++count;
  }
}

std::vector<std::uint8_t> read_stdlib_text(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (!entry.is_regular_file(ec)) continue;
    const std::string name = entry.path().filename().string();
    if (name.size() > 3 && name.compare(name.size() - 3, 3, ".py") == 0) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::vector<std::uint8_t> text;
  for (const auto& name : names) {
    std::ifstream f(std::filesystem::path(dir) / name, std::ios::binary);
    text.insert(text.end(), std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  return text;
}

std::vector<std::vector<std::uint32_t>> make_windows(const std::vector<std::uint8_t>& text, std::size_t window,
                                                     std::size_t first, std::size_t count) {
  std::vector<std::vector<std::uint32_t>> out;
  if (window == 0) return out;
  const std::size_t total = text.size() / window;
  for (std::size_t w = first; w < total && w < first + count; ++w)
    out.emplace_back(text.begin() + static_cast<std::ptrdiff_t>(w * window),
                     text.begin() + static_cast<std::ptrdiff_t>((w + 1) * window));
  return out;
}

std::uint32_t sample_token(const float* logits, std::size_t vocab, float temperature, std::uint64_t& rng) {
  std::size_t best = 0;
  for (std::size_t c = 1; c < vocab; ++c)
    if (logits[c] > logits[best]) best = c;
  if (!(temperature > 0.f)) return static_cast<std::uint32_t>(best);
  double sum = 0.0;
  std::vector<double> p(vocab);
  for (std::size_t c = 0; c < vocab; ++c) sum += p[c] = std::exp(double(logits[c] - logits[best]) / temperature);
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  const double u = double((rng * 2685821657736338717ull) >> 11) * 0x1.0p-53 * sum;
  double acc = 0.0;
  for (std::size_t c = 0; c < vocab; ++c) {
    acc += p[c];
    if (u < acc) return static_cast<std::uint32_t>(c);
  }
  return static_cast<std::uint32_t>(best);
}

}  // namespace moex_engine
