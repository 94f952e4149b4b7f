// The C ABI boundary: every exported function runs its body through guarded(), validates handles
// against a registry of live objects, reads size-versioned structs with read_sized(), and maps
// moex::Status to the pinned moex_status codes (moex::StatusCode uses the same numbers).
#define MOEX_EXPERIMENTAL 1
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "moex/experimental.h"
#include "moex/formats/demo_model.hpp"
#include "moex/gate/sensitivity_gate.hpp"
#include "moex/moex.hpp"
#include "moex/policies/belady_oracle_eviction.hpp"
#include "moex/policies/cost_model_miss.hpp"
#include "moex/policies/hobbit_score_eviction.hpp"
#include "moex/policies/lfu_eviction.hpp"
#include "moex/policies/lrfu_eviction.hpp"
#include "moex/policies/lru_eviction.hpp"
#include "moex/policies/static_hot_set_eviction.hpp"
#include "moex/quant/half.hpp"
#include "moex/route/pre_gate_router.hpp"

#include "moex.h"

// ---- the objects behind the handles (global namespace: they complete the C declarations) --------

namespace moex_capi {

/// What a model handle owns; shared with the executors created from it.
struct ModelData {
  moex::OpenedModel opened;
};

/// The one interface behind every pre-instantiated executor (type erasure happens once, here).
struct AnyExecutor {
  virtual ~AnyExecutor() = default;
  virtual moex::Status forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out) = 0;
  virtual moex::Status forward_routed(std::uint32_t layer, std::span<const moex::TokenRouting> routing,
                                      const float* hidden, std::size_t n, float* out) = 0;
  /// The adaptive gate, or nullptr for the exact bundle.
  virtual moex::SensitivityGate* sensitivity_gate() noexcept = 0;
  virtual const moex::ExecutorStats& stats() const noexcept = 0;
  virtual void reset_stats() noexcept = 0;
  virtual void record_trace(bool on) = 0;
  virtual void begin_sequence() = 0;
  virtual const moex::RoutingTrace& trace() const noexcept = 0;
};

}  // namespace moex_capi

struct moex_model {
  std::shared_ptr<moex_capi::ModelData> data;
};

struct moex_executor {
  std::shared_ptr<moex_capi::ModelData> model;  // keeps the store alive
  std::unique_ptr<moex_capi::AnyExecutor> impl;
  std::vector<float> a, b;                  // scratch for bf16 and whole steps
  std::vector<moex::TokenRouting> routing;  // scratch for forward_routed
  bool adaptive_gate = false;               // created with MOEX_GATING_ADAPTIVE
};

struct moex_trace {
  moex::RoutingTrace trace;
};

namespace moex_capi {
namespace {

// ---- errors --------------------------------------------------------------------------------------

thread_local std::string g_last_error;

// ---- logging -------------------------------------------------------------------------------------

struct LogSink {
  std::mutex mutex;
  moex_log_fn fn = nullptr;
  void* user_data = nullptr;
  std::int32_t max_level = MOEX_LOG_INFO;
};

LogSink& log_sink() {
  static LogSink sink;
  return sink;
}

void log(std::int32_t level, const std::string& message) noexcept {
  moex_log_fn fn = nullptr;
  void* ud = nullptr;
  {
    LogSink& s = log_sink();
    std::lock_guard lock(s.mutex);
    if (s.fn == nullptr || level > s.max_level) return;
    fn = s.fn;
    ud = s.user_data;
  }
  fn(level, message.c_str(), ud);  // outside the lock: the callback may call back into moex
}

moex_status fail(moex_status code, std::string message) noexcept {
  try {
    g_last_error = std::move(message);
    log(MOEX_LOG_DEBUG, std::string(moex_status_string(code)) + ": " + g_last_error);
  } catch (...) {
  }
  return code;
}

moex_status fail(const moex::Status& s) noexcept { return fail(static_cast<moex_status>(s.code()), s.message()); }

/// Every exported function body runs through here: no exception crosses the C ABI.
template <class Body>
moex_status guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(MOEX_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return fail(MOEX_ERR_INTERNAL, e.what());
  } catch (...) {
    return fail(MOEX_ERR_INTERNAL, "unknown C++ exception");
  }
}

// ---- live-handle registry --------------------------------------------------------------------------

enum class Kind : std::uint8_t { kModel, kExecutor, kTrace };

struct Registry {
  std::shared_mutex mutex;
  std::unordered_map<const void*, Kind> live;
};

Registry& registry() {
  static Registry r;
  return r;
}

void register_handle(const void* p, Kind k) {
  Registry& r = registry();
  std::unique_lock lock(r.mutex);
  r.live.emplace(p, k);
}

/// Removes `p`; false when it was not a live handle of kind `k`.
bool unregister_handle(const void* p, Kind k) noexcept {
  Registry& r = registry();
  std::unique_lock lock(r.mutex);
  auto it = r.live.find(p);
  if (it == r.live.end() || it->second != k) return false;
  r.live.erase(it);
  return true;
}

bool is_live(const void* p, Kind k) noexcept {
  Registry& r = registry();
  std::shared_lock lock(r.mutex);
  auto it = r.live.find(p);
  return it != r.live.end() && it->second == k;
}

constexpr const char* kind_name(Kind k) noexcept {
  switch (k) {
    case Kind::kModel:
      return "model";
    case Kind::kExecutor:
      return "executor";
    case Kind::kTrace:
      return "trace";
  }
  return "handle";
}

/// MOEX_OK, or INVALID_ARGUMENT naming a NULL, foreign or destroyed handle.
moex_status check_handle(const void* p, Kind k) noexcept {
  if (p == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(kind_name(k)) + " is NULL");
  if (!is_live(p, k))
    return fail(MOEX_ERR_INVALID_ARGUMENT,
                std::string(kind_name(k)) + " handle is not a live moex_" + kind_name(k) + " (destroyed?)");
  return MOEX_OK;
}

// ---- size-versioned structs ------------------------------------------------------------------------

/// Largest struct_size accepted: a guard against garbage (no struct will grow this far).
constexpr std::uint64_t kMaxStructSize = 4096;

/// Reads a caller's params struct over `out` (already holding the defaults). Older, smaller
/// structs keep the defaults for their missing tail; newer ones are accepted if the unknown tail
/// is zero. NULL keeps all defaults.
template <class T>
moex_status read_sized(const T* user, T& out, const char* what) noexcept {
  if (user == nullptr) return MOEX_OK;
  const std::uint64_t size = user->struct_size;
  if (size < sizeof(std::uint64_t) || size > kMaxStructSize)
    return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(size) +
                                               " (initialize the struct with its _init function)");
  const auto* bytes = reinterpret_cast<const unsigned char*>(user);
  for (std::uint64_t i = sizeof(T); i < size; ++i)
    if (bytes[i] != 0)
      return fail(MOEX_ERR_STRUCT_SIZE, std::string(what) + " comes from a newer moex.h (" + std::to_string(size) +
                                            " bytes, this library knows " + std::to_string(sizeof(T)) +
                                            ") and sets fields this library lacks");
  const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size, sizeof(T)));
  std::memcpy(reinterpret_cast<unsigned char*>(&out) + sizeof(std::uint64_t), bytes + sizeof(std::uint64_t),
              n - sizeof(std::uint64_t));
  out.struct_size = sizeof(T);
  return MOEX_OK;
}

/// Writes min(caller, library) bytes of `full` into the caller's output struct and sets its
/// struct_size to the number of bytes written.
template <class T>
moex_status write_sized(T* user, const T& full, const char* what) noexcept {
  if (user == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
  const std::uint64_t size = user->struct_size;
  if (size < sizeof(std::uint64_t) || size > kMaxStructSize)
    return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(size) +
                                               " (initialize the struct with its _init function)");
  const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size, sizeof(T)));
  std::memcpy(reinterpret_cast<unsigned char*>(user) + sizeof(std::uint64_t),
              reinterpret_cast<const unsigned char*>(&full) + sizeof(std::uint64_t), n - sizeof(std::uint64_t));
  user->struct_size = n;
  return MOEX_OK;
}

