#include "moex/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

MOEX_NAMESPACE_BEGIN

struct ThreadPool::Impl {
  std::vector<std::thread> workers;
  std::mutex call_mu;  // serializes parallel_for callers
  std::mutex mu;
  std::condition_variable cv_work;
  std::condition_variable cv_done;
  std::uint64_t generation = 0;
  bool stop = false;
  // the current loop
  const RangeFn* fn = nullptr;
  std::size_t n = 0;
  std::size_t chunk = 1;
  std::atomic<std::size_t> next{0};
  std::size_t active = 0;

  void run_chunks() {
    for (;;) {
      const std::size_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= n) return;
      (*fn)(b, std::min(n, b + chunk));
    }
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lk(mu);
        cv_work.wait(lk, [&] { return stop || generation != seen; });
        if (stop) return;
        seen = generation;
      }
      run_chunks();
      {
        std::lock_guard lk(mu);
        if (--active == 0) cv_done.notify_one();
      }
    }
  }
};

ThreadPool::ThreadPool(std::size_t threads) : impl_(std::make_unique<Impl>()) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  for (std::size_t i = 1; i < threads; ++i) impl_->workers.emplace_back([this] { impl_->worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lk(impl_->mu);
    impl_->stop = true;
  }
  impl_->cv_work.notify_all();
  for (auto& t : impl_->workers) t.join();
}

std::size_t ThreadPool::size() const noexcept { return impl_->workers.size() + 1; }

void ThreadPool::parallel_for(std::size_t n, std::size_t grain, const RangeFn& fn) noexcept {
  if (n == 0) return;
  grain = std::max<std::size_t>(1, grain);
  const std::size_t threads = size();
  if (threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  std::lock_guard call_lk(impl_->call_mu);
  Impl& s = *impl_;
  {
    std::lock_guard lk(s.mu);
    s.fn = &fn;
    s.n = n;
    // ~4 chunks per thread balances load without much contention.
    s.chunk = std::max(grain, (n + threads * 4 - 1) / (threads * 4));
    s.next.store(0, std::memory_order_relaxed);
    s.active = s.workers.size();
    ++s.generation;
  }
  s.cv_work.notify_all();
  s.run_chunks();
  std::unique_lock lk(s.mu);
  s.cv_done.wait(lk, [&] { return s.active == 0; });
  s.fn = nullptr;
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(0);
  return pool;
}

MOEX_NAMESPACE_END
