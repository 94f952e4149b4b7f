#pragma once
/// @file moe_layer_executor.hpp
/// MoeLayerExecutor: one MoE layer's step — route, gate, fetch experts through the cache, compute,
/// combine — for every layer of a model, composed from policy types.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moex/backend/cpu_backend.hpp"
#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/concepts/backend.hpp"
#include "moex/concepts/eviction.hpp"
#include "moex/concepts/gate.hpp"
#include "moex/executor/default_policies.hpp"
#include "moex/executor/executor_config.hpp"
#include "moex/executor/stats.hpp"
#include "moex/formats/trace.hpp"
#include "moex/route/router.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

/// Every role of the executor, checked one by one so that an error names the role that failed.
template <class P>
concept ExecutorPolicies = EvictionPolicy<typename P::Eviction> && GatePolicy<typename P::Gate> &&
                           ExecutionBackend<typename P::Backend>;

/// Runs the MoE layers of one model over an ExpertStore.
///
/// For each layer step: the router picks each token's experts, the Gate may drop some, each
/// selected expert is looked up in the fast tier (a hit), or loaded from its master copy in the
/// slow tier into a slot freed by the Eviction policy (a miss), computed for its tokens, and the
/// outputs are combined with the gate weights.
///
/// Thread safety: one executor per thread; the store may be shared by several executors.
/// Errors: every method returns a Status; nothing throws or aborts.
template <ExecutorPolicies P = DefaultPolicies>
class MoeLayerExecutor {
 public:
  using Policies = P;
  using Eviction = typename P::Eviction;
  using Gate = typename P::Gate;
  using Backend = typename P::Backend;

  /// Validates the configuration against the store and reserves the fast tier.
  /// Errors: kInvalidArgument for an incomplete store, a missing cache precision, or a budget
  /// smaller than one expert; kOutOfMemory when the fast tier cannot be reserved.
  static Result<MoeLayerExecutor> create(const ExpertStore& store, ExecutorConfig config,
                                         Backend backend = {}, Eviction eviction = {},
                                         Gate gate = {});

  MoeLayerExecutor(MoeLayerExecutor&&) noexcept = default;
  MoeLayerExecutor& operator=(MoeLayerExecutor&&) noexcept = default;

  /// Routes n tokens of `layer`: out[t] gets token t's experts and weights (gate not applied).
  Status route(std::uint32_t layer, const float* hidden, std::size_t n, std::span<TokenRouting> out);

