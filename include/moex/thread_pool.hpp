#pragma once
/// @file thread_pool.hpp
/// A small fixed-size thread pool for data-parallel loops (expert FFN rows, quantization, loads).

#include <cstddef>
#include <functional>
#include <memory>

#include "moex/version.hpp"

MOEX_NAMESPACE_BEGIN

/// A fixed set of worker threads that run one parallel loop at a time.
///
/// Thread safety: parallel_for may be called from several threads; calls are serialized.
/// The calling thread takes part in the work, so a pool of size 1 runs loops inline.
class ThreadPool {
 public:
  /// Body of a parallel loop over [begin, end).
  using RangeFn = std::function<void(std::size_t begin, std::size_t end)>;

  /// `threads` workers in all, the caller included; 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(std::size_t threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Number of threads that run a loop (the caller included).
  std::size_t size() const noexcept;

  /// Runs fn over [0, n) cut into chunks of at least `grain` items; returns when all are done.
  /// fn must not throw and must not call parallel_for on the same pool.
  void parallel_for(std::size_t n, std::size_t grain, const RangeFn& fn) noexcept;

  /// A process-wide pool sized to the machine, created on first use.
  static ThreadPool& global();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

MOEX_NAMESPACE_END
