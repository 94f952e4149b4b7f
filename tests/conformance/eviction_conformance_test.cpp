// Every EvictionPolicy must pass these, whatever its strategy.
#include <random>
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

namespace {

constexpr std::uint32_t kLayers = 4;
constexpr std::uint32_t kExperts = 64;

std::vector<moex::SlotView> random_slots(std::mt19937_64& rng, std::size_t n) {
  std::vector<moex::SlotView> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i].key = {static_cast<std::uint32_t>(i % kLayers), static_cast<std::uint32_t>(i / kLayers)};
    v[i].precision = rng() % 2 ? moex::Precision::kBF16 : moex::Precision::kInt4;
    v[i].last_step = rng() % 1000;
    v[i].inserted_step = v[i].last_step / 2;
    v[i].last_use = i + 1;
    v[i].hits = static_cast<std::uint32_t>(rng() % 10);
    v[i].hp_uses = v[i].hits / 2;
    v[i].bytes = 1 + rng() % 100;
  }
  return v;
}

template <class Policy>
void prepare(Policy& p) {
  if constexpr (moex::KeyedEviction<Policy>) REQUIRE(p.reserve_keys(kLayers, kExperts).is_ok());
  if constexpr (moex::StepAwareEviction<Policy>) p.on_step(1000, 1);
}

}  // namespace

TEST_CASE_TEMPLATE_DEFINE("EvictionPolicy conformance", Policy, eviction_conformance) {
  static_assert(moex::EvictionPolicy<Policy>);
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  Policy policy{};
  prepare(policy);

  SUBCASE("victim is an index into the candidates") {
    for (std::size_t n : {1u, 2u, 7u, 64u, 256u}) {
      CAPTURE(n);
      auto slots = random_slots(rng, n);
      for (const auto& s : slots) policy.on_insert(s);
      for (const auto& s : slots) policy.on_access(s);
      CHECK(policy.choose_victim(slots) < n);
      for (const auto& s : slots) policy.on_evict(s);
    }
  }
  SUBCASE("deterministic for the same call sequence") {
    auto slots = random_slots(rng, 16);
    Policy a{}, b{};
    prepare(a);
    prepare(b);
    for (const auto& s : slots) {
      a.on_insert(s);
      b.on_insert(s);
      a.on_access(s);
      b.on_access(s);
    }
    CHECK(a.choose_victim(slots) == b.choose_victim(slots));
  }
  SUBCASE("works inside a cache and never evicts protected entries or exceeds the budget") {
    moex::CacheConfig cfg;
    cfg.n_layers = kLayers;
    cfg.n_experts = kExperts;
    cfg.budget_bytes = 40;
    auto cache = moex::MixedPrecisionCache<Policy>::create(cfg);
    REQUIRE(cache.is_ok());
    REQUIRE(cache->insert({0, 0}, moex::Precision::kBF16, 5, 0, /*protect=*/true).is_ok());
    for (std::uint64_t step = 1; step < 500; ++step) {
      const moex::ExpertKey k{static_cast<std::uint32_t>(rng() % kLayers),
                              1 + static_cast<std::uint32_t>(rng() % (kExperts - 1))};
      if (!cache->lookup(k, step)) REQUIRE(cache->insert(k, moex::Precision::kBF16, 1 + rng() % 8, step).is_ok());
      REQUIRE(cache->used_bytes() <= cache->budget_bytes());
      REQUIRE(cache->contains({0, 0}));
    }
  }
  SUBCASE("name is not empty") { CHECK(!std::string_view(policy.name()).empty()); }
}

TEST_CASE_TEMPLATE_INVOKE(eviction_conformance, moex::LruEviction, moex::LfuEviction, moex::LrfuEviction,
                          moex::HobbitScoreEviction, moex::StaticHotSetEviction, moex::BeladyOracleEviction);
