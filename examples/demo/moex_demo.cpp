// moex-demo: generates a small Mixtral-shaped model as a real safetensors checkpoint (Hugging Face
// tensor names + config.json), then decodes tokens through its MoE layers on the CPU with a
// fraction of the experts in the fast tier, and prints what happened per layer and in total.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include "moex/cache/layer_budget.hpp"
#include "moex/gate/sensitivity_gate.hpp"
#include "moex/moex.hpp"
#include "moex/policies/cost_model_miss.hpp"
#include "moex/policies/hobbit_precision_miss.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/route/pre_gate_router.hpp"
#include "moex/sim/quality.hpp"

namespace fs = std::filesystem;

namespace {

struct Options {
  std::uint32_t layers = 8, experts = 8, top_k = 2, hidden = 1024, ffn = 3584;
  double budget = 0.25;  // fraction of all expert bytes in the fast tier
  std::uint32_t tokens = 64;
  std::uint32_t batch = 1;
  std::string format = "bf16";  // precision experts are held in in the fast tier
  std::string model;            // run on this checkpoint instead of generating one
  std::string dir;              // where the generated model goes
  std::uint64_t seed = 1;
  double locality = 0.8;  // correlation of consecutive tokens' hidden states
  bool json = false;
  // Policies (all off by default: the exact path).
  std::uint32_t prefetch_depth = 0;  // --prefetch speculative[:depth]
  double gate_target_k = 0;          // --gate adaptive:<target_k>
  std::string miss = "load";         // --miss load | cost | hobbit
  bool miss_given = false;
  float t_high = 0.6f, t_skip = 0.9f;
  bool cost_mixed = false;        // --miss cost:<t_high>,<t_skip>
  std::string low_precision;      // --low-precision int8|int4|int2
  bool per_layer_budget = false;  // --per-layer-budget
  std::string eviction = "lru";   // --eviction
  bool policies_on() const {
    return prefetch_depth > 0 || gate_target_k > 0 || miss != "load" || !low_precision.empty() || per_layer_budget ||
           eviction != "lru";
  }
};

void usage(std::FILE* f) {
  std::fprintf(f,
               "usage: moex-demo [options]\n"
               "Generates a Mixtral-shaped model (safetensors + config.json), decodes tokens through its\n"
               "MoE layers on the CPU with part of the experts in the fast tier, and prints statistics.\n\n"
               "  --layers N      MoE layers (default 8)\n"
               "  --experts N     experts per layer (default 8)\n"
               "  --top-k N       experts per token (default 2)\n"
               "  --hidden N      hidden size (default 1024)\n"
               "  --ffn N         expert intermediate size (default 3584)\n"
               "  --budget F      fast-tier budget as a fraction of all expert bytes (default 0.25)\n"
               "  --tokens N      tokens to decode (default 64)\n"
               "  --batch N       tokens per step (default 1)\n"
               "  --format P      precision of experts in the fast tier: f32, bf16, int8, int4, int2\n"
               "                  (default bf16; int* copies are built from the bf16 master at load)\n"
               "  --model PATH    use an existing checkpoint (safetensors file or folder, or .gguf)\n"
               "                  instead of generating one, e.g. ../shared/models/tiny-mixtral-8e\n"
               "  --dir PATH      where to write the generated model (default: build/demo-model-<shape>)\n"
               "  --locality F    correlation of consecutive tokens' hidden states, 0..1 (default 0.8)\n"
               "  --seed N        random seed (default 1)\n"
               "  --json          print the statistics as JSON instead of a table\n"
               "Policies (off by default: the exact path, on-demand loading, LRU):\n"
               "  --prefetch speculative[:D]  predict the next D layers' experts (default 1) with their own\n"
               "                  routers on this layer's input, and load them ahead (async loads)\n"
               "  --gate adaptive:K  AdapMoE's sensitivity gate, calibrated to K experts per token on\n"
               "                  average (1 <= K <= top-k); sensitivities estimated from the model\n"
               "  --miss P        on a miss: load (default), cost (load or compute on the CPU where the\n"
               "                  expert lives, whichever finishes first), cost:TH,TS (and HOBBIT's rule),\n"
               "                  hobbit:TH,TS (HOBBIT: full precision, low precision above TH, skip above TS)\n"
               "  --low-precision P  low-precision copies for misses: int8, int4, int2 (a quarter of the\n"
               "                  budget holds them); alone it means --miss hobbit:0.6,0.9\n"
               "  --per-layer-budget  split the budget over layers by AdapMoE's DP on miss curves\n"
               "                  profiled on calibration tokens (needs one expert per layer)\n"
               "  --eviction E    lru (default), lfu, lrfu, hobbit\n"
               "With any policy on, an exact shadow executor runs each layer on the same input and the\n"
               "relative error of the MoE outputs is printed beside the speed.\n"
               "  --help          this text\n\n"
               "The demo runs only the MoE layers. To run a real checkpoint end to end (embedding, attention,\n"
               "MoE through moex, lm_head) use the mini engine built beside it, e.g.\n"
               "  build/examples/mini_engine/moex-engine generate ../shared/models/tiny-mixtral-8e \\\n"
               "      --prompt 'def main():' --tokens 200\n"
               "  build/examples/mini_engine/moex-engine bpb ../shared/models/tiny-mixtral-8e --windows 8\n"
               "(see docs/engine.md).\n");
}

bool parse_u32(const char* s, std::uint32_t& out) {
  char* end = nullptr;
  const unsigned long v = std::strtoul(s, &end, 10);
  if (end == s || *end != '\0' || v == 0 || v > (1ul << 24)) return false;
  out = static_cast<std::uint32_t>(v);
  return true;
}

bool parse_double(const char* s, double& out) {
  char* end = nullptr;
  out = std::strtod(s, &end);
  return end != s && *end == '\0' && std::isfinite(out);
}

// "speculative" or "speculative:D" with D >= 1.
bool parse_prefetch(const std::string& v, std::uint32_t& depth) {
  if (v == "speculative") {
    depth = 1;
    return true;
  }
  const std::string pre = "speculative:";
  if (v.rfind(pre, 0) != 0) return false;
  return parse_u32(v.c_str() + pre.size(), depth) && depth <= 64;
}

// "adaptive:K" with K >= 1.
bool parse_gate(const std::string& v, double& k) {
  const std::string pre = "adaptive:";
  if (v.rfind(pre, 0) != 0) return false;
  return parse_double(v.c_str() + pre.size(), k) && k >= 1.0 && k <= moex::kMaxTopK;
}

// "TH,TS" with 0 <= TH <= TS <= 1.
bool parse_thresholds(const std::string& v, float& th, float& ts) {
  const auto c = v.find(',');
  if (c == std::string::npos) return false;
  double a = 0, b = 0;
  if (!parse_double(v.substr(0, c).c_str(), a) || !parse_double(v.substr(c + 1).c_str(), b)) return false;
  if (!(a >= 0 && a <= b && b <= 1)) return false;
  th = static_cast<float>(a);
  ts = static_cast<float>(b);
  return true;
}

// "load", "cost", "cost:TH,TS", "hobbit:TH,TS".
bool parse_miss(const std::string& v, Options& o) {
  o.miss_given = true;
  if (v == "load" || v == "cost") {
    o.miss = v;
    return true;
  }
  if (v.rfind("cost:", 0) == 0) {
    o.miss = "cost";
    o.cost_mixed = true;
    return parse_thresholds(v.substr(5), o.t_high, o.t_skip);
  }
  if (v.rfind("hobbit:", 0) == 0) {
    o.miss = "hobbit";
    return parse_thresholds(v.substr(7), o.t_high, o.t_skip);
  }
  return false;
}

int parse_args(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 1;
    }
    if (a == "--json") {
      o.json = true;
      continue;
    }
    if (a == "--per-layer-budget") {
      o.per_layer_budget = true;
      continue;
    }
    static const char* const kValued[] = {"--layers", "--experts",       "--top-k",   "--hidden",   "--ffn",
                                          "--tokens", "--batch",         "--budget",  "--locality", "--format",
                                          "--model",  "--dir",           "--seed",    "--prefetch", "--gate",
                                          "--miss",   "--low-precision", "--eviction"};
    if (std::none_of(std::begin(kValued), std::end(kValued), [&](const char* k) { return a == k; })) {
      std::fprintf(stderr, "moex-demo: unknown option %s (see --help)\n", a.c_str());
      return 2;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "moex-demo: %s needs a value (see --help)\n", a.c_str());
      return 2;
    }
    const char* v = argv[++i];
    bool ok = true;
    if (a == "--layers")
      ok = parse_u32(v, o.layers);
    else if (a == "--experts")
      ok = parse_u32(v, o.experts);
    else if (a == "--top-k")
      ok = parse_u32(v, o.top_k);
    else if (a == "--hidden")
      ok = parse_u32(v, o.hidden);
    else if (a == "--ffn")
      ok = parse_u32(v, o.ffn);
    else if (a == "--tokens")
      ok = parse_u32(v, o.tokens);
    else if (a == "--batch")
      ok = parse_u32(v, o.batch);
    else if (a == "--budget")
      ok = parse_double(v, o.budget) && o.budget > 0 && o.budget <= 1;
    else if (a == "--locality")
      ok = parse_double(v, o.locality) && o.locality >= 0 && o.locality < 1;
    else if (a == "--format")
      o.format = v;
    else if (a == "--model")
      o.model = v;
    else if (a == "--dir")
      o.dir = v;
    else if (a == "--seed")
      o.seed = std::strtoull(v, nullptr, 10);
    else if (a == "--prefetch")
      ok = parse_prefetch(v, o.prefetch_depth);
    else if (a == "--gate")
      ok = parse_gate(v, o.gate_target_k);
    else if (a == "--miss")
      ok = parse_miss(v, o);
    else if (a == "--low-precision") {
      o.low_precision = v;
      ok = o.low_precision == "int8" || o.low_precision == "int4" || o.low_precision == "int2";
    } else if (a == "--eviction") {
      o.eviction = v;
      ok = o.eviction == "lru" || o.eviction == "lfu" || o.eviction == "lrfu" || o.eviction == "hobbit";
    }
    if (!ok) {
      std::fprintf(stderr, "moex-demo: bad value '%s' for %s (see --help)\n", v, a.c_str());
      return 2;
    }
  }
  if (!o.low_precision.empty() && !o.miss_given) {
    o.miss = "hobbit";  // a low-precision pool is used by HOBBIT's rule
  } else if (!o.low_precision.empty() && o.miss == "load") {
    std::fprintf(stderr, "moex-demo: --low-precision is used only by --miss hobbit:TH,TS or cost:TH,TS, not load\n");
    return 2;
  }
  if (o.gate_target_k > o.top_k && o.model.empty()) {
    std::fprintf(stderr, "moex-demo: --gate adaptive:K needs K <= --top-k (%u)\n", o.top_k);
    return 2;
  }
  if (o.top_k > o.experts || o.top_k > moex::kMaxTopK) {
    std::fprintf(stderr, "moex-demo: --top-k must be at most --experts and %u\n", moex::kMaxTopK);
    return 2;
  }
  return 0;
}

