#pragma once
/// @file executor_config.hpp
/// Runtime configuration of a MoeLayerExecutor (plain struct; policies have their own configs).

#include <cstdint>
#include <optional>
#include <vector>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Settings of an executor. Zero or empty means "default" wherever it says so.
struct ExecutorConfig {
  /// Fast-tier budget in bytes (device memory on a GPU backend, RAM on the CPU backend);
  /// 0 = a quarter of all expert bytes in the cache precision.
  std::uint64_t cache_bytes = 0;
  /// Precision experts are held in in the fast tier; empty = the store's master precision.
  std::optional<Precision> cache_precision;
  /// Check hidden states for NaN/inf before use (cheap; on by default).
  bool check_finite = true;
  /// A second pool for low-precision copies (HOBBIT): misses and prefetches the policies choose to
  /// fetch in low precision land there. The store must hold this precision. Empty = none.
  std::optional<Precision> low_precision;
  /// Share of the budget given to the low-precision pool (0 < share < 1).
  double low_precision_share = 0.25;
  /// Per-layer budgets in bytes (AdapMoE's allocation, see cache/layer_budget.hpp); when
  /// non-empty (one per layer) each layer is its own eviction group and cache_bytes is ignored.
  std::vector<std::uint64_t> layer_cache_bytes;
  /// Bound on prefetched bytes in flight; 0 = two experts at the cache precision.
  std::uint64_t max_prefetch_bytes_in_flight = 0;
  /// When a prefetch needs room that a resident expert holds, it may evict it only where that
  /// pays: costed (the default) admits it when precision x overlap >= reuse x transfer +
  /// (1 - precision) x overlap, where overlap is the link time free for it before use (the window
  /// measured between prefetch issue and use, less the backlog already queued on the link, at most
  /// the transfer time) and reuse the chance a victim is wanted again while it would have stayed;
  /// precision, window and reuse are measured online (docs/simulator.md, "Cost-aware prefetch").
  /// Always: evict whenever the victim is cold or an unpredicted expert of a predicted layer.
  enum class PrefetchAdmission : std::uint8_t {
    kCosted = 0,
    kAlways = 1
  } prefetch_admission = PrefetchAdmission::kCosted;
};

MOEX_NAMESPACE_END
