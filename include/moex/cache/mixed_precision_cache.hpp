#pragma once
/// @file mixed_precision_cache.hpp
/// MixedPrecisionCache: the byte-budget bookkeeping of fast memory (which experts are resident,
/// in which precision, in which slot), with a pluggable EvictionPolicy.

#include <array>
#include <cstddef>
#include <cstdint>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moex/cache/rank_heap_index.hpp"
#include "moex/concepts/eviction.hpp"
#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Whether experts of different precisions share one byte budget or each precision has its own.
enum class PoolMode : std::uint8_t {
  kShared = 0,        ///< one pool; slot ids are shared by all precisions
  kPerPrecision = 1,  ///< one pool per precision; slot ids are per precision
};

/// Configuration of a MixedPrecisionCache. Zero/empty fields mean "not used".
struct CacheConfig {
  std::uint32_t n_layers = 0;   ///< keys have layer < n_layers (required)
  std::uint32_t n_experts = 0;  ///< keys have expert < n_experts (required)
  /// Total budget in bytes (PoolMode::kShared without per-layer budgets).
  std::uint64_t budget_bytes = 0;
  /// Non-empty: one budget per layer (size n_layers); each layer is its own eviction group and
  /// budget_bytes is ignored (AdapMoE-style allocation, see cache/layer_budget.hpp).
  std::vector<std::uint64_t> layer_budget_bytes;
  /// kPerPrecision: each precision its own pool with precision_budget_bytes[p] bytes (0 = that
  /// precision cannot be cached). With per-layer budgets too, each layer's budget is split among
  /// the precisions in proportion to precision_budget_bytes.
  PoolMode pools = PoolMode::kShared;
  std::array<std::uint64_t, kPrecisionCount> precision_budget_bytes{};
  /// A use counts as high precision (SlotView::hp_uses, HOBBIT) when precision_bits >= this.
  std::uint32_t high_precision_bits = 16;
  /// A group keeps a victim index (rank heap, policy index) only once it has more than this many
  /// candidates, and drops it again when it falls below half of it; smaller groups are decided by
  /// choose_victim's linear scan, which costs less than updating an index on every hit. The
  /// victims are the same either way. 0 = every group always indexed. Unset: the policy's
  /// `E::kVictimIndexMinCandidates` where it declares one, else kDefaultVictimIndexMinCandidates.
  std::optional<std::uint32_t> victim_index_min_candidates;
  /// Default threshold for policies that declare none, measured with bench/micro/cache_bench.cpp
  /// (BM_IndexCrossover, BM_Replay): below it the linear scan is about as fast as the index.
  static constexpr std::uint32_t kDefaultVictimIndexMinCandidates = 24;
};

namespace detail {
/// The index threshold a policy asks for (see CacheConfig::victim_index_min_candidates).
template <class P>
constexpr std::uint32_t victim_index_min_candidates_of() noexcept {
  if constexpr (requires { std::uint32_t{P::kVictimIndexMinCandidates}; })
    return P::kVictimIndexMinCandidates;
  else
    return CacheConfig::kDefaultVictimIndexMinCandidates;
}
}  // namespace detail

/// What the cache knows about one resident expert.
struct CacheEntry {
  std::uint32_t slot = 0;  ///< dense slot id within its pool (the backend maps it to memory)
  Precision precision = Precision::kBF16;
  std::uint64_t bytes = 0;
  std::uint32_t hits = 0;     ///< hits since insertion
  std::uint32_t hp_uses = 0;  ///< high-precision uses since insertion
  std::uint64_t last_step = 0;
  bool is_protected = false;  ///< protected from eviction (see protect())
};

/// One expert that left the cache during an insert.
struct EvictedEntry {
  ExpertKey key;
  std::uint32_t slot = 0;  ///< the slot id it freed (in the pool of `precision`)
  Precision precision = Precision::kBF16;
  std::uint64_t bytes = 0;
};