/// snprintf-style copy of `s` into buf[size].
moex_status copy_string(const std::string& s, char* buf, std::size_t size, std::size_t* needed) noexcept {
  if (buf == nullptr && size != 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "buf is NULL but size is not 0");
  if (needed != nullptr) *needed = s.size();
  if (size != 0) {
    const std::size_t n = std::min(s.size(), size - 1);
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  return MOEX_OK;
}

// ---- enums -----------------------------------------------------------------------------------------

/// MOEX_PRECISION_* -> moex::Precision (index = C value; DEFAULT has none).
constexpr std::array<std::optional<moex::Precision>, 11> kPrecisions = {
    std::nullopt,           moex::Precision::kF32,  moex::Precision::kF16,     moex::Precision::kBF16,
    moex::Precision::kInt8, moex::Precision::kInt4, moex::Precision::kInt2,    moex::Precision::kQ8_0,
    moex::Precision::kQ4_0, moex::Precision::kQ4_K, moex::Precision::kFp8E4M3,
};
/// The C precisions below this one can be converted to; the rest are checkpoint block formats.
constexpr std::size_t kConvertiblePrecisions = 7;

std::int32_t to_c_precision(moex::Precision p) noexcept {
  for (std::size_t i = 1; i < kPrecisions.size(); ++i)
    if (kPrecisions[i] == p) return static_cast<std::int32_t>(i);
  return MOEX_PRECISION_DEFAULT;  // a block format with no C name (Q5_K, Q6_K, MXFP4)
}

/// The weight format of a C precision (quantized ones: group 64, as moex-demo builds them).
moex::WeightFormat format_of(moex::Precision p) noexcept {
  switch (p) {
    case moex::Precision::kInt8:
      return moex::quant_format(p, 64);
    case moex::Precision::kInt4:
      return moex::quant_format(p, 64);
    case moex::Precision::kInt2:
      return moex::quant_format(p, 64, moex::QuantScheme::kAsymmetric);
    default:
      return moex::float_format(p);
  }
}

/// Reads an enum field: negative -> INVALID_ARGUMENT; beyond what this build knows -> UNSUPPORTED
/// (a newer header may name policies this library lacks).
moex_status check_enum(std::int32_t v, std::size_t known, const char* what) noexcept {
  if (v < 0) return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(what) + " is negative (" + std::to_string(v) + ")");
  if (static_cast<std::size_t>(v) >= known)
    return fail(MOEX_ERR_UNSUPPORTED, std::string(what) + " " + std::to_string(v) + " is not built into this library");
  return MOEX_OK;
}

/// check_enum for a precision that weights would be converted to: a block format is UNSUPPORTED.
moex_status check_convertible(std::int32_t v, const char* what) noexcept {
  if (moex_status s = check_enum(v, kPrecisions.size(), what); s != MOEX_OK) return s;
  if (static_cast<std::size_t>(v) >= kConvertiblePrecisions)
    return fail(MOEX_ERR_UNSUPPORTED, std::string(what) +
                                          " names a checkpoint block format (Q8_0, Q4_0, Q4_K, fp8 e4m3): those are "
                                          "kept from checkpoints (keep_block_formats), never converted to");
  return MOEX_OK;
}

// ---- executor factory table --------------------------------------------------------------------------

/// The objects an executor is built from, prepared and validated by moex_executor_create.
struct Setup {
  const moex::ExpertStore* store = nullptr;
  moex::ExecutorConfig config;
  moex::CpuBackendConfig backend;
  moex_executor_params params{};
  std::vector<double> hot_profile;         // MOEX_EVICTION_STATIC_HOT_SET
  std::vector<moex::FutureAccess> future;  // MOEX_EVICTION_BELADY
  moex::SensitivityGate gate;              // adaptive bundle
  moex::PreGateRouter predictor;           // adaptive bundle
  moex::CostModelMiss miss;                // adaptive bundle
};

/// One pre-instantiated executor.
template <class P>
struct ExecutorModel final : AnyExecutor {
  explicit ExecutorModel(moex::MoeLayerExecutor<P> e) : impl(std::move(e)) {}
  moex::Status forward(std::uint32_t layer, const float* hidden, std::size_t n, float* out) override {
    return impl.forward(layer, hidden, n, out);
  }
  moex::Status forward_routed(std::uint32_t layer, std::span<const moex::TokenRouting> routing, const float* hidden,
                              std::size_t n, float* out) override {
    return impl.forward_routed(layer, routing, hidden, n, out);
  }
  moex::SensitivityGate* sensitivity_gate() noexcept override {
    if constexpr (std::is_same_v<typename P::Gate, moex::SensitivityGate>)
      return &impl.gate();
    else
      return nullptr;
  }
  const moex::ExecutorStats& stats() const noexcept override { return impl.stats(); }
  void reset_stats() noexcept override { impl.reset_stats(); }
  void record_trace(bool on) override { impl.record_trace(on); }
  void begin_sequence() override { impl.begin_sequence(); }
  const moex::RoutingTrace& trace() const noexcept override { return impl.recorded_trace(); }
  moex::MoeLayerExecutor<P> impl;
};

/// The exact bundle: fixed top-k, no prediction, load on miss (DefaultPolicies) with eviction E.
template <class E>
struct ExactPolicies : moex::DefaultPolicies {
  using Eviction = E;
};

/// The adaptive bundle: every gating x prediction x miss choice of the C API is a runtime setting
/// of these types (SensitivityGate with T = 0 is fixed top-k; a default PreGateRouter predicts
/// nothing; CostModelMiss without source compute or mixed precision loads, with mixed precision
/// and no source compute it is HobbitPrecisionMiss), so one instantiation per eviction serves them all.
template <class E>
struct AdaptivePolicies : moex::DefaultPolicies {
  using Eviction = E;
  using Gate = moex::SensitivityGate;
  using Predictor = moex::PreGateRouter;
  using Miss = moex::CostModelMiss;
};

/// An eviction policy configured from the setup.
template <class E>
moex::Result<E> make_eviction(const Setup&) {
  return E{};
}
template <>
moex::Result<moex::LrfuEviction> make_eviction<moex::LrfuEviction>(const Setup& s) {
  moex::LrfuConfig c;
  if (s.params.lrfu_lambda != 0.0) c.lambda = s.params.lrfu_lambda;
  return moex::LrfuEviction(c);
}
template <>
moex::Result<moex::StaticHotSetEviction> make_eviction<moex::StaticHotSetEviction>(const Setup& s) {
  return moex::StaticHotSetEviction(s.hot_profile, s.store->spec().n_experts);
}
template <>
moex::Result<moex::BeladyOracleEviction> make_eviction<moex::BeladyOracleEviction>(const Setup& s) {
  moex::BeladyOracleEviction b;
  MOEX_RETURN_IF_ERROR(b.set_future(s.future, s.store->spec().n_layers, s.store->spec().n_experts));
  return b;
}

using Made = moex::Result<std::unique_ptr<AnyExecutor>>;
using Factory = Made (*)(Setup&);

template <class P>
Made make(Setup& s) {
  auto ev = make_eviction<typename P::Eviction>(s);
  if (!ev) return ev.status();
  moex::Result<moex::MoeLayerExecutor<P>> ex = [&] {
    if constexpr (std::is_same_v<typename P::Gate, moex::SensitivityGate>)
      return moex::MoeLayerExecutor<P>::create(*s.store, s.config, s.backend, std::move(*ev), std::move(s.gate),
                                               std::move(s.predictor), s.miss);
    else
      return moex::MoeLayerExecutor<P>::create(*s.store, s.config, s.backend, std::move(*ev));
  }();
  if (!ex) return ex.status();
  return std::unique_ptr<AnyExecutor>(std::make_unique<ExecutorModel<P>>(std::move(*ex)));
}

