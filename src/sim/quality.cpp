// Quality of approximate policies on a real checkpoint (moex/sim/quality.hpp).

#include "moex/sim/quality.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <string_view>
#include <utility>

#include "moex/backend/cpu_backend.hpp"
#include "moex/executor/moe_layer_executor.hpp"
#include "moex/formats/checkpoint.hpp"
#include "moex/gate/sensitivity_gate.hpp"
#include "moex/policies/hobbit_precision_miss.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

template <class E>
struct QualityPolicies : DefaultPolicies {
  using Eviction = E;
  using Gate = SensitivityGate;
  using Miss = HobbitPrecisionMiss;
};

struct GatePolicies : DefaultPolicies {
  using Gate = SensitivityGate;
};

CpuBackendConfig one_thread() {
  CpuBackendConfig c;
  c.threads = 1;
  return c;
}

// The post-attention RMSNorm weights of each MoE layer (ones where the checkpoint has none).
Result<std::vector<float>> norm_weights(const OpenedModel& m) {
  const std::size_t h = m.store.spec().shape.hidden;
  const std::uint32_t L = m.store.spec().n_layers;
  std::vector<float> w(std::size_t{L} * h, 1.f);
  if (!m.checkpoint) return w;
  for (std::uint32_t l = 0; l < L; ++l) {
    const std::uint32_t cl = l < m.moe_layers.size() ? m.moe_layers[l] : l;
    auto t = m.checkpoint->tensor("model.layers." + std::to_string(cl) + ".post_attention_layernorm.weight");
    if (!t) continue;
    if (t->numel() != h)
      return corrupt("post_attention_layernorm of layer " + std::to_string(cl) + " has the wrong size");
    MOEX_RETURN_IF_ERROR(tensor_to_f32(*t, std::span<float>(w.data() + std::size_t{l} * h, h)));
  }
  return w;
}

