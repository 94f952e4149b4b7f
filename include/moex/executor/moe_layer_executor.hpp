#pragma once
/// @file moe_layer_executor.hpp
/// MoeLayerExecutor: one MoE layer's step — route, gate, fetch experts through the cache (or run
/// them where they live), predict and prefetch the next layers, compute, combine — for every
/// layer of a model, composed from policy types.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/concepts/backend.hpp"
#include "moex/concepts/eviction.hpp"
#include "moex/concepts/gate.hpp"
#include "moex/concepts/miss_policy.hpp"
#include "moex/concepts/predictor.hpp"
#include "moex/concepts/prefetch_precision.hpp"
#include "moex/executor/default_policies.hpp"
#include "moex/executor/executor_config.hpp"
#include "moex/executor/stats.hpp"
#include "moex/formats/trace.hpp"
#include "moex/prefetch/prefetch_scheduler.hpp"
#include "moex/route/router.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

/// Every role of the executor, checked one by one so that an error names the role that failed.
template <class P>
concept ExecutorPolicies = EvictionPolicy<typename P::Eviction> && GatePolicy<typename P::Gate> &&
    ExecutionBackend<typename P::Backend> && Predictor<typename P::Predictor> && MissPolicy<typename P::Miss> &&
    PrefetchPrecisionPolicy<typename P::PrefetchPrecision>;

/// Runs the MoE layers of one model over an ExpertStore.
///
/// For each layer step: the router picks each token's experts (or a pre-gate already did), the
/// Gate may drop some, and each selected expert is served: from the fast tier when resident (a
/// hit, perhaps still arriving from a prefetch), else as the Miss policy decides — loaded in full
/// or low precision into a slot the Eviction policy frees, computed where its master copy lives,
/// or skipped. Before computing, the Predictor names the experts of the next layers and the
/// PrefetchScheduler starts their transfers, so they overlap this layer's compute. Outputs are
/// combined with the gate weights (renormalized over skipped experts).
///
/// With DefaultPolicies every step is exact: the output equals the dense layer's.
/// Thread safety: one executor per thread; the store may be shared by several executors.
/// Errors: every method returns a Status; nothing throws or aborts.
template <ExecutorPolicies P = DefaultPolicies>
class MoeLayerExecutor {
 public:
  using Policies = P;
  using Eviction = typename P::Eviction;
  using Gate = typename P::Gate;
  using Backend = typename P::Backend;
  using PredictorType = typename P::Predictor;
  using Miss = typename P::Miss;
  using PrefetchPrecision = typename P::PrefetchPrecision;

  /// Validates the configuration against the store and reserves the fast tier.
  /// Errors: kInvalidArgument for an incomplete store, a precision the store does not hold, or a
  /// budget smaller than one expert; kOutOfMemory when the fast tier cannot be reserved.
  static Result<MoeLayerExecutor> create(const ExpertStore& store, ExecutorConfig config, Backend backend = {},
                                         Eviction eviction = {}, Gate gate = {}, PredictorType predictor = {},
                                         Miss miss = {}, PrefetchPrecision prefetch_precision = {});

  MoeLayerExecutor(MoeLayerExecutor&&) noexcept = default;
  MoeLayerExecutor& operator=(MoeLayerExecutor&&) noexcept = default;

  /// Routes n tokens of `layer` with its router: out[t] gets token t's experts and weights.
  Status route(std::uint32_t layer, const float* hidden, std::size_t n, std::span<TokenRouting> out);

