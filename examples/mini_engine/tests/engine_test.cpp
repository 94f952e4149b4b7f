// Tests of the mini engine on the shared real models: logits against a float64 reference forward
// pass written here, bits per byte against the reference's, the C API variant against the C++
// one, exactness of prediction-only policies, the pre-gate fit and the adaptive-gate calibration.
#include "engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/cpu/cpu_isa.hpp"
#include "moex/formats/safetensors_writer.hpp"
#include "moex/quant/half.hpp"

#include "moex.h"
#include "safetensors_lite.hpp"
#include "support/test_support.hpp"

namespace {

using moex_engine::Engine;
using Windows = std::vector<std::vector<std::uint32_t>>;

// A fixed text (Python, as the models were trained on), cut into two windows of 160 bytes.
constexpr const char* kFixedText =
    "import os\nimport sys\n\n\ndef read_lines(path, encoding='utf-8'):\n    \"\"\"Return the lines of a file.\"\"\"\n"
    "    with open(path, encoding=encoding) as f:\n        return [line.rstrip('\\n') for line in f]\n\n\n"
    "class Counter:\n    def __init__(self):\n        self.counts = {}\n\n    def add(self, key):\n"
    "        self.counts[key] = self.counts.get(key, 0) + 1\n        return self.counts[key]\n";
constexpr std::size_t kWindow = 160;

Windows fixed_windows() {
  const std::string t = kFixedText;
  std::vector<std::uint8_t> bytes(t.begin(), t.end());
  return moex_engine::make_windows(bytes, kWindow, 0, 2);
}

/// The float64 reference: the Hugging Face Mixtral (or Qwen3-MoE: per-head q/k RMSNorm before
/// the rotary embedding, routing renormalized iff norm_topk_prob) forward pass, every operation
/// in double.
class Reference {
 public:
  explicit Reference(const moex::Checkpoint& ck) : c_(ck.config()) {
    const bool qwen3 = c_.arch == moex::Architecture::kQwen3Moe;
    const std::size_t H = c_.hidden, qd = std::size_t{c_.n_heads} * c_.head_dim,
                      kvd = std::size_t{c_.n_kv_heads} * c_.head_dim;
    auto get = [&](const std::string& name, std::size_t numel) {
      auto t = ck.tensor(name);
      REQUIRE_MESSAGE(t.is_ok(), name);
      REQUIRE(t->numel() == numel);
      std::vector<float> f(numel);
      REQUIRE(moex::tensor_to_f32(*t, f).is_ok());
      return std::vector<double>(f.begin(), f.end());
    };
    embed_ = get("model.embed_tokens.weight", std::size_t{c_.vocab} * H);
    norm_ = get("model.norm.weight", H);
    head_ = get("lm_head.weight", std::size_t{c_.vocab} * H);
    for (std::uint32_t l = 0; l < c_.n_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Layer L;
      L.in = get(p + "input_layernorm.weight", H);
      L.post = get(p + "post_attention_layernorm.weight", H);
      L.q = get(p + "self_attn.q_proj.weight", qd * H);
      L.k = get(p + "self_attn.k_proj.weight", kvd * H);
      L.v = get(p + "self_attn.v_proj.weight", kvd * H);
      L.o = get(p + "self_attn.o_proj.weight", H * qd);
      if (qwen3) {
        L.qn = get(p + "self_attn.q_norm.weight", c_.head_dim);
        L.kn = get(p + "self_attn.k_norm.weight", c_.head_dim);
      }
      L.gate = get(p + (qwen3 ? "mlp.gate.weight" : "block_sparse_moe.gate.weight"), std::size_t{c_.n_experts} * H);
      for (std::uint32_t e = 0; e < c_.n_experts; ++e) {
        const std::string q = p + (qwen3 ? "mlp.experts." : "block_sparse_moe.experts.") + std::to_string(e) + ".";
        L.w1.push_back(get(q + (qwen3 ? "gate_proj.weight" : "w1.weight"), std::size_t{c_.expert_ffn} * H));
        L.w3.push_back(get(q + (qwen3 ? "up_proj.weight" : "w3.weight"), std::size_t{c_.expert_ffn} * H));
        L.w2.push_back(get(q + (qwen3 ? "down_proj.weight" : "w2.weight"), H * c_.expert_ffn));
      }
      layers_.push_back(std::move(L));
    }
  }