void rms_norm(const float* x, const float* w, float* y, std::size_t n) {
  double ss = 0;
  for (std::size_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-6));
  for (std::size_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

Status check_inputs(const OpenedModel& m, std::span<const float> inputs) {
  const std::size_t h = m.store.spec().shape.hidden;
  if (h == 0 || inputs.empty() || inputs.size() % h != 0)
    return invalid_argument("quality: inputs must be a non-empty [n x hidden] array (hidden " + std::to_string(h) +
                            ")");
  for (float v : inputs)
    if (!std::isfinite(v)) return invalid_argument("quality: non-finite input");
  return Status::ok();
}

template <class E>
Result<QualityResult> measure_with(OpenedModel& m, std::span<const float> inputs, const QualityPolicy& p, E eviction) {
  const ExpertStore& store = m.store;
  const MoeModelSpec& spec = store.spec();
  const std::size_t h = spec.shape.hidden;
  const std::size_t n = inputs.size() / h;
  const Precision full = store.master_format().precision;
  const std::uint64_t eb = store.expert_bytes(full);
  const std::uint64_t all = eb * spec.n_layers * spec.n_experts;
  ExecutorConfig cfg;
  cfg.cache_precision = full;
  cfg.cache_bytes =
      std::max<std::uint64_t>(eb, static_cast<std::uint64_t>(p.budget_fraction * static_cast<double>(all)));
  if (!p.layer_slots.empty()) {
    if (p.layer_slots.size() != spec.n_layers) return invalid_argument("quality: one layer budget per layer needed");
    cfg.layer_cache_bytes.clear();
    for (std::uint32_t s : p.layer_slots) cfg.layer_cache_bytes.push_back(std::uint64_t{s} * eb);
  }
  HobbitPrecisionMiss miss;
  miss.t_high = 1.f;
  miss.t_skip = 1.f;
  if (p.low_precision_on_miss) {
    cfg.low_precision = p.low_precision;
    cfg.low_precision_share = p.low_precision_share;
    miss.t_high = p.t_high;
    miss.t_skip = p.t_skip;
  }
  ExecutorConfig exact_cfg = cfg;  // the shadow: full precision, one pool
  exact_cfg.low_precision.reset();
  exact_cfg.layer_cache_bytes.clear();
  auto exact = MoeLayerExecutor<>::create(store, exact_cfg, one_thread());
  if (!exact) return exact.status();
  SensitivityGate gate;
  if (p.gate_threshold > 0.f) {
    MOEX_RETURN_IF_ERROR(gate.set_sensitivities(p.sensitivities));
    gate.set_threshold(p.gate_threshold);
  }
  auto approx = MoeLayerExecutor<QualityPolicies<E>>::create(store, cfg, one_thread(), std::move(eviction),
                                                             std::move(gate), {}, miss);
  if (!approx) return approx.status();
  auto nw = norm_weights(m);
  if (!nw) return nw.status();

  std::vector<double> d2(spec.n_layers, 0.0), y2(spec.n_layers, 0.0);
  std::vector<float> x(h), xn(h), ye(h), ya(h);
  for (std::size_t t = 0; t < n; ++t) {
    std::copy(inputs.begin() + static_cast<std::ptrdiff_t>(t * h),
              inputs.begin() + static_cast<std::ptrdiff_t>((t + 1) * h), x.begin());
    for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
      rms_norm(x.data(), nw->data() + std::size_t{l} * h, xn.data(), h);
      MOEX_RETURN_IF_ERROR(exact->forward(l, xn.data(), 1, ye.data()));
      MOEX_RETURN_IF_ERROR(approx->forward(l, xn.data(), 1, ya.data()));
      for (std::size_t c = 0; c < h; ++c) {
        const double d = double(ya[c]) - ye[c];
        d2[l] += d * d;
        y2[l] += double(ye[c]) * ye[c];
        x[c] += ye[c];
      }
    }
  }
  QualityResult r;
  r.tokens = n;
  double sd = 0, sy = 0;
  for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
    r.layer_rel_error.push_back(y2[l] > 0 ? std::sqrt(d2[l] / y2[l]) : 0.0);
    sd += d2[l];
    sy += y2[l];
  }
  r.rel_error = sy > 0 ? std::sqrt(sd / sy) : 0.0;
  const LayerStats s = approx->stats().total();
  std::uint64_t steps = 0;  // total() counts the stack's steps; here every (token, layer) call
  for (const LayerStats& ls : approx->stats().layers) steps += ls.steps;
  r.avg_k = steps ? static_cast<double>(s.expert_calls) / static_cast<double>(steps) : 0.0;
  r.misses = s.misses;
  r.low_precision_loads =
      p.low_precision_on_miss ? s.misses_by_precision[static_cast<std::size_t>(p.low_precision)] : 0;
  r.skipped = s.skipped;
  return r;
}

}  // namespace

Result<std::vector<std::uint8_t>> read_text_corpus(const std::filesystem::path& dir, std::size_t max_bytes) {
  std::error_code ec;
  std::vector<std::filesystem::path> files;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".py" && it->is_regular_file(ec)) files.push_back(it->path());
  if (files.empty()) return not_found("no .py files in " + dir.string());
  std::sort(files.begin(), files.end());
  std::vector<std::uint8_t> out;
  for (const auto& f : files) {
    if (out.size() >= max_bytes) break;
    std::ifstream in(f, std::ios::binary);
    std::vector<char> buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::size_t take = std::min(buf.size(), max_bytes - out.size());
    for (std::size_t i = 0; i < take; ++i) out.push_back(static_cast<std::uint8_t>(buf[i]));
  }
  return out;
}

Result<std::vector<float>> embed_bytes(const OpenedModel& m, std::span<const std::uint8_t> bytes) {
  if (!m.checkpoint) return invalid_argument("embed_bytes: no checkpoint");
  auto t = m.checkpoint->tensor("model.embed_tokens.weight");
  if (!t) return t.status();
  const std::size_t h = m.store.spec().shape.hidden;
  if (t->shape.size() != 2 || t->shape[1] != h || t->shape[0] < 256 || t->shape[0] > (1u << 22))
    return corrupt("embed_bytes: model.embed_tokens.weight is not [vocab >= 256, hidden]");
  std::vector<float> table(static_cast<std::size_t>(t->numel()));
  MOEX_RETURN_IF_ERROR(tensor_to_f32(*t, table));
  std::vector<float> out(bytes.size() * h);
  for (std::size_t i = 0; i < bytes.size(); ++i)
    std::copy_n(table.begin() + static_cast<std::ptrdiff_t>(std::size_t{bytes[i]} * h), h,
                out.begin() + static_cast<std::ptrdiff_t>(i * h));
  return out;
}

