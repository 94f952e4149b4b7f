/* Bad input through the ABI: NULL handles and pointers, wrong struct sizes, a params struct from a
 * newer header with a non-zero unknown tail, unknown enum values, calls after destroy, corrupt
 * files. Each must give an error code and a message, never a crash. argv[1]: a scratch folder. */
#include "capi_test.h"

/* A params struct as a newer moex.h might define it: the known fields plus one more. */
typedef struct {
  moex_executor_params known;
  uint64_t new_field;
} newer_executor_params;

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: capi_bad_input_test <scratch dir>\n");
    return 2;
  }
  char model_dir[4096], path[4200];
  snprintf(model_dir, sizeof model_dir, "%s/demo-model", argv[1]);

  /* Status text and messages are never NULL. */
  const moex_status codes[] = {
      MOEX_OK,     MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_UNSUPPORTED, MOEX_ERR_STRUCT_SIZE, MOEX_ERR_OUT_OF_MEMORY,
      MOEX_ERR_IO, MOEX_ERR_CORRUPT,          MOEX_ERR_NOT_FOUND,   MOEX_ERR_INTERNAL,    12345,
      -12345};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; ++i) CHECK(moex_status_string(codes[i]) != NULL);
  CHECK(strcmp(moex_status_string(MOEX_ERR_IO), "I/O error") == 0);
  CHECK(strcmp(moex_status_string(-12345), "unknown status") == 0);
  CHECK(moex_last_error_message() != NULL);
  CHECK_STATUS(moex_set_log_callback(NULL, 7, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_set_log_callback(NULL, -1, NULL), MOEX_ERR_INVALID_ARGUMENT);

  /* Demo writer. */
  moex_demo_params dp;
  moex_demo_params_init(&dp);
  CHECK_STATUS(moex_model_write_demo(NULL, &dp), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_model_write_demo("", NULL), MOEX_ERR_INVALID_ARGUMENT);
  dp.top_k = 5; /* > n_experts */
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_ERR_INVALID_ARGUMENT);
  moex_demo_params_init(&dp);
  dp.hidden = 1u << 30;
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_ERR_INVALID_ARGUMENT);
  moex_demo_params_init(&dp);
  dp.precision = MOEX_PRECISION_INT4;
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_ERR_UNSUPPORTED);
  moex_demo_params_init(&dp);
  dp.struct_size = 0;
  CHECK_STATUS(moex_model_write_demo(model_dir, &dp), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_model_write_demo(model_dir, NULL), MOEX_OK);

  /* Opening. */
  moex_model* model = (moex_model*)&dp; /* garbage the constructor must overwrite */
  CHECK_STATUS(moex_model_open(model_dir, NULL, NULL, NULL, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_model_open(NULL, NULL, NULL, NULL, &model), MOEX_ERR_INVALID_ARGUMENT);
  CHECK(model == NULL);
  model = (moex_model*)&dp;
  snprintf(path, sizeof path, "%s/does-not-exist", argv[1]);
  moex_status st = moex_model_open(path, NULL, NULL, NULL, &model);
  CHECK(st == MOEX_ERR_IO || st == MOEX_ERR_NOT_FOUND);
  CHECK(model == NULL && moex_last_error_message()[0] != '\0');
  snprintf(path, sizeof path, "%s/garbage.safetensors", argv[1]);
  FILE* f = fopen(path, "wb");
  CHECK(f != NULL);
  if (f) {
    fputs("\xff\xff\xff\xff\xff\xff\xff\x7fnot a safetensors file", f);
    fclose(f);
  }
  st = moex_model_open(path, NULL, NULL, NULL, &model);
  CHECK(st == MOEX_ERR_CORRUPT || st == MOEX_ERR_NOT_FOUND || st == MOEX_ERR_IO);
  CHECK(model == NULL);

  moex_model_params mp;
  moex_model_params_init(&mp);
  mp.struct_size = 0;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_INVALID_ARGUMENT);
  mp.struct_size = 1u << 20;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_INVALID_ARGUMENT);
  moex_model_params_init(&mp);
  mp.reserved0 = 1;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_INVALID_ARGUMENT);
  moex_model_params_init(&mp);
  mp.master_precision = 99;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_UNSUPPORTED);
  mp.master_precision = -3;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_INVALID_ARGUMENT);
  moex_model_params_init(&mp);
  mp.flags = 0x80;
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_ERR_UNSUPPORTED);
  moex_model_params_init(&mp);
  mp.struct_size = 8; /* the oldest possible struct: all defaults */
  CHECK_STATUS(moex_model_open(model_dir, &mp, NULL, NULL, &model), MOEX_OK);
  if (model == NULL) return test_summary("capi_bad_input_test");

  /* Model queries. */
  moex_model_info info;
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(NULL, &info), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_model_get_info(model, NULL), MOEX_ERR_INVALID_ARGUMENT);
  info.struct_size = 3;
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_ERR_INVALID_ARGUMENT);
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_OK);
  uint64_t bytes = 0;
  CHECK_STATUS(moex_model_expert_bytes(model, 42, &bytes), MOEX_ERR_UNSUPPORTED);
  CHECK_STATUS(moex_model_expert_bytes(model, MOEX_PRECISION_F32, NULL), MOEX_ERR_INVALID_ARGUMENT);
  char small[2];
  CHECK_STATUS(moex_model_architecture(model, NULL, 5, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_model_architecture(model, small, sizeof small, NULL), MOEX_OK);
  CHECK(small[1] == '\0');

  /* Executor params. */
  moex_executor* ex = (moex_executor*)&dp;
  moex_executor_params ep;
  moex_executor_params_init(&ep);
  CHECK_STATUS(moex_executor_create(NULL, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT);
  CHECK(ex == NULL);
  CHECK_STATUS(moex_executor_create(model, &ep, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_create((const moex_model*)&ep, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT); /* not a handle */
  struct {
    int32_t eviction, gating, prediction, backend, cache_precision;
    moex_status want;
  } cases[] = {
      {MOEX_EVICTION_STATIC_HOT_SET, 0, 0, 0, 0, MOEX_ERR_INVALID_ARGUMENT}, /* no hot_profile */
      {MOEX_EVICTION_BELADY, 0, 0, 0, 0, MOEX_ERR_INVALID_ARGUMENT},         /* no future_trace */
      {1000, 0, 0, 0, 0, MOEX_ERR_UNSUPPORTED},
      {-1, 0, 0, 0, 0, MOEX_ERR_INVALID_ARGUMENT},
      {0, 3, 0, 0, 0, MOEX_ERR_UNSUPPORTED}, /* gating beyond MOEX_GATING_ADAPTIVE */
      {0, -2, 0, 0, 0, MOEX_ERR_INVALID_ARGUMENT},
      {0, 0, 5, 0, 0, MOEX_ERR_UNSUPPORTED}, /* prediction beyond PREGATE_ROUTING */
      {0, 0, 0, MOEX_BACKEND_CUDA, 0, MOEX_ERR_UNSUPPORTED},
      {0, 0, 0, 77, 0, MOEX_ERR_UNSUPPORTED},
      {0, 0, 0, 0, MOEX_PRECISION_INT4, MOEX_ERR_INVALID_ARGUMENT}, /* the model holds no int4 copy */
      {0, 0, 0, 0, 50, MOEX_ERR_UNSUPPORTED},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    moex_executor_params_init(&ep);
    ep.eviction = cases[i].eviction;
    ep.gating = cases[i].gating;
    ep.prediction = cases[i].prediction;
    ep.backend = cases[i].backend;
    ep.cache_precision = cases[i].cache_precision;
    ex = (moex_executor*)&dp;
    st = moex_executor_create(model, &ep, &ex);
    if (st != cases[i].want) fprintf(stderr, "case %zu\n", i);
    CHECK_STATUS(st, cases[i].want);
    CHECK(ex == NULL);
  }
  moex_executor_params_init(&ep);
  ep.cache_bytes = 1; /* smaller than one expert */
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_params_init(&ep);
  ep.lrfu_lambda = -1.0;
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_params_init(&ep);
  ep.gate_threshold = 0.5; /* without MOEX_GATING_ADAPTIVE */
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_params_init(&ep);
  ep.device = 3;
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_params_init(&ep);
  ep.flags = 0x100;
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_ERR_UNSUPPORTED);

  /* Newer struct: zero tail accepted, non-zero tail refused with STRUCT_SIZE. */
  newer_executor_params np;
  memset(&np, 0, sizeof np);
  moex_executor_params_init(&np.known);
  np.known.struct_size = sizeof np;
  CHECK_STATUS(moex_executor_create(model, &np.known, &ex), MOEX_OK);
  moex_executor_destroy(ex);
  np.new_field = 1;
  ex = (moex_executor*)&dp;
  CHECK_STATUS(moex_executor_create(model, &np.known, &ex), MOEX_ERR_STRUCT_SIZE);
  CHECK(ex == NULL);
  /* Older struct (only struct_size and cache_bytes): the rest defaults. */
  moex_executor_params_init(&ep);
  ep.struct_size = 16;
  ep.eviction = 1000; /* beyond the old struct: ignored */
  CHECK_STATUS(moex_executor_create(model, &ep, &ex), MOEX_OK);

  /* Forward / step. */
  enum { T = 2 };
  float x[T * 64], y[T * 64];
  uint16_t xb[T * 64], yb[T * 64];
  test_hidden(x, T, 64);
  memset(xb, 0, sizeof xb);
  CHECK_STATUS(moex_executor_forward_f32(NULL, 0, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, NULL, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, 0, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 2, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0xFFFFFFFFu, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, x), MOEX_ERR_INVALID_ARGUMENT);          /* aliasing */
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, x + 1), MOEX_ERR_INVALID_ARGUMENT);      /* overlap */
  CHECK_STATUS(moex_executor_step_f32(ex, x, T, x + 3), MOEX_ERR_INVALID_ARGUMENT);            /* partial */
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, (size_t)-1, y), MOEX_ERR_INVALID_ARGUMENT); /* overflow */
  CHECK_STATUS(moex_executor_forward_bf16(ex, 0, NULL, T, yb), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_step_bf16(ex, xb, 0, yb), MOEX_ERR_INVALID_ARGUMENT);
  x[5] = NAN;
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_step_f32(ex, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  x[5] = INFINITY;
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  xb[3] = 0x7FC0; /* bf16 NaN */
  CHECK_STATUS(moex_executor_forward_bf16(ex, 0, xb, T, yb), MOEX_ERR_INVALID_ARGUMENT);
  test_hidden(x, T, 64);
  CHECK_STATUS(moex_executor_forward_f32(ex, 1, x, T, y), MOEX_OK); /* still usable after errors */

  /* Statistics and traces. */
  moex_stats stats;
  moex_stats_init(&stats);
  CHECK_STATUS(moex_executor_get_stats(NULL, 0, &stats), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_get_stats(ex, 0, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_get_stats(ex, 7, &stats), MOEX_ERR_INVALID_ARGUMENT);
  stats.struct_size = 0;
  CHECK_STATUS(moex_executor_get_stats(ex, 0, &stats), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_stats_json(ex, NULL, 10, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_record_trace(ex, 2), MOEX_ERR_INVALID_ARGUMENT);
  moex_trace* tr = (moex_trace*)&dp;
  CHECK_STATUS(moex_executor_get_trace(ex, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_trace_load(NULL, &tr), MOEX_ERR_INVALID_ARGUMENT);
  CHECK(tr == NULL);
  snprintf(path, sizeof path, "%s/no-such-trace.bin", argv[1]);
  st = moex_trace_load(path, &tr);
  CHECK(st == MOEX_ERR_IO || st == MOEX_ERR_NOT_FOUND);
  snprintf(path, sizeof path, "%s/garbage.safetensors", argv[1]);
  st = moex_trace_load(path, &tr);
  CHECK(st == MOEX_ERR_CORRUPT || st == MOEX_ERR_UNSUPPORTED || st == MOEX_ERR_INVALID_ARGUMENT);
  CHECK(tr == NULL);
  CHECK_STATUS(moex_executor_record_trace(ex, 1), MOEX_OK);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, y), MOEX_OK);
  CHECK_STATUS(moex_executor_get_trace(ex, &tr), MOEX_OK);
  uint32_t ids[4];
  uint64_t need = 0;
  CHECK_STATUS(moex_trace_copy(tr, ids, NULL, 1, &need), MOEX_ERR_INVALID_ARGUMENT); /* too small */
  CHECK(need > 1);
  CHECK_STATUS(moex_trace_write(tr, path, 9), MOEX_ERR_UNSUPPORTED);
  CHECK_STATUS(moex_trace_write(tr, NULL, 0), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_trace_shape(NULL, NULL, NULL, NULL, NULL), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_trace_shape((const moex_trace*)ex, NULL, NULL, NULL, NULL),
               MOEX_ERR_INVALID_ARGUMENT); /* wrong kind */

  /* After destroy: detected (the handle registry), never a crash. Double destroy is a no-op. */
  moex_trace_destroy(tr);
  CHECK_STATUS(moex_trace_shape(tr, NULL, NULL, NULL, NULL), MOEX_ERR_INVALID_ARGUMENT);
  moex_trace_destroy(tr);
  moex_executor_destroy(ex);
  CHECK_STATUS(moex_executor_forward_f32(ex, 0, x, T, y), MOEX_ERR_INVALID_ARGUMENT);
  CHECK(strstr(moex_last_error_message(), "destroyed") != NULL);
  CHECK_STATUS(moex_executor_get_stats(ex, 0, &stats), MOEX_ERR_INVALID_ARGUMENT);
  moex_executor_destroy(ex);
  moex_model_destroy(model);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(moex_executor_create(model, NULL, &ex), MOEX_ERR_INVALID_ARGUMENT);
  moex_model_destroy(model);
  moex_model_destroy(NULL);
  moex_executor_destroy(NULL);
  moex_trace_destroy(NULL);
  moex_model_destroy((moex_model*)&dp); /* not a handle: ignored */
  return test_summary("capi_bad_input_test");
}