  /// Logits [n x vocab] of a sequence starting at position 0.
  std::vector<double> forward(const std::vector<std::uint32_t>& tok) const {
    const std::size_t n = tok.size(), H = c_.hidden, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const std::size_t qd = nh * hd, kvd = nkv * hd, F = c_.expert_ffn, E = c_.n_experts;
    std::vector<double> x(n * H), xn(n * H), q(n * qd), k(n * kvd), v(n * kvd), att(n * qd);
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t c = 0; c < H; ++c) x[t * H + c] = embed_[tok[t] * H + c];
    for (const Layer& L : layers_) {
      rms(x, L.in, xn);
      matmul(xn, n, H, L.q, qd, q);
      matmul(xn, n, H, L.k, kvd, k);
      matmul(xn, n, H, L.v, kvd, v);
      if (!L.qn.empty()) {  // Qwen3: RMSNorm over each head of q and k
        for (std::size_t i = 0; i < n * nh; ++i) head_rms(&q[i * hd], L.qn);
        for (std::size_t i = 0; i < n * nkv; ++i) head_rms(&k[i * hd], L.kn);
      }
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t h = 0; h < nh; ++h) rope(&q[t * qd + h * hd], t);
        for (std::size_t h = 0; h < nkv; ++h) rope(&k[t * kvd + h * hd], t);
      }
      for (std::size_t t = 0; t < n; ++t)
        for (std::size_t h = 0; h < nh; ++h) {
          const std::size_t kh = h / (nh / nkv);
          std::vector<double> s(t + 1);
          double mx = -1e300, sum = 0;
          for (std::size_t j = 0; j <= t; ++j) {
            double d = 0;
            for (std::size_t c = 0; c < hd; ++c) d += q[t * qd + h * hd + c] * k[j * kvd + kh * hd + c];
            s[j] = d / std::sqrt(double(hd));
            mx = std::max(mx, s[j]);
          }
          for (double& e : s) sum += e = std::exp(e - mx);
          for (std::size_t c = 0; c < hd; ++c) {
            double a = 0;
            for (std::size_t j = 0; j <= t; ++j) a += s[j] / sum * v[j * kvd + kh * hd + c];
            att[t * qd + h * hd + c] = a;
          }
        }
      std::vector<double> o(n * H);
      matmul(att, n, qd, L.o, H, o);
      for (std::size_t i = 0; i < n * H; ++i) x[i] += o[i];
      rms(x, L.post, xn);
      // MoE: softmax over all router logits, top-k (ties to the lower id), renormalized.
      std::vector<double> logits(n * E);
      matmul(xn, n, H, L.gate, E, logits);
      for (std::size_t t = 0; t < n; ++t) {
        std::vector<double> p(E);
        const double mx = *std::max_element(&logits[t * E], &logits[t * E] + E);
        double sum = 0;
        for (std::size_t e = 0; e < E; ++e) sum += p[e] = std::exp(logits[t * E + e] - mx);
        std::vector<std::size_t> ids(E);
        std::iota(ids.begin(), ids.end(), 0);
        std::stable_sort(ids.begin(), ids.end(), [&](std::size_t a, std::size_t b) { return p[a] > p[b]; });
        double wsum = 0;
        for (std::size_t j = 0; j < c_.top_k; ++j) wsum += p[ids[j]] / sum;
        const double* xt = &xn[t * H];
        const bool renorm = c_.arch == moex::Architecture::kMixtral || c_.norm_topk_prob;
        for (std::size_t j = 0; j < c_.top_k; ++j) {
          const std::size_t e = ids[j];
          const double w = p[e] / sum / (renorm ? wsum : 1.0);
          std::vector<double> g(F);
          for (std::size_t f = 0; f < F; ++f) {
            double a = 0, b = 0;
            for (std::size_t c = 0; c < H; ++c) {
              a += L.w1[e][f * H + c] * xt[c];
              b += L.w3[e][f * H + c] * xt[c];
            }
            g[f] = a / (1.0 + std::exp(-a)) * b;
          }
          for (std::size_t c = 0; c < H; ++c) {
            double y = 0;
            for (std::size_t f = 0; f < F; ++f) y += L.w2[e][c * F + f] * g[f];
            x[t * H + c] += w * y;
          }
        }
      }
    }
    rms(x, norm_, xn);
    std::vector<double> out(n * c_.vocab);
    matmul(xn, n, H, head_, c_.vocab, out);
    return out;
  }

 private:
  struct Layer {
    std::vector<double> in, post, q, k, v, o, gate, qn, kn;
    std::vector<std::vector<double>> w1, w3, w2;
  };
  void rms(const std::vector<double>& x, const std::vector<double>& w, std::vector<double>& y) const {
    const std::size_t H = c_.hidden;
    for (std::size_t t = 0; t < x.size() / H; ++t) {
      double ss = 0;
      for (std::size_t c = 0; c < H; ++c) ss += x[t * H + c] * x[t * H + c];
      const double r = 1.0 / std::sqrt(ss / double(H) + double(c_.rms_eps));
      for (std::size_t c = 0; c < H; ++c) y[t * H + c] = w[c] * x[t * H + c] * r;
    }
  }
  void head_rms(double* v, const std::vector<double>& w) const {
    double ss = 0;
    for (std::size_t c = 0; c < c_.head_dim; ++c) ss += v[c] * v[c];
    const double r = 1.0 / std::sqrt(ss / double(c_.head_dim) + double(c_.rms_eps));
    for (std::size_t c = 0; c < c_.head_dim; ++c) v[c] = w[c] * v[c] * r;
  }
  static void matmul(const std::vector<double>& x, std::size_t n, std::size_t in, const std::vector<double>& w,
                     std::size_t out, std::vector<double>& y) {
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t o = 0; o < out; ++o) {
        double a = 0;
        for (std::size_t c = 0; c < in; ++c) a += x[t * in + c] * w[o * in + c];
        y[t * out + o] = a;
      }
  }
  void rope(double* v, std::size_t pos) const {
    const std::size_t half = c_.head_dim / 2;
    for (std::size_t i = 0; i < half; ++i) {
      const double a = double(pos) * std::pow(double(c_.rope_theta), -2.0 * double(i) / double(c_.head_dim));
      const double x0 = v[i], x1 = v[i + half];
      v[i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
    }
  }
  moex::ModelConfig c_;
  std::vector<double> embed_, norm_, head_;
  std::vector<Layer> layers_;
};

