#ifndef MOEX_H
#define MOEX_H
/**
 * @file moex.h
 * The stable C ABI of moex: run Mixture-of-Experts layers with experts offloaded to slow memory,
 * from C and from any language with a C FFI (Rust, Go, C#, Python ctypes, ...).
 *
 * Rules that hold for every function (see docs/embedding.md):
 * - Every function that can fail returns a moex_status: MOEX_OK (0) or a negative error code.
 *   The values are pinned forever. On failure moex_last_error_message() says why.
 * - Constructors set `*out = NULL` on failure.
 * - Parameter and output structs start with `struct_size`, which is their version: initialize
 *   them with the matching `_init` function. Zero in any field means "library default". An older
 *   (smaller) struct is accepted with defaults for the missing tail; a newer (larger) one only if
 *   the tail this library does not know is all zero (else MOEX_ERR_STRUCT_SIZE). Output structs:
 *   the library writes min(caller's struct_size, its own size) bytes.
 * - Ownership is stated on every pointer. Every object has a destroy function that accepts NULL.
 * - Thread safety: functions taking `const moex_x*` may run concurrently with each other;
 *   functions taking `moex_x*` need exclusive access to that object. Models are shareable; use
 *   one executor per thread.
 * - Handles are checked against a registry of live objects: a NULL handle, a handle of the wrong
 *   kind, or one already destroyed gives MOEX_ERR_INVALID_ARGUMENT (as long as its address has not
 *   been reused by a new object).
 * - Strings are UTF-8 and NUL-terminated. Text goes out as static strings or by copy into a
 *   caller buffer with snprintf semantics.
 * - The library never prints, aborts or lets a C++ exception escape.
 *
 * This header includes only <stddef.h> and <stdint.h> and is valid C99 and C++.
 */
#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#if defined(MOEX_STATIC)
#define MOEX_API
#elif defined(MOEX_BUILDING_LIBRARY)
#define MOEX_API __declspec(dllexport)
#else
#define MOEX_API __declspec(dllimport)
#endif
#else
#define MOEX_API __attribute__((visibility("default")))
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MOEX_DEPRECATED(msg) __attribute__((deprecated(msg)))
#else
#define MOEX_DEPRECATED(msg)
#endif

/* Compile-time version (the same macros as moex/version.hpp; zstd's number formula). */
#ifndef MOEX_VERSION_MAJOR
#define MOEX_VERSION_MAJOR 0
#define MOEX_VERSION_MINOR 2
#define MOEX_VERSION_PATCH 0
#define MOEX_VERSION_NUMBER (MOEX_VERSION_MAJOR * 10000 + MOEX_VERSION_MINOR * 100 + MOEX_VERSION_PATCH)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ==== versions ================================================================================ */

/** The library's version as MOEX_VERSION_NUMBER computes it; compare with the header's. @since 0.1 */
MOEX_API uint32_t moex_version_number(void);
/** The library's version as "major.minor.patch"; static text, never NULL. @since 0.1 */
MOEX_API const char* moex_version_string(void);

/* ==== status codes (pinned forever; retired values are never reused) ========================= */

/** Result of every function that can fail: 0 on success, negative on error. @since 0.1 */
typedef int32_t moex_status;
#define MOEX_OK 0
#define MOEX_ERR_INVALID_ARGUMENT -1 /* NULL/out-of-range argument, bad or destroyed handle */
#define MOEX_ERR_UNSUPPORTED -2      /* a valid request this build cannot serve (e.g. no CUDA) */
#define MOEX_ERR_STRUCT_SIZE -3      /* a struct from a newer moex.h uses fields this library lacks */
#define MOEX_ERR_OUT_OF_MEMORY -4
#define MOEX_ERR_IO -5        /* a file could not be opened, read or written */
#define MOEX_ERR_CORRUPT -6   /* a file is malformed */
#define MOEX_ERR_NOT_FOUND -7 /* a file, tensor or key does not exist */
#define MOEX_ERR_INTERNAL -99 /* a bug in moex */

/** Static text for a status code ("ok", "invalid argument", ...); never NULL. Thread-safe. @since 0.1 */
MOEX_API const char* moex_status_string(moex_status status);

/**
 * The message of the last failed moex call on this thread ("" if none). Never NULL.
 * Thread-local; borrowed, valid until the next moex call on this thread.
 * @since 0.1
 */
MOEX_API const char* moex_last_error_message(void);

/* ==== logging ================================================================================= */

#define MOEX_LOG_ERROR 1
#define MOEX_LOG_WARN 2
#define MOEX_LOG_INFO 3
#define MOEX_LOG_DEBUG 4

