/* moex.h and moex/experimental.h must compile as strict C99 (built with -std=c99 -pedantic-errors). */
#define MOEX_EXPERIMENTAL 1
#include "moex/experimental.h"

#include "moex.h"

/* Referencing a few declarations keeps the translation unit non-empty under -pedantic. */
moex_status (*const moex_test_c99_open)(const char*, const moex_model_params*, moex_progress_fn, void*,
                                        moex_model**) = moex_model_open;
moex_status (*const moex_test_c99_cuda)(int32_t*) = moex_experimental_cuda_device_count;
void moex_test_c99_init(moex_executor_params* p);
void moex_test_c99_init(moex_executor_params* p) { moex_executor_params_init(p); }