double bits_of(const std::vector<double>& logits, std::size_t V, const std::vector<std::uint32_t>& tok) {
  double bits = 0;
  for (std::size_t i = 0; i + 1 < tok.size(); ++i) {
    const double* z = &logits[i * V];
    const double mx = *std::max_element(z, z + V);
    double sum = 0;
    for (std::size_t c = 0; c < V; ++c) sum += std::exp(z[c] - mx);
    bits += -(z[tok[i + 1]] - mx - std::log(sum)) / std::log(2.0);
  }
  return bits;
}

// The engine computes in f32 (bf16 weights are exact in f32): norm-wise relative error of the
// logits over 8 layers of 256-long f32 dot products stays near 1e-6; a flipped top-k choice
// anywhere would show as 1e-2 or more. 2e-5 leaves room for summation order across ISAs.
constexpr double kLogitTolerance = 2e-5;
// bits per byte is a mean of log-probabilities: an f32 logit error of 1e-5 relative moves it by
// far less than 1e-5 bits.
constexpr double kBpbTolerance = 1e-5;
// moex's default kernels on AVX512-BF16 CPUs round expert activations to bf16 (8-bit mantissa,
// 2^-9 relative per use; see cpu_isa.hpp): measured ~4e-3 on the logits and ~6e-4 bits per byte
// here; the bounds leave a factor ~3.
constexpr double kBf16LogitTolerance = 1.5e-2;
constexpr double kBf16BpbTolerance = 2e-3;

const std::string kModels[] = {"tiny-mixtral-8e", "tiny-mixtral-32e"};

/// Runs the windows through the engine with the exact policies (chunk 0: whole windows, else token
/// by token) into `logits`, sized like the reference's.
auto engine_run(Engine& eng, const Windows& windows, std::size_t chunk, const std::vector<double>& ref_logits,
                std::vector<float>& logits) {
  auto moe = eng.make_runner({});
  REQUIRE(moe.is_ok());
  auto r = moex_engine::evaluate_bpb(eng, **moe, windows, chunk, &logits);
  REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
  REQUIRE(logits.size() == ref_logits.size());
  return *r;
}