std::optional<moex::WeightFormat> parse_format(const std::string& s) {
  using moex::Precision;
  if (s == "f32") return moex::float_format(Precision::kF32);
  if (s == "bf16") return moex::float_format(Precision::kBF16);
  if (s == "f16") return moex::float_format(Precision::kF16);
  if (s == "int8") return moex::quant_format(Precision::kInt8, 64);
  if (s == "int4") return moex::quant_format(Precision::kInt4, 64);
  if (s == "int2") return moex::quant_format(Precision::kInt2, 64, moex::QuantScheme::kAsymmetric);
  return std::nullopt;
}

void progress_bar(std::uint64_t done, std::uint64_t total, std::string_view what) {
  const int width = 30;
  const int filled = total ? static_cast<int>(width * done / total) : width;
  // Redraw only when the bar moves, and on a terminal only; elsewhere print the finished line.
  static int last_filled = -1;
  static const bool tty = isatty(2) != 0;
  if (done < total && (!tty || filled == last_filled)) return;
  last_filled = done >= total ? -1 : filled;
  std::fprintf(stderr, "\r  %-32.*s [%.*s%*s] %llu/%llu", static_cast<int>(what.size()), what.data(), filled,
               "##############################", width - filled, "", static_cast<unsigned long long>(done),
               static_cast<unsigned long long>(total));
  if (done >= total) std::fputc('\n', stderr);
}

