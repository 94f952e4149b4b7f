#pragma once
/// @file techniques.hpp
/// Technique rows: one trace, one budget, one shape and device profile, replayed through the
/// executor on SimExecutionBackend with on-demand LRU (the baseline) and then with each technique
/// of issue 4 added on its own — prefetch from a replayed predictor at a given recall, AdapMoE's
/// per-layer budgets, AdapMoE's sensitivity gate, HOBBIT's low-precision loads on a miss, CPU
/// compute of misses by the cost model — and all of them together (docs/simulator.md).

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/formats/trace.hpp"
#include "moex/sim/grid.hpp"
#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// The rows of a technique table, in table order.
enum class SimTechnique : std::uint8_t {
  kBaseline = 0,      ///< "baseline": on-demand loading, LRU, one pool
  kPrefetch = 1,      ///< "prefetch": + replayed predictor at the given recall
  kLayerBudgets = 2,  ///< "layer-budgets": AdapMoE's DP split of the budget, best online eviction
  kAdaptiveGate = 3,  ///< "adaptive-gate": + SensitivityGate calibrated to fewer experts per token
  kLowPrecision = 4,  ///< "low-precision": + HOBBIT's rule, low-precision copies in a second pool
  kCpuCompute = 5,    ///< "cpu-compute": + CostModelMiss computing misses on the host CPU
  kCombined = 6,      ///< "combined": all of the above together
  /// "pregate-routing": Pre-gated MoE proper — block i's pre-gate output IS block i+1's routing,
  /// so every prefetch is right by construction (replayed at recall 1); changes the model's
  /// function (not exact). Listed after "prefetch" in table order.
  kPreGateRouting = 7,
};

/// The command-line name of a technique ("baseline", "prefetch", ...).
std::string_view to_string(SimTechnique t) noexcept;
/// The row label of a technique ("on-demand LRU", "+ prefetch", ...).
std::string_view technique_label(SimTechnique t) noexcept;
/// Parses a technique name; kInvalidArgument lists the known names.
Result<SimTechnique> parse_sim_technique(std::string_view name);
/// Every technique, in table order (baseline, prefetch, pregate-routing, layer-budgets, ...).
std::vector<SimTechnique> all_sim_techniques();

/// Parameters of the techniques. Values left unset are derived from the profile tokens of the
/// split (see each field).
struct SimTechniqueSettings {
  /// Predictor recall per predicting layer l (predicting l+1; n_layers - 1 values), e.g. the
  /// recall_at_k of a model's training_report.json. Empty: `recall` for every layer.
  std::vector<float> layer_recall;
  float recall = 0.8f;               ///< recall when layer_recall is empty, in [0, 1]
  std::uint32_t prefetch_depth = 1;  ///< layers of look-ahead
  std::uint64_t replay_seed = 1;     ///< which predictions a recall below 1 gets wrong
  /// Per-layer sensitivities of the gate. Empty: falling linearly with depth from 1 at the first
  /// layer to 0.25 at the last (AdapMoE's observation that shallow layers are more sensitive).
  std::vector<float> sensitivities;
  /// The gate's target: average experts per token = keep_fraction * top_k (0.75: 25% fewer).
  double gate_keep_fraction = 0.75;
  Precision low_precision = Precision::kInt4;  ///< HOBBIT's low-precision copy
  double low_precision_share = 0.25;           ///< fraction of the budget for the low pool
  /// HOBBIT thresholds on the unimportance score. t_high < 0: the median unimportance of the
  /// non-top experts of the profile tokens (so the rule triggers on about half of them).
  float hobbit_t_high = -1.f;
  float hobbit_t_skip = 0.9f;  ///< the paper's value
};

/// One technique table.
struct SimTechniqueConfig {
  const RoutingTrace* trace = nullptr;  ///< required; must outlive the call
  NamedShape shape{};
  DeviceProfile profile{};
  double budget_fraction = 0.25;
  Precision cache_precision = Precision::kBF16;
  TraceSplit split = TraceSplit::kHalf;
  SimTechniqueSettings settings{};
  std::vector<SimTechnique> techniques;  ///< empty = all; the baseline always runs
};

/// The parameters a table actually ran with (after calibration), so that quality runs on the
/// real model can use the very same ones.
struct SimTechniqueParams {
  std::vector<float> layer_recall;   ///< per predicting layer
  std::vector<float> sensitivities;  ///< per layer
  float gate_threshold = 0.f;        ///< calibrated T
  double gate_target_k = 0;          ///< asked for
  double gate_profile_k = 0;         ///< reached on the profile tokens
  float hobbit_t_high = 0.f, hobbit_t_skip = 0.f;
  std::string best_eviction;               ///< of the per-layer-budget row
  std::vector<std::uint32_t> layer_slots;  ///< DP split (experts per layer)
  /// DP split of the combined row, where each layer must hold one expert in each pool; empty when
  /// the budget allows none (the combined row then runs without per-layer budgets).
  std::vector<std::uint32_t> combined_layer_slots;
};

/// One row of a technique table.
struct SimTechniqueResult {
  SimTechnique technique = SimTechnique::kBaseline;
  std::string detail;                     ///< what ran, e.g. "lfu, DP split" or "T=0.31, k 1.50"
  SimRunResult run;                       ///< the replay's figures (run.policy = eviction)
  std::uint64_t host_busy_ns = 0;         ///< host CPU computing experts
  double cpu_busy_fraction = 0;           ///< host_busy_ns / sim_ns
  std::uint64_t skipped = 0;              ///< experts dropped by the gate or the miss policy
  std::uint64_t computed_at_source = 0;   ///< misses computed on the host CPU
  std::uint64_t low_precision_loads = 0;  ///< misses loaded in the low precision
  std::uint64_t prefetches = 0, prefetch_hits = 0, prefetch_wasted_bytes = 0;
  double recall = 0;     ///< measured prediction recall (prefetching rows)
  double avg_k = 0;      ///< experts computed per (token, layer)
  double speedup = 1;    ///< baseline ms/token / this row's
  double stall_cut = 0;  ///< 1 - stall / baseline stall
  bool exact = true;     ///< no approximation in this row's policies
  /// Relative error of the MoE layer outputs against the exact path on the real model; filled by
  /// the caller (moex-sim) where weights exist.
  std::optional<double> quality;
  std::string quality_note;  ///< "exact", "n/a (no weights)", ...
};

/// Runs the table: every technique asked for (and the baseline) on the measured tokens of the
/// split, from a cold cache each. `params`, when given, receives the calibrated parameters.
/// Errors: kInvalidArgument (no trace, bad budget or settings, a budget with fewer experts than
/// layers for the per-layer rows, recall list of the wrong length), errors of the executor.
Result<std::vector<SimTechniqueResult>> run_techniques(const SimTechniqueConfig& config,
                                                       SimTechniqueParams* params = nullptr);

/// Reads a model's measured predictor recall per layer: `trace_dev.recall_at_k` of the
/// training_report.json of the shared models. kNotFound when the file is absent.
Result<std::vector<float>> load_predictor_recall(const std::filesystem::path& training_report);

/// Technique rows as CSV (header + one line per row), `trace_name` first.
std::string sim_techniques_to_csv(std::string_view trace_name, std::span<const SimTechniqueResult> rows);
/// Technique rows as a JSON array of objects.
std::string sim_techniques_to_json(std::string_view trace_name, const SimTechniqueParams& params,
                                   std::span<const SimTechniqueResult> rows);

MOEX_NAMESPACE_END