/// Writes a small Qwen3-MoE checkpoint with random bf16 weights (norms near 1) into `dir`: the
/// whole model, attention with its q/k norms included, every layer an MoE layer.
void write_qwen3_model(const std::filesystem::path& dir, bool norm_topk_prob) {
  moex::ModelConfig c;
  c.arch = moex::Architecture::kQwen3Moe;
  c.architecture = "qwen3_moe";
  c.n_layers = 3;
  c.n_experts = 8;
  c.top_k = 2;
  c.hidden = 64;
  c.expert_ffn = 32;
  c.dense_ffn = 96;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 32;  // Qwen3 sets head_dim apart from hidden / heads
  c.vocab = 96;
  c.max_pos = 64;
  c.rms_eps = 1e-6f;
  c.rope_theta = 1e6f;
  c.norm_topk_prob = norm_topk_prob;
  moex::SafetensorsWriter st;
  std::uint64_t salt = 5150;
  auto add = [&](const std::string& name, std::vector<std::uint64_t> shape, float mean, float sd) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    auto v = moex::test::random_normal(n, sd, salt++);
    std::vector<std::byte> b(n * 2);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint16_t h = moex::float_to_bf16(v[i] + mean);
      std::memcpy(&b[2 * i], &h, 2);
    }
    REQUIRE(st.add(name, moex::DType::kBF16, shape, b).is_ok());
  };
  const std::uint64_t H = c.hidden, qd = 4 * 32, kvd = 2 * 32, E = c.n_experts, F = c.expert_ffn;
  add("model.embed_tokens.weight", {c.vocab, H}, 0.f, 1.f);
  for (std::uint32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 1.f, 0.1f);
    add(p + "post_attention_layernorm.weight", {H}, 1.f, 0.1f);
    add(p + "self_attn.q_proj.weight", {qd, H}, 0.f, 0.15f);
    add(p + "self_attn.k_proj.weight", {kvd, H}, 0.f, 0.15f);
    add(p + "self_attn.v_proj.weight", {kvd, H}, 0.f, 0.15f);
    add(p + "self_attn.o_proj.weight", {H, qd}, 0.f, 0.1f);
    add(p + "self_attn.q_norm.weight", {32}, 1.f, 0.2f);
    add(p + "self_attn.k_norm.weight", {32}, 1.f, 0.2f);
    add(p + "mlp.gate.weight", {E, H}, 0.f, 0.3f);
    for (std::uint32_t e = 0; e < E; ++e) {
      const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
      add(q + "gate_proj.weight", {F, H}, 0.f, 0.15f);
      add(q + "up_proj.weight", {F, H}, 0.f, 0.15f);
      add(q + "down_proj.weight", {H, F}, 0.f, 0.15f);
    }
  }
  add("model.norm.weight", {H}, 1.f, 0.1f);
  add("lm_head.weight", {c.vocab, H}, 0.f, 0.2f);
  std::filesystem::create_directories(dir);
  REQUIRE(moex::write_config_json(dir, c).is_ok());
  REQUIRE(st.write_file(dir / "model.safetensors").is_ok());
}

}  // namespace

