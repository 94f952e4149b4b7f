#pragma once
/// @file sim_execution_backend.hpp
/// SimExecutionBackend: the executor's backend interface over SimBackend's virtual clock, so the
/// very executor and policies that run on real hardware run on a trace without data.

#include <cstddef>
#include <cstdint>
#include <utility>

#include "moex/backend/sim_backend.hpp"
#include "moex/concepts/backend.hpp"

MOEX_NAMESPACE_BEGIN

/// Where simulated experts move and run.
struct SimExecutionConfig {
  SimLink load_link = SimLink::kHostToDevice;  ///< the link a miss is loaded over
  SimDevice compute_device = SimDevice::kGpu;  ///< where resident experts run
};

/// An ExecutionBackend that moves no bytes: loads are copies on a SimBackend link and compute is
/// time on a SimBackend device, both on the virtual clock.
class SimExecutionBackend {
 public:
  static constexpr bool kHasData = false;

  explicit SimExecutionBackend(DeviceProfile profile, SimExecutionConfig config = {}) noexcept
      : sim_(std::move(profile)), config_(config) {}

  std::uint64_t now_ns() const noexcept { return sim_.now(); }
  Status allocate_slots(std::size_t slot_bytes, std::size_t count) noexcept {
    if (slot_bytes == 0 || count == 0) return invalid_argument("SimExecutionBackend: zero slots");
    slots_ = count;
    return Status::ok();
  }
  std::size_t slot_count() const noexcept { return slots_; }
  /// Queues the copy on the load link and waits for it (the clock moves to its completion).
  Status load(std::size_t slot, const ExpertView& src) noexcept {
    if (slot >= slots_) return invalid_argument("SimExecutionBackend::load: slot out of range");
    sim_.advance_to(sim_.submit_copy(config_.load_link, src.layout.total_bytes));
    return Status::ok();
  }
  ExpertView slot_view(std::size_t /*slot*/, const ExpertLayout& layout) const noexcept {
    return ExpertView{nullptr, nullptr, nullptr, layout};
  }
  /// Queues the expert's compute (weight bytes read once, 6·hidden·ffn FLOPs per token) and waits.
  Status expert_ffn(const ExpertView& e, const float* /*x*/, std::size_t n, float* /*y*/) noexcept {
    const std::uint64_t t = sim_.submit_compute(config_.compute_device, e.layout.format.precision,
                                                e.layout.total_bytes, expert_flops(e.layout.shape, n));
    sim_.advance_to(t);
    return Status::ok();
  }

  SimBackend& sim() noexcept { return sim_; }
  const SimBackend& sim() const noexcept { return sim_; }

 private:
  SimBackend sim_;
  SimExecutionConfig config_;
  std::size_t slots_ = 0;
};

static_assert(ExecutionBackend<SimExecutionBackend>);

MOEX_NAMESPACE_END
