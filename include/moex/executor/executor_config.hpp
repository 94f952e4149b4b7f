#pragma once
/// @file executor_config.hpp
/// Runtime configuration of a MoeLayerExecutor (plain struct; policies have their own configs).

#include <cstdint>
#include <optional>

#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// Settings of an executor. Zero means "default" wherever it says so.
struct ExecutorConfig {
  /// Fast-tier budget in bytes (device memory on a GPU backend, RAM on the CPU backend);
  /// 0 = a quarter of all expert bytes in the cache precision.
  std::uint64_t cache_bytes = 0;
  /// Precision experts are held in in the fast tier; empty = the store's master precision.
  std::optional<Precision> cache_precision;
  /// Check hidden states for NaN/inf before use (cheap; on by default).
  bool check_finite = true;
};

MOEX_NAMESPACE_END