TEST_SUITE("engine") {
TEST_CASE("engine logits and bits per byte match a float64 reference on both shared models") {
  MOEX_REQUIRE_SHARED(shared);
  const Windows windows = fixed_windows();
  REQUIRE(windows.size() == 2);
  for (const std::string& name : kModels) {
    CAPTURE(name);
    auto eng = Engine::open((shared / "models" / name).string());
    REQUIRE_MESSAGE(eng.is_ok(), eng.status().to_string());
    const Reference ref(*(*eng)->model().checkpoint);
    const std::size_t V = (*eng)->shape().vocab;
    double ref_bits = 0;
    std::size_t ref_count = 0;
    std::vector<double> ref_logits;
    for (const auto& w : windows) {
      auto l = ref.forward(w);
      ref_bits += bits_of(l, V, w);
      ref_count += w.size() - 1;
      ref_logits.insert(ref_logits.end(), l.begin(), l.end());
    }
    // The exact kernels (f32 activations), then the CPU's default ones where they differ.
    std::vector<moex::CpuIsa> isas{moex::detected_cpu_isa() >= moex::CpuIsa::kAvx512 ? moex::CpuIsa::kAvx512
                                                                                     : moex::detected_cpu_isa()};
    if (moex::detected_cpu_isa() == moex::CpuIsa::kAvx512Bf16) isas.push_back(moex::CpuIsa::kAvx512Bf16);
    for (moex::CpuIsa isa : isas)
      for (std::size_t chunk : {std::size_t{0}, std::size_t{1}}) {  // whole windows, and token by token
        REQUIRE(moex::set_cpu_isa(isa).is_ok());
        const bool bf16 = isa == moex::CpuIsa::kAvx512Bf16;
        const std::string isa_name(moex::to_string(isa));
        CAPTURE(isa_name);
        CAPTURE(chunk);
        std::vector<float> logits;
        const auto r = engine_run(**eng, windows, chunk, ref_logits, logits);
        const double err = moex::test::rel_error(logits.data(), ref_logits.data(), logits.size());
        MESSAGE(name << " kernels " << isa_name << " chunk " << chunk << ": logits relative error " << err << "; bpb "
                     << r.bpb() << " vs reference " << ref_bits / double(ref_count));
        CHECK(err < (bf16 ? kBf16LogitTolerance : kLogitTolerance));
        CHECK(r.predictions == ref_count);
        CHECK(std::abs(r.bpb() - ref_bits / double(ref_count)) < (bf16 ? kBf16BpbTolerance : kBpbTolerance));
      }
    REQUIRE(moex::set_cpu_isa(moex::detected_cpu_isa()).is_ok());
  }
}

TEST_CASE("a generated Qwen3-MoE model runs end to end against its reference forward pass") {
  // Qwen3-MoE's attention (q/k norms, head_dim apart from hidden / heads) and its router (with
  // and without norm_topk_prob), through the C++ engine and the C API variant.
  for (bool norm : {true, false}) {
    CAPTURE(norm);
    const auto dir = moex::test::temp_dir(norm ? "qwen3-norm" : "qwen3-plain");
    write_qwen3_model(dir, norm);
    auto eng = Engine::open(dir.string());
    REQUIRE_MESSAGE(eng.is_ok(), eng.status().to_string());
    const Reference ref(*(*eng)->model().checkpoint);
    const Windows windows{{3, 17, 42, 8, 91, 5, 60, 33, 12, 77, 1, 50}, {9, 9, 64, 2, 31, 88, 14, 70}};
    std::vector<double> ref_logits;
    for (const auto& w : windows) {
      auto l = ref.forward(w);
      ref_logits.insert(ref_logits.end(), l.begin(), l.end());
    }
    REQUIRE(moex::set_cpu_isa(moex::detected_cpu_isa() >= moex::CpuIsa::kAvx512 ? moex::CpuIsa::kAvx512
                                                                                 : moex::detected_cpu_isa())
                .is_ok());
    for (std::size_t chunk : {std::size_t{0}, std::size_t{1}}) {
      CAPTURE(chunk);
      std::vector<float> logits;
      (void)engine_run(**eng, windows, chunk, ref_logits, logits);
      const double err = moex::test::rel_error(logits.data(), ref_logits.data(), logits.size());
      MESSAGE("qwen3_moe norm_topk_prob=" << norm << " chunk " << chunk << ": logits relative error " << err);
      CHECK(err < kLogitTolerance);
    }
    REQUIRE(moex::set_cpu_isa(moex::detected_cpu_isa()).is_ok());
  }
}

TEST_CASE("the C API variant computes the same logits as the C++ engine") {
  MOEX_REQUIRE_SHARED(shared);
  const Windows windows = fixed_windows();
  for (const std::string& name : kModels) {
    CAPTURE(name);
    const std::string dir = (shared / "models" / name).string();
    auto eng = Engine::open(dir);
    REQUIRE(eng.is_ok());
    moex_engine::PolicyOptions o;
    o.threads = 1;
    auto moe = (*eng)->make_runner(o);
    REQUIRE(moe.is_ok());
    std::vector<float> want;
    REQUIRE(moex_engine::evaluate_bpb(**eng, **moe, windows, 1, &want).is_ok());

    moex_engine::ModelShape shape;
    REQUIRE(moex_engine::read_config(dir, shape).empty());
    moex_engine::SafetensorsLite st;
    REQUIRE(st.open(dir).empty());
    moex_engine::Transformer tf;
    REQUIRE(tf.load(shape, st.loader()).empty());
    moex_model* model = nullptr;
    REQUIRE(moex_model_open(dir.c_str(), nullptr, nullptr, nullptr, &model) == MOEX_OK);
    moex_executor_params p;
    moex_executor_params_init(&p);
    p.threads = 1;
    moex_executor* ex = nullptr;
    REQUIRE(moex_executor_create(model, &p, &ex) == MOEX_OK);
    moex_engine::MoeFn fn = [&](std::uint32_t l, const float* x, std::size_t n, float* out) -> std::string {
      return moex_executor_forward_f32(ex, l, x, n, out) == MOEX_OK ? "" : moex_last_error_message();
    };
    std::vector<float> got;
    for (const auto& w : windows) {
      tf.reset();
      std::vector<float> l(w.size() * shape.vocab);
      for (std::size_t i = 0; i < w.size(); ++i)
        REQUIRE(tf.forward(std::span(w).subspan(i, 1), fn, &l[i * shape.vocab]).empty());
      got.insert(got.end(), l.begin(), l.end());
    }
    moex_executor_destroy(ex);
    moex_model_destroy(model);
    REQUIRE(got.size() == want.size());
    CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("prediction-only policies are exact; pre-gate fit and adaptive-gate calibration work on real text") {
  MOEX_REQUIRE_SHARED(shared);
  const Windows windows = fixed_windows();
  // Calibration text: the fixed text repeated into windows of 256 bytes (the test needs no other file).
  std::string cal;
  while (cal.size() < 4 * 256) cal += kFixedText;
  const Windows calib = moex_engine::make_windows(std::vector<std::uint8_t>(cal.begin(), cal.end()), 256, 0, 4);
  for (const std::string& name : kModels) {
    CAPTURE(name);
    auto eng = Engine::open((shared / "models" / name).string());
    REQUIRE(eng.is_ok());
    auto exact = (*eng)->make_runner({});
    REQUIRE(exact.is_ok());
    std::vector<float> want;
    REQUIRE(moex_engine::evaluate_bpb(**eng, **exact, windows, 1, &want).is_ok());

    auto pg = moex_engine::fit_pre_gates(**eng, calib);
    REQUIRE_MESSAGE(pg.is_ok(), pg.status().to_string());
    const auto file = moex::test::temp_dir("engine-pregate") / "pg.safetensors";
    REQUIRE(moex::write_pre_gates(*pg, file).is_ok());
    auto back = moex::read_pre_gates(file);
    REQUIRE(back.is_ok());
    CHECK(back->weights == pg->weights);

    moex_engine::PolicyOptions spec, fitted, routed;
    spec.prefetch = moex_engine::Prefetch::kSpeculative;
    fitted.prefetch = moex_engine::Prefetch::kPreGatePredict;
    fitted.pregates = *back;
    routed.prefetch = moex_engine::Prefetch::kPreGateRoute;
    routed.pregates = *back;
    double recall[2] = {0, 0};
    int i = 0;
    for (const auto* o : {&spec, &fitted}) {
      auto moe = (*eng)->make_runner(*o);
      REQUIRE(moe.is_ok());
      CHECK((*moe)->exact());
      std::vector<float> got;
      auto r = moex_engine::evaluate_bpb(**eng, **moe, windows, 1, &got);
      REQUIRE(r.is_ok());
      CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
      recall[i++] = r->recall();
    }
    MESSAGE(name << ": recall speculative " << recall[0] << ", fitted pre-gates " << recall[1]);
    CHECK(recall[0] > 0.5);
    CHECK(recall[1] > 0.5);
    auto moe = (*eng)->make_runner(routed);
    REQUIRE(moe.is_ok());
    CHECK_FALSE((*moe)->exact());
    auto r = moex_engine::evaluate_bpb(**eng, **moe, windows, 1);
    REQUIRE(r.is_ok());
    CHECK(std::isfinite(r->bpb()));

    // Adaptive k: calibrated to a target between 1 and top_k, it runs fewer experts.
    const double top_k = (*eng)->shape().top_k;
    const double target = 1.0 + 0.5 * (top_k - 1.0);
    double reached = 0;
    auto gate = moex_engine::calibrate_adaptive_gate(**eng, calib, target, &reached);
    REQUIRE_MESSAGE(gate.is_ok(), gate.status().to_string());
    CHECK(std::abs(reached - target) < 0.05);  // 1024 tokens x 8 layers: k moves in steps of ~1e-4
    moex_engine::PolicyOptions adaptive;
    adaptive.gate = *gate;
    auto am = (*eng)->make_runner(adaptive);
    REQUIRE(am.is_ok());
    auto ar = moex_engine::evaluate_bpb(**eng, **am, windows, 1);
    REQUIRE(ar.is_ok());
    MESSAGE(name << ": adaptive k target " << target << " reached " << reached << " on calibration, " << ar->average_k()
                 << " on the test text; bpb " << ar->bpb());
    CHECK(ar->average_k() < top_k);
  }
}
}  // TEST_SUITE("engine")

TEST_SUITE("engine") {
TEST_CASE("a recorded routing trace round-trips through moex's binary and JSON Lines forms") {
  MOEX_REQUIRE_SHARED(shared);
  const Windows windows = fixed_windows();
  auto eng = Engine::open((shared / "models" / "tiny-mixtral-8e").string());
  REQUIRE(eng.is_ok());
  auto moe = (*eng)->make_runner({});
  REQUIRE(moe.is_ok());
  (*moe)->record_trace(true);
  REQUIRE(moex_engine::evaluate_bpb(**eng, **moe, windows, 0).is_ok());
  const moex::RoutingTrace& tr = (*moe)->trace();
  CHECK(tr.tokens() == 2 * kWindow);
  CHECK(tr.sequences() == 2);
  CHECK(tr.n_layers == 8);
  const auto dir = moex::test::temp_dir("engine-trace");
  REQUIRE(moex::write_trace_binary(tr, dir / "t.moextrace").is_ok());
  REQUIRE(moex::write_trace_jsonl(tr, dir / "t.jsonl").is_ok());
  for (const char* f : {"t.moextrace", "t.jsonl"}) {
    CAPTURE(f);
    auto back = moex::load_trace(dir / f);
    REQUIRE_MESSAGE(back.is_ok(), back.status().to_string());
    CHECK(back->expert_ids == tr.expert_ids);
    CHECK(back->seq_start == tr.seq_start);
  }
}

TEST_CASE("bad config.json and safetensors inputs are errors, not crashes") {
  moex_engine::ModelShape s;
  CHECK_FALSE(moex_engine::parse_config("not json", s).empty());
  CHECK_FALSE(moex_engine::parse_config("{\"model_type\":\"llama\"}", s).empty());
  CHECK_FALSE(moex_engine::parse_config("{\"model_type\":\"mixtral\",\"num_hidden_layers\":-3}", s).empty());
  CHECK_FALSE(moex_engine::parse_config(
                  "{\"model_type\":\"mixtral\",\"num_hidden_layers\":2,\"hidden_size\":8,\"num_attention_heads\":3,"
                  "\"num_key_value_heads\":2,\"vocab_size\":4,\"max_position_embeddings\":8,\"num_local_experts\":2,"
                  "\"num_experts_per_tok\":1,\"intermediate_size\":4}",
                  s)
                  .empty());  // heads not a multiple of kv heads
  const auto dir = moex::test::temp_dir("engine-bad");
  moex_engine::SafetensorsLite st;
  CHECK_FALSE(st.open(dir.string()).empty());  // nothing there
  {
    std::FILE* f = std::fopen((dir / "model.safetensors").c_str(), "wb");
    REQUIRE(f != nullptr);
    const unsigned char huge[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};  // header "length"
    std::fwrite(huge, 1, 8, f);
    std::fputs("{}", f);
    std::fclose(f);
  }
  CHECK_FALSE(st.open(dir.string()).empty());
  {
    std::FILE* f = std::fopen((dir / "model.safetensors").c_str(), "wb");
    const std::string h = "{\"x\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,800]}}";
    const std::uint64_t n = h.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    std::fwrite(len, 1, 8, f);
    std::fwrite(h.data(), 1, h.size(), f);
    std::fclose(f);
  }
  CHECK_FALSE(st.open(dir.string()).empty());  // data beyond the file
  moex_engine::Transformer tf;
  const std::uint32_t tok = 0;
  CHECK_FALSE(tf.forward(std::span(&tok, 1), {}, nullptr).empty());  // nothing loaded
}
}  // TEST_SUITE("engine")