/// The outcome of MixedPrecisionCache::insert.
struct InsertResult {
  std::uint32_t slot = 0;  ///< slot id of the inserted expert, within its pool
  /// Entries evicted (or replaced: the old precision of the same key) to make room, in order.
  /// Borrowed: valid until the next non-const call on the cache.
  std::span<const EvictedEntry> evicted;
};

/// Per-layer counters.
struct CacheLayerStats {
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
};

/// Counters since creation or reset_stats().
struct CacheStats {
  std::uint64_t hits = 0;          ///< lookups that found the key
  std::uint64_t misses = 0;        ///< lookups that did not
  std::uint64_t insertions = 0;    ///< entries made resident
  std::uint64_t evictions = 0;     ///< entries chosen by the policy and removed
  std::uint64_t replacements = 0;  ///< entries removed because the same key came in another precision
  std::uint64_t bytes_inserted = 0;
  std::uint64_t bytes_evicted = 0;
  std::vector<CacheLayerStats> per_layer;  ///< [n_layers]

  /// hits / (hits + misses), 0 when there were no lookups.
  double hit_rate() const noexcept {
    const std::uint64_t n = hits + misses;
    return n ? static_cast<double>(hits) / static_cast<double>(n) : 0.0;
  }
};

namespace detail {
/// The victim index of a policy without a fast path: the cache calls choose_victim.
template <class P>
struct NoVictimIndex {
  Status reserve(const VictimIndexShape&) { return Status::ok(); }
  void reserve_add(std::uint32_t, ExpertKey, std::size_t) {}
  void add(P&, std::uint32_t, const SlotView&) noexcept {}
  void update(P&, std::uint32_t, const SlotView&) noexcept {}
  void remove(P&, std::uint32_t, const SlotView&) noexcept {}
  template <class ViewOf>
  bool victim(P&, std::uint32_t, const VictimQuery&, ViewOf&&, ExpertKey&) noexcept {
    return false;
  }
};

template <class P>
struct VictimIndexFor {
  using type = NoVictimIndex<P>;
};
template <class P>
requires RankedEviction<P> &&(!IndexedEviction<P>)struct VictimIndexFor<P> {
  using type = RankHeapIndex<P>;
};
template <class P>
requires IndexedEviction<P>
struct VictimIndexFor<P> {
  using type = typename P::VictimIndex;
};
}  // namespace detail

/// MixedPrecisionCache — which experts are resident in fast memory, in which precision and slot.
///
/// Experts are grouped into eviction groups: one per layer when per-layer budgets are given,
/// times one per precision with PoolMode::kPerPrecision; otherwise a single group. Each group has
/// a byte budget that is never exceeded; an insert evicts from the group the new entry belongs
/// to, asking the policy for victims among that group's unprotected entries until it fits.
///
/// Victim choice: for a RankedEviction policy the cache keeps the candidates of each large group
/// in an indexed heap of ranks (RankHeapIndex), for an IndexedEviction policy in the policy's own
/// VictimIndex; otherwise, and for groups of at most CacheConfig::victim_index_min_candidates
/// candidates, it calls choose_victim over the group's candidates. A group's index is built from
/// its candidates when the group grows past that threshold and dropped when it shrinks below half
/// of it (hysteresis, so a group at the threshold does not rebuild on every insert). Either way the
/// victim is the one choose_victim would pick (the fast paths are exact, and fall back to
/// choose_victim when they cannot guarantee it).
///
/// Complexity: lookup, protect, unprotect and erase are O(1) (a dense key table, no hashing) plus
/// the victim index's update in an indexed group (O(log group size) for a rank heap); insert is
/// O(1) plus, per eviction, one victim choice: O(1) from a rank heap, O(group size) through
/// choose_victim (bounded by the threshold where the policy has an index).
/// Thread: one thread (the executor's); no locking. Deterministic for a deterministic policy.
template <EvictionPolicy E>
class MixedPrecisionCache {
 public:
  /// Validates the config and builds a cache; kInvalidArgument names the bad field.
  static Result<MixedPrecisionCache> create(CacheConfig config, E policy = E{});

