/* Struct sizes and field offsets of moex.h as C sees them, pinned: a change here is an ABI break.
 * Also checks that the library's _init functions agree with the header's sizes. */
#include <stddef.h>

#include "capi_test.h"

#define PIN(type, field, offset) _Static_assert(offsetof(type, field) == (offset), #type "." #field " moved")

_Static_assert(sizeof(moex_status) == 4, "moex_status is int32_t");

_Static_assert(sizeof(moex_demo_params) == 40, "moex_demo_params size");
PIN(moex_demo_params, struct_size, 0);
PIN(moex_demo_params, n_layers, 8);
PIN(moex_demo_params, n_experts, 12);
PIN(moex_demo_params, top_k, 16);
PIN(moex_demo_params, hidden, 20);
PIN(moex_demo_params, ffn, 24);
PIN(moex_demo_params, precision, 28);
PIN(moex_demo_params, seed, 32);

/* 0.1 layout (24 bytes) kept; 0.2 appended keep_block_formats and reserved1. */
_Static_assert(sizeof(moex_model_params) == 32, "moex_model_params size");
PIN(moex_model_params, struct_size, 0);
PIN(moex_model_params, flags, 8);
PIN(moex_model_params, master_precision, 12);
PIN(moex_model_params, extra_precisions, 16);
PIN(moex_model_params, reserved0, 20);
PIN(moex_model_params, keep_block_formats, 24);
PIN(moex_model_params, reserved1, 28);

_Static_assert(sizeof(moex_model_info) == 48, "moex_model_info size");
PIN(moex_model_info, struct_size, 0);
PIN(moex_model_info, n_layers, 8);
PIN(moex_model_info, n_experts, 12);
PIN(moex_model_info, top_k, 16);
PIN(moex_model_info, hidden, 20);
PIN(moex_model_info, ffn, 24);
PIN(moex_model_info, master_precision, 28);
PIN(moex_model_info, expert_bytes, 32);
PIN(moex_model_info, n_checkpoint_layers, 40);
PIN(moex_model_info, reserved0, 44);

/* 0.1 layout (72 bytes) kept; 0.2 appended the rest. Pointers: LP64/LLP64 offsets. */
_Static_assert(sizeof(void*) != 8 || sizeof(moex_executor_params) == 184, "moex_executor_params size");
PIN(moex_executor_params, struct_size, 0);
PIN(moex_executor_params, cache_bytes, 8);
PIN(moex_executor_params, backend, 16);
PIN(moex_executor_params, device, 20);
PIN(moex_executor_params, threads, 24);
PIN(moex_executor_params, eviction, 28);
PIN(moex_executor_params, gating, 32);
PIN(moex_executor_params, prediction, 36);
PIN(moex_executor_params, cache_precision, 40);
PIN(moex_executor_params, flags, 44);
PIN(moex_executor_params, lrfu_lambda, 48);
PIN(moex_executor_params, gate_threshold, 56);
PIN(moex_executor_params, prefetch_depth, 64);
PIN(moex_executor_params, reserved0, 68);
PIN(moex_executor_params, miss, 72);
PIN(moex_executor_params, miss_flags, 76);
PIN(moex_executor_params, hobbit_t_high, 80);
PIN(moex_executor_params, hobbit_t_skip, 88);
PIN(moex_executor_params, low_precision, 96);
PIN(moex_executor_params, reserved1, 100);
PIN(moex_executor_params, low_precision_share, 104);
PIN(moex_executor_params, max_prefetch_bytes_in_flight, 112);
#if UINTPTR_MAX == 0xFFFFFFFFFFFFFFFFu
PIN(moex_executor_params, layer_cache_bytes, 120);
PIN(moex_executor_params, layer_cache_count, 128);
PIN(moex_executor_params, gate_sensitivities, 136);
PIN(moex_executor_params, gate_sensitivity_count, 144);
PIN(moex_executor_params, pregate_path, 152);
PIN(moex_executor_params, hot_profile, 160);
PIN(moex_executor_params, hot_profile_count, 168);
PIN(moex_executor_params, future_trace, 176);
#endif

_Static_assert(sizeof(moex_stats) == 304, "moex_stats size (0.1: 128, through hit_rate)");
PIN(moex_stats, struct_size, 0);
PIN(moex_stats, steps, 8);
PIN(moex_stats, tokens, 16);
PIN(moex_stats, expert_calls, 24);
PIN(moex_stats, hits, 32);
PIN(moex_stats, misses, 40);
PIN(moex_stats, bytes_loaded, 48);
PIN(moex_stats, evictions, 56);
PIN(moex_stats, skipped, 64);
PIN(moex_stats, prefetches, 72);
PIN(moex_stats, prefetch_hits, 80);
PIN(moex_stats, stall_ns, 88);
PIN(moex_stats, compute_ns, 96);
PIN(moex_stats, route_ns, 104);
PIN(moex_stats, total_ns, 112);
PIN(moex_stats, hit_rate, 120);
PIN(moex_stats, predicted, 128);
PIN(moex_stats, predicted_correct, 136);
PIN(moex_stats, selected, 144);
PIN(moex_stats, prefetch_wasted_bytes, 152);
PIN(moex_stats, computed_at_source, 160);
PIN(moex_stats, misses_by_precision, 168);
PIN(moex_stats, recall, 296);
_Static_assert(MOEX_PRECISION_SLOTS == 16, "misses_by_precision length is pinned");

