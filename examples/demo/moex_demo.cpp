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
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "moex/moex.hpp"

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
  double locality = 0.8;        // correlation of consecutive tokens' hidden states
  bool json = false;
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
               "  --help          this text\n");
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
    static const char* const kValued[] = {"--layers", "--experts", "--top-k", "--hidden", "--ffn", "--tokens", "--batch",
                                          "--budget", "--locality", "--format", "--model", "--dir", "--seed"};
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
    if (a == "--layers") ok = parse_u32(v, o.layers);
    else if (a == "--experts") ok = parse_u32(v, o.experts);
    else if (a == "--top-k") ok = parse_u32(v, o.top_k);
    else if (a == "--hidden") ok = parse_u32(v, o.hidden);
    else if (a == "--ffn") ok = parse_u32(v, o.ffn);
    else if (a == "--tokens") ok = parse_u32(v, o.tokens);
    else if (a == "--batch") ok = parse_u32(v, o.batch);
    else if (a == "--budget") ok = parse_double(v, o.budget) && o.budget > 0 && o.budget <= 1;
    else if (a == "--locality") ok = parse_double(v, o.locality) && o.locality >= 0 && o.locality < 1;
    else if (a == "--format") o.format = v;
    else if (a == "--model") o.model = v;
    else if (a == "--dir") o.dir = v;
    else if (a == "--seed") o.seed = std::strtoull(v, nullptr, 10);
    if (!ok) {
      std::fprintf(stderr, "moex-demo: bad value '%s' for %s (see --help)\n", v, a.c_str());
      return 2;
    }
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

