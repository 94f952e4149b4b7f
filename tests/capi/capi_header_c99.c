/* moex.h must compile as strict C99 (built with -std=c99 -pedantic-errors). */
#include "moex.h"

/* Referencing a few declarations keeps the translation unit non-empty under -pedantic. */
moex_status (*const moex_test_c99_open)(const char*, const moex_model_params*, moex_progress_fn, void*,
                                        moex_model**) = moex_model_open;