  /// Looks `key` up at `step`. A hit updates its view (hits, last_step, hp_uses), tells the
  /// policy (on_access) and lifts protection (a prefetched expert is protected until used).
  /// A miss is counted. Keys out of range are a miss that is not counted.
  std::optional<CacheEntry> lookup(ExpertKey key, std::uint64_t step) noexcept;

  /// Makes `key` resident in `precision`, occupying `bytes`, at `step`, evicting from its group
  /// through the policy until it fits. If the key is resident in the same precision nothing
  /// changes (its slot is returned); in another precision the old copy is removed first and
  /// reported in `evicted`. `protect` inserts it protected (see protect()).
  /// Errors: kInvalidArgument (key out of range, bytes == 0, bytes larger than the group's
  /// budget), kOutOfMemory (the group's protected entries leave too little room; nothing was
  /// evicted then), kInternal (the policy returned an index out of range).
  Result<InsertResult> insert(ExpertKey key, Precision precision, std::uint64_t bytes, std::uint64_t step,
                              bool protect = false) noexcept;

  /// Protects a resident key from eviction (until unprotect() or its next lookup hit).
  /// kNotFound when not resident.
  Status protect(ExpertKey key) noexcept;
  /// Lifts protection; kNotFound when not resident.
  Status unprotect(ExpertKey key) noexcept;
  /// Removes a resident key without counting an eviction (policy on_evict is called).
  /// kNotFound when not resident.
  Status erase(ExpertKey key) noexcept;

  /// The entry of a resident key without touching any state.
  std::optional<CacheEntry> peek(ExpertKey key) const noexcept;
  /// True when `key` is resident.
  bool contains(ExpertKey key) const noexcept { return peek(key).has_value(); }

  /// Number of eviction groups; group_of maps a key and precision to one.
  std::size_t group_count() const noexcept { return groups_.size(); }
  /// Eviction group of `key` inserted in `precision` (key assumed in range).
  std::size_t group_of(ExpertKey key, Precision precision) const noexcept {
    const std::size_t lg = config_.layer_budget_bytes.empty() ? 0 : key.layer;
    const std::size_t pg = pool_of(precision);
    return lg * pools_ + pg;
  }
  /// Budget and bytes in use of one group.
  std::uint64_t group_budget(std::size_t g) const noexcept { return groups_[g].budget; }
  std::uint64_t group_used(std::size_t g) const noexcept { return groups_[g].used; }
  /// Bytes in use and budget summed over groups.
  std::uint64_t used_bytes() const noexcept;
  std::uint64_t budget_bytes() const noexcept;
  /// Number of resident entries.
  std::size_t size() const noexcept { return resident_; }
  /// One more than the largest slot id ever handed out in the pool of `precision` (the number of
  /// slots the backend must be able to address).
  std::uint32_t slot_high_water(Precision precision) const noexcept { return next_slot_[pool_of(precision)]; }
  /// The resident entries of group g as the policy sees them (unprotected first).
  std::span<const SlotView> group_views(std::size_t g) const noexcept { return groups_[g].views; }
  /// The eviction candidates of group g (its unprotected entries), in no particular order.
  std::span<const SlotView> group_candidates(std::size_t g) const noexcept {
    return {groups_[g].views.data(), groups_[g].n_unprotected};
  }
  /// The entry an insert into group g would evict next (the victim index's choice, or
  /// choose_victim's), without evicting it; nullopt when g has no candidates or is out of range.
  /// Does not change which entries are resident (a policy may advance lazy state, as
  /// choose_victim may).
  std::optional<SlotView> peek_victim(std::size_t g) noexcept {
    if (g >= groups_.size() || groups_[g].n_unprotected == 0) return std::nullopt;
    const std::size_t i = choose_victim_in(g);
    if (i >= groups_[g].n_unprotected) return std::nullopt;
    return groups_[g].views[i];
  }
  /// True when group g's victims currently come from the victim index (a policy with an index,
  /// and a group past CacheConfig::victim_index_min_candidates); for tests and diagnostics.
  bool group_indexed(std::size_t g) const noexcept { return g < groups_.size() && groups_[g].indexed; }
  /// The victim index (for tests and diagnostics).
  const auto& victim_index() const noexcept { return index_; }
  auto& victim_index() noexcept { return index_; }

