// moex-engine: the mini engine over moex's C++ API. Bits per byte over text, generation from a
// prompt, routing traces, and the quality table of every approximate policy.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>

#include "moex/cpu/cpu_isa.hpp"

#include "cli_args.hpp"
#include "engine.hpp"

using namespace moex_engine;

namespace {

constexpr const char* kUsage =
    "usage: moex-engine <command> <model-dir> [options]\n"
    "commands:\n"
    "  bpb       bits per byte over text windows\n"
    "  generate  --prompt TEXT [--tokens N] [--temperature T] [--seed S]: print tokens as they come\n"
    "  trace     --out FILE(.bin|.jsonl): record the routing of a bpb run\n"
    "  quality   bpb of the exact path and of every approximate policy, as a Markdown table\n"
    "text:     --text FILE | --stdlib DIR (default /usr/lib/python3.11: its .py files sorted by name)\n"
    "          --window 512 --first 0 --windows 8 (windows of that many bytes, from window --first)\n"
    "          --calib-windows 16 (calibration: the last windows of the stdlib text, disjoint from eval)\n"
    "          --chunk 1 (tokens per forward call; 0 = a whole window at once)\n"
    "policies: --cache-fraction 0.25 --threads 0 --speculative [--depth 1] --pregate FILE\n"
    "          --pregate-route FILE --adaptive-k TARGET --low int8|int4|int2 --t-high X --t-skip X\n"
    "          --cache-precision int8|int4|int2 --backend cpu|cuda [--device N]\n";

const std::vector<std::string> kFlags = {"speculative", "help"};
const std::vector<std::string> kKnown = {
    "text",    "stdlib",          "window", "first",   "windows",       "calib-windows", "chunk", "cache-fraction",
    "threads", "speculative",     "depth",  "pregate", "pregate-route", "adaptive-k",    "low",   "t-high",
    "t-skip",  "cache-precision", "prompt", "tokens",  "temperature",   "seed",          "out",   "help",
    "ridge",   "backend",         "device"};

int fail(const std::string& msg) {
  std::fprintf(stderr, "moex-engine: %s\n", msg.c_str());
  return 1;
}

std::vector<std::uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

struct Text {
  std::vector<std::vector<std::uint32_t>> eval, calib;
};

std::string load_text(const Args& a, Text& t) {
  const std::size_t window = a.count("window", 512);
  std::vector<std::uint8_t> bytes;
  const std::string stdlib = a.str("stdlib", "/usr/lib/python3.11");
  if (a.has("text")) {
    bytes = read_file(a.str("text"));
    if (bytes.empty()) return "cannot read " + a.str("text") + " (or it is empty)";
  } else {
    bytes = read_stdlib_text(stdlib);
    if (bytes.empty()) return "no .py files in " + stdlib + " (give --text FILE)";
  }
  t.eval = make_windows(bytes, window, a.count("first", 0), a.count("windows", 8));
  if (t.eval.empty()) return "the text holds no window of " + std::to_string(window) + " bytes";
  const std::size_t nc = a.count("calib-windows", 16);
  const std::size_t total = bytes.size() / window;
  const std::size_t first_eval_end = a.count("first", 0) + t.eval.size();
  if (nc > 0 && total >= first_eval_end + nc) t.calib = make_windows(bytes, window, total - nc, nc);
  return "";
}

std::string policy_from_args(const Args& a, Engine& eng, const Text& text, PolicyOptions& o, std::string& label) {
  o.cache_fraction = a.num("cache-fraction", 0.25);
  o.threads = static_cast<std::uint32_t>(a.count("threads", 0));
  if (a.has("backend")) {
    if (a.str("backend") != "cpu" && a.str("backend") != "cuda") return "--backend takes cpu or cuda";
    o.cuda = a.str("backend") == "cuda";
    o.cuda_device = static_cast<int>(a.count("device", 0));
  }
  label = "exact";
  if (a.has("speculative")) {
    o.prefetch = Prefetch::kSpeculative;
    o.depth = static_cast<std::uint32_t>(a.count("depth", 1));
    label = "speculative prefetch";
  }
  for (const char* key : {"pregate", "pregate-route"})
    if (a.has(key)) {
      auto w = moex::read_pre_gates(a.str(key));
      if (!w) return w.status().to_string();
      o.pregates = std::move(*w);
      o.prefetch = std::string(key) == "pregate" ? Prefetch::kPreGatePredict : Prefetch::kPreGateRoute;
      label = std::string(key) == "pregate" ? "pre-gate prefetch" : "pre-gate routing";
    }
  if (a.has("adaptive-k")) {
    if (text.calib.empty()) return "--adaptive-k needs calibration windows (--calib-windows)";
    double reached = 0;
    auto g = calibrate_adaptive_gate(eng, text.calib, a.num("adaptive-k", 2.0), &reached);
    if (!g) return g.status().to_string();
    o.gate = *g;
    label = "adaptive k (calibrated avg " + std::to_string(reached) + ")";
  }
  if (a.has("low")) {
    auto p = parse_precision(a.str("low"));
    if (!p) return "--low takes int8, int4 or int2";
    o.low_precision = p;
    o.t_high = static_cast<float>(a.num("t-high", 0.0));
    label = "low precision on miss (" + a.str("low") + ")";
  }
  if (a.has("t-high") && !a.has("low")) o.t_high = static_cast<float>(a.num("t-high", 1.0));
  if (a.has("t-skip")) {
    o.t_skip = static_cast<float>(a.num("t-skip", 1.0));
    label += " + skip";
  }
  if (a.has("cache-precision")) {
    auto p = parse_precision(a.str("cache-precision"));
    if (!p) return "--cache-precision takes int8, int4 or int2";
    o.cache_precision = p;
    label = "cache precision " + a.str("cache-precision");
  }
  return "";
}

void print_stats(const BpbResult& r, double bytes_per_mb = 1048576.0) {
  const moex::LayerStats t = r.total();
  std::fprintf(stderr, "tokens %zu in %.2f s (%.1f tokens/s); hit rate %.4f; bytes moved %.1f MiB; stall %.3f s",
               r.tokens, r.seconds, double(r.tokens) / r.seconds, t.hit_rate(), double(t.bytes_loaded) / bytes_per_mb,
               double(t.stall_ns) * 1e-9);
  if (t.predicted) std::fprintf(stderr, "; recall (layers 1..L-1) %.4f", r.recall());
  if (t.skipped) std::fprintf(stderr, "; skipped %llu", static_cast<unsigned long long>(t.skipped));
  std::fprintf(stderr, "\n");
}

int cmd_bpb(const Args& a, Engine& eng, bool trace) {
  Text text;
  if (std::string e = load_text(a, text); !e.empty()) return fail(e);
  PolicyOptions o;
  std::string label;
  if (std::string e = policy_from_args(a, eng, text, o, label); !e.empty()) return fail(e);
  auto moe = eng.make_runner(o);
  if (!moe) return fail(moe.status().to_string());
  if (trace) (*moe)->record_trace(true);
  auto r = evaluate_bpb(eng, **moe, text.eval, a.count("chunk", 1));
  if (!r) return fail(r.status().to_string());
  std::printf("%s: %.6f bits/byte over %zu predictions (%zu windows; CPU kernels %s)\n", label.c_str(), r->bpb(),
              r->predictions, text.eval.size(), std::string(moex::to_string(moex::active_cpu_isa())).c_str());
  print_stats(*r);
  if (trace) {
    const std::string out = a.str("out");
    if (out.empty()) return fail("trace needs --out FILE");
    const bool jsonl = out.size() > 6 && out.compare(out.size() - 6, 6, ".jsonl") == 0;
    moex::Status s =
        jsonl ? moex::write_trace_jsonl((*moe)->trace(), out) : moex::write_trace_binary((*moe)->trace(), out);
    if (!s.is_ok()) return fail(s.to_string());
    std::printf("wrote %s: %zu tokens, %zu sequences\n", out.c_str(), (*moe)->trace().tokens(),
                (*moe)->trace().sequences());
  }
  return 0;
}

int cmd_generate(const Args& a, Engine& eng) {
  Text text;  // only for --adaptive-k calibration
  if (a.has("adaptive-k"))
    if (std::string e = load_text(a, text); !e.empty()) return fail(e);
  PolicyOptions o;
  std::string label;
  if (std::string e = policy_from_args(a, eng, text, o, label); !e.empty()) return fail(e);
  auto moe = eng.make_runner(o);
  if (!moe) return fail(moe.status().to_string());
  const std::string prompt = a.str("prompt", "def ");
  if (prompt.empty()) return fail("empty prompt");
  const std::size_t n_new = a.count("tokens", 200);
  const float temperature = static_cast<float>(a.num("temperature", 0.0));
  std::uint64_t rng = static_cast<std::uint64_t>(a.num("seed", 1)) * 0x9E3779B97F4A7C15ull | 1u;
  Transformer& tf = eng.transformer();
  const std::size_t V = eng.shape().vocab, max_pos = eng.shape().max_pos;
  std::vector<std::uint32_t> ctx(prompt.begin(), prompt.end());
  for (auto& c : ctx) c &= 0xffu;
  if (ctx.size() >= max_pos) ctx.erase(ctx.begin(), ctx.end() - static_cast<std::ptrdiff_t>(max_pos / 2));
  MoeFn fn = (*moe)->fn();
  std::vector<float> logits(ctx.size() * V);
  std::fwrite(prompt.data(), 1, prompt.size(), stdout);
  std::fflush(stdout);
  const auto t0 = std::chrono::steady_clock::now();
  tf.reset();
  if (std::string e = tf.forward(ctx, fn, logits.data()); !e.empty()) return fail(e);
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<float> last(logits.end() - static_cast<std::ptrdiff_t>(V), logits.end());
  for (std::size_t i = 0; i < n_new; ++i) {
    const std::uint32_t tok = sample_token(last.data(), V, temperature, rng);
    const char c = static_cast<char>(tok);
    std::fwrite(&c, 1, 1, stdout);
    std::fflush(stdout);
    ctx.push_back(tok);
    if (tf.position() + 1 > max_pos) {  // context full: keep the last half and re-read it
      ctx.erase(ctx.begin(), ctx.end() - static_cast<std::ptrdiff_t>(max_pos / 2));
      tf.reset();
      logits.resize(ctx.size() * V);
      if (std::string e = tf.forward(ctx, fn, logits.data()); !e.empty()) return fail(e);
      std::copy(logits.end() - static_cast<std::ptrdiff_t>(V), logits.end(), last.begin());
      continue;
    }
    if (std::string e = tf.forward(std::span(&ctx.back(), 1), fn, last.data()); !e.empty()) return fail(e);
  }
  const auto t2 = std::chrono::steady_clock::now();
  const moex::LayerStats t = (*moe)->stats().total();
  const double gen_s = std::chrono::duration<double>(t2 - t1).count();
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr,
               "[%s] prompt %zu tokens in %.3f s; generated %zu tokens in %.3f s: %.1f tokens/s; hit rate %.4f; "
               "bytes moved %.2f MiB; stall %.3f s\n",
               label.c_str(), prompt.size(), std::chrono::duration<double>(t1 - t0).count(), n_new, gen_s,
               double(n_new) / gen_s, t.hit_rate(), double(t.bytes_loaded) / 1048576.0, double(t.stall_ns) * 1e-9);
  return 0;
}

