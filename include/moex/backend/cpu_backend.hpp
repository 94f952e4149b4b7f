#pragma once
/// @file cpu_backend.hpp
/// CpuBackend: the fast tier is host RAM, experts compute on the host CPU; the slow tier is
/// wherever the store keeps master copies (a memory-mapped file or other RAM).

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "moex/concepts/backend.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/layout.hpp"
#include "moex/status.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

/// Settings of a CpuBackend.
struct CpuBackendConfig {
  std::uint32_t threads = 0;  ///< worker threads for expert compute; 0 = all cores
  /// Copy experts into the fast tier on a background loader thread (prefetches then overlap
  /// compute). Off: copies run on the calling thread when started.
  bool async_loads = false;
  /// Copies are cut into chunks of this size; a cancelled copy stops between chunks.
  std::size_t chunk_bytes = std::size_t{1} << 20;
  /// Cost-model rates (bytes per second): slow tier -> fast tier copies, and expert compute
  /// streaming weights from where the master lives. 0 = defaults (10 GB/s, 10 GB/s).
  std::uint64_t load_bytes_per_s = 0;
  std::uint64_t source_bytes_per_s = 0;
};

/// Host-memory slots for resident experts, a wall clock, copies and the CPU kernels.
///
/// Thread safety: one executor uses one backend from one thread; the optional loader thread is
/// internal.
class CpuBackend {
 public:
  /// Experts carry real weights here (see ExecutionBackend).
  static constexpr bool kHasData = true;
  /// Honours ExpertView::math and runs shared experts at the source (backend_computes_expert_math).
  static constexpr bool kComputesExpertMath = true;

  /// Implicit, so that a CpuBackendConfig can stand where a backend is expected.
  CpuBackend(CpuBackendConfig config = {});  // NOLINT(google-explicit-constructor)
  CpuBackend(CpuBackend&&) noexcept;
  CpuBackend& operator=(CpuBackend&&) noexcept;
  ~CpuBackend();

  std::uint64_t now_ns() const noexcept {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
  }

  Status allocate_slots(Precision pool, std::size_t slot_bytes, std::size_t count) noexcept;
  std::size_t slot_count(Precision pool) const noexcept;
  Status start_load(Precision pool, std::size_t slot, const ExpertView& src, LoadTicket& ticket) noexcept;
  Status wait_load(LoadTicket ticket) noexcept;
  bool load_done(LoadTicket ticket) noexcept;
  void cancel_load(LoadTicket ticket) noexcept;
  ExpertView slot_view(Precision pool, std::size_t slot, const ExpertLayout& layout) const noexcept;
  Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept;
  /// On the CPU backend the master copy is host memory too: the same kernel, no copy.
  Status expert_ffn_at_source(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    return expert_ffn(e, x, n, y);
  }
  Status sync() noexcept { return Status::ok(); }
  std::uint64_t load_eta_ns(std::size_t bytes) const noexcept;
  std::uint64_t source_eta_ns(const ExpertLayout& layout, std::size_t n) const noexcept;

  ThreadPool& pool() noexcept { return *pool_; }
  const CpuBackendConfig& config() const noexcept { return config_; }

 private:
  struct Loader;
  struct Pool {
    std::unique_ptr<std::byte[]> arena;
    std::byte* base = nullptr;
    std::size_t slot_bytes = 0;
    std::size_t slots = 0;
  };
  static void copy_expert(std::byte* dst, const ExpertView& src, std::size_t chunk, ThreadPool* pool,
                          const std::atomic<bool>* cancel) noexcept;

  CpuBackendConfig config_;
  std::unique_ptr<ThreadPool> pool_;
  std::array<Pool, kPrecisionCount> pools_{};
  std::vector<float> workspace_;
  std::unique_ptr<Loader> loader_;
  LoadTicket next_ticket_ = 1;
};

static_assert(ExecutionBackend<CpuBackend>);

MOEX_NAMESPACE_END
