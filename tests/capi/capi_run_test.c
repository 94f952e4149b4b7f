/* The C API end to end on a generated demo model: info, forward f32/bf16, whole step, every built
 * eviction policy, statistics (struct and JSON), traces (record, copy, write, load), log and progress
 * callbacks. argv[1]: a scratch folder. */
#include "capi_test.h"

enum { kTokens = 5 };

/* bf16 keeps 8 significant bits: the bf16 path may differ from f32 by a few ulps of bf16 on the
 * inputs and outputs (relative 2^-8 each), scaled by the output's magnitude. */
static const double kBf16Tol = 3.0 / 256.0;

static float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static uint16_t f32_to_bf16(float f) { /* round to nearest even (no NaN here) */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static double max_abs(const float* x, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = fabs(x[i]) > m ? fabs(x[i]) : m;
  return m;
}

static int g_log_calls = 0, g_progress_calls = 0;
static void on_log(int32_t level, const char* message, void* user_data) {
  CHECK(user_data == (void*)&g_log_calls);
  CHECK(level >= MOEX_LOG_ERROR && level <= MOEX_LOG_DEBUG && message != NULL);
  ++g_log_calls;
}
static void on_progress(uint64_t done, uint64_t total, const char* what, void* user_data) {
  CHECK(user_data == (void*)&g_progress_calls);
  CHECK(done <= total && what != NULL);
  ++g_progress_calls;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: capi_run_test <scratch dir>\n");
    return 2;
  }
  char model_dir[4096], path[4200];
  snprintf(model_dir, sizeof model_dir, "%s/demo-model", argv[1]);
  CHECK_STATUS(moex_set_log_callback(on_log, MOEX_LOG_DEBUG, &g_log_calls), MOEX_OK);

  moex_demo_params dp;
  moex_demo_params_init(&dp);
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_OK);
  CHECK(g_log_calls > 0);

  moex_model_params mp;
  moex_model_params_init(&mp);
  mp.extra_precisions = 1u << MOEX_PRECISION_INT8;
  moex_model* model = NULL;
  CHECK_STATUS(moex_model_open(model_dir, &mp, on_progress, &g_progress_calls, &model), MOEX_OK);
  if (model == NULL) return test_summary("capi_run_test");
  CHECK(g_progress_calls > 0);

  moex_model_info info;
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_OK);
  CHECK(info.n_layers == 2 && info.n_experts == 4 && info.top_k == 2 && info.hidden == 64 && info.ffn == 128);
  CHECK(info.master_precision == MOEX_PRECISION_BF16);
  CHECK(info.expert_bytes >= 3u * 64u * 128u * 2u);
  uint64_t int8_bytes = 0, int4_bytes = 1;
  CHECK_STATUS(moex_model_expert_bytes(model, MOEX_PRECISION_INT8, &int8_bytes), MOEX_OK);
  CHECK(int8_bytes > 0 && int8_bytes < info.expert_bytes);
  CHECK_STATUS(moex_model_expert_bytes(model, MOEX_PRECISION_INT4, &int4_bytes), MOEX_OK);
  CHECK(int4_bytes == 0); /* not built */
  char arch[64];
  size_t need = 0;
  CHECK_STATUS(moex_model_architecture(model, arch, sizeof arch, &need), MOEX_OK);
  CHECK(strcmp(arch, "mixtral") == 0 && need == 7);
  char tiny[4];
  CHECK_STATUS(moex_model_architecture(model, tiny, sizeof tiny, &need), MOEX_OK);
  CHECK(strcmp(tiny, "mix") == 0 && need == 7);

  const size_t h = info.hidden, count = kTokens * h;
  float x[kTokens * 64], y[kTokens * 64], y2[kTokens * 64], step[kTokens * 64], manual[kTokens * 64];
  uint16_t xb[kTokens * 64], yb[kTokens * 64];
  test_hidden(x, kTokens, h);

  /* Default executor: forward, step == the loop of forwards with the residual (bit-exact). */
  moex_executor* ex = NULL;
  moex_executor_params ep;
  moex_executor_params_init(&ep);
  ep.threads = 1;
  ep.cache_bytes = 3 * info.expert_bytes; /* fewer slots than experts: evictions happen */
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_OK);
  CHECK_STATUS(moex_executor_record_trace(ex, 1), MOEX_OK);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, kTokens, y), MOEX_OK);
  CHECK(max_abs(y, count) > 1e-3); /* the layer does something */
  memcpy(manual, x, sizeof manual);
  for (uint32_t l = 0; l < info.n_layers; ++l) {
    CHECK_STATUS(moex_executor_forward_f32(ex, l, manual, kTokens, y2), MOEX_OK);
    for (size_t i = 0; i < count; ++i) manual[i] += y2[i];
  }
  CHECK_STATUS(moex_executor_begin_sequence(ex), MOEX_OK);
  CHECK_STATUS(moex_executor_step_f32(ex, x, kTokens, step), MOEX_OK);
  CHECK(memcmp(step, manual, sizeof step) == 0);
  memcpy(y2, x, sizeof y2); /* in place */
  CHECK_STATUS(moex_executor_step_f32(ex, y2, kTokens, y2), MOEX_OK);
  CHECK(memcmp(step, y2, sizeof step) == 0);

  /* bf16 in/out against f32 within bf16 tolerance. */
  for (size_t i = 0; i < count; ++i) xb[i] = f32_to_bf16(x[i]);
  CHECK_STATUS(moex_executor_forward_bf16(ex, 0, xb, kTokens, yb), MOEX_OK);
  double scale = max_abs(y, count), worst = 0;
  for (size_t i = 0; i < count; ++i) {
    const double d = fabs((double)bf16_to_f32(yb[i]) - y[i]) / scale;
    worst = d > worst ? d : worst;
  }
  CHECK(worst < kBf16Tol);
  CHECK_STATUS(moex_executor_step_bf16(ex, xb, kTokens, yb), MOEX_OK);
  scale = max_abs(step, count);
  worst = 0;
  for (size_t i = 0; i < count; ++i) {
    const double d = fabs((double)bf16_to_f32(yb[i]) - step[i]) / scale;
    worst = d > worst ? d : worst;
  }
  CHECK(worst < kBf16Tol);

  /* Statistics: struct, per layer, older (smaller) struct, JSON. */
  moex_stats st, l0, l1;
  moex_stats_init(&st);
  moex_stats_init(&l0);
  moex_stats_init(&l1);
  CHECK_STATUS(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st), MOEX_OK);
  CHECK_STATUS(moex_executor_get_stats(ex, 0, &l0), MOEX_OK);
  CHECK_STATUS(moex_executor_get_stats(ex, 1, &l1), MOEX_OK);
  CHECK(st.steps == (l0.steps > l1.steps ? l0.steps : l1.steps) && st.steps > 0); /* the busiest layer */
  CHECK(st.hits + st.misses > 0 && st.misses > 0 && st.evictions > 0);
  CHECK(st.tokens == l0.tokens + l1.tokens);
  CHECK(st.hit_rate >= 0.0 && st.hit_rate <= 1.0);
  CHECK(fabs(st.hit_rate - (double)st.hits / (double)(st.hits + st.misses)) < 1e-12);
  struct {
    moex_stats s;
    uint64_t sentinel;
  } older;
  memset(&older, 0x5A, sizeof older);
  older.s.struct_size = 24; /* an old caller that knew struct_size, steps, tokens */
  CHECK_STATUS(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &older.s), MOEX_OK);
  CHECK(older.s.struct_size == 24 && older.s.steps == st.steps && older.s.tokens == st.tokens);
  CHECK(older.s.expert_calls == 0x5A5A5A5A5A5A5A5Aull); /* untouched beyond 24 bytes */
  size_t json_len = 0;
  CHECK_STATUS(moex_executor_stats_json(ex, NULL, 0, &json_len), MOEX_OK);
  CHECK(json_len > 10);
  char* json = (char*)malloc(json_len + 1);
  CHECK_STATUS(moex_executor_stats_json(ex, json, json_len + 1, &need), MOEX_OK);
  CHECK(need == json_len && strlen(json) == json_len && strstr(json, "\"total\"") != NULL);
  free(json);

  /* Trace: what was recorded has the expected shape, round-trips through both file formats. */
  moex_trace* tr = NULL;
  CHECK_STATUS(moex_executor_get_trace(ex, &tr), MOEX_OK);
  uint64_t n_tok = 0, entries = 0;
  uint32_t n_lay = 0, k = 0, n_exp = 0;
  CHECK_STATUS(moex_trace_shape(tr, &n_tok, &n_lay, &k, &n_exp), MOEX_OK);
  CHECK(n_lay == 2 && k == 2 && n_exp == 4 && n_tok >= kTokens);
  CHECK_STATUS(moex_trace_copy(tr, NULL, NULL, 0, &entries), MOEX_OK);
  CHECK(entries == n_tok * n_lay * k);
  uint32_t* ids = (uint32_t*)malloc(entries * sizeof *ids);
  float* w = (float*)malloc(entries * sizeof *w);
  CHECK_STATUS(moex_trace_copy(tr, ids, w, entries, NULL), MOEX_OK);
  for (uint64_t i = 0; i < entries; ++i) CHECK(ids[i] < 4 || ids[i] == MOEX_NO_EXPERT);
  for (uint64_t t = 0; t < kTokens; ++t) { /* renormalized top-2 weights sum to 1 */
    const double sum = (double)w[t * n_lay * k] + w[t * n_lay * k + 1];
    CHECK(fabs(sum - 1.0) < 1e-5);
  }
  for (int fmt = MOEX_TRACE_FORMAT_BINARY; fmt <= MOEX_TRACE_FORMAT_JSONL; ++fmt) {
    snprintf(path, sizeof path, "%s/trace.%s", argv[1], fmt == MOEX_TRACE_FORMAT_BINARY ? "bin" : "jsonl");
    CHECK_STATUS(moex_trace_write(tr, path, fmt), MOEX_OK);
    moex_trace* back = NULL;
    CHECK_STATUS(moex_trace_load(path, &back), MOEX_OK);
    uint64_t back_entries = 0;
    CHECK_STATUS(moex_trace_copy(back, NULL, NULL, 0, &back_entries), MOEX_OK);
    CHECK(back_entries == entries);
    uint32_t* ids2 = (uint32_t*)malloc(entries * sizeof *ids2);
    CHECK_STATUS(moex_trace_copy(back, ids2, NULL, entries, NULL), MOEX_OK);
    CHECK(memcmp(ids, ids2, entries * sizeof *ids) == 0);
    free(ids2);
    moex_trace_destroy(back);
  }
  free(ids);
  free(w);
  moex_trace_destroy(tr);
  CHECK_STATUS(moex_executor_reset_stats(ex), MOEX_OK);
  CHECK_STATUS(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st), MOEX_OK);
  CHECK(st.steps == 0 && st.hits == 0);

  /* Every built eviction policy computes the same output (eviction never changes the math); the
   * int8 cache precision is close to bf16. */
  const int32_t evictions[] = {MOEX_EVICTION_LRU, MOEX_EVICTION_LFU, MOEX_EVICTION_LRFU, MOEX_EVICTION_HOBBIT};
  for (size_t e = 0; e < sizeof evictions / sizeof evictions[0]; ++e) {
    moex_executor* other = NULL;
    ep.eviction = evictions[e];
    CHECK_STATUS(moex_executor_create(model, &ep, &other), MOEX_OK);
    CHECK_STATUS(moex_executor_step_f32(other, x, kTokens, y2), MOEX_OK);
    CHECK(memcmp(y2, step, sizeof step) == 0);
    moex_executor_destroy(other);
  }
  ep.eviction = MOEX_EVICTION_DEFAULT;
  ep.cache_precision = MOEX_PRECISION_INT8;
  ep.cache_bytes = 0;
  moex_executor* q = NULL;
  CHECK_STATUS(moex_executor_create(model, &ep, &q), MOEX_OK);
  CHECK_STATUS(moex_executor_forward_f32(q, 0, x, kTokens, y2), MOEX_OK);
  scale = max_abs(y, count);
  worst = 0;
  for (size_t i = 0; i < count; ++i) {
    const double d = fabs((double)y2[i] - y[i]) / scale;
    worst = d > worst ? d : worst;
  }
  CHECK(worst < 0.05); /* int8 g64 weights: ~1% error per matrix, three matrices in series */

  /* The model may go first: executors keep its data alive. */
  moex_model_destroy(model);
  CHECK_STATUS(moex_executor_forward_f32(q, 1, x, kTokens, y2), MOEX_OK);
  moex_executor_destroy(q);
  moex_executor_destroy(ex);
  CHECK_STATUS(moex_set_log_callback(NULL, 0, NULL), MOEX_OK);
  return test_summary("capi_run_test");
}
