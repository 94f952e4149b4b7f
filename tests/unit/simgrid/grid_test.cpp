// The simulation grid (moex/sim/grid.hpp) and the moex-sim tool: hand-computed hit counts, the
// Belady bound on every shared trace, exact infinite-bandwidth time, well-formed CSV/JSON, and
// bad inputs as errors.

#include "moex/sim/grid.hpp"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "moex/backend/sim_backend.hpp"
#include "moex/formats/trace.hpp"

#include "support/test_support.hpp"

namespace {

// A one-layer top-1 trace over `n_experts` experts visiting `seq` in order, one sequence.
moex::RoutingTrace sequence_trace(const std::vector<std::uint32_t>& seq, std::uint32_t n_experts,
                                  std::uint32_t n_layers = 1) {
  moex::RoutingTrace t;
  t.n_layers = n_layers;
  t.n_experts = n_experts;
  t.top_k = 1;
  t.seq_start = {0};
  // Token i visits seq[i*n_layers + l] at layer l.
  for (std::uint32_t e : seq) {
    t.expert_ids.push_back(e);
    t.gate_weights.push_back(1.f);
  }
  t.source = "synthetic";
  return t;
}

// A profile whose only costs are a 1 TB/s expert read on the GPU and `link_bps` on the
// host-to-device link (0 = infinite), with no latencies.
moex::DeviceProfile test_profile(std::uint64_t link_bps) {
  moex::DeviceProfile p;
  p.name = link_bps ? "test" : "infinite-link";
  p.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {0, link_bps};
  p.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)].read_bytes_per_s = 1'000'000'000'000ull;
  return p;
}

moex::SimRunConfig base_config(const moex::RoutingTrace& t, moex::SimPolicy p, double budget) {
  moex::SimRunConfig c;
  c.trace = &t;
  c.shape = {"small", {256, 512}};
  c.profile = test_profile(10'000'000'000ull);
  c.policy = p;
  c.budget_fraction = budget;
  return c;
}

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  bool quoted = false;
  for (char ch : line) {
    if (ch == '"')
      quoted = !quoted;
    else if (ch == ',' && !quoted) {
      out.push_back(cur);
      cur.clear();
    } else
      cur += ch;
  }
  out.push_back(cur);
  return out;
}

}  // namespace

