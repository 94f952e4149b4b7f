// The cache's fast victim choice (rank heaps, HOBBIT's skyline index) against the linear
// choose_victim reference: identical victim sequences on random operation traces for every
// policy, shared pool and per-layer groups, with protection, erasure and mixed precisions, and
// with index thresholds that make groups switch between the linear scan and the index both ways.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/policies/static_hot_set_eviction.hpp"

#include "support/test_support.hpp"

using namespace moex;

namespace {

// Forwards every call to P but hides rank()/VictimIndex: the cache then decides with
// choose_victim over the candidates, the reference.
template <class P>
struct LinearOnly {
  P p;
  void on_access(const SlotView& s) noexcept { p.on_access(s); }
  void on_insert(const SlotView& s) noexcept { p.on_insert(s); }
  void on_evict(const SlotView& s) noexcept { p.on_evict(s); }
  std::size_t choose_victim(std::span<const SlotView> c) noexcept { return p.choose_victim(c); }
  std::string_view name() const noexcept { return p.name(); }
  void on_step(std::uint64_t step, std::uint32_t layer) noexcept {
    if constexpr (StepAwareEviction<P>) p.on_step(step, layer);
  }
  Status reserve_keys(std::uint32_t n_layers, std::uint32_t n_experts) {
    if constexpr (KeyedEviction<P>) return p.reserve_keys(n_layers, n_experts);
    return Status::ok();
  }
};
static_assert(!RankedEviction<LinearOnly<LruEviction>> && !IndexedEviction<LinearOnly<HobbitScoreEviction>>);

enum class Layout { kShared, kPerLayer, kPerLayerPerPrecision, kSharedPerPrecision };

CacheConfig make_config(Layout layout, std::uint32_t layers, std::uint32_t experts, std::mt19937_64& rng) {
  CacheConfig c;
  c.n_layers = layers;
  c.n_experts = experts;
  const std::uint64_t per_layer = 30 + rng() % (experts * 20);  // 10..40 bytes an expert
  switch (layout) {
    case Layout::kShared:
      c.budget_bytes = per_layer * layers;
      break;
    case Layout::kPerLayer:
      c.layer_budget_bytes.assign(layers, per_layer);
      break;
    case Layout::kPerLayerPerPrecision:
      c.layer_budget_bytes.assign(layers, per_layer * 2);
      c.pools = PoolMode::kPerPrecision;
      c.precision_budget_bytes[static_cast<std::size_t>(Precision::kBF16)] = 3;
      c.precision_budget_bytes[static_cast<std::size_t>(Precision::kInt4)] = 1;
      break;
    case Layout::kSharedPerPrecision:
      c.pools = PoolMode::kPerPrecision;
      c.precision_budget_bytes[static_cast<std::size_t>(Precision::kBF16)] = per_layer * layers;
      c.precision_budget_bytes[static_cast<std::size_t>(Precision::kInt4)] = per_layer * layers / 3 + 40;
      break;
  }
  return c;
}

struct Access {
  std::uint64_t step;
  ExpertKey key;
};

// A skewed random access sequence, `per_step` accesses of one layer per step, layers in a cycle;
// `backwards` lets a few steps go back in time.
std::vector<Access> make_accesses(std::mt19937_64& rng, std::uint32_t layers, std::uint32_t experts,
                                  std::size_t n_steps, bool backwards) {
  std::vector<Access> out;
  std::uint64_t step = 0;
  for (std::size_t i = 0; i < n_steps; ++i) {
    const auto layer = static_cast<std::uint32_t>(i % layers);
    const std::uint32_t k = 1 + static_cast<std::uint32_t>(rng() % 3);
    for (std::uint32_t j = 0; j < k; ++j) {
      // Zipf-like: small expert ids are popular.
      const double u = std::uniform_real_distribution<double>(0, 1)(rng);
      const auto e = static_cast<std::uint32_t>(static_cast<double>(experts) * u * u * u) % experts;
      out.push_back({step, ExpertKey{layer, e}});
    }
    if (backwards && rng() % 50 == 0)
      step = step > 5 ? step - 5 : 0;
    else
      step += rng() % 4 == 0 ? 0 : 1;  // sometimes two layer-steps share a step
  }
  return out;
}

std::string key_str(ExpertKey k) { return std::to_string(k.layer) + ":" + std::to_string(k.expert); }

// Drives a fast and a reference cache with the same random operations and requires identical
// outcomes: statuses, evicted entries in order, and the next victim of every group.
template <class P, class MakePolicy>
void check_same_victims(std::uint64_t salt, MakePolicy make_policy, bool with_future) {
  const std::uint64_t seed = test::seed() ^ salt;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  std::size_t evictions = 0;
  std::size_t builds = 0, drops = 0;  // groups switching to the index and back
  for (int round = 0; round < 24; ++round) {
    CAPTURE(round);
    const auto layout = static_cast<Layout>(round % 4);
    CAPTURE(static_cast<int>(layout));
    const std::uint32_t layers = 1 + static_cast<std::uint32_t>(rng() % 6);
    const std::uint32_t experts = 2 + static_cast<std::uint32_t>(rng() % 20);
    // Steps that go back in time break StepAwareEviction's contract; the cache then falls back to
    // choose_victim, which reproduces the reference for every policy whose choice has no hidden
    // history (not Belady, whose lazily advanced cursors then depend on call history).
    const bool backwards = round % 6 == 5 && !std::is_same_v<P, BeladyOracleEviction>;
    CAPTURE(backwards);
    const std::vector<Access> acc = make_accesses(rng, layers, experts, 300, backwards);
    CacheConfig cfg = make_config(layout, layers, experts, rng);
    // Index thresholds: always indexed (0), small ones the groups cross up and down, the default.
    const std::uint32_t thresholds[] = {0, 2, 3, 5, 8, detail::victim_index_min_candidates_of<P>()};
    const std::uint32_t th = thresholds[static_cast<std::size_t>(round / 4) % 6];
    CAPTURE(th);
    if (th != thresholds[5]) cfg.victim_index_min_candidates = th;  // else the policy's own default
    std::vector<bool> was_indexed;
    P fast_policy = make_policy(layers, experts);
    LinearOnly<P> ref_policy{fast_policy};
    if constexpr (std::is_same_v<P, BeladyOracleEviction>) {
      if (with_future) {
        std::vector<FutureAccess> f;
        for (const Access& a : acc) f.push_back({a.step, a.key});
        REQUIRE(fast_policy.set_future(f, layers, experts).is_ok());
        REQUIRE(ref_policy.p.set_future(f, layers, experts).is_ok());
      }
    }
    auto fast = MixedPrecisionCache<P>::create(cfg, std::move(fast_policy));
    auto ref = MixedPrecisionCache<LinearOnly<P>>::create(cfg, std::move(ref_policy));
    REQUIRE(fast.is_ok());
    REQUIRE(ref.is_ok());
    was_indexed.assign(fast->group_count(), false);
    for (std::size_t i = 0; i < acc.size(); ++i) {
      CAPTURE(i);
      const Access& a = acc[i];
      const int op = static_cast<int>(rng() % 20);
      if (op < 2) continue;  // an expected use that does not happen (adaptive gating)
      if (op < 15) {
        const bool hf = fast->lookup(a.key, a.step).has_value();
        const bool hr = ref->lookup(a.key, a.step).has_value();
        REQUIRE(hf == hr);
        if (hf) continue;
        const bool bf16 = rng() % 3 != 0;
        const Precision p = bf16 ? Precision::kBF16 : Precision::kInt4;
        const std::uint64_t bytes = bf16 ? 20 + rng() % 21 : 5 + rng() % 6;
        const bool prot = rng() % 8 == 0;
        auto rf = fast->insert(a.key, p, bytes, a.step, prot);
        auto rr = ref->insert(a.key, p, bytes, a.step, prot);
        REQUIRE(rf.is_ok() == rr.is_ok());
        if (!rf.is_ok()) {
          REQUIRE(rf.status().code() == rr.status().code());
          continue;
        }
        REQUIRE(rf->slot == rr->slot);
        std::string ef, er;
        for (const EvictedEntry& e : rf->evicted) ef += key_str(e.key) + "/" + std::to_string(e.slot) + " ";
        for (const EvictedEntry& e : rr->evicted) er += key_str(e.key) + "/" + std::to_string(e.slot) + " ";
        REQUIRE(ef == er);
        evictions += rf->evicted.size();
      } else if (op < 17) {
        REQUIRE(fast->protect(a.key).code() == ref->protect(a.key).code());
      } else if (op < 19) {
        REQUIRE(fast->unprotect(a.key).code() == ref->unprotect(a.key).code());
      } else {
        REQUIRE(fast->erase(a.key).code() == ref->erase(a.key).code());
      }
      if (i % 25 == 24) {  // shrink one group a lot: protect or erase most of its candidates
        const std::size_t g = rng() % fast->group_count();
        std::vector<ExpertKey> keys;
        for (const SlotView& v : fast->group_candidates(g)) keys.push_back(v.key);
        for (const ExpertKey k : keys) {
          const auto r = rng() % 4;
          if (r == 0) continue;
          if (r == 1)
            REQUIRE(fast->protect(k).code() == ref->protect(k).code());
          else
            REQUIRE(fast->erase(k).code() == ref->erase(k).code());
        }
      }
      for (std::size_t g = 0; g < fast->group_count(); ++g) {
        const bool on = fast->group_indexed(g);
        const std::size_t n = fast->group_candidates(g).size();
        if (on != was_indexed[g]) (on ? builds : drops) += 1;
        was_indexed[g] = on;
        // Indexed past the threshold, not indexed below half of it (in between: either).
        if (n > th) REQUIRE(on);
        if (n < th / 2) REQUIRE(!on);
        if constexpr (requires { fast->victim_index().size(std::uint32_t{0}); }) {
          REQUIRE(fast->victim_index().size(static_cast<std::uint32_t>(g)) == (on ? n : 0));
        }
      }
      if (i % 7 == 0) {
        for (std::size_t g = 0; g < fast->group_count(); ++g) {
          CAPTURE(g);
          const auto vf = fast->peek_victim(g);
          const auto vr = ref->peek_victim(g);
          REQUIRE(vf.has_value() == vr.has_value());
          if (vf) REQUIRE(key_str(vf->key) == key_str(vr->key));
          REQUIRE(fast->group_used(g) <= fast->group_budget(g));
        }
      }
      if (i % 50 == 0) {
        if constexpr (requires { fast->victim_index().check_invariants(); }) {
          REQUIRE(fast->victim_index().check_invariants());
        }
      }
    }
    REQUIRE(fast->stats().evictions == ref->stats().evictions);
  }
  CHECK(evictions > 100);  // the traces do exercise eviction
  CHECK(builds > 5);       // groups did switch to the index
  CHECK(drops > 5);        // and back to the linear scan
}

HobbitScoreEviction hobbit_with(std::mt19937_64& rng) {
  // Weights of several shapes: default, one term only (many ties), random, a zero term.
  HobbitScoreConfig c;
  switch (rng() % 4) {
    case 0:
      break;
    case 1:
      c = HobbitScoreConfig{0, 0, 0, 1, 0};
      break;
    case 2:
      c = HobbitScoreConfig{0.1 + static_cast<double>(rng() % 100) / 100, static_cast<double>(rng() % 100) / 100,
                            static_cast<double>(rng() % 100) / 100, static_cast<double>(rng() % 100) / 100, 0};
      break;
    default:
      c = HobbitScoreConfig{0.5, 0, 0.5, 0.25, 0};
      break;
  }
  return HobbitScoreEviction(c);
}

}  // namespace