constexpr std::size_t kEvictionCount = 7;  // MOEX_EVICTION_DEFAULT .. MOEX_EVICTION_BELADY

/// Policy bundles (rows of the table).
enum Bundle : std::size_t { kExactBundle = 0, kAdaptiveBundle = 1, kBundleCount = 2 };

/// The instantiated combinations, [bundle][MOEX_EVICTION_*]; nullptr = not built (UNSUPPORTED).
/// 12 instantiations: a new eviction policy is one column here, a new bundle one row.
constexpr std::array<std::array<Factory, kEvictionCount>, kBundleCount> kFactories = {{
    {&make<ExactPolicies<moex::LruEviction>>, &make<ExactPolicies<moex::LruEviction>>,
     &make<ExactPolicies<moex::LfuEviction>>, &make<ExactPolicies<moex::LrfuEviction>>,
     &make<ExactPolicies<moex::HobbitScoreEviction>>, &make<ExactPolicies<moex::StaticHotSetEviction>>,
     &make<ExactPolicies<moex::BeladyOracleEviction>>},
    {&make<AdaptivePolicies<moex::LruEviction>>, &make<AdaptivePolicies<moex::LruEviction>>,
     &make<AdaptivePolicies<moex::LfuEviction>>, &make<AdaptivePolicies<moex::LrfuEviction>>,
     &make<AdaptivePolicies<moex::HobbitScoreEviction>>, &make<AdaptivePolicies<moex::StaticHotSetEviction>>,
     nullptr /* Belady's future is the demand-access sequence: a gate, prefetches or skips change it */},
}};

constexpr std::size_t kGatingCount = 3;      // MOEX_GATING_DEFAULT .. MOEX_GATING_ADAPTIVE
constexpr std::size_t kPredictionCount = 5;  // MOEX_PREDICTION_DEFAULT .. MOEX_PREDICTION_PREGATE_ROUTING
constexpr std::size_t kMissCount = 4;        // MOEX_MISS_DEFAULT .. MOEX_MISS_COST_MODEL

/// Backends built in (index = MOEX_BACKEND_*).
constexpr std::array<bool, 3> kBackends = {true, true, false};

// ---- demo model -------------------------------------------------------------------------------------

moex::Status write_demo(const std::filesystem::path& dir, const moex_demo_params& p, moex::DType dtype) {
  moex::DemoModelSpec spec;
  spec.n_layers = p.n_layers;
  spec.n_experts = p.n_experts;
  spec.top_k = p.top_k;
  spec.hidden = p.hidden;
  spec.ffn = p.ffn;
  spec.seed = p.seed;
  spec.dtype = dtype;
  spec.generator = "moex_model_write_demo";
  return moex::write_demo_model(dir, spec);
}

// ---- executor helpers ---------------------------------------------------------------------------------

/// n * hidden elements, or nullopt when that overflows a buffer of `elem` bytes each.
std::optional<std::size_t> elements(std::size_t n, std::uint32_t hidden, std::size_t elem) noexcept {
  if (hidden == 0 || n > std::numeric_limits<std::size_t>::max() / hidden / elem) return std::nullopt;
  return n * hidden;
}

bool overlap(const void* a, const void* b, std::size_t bytes) noexcept {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return x < y + bytes && y < x + bytes;
}

/// Validates the common arguments of forward/step; sets `count` to n * hidden.
moex_status check_run(const moex_executor* ex, const void* hidden, std::size_t n, const void* out, std::size_t elem,
                      std::size_t& count) noexcept {
  if (moex_status s = check_handle(ex, Kind::kExecutor); s != MOEX_OK) return s;
  if (hidden == nullptr || out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "hidden or out is NULL");
  if (n == 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "n_tokens is 0");
  const auto c = elements(n, ex->model->opened.store.spec().shape.hidden, elem);
  if (!c) return fail(MOEX_ERR_INVALID_ARGUMENT, "n_tokens x hidden overflows");
  count = *c;
  return MOEX_OK;
}

/// h <- h + moe_l(h) for every layer, in f32, in place over ex->a (n tokens); uses ex->b.
moex_status run_step(moex_executor* ex, std::size_t n, std::size_t count) {
  ex->b.resize(count);
  const std::uint32_t layers = ex->model->opened.store.spec().n_layers;
  for (std::uint32_t l = 0; l < layers; ++l) {
    if (moex::Status s = ex->impl->forward(l, ex->a.data(), n, ex->b.data()); !s.is_ok()) return fail(s);
    for (std::size_t i = 0; i < count; ++i) ex->a[i] += ex->b[i];
  }
  return MOEX_OK;
}

std::string stats_json(const moex::ExecutorStats& st) { return st.to_json(); }

}  // namespace
}  // namespace moex_capi

using namespace moex_capi;  // NOLINT: the exported functions below are the only code here

// ==== versions, status, logging =========================================================================

extern "C" MOEX_API std::uint32_t moex_version_number(void) { return MOEX_VERSION_NUMBER; }

extern "C" MOEX_API const char* moex_version_string(void) {
#define MOEX_STR2(x) #x
#define MOEX_STR(x) MOEX_STR2(x)
  return MOEX_STR(MOEX_VERSION_MAJOR) "." MOEX_STR(MOEX_VERSION_MINOR) "." MOEX_STR(MOEX_VERSION_PATCH);
#undef MOEX_STR
#undef MOEX_STR2
}

extern "C" MOEX_API const char* moex_status_string(moex_status status) {
  switch (status) {
    case MOEX_OK:
      return "ok";
    case MOEX_ERR_INVALID_ARGUMENT:
      return "invalid argument";
    case MOEX_ERR_UNSUPPORTED:
      return "unsupported";
    case MOEX_ERR_STRUCT_SIZE:
      return "struct size";
    case MOEX_ERR_OUT_OF_MEMORY:
      return "out of memory";
    case MOEX_ERR_IO:
      return "I/O error";
    case MOEX_ERR_CORRUPT:
      return "corrupt input";
    case MOEX_ERR_NOT_FOUND:
      return "not found";
    case MOEX_ERR_INTERNAL:
      return "internal error";
    default:
      return "unknown status";
  }
}

extern "C" MOEX_API const char* moex_last_error_message(void) { return g_last_error.c_str(); }

extern "C" MOEX_API moex_status moex_set_log_callback(moex_log_fn fn, std::int32_t max_level, void* user_data) {
  return guarded([&]() -> moex_status {
    if (max_level < 0 || max_level > MOEX_LOG_DEBUG)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "max_level must be 0..4 (MOEX_LOG_*)");
    LogSink& s = log_sink();
    std::lock_guard lock(s.mutex);
    s.fn = fn;
    s.user_data = user_data;
    s.max_level = max_level == 0 ? MOEX_LOG_INFO : max_level;
    return MOEX_OK;
  });
}

// ==== demo model ===========================================================================================

extern "C" MOEX_API void moex_demo_params_init(moex_demo_params* params) {
  if (params == nullptr) return;
  *params = moex_demo_params{};
  params->struct_size = sizeof(moex_demo_params);
  params->n_layers = 2;
  params->n_experts = 4;
  params->top_k = 2;
  params->hidden = 64;
  params->ffn = 128;
  params->precision = MOEX_PRECISION_BF16;
  params->seed = 1;
}