// Fills v with uniform values of the given standard deviation (fast; the demo writes ~1 GB).
void fill_random(std::vector<float>& v, float stddev, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  const float scale = stddev * std::sqrt(3.f) / 2147483648.f;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = static_cast<float>(static_cast<std::int32_t>(s >> 32)) * scale;
  }
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
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return moex::io_error("cannot create " + dir.string() + ": " + ec.message());
  moex::ModelConfig c;
  c.arch = moex::Architecture::kMixtral;
  c.architecture = "mixtral";
  c.n_layers = o.layers;
  c.n_experts = o.experts;
  c.top_k = o.top_k;
  c.hidden = o.hidden;
  c.expert_ffn = o.ffn;
  c.n_heads = std::max(1u, o.hidden / 128);
  c.n_kv_heads = c.n_heads;
  c.head_dim = o.hidden / c.n_heads;
  c.vocab = 256;
  c.max_pos = 4096;
  MOEX_RETURN_IF_ERROR(moex::write_config_json(dir, c));
  moex::SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("generator", "moex-demo");
  std::vector<float> buf;
  const std::uint64_t total = std::uint64_t{o.layers} * o.experts;
  for (std::uint32_t l = 0; l < o.layers; ++l) {
    for (std::uint32_t e = 0; e < o.experts; ++e) {
      const std::uint64_t salt = (std::uint64_t{l} * o.experts + e) * 4 + o.seed * 1000003;
      for (int which = 0; which < 3; ++which) {
        const bool down = which == 2;
        const std::uint64_t rows = down ? o.hidden : o.ffn, cols = down ? o.ffn : o.hidden;
        buf.resize(rows * cols);
        fill_random(buf, 1.f / std::sqrt(static_cast<float>(cols)), salt + which);
        MOEX_RETURN_IF_ERROR(w.add_floats(moex::hf_expert_tensor_name(c.arch, l, e, which), moex::DType::kBF16,
                                          {rows, cols}, buf));
      }
      progress_bar(std::uint64_t{l} * o.experts + e + 1, total, "generating experts");
    }
    buf.resize(std::size_t{o.experts} * o.hidden);
    fill_random(buf, 4.f / std::sqrt(static_cast<float>(o.hidden)), 77 + l + o.seed * 7919);
    MOEX_RETURN_IF_ERROR(w.add_floats(moex::hf_router_tensor_name(c.arch, l), moex::DType::kBF16,
                                      {o.experts, o.hidden}, buf));
  }
  std::fprintf(stderr, "  writing %.1f MB to %s\n", static_cast<double>(w.data_bytes()) / 1e6, dir.c_str());
  MOEX_RETURN_IF_ERROR(w.write_file(dir / "model.safetensors"));
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
    model_path = o.dir.empty() ? fs::path("build") / ("demo-model-" + std::to_string(o.layers) + "x" +
                                                      std::to_string(o.experts) + "-" + std::to_string(o.hidden) +
                                                      "x" + std::to_string(o.ffn))
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
  cfg.cache_bytes = std::max<std::uint64_t>(expert_bytes, static_cast<std::uint64_t>(o.budget * static_cast<double>(all_bytes)));
  cfg.cache_precision = fmt->precision;
  auto ex = moex::MoeLayerExecutor<>::create(store, cfg);
  if (!ex) return fail(ex.status());

  // Decode: each token's hidden state runs through every MoE layer (RMSNorm, MoE, residual).
  // Consecutive tokens are correlated (--locality), as real text is, so routing has locality.
  const std::size_t h = spec.shape.hidden, b = o.batch;
  std::vector<float> x(b * h), normed(b * h), moe_out(b * h), noise(b * h), prev(b * h, 0.f);
  const float a = static_cast<float>(o.locality), na = std::sqrt(1.f - a * a);
  const auto t0 = std::chrono::steady_clock::now();
  std::uint32_t done = 0;
  for (std::uint32_t step = 0; done < o.tokens; ++step) {
    const std::size_t n = std::min<std::size_t>(b, o.tokens - done);
    fill_random(noise, 1.f, o.seed * 104729 + step);
    for (std::size_t i = 0; i < n * h; ++i) x[i] = prev[i] = step ? a * prev[i] + na * noise[i] : noise[i];
    for (std::uint32_t l = 0; l < spec.n_layers; ++l) {
      for (std::size_t t = 0; t < n; ++t) rms_norm(&x[t * h], &normed[t * h], h);
      if (auto s = ex->forward(l, normed.data(), n, moe_out.data()); !s.is_ok()) return fail(s);
      for (std::size_t i = 0; i < n * h; ++i) x[i] += moe_out[i];
    }
    done += static_cast<std::uint32_t>(n);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const moex::ExecutorStats& st = ex->stats();
  const moex::LayerStats tot = st.total();

  if (o.json) {
    auto j = nlohmann::json::parse(st.to_json());
    j["tokens"] = o.tokens;
    j["seconds"] = secs;
    j["tokens_per_s"] = o.tokens / secs;
    j["cache_bytes"] = cfg.cache_bytes;
    j["slots"] = ex->slot_count();
    j["cache_precision"] = o.format;
    j["cpu_isa"] = moex::cpu_kernel_isa();
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("\nmoex-demo: %u MoE layers x %u experts (top-%u), hidden %u, ffn %u; fast tier %s, %zu slots of %.1f MB "
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
                static_cast<unsigned long long>(s.misses), 100.0 * s.hit_rate(), static_cast<double>(s.bytes_loaded) / 1e6,
                static_cast<double>(s.stall_ns) / 1e6, static_cast<double>(s.compute_ns) / 1e6);
  };
  for (std::size_t l = 0; l < st.layers.size(); ++l) row(std::to_string(l).c_str(), st.layers[l]);
  row("total", tot);
  std::printf("\n%u tokens in %.3f s: %.2f tokens/s, %.1f%% hit rate, %.1f MB moved (%.1f MB/token), "
              "stall %.1f ms (%.0f%% of the time), compute %.1f ms\n",
              o.tokens, secs, o.tokens / secs, 100.0 * tot.hit_rate(), static_cast<double>(tot.bytes_loaded) / 1e6,
              static_cast<double>(tot.bytes_loaded) / 1e6 / o.tokens, static_cast<double>(tot.stall_ns) / 1e6,
              100.0 * static_cast<double>(tot.stall_ns) / 1e9 / secs, static_cast<double>(tot.compute_ns) / 1e6);
  return 0;
}
