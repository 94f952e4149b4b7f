/* Threads: one shared model, one executor per thread, all running at once, give the single-thread
 * result; moex_last_error_message() is per thread. argv[1]: a scratch folder. */
#include <pthread.h>

#include "capi_test.h"

enum { kThreads = 4, kTokens = 3, kHidden = 64, kRounds = 20 };

static moex_model* g_model;
static float g_x[kTokens * kHidden], g_want[kTokens * kHidden];

typedef struct {
  int index;
  int mismatches, errors, message_mixups;
} worker;

static void* run_worker(void* arg) {
  worker* w = (worker*)arg;
  moex_executor* ex = NULL;
  moex_executor_params p;
  moex_executor_params_init(&p);
  p.threads = 1;
  p.eviction = 1 + w->index % 4; /* LRU, LFU, LRFU, HOBBIT: the same math */
  if (moex_executor_create(g_model, &p, &ex) != MOEX_OK) {
    ++w->errors;
    return NULL;
  }
  float y[kTokens * kHidden];
  char expected[64];
  for (int r = 0; r < kRounds; ++r) {
    if (moex_executor_step_f32(ex, g_x, kTokens, y) != MOEX_OK)
      ++w->errors;
    else if (memcmp(y, g_want, sizeof y) != 0)
      ++w->mismatches;
    /* A thread-specific error; its message must be this thread's. */
    const uint32_t bad_layer = 100u + (uint32_t)w->index;
    snprintf(expected, sizeof expected, "layer %u", bad_layer);
    if (moex_executor_forward_f32(ex, bad_layer, g_x, kTokens, y) != MOEX_ERR_INVALID_ARGUMENT)
      ++w->errors;
    else if (strstr(moex_last_error_message(), expected) == NULL)
      ++w->message_mixups;
  }
  moex_executor_destroy(ex);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/demo-model", argv[1]);
  CHECK_STATUS(moex_model_write_demo(dir, NULL), MOEX_OK);
  CHECK_STATUS(moex_model_open(dir, NULL, NULL, NULL, &g_model), MOEX_OK);
  if (g_model == NULL) return test_summary("capi_threads_test");
  test_hidden(g_x, kTokens, kHidden);
  moex_executor* ex = NULL;
  CHECK_STATUS(moex_executor_create(g_model, NULL, &ex), MOEX_OK);
  CHECK_STATUS(moex_executor_step_f32(ex, g_x, kTokens, g_want), MOEX_OK);
  moex_executor_destroy(ex);

  pthread_t threads[kThreads];
  worker workers[kThreads];
  for (int i = 0; i < kThreads; ++i) {
    workers[i] = (worker){i, 0, 0, 0};
    CHECK(pthread_create(&threads[i], NULL, run_worker, &workers[i]) == 0);
  }
  for (int i = 0; i < kThreads; ++i) {
    pthread_join(threads[i], NULL);
    CHECK(workers[i].errors == 0);
    CHECK(workers[i].mismatches == 0);
    CHECK(workers[i].message_mixups == 0);
  }
  moex_model_destroy(g_model);
  return test_summary("capi_threads_test");
}
