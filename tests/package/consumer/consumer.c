/* Package consumer (C): the installed moex.h and libmoex.so work: write the demo model, open it,
 * run one step, read the statistics. usage: consumer_c <model dir> */
#include <moex.h>
#include <stdio.h>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  moex_model* model = NULL;
  moex_executor* ex = NULL;
  moex_model_info info;
  moex_model_info_init(&info);
  moex_stats st;
  moex_stats_init(&st);
  float x[2 * 64], y[2 * 64];
  for (int i = 0; i < 2 * 64; ++i) x[i] = (float)(i % 7) / 7.0f - 0.5f;
  if (moex_model_write_demo(argv[1], NULL) != MOEX_OK ||
      moex_model_open(argv[1], NULL, NULL, NULL, &model) != MOEX_OK || moex_model_get_info(model, &info) != MOEX_OK ||
      info.hidden != 64 || moex_executor_create(model, NULL, &ex) != MOEX_OK ||
      moex_executor_step_f32(ex, x, 2, y) != MOEX_OK || moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st) != MOEX_OK) {
    fprintf(stderr, "consumer_c: %s\n", moex_last_error_message());
    return 1;
  }
  printf("consumer_c: moex %s, %u layers, %llu expert lookups\n", moex_version_string(), info.n_layers,
         (unsigned long long)(st.hits + st.misses));
  moex_executor_destroy(ex);
  moex_model_destroy(model);
  return st.hits + st.misses > 0 ? 0 : 1;
}