/**
 * A log sink. `message` is borrowed, valid during the call only. Called on the thread of the
 * moex call that logs; calls from different threads may run at the same time. The callback may
 * call moex functions (e.g. moex_set_log_callback).
 * @since 0.1
 */
typedef void (*moex_log_fn)(int32_t level, const char* message, void* user_data);

/**
 * Sets the process-wide log callback (NULL: silent, the default) and the most verbose level to
 * deliver (0 = MOEX_LOG_INFO). `user_data` is passed back unchanged and must stay valid until the
 * callback is replaced. Thread-safe. Returns MOEX_ERR_INVALID_ARGUMENT for a level outside 0..4.
 * @since 0.1
 */
MOEX_API moex_status moex_set_log_callback(moex_log_fn fn, int32_t max_level, void* user_data);

/* ==== enums (values pinned; a value this build does not know gives MOEX_ERR_UNSUPPORTED) ======= */

/* Weight precisions. */
#define MOEX_PRECISION_DEFAULT 0
#define MOEX_PRECISION_F32 1
#define MOEX_PRECISION_F16 2
#define MOEX_PRECISION_BF16 3
#define MOEX_PRECISION_INT8 4 /* group-quantized, group 64, symmetric */
#define MOEX_PRECISION_INT4 5 /* group-quantized, group 64, symmetric */
#define MOEX_PRECISION_INT2 6 /* group-quantized, group 64, asymmetric */
/* Checkpoint block formats (@since 0.2): what moex_model_info.master_precision and moex_stats report
 * for a model opened with keep_block_formats, and valid as cache_precision when the master is in
 * that format. Never a conversion target: as precision, master_precision, extra_precisions or
 * low_precision they give MOEX_ERR_UNSUPPORTED. */
#define MOEX_PRECISION_Q8_0 7     /* GGUF Q8_0 */
#define MOEX_PRECISION_Q4_0 8     /* GGUF Q4_0 */
#define MOEX_PRECISION_Q4_K 9     /* GGUF Q4_K */
#define MOEX_PRECISION_FP8_E4M3 10 /* fp8 e4m3 with 128x128 f32 block scales (DeepSeek-V3) */

/* Compute backends. */
#define MOEX_BACKEND_DEFAULT 0 /* CPU */
#define MOEX_BACKEND_CPU 1
#define MOEX_BACKEND_CUDA 2 /* MOEX_ERR_UNSUPPORTED in builds without CUDA */

/* Eviction policies of the fast-tier cache. */
#define MOEX_EVICTION_DEFAULT 0 /* LRU */
#define MOEX_EVICTION_LRU 1
#define MOEX_EVICTION_LFU 2
#define MOEX_EVICTION_LRFU 3           /* uses moex_executor_params.lrfu_lambda */
#define MOEX_EVICTION_HOBBIT 4         /* HOBBIT's score, equal weights */
#define MOEX_EVICTION_STATIC_HOT_SET 5 /* a profile: moex_executor_params.hot_profile (since 0.2) */
#define MOEX_EVICTION_BELADY 6         /* offline oracle over moex_executor_params.future_trace (since 0.2) */

/* Gating: how many of the router's experts a token really uses. */
#define MOEX_GATING_DEFAULT 0 /* fixed top-k */
#define MOEX_GATING_FIXED_TOP_K 1
#define MOEX_GATING_FIXED MOEX_GATING_FIXED_TOP_K /* the same value, shorter name (0.2) */
/* AdapMoE's sensitivity gate (0.2): drops a token's trailing experts while the weight w they
 * carry satisfies w^2 * F_layer <= gate_threshold. F comes from gate_sensitivities (NULL: all 1);
 * the threshold from gate_threshold or from moex_executor_calibrate_gate. */
#define MOEX_GATING_ADAPTIVE 2

/* Expert prediction / prefetching. */
#define MOEX_PREDICTION_DEFAULT 0 /* none */
#define MOEX_PREDICTION_NONE 1
#define MOEX_PREDICTION_SPECULATIVE                      \
  2 /* next layers' routers on this layer's input (0.2); \
       prefetch_depth layers ahead (0 = 1) */
#define MOEX_PREDICTION_PREGATE_FILE                       \
  3 /* trained pre-gates read from pregate_path, used as a \
       prediction only (exact) (0.2) */
#define MOEX_PREDICTION_PREGATE_ROUTING                           \
  4 /* trained pre-gates from pregate_path used as the routing of \
      layers 1.. (changes the function) (0.2) */

