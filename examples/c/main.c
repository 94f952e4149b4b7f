/* moex from C: write the demo model, open it, run one MoE layer and a whole step on a few tokens,
 * read the statistics, and write the results as the reference the other language examples compare
 * against.
 *
 * usage: moex_example_c <model dir> <reference file>
 * Reference file (text): "moex-ref 2 <tokens> <hidden>", then the layer-0 MoE output, the
 * whole-step output, and the whole-step output of an executor with the adaptive gate
 * (threshold 0.05) and speculative prefetching (depth 1) (tokens x hidden values each, one line
 * each). */
#include <moex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { kTokens = 4 };

static int check(moex_status s, const char* what) {
  if (s != MOEX_OK)
    fprintf(stderr, "moex_example_c: %s: %s: %s\n", what, moex_status_string(s), moex_last_error_message());
  return s == MOEX_OK;
}

static void on_progress(uint64_t done, uint64_t total, const char* what, void* user_data) {
  int* calls = (int*)user_data;
  if (++*calls == 1 || done == total)
    printf("  %s %llu/%llu\n", what, (unsigned long long)done, (unsigned long long)total);
}

static void write_row(FILE* f, const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) fprintf(f, i ? " %.9g" : "%.9g", (double)x[i]);
  fputc('\n', f);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: moex_example_c <model dir> <reference file>\n");
    return 2;
  }
  if (moex_version_number() / 100 != MOEX_VERSION_NUMBER / 100) {
    fprintf(stderr, "moex_example_c: built against moex %d, running with %s\n", MOEX_VERSION_NUMBER,
            moex_version_string());
    return 1;
  }
  printf("moex %s\n", moex_version_string());
  int ok = check(moex_model_write_demo(argv[1], NULL), "write demo model");

  moex_model* model = NULL;
  int progress_calls = 0;
  ok = ok && check(moex_model_open(argv[1], NULL, on_progress, &progress_calls, &model), "open");
  moex_model_info info;
  moex_model_info_init(&info);
  ok = ok && check(moex_model_get_info(model, &info), "info");
  if (!ok) return 1;
  printf("model: %u MoE layers x %u experts, top-%u, hidden %u, ffn %u, %llu bytes per expert\n", info.n_layers,
         info.n_experts, info.top_k, info.hidden, info.ffn, (unsigned long long)info.expert_bytes);

  moex_executor_params params;
  moex_executor_params_init(&params);
  params.cache_bytes = 6 * info.expert_bytes; /* 6 of the 8 experts fit: hits, misses and evictions */
  params.eviction = MOEX_EVICTION_LFU;
  params.threads = 1;
  moex_executor* ex = NULL;
  ok = check(moex_executor_create(model, &params, &ex), "executor");
  moex_model_destroy(model); /* the executor keeps what it needs */
  if (!ok) return 1;

  const size_t n = (size_t)kTokens * info.hidden;
  float* x = malloc(n * sizeof *x);
  float* layer0 = malloc(n * sizeof *layer0);
  float* step = malloc(n * sizeof *step);
  if (!x || !layer0 || !step) return 1;
  for (size_t t = 0; t < kTokens; ++t) /* exact values, reproducible in every language */
    for (size_t i = 0; i < info.hidden; ++i) x[t * info.hidden + i] = (float)((t * 131 + i * 31) % 97) / 48.5f - 1.0f;

  ok = check(moex_executor_record_trace(ex, 1), "record") &&
       check(moex_executor_forward_f32(ex, 0, x, kTokens, layer0), "forward") &&
       check(moex_executor_step_f32(ex, x, kTokens, step), "step");

  moex_stats st;
  moex_stats_init(&st);
  ok = ok && check(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st), "stats");
  moex_trace* trace = NULL;
  uint64_t trace_tokens = 0;
  ok = ok && check(moex_executor_get_trace(ex, &trace), "trace") &&
       check(moex_trace_shape(trace, &trace_tokens, NULL, NULL, NULL), "trace shape");
  size_t json_len = 0;
  ok = ok && check(moex_executor_stats_json(ex, NULL, 0, &json_len), "json");
  if (!ok) return 1;
  printf(
      "stats: %llu hits, %llu misses (hit rate %.2f), %llu evictions, %llu bytes loaded; %llu tokens traced; "
      "JSON %zu bytes\n",
      (unsigned long long)st.hits, (unsigned long long)st.misses, st.hit_rate, (unsigned long long)st.evictions,
      (unsigned long long)st.bytes_loaded, (unsigned long long)trace_tokens, json_len);

  /* Adaptive gate + speculative prefetch (same model, LFU, 6 experts of cache, one thread). */
  moex_model* model2 = NULL;
  moex_executor* adaptive = NULL;
  float* astep = malloc(n * sizeof *astep);
  moex_executor_params_init(&params);
  params.cache_bytes = 6 * info.expert_bytes;
  params.eviction = MOEX_EVICTION_LFU;
  params.threads = 1;
  params.gating = MOEX_GATING_ADAPTIVE;
  params.gate_threshold = 0.05;
  params.prediction = MOEX_PREDICTION_SPECULATIVE;
  params.prefetch_depth = 1;
  moex_stats ast;
  moex_stats_init(&ast);
  ok = astep && check(moex_model_open(argv[1], NULL, NULL, NULL, &model2), "open") &&
       check(moex_executor_create(model2, &params, &adaptive), "adaptive executor") &&
       check(moex_executor_step_f32(adaptive, x, kTokens, astep), "adaptive step") &&
       check(moex_executor_get_stats(adaptive, MOEX_ALL_LAYERS, &ast), "adaptive stats");
  moex_model_destroy(model2);
  if (!ok) return 1;
  printf("adaptive + speculative: %llu experts skipped, %llu prefetches (%llu used), recall %.2f\n",
         (unsigned long long)ast.skipped, (unsigned long long)ast.prefetches, (unsigned long long)ast.prefetch_hits,
         ast.recall);

  FILE* f = fopen(argv[2], "w");
  if (!f) {
    fprintf(stderr, "moex_example_c: cannot write %s\n", argv[2]);
    return 1;
  }
  fprintf(f, "moex-ref 2 %d %u\n", kTokens, info.hidden);
  write_row(f, layer0, n);
  write_row(f, step, n);
  write_row(f, astep, n);
  fclose(f);
  printf("reference written to %s\n", argv[2]);

  moex_trace_destroy(trace);
  moex_executor_destroy(ex);
  moex_executor_destroy(adaptive);
  free(astep);
  free(x);
  free(layer0);
  free(step);
  return st.hits + st.misses > 0 && trace_tokens >= kTokens && ast.prefetches > 0 ? 0 : 1;
}
