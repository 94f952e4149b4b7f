#pragma once
/// @file sim_backend.hpp
/// SimBackend: a backend with a virtual clock (integer nanoseconds) and no data. Copies and expert
/// computations are costed from a DeviceProfile and queued on resources that run concurrently.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include "moex/status.hpp"
#include "moex/types.hpp"

MOEX_NAMESPACE_BEGIN

/// A copy engine between two tiers. Each is one FIFO queue.
enum class SimLink : std::uint8_t {
  kDiskToHost = 0,      ///< file (page cache miss) -> host RAM
  kHostToDevice = 1,    ///< pinned host RAM -> GPU memory (PCIe)
  kDeviceToDevice = 2,  ///< GPU memory -> GPU memory
};
/// Number of SimLink values.
inline constexpr std::size_t kSimLinkCount = 3;

/// Where an expert can be computed. Each is one FIFO queue.
enum class SimDevice : std::uint8_t {
  kGpu = 0,      ///< the accelerator, reading weights from device memory
  kHostCpu = 1,  ///< the host CPU, reading weights from host RAM (the "run it where it lives" path)
};
/// Number of SimDevice values.
inline constexpr std::size_t kSimDeviceCount = 2;

/// Cost of one link: time = latency_ns + ceil(bytes * 1e9 / bytes_per_s).
struct LinkProfile {
  std::uint64_t latency_ns = 0;
  std::uint64_t bytes_per_s = 0;  ///< 0 means infinite bandwidth
};

/// Cost of computing on one device, a roofline: time = launch_ns + max(ceil(bytes * 1e9 /
/// read_bytes_per_s), ceil(flops * 1e9 / rate(precision))).
struct ComputeProfile {
  std::uint64_t read_bytes_per_s = 0;  ///< effective weight-read bandwidth; 0 = infinite
  std::uint64_t flops_per_s = 0;       ///< default FLOP rate; 0 = infinite
  /// Per-precision FLOP rate (e.g. fp8 tensor cores); 0 falls back to flops_per_s.
  std::array<std::uint64_t, kPrecisionCount> flops_per_s_by_precision{};
  std::uint64_t launch_ns = 0;  ///< fixed overhead per computation (kernel launches, wake-up)

  /// The FLOP rate used for `p`.
  std::uint64_t rate(Precision p) const noexcept {
    const std::size_t i = static_cast<std::size_t>(p);
    return i < kPrecisionCount && flops_per_s_by_precision[i] ? flops_per_s_by_precision[i] : flops_per_s;
  }
};

/// Everything SimBackend needs to cost a run on one machine (bench/profiles/*.json).
struct DeviceProfile {
  std::string name;
  std::array<LinkProfile, kSimLinkCount> links{};
  std::array<ComputeProfile, kSimDeviceCount> compute{};
  std::uint64_t host_memcpy_bytes_per_s = 0;  ///< host memcpy, read+write (informational)
};

/// Parses a profile from JSON text (see bench/profiles/h100_pcie5.json for the schema).
Result<DeviceProfile> parse_device_profile(std::string_view json);
/// Reads a profile file.
Result<DeviceProfile> load_device_profile(const std::filesystem::path& path);
/// The profile as JSON text that parse_device_profile reads back unchanged.
std::string device_profile_to_json(const DeviceProfile& profile);

/// ceil(amount * 1e9 / per_second) in integer nanoseconds; 0 when per_second is 0 (infinite).
constexpr std::uint64_t sim_duration_ns(std::uint64_t amount, std::uint64_t per_second) noexcept {
  if (per_second == 0 || amount == 0) return 0;
  // Split to stay in 64 bits: amount = q * per_second + r with r < per_second.
  const std::uint64_t q = amount / per_second;
  const std::uint64_t r = amount % per_second;
  // Fast path, same value: r * 1e9 + per_second - 1 fits in 64 bits (always when per_second <= 1.8e10).
  constexpr std::uint64_t kMax = ~std::uint64_t{0};
  if (r <= (kMax - (per_second - 1)) / 1000000000u)
    return q * 1000000000u + (r * 1000000000u + per_second - 1) / per_second;
  // r * 1e9 may overflow 64 bits when per_second > 1.8e10; use the extension type for it.
  __extension__ using U128 = unsigned __int128;
  const U128 frac = (static_cast<U128>(r) * 1000000000u + per_second - 1) / per_second;
  return q * 1000000000u + static_cast<std::uint64_t>(frac);
}

/// FLOPs of a SwiGLU expert FFN over `tokens` tokens: three matrix products, 2 FLOPs per
/// multiply-add (the elementwise SiLU and product are negligible and left out).
constexpr std::uint64_t expert_flops(ExpertShape shape, std::uint64_t tokens) noexcept {
  return 6ull * shape.hidden * shape.ffn * tokens;
}

/// Counters of one queue.
struct SimQueueStats {
  std::uint64_t operations = 0;
  std::uint64_t bytes = 0;
  std::uint64_t busy_ns = 0;  ///< sum of the durations of its operations
};