/* What to do with a selected expert that is not resident (0.2). */
#define MOEX_MISS_DEFAULT 0 /* load it at the cache precision */
#define MOEX_MISS_LOAD 1
#define MOEX_MISS_HOBBIT                                                                                    \
  2                            /* HOBBIT: by its unimportance s: s <= hobbit_t_high load at full precision, \
                                  <= hobbit_t_skip load the low_precision copy, else skip it */
#define MOEX_MISS_COST_MODEL 3 /* load or compute where the master copy lives, whichever finishes first */

/* moex_executor_params.miss_flags for MOEX_MISS_COST_MODEL (0.2). */
#define MOEX_MISS_FLAG_NO_SOURCE_COMPUTE 1u /* never compute at the source (then it only loads) */
#define MOEX_MISS_FLAG_MIXED_PRECISION 2u   /* apply the HOBBIT rule (thresholds) before costing */

/* Trace file formats. */
#define MOEX_TRACE_FORMAT_DEFAULT 0 /* binary */
#define MOEX_TRACE_FORMAT_BINARY 1
#define MOEX_TRACE_FORMAT_JSONL 2

/* ==== demo model ============================================================================== */

/**
 * Shape of a generated demo model. Zero = default (2 layers, 4 experts, top-2, hidden 64,
 * ffn 128, seed 1, bf16 weights). Layout: 40 bytes, no padding.
 * @since 0.1
 */
typedef struct moex_demo_params {
  uint64_t struct_size; /* set by moex_demo_params_init */
  uint32_t n_layers;    /* MoE layers, 1..256 */
  uint32_t n_experts;   /* 1..256 */
  uint32_t top_k;       /* 1..min(n_experts, 16) */
  uint32_t hidden;      /* 1..16384 */
  uint32_t ffn;         /* 1..65536 */
  int32_t precision;    /* MOEX_PRECISION_F32, _F16 or _BF16 (default) */
  uint64_t seed;        /* same seed, same weights, on every platform */
} moex_demo_params;

/** Fills `params` (borrowed) with defaults and sets struct_size; NULL is a no-op. @since 0.1 */
MOEX_API void moex_demo_params_init(moex_demo_params* params);

/**
 * Writes a random Mixtral-shaped checkpoint (config.json + model.safetensors in Hugging Face
 * layout) into the folder `dir` (created if missing; existing files of those names are replaced),
 * for tests and examples. Weights are deterministic in the seed.
 * @param dir     borrowed, UTF-8 path.
 * @param params  borrowed; NULL means all defaults.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_STRUCT_SIZE, MOEX_ERR_UNSUPPORTED, MOEX_ERR_IO.
 * Thread safety: any thread; concurrent calls must use different folders.
 * @since 0.1
 */
MOEX_API moex_status moex_model_write_demo(const char* dir, const moex_demo_params* params);

/* ==== models ================================================================================== */

/** An opened checkpoint and the store of its experts. Opaque. @since 0.1 */
typedef struct moex_model moex_model;

/**
 * Progress of a long operation: `done` of `total` units of the step named `what` (borrowed,
 * valid during the call). Called on the calling thread. @since 0.1
 */
typedef void (*moex_progress_fn)(uint64_t done, uint64_t total, const char* what, void* user_data);

#define MOEX_MODEL_FLAG_COPY_TO_RAM 1u /* decode experts into RAM instead of using the mapped file */

/**
 * How to open a model. Zero = default. 0.1: 24 bytes (through reserved0); 0.2 appends to 32 bytes.
 * No padding.
 * @since 0.1
 */
typedef struct moex_model_params {
  uint64_t struct_size;      /* set by moex_model_params_init */
  uint32_t flags;            /* MOEX_MODEL_FLAG_* */
  int32_t master_precision;  /* precision of decoded master copies; 0 = BF16 */
  uint32_t extra_precisions; /* bit (1u << MOEX_PRECISION_x): also build copies in precision x */
  uint32_t reserved0;        /* must be 0 */
  /* ---- since 0.2 ---- */
  /* 1: keep experts stored in a block format in that format instead of decoding them to
   * master_precision: GGUF Q8_0, Q4_0 and Q4_K, and fp8 e4m3 with DeepSeek-V3-style 128x128 block
   * scales (weight_scale_inv). The master copies are then the checkpoint's blocks copied into
   * host RAM (moex_model_info.master_precision reads MOEX_PRECISION_Q8_0, _Q4_0, _Q4_K or _FP8_E4M3;
   * expert_bytes is their size); executors compute from them (on the CPU each block is
   * decoded to f32 as it is used: slower than a bf16 master, but without rounding the weights to
   * bf16), and extra_precisions copies are built from them. Every expert must be in the first
   * expert's format (else MOEX_ERR_CORRUPT). Dense f32/f16/bf16 checkpoints load as with 0; other
   * formats (Q5_K, Q6_K, MXFP4, ...) and shapes the block layout cannot hold are decoded, and a
   * MOEX_LOG_INFO message says so. 0 (default): decode, as 0.1 does. Other values:
   * MOEX_ERR_INVALID_ARGUMENT.
   * @since 0.2 */
  uint32_t keep_block_formats;
  uint32_t reserved1; /* must be 0 */
} moex_model_params;