extern "C" MOEX_API moex_status moex_model_write_demo(const char* dir, const moex_demo_params* params) {
  return guarded([&]() -> moex_status {
    if (dir == nullptr || *dir == '\0') return fail(MOEX_ERR_INVALID_ARGUMENT, "dir is NULL or empty");
    moex_demo_params defaults;
    moex_demo_params_init(&defaults);
    moex_demo_params p{};
    p.struct_size = sizeof p;  // zero fields take the defaults below
    if (params == nullptr)
      p = defaults;
    else if (moex_status s = read_sized(params, p, "moex_demo_params"); s != MOEX_OK)
      return s;
    if (p.n_layers == 0) p.n_layers = defaults.n_layers;
    if (p.n_experts == 0) p.n_experts = defaults.n_experts;
    if (p.top_k == 0) p.top_k = std::min(defaults.top_k, p.n_experts);
    if (p.hidden == 0) p.hidden = defaults.hidden;
    if (p.ffn == 0) p.ffn = defaults.ffn;
    if (p.precision == 0) p.precision = defaults.precision;
    if (p.seed == 0) p.seed = defaults.seed;
    if (p.n_layers > 256 || p.n_experts > 256 || p.hidden > 16384 || p.ffn > 65536)
      return fail(MOEX_ERR_INVALID_ARGUMENT,
                  "demo shape out of range (layers/experts <= 256, hidden <= 16384, ffn <= 65536)");
    if (p.top_k > p.n_experts || p.top_k > moex::kMaxTopK)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "top_k must be at most n_experts and " + std::to_string(moex::kMaxTopK));
    const std::uint64_t weights = std::uint64_t{p.n_layers} * p.n_experts * 3 * p.hidden * p.ffn;
    if (weights > (std::uint64_t{1} << 28))
      return fail(MOEX_ERR_INVALID_ARGUMENT, "demo model too large (at most 2^28 expert weights)");
    if (moex_status s = check_convertible(p.precision, "precision"); s != MOEX_OK) return s;
    moex::DType dtype;
    switch (p.precision) {
      case MOEX_PRECISION_F32:
        dtype = moex::DType::kF32;
        break;
      case MOEX_PRECISION_F16:
        dtype = moex::DType::kF16;
        break;
      case MOEX_PRECISION_BF16:
        dtype = moex::DType::kBF16;
        break;
      default:
        return fail(MOEX_ERR_UNSUPPORTED, "demo weights are f32, f16 or bf16");
    }
    if (moex::Status s = write_demo(std::filesystem::u8path(dir), p, dtype); !s.is_ok()) return fail(s);
    log(MOEX_LOG_INFO, std::string("wrote demo model to ") + dir);
    return MOEX_OK;
  });
}

// ==== models ===============================================================================================

/// Size of moex_model_params in 0.1 (through reserved0): what 0.1 binaries allocate.
constexpr std::uint64_t kModelParamsV01 = offsetof(moex_model_params, reserved0) + sizeof(std::uint32_t);

extern "C" MOEX_API void moex_model_params_init_size(moex_model_params* params, std::uint64_t size) {
  if (params == nullptr || size < sizeof(std::uint64_t) || size > kMaxStructSize) return;
  std::memset(params, 0, static_cast<std::size_t>(size));  // every default is zero
  params->struct_size = size;
}

// Parenthesized: moex.h defines a function-like macro of this name for new callers.
extern "C" MOEX_API void(moex_model_params_init)(moex_model_params* params) {
  moex_model_params_init_size(params, kModelParamsV01);
}

extern "C" MOEX_API moex_status moex_model_open(const char* path, const moex_model_params* params,
                                                moex_progress_fn progress, void* user_data, moex_model** out) {
  return guarded([&]() -> moex_status {
    if (out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (path == nullptr || *path == '\0') return fail(MOEX_ERR_INVALID_ARGUMENT, "path is NULL or empty");
    moex_model_params p;
    moex_model_params_init_size(&p, sizeof p);
    if (moex_status s = read_sized(params, p, "moex_model_params"); s != MOEX_OK) return s;
    if (p.reserved0 != 0 || p.reserved1 != 0)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "moex_model_params.reserved0 and reserved1 must be 0");
    if (p.keep_block_formats > 1)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "moex_model_params.keep_block_formats must be 0 or 1");
    if ((p.flags & ~MOEX_MODEL_FLAG_COPY_TO_RAM) != 0)
      return fail(MOEX_ERR_UNSUPPORTED, "moex_model_params.flags has bits this library does not know");
    if (moex_status s = check_convertible(p.master_precision, "master_precision"); s != MOEX_OK) return s;
    if ((p.extra_precisions >> kConvertiblePrecisions) != 0 || (p.extra_precisions & 1u) != 0)
      return fail(MOEX_ERR_UNSUPPORTED,
                  "extra_precisions names precisions this library does not know or cannot "
                  "convert to (checkpoint block formats)");

    moex::StoreOptions so;
    so.in_place = (p.flags & MOEX_MODEL_FLAG_COPY_TO_RAM) == 0;
    so.keep_block_formats = p.keep_block_formats != 0;
    if (p.master_precision != MOEX_PRECISION_DEFAULT) {
      const moex::Precision mp = *kPrecisions[static_cast<std::size_t>(p.master_precision)];
      so.master_format = format_of(mp);
    }
    for (std::size_t i = 1; i < kConvertiblePrecisions; ++i)
      if ((p.extra_precisions >> i) & 1u) so.extra_formats.push_back(format_of(*kPrecisions[i]));
    if (progress != nullptr) {
      so.progress = [progress, user_data](std::uint64_t done, std::uint64_t total, std::string_view what) {
        const std::string w(what);
        progress(done, total, w.c_str(), user_data);
      };
    }
    auto opened = moex::open_expert_store(std::filesystem::u8path(path), so);
    if (!opened) return fail(opened.status());
    auto data = std::make_shared<ModelData>(ModelData{std::move(*opened)});
    auto model = std::make_unique<moex_model>(moex_model{std::move(data)});
    register_handle(model.get(), Kind::kModel);
    for (const std::string& note : model->data->opened.notes) log(MOEX_LOG_INFO, note);
    const moex::MoeModelSpec& spec = model->data->opened.store.spec();
    log(MOEX_LOG_INFO, std::string("opened ") + path + ": " + std::to_string(spec.n_layers) + " MoE layers x " +
                           std::to_string(spec.n_experts) + " experts");
    *out = model.release();
    return MOEX_OK;
  });
}

extern "C" MOEX_API void moex_model_destroy(moex_model* model) {
  if (model == nullptr || !unregister_handle(model, Kind::kModel)) return;
  delete model;
}

extern "C" MOEX_API void moex_model_info_init(moex_model_info* info) {
  if (info == nullptr) return;
  *info = moex_model_info{};
  info->struct_size = sizeof(moex_model_info);
}

extern "C" MOEX_API moex_status moex_model_get_info(const moex_model* model, moex_model_info* info) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(model, Kind::kModel); s != MOEX_OK) return s;
    const moex::OpenedModel& m = model->data->opened;
    const moex::MoeModelSpec& spec = m.store.spec();
    moex_model_info full{};
    full.struct_size = sizeof full;
    full.n_layers = spec.n_layers;
    full.n_experts = spec.n_experts;
    full.top_k = spec.router.top_k;
    full.hidden = spec.shape.hidden;
    full.ffn = spec.shape.ffn;
    full.master_precision = to_c_precision(m.store.master_format().precision);
    full.expert_bytes = m.store.expert_bytes(m.store.master_format().precision);
    full.n_checkpoint_layers = m.checkpoint ? m.checkpoint->config().n_layers : spec.n_layers;
    return write_sized(info, full, "info");
  });
}