  /// out[n x hidden] = sum over each token's experts of weight * expert(hidden) (the MoE output;
  /// the caller adds the residual). hidden and out may not alias.
  Status forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out);

  /// Like forward with the routing given (from a trace, or routed by the caller).
  Status forward_routed(std::uint32_t layer, std::span<const TokenRouting> routing, const float* hidden,
                        std::size_t n, float* out);

  /// Starts (or stops) recording the routing each forward call uses (after the gate) into a
  /// RoutingTrace; starting clears what was recorded. Token t of layer l is the t-th token that
  /// layer has seen since recording started.
  void record_trace(bool on);
  /// Marks the start of a new sequence in the recorded trace (e.g. a new prompt).
  void begin_sequence();
  /// What was recorded (empty when recording never started).
  const RoutingTrace& recorded_trace() const noexcept { return trace_; }

  /// Number of forward calls so far: the step the next call runs at. Replaying a trace at batch 1
  /// layer by layer, token t of layer l runs at step t * n_layers + l (RoutingTrace::step), which
  /// is what BeladyOracleEviction's future is indexed by.
  std::uint64_t step() const noexcept { return step_; }

  const ExecutorStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_.reset(); }
  const ExecutorConfig& config() const noexcept { return config_; }
  /// Number of expert slots in the fast tier.
  std::size_t slot_count() const noexcept { return backend_.slot_count(); }
  /// Precision of resident experts.
  Precision cache_precision() const noexcept { return cache_layout_.format.precision; }
  /// True when `key` is resident.
  bool resident(ExpertKey key) const noexcept { return cache_.contains(key); }
  /// The fast-tier cache (read-only: residency, budgets, its own counters).
  const MixedPrecisionCache<Eviction>& cache() const noexcept { return cache_; }
  const Gate& gate() const noexcept { return gate_; }
  Backend& backend() noexcept { return backend_; }
  const Backend& backend() const noexcept { return backend_; }
  Eviction& eviction() noexcept { return cache_.policy(); }

 private:
  MoeLayerExecutor(const ExpertStore& store, ExecutorConfig config, Backend backend,
                   MixedPrecisionCache<Eviction> cache, Gate g)
      : store_(&store), config_(config), backend_(std::move(backend)), cache_(std::move(cache)), gate_(std::move(g)) {}

  /// Makes `key` resident; returns its slot. Counts hit/miss/stall in `ls`.
  Result<std::size_t> acquire(ExpertKey key, LayerStats& ls);

  const ExpertStore* store_ = nullptr;
  ExecutorConfig config_;
  Backend backend_;
  MixedPrecisionCache<Eviction> cache_;
  [[no_unique_address]] Gate gate_;
  ExpertLayout cache_layout_{};
  std::uint64_t step_ = 0;
  ExecutorStats stats_;
  // Routing trace being recorded.
  bool recording_ = false;
  RoutingTrace trace_;
  std::vector<std::uint32_t> trace_next_;  // per layer: next token index
  // Scratch reused across steps.
  std::vector<float> logits_, xg_, yg_;
  std::vector<TokenRouting> routing_;
};

// ---- implementation (out of class, so extern template works) ----------------------------------

template <ExecutorPolicies P>
void MoeLayerExecutor<P>::record_trace(bool on) {
  recording_ = on;
  if (!on) return;
  const MoeModelSpec& spec = store_->spec();
  trace_ = RoutingTrace{};
  trace_.n_layers = spec.n_layers;
  trace_.n_experts = spec.n_experts;
  trace_.top_k = spec.router.top_k;
  trace_.seq_start = {0};
  trace_.source = "recorded by moex::MoeLayerExecutor";
  trace_next_.assign(spec.n_layers, 0);
}

template <ExecutorPolicies P>
void MoeLayerExecutor<P>::begin_sequence() {
  if (!recording_) return;
  const std::uint32_t next = trace_next_.empty() ? 0 : *std::max_element(trace_next_.begin(), trace_next_.end());
  std::fill(trace_next_.begin(), trace_next_.end(), next);
  if (trace_.seq_start.empty() || trace_.seq_start.back() != next) trace_.seq_start.push_back(next);
}

