// moex-pregate-fit: fits pre-gate weights (Pre-gated MoE, mode 1 of moex::PreGateRouter) for a
// checkpoint by ridge least squares from hidden states the engine records on real text, writes
// them in moex's pre-gate file format, and reports their recall@k beside the speculative
// predictor's on held-out text.
#include <cstdio>
#include <fstream>
#include <iterator>

#include "cli_args.hpp"
#include "engine.hpp"

using namespace moex_engine;

namespace {

constexpr const char* kUsage =
    "usage: moex-pregate-fit <model-dir> --out FILE [options]\n"
    "  --text FILE | --stdlib DIR   text (default /usr/lib/python3.11, its .py files sorted by name)\n"
    "  --window 512                 bytes per window\n"
    "  --calib-windows 64           fit on the LAST windows of the text\n"
    "  --eval-windows 8 --first 0   report recall on windows [first, first+n) (held out)\n"
    "  --ridge 1e-3                 lambda = ridge * trace(X^T X) / hidden, toward the next router\n"
    "  --cache-fraction 0.25 --threads 0\n";

int fail(const std::string& msg) {
  std::fprintf(stderr, "moex-pregate-fit: %s\n", msg.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Args a(argc, argv, {"help"});
  if (a.has("help") || a.positional().size() != 1) {
    std::fputs(kUsage, a.has("help") ? stdout : stderr);
    return a.has("help") ? 0 : 2;
  }
  if (auto u = a.unknown({"out", "text", "stdlib", "window", "calib-windows", "eval-windows", "first", "ridge",
                          "cache-fraction", "threads", "help"});
      !u.empty())
    return fail("unknown option --" + u.front() + "\n" + kUsage);
  const std::string model = a.positional()[0], out = a.str("out");
  if (out.empty()) return fail("--out FILE is required");
  std::vector<std::uint8_t> bytes;
  if (a.has("text")) {
    std::ifstream f(a.str("text"), std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  } else {
    bytes = read_stdlib_text(a.str("stdlib", "/usr/lib/python3.11"));
  }
  const std::size_t window = a.count("window", 512), total = window ? bytes.size() / window : 0;
  const std::size_t nc = a.count("calib-windows", 64), ne = a.count("eval-windows", 8), first = a.count("first", 0);
  if (total < first + ne + nc) return fail("the text holds " + std::to_string(total) + " windows, fewer than asked");
  const auto eval = make_windows(bytes, window, first, ne);
  const auto calib = make_windows(bytes, window, total - nc, nc);

  auto eng = Engine::open(model);
  if (!eng) return fail(eng.status().to_string());
  auto pg = fit_pre_gates(**eng, calib, a.num("ridge", 1e-3));
  if (!pg) return fail(pg.status().to_string());
  if (moex::Status s = moex::write_pre_gates(*pg, out); !s.is_ok()) return fail(s.to_string());
  std::printf("fitted pre-gates for %u layers on %zu windows (%zu bytes): wrote %s\n", pg->n_layers - 1, calib.size(),
              calib.size() * window, out.c_str());

  // Recall on held-out text, token by token (batch 1), both predictors as predictions only.
  PolicyOptions base;
  base.cache_fraction = a.num("cache-fraction", 0.25);
  base.threads = static_cast<std::uint32_t>(a.count("threads", 0));
  PolicyOptions spec = base, fitted = base;
  spec.prefetch = Prefetch::kSpeculative;
  fitted.prefetch = Prefetch::kPreGatePredict;
  fitted.pregates = *pg;
  BpbResult res[2];
  const PolicyOptions* opts[2] = {&spec, &fitted};
  for (int i = 0; i < 2; ++i) {
    auto moe = (*eng)->make_runner(*opts[i]);
    if (!moe) return fail(moe.status().to_string());
    auto r = evaluate_bpb(**eng, **moe, eval, 1);
    if (!r) return fail(r.status().to_string());
    res[i] = *r;
  }
  std::printf("held-out: %zu windows from window %zu (%zu tokens), batch 1\n\n", eval.size(), first, res[0].tokens);
  std::printf("| layer | speculative recall@k | fitted pre-gate recall@k |\n| --- | --- | --- |\n");
  for (std::size_t l = 1; l < res[0].layers.size(); ++l)
    std::printf("| %zu | %.4f | %.4f |\n", l, res[0].layers[l].recall(), res[1].layers[l].recall());
  std::printf("| all (1..%zu) | %.4f | %.4f |\n", res[0].layers.size() - 1, res[0].recall(), res[1].recall());
  std::printf("\nbits/byte (both exact: predictions only): speculative %.6f, pre-gate %.6f; hit rate %.4f vs %.4f\n",
              res[0].bpb(), res[1].bpb(), res[0].total().hit_rate(), res[1].total().hit_rate());
  return 0;
}