extern "C" MOEX_API moex_status moex_model_expert_bytes(const moex_model* model, std::int32_t precision,
                                                        std::uint64_t* bytes) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(model, Kind::kModel); s != MOEX_OK) return s;
    if (bytes == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "bytes is NULL");
    *bytes = 0;
    if (moex_status s = check_enum(precision, kPrecisions.size(), "precision"); s != MOEX_OK) return s;
    const moex::ExpertStore& store = model->data->opened.store;
    const moex::Precision p =
        kPrecisions[static_cast<std::size_t>(precision)].value_or(store.master_format().precision);
    *bytes = store.expert_bytes(p);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_model_architecture(const moex_model* model, char* buf, std::size_t size,
                                                        std::size_t* needed) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(model, Kind::kModel); s != MOEX_OK) return s;
    const auto& ck = model->data->opened.checkpoint;
    return copy_string(ck ? ck->config().architecture : std::string(), buf, size, needed);
  });
}

// ==== executors =============================================================================================

/// Size of moex_executor_params in 0.1 (through reserved0): what 0.1 binaries allocate.
constexpr std::uint64_t kExecutorParamsV01 = offsetof(moex_executor_params, reserved0) + sizeof(std::uint32_t);
/// Size of moex_stats in 0.1 (through hit_rate).
constexpr std::uint64_t kStatsV01 = offsetof(moex_stats, hit_rate) + sizeof(double);

extern "C" MOEX_API void moex_executor_params_init_size(moex_executor_params* params, std::uint64_t size) {
  if (params == nullptr || size < sizeof(std::uint64_t) || size > kMaxStructSize) return;
  moex_executor_params full{};
  full.hobbit_t_high = 0.6;
  full.hobbit_t_skip = 0.9;
  auto* bytes = reinterpret_cast<unsigned char*>(params);
  const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(size, sizeof full));
  std::memcpy(bytes, &full, n);
  if (size > n) std::memset(bytes + n, 0, static_cast<std::size_t>(size - n));
  params->struct_size = size;
}

// Parenthesized: moex.h defines a function-like macro of this name for new callers.
extern "C" MOEX_API void(moex_executor_params_init)(moex_executor_params* params) {
  moex_executor_params_init_size(params, kExecutorParamsV01);
}

namespace moex_capi {
namespace {

/// Copies a borrowed (pointer, count) array after checking the count against `want`.
template <class T>
moex_status borrow_array(const T* p, std::uint64_t count, std::uint64_t want, const char* what, std::vector<T>& out) {
  if (p == nullptr && count == 0) return MOEX_OK;
  if (p == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL but its count is not 0");
  if (count != want)
    return fail(MOEX_ERR_INVALID_ARGUMENT,
                std::string(what) + " has " + std::to_string(count) + " entries, " + std::to_string(want) + " needed");
  out.assign(p, p + count);
  return MOEX_OK;
}

/// Validates the 0.2 policy fields and fills `s` (config, policy objects, eviction inputs);
/// sets `bundle` to the row of kFactories that serves the request.
moex_status prepare(const moex_executor_params& p, const moex::ExpertStore& store, Setup& s, std::size_t& bundle) {
  const moex::MoeModelSpec& spec = store.spec();
  s.store = &store;
  s.params = p;
  if (moex_status st = check_enum(p.gating, kGatingCount, "gating"); st != MOEX_OK) return st;
  if (moex_status st = check_enum(p.prediction, kPredictionCount, "prediction"); st != MOEX_OK) return st;
  if (moex_status st = check_enum(p.miss, kMissCount, "miss"); st != MOEX_OK) return st;
  if (moex_status st = check_convertible(p.low_precision, "low_precision"); st != MOEX_OK) return st;
  if (p.reserved1 != 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "moex_executor_params.reserved1 must be 0");

  // Gate.
  const bool adaptive = p.gating == MOEX_GATING_ADAPTIVE;
  if (!std::isfinite(p.gate_threshold) || p.gate_threshold < 0)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "gate_threshold must be finite and >= 0");
  if (!adaptive && (p.gate_threshold != 0.0 || p.gate_sensitivities != nullptr || p.gate_sensitivity_count != 0))
    return fail(MOEX_ERR_INVALID_ARGUMENT, "gate_threshold and gate_sensitivities need MOEX_GATING_ADAPTIVE");
  if (adaptive) {
    std::vector<float> sens;
    if (moex_status st =
            borrow_array(p.gate_sensitivities, p.gate_sensitivity_count, spec.n_layers, "gate_sensitivities", sens);
        st != MOEX_OK)
      return st;
    if (moex::Status st = s.gate.set_sensitivities(std::move(sens)); !st.is_ok()) return fail(st);
    s.gate.set_threshold(static_cast<float>(p.gate_threshold));
  }

  // Prediction.
  const bool speculative = p.prediction == MOEX_PREDICTION_SPECULATIVE;
  const bool pregate = p.prediction == MOEX_PREDICTION_PREGATE_FILE || p.prediction == MOEX_PREDICTION_PREGATE_ROUTING;
  if (!speculative && p.prefetch_depth != 0)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "prefetch_depth needs MOEX_PREDICTION_SPECULATIVE");
  if (!pregate && p.pregate_path != nullptr)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "pregate_path needs MOEX_PREDICTION_PREGATE_FILE or _ROUTING");
  if (speculative) {
    const std::uint32_t depth = p.prefetch_depth == 0 ? 1 : p.prefetch_depth;
    auto r = moex::PreGateRouter::speculative(store, depth);
    if (!r) return fail(r.status());
    s.predictor = std::move(*r);
  } else if (pregate) {
    if (p.pregate_path == nullptr || *p.pregate_path == '\0')
      return fail(MOEX_ERR_INVALID_ARGUMENT, "MOEX_PREDICTION_PREGATE_* needs pregate_path");
    auto w = moex::read_pre_gates(std::filesystem::u8path(p.pregate_path));
    if (!w) return fail(w.status());
    auto r = moex::PreGateRouter::trained(store, std::move(*w), p.prediction == MOEX_PREDICTION_PREGATE_ROUTING);
    if (!r) return fail(r.status());
    s.predictor = std::move(*r);
  }

