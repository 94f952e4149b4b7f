// Technique rows (moex/sim/techniques.hpp): the baseline row is the grid's LRU run, exact rows
// are marked exact, each technique changes what it should, bad settings are errors, and on the
// shared models' traces every row runs.
#include "moex/sim/techniques.hpp"

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/backend/sim_backend.hpp"
#include "moex/formats/trace.hpp"
#include "moex/sim/grid.hpp"

#include "support/test_support.hpp"

namespace {

// A random top-2 trace over 4 layers x 8 experts with unequal gate weights and some locality.
moex::RoutingTrace random_trace(std::size_t tokens, std::uint64_t seed) {
  moex::RoutingTrace t;
  t.n_layers = 4;
  t.n_experts = 8;
  t.top_k = 2;
  t.seq_start = {0};
  t.source = "random";
  std::mt19937_64 rng(seed);
  std::vector<std::uint32_t> prev(t.n_layers, 0);
  for (std::size_t i = 0; i < tokens; ++i)
    for (std::uint32_t l = 0; l < t.n_layers; ++l) {
      const std::uint32_t a = rng() % 3 == 0 ? static_cast<std::uint32_t>(rng() % 8) : prev[l];
      std::uint32_t b = static_cast<std::uint32_t>(rng() % 8);
      if (b == a) b = (a + 1) % 8;
      prev[l] = a;
      const float w1 = 0.5f + 0.45f * static_cast<float>(rng() % 1000) / 1000.f;
      t.expert_ids.insert(t.expert_ids.end(), {a, b});
      t.gate_weights.insert(t.gate_weights.end(), {w1, 1.f - w1});
    }
  return t;
}

// 1 TB/s GPU reads, a 10 GB/s link, a host CPU at 20 GB/s; no latencies.
moex::DeviceProfile profile() {
  moex::DeviceProfile p;
  p.name = "test";
  p.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, 10'000'000'000ull};
  p.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)].read_bytes_per_s = 1'000'000'000'000ull;
  p.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)].read_bytes_per_s = 20'000'000'000ull;
  p.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)].flops_per_s = 1'000'000'000'000ull;
  return p;
}

}  // namespace

TEST_SUITE("simgrid") {

TEST_CASE("technique rows: baseline equals the grid's LRU run, each technique does what it says") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const auto trace = random_trace(400, seed);
  REQUIRE(trace.validate().is_ok());
  moex::SimTechniqueConfig c;
  c.trace = &trace;
  c.shape = {"small", {256, 512}};
  c.profile = profile();
  c.budget_fraction = 0.25;
  moex::SimTechniqueParams params;
  auto rows = moex::run_techniques(c, &params);
  REQUIRE(rows.is_ok());
  REQUIRE(rows->size() == moex::all_sim_techniques().size());

  moex::SimRunConfig g;
  g.trace = &trace;
  g.begin_token = trace.tokens() / 2;
  g.shape = c.shape;
  g.profile = c.profile;
  g.policy = moex::SimPolicy::kLru;
  g.budget_fraction = 0.25;
  auto lru = moex::run_simulation(g);
  REQUIRE(lru.is_ok());
  const auto& base = rows->front();
  CHECK(base.technique == moex::SimTechnique::kBaseline);
  CHECK(base.run.hits == lru->hits);
  CHECK(base.run.misses == lru->misses);
  CHECK(base.run.stall_ns == lru->stall_ns);
  CHECK(base.run.sim_ns == lru->sim_ns);
  CHECK(base.speedup == doctest::Approx(1.0));

  for (const auto& r : *rows) {
    CAPTURE(moex::to_string(r.technique));
    switch (r.technique) {
      case moex::SimTechnique::kBaseline:
      case moex::SimTechnique::kLayerBudgets:
        CHECK(r.exact);
        CHECK(r.computed_at_source == 0);
        break;
      case moex::SimTechnique::kPrefetch:
        CHECK(r.exact);
        CHECK(r.prefetches > 0);
        CHECK(r.recall > 0.5);  // replayed at recall 0.8
        break;
      case moex::SimTechnique::kPreGateRouting:
        CHECK_FALSE(r.exact);  // the pre-gate's choice replaces the router's
        CHECK(r.prefetches > 0);
        CHECK(r.recall == doctest::Approx(1.0));  // predictions are the routing
        CHECK(r.stall_cut > 0.0);                 // every prefetch right: never worse than on demand here
        break;
      case moex::SimTechnique::kAdaptiveGate:
        CHECK_FALSE(r.exact);
        CHECK(r.avg_k < 2.0);
        CHECK(r.avg_k == doctest::Approx(1.5).epsilon(0.1));  // 25% fewer, as calibrated on the profile half
        break;
      case moex::SimTechnique::kLowPrecision:
        CHECK_FALSE(r.exact);
        CHECK(r.low_precision_loads > 0);
        break;
      case moex::SimTechnique::kCpuCompute:
        CHECK(r.exact);
        CHECK(r.computed_at_source > 0);
        CHECK(r.cpu_busy_fraction > 0.0);
        break;
      case moex::SimTechnique::kCombined:
        CHECK_FALSE(r.exact);
        CHECK(r.prefetches > 0);
        break;
    }
  }
  CHECK(params.gate_threshold > 0.f);
  CHECK(params.layer_slots.size() == trace.n_layers);
}