template <ExecutorPolicies P>
Result<MoeLayerExecutor<P>> MoeLayerExecutor<P>::create(const ExpertStore& store, ExecutorConfig config,
                                                        Backend backend, Eviction eviction, Gate gate) {
  if (!store.complete()) return invalid_argument("executor: the store has experts without a master copy");
  if (Backend::kHasData && store.is_virtual())
    return invalid_argument("executor: a virtual (shape-only) store needs a simulated backend");
  const MoeModelSpec& spec = store.spec();
  const Precision p = config.cache_precision.value_or(store.master_format().precision);
  const auto fmt = store.format(p);
  if (!fmt)
    return invalid_argument("executor: the store holds no " + std::string(to_string(p)) +
                            " copy of its experts (build it with ExpertStore::build_precision)");
  const ExpertLayout layout = expert_layout(spec.shape, *fmt);
  const std::uint64_t all = std::uint64_t{spec.n_layers} * spec.n_experts * layout.total_bytes;
  if (config.cache_bytes == 0) config.cache_bytes = std::max<std::uint64_t>(all / 4, layout.total_bytes);
  const std::uint64_t n_slots64 = std::min<std::uint64_t>(config.cache_bytes / layout.total_bytes,
                                                          std::uint64_t{spec.n_layers} * spec.n_experts);
  if (n_slots64 == 0)
    return invalid_argument("executor: cache budget of " + std::to_string(config.cache_bytes) +
                            " bytes is smaller than one expert (" + std::to_string(layout.total_bytes) + " bytes)");
  CacheConfig cc;
  cc.n_layers = spec.n_layers;
  cc.n_experts = spec.n_experts;
  cc.budget_bytes = n_slots64 * layout.total_bytes;
  auto cache = MixedPrecisionCache<Eviction>::create(std::move(cc), std::move(eviction));
  if (!cache) return cache.status();
  MoeLayerExecutor ex(store, config, std::move(backend), std::move(*cache), std::move(gate));
  ex.cache_layout_ = layout;
  MOEX_RETURN_IF_ERROR(ex.backend_.allocate_slots(layout.total_bytes, static_cast<std::size_t>(n_slots64)));
  ex.stats_.layers.resize(spec.n_layers);
  return ex;
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::route(std::uint32_t layer, const float* hidden, std::size_t n,
                                  std::span<TokenRouting> out) {
  const MoeModelSpec& spec = store_->spec();
  if (layer >= spec.n_layers) return invalid_argument("route: layer " + std::to_string(layer) + " out of range");
  if (hidden == nullptr && n > 0) return invalid_argument("route: hidden is null");
  if (out.size() < n) return invalid_argument("route: output span shorter than n");
  if (store_->is_virtual()) return unsupported("route: a virtual store has no routers; replay routing with forward_routed");
  if (config_.check_finite)
    for (std::size_t i = 0; i < n * spec.shape.hidden; ++i)
      if (!std::isfinite(hidden[i]))
        return invalid_argument("route: non-finite hidden state at token " + std::to_string(i / spec.shape.hidden));
  logits_.resize(n * spec.n_experts);
  router_logits(store_->router_weights(layer), spec.n_experts, spec.shape.hidden, hidden, n, logits_.data());
  for (std::size_t t = 0; t < n; ++t)
    MOEX_RETURN_IF_ERROR(route_token(spec.router, std::span<const float>(logits_.data() + t * spec.n_experts, spec.n_experts),
                                     store_->router_bias(layer), out[t]));
  return Status::ok();
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out) {
  if (layer >= store_->spec().n_layers) return invalid_argument("forward: layer " + std::to_string(layer) + " out of range");
  if (n == 0) return invalid_argument("forward: zero tokens");
  const std::uint64_t t0 = backend_.now_ns();
  routing_.resize(n);
  MOEX_RETURN_IF_ERROR(route(layer, hidden, n, routing_));
  stats_.layers[layer].route_ns += backend_.now_ns() - t0;
  return forward_routed(layer, routing_, hidden, n, out);
}

template <ExecutorPolicies P>
Result<std::size_t> MoeLayerExecutor<P>::acquire(ExpertKey key, LayerStats& ls) {
  if (auto hit = cache_.lookup(key, step_)) {
    ++ls.hits;
    return std::size_t{hit->slot};
  }
  const Precision p = cache_layout_.format.precision;
  ++ls.misses;
  ++ls.misses_by_precision[static_cast<std::size_t>(p)];
  auto src = store_->view(key, p);
  if (!src) return src.status();
  auto ins = cache_.insert(key, p, cache_layout_.total_bytes, step_);
  if (!ins) return ins.status();
  ls.evictions += ins->evicted.size();
  const std::size_t slot = ins->slot;
  if (slot >= backend_.slot_count()) {
    (void)cache_.erase(key);
    return internal_error("cache returned slot " + std::to_string(slot) + " beyond the backend's slots");
  }
  const std::uint64_t t0 = backend_.now_ns();
  if (Status s = backend_.load(slot, *src); !s.is_ok()) {
    (void)cache_.erase(key);  // never leave a half-loaded expert resident
    return s;
  }
  ls.stall_ns += backend_.now_ns() - t0;
  ls.bytes_loaded += cache_layout_.total_bytes;
  return slot;
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::forward_routed(std::uint32_t layer, std::span<const TokenRouting> routing,
                                           const float* hidden, std::size_t n, float* out) {
  const MoeModelSpec& spec = store_->spec();
  if (layer >= spec.n_layers) return invalid_argument("forward: layer " + std::to_string(layer) + " out of range");
  if (n == 0) return invalid_argument("forward: zero tokens");
  if constexpr (Backend::kHasData) {
    if (hidden == nullptr || out == nullptr) return invalid_argument("forward: null hidden or out");
  }
  if (routing.size() < n) return invalid_argument("forward: fewer routings than tokens");
  const std::size_t h = spec.shape.hidden;
  if (config_.check_finite && hidden != nullptr)
    for (std::size_t i = 0; i < n * h; ++i)
      if (!std::isfinite(hidden[i]))
        return invalid_argument("forward: non-finite hidden state at token " + std::to_string(i / h));
  const std::uint64_t t_begin = backend_.now_ns();
  LayerStats& ls = stats_.layers[layer];
  ++ls.steps;
  ls.tokens += n;

  // Gate, then group tokens by expert: (token, weight) lists in expert order.
  std::vector<std::vector<std::pair<std::uint32_t, float>>> users(spec.n_experts);
  for (std::size_t t = 0; t < n; ++t) {
    TokenRouting r = routing[t];
    if (r.k == 0 || r.k > kMaxTopK) return invalid_argument("forward: routing of token " + std::to_string(t) + " has bad k");
    ls.skipped += gate_.apply(layer, r);
    if (recording_) {
      const std::size_t tok = trace_next_[layer]++;
      const std::size_t per = std::size_t{trace_.n_layers} * trace_.top_k;
      if (trace_.expert_ids.size() < (tok + 1) * per) {
        trace_.expert_ids.resize((tok + 1) * per, kNoExpert);
        trace_.gate_weights.resize((tok + 1) * per, 0.f);
      }
      const std::size_t off = (tok * trace_.n_layers + layer) * trace_.top_k;
      for (std::uint32_t j = 0; j < trace_.top_k; ++j) {
        trace_.expert_ids[off + j] = j < r.k ? r.experts[j] : kNoExpert;
        trace_.gate_weights[off + j] = j < r.k ? r.weights[j] : 0.f;
      }
    }
    for (std::uint32_t j = 0; j < r.k; ++j) {
      if (r.experts[j] >= spec.n_experts) return invalid_argument("forward: routed expert id out of range");
      users[r.experts[j]].emplace_back(static_cast<std::uint32_t>(t), r.weights[j]);
    }
  }
  if (out != nullptr) std::fill(out, out + n * h, 0.f);
  for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
    const auto& u = users[e];
    if (u.empty()) continue;
    auto slot = acquire({layer, e}, ls);
    if (!slot) return slot.status();
    const ExpertView view = backend_.slot_view(*slot, cache_layout_);
    const std::size_t m = u.size();
    const bool data = hidden != nullptr && out != nullptr;
    if (data) {
      xg_.resize(m * h);
      yg_.resize(m * h);
      for (std::size_t i = 0; i < m; ++i) std::memcpy(&xg_[i * h], hidden + std::size_t{u[i].first} * h, h * sizeof(float));
    }
    const std::uint64_t t0 = backend_.now_ns();
    MOEX_RETURN_IF_ERROR(backend_.expert_ffn(view, data ? xg_.data() : nullptr, m, data ? yg_.data() : nullptr));
    ls.compute_ns += backend_.now_ns() - t0;
    ++ls.expert_calls;
    for (std::size_t i = 0; data && i < m; ++i) {
      float* o = out + std::size_t{u[i].first} * h;
      const float w = u[i].second;
      for (std::size_t c = 0; c < h; ++c) o[c] += w * yg_[i * h + c];
    }
  }
  ls.total_ns += backend_.now_ns() - t_begin;
  ++step_;
  return Status::ok();
}

MOEX_NAMESPACE_END
