// moex-engine-capi: the smaller variant of the mini engine. It reads the checkpoint's dense
// tensors with its own safetensors reader and drives the MoE layers through moex's C API only
// (libmoex.so, moex.h): an engine in any language with a C FFI would embed moex this way.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "cli_args.hpp"
#include "engine_core.hpp"
#include "moex.h"
#include "safetensors_lite.hpp"

using namespace moex_engine;

namespace {

constexpr const char* kUsage =
    "usage: moex-engine-capi <command> <model-dir> [options]\n"
    "  bpb       [--text FILE | --stdlib DIR] [--window 512] [--first 0] [--windows 8] [--chunk 1]\n"
    "            [--trace-out FILE(.bin|.jsonl)]\n"
    "  generate  --prompt TEXT [--tokens N] [--temperature T] [--seed S]\n"
    "executor:   [--cache-fraction 0.25] [--threads 0]\n"
    "            [--speculative | --pregate FILE]  prefetch (exact; needs moex.h 0.2)\n";

int fail(const std::string& msg) {
  std::fprintf(stderr, "moex-engine-capi: %s\n", msg.c_str());
  return 1;
}

std::string capi_error(moex_status s) { return std::string(moex_status_string(s)) + ": " + moex_last_error_message(); }

/// The MoE half through the C API.
struct CapiMoe {
  moex_model* model = nullptr;
  moex_executor* exec = nullptr;
  moex_model_info info{};
  ~CapiMoe() {
    moex_executor_destroy(exec);
    moex_model_destroy(model);
  }
  std::string open(const std::string& dir, double cache_fraction, std::uint32_t threads, bool speculative,
                   const std::string& pregate) {
    if (moex_status s = moex_model_open(dir.c_str(), nullptr, nullptr, nullptr, &model); s != MOEX_OK)
      return capi_error(s);
    moex_model_info_init(&info);
    if (moex_status s = moex_model_get_info(model, &info); s != MOEX_OK) return capi_error(s);
    moex_executor_params p;
    moex_executor_params_init(&p);
    p.cache_bytes =
        static_cast<std::uint64_t>(cache_fraction * double(info.n_layers) * info.n_experts * double(info.expert_bytes));
    if (p.cache_bytes < info.expert_bytes) p.cache_bytes = info.expert_bytes;
    p.threads = threads;
#ifdef MOEX_PREDICTION_SPECULATIVE
    if (speculative) p.prediction = MOEX_PREDICTION_SPECULATIVE;
    if (!pregate.empty()) {
      p.prediction = MOEX_PREDICTION_PREGATE_FILE;
      p.pregate_path = pregate.c_str();
    }
#else
    if (speculative || !pregate.empty()) return "this moex.h has no prediction (0.2 adds it)";
#endif
    if (moex_status s = moex_executor_create(model, &p, &exec); s != MOEX_OK) return capi_error(s);
    return "";
  }
  MoeFn fn() {
    return [this](std::uint32_t layer, const float* x, std::size_t n, float* out) -> std::string {
      moex_status s = moex_executor_forward_f32(exec, layer, x, n, out);
      return s == MOEX_OK ? std::string() : capi_error(s);
    };
  }
  void report(double seconds, std::size_t tokens) const {
    moex_stats st{};
    moex_stats_init(&st);
    if (moex_executor_get_stats(exec, MOEX_ALL_LAYERS, &st) != MOEX_OK) return;
    const double hit_rate = st.hit_rate, mib = double(st.bytes_loaded) / 1048576.0, stall = double(st.stall_ns) * 1e-9;
#ifdef MOEX_PREDICTION_SPECULATIVE
    const double recall = st.predicted ? st.recall : -1.0;
#else
    const double recall = -1.0;
#endif
    std::fprintf(stderr, "tokens %zu in %.2f s (%.1f tokens/s); hit rate %.4f; bytes moved %.1f MiB; stall %.3f s",
                 tokens, seconds, double(tokens) / seconds, hit_rate, mib, stall);
    if (recall >= 0.0) std::fprintf(stderr, "; recall %.4f", recall);
    std::fprintf(stderr, "\n");
  }
};

}  // namespace