void fill_random(std::vector<float>& v, float stddev, std::uint64_t seed) {
  moex::fill_uniform_random(v, stddev, seed);
}

moex::Status generate_model(const Options& o, const fs::path& dir) {
  const nlohmann::json want = {{"layers", o.layers}, {"experts", o.experts}, {"top_k", o.top_k},
                               {"hidden", o.hidden}, {"ffn", o.ffn},         {"seed", o.seed}};
  const fs::path marker = dir / "moex-demo.json";
  if (fs::exists(marker) && fs::exists(dir / "config.json")) {
    std::ifstream in(marker);
    const auto have = nlohmann::json::parse(in, nullptr, false);
    if (!have.is_discarded() && have == want) return moex::Status::ok();  // reuse
  }
  moex::DemoModelSpec spec;
  spec.n_layers = o.layers;
  spec.n_experts = o.experts;
  spec.top_k = o.top_k;
  spec.hidden = o.hidden;
  spec.ffn = o.ffn;
  spec.seed = o.seed;
  spec.generator = "moex-demo";
  std::fprintf(stderr, "  writing %.1f MB to %s\n",
               3.0 * o.layers * o.experts * static_cast<double>(o.hidden) * o.ffn * 2 / 1e6, dir.c_str());
  MOEX_RETURN_IF_ERROR(moex::write_demo_model(dir, spec, progress_bar));
  std::ofstream(marker) << want.dump();
  return moex::Status::ok();
}