TEST_CASE("technique rows: bad settings are errors") {
  const auto trace = random_trace(40, 7);
  moex::SimTechniqueConfig c;
  c.trace = &trace;
  c.shape = {"small", {256, 512}};
  c.profile = profile();
  auto bad = [&](auto mutate) {
    moex::SimTechniqueConfig d = c;
    mutate(d);
    auto r = moex::run_techniques(d);
    return !r.is_ok() && r.status().code() == moex::StatusCode::kInvalidArgument;
  };
  CHECK(bad([](auto& d) { d.trace = nullptr; }));
  CHECK(bad([](auto& d) { d.budget_fraction = 0; }));
  CHECK(bad([](auto& d) { d.settings.recall = 1.5f; }));
  CHECK(bad([](auto& d) { d.settings.layer_recall = {0.5f}; }));
  CHECK(bad([](auto& d) { d.settings.sensitivities = {1.f, 1.f}; }));
  CHECK(bad([](auto& d) { d.settings.prefetch_depth = 4; }));
  CHECK(bad([](auto& d) { d.settings.low_precision_share = 1.0; }));
  CHECK(bad([](auto& d) { d.budget_fraction = 0.05; }));  // 1 slot: fewer than one per layer
  CHECK_FALSE(moex::parse_sim_technique("oracle").is_ok());
  CHECK(moex::parse_sim_technique("cpu-compute").value() == moex::SimTechnique::kCpuCompute);
  CHECK(moex::parse_sim_technique("pregate-routing").value() == moex::SimTechnique::kPreGateRouting);
}

TEST_CASE("technique rows on the shared models' traces, with their measured per-layer recall") {
  MOEX_REQUIRE_SHARED(shared);
  for (const char* m : {"tiny-mixtral-8e", "tiny-mixtral-32e"}) {
    CAPTURE(m);
    const auto dir = shared / "models" / m;
    auto trace = moex::load_trace(dir / "router_logits_code.npy");
    REQUIRE(trace.is_ok());
    auto recall = moex::load_predictor_recall(dir / "training_report.json");
    REQUIRE(recall.is_ok());
    CHECK(recall->size() + 1 == trace->n_layers);
    moex::SimTechniqueConfig c;
    c.trace = &*trace;
    c.shape = {"mixtral", {4096, 14336}};
    c.profile = profile();
    c.settings.layer_recall = *recall;
    c.techniques = {moex::SimTechnique::kBaseline, moex::SimTechnique::kCpuCompute, moex::SimTechnique::kLowPrecision};
    auto rows = moex::run_techniques(c);
    REQUIRE(rows.is_ok());
    REQUIRE(rows->size() == 3);
    for (const auto& r : *rows) {
      CAPTURE(moex::to_string(r.technique));
      if (r.technique != moex::SimTechnique::kBaseline) CHECK(r.run.stall_ns < rows->front().run.stall_ns);
    }
  }
}

}  // TEST_SUITE("simgrid")