/// SimBackend — a virtual clock and one FIFO queue per link and per compute device.
///
/// Every submission names the earliest time it may start (`not_before_ns`, typically now() or the
/// completion time of what it depends on); it starts at max(not_before_ns, when its queue is free)
/// and returns its completion time. Queues run concurrently with each other, so copies overlap
/// compute exactly as streams do on a GPU. All arithmetic is in integer nanoseconds, so replays
/// are exact and deterministic. The clock itself only moves with advance_to(): the executor
/// advances it when it waits for a result.
class SimBackend {
 public:
  /// A backend with a zero clock over `profile`.
  explicit SimBackend(DeviceProfile profile) noexcept : profile_(std::move(profile)) {}

  /// Queues a copy of `bytes` on `link`; returns its completion time.
  std::uint64_t submit_copy(SimLink link, std::uint64_t bytes, std::uint64_t not_before_ns) noexcept {
    const LinkProfile& p = profile_.links[static_cast<std::size_t>(link)];
    return enqueue(static_cast<std::size_t>(link), bytes, p.latency_ns + sim_duration_ns(bytes, p.bytes_per_s),
                   not_before_ns);
  }
  /// submit_copy not before now().
  std::uint64_t submit_copy(SimLink link, std::uint64_t bytes) noexcept { return submit_copy(link, bytes, now_); }

  /// Time of one computation reading `bytes` of weights and doing `flops` at `precision`.
  std::uint64_t compute_ns(SimDevice device, Precision precision, std::uint64_t bytes,
                           std::uint64_t flops) const noexcept {
    const ComputeProfile& c = profile_.compute[static_cast<std::size_t>(device)];
    return c.launch_ns +
           std::max(sim_duration_ns(bytes, c.read_bytes_per_s), sim_duration_ns(flops, c.rate(precision)));
  }
  /// Queues a computation on `device`; returns its completion time.
  std::uint64_t submit_compute(SimDevice device, Precision precision, std::uint64_t bytes, std::uint64_t flops,
                               std::uint64_t not_before_ns) noexcept {
    return enqueue(kSimLinkCount + static_cast<std::size_t>(device), bytes, compute_ns(device, precision, bytes, flops),
                   not_before_ns);
  }
  /// submit_compute not before now().
  std::uint64_t submit_compute(SimDevice device, Precision precision, std::uint64_t bytes,
                               std::uint64_t flops) noexcept {
    return submit_compute(device, precision, bytes, flops, now_);
  }

  /// The virtual clock.
  std::uint64_t now() const noexcept { return now_; }
  /// Moves the clock forward to t (never backward); returns now().
  std::uint64_t advance_to(std::uint64_t t) noexcept {
    now_ = std::max(now_, t);
    return now_;
  }
  /// When a queue becomes free.
  std::uint64_t link_free_at(SimLink link) const noexcept { return free_at_[static_cast<std::size_t>(link)]; }
  std::uint64_t device_free_at(SimDevice device) const noexcept {
    return free_at_[kSimLinkCount + static_cast<std::size_t>(device)];
  }
  /// Counters of a queue.
  const SimQueueStats& link_stats(SimLink link) const noexcept { return stats_[static_cast<std::size_t>(link)]; }
  const SimQueueStats& device_stats(SimDevice device) const noexcept {
    return stats_[kSimLinkCount + static_cast<std::size_t>(device)];
  }
  /// Takes back the last `ns` of a link's queue (a cancelled copy that will not move `bytes`):
  /// what is queued behind it moves up. Used by backends whose copies stop between chunks.
  void rewind_link(SimLink link, std::uint64_t ns, std::uint64_t bytes) noexcept {
    const std::size_t q = static_cast<std::size_t>(link);
    ns = std::min(ns, free_at_[q] > now_ ? free_at_[q] - now_ : 0);
    free_at_[q] -= ns;
    stats_[q].busy_ns -= std::min(ns, stats_[q].busy_ns);
    stats_[q].bytes -= std::min(bytes, stats_[q].bytes);
  }
  /// Clock, queues and counters back to zero.
  void reset() noexcept {
    now_ = 0;
    free_at_ = {};
    stats_ = {};
  }
  const DeviceProfile& profile() const noexcept { return profile_; }

 private:
  static constexpr std::size_t kQueues = kSimLinkCount + kSimDeviceCount;

  std::uint64_t enqueue(std::size_t q, std::uint64_t bytes, std::uint64_t duration, std::uint64_t not_before) noexcept {
    const std::uint64_t start = std::max(not_before, free_at_[q]);
    free_at_[q] = start + duration;
    ++stats_[q].operations;
    stats_[q].bytes += bytes;
    stats_[q].busy_ns += duration;
    return free_at_[q];
  }

  DeviceProfile profile_;
  std::uint64_t now_ = 0;
  std::array<std::uint64_t, kQueues> free_at_{};
  std::array<SimQueueStats, kQueues> stats_{};
};

MOEX_NAMESPACE_END
