// The mini engine over moex's C++ API (see engine.hpp).
#include "engine.hpp"

#include <algorithm>
#include <cstring>

#include <Eigen/Dense>

#if MOEX_HAS_CUDA
#include "moex/backend/cuda_execution_backend.hpp"
#endif

namespace moex_engine {
namespace {

/// Every role the approximate policies need; with their neutral settings it is exact too.
struct EnginePolicies : moex::DefaultPolicies {
  using Gate = moex::SensitivityGate;
  using Predictor = moex::PreGateRouter;
  using Miss = moex::HobbitPrecisionMiss;
};

#if MOEX_HAS_CUDA
/// The same policies with resident experts on the GPU; misses the host CPU may compute at the source.
struct CudaEnginePolicies : EnginePolicies {
  using Backend = moex::CudaExecutionBackend;
};
#endif

template <class P>
class Runner final : public MoeRunner {
 public:
  explicit Runner(moex::MoeLayerExecutor<P> ex) : ex_(std::move(ex)) {}
  moex::Status forward(std::uint32_t layer, const float* x, std::size_t n, float* out) override {
    return ex_.forward(layer, x, n, out);
  }
  const moex::ExecutorStats& stats() const override { return ex_.stats(); }
  void reset_stats() override { ex_.reset_stats(); }
  void record_trace(bool on) override { ex_.record_trace(on); }
  void begin_sequence() override { ex_.begin_sequence(); }
  const moex::RoutingTrace& trace() const override { return ex_.recorded_trace(); }
  bool exact() const override { return ex_.exact(); }