/**
 * Fills the first `size` bytes of `params` (borrowed): defaults for the fields that fit, zero
 * beyond, struct_size = size. Pass sizeof of your struct (FFI bindings: the size of their mirror
 * of it). size < 8 or > 4096: no-op. NULL: no-op.
 * @since 0.2
 */
MOEX_API void moex_model_params_init_size(moex_model_params* params, uint64_t size);
/**
 * Fills the 0.1 layout (24 bytes) and sets struct_size = 24: binaries built against 0.1 call it
 * with 24-byte structs. New code: the macro below (or moex_model_params_init_size).
 * @since 0.1
 */
MOEX_API void moex_model_params_init(moex_model_params* params);
/* Calls from code compiled with this header initialize the whole struct. */
#define moex_model_params_init(params) moex_model_params_init_size((params), sizeof(moex_model_params))

/**
 * Opens a model: a .safetensors file (config.json beside it), a folder with config.json and
 * model.safetensors or a sharded index, or a .gguf file.
 * @param path       borrowed, UTF-8.
 * @param params     borrowed; NULL means all defaults.
 * @param progress   may be NULL; called during loading with `user_data`.
 * @param out        on success a new model owned by the caller (free with moex_model_destroy);
 *                   on failure set to NULL.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_STRUCT_SIZE, MOEX_ERR_UNSUPPORTED,
 *         MOEX_ERR_IO, MOEX_ERR_CORRUPT, MOEX_ERR_NOT_FOUND, MOEX_ERR_OUT_OF_MEMORY.
 * Thread safety: any thread.
 * @since 0.1
 */
MOEX_API moex_status moex_model_open(const char* path, const moex_model_params* params, moex_progress_fn progress,
                                     void* user_data, moex_model** out);

/**
 * Destroys a model; NULL is a no-op. Executors created from it stay usable (they keep what they
 * need alive). Not concurrent with other calls on this model.
 * @since 0.1
 */
MOEX_API void moex_model_destroy(moex_model* model);

/**
 * What a model is (output struct: set struct_size, e.g. with moex_model_info_init). 48 bytes.
 * @since 0.1
 */
typedef struct moex_model_info {
  uint64_t struct_size;
  uint32_t n_layers;            /* MoE layers (the layer index of every executor call) */
  uint32_t n_experts;           /* routed experts per layer */
  uint32_t top_k;               /* experts per token */
  uint32_t hidden;              /* hidden size */
  uint32_t ffn;                 /* intermediate size of one expert */
  int32_t master_precision;     /* MOEX_PRECISION_* of the master copies */
  uint64_t expert_bytes;        /* bytes of one expert in the master precision */
  uint32_t n_checkpoint_layers; /* all layers of the checkpoint, dense ones included */
  uint32_t reserved0;
} moex_model_info;

/** Sets struct_size and zeroes the rest; NULL is a no-op. @since 0.1 */
MOEX_API void moex_model_info_init(moex_model_info* info);

/**
 * Reads the model's shape into `info` (borrowed; struct_size set by the caller).
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT (NULL, bad handle, struct_size < 8).
 * Thread safety: concurrent with any call taking a const model.
 * @since 0.1
 */
MOEX_API moex_status moex_model_get_info(const moex_model* model, moex_model_info* info);

/**
 * Bytes of one expert in `precision` (MOEX_PRECISION_*; 0 = master) into `*bytes`; 0 when the
 * model holds no copy in that precision.
 * @since 0.1
 */
MOEX_API moex_status moex_model_expert_bytes(const moex_model* model, int32_t precision, uint64_t* bytes);

/**
 * The checkpoint's architecture name (e.g. "mixtral") copied into `buf` (borrowed, may be NULL
 * when size is 0), NUL-terminated and truncated to size-1 characters; `*needed` (may be NULL)
 * receives the full length without the NUL (snprintf semantics).
 * @since 0.1
 */
