// moex-sim TRACE [options]: replays a routing trace through the executor on SimExecutionBackend
// over a grid of eviction policies x budgets x device profiles x expert shapes; prints a table per
// (shape, profile), writes CSV / JSON / Markdown, and draws PNG plots with gnuplot.
// See docs/simulator.md.

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unistd.h>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/formats/trace.hpp"
#include "moex/sim/grid.hpp"
#include "moex/sim/quality.hpp"
#include "moex/sim/techniques.hpp"
#include "moex/store/open_expert_store.hpp"

namespace {

namespace fs = std::filesystem;

int usage(std::FILE* out) {
  std::fprintf(out,
               "usage: moex-sim TRACE [options]\n"
               "Replays TRACE through moex's executor on the simulated backend (virtual clock, no data) for\n"
               "every policy x budget x device profile x expert shape, and reports hit rate and simulated speed.\n"
               "\n"
               "  TRACE                 .npy router logits (top-k from config.json beside it), moex .bin/.jsonl,\n"
               "                        Mixtral routing .jsonl, FLAME-MoE .csv (format detected from content)\n"
               "  --policies LIST       comma-separated: lru,lfu,lrfu,hobbit,static-hot,belady%s (default: all)\n"
               "  --budgets LIST        fast-tier budgets as fractions of all expert bytes, each in (0,1]\n"
               "                        (default: 0.1,0.25,0.5)\n"
               "  --profile FILE        device profile JSON; repeat for several (default: bench/profiles/\n"
               "                        h100_pcie5.json and rtx4090_pcie4.json)\n"
               "  --shape S             expert shape: mixtral | qwen3-30b-a3b | model-native | HIDDENxFFN;\n"
               "                        repeat or comma-separate for several (default: mixtral)\n"
               "  --precision P         cache/load precision: bf16 (default), f16, f32, int8, int4, int2\n"
               "  --split half|none     half (default): profile static-hot/lru-dp on the first half of the\n"
               "                        tokens, measure every policy on the second half; none: whole trace\n"
               "                        for both (an oracle-ish profile)\n"
               "  --top-k K             experts per token for .npy traces (default: config.json beside it)\n"
               "  --csv FILE            write every run as CSV\n"
               "  --json FILE           write every run as JSON\n"
               "  --markdown FILE       write the tables as Markdown\n"
               "  --plot PREFIX         draw PREFIX_<shape>_<profile>_{hitrate,stall,bytes}.png with gnuplot\n"
               "Technique rows (issue 4; docs/simulator.md):\n"
               "  --techniques LIST     after the grid, one table per shape and profile at one budget: on-demand\n"
               "                        LRU, then each technique added alone, then all combined. LIST: all or\n"
               "                        comma-separated baseline,prefetch,pregate-routing,layer-budgets,\n"
               "                        adaptive-gate,low-precision,cpu-compute,combined\n"
               "  --techniques-only     skip the eviction grid\n"
               "  --technique-budget F  budget of the technique rows (default 0.25)\n"
               "  --recall R            predictor recall in [0,1] for every layer (default: recall_at_k per\n"
               "                        layer from training_report.json beside the trace, else 0.8)\n"
               "  --recall-from FILE    per-layer recall from a training_report.json\n"
               "  --prefetch-depth D    layers of look-ahead (default 1)\n"
               "  --gate-keep F         adaptive gate target: F x top-k experts per token (default 0.75)\n"
               "  --sensitivities S     model (estimated from the checkpoint beside the trace; the default\n"
               "                        where there is one), depth (1 falling to 0.25 with depth; the default\n"
               "                        otherwise), or a comma-separated list, one per layer\n"
               "  --low-precision P     HOBBIT's low copy: int8, int4 (default), int2\n"
               "  --low-share F         fraction of the budget for the low-precision pool (default 0.25)\n"
               "  --hobbit TH,TS        HOBBIT thresholds (default: t_high = median unimportance of the non-top\n"
               "                        experts of the profile tokens, t_skip = 0.9)\n"
               "  --quality-text DIR    real text for quality runs: the .py files of DIR (default\n"
               "                        /usr/lib/python3.11)\n"
               "  --quality-tokens N    bytes of that text to run (default 2048)\n"
               "  --no-quality          skip quality runs on the checkpoint beside the trace\n"
               "  --techniques-csv FILE, --techniques-json FILE   write the technique rows\n"
               "  --progress            force the progress bar (default: only when stderr is a terminal)\n"
               "  --no-progress         never draw the progress bar\n"
               "  --quiet               print no table\n"
               "  -h, --help            this text\n"
               "Exit status: 0 ok, 1 a run failed or Belady did not bound a policy, 2 bad usage.\n",
               moex::sim_layer_budgets_supported() ? ",lru-dp" : "");
  return out == stdout ? 0 : 2;
}

int fail_usage(const std::string& msg) {
  std::fprintf(stderr, "moex-sim: %s\n(run moex-sim --help for usage)\n", msg.c_str());
  return 2;
}

std::vector<std::string> split_list(std::string_view s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size()) {
    const std::size_t c = s.find(',', start);
    const std::size_t end = c == std::string_view::npos ? s.size() : c;
    out.emplace_back(s.substr(start, end - start));
    if (c == std::string_view::npos) break;
    start = c + 1;
  }
  return out;
}

