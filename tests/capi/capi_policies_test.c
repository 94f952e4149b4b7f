/* The 0.2 executor policies through the C ABI: adaptive gating (explicit threshold, sensitivities,
 * calibration from a trace), prediction (speculative, trained pre-gates from a file, as routing),
 * miss policies (HOBBIT with a low-precision pool, cost model), per-layer budgets, the prefetch
 * bound, static hot set and Belady inputs, forward with a given routing, the new statistics, the
 * 0.1 struct sizes (init and stats) and bad values of every new field. argv[1]: a scratch folder. */
#include <stddef.h>

#include "capi_test.h"

enum { kLayers = 4, kExperts = 8, kTopK = 2, kHidden = 64, kFfn = 64, kTokens = 6 };

/* The exact policies (prefetching, cost-model source compute) run the same kernels on the same data:
 * results agree to float rounding of a different summation order at most. */
static const double kExactTol = 1e-5;

static double rel_diff(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

static moex_executor_params base_params(const moex_model_info* info) {
  moex_executor_params p;
  moex_executor_params_init(&p);
  p.threads = 1;
  p.cache_bytes = 8 * info->expert_bytes; /* a quarter of the 32 experts: misses and evictions */
  return p;
}

/* Creates an executor from `p`, runs a step on x, returns the status; *out gets the step output. */
static moex_status run_step(moex_model* model, const moex_executor_params* p, const float* x, float* out,
                            moex_stats* st) {
  moex_executor* ex = NULL;
  moex_status s = moex_executor_create(model, p, &ex);
  if (s != MOEX_OK) return s;
  s = moex_executor_step_f32(ex, x, kTokens, out);
  if (s == MOEX_OK && st != NULL) {
    moex_stats_init(st);
    s = moex_executor_get_stats(ex, MOEX_ALL_LAYERS, st);
  }
  moex_executor_destroy(ex);
  return s;
}

/* Writes a pre-gate safetensors file: tensors "pregate.<l>.weight" F32 [kExperts, kHidden] for
 * l < kLayers - 1 (deterministic values). Returns 1 on success. */
static int write_pregates(const char* path) {
  char header[2048];
  size_t len = 0;
  const size_t per = (size_t)kExperts * kHidden * sizeof(float);
  len += (size_t)snprintf(header + len, sizeof header - len,
                          "{\"__metadata__\":{\"moex.kind\":\"pregate\",\"moex.version\":\"1\"}");
  for (int l = 0; l < kLayers - 1; ++l)
    len += (size_t)snprintf(header + len, sizeof header - len,
                            ",\"pregate.%d.weight\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[%zu,%zu]}",
                            l, kExperts, kHidden, (size_t)l * per, (size_t)(l + 1) * per);
  len += (size_t)snprintf(header + len, sizeof header - len, "}");
  while (len % 8 != 0) header[len++] = ' ';
  FILE* f = fopen(path, "wb");
  if (!f) return 0;
  unsigned char n8[8];
  for (int i = 0; i < 8; ++i) n8[i] = (unsigned char)(((uint64_t)len >> (8 * i)) & 0xFF);
  int ok = fwrite(n8, 1, 8, f) == 8 && fwrite(header, 1, len, f) == len;
  for (int l = 0; l < kLayers - 1 && ok; ++l)
    for (int i = 0; i < kExperts * kHidden && ok; ++i) {
      const float v = (float)(((l * 7 + i * 13) % 29) - 14) / 56.0f; /* little-endian hosts only */
      ok = fwrite(&v, sizeof v, 1, f) == 1;
    }
  return fclose(f) == 0 && ok;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: capi_policies_test <scratch dir>\n");
    return 2;
  }
  char model_dir[4096], path[4200];
  snprintf(model_dir, sizeof model_dir, "%s/demo-model", argv[1]);

  /* ---- 0.1 sizes: the old _init symbols write the 0.1 layouts only; the macros the whole struct. */
  {
    unsigned char buf[sizeof(moex_executor_params) + 16];
    memset(buf, 0xAB, sizeof buf);
    (moex_executor_params_init)((moex_executor_params*)(void*)buf);
    CHECK(((moex_executor_params*)(void*)buf)->struct_size == 72);
    CHECK(buf[72] == 0xAB && buf[sizeof buf - 1] == 0xAB); /* nothing past the 0.1 struct */
    memset(buf, 0xAB, sizeof buf);
    moex_executor_params_init_size((moex_executor_params*)(void*)buf, 100);
    CHECK(((moex_executor_params*)(void*)buf)->struct_size == 100 && buf[99] == 0 && buf[100] == 0xAB);
    moex_executor_params_init_size(NULL, 100);                            /* no-op */
    moex_executor_params_init_size((moex_executor_params*)(void*)buf, 4); /* no-op */
    CHECK(((moex_executor_params*)(void*)buf)->struct_size == 100);
    moex_executor_params p;
    moex_executor_params_init(&p);
    CHECK(p.struct_size == sizeof p && p.hobbit_t_high == 0.6 && p.hobbit_t_skip == 0.9 && p.miss == 0 &&
          p.layer_cache_bytes == NULL && p.future_trace == NULL && p.reserved1 == 0);
    unsigned char sb[sizeof(moex_stats) + 8];
    memset(sb, 0xCD, sizeof sb);
    (moex_stats_init)((moex_stats*)(void*)sb);
    CHECK(((moex_stats*)(void*)sb)->struct_size == 128 && sb[128] == 0xCD);
    moex_stats st;
    moex_stats_init(&st);
    CHECK(st.struct_size == sizeof st && st.recall == 0.0 && st.misses_by_precision[MOEX_PRECISION_SLOTS - 1] == 0);
  }

  /* ---- model: 4 layers x 8 experts, with an int8 copy for the low-precision pool ---- */
  moex_demo_params dp;
  moex_demo_params_init(&dp);
  dp.n_layers = kLayers;
  dp.n_experts = kExperts;
  dp.top_k = kTopK;
  dp.hidden = kHidden;
  dp.ffn = kFfn;
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_OK);
  moex_model_params mp;
  moex_model_params_init(&mp);
  mp.extra_precisions = 1u << MOEX_PRECISION_INT8;
  moex_model* model = NULL;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_OK);
  if (model == NULL) return test_summary("capi_policies_test");
  moex_model_info info;
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_OK);
  const size_t count = (size_t)kTokens * kHidden;
  float x[kTokens * kHidden], ref[kTokens * kHidden], y[kTokens * kHidden];
  test_hidden(x, kTokens, kHidden);

  /* ---- reference: the exact path, recording the routing ---- */
  moex_executor_params p = base_params(&info);
  moex_executor* ex = NULL;
  CHECK_STATUS(moex_executor_create(model, &p, &ex), MOEX_OK);
  CHECK_STATUS(moex_executor_record_trace(ex, 1), MOEX_OK);
  CHECK_STATUS(moex_executor_step_f32(ex, x, kTokens, ref), MOEX_OK);
  moex_trace* trace = NULL;
  CHECK_STATUS(moex_executor_get_trace(ex, &trace), MOEX_OK);
  moex_stats st;
  moex_stats_init(&st);
  CHECK_STATUS(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st), MOEX_OK);
  CHECK(st.struct_size == sizeof st);
  /* selected counts only layers a predictor could reach: none without a predictor */
  CHECK(st.selected == 0 && st.predicted == 0 && st.prefetches == 0 && st.recall == 0.0 && st.skipped == 0);
  CHECK(st.misses_by_precision[MOEX_PRECISION_BF16] == st.misses); /* every miss loads the master bf16 */
  CHECK_STATUS(moex_executor_calibrate_gate(ex, trace, 1.5, NULL), MOEX_ERR_INVALID_ARGUMENT); /* not adaptive */
  double thr = -1;
  CHECK_STATUS(moex_executor_gate_threshold(ex, &thr), MOEX_OK);
  CHECK(thr == 0.0);
  CHECK_STATUS(moex_executor_gate_threshold(ex, NULL), MOEX_ERR_INVALID_ARGUMENT);
  /* An old (0.1) stats struct gets the 0.1 counters only. */
  {
    unsigned char sb[sizeof(moex_stats)];
    memset(sb, 0xEE, sizeof sb);
    (moex_stats_init)((moex_stats*)(void*)sb);
    CHECK_STATUS(moex_executor_get_stats(ex, MOEX_ALL_LAYERS, (moex_stats*)(void*)sb), MOEX_OK);
    CHECK(((moex_stats*)(void*)sb)->struct_size == 128 && ((moex_stats*)(void*)sb)->hits == st.hits);
    CHECK(sb[128] == 0xEE && sb[sizeof sb - 1] == 0xEE);
  }
  moex_executor_destroy(ex);
  uint64_t n_entries = 0, n_tok = 0;
  CHECK_STATUS(moex_trace_shape(trace, &n_tok, NULL, NULL, NULL), MOEX_OK);
  CHECK(n_tok == kTokens);
  CHECK_STATUS(moex_trace_copy(trace, NULL, NULL, 0, &n_entries), MOEX_OK);
  CHECK(n_entries == (uint64_t)kTokens * kLayers * kTopK);
  uint32_t ids[kTokens * kLayers * kTopK];
  float ws[kTokens * kLayers * kTopK];
  CHECK_STATUS(moex_trace_copy(trace, ids, ws, n_entries, NULL), MOEX_OK);

  /* ---- trace expert counts: a static-hot profile ---- */
  double counts[kLayers * kExperts];
  uint64_t need = 0;
  CHECK_STATUS(moex_trace_expert_counts(trace, NULL, 0, &need), MOEX_OK);
  CHECK(need == kLayers * kExperts);
  CHECK_STATUS(moex_trace_expert_counts(trace, counts, 3, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_trace_expert_counts(NULL, counts, need, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_trace_expert_counts(trace, counts, need, NULL), MOEX_OK);
  double total = 0;
  for (size_t i = 0; i < need; ++i) total += counts[i];
  CHECK(total == (double)(kTokens * kLayers * kTopK));

  /* ---- an old-size (0.1, 72-byte) params struct still works and means the exact path ---- */
  {
    moex_executor_params old;
    (moex_executor_params_init)(&old);
    old.threads = 1;
    old.cache_bytes = 8 * info.expert_bytes;
    old.miss = 1000; /* beyond the 0.1 struct: never read */
    CHECK_STATUS(run_step(model, &old, x, y, NULL), MOEX_OK);
    CHECK(memcmp(y, ref, sizeof y) == 0);
  }

  /* ---- forward with a given routing == forward with the router's ---- */
  CHECK_STATUS(moex_executor_create(model, &p, &ex), MOEX_OK);
  {
    float h[kTokens * kHidden];
    memcpy(h, x, sizeof h);
    uint32_t le[kTokens * kTopK];
    float lw[kTokens * kTopK];
    for (uint32_t l = 0; l < kLayers; ++l) {
      for (size_t t = 0; t < kTokens; ++t)
        for (size_t j = 0; j < kTopK; ++j) {
          le[t * kTopK + j] = ids[(t * kLayers + l) * kTopK + j];
          lw[t * kTopK + j] = ws[(t * kLayers + l) * kTopK + j];
        }
      CHECK_STATUS(moex_executor_forward_routed_f32(ex, l, le, lw, kTopK, kTokens, h, y), MOEX_OK);
      for (size_t i = 0; i < count; ++i) h[i] += y[i];
    }
    CHECK(memcmp(h, ref, sizeof h) == 0);
    /* bad routing */
    CHECK_STATUS(moex_executor_forward_routed_f32(NULL, 0, le, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, NULL, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, NULL, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, 0, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, 17, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, 0, x, y), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, kLayers, le, lw, kTopK, kTokens, x, y),
                 MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, x), MOEX_ERR_INVALID_ARGUMENT);
    const uint32_t e0 = le[0];
    le[0] = kExperts;
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    le[0] = MOEX_NO_EXPERT; /* token 0 has no experts */
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    le[0] = le[1]; /* the same expert twice */
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    le[0] = e0;
    lw[1] = NAN;
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, y), MOEX_ERR_INVALID_ARGUMENT);
    lw[1] = 0.5f;
    le[1] = MOEX_NO_EXPERT; /* token 0 uses one expert: fine */
    CHECK_STATUS(moex_executor_forward_routed_f32(ex, 0, le, lw, kTopK, kTokens, x, y), MOEX_OK);
  }
  moex_executor_destroy(ex);

  /* ---- adaptive gate: explicit threshold drops experts, sensitivities, calibration ---- */
  p = base_params(&info);
  p.gating = MOEX_GATING_ADAPTIVE;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK); /* T = 0: drops nothing, exact */
  CHECK(memcmp(y, ref, sizeof y) == 0 && st.skipped == 0);
  p.gate_threshold = 1.0; /* w_tail <= 1: drops every droppable expert */
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.skipped == (uint64_t)kTokens * kLayers * (kTopK - 1));
  CHECK(rel_diff(y, ref, count) > 1e-3);
  float sens[kLayers] = {0.f, 0.f, 1e9f, 1e9f}; /* layers 0-1 insensitive, 2-3 never drop */
  p.gate_sensitivities = sens;
  p.gate_sensitivity_count = kLayers;
  p.gate_threshold = 0.5;
  {
    moex_executor* g = NULL;
    CHECK_STATUS(moex_executor_create(model, &p, &g), MOEX_OK);
    CHECK_STATUS(moex_executor_step_f32(g, x, kTokens, y), MOEX_OK);
    moex_stats l2;
    moex_stats_init(&st);
    moex_stats_init(&l2);
    CHECK_STATUS(moex_executor_get_stats(g, 0, &st), MOEX_OK);
    CHECK_STATUS(moex_executor_get_stats(g, 2, &l2), MOEX_OK);
    CHECK(st.skipped == kTokens && l2.skipped == 0);
    double reached = 0;
    CHECK_STATUS(moex_executor_gate_threshold(g, &thr), MOEX_OK);
    CHECK(fabs(thr - 0.5) < 1e-6);
    CHECK_STATUS(moex_executor_calibrate_gate(g, trace, 0.5, &reached), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_calibrate_gate(g, trace, 3.0, &reached), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_calibrate_gate(g, trace, NAN, &reached), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_calibrate_gate(g, NULL, 1.5, &reached), MOEX_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(moex_executor_gate_threshold(g, &thr), MOEX_OK);
    CHECK(fabs(thr - 0.5) < 1e-6); /* failed calibrations leave the gate alone */
    CHECK_STATUS(moex_executor_calibrate_gate(g, trace, 1.5, &reached), MOEX_OK);
    /* layers 2-3 keep both experts (k = 2), layers 0-1 drop freely (k = 1): 1.5 reachable exactly */
    CHECK(fabs(reached - 1.5) < 1e-9);
    moex_executor_destroy(g);
  }
  p.gate_sensitivities = NULL;
  p.gate_sensitivity_count = 0;
  p.gate_threshold = 0;
  {
    moex_executor* g = NULL;
    CHECK_STATUS(moex_executor_create(model, &p, &g), MOEX_OK);
    double reached = 0;
    CHECK_STATUS(moex_executor_calibrate_gate(g, trace, 1.5, &reached), MOEX_OK);
    CHECK(reached >= 1.0 && reached <= 2.0);
    CHECK_STATUS(moex_executor_gate_threshold(g, &thr), MOEX_OK);
    CHECK(thr > 0.0);
    moex_executor_destroy(g);
  }

  /* ---- speculative prefetch: exact, predicts, prefetches ---- */
  p = base_params(&info);
  p.prediction = MOEX_PREDICTION_SPECULATIVE;
  for (uint32_t depth = 0; depth <= 3; ++depth) {
    p.prefetch_depth = depth;
    CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
    CHECK(rel_diff(y, ref, count) <= kExactTol);
    CHECK(st.predicted > 0 && st.prefetches > 0 && st.selected > 0 && st.predicted_correct <= st.predicted);
    CHECK(st.recall >= 0.0 && st.recall <= 1.0);
    CHECK(fabs(st.recall - (double)st.predicted_correct / (double)st.selected) < 1e-12);
  }
  p.prefetch_depth = kLayers; /* beyond n_layers - 1 */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.prefetch_depth = 1;
  p.max_prefetch_bytes_in_flight = info.expert_bytes;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(rel_diff(y, ref, count) <= kExactTol);

  /* ---- adaptive gate + speculative prefetch together ---- */
  p = base_params(&info);
  p.gating = MOEX_GATING_ADAPTIVE;
  p.gate_threshold = 0.05;
  p.prediction = MOEX_PREDICTION_SPECULATIVE;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.prefetches > 0);

  /* ---- trained pre-gates from a file ---- */
  snprintf(path, sizeof path, "%s/pregates.safetensors", argv[1]);
  CHECK(write_pregates(path));
  p = base_params(&info);
  p.prediction = MOEX_PREDICTION_PREGATE_FILE;
  p.pregate_path = path;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(rel_diff(y, ref, count) <= kExactTol && st.predicted > 0);
  p.prediction = MOEX_PREDICTION_PREGATE_ROUTING;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(rel_diff(y, ref, count) > 1e-4); /* layers 1.. follow the pre-gates' routing */
  p.pregate_path = NULL;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  snprintf(path, sizeof path, "%s/no-such-pregates.safetensors", argv[1]);
  p.pregate_path = path;
  moex_status s = run_step(model, &p, x, y, NULL);
  CHECK(s == MOEX_ERR_IO || s == MOEX_ERR_NOT_FOUND);
  snprintf(path, sizeof path, "%s/demo-model/config.json", argv[1]); /* not safetensors */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_CORRUPT);

  /* ---- miss policies ---- */
  p = base_params(&info);
  p.miss = MOEX_MISS_HOBBIT;
  p.low_precision = MOEX_PRECISION_INT8;
  p.hobbit_t_high = 0.0; /* every expert but a token's top one loads in int8 */
  p.hobbit_t_skip = 1.0;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.misses_by_precision[MOEX_PRECISION_INT8] > 0 && st.skipped == 0);
  CHECK(st.misses_by_precision[MOEX_PRECISION_INT8] + st.misses_by_precision[MOEX_PRECISION_BF16] == st.misses);
  CHECK(rel_diff(y, ref, count) < 0.05); /* int8 weights: close, not exact */
  p.low_precision_share = 0.5;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  p.hobbit_t_skip = 0.0; /* skip every non-top expert that misses */
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.skipped > 0);
  p = base_params(&info);
  p.miss = MOEX_MISS_COST_MODEL; /* loads or computes at the source: exact either way */
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(rel_diff(y, ref, count) <= kExactTol);
  CHECK(st.computed_at_source <= st.misses);
  p.miss_flags = MOEX_MISS_FLAG_NO_SOURCE_COMPUTE;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.computed_at_source == 0 && memcmp(y, ref, sizeof y) == 0);
  p.miss_flags = MOEX_MISS_FLAG_NO_SOURCE_COMPUTE | MOEX_MISS_FLAG_MIXED_PRECISION;
  p.low_precision = MOEX_PRECISION_INT8;
  p.hobbit_t_high = 0.0;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(st.misses_by_precision[MOEX_PRECISION_INT8] > 0);

  /* ---- per-layer budgets ---- */
  uint64_t budgets[kLayers];
  for (int l = 0; l < kLayers; ++l) budgets[l] = (uint64_t)(1 + l % 2) * info.expert_bytes * 2;
  p = base_params(&info);
  p.layer_cache_bytes = budgets;
  p.layer_cache_count = kLayers;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(memcmp(y, ref, sizeof y) == 0);
  p.layer_cache_count = kLayers - 1;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.layer_cache_count = 0; /* pointer without a count */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.layer_cache_bytes = NULL;
  p.layer_cache_count = kLayers; /* count without a pointer */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);

  /* ---- static hot set ---- */
  p = base_params(&info);
  p.eviction = MOEX_EVICTION_STATIC_HOT_SET;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT); /* no profile */
  p.hot_profile = counts;
  p.hot_profile_count = kLayers * kExperts - 1;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.hot_profile_count = kLayers * kExperts;
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  CHECK(memcmp(y, ref, sizeof y) == 0);
  p.gating = MOEX_GATING_ADAPTIVE; /* the adaptive bundle has it too */
  CHECK_STATUS(run_step(model, &p, x, y, &st), MOEX_OK);
  p.gating = 0;
  counts[3] = NAN;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  counts[3] = 0;
  p.eviction = MOEX_EVICTION_LRU; /* a profile for another policy */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);

  /* ---- Belady over the recorded trace, replayed one token per call: never more misses than LRU ---- */
  {
    uint64_t misses[2] = {0, 0};
    for (int b = 0; b < 2; ++b) {
      p = base_params(&info);
      p.cache_bytes = 3 * info.expert_bytes;
      p.eviction = b == 0 ? MOEX_EVICTION_LRU : MOEX_EVICTION_BELADY;
      p.future_trace = b == 0 ? NULL : trace;
      moex_executor* e = NULL;
      CHECK_STATUS(moex_executor_create(model, &p, &e), MOEX_OK);
      for (size_t t = 0; t < kTokens && e; ++t)
        for (uint32_t l = 0; l < kLayers; ++l)
          CHECK_STATUS(moex_executor_forward_routed_f32(e, l, &ids[(t * kLayers + l) * kTopK],
                                                        &ws[(t * kLayers + l) * kTopK], kTopK, 1, x, y),
                       MOEX_OK);
      moex_stats_init(&st);
      CHECK_STATUS(moex_executor_get_stats(e, MOEX_ALL_LAYERS, &st), MOEX_OK);
      misses[b] = st.misses;
      moex_executor_destroy(e);
    }
    CHECK(misses[1] <= misses[0] && misses[1] > 0);
    p = base_params(&info);
    p.eviction = MOEX_EVICTION_BELADY;
    CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT); /* no future */
    p.future_trace = (const moex_trace*)(const void*)&p;                      /* not a handle */
    CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
    p.future_trace = trace;
    p.prediction = MOEX_PREDICTION_SPECULATIVE; /* not instantiated */
    CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_UNSUPPORTED);
    p.prediction = 0;
    p.eviction = MOEX_EVICTION_LFU; /* a future for another policy */
    CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  }

  /* ---- bad values of every new field ---- */
  struct {
    const char* what;
    int32_t gating, prediction, miss, low_precision;
    uint32_t miss_flags, prefetch_depth, reserved1;
    double gate_threshold, t_high, t_skip, share;
    moex_status want;
  } cases[] = {
      {"gating 3", 3, 0, 0, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_UNSUPPORTED},
      {"gating -1", -1, 0, 0, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"prediction 5", 0, 5, 0, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_UNSUPPORTED},
      {"prediction -3", 0, -3, 0, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"miss 4", 0, 0, 4, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_UNSUPPORTED},
      {"miss -1", 0, 0, -1, 0, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"low precision 50", 0, 0, 0, 50, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_UNSUPPORTED},
      {"low precision -1", 0, 0, 0, -1, 0, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"low precision not held", 0, 0, MOEX_MISS_HOBBIT, MOEX_PRECISION_INT4, 0, 0, 0, 0, 0.6, 0.9, 0,
       MOEX_ERR_INVALID_ARGUMENT},
      {"unknown miss flag", 0, 0, MOEX_MISS_COST_MODEL, 0, 8, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_UNSUPPORTED},
      {"miss flags without cost model", 0, 0, MOEX_MISS_HOBBIT, 0, 1, 0, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"depth without speculative", 0, 0, 0, 0, 0, 2, 0, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"reserved1", 0, 0, 0, 0, 0, 0, 1, 0, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"threshold without adaptive", 0, 0, 0, 0, 0, 0, 0, 0.5, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"negative threshold", 2, 0, 0, 0, 0, 0, 0, -0.5, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"NaN threshold", 2, 0, 0, 0, 0, 0, 0, NAN, 0.6, 0.9, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"t_high > t_skip", 0, 0, MOEX_MISS_HOBBIT, 0, 0, 0, 0, 0, 0.9, 0.6, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"negative t_high", 0, 0, MOEX_MISS_HOBBIT, 0, 0, 0, 0, 0, -0.1, 0.6, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"infinite t_skip", 0, 0, MOEX_MISS_HOBBIT, 0, 0, 0, 0, 0, 0.6, INFINITY, 0, MOEX_ERR_INVALID_ARGUMENT},
      {"share 1", 0, 0, MOEX_MISS_HOBBIT, MOEX_PRECISION_INT8, 0, 0, 0, 0, 0.6, 0.9, 1.0, MOEX_ERR_INVALID_ARGUMENT},
      {"share < 0", 0, 0, MOEX_MISS_HOBBIT, MOEX_PRECISION_INT8, 0, 0, 0, 0, 0.6, 0.9, -0.5, MOEX_ERR_INVALID_ARGUMENT},
      {"share without low pool", 0, 0, 0, 0, 0, 0, 0, 0, 0.6, 0.9, 0.5, MOEX_ERR_INVALID_ARGUMENT},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    p = base_params(&info);
    p.gating = cases[i].gating;
    p.prediction = cases[i].prediction;
    p.miss = cases[i].miss;
    p.low_precision = cases[i].low_precision;
    p.miss_flags = cases[i].miss_flags;
    p.prefetch_depth = cases[i].prefetch_depth;
    p.reserved1 = cases[i].reserved1;
    p.gate_threshold = cases[i].gate_threshold;
    p.hobbit_t_high = cases[i].t_high;
    p.hobbit_t_skip = cases[i].t_skip;
    p.low_precision_share = cases[i].share;
    ex = (moex_executor*)(void*)&p;
    s = moex_executor_create(model, &p, &ex);
    if (s != cases[i].want) fprintf(stderr, "case: %s\n", cases[i].what);
    CHECK_STATUS(s, cases[i].want);
    CHECK(ex == NULL);
  }
  p = base_params(&info);
  p.gate_sensitivities = sens; /* without MOEX_GATING_ADAPTIVE */
  p.gate_sensitivity_count = kLayers;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.gating = MOEX_GATING_ADAPTIVE;
  p.gate_sensitivity_count = 2;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p.gate_sensitivity_count = kLayers;
  sens[1] = -1.f;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  sens[1] = NAN;
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  p = base_params(&info);
  p.pregate_path = model_dir; /* without a pre-gate prediction */
  CHECK_STATUS(run_step(model, &p, x, y, NULL), MOEX_ERR_INVALID_ARGUMENT);
  /* A newer struct whose unknown tail is set is refused. */
  {
    struct {
      moex_executor_params known;
      uint64_t future_field;
    } newer;
    memset(&newer, 0, sizeof newer);
    moex_executor_params_init_size(&newer.known, sizeof newer);
    CHECK(newer.known.struct_size == sizeof newer && newer.known.hobbit_t_skip == 0.9 && newer.future_field == 0);
    CHECK_STATUS(run_step(model, &newer.known, x, y, NULL), MOEX_OK);
    newer.future_field = 7;
    CHECK_STATUS(run_step(model, &newer.known, x, y, NULL), MOEX_ERR_STRUCT_SIZE);
  }

  moex_trace_destroy(trace);
  moex_model_destroy(model);
  return test_summary("capi_policies_test");
}
