#include "moex/backend/cpu_backend.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

MOEX_NAMESPACE_BEGIN

// The background loader: FIFO jobs copied in chunks; a job's ticket is complete once the loader
// has passed it (copied or cancelled).
struct CpuBackend::Loader {
  struct Job {
    LoadTicket ticket;
    std::byte* dst;
    ExpertView src;
    std::shared_ptr<std::atomic<bool>> cancel;
  };
  std::mutex mu;
  std::condition_variable cv_job, cv_done;
  std::deque<Job> jobs;
  std::vector<std::pair<LoadTicket, std::shared_ptr<std::atomic<bool>>>> live;  // queued or running
  LoadTicket completed = 0;                                                     // every ticket <= completed is done
  bool stop = false;
  std::thread thread;
};

CpuBackend::CpuBackend(CpuBackendConfig config) : config_(config), pool_(std::make_unique<ThreadPool>(config.threads)) {
  if (config_.chunk_bytes == 0) config_.chunk_bytes = std::size_t{1} << 20;
  if (config_.load_bytes_per_s == 0) config_.load_bytes_per_s = 10'000'000'000ull;
  if (config_.source_bytes_per_s == 0) config_.source_bytes_per_s = 10'000'000'000ull;
  if (config_.async_loads) {
    loader_ = std::make_unique<Loader>();
    Loader* l = loader_.get();
    const std::size_t chunk = config_.chunk_bytes;
    // The thread must not capture `this`: the backend may be moved while it runs.
    l->thread = std::thread([l, chunk] {
      for (;;) {
        Loader::Job job;
        {
          std::unique_lock lk(l->mu);
          l->cv_job.wait(lk, [&] { return l->stop || !l->jobs.empty(); });
          if (l->stop && l->jobs.empty()) return;
          job = l->jobs.front();
          l->jobs.pop_front();
        }
        if (!job.cancel->load(std::memory_order_relaxed))
          copy_expert(job.dst, job.src, chunk, nullptr, job.cancel.get());
        {
          std::lock_guard lk(l->mu);
          l->completed = job.ticket;
          l->live.erase(
              std::remove_if(l->live.begin(), l->live.end(), [&](const auto& p) { return p.first == job.ticket; }),
              l->live.end());
        }
        l->cv_done.notify_all();
      }
    });
  }
}

CpuBackend::CpuBackend(CpuBackend&&) noexcept = default;
CpuBackend& CpuBackend::operator=(CpuBackend&&) noexcept = default;

CpuBackend::~CpuBackend() {
  if (loader_) {
    {
      std::lock_guard lk(loader_->mu);
      loader_->stop = true;
    }
    loader_->cv_job.notify_all();
    loader_->thread.join();
  }
}

Status CpuBackend::allocate_slots(Precision pool, std::size_t slot_bytes, std::size_t count) noexcept {
  const auto p = static_cast<std::size_t>(pool);
  if (p >= kPrecisionCount) return invalid_argument("CpuBackend: bad pool");
  if (slot_bytes == 0 || count == 0) return invalid_argument("CpuBackend: zero slots");
  Pool& pl = pools_[p];
  pl.slot_bytes = align_up(slot_bytes, kMatrixAlign);
  if (count > (std::size_t{1} << 40) / pl.slot_bytes) return out_of_memory("CpuBackend: slot arena too large");
  pl.arena.reset(new (std::nothrow) std::byte[pl.slot_bytes * count + kMatrixAlign]);
  if (!pl.arena)
    return out_of_memory("CpuBackend: cannot allocate " + std::to_string(pl.slot_bytes * count) + " bytes of slots");
  pl.base = reinterpret_cast<std::byte*>(align_up(reinterpret_cast<std::uintptr_t>(pl.arena.get()), kMatrixAlign));
  pl.slots = count;
  return Status::ok();
}

std::size_t CpuBackend::slot_count(Precision pool) const noexcept {
  const auto p = static_cast<std::size_t>(pool);
  return p < kPrecisionCount ? pools_[p].slots : 0;
}

