/* moex_model_params.keep_block_formats (0.2) through the C ABI, on the checkpoints the fixture
 * moex_capi_block_fixture writes (4 experts, top-2: Mixtral-shaped GGUF files, 3 MoE layers, with
 * Q4_0, Q8_0, Q4_K and dense F16 experts; DeepSeek-V3 safetensors with fp8 e4m3 experts; gpt-oss
 * with MXFP4 ones): kept blocks run and agree with the same checkpoint decoded into an f32 master
 * (the same weights) and, looser, into the default bf16 master; checkpoints the option does not
 * cover open as without it; old struct sizes (the 0.1 _init symbol, struct_size 8 and 28) keep
 * working; bad values are refused. argv[1]: the fixture's folder. */
#include "capi_test.h"

enum { kTokens = 6, kMaxHidden = 256, kMaxLayers = 3 };

/* Kept blocks and an f32 master hold the same f32 weights (GGUF Q4_0/Q8_0/Q4_K values are exact
 * in f32; fp8 is code x f32 block scale, the same product on both paths): only the order of the f32 sums differs, a few
 * ulps times sqrt(length <= 256) norm-wise (seen: <= 2e-6 over seeds 1..8); 1e-5 leaves a factor of five. */
static const double kSameWeightsTol = 1e-5;
/* The default bf16 master rounds each decoded weight to 8 significant bits (relative error <= 2^-9,
 * RMS ~1.1e-3 per weight); three rounded matrices in sequence give ~4e-3 norm-wise on one layer's
 * output here: 2e-2 leaves a factor of five. Compared per layer only (the same input, so the same
 * routing): through a whole step, the changed hidden states may flip a near tie of the router. */
static const double kBf16MasterTol = 2e-2;
/* An int8 (group 64, symmetric) cache copy of the kept blocks: a step of amax/127 (~2.4 sigma/127
 * on these weights), RMS ~5.5e-3 relative per weight; three matrices in sequence give ~1.5e-2
 * norm-wise (seeds 1..8): 4e-2 leaves a factor of 2.5. */
static const double kInt8CacheTol = 4e-2;