  /// Counters; reset_stats zeroes them.
  const CacheStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept;

  /// The policy (e.g. to hand Belady its future after creation).
  E& policy() noexcept { return policy_; }
  const E& policy() const noexcept { return policy_; }
  const CacheConfig& config() const noexcept { return config_; }

 private:
  static constexpr std::uint32_t kAbsent = 0xFFFFFFFFu;
  struct Loc {
    std::uint32_t group = 0;
    std::uint32_t pos = kAbsent;
  };
  struct Group {
    std::uint64_t budget = 0;
    std::uint64_t used = 0;
    std::uint64_t protected_bytes = 0;
    std::uint32_t n_unprotected = 0;  // views[0, n_unprotected) are eviction candidates
    bool indexed = false;             // the victim index holds exactly this group's candidates
    std::vector<SlotView> views;
    std::vector<std::uint32_t> slots;  // parallel to views
  };

  MixedPrecisionCache(CacheConfig config, E policy) noexcept : config_(std::move(config)), policy_(std::move(policy)) {}

  std::size_t pool_of(Precision p) const noexcept { return pools_ == 1 ? 0 : static_cast<std::size_t>(p); }
  bool in_range(ExpertKey k) const noexcept { return k.layer < config_.n_layers && k.expert < config_.n_experts; }
  std::size_t index(ExpertKey k) const noexcept {
    return static_cast<std::size_t>(k.layer) * config_.n_experts + k.expert;
  }
  void tell_step(std::uint64_t step, std::uint32_t layer) noexcept {
    if (step < now_step_) steps_monotone_ = false;
    now_step_ = step;
    if constexpr (StepAwareEviction<E>) policy_.on_step(step, layer);
  }
  // Position of the victim among group gi's candidates: the victim index's answer, else
  // choose_victim's (which may be out of range for a faulty policy; the caller checks).
  std::size_t choose_victim_in(std::size_t gi) noexcept {
    Group& g = groups_[gi];
    ExpertKey k;
    const auto view_of = [this](ExpertKey key) -> const SlotView& {
      const Loc l = where_[index(key)];
      return groups_[l.group].views[l.pos];
    };
    if (g.indexed &&
        index_.victim(policy_, static_cast<std::uint32_t>(gi), VictimQuery{now_step_, steps_monotone_}, view_of, k) &&
        in_range(k)) {
      const Loc l = where_[index(k)];
      if (l.group == gi && l.pos < g.n_unprotected) return l.pos;
    }
    return policy_.choose_victim(std::span<const SlotView>(g.views.data(), g.n_unprotected));
  }
  CacheEntry entry_at(const Group& g, std::uint32_t pos) const noexcept {
    const SlotView& v = g.views[pos];
    return {g.slots[pos], v.precision, v.bytes, v.hits, v.hp_uses, v.last_step, pos >= g.n_unprotected};
  }
  void move_entry(Group& g, std::uint32_t from, std::uint32_t to) noexcept {
    g.views[to] = g.views[from];
    g.slots[to] = g.slots[from];
    where_[index(g.views[to].key)].pos = to;
  }
  void swap_entries(Group& g, std::uint32_t a, std::uint32_t b) noexcept {
    if (a == b) return;
    std::swap(g.views[a], g.views[b]);
    std::swap(g.slots[a], g.slots[b]);
    where_[index(g.views[a].key)].pos = a;
    where_[index(g.views[b].key)].pos = b;
  }
  // Removes the entry at pos of group gi, freeing its slot; returns what left.
  EvictedEntry remove_at(std::size_t gi, std::uint32_t pos) noexcept;

  using Index = typename detail::VictimIndexFor<E>::type;
  static constexpr bool kHasIndex = !std::is_same_v<Index, detail::NoVictimIndex<E>>;

