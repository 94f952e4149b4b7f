// Routing traces: routing rule, binary/JSONL round trips, corrupt input, the shared real traces.
#include "moex/formats/trace.hpp"

#include <cmath>
#include <cstring>
#include <fstream>
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

// Softmax of f32 logits computed in float64, renormalized over k: f32 rounding of the result only.
constexpr double kRouteTolerance = 1e-6;

RoutingTrace small_trace(bool logits) {
  std::mt19937_64 rng(test::seed());
  RoutingTrace t = test::random_trace(rng, 3, 6, 2, 10);
  t.seq_start = {0, 4, 7};
  for (std::size_t i = 0; i < t.gate_weights.size(); ++i) t.gate_weights[i] = 0.125f * static_cast<float>(i % 7);
  t.expert_ids[5] = kNoExpert;  // token 0, layer 2: one expert only
  t.gate_weights[5] = 0;
  if (logits) t.router_logits = test::random_normal(10 * 3 * 6, 1.0f, 7);
  return t;
}

void check_equal(const RoutingTrace& a, const RoutingTrace& b) {
  CHECK(a.n_layers == b.n_layers);
  CHECK(a.n_experts == b.n_experts);
  CHECK(a.top_k == b.top_k);
  CHECK(a.seq_start == b.seq_start);
  CHECK(a.expert_ids == b.expert_ids);
  CHECK(a.gate_weights == b.gate_weights);
  CHECK(a.router_logits == b.router_logits);
}

}  // namespace

TEST_SUITE("trace") {

TEST_CASE("route_softmax_topk matches a float64 reference") {
  const std::uint64_t seed = test::seed();
  CAPTURE(seed);
  for (std::uint32_t n : {8u, 32u, 64u}) {
    for (std::uint32_t k : {1u, 2u, 6u}) {
      CAPTURE(n);
      CAPTURE(k);
      const auto z = test::random_normal(n, 2.0f, n * 100 + k);
      std::vector<std::uint32_t> ids(k);
      std::vector<float> w(k);
      route_softmax_topk(z, k, ids.data(), w.data());
      // reference: full softmax in double, pick top-k, renormalize
      std::vector<double> p(n);
      double mx = z[0];
      for (float v : z) mx = std::max(mx, static_cast<double>(v));
      // unnormalized probabilities suffice: top-k renormalization cancels the softmax's sum
      for (std::uint32_t e = 0; e < n; ++e) p[e] = std::exp(z[e] - mx);
      std::vector<std::uint32_t> order(n);
      for (std::uint32_t e = 0; e < n; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return p[a] > p[b]; });
      double top = 0;
      for (std::uint32_t j = 0; j < k; ++j) top += p[order[j]];
      for (std::uint32_t j = 0; j < k; ++j) {
        CHECK(ids[j] == order[j]);
        CHECK(std::abs(w[j] - p[order[j]] / top) < kRouteTolerance);
      }
    }
  }
}

TEST_CASE("binary and JSONL round trips are exact") {
  const auto dir = test::temp_dir("trace");
  for (bool logits : {false, true}) {
    CAPTURE(logits);
    const RoutingTrace t = small_trace(logits);
    REQUIRE(t.validate().is_ok());
    CHECK(t.experts(0, 2).size() == 1);
    CHECK(t.sequence_of(5) == 1);
    REQUIRE(write_trace_binary(t, dir / "t.bin").is_ok());
    auto b = load_trace(dir / "t.bin");
    REQUIRE(b.is_ok());
    check_equal(t, *b);
    REQUIRE(write_trace_jsonl(t, dir / "t.jsonl").is_ok());
    auto j = load_trace(dir / "t.jsonl");
    REQUIRE(j.is_ok());
    check_equal(t, *j);
  }
}