int main(int argc, char** argv) {
  Args a(argc, argv, {"help", "speculative"});
  if (a.has("help") || a.positional().size() != 2) {
    std::fputs(kUsage, a.has("help") ? stdout : stderr);
    return a.has("help") ? 0 : 2;
  }
  if (auto u = a.unknown({"text", "stdlib", "window", "first", "windows", "chunk", "trace-out", "prompt", "tokens",
                          "temperature", "seed", "cache-fraction", "threads", "speculative", "pregate", "help"});
      !u.empty())
    return fail("unknown option --" + u.front() + "\n" + kUsage);
  const std::string cmd = a.positional()[0], dir = a.positional()[1];
  ModelShape shape;
  if (std::string e = read_config(dir, shape); !e.empty()) return fail(e);
  SafetensorsLite st;
  if (std::string e = st.open(dir); !e.empty()) return fail(e);
  Transformer tf;
  if (std::string e = tf.load(shape, st.loader()); !e.empty()) return fail(e);
  CapiMoe moe;
  if (std::string e = moe.open(dir, a.num("cache-fraction", 0.25), static_cast<std::uint32_t>(a.count("threads", 0)),
                               a.has("speculative"), a.str("pregate"));
      !e.empty())
    return fail(e);
  if (moe.info.n_layers != shape.n_layers || moe.info.hidden != shape.hidden)
    return fail("moex's view of the model disagrees with config.json");
  MoeFn fn = moe.fn();
  const std::size_t V = shape.vocab;

  if (cmd == "bpb") {
    std::vector<std::uint8_t> bytes;
    if (a.has("text")) {
      std::ifstream f(a.str("text"), std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    } else {
      bytes = read_stdlib_text(a.str("stdlib", "/usr/lib/python3.11"));
    }
    const auto windows = make_windows(bytes, a.count("window", 512), a.count("first", 0), a.count("windows", 8));
    if (windows.empty()) return fail("no text windows (give --text FILE)");
    const bool trace = a.has("trace-out");
    if (trace) moex_executor_record_trace(moe.exec, 1);
    const std::size_t chunk = a.count("chunk", 1);
    double bits = 0;
    std::size_t count = 0, tokens = 0;
    std::vector<float> logits;
    const auto t0 = std::chrono::steady_clock::now();
    for (const auto& w : windows) {
      tf.reset();
      if (trace) moex_executor_begin_sequence(moe.exec);
      logits.resize(w.size() * V);
      const std::size_t step = chunk == 0 ? w.size() : chunk;
      for (std::size_t i = 0; i < w.size(); i += step) {
        const std::size_t m = std::min(step, w.size() - i);
        if (std::string e = tf.forward(std::span(w).subspan(i, m), fn, &logits[i * V]); !e.empty()) return fail(e);
      }
      accumulate_bits(logits.data(), V, w, bits, count);
      tokens += w.size();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("C API: %.6f bits/byte over %zu predictions (%zu windows)\n", bits / double(count), count,
                windows.size());
    moe.report(secs, tokens);
    if (trace) {
      moex_trace* tr = nullptr;
      if (moex_status s = moex_executor_get_trace(moe.exec, &tr); s != MOEX_OK) return fail(capi_error(s));
      const std::string out = a.str("trace-out");
      const bool jsonl = out.size() > 6 && out.compare(out.size() - 6, 6, ".jsonl") == 0;
      moex_status s = moex_trace_write(tr, out.c_str(), jsonl ? MOEX_TRACE_FORMAT_JSONL : MOEX_TRACE_FORMAT_BINARY);
      moex_trace_destroy(tr);
      if (s != MOEX_OK) return fail(capi_error(s));
      std::printf("wrote %s\n", out.c_str());
    }
    return 0;
  }
  if (cmd == "generate") {
    const std::string prompt = a.str("prompt", "def ");
    if (prompt.empty() || prompt.size() >= shape.max_pos) return fail("the prompt must hold 1 .. max_pos-1 bytes");
    const std::size_t n_new = a.count("tokens", 200);
    const float temperature = static_cast<float>(a.num("temperature", 0.0));
    std::uint64_t rng = static_cast<std::uint64_t>(a.num("seed", 1)) * 0x9E3779B97F4A7C15ull | 1u;
    std::vector<std::uint32_t> ctx(prompt.begin(), prompt.end());
    for (auto& c : ctx) c &= 0xffu;
    std::vector<float> logits(ctx.size() * V);
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    std::fflush(stdout);
    tf.reset();
    const auto t0 = std::chrono::steady_clock::now();
    if (std::string e = tf.forward(ctx, fn, logits.data()); !e.empty()) return fail(e);
    std::vector<float> last(logits.end() - static_cast<std::ptrdiff_t>(V), logits.end());
    std::size_t made = 0;
    for (; made < n_new && tf.position() < shape.max_pos; ++made) {  // stops when the context is full
      const std::uint32_t tok = sample_token(last.data(), V, temperature, rng);
      const char c = static_cast<char>(tok);
      std::fwrite(&c, 1, 1, stdout);
      std::fflush(stdout);
      if (std::string e = tf.forward(std::span(&tok, 1), fn, last.data()); !e.empty()) return fail(e);
    }
    std::printf("\n");
    std::fflush(stdout);
    moe.report(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), ctx.size() + made);
    return 0;
  }
  return fail("unknown command " + cmd + "\n" + kUsage);
}