 private:
  moex::MoeLayerExecutor<P> ex_;
};

std::string windows_error(const std::vector<std::vector<std::uint32_t>>& w) {
  if (w.empty()) return "no text windows";
  for (const auto& x : w)
    if (x.size() < 2) return "a text window shorter than 2 tokens";
  return "";
}

}  // namespace

moex::WeightFormat low_format(moex::Precision p) noexcept {
  return p == moex::Precision::kInt2 ? moex::quant_format(p, 64, moex::QuantScheme::kAsymmetric)
                                     : moex::quant_format(p, 64);
}

std::optional<moex::Precision> parse_precision(const std::string& s) noexcept {
  if (s == "int8") return moex::Precision::kInt8;
  if (s == "int4") return moex::Precision::kInt4;
  if (s == "int2") return moex::Precision::kInt2;
  if (s == "bf16") return moex::Precision::kBF16;
  if (s == "f32") return moex::Precision::kF32;
  return std::nullopt;
}

moex::Result<std::unique_ptr<Engine>> Engine::open(const std::string& dir, bool low_precision_copies) {
  moex::StoreOptions so;
  if (low_precision_copies)
    for (auto p : {moex::Precision::kInt8, moex::Precision::kInt4, moex::Precision::kInt2})
      so.extra_formats.push_back(low_format(p));
  auto opened = moex::open_expert_store(dir, so);
  if (!opened) return opened.status();
  std::unique_ptr<Engine> e(new Engine);
  e->model_ = std::move(*opened);
  const moex::ModelConfig& c = e->model_.checkpoint->config();
  if (c.arch != moex::Architecture::kMixtral && c.arch != moex::Architecture::kQwen3Moe)
    return moex::unsupported("the mini engine runs the Mixtral and Qwen3-MoE architectures, not " + c.architecture);
  if (e->model_.moe_layers.size() != c.n_layers)
    return moex::unsupported("the mini engine expects every layer to be an MoE layer");
  // The engine reads its shape from the same config.json moex parsed.
  ModelShape s;
  s.n_layers = c.n_layers;
  s.hidden = c.hidden;
  s.n_heads = c.n_heads;
  s.n_kv_heads = c.n_kv_heads ? c.n_kv_heads : c.n_heads;
  s.head_dim = c.head_dim ? c.head_dim : (c.n_heads ? c.hidden / c.n_heads : 0);
  s.vocab = c.vocab;
  s.max_pos = c.max_pos;
  s.n_experts = c.n_experts;
  s.top_k = c.top_k;
  s.expert_ffn = c.expert_ffn;
  s.rope_theta = c.rope_theta;
  s.rms_eps = c.rms_eps;
  s.tie_embeddings = c.tie_embeddings;
  s.qk_norm = c.arch == moex::Architecture::kQwen3Moe;
  if (s.n_heads == 0 || s.head_dim == 0 || s.vocab == 0 || s.max_pos == 0 || s.max_pos > 65536 ||
      s.n_heads % s.n_kv_heads != 0 || s.head_dim % 2 != 0)
    return moex::invalid_argument("config.json: attention shape unusable (heads, head_dim, vocab, max_pos)");
  const moex::Checkpoint& ck = *e->model_.checkpoint;
  TensorLoader loader = [&ck](const std::string& name, std::size_t numel, std::vector<float>& out) -> std::string {
    auto t = ck.tensor(name);
    if (!t) return t.status().to_string();
    if (t->numel() != numel)
      return "tensor " + name + " has " + std::to_string(t->numel()) + " elements, expected " + std::to_string(numel);
    out.resize(numel);
    moex::Status st = moex::tensor_to_f32(*t, out);
    return st.is_ok() ? std::string() : st.to_string();
  };
  if (std::string err = e->tf_.load(s, loader); !err.empty()) return moex::invalid_argument(err);
  return e;
}

moex::Result<std::unique_ptr<MoeRunner>> Engine::make_runner(const PolicyOptions& o) const {
  const moex::ExpertStore& st = model_.store;
  const moex::Precision cp = o.cache_precision.value_or(st.master_format().precision);
  const std::uint64_t eb = st.expert_bytes(cp);
  if (eb == 0)
    return moex::invalid_argument(std::string("the store holds no ") + std::string(moex::to_string(cp)) + " copy");
  moex::ExecutorConfig cfg;
  const double all = double(st.spec().n_layers) * st.spec().n_experts * double(eb);
  cfg.cache_bytes = std::max<std::uint64_t>(eb, static_cast<std::uint64_t>(o.cache_fraction * all));
  cfg.cache_precision = o.cache_precision;
  cfg.low_precision = o.low_precision;
  moex::CpuBackendConfig bc;
  bc.threads = o.threads;
  moex::PreGateRouter pred;
  if (o.prefetch == Prefetch::kSpeculative) {
    auto p = moex::PreGateRouter::speculative(st, o.depth);
    if (!p) return p.status();
    pred = std::move(*p);
  } else if (o.prefetch == Prefetch::kPreGatePredict || o.prefetch == Prefetch::kPreGateRoute) {
    if (!o.pregates) return moex::invalid_argument("pre-gate prefetch needs pre-gate weights");
    auto p = moex::PreGateRouter::trained(st, *o.pregates, o.prefetch == Prefetch::kPreGateRoute);
    if (!p) return p.status();
    pred = std::move(*p);
  }
  if (o.cuda) {
#if MOEX_HAS_CUDA
    moex::CudaExecutionBackendConfig cc;
    cc.device = o.cuda_device;
    cc.max_shape = st.spec().shape;
    auto be = moex::CudaExecutionBackend::create(cc);
    if (!be) return be.status();
    if (auto r = moex::CudaExecutionBackend::register_store(st); !r.is_ok()) return r;
    auto ex = moex::MoeLayerExecutor<CudaEnginePolicies>::create(st, cfg, std::move(*be), {}, o.gate, std::move(pred),
                                                                 moex::HobbitPrecisionMiss{o.t_high, o.t_skip});
    if (!ex) return ex.status();
    return std::unique_ptr<MoeRunner>(new Runner<CudaEnginePolicies>(std::move(*ex)));
#else
    return moex::unsupported("this moex was built without the CUDA backend");
#endif
  }
  if (o.all_default()) {
    auto ex = moex::MoeLayerExecutor<>::create(st, cfg, bc);
    if (!ex) return ex.status();
    return std::unique_ptr<MoeRunner>(new Runner<moex::DefaultPolicies>(std::move(*ex)));
  }
  auto ex = moex::MoeLayerExecutor<EnginePolicies>::create(st, cfg, bc, {}, o.gate, std::move(pred),
                                                           moex::HobbitPrecisionMiss{o.t_high, o.t_skip});
  if (!ex) return ex.status();
  return std::unique_ptr<MoeRunner>(new Runner<EnginePolicies>(std::move(*ex)));
}

moex::LayerStats BpbResult::total() const noexcept {
  moex::LayerStats t;
  for (const auto& l : layers) t += l;
  return t;
}

double BpbResult::recall() const noexcept {
  std::uint64_t ok = 0, sel = 0;
  for (std::size_t l = 1; l < layers.size(); ++l) {
    ok += layers[l].predicted_correct;
    sel += layers[l].selected;
  }
  return sel ? double(ok) / double(sel) : 0.0;
}

double BpbResult::average_k() const noexcept {
  std::uint64_t kept = 0, tok = 0;
  for (const auto& l : layers) {
    kept += l.selected;
    tok += l.tokens;
  }
  return tok ? double(kept) / double(tok) : 0.0;
}

moex::Result<BpbResult> evaluate_bpb(Engine& engine, MoeRunner& moe,
                                     const std::vector<std::vector<std::uint32_t>>& windows, std::size_t chunk,
                                     std::vector<float>* logits_out) {
  if (std::string e = windows_error(windows); !e.empty()) return moex::invalid_argument(e);
  Transformer& tf = engine.transformer();
  const std::size_t V = engine.shape().vocab;
  BpbResult r;
  moe.reset_stats();
  MoeFn fn = moe.fn();
  std::vector<float> logits;
  if (logits_out) logits_out->clear();
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& w : windows) {
    tf.reset();
    moe.begin_sequence();
    logits.resize(w.size() * V);
    const std::size_t step = chunk == 0 ? w.size() : chunk;
    for (std::size_t i = 0; i < w.size(); i += step) {
      const std::size_t m = std::min(step, w.size() - i);
      if (std::string e = tf.forward(std::span(w).subspan(i, m), fn, &logits[i * V]); !e.empty())
        return moex::internal_error(e);
    }
    accumulate_bits(logits.data(), V, w, r.bits, r.predictions);
    r.tokens += w.size();
    if (logits_out) logits_out->insert(logits_out->end(), logits.begin(), logits.end());
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.layers = moe.stats().layers;
  return r;
}

moex::Result<moex::SensitivityGate> calibrate_adaptive_gate(Engine& engine,
                                                            const std::vector<std::vector<std::uint32_t>>& calib,
                                                            double target_k, double* reached) {
  if (std::string e = windows_error(calib); !e.empty()) return moex::invalid_argument(e);
  const moex::ExpertStore& st = engine.store();
  const std::uint32_t L = st.spec().n_layers;
  const std::size_t H = st.spec().shape.hidden;
  moex::ExecutorConfig cfg;
  cfg.cache_bytes = std::uint64_t{L} * st.spec().n_experts * st.expert_bytes(st.master_format().precision);
  auto full = moex::MoeLayerExecutor<>::create(st, cfg);
  auto reduced = moex::MoeLayerExecutor<>::create(st, cfg);
  if (!full) return full.status();
  if (!reduced) return reduced.status();
  full->record_trace(true);
  std::vector<std::vector<float>> y_full(L), y_red(L), dropped(L);
  std::vector<moex::TokenRouting> routing, red;
  std::vector<float> tmp;
  MoeFn fn = [&](std::uint32_t l, const float* x, std::size_t n, float* out) -> std::string {
    routing.resize(n);
    moex::Status s = full->route(l, x, n, routing);
    if (s.is_ok()) s = full->forward_routed(l, routing, x, n, out);
    if (!s.is_ok()) return s.to_string();
    red = routing;
    std::vector<float> dw(n, 0.f);
    for (std::size_t t = 0; t < n; ++t) {
      moex::TokenRouting& r = red[t];
      if (r.k < 2) continue;
      float total = 0.f, kept = 0.f;
      for (std::uint32_t j = 0; j < r.k; ++j) total += r.weights[j];
      dw[t] = r.weights[r.k - 1] / total;
      r.weights[r.k - 1] = 0.f;
      --r.k;
      for (std::uint32_t j = 0; j < r.k; ++j) kept += r.weights[j];
      for (std::uint32_t j = 0; j < r.k; ++j) r.weights[j] = r.weights[j] / kept * total;
    }
    tmp.resize(n * H);
    s = reduced->forward_routed(l, red, x, n, tmp.data());
    if (!s.is_ok()) return s.to_string();
    y_full[l].insert(y_full[l].end(), out, out + n * H);
    y_red[l].insert(y_red[l].end(), tmp.begin(), tmp.end());
    dropped[l].insert(dropped[l].end(), dw.begin(), dw.end());
    return "";
  };
  Transformer& tf = engine.transformer();
  for (const auto& w : calib) {
    tf.reset();
    full->begin_sequence();
    if (std::string e = tf.forward(w, fn, nullptr); !e.empty()) return moex::internal_error(e);
  }
  std::vector<float> sens(L);
  for (std::uint32_t l = 0; l < L; ++l)
    sens[l] = static_cast<float>(moex::SensitivityGate::estimate_sensitivity(y_full[l], y_red[l], dropped[l], H));
  moex::SensitivityGate gate;
  MOEX_RETURN_IF_ERROR(gate.set_sensitivities(sens));
  auto got = gate.calibrate_threshold(full->recorded_trace(), target_k);
  if (!got) return got.status();
  if (reached) *reached = *got;
  return gate;
}

moex::Result<moex::PreGateWeights> fit_pre_gates(Engine& engine, const std::vector<std::vector<std::uint32_t>>& calib,
                                                 double ridge) {
  if (std::string e = windows_error(calib); !e.empty()) return moex::invalid_argument(e);
  if (!(ridge > 0.0)) return moex::invalid_argument("ridge must be positive");
  const moex::ExpertStore& st = engine.store();
  const std::uint32_t L = st.spec().n_layers, E = st.spec().n_experts;
  const std::size_t H = st.spec().shape.hidden;
  if (L < 2) return moex::invalid_argument("pre-gates need at least two MoE layers");
  moex::ExecutorConfig cfg;
  cfg.cache_bytes = std::uint64_t{L} * E * st.expert_bytes(st.master_format().precision);
  auto ex = moex::MoeLayerExecutor<>::create(st, cfg);
  if (!ex) return ex.status();
  using MatD = Eigen::MatrixXd;
  std::vector<MatD> xtx(L - 1, MatD::Zero(static_cast<Eigen::Index>(H), static_cast<Eigen::Index>(H)));
  std::vector<MatD> xty(L - 1, MatD::Zero(static_cast<Eigen::Index>(H), static_cast<Eigen::Index>(E)));
  std::vector<MatD> router(L);  // R_l as [H x E] (transposed), double
  for (std::uint32_t l = 0; l < L; ++l) {
    const float* w = st.router_weights(l);
    if (w == nullptr) return moex::invalid_argument("the store has no router for layer " + std::to_string(l));
    router[l].resize(static_cast<Eigen::Index>(H), static_cast<Eigen::Index>(E));
    for (std::size_t e = 0; e < E; ++e)
      for (std::size_t c = 0; c < H; ++c)
        router[l](static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(e)) = w[e * H + c];
  }
  std::vector<MatD> xs(L);
  MoeFn fn = [&](std::uint32_t l, const float* x, std::size_t n, float* out) -> std::string {
    MatD& X = xs[l];
    X.resize(static_cast<Eigen::Index>(n), static_cast<Eigen::Index>(H));
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t c = 0; c < H; ++c) X(static_cast<Eigen::Index>(t), static_cast<Eigen::Index>(c)) = x[t * H + c];
    moex::Status s = ex->forward(l, x, n, out);
    return s.is_ok() ? std::string() : s.to_string();
  };
  Transformer& tf = engine.transformer();
  for (const auto& w : calib) {
    tf.reset();
    if (std::string e = tf.forward(w, fn, nullptr); !e.empty()) return moex::internal_error(e);
    for (std::uint32_t l = 0; l + 1 < L; ++l) {
      xtx[l].noalias() += xs[l].transpose() * xs[l];
      const MatD z = xs[l + 1] * router[l + 1];  // layer l+1's router logits
      xty[l].noalias() += xs[l].transpose() * z;
    }
  }
  moex::PreGateWeights pg;
  pg.n_layers = L;
  pg.n_experts = E;
  pg.hidden = static_cast<std::uint32_t>(H);
  pg.weights.resize(std::size_t{L - 1} * E * H);
  for (std::uint32_t l = 0; l + 1 < L; ++l) {
    const double lambda = ridge * xtx[l].trace() / double(H);
    MatD a = xtx[l];
    a.diagonal().array() += lambda;
    const MatD b = xty[l] + lambda * router[l + 1];
    const MatD w = a.ldlt().solve(b);  // [H x E]
    if (!w.allFinite()) return moex::internal_error("pre-gate fit of layer " + std::to_string(l) + " is not finite");
    for (std::size_t e = 0; e < E; ++e)
      for (std::size_t c = 0; c < H; ++c)
        pg.weights[(std::size_t{l} * E + e) * H + c] =
            static_cast<float>(w(static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(e)));
  }
  return pg;
}

}  // namespace moex_engine
