#pragma once
/// @file engine.hpp
/// The mini engine over moex's C++ API: the checkpoint is opened by moex (safetensors + config.json),
/// moex owns the experts (an ExpertStore and a MoeLayerExecutor with the chosen policies), the
/// engine owns everything else (engine_core.hpp). Also: bits-per-byte evaluation, calibration of
/// the adaptive gate, and the least-squares pre-gate fit.

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "moex/gate/sensitivity_gate.hpp"
#include "moex/moex.hpp"
#include "moex/policies/hobbit_precision_miss.hpp"
#include "moex/route/pre_gate_router.hpp"

#include "engine_core.hpp"

namespace moex_engine {

/// How the experts are predicted before their layer runs.
enum class Prefetch : std::uint8_t {
  kNone = 0,            ///< on-demand loads only (the default, exact)
  kSpeculative = 1,     ///< the next layers' routers on this layer's input (exact: prediction only)
  kPreGatePredict = 2,  ///< fitted pre-gates as a prediction (exact)
  kPreGateRoute = 3,    ///< fitted pre-gates as the routing of the next layer (approximate)
};

/// The policies of one executor. Everything off (the default) is moex's exact path.
struct PolicyOptions {
  Prefetch prefetch = Prefetch::kNone;
  std::uint32_t depth = 1;                         ///< speculative look-ahead
  std::optional<moex::PreGateWeights> pregates;    ///< for kPreGatePredict / kPreGateRoute
  moex::SensitivityGate gate;                      ///< threshold 0 = exact (see calibrate_adaptive_gate)
  std::optional<moex::Precision> low_precision;    ///< HOBBIT's low-precision pool on miss
  float t_high = 1.f;                              ///< HOBBIT: unimportance above it loads low precision
  float t_skip = 1.f;                              ///< HOBBIT: unimportance above it skips the expert
  std::optional<moex::Precision> cache_precision;  ///< precision of every resident expert
  double cache_fraction = 0.25;                    ///< fast-tier budget as a share of all experts
  std::uint32_t threads = 0;                       ///< expert compute threads (0 = all cores)
  bool cuda = false;                               ///< run resident experts on the GPU (CudaExecutionBackend)
  int cuda_device = 0;

  /// True when no option changes the executor's policies (moex::DefaultPolicies is used).
  bool all_default() const noexcept {
    return prefetch == Prefetch::kNone && gate.exact() && !low_precision && t_high >= 1.f && t_skip >= 1.f &&
           !cache_precision && !cuda;
  }
};

/// A MoeLayerExecutor of any policies behind one interface.
class MoeRunner {
 public:
  virtual ~MoeRunner() = default;
  /// out = MoE(x) for n tokens of layer l.
  virtual moex::Status forward(std::uint32_t layer, const float* x, std::size_t n, float* out) = 0;
  virtual const moex::ExecutorStats& stats() const = 0;
  virtual void reset_stats() = 0;
  virtual void record_trace(bool on) = 0;
  virtual void begin_sequence() = 0;
  virtual const moex::RoutingTrace& trace() const = 0;
  /// True when the executor's policies cannot change the model's function.
  virtual bool exact() const = 0;
  /// The callback the dense core calls.
  MoeFn fn() {
    return [this](std::uint32_t l, const float* x, std::size_t n, float* out) -> std::string {
      moex::Status s = forward(l, x, n, out);
      return s.is_ok() ? std::string() : s.to_string();
    };
  }
};

/// The model: moex's checkpoint and expert store, and the engine's dense half.
class Engine {
 public:
  /// Opens a checkpoint folder. With `low_precision_copies`, int8/int4/int2 (group 64) copies of
  /// every expert are built as well.
  static moex::Result<std::unique_ptr<Engine>> open(const std::string& dir, bool low_precision_copies = false);

  moex::OpenedModel& model() noexcept { return model_; }
  const moex::ExpertStore& store() const noexcept { return model_.store; }
  Transformer& transformer() noexcept { return tf_; }
  const ModelShape& shape() const noexcept { return tf_.shape(); }

  /// An executor over this model's store with the given policies.
  moex::Result<std::unique_ptr<MoeRunner>> make_runner(const PolicyOptions& options) const;

 private:
  moex::OpenedModel model_;
  Transformer tf_;
};

/// The format moex builds for a low precision: group 64, int2 asymmetric (as the C API does).
moex::WeightFormat low_format(moex::Precision p) noexcept;
/// Parses "int8" / "int4" / "int2" / "bf16" / "f32".
std::optional<moex::Precision> parse_precision(const std::string& s) noexcept;

/// What a bits-per-byte run measured.
struct BpbResult {
  double bits = 0;
  std::size_t predictions = 0;
  std::size_t tokens = 0;
  double seconds = 0;
  std::vector<moex::LayerStats> layers;  ///< executor stats of the run, per layer

  double bpb() const noexcept { return predictions ? bits / double(predictions) : 0.0; }
  moex::LayerStats total() const noexcept;
  /// Prediction recall over the layers that can be predicted (1 .. L-1): correct / selected.
  double recall() const noexcept;
  /// Average experts selected per token per layer after the gate (selected / tokens; at batch 1
  /// this is the gate's k, including experts a miss policy then skipped).
  double average_k() const noexcept;
};

/// Runs every window from position 0 (KV cache reset per window, a new trace sequence each) in
/// chunks of `chunk` tokens (1: token by token, as an offloading decoder runs; 0: the whole
/// window at once) and measures bits per byte. Stats are reset first.
moex::Result<BpbResult> evaluate_bpb(Engine& engine, MoeRunner& moe,
                                     const std::vector<std::vector<std::uint32_t>>& windows, std::size_t chunk,
                                     std::vector<float>* logits_out = nullptr);

/// AdapMoE's gate for a target average of experts per token: per-layer sensitivities from the
/// gradient-free estimate on `calib` (dropping each token's last expert), then the threshold that
/// reaches `target_k` on the exact routing of `calib`. `reached` gets the average on `calib`.
moex::Result<moex::SensitivityGate> calibrate_adaptive_gate(Engine& engine,
                                                            const std::vector<std::vector<std::uint32_t>>& calib,
                                                            double target_k, double* reached = nullptr);

/// Fits pre-gates by ridge least squares: W_l minimizes ||X_l W - Z_{l+1}||^2 + lambda ||W - R_{l+1}^T||^2,
/// where X_l are layer l's MoE inputs on `calib`, Z_{l+1} = X_{l+1} R_{l+1}^T layer l+1's router logits
/// and R_{l+1} its router (the prior: with lambda -> inf the fit is the speculative predictor).
/// lambda = ridge * trace(X^T X) / hidden. Normal equations solved in double.
moex::Result<moex::PreGateWeights> fit_pre_gates(Engine& engine, const std::vector<std::vector<std::uint32_t>>& calib,
                                                 double ridge = 1e-3);

}  // namespace moex_engine