  /// out[n x hidden] = the whole MoE block's output: sum over each token's experts of weight *
  /// expert(hidden), plus the layer's shared expert where the model has one (Qwen2-MoE's scaled
  /// by its sigmoid gate; see MoeBlockSpec). The caller adds the residual. hidden and out must not
  /// alias.
  Status forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out);

  /// Like forward with the routing given (from a trace, or routed by the caller). On a backend
  /// without data (the simulator) hidden and out may be null.
  Status forward_routed(std::uint32_t layer, std::span<const TokenRouting> routing, const float* hidden, std::size_t n,
                        float* out);

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
  /// Number of expert slots in the fast tier at the cache precision.
  std::size_t slot_count() const noexcept { return backend_.slot_count(full_.format.precision); }
  /// Precision of resident experts (the full-precision pool).
  Precision cache_precision() const noexcept { return full_.format.precision; }
  /// True when `key` is resident (or arriving).
  bool resident(ExpertKey key) const noexcept { return cache_.contains(key); }
  /// The fast-tier cache (read-only: residency, budgets, its own counters).
  const MixedPrecisionCache<Eviction>& cache() const noexcept { return cache_; }
  Eviction& eviction() noexcept { return cache_.policy(); }
  Gate& gate() noexcept { return gate_; }
  PredictorType& predictor() noexcept { return predictor_; }
  Miss& miss_policy() noexcept { return miss_; }
  Backend& backend() noexcept { return backend_; }
  const Backend& backend() const noexcept { return backend_; }
  /// True when no policy in use can change the model's function.
  bool exact() const noexcept {
    bool routes = false;
    if constexpr (RoutingPredictor<PredictorType>) routes = predictor_.routes_layers();
    return gate_.exact() && miss_.exact() && prefetch_.precision_policy().exact() && !routes;
  }

 private:
  struct InFlight {
    LoadTicket ticket = 0;
    std::uint64_t bytes = 0;
    bool prefetch = false;
  };
  // The loads in flight, by dense key (layer * n_experts + expert), plus the list of keys in use
  // (unordered) to visit them all. Storage for every key is reserved in reset(), so set() and
  // erase() never allocate; a found entry's address stays valid (its contents go stale once
  // erased).
  class InFlightTable {
   public:
    void reset(std::size_t n_keys) {
      entries_.assign(n_keys, InFlight{});
      pos_.assign(n_keys, kNone);
      active_.clear();
      active_.reserve(n_keys);
    }
    InFlight* find(std::size_t k) noexcept { return pos_[k] == kNone ? nullptr : &entries_[k]; }
    void set(std::size_t k, const InFlight& f) noexcept {
      entries_[k] = f;
      if (pos_[k] != kNone) return;
      pos_[k] = static_cast<std::uint32_t>(active_.size());
      active_.push_back(static_cast<std::uint32_t>(k));  // capacity n_keys: never allocates
    }
    void erase(std::size_t k) noexcept {
      const std::uint32_t i = pos_[k];
      if (i == kNone) return;
      const std::uint32_t last = active_.back();
      active_[i] = last;
      pos_[last] = i;
      active_.pop_back();
      pos_[k] = kNone;
    }
    // Erases every entry for which pred(entry) holds (in no particular order).
    template <class Pred>
    void erase_if(Pred&& pred) noexcept {
      for (std::size_t i = 0; i < active_.size();) {
        const std::uint32_t k = active_[i];
        if (pred(entries_[k]))
          erase(k);  // the last key moves into i
        else
          ++i;
      }
    }

   private:
    static constexpr std::uint32_t kNone = 0xFFFFFFFFu;
    std::vector<InFlight> entries_;
    std::vector<std::uint32_t> pos_;     // index in active_, kNone when not in flight
    std::vector<std::uint32_t> active_;  // keys in flight
  };
  struct Serve {
    std::uint32_t expert = 0;
    enum Kind : std::uint8_t { kResident, kLoad, kAtSource, kSkip } kind = kResident;
    Precision precision = Precision::kBF16;
    std::uint32_t slot = 0;
    std::size_t first_row = 0;  // its rows in ys_
    bool issued = false;        // kLoad: its copy is queued
  };

  MoeLayerExecutor(const ExpertStore& store, ExecutorConfig config, Backend backend,
                   MixedPrecisionCache<Eviction> cache, Gate g, PredictorType pred, Miss miss,
                   PrefetchScheduler<PrefetchPrecision> sched)
      : store_(&store),
        config_(std::move(config)),
        backend_(std::move(backend)),
        cache_(std::move(cache)),
        gate_(std::move(g)),
        predictor_(std::move(pred)),
        miss_(std::move(miss)),
        prefetch_(std::move(sched)) {}

  const ExpertLayout& layout_of(Precision p) const noexcept { return p == full_.format.precision ? full_ : low_; }
  /// Inserts key in precision p (protected when prefetched) and starts its load. A demand load
  /// frees prefetch protection and retries once when protected entries leave no room.
  Status load(ExpertKey key, Precision p, bool prefetch, std::uint32_t& slot_out);
  /// Queues the copy of the first miss after serve_[from] not yet issued, so that the link carries
  /// it while the current miss (`current`, the only one loaded and not yet run) is waited on and
  /// computed. Only where the pool has room or one eviction makes room and its victim is not
  /// `current`; otherwise that miss is loaded in its turn, after `current` ran. Computing does not
  /// touch the cache, so every insert and victim is the one of loading each miss in turn.
  Status issue_next_miss(std::uint32_t layer, std::size_t from, ExpertKey current, LayerStats& ls);
  /// Loads miss `s` of `layer` (demand) and counts it in `ls`.
  Status load_miss(std::uint32_t layer, Serve& s, LayerStats& ls);
  void release_prefetch_protection() noexcept;
  /// Runs the shared expert of `layer` on all n tokens into shared_y_ (where the store holds it).
  Status run_shared(std::uint32_t layer, const float* hidden, std::size_t n, std::uint64_t& compute_ns);
  /// out[t] += (its gate, or 1) * shared_y_[t], after sync().
  void add_shared(std::uint32_t layer, const float* hidden, std::size_t n, float* out) const;
  /// A prefetch issued while serving `layer` may take free room, or the slot of the expert the
  /// eviction policy would give up, if that expert is not about to be used: one no layer has used
  /// for a whole pass, or one of a predicted layer that the prediction left out. It never
  /// displaces the working set of the layers ahead (wrong or early prefetches on a full cache
  /// would otherwise evict experts about to be used). With PrefetchAdmission::kCosted it must also
  /// pay: precision x overlap >= reuse x transfer + (1 - precision) x overlap, where precision is
  /// the target layer's measured share of right predictions, overlap = min(transfer, the measured
  /// window between issuing prefetches and the next demand x depth), and reuse the measured share
  /// of would-be victims wanted again while they would still have been resident.
  bool admit_prefetch(const PrefetchRequest& rq, std::uint32_t layer);
  void forget_in_flight(ExpertKey key) noexcept { in_flight_.erase(dense(key)); }
  std::size_t dense(ExpertKey key) const noexcept { return std::size_t{key.layer} * n_experts_ + key.expert; }

  const ExpertStore* store_ = nullptr;
  ExecutorConfig config_;
  Backend backend_;
  MixedPrecisionCache<Eviction> cache_;
  [[no_unique_address]] Gate gate_;
  [[no_unique_address]] PredictorType predictor_;
  [[no_unique_address]] Miss miss_;
  PrefetchScheduler<PrefetchPrecision> prefetch_;
  ExpertLayout full_{}, low_{};
  bool has_low_ = false;
  std::uint64_t step_ = 0;
  ExecutorStats stats_;
  InFlightTable in_flight_;
  std::uint32_t n_experts_ = 0;
  ExpertLayout master_layout_{};  // of the store's master copies (computing at the source)
  std::uint64_t prefetch_bytes_in_flight_ = 0;
  std::vector<std::vector<std::uint8_t>> predicted_;  // [layer][expert]: bit d-1 = predicted at depth d
  // Routing trace being recorded.
  bool recording_ = false;
  RoutingTrace trace_;
  std::vector<std::uint32_t> trace_next_;
  // Scratch reused across steps.
  std::vector<float> logits_, xg_, ys_, shared_y_;
  std::vector<TokenRouting> routing_, gated_;
  std::vector<std::vector<std::pair<std::uint32_t, float>>> users_;
  std::vector<std::uint32_t> selected_;  // experts with users_ this step, ascending
  std::vector<Serve> serve_;
  std::vector<Prediction> predictions_;
  std::vector<PrefetchRequest> issue_;
  std::vector<std::uint8_t> skipped_;
  // Cost-aware prefetch admission (ExecutorConfig::prefetch_admission): the step until which a
  // would-be victim is watched for reuse, per key; how many were watched and wanted again; and
  // the measured time between issuing prefetches and the next layer's first demand (EMA).
  std::vector<std::uint64_t> victim_watch_;
  std::uint64_t victims_watched_ = 0, victims_reused_ = 0;
  double overlap_window_ns_ = 0;
  std::uint64_t link_latency_ns_ = UINT64_MAX;  ///< smallest load_eta_ns(0) - now seen (admit_prefetch)
  std::uint64_t prefetch_issued_at_ = 0;
  bool window_open_ = false;
};