TEST_SUITE("simgrid") {

TEST_CASE("LRU and Belady on a hand-worked sequence give the hand-computed hit counts") {
  // 4 experts, budget 0.5 -> 2 slots. Sequence 0 1 0 2 0 1 3 0.
  // LRU: 0m 1m 0h 2m(evict 1) 0h 1m(evict 2) 3m(evict 0) 0m(evict 1) -> 2 hits, 6 misses.
  // Belady: 0m 1m 0h 2m(evict 1: next 5 vs 0's 4) 0h 1m(evict 2: never) 3m(evict 1: never) 0h
  //   -> 3 hits, 5 misses.
  const auto t = sequence_trace({0, 1, 0, 2, 0, 1, 3, 0}, 4);
  REQUIRE(t.validate().is_ok());
  auto lru = moex::run_simulation(base_config(t, moex::SimPolicy::kLru, 0.5));
  REQUIRE_MESSAGE(lru.is_ok(), lru.status().to_string());
  CHECK(lru->cache_slots == 2);
  CHECK(lru->tokens == 8);
  CHECK(lru->layer_steps == 8);
  CHECK(lru->hits == 2);
  CHECK(lru->misses == 6);
  CHECK(lru->bytes_loaded == 6 * lru->expert_bytes);
  CHECK(lru->hit_rate == doctest::Approx(0.25));
  auto opt = moex::run_simulation(base_config(t, moex::SimPolicy::kBelady, 0.5));
  REQUIRE(opt.is_ok());
  CHECK(opt->hits == 3);
  CHECK(opt->misses == 5);

  SUBCASE("the grid with split none gives the same counts") {
    moex::SimGridConfig g;
    g.policies = {moex::SimPolicy::kLru, moex::SimPolicy::kBelady};
    g.budgets = {0.5};
    g.profiles = {test_profile(10'000'000'000ull)};
    g.shapes = {{"small", {256, 512}}};
    g.split = moex::TraceSplit::kNone;
    auto r = moex::run_grid(t, g);
    REQUIRE(r.is_ok());
    REQUIRE(r->size() == 2);
    CHECK((*r)[0].policy == "lru");
    CHECK((*r)[0].hits == 2);
    CHECK((*r)[1].policy == "belady");
    CHECK((*r)[1].hits == 3);
  }
  SUBCASE("split half measures the second half from a cold cache") {
    // Second half: 0 1 3 0 with 2 slots under LRU: 0m 1m 3m(evict 0) 0m -> 0 hits.
    moex::SimGridConfig g;
    g.policies = {moex::SimPolicy::kLru};
    g.budgets = {0.5};
    g.profiles = {test_profile(10'000'000'000ull)};
    g.shapes = {{"small", {256, 512}}};
    auto r = moex::run_grid(t, g);
    REQUIRE(r.is_ok());
    CHECK((*r)[0].tokens == 4);
    CHECK((*r)[0].hits == 0);
    CHECK((*r)[0].misses == 4);
  }
}

TEST_CASE("the replay skips (token, layer) pairs without experts and keeps Belady's steps aligned") {
  // 2 layers; token 1 has no expert at layer 0 (as in the Mixtral trace).
  auto t = sequence_trace({0, 0, moex::kNoExpert, 1, 0, 0}, 2, 2);
  REQUIRE(t.validate().is_ok());
  auto lru = moex::run_simulation(base_config(t, moex::SimPolicy::kLru, 0.5));
  REQUIRE_MESSAGE(lru.is_ok(), lru.status().to_string());
  CHECK(lru->layer_steps == 5);
  auto opt = moex::run_simulation(base_config(t, moex::SimPolicy::kBelady, 0.5));
  REQUIRE(opt.is_ok());
  CHECK(opt->hits >= lru->hits);
}

TEST_CASE("with an infinite-bandwidth link the stall is zero and the time is the compute time") {
  const auto t = sequence_trace({0, 1, 2, 3, 0, 5, 6, 7, 1, 1, 2, 4}, 8);
  for (auto p : moex::default_sim_policies()) {
    if (p == moex::SimPolicy::kLruLayerDp) continue;  // needs as many slots as layers; covered below
    CAPTURE(moex::to_string(p));
    auto c = base_config(t, p, 0.25);
    c.profile = test_profile(0);
    auto r = moex::run_simulation(c);
    REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
    CHECK(r->misses > 0);
    CHECK(r->stall_ns == 0);
    CHECK(r->sim_ns == r->compute_ns);
    // Each expert call reads its bytes once at 1 TB/s.
    CHECK(r->compute_ns == r->layer_steps * moex::sim_duration_ns(r->expert_bytes, 1'000'000'000'000ull));
    CHECK(r->pcie_busy_fraction == 0.0);
  }
}

TEST_CASE("Belady bounds every online policy on every shared trace at two budgets") {
  MOEX_REQUIRE_SHARED(shared);
  const std::vector<std::filesystem::path> traces = {
      shared / "traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl",
      shared / "traces/flame-moe-290m/flame_moe_290m_seq0-1_x_512tok_top6.csv",
      shared / "traces/flame-moe-290m/flame_moe_290m_64seq_first10tok_top6.csv",
      shared / "models/tiny-mixtral-8e/router_logits_code.npy",
      shared / "models/tiny-mixtral-32e/router_logits_code.npy",
  };
  for (const auto& path : traces) {
    CAPTURE(path.string());
    moex::TraceLoadOptions o;
    o.keep_logits = false;
    auto t = moex::load_trace(path, o);
    REQUIRE_MESSAGE(t.is_ok(), t.status().to_string());
    for (auto split : {moex::TraceSplit::kHalf, moex::TraceSplit::kNone}) {
      CAPTURE(moex::to_string(split));
      if (split == moex::TraceSplit::kNone && t->tokens() > 20000) continue;  // keep the suite quick
      moex::SimGridConfig g;
      g.budgets = {0.1, 0.25};
      g.profiles = {test_profile(25'000'000'000ull)};
      g.shapes = {{"mixtral", {4096, 14336}}};
      g.split = split;
      auto r = moex::run_grid(*t, g);
      REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
      for (double b : g.budgets) {
        const moex::SimRunResult* opt = nullptr;
        for (const auto& x : *r)
          if (x.policy == "belady" && x.budget_fraction == b) opt = &x;
        REQUIRE(opt != nullptr);
        for (const auto& x : *r) {
          if (x.budget_fraction != b) continue;
          CAPTURE(x.policy);
          CAPTURE(b);
          CHECK(x.hits + x.misses == opt->hits + opt->misses);  // same lookups
          CHECK(x.hits <= opt->hits);
        }
      }
    }
  }
}

TEST_CASE("model-native shapes come from config.json beside a .npy trace") {
  MOEX_REQUIRE_SHARED(shared);
  const auto path = shared / "models/tiny-mixtral-32e/router_logits_code.npy";
  moex::TraceLoadOptions o;
  o.keep_logits = false;
  auto t = moex::load_trace(path, o);
  REQUIRE(t.is_ok());
  CHECK(t->top_k == 4);  // num_experts_per_tok of its config.json
  auto s = moex::resolve_sim_shape("model-native", path, *t);
  REQUIRE_MESSAGE(s.is_ok(), s.status().to_string());
  CHECK(s->shape.hidden == 256);
  CHECK(s->shape.ffn == 64);
  // The FLAME trace has no config.json and is not Mixtral-shaped: an explicit shape is needed.
  const auto flame = shared / "traces/flame-moe-290m/flame_moe_290m_64seq_first10tok_top6.csv";
  auto ft = moex::load_trace(flame);
  REQUIRE(ft.is_ok());
  CHECK_FALSE(moex::resolve_sim_shape("model-native", flame, *ft).is_ok());
  const auto mix = shared / "traces/mixtral-8x7b-speculative-moe/gsm8k_2_routing.jsonl";
  auto mt = moex::load_trace(mix);
  REQUIRE(mt.is_ok());
  auto ms = moex::resolve_sim_shape("model-native", mix, *mt);
  REQUIRE(ms.is_ok());
  CHECK(ms->shape.hidden == 4096);
  CHECK(ms->shape.ffn == 14336);
}

TEST_CASE("shapes by name and HxF") {
  const auto t = sequence_trace({0, 1}, 2);
  auto m = moex::resolve_sim_shape("mixtral", "x.bin", t);
  REQUIRE(m.is_ok());
  CHECK(m->shape == moex::ExpertShape{4096, 14336});
  auto q = moex::resolve_sim_shape("qwen3-30b-a3b", "x.bin", t);
  REQUIRE(q.is_ok());
  CHECK(q->shape == moex::ExpertShape{2048, 768});
  auto h = moex::resolve_sim_shape("1024x2816", "x.bin", t);
  REQUIRE(h.is_ok());
  CHECK(h->shape == moex::ExpertShape{1024, 2816});
  for (const char* bad : {"", "x", "12x", "x12", "0x64", "64x0", "12y34", "-4x8", "99999999x8", "llama"}) {
    CAPTURE(bad);
    CHECK(moex::resolve_sim_shape(bad, "x.bin", t).status().code() == moex::StatusCode::kInvalidArgument);
  }
}

TEST_CASE("CSV and JSON outputs are well-formed and carry every run") {
  const auto t = sequence_trace({0, 1, 0, 2, 0, 1, 3, 0, 2, 2, 1, 0}, 4);
  moex::SimGridConfig g;
  g.budgets = {0.25, 0.5, 1.0};
  g.profiles = {test_profile(10'000'000'000ull), test_profile(0)};
  g.shapes = {{"small", {256, 512}}, {"name,with \"quotes\"", {128, 256}}};
  g.split = moex::TraceSplit::kNone;
  g.policies = {moex::SimPolicy::kLru,    moex::SimPolicy::kLfu,       moex::SimPolicy::kLrfu,
                moex::SimPolicy::kHobbit, moex::SimPolicy::kStaticHot, moex::SimPolicy::kBelady};
  auto r = moex::run_grid(t, g);
  REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
  CHECK(r->size() == 6 * 3 * 2 * 2);

  const std::string csv = moex::sim_results_to_csv("trace, \"odd\" name", *r);
  std::istringstream in(csv);
  std::string line;
  REQUIRE(std::getline(in, line));
  const auto header = split_csv_line(line);
  CHECK(header.front() == "trace");
  CHECK(header.size() == 22);
  std::size_t n = 0;
  while (std::getline(in, line)) {
    CAPTURE(line);
    const auto f = split_csv_line(line);
    REQUIRE(f.size() == header.size());
    CHECK(f[0] == "trace, odd name");  // quotes doubled inside a quoted field, stripped by the splitter
    const double hit_rate = std::strtod(f[14].c_str(), nullptr);
    CHECK(hit_rate >= 0.0);
    CHECK(hit_rate <= 1.0);
    ++n;
  }
  CHECK(n == r->size());

  const std::string js = moex::sim_results_to_json("t", t, g.split, *r);
  const auto j = nlohmann::json::parse(js, nullptr, false);
  REQUIRE_FALSE(j.is_discarded());
  CHECK(j["n_layers"] == 1);
  CHECK(j["split"] == "none");
  REQUIRE(j["runs"].is_array());
  CHECK(j["runs"].size() == r->size());
  for (const auto& run : j["runs"]) {
    CHECK(run["hits"].get<std::uint64_t>() + run["misses"].get<std::uint64_t>() == 12);
    CHECK(run.contains("tokens_per_s"));
    CHECK(run.contains("pcie_busy_fraction"));
  }
  // A budget of 1.0 holds every expert: only cold misses (4 distinct experts).
  for (const auto& x : *r)
    if (x.budget_fraction == 1.0) CHECK(x.misses == 4);
}

TEST_CASE("bad inputs are errors, not crashes") {
  const auto t = sequence_trace({0, 1, 0, 2}, 4);
  for (double b : {0.0, -0.5, 1.5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    CAPTURE(b);
    CHECK(moex::run_simulation(base_config(t, moex::SimPolicy::kLru, b)).status().code() ==
          moex::StatusCode::kInvalidArgument);
  }
  // Budget below one expert: 1e-3 of 4 experts.
  CHECK(moex::run_simulation(base_config(t, moex::SimPolicy::kLru, 1e-3)).status().code() ==
        moex::StatusCode::kInvalidArgument);
  auto c = base_config(t, moex::SimPolicy::kLru, 0.5);
  c.trace = nullptr;
  CHECK_FALSE(moex::run_simulation(c).is_ok());
  c = base_config(t, moex::SimPolicy::kLru, 0.5);
  c.begin_token = 4;
  CHECK_FALSE(moex::run_simulation(c).is_ok());
  c = base_config(t, moex::SimPolicy::kStaticHot, 0.5);
  c.static_scores = {1.0, 2.0};  // wrong size
  CHECK_FALSE(moex::run_simulation(c).is_ok());
  CHECK_FALSE(moex::parse_sim_policy("mru").is_ok());
  CHECK(moex::parse_sim_policy("static-hot").is_ok());
  CHECK_FALSE(moex::parse_trace_split("thirds").is_ok());
  CHECK_FALSE(moex::trace_slice(t, 3, 2).is_ok());
  CHECK_FALSE(moex::trace_slice(t, 0, 5).is_ok());
  if (!moex::sim_layer_budgets_supported())
    CHECK(moex::run_simulation(base_config(t, moex::SimPolicy::kLruLayerDp, 0.5)).status().code() ==
          moex::StatusCode::kUnsupported);

  moex::SimGridConfig g;
  g.shapes = {{"small", {256, 512}}};
  CHECK_FALSE(moex::run_grid(t, g).is_ok());  // no profile
  g.profiles = {test_profile(0)};
  g.budgets = {0.5, 2.0};
  CHECK_FALSE(moex::run_grid(t, g).is_ok());  // bad budget
  g.budgets = {0.5};
  g.shapes.clear();
  CHECK_FALSE(moex::run_grid(t, g).is_ok());  // no shape

  const auto missing = moex::test::temp_dir("simgrid") / "no-such-trace.jsonl";
  CHECK_FALSE(moex::load_trace(missing).is_ok());
}

TEST_CASE("trace_slice keeps routing and rebases sequences") {
  auto t = sequence_trace({0, 1, 2, 3, 0, 1}, 4);
  t.seq_start = {0, 2, 4};
  auto s = moex::trace_slice(t, 3, 6);
  REQUIRE(s.is_ok());
  REQUIRE(s->validate().is_ok());
  CHECK(s->tokens() == 3);
  CHECK(s->experts(0, 0)[0] == 3);
  CHECK(s->seq_start == std::vector<std::uint32_t>{0, 1});
}

// The tool itself, when it was built next to this test (build/src/moex-sim).
TEST_CASE("moex-sim: bad flags and a missing trace are clear errors; a run writes CSV and JSON") {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  const auto tool = self.parent_path().parent_path() / "src/moex-sim";
  if (ec || !std::filesystem::exists(tool)) {
    MESSAGE("skipped: moex-sim is not built beside this test");
    return;
  }
  const auto dir = moex::test::temp_dir("moex-sim");
  auto run = [&](const std::string& args) {
    const std::string cmd = "'" + tool.string() + "' " + args + " >'" + (dir / "out.txt").string() + "' 2>&1";
    const int st = std::system(cmd.c_str());
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  };
  CHECK(run("--help") == 0);
  CHECK(run("") == 2);
  CHECK(run("x.jsonl --frobnicate") == 2);
  CHECK(run("x.jsonl --budgets 0.1,abc") == 2);
  CHECK(run("x.jsonl --budgets 0") == 2);
  CHECK(run("x.jsonl --policies lru,mru") == 2);
  CHECK(run("x.jsonl --budgets") == 2);
  CHECK(run("'" + (dir / "missing.jsonl").string() + "'") == 1);

  // A small moex JSON Lines trace, then a full run.
  const auto t = sequence_trace({0, 1, 0, 2, 0, 1, 3, 0, 2, 2, 1, 0}, 4);
  const auto trace_path = dir / "small.jsonl";
  REQUIRE(moex::write_trace_jsonl(t, trace_path).is_ok());
  CHECK(run("'" + trace_path.string() + "' --shape banana") == 2);
  const auto csv = dir / "r.csv";
  const auto json = dir / "r.json";
  REQUIRE(run("'" + trace_path.string() + "' --budgets 0.25,0.5 --shape 256x512 --csv '" + csv.string() + "' --json='" +
              json.string() + "' --no-progress") == 0);
  std::ifstream jf(json);
  const auto j = nlohmann::json::parse(jf, nullptr, false);
  REQUIRE_FALSE(j.is_discarded());
  CHECK(j["runs"].size() == moex::default_sim_policies().size() * 2 * 2);  // x 2 default profiles
  std::ifstream cf(csv);
  std::string line;
  std::size_t lines = 0;
  while (std::getline(cf, line)) ++lines;
  CHECK(lines == j["runs"].size() + 1);
}

}  // TEST_SUITE("simgrid")
