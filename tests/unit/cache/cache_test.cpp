// MixedPrecisionCache and the eviction policies: hand-worked sequences, references, budgets, Belady.
#include <algorithm>
#include <list>
#include <map>
#include <random>

#include <doctest/doctest.h>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/policies/static_hot_set_eviction.hpp"

#include "support/test_support.hpp"
#include "unit/cache/replay.hpp"

using namespace moex;

namespace {

CacheConfig shared_config(std::uint32_t layers, std::uint32_t experts, std::uint64_t budget) {
  CacheConfig c;
  c.n_layers = layers;
  c.n_experts = experts;
  c.budget_bytes = budget;
  return c;
}

// Accesses expert e of layer 0 at `step`; inserts on a miss; returns the evicted experts.
template <class Cache>
std::vector<std::uint32_t> touch(Cache& c, std::uint32_t e, std::uint64_t step) {
  std::vector<std::uint32_t> out;
  if (c.lookup(ExpertKey{0, e}, step)) return out;
  auto r = c.insert(ExpertKey{0, e}, Precision::kBF16, 1, step);
  REQUIRE(r.is_ok());
  for (const auto& ev : r->evicted) out.push_back(ev.key.expert);
  return out;
}

// Independent LRU over a sequence of keys: a list, most recent at the front.
struct RefLru {
  std::size_t cap;
  std::list<std::uint64_t> order;
  bool access(std::uint64_t k) {
    auto it = std::find(order.begin(), order.end(), k);
    if (it != order.end()) {
      order.erase(it);
      order.push_front(k);
      return true;
    }
    if (order.size() == cap) order.pop_back();
    order.push_front(k);
    return false;
  }
};

// Independent in-cache LFU: evict fewest hits since insertion, ties least recently used.
struct RefLfu {
  std::size_t cap;
  struct E {
    std::uint64_t hits, last;
  };
  std::map<std::uint64_t, E> m;
  std::uint64_t clock = 0;
  bool access(std::uint64_t k) {
    ++clock;
    auto it = m.find(k);
    if (it != m.end()) {
      ++it->second.hits;
      it->second.last = clock;
      return true;
    }
    if (m.size() == cap) {
      auto victim = m.begin();
      for (auto j = m.begin(); j != m.end(); ++j) {
        if (j->second.hits < victim->second.hits ||
            (j->second.hits == victim->second.hits && j->second.last < victim->second.last))
          victim = j;
      }
      m.erase(victim);
    }
    m[k] = E{0, clock};
    return false;
  }
};

template <class Ref, class Policy>
void check_against_reference(std::uint64_t salt) {
  const std::uint64_t seed = test::seed() ^ salt;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 20; ++round) {
    CAPTURE(round);
    const std::uint32_t layers = 1 + static_cast<std::uint32_t>(rng() % 4);
    const std::uint32_t experts = 2 + static_cast<std::uint32_t>(rng() % 30);
    const std::uint32_t k = 1 + static_cast<std::uint32_t>(rng() % std::min<std::uint32_t>(4, experts));
    const RoutingTrace t = test::random_trace(rng, layers, experts, k, 200);
    const std::size_t cap = 1 + rng() % (layers * experts);
    CAPTURE(cap);
    auto cache = MixedPrecisionCache<Policy>::create(shared_config(layers, experts, cap));
    REQUIRE(cache.is_ok());
    Ref ref{cap, {}};
    for (std::size_t tok = 0; tok < t.tokens(); ++tok)
      for (std::uint32_t l = 0; l < layers; ++l)
        for (std::uint32_t e : t.experts(tok, l)) {
          const ExpertKey key{l, e};
          const bool hit = cache->lookup(key, t.step(tok, l)).has_value();
          if (!hit) REQUIRE(cache->insert(key, Precision::kBF16, 1, t.step(tok, l)).is_ok());
          REQUIRE(hit == ref.access(key.packed()));
        }
  }
}

}  // namespace