// ---- implementation (out of class, so extern template works) ----------------------------------

template <ExecutorPolicies P>
Result<MoeLayerExecutor<P>> MoeLayerExecutor<P>::create(const ExpertStore& store, ExecutorConfig config,
                                                        Backend backend, Eviction eviction, Gate gate,
                                                        PredictorType predictor, Miss miss,
                                                        PrefetchPrecision prefetch_precision) {
  if (!store.complete()) return invalid_argument("executor: the store is incomplete: " + store.missing());
  if (Backend::kHasData && store.is_virtual())
    return invalid_argument("executor: a virtual (shape-only) store needs a simulated backend");
  const MoeModelSpec& spec = store.spec();
  // A backend that would compute only part of the block is refused, never run wrong.
  if (Backend::kHasData && !spec.block.plain() && !backend_computes_expert_math<Backend>)
    return unsupported("executor: this model's MoE block has " + spec.block.extras() +
                       ", which this backend does not compute (the CPU backend does)");
  const Precision p = config.cache_precision.value_or(store.master_format().precision);
  auto fmt = store.format(p);
  if (!fmt)
    return invalid_argument("executor: the store holds no " + std::string(to_string(p)) +
                            " copy of its experts (build it with ExpertStore::build_precision)");
  const ExpertLayout full = expert_layout(spec.shape, *fmt);
  ExpertLayout low = full;
  const bool has_low = config.low_precision.has_value() && *config.low_precision != p;
  if (has_low) {
    auto lf = store.format(*config.low_precision);
    if (!lf)
      return invalid_argument("executor: low_precision " + std::string(to_string(*config.low_precision)) +
                              " is not held by the store");
    low = expert_layout(spec.shape, *lf);
    if (!(config.low_precision_share > 0.0 && config.low_precision_share < 1.0))
      return invalid_argument("executor: low_precision_share must lie strictly between 0 and 1");
  }
  const std::uint64_t all = std::uint64_t{spec.n_layers} * spec.n_experts * full.total_bytes;
  if (!config.layer_cache_bytes.empty() && config.layer_cache_bytes.size() != spec.n_layers)
    return invalid_argument("executor: layer_cache_bytes needs one budget per layer (" + std::to_string(spec.n_layers) +
                            ")");
  if (config.layer_cache_bytes.empty() && config.cache_bytes == 0)
    config.cache_bytes = std::max<std::uint64_t>(all / 4, full.total_bytes);
  if (config.layer_cache_bytes.empty() && config.cache_bytes < full.total_bytes)
    return invalid_argument("executor: cache budget of " + std::to_string(config.cache_bytes) +
                            " bytes is smaller than one expert (" + std::to_string(full.total_bytes) + " bytes)");
  if (config.max_prefetch_bytes_in_flight == 0) config.max_prefetch_bytes_in_flight = 2 * full.total_bytes;

  CacheConfig cc;
  cc.n_layers = spec.n_layers;
  cc.n_experts = spec.n_experts;
  cc.budget_bytes = config.cache_bytes;
  cc.layer_budget_bytes = config.layer_cache_bytes;
  if (has_low) {
    const std::uint64_t total = config.layer_cache_bytes.empty() ? config.cache_bytes : [&] {
      std::uint64_t s = 0;
      for (auto b : config.layer_cache_bytes) s += b;
      return s;
    }();
    cc.pools = PoolMode::kPerPrecision;
    const auto low_bytes = static_cast<std::uint64_t>(static_cast<double>(total) * config.low_precision_share);
    cc.precision_budget_bytes[static_cast<std::size_t>(p)] = total - low_bytes;
    cc.precision_budget_bytes[static_cast<std::size_t>(*config.low_precision)] = low_bytes;
  }
  auto cache = MixedPrecisionCache<Eviction>::create(std::move(cc), std::move(eviction));
  if (!cache) return cache.status();
  // Slots each pool can need: the sum over its eviction groups of what fits in the group.
  auto slots_for = [&](Precision prec, std::uint64_t bytes) {
    std::uint64_t n = 0;
    std::vector<std::uint8_t> seen(cache->group_count(), 0);
    for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
      const std::size_t g = cache->group_of({l, 0}, prec);
      if (g < seen.size() && !seen[g]) {
        seen[g] = 1;
        n += cache->group_budget(g) / bytes;
      }
    }
    return std::min<std::uint64_t>(n, std::uint64_t{spec.n_layers} * spec.n_experts);
  };
  // Every eviction group must hold at least one expert of its precision, or misses there fail.
  for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
    const std::size_t g = cache->group_of({l, 0}, p);
    if (cache->group_budget(g) < full.total_bytes)
      return invalid_argument("executor: the budget of layer " + std::to_string(l) + " (" +
                              std::to_string(cache->group_budget(g)) + " bytes) holds no " + std::string(to_string(p)) +
                              " expert (" + std::to_string(full.total_bytes) + " bytes)");
    if (has_low && cache->group_budget(cache->group_of({l, 0}, *config.low_precision)) < low.total_bytes)
      return invalid_argument("executor: the low-precision pool of layer " + std::to_string(l) + " holds no " +
                              std::string(to_string(*config.low_precision)) + " expert (" +
                              std::to_string(low.total_bytes) + " bytes): raise low_precision_share or the budget");
  }
  const std::uint64_t n_full = slots_for(p, full.total_bytes);
  const std::uint64_t n_low = has_low ? slots_for(*config.low_precision, low.total_bytes) : 0;
  if (n_full == 0) return invalid_argument("executor: no layer's budget holds one expert at the cache precision");
  PrefetchScheduler<PrefetchPrecision> sched(PrefetchConfig{config.max_prefetch_bytes_in_flight, 1024},
                                             std::move(prefetch_precision));
  MoeLayerExecutor ex(store, config, std::move(backend), std::move(*cache), std::move(gate), std::move(predictor),
                      std::move(miss), std::move(sched));
  ex.full_ = full;
  ex.low_ = low;
  ex.has_low_ = has_low;
  MOEX_RETURN_IF_ERROR(ex.backend_.allocate_slots(p, full.total_bytes, static_cast<std::size_t>(n_full)));
  if (has_low) {
    if (n_low > 0)
      MOEX_RETURN_IF_ERROR(
          ex.backend_.allocate_slots(*config.low_precision, low.total_bytes, static_cast<std::size_t>(n_low)));
  }
  ex.stats_.layers.resize(spec.n_layers);
  ex.predicted_.assign(spec.n_layers, std::vector<std::uint8_t>(spec.n_experts, 0));
  ex.users_.resize(spec.n_experts);
  ex.selected_.reserve(spec.n_experts);
  ex.n_experts_ = spec.n_experts;
  ex.master_layout_ = expert_layout(spec.shape, store.master_format());
  ex.in_flight_.reset(std::size_t{spec.n_layers} * spec.n_experts);
  ex.victim_watch_.assign(std::size_t{spec.n_layers} * spec.n_experts, 0);
  ex.stats_.resident_shared_bytes = store.shared_expert_bytes();
  return ex;
}

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
Status MoeLayerExecutor<P>::route(std::uint32_t layer, const float* hidden, std::size_t n,
                                  std::span<TokenRouting> out) {
  const MoeModelSpec& spec = store_->spec();
  if (layer >= spec.n_layers) return invalid_argument("route: layer " + std::to_string(layer) + " out of range");
  if (hidden == nullptr && n > 0) return invalid_argument("route: hidden is null");
  if (out.size() < n) return invalid_argument("route: output span shorter than n");
  if (store_->is_virtual())
    return unsupported("route: a virtual store has no routers; replay routing with forward_routed");
  if (config_.check_finite)
    for (std::size_t i = 0; i < n * spec.shape.hidden; ++i)
      if (!std::isfinite(hidden[i]))
        return invalid_argument("route: non-finite hidden state at token " + std::to_string(i / spec.shape.hidden));
  logits_.resize(n * spec.n_experts);
  router_logits(store_->router_weights(layer), spec.n_experts, spec.shape.hidden, hidden, n, logits_.data());
  for (std::size_t t = 0; t < n; ++t)
    MOEX_RETURN_IF_ERROR(route_token(spec.router,
                                     std::span<const float>(logits_.data() + t * spec.n_experts, spec.n_experts),
                                     store_->router_bias(layer), out[t]));
  return Status::ok();
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out) {
  if (layer >= store_->spec().n_layers)
    return invalid_argument("forward: layer " + std::to_string(layer) + " out of range");
  if (n == 0) return invalid_argument("forward: zero tokens");
  const std::uint64_t t0 = backend_.now_ns();
  routing_.resize(n);
  bool routed = false;
  if constexpr (RoutingPredictor<PredictorType>) routed = predictor_.take_routing(layer, routing_);
  if (!routed) MOEX_RETURN_IF_ERROR(route(layer, hidden, n, routing_));
  stats_.layers[layer].route_ns += backend_.now_ns() - t0;
  return forward_routed(layer, routing_, hidden, n, out);
}