TEST_SUITE("cache") {

TEST_CASE("fast victim choice equals choose_victim: LRU") {
  check_same_victims<LruEviction>(
      11, [](std::uint32_t, std::uint32_t) { return LruEviction{}; }, false);
}

TEST_CASE("fast victim choice equals choose_victim: LFU") {
  check_same_victims<LfuEviction>(
      12, [](std::uint32_t, std::uint32_t) { return LfuEviction{}; }, false);
}

TEST_CASE("fast victim choice equals choose_victim: LRFU") {
  int n = 0;
  check_same_victims<LrfuEviction>(
      13,
      [&n](std::uint32_t, std::uint32_t) {
        const double lambdas[] = {0.05, 0.0, 1.0, 4.0};
        return LrfuEviction(LrfuConfig{lambdas[(n++ / 2) % 4]});
      },
      false);
}

TEST_CASE("fast victim choice equals choose_victim: static hot set") {
  std::mt19937_64 rng(test::seed() ^ 14);
  check_same_victims<StaticHotSetEviction>(
      14,
      [&rng](std::uint32_t layers, std::uint32_t experts) {
        std::vector<double> s(static_cast<std::size_t>(layers) * experts);
        for (double& x : s) x = static_cast<double>(rng() % 5);  // many equal scores: ties by last_use
        return StaticHotSetEviction(s, experts);
      },
      false);
}

TEST_CASE("fast victim choice equals choose_victim: HOBBIT") {
  std::mt19937_64 rng(test::seed() ^ 15);
  check_same_victims<HobbitScoreEviction>(
      15, [&rng](std::uint32_t, std::uint32_t) { return hobbit_with(rng); }, false);
}

TEST_CASE("fast victim choice equals choose_victim: HOBBIT with a negative weight falls back") {
  check_same_victims<HobbitScoreEviction>(
      16,
      [](std::uint32_t, std::uint32_t) {
        return HobbitScoreEviction(HobbitScoreConfig{-0.5, 0.25, 0.25, 1, 0});
      },
      false);
}

TEST_CASE("fast victim choice equals choose_victim: Belady with skipped uses") {
  check_same_victims<BeladyOracleEviction>(
      17, [](std::uint32_t, std::uint32_t) { return BeladyOracleEviction{}; }, true);
}

TEST_CASE("fast victim choice equals choose_victim: Belady without a future") {
  check_same_victims<BeladyOracleEviction>(
      18, [](std::uint32_t, std::uint32_t) { return BeladyOracleEviction{}; }, false);
}

TEST_CASE("fast victim choice at a realistic size (48 x 128, one shared pool)") {
  const std::uint64_t seed = test::seed() ^ 19;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  CacheConfig cfg;
  cfg.n_layers = 48;
  cfg.n_experts = 128;
  cfg.budget_bytes = 48 * 64;
  auto fast = MixedPrecisionCache<HobbitScoreEviction>::create(cfg);
  auto ref = MixedPrecisionCache<LinearOnly<HobbitScoreEviction>>::create(cfg);
  auto lfu = MixedPrecisionCache<LfuEviction>::create(cfg);
  auto lfu_ref = MixedPrecisionCache<LinearOnly<LfuEviction>>::create(cfg);
  REQUIRE(fast.is_ok());
  REQUIRE(ref.is_ok());
  REQUIRE(lfu.is_ok());
  REQUIRE(lfu_ref.is_ok());
  std::uint64_t step = 0;
  for (int tok = 0; tok < 60; ++tok)
    for (std::uint32_t l = 0; l < 48; ++l, ++step)
      for (int j = 0; j < 8; ++j) {
        const ExpertKey k{l, static_cast<std::uint32_t>(rng() % 128)};
        const bool h = fast->lookup(k, step).has_value();
        REQUIRE(h == ref->lookup(k, step).has_value());
        REQUIRE(lfu->lookup(k, step).has_value() == lfu_ref->lookup(k, step).has_value());
        if (!h) {
          auto a = fast->insert(k, Precision::kBF16, 1, step);
          auto b = ref->insert(k, Precision::kBF16, 1, step);
          REQUIRE(a.is_ok());
          REQUIRE(b.is_ok());
          REQUIRE(a->evicted.size() == b->evicted.size());
          for (std::size_t i = 0; i < a->evicted.size(); ++i) REQUIRE(a->evicted[i].key == b->evicted[i].key);
        }
        if (!lfu->contains(k)) {
          auto a = lfu->insert(k, Precision::kBF16, 1, step);
          auto b = lfu_ref->insert(k, Precision::kBF16, 1, step);
          REQUIRE(a.is_ok());
          REQUIRE(b.is_ok());
          REQUIRE(a->evicted.size() == b->evicted.size());
          for (std::size_t i = 0; i < a->evicted.size(); ++i) REQUIRE(a->evicted[i].key == b->evicted[i].key);
        }
      }
  CHECK(fast->stats().evictions > 1000);
  CHECK(fast->victim_index().check_invariants());
  // The index itself answers (no silent fallback to choose_victim) and agrees with the reference.
  ExpertKey k{};
  const auto no_view = [&](ExpertKey) -> const SlotView& { return ref->group_views(0)[0]; };
  CHECK(fast->victim_index().victim(fast->policy(), 0, VictimQuery{step - 1, true}, no_view, k));
  CHECK(k == ref->peek_victim(0)->key);
  CHECK(lfu->victim_index().check_invariants());
}

TEST_CASE("peek_victim does not evict and agrees with the next insert") {
  auto c = MixedPrecisionCache<LruEviction>::create([] {
    CacheConfig cfg;
    cfg.n_layers = 1;
    cfg.n_experts = 8;
    cfg.budget_bytes = 3;
    return cfg;
  }());
  REQUIRE(c.is_ok());
  CHECK(!c->peek_victim(0).has_value());
  CHECK(!c->peek_victim(5).has_value());
  for (std::uint32_t e = 0; e < 3; ++e) REQUIRE(c->insert({0, e}, Precision::kBF16, 1, e).is_ok());
  REQUIRE(c->lookup({0, 0}, 3));
  const auto v = c->peek_victim(0);
  REQUIRE(v.has_value());
  CHECK(v->key == ExpertKey{0, 1});
  CHECK(c->size() == 3);
  REQUIRE(c->protect({0, 1}).is_ok());
  CHECK(c->peek_victim(0)->key == ExpertKey{0, 2});
  auto r = c->insert({0, 5}, Precision::kBF16, 1, 4);
  REQUIRE(r.is_ok());
  REQUIRE(r->evicted.size() == 1);
  CHECK(r->evicted[0].key == ExpertKey{0, 2});
  CHECK(c->victim_index().check_invariants());
}

}  // TEST_SUITE("cache")
