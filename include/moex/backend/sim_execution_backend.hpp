#pragma once
/// @file sim_execution_backend.hpp
/// SimExecutionBackend: the executor's backend interface over SimBackend's virtual clock, so the
/// very executor and policies that run on real hardware run on a trace without data.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "moex/backend/sim_backend.hpp"
#include "moex/concepts/backend.hpp"

MOEX_NAMESPACE_BEGIN

/// Where simulated experts move and run.
struct SimExecutionConfig {
  SimLink load_link = SimLink::kHostToDevice;      ///< the link a miss or prefetch is loaded over
  SimDevice compute_device = SimDevice::kGpu;      ///< where resident experts run
  SimDevice source_device = SimDevice::kHostCpu;   ///< where an expert runs at its source
};

/// An ExecutionBackend that moves no bytes: loads are copies on a SimBackend link, compute is
/// time on a SimBackend device, all on the virtual clock. The executor's thread is the host: it
/// blocks (the clock advances) only in wait_load and sync; compute is queued asynchronously, as
/// kernel launches are. Loads cannot be cancelled once queued (a real copy engine can only stop
/// between chunks; the simulator charges the whole copy).
class SimExecutionBackend {
 public:
  static constexpr bool kHasData = false;

  explicit SimExecutionBackend(DeviceProfile profile, SimExecutionConfig config = {}) noexcept
      : sim_(std::move(profile)), config_(config) {}

  std::uint64_t now_ns() const noexcept { return sim_.now(); }
  Status allocate_slots(Precision pool, std::size_t slot_bytes, std::size_t count) noexcept {
    if (slot_bytes == 0 || count == 0) return invalid_argument("SimExecutionBackend: zero slots");
    slots_[static_cast<std::size_t>(pool) % kPrecisionCount] = count;
    return Status::ok();
  }
  std::size_t slot_count(Precision pool) const noexcept { return slots_[static_cast<std::size_t>(pool) % kPrecisionCount]; }
  /// Queues the copy on the load link; the ticket is its completion time.
  Status start_load(Precision pool, std::size_t slot, const ExpertView& src, LoadTicket& ticket) noexcept {
    if (slot >= slot_count(pool)) return invalid_argument("SimExecutionBackend::start_load: slot out of range");
    ticket = sim_.submit_copy(config_.load_link, src.layout.total_bytes);
    return Status::ok();
  }
  Status wait_load(LoadTicket ticket) noexcept {
    sim_.advance_to(ticket);
    return Status::ok();
  }
  bool load_done(LoadTicket ticket) noexcept { return ticket <= sim_.now(); }
  void cancel_load(LoadTicket) noexcept {}
  ExpertView slot_view(Precision, std::size_t, const ExpertLayout& layout) const noexcept {
    return ExpertView{nullptr, nullptr, nullptr, layout};
  }
  /// Queues the expert on the compute device (weight bytes read once, 6·hidden·ffn FLOPs a token).
  Status expert_ffn(const ExpertView& e, const float*, std::size_t n, float*) noexcept {
    sim_.submit_compute(config_.compute_device, e.layout.format.precision, e.layout.total_bytes,
                        expert_flops(e.layout.shape, n));
    return Status::ok();
  }
  /// Queues the expert on the host CPU, where its master copy lives.
  Status expert_ffn_at_source(const ExpertView& e, const float*, std::size_t n, float*) noexcept {
    sim_.submit_compute(config_.source_device, e.layout.format.precision, e.layout.total_bytes,
                        expert_flops(e.layout.shape, n));
    return Status::ok();
  }
  /// Waits for all queued compute.
  Status sync() noexcept {
    sim_.advance_to(std::max(sim_.device_free_at(config_.compute_device), sim_.device_free_at(config_.source_device)));
    return Status::ok();
  }
  std::uint64_t load_eta_ns(std::size_t bytes) const noexcept {
    const LinkProfile& p = sim_.profile().links[static_cast<std::size_t>(config_.load_link)];
    return std::max(sim_.now(), sim_.link_free_at(config_.load_link)) + p.latency_ns + sim_duration_ns(bytes, p.bytes_per_s);
  }
  std::uint64_t source_eta_ns(const ExpertLayout& l, std::size_t n) const noexcept {
    return std::max(sim_.now(), sim_.device_free_at(config_.source_device)) +
           sim_.compute_ns(config_.source_device, l.format.precision, l.total_bytes, expert_flops(l.shape, n));
  }

  SimBackend& sim() noexcept { return sim_; }
  const SimBackend& sim() const noexcept { return sim_; }
  const SimExecutionConfig& config() const noexcept { return config_; }

 private:
  SimBackend sim_;
  SimExecutionConfig config_;
  std::array<std::size_t, kPrecisionCount> slots_{};
};

static_assert(ExecutionBackend<SimExecutionBackend>);

MOEX_NAMESPACE_END