  // Miss policy.
  if ((p.miss_flags & ~(MOEX_MISS_FLAG_NO_SOURCE_COMPUTE | MOEX_MISS_FLAG_MIXED_PRECISION)) != 0)
    return fail(MOEX_ERR_UNSUPPORTED, "miss_flags has bits this library does not know");
  if (p.miss != MOEX_MISS_COST_MODEL && p.miss_flags != 0)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "miss_flags needs MOEX_MISS_COST_MODEL");
  if (!std::isfinite(p.hobbit_t_high) || !std::isfinite(p.hobbit_t_skip) || p.hobbit_t_high < 0 ||
      p.hobbit_t_skip < p.hobbit_t_high)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "hobbit thresholds need 0 <= hobbit_t_high <= hobbit_t_skip, finite");
  s.miss.hobbit.t_high = static_cast<float>(p.hobbit_t_high);
  s.miss.hobbit.t_skip = static_cast<float>(p.hobbit_t_skip);
  s.miss.allow_source_compute =
      p.miss == MOEX_MISS_COST_MODEL && (p.miss_flags & MOEX_MISS_FLAG_NO_SOURCE_COMPUTE) == 0;
  s.miss.mixed_precision = p.miss == MOEX_MISS_HOBBIT ||
                           (p.miss == MOEX_MISS_COST_MODEL && (p.miss_flags & MOEX_MISS_FLAG_MIXED_PRECISION) != 0);

  // Budgets and precisions.
  if (!std::isfinite(p.low_precision_share) || p.low_precision_share < 0 || p.low_precision_share >= 1)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "low_precision_share must lie in [0, 1) (0 = 0.25)");
  if (p.low_precision != MOEX_PRECISION_DEFAULT) {
    s.config.low_precision = kPrecisions[static_cast<std::size_t>(p.low_precision)];
    if (p.low_precision_share != 0.0) s.config.low_precision_share = p.low_precision_share;
  } else if (p.low_precision_share != 0.0) {
    return fail(MOEX_ERR_INVALID_ARGUMENT, "low_precision_share needs low_precision");
  }
  if (moex_status st = borrow_array(p.layer_cache_bytes, p.layer_cache_count, spec.n_layers, "layer_cache_bytes",
                                    s.config.layer_cache_bytes);
      st != MOEX_OK)
    return st;
  s.config.max_prefetch_bytes_in_flight = p.max_prefetch_bytes_in_flight;

  // Eviction inputs.
  const std::uint64_t keys = std::uint64_t{spec.n_layers} * spec.n_experts;
  if (p.eviction != MOEX_EVICTION_STATIC_HOT_SET && (p.hot_profile != nullptr || p.hot_profile_count != 0))
    return fail(MOEX_ERR_INVALID_ARGUMENT, "hot_profile needs MOEX_EVICTION_STATIC_HOT_SET");
  if (p.eviction != MOEX_EVICTION_BELADY && p.future_trace != nullptr)
    return fail(MOEX_ERR_INVALID_ARGUMENT, "future_trace needs MOEX_EVICTION_BELADY");
  if (p.eviction == MOEX_EVICTION_STATIC_HOT_SET) {
    if (p.hot_profile == nullptr)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "MOEX_EVICTION_STATIC_HOT_SET needs hot_profile");
    if (moex_status st = borrow_array(p.hot_profile, p.hot_profile_count, keys, "hot_profile", s.hot_profile);
        st != MOEX_OK)
      return st;
    for (double v : s.hot_profile)
      if (!std::isfinite(v)) return fail(MOEX_ERR_INVALID_ARGUMENT, "hot_profile has a non-finite score");
  }
  if (p.eviction == MOEX_EVICTION_BELADY) {
    if (moex_status st = check_handle(p.future_trace, Kind::kTrace); st != MOEX_OK)
      return fail(st, std::string("MOEX_EVICTION_BELADY needs future_trace: ") + g_last_error);
    const moex::RoutingTrace& t = p.future_trace->trace;
    if (t.n_layers != spec.n_layers || t.n_experts != spec.n_experts)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "future_trace's shape (" + std::to_string(t.n_layers) + " layers x " +
                                                 std::to_string(t.n_experts) + " experts) is not the model's");
    s.future = moex::replay_future(t);
  }

  const bool exact_path = (p.gating == MOEX_GATING_DEFAULT || p.gating == MOEX_GATING_FIXED_TOP_K) &&
                          (p.prediction == MOEX_PREDICTION_DEFAULT || p.prediction == MOEX_PREDICTION_NONE) &&
                          (p.miss == MOEX_MISS_DEFAULT || p.miss == MOEX_MISS_LOAD) &&
                          p.low_precision == MOEX_PRECISION_DEFAULT;
  bundle = exact_path ? kExactBundle : kAdaptiveBundle;
  return MOEX_OK;
}

}  // namespace
}  // namespace moex_capi

extern "C" MOEX_API moex_status moex_executor_create(const moex_model* model, const moex_executor_params* params,
                                                     moex_executor** out) {
  return guarded([&]() -> moex_status {
    if (out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (moex_status s = check_handle(model, Kind::kModel); s != MOEX_OK) return s;
    moex_executor_params p;
    moex_executor_params_init_size(&p, sizeof p);
    if (moex_status s = read_sized(params, p, "moex_executor_params"); s != MOEX_OK) return s;
    if (p.reserved0 != 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "moex_executor_params.reserved0 must be 0");
    if ((p.flags & ~MOEX_EXECUTOR_FLAG_NO_FINITE_CHECK) != 0)
      return fail(MOEX_ERR_UNSUPPORTED, "moex_executor_params.flags has bits this library does not know");
    if (moex_status s = check_enum(p.backend, kBackends.size(), "backend"); s != MOEX_OK) return s;
    if (!kBackends[static_cast<std::size_t>(p.backend)])
      return fail(MOEX_ERR_UNSUPPORTED, "backend " + std::to_string(p.backend) +
                                            " is not built into this library (CUDA: see moex/experimental.h)");
    if (p.device != 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "device must be 0 for the CPU backend");
    if (moex_status s = check_enum(p.eviction, kEvictionCount, "eviction"); s != MOEX_OK) return s;
    if (moex_status s = check_enum(p.cache_precision, kPrecisions.size(), "cache_precision"); s != MOEX_OK) return s;
    if (!std::isfinite(p.lrfu_lambda) || p.lrfu_lambda < 0)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "lrfu_lambda must be finite and >= 0");

    auto setup = std::make_unique<Setup>();
    std::size_t bundle = kExactBundle;
    if (moex_status s = prepare(p, model->data->opened.store, *setup, bundle); s != MOEX_OK) return s;
    const Factory factory = kFactories[bundle][static_cast<std::size_t>(p.eviction)];
    if (factory == nullptr)
      return fail(MOEX_ERR_UNSUPPORTED, "eviction policy " + std::to_string(p.eviction) +
                                            " is built only for the exact path (gating FIXED, prediction NONE, "
                                            "miss LOAD, no low_precision)");
    setup->config.cache_bytes = p.cache_bytes;
    setup->config.cache_precision = kPrecisions[static_cast<std::size_t>(p.cache_precision)];
    setup->config.check_finite = (p.flags & MOEX_EXECUTOR_FLAG_NO_FINITE_CHECK) == 0;
    setup->backend.threads = p.threads;
    auto ex = std::make_unique<moex_executor>();
    ex->model = model->data;
    auto impl = factory(*setup);
    if (!impl) return fail(impl.status());
    ex->impl = std::move(*impl);
    ex->adaptive_gate = p.gating == MOEX_GATING_ADAPTIVE;
    register_handle(ex.get(), Kind::kExecutor);
    *out = ex.release();
    return MOEX_OK;
  });
}

extern "C" MOEX_API void moex_executor_destroy(moex_executor* executor) {
  if (executor == nullptr || !unregister_handle(executor, Kind::kExecutor)) return;
  delete executor;
}

