#pragma once
/// @file pre_gate_router.hpp
/// PreGateRouter: predicts the experts of the next layers (and, with trained pre-gates, can route
/// them) before those layers run.

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

#include "moex/concepts/predictor.hpp"
#include "moex/formats/trace.hpp"
#include "moex/status.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

/// Where predictions come from.
enum class PreGateMode : std::uint8_t {
  /// Layer l+d's own router applied to layer l's input hidden state (AdapMoE, HOBBIT,
  /// mixtral-offloading): training-free; the routers of the next `depth` layers are stacked into
  /// one matrix so one product predicts them all.
  kSpeculative = 0,
  /// Trained pre-gate weights (Pre-gated MoE): the pre-gate of block l, applied to block l's
  /// input, predicts block l+1's experts. Used as a prediction only.
  kTrainedPrediction = 1,
  /// Trained pre-gates used as the routing itself: block l+1 runs the experts block l's pre-gate
  /// chose (the model's function changes; the checkpoint must have been trained for it).
  /// Block 0 keeps its own router.
  kTrainedRouting = 2,
  /// Replay: predictions read from a trace (simulation). With `replay_recall` < 1 each true
  /// expert is replaced, deterministically, by another with probability 1 - replay_recall.
  kReplay = 3,
};

/// Settings of a PreGateRouter.
struct PreGateConfig {
  PreGateMode mode = PreGateMode::kSpeculative;
  std::uint32_t depth = 1;    ///< layers of look-ahead (1 = next layer); trained modes use 1
  float replay_recall = 1.f;  ///< kReplay: fraction of true experts kept in the prediction
  std::uint64_t replay_seed = 1;
};

/// Pre-gate weights: for each layer l < L-1, an [n_experts x hidden] f32 matrix predicting layer
/// l+1's router logits from layer l's input. Stored as safetensors with tensors
/// "pregate.<l>.weight" and metadata {"moex.kind": "pregate", "moex.version": "1"}.
struct PreGateWeights {
  std::uint32_t n_layers = 0;
  std::uint32_t n_experts = 0;
  std::uint32_t hidden = 0;
  std::vector<float> weights;  ///< [(n_layers-1) x n_experts x hidden]

  std::span<const float> layer(std::uint32_t l) const noexcept {
    const std::size_t per = std::size_t{n_experts} * hidden;
    return {weights.data() + l * per, per};
  }
};
/// Writes pre-gates in the documented safetensors form.
Status write_pre_gates(const PreGateWeights& w, const std::filesystem::path& path);
/// Reads and validates them (shapes must agree across layers).
Result<PreGateWeights> read_pre_gates(const std::filesystem::path& path);

/// The Predictor (and, in kTrainedRouting mode, RoutingPredictor) of the executor.
class PreGateRouter {
 public:
  PreGateRouter() = default;
  /// kSpeculative over the store's routers. The store must outlive the router.
  static Result<PreGateRouter> speculative(const ExpertStore& store, std::uint32_t depth);
  /// kTrainedPrediction or kTrainedRouting with the given pre-gates.
  static Result<PreGateRouter> trained(const ExpertStore& store, PreGateWeights weights, bool as_routing);
  /// kReplay from a trace of the same model shape (token t's layer-l routing predicts step t*L+l).
  static Result<PreGateRouter> replay(RoutingTrace trace, std::uint32_t depth, float recall, std::uint64_t seed = 1);

  Status predict(const PredictContext& ctx, std::vector<Prediction>& out);
  bool take_routing(std::uint32_t layer, std::span<TokenRouting> out);
  bool routes_layers() const noexcept { return mode_ == PreGateMode::kTrainedRouting; }
  std::uint32_t depth() const noexcept { return depth_; }
  std::string_view name() const noexcept;
  PreGateMode mode() const noexcept { return mode_; }

 private:
  PreGateMode mode_ = PreGateMode::kSpeculative;
  std::uint32_t depth_ = 0;
  const ExpertStore* store_ = nullptr;
  RouterConfig router_{};
  std::uint32_t n_layers_ = 0, n_experts_ = 0, hidden_ = 0;
  std::vector<float> stacked_;  // [L x E x H] routers (speculative) or [(L-1) x E x H] pre-gates
  std::vector<float> logits_;
  RoutingTrace trace_;
  float recall_ = 1.f;
  std::uint64_t seed_ = 1;
  // kTrainedRouting: the routing of layer routed_layer_ computed by the previous layer's pre-gate
  std::uint32_t routed_layer_ = UINT32_MAX;
  std::vector<TokenRouting> routed_;
};
static_assert(RoutingPredictor<PreGateRouter>);

MOEX_NAMESPACE_END