  // Candidate views[pos] of group gi was added (n_unprotected already counts it): the index
  // learns it, or is built from all candidates when the group just grew past the threshold.
  // Storage for every entry of the group was reserved by reserve_add at its insert, so neither
  // allocates.
  void candidate_added(std::size_t gi, std::uint32_t pos) noexcept {
    if constexpr (kHasIndex) {
      Group& g = groups_[gi];
      const auto gid = static_cast<std::uint32_t>(gi);
      if (g.indexed) {
        index_.add(policy_, gid, g.views[pos]);
      } else if (g.n_unprotected > index_on_) {
        for (std::uint32_t i = 0; i < g.n_unprotected; ++i) index_.add(policy_, gid, g.views[i]);
        g.indexed = true;
      }
    }
  }
  // Candidate views[pos] of group gi is about to stop being one.
  void candidate_removing(std::size_t gi, std::uint32_t pos) noexcept {
    if constexpr (kHasIndex) {
      Group& g = groups_[gi];
      if (g.indexed) index_.remove(policy_, static_cast<std::uint32_t>(gi), g.views[pos]);
    }
  }
  // After n_unprotected of group gi dropped: below half the threshold the index lets go of the
  // group (the linear scan decides again).
  void candidates_shrunk(std::size_t gi) noexcept {
    if constexpr (kHasIndex) {
      Group& g = groups_[gi];
      if (!g.indexed || g.n_unprotected >= index_off_) return;
      for (std::uint32_t i = g.n_unprotected; i-- > 0;)
        index_.remove(policy_, static_cast<std::uint32_t>(gi), g.views[i]);
      g.indexed = false;
    }
  }
  // Candidate views[pos] of group gi was hit.
  void candidate_updated(std::size_t gi, std::uint32_t pos) noexcept {
    if constexpr (kHasIndex) {
      Group& g = groups_[gi];
      if (g.indexed) index_.update(policy_, static_cast<std::uint32_t>(gi), g.views[pos]);
    }
  }

  CacheConfig config_;
  [[no_unique_address]] E policy_;
  [[no_unique_address]] Index index_;
  std::uint32_t index_on_ = 0;   // a group with more candidates than this is indexed
  std::uint32_t index_off_ = 0;  // an indexed group with fewer candidates than this is not
  std::uint64_t now_step_ = 0;   // last step passed to tell_step
  bool steps_monotone_ = true;   // no step so far was smaller than the one before
  std::size_t pools_ = 1;
  std::vector<Loc> where_;  // [n_layers * n_experts]
  std::vector<Group> groups_;
  std::vector<std::vector<std::uint32_t>> free_slots_;  // per pool, LIFO
  std::vector<std::uint32_t> next_slot_;                // per pool
  std::vector<EvictedEntry> evicted_;
  std::uint64_t use_counter_ = 0;
  std::size_t resident_ = 0;
  CacheStats stats_;
};

// ---- implementation ---------------------------------------------------------------------------