MOEX_API moex_status moex_model_architecture(const moex_model* model, char* buf, size_t size, size_t* needed);

/* ==== executors =============================================================================== */

/** Runs the MoE layers of one model with a fast-tier expert cache. Opaque. @since 0.1 */
typedef struct moex_executor moex_executor;

/** A routing trace: per token and layer, the experts used and their weights. Opaque. @since 0.1 */
typedef struct moex_trace moex_trace;

#define MOEX_EXECUTOR_FLAG_NO_FINITE_CHECK 1u /* skip the NaN/inf check of hidden states */

/**
 * Executor parameters. Zero in any field means "library default", except hobbit_t_high and
 * hobbit_t_skip, whose defaults (0.6, 0.9) the _init functions set.
 * 0.1 layout: 72 bytes (through reserved0). 0.2 appends the fields after reserved0: 184 bytes on
 * 64-bit platforms, no padding. Pointer fields are borrowed for the duration of
 * moex_executor_create only (the executor copies what it needs).
 * @since 0.1
 */
typedef struct moex_executor_params {
  uint64_t struct_size;    /* set by moex_executor_params_init */
  uint64_t cache_bytes;    /* fast-tier budget; 0 = a quarter of all experts (at least one) */
  int32_t backend;         /* MOEX_BACKEND_* */
  int32_t device;          /* device ordinal for GPU backends; must be 0 for the CPU */
  uint32_t threads;        /* worker threads for expert compute; 0 = all cores */
  int32_t eviction;        /* MOEX_EVICTION_* */
  int32_t gating;          /* MOEX_GATING_* */
  int32_t prediction;      /* MOEX_PREDICTION_* */
  int32_t cache_precision; /* MOEX_PRECISION_* held in the fast tier; 0 = the master's; the model
                              must hold it (moex_model_params.extra_precisions) */
  uint32_t flags;          /* MOEX_EXECUTOR_FLAG_* */
  double lrfu_lambda;      /* MOEX_EVICTION_LRFU decay per step; 0 = 0.05 */
  double gate_threshold;   /* MOEX_GATING_ADAPTIVE: threshold T >= 0 (0 = drop nothing until
                              calibrated); must be 0 for the other gates */
  uint32_t prefetch_depth; /* MOEX_PREDICTION_SPECULATIVE: layers of look-ahead, 0 = 1, at most
                              n_layers - 1; must be 0 for the other predictions */
  uint32_t reserved0;      /* must be 0 */
  /* ---- since 0.2 ---- */
  int32_t miss;                          /* MOEX_MISS_* */
  uint32_t miss_flags;                   /* MOEX_MISS_FLAG_* (MOEX_MISS_COST_MODEL only) */
  double hobbit_t_high;                  /* MOEX_MISS_HOBBIT / COST_MODEL with MIXED_PRECISION; _init: 0.6 */
  double hobbit_t_skip;                  /* likewise; _init: 0.9; 0 <= t_high <= t_skip */
  int32_t low_precision;                 /* MOEX_PRECISION_* of a second, low-precision pool (HOBBIT); 0 = none;
                                            the model must hold it (moex_model_params.extra_precisions) */
  uint32_t reserved1;                    /* must be 0 */
  double low_precision_share;            /* share of the budget for the low pool, 0 < share < 1; 0 = 0.25 */
  uint64_t max_prefetch_bytes_in_flight; /* 0 = two experts */
  const uint64_t* layer_cache_bytes;     /* borrowed: one budget per layer (replaces cache_bytes), or NULL */
  uint64_t layer_cache_count;            /* entries of layer_cache_bytes: 0 or n_layers */
  const float* gate_sensitivities;       /* borrowed: MOEX_GATING_ADAPTIVE's per-layer F (finite, >= 0), or NULL */
  uint64_t gate_sensitivity_count;       /* 0 or n_layers */
  const char* pregate_path;              /* borrowed, UTF-8: MOEX_PREDICTION_PREGATE_* safetensors file */
  const double* hot_profile;             /* borrowed: MOEX_EVICTION_STATIC_HOT_SET scores, [layer * n_experts
                                            + expert] (e.g. access counts: moex_trace_expert_counts) */
  uint64_t hot_profile_count;            /* n_layers * n_experts */
  const moex_trace* future_trace;        /* borrowed: MOEX_EVICTION_BELADY's future (copied); see
                                            moex_executor_create */
} moex_executor_params;

