#pragma once
/// @file grid.hpp
/// The simulation grid: replays a routing trace through MoeLayerExecutor over SimExecutionBackend
/// (the executor and policies that run on hardware, on a virtual clock) for one policy, budget,
/// device profile and expert shape (run_simulation), or for every combination (run_grid), and
/// writes the results as CSV and JSON. moex-sim and the simulator benchmark are built on it.
///
/// Rules of a run (docs/simulator.md):
/// - The trace keeps its routing (layers, expert count, top-k, which expert each token picks);
///   the shape only sets the bytes and FLOPs of one expert. A trace with another expert count
///   than the shape's model keeps its own count: "all expert bytes" = n_layers x n_experts x
///   bytes of one expert of the shape in the cache precision.
/// - Tokens are replayed at batch 1, layer by layer; a (token, layer) without experts (the
///   Mixtral trace has a few) is skipped, so executor step k is the k-th call actually made, and
///   Belady's future is indexed by those steps.
/// - With TraceSplit::kHalf the first half of the tokens only feeds the profiles of the
///   profile-based policies (static-hot's popularity, lru-dp's miss curves) and every policy is
///   measured on the second half from a cold cache; with kNone every policy runs the whole trace
///   and the profiles come from that same trace (an oracle-ish profile).

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/executor/stats.hpp"
#include "moex/formats/trace.hpp"
#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// The eviction policies the grid runs, by their command-line names.
enum class SimPolicy : std::uint8_t {
  kLru = 0,         ///< "lru": LruEviction, one global pool
  kLfu = 1,         ///< "lfu": LfuEviction
  kLrfu = 2,        ///< "lrfu": LrfuEviction (lambda 0.05)
  kHobbit = 3,      ///< "hobbit": HobbitScoreEviction (equal weights)
  kStaticHot = 4,   ///< "static-hot": StaticHotSetEviction over access counts of the profile tokens
  kBelady = 5,      ///< "belady": BeladyOracleEviction reading the replayed future (the bound)
  kLruLayerDp = 6,  ///< "lru-dp": LRU with AdapMoE's per-layer DP split (needs executor support)
};

/// The command-line name of a policy ("lru", "static-hot", ...).
std::string_view to_string(SimPolicy p) noexcept;
/// Parses a policy name; kInvalidArgument lists the known names.
Result<SimPolicy> parse_sim_policy(std::string_view name);
/// True when this build's executor takes per-layer budgets (ExecutorConfig::layer_cache_bytes),
/// so that SimPolicy::kLruLayerDp can run.
bool sim_layer_budgets_supported() noexcept;
/// The default policy list: every policy this build can run, Belady last.
std::vector<SimPolicy> default_sim_policies();

/// Which tokens feed the profiles and which are measured.
enum class TraceSplit : std::uint8_t {
  kHalf = 0,  ///< profile on tokens [0, T/2), measure on [T/2, T)
  kNone = 1,  ///< profile and measure on all tokens (oracle-ish profiles)
};
/// "half" or "none".
std::string_view to_string(TraceSplit s) noexcept;
/// Parses "half" / "none".
Result<TraceSplit> parse_trace_split(std::string_view name);

/// An expert shape with the name it was asked for.
struct NamedShape {
  std::string name;  ///< "mixtral", "qwen3-30b-a3b", "model-native(...)", "HxF"
  ExpertShape shape{};
};

/// Resolves a --shape argument for a trace read from `trace_path`:
/// "mixtral" (4096 x 14336), "qwen3-30b-a3b" (2048 x 768), "HxF" (e.g. "1024x2816"), or
/// "model-native": hidden_size and the expert intermediate size of the config.json beside the
/// trace; without one, a 32-layer 8-expert top-2 trace is taken as Mixtral-8x7B; anything else is
/// kInvalidArgument asking for an explicit shape.
Result<NamedShape> resolve_sim_shape(std::string_view spec, const std::filesystem::path& trace_path,
                                     const RoutingTrace& trace);

/// Tokens [begin, end) of `trace` as a trace of their own (sequence starts clipped and rebased).
/// Errors: kInvalidArgument when begin > end or end > trace.tokens().
Result<RoutingTrace> trace_slice(const RoutingTrace& trace, std::size_t begin, std::size_t end);