template <EvictionPolicy E>
Result<MixedPrecisionCache<E>> MixedPrecisionCache<E>::create(CacheConfig config, E policy) {
  if (config.n_layers == 0 || config.n_experts == 0)
    return invalid_argument("CacheConfig: n_layers and n_experts must be > 0");
  const std::uint64_t n_keys = static_cast<std::uint64_t>(config.n_layers) * config.n_experts;
  if (n_keys > (std::uint64_t{1} << 26)) return invalid_argument("CacheConfig: n_layers * n_experts exceeds 2^26");
  const bool per_layer = !config.layer_budget_bytes.empty();
  if (per_layer && config.layer_budget_bytes.size() != config.n_layers)
    return invalid_argument("CacheConfig: layer_budget_bytes must have n_layers entries");
  const bool per_precision = config.pools == PoolMode::kPerPrecision;
  if (config.pools != PoolMode::kShared && !per_precision) return invalid_argument("CacheConfig: unknown pool mode");
  long double precision_total = 0;
  for (std::uint64_t b : config.precision_budget_bytes) precision_total += static_cast<long double>(b);
  if (per_precision && precision_total == 0)
    return invalid_argument("CacheConfig: kPerPrecision needs precision_budget_bytes");
  if (!per_layer && !per_precision && config.budget_bytes == 0)
    return invalid_argument("CacheConfig: budget_bytes must be > 0");

  MixedPrecisionCache cache(std::move(config), std::move(policy));
  const CacheConfig& c = cache.config_;
  const bool ok = detail::try_alloc([&] {
    cache.pools_ = per_precision ? kPrecisionCount : 1;
    const std::size_t n_lg = per_layer ? c.n_layers : 1;
    cache.groups_.resize(n_lg * cache.pools_);
    for (std::size_t lg = 0; lg < n_lg; ++lg) {
      for (std::size_t pg = 0; pg < cache.pools_; ++pg) {
        std::uint64_t b = per_layer ? c.layer_budget_bytes[lg] : c.budget_bytes;
        if (per_precision) {
          b = per_layer
                  ? static_cast<std::uint64_t>(static_cast<long double>(b) *
                                               static_cast<long double>(c.precision_budget_bytes[pg]) / precision_total)
                  : c.precision_budget_bytes[pg];
        }
        cache.groups_[lg * cache.pools_ + pg].budget = b;
      }
    }
    cache.where_.assign(static_cast<std::size_t>(n_keys), Loc{});
    cache.free_slots_.resize(cache.pools_);
    cache.next_slot_.assign(cache.pools_, 0);
    cache.stats_.per_layer.assign(c.n_layers, CacheLayerStats{});
    cache.evicted_.reserve(16);
    cache.index_on_ = c.victim_index_min_candidates.value_or(detail::victim_index_min_candidates_of<E>());
    cache.index_off_ = cache.index_on_ / 2;
  });
  if (!ok) return out_of_memory("MixedPrecisionCache tables");
  if constexpr (KeyedEviction<E>) {
    MOEX_RETURN_IF_ERROR(cache.policy_.reserve_keys(c.n_layers, c.n_experts));
  }
  VictimIndexShape shape;
  shape.n_groups = static_cast<std::uint32_t>(cache.groups_.size());
  shape.n_layers = c.n_layers;
  shape.n_experts = c.n_experts;
  shape.pools = static_cast<std::uint32_t>(cache.pools_);
  shape.per_layer_groups = per_layer;
  MOEX_RETURN_IF_ERROR(cache.index_.reserve(shape));
  return cache;
}

template <EvictionPolicy E>
std::optional<CacheEntry> MixedPrecisionCache<E>::lookup(ExpertKey key, std::uint64_t step) noexcept {
  if (!in_range(key)) return std::nullopt;
  tell_step(step, key.layer);
  const Loc loc = where_[index(key)];
  if (loc.pos == kAbsent) {
    ++stats_.misses;
    ++stats_.per_layer[key.layer].misses;
    return std::nullopt;
  }
  ++stats_.hits;
  ++stats_.per_layer[key.layer].hits;
  Group& g = groups_[loc.group];
  SlotView& v = g.views[loc.pos];
  ++v.hits;
  if (precision_bits(v.precision) >= config_.high_precision_bits) ++v.hp_uses;
  v.last_step = step;
  v.last_use = ++use_counter_;
  policy_.on_access(v);
  CacheEntry e = entry_at(g, loc.pos);
  if (loc.pos >= g.n_unprotected) {  // first use of a prefetched expert: lift protection
    g.protected_bytes -= v.bytes;
    swap_entries(g, loc.pos, g.n_unprotected);
    candidate_added(loc.group, g.n_unprotected++);
  } else {
    candidate_updated(loc.group, loc.pos);
  }
  return e;
}

template <EvictionPolicy E>
EvictedEntry MixedPrecisionCache<E>::remove_at(std::size_t gi, std::uint32_t pos) noexcept {
  Group& g = groups_[gi];
  const SlotView v = g.views[pos];
  const EvictedEntry out{v.key, g.slots[pos], v.precision, v.bytes};
  if (pos < g.n_unprotected) candidate_removing(gi, pos);
  const auto last = static_cast<std::uint32_t>(g.views.size() - 1);
  if (pos < g.n_unprotected) {
    const std::uint32_t last_u = g.n_unprotected - 1;
    if (pos != last_u) move_entry(g, last_u, pos);
    if (last != last_u) move_entry(g, last, last_u);
    --g.n_unprotected;
    candidates_shrunk(gi);
  } else {
    g.protected_bytes -= v.bytes;
    if (pos != last) move_entry(g, last, pos);
  }
  g.views.pop_back();
  g.slots.pop_back();
  g.used -= v.bytes;
  where_[index(v.key)] = Loc{};
  // Capacity >= next_slot_ (reserved when the id was handed out), so this never allocates.
  free_slots_[pool_of(v.precision)].push_back(out.slot);
  --resident_;
  return out;
}