void rms_norm(const float* x, float* y, std::size_t n) {
  double ss = 0;
  for (std::size_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-6));
  for (std::size_t i = 0; i < n; ++i) y[i] = x[i] * inv;
}

int fail(const moex::Status& s) {
  std::fprintf(stderr, "moex-demo: %s\n", s.to_string().c_str());
  return 1;
}

}  // namespace

template <class E>
struct DemoPolicies : moex::DefaultPolicies {
  using Eviction = E;
  using Gate = moex::SensitivityGate;
  using Predictor = moex::PreGateRouter;
  using Miss = moex::CostModelMiss;
};

// Decodes o.tokens tokens through `ex` and prints what happened; with `shadow_on` an exact
// executor runs each layer on the same input and the relative error of the outputs is printed.
template <class P>
int decode(const Options& o, moex::OpenedModel& opened, moex::ExecutorConfig cfg, std::uint64_t expert_bytes,
           std::uint64_t all_bytes, moex::MoeLayerExecutor<P>* ex, bool shadow_on, const std::string& policy_text) {
  moex::ExpertStore& store = opened.store;
  const moex::MoeModelSpec spec = store.spec();

  // Decode: each token's hidden state runs through every MoE layer (RMSNorm, MoE, residual).
  // Consecutive tokens are correlated (--locality), as real text is, so routing has locality.
  const std::size_t h = spec.shape.hidden, b = o.batch;
  std::vector<float> x(b * h), normed(b * h), moe_out(b * h), noise(b * h), prev(b * h, 0.f);
  const float a = static_cast<float>(o.locality), na = std::sqrt(1.f - a * a);
  // The exact shadow: same budget, full precision, one pool, default policies.
  std::optional<moex::MoeLayerExecutor<>> shadow;
  if (shadow_on) {
    moex::ExecutorConfig sc = cfg;
    sc.low_precision.reset();
    sc.layer_cache_bytes.clear();
    sc.cache_bytes = std::max<std::uint64_t>(expert_bytes, cfg.cache_bytes);
    auto sh = moex::MoeLayerExecutor<>::create(store, sc);
    if (!sh) return fail(sh.status());
    shadow.emplace(std::move(*sh));
  }
  std::vector<double> d2(spec.n_layers, 0.0), y2(spec.n_layers, 0.0);
  std::vector<float> exact_out(b * h);
  double shadow_secs = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::uint32_t done = 0;
  for (std::uint32_t step = 0; done < o.tokens; ++step) {
    const std::size_t n = std::min<std::size_t>(b, o.tokens - done);
    fill_random(noise, 1.f, o.seed * 104729 + step);
    for (std::size_t i = 0; i < n * h; ++i) x[i] = prev[i] = step ? a * prev[i] + na * noise[i] : noise[i];
    for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
      for (std::size_t t = 0; t < n; ++t) rms_norm(&x[t * h], &normed[t * h], h);
      if (auto s = ex->forward(l, normed.data(), n, moe_out.data()); !s.is_ok()) return fail(s);
      if (shadow) {
        const auto s0 = std::chrono::steady_clock::now();
        if (auto s = shadow->forward(l, normed.data(), n, exact_out.data()); !s.is_ok()) return fail(s);
        for (std::size_t i = 0; i < n * h; ++i) {
          const double d = double(moe_out[i]) - exact_out[i];
          d2[l] += d * d;
          y2[l] += double(exact_out[i]) * exact_out[i];
        }
        shadow_secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - s0).count();
      }
      for (std::size_t i = 0; i < n * h; ++i) x[i] += moe_out[i];
    }
    done += static_cast<std::uint32_t>(n);
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() - shadow_secs;  // without the shadow
  double sd = 0, sy = 0, worst = 0;
  for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
    sd += d2[l];
    sy += y2[l];
    worst = std::max(worst, y2[l] > 0 ? std::sqrt(d2[l] / y2[l]) : 0.0);
  }
  const double rel_error = sy > 0 ? std::sqrt(sd / sy) : 0.0;
  std::uint64_t layer_steps = 0;
  for (const auto& ls : ex->stats().layers) layer_steps += ls.steps;
  const moex::ExecutorStats& st = ex->stats();
  const moex::LayerStats tot = st.total();
  const std::uint64_t low_loads =
      cfg.low_precision ? tot.misses_by_precision[static_cast<std::size_t>(*cfg.low_precision)] : 0;

  if (o.json) {
    auto j = nlohmann::json::parse(st.to_json());
    j["tokens"] = o.tokens;
    j["seconds"] = secs;
    j["tokens_per_s"] = o.tokens / secs;
    j["cache_bytes"] = cfg.cache_bytes;
    j["slots"] = ex->slot_count();
    j["cache_precision"] = o.format;
    j["cpu_isa"] = moex::cpu_kernel_isa();
    if (!policy_text.empty()) {
      j["policies"] = policy_text;
      j["exact"] = ex->exact();
      j["experts_per_token_layer"] =
          layer_steps ? static_cast<double>(tot.expert_calls) / static_cast<double>(layer_steps) : 0.0;
      if (shadow) {
        j["rel_error_vs_exact"] = rel_error;
        j["max_layer_rel_error_vs_exact"] = worst;
      }
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf(
      "\nmoex-demo: %u MoE layers x %u experts (top-%u), hidden %u, ffn %u; fast tier %s, %zu slots of %.1f MB "
      "(%.0f%% of %.1f MB); master copies on %s; CPU kernels %s\n\n",
      spec.n_layers, spec.n_experts, spec.router.top_k, spec.shape.hidden, spec.shape.ffn, o.format.c_str(),
      ex->slot_count(), static_cast<double>(expert_bytes) / 1e6,
      100.0 * static_cast<double>(ex->slot_count() * expert_bytes) / static_cast<double>(all_bytes),
      static_cast<double>(all_bytes) / 1e6, store.master_tier() == moex::Tier::kDisk ? "disk (mmap)" : "host RAM",
      moex::cpu_kernel_isa());
  std::printf("%-7s %8s %8s %9s %12s %11s %12s\n", "layer", "hits", "misses", "hit rate", "MB loaded", "stall ms",
              "compute ms");
  auto row = [](const char* name, const moex::LayerStats& s) {
    std::printf("%-7s %8llu %8llu %8.1f%% %12.1f %11.2f %12.2f\n", name, static_cast<unsigned long long>(s.hits),
                static_cast<unsigned long long>(s.misses), 100.0 * s.hit_rate(),
                static_cast<double>(s.bytes_loaded) / 1e6, static_cast<double>(s.stall_ns) / 1e6,
                static_cast<double>(s.compute_ns) / 1e6);
  };
  for (std::size_t l = 0; l < st.layers.size(); ++l) row(std::to_string(l).c_str(), st.layers[l]);
  row("total", tot);
  std::printf(
      "\n%u tokens in %.3f s: %.2f tokens/s, %.1f%% hit rate, %.1f MB moved (%.1f MB/token), "
      "stall %.1f ms (%.0f%% of the time), compute %.1f ms\n",
      o.tokens, secs, o.tokens / secs, 100.0 * tot.hit_rate(), static_cast<double>(tot.bytes_loaded) / 1e6,
      static_cast<double>(tot.bytes_loaded) / 1e6 / o.tokens, static_cast<double>(tot.stall_ns) / 1e6,
      100.0 * static_cast<double>(tot.stall_ns) / 1e9 / secs, static_cast<double>(tot.compute_ns) / 1e6);
  if (!policy_text.empty()) {
    std::printf("policies: %s\n", policy_text.c_str());
    std::printf(
        "  %.2f experts per (token, layer); %llu prefetches (%llu used, recall %.1f%%); %llu misses computed on "
        "the CPU at the source; %llu loaded in low precision; %llu experts skipped\n",
        layer_steps ? static_cast<double>(tot.expert_calls) / static_cast<double>(layer_steps) : 0.0,
        static_cast<unsigned long long>(tot.prefetches), static_cast<unsigned long long>(tot.prefetch_hits),
        100.0 * tot.recall(), static_cast<unsigned long long>(tot.computed_at_source),
        static_cast<unsigned long long>(low_loads), static_cast<unsigned long long>(tot.skipped));
    if (shadow)
      std::printf("quality: relative error of the MoE outputs vs an exact shadow executor %.3e (worst layer %.3e)%s\n",
                  rel_error, worst, ex->exact() ? " - exact policies" : "");
  }
  return 0;
}

template <class E>
int run_evicting(const Options& o, moex::OpenedModel& opened, const moex::ExecutorConfig& cfg, std::uint64_t eb,
                 std::uint64_t all, moex::SensitivityGate gate, const std::string& text) {
  moex::ExpertStore& store = opened.store;
  moex::PreGateRouter pred;
  if (o.prefetch_depth > 0) {
    auto p = moex::PreGateRouter::speculative(store, o.prefetch_depth);
    if (!p) return fail(p.status());
    pred = std::move(*p);
  }
  moex::CostModelMiss miss;
  miss.allow_source_compute = o.miss == "cost";
  miss.mixed_precision = o.miss == "hobbit" || o.cost_mixed;
  miss.hobbit.t_high = o.t_high;
  miss.hobbit.t_skip = o.t_skip;
  moex::CpuBackendConfig bc;
  bc.async_loads = o.prefetch_depth > 0;  // prefetches overlap compute on the loader thread
  auto ex =
      moex::MoeLayerExecutor<DemoPolicies<E>>::create(store, cfg, bc, E{}, std::move(gate), std::move(pred), miss);
  if (!ex) return fail(ex.status());
  return decode(o, opened, cfg, eb, all, &*ex, true, text);
}

// Builds the policies the flags ask for (calibrating the gate and the per-layer split on tokens
// drawn like the decoded ones, through the exact path) and decodes with them.
int run_with_policies(const Options& o, moex::OpenedModel& opened, moex::ExecutorConfig cfg, std::uint64_t eb,
                      std::uint64_t all) {
  moex::ExpertStore& store = opened.store;
  const moex::MoeModelSpec spec = store.spec();
  const std::size_t h = spec.shape.hidden;
  std::string text;
  auto add = [&](const std::string& t) { text += (text.empty() ? "" : ", ") + t; };
  char buf[160];
  if (o.prefetch_depth > 0) {
    if (o.prefetch_depth >= spec.n_layers) {
      std::fprintf(stderr, "moex-demo: --prefetch speculative:%u needs a depth below the layer count (%u)\n",
                   o.prefetch_depth, spec.n_layers);
      return 2;
    }
    add("speculative prefetch depth " + std::to_string(o.prefetch_depth));
  }
  if (o.gate_target_k > spec.router.top_k) {
    std::fprintf(stderr, "moex-demo: --gate adaptive:%g needs at most top-k (%u) experts\n", o.gate_target_k,
                 spec.router.top_k);
    return 2;
  }
  moex::SensitivityGate gate;
  if (o.gate_target_k > 0 || o.per_layer_budget) {
    // Calibration tokens: the decode loop's input distribution with another seed, run through
    // the exact path with the whole model resident; their routing is recorded.
    const std::uint32_t nc = std::max<std::uint32_t>(16, std::min<std::uint32_t>(64, o.tokens));
    std::vector<float> inputs(std::size_t{nc} * h), x(h), normed(h), out(h);
    fill_random(inputs, 1.f, o.seed * 7777 + 13);
    moex::ExecutorConfig cc;
    cc.cache_bytes = eb * spec.n_layers * spec.n_experts;
    cc.cache_precision = cfg.cache_precision;
    auto cal = moex::MoeLayerExecutor<>::create(store, cc);
    if (!cal) return fail(cal.status());
    cal->record_trace(true);
    for (std::uint32_t t = 0; t < nc; ++t) {
      std::copy_n(inputs.begin() + static_cast<std::ptrdiff_t>(std::size_t{t} * h), h, x.begin());
      for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
        rms_norm(x.data(), normed.data(), h);
        if (auto s = cal->forward(l, normed.data(), 1, out.data()); !s.is_ok()) return fail(s);
        for (std::size_t c = 0; c < h; ++c) x[c] += out[c];
      }
    }
    const moex::RoutingTrace& tr = cal->recorded_trace();
    if (o.gate_target_k > 0) {
      auto sens = moex::estimate_model_sensitivities(opened, inputs);
      if (!sens) return fail(sens.status());
      if (auto s = gate.set_sensitivities(*sens); !s.is_ok()) return fail(s);
      auto k = gate.calibrate_threshold(tr, o.gate_target_k);
      if (!k) return fail(k.status());
      std::snprintf(buf, sizeof buf, "adaptive gate (T=%.3g, %.2f experts/token on calibration)", gate.threshold(), *k);
      add(buf);
    }
    if (o.per_layer_budget) {
      const std::uint64_t slots = cfg.cache_bytes / eb;
      if (slots < spec.n_layers) {
        std::fprintf(stderr,
                     "moex-demo: --per-layer-budget needs a budget of at least one expert per layer (%u); "
                     "this one holds %llu\n",
                     spec.n_layers, static_cast<unsigned long long>(slots));
        return 2;
      }
      auto curves = moex::profile_miss_curves(tr, spec.n_experts);
      if (!curves) return fail(curves.status());
      auto split = moex::dp_layer_split(*curves, static_cast<std::uint32_t>(slots), 1);
      if (!split) return fail(split.status());
      cfg.layer_cache_bytes = moex::slots_to_bytes(*split, eb);
      std::string sl;
      for (auto v : *split) sl += (sl.empty() ? "" : "/") + std::to_string(v);
      add("per-layer budgets " + sl + " experts (AdapMoE DP)");
    }
  }
  if (!o.low_precision.empty()) {
    const auto lf = parse_format(o.low_precision);
    if (!lf) return 2;
    if (!store.has_precision(lf->precision))
      if (auto s = store.build_precision(*lf, nullptr, progress_bar); !s.is_ok()) return fail(s);
    // A quarter of the budget (of each layer's, with per-layer budgets) holds the low copies, more
    // where that would not hold one of them; the rest must still hold one full expert.
    const std::uint64_t lowb = store.expert_bytes(lf->precision);
    std::uint64_t minb = cfg.cache_bytes;
    if (!cfg.layer_cache_bytes.empty())
      minb = *std::min_element(cfg.layer_cache_bytes.begin(), cfg.layer_cache_bytes.end());
    const double share = std::max(0.25, (static_cast<double>(lowb) + 1.0) / static_cast<double>(minb));
    if (share >= 1.0 || (1.0 - share) * static_cast<double>(minb) < static_cast<double>(eb)) {
      std::fprintf(stderr,
                   "moex-demo: --low-precision %s: the budget cannot hold one full and one %s expert%s; raise "
                   "--budget\n",
                   o.low_precision.c_str(), o.low_precision.c_str(),
                   cfg.layer_cache_bytes.empty() ? "" : " in every layer");
      return 2;
    }
    cfg.low_precision = lf->precision;
    cfg.low_precision_share = share;
    std::snprintf(buf, sizeof buf, "%s copies in %.0f%% of the budget", o.low_precision.c_str(), 100.0 * share);
    add(buf);
  }
  if (o.miss == "cost")
    add(std::string("miss: cost model (load or CPU at the source)") + (o.cost_mixed ? " + HOBBIT" : ""));
  if (o.miss == "hobbit" || o.cost_mixed) {
    std::snprintf(buf, sizeof buf, "HOBBIT t_high %.2f, t_skip %.2f", static_cast<double>(o.t_high),
                  static_cast<double>(o.t_skip));
    add(buf);
  }
  add("eviction " + o.eviction);
  if (o.eviction == "lfu") return run_evicting<moex::LfuEviction>(o, opened, cfg, eb, all, std::move(gate), text);
  if (o.eviction == "lrfu") return run_evicting<moex::LrfuEviction>(o, opened, cfg, eb, all, std::move(gate), text);
  if (o.eviction == "hobbit")
    return run_evicting<moex::HobbitScoreEviction>(o, opened, cfg, eb, all, std::move(gate), text);
  return run_evicting<moex::LruEviction>(o, opened, cfg, eb, all, std::move(gate), text);
}