TEST_CASE("corrupt binary traces are rejected and never crash") {
  const auto dir = test::temp_dir("trace_bad");
  const RoutingTrace t = small_trace(true);
  REQUIRE(write_trace_binary(t, dir / "t.bin").is_ok());
  std::ifstream f(dir / "t.bin", std::ios::binary);
  std::string good((std::istreambuf_iterator<char>(f)), {});
  const std::uint64_t seed = test::seed();
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  auto write = [&](const std::string& s) {
    std::ofstream o(dir / "x.bin", std::ios::binary | std::ios::trunc);
    o.write(s.data(), static_cast<std::streamsize>(s.size()));
  };
  for (std::size_t len = 0; len < good.size(); len += 1 + len / 8) {  // truncations
    write(good.substr(0, len));
    CHECK(!read_trace_binary(dir / "x.bin").is_ok());
  }
  for (int i = 0; i < 300; ++i) {  // byte flips in the header and the expert ids
    std::string s = good;
    const std::size_t pos = rng() % std::min<std::size_t>(s.size(), 40 + 4 * 3 + 4 * 60);
    s[pos] = static_cast<char>(rng());
    write(s);
    auto r = read_trace_binary(dir / "x.bin");
    if (r.is_ok()) CHECK(r->validate().is_ok());
  }
  std::string huge = good;  // n_tokens = 2^60: must fail on size, not allocate
  const std::uint64_t n = std::uint64_t{1} << 60;
  std::memcpy(huge.data() + 32, &n, 8);
  write(huge);
  CHECK(read_trace_binary(dir / "x.bin").status().code() == StatusCode::kCorrupt);
  CHECK(load_trace(dir / "missing.bin").status().code() == StatusCode::kIo);
  write("hello, world\n");
  CHECK(load_trace(dir / "x.bin").status().code() == StatusCode::kUnsupported);
}

TEST_CASE("the shared real traces load with their documented shapes") {
  MOEX_REQUIRE_SHARED(shared);
  struct Case {
    const char* path;
    std::uint32_t layers, experts, k;
    std::size_t tokens, seqs;
  };
  const Case cases[] = {
      {"models/tiny-mixtral-8e/router_logits_code.npy", 8, 8, 2, 65536, 128},
      {"models/tiny-mixtral-32e/router_logits_code.npy", 8, 32, 4, 30720, 60},
      {"traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl", 32, 8, 2, 247, 2},
      {"traces/flame-moe-290m/flame_moe_290m_seq0-1_x_512tok_top6.csv", 8, 64, 6, 1024, 2},
      {"traces/flame-moe-290m/flame_moe_290m_64seq_first10tok_top6.csv", 8, 64, 6, 640, 64},
  };
  for (const Case& c : cases) {
    CAPTURE(c.path);
    auto t = load_trace(shared / c.path);
    REQUIRE(t.is_ok());
    CHECK(t->validate().is_ok());
    CHECK(t->n_layers == c.layers);
    CHECK(t->n_experts == c.experts);
    CHECK(t->top_k == c.k);
    CHECK(t->tokens() == c.tokens);
    CHECK(t->sequences() == c.seqs);
    // Gate weights of the renormalized traces sum to 1.
    if (std::string(c.path).find("flame") == std::string::npos) {
      for (std::size_t tok = 0; tok < t->tokens(); tok += 97) {
        const auto w = t->weights(tok, 0);
        if (w.empty()) continue;
        double s = 0;
        for (float x : w) s += x;
        CHECK(s == doctest::Approx(1.0).epsilon(1e-3));
      }
    }
  }
}