template <EvictionPolicy E>
Result<InsertResult> MixedPrecisionCache<E>::insert(ExpertKey key, Precision precision, std::uint64_t bytes,
                                                    std::uint64_t step, bool protect) noexcept {
  if (!in_range(key)) return invalid_argument("insert: key out of range");
  if (static_cast<std::size_t>(precision) >= kPrecisionCount) return invalid_argument("insert: unknown precision");
  if (bytes == 0) return invalid_argument("insert: bytes must be > 0");
  const std::size_t gi = group_of(key, precision);
  if (bytes > groups_[gi].budget)
    return invalid_argument("insert: expert of " + std::to_string(bytes) + " bytes exceeds its group's budget of " +
                            std::to_string(groups_[gi].budget));
  tell_step(step, key.layer);
  evicted_.clear();
  const Loc old = where_[index(key)];
  if (old.pos != kAbsent) {
    const SlotView& v = groups_[old.group].views[old.pos];
    if (v.precision == precision && v.bytes == bytes) {
      if (protect) (void)this->protect(key);
      return InsertResult{groups_[old.group].slots[where_[index(key)].pos], {}};
    }
  }
  {
    // Room check before touching anything: protected bytes (other than the key's own old copy,
    // which is replaced) must leave room for the new entry.
    const Group& g = groups_[gi];
    std::uint64_t pinned = g.protected_bytes;
    if (old.pos != kAbsent && old.group == gi && old.pos >= g.n_unprotected) pinned -= g.views[old.pos].bytes;
    if (g.budget - pinned < bytes)
      return Status(StatusCode::kOutOfMemory, "insert: protected experts leave too little room in the group");
  }
  const bool reserved = detail::try_alloc([&] {
    // Reserve everything this insert may push, so that nothing below allocates or throws:
    // evictions are bounded by the group's size (+1 for the replaced old copy), and a pool's free
    // list never holds more ids than were handed out (capacity >= next_slot_ is an invariant).
    Group& g = groups_[gi];
    evicted_.reserve(g.views.size() + 1);
    g.views.reserve(g.views.size() + 1);
    g.slots.reserve(g.slots.size() + 1);
    auto& fl = free_slots_[pool_of(precision)];
    fl.reserve(static_cast<std::size_t>(next_slot_[pool_of(precision)]) + 1);
    index_.reserve_add(static_cast<std::uint32_t>(gi), key, g.views.size() + 1);
  });
  if (!reserved) return out_of_memory("MixedPrecisionCache insert");
  if (old.pos != kAbsent) {
    policy_.on_evict(groups_[old.group].views[old.pos]);
    const EvictedEntry e = remove_at(old.group, old.pos);
    ++stats_.replacements;
    evicted_.push_back(e);
  }
  Group& g = groups_[gi];
  while (g.budget - g.used < bytes) {
    // Guaranteed non-empty by the room check above.
    const std::size_t victim = choose_victim_in(gi);
    if (victim >= g.n_unprotected) return internal_error("eviction policy returned a bad index");
    policy_.on_evict(g.views[victim]);
    const EvictedEntry e = remove_at(gi, static_cast<std::uint32_t>(victim));
    ++stats_.evictions;
    stats_.bytes_evicted += e.bytes;
    evicted_.push_back(e);
  }
  const std::size_t pool = pool_of(precision);
  std::uint32_t slot;
  if (!free_slots_[pool].empty()) {
    slot = free_slots_[pool].back();
    free_slots_[pool].pop_back();
  } else {
    slot = next_slot_[pool]++;
  }
  SlotView v;
  v.key = key;
  v.precision = precision;
  v.last_step = step;
  v.inserted_step = step;
  v.last_use = ++use_counter_;
  v.bytes = bytes;
  // Capacity reserved above: these push_backs do not allocate.
  g.views.push_back(v);
  g.slots.push_back(slot);
  auto pos = static_cast<std::uint32_t>(g.views.size() - 1);
  where_[index(key)] = Loc{static_cast<std::uint32_t>(gi), pos};
  if (protect) {
    g.protected_bytes += bytes;
  } else {
    swap_entries(g, pos, g.n_unprotected);
    pos = g.n_unprotected++;
  }
  g.used += bytes;
  ++resident_;
  ++stats_.insertions;
  stats_.bytes_inserted += bytes;
  policy_.on_insert(g.views[pos]);
  if (!protect) candidate_added(gi, pos);
  return InsertResult{slot, std::span<const EvictedEntry>(evicted_)};
}

