/* Minimal C test harness for the moex C API tests (C11; tests may print, the library never does). */
#ifndef MOEX_CAPI_TEST_H
#define MOEX_CAPI_TEST_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moex.h"

static int g_checks = 0, g_failures = 0;

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    ++g_checks;                                                                                \
    if (!(cond)) {                                                                             \
      ++g_failures;                                                                            \
      fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
              moex_last_error_message());                                                      \
    }                                                                                          \
  } while (0)

/* CHECK that `expr` returns `code` and, for errors, leaves a non-empty message. */
#define CHECK_STATUS(expr, code)                                                                                   \
  do {                                                                                                             \
    moex_status check_status_ = (expr);                                                                            \
    ++g_checks;                                                                                                    \
    if (check_status_ != (code)) {                                                                                 \
      ++g_failures;                                                                                                \
      fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d (%s); last error: %s\n", __FILE__, __LINE__, #expr, \
              (int)check_status_, moex_status_string(check_status_), (int)(code), moex_status_string(code),        \
              moex_last_error_message());                                                                          \
    } else if ((code) != MOEX_OK && moex_last_error_message()[0] == '\0') {                                        \
      ++g_failures;                                                                                                \
      fprintf(stderr, "%s:%d: %s failed without a message\n", __FILE__, __LINE__, #expr);                          \
    }                                                                                                              \
  } while (0)

/* Prints the summary; the process exit code. */
static inline int test_summary(const char* name) {
  printf("%s: %d checks, %d failed\n", name, g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

/* Deterministic hidden states with exact float values (no libm): the same in every language. */
static inline void test_hidden(float* x, size_t n_tokens, size_t hidden) {
  for (size_t t = 0; t < n_tokens; ++t)
    for (size_t i = 0; i < hidden; ++i) x[t * hidden + i] = (float)((t * 131 + i * 31) % 97) / 48.5f - 1.0f;
}

#endif
