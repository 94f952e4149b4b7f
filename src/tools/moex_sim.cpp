// moex-sim TRACE [options]: replays a routing trace through the executor on SimExecutionBackend
// over a grid of eviction policies x budgets x device profiles x expert shapes; prints a table per
// (shape, profile), writes CSV / JSON / Markdown, and draws PNG plots with gnuplot.
// See docs/simulator.md.

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/formats/trace.hpp"
#include "moex/sim/grid.hpp"

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
  for (Precision p : {Precision::kBF16, Precision::kF16, Precision::kF32, Precision::kInt8, Precision::kInt4,
                      Precision::kInt2})
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
  const char* head[] = {"policy", "budget", "slots", "hit rate", "% of belady", "tok/s", "ms/token",
                        "stall ms/tok", "GB/token", "PCIe busy"};
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
    for (std::size_t c = 0; c < kCols; ++c) s += (c ? " " + std::string(w[c], '-') + ":|" : " " + std::string(w[c], '-') + " |");
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
         << "set title '" << sanitize(trace_name) << ": " << p.ylabel << " vs budget (" << g.shape << ", "
         << g.profile << ")'\n"
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
    message = "gnuplot not found (Debian: apt-get install gnuplot-nox); plots skipped, script kept in " +
              script_path;
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
    if (a == "--quiet") quiet = true;
    else if (a == "--progress") progress_mode = 1;
    else if (a == "--no-progress") progress_mode = 0;
    else if (a == "--policies" || a == "--budgets" || a == "--profile" || a == "--shape" || a == "--precision" ||
             a == "--split" || a == "--top-k" || a == "--csv" || a == "--json" || a == "--markdown" ||
             a == "--plot") {
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
      } else if (a == "--csv") csv = v;
      else if (a == "--json") json = v;
      else if (a == "--markdown") markdown = v;
      else plot = v;
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
  auto results = moex::run_grid(*trace, grid, progress);
  if (!results) {
    std::fprintf(stderr, "moex-sim: %s\n", results.status().to_string().c_str());
    return 1;
  }

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
  const bool has_belady = std::any_of(results->begin(), results->end(), [](const auto& r) { return r.policy == "belady"; });
  std::string bound;
  if (!has_belady) bound = "Belady bound: not checked (belady not in --policies)\n";
  else if (violations.empty()) bound = "Belady bound: holds (no policy beats belady's hit rate at any budget)\n";
  else {
    bound = "Belady bound: VIOLATED (a bug in the cache or a policy):\n";
    for (const auto& v : violations) bound += "  " + v + "\n";
  }
  text += "\n" + bound;
  md += bound;
  if (!quiet) std::fputs(text.c_str(), stdout);
  std::fflush(stdout);

  int rc = violations.empty() ? 0 : 1;
  if (!csv.empty() && !write_file(csv, moex::sim_results_to_csv(name, *results))) {
    std::fprintf(stderr, "moex-sim: cannot write %s\n", csv.c_str());
    rc = 1;
  }
  if (!json.empty() &&
      !write_file(json, moex::sim_results_to_json(name, *trace, grid.split, *results) + "\n")) {
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