template <EvictionPolicy E>
Status MixedPrecisionCache<E>::protect(ExpertKey key) noexcept {
  if (!in_range(key)) return not_found("protect: key out of range");
  const Loc loc = where_[index(key)];
  if (loc.pos == kAbsent) return not_found("protect: key not resident");
  Group& g = groups_[loc.group];
  if (loc.pos >= g.n_unprotected) return Status::ok();
  candidate_removing(loc.group, loc.pos);
  g.protected_bytes += g.views[loc.pos].bytes;
  swap_entries(g, loc.pos, g.n_unprotected - 1);
  --g.n_unprotected;
  candidates_shrunk(loc.group);
  return Status::ok();
}

template <EvictionPolicy E>
Status MixedPrecisionCache<E>::unprotect(ExpertKey key) noexcept {
  if (!in_range(key)) return not_found("unprotect: key out of range");
  const Loc loc = where_[index(key)];
  if (loc.pos == kAbsent) return not_found("unprotect: key not resident");
  Group& g = groups_[loc.group];
  if (loc.pos < g.n_unprotected) return Status::ok();
  g.protected_bytes -= g.views[loc.pos].bytes;
  swap_entries(g, loc.pos, g.n_unprotected);
  candidate_added(loc.group, g.n_unprotected++);
  return Status::ok();
}

template <EvictionPolicy E>
Status MixedPrecisionCache<E>::erase(ExpertKey key) noexcept {
  if (!in_range(key)) return not_found("erase: key out of range");
  const Loc loc = where_[index(key)];
  if (loc.pos == kAbsent) return not_found("erase: key not resident");
  policy_.on_evict(groups_[loc.group].views[loc.pos]);
  (void)remove_at(loc.group, loc.pos);
  return Status::ok();
}

template <EvictionPolicy E>
std::optional<CacheEntry> MixedPrecisionCache<E>::peek(ExpertKey key) const noexcept {
  if (!in_range(key)) return std::nullopt;
  const Loc loc = where_[index(key)];
  if (loc.pos == kAbsent) return std::nullopt;
  return entry_at(groups_[loc.group], loc.pos);
}

template <EvictionPolicy E>
std::uint64_t MixedPrecisionCache<E>::used_bytes() const noexcept {
  std::uint64_t s = 0;
  for (const Group& g : groups_) s += g.used;
  return s;
}

template <EvictionPolicy E>
std::uint64_t MixedPrecisionCache<E>::budget_bytes() const noexcept {
  std::uint64_t s = 0;
  for (const Group& g : groups_) s += g.budget;
  return s;
}

template <EvictionPolicy E>
void MixedPrecisionCache<E>::reset_stats() noexcept {
  const std::size_t n = stats_.per_layer.size();
  stats_.hits = stats_.misses = stats_.insertions = stats_.evictions = stats_.replacements = 0;
  stats_.bytes_inserted = stats_.bytes_evicted = 0;
  for (std::size_t i = 0; i < n; ++i) stats_.per_layer[i] = CacheLayerStats{};
}

MOEX_NAMESPACE_END