/**
 * Fills the first `size` bytes of `params` (borrowed): defaults for the fields that fit, zero
 * beyond, struct_size = size. Pass sizeof of your struct (FFI bindings: the size of their mirror
 * of it). size < 8 or > 4096: no-op. NULL: no-op.
 * @since 0.2
 */
MOEX_API void moex_executor_params_init_size(moex_executor_params* params, uint64_t size);
/**
 * Fills the 0.1 layout (72 bytes) and sets struct_size = 72: binaries built against 0.1 call it
 * with 72-byte structs. New code: the macro below (or moex_executor_params_init_size).
 * @since 0.1
 */
MOEX_API void moex_executor_params_init(moex_executor_params* params);
/* Calls from code compiled with this header initialize the whole struct. */
#define moex_executor_params_init(params) moex_executor_params_init_size((params), sizeof(moex_executor_params))

/**
 * Creates an executor over `model`.
 * The policy types are compiled in ahead of time; these combinations exist (others give
 * MOEX_ERR_UNSUPPORTED, see docs/embedding.md):
 *  - the exact path (gating FIXED, prediction NONE, miss LOAD, no low_precision): every eviction;
 *  - any other gating x prediction x miss x low_precision: evictions LRU, LFU, LRFU, HOBBIT and
 *    STATIC_HOT_SET (BELADY's future is the demand-access sequence: exact path only).
 * MOEX_EVICTION_BELADY replays `future_trace` at one token per call, layer by layer: the k-th
 * forward call of the executor is the trace's k-th (token, layer) with experts.
 * @param model   borrowed; the executor keeps the model's data alive, so the model may be
 *                destroyed first.
 * @param params  borrowed; NULL means all defaults.
 * @param out     on success a new executor owned by the caller (free with moex_executor_destroy);
 *                on failure set to NULL.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_STRUCT_SIZE, MOEX_ERR_UNSUPPORTED
 *         (a policy, backend or precision not built into this library), MOEX_ERR_OUT_OF_MEMORY.
 * Thread safety: concurrent with any call taking `const moex_model*`.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_create(const moex_model* model, const moex_executor_params* params,
                                          moex_executor** out);

/** Destroys an executor; NULL is a no-op. Not concurrent with other calls on it. @since 0.1 */
MOEX_API void moex_executor_destroy(moex_executor* executor);

/**
 * One MoE layer for n tokens: out[n x hidden] = the whole MoE block's output, as the model
 * defines it: the sum over each token's top-k experts of gate weight * expert(hidden), each
 * expert with its own biases and activation where the architecture has them (gpt-oss), plus the
 * layer's shared expert where it has one (DeepSeek-V2/V3; Qwen2-MoE's scaled by its sigmoid gate).
 * The caller adds the residual. Shared experts stay resident beside the expert cache and do not
 * count against cache_bytes (moex_executor_stats_json reports "resident_shared_bytes").
 * docs/formats.md tables what each architecture computes; a block moex cannot compute exactly
 * is refused by moex_executor_create (MOEX_ERR_UNSUPPORTED), never computed in part.
 * @param layer   0 <= layer < moex_model_info.n_layers.
 * @param hidden  borrowed, n_tokens x hidden floats, row-major.
 * @param out     borrowed, n_tokens x hidden floats; must not overlap `hidden`.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT (NULL, layer out of range, n_tokens 0, non-finite
 *         input), MOEX_ERR_OUT_OF_MEMORY, MOEX_ERR_IO.
 * Thread safety: exclusive access to the executor.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_forward_f32(moex_executor* executor, uint32_t layer, const float* hidden,
                                               size_t n_tokens, float* out);

/**
 * moex_executor_forward_f32 with bf16 hidden states (uint16_t bit patterns) in and out; the
 * computation runs in f32 and the result is rounded to nearest even once.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_forward_bf16(moex_executor* executor, uint32_t layer, const uint16_t* hidden,
                                                size_t n_tokens, uint16_t* out);

/**
 * A whole step through all MoE layers in order, with the residual:
 *   h_0 = hidden;  h_{l+1} = h_l + moe_l(h_l)  for l = 0 .. n_layers-1;  out = h_{n_layers}.
 * (No normalization or attention in between: those belong to the embedding engine, which calls
 * moex_executor_forward_* per layer when it has them.)
 * @param hidden  borrowed, n_tokens x hidden.
 * @param out     borrowed, n_tokens x hidden; may be the same pointer as `hidden` (in place),
 *                must not partially overlap it.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_step_f32(moex_executor* executor, const float* hidden, size_t n_tokens, float* out);

/** moex_executor_step_f32 in bf16 (f32 inside, rounded once at the end). @since 0.1 */
MOEX_API moex_status moex_executor_step_bf16(moex_executor* executor, const uint16_t* hidden, size_t n_tokens,
                                             uint16_t* out);