std::optional<double> parse_double(const std::string& s) {
  if (s.empty()) return std::nullopt;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return v;
}

std::optional<moex::Precision> parse_precision(std::string_view s) {
  using moex::Precision;
  for (Precision p :
       {Precision::kBF16, Precision::kF16, Precision::kF32, Precision::kInt8, Precision::kInt4, Precision::kInt2})
    if (moex::to_string(p) == s) return p;
  return std::nullopt;
}

fs::path profiles_dir() {
#ifdef MOEX_SOURCE_DIR
  if (fs::path p = fs::path(MOEX_SOURCE_DIR) / "bench/profiles"; fs::is_directory(p)) return p;
#endif
#ifdef MOEX_INSTALL_DATADIR
  if (fs::path p = fs::path(MOEX_INSTALL_DATADIR) / "profiles"; fs::is_directory(p)) return p;
#endif
  return fs::path(__FILE__).parent_path() / "../../bench/profiles";
}

void progress_bar(std::size_t done, std::size_t total, std::string_view what) {
  constexpr std::size_t kWidth = 30;
  const std::size_t filled = total ? kWidth * done / total : kWidth;
  std::string bar(filled, '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "\r[%s] %3zu/%zu %-48.48s", bar.c_str(), done, total, std::string(what).c_str());
  if (done >= total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::string sanitize(std::string_view s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.') ? c : '_';
  return out;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// A short display name: "<folder>/<file>".
std::string trace_display_name(const fs::path& p) {
  const fs::path parent = p.parent_path().filename();
  return parent.empty() ? p.filename().string() : (parent / p.filename()).string();
}

struct Group {
  std::string shape, profile;
  std::vector<const moex::SimRunResult*> rows;
};

std::vector<Group> group_results(const std::vector<moex::SimRunResult>& results) {
  std::vector<Group> groups;
  for (const auto& r : results) {
    if (groups.empty() || groups.back().shape != r.shape || groups.back().profile != r.profile)
      groups.push_back({r.shape, r.profile, {}});
    groups.back().rows.push_back(&r);
  }
  return groups;
}

// Belady's hit rate at the same budget, if it ran.
std::optional<double> belady_at(const Group& g, double budget) {
  for (const auto* r : g.rows)
    if (r->policy == "belady" && r->budget_fraction == budget) return r->hit_rate;
  return std::nullopt;
}

// One table (text or Markdown) for a group; returns the rows Belady failed to bound.
std::string table(const Group& g, bool markdown, std::vector<std::string>& violations) {
  const char* head[] = {"policy", "budget",   "slots",        "hit rate", "% of belady",
                        "tok/s",  "ms/token", "stall ms/tok", "GB/token", "PCIe busy"};
  std::vector<std::vector<std::string>> rows;
  for (const auto* r : g.rows) {
    const auto opt = belady_at(g, r->budget_fraction);
    std::string vs = "-";
    if (opt) {
      vs = *opt > 0 ? fmt("%.1f%%", 100.0 * r->hit_rate / *opt) : "-";
      // Hit counts are integers over the same lookups: compare exactly, no tolerance needed.
      if (r->policy != "belady" && r->hit_rate > *opt)
        violations.push_back(g.shape + " " + g.profile + " " + r->policy + " at " + fmt("%g", r->budget_fraction) +
                             ": " + fmt("%.4f", r->hit_rate) + " > belady " + fmt("%.4f", *opt));
    }
    rows.push_back({r->policy, fmt("%.0f%%", 100.0 * r->budget_fraction), std::to_string(r->cache_slots),
                    fmt("%.4f", r->hit_rate), vs, fmt("%.1f", r->tokens_per_s), fmt("%.3f", r->ms_per_token),
                    fmt("%.3f", r->stall_ms_per_token), fmt("%.3f", r->bytes_per_token / 1e9),
                    fmt("%.1f%%", 100.0 * r->pcie_busy_fraction)});
  }
  constexpr std::size_t kCols = sizeof head / sizeof head[0];
  std::size_t w[kCols];
  for (std::size_t c = 0; c < kCols; ++c) {
    w[c] = std::strlen(head[c]);
    for (const auto& row : rows) w[c] = std::max(w[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string s = markdown ? "|" : "";
    for (std::size_t c = 0; c < kCols; ++c) {
      std::string cell = cells[c];
      const std::size_t pad = w[c] - std::min(w[c], cell.size());
      cell = c < 1 ? cell + std::string(pad, ' ') : std::string(pad, ' ') + cell;
      s += markdown ? " " + cell + " |" : (c ? "  " : "") + cell;
    }
    return s + "\n";
  };
  std::string s = line(std::vector<std::string>(head, head + kCols));
  if (markdown) {
    s += "|";
    for (std::size_t c = 0; c < kCols; ++c)
      s += (c ? " " + std::string(w[c], '-') + ":|" : " " + std::string(w[c], '-') + " |");
    s += "\n";
  } else {
    std::size_t total = 0;
    for (std::size_t c = 0; c < kCols; ++c) total += w[c] + (c ? 2 : 0);
    s += std::string(total, '-') + "\n";
  }
  std::string last_policy;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (!markdown && i > 0 && rows[i][0] != last_policy && g.rows.size() > 6) s += "\n";
    last_policy = rows[i][0];
    s += line(rows[i]);
  }
  return s;
}

// gnuplot: one data file and three PNGs per group. Returns false with a message when skipped.
bool draw_plots(const std::string& prefix, const std::vector<Group>& groups, const std::string& trace_name,
                std::string& message) {
  const std::string script_path = prefix + ".gp";
  std::ofstream gp(script_path);
  if (!gp) {
    message = "cannot write " + script_path;
    return false;
  }
  std::vector<std::string> pngs;
  for (const Group& g : groups) {
    const std::string base = prefix + "_" + sanitize(g.shape) + "_" + sanitize(g.profile);
    const std::string dat = base + ".dat";
    std::ofstream d(dat);
    if (!d) {
      message = "cannot write " + dat;
      return false;
    }
    std::vector<std::string> policies;
    for (const auto* r : g.rows)
      if (std::find(policies.begin(), policies.end(), r->policy) == policies.end()) policies.push_back(r->policy);
    for (std::size_t i = 0; i < policies.size(); ++i) {
      d << "# " << policies[i] << "\n# budget hit_rate stall_ms_per_token gb_per_token\n";
      for (const auto* r : g.rows)
        if (r->policy == policies[i])
          d << r->budget_fraction << ' ' << r->hit_rate << ' ' << r->stall_ms_per_token << ' '
            << r->bytes_per_token / 1e9 << "\n";
      d << "\n\n";
    }
    struct Plot {
      const char* suffix;
      int column;
      const char* ylabel;
    };
    for (const Plot& p : {Plot{"hitrate", 2, "hit rate"}, Plot{"stall", 3, "stall ms / token"},
                          Plot{"bytes", 4, "GB loaded / token"}}) {
      const std::string png = base + "_" + p.suffix + ".png";
      pngs.push_back(png);
      gp << "set terminal pngcairo size 900,560 noenhanced\n"
         << "set output '" << png << "'\n"
         << "set title '" << sanitize(trace_name) << ": " << p.ylabel << " vs budget (" << g.shape << ", " << g.profile
         << ")'\n"
         << "set xlabel 'fast-tier budget (fraction of all expert bytes)'\n"
         << "set ylabel '" << p.ylabel << "'\nset grid\nset key outside right\n"
         << (p.column == 2 ? "set yrange [0:1]\n" : "set yrange [0:*]\n") << "plot ";
      for (std::size_t i = 0; i < policies.size(); ++i)
        gp << (i ? ", " : "") << "'" << dat << "' index " << i << " using 1:" << p.column
           << " with linespoints lw 2 title '" << policies[i] << "'";
      gp << "\n";
    }
  }
  gp.close();
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    message = "gnuplot not found (Debian: apt-get install gnuplot-nox); plots skipped, script kept in " + script_path;
    return false;
  }
  const std::string cmd = "gnuplot '" + script_path + "'";
  if (std::system(cmd.c_str()) != 0) {
    message = "gnuplot failed on " + script_path;
    return false;
  }
  message = "plots: " + std::to_string(pngs.size()) + " PNGs, e.g. " + (pngs.empty() ? "" : pngs.front());
  return true;
}

// A technique table (text or Markdown) with the details of each row under it.
std::string technique_table(const std::vector<moex::SimTechniqueResult>& rows, bool markdown) {
  const char* head[] = {"technique", "eviction",  "hit rate", "ms/token", "stall ms/tok", "vs base",
                        "GB/token",  "PCIe busy", "CPU busy", "speedup",  "experts/tok",  "rel. error (real model)"};
  constexpr std::size_t kCols = sizeof head / sizeof head[0];
  std::vector<std::vector<std::string>> cells;
  for (const auto& r : rows) {
    std::string q = r.quality ? fmt("%.2e", *r.quality) : std::string();
    if (!r.quality_note.empty()) q += (q.empty() ? "" : " ") + r.quality_note;
    cells.push_back({std::string(moex::technique_label(r.technique)), r.run.policy, fmt("%.4f", r.run.hit_rate),
                     fmt("%.3f", r.run.ms_per_token), fmt("%.3f", r.run.stall_ms_per_token),
                     r.technique == moex::SimTechnique::kBaseline ? "-" : fmt("%+.1f%%", -100.0 * r.stall_cut),
                     fmt("%.3f", r.run.bytes_per_token / 1e9), fmt("%.1f%%", 100.0 * r.run.pcie_busy_fraction),
                     fmt("%.1f%%", 100.0 * r.cpu_busy_fraction), fmt("%.2fx", r.speedup), fmt("%.2f", r.avg_k), q});
  }
  std::size_t w[kCols];
  for (std::size_t c = 0; c < kCols; ++c) {
    w[c] = std::strlen(head[c]);
    for (const auto& row : cells) w[c] = std::max(w[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& cs) {
    std::string out = markdown ? "|" : "";
    for (std::size_t c = 0; c < kCols; ++c) {
      std::string cell = cs[c];
      const std::size_t pad = w[c] - std::min(w[c], cell.size());
      cell = c < 2 || c + 1 == kCols ? cell + std::string(pad, ' ') : std::string(pad, ' ') + cell;
      out += markdown ? " " + cell + " |" : (c ? "  " : "") + cell;
    }
    return out + "\n";
  };
  std::string out = line(std::vector<std::string>(head, head + kCols));
  if (markdown) {
    out += "|";
    for (std::size_t c = 0; c < kCols; ++c)
      out += " " + std::string(w[c], '-') + (c < 2 || c + 1 == kCols ? " |" : ":|");
    out += "\n";
  } else {
    std::size_t total = 0;
    for (std::size_t c = 0; c < kCols; ++c) total += w[c] + (c ? 2 : 0);
    out += std::string(total, '-') + "\n";
  }
  for (const auto& row : cells) out += line(row);
  out += markdown ? "\n" : "";
  for (const auto& r : rows)
    out += (markdown ? "- " : "  ") + std::string(moex::technique_label(r.technique)) + ": " + r.detail + "\n";
  return out;
}

// A checkpoint beside the trace whose MoE layers match it (the shared models), if any.
std::optional<moex::OpenedModel> model_beside(const fs::path& trace_path, const moex::RoutingTrace& trace) {
  const fs::path dir = trace_path.parent_path().empty() ? fs::path(".") : trace_path.parent_path();
  std::error_code ec;
  if (!fs::is_regular_file(dir / "config.json", ec)) return std::nullopt;
  bool has_weights = false;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".safetensors") has_weights = true;
  if (!has_weights) return std::nullopt;
  moex::StoreOptions so;
  auto m = moex::open_expert_store(dir, so);
  if (!m) {
    std::fprintf(stderr, "moex-sim: checkpoint %s not usable for quality: %s\n", dir.c_str(),
                 m.status().to_string().c_str());
    return std::nullopt;
  }
  const auto& spec = m->store.spec();
  if (spec.n_layers != trace.n_layers || spec.n_experts != trace.n_experts) return std::nullopt;
  return std::move(*m);
}

bool write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  if (!f) return false;
  f << text;
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  std::string trace_path, csv, json, markdown, plot;
  std::vector<std::string> profile_paths, shape_specs;
  moex::SimGridConfig grid;
  std::uint32_t top_k = 0;
  bool quiet = false;
  int progress_mode = -1;  // -1 auto, 0 off, 1 on
  // Technique rows.
  std::vector<moex::SimTechnique> techniques;
  bool techniques_only = false, quality = true;
  double technique_budget = 0.25;
  std::optional<float> recall;
  std::string recall_from, sensitivities_mode, techniques_csv, techniques_json;
  std::string quality_text = "/usr/lib/python3.11";
  std::size_t quality_tokens = 2048;
  moex::SimTechniqueSettings tset;

  std::vector<std::string> args(argv + 1, argv + argc);
  for (std::size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    std::optional<std::string> inline_value;
    if (a.rfind("--", 0) == 0) {
      if (const auto eq = a.find('='); eq != std::string::npos) {
        inline_value = a.substr(eq + 1);
        a = a.substr(0, eq);
      }
    }
    auto value = [&](std::string& out) -> bool {
      if (inline_value) {
        out = *inline_value;
        return true;
      }
      if (i + 1 >= args.size()) return false;
      out = args[++i];
      return true;
    };
    std::string v;
    if (a == "-h" || a == "--help") return usage(stdout);
    if (a == "--quiet")
      quiet = true;
    else if (a == "--techniques-only")
      techniques_only = true;
    else if (a == "--no-quality")
      quality = false;
    else if (a == "--techniques" || a == "--technique-budget" || a == "--recall" || a == "--recall-from" ||
             a == "--prefetch-depth" || a == "--gate-keep" || a == "--sensitivities" || a == "--low-precision" ||
             a == "--low-share" || a == "--hobbit" || a == "--quality-text" || a == "--quality-tokens" ||
             a == "--techniques-csv" || a == "--techniques-json") {
      if (!value(v)) return fail_usage(a + " needs a value");
      if (a == "--techniques") {
        techniques.clear();
        if (v == "all") {
          techniques = moex::all_sim_techniques();
        } else {
          for (const auto& n : split_list(v)) {
            auto t = moex::parse_sim_technique(n);
            if (!t) return fail_usage(t.status().message());
            techniques.push_back(*t);
          }
        }
      } else if (a == "--technique-budget") {
        const auto d = parse_double(v);
        if (!d || !(*d > 0.0 && *d <= 1.0))
          return fail_usage("bad --technique-budget '" + v + "' (a fraction in (0, 1])");
        technique_budget = *d;
      } else if (a == "--recall") {
        const auto d = parse_double(v);
        if (!d || !(*d >= 0.0 && *d <= 1.0)) return fail_usage("bad --recall '" + v + "' (a fraction in [0, 1])");
        recall = static_cast<float>(*d);
      } else if (a == "--recall-from") {
        recall_from = v;
      } else if (a == "--prefetch-depth") {
        const auto d = parse_double(v);
        if (!d || *d < 1 || *d > 64 || *d != static_cast<double>(static_cast<std::uint32_t>(*d)))
          return fail_usage("bad --prefetch-depth '" + v + "' (an integer from 1)");
        tset.prefetch_depth = static_cast<std::uint32_t>(*d);
      } else if (a == "--gate-keep") {
        const auto d = parse_double(v);
        if (!d || !(*d > 0.0 && *d <= 1.0)) return fail_usage("bad --gate-keep '" + v + "' (a fraction in (0, 1])");
        tset.gate_keep_fraction = *d;
      } else if (a == "--sensitivities") {
        if (v == "model" || v == "depth") {
          sensitivities_mode = v;
        } else {
          sensitivities_mode = "list";
          for (const auto& x : split_list(v)) {
            const auto d = parse_double(x);
            if (!d || !(*d >= 0.0) || !std::isfinite(*d))
              return fail_usage("bad --sensitivities value '" + x + "' (model, depth, or non-negative numbers)");
            tset.sensitivities.push_back(static_cast<float>(*d));
          }
        }
      } else if (a == "--low-precision") {
        const auto p = parse_precision(v);
        if (!p || !(*p == moex::Precision::kInt8 || *p == moex::Precision::kInt4 || *p == moex::Precision::kInt2))
          return fail_usage("bad --low-precision '" + v + "' (int8, int4 or int2)");
        tset.low_precision = *p;
      } else if (a == "--low-share") {
        const auto d = parse_double(v);
        if (!d || !(*d > 0.0 && *d < 1.0)) return fail_usage("bad --low-share '" + v + "' (a fraction in (0, 1))");
        tset.low_precision_share = *d;
      } else if (a == "--hobbit") {
        const auto parts = split_list(v);
        const auto th = parts.size() == 2 ? parse_double(parts[0]) : std::nullopt;
        const auto ts = parts.size() == 2 ? parse_double(parts[1]) : std::nullopt;
        if (!th || !ts || !(*th >= 0.0 && *th <= 1.0) || !(*ts >= *th && *ts <= 1.0))
          return fail_usage("bad --hobbit '" + v + "' (T_HIGH,T_SKIP with 0 <= T_HIGH <= T_SKIP <= 1)");
        tset.hobbit_t_high = static_cast<float>(*th);
        tset.hobbit_t_skip = static_cast<float>(*ts);
      } else if (a == "--quality-text") {
        quality_text = v;
      } else if (a == "--quality-tokens") {
        const auto d = parse_double(v);
        if (!d || *d < 1 || *d > 1e6 || *d != static_cast<double>(static_cast<std::size_t>(*d)))
          return fail_usage("bad --quality-tokens '" + v + "' (an integer in 1..1000000)");
        quality_tokens = static_cast<std::size_t>(*d);
      } else if (a == "--techniques-csv") {
        techniques_csv = v;
      } else {
        techniques_json = v;
      }
    } else if (a == "--progress")
      progress_mode = 1;
    else if (a == "--no-progress")
      progress_mode = 0;
    else if (a == "--policies" || a == "--budgets" || a == "--profile" || a == "--shape" || a == "--precision" ||
             a == "--split" || a == "--top-k" || a == "--csv" || a == "--json" || a == "--markdown" || a == "--plot") {
      if (!value(v)) return fail_usage(a + " needs a value");
      if (a == "--policies") {
        if (v == "all") continue;
        for (const auto& n : split_list(v)) {
          auto p = moex::parse_sim_policy(n);
          if (!p) return fail_usage(p.status().message());
          if (*p == moex::SimPolicy::kLruLayerDp && !moex::sim_layer_budgets_supported())
            return fail_usage("lru-dp needs per-layer budgets in the executor, which this build lacks");
          grid.policies.push_back(*p);
        }
      } else if (a == "--budgets") {
        for (const auto& b : split_list(v)) {
          const auto d = parse_double(b);
          if (!d || !(*d > 0.0 && *d <= 1.0))
            return fail_usage("bad budget '" + b + "': each budget is a fraction in (0, 1], e.g. 0.25");
          grid.budgets.push_back(*d);
        }
      } else if (a == "--profile") {
        profile_paths.push_back(v);
      } else if (a == "--shape") {
        for (const auto& s : split_list(v)) shape_specs.push_back(s);
      } else if (a == "--precision") {
        const auto p = parse_precision(v);
        if (!p) return fail_usage("bad precision '" + v + "' (known: bf16, f16, f32, int8, int4, int2)");
        grid.cache_precision = *p;
      } else if (a == "--split") {
        auto s = moex::parse_trace_split(v);
        if (!s) return fail_usage(s.status().message());
        grid.split = *s;
      } else if (a == "--top-k") {
        const auto d = parse_double(v);
        if (!d || *d < 1 || *d > moex::kMaxTopK || *d != static_cast<double>(static_cast<std::uint32_t>(*d)))
          return fail_usage("bad --top-k '" + v + "' (an integer in 1.." + std::to_string(moex::kMaxTopK) + ")");
        top_k = static_cast<std::uint32_t>(*d);
      } else if (a == "--csv")
        csv = v;
      else if (a == "--json")
        json = v;
      else if (a == "--markdown")
        markdown = v;
      else
        plot = v;
    } else if (a.rfind("-", 0) == 0 && a.size() > 1) {
      return fail_usage("unknown option '" + args[i] + "'");
    } else if (trace_path.empty()) {
      trace_path = a;
    } else {
      return fail_usage("one TRACE per run (got '" + trace_path + "' and '" + a + "')");
    }
  }
  if (trace_path.empty()) return fail_usage("no TRACE given");
  std::error_code ec;
  if (!fs::is_regular_file(trace_path, ec)) {
    std::fprintf(stderr, "moex-sim: trace file '%s' does not exist or is not a file\n", trace_path.c_str());
    return 1;
  }

  // Profiles.
  if (profile_paths.empty()) {
    const fs::path dir = profiles_dir();
    profile_paths = {(dir / "h100_pcie5.json").string(), (dir / "rtx4090_pcie4.json").string()};
  }
  for (const auto& p : profile_paths) {
    auto prof = moex::load_device_profile(p);
    if (!prof) {
      std::fprintf(stderr, "moex-sim: profile %s: %s\n", p.c_str(), prof.status().to_string().c_str());
      return 1;
    }
    if (prof->name.empty()) prof->name = fs::path(p).stem().string();
    grid.profiles.push_back(std::move(*prof));
  }

  // Trace.
  moex::TraceLoadOptions opt;
  opt.top_k = top_k;
  opt.keep_logits = false;
  auto trace = moex::load_trace(trace_path, opt);
  if (!trace) {
    std::fprintf(stderr, "moex-sim: trace %s: %s\n", trace_path.c_str(), trace.status().to_string().c_str());
    return 1;
  }
  const std::string name = trace_display_name(trace_path);

  // Shapes.
  if (shape_specs.empty()) shape_specs = {"mixtral"};
  for (const auto& s : shape_specs) {
    auto shape = moex::resolve_sim_shape(s, trace_path, *trace);
    if (!shape) return fail_usage(shape.status().message());
    grid.shapes.push_back(*shape);
  }

  const bool show_progress = progress_mode == 1 || (progress_mode == -1 && isatty(STDERR_FILENO));
  moex::SimProgressFn progress;
  if (show_progress) progress = progress_bar;
  if (techniques_only && techniques.empty()) techniques = moex::all_sim_techniques();
  std::vector<moex::SimRunResult> grid_results;
  if (!techniques_only) {
    auto results = moex::run_grid(*trace, grid, progress);
    if (!results) {
      std::fprintf(stderr, "moex-sim: %s\n", results.status().to_string().c_str());
      return 1;
    }
    grid_results = std::move(*results);
  }
  const std::vector<moex::SimRunResult>* results = &grid_results;

  const std::size_t T = trace->tokens();
  const std::size_t begin = grid.split == moex::TraceSplit::kHalf ? T / 2 : 0;
  std::string head = "trace " + name + ": " + std::to_string(trace->n_layers) + " layers x " +
                     std::to_string(trace->n_experts) + " experts, top-" + std::to_string(trace->top_k) + ", " +
                     std::to_string(T) + " tokens in " + std::to_string(trace->sequences()) +
                     " sequences; measured on tokens [" + std::to_string(begin) + ", " + std::to_string(T) +
                     ") (split " + std::string(moex::to_string(grid.split)) + "), cache precision " +
                     std::string(moex::to_string(grid.cache_precision)) + "\n";
  const auto groups = group_results(*results);
  std::vector<std::string> violations;
  std::string text = head, md = "### " + name + "\n\n" + head + "\n";
  for (const Group& g : groups) {
    const auto* r0 = g.rows.front();
    const std::string sub = "shape " + g.shape + " (" + std::to_string(r0->expert_shape.hidden) + "x" +
                            std::to_string(r0->expert_shape.ffn) + ", " +
                            fmt("%.1f", static_cast<double>(r0->expert_bytes) / 1e6) + " MB per expert), profile " +
                            g.profile + "\n";
    std::vector<std::string> v_text, v_md;
    text += "\n" + sub + table(g, false, v_text);
    md += "#### " + sub + "\n" + table(g, true, v_md) + "\n";
    violations.insert(violations.end(), v_text.begin(), v_text.end());
  }
  const bool has_belady =
      std::any_of(results->begin(), results->end(), [](const auto& r) { return r.policy == "belady"; });
  std::string bound;
  if (!has_belady)
    bound = "Belady bound: not checked (belady not in --policies)\n";
  else if (violations.empty())
    bound = "Belady bound: holds (no policy beats belady's hit rate at any budget)\n";
  else {
    bound = "Belady bound: VIOLATED (a bug in the cache or a policy):\n";
    for (const auto& v : violations) bound += "  " + v + "\n";
  }
  if (!techniques_only) {
    text += "\n" + bound;
    md += bound;
  }

  // Technique rows.
  std::vector<moex::SimTechniqueResult> all_rows;
  moex::SimTechniqueParams last_params;
  if (!techniques.empty()) {
    const fs::path trace_dir = fs::path(trace_path).parent_path();
    std::string recall_src;
    if (recall) {
      tset.recall = *recall;
      recall_src = fmt("%.2f", *recall) + " for every layer (--recall)";
    } else {
      const fs::path rp = recall_from.empty() ? trace_dir / "training_report.json" : fs::path(recall_from);
      auto r = moex::load_predictor_recall(rp);
      if (r && r->size() + 1 == trace->n_layers) {
        tset.layer_recall = *r;
        recall_src = "per-layer recall_at_k of the speculative predictor from " + rp.string();
      } else if (!recall_from.empty()) {
        std::fprintf(stderr, "moex-sim: --recall-from %s: %s\n", recall_from.c_str(),
                     r ? "recall list does not have n_layers - 1 entries" : r.status().to_string().c_str());
        return 1;
      } else {
        recall_src = fmt("%.2f", tset.recall) + " for every layer (default; no measured recall for this trace)";
      }
    }
    std::optional<moex::OpenedModel> model;
    if (quality || sensitivities_mode.empty() || sensitivities_mode == "model")
      model = model_beside(trace_path, *trace);
    if (sensitivities_mode == "model" && !model) {
      std::fprintf(stderr, "moex-sim: --sensitivities model needs a checkpoint beside the trace matching it\n");
      return 1;
    }
    std::vector<float> q_inputs, s_inputs;
    std::string text_src;
    if (model) {
      auto bytes = moex::read_text_corpus(quality_text, 2 * quality_tokens);
      if (!bytes) {
        std::fprintf(stderr, "moex-sim: quality text: %s\n", bytes.status().to_string().c_str());
      } else {
        const std::size_t half = bytes->size() / 2;
        auto a = moex::embed_bytes(*model, std::span<const std::uint8_t>(bytes->data(), half));
        auto b = moex::embed_bytes(*model, std::span<const std::uint8_t>(bytes->data() + half, bytes->size() - half));
        if (a && b) {
          s_inputs = std::move(*a);
          q_inputs = std::move(*b);
          text_src = std::to_string(bytes->size() - half) + " bytes of " + quality_text +
                     "/*.py (sorted) for quality, the " + std::to_string(half) + " before them for sensitivities";
        } else {
          std::fprintf(stderr, "moex-sim: embeddings: %s\n", (a ? b.status() : a.status()).to_string().c_str());
        }
      }
    }
    std::string sens_src;
    if (sensitivities_mode == "list") {
      sens_src = "given (--sensitivities)";
    } else if (model && !s_inputs.empty() && sensitivities_mode != "depth") {
      auto sv = moex::estimate_model_sensitivities(*model, s_inputs);
      if (!sv) {
        std::fprintf(stderr, "moex-sim: sensitivities: %s\n", sv.status().to_string().c_str());
        return 1;
      }
      tset.sensitivities = *sv;
      sens_src = "estimated from the checkpoint (gradient-free Fisher proxy on embedded real text)";
    } else {
      sens_src = "assumed: falling linearly with depth from 1 to 0.25 (AdapMoE's observation; no weights)";
    }
    std::map<std::string, moex::Result<moex::QualityResult>> quality_cache;
    std::string ttext = "\nTechnique rows at budget " + fmt("%.0f%%", 100 * technique_budget) + " (measured tokens [" +
                        std::to_string(begin) + ", " + std::to_string(T) + ")):\n  predictor recall: " + recall_src +
                        "\n  gate sensitivities: " + sens_src + "\n  quality: " +
                        (model ? (quality && !q_inputs.empty() ? "relative error of the MoE layer outputs vs the exact "
                                                                 "path on the real checkpoint, " +
                                                                     text_src
                                                               : std::string("not measured"))
                               : std::string("n/a (no weights beside the trace)")) +
                        "\n";
    std::string tmd = "#### Technique rows at budget " + fmt("%.0f%%", 100 * technique_budget) + "\n\n" +
                      "- predictor recall: " + recall_src + "\n- gate sensitivities: " + sens_src + "\n- quality: " +
                      (model ? (quality && !q_inputs.empty() ? "relative error of the MoE layer outputs vs the exact "
                                                               "path on the real checkpoint, " +
                                                                   text_src
                                                             : std::string("not measured"))
                             : std::string("n/a (no weights beside the trace)")) +
                      "\n";
    for (const auto& shape : grid.shapes) {
      for (const auto& prof : grid.profiles) {
        moex::SimTechniqueConfig tc;
        tc.trace = &*trace;
        tc.shape = shape;
        tc.profile = prof;
        tc.budget_fraction = technique_budget;
        tc.cache_precision = grid.cache_precision;
        tc.split = grid.split;
        tc.settings = tset;
        tc.techniques = techniques;
        if (progress) progress(0, 1, "techniques " + shape.name + " " + prof.name);
        moex::SimTechniqueParams params;
        auto rows = moex::run_techniques(tc, &params);
        if (progress) progress(1, 1, "done");
        if (!rows) {
          std::fprintf(stderr, "moex-sim: techniques (%s, %s): %s\n", shape.name.c_str(), prof.name.c_str(),
                       rows.status().to_string().c_str());
          return 1;
        }
        for (auto& r : *rows) {
          if (r.exact) {
            r.quality = 0.0;
            r.quality_note = "exact";
            continue;
          }
          if (r.technique == moex::SimTechnique::kPreGateRouting) {
            // Needs fitted pre-gate weights (moex-pregate-fit); the mini engine measures it.
            r.quality_note = "bits/byte: moex-engine quality";
            continue;
          }
          if (!model) {
            r.quality_note = "n/a (no weights)";
            continue;
          }
          if (!quality || q_inputs.empty()) {
            r.quality_note = "not measured";
            continue;
          }
          const bool gate =
              r.technique == moex::SimTechnique::kAdaptiveGate || r.technique == moex::SimTechnique::kCombined;
          const bool low =
              r.technique == moex::SimTechnique::kLowPrecision || r.technique == moex::SimTechnique::kCombined;
          const bool layers = r.technique == moex::SimTechnique::kCombined;
          moex::QualityPolicy qp;
          qp.budget_fraction = technique_budget;
          if (layers) {
            qp.eviction = params.best_eviction;
            qp.layer_slots = params.combined_layer_slots;
          }
          if (gate) {
            qp.sensitivities = params.sensitivities;
            qp.gate_threshold = params.gate_threshold;
          }
          if (low) {
            qp.low_precision_on_miss = true;
            qp.low_precision = tset.low_precision;
            qp.low_precision_share = tset.low_precision_share;
            qp.t_high = params.hobbit_t_high;
            qp.t_skip = params.hobbit_t_skip;
          }
          std::string key = std::string(moex::to_string(r.technique)) + "/" + qp.eviction;
          for (auto x : qp.layer_slots) key += "," + std::to_string(x);
          auto it = quality_cache.find(key);
          if (it == quality_cache.end())
            it = quality_cache.emplace(key, moex::measure_moe_quality(*model, q_inputs, qp)).first;
          if (!it->second) {
            r.quality_note = "failed: " + it->second.status().message();
            continue;
          }
          r.quality = it->second->rel_error;
          r.quality_note = fmt("(k %.2f", it->second->avg_k) +
                           fmt(", %.0f%% of misses low)",
                               it->second->misses ? 100.0 * static_cast<double>(it->second->low_precision_loads) /
                                                        static_cast<double>(it->second->misses)
                                                  : 0.0);
          if (!low) r.quality_note = fmt("(k %.2f)", it->second->avg_k);
        }
        const auto& r0 = rows->front().run;
        const std::string sub = "shape " + shape.name + " (" + std::to_string(r0.expert_shape.hidden) + "x" +
                                std::to_string(r0.expert_shape.ffn) + ", " +
                                fmt("%.1f", static_cast<double>(r0.expert_bytes) / 1e6) + " MB per expert), profile " +
                                prof.name + ", " + std::to_string(r0.cache_slots) + " slots\n";
        ttext += "\n" + sub + technique_table(*rows, false);
        tmd += "\n##### techniques: " + sub + "\n" + technique_table(*rows, true);
        last_params = params;
        all_rows.insert(all_rows.end(), rows->begin(), rows->end());
      }
    }
    text += ttext;
    md += "\n" + tmd;
  }
  if (!quiet) std::fputs(text.c_str(), stdout);
  std::fflush(stdout);

  int rc = violations.empty() ? 0 : 1;
  if (!techniques_csv.empty() && !write_file(techniques_csv, moex::sim_techniques_to_csv(name, all_rows))) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", techniques_csv.c_str());
    rc = 1;
  }
  if (!techniques_json.empty() &&
      !write_file(techniques_json, moex::sim_techniques_to_json(name, last_params, all_rows) + "\n")) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", techniques_json.c_str());
    rc = 1;
  }
  if (!csv.empty() && !write_file(csv, moex::sim_results_to_csv(name, *results))) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", csv.c_str());
    rc = 1;
  }
  if (!json.empty() && !write_file(json, moex::sim_results_to_json(name, *trace, grid.split, *results) + "\n")) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", json.c_str());
    rc = 1;
  }
  if (!markdown.empty() && !write_file(markdown, md)) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", markdown.c_str());
    rc = 1;
  }
  if (!plot.empty()) {
    std::string msg;
    const bool ok = draw_plots(plot, groups, name, msg);
    std::fprintf(stderr, "moex-sim: %s\n", msg.c_str());
    (void)ok;  // a missing gnuplot is not an error: the numbers are in the table and files
  }
  return rc;
}
