// Layer budgets: the DP split equals brute force; miss curves from a trace.
#include "moex/cache/layer_budget.hpp"

#include <functional>
#include <random>

#include <doctest/doctest.h>

#include "support/test_support.hpp"
#include "unit/cache/replay.hpp"

using namespace moex;

TEST_SUITE("cache") {

TEST_CASE("uniform split") {
  CHECK(uniform_layer_split(4, 10) == std::vector<std::uint32_t>{3, 3, 2, 2});
  CHECK(uniform_layer_split(3, 0) == std::vector<std::uint32_t>{0, 0, 0});
}

TEST_CASE("DP split equals brute force on small cases") {
  const std::uint64_t seed = test::seed() ^ 11;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    CAPTURE(round);
    const std::size_t layers = 1 + rng() % 4;
    const std::uint32_t min_slots = static_cast<std::uint32_t>(rng() % 2);
    MissCurves curves(layers);
    for (auto& c : curves) {
      c.resize(min_slots + 1 + rng() % 5);
      for (auto& v : c) v = rng() % 50;  // not necessarily monotone
    }
    const auto total = static_cast<std::uint32_t>(layers * min_slots + rng() % 10);
    auto dp = dp_layer_split(curves, total, min_slots);
    REQUIRE(dp.is_ok());
    // brute force
    std::uint64_t best = ~0ull;
    std::vector<std::uint32_t> cur(layers);
    std::function<void(std::size_t, std::uint32_t, std::uint64_t)> rec = [&](std::size_t l, std::uint32_t left,
                                                                             std::uint64_t cost) {
      if (l == layers) {
        best = std::min(best, cost);
        return;
      }
      for (std::uint32_t s = min_slots; s < curves[l].size() && s <= left; ++s)
        rec(l + 1, left - s, cost + curves[l][s]);
    };
    rec(0, total, 0);
    std::uint64_t got = 0, used = 0;
    for (std::size_t l = 0; l < layers; ++l) {
      got += curves[l][(*dp)[l]];
      used += (*dp)[l];
      CHECK((*dp)[l] >= min_slots);
    }
    CHECK(used <= total);
    CHECK(got == best);
  }
  const MissCurves short_curve = {{5}};
  CHECK(!dp_layer_split(short_curve, 3, 1).is_ok());
}

TEST_CASE("profiled LRU miss curves start at all accesses and never increase") {
  std::mt19937_64 rng(test::seed() ^ 12);
  const RoutingTrace t = test::random_trace(rng, 3, 8, 2, 300);
  auto curves = profile_miss_curves(t, 8);
  REQUIRE(curves.is_ok());
  REQUIRE(curves->size() == 3);
  for (const auto& c : *curves) {
    REQUIRE(c.size() == 9);
    CHECK(c[0] == 600);
    for (std::size_t s = 1; s < c.size(); ++s) CHECK(c[s] <= c[s - 1]);  // LRU inclusion
    CHECK(c[8] <= 8);                                                    // everything fits: compulsory misses only
  }
  auto split = dp_layer_split(*curves, 12, 2);
  REQUIRE(split.is_ok());
  std::uint64_t dp_miss = 0, uni_miss = 0;
  const auto uni = uniform_layer_split(3, 12);
  for (std::size_t l = 0; l < 3; ++l) {
    dp_miss += (*curves)[l][(*split)[l]];
    uni_miss += (*curves)[l][uni[l]];
  }
  CHECK(dp_miss <= uni_miss);
}

}  // TEST_SUITE("cache")