/**
 * One MoE layer for n tokens with the routing given instead of the router's (trace replay):
 * token t uses experts[t*k + j] with gate weight weights[t*k + j], j < k; MOEX_NO_EXPERT ends a
 * token's list early (as in moex_trace_copy). The gate (MOEX_GATING_ADAPTIVE) and the miss policy
 * still apply; predictions still run.
 * @param experts  borrowed, n_tokens x k expert ids (< n_experts); every token needs at least one.
 * @param weights  borrowed, n_tokens x k finite gate weights.
 * @param k        1..16.
 * @param hidden, out  as moex_executor_forward_f32.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_OUT_OF_MEMORY, MOEX_ERR_IO.
 * Thread safety: exclusive access to the executor.
 * @since 0.2
 */
MOEX_API moex_status moex_executor_forward_routed_f32(moex_executor* executor, uint32_t layer, const uint32_t* experts,
                                                      const float* weights, uint32_t k, size_t n_tokens,
                                                      const float* hidden, float* out);

/**
 * MOEX_GATING_ADAPTIVE: sets the executor's gate threshold so that the average number of experts
 * per token on `trace` (its routing and weights, with the executor's sensitivities) comes as close
 * to `target_k` as the data allows. `*reached_k` (may be NULL) receives the average reached.
 * @param trace     borrowed; its shape must match the model's layers.
 * @param target_k  1 <= target_k <= the trace's top_k.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT (not an adaptive executor, bad trace or target).
 * Thread safety: exclusive access to the executor; the trace may be shared.
 * @since 0.2
 */
MOEX_API moex_status moex_executor_calibrate_gate(moex_executor* executor, const moex_trace* trace, double target_k,
                                                  double* reached_k);

/**
 * The gate threshold in use into `*threshold` (0 for fixed top-k executors).
 * @since 0.2
 */
MOEX_API moex_status moex_executor_gate_threshold(const moex_executor* executor, double* threshold);

/* ---- statistics ---- */

/** Select the sum over all layers in moex_executor_get_stats. */
#define MOEX_ALL_LAYERS 0xFFFFFFFFu

/** Entries of moex_stats.misses_by_precision (index MOEX_PRECISION_*; 0: formats without a C name). */
#define MOEX_PRECISION_SLOTS 16

/**
 * Counters of one layer or all (output struct: set struct_size, e.g. with moex_stats_init).
 * Times in nanoseconds. 0.1: 128 bytes (through hit_rate); 0.2 appends to 304 bytes. The
 * library writes min(struct_size, its size) bytes and sets struct_size to what it wrote.
 * @since 0.1
 */
typedef struct moex_stats {
  uint64_t struct_size;
  uint64_t steps;        /* forward calls (MOEX_ALL_LAYERS: of the busiest layer) */
  uint64_t tokens;       /* tokens routed */
  uint64_t expert_calls; /* (expert, step) pairs computed */
  uint64_t hits;         /* expert lookups served from the fast tier */
  uint64_t misses;       /* lookups that were not */
  uint64_t bytes_loaded; /* bytes moved from the slow tier into the fast tier */
  uint64_t evictions;
  uint64_t skipped; /* experts dropped by the gate */
  uint64_t prefetches;
  uint64_t prefetch_hits;
  uint64_t stall_ns;   /* waiting for loads */
  uint64_t compute_ns; /* computing experts */
  uint64_t route_ns;   /* routing */
  uint64_t total_ns;   /* in forward, all included */
  double hit_rate;     /* hits / (hits + misses); 0 when nothing was looked up */
  /* ---- since 0.2 ---- */
  uint64_t predicted;             /* experts predicted for the layer(s) */
  uint64_t predicted_correct;     /* of those, selected: recall numerator */
  uint64_t selected;              /* experts selected at layers a predictor reaches (not layer 0): recall denominator */
  uint64_t prefetch_wasted_bytes; /* bytes prefetched and evicted or cancelled unused */
  uint64_t computed_at_source;    /* misses computed where the master copy lives */
  uint64_t misses_by_precision[MOEX_PRECISION_SLOTS]; /* loads on a miss, by MOEX_PRECISION_* loaded */
  double recall;                                      /* predicted_correct / selected; 0 when nothing was predicted */
} moex_stats;