/* Pinned values: never renumbered. */
_Static_assert(MOEX_OK == 0 && MOEX_ERR_INVALID_ARGUMENT == -1 && MOEX_ERR_UNSUPPORTED == -2 &&
                   MOEX_ERR_STRUCT_SIZE == -3 && MOEX_ERR_OUT_OF_MEMORY == -4 && MOEX_ERR_IO == -5 &&
                   MOEX_ERR_CORRUPT == -6 && MOEX_ERR_NOT_FOUND == -7 && MOEX_ERR_INTERNAL == -99,
               "status codes are pinned");
_Static_assert(MOEX_EVICTION_LRU == 1 && MOEX_EVICTION_LFU == 2 && MOEX_EVICTION_LRFU == 3 &&
                   MOEX_EVICTION_HOBBIT == 4 && MOEX_EVICTION_STATIC_HOT_SET == 5 && MOEX_EVICTION_BELADY == 6,
               "eviction values are pinned");
_Static_assert(MOEX_PRECISION_F32 == 1 && MOEX_PRECISION_F16 == 2 && MOEX_PRECISION_BF16 == 3 &&
                   MOEX_PRECISION_INT8 == 4 && MOEX_PRECISION_INT4 == 5 && MOEX_PRECISION_INT2 == 6,
               "precision values are pinned");
_Static_assert(MOEX_GATING_FIXED_TOP_K == 1 && MOEX_GATING_FIXED == 1 && MOEX_GATING_ADAPTIVE == 2,
               "gating values are pinned");
_Static_assert(MOEX_PREDICTION_NONE == 1 && MOEX_PREDICTION_SPECULATIVE == 2 && MOEX_PREDICTION_PREGATE_FILE == 3 &&
                   MOEX_PREDICTION_PREGATE_ROUTING == 4,
               "prediction values are pinned");
_Static_assert(MOEX_MISS_LOAD == 1 && MOEX_MISS_HOBBIT == 2 && MOEX_MISS_COST_MODEL == 3 &&
                   MOEX_MISS_FLAG_NO_SOURCE_COMPUTE == 1u && MOEX_MISS_FLAG_MIXED_PRECISION == 2u,
               "miss values are pinned");

int main(void) {
  moex_demo_params d;
  moex_model_params m;
  moex_model_info i;
  moex_executor_params e;
  moex_stats s;
  memset(&d, 0xAB, sizeof d);
  memset(&e, 0xAB, sizeof e);
  moex_demo_params_init(&d);
  moex_model_params_init(&m);
  moex_model_info_init(&i);
  moex_executor_params_init(&e);
  moex_stats_init(&s);
  CHECK(d.struct_size == sizeof d);
  CHECK(m.struct_size == sizeof m);
  CHECK(i.struct_size == sizeof i);
  CHECK(e.struct_size == sizeof e);
  CHECK(s.struct_size == sizeof s);
  /* Executor defaults are zero ("library default") except HOBBIT's thresholds. */
  CHECK(e.cache_bytes == 0 && e.eviction == 0 && e.gating == 0 && e.lrfu_lambda == 0.0 && e.reserved0 == 0);
  CHECK(e.miss == 0 && e.hobbit_t_high == 0.6 && e.hobbit_t_skip == 0.9 && e.low_precision_share == 0.0 &&
        e.hot_profile == NULL && e.future_trace == NULL);
  CHECK(d.n_layers == 2 && d.n_experts == 4 && d.top_k == 2 && d.hidden == 64 && d.ffn == 128 && d.seed == 1);
  /* NULL is a no-op for every _init. */
  moex_demo_params_init(NULL);
  moex_model_params_init(NULL);
  moex_model_info_init(NULL);
  moex_executor_params_init(NULL);
  moex_stats_init(NULL);
  /* Version: header and library agree. */
  CHECK(moex_version_number() == MOEX_VERSION_NUMBER);
  char want[32];
  snprintf(want, sizeof want, "%d.%d.%d", MOEX_VERSION_MAJOR, MOEX_VERSION_MINOR, MOEX_VERSION_PATCH);
  CHECK(strcmp(moex_version_string(), want) == 0);
  return test_summary("capi_layout_test");
}
