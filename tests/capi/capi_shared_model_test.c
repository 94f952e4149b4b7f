/* The C API on the shared trained model (../shared/models/tiny-mixtral-8e, sharded safetensors) and
 * its router-logit trace: opens, runs a step, loads the NumPy trace. Skips (77) without the files.
 * argv[1]: the shared folder. */
#include "capi_test.h"

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  char model_dir[4096], trace_path[4200];
  snprintf(model_dir, sizeof model_dir, "%s/models/tiny-mixtral-8e", argv[1]);
  snprintf(trace_path, sizeof trace_path, "%s/router_logits_code.npy", model_dir);
  FILE* f = fopen(trace_path, "rb");
  if (f == NULL) {
    printf("SKIP: %s not found\n", trace_path);
    return 77;
  }
  fclose(f);
  moex_model* model = NULL;
  CHECK_STATUS(moex_model_open(model_dir, NULL, NULL, NULL, &model), MOEX_OK);
  if (model == NULL) return test_summary("capi_shared_model_test");
  moex_model_info info;
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_OK);
  CHECK(info.n_layers > 0 && info.n_experts == 8 && info.hidden > 0);
  float* x = (float*)calloc(2 * (size_t)info.hidden, sizeof(float));
  float* y = (float*)calloc(2 * (size_t)info.hidden, sizeof(float));
  if (!x || !y) return 1;
  test_hidden(x, 2, info.hidden);
  moex_executor* ex = NULL;
  CHECK_STATUS(moex_executor_create(model, NULL, &ex), MOEX_OK);
  CHECK_STATUS(moex_executor_step_f32(ex, x, 2, y), MOEX_OK);
  for (size_t i = 0; i < 2 * (size_t)info.hidden; ++i) CHECK(isfinite(y[i]));
  moex_trace* tr = NULL;
  CHECK_STATUS(moex_trace_load(trace_path, &tr), MOEX_OK);
  uint64_t tokens = 0;
  uint32_t layers = 0, k = 0, experts = 0;
  CHECK_STATUS(moex_trace_shape(tr, &tokens, &layers, &k, &experts), MOEX_OK);
  CHECK(tokens > 0 && layers == info.n_layers && experts == info.n_experts && k == info.top_k);
  moex_trace_destroy(tr);
  moex_executor_destroy(ex);
  moex_model_destroy(model);
  free(x);
  free(y);
  return test_summary("capi_shared_model_test");
}