TEST_SUITE("cache") {

TEST_CASE("LRU on a hand-worked sequence") {
  auto c = MixedPrecisionCache<LruEviction>::create(shared_config(1, 8, 3));
  REQUIRE(c.is_ok());
  // 1 2 3 1 4 (evicts 2) 2 (evicts 3) 5 (evicts 1)
  CHECK(touch(*c, 1, 0).empty());
  CHECK(touch(*c, 2, 1).empty());
  CHECK(touch(*c, 3, 2).empty());
  CHECK(touch(*c, 1, 3).empty());
  CHECK(touch(*c, 4, 4) == std::vector<std::uint32_t>{2});
  CHECK(touch(*c, 2, 5) == std::vector<std::uint32_t>{3});
  CHECK(touch(*c, 5, 6) == std::vector<std::uint32_t>{1});
  CHECK(c->stats().hits == 1);
  CHECK(c->stats().misses == 6);
  CHECK(c->stats().evictions == 3);
}

TEST_CASE("LFU on a hand-worked sequence") {
  auto c = MixedPrecisionCache<LfuEviction>::create(shared_config(1, 8, 2));
  REQUIRE(c.is_ok());
  // 1 1 1 2 3: 2 has 0 hits, 1 has 2 -> evicts 2; 2 again evicts 3 (0 hits, tie older? 3 is the
  // only 0-hit one); 1 stays throughout.
  touch(*c, 1, 0);
  touch(*c, 1, 1);
  touch(*c, 1, 2);
  touch(*c, 2, 3);
  CHECK(touch(*c, 3, 4) == std::vector<std::uint32_t>{2});
  CHECK(touch(*c, 2, 5) == std::vector<std::uint32_t>{3});
  CHECK(c->contains(ExpertKey{0, 1}));
}

TEST_CASE("LRFU with a large lambda acts as LRU and with zero lambda as a frequency count") {
  auto lru_like = MixedPrecisionCache<LrfuEviction>::create(shared_config(1, 8, 2), LrfuEviction(LrfuConfig{4.0}));
  REQUIRE(lru_like.is_ok());
  touch(*lru_like, 1, 0);
  touch(*lru_like, 1, 1);
  touch(*lru_like, 1, 2);
  touch(*lru_like, 2, 3);
  CHECK(touch(*lru_like, 3, 4) == std::vector<std::uint32_t>{1});  // 1 is least recent
  auto lfu_like = MixedPrecisionCache<LrfuEviction>::create(shared_config(1, 8, 2), LrfuEviction(LrfuConfig{0.0}));
  REQUIRE(lfu_like.is_ok());
  touch(*lfu_like, 1, 0);
  touch(*lfu_like, 1, 1);
  touch(*lfu_like, 1, 2);
  touch(*lfu_like, 2, 3);
  CHECK(touch(*lfu_like, 3, 4) == std::vector<std::uint32_t>{2});  // 2 has CRF 1 < 3
  CHECK(lfu_like->policy().crf(ExpertKey{0, 1}) == doctest::Approx(3.0));
}

TEST_CASE("HOBBIT layer distance and a hand-worked choice") {
  // FLD = 1 - ((l_t - l_cur + L) mod L) / L, L = 4.
  CHECK(HobbitScoreEviction::layer_distance_term(2, 2, 4) == doctest::Approx(1.0));
  CHECK(HobbitScoreEviction::layer_distance_term(3, 2, 4) == doctest::Approx(0.75));
  CHECK(HobbitScoreEviction::layer_distance_term(1, 2, 4) == doctest::Approx(0.25));
  // Only the distance term: the cache serving layer 2 evicts the expert of layer 1 (just ran).
  HobbitScoreConfig cfg{0, 0, 0, 1, 0};
  CacheConfig cc = shared_config(4, 4, 3);
  auto c = MixedPrecisionCache<HobbitScoreEviction>::create(cc, HobbitScoreEviction(cfg));
  REQUIRE(c.is_ok());
  REQUIRE(c->insert({1, 0}, Precision::kBF16, 1, 1).is_ok());
  REQUIRE(c->insert({3, 0}, Precision::kBF16, 1, 3).is_ok());
  REQUIRE(c->insert({0, 0}, Precision::kBF16, 1, 4).is_ok());
  auto r = c->insert({2, 0}, Precision::kBF16, 1, 6);
  REQUIRE(r.is_ok());
  REQUIRE(r->evicted.size() == 1);
  CHECK(r->evicted[0].key == ExpertKey{1, 0});
  // Only the high-precision term: the expert used at int4 goes first.
  HobbitScoreConfig hp{0, 0, 1, 0, 0};
  auto h = MixedPrecisionCache<HobbitScoreEviction>::create(shared_config(1, 4, 150), HobbitScoreEviction(hp));
  REQUIRE(h.is_ok());
  REQUIRE(h->insert({0, 0}, Precision::kBF16, 100, 0).is_ok());
  REQUIRE(h->insert({0, 1}, Precision::kInt4, 50, 0).is_ok());
  CHECK(h->lookup({0, 0}, 1));
  CHECK(h->lookup({0, 1}, 2));
  CHECK(h->peek({0, 0})->hp_uses == 1);
  CHECK(h->peek({0, 1})->hp_uses == 0);
  auto r2 = h->insert({0, 2}, Precision::kInt4, 50, 3);
  REQUIRE(r2.is_ok());
  REQUIRE(r2->evicted.size() == 1);
  CHECK(r2->evicted[0].key == ExpertKey{0, 1});
}

TEST_CASE("static hot set keeps the profiled experts") {
  std::vector<double> scores = {5, 1, 9, 0};  // layer 0, experts 0..3
  auto c = MixedPrecisionCache<StaticHotSetEviction>::create(shared_config(1, 4, 2), StaticHotSetEviction(scores, 4));
  REQUIRE(c.is_ok());
  touch(*c, 0, 0);
  touch(*c, 1, 1);
  CHECK(touch(*c, 2, 2) == std::vector<std::uint32_t>{1});
  // The cache always admits the newcomer; among the residents 0 (score 5) goes before 2 (9).
  CHECK(touch(*c, 3, 3) == std::vector<std::uint32_t>{0});
}

TEST_CASE("Belady on a hand-worked sequence") {
  // Sequence (one access per step): 1 2 3 4 1 2 5 1 2 3 4 5, capacity 3: MIN has 7 misses.
  const std::vector<std::uint32_t> seq = {1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5};
  std::vector<FutureAccess> fut;
  for (std::size_t i = 0; i < seq.size(); ++i) fut.push_back({i, ExpertKey{0, seq[i]}});
  BeladyOracleEviction b;
  REQUIRE(b.set_future(fut, 1, 8).is_ok());
  auto c = MixedPrecisionCache<BeladyOracleEviction>::create(shared_config(1, 8, 3), std::move(b));
  REQUIRE(c.is_ok());
  for (std::size_t i = 0; i < seq.size(); ++i) touch(*c, seq[i], i);
  CHECK(c->stats().misses == 7);
}

TEST_CASE("LRU matches an independent reference on random traces") { check_against_reference<RefLru, LruEviction>(1); }

TEST_CASE("LFU matches an independent reference on random traces") { check_against_reference<RefLfu, LfuEviction>(2); }

TEST_CASE("a budget smaller than one expert is an error") {
  auto c = MixedPrecisionCache<LruEviction>::create(shared_config(2, 4, 100));
  REQUIRE(c.is_ok());
  auto r = c->insert({0, 0}, Precision::kBF16, 101, 0);
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(c->size() == 0);
  CHECK(MixedPrecisionCache<LruEviction>::create(shared_config(0, 4, 100)).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(MixedPrecisionCache<LruEviction>::create(shared_config(2, 4, 0)).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(!c->lookup({5, 0}, 0));
  CHECK(c->insert({0, 9}, Precision::kBF16, 1, 0).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("protected entries are never evicted and are released by their first hit") {
  auto c = MixedPrecisionCache<LruEviction>::create(shared_config(1, 8, 2));
  REQUIRE(c.is_ok());
  REQUIRE(c->insert({0, 1}, Precision::kBF16, 1, 0, /*protect=*/true).is_ok());
  REQUIRE(c->insert({0, 2}, Precision::kBF16, 1, 1).is_ok());
  auto r = c->insert({0, 3}, Precision::kBF16, 1, 2);
  REQUIRE(r.is_ok());
  CHECK(r->evicted[0].key == ExpertKey{0, 2});  // 1 is older but protected
  CHECK(c->protect({0, 3}).is_ok());
  auto full = c->insert({0, 4}, Precision::kBF16, 1, 3);
  CHECK(full.status().code() == StatusCode::kOutOfMemory);
  CHECK(c->size() == 2);
  CHECK(c->lookup({0, 1}, 4)->is_protected);  // the entry as it was when hit
  CHECK(!c->peek({0, 1})->is_protected);      // ... and now released
  auto ok = c->insert({0, 4}, Precision::kBF16, 1, 5);
  REQUIRE(ok.is_ok());
  CHECK(ok->evicted[0].key == ExpertKey{0, 1});
  CHECK(c->unprotect({0, 3}).is_ok());
  CHECK(c->protect({0, 7}).code() == StatusCode::kNotFound);
}

TEST_CASE("precision change replaces the entry; pools per precision have their own slots") {
  CacheConfig cfg = shared_config(2, 4, 0);
  cfg.pools = PoolMode::kPerPrecision;
  cfg.precision_budget_bytes[static_cast<std::size_t>(Precision::kBF16)] = 200;
  cfg.precision_budget_bytes[static_cast<std::size_t>(Precision::kInt4)] = 100;
  auto c = MixedPrecisionCache<LruEviction>::create(cfg);
  REQUIRE(c.is_ok());
  auto a = c->insert({0, 0}, Precision::kBF16, 100, 0);
  auto b = c->insert({0, 1}, Precision::kInt4, 25, 0);
  REQUIRE(a.is_ok());
  REQUIRE(b.is_ok());
  CHECK(a->slot == 0);
  CHECK(b->slot == 0);  // separate id spaces
  auto up = c->insert({0, 1}, Precision::kBF16, 100, 1);
  REQUIRE(up.is_ok());
  REQUIRE(up->evicted.size() == 1);
  CHECK(up->evicted[0].precision == Precision::kInt4);
  CHECK(c->stats().replacements == 1);
  CHECK(c->peek({0, 1})->precision == Precision::kBF16);
  CHECK(c->insert({0, 2}, Precision::kInt8, 10, 1).status().code() == StatusCode::kInvalidArgument);
  CHECK(c->slot_high_water(Precision::kBF16) == 2);
}

TEST_CASE("budgets are never exceeded under random mixed-size operations") {
  const std::uint64_t seed = test::seed() ^ 3;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 30; ++round) {
    CAPTURE(round);
    CacheConfig cfg = shared_config(4, 16, 0);
    if (round % 3 == 0) {
      cfg.budget_bytes = 300;
    } else if (round % 3 == 1) {
      cfg.layer_budget_bytes = {100, 150, 200, 120};
    } else {
      cfg.layer_budget_bytes = {100, 150, 200, 120};
      cfg.pools = PoolMode::kPerPrecision;
      cfg.precision_budget_bytes[static_cast<std::size_t>(Precision::kBF16)] = 3;
      cfg.precision_budget_bytes[static_cast<std::size_t>(Precision::kInt4)] = 1;
    }
    auto c = MixedPrecisionCache<HobbitScoreEviction>::create(cfg);
    REQUIRE(c.is_ok());
    for (std::uint64_t step = 0; step < 2000; ++step) {
      const ExpertKey key{static_cast<std::uint32_t>(rng() % 4), static_cast<std::uint32_t>(rng() % 16)};
      const bool hp = rng() % 2;
      const Precision p = hp ? Precision::kBF16 : Precision::kInt4;
      const std::uint64_t bytes = hp ? 20 + rng() % 20 : 5 + rng() % 10;
      const int op = static_cast<int>(rng() % 10);
      if (op < 5) {
        if (!c->lookup(key, step)) (void)c->insert(key, p, bytes, step, rng() % 8 == 0);
      } else if (op < 7) {
        (void)c->insert(key, p, bytes, step);
      } else if (op == 7) {
        (void)c->protect(key);
      } else if (op == 8) {
        (void)c->unprotect(key);
      } else {
        (void)c->erase(key);
      }
      std::size_t count = 0;
      for (std::size_t g = 0; g < c->group_count(); ++g) {
        REQUIRE(c->group_used(g) <= c->group_budget(g));
        std::uint64_t sum = 0;
        for (const SlotView& v : c->group_views(g)) {
          sum += v.bytes;
          REQUIRE(c->peek(v.key).has_value());
        }
        REQUIRE(sum == c->group_used(g));
        count += c->group_views(g).size();
      }
      REQUIRE(count == c->size());
    }
  }
}

TEST_CASE("Belady is never worse than any online policy (random traces)") {
  const std::uint64_t seed = test::seed() ^ 4;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 12; ++round) {
    CAPTURE(round);
    const std::uint32_t layers = 1 + static_cast<std::uint32_t>(rng() % 4);
    const std::uint32_t experts = 4 + static_cast<std::uint32_t>(rng() % 28);
    const std::uint32_t k = 1 + static_cast<std::uint32_t>(rng() % 4);
    const RoutingTrace t = test::random_trace(rng, layers, experts, k, 300);
    const bool per_layer = round % 2 == 1;
    CacheConfig cfg = shared_config(layers, experts, k + rng() % (layers * experts));
    if (per_layer) cfg.layer_budget_bytes.assign(layers, k + rng() % experts);
    CAPTURE(cfg.budget_bytes);
    BeladyOracleEviction b;
    REQUIRE(b.set_future(test::trace_accesses(t), layers, experts).is_ok());
    auto opt = MixedPrecisionCache<BeladyOracleEviction>::create(cfg, std::move(b));
    REQUIRE(opt.is_ok());
    bool ok = false;
    const std::uint64_t best = test::replay(t, *opt, ok);
    CHECK(ok);
    auto lru = MixedPrecisionCache<LruEviction>::create(cfg);
    auto lfu = MixedPrecisionCache<LfuEviction>::create(cfg);
    auto lrfu = MixedPrecisionCache<LrfuEviction>::create(cfg);
    auto hob = MixedPrecisionCache<HobbitScoreEviction>::create(cfg);
    auto hot =
        MixedPrecisionCache<StaticHotSetEviction>::create(cfg, StaticHotSetEviction(expert_access_counts(t), experts));
    CHECK(test::replay(t, *lru, ok) <= best);
    CHECK(test::replay(t, *lfu, ok) <= best);
    CHECK(test::replay(t, *lrfu, ok) <= best);
    CHECK(test::replay(t, *hob, ok) <= best);
    CHECK(test::replay(t, *hot, ok) <= best);
  }
}

}  // TEST_SUITE("cache")