void CpuBackend::copy_expert(std::byte* dst, const ExpertView& src, std::size_t chunk, ThreadPool* pool,
                             const std::atomic<bool>* cancel) noexcept {
  const ExpertLayout& l = src.layout;
  const std::pair<std::size_t, std::pair<const std::byte*, std::size_t>> parts[3] = {
      {l.w1_offset, {src.w1_data, l.w1.total_bytes}},
      {l.w3_offset, {src.w3_data, l.w3.total_bytes}},
      {l.w2_offset, {src.w2_data, l.w2.total_bytes}}};
  for (const auto& part : parts) {
    // Plain locals: clang 14 cannot capture structured bindings in the lambda below.
    const std::byte* from = part.second.first;
    const std::size_t bytes = part.second.second;
    std::byte* to = dst + part.first;
    if (pool != nullptr && bytes >= 4 * chunk && pool->size() > 1) {
      // Synchronous large copy: all cores (one core cannot saturate host memory bandwidth).
      pool->parallel_for((bytes + chunk - 1) / chunk, 1, [&](std::size_t b, std::size_t e) {
        const std::size_t lo = b * chunk, hi = std::min(bytes, e * chunk);
        std::memcpy(to + lo, from + lo, hi - lo);
      });
      continue;
    }
    for (std::size_t lo = 0; lo < bytes; lo += chunk) {
      if (cancel && cancel->load(std::memory_order_relaxed)) return;
      std::memcpy(to + lo, from + lo, std::min(chunk, bytes - lo));
    }
  }
}

Status CpuBackend::start_load(Precision pool, std::size_t slot, const ExpertView& src, LoadTicket& ticket) noexcept {
  const auto p = static_cast<std::size_t>(pool);
  if (p >= kPrecisionCount || slot >= pools_[p].slots)
    return invalid_argument("CpuBackend::start_load: slot out of range");
  if (!src.valid()) return invalid_argument("CpuBackend::start_load: the source has no data");
  if (src.layout.total_bytes > pools_[p].slot_bytes)
    return invalid_argument("CpuBackend::start_load: expert larger than a slot");
  std::byte* dst = pools_[p].base + slot * pools_[p].slot_bytes;
  ticket = next_ticket_++;
  if (!loader_) {
    copy_expert(dst, src, config_.chunk_bytes, pool_.get(), nullptr);
    return Status::ok();
  }
  try {
    auto cancel = std::make_shared<std::atomic<bool>>(false);
    std::lock_guard lk(loader_->mu);
    loader_->jobs.push_back({ticket, dst, src, cancel});
    loader_->live.emplace_back(ticket, cancel);
  } catch (...) {
    return out_of_memory("CpuBackend::start_load");
  }
  loader_->cv_job.notify_one();
  return Status::ok();
}

Status CpuBackend::wait_load(LoadTicket ticket) noexcept {
  if (!loader_) return Status::ok();
  std::unique_lock lk(loader_->mu);
  loader_->cv_done.wait(lk, [&] { return loader_->completed >= ticket; });
  return Status::ok();
}

bool CpuBackend::load_done(LoadTicket ticket) noexcept {
  if (!loader_) return true;
  std::lock_guard lk(loader_->mu);
  return loader_->completed >= ticket;
}

void CpuBackend::cancel_load(LoadTicket ticket) noexcept {
  if (!loader_) return;
  std::lock_guard lk(loader_->mu);
  for (auto& [t, flag] : loader_->live)
    if (t == ticket) flag->store(true, std::memory_order_relaxed);
}

ExpertView CpuBackend::slot_view(Precision pool, std::size_t slot, const ExpertLayout& layout) const noexcept {
  const Pool& pl = pools_[static_cast<std::size_t>(pool) % kPrecisionCount];
  return ExpertView::contiguous(pl.base + slot * pl.slot_bytes, layout);
}

Status CpuBackend::expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
  const std::size_t need = expert_ffn_workspace(e.layout.shape, n);
  if (workspace_.size() < need) {
    try {
      workspace_.resize(need);
    } catch (...) {
      return out_of_memory("CpuBackend: workspace");
    }
  }
  return moex::expert_ffn(e, x, n, y, std::span<float>(workspace_.data(), need), pool_.get());
}

std::uint64_t CpuBackend::load_eta_ns(std::size_t bytes) const noexcept {
  return now_ns() +
         static_cast<std::uint64_t>(static_cast<double>(bytes) * 1e9 / static_cast<double>(config_.load_bytes_per_s));
}

std::uint64_t CpuBackend::source_eta_ns(const ExpertLayout& layout, std::size_t /*n*/) const noexcept {
  return now_ns() + static_cast<std::uint64_t>(static_cast<double>(layout.total_bytes) * 1e9 /
                                               static_cast<double>(config_.source_bytes_per_s));
}

MOEX_NAMESPACE_END