static double rel_err(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = (double)a[i] - (double)b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Opens `path` with the given options (params from the header's _init macro: the whole struct). */
static moex_status open_with(const char* path, uint32_t keep, int32_t master, uint32_t extra, moex_model** out) {
  moex_model_params mp;
  moex_model_params_init(&mp);
  mp.keep_block_formats = keep;
  mp.master_precision = master;
  mp.extra_precisions = extra;
  return moex_model_open(path, &mp, NULL, NULL, out);
}

/* Per-layer forward of x through every layer (out: n_layers x kTokens x hidden), then a whole step
 * (step: kTokens x hidden), with a cache of two experts (misses and evictions on every layer).
 * Returns the first failing status; *misses (may be NULL) gets the misses counted. */
static moex_status run_model(moex_model* model, const moex_model_info* info, int32_t cache_precision,
                             uint64_t cache_expert_bytes, const float* x, float* out, float* step, uint64_t* misses) {
  moex_executor_params p;
  moex_executor_params_init(&p);
  p.threads = 1;
  p.cache_precision = cache_precision;
  p.cache_bytes = 2 * cache_expert_bytes;
  moex_executor* ex = NULL;
  moex_status s = moex_executor_create(model, &p, &ex);
  const size_t n = (size_t)kTokens * info->hidden;
  for (uint32_t l = 0; s == MOEX_OK && l < info->n_layers; ++l)
    s = moex_executor_forward_f32(ex, l, x, kTokens, out + l * n);
  if (s == MOEX_OK) s = moex_executor_step_f32(ex, x, kTokens, step);
  if (s == MOEX_OK && misses != NULL) {
    moex_stats st;
    moex_stats_init(&st);
    s = moex_executor_get_stats(ex, MOEX_ALL_LAYERS, &st);
    *misses = st.misses;
  }
  moex_executor_destroy(ex);
  return s;
}

static moex_model_info info_of(const moex_model* model) {
  moex_model_info info;
  moex_model_info_init(&info);
  CHECK_STATUS(moex_model_get_info(model, &info), MOEX_OK);
  return info;
}

/* Counts the log messages that report experts decoded in spite of keep_block_formats. */
static void on_log(int32_t level, const char* message, void* user_data) {
  if (level == MOEX_LOG_INFO && strstr(message, "decoded") != NULL) ++*(int*)user_data;
}

static float g_x[kTokens * kMaxHidden];
static float g_out_blk[kMaxLayers * kTokens * kMaxHidden], g_out_f32[kMaxLayers * kTokens * kMaxHidden],
    g_out_bf16[kMaxLayers * kTokens * kMaxHidden], g_out_other[kMaxLayers * kTokens * kMaxHidden];
static float g_step_blk[kTokens * kMaxHidden], g_step_f32[kTokens * kMaxHidden], g_step_bf16[kTokens * kMaxHidden],
    g_step_other[kTokens * kMaxHidden];

/* One block-format checkpoint: kept vs decoded to f32 and to bf16. */
static void check_block_file(const char* dir, const char* name, uint32_t hidden, uint32_t n_layers, int with_int8,
                             int32_t precision) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  printf("%s\n", path);
  moex_model *blk = NULL, *f32 = NULL, *bf16 = NULL;
  CHECK_STATUS(open_with(path, 1, 0, with_int8 ? 1u << MOEX_PRECISION_INT8 : 0u, &blk), MOEX_OK);
  CHECK_STATUS(open_with(path, 0, MOEX_PRECISION_F32, 0, &f32), MOEX_OK);
  CHECK_STATUS(open_with(path, 0, 0, 0, &bf16), MOEX_OK);
  if (blk == NULL || f32 == NULL || bf16 == NULL) goto done;
  {
    const moex_model_info ib = info_of(blk), i32 = info_of(f32), i16 = info_of(bf16);
    CHECK(ib.n_layers == n_layers && ib.n_experts == 4 && ib.top_k == 2 && ib.hidden == hidden);
    CHECK(i32.n_layers == ib.n_layers && i32.hidden == ib.hidden && i32.ffn == ib.ffn);
    /* Kept: the block format's MOEX_PRECISION_* name; decoded: the master asked for. */
    CHECK(ib.master_precision == precision);
    CHECK(i32.master_precision == MOEX_PRECISION_F32 && i16.master_precision == MOEX_PRECISION_BF16);
    /* Blocks of 4.5 (Q4_0, Q4_K), 8.5 (Q8_0) or about 8 (fp8) bits per weight against bf16's 16. */
    CHECK(ib.expert_bytes > 0 && ib.expert_bytes * 3 < i16.expert_bytes * 2);
    uint64_t master_bytes = 0;
    CHECK_STATUS(moex_model_expert_bytes(blk, MOEX_PRECISION_DEFAULT, &master_bytes), MOEX_OK);
    CHECK(master_bytes == ib.expert_bytes);
    if (ib.hidden != hidden || ib.n_layers > kMaxLayers) goto done;

    const size_t n = (size_t)ib.n_layers * kTokens * hidden, ns = (size_t)kTokens * hidden;
    test_hidden(g_x, kTokens, hidden);
    uint64_t misses = 0;
    CHECK_STATUS(run_model(blk, &ib, 0, ib.expert_bytes, g_x, g_out_blk, g_step_blk, &misses), MOEX_OK);
    CHECK(misses > 0); /* experts went through the cache in the block format */
    CHECK_STATUS(run_model(f32, &i32, 0, i32.expert_bytes, g_x, g_out_f32, g_step_f32, NULL), MOEX_OK);
    CHECK_STATUS(run_model(bf16, &i16, 0, i16.expert_bytes, g_x, g_out_bf16, g_step_bf16, NULL), MOEX_OK);
    const double e_f32 = rel_err(g_out_blk, g_out_f32, n), e_step_f32 = rel_err(g_step_blk, g_step_f32, ns);
    const double e_bf16 = rel_err(g_out_blk, g_out_bf16, n);
    printf("  %s kept vs f32 master: layers %.3g, step %.3g; vs bf16 master: layers %.3g\n", name, e_f32, e_step_f32,
           e_bf16);
    CHECK(e_f32 < kSameWeightsTol && e_step_f32 < kSameWeightsTol);
    CHECK(e_bf16 < kBf16MasterTol);
    int finite = 1;
    for (size_t i = 0; i < n; ++i) finite = finite && isfinite(g_out_blk[i]);
    CHECK(finite);

    if (with_int8) { /* copies built from the kept blocks serve an int8 cache */
      uint64_t int8_bytes = 0;
      CHECK_STATUS(moex_model_expert_bytes(blk, MOEX_PRECISION_INT8, &int8_bytes), MOEX_OK);
      CHECK(int8_bytes > 0);
      CHECK_STATUS(run_model(blk, &ib, MOEX_PRECISION_INT8, int8_bytes, g_x, g_out_other, g_step_other, NULL), MOEX_OK);
      const double e8 = rel_err(g_out_other, g_out_f32, n);
      printf("  %s int8 cache of the kept blocks vs f32 master: %.3g\n", name, e8);
      CHECK(e8 < kInt8CacheTol);
    }
  }
done:
  moex_model_destroy(blk);
  moex_model_destroy(f32);
  moex_model_destroy(bf16);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: capi_block_formats_test <fixture folder>\n");
    return 2;
  }
  const char* dir = argv[1];
  char q4_0[4200], f16[4200];
  snprintf(q4_0, sizeof q4_0, "%s/q4_0.gguf", dir);
  snprintf(f16, sizeof f16, "%s/f16.gguf", dir);

  /* ---- the 0.2 layout and its init functions ---- */
  {
    moex_model_params mp;
    memset(&mp, 0xAB, sizeof mp);
    moex_model_params_init(&mp); /* the macro: the whole struct */
    CHECK(mp.struct_size == sizeof mp && sizeof mp == 32);
    CHECK(mp.flags == 0 && mp.master_precision == 0 && mp.keep_block_formats == 0 && mp.reserved1 == 0);
    unsigned char buf[sizeof(moex_model_params) + 16];
    memset(buf, 0xAB, sizeof buf);
    (moex_model_params_init)((moex_model_params*)(void*)buf); /* the 0.1 symbol: 24 bytes only */
    CHECK(((moex_model_params*)(void*)buf)->struct_size == 24);
    CHECK(buf[23] == 0 && buf[24] == 0xAB && buf[sizeof buf - 1] == 0xAB);
    memset(buf, 0xAB, sizeof buf);
    moex_model_params_init_size((moex_model_params*)(void*)buf, 28);
    CHECK(((moex_model_params*)(void*)buf)->struct_size == 28 && buf[27] == 0 && buf[28] == 0xAB);
    moex_model_params_init_size(NULL, 28);                             /* no-op */
    moex_model_params_init_size((moex_model_params*)(void*)buf, 4);    /* no-op */
    moex_model_params_init_size((moex_model_params*)(void*)buf, 8192); /* no-op */
    CHECK(((moex_model_params*)(void*)buf)->struct_size == 28);
  }

  /* ---- kept blocks against decoded masters ---- */
  check_block_file(dir, "q4_0.gguf", 128, 3, 0, MOEX_PRECISION_Q4_0);
  check_block_file(dir, "q8_0.gguf", 128, 3, 1, MOEX_PRECISION_Q8_0);
  check_block_file(dir, "q4_k.gguf", 256, 3, 0, MOEX_PRECISION_Q4_K);
  check_block_file(dir, "fp8", 256, 2, 0, MOEX_PRECISION_FP8_E4M3); /* DeepSeek-V3 safetensors, layer 0 dense */

  /* ---- block formats are never conversion targets ---- */
  {
    char q4[4200];
    snprintf(q4, sizeof q4, "%s/q4_0.gguf", dir);
    moex_model* m = NULL;
    CHECK_STATUS(open_with(q4, 0, MOEX_PRECISION_Q4_0, 0, &m), MOEX_ERR_UNSUPPORTED);
    CHECK(m == NULL);
    CHECK_STATUS(open_with(q4, 1, 0, 1u << MOEX_PRECISION_Q8_0, &m), MOEX_ERR_UNSUPPORTED);
    CHECK(m == NULL);
  }

  /* ---- old callers: a 0.1 (24-byte) struct opens decoded, as 0.1 did ---- */
  {
    moex_model *def = NULL, *old = NULL, *oldest = NULL, *partial = NULL;
    CHECK_STATUS(moex_model_open(q4_0, NULL, NULL, NULL, &def), MOEX_OK);
    unsigned char buf[sizeof(moex_model_params) + 16];
    memset(buf, 0xAB, sizeof buf);
    (moex_model_params_init)((moex_model_params*)(void*)buf);
    /* The bytes past struct_size are not the caller's: never read (0xAB there would be an invalid
     * keep_block_formats and reserved1). */
    CHECK_STATUS(moex_model_open(q4_0, (const moex_model_params*)(const void*)buf, NULL, NULL, &old), MOEX_OK);
    moex_model_params mp;
    moex_model_params_init(&mp);
    mp.keep_block_formats = 1;
    mp.struct_size = 8; /* the oldest possible struct: all defaults, the field beyond it unread */
    CHECK_STATUS(moex_model_open(q4_0, &mp, NULL, NULL, &oldest), MOEX_OK);
    mp.struct_size = 28; /* through keep_block_formats: honoured */
    CHECK_STATUS(moex_model_open(q4_0, &mp, NULL, NULL, &partial), MOEX_OK);
    if (def && old && oldest && partial) {
      const moex_model_info id = info_of(def), io = info_of(old), i8 = info_of(oldest), ip = info_of(partial);
      CHECK(id.master_precision == MOEX_PRECISION_BF16 && io.master_precision == MOEX_PRECISION_BF16 &&
            i8.master_precision == MOEX_PRECISION_BF16);
      CHECK(ip.master_precision == MOEX_PRECISION_Q4_0 && ip.expert_bytes < id.expert_bytes);
      const size_t n = (size_t)id.n_layers * kTokens * id.hidden, ns = (size_t)kTokens * id.hidden;
      if (id.hidden <= kMaxHidden && id.n_layers <= kMaxLayers) {
        test_hidden(g_x, kTokens, id.hidden);
        CHECK_STATUS(run_model(def, &id, 0, id.expert_bytes, g_x, g_out_bf16, g_step_bf16, NULL), MOEX_OK);
        CHECK_STATUS(run_model(old, &io, 0, io.expert_bytes, g_x, g_out_other, g_step_other, NULL), MOEX_OK);
        /* The same bf16 master and executor: the same bits. */
        CHECK(memcmp(g_out_bf16, g_out_other, n * sizeof(float)) == 0);
        CHECK(memcmp(g_step_bf16, g_step_other, ns * sizeof(float)) == 0);
        CHECK_STATUS(run_model(partial, &ip, 0, ip.expert_bytes, g_x, g_out_blk, g_step_blk, NULL), MOEX_OK);
        CHECK(rel_err(g_out_blk, g_out_bf16, n) < kBf16MasterTol);
      }
    }
    moex_model_destroy(def);
    moex_model_destroy(old);
    moex_model_destroy(oldest);
    moex_model_destroy(partial);
  }

  /* ---- a dense checkpoint opens as without the option (in place, its own precision) ---- */
  {
    moex_model *dense = NULL, *dense_keep = NULL;
    CHECK_STATUS(open_with(f16, 0, 0, 0, &dense), MOEX_OK);
    CHECK_STATUS(open_with(f16, 1, 0, 0, &dense_keep), MOEX_OK);
    if (dense && dense_keep) {
      const moex_model_info a = info_of(dense), b = info_of(dense_keep);
      CHECK(a.master_precision == MOEX_PRECISION_F16 && b.master_precision == MOEX_PRECISION_F16);
      CHECK(a.expert_bytes == b.expert_bytes);
      if (a.hidden <= kMaxHidden && a.n_layers <= kMaxLayers) {
        const size_t n = (size_t)a.n_layers * kTokens * a.hidden;
        test_hidden(g_x, kTokens, a.hidden);
        CHECK_STATUS(run_model(dense, &a, 0, a.expert_bytes, g_x, g_out_f32, g_step_f32, NULL), MOEX_OK);
        CHECK_STATUS(run_model(dense_keep, &b, 0, b.expert_bytes, g_x, g_out_other, g_step_other, NULL), MOEX_OK);
        CHECK(memcmp(g_out_f32, g_out_other, n * sizeof(float)) == 0);
      }
    }
    moex_model_destroy(dense);
    moex_model_destroy(dense_keep);
  }

  /* ---- MXFP4 has no moex block layout: decoded to the bf16 master, and a log message says so ---- */
  {
    char mxfp4[4200];
    snprintf(mxfp4, sizeof mxfp4, "%s/mxfp4", dir);
    int notes = 0;
    CHECK_STATUS(moex_set_log_callback(on_log, MOEX_LOG_INFO, &notes), MOEX_OK);
    moex_model* m = NULL;
    CHECK_STATUS(open_with(mxfp4, 1, 0, 0, &m), MOEX_OK);
    CHECK_STATUS(moex_set_log_callback(NULL, 0, NULL), MOEX_OK);
    CHECK(notes == 1);
    if (m != NULL) CHECK(info_of(m).master_precision == MOEX_PRECISION_BF16);
    moex_model_destroy(m);
  }

  /* ---- bad values: errors with a message, *out NULL ---- */
  {
    moex_model* m = (moex_model*)(void*)&argc; /* garbage: must be set to NULL */
    moex_model_params mp;
    moex_model_params_init(&mp);
    mp.keep_block_formats = 2;
    CHECK_STATUS(moex_model_open(q4_0, &mp, NULL, NULL, &m), MOEX_ERR_INVALID_ARGUMENT);
    CHECK(m == NULL);
    moex_model_params_init(&mp);
    mp.reserved1 = 1;
    CHECK_STATUS(moex_model_open(q4_0, &mp, NULL, NULL, &m), MOEX_ERR_INVALID_ARGUMENT);
    /* A newer moex.h's struct: a zero unknown tail is accepted, a set one refused. */
    struct {
      moex_model_params known;
      uint64_t future_field;
    } newer;
    memset(&newer, 0xAB, sizeof newer);
    moex_model_params_init_size(&newer.known, sizeof newer);
    CHECK(newer.known.struct_size == sizeof newer && newer.future_field == 0);
    newer.known.keep_block_formats = 1;
    CHECK_STATUS(moex_model_open(q4_0, &newer.known, NULL, NULL, &m), MOEX_OK);
    moex_model_destroy(m);
    newer.future_field = 7;
    CHECK_STATUS(moex_model_open(q4_0, &newer.known, NULL, NULL, &m), MOEX_ERR_STRUCT_SIZE);
    CHECK(m == NULL);
  }
  return test_summary("capi_block_formats_test");
}