/**
 * Zeroes the first `size` bytes of `stats` (borrowed) and sets struct_size = size; size < 8 or
 * > 4096 or NULL: no-op.
 * @since 0.2
 */
MOEX_API void moex_stats_init_size(moex_stats* stats, uint64_t size);
/** The 0.1 layout (128 bytes), for binaries built against 0.1; NULL is a no-op. @since 0.1 */
MOEX_API void moex_stats_init(moex_stats* stats);
/* Calls from code compiled with this header initialize the whole struct. */
#define moex_stats_init(stats) moex_stats_init_size((stats), sizeof(moex_stats))

/**
 * Reads the counters of `layer` (or MOEX_ALL_LAYERS) into `stats` (borrowed).
 * Thread safety: concurrent with other const calls, not with forward on the same executor.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_get_stats(const moex_executor* executor, uint32_t layer, moex_stats* stats);

/**
 * The statistics as JSON ({"total": {...}, "layers": [...]}) copied into `buf` (borrowed, may be
 * NULL when size is 0) with snprintf semantics; `*needed` (may be NULL) receives the full length
 * without the NUL.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_stats_json(const moex_executor* executor, char* buf, size_t size, size_t* needed);

/** Zeroes the counters. Exclusive access. @since 0.1 */
MOEX_API moex_status moex_executor_reset_stats(moex_executor* executor);

/* ---- routing traces ---- */

/* moex_trace (a routing trace) is declared with the executors: their params can name one. */

/**
 * Starts (`on` = 1, clearing what was recorded) or stops (`on` = 0) recording the routing each
 * forward call uses. Exclusive access.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_record_trace(moex_executor* executor, uint32_t on);

/** Marks the start of a new sequence in the recorded trace. Exclusive access. @since 0.1 */
MOEX_API moex_status moex_executor_begin_sequence(moex_executor* executor);

/**
 * A copy of what was recorded so far.
 * @param out  on success a new trace owned by the caller (free with moex_trace_destroy); else NULL.
 * @since 0.1
 */
MOEX_API moex_status moex_executor_get_trace(const moex_executor* executor, moex_trace** out);

/**
 * Loads a trace file (moex binary or JSONL, NumPy router logits, Mixtral JSONL or FLAME CSV;
 * detected from the content).
 * @param out  on success a new trace owned by the caller (free with moex_trace_destroy); else NULL.
 * @return MOEX_OK, MOEX_ERR_INVALID_ARGUMENT, MOEX_ERR_IO, MOEX_ERR_CORRUPT, MOEX_ERR_NOT_FOUND.
 * @since 0.1
 */
MOEX_API moex_status moex_trace_load(const char* path, moex_trace** out);

/** Writes a trace in `format` (MOEX_TRACE_FORMAT_*). @since 0.1 */
MOEX_API moex_status moex_trace_write(const moex_trace* trace, const char* path, int32_t format);

/** Destroys a trace; NULL is a no-op. @since 0.1 */
MOEX_API void moex_trace_destroy(moex_trace* trace);

/**
 * The trace's shape; every out pointer may be NULL.
 * @since 0.1
 */
MOEX_API moex_status moex_trace_shape(const moex_trace* trace, uint64_t* n_tokens, uint32_t* n_layers, uint32_t* top_k,
                                      uint32_t* n_experts);

/** Marks padding in moex_trace_copy's expert ids (a token that used fewer than top_k experts). */
#define MOEX_NO_EXPERT 0xFFFFFFFFu

/**
 * Copies the trace as dense arrays [n_tokens][n_layers][top_k] of expert ids (MOEX_NO_EXPERT
 * pads) and gate weights. `capacity` is the number of entries each of `experts` and `weights`
 * (borrowed; either may be NULL) can hold; `*needed` (may be NULL) receives the number of entries
 * of the whole trace. Returns MOEX_ERR_INVALID_ARGUMENT, copying nothing, when a non-NULL array
 * is smaller than needed.
 * @since 0.1
 */
MOEX_API moex_status moex_trace_copy(const moex_trace* trace, uint32_t* experts, float* weights, uint64_t capacity,
                                     uint64_t* needed);

/**
 * Access counts per expert over the whole trace, [layer * n_experts + expert] (a profile for
 * MOEX_EVICTION_STATIC_HOT_SET). `capacity`, `needed` and errors as moex_trace_copy.
 * @since 0.2
 */
MOEX_API moex_status moex_trace_expert_counts(const moex_trace* trace, double* counts, uint64_t capacity,
                                              uint64_t* needed);

#ifdef __cplusplus
}
#endif
#endif /* MOEX_H */