extern "C" MOEX_API moex_status moex_executor_forward_f32(moex_executor* executor, std::uint32_t layer,
                                                          const float* hidden, std::size_t n_tokens, float* out) {
  return guarded([&]() -> moex_status {
    std::size_t count = 0;
    if (moex_status s = check_run(executor, hidden, n_tokens, out, sizeof(float), count); s != MOEX_OK) return s;
    if (overlap(hidden, out, count * sizeof(float))) return fail(MOEX_ERR_INVALID_ARGUMENT, "hidden and out overlap");
    if (moex::Status s = executor->impl->forward(layer, hidden, n_tokens, out); !s.is_ok()) return fail(s);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_forward_bf16(moex_executor* executor, std::uint32_t layer,
                                                           const std::uint16_t* hidden, std::size_t n_tokens,
                                                           std::uint16_t* out) {
  return guarded([&]() -> moex_status {
    std::size_t count = 0;
    if (moex_status s = check_run(executor, hidden, n_tokens, out, sizeof(float), count); s != MOEX_OK) return s;
    executor->a.resize(count);
    executor->b.resize(count);
    for (std::size_t i = 0; i < count; ++i) executor->a[i] = moex::bf16_to_float(hidden[i]);
    if (moex::Status s = executor->impl->forward(layer, executor->a.data(), n_tokens, executor->b.data()); !s.is_ok())
      return fail(s);
    for (std::size_t i = 0; i < count; ++i) out[i] = moex::float_to_bf16(executor->b[i]);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_step_f32(moex_executor* executor, const float* hidden,
                                                       std::size_t n_tokens, float* out) {
  return guarded([&]() -> moex_status {
    std::size_t count = 0;
    if (moex_status s = check_run(executor, hidden, n_tokens, out, sizeof(float), count); s != MOEX_OK) return s;
    if (hidden != out && overlap(hidden, out, count * sizeof(float)))
      return fail(MOEX_ERR_INVALID_ARGUMENT, "hidden and out partially overlap");
    executor->a.assign(hidden, hidden + count);
    if (moex_status s = run_step(executor, n_tokens, count); s != MOEX_OK) return s;
    std::memcpy(out, executor->a.data(), count * sizeof(float));
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_step_bf16(moex_executor* executor, const std::uint16_t* hidden,
                                                        std::size_t n_tokens, std::uint16_t* out) {
  return guarded([&]() -> moex_status {
    std::size_t count = 0;
    if (moex_status s = check_run(executor, hidden, n_tokens, out, sizeof(float), count); s != MOEX_OK) return s;
    if (hidden != out && overlap(hidden, out, count * sizeof(std::uint16_t)))
      return fail(MOEX_ERR_INVALID_ARGUMENT, "hidden and out partially overlap");
    executor->a.resize(count);
    for (std::size_t i = 0; i < count; ++i) executor->a[i] = moex::bf16_to_float(hidden[i]);
    if (moex_status s = run_step(executor, n_tokens, count); s != MOEX_OK) return s;
    for (std::size_t i = 0; i < count; ++i) out[i] = moex::float_to_bf16(executor->a[i]);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_forward_routed_f32(moex_executor* executor, std::uint32_t layer,
                                                                 const std::uint32_t* experts, const float* weights,
                                                                 std::uint32_t k, std::size_t n_tokens,
                                                                 const float* hidden, float* out) {
  return guarded([&]() -> moex_status {
    std::size_t count = 0;
    if (moex_status s = check_run(executor, hidden, n_tokens, out, sizeof(float), count); s != MOEX_OK) return s;
    if (overlap(hidden, out, count * sizeof(float))) return fail(MOEX_ERR_INVALID_ARGUMENT, "hidden and out overlap");
    if (experts == nullptr || weights == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "experts or weights is NULL");
    if (k == 0 || k > moex::kMaxTopK)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "k must be 1.." + std::to_string(moex::kMaxTopK));
    if (n_tokens > std::numeric_limits<std::size_t>::max() / k / sizeof(float))
      return fail(MOEX_ERR_INVALID_ARGUMENT, "n_tokens x k overflows");
    const std::uint32_t n_experts = executor->model->opened.store.spec().n_experts;
    executor->routing.resize(n_tokens);
    for (std::size_t t = 0; t < n_tokens; ++t) {
      moex::TokenRouting& r = executor->routing[t];
      r = moex::TokenRouting{};
      for (std::uint32_t j = 0; j < k; ++j) {
        const std::uint32_t e = experts[t * k + j];
        if (e == MOEX_NO_EXPERT) break;
        const float w = weights[t * k + j];
        if (e >= n_experts)
          return fail(MOEX_ERR_INVALID_ARGUMENT, "token " + std::to_string(t) + ": expert " + std::to_string(e) +
                                                     " out of range (" + std::to_string(n_experts) + " experts)");
        if (!std::isfinite(w))
          return fail(MOEX_ERR_INVALID_ARGUMENT, "token " + std::to_string(t) + ": non-finite weight");
        for (std::uint32_t i = 0; i < r.k; ++i)
          if (r.experts[i] == e)
            return fail(MOEX_ERR_INVALID_ARGUMENT,
                        "token " + std::to_string(t) + ": expert " + std::to_string(e) + " twice");
        r.experts[r.k] = e;
        r.weights[r.k] = w;
        ++r.k;
      }
      if (r.k == 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "token " + std::to_string(t) + " has no experts");
    }
    if (moex::Status s = executor->impl->forward_routed(layer, executor->routing, hidden, n_tokens, out); !s.is_ok())
      return fail(s);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_calibrate_gate(moex_executor* executor, const moex_trace* trace,
                                                             double target_k, double* reached_k) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    if (moex_status s = check_handle(trace, Kind::kTrace); s != MOEX_OK) return s;
    moex::SensitivityGate* g = executor->impl->sensitivity_gate();
    if (g == nullptr || !executor->adaptive_gate)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "the executor was not created with MOEX_GATING_ADAPTIVE");
    const moex::RoutingTrace& t = trace->trace;
    const moex::MoeModelSpec& spec = executor->model->opened.store.spec();
    if (t.n_layers != spec.n_layers || t.n_experts != spec.n_experts)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "the trace's shape is not the model's");
    if (!std::isfinite(target_k)) return fail(MOEX_ERR_INVALID_ARGUMENT, "target_k is not finite");
    moex::SensitivityGate trial = *g;  // the executor's gate changes only on success
    auto r = trial.calibrate_threshold(t, target_k);
    if (!r) return fail(r.status());
    g->set_threshold(trial.threshold());
    if (reached_k != nullptr) *reached_k = *r;
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_gate_threshold(const moex_executor* executor, double* threshold) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    if (threshold == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "threshold is NULL");
    const moex::SensitivityGate* g = executor->impl->sensitivity_gate();
    *threshold = g != nullptr ? static_cast<double>(g->threshold()) : 0.0;
    return MOEX_OK;
  });
}

// ---- statistics ----

extern "C" MOEX_API void moex_stats_init_size(moex_stats* stats, std::uint64_t size) {
  if (stats == nullptr || size < sizeof(std::uint64_t) || size > kMaxStructSize) return;
  std::memset(stats, 0, static_cast<std::size_t>(size));
  stats->struct_size = size;
}

// Parenthesized: moex.h defines a function-like macro of this name for new callers.
extern "C" MOEX_API void(moex_stats_init)(moex_stats* stats) { moex_stats_init_size(stats, kStatsV01); }

extern "C" MOEX_API moex_status moex_executor_get_stats(const moex_executor* executor, std::uint32_t layer,
                                                        moex_stats* stats) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    const moex::ExecutorStats& st = executor->impl->stats();
    moex::LayerStats ls;
    if (layer == MOEX_ALL_LAYERS)
      ls = st.total();
    else if (layer < st.layers.size())
      ls = st.layers[layer];
    else
      return fail(MOEX_ERR_INVALID_ARGUMENT, "layer " + std::to_string(layer) + " out of range");
    moex_stats full{};
    full.struct_size = sizeof full;
    full.steps = ls.steps;
    full.tokens = ls.tokens;
    full.expert_calls = ls.expert_calls;
    full.hits = ls.hits;
    full.misses = ls.misses;
    full.bytes_loaded = ls.bytes_loaded;
    full.evictions = ls.evictions;
    full.skipped = ls.skipped;
    full.prefetches = ls.prefetches;
    full.prefetch_hits = ls.prefetch_hits;
    full.stall_ns = ls.stall_ns;
    full.compute_ns = ls.compute_ns;
    full.route_ns = ls.route_ns;
    full.total_ns = ls.total_ns;
    full.hit_rate = ls.hit_rate();
    full.predicted = ls.predicted;
    full.predicted_correct = ls.predicted_correct;
    full.selected = ls.selected;
    full.prefetch_wasted_bytes = ls.prefetch_wasted_bytes;
    full.computed_at_source = ls.computed_at_source;
    for (std::size_t i = 0; i < moex::kPrecisionCount; ++i) {
      const std::int32_t c = to_c_precision(static_cast<moex::Precision>(i));  // 0: no C name
      full.misses_by_precision[static_cast<std::size_t>(c)] += ls.misses_by_precision[i];
    }
    full.recall = ls.recall();
    return write_sized(stats, full, "stats");
  });
}

extern "C" MOEX_API moex_status moex_executor_stats_json(const moex_executor* executor, char* buf, std::size_t size,
                                                         std::size_t* needed) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    return copy_string(stats_json(executor->impl->stats()), buf, size, needed);
  });
}

extern "C" MOEX_API moex_status moex_executor_reset_stats(moex_executor* executor) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    executor->impl->reset_stats();
    return MOEX_OK;
  });
}

