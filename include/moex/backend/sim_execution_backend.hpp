#pragma once
/// @file sim_execution_backend.hpp
/// SimExecutionBackend: the executor's backend interface over SimBackend's virtual clock, so the
/// very executor and policies that run on real hardware run on a trace without data.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/concepts/backend.hpp"

MOEX_NAMESPACE_BEGIN

/// Where simulated experts move and run.
struct SimExecutionConfig {
  SimLink load_link = SimLink::kHostToDevice;     ///< the link a miss or prefetch is loaded over
  SimDevice compute_device = SimDevice::kGpu;     ///< where resident experts run
  SimDevice source_device = SimDevice::kHostCpu;  ///< where an expert runs at its source
  /// Copies move in chunks of this size; a cancelled copy stops at the next chunk boundary and
  /// what is queued behind it moves up (as a copy engine fed chunk by chunk would). 0 = whole
  /// copies (not cancellable once started).
  std::uint64_t chunk_bytes = std::uint64_t{2} << 20;
};

/// An ExecutionBackend that moves no bytes: loads are copies on a SimBackend link, compute is
/// time on a SimBackend device, all on the virtual clock. The executor's thread is the host: it
/// blocks (the clock advances) only in wait_load and sync; compute is queued asynchronously, as
/// kernel launches are. A cancelled load gives the link back from its next chunk boundary (a copy
/// not yet started gives back all of it), and the copies queued behind it move up.
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
  std::size_t slot_count(Precision pool) const noexcept {
    return slots_[static_cast<std::size_t>(pool) % kPrecisionCount];
  }
  /// Queues the copy on the load link.
  Status start_load(Precision pool, std::size_t slot, const ExpertView& src, LoadTicket& ticket) noexcept {
    if (slot >= slot_count(pool)) return invalid_argument("SimExecutionBackend::start_load: slot out of range");
    prune();
    if (jobs_.size() >= kMaxJobs) return out_of_memory("SimExecutionBackend: too many copies queued");
    const std::uint64_t bytes = src.layout.total_bytes;
    const std::uint64_t end = sim_.submit_copy(config_.load_link, bytes);
    const LinkProfile& p = sim_.profile().links[static_cast<std::size_t>(config_.load_link)];
    const std::uint64_t duration = p.latency_ns + sim_duration_ns(bytes, p.bytes_per_s);
    jobs_.push_back({next_ticket_, bytes, end - std::min(end, duration), end});
    ticket = next_ticket_++;
    return Status::ok();
  }
  Status wait_load(LoadTicket ticket) noexcept {
    if (const Job* j = find(ticket)) sim_.advance_to(j->end);
    return Status::ok();
  }
  bool load_done(LoadTicket ticket) noexcept {
    const Job* j = find(ticket);
    return j == nullptr || j->end <= sim_.now();
  }
  void cancel_load(LoadTicket ticket) noexcept {
    const auto it = std::find_if(jobs_.begin(), jobs_.end(), [&](const Job& j) { return j.ticket == ticket; });
    if (it == jobs_.end() || it->end <= sim_.now()) return;
    const std::uint64_t now = sim_.now();
    std::uint64_t cut = it->start;  // not started: all of it goes
    if (it->start < now) {
      if (config_.chunk_bytes == 0) return;  // whole copies run to the end
      const LinkProfile& p = sim_.profile().links[static_cast<std::size_t>(config_.load_link)];
      const std::uint64_t chunk_ns = std::max<std::uint64_t>(1, sim_duration_ns(config_.chunk_bytes, p.bytes_per_s));
      cut = std::min(it->end, it->start + (now - it->start + chunk_ns - 1) / chunk_ns * chunk_ns);
    }
    const std::uint64_t removed = it->end - cut;
    const std::uint64_t moved_bytes = it->end > it->start
                                          ? static_cast<std::uint64_t>(static_cast<long double>(it->bytes) *
                                                                       static_cast<long double>(cut - it->start) /
                                                                       static_cast<long double>(it->end - it->start))
                                          : it->bytes;
    sim_.rewind_link(config_.load_link, removed, it->bytes - std::min(it->bytes, moved_bytes));
    for (auto later = it + 1; later != jobs_.end(); ++later) {
      later->start -= std::min(later->start, removed);
      later->end -= std::min(later->end, removed);
    }
    jobs_.erase(it);
  }
  ExpertView slot_view(Precision, std::size_t, const ExpertLayout& layout) const noexcept {
    return ExpertView{nullptr, nullptr, nullptr, layout, nullptr};
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
    return std::max(sim_.now(), sim_.link_free_at(config_.load_link)) + p.latency_ns +
           sim_duration_ns(bytes, p.bytes_per_s);
  }
  std::uint64_t source_eta_ns(const ExpertLayout& l, std::size_t n) const noexcept {
    return std::max(sim_.now(), sim_.device_free_at(config_.source_device)) +
           sim_.compute_ns(config_.source_device, l.format.precision, l.total_bytes, expert_flops(l.shape, n));
  }

  SimBackend& sim() noexcept { return sim_; }
  const SimBackend& sim() const noexcept { return sim_; }
  const SimExecutionConfig& config() const noexcept { return config_; }

 private:
  struct Job {
    LoadTicket ticket;
    std::uint64_t bytes, start, end;
  };
  static constexpr std::size_t kMaxJobs = std::size_t{1} << 20;

  const Job* find(LoadTicket t) const noexcept {
    for (const Job& j : jobs_)
      if (j.ticket == t) return &j;
    return nullptr;
  }
  /// Forgets copies that finished (they can no longer be cancelled or waited on).
  void prune() noexcept {
    const std::uint64_t now = sim_.now();
    std::size_t done = 0;
    while (done < jobs_.size() && jobs_[done].end <= now) ++done;
    if (done) jobs_.erase(jobs_.begin(), jobs_.begin() + static_cast<std::ptrdiff_t>(done));
  }

  SimBackend sim_;
  SimExecutionConfig config_;
  std::array<std::size_t, kPrecisionCount> slots_{};
  std::vector<Job> jobs_;  // copies queued or in flight on the load link, in queue order
  LoadTicket next_ticket_ = 1;
};

static_assert(ExecutionBackend<SimExecutionBackend>);

MOEX_NAMESPACE_END