TEST_CASE("Mixtral trace: LRU and Belady hit rates match the README's measured facts") {
  MOEX_REQUIRE_SHARED(shared);
  auto t = load_trace(shared / "traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl");
  REQUIRE(t.is_ok());
  // README: per-layer cache of 2 of 8: LRU 0.29, Belady 0.44; 4 of 8: 0.57 and 0.75 (2 digits).
  const double expect[2][2] = {{0.29, 0.44}, {0.57, 0.75}};
  int i = 0;
  for (std::uint64_t slots : {2u, 4u}) {
    CAPTURE(slots);
    CacheConfig cfg;
    cfg.n_layers = t->n_layers;
    cfg.n_experts = t->n_experts;
    cfg.layer_budget_bytes.assign(t->n_layers, slots);
    auto lru = MixedPrecisionCache<LruEviction>::create(cfg);
    BeladyOracleEviction b;
    REQUIRE(b.set_future(test::trace_accesses(*t), t->n_layers, t->n_experts).is_ok());
    auto opt = MixedPrecisionCache<BeladyOracleEviction>::create(cfg, std::move(b));
    bool ok = false;
    test::replay(*t, *lru, ok);
    test::replay(*t, *opt, ok);
    CHECK(lru->stats().hit_rate() == doctest::Approx(expect[i][0]).epsilon(0.02));
    CHECK(opt->stats().hit_rate() == doctest::Approx(expect[i][1]).epsilon(0.02));
    ++i;
  }
}

TEST_CASE("Belady is never worse than any online policy on the shared traces") {
  MOEX_REQUIRE_SHARED(shared);
  const char* paths[] = {
      "models/tiny-mixtral-8e/router_logits_code.npy",
      "models/tiny-mixtral-32e/router_logits_code.npy",
      "traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl",
      "traces/flame-moe-290m/flame_moe_290m_seq0-1_x_512tok_top6.csv",
      "traces/flame-moe-290m/flame_moe_290m_64seq_first10tok_top6.csv",
  };
  for (const char* p : paths) {
    CAPTURE(p);
    TraceLoadOptions opt;
    opt.keep_logits = false;
    auto t = load_trace(shared / p, opt);
    REQUIRE(t.is_ok());
    if (t->tokens() > 8192) {  // keep the test quick: the first 16 sequences
      t->expert_ids.resize(8192ull * t->n_layers * t->top_k);
      t->gate_weights.resize(t->expert_ids.size());
      t->seq_start.resize(16);
    }
    const auto future = test::trace_accesses(*t);
    for (std::uint32_t frac : {4u, 2u}) {
      for (bool per_layer : {false, true}) {
        CAPTURE(frac);
        CAPTURE(per_layer);
        CacheConfig cfg;
        cfg.n_layers = t->n_layers;
        cfg.n_experts = t->n_experts;
        const std::uint64_t per = std::max<std::uint64_t>(t->top_k, t->n_experts / frac);
        if (per_layer)
          cfg.layer_budget_bytes.assign(t->n_layers, per);
        else
          cfg.budget_bytes = per * t->n_layers;
        BeladyOracleEviction b;
        REQUIRE(b.set_future(future, t->n_layers, t->n_experts).is_ok());
        auto best_c = MixedPrecisionCache<BeladyOracleEviction>::create(cfg, std::move(b));
        bool ok = false;
        const auto best = test::replay(*t, *best_c, ok);
        CHECK(ok);
        auto lru = MixedPrecisionCache<LruEviction>::create(cfg);
        auto lfu = MixedPrecisionCache<LfuEviction>::create(cfg);
        auto lrfu = MixedPrecisionCache<LrfuEviction>::create(cfg);
        auto hob = MixedPrecisionCache<HobbitScoreEviction>::create(cfg);
        auto hot = MixedPrecisionCache<StaticHotSetEviction>::create(
            cfg, StaticHotSetEviction(expert_access_counts(*t), t->n_experts));
        CHECK(test::replay(*t, *lru, ok) <= best);
        CHECK(test::replay(*t, *lfu, ok) <= best);
        CHECK(test::replay(*t, *lrfu, ok) <= best);
        CHECK(test::replay(*t, *hob, ok) <= best);
        CHECK(test::replay(*t, *hot, ok) <= best);
      }
    }
  }
}

}  // TEST_SUITE("trace")