/// One simulated run.
struct SimRunConfig {
  const RoutingTrace* trace = nullptr;  ///< required; must outlive the call
  std::size_t begin_token = 0;          ///< first token replayed
  std::size_t end_token = SIZE_MAX;     ///< one past the last token replayed (clamped to tokens())
  NamedShape shape{};                   ///< bytes and FLOPs of one expert
  DeviceProfile profile{};              ///< the simulated machine
  SimPolicy policy = SimPolicy::kLru;
  double budget_fraction = 0.25;                 ///< fast-tier budget as a fraction of all expert bytes, (0, 1]
  Precision cache_precision = Precision::kBF16;  ///< precision experts are held and loaded in
  /// static-hot: popularity [n_layers * n_experts]; empty = access counts of the replayed tokens.
  std::vector<double> static_scores;
  /// lru-dp: per-layer slot counts; empty = DP over LRU miss curves of the replayed tokens.
  std::vector<std::uint32_t> layer_slots;
};

/// What one run measured. Times are virtual (the profile's), per replayed token.
struct SimRunResult {
  std::string policy;
  std::string profile;
  std::string shape;
  ExpertShape expert_shape{};
  double budget_fraction = 0;
  std::uint64_t expert_bytes = 0;  ///< one expert in the cache precision
  std::uint64_t cache_slots = 0;   ///< experts the fast tier holds
  std::uint64_t cache_bytes = 0;   ///< cache_slots * expert_bytes
  std::uint64_t tokens = 0;        ///< tokens replayed
  std::uint64_t layer_steps = 0;   ///< executor calls (token, layer pairs with experts)
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t bytes_loaded = 0;
  std::uint64_t sim_ns = 0;        ///< virtual time of the whole replay
  std::uint64_t stall_ns = 0;      ///< of which waiting for loads
  std::uint64_t compute_ns = 0;    ///< of which computing experts
  std::uint64_t link_busy_ns = 0;  ///< busy time of the load link (host to device)
  double hit_rate = 0;             ///< hits / (hits + misses)
  double tokens_per_s = 0;         ///< tokens * 1e9 / sim_ns (MoE expert work only)
  double ms_per_token = 0;
  double stall_ms_per_token = 0;
  double compute_ms_per_token = 0;
  double bytes_per_token = 0;
  double pcie_busy_fraction = 0;  ///< link_busy_ns / sim_ns
};

/// Fills the measured counters of `r` after a replay: layer steps, hits and misses and stall from
/// the executor's totals; bytes, busy times and the run's end from the simulator's own queues
/// (the run ends when every queue has drained, whether the executor waited for its work or not).
void record_sim_counters(const LayerStats& totals, const SimBackend& sim, std::uint64_t layer_steps,
                         SimRunResult& r) noexcept;
/// Fills the derived fields of `r` (hit rate, per-token figures, PCIe busy fraction) from its
/// counters and `tokens`.
void derive_sim_rates(SimRunResult& r) noexcept;

/// Replays the configured tokens through a fresh executor over SimExecutionBackend.
/// Errors: kInvalidArgument (no trace, empty token range, budget outside (0, 1], a budget
/// smaller than one expert, a shape the precision cannot hold, lru-dp with fewer slots than
/// layers), kUnsupported (lru-dp without executor support), errors of the executor.
Result<SimRunResult> run_simulation(const SimRunConfig& config);

/// A grid: every policy x budget x profile x shape over one trace.
struct SimGridConfig {
  std::vector<SimPolicy> policies;      ///< empty = default_sim_policies()
  std::vector<double> budgets;          ///< empty = {0.1, 0.25, 0.5}
  std::vector<DeviceProfile> profiles;  ///< at least one
  std::vector<NamedShape> shapes;       ///< at least one
  Precision cache_precision = Precision::kBF16;
  TraceSplit split = TraceSplit::kHalf;
};

/// Progress of a grid: `done` of `total` runs; `what` names the run about to start.
using SimProgressFn = std::function<void(std::size_t done, std::size_t total, std::string_view what)>;

/// Runs the grid; results ordered shape, profile, policy, budget (budgets as given). lru-dp runs
/// only at budgets holding at least one expert per layer; at smaller ones it has no row.
/// Profiles (static-hot scores, lru-dp slots) are computed once per budget and shape from the
/// profile tokens of the split. Errors: the first failing run's, naming it.
Result<std::vector<SimRunResult>> run_grid(const RoutingTrace& trace, const SimGridConfig& config,
                                           const SimProgressFn& progress = {});

/// The CSV header and one line per result (RFC 4180 quoting where needed), `trace_name` first.
std::string sim_results_to_csv(std::string_view trace_name, std::span<const SimRunResult> results);
/// {"trace":..., "n_layers", "n_experts", "top_k", "tokens", "split", "runs":[{...}]}.
std::string sim_results_to_json(std::string_view trace_name, const RoutingTrace& trace, TraceSplit split,
                                std::span<const SimRunResult> results);

MOEX_NAMESPACE_END
