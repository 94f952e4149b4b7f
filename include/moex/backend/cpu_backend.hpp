#pragma once
/// @file cpu_backend.hpp
/// CpuBackend: the fast tier is host RAM, experts compute on the host CPU.

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <string>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
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
};

/// Host-memory slots for resident experts, a wall clock, and the CPU kernels.
///
/// Thread safety: one executor uses one backend from one thread.
class CpuBackend {
 public:
  /// Experts carry real weights here (see ExecutionBackend).
  static constexpr bool kHasData = true;

  /// Implicit, so that a CpuBackendConfig can stand where a backend is expected.
  CpuBackend(CpuBackendConfig config = {})  // NOLINT(google-explicit-constructor)
      : config_(config), pool_(std::make_unique<ThreadPool>(config.threads)) {}

  /// Clock in nanoseconds (steady wall time).
  std::uint64_t now_ns() const noexcept {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
  }

  /// Reserves `count` slots of `slot_bytes` each, once, up front (no allocation while decoding).
  Status allocate_slots(std::size_t slot_bytes, std::size_t count) noexcept {
    if (slot_bytes == 0 || count == 0) return invalid_argument("CpuBackend: zero slots");
    slot_bytes_ = align_up(slot_bytes, kMatrixAlign);
    arena_.reset(new (std::nothrow) std::byte[slot_bytes_ * count + kMatrixAlign]);
    if (!arena_) return out_of_memory("CpuBackend: cannot allocate " + std::to_string(slot_bytes_ * count) + " bytes of slots");
    base_ = reinterpret_cast<std::byte*>(align_up(reinterpret_cast<std::uintptr_t>(arena_.get()), kMatrixAlign));
    slots_ = count;
    return Status::ok();
  }
  std::size_t slot_count() const noexcept { return slots_; }

  /// Copies an expert into a slot (three matrices into one blob laid out by `dst_layout`, which
  /// must be the source's layout). Synchronous.
  Status load(std::size_t slot, const ExpertView& src) noexcept {
    if (slot >= slots_) return invalid_argument("CpuBackend::load: slot out of range");
    if (src.layout.total_bytes > slot_bytes_) return invalid_argument("CpuBackend::load: expert larger than a slot");
    std::byte* dst = base_ + slot * slot_bytes_;
    const ExpertLayout& l = src.layout;
    copy(dst + l.w1_offset, src.w1_data, l.w1.total_bytes);
    copy(dst + l.w3_offset, src.w3_data, l.w3.total_bytes);
    copy(dst + l.w2_offset, src.w2_data, l.w2.total_bytes);
    return Status::ok();
  }

  /// The resident expert in `slot`, laid out by `layout`.
  ExpertView slot_view(std::size_t slot, const ExpertLayout& layout) const noexcept {
    return ExpertView::contiguous(base_ + slot * slot_bytes_, layout);
  }

  /// Scratch floats large enough for expert_ffn over n tokens of `shape`.
  std::span<float> workspace(ExpertShape shape, std::size_t n) {
    const std::size_t need = expert_ffn_workspace(shape, n);
    if (workspace_.size() < need) workspace_.resize(need);
    return {workspace_.data(), need};
  }

  /// y = expert(x) for n tokens (f32, row-major [n x hidden]).
  Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
    std::span<float> ws;
    try {
      ws = workspace(e.layout.shape, n);
    } catch (...) {
      return out_of_memory("CpuBackend: workspace");
    }
    return moex::expert_ffn(e, x, n, y, ws, pool_.get());
  }

  ThreadPool& pool() noexcept { return *pool_; }

 private:
  void copy(std::byte* dst, const std::byte* src, std::size_t bytes) noexcept {
    // Large copies run on all threads: a single core cannot saturate host memory bandwidth.
    constexpr std::size_t kChunk = std::size_t{1} << 20;
    if (bytes < 4 * kChunk || pool_->size() == 1) {
      std::memcpy(dst, src, bytes);
      return;
    }
    pool_->parallel_for((bytes + kChunk - 1) / kChunk, 1, [&](std::size_t b, std::size_t e) {
      const std::size_t lo = b * kChunk, hi = std::min(bytes, e * kChunk);
      std::memcpy(dst + lo, src + lo, hi - lo);
    });
  }

  CpuBackendConfig config_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<std::byte[]> arena_;
  std::byte* base_ = nullptr;
  std::size_t slot_bytes_ = 0;
  std::size_t slots_ = 0;
  std::vector<float> workspace_;
};

static_assert(ExecutionBackend<CpuBackend>);

MOEX_NAMESPACE_END