Result<std::vector<float>> estimate_model_sensitivities(const OpenedModel& m, std::span<const float> inputs) {
  MOEX_RETURN_IF_ERROR(check_inputs(m, inputs));
  const MoeModelSpec& spec = m.store.spec();
  const std::size_t h = spec.shape.hidden;
  const std::size_t n = inputs.size() / h;
  ExecutorConfig cfg;
  cfg.cache_bytes = m.store.expert_bytes(m.store.master_format().precision) * spec.n_layers * spec.n_experts;
  auto full = MoeLayerExecutor<>::create(m.store, cfg, one_thread());
  if (!full) return full.status();
  // Threshold 1 with sensitivity 1 drops every expert but the top one (w_tail <= 1).
  auto reduced = MoeLayerExecutor<GatePolicies>::create(m.store, cfg, one_thread(), {},
                                                        SensitivityGate(std::vector<float>(spec.n_layers, 1.f), 1.f));
  if (!reduced) return reduced.status();
  auto nw = norm_weights(m);
  if (!nw) return nw.status();
  std::vector<std::vector<float>> yf(spec.n_layers), yr(spec.n_layers), wd(spec.n_layers);
  std::vector<float> x(h), xn(h), a(h), b(h);
  for (std::size_t t = 0; t < n; ++t) {
    std::copy_n(inputs.begin() + static_cast<std::ptrdiff_t>(t * h), h, x.begin());
    for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
      rms_norm(x.data(), nw->data() + std::size_t{l} * h, xn.data(), h);
      TokenRouting r;
      MOEX_RETURN_IF_ERROR(full->route(l, xn.data(), 1, std::span<TokenRouting>(&r, 1)));
      MOEX_RETURN_IF_ERROR(full->forward(l, xn.data(), 1, a.data()));
      MOEX_RETURN_IF_ERROR(reduced->forward(l, xn.data(), 1, b.data()));
      float total = 0.f;
      for (std::uint32_t j = 0; j < r.k; ++j) total += r.weights[j];
      const float top = r.k ? r.weights[0] : 0.f;
      wd[l].push_back(total > 0.f ? 1.f - top / total : 0.f);
      yf[l].insert(yf[l].end(), a.begin(), a.end());
      yr[l].insert(yr[l].end(), b.begin(), b.end());
      for (std::size_t c = 0; c < h; ++c) x[c] += a[c];
    }
  }
  std::vector<float> s(spec.n_layers);
  for (std::uint32_t l = 0; l < spec.n_layers; ++l)
    s[l] = static_cast<float>(SensitivityGate::estimate_sensitivity(yf[l], yr[l], wd[l], h));
  return s;
}

Result<QualityResult> measure_moe_quality(OpenedModel& m, std::span<const float> inputs, const QualityPolicy& p) {
  MOEX_RETURN_IF_ERROR(check_inputs(m, inputs));
  if (!(p.budget_fraction > 0.0 && p.budget_fraction <= 1.0))
    return invalid_argument("quality: budget fraction outside (0, 1]");
  if (p.low_precision_on_miss && !m.store.has_precision(p.low_precision)) {
    const WeightFormat f =
        is_quantized(p.low_precision) ? quant_format(p.low_precision) : float_format(p.low_precision);
    MOEX_RETURN_IF_ERROR(m.store.build_precision(f));
  }
  if (p.eviction == "lru") return measure_with(m, inputs, p, LruEviction{});
  if (p.eviction == "lfu") return measure_with(m, inputs, p, LfuEviction{});
  if (p.eviction == "lrfu") return measure_with(m, inputs, p, LrfuEviction{});
  if (p.eviction == "hobbit") return measure_with(m, inputs, p, HobbitScoreEviction{});
  return invalid_argument("quality: unknown eviction '" + p.eviction + "' (lru, lfu, lrfu, hobbit)");
}

MOEX_NAMESPACE_END