int main(int argc, char** argv) {
  Options o;
  if (int rc = parse_args(argc, argv, o); rc != 0) return rc == 1 ? 0 : rc;
  const auto fmt = parse_format(o.format);
  if (!fmt) {
    std::fprintf(stderr, "moex-demo: unknown --format '%s' (f32, f16, bf16, int8, int4, int2)\n", o.format.c_str());
    return 2;
  }
  fs::path model_path;
  if (!o.model.empty()) {
    model_path = o.model;
  } else {
    model_path = o.dir.empty()
                     ? fs::path("build") / ("demo-model-" + std::to_string(o.layers) + "x" + std::to_string(o.experts) +
                                            "-" + std::to_string(o.hidden) + "x" + std::to_string(o.ffn))
                     : fs::path(o.dir);
    std::fprintf(stderr, "moex-demo: model %s\n", model_path.c_str());
    if (auto s = generate_model(o, model_path); !s.is_ok()) return fail(s);
  }

  moex::StoreOptions so;
  so.progress = progress_bar;
  auto opened = moex::open_expert_store(model_path, so);
  if (!opened) return fail(opened.status());
  moex::ExpertStore& store = opened->store;
  const moex::MoeModelSpec spec = store.spec();
  if (!store.has_precision(fmt->precision)) {
    if (auto s = store.build_precision(*fmt, nullptr, progress_bar); !s.is_ok()) return fail(s);
  }
  const std::uint64_t expert_bytes = store.expert_bytes(fmt->precision);
  const std::uint64_t all_bytes = expert_bytes * spec.n_layers * spec.n_experts;
  moex::ExecutorConfig cfg;
  cfg.cache_bytes =
      std::max<std::uint64_t>(expert_bytes, static_cast<std::uint64_t>(o.budget * static_cast<double>(all_bytes)));
  cfg.cache_precision = fmt->precision;
  if (!o.policies_on()) {
    auto ex = moex::MoeLayerExecutor<>::create(store, cfg);
    if (!ex) return fail(ex.status());
    return decode(o, *opened, cfg, expert_bytes, all_bytes, &*ex, false, "");
  }
  return run_with_policies(o, *opened, cfg, expert_bytes, all_bytes);
}