// ---- traces ----

extern "C" MOEX_API moex_status moex_executor_record_trace(moex_executor* executor, std::uint32_t on) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    if (on > 1) return fail(MOEX_ERR_INVALID_ARGUMENT, "on must be 0 or 1");
    executor->impl->record_trace(on == 1);
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_begin_sequence(moex_executor* executor) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    executor->impl->begin_sequence();
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_executor_get_trace(const moex_executor* executor, moex_trace** out) {
  return guarded([&]() -> moex_status {
    if (out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    auto t = std::make_unique<moex_trace>(moex_trace{executor->impl->trace()});
    register_handle(t.get(), Kind::kTrace);
    *out = t.release();
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_trace_load(const char* path, moex_trace** out) {
  return guarded([&]() -> moex_status {
    if (out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (path == nullptr || *path == '\0') return fail(MOEX_ERR_INVALID_ARGUMENT, "path is NULL or empty");
    auto r = moex::load_trace(std::filesystem::u8path(path));
    if (!r) return fail(r.status());
    auto t = std::make_unique<moex_trace>(moex_trace{std::move(*r)});
    register_handle(t.get(), Kind::kTrace);
    *out = t.release();
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_trace_write(const moex_trace* trace, const char* path, std::int32_t format) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(trace, Kind::kTrace); s != MOEX_OK) return s;
    if (path == nullptr || *path == '\0') return fail(MOEX_ERR_INVALID_ARGUMENT, "path is NULL or empty");
    if (moex_status s = check_enum(format, 3, "format"); s != MOEX_OK) return s;
    const auto p = std::filesystem::u8path(path);
    const moex::Status s = format == MOEX_TRACE_FORMAT_JSONL ? moex::write_trace_jsonl(trace->trace, p)
                                                             : moex::write_trace_binary(trace->trace, p);
    return s.is_ok() ? MOEX_OK : fail(s);
  });
}

extern "C" MOEX_API void moex_trace_destroy(moex_trace* trace) {
  if (trace == nullptr || !unregister_handle(trace, Kind::kTrace)) return;
  delete trace;
}

extern "C" MOEX_API moex_status moex_trace_shape(const moex_trace* trace, std::uint64_t* n_tokens,
                                                 std::uint32_t* n_layers, std::uint32_t* top_k,
                                                 std::uint32_t* n_experts) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(trace, Kind::kTrace); s != MOEX_OK) return s;
    const moex::RoutingTrace& t = trace->trace;
    if (n_tokens) *n_tokens = t.tokens();
    if (n_layers) *n_layers = t.n_layers;
    if (top_k) *top_k = t.top_k;
    if (n_experts) *n_experts = t.n_experts;
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_trace_copy(const moex_trace* trace, std::uint32_t* experts, float* weights,
                                                std::uint64_t capacity, std::uint64_t* needed) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(trace, Kind::kTrace); s != MOEX_OK) return s;
    const moex::RoutingTrace& t = trace->trace;
    const std::uint64_t n = t.expert_ids.size();
    if (needed) *needed = n;
    if ((experts != nullptr || weights != nullptr) && capacity < n)
      return fail(MOEX_ERR_INVALID_ARGUMENT,
                  "capacity " + std::to_string(capacity) + " < " + std::to_string(n) + " entries needed");
    if (experts && n) std::memcpy(experts, t.expert_ids.data(), n * sizeof(std::uint32_t));
    if (weights && n) std::memcpy(weights, t.gate_weights.data(), n * sizeof(float));
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_trace_expert_counts(const moex_trace* trace, double* counts,
                                                         std::uint64_t capacity, std::uint64_t* needed) {
  return guarded([&]() -> moex_status {
    if (moex_status s = check_handle(trace, Kind::kTrace); s != MOEX_OK) return s;
    const moex::RoutingTrace& t = trace->trace;
    const std::uint64_t n = std::uint64_t{t.n_layers} * t.n_experts;
    if (needed) *needed = n;
    if (counts == nullptr) return MOEX_OK;
    if (capacity < n)
      return fail(MOEX_ERR_INVALID_ARGUMENT,
                  "capacity " + std::to_string(capacity) + " < " + std::to_string(n) + " entries needed");
    const std::vector<double> c = moex::expert_access_counts(t);
    std::fill(counts, counts + n, 0.0);
    std::copy_n(c.begin(), std::min<std::size_t>(c.size(), static_cast<std::size_t>(n)), counts);
    return MOEX_OK;
  });
}

// ==== experimental (moex/experimental.h) =======================================================================

static_assert(sizeof(void*) != 8 || sizeof(moex_executor_params) == 184, "moex_executor_params: 0.2 layout");
static_assert(sizeof(moex_stats) == 304, "moex_stats: 0.2 layout");
static_assert(sizeof(moex_model_params) == 32, "moex_model_params: 0.2 layout");
static_assert(moex_capi::kPrecisions.size() <= MOEX_PRECISION_SLOTS, "misses_by_precision too short");

extern "C" MOEX_API void moex_experimental_cuda_params_init_size(moex_cuda_params* params, std::uint64_t size) {
  if (params == nullptr || size < sizeof(std::uint64_t) || size > kMaxStructSize) return;
  std::memset(params, 0, static_cast<std::size_t>(size));
  params->struct_size = size;
}

extern "C" MOEX_API moex_status moex_experimental_cuda_device_count(std::int32_t* count) {
  return guarded([&]() -> moex_status {
    if (count == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "count is NULL");
    *count = 0;  // no CUDA execution backend in this build
    return MOEX_OK;
  });
}

extern "C" MOEX_API moex_status moex_experimental_executor_create_cuda(const moex_model* model,
                                                                       const moex_executor_params* params,
                                                                       const moex_cuda_params* cuda,
                                                                       moex_executor** out) {
  return guarded([&]() -> moex_status {
    if (out == nullptr) return fail(MOEX_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (moex_status s = check_handle(model, Kind::kModel); s != MOEX_OK) return s;
    moex_executor_params p;
    moex_executor_params_init_size(&p, sizeof p);
    if (moex_status s = read_sized(params, p, "moex_executor_params"); s != MOEX_OK) return s;
    moex_cuda_params c{};
    c.struct_size = sizeof c;
    if (moex_status s = read_sized(cuda, c, "moex_cuda_params"); s != MOEX_OK) return s;
    if (c.flags != 0) return fail(MOEX_ERR_UNSUPPORTED, "moex_cuda_params.flags has bits this library does not know");
    if (c.device < 0) return fail(MOEX_ERR_INVALID_ARGUMENT, "device is negative");
    if (p.backend != MOEX_BACKEND_DEFAULT && p.backend != MOEX_BACKEND_CUDA)
      return fail(MOEX_ERR_INVALID_ARGUMENT, "params->backend must be 0 or MOEX_BACKEND_CUDA");
    return fail(MOEX_ERR_UNSUPPORTED, "this build has no CUDA execution backend");
  });
}

extern "C" MOEX_API moex_status moex_experimental_executor_set_cuda_stream(moex_executor* executor, void* stream) {
  return guarded([&]() -> moex_status {
    (void)stream;
    if (moex_status s = check_handle(executor, Kind::kExecutor); s != MOEX_OK) return s;
    return fail(MOEX_ERR_INVALID_ARGUMENT,
                "the executor does not run on CUDA (no CUDA execution backend in this build)");
  });
}