int cmd_quality(const Args& a, Engine& eng, const std::string& model) {
  Text text;
  if (std::string e = load_text(a, text); !e.empty()) return fail(e);
  if (text.calib.empty()) return fail("quality needs calibration windows (--calib-windows > 0)");
  const std::size_t chunk = a.count("chunk", 1);
  PolicyOptions base;
  base.cache_fraction = a.num("cache-fraction", 0.25);
  base.threads = static_cast<std::uint32_t>(a.count("threads", 0));
  moex::PreGateWeights pg;
  if (a.has("pregate")) {
    auto w = moex::read_pre_gates(a.str("pregate"));
    if (!w) return fail(w.status().to_string());
    pg = std::move(*w);
  } else {
    auto w = fit_pre_gates(eng, text.calib, a.num("ridge", 1e-3));
    if (!w) return fail(w.status().to_string());
    pg = std::move(*w);
  }
  struct Row {
    std::string name;
    PolicyOptions o;
  };
  std::vector<Row> rows;
  rows.push_back({"exact (on-demand LRU)", base});
  {
    Row r{"speculative prefetch (exact)", base};
    r.o.prefetch = Prefetch::kSpeculative;
    rows.push_back(r);
    r = {"fitted pre-gate prefetch (exact)", base};
    r.o.prefetch = Prefetch::kPreGatePredict;
    r.o.pregates = pg;
    rows.push_back(r);
    r = {"fitted pre-gate routing", base};
    r.o.prefetch = Prefetch::kPreGateRoute;
    r.o.pregates = pg;
    rows.push_back(r);
  }
  const double top_k = eng.shape().top_k;
  std::vector<double> targets;
  for (double f : {0.875, 0.75, 0.625}) targets.push_back(1.0 + (top_k - 1.0) * f);
  for (double target : targets) {
    double reached = 0;
    auto g = calibrate_adaptive_gate(eng, text.calib, target, &reached);
    if (!g) return fail(g.status().to_string());
    char name[96];
    std::snprintf(name, sizeof name, "adaptive k, target %.2f (calibration reached %.3f)", target, reached);
    Row r{name, base};
    r.o.gate = *g;
    rows.push_back(r);
  }
  for (auto p : {moex::Precision::kInt8, moex::Precision::kInt4, moex::Precision::kInt2}) {
    Row r{"low precision on every miss: " + std::string(moex::to_string(p)) + " (t_high -1)", base};
    r.o.low_precision = p;
    r.o.t_high = -1.f;
    rows.push_back(r);
  }
  for (auto p : {moex::Precision::kInt4, moex::Precision::kInt2}) {
    Row r{"HOBBIT on miss: " + std::string(moex::to_string(p)) + " (t_high 0: all but the top expert)", base};
    r.o.low_precision = p;
    r.o.t_high = 0.f;
    rows.push_back(r);
  }
  for (float ts : {0.6f, 0.3f}) {
    char name[96];
    std::snprintf(name, sizeof name, "skip on miss (t_skip %.1f)", double(ts));
    Row r{name, base};
    r.o.t_skip = ts;
    rows.push_back(r);
  }
  for (auto p : {moex::Precision::kInt8, moex::Precision::kInt4}) {
    Row r{"low precision everywhere: cache " + std::string(moex::to_string(p)), base};
    r.o.cache_precision = p;
    rows.push_back(r);
  }
  std::printf(
      "model: %s; %zu eval windows of %zu bytes (from window %zu), %zu calibration windows; chunk %zu; "
      "cache %.0f%% of experts; CPU kernels: %s\n\n",
      model.c_str(), text.eval.size(), text.eval.front().size(), a.count("first", 0), text.calib.size(), chunk,
      100.0 * base.cache_fraction, std::string(moex::to_string(moex::active_cpu_isa())).c_str());
  std::printf(
      "| policy | bits/byte | vs exact | experts/token | hit rate | MiB moved | stall s | recall@k | tokens/s |\n");
  std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  double exact_bpb = 0;
  for (const Row& row : rows) {
    auto moe = eng.make_runner(row.o);
    if (!moe) return fail(row.name + ": " + moe.status().to_string());
    auto r = evaluate_bpb(eng, **moe, text.eval, chunk);
    if (!r) return fail(row.name + ": " + r.status().to_string());
    if (exact_bpb == 0) exact_bpb = r->bpb();
    const moex::LayerStats t = r->total();
    char recall[32] = "-";
    if (t.predicted) std::snprintf(recall, sizeof recall, "%.4f", r->recall());
    // `selected` counts experts after the gate; `skipped` counts gate drops and miss-policy skips
    // (the latter still among `selected`). Rows with a gate skip nothing on a miss.
    const std::uint64_t kept = row.o.gate.exact() ? t.selected - std::min(t.selected, t.skipped) : t.selected;
    std::printf("| %s | %.6f | %+.6f | %.3f | %.4f | %.1f | %.3f | %s | %.0f |\n", row.name.c_str(), r->bpb(),
                r->bpb() - exact_bpb, t.tokens ? double(kept) / double(t.tokens) : 0.0, t.hit_rate(),
                double(t.bytes_loaded) / 1048576.0, double(t.stall_ns) * 1e-9, recall, double(r->tokens) / r->seconds);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a(argc, argv, kFlags);
  if (a.has("help") || a.positional().size() != 2) {
    std::fputs(kUsage, a.has("help") ? stdout : stderr);
    return a.has("help") ? 0 : 2;
  }
  if (auto u = a.unknown(kKnown); !u.empty()) return fail("unknown option --" + u.front() + "\n" + kUsage);
  const std::string cmd = a.positional()[0], model = a.positional()[1];
  const bool low = a.has("low") || a.has("cache-precision") || cmd == "quality";
  auto eng = Engine::open(model, low);
  if (!eng) return fail(eng.status().to_string());
  if (cmd == "bpb") return cmd_bpb(a, **eng, false);
  if (cmd == "trace") return cmd_bpb(a, **eng, true);
  if (cmd == "generate") return cmd_generate(a, **eng);
  if (cmd == "quality") return cmd_quality(a, **eng, model);
  return fail("unknown command " + cmd + "\n" + kUsage);
}