template <ExecutorPolicies P>
void MoeLayerExecutor<P>::release_prefetch_protection() noexcept {
  for (std::uint32_t l = 0; l < predicted_.size(); ++l)
    for (std::uint32_t e = 0; e < predicted_[l].size(); ++e)
      if (predicted_[l][e]) (void)cache_.unprotect({l, e});
}

template <ExecutorPolicies P>
bool MoeLayerExecutor<P>::admit_prefetch(const PrefetchRequest& rq, std::uint32_t layer) {
  const std::size_t g = cache_.group_of(rq.key, rq.precision);
  if (cache_.group_used(g) + rq.bytes <= cache_.group_budget(g)) return true;
  const auto victim_view = cache_.peek_victim(g);
  if (!victim_view) return false;
  const SlotView victim = *victim_view;
  const std::uint32_t n_layers = store_->spec().n_layers;
  const std::uint32_t horizon = layer + predictor_.depth();
  const bool safe = victim.last_step + n_layers <= step_ || (victim.key.layer > layer && victim.key.layer <= horizon &&
                                                             !predicted_[victim.key.layer][victim.key.expert]);
  if (!safe) return false;
  if (config_.prefetch_admission == ExecutorConfig::PrefetchAdmission::kAlways) return true;
  // Watch the victim: whether it is wanted while it would otherwise still be resident measures
  // the damage of evicting it, whether or not this prefetch goes ahead. A victim of a predicted
  // layer is watched until that layer runs next (wanted then = the prediction missed it); any
  // other until an entry of the group typically leaves (entries over inserts per step).
  std::uint64_t& watch = victim_watch_[std::size_t{victim.key.layer} * store_->spec().n_experts + victim.key.expert];
  if (watch <= step_) ++victims_watched_;
  if (victim.key.layer > layer && victim.key.layer <= horizon) {
    watch = step_ + (victim.key.layer - layer) + 1;
  } else {
    const double inserts =
        static_cast<double>(cache_.stats().insertions) / static_cast<double>(std::max<std::uint64_t>(step_, 1));
    const double stay = inserts > 0 ? static_cast<double>(cache_.group_views(g).size()) / inserts : n_layers;
    watch = step_ + 1 + static_cast<std::uint64_t>(std::clamp(stay, 1.0, 1e9));
  }
  // Expected saving against expected damage (ExecutorConfig::prefetch_admission).
  const LayerStats& target = stats_.layers[rq.key.layer];
  const double precision =
      (static_cast<double>(target.predicted_correct) + 1.0) / (static_cast<double>(target.predicted) + 2.0);
  const double reuse = (static_cast<double>(victims_reused_) + 1.0) / (static_cast<double>(victims_watched_) + 2.0);
  // The transfer overlaps compute only where the link is free inside the window: a backlog
  // already queued (this layer's misses, earlier prefetches) runs first, and a prefetch queued
  // behind a backlog longer than the window only delays the demand loads that follow it. An idle
  // link still shows its fixed latency in load_eta_ns(0) - now; the smallest such lead seen is
  // taken as that latency and is not backlog (the demand load would pay it too).
  const std::uint64_t now = backend_.now_ns();
  const std::uint64_t queued = backend_.load_eta_ns(0), done = backend_.load_eta_ns(rq.bytes);
  const std::uint64_t lead = queued - std::min(queued, now);
  link_latency_ns_ = std::min(link_latency_ns_, lead);
  const double transfer = static_cast<double>(done - std::min(queued, done));
  const double backlog = static_cast<double>(lead - link_latency_ns_);
  const double window = overlap_window_ns_ * static_cast<double>(rq.key.layer - layer);
  const double overlap = std::clamp(window - backlog, 0.0, transfer);
  return precision * overlap >= reuse * transfer + (1.0 - precision) * overlap;
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::issue_next_miss(std::uint32_t layer, std::size_t from, ExpertKey current, LayerStats& ls) {
  for (std::size_t j = from + 1; j < serve_.size(); ++j) {
    Serve& t = serve_[j];
    if (t.kind != Serve::kLoad || t.issued) continue;
    const ExpertKey key{layer, t.expert};
    const std::size_t g = cache_.group_of(key, t.precision);
    const std::uint64_t bytes = layout_of(t.precision).total_bytes;
    if (cache_.group_used(g) + bytes > cache_.group_budget(g)) {
      const auto victim = cache_.peek_victim(g);
      if (!victim || victim->key == current || cache_.group_used(g) - victim->bytes + bytes > cache_.group_budget(g))
        return Status::ok();  // loaded in its turn instead
    }
    return load_miss(layer, t, ls);
  }
  return Status::ok();
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::load_miss(std::uint32_t layer, Serve& s, LayerStats& ls) {
  MOEX_RETURN_IF_ERROR(load({layer, s.expert}, s.precision, false, s.slot));
  s.issued = true;
  ++ls.misses_by_precision[static_cast<std::size_t>(s.precision)];
  ls.bytes_loaded += layout_of(s.precision).total_bytes;
  return Status::ok();
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::load(ExpertKey key, Precision p, bool prefetch, std::uint32_t& slot_out) {
  // A virtual store's view is its layout (no bytes): the executor has the layouts of both pools.
  const bool known = p == full_.format.precision || (has_low_ && p == low_.format.precision);
  auto src = (!Backend::kHasData && store_->is_virtual() && known && key.layer < store_->spec().n_layers &&
              key.expert < n_experts_)
                 ? Result<ExpertView>(ExpertView{nullptr, nullptr, nullptr, layout_of(p), nullptr})
                 : store_->view(key, p);
  if (!src) return src.status();
  const std::uint64_t bytes = layout_of(p).total_bytes;
  // Prefetched experts stay protected until used or proven wrong; demand loads are used at once.
  auto ins = cache_.insert(key, p, bytes, step_, /*protect=*/prefetch);
  if (!ins && ins.status().code() == StatusCode::kOutOfMemory && !prefetch) {
    release_prefetch_protection();
    ins = cache_.insert(key, p, bytes, step_, false);
  }
  if (!ins) return ins.status();
  for (const EvictedEntry& ev : ins->evicted) {
    ++stats_.layers[ev.key.layer].evictions;
    if (InFlight* f = in_flight_.find(dense(ev.key))) {  // evicted while arriving
      backend_.cancel_load(f->ticket);
      if (f->prefetch) {
        prefetch_bytes_in_flight_ -= f->bytes;
        stats_.layers[ev.key.layer].prefetch_wasted_bytes += f->bytes;
      }
      in_flight_.erase(dense(ev.key));
    }
    if (ev.key.layer < predicted_.size() && predicted_[ev.key.layer][ev.key.expert] && ev.precision == p)
      stats_.layers[ev.key.layer].prefetch_wasted_bytes += ev.bytes;
  }
  if (ins->slot >= backend_.slot_count(p)) {
    (void)cache_.erase(key);
    return internal_error("cache returned slot " + std::to_string(ins->slot) + " beyond the backend's slots");
  }
  LoadTicket ticket = 0;
  if (Status s = backend_.start_load(p, ins->slot, *src, ticket); !s.is_ok()) {
    (void)cache_.erase(key);  // never leave a half-loaded expert resident
    return s;
  }
  in_flight_.set(dense(key), InFlight{ticket, bytes, prefetch});
  if (prefetch) prefetch_bytes_in_flight_ += bytes;
  slot_out = ins->slot;
  return Status::ok();
}

template <ExecutorPolicies P>
Status MoeLayerExecutor<P>::run_shared(std::uint32_t layer, const float* hidden, std::size_t n,
                                       std::uint64_t& compute_ns) {
  auto v = store_->shared_expert(layer);
  if (!v) return v.status();
  shared_y_.resize(n * store_->spec().shape.hidden);
  const std::uint64_t t0 = backend_.now_ns();
  // The store's copy is the resident one (host RAM): run where it lives.
  const Status st = backend_.expert_ffn_at_source(*v, hidden, n, shared_y_.data());
  compute_ns += backend_.now_ns() - t0;
  return st;
}

template <ExecutorPolicies P>
void MoeLayerExecutor<P>::add_shared(std::uint32_t layer, const float* hidden, std::size_t n, float* out) const {
  const std::size_t h = store_->spec().shape.hidden;
  const std::span<const float> g = store_->shared_gate(layer);
  for (std::size_t t = 0; t < n; ++t) {
    float scale = 1.f;
    if (!g.empty()) {  // Qwen2-MoE: sigmoid(g . x), accumulated in double like the router
      double z = 0;
      for (std::size_t c = 0; c < h; ++c) z += static_cast<double>(g[c]) * hidden[t * h + c];
      scale = static_cast<float>(1.0 / (1.0 + std::exp(-z)));
    }
    float* o = out + t * h;
    const float* y = &shared_y_[t * h];
    for (std::size_t c = 0; c < h; ++c) o[c] += scale * y[c];
  }
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
  for (std::size_t t = 0; t < n; ++t) {
    if (routing[t].k == 0 || routing[t].k > kMaxTopK)
      return invalid_argument("forward: routing of token " + std::to_string(t) + " has bad k");
    for (std::uint32_t j = 0; j < routing[t].k; ++j)
      if (routing[t].experts[j] >= spec.n_experts) return invalid_argument("forward: routed expert id out of range");
  }
  const std::uint64_t t_begin = backend_.now_ns();
  LayerStats& ls = stats_.layers[layer];
  ++ls.steps;
  ls.tokens += n;
  const bool data = hidden != nullptr && out != nullptr;

  // 1. Gate, record, and group tokens by expert.
  gated_.assign(routing.begin(), routing.begin() + static_cast<std::ptrdiff_t>(n));
  for (std::uint32_t e : selected_) users_[e].clear();
  selected_.clear();
  for (std::size_t t = 0; t < n; ++t) {
    TokenRouting& r = gated_[t];
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
      auto& u = users_[r.experts[j]];
      if (u.empty()) selected_.push_back(r.experts[j]);  // capacity n_experts: each expert once
      u.emplace_back(static_cast<std::uint32_t>(t), r.weights[j]);
    }
  }
  // Experts are served in ascending order (a few at batch 1: insertion sort).
  if (selected_.size() > 16) {
    std::sort(selected_.begin(), selected_.end());
  } else {
    for (std::size_t i = 1; i < selected_.size(); ++i) {
      const std::uint32_t x = selected_[i];
      std::size_t j = i;
      for (; j > 0 && selected_[j - 1] > x; --j) selected_[j] = selected_[j - 1];
      selected_[j] = x;
    }
  }

  // 2. Predictions made for this layer: recall, and stale ones dropped.
  prefetch_.drop_layer(layer);
  std::vector<std::uint8_t>& pred = predicted_[layer];
  // Recall counts layers a predictor can reach (not layer 0, nor anything without a predictor);
  // per depth d, over the layers that received depth-d predictions.
  const bool predictable = predictor_.depth() > 0 && layer > 0;
  std::uint8_t depths = 0;
  for (std::uint8_t m : pred) depths |= m;
  for (std::uint32_t d = 0; d < 8 && (depths >> d); ++d) {
    if (!((depths >> d) & 1u)) continue;
    if (stats_.depths.size() <= d) stats_.depths.resize(d + 1);
    stats_.depths[d].selected += selected_.size();
    for (std::uint32_t e : selected_) stats_.depths[d].predicted_correct += (pred[e] >> d) & 1u;
  }
  if (predictable) ls.selected += selected_.size();
  for (std::uint32_t e = 0; e < spec.n_experts && depths != 0; ++e) {
    const bool sel = !users_[e].empty();
    if (!pred[e]) continue;
    ++ls.predicted;
    ls.predicted_correct += sel;
    if (!sel) {
      const ExpertKey key{layer, e};
      if (InFlight* f = in_flight_.find(dense(key)); f != nullptr && !backend_.load_done(f->ticket)) {
        // Still arriving and proven wrong: cancel it and give its slot back.
        backend_.cancel_load(f->ticket);
        prefetch_bytes_in_flight_ -= f->prefetch ? f->bytes : 0;
        ls.prefetch_wasted_bytes += f->bytes;
        in_flight_.erase(dense(key));
        (void)cache_.erase(key);
      } else if (cache_.contains(key)) {
        (void)cache_.unprotect(key);
        if (auto e2 = cache_.peek(key); e2 && e2->hits == 0) ls.prefetch_wasted_bytes += e2->bytes;
      }
    }
  }

  // 3. Decide how each selected expert is served.
  serve_.clear();
  std::size_t rows = 0;
  const Precision full_p = full_.format.precision;
  const Precision low_p = has_low_ ? low_.format.precision : full_p;
  const ExpertLayout& master_layout = master_layout_;
  // Work this step has already planned for each path, so that ETAs see the queues it builds.
  std::uint64_t planned_link_bytes = 0, planned_source_ns = 0;
  for (const std::uint32_t e : selected_) {
    const auto& u = users_[e];
    const ExpertKey key{layer, e};
    Serve s;
    s.expert = e;
    s.first_row = rows;
    if (std::uint64_t& w = victim_watch_[std::size_t{layer} * spec.n_experts + e]; w > step_) {
      ++victims_reused_;
      w = 0;
    }
    if (auto hit = cache_.lookup(key, step_)) {
      ++ls.hits;
      if (pred[e]) ++ls.prefetch_hits;
      s.kind = Serve::kResident;
      s.precision = hit->precision;
      s.slot = hit->slot;
    } else {
      // HOBBIT's importance of this expert for its tokens: its best rank and weight.
      MissContext mc;
      mc.key = key;
      mc.rank = kMaxTopK;
      mc.unimportance = 1.f;
      for (const auto& [t, w] : u) {
        const TokenRouting& r = gated_[t];
        float total = 0.f, before = 0.f;
        std::uint32_t rank = 0;
        for (std::uint32_t j = 0; j < r.k; ++j) total += r.weights[j];
        for (std::uint32_t j = 0; j < r.k && r.experts[j] != e; ++j) {
          before += r.weights[j];
          ++rank;
        }
        const float norm = total > 0.f ? 1.f / total : 0.f;
        mc.rank = std::min(mc.rank, rank);
        mc.weight = std::max(mc.weight, w * norm);
        mc.unimportance = std::min(mc.unimportance, before * norm);
      }
      mc.tokens = static_cast<std::uint32_t>(u.size());
      mc.cache_precision = full_p;
      mc.low_precision = low_p;
      mc.now_ns = backend_.now_ns();
      mc.load_eta_ns = backend_.load_eta_ns(planned_link_bytes + full_.total_bytes);
      mc.load_low_eta_ns = backend_.load_eta_ns(planned_link_bytes + low_.total_bytes);
      const std::uint64_t source_alone = backend_.source_eta_ns(master_layout, u.size());
      mc.source_eta_ns = source_alone == UINT64_MAX ? UINT64_MAX : source_alone + planned_source_ns;
      const MissDecision d = miss_.decide(mc);
      ++ls.misses;
      if (d.action == MissAction::kSkip) {
        s.kind = Serve::kSkip;
        ls.skipped += u.size();
      } else if (d.action == MissAction::kComputeAtSource) {
        s.kind = Serve::kAtSource;
        planned_source_ns += source_alone - std::min(source_alone, mc.now_ns);
        s.precision = store_->master_format().precision;
        ++ls.computed_at_source;
      } else {
        s.kind = Serve::kLoad;
        s.precision = (d.precision == low_p && has_low_) ? low_p : full_p;
        planned_link_bytes += layout_of(s.precision).total_bytes;
      }
    }
    if (s.kind != Serve::kSkip) rows += u.size();
    serve_.push_back(s);
  }

  // 4. Predict the next layers' experts (the transfers start after this layer's own loads).
  if (predictor_.depth() > 0 && layer + 1 < spec.n_layers) {
    predictions_.clear();
    PredictContext pc{layer, hidden, n, std::span<const TokenRouting>(gated_.data(), n), step_, store_};
    MOEX_RETURN_IF_ERROR(predictor_.predict(pc, predictions_));
    for (const Prediction& pr : predictions_) {
      if (pr.key.layer <= layer || pr.key.layer >= spec.n_layers || pr.key.expert >= spec.n_experts) continue;
      predicted_[pr.key.layer][pr.key.expert] |=
          static_cast<std::uint8_t>(1u << (std::min<std::uint32_t>(std::max(pr.depth, 1u), 8u) - 1));
      const bool have = cache_.contains(pr.key);
      if (have) (void)cache_.protect(pr.key);  // keep a predicted resident expert until it is used
      prefetch_.request(pr, full_p, low_p, full_.total_bytes, low_.total_bytes, have);
    }
  }

  // 5. Compute: resident experts that are ready, experts at their source (the host runs them
  //    while copies arrive), prefetches still arriving, then the misses in order; miss i+1's copy
  //    is queued before miss i is waited on and run (issue_next_miss), so the link never waits for
  //    the host, and expert i computes while i+1 loads.
  if (data) {
    xg_.resize(rows * h);
    ys_.resize(rows * h);
    for (const Serve& s : serve_) {
      if (s.kind == Serve::kSkip) continue;
      const auto& u = users_[s.expert];
      for (std::size_t i = 0; i < u.size(); ++i)
        std::memcpy(&xg_[(s.first_row + i) * h], hidden + std::size_t{u[i].first} * h, h * sizeof(float));
    }
  }
  if (window_open_) {  // the prefetches issued last step had until now to arrive
    const auto sample = static_cast<double>(backend_.now_ns() - std::min(backend_.now_ns(), prefetch_issued_at_));
    overlap_window_ns_ = overlap_window_ns_ == 0 ? sample : 0.9 * overlap_window_ns_ + 0.1 * sample;
    window_open_ = false;
  }
  std::uint64_t compute_ns = 0;
  auto run = [&](const Serve& s) -> Status {
    const auto& u = users_[s.expert];
    const float* x = data ? &xg_[s.first_row * h] : nullptr;
    float* y = data ? &ys_[s.first_row * h] : nullptr;
    const std::uint64_t t0 = backend_.now_ns();
    Status st;
    if (s.kind == Serve::kAtSource) {
      auto v = store_->master({layer, s.expert});  // carries the expert's math
      if (!v) return v.status();
      st = backend_.expert_ffn_at_source(*v, x, u.size(), y);
    } else {
      ExpertView v = backend_.slot_view(s.precision, s.slot, layout_of(s.precision));
      v.math = store_->expert_math({layer, s.expert});  // biases stay in the store, whatever the slot
      st = backend_.expert_ffn(v, x, u.size(), y);
    }
    compute_ns += backend_.now_ns() - t0;
    ++ls.expert_calls;
    return st;
  };
  for (int pass = 0; pass < 4; ++pass) {
    for (Serve& s : serve_) {
      if (s.kind == Serve::kSkip) continue;
      const ExpertKey key{layer, s.expert};
      InFlight* f = in_flight_.find(dense(key));
      bool arriving = s.kind == Serve::kResident && f != nullptr;
      // Host work is asynchronous: start it before waiting on anything the link still carries.
      const int want = s.kind == Serve::kLoad ? 3 : s.kind == Serve::kAtSource ? 1 : (arriving ? 2 : 0);
      if (want != pass) continue;
      const std::uint64_t t0 = backend_.now_ns();
      if (s.kind == Serve::kLoad) {
        if (!s.issued) MOEX_RETURN_IF_ERROR(load_miss(layer, s, ls));
        // Queue the next miss's copy before waiting on this one: otherwise the link idles while
        // the host waits, launches this expert and (on backends that return results to the host)
        // waits for its compute — measured ~46 us a miss on the H100 with 9.4 MB experts.
        MOEX_RETURN_IF_ERROR(issue_next_miss(layer, static_cast<std::size_t>(&s - serve_.data()), key, ls));
        f = in_flight_.find(dense(key));
        arriving = f != nullptr;
      }
      if (arriving) {
        MOEX_RETURN_IF_ERROR(backend_.wait_load(f->ticket));
        if (f->prefetch) prefetch_bytes_in_flight_ -= f->bytes;
        in_flight_.erase(dense(key));
        ls.stall_ns += backend_.now_ns() - t0;
      }
      MOEX_RETURN_IF_ERROR(run(s));
    }
  }

  if (depths != 0) std::fill(pred.begin(), pred.end(), 0);  // this layer's predictions are settled
  if (data && spec.block.shared_ffn != 0) MOEX_RETURN_IF_ERROR(run_shared(layer, hidden, n, compute_ns));

  // 6. Start the predicted transfers, behind this layer's own loads on the link; they overlap
  //    the compute still queued and the next layers' routing.
  if (predictor_.depth() > 0 && layer + 1 < spec.n_layers) {
    // Retire finished prefetches, then issue within the in-flight bound.
    in_flight_.erase_if([&](const InFlight& f) {
      if (!f.prefetch || !backend_.load_done(f.ticket)) return false;
      prefetch_bytes_in_flight_ -= f.bytes;
      return true;
    });
    issue_.clear();
    prefetch_.take_issuable(prefetch_bytes_in_flight_, layer, spec.n_layers, issue_);
    for (const PrefetchRequest& rq : issue_) {
      if (cache_.contains(rq.key) || !admit_prefetch(rq, layer)) continue;
      std::uint32_t slot = 0;
      if (load(rq.key, rq.precision, true, slot).is_ok()) ++stats_.layers[rq.key.layer].prefetches;
    }
    prefetch_issued_at_ = backend_.now_ns();
    window_open_ = true;
  }

  {
    const std::uint64_t t0 = backend_.now_ns();
    MOEX_RETURN_IF_ERROR(backend_.sync());
    ls.compute_ns += compute_ns + (backend_.now_ns() - t0);
  }

  // 7. Combine, renormalizing each token over the experts it kept.
  if (data) {
    std::fill(out, out + n * h, 0.f);
    skipped_.assign(spec.n_experts, 0);
    for (const Serve& s : serve_) skipped_[s.expert] = s.kind == Serve::kSkip;
    for (const Serve& s : serve_) {
      if (s.kind == Serve::kSkip) continue;
      const auto& u = users_[s.expert];
      for (std::size_t i = 0; i < u.size(); ++i) {
        const TokenRouting& r = gated_[u[i].first];
        float total = 0.f, kept = 0.f;
        for (std::uint32_t j = 0; j < r.k; ++j) {
          total += r.weights[j];
          kept += skipped_[r.experts[j]] ? 0.f : r.weights[j];
        }
        const float w = kept > 0.f ? u[i].second * (total / kept) : 0.f;
        float* o = out + std::size_t{u[i].first} * h;
        const float* y = &ys_[(s.first_row + i) * h];
        for (std::size_t c = 0; c < h; ++c) o[c] += w * y[c];
      }
    }
    if (spec.block.shared_ffn != 0) add_shared(layer, hidden, n, out);
  }
  ls.total_ns += backend_.now_ns() - t_begin;
  ++step_;
  return Status::ok();
}

MOEX_NAMESPACE_END
