// CudaExecutionBackend: the executor's backend on one GPU (cudart + kernels.hpp; host experts
// through moex::expert_ffn on an internal worker thread).
#include "moex/backend/cuda_execution_backend.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "moex/cpu/expert_ffn.hpp"
#include "moex/store/expert_store.hpp"
#include "moex/thread_pool.hpp"

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

constexpr int kStagingHalves = 2;
constexpr std::uint64_t kDefaultHostBytesPerS = 20'000'000'000ull;
constexpr unsigned kSlotBits = 24;  // ticket = seq << 32 | pool << 24 | slot

Status check(cudaError_t e, const char* what) noexcept { return cuda::cuda_status(e, what); }

std::uint64_t steady_ns() noexcept {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

std::uint64_t duration_ns(std::uint64_t bytes, std::uint64_t per_s) noexcept {
  if (per_s == 0) return 0;
  return static_cast<std::uint64_t>(static_cast<double>(bytes) * 1e9 / static_cast<double>(per_s));
}

bool is_pinned(const void* p) noexcept {
  cudaPointerAttributes attr{};
  const bool pinned = cudaPointerGetAttributes(&attr, p) == cudaSuccess && attr.type == cudaMemoryTypeHost;
  cudaGetLastError();
  return pinned;
}

/// The host ranges of every copy a store holds, adjacent ones merged (gaps under a page).
std::vector<std::pair<const std::byte*, std::size_t>> store_ranges(const ExpertStore& store) {
  std::vector<std::pair<const std::byte*, std::size_t>> r;
  const MoeModelSpec& spec = store.spec();
  for (Precision p : store.precisions())
    for (std::uint32_t l = 0; l < spec.n_layers; ++l)
      for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
        auto v = store.view({l, e}, p);
        if (!v || !v->valid()) continue;
        r.emplace_back(v->w1_data, v->layout.w1.total_bytes);
        r.emplace_back(v->w3_data, v->layout.w3.total_bytes);
        r.emplace_back(v->w2_data, v->layout.w2.total_bytes);
      }
  std::sort(r.begin(), r.end());
  std::vector<std::pair<const std::byte*, std::size_t>> merged;
  for (const auto& [p, n] : r) {
    if (!merged.empty()) {
      auto& [mp, mn] = merged.back();
      const std::byte* end = mp + mn;
      if (p <= end + 4096) {
        if (p + n > end) mn = static_cast<std::size_t>(p + n - mp);
        continue;
      }
    }
    merged.emplace_back(p, n);
  }
  return merged;
}

}  // namespace

struct CudaExecutionBackend::Impl {
  struct Pool {
    std::byte* base = nullptr;
    std::size_t stride = 0;
    std::size_t count = 0;
    std::vector<cudaEvent_t> filled, released;
    std::vector<std::uint32_t> seq;  // per slot: sequence number of its last load
  };
  struct Pending {
    float* y = nullptr;
    std::size_t row = 0;
    std::size_t floats = 0;
  };
  /// An expert_ffn call recorded for the step's graph (use_cuda_graphs).
  struct Deferred {
    ExpertView e{};
    std::size_t n = 0, row = 0, pool = 0, slot = 0;
  };
  /// An instantiated step graph and the call sequence it replays.
  struct GraphEntry {
    std::vector<std::uint64_t> key;
    cudaGraphExec_t exec = nullptr;
    std::uint64_t last_used = 0;
  };
  struct HostJob {
    ExpertView e{};
    const float* x = nullptr;
    std::size_t n = 0;
    float* y = nullptr;
  };

  CudaExecutionBackendConfig config{};
  std::size_t hmax = 0;  // row stride of the activation buffers (floats)
  cudaStream_t compute = nullptr, copy = nullptr;
  bool own_compute = false;
  cublasContext* cublas = nullptr;
  cuda::LtContext* lt = nullptr;
  std::vector<Deferred> deferred;                        // graph mode: this step's calls, not launched yet
  std::unordered_map<std::uint64_t, GraphEntry> graphs;  // by hash of the key
  std::uint64_t graph_clock = 0;
  std::array<Pool, kPrecisionCount> pools{};
  float* d_x = nullptr;
  float* d_y = nullptr;
  float* d_ws = nullptr;          // grouped-kernel workspace (one expert)
  std::uint16_t* d_xb = nullptr;  // cuBLAS path: bf16 (or f16) x
  float* d_h1 = nullptr;          // cuBLAS path: gate and up products
  float* d_h3 = nullptr;
  std::uint16_t* d_hb = nullptr;  // cuBLAS path: bf16 (or f16) activation
  float* h_x = nullptr;           // pinned
  float* h_y = nullptr;           // pinned
  std::byte* staging = nullptr;   // pinned
  cudaEvent_t staging_done[kStagingHalves] = {};
  std::vector<Pending> pending;
  std::size_t rows_used = 0;
  std::uint64_t link_free_ns = 0;
  std::uint64_t pcie_rate = 0;
  std::uint64_t host_rate = kDefaultHostBytesPerS;
  CudaExecutionCounters counters{};

  // Host worker.
  std::unique_ptr<ThreadPool> host_pool;
  std::vector<float> host_x;  // copies of x for host jobs, [max_rows x hmax]
  std::vector<float> host_ws;
  std::vector<HostJob> jobs;  // ring of capacity max_rows
  std::size_t host_rows_used = 0;
  std::mutex mu;
  std::condition_variable cv_job, cv_done;
  std::size_t submitted = 0, finished = 0;  // guarded by mu
  Status host_error;                        // guarded by mu
  std::uint64_t host_busy_ns = 0;           // guarded by mu
  std::uint64_t host_free_ns = 0;           // executor thread only
  bool stop = false;
  std::thread worker;

  ~Impl() {
    if (worker.joinable()) {
      {
        std::lock_guard lk(mu);
        stop = true;
      }
      cv_job.notify_all();
      worker.join();
    }
    if (copy) cudaStreamSynchronize(copy);
    if (compute) cudaStreamSynchronize(compute);
    for (Pool& p : pools) {
      for (cudaEvent_t e : p.filled) cudaEventDestroy(e);
      for (cudaEvent_t e : p.released) cudaEventDestroy(e);
      if (p.base) cudaFree(p.base);
    }
    for (cudaEvent_t e : staging_done)
      if (e) cudaEventDestroy(e);
    if (cublas) cuda::cublas_destroy(cublas);
    if (lt) cuda::lt_destroy(lt);
    for (auto& [h, g] : graphs)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    if (copy) cudaStreamDestroy(copy);
    if (own_compute && compute) cudaStreamDestroy(compute);
    for (void* p :
         {static_cast<void*>(d_x), static_cast<void*>(d_y), static_cast<void*>(d_ws), static_cast<void*>(d_xb),
          static_cast<void*>(d_h1), static_cast<void*>(d_h3), static_cast<void*>(d_hb)})
      if (p) cudaFree(p);
    for (void* p : {static_cast<void*>(h_x), static_cast<void*>(h_y), static_cast<void*>(staging)})
      if (p) cudaFreeHost(p);
  }

  void run_worker() noexcept {
    std::size_t next = 0;
    for (;;) {
      HostJob job;
      {
        std::unique_lock lk(mu);
        cv_job.wait(lk, [&] { return stop || next < submitted; });
        if (next >= submitted) return;  // stop, nothing queued
        job = jobs[next % jobs.size()];
      }
      const std::uint64_t t0 = steady_ns();
      const std::size_t need = expert_ffn_workspace(job.e.layout.shape, job.n);
      Status s = need <= host_ws.size() ? moex::expert_ffn(job.e, job.x, job.n, job.y,
                                                           std::span<float>(host_ws.data(), need), host_pool.get())
                                        : invalid_argument("CudaExecutionBackend: host workspace too small");
      const std::uint64_t dt = steady_ns() - t0;
      {
        std::lock_guard lk(mu);
        if (!s.is_ok() && host_error.is_ok()) host_error = std::move(s);
        host_busy_ns += dt;
        finished = ++next;
      }
      cv_done.notify_all();
    }
  }

  /// Finds the pool and slot a device view points into.
  bool locate(const std::byte* p, std::size_t& pool, std::size_t& slot) const noexcept {
    for (std::size_t i = 0; i < pools.size(); ++i) {
      const Pool& pl = pools[i];
      if (pl.base && p >= pl.base && p < pl.base + pl.stride * pl.count) {
        pool = i;
        slot = static_cast<std::size_t>(p - pl.base) / pl.stride;
        return true;
      }
    }
    return false;
  }

  /// Copies one host range into device memory on the copy stream (direct when pinned).
  Status upload(std::byte* dst, const std::byte* src, std::size_t bytes) noexcept {
    if (is_pinned(src)) return check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, copy), "load memcpy");
    const std::size_t half = (config.staging_bytes / kStagingHalves) & ~std::size_t{255};
    int h = 0;
    for (std::size_t off = 0; off < bytes; off += half, h ^= 1) {
      const std::size_t n = std::min(half, bytes - off);
      std::byte* stage = staging + static_cast<std::size_t>(h) * half;
      MOEX_RETURN_IF_ERROR(check(cudaEventSynchronize(staging_done[h]), "staging wait"));
      std::memcpy(stage, src + off, n);
      MOEX_RETURN_IF_ERROR(check(cudaMemcpyAsync(dst + off, stage, n, cudaMemcpyHostToDevice, copy), "staged memcpy"));
      MOEX_RETURN_IF_ERROR(check(cudaEventRecord(staging_done[h], copy), "staging record"));
    }
    counters.staged_load_bytes += bytes;
    return Status::ok();
  }

  /// y rows [0, n) = expert(x rows [0, n)) on the compute stream; x/y device, row stride hidden.
  Status run_expert(const ExpertView& v, const float* x, std::size_t n, float* y) noexcept {
    const ExpertLayout& l = v.layout;
    const std::size_t h = l.shape.hidden, f = l.shape.ffn;
    const Precision prec = l.format.precision;
    if (config.use_cublaslt && (prec == Precision::kBF16 || prec == Precision::kF16) && n > config.gemv_max_tokens) {
      ++counters.cublas_calls;
      const bool bf = prec == Precision::kBF16;
      MOEX_RETURN_IF_ERROR(bf ? cuda::convert_f32_to_bf16(x, d_xb, n * h, compute)
                              : cuda::convert_f32_to_f16(x, d_xb, n * h, compute));
      cuda::GemmLtArgs a;
      a.type = prec;
      a.rows = f;
      a.cols = h;
      a.x = d_xb;
      a.ldx = h;
      a.ldy = f;
      a.n = n;
      a.w = v.w1_data;
      a.y = d_h1;
      MOEX_RETURN_IF_ERROR(cuda::gemm_lt(lt, a, compute));
      a.w = v.w3_data;
      a.y = d_h3;
      MOEX_RETURN_IF_ERROR(cuda::gemm_lt(lt, a, compute));
      MOEX_RETURN_IF_ERROR(bf ? cuda::swiglu_to_bf16(d_h1, d_h3, d_hb, n * f, compute)
                              : cuda::swiglu_to_f16(d_h1, d_h3, d_hb, n * f, compute));
      a.rows = h;
      a.cols = f;
      a.x = d_hb;
      a.ldx = f;
      a.ldy = h;
      a.w = v.w2_data;
      a.y = y;
      return cuda::gemm_lt(lt, a, compute);
    }
    if (prec == Precision::kBF16 && n > config.gemv_max_tokens) {
      ++counters.cublas_calls;
      cuda::GemmBf16Args a;
      MOEX_RETURN_IF_ERROR(cuda::convert_f32_to_bf16(x, d_xb, n * h, compute));
      a.rows = f;
      a.cols = h;
      a.x = d_xb;
      a.ldx = h;
      a.ldy = f;
      a.n = n;
      a.w = reinterpret_cast<const std::uint16_t*>(v.w1_data);
      a.y = d_h1;
      MOEX_RETURN_IF_ERROR(cuda::gemm_bf16(cublas, a, compute));
      a.w = reinterpret_cast<const std::uint16_t*>(v.w3_data);
      a.y = d_h3;
      MOEX_RETURN_IF_ERROR(cuda::gemm_bf16(cublas, a, compute));
      MOEX_RETURN_IF_ERROR(cuda::swiglu_to_bf16(d_h1, d_h3, d_hb, n * f, compute));
      a.rows = h;
      a.cols = f;
      a.x = d_hb;
      a.ldx = f;
      a.ldy = h;
      a.w = reinterpret_cast<const std::uint16_t*>(v.w2_data);
      a.y = y;
      return cuda::gemm_bf16(cublas, a, compute);
    }
    MOEX_RETURN_IF_ERROR(check(cudaMemsetAsync(y, 0, n * h * sizeof(float), compute), "memset y"));
    for (std::size_t off = 0; off < n; off += cuda::kMaxGemvTokens) {
      const auto c = static_cast<std::uint32_t>(std::min<std::size_t>(cuda::kMaxGemvTokens, n - off));
      cuda::ExpertTask t;
      t.w1 = v.w1_data;
      t.w3 = v.w3_data;
      t.w2 = v.w2_data;
      t.n = c;
      for (std::uint32_t j = 0; j < c; ++j) {
        t.token[j] = j;
        t.weight[j] = 1.f;
      }
      cuda::GroupedExpertArgs a;
      a.layout = l;
      a.tasks = &t;
      a.count = 1;
      a.x = x + off * h;
      a.ldx = h;
      a.out = y + off * h;
      a.ldo = h;
      a.workspace = d_ws;
      a.exact = config.exact_activations;
      MOEX_RETURN_IF_ERROR(cuda::grouped_expert_ffn(a, compute));
    }
    return Status::ok();
  }

  /// True when a call of n tokens on this layout takes a cuBLAS / cuBLASLt path (never deferred).
  bool library_path(const ExpertLayout& l, std::size_t n) const noexcept {
    const Precision p = l.format.precision;
    if (n <= config.gemv_max_tokens) return false;
    return p == Precision::kBF16 || (config.use_cublaslt && p == Precision::kF16);
  }

  /// The device work of one expert_ffn call on the compute stream: x upload, wait for the slot,
  /// the expert, the slot's release, y download. `capture`: inside a stream capture (the slot
  /// events are then external wait / record nodes of the graph).
  Status enqueue(const Deferred& d, bool capture) noexcept {
    const std::size_t floats = d.n * d.e.layout.shape.hidden;
    float* dx = d_x + d.row * hmax;
    float* dy = d_y + d.row * hmax;
    Pool& pl = pools[d.pool];
    MOEX_RETURN_IF_ERROR(check(
        cudaMemcpyAsync(dx, h_x + d.row * hmax, floats * sizeof(float), cudaMemcpyHostToDevice, compute), "x upload"));
    MOEX_RETURN_IF_ERROR(
        check(cudaStreamWaitEvent(compute, pl.filled[d.slot], capture ? cudaEventWaitExternal : 0), "wait filled"));
    MOEX_RETURN_IF_ERROR(run_expert(d.e, dx, d.n, dy));
    MOEX_RETURN_IF_ERROR(check(capture ? cudaEventRecordWithFlags(pl.released[d.slot], compute, cudaEventRecordExternal)
                                       : cudaEventRecord(pl.released[d.slot], compute),
                               "record released"));
    return check(cudaMemcpyAsync(h_y + d.row * hmax, dy, floats * sizeof(float), cudaMemcpyDeviceToHost, compute),
                 "y download");
  }

  /// Launches the recorded calls as one graph: replayed when this exact sequence was captured
  /// before, else captured, instantiated and cached (least recently used entry replaced).
  Status flush() noexcept {
    if (deferred.empty()) return Status::ok();
    std::vector<std::uint64_t> key;
    try {
      key.reserve(deferred.size() * 6);
      for (const Deferred& d : deferred) {
        const ExpertLayout& l = d.e.layout;
        key.push_back(reinterpret_cast<std::uintptr_t>(d.e.w1_data));
        key.push_back(reinterpret_cast<std::uintptr_t>(d.e.w3_data));
        key.push_back(reinterpret_cast<std::uintptr_t>(d.e.w2_data));
        key.push_back((std::uint64_t{l.shape.hidden} << 32) ^ l.shape.ffn);
        key.push_back((std::uint64_t{static_cast<std::uint8_t>(l.format.precision)} << 48) ^
                      (std::uint64_t{l.format.group_size} << 32) ^
                      (std::uint64_t{static_cast<std::uint8_t>(l.format.scheme)} << 24) ^ l.total_bytes);
        key.push_back((std::uint64_t{d.n} << 40) ^ d.row);
      }
    } catch (...) {
      deferred.clear();
      return out_of_memory("CudaExecutionBackend: graph key");
    }
    std::uint64_t hash = 1469598103934665603ull;
    for (std::uint64_t k : key) hash = (hash ^ k) * 1099511628211ull;
    ++graph_clock;
    auto it = graphs.find(hash);
    if (it != graphs.end() && it->second.key != key) {  // hash collision: drop the old entry
      cudaGraphExecDestroy(it->second.exec);
      graphs.erase(it);
      it = graphs.end();
    }
    if (it == graphs.end()) {
      if (graphs.size() >= std::max<std::uint32_t>(1, config.graph_cache)) {
        auto lru = graphs.begin();
        for (auto g = graphs.begin(); g != graphs.end(); ++g)
          if (g->second.last_used < lru->second.last_used) lru = g;
        cudaGraphExecDestroy(lru->second.exec);
        graphs.erase(lru);
      }
      Status s = check(cudaStreamBeginCapture(compute, cudaStreamCaptureModeThreadLocal), "begin capture");
      for (std::size_t i = 0; s.is_ok() && i < deferred.size(); ++i) s = enqueue(deferred[i], true);
      cudaGraph_t graph = nullptr;
      const cudaError_t end = cudaStreamEndCapture(compute, &graph);
      if (s.is_ok()) s = check(end, "end capture");
      cudaGraphExec_t exec = nullptr;
      if (s.is_ok()) s = check(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate");
      if (graph) cudaGraphDestroy(graph);
      if (!s.is_ok()) {
        // Capture refused (e.g. a call the driver cannot capture): run the step eagerly, and say
        // so through the error only if that fails too.
        cudaGetLastError();
        Status eager = Status::ok();
        for (std::size_t i = 0; eager.is_ok() && i < deferred.size(); ++i) eager = enqueue(deferred[i], false);
        deferred.clear();
        ++counters.graph_failures;
        return eager;
      }
      try {
        GraphEntry& g = graphs[hash];
        g.key = std::move(key);
        g.exec = exec;
        it = graphs.find(hash);
      } catch (...) {
        cudaGraphExecDestroy(exec);
        deferred.clear();
        return out_of_memory("CudaExecutionBackend: graph cache");
      }
      ++counters.graph_captures;
    }
    it->second.last_used = graph_clock;
    deferred.clear();
    ++counters.graph_launches;
    return check(cudaGraphLaunch(it->second.exec, compute), "graph launch");
  }

  /// Graph mode: launches the recorded calls first if one of them reads (pool, slot).
  Status flush_if_reads(std::size_t pool, std::size_t slot) noexcept {
    for (const Deferred& d : deferred)
      if (d.pool == pool && d.slot == slot) return flush();
    return Status::ok();
  }
};

CudaExecutionBackend::CudaExecutionBackend() noexcept = default;
CudaExecutionBackend::CudaExecutionBackend(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
CudaExecutionBackend::CudaExecutionBackend(CudaExecutionBackend&&) noexcept = default;
CudaExecutionBackend& CudaExecutionBackend::operator=(CudaExecutionBackend&&) noexcept = default;
CudaExecutionBackend::~CudaExecutionBackend() = default;

bool CudaExecutionBackend::device_available() noexcept {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();
  return ok;
}

Result<CudaExecutionBackend> CudaExecutionBackend::create(const CudaExecutionBackendConfig& c) noexcept {
  if (c.max_shape.hidden == 0 || c.max_shape.ffn == 0)
    return invalid_argument("CudaExecutionBackend: max_shape must be set");
  if (c.max_shape.hidden % 8 != 0 || c.max_shape.ffn % 8 != 0)
    return invalid_argument("CudaExecutionBackend: max_shape dimensions must be multiples of 8");
  if (c.max_tokens == 0 || c.max_rows_per_step < c.max_tokens)
    return invalid_argument("CudaExecutionBackend: max_tokens must be in 1..max_rows_per_step");
  if (c.max_rows_per_step > (1u << 20)) return invalid_argument("CudaExecutionBackend: max_rows_per_step too large");
  if (c.staging_bytes < 2 * 4096) return invalid_argument("CudaExecutionBackend: staging too small");
  if (!device_available()) return unsupported("CudaExecutionBackend: no CUDA device");
  int count = 0;
  cudaGetDeviceCount(&count);
  if (c.device < 0 || c.device >= count) return invalid_argument("CudaExecutionBackend: bad device ordinal");
  MOEX_RETURN_IF_ERROR(check(cudaSetDevice(c.device), "cudaSetDevice"));

  auto impl = std::unique_ptr<Impl>(new (std::nothrow) Impl());
  if (!impl) return out_of_memory("CudaExecutionBackend");
  Impl& m = *impl;
  m.config = c;
  m.hmax = c.max_shape.hidden;
  const std::size_t rows = c.max_rows_per_step, tok = c.max_tokens, h = c.max_shape.hidden, f = c.max_shape.ffn;
  auto dev = [](auto** p, std::size_t bytes) {
    void* q = nullptr;
    if (cudaMalloc(&q, bytes) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    *p = static_cast<std::remove_reference_t<decltype(*p)>>(q);
    return true;
  };
  auto pinned = [](auto** p, std::size_t bytes) {
    void* q = nullptr;
    if (cudaHostAlloc(&q, bytes, cudaHostAllocDefault) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    *p = static_cast<std::remove_reference_t<decltype(*p)>>(q);
    return true;
  };
  if (!dev(&m.d_x, rows * h * sizeof(float)) || !dev(&m.d_y, rows * h * sizeof(float)) ||
      !dev(&m.d_ws, cuda::grouped_expert_workspace_bytes(c.max_shape, 1)) || !dev(&m.d_xb, tok * std::max(h, f) * 2) ||
      !dev(&m.d_h1, tok * f * sizeof(float)) || !dev(&m.d_h3, tok * f * sizeof(float)) || !dev(&m.d_hb, tok * f * 2))
    return out_of_memory("CudaExecutionBackend: device activation buffers");
  if (!pinned(&m.h_x, rows * h * sizeof(float)) || !pinned(&m.h_y, rows * h * sizeof(float)) ||
      !pinned(&m.staging, c.staging_bytes))
    return out_of_memory("CudaExecutionBackend: pinned buffers");
  MOEX_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&m.copy, cudaStreamNonBlocking), "copy stream"));
  if (c.compute_stream) {
    m.compute = static_cast<cudaStream_t>(c.compute_stream);
  } else {
    MOEX_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&m.compute, cudaStreamNonBlocking), "compute stream"));
    m.own_compute = true;
  }
  for (cudaEvent_t& e : m.staging_done)
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event"));
  MOEX_RETURN_IF_ERROR(cuda::cublas_create(&m.cublas));
  if (c.use_cublaslt) MOEX_RETURN_IF_ERROR(cuda::lt_create(&m.lt, 32ull << 20));

  // PCIe rate: a copy of the staging buffer (pinned) to the device, after one warm-up.
  m.pcie_rate = c.pcie_bytes_per_s;
  if (m.pcie_rate == 0) {
    std::byte* d = nullptr;
    const std::size_t bytes = c.staging_bytes;
    if (!dev(&d, bytes)) return out_of_memory("CudaExecutionBackend: PCIe probe buffer");
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    Status s = check(cudaEventCreate(&e0), "event");
    if (s.is_ok()) s = check(cudaEventCreate(&e1), "event");
    float ms = 0.f;
    for (int i = 0; i < 2 && s.is_ok(); ++i) {
      s = check(cudaEventRecord(e0, m.copy), "probe");
      if (s.is_ok()) s = check(cudaMemcpyAsync(d, m.staging, bytes, cudaMemcpyHostToDevice, m.copy), "probe copy");
      if (s.is_ok()) s = check(cudaEventRecord(e1, m.copy), "probe");
      if (s.is_ok()) s = check(cudaEventSynchronize(e1), "probe sync");
      if (s.is_ok()) s = check(cudaEventElapsedTime(&ms, e0, e1), "probe time");
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    cudaFree(d);
    MOEX_RETURN_IF_ERROR(s);
    m.pcie_rate = ms > 0.f ? static_cast<std::uint64_t>(static_cast<double>(bytes) / (ms * 1e-3)) : 25'000'000'000ull;
  }
  if (c.host_bytes_per_s) m.host_rate = c.host_bytes_per_s;

  try {
    m.pending.reserve(rows);
    m.deferred.reserve(rows);
    m.host_x.resize(rows * h);
    m.host_ws.resize(expert_ffn_workspace(c.max_shape, tok));
    m.jobs.resize(rows);
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const std::size_t threads = c.host_threads ? c.host_threads : std::max(1u, hw > 2 ? hw - 2 : 1u);
    m.host_pool = std::make_unique<ThreadPool>(threads);
    Impl* ip = impl.get();
    m.worker = std::thread([ip] { ip->run_worker(); });
  } catch (...) {
    return out_of_memory("CudaExecutionBackend: host worker");
  }
  return CudaExecutionBackend(std::move(impl));
}

Status CudaExecutionBackend::register_store(const ExpertStore& store) noexcept {
  std::vector<std::pair<const std::byte*, std::size_t>> ranges;
  try {
    ranges = store_ranges(store);
  } catch (...) {
    return out_of_memory("register_store");
  }
  for (const auto& [p, n] : ranges) {
    if (is_pinned(p)) continue;
    void* q = const_cast<std::byte*>(p);
    cudaError_t e = cudaHostRegister(q, n, cudaHostRegisterReadOnly);
    if (e != cudaSuccess && e != cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();
      e = cudaHostRegister(q, n, cudaHostRegisterDefault);
    }
    if (e == cudaErrorHostMemoryAlreadyRegistered) e = cudaSuccess;
    cudaGetLastError();
    MOEX_RETURN_IF_ERROR(check(e, "register_store: cudaHostRegister"));
  }
  return Status::ok();
}

Status CudaExecutionBackend::unregister_store(const ExpertStore& store) noexcept {
  std::vector<std::pair<const std::byte*, std::size_t>> ranges;
  try {
    ranges = store_ranges(store);
  } catch (...) {
    return out_of_memory("unregister_store");
  }
  for (const auto& [p, n] : ranges) {
    (void)n;
    const cudaError_t e = cudaHostUnregister(const_cast<std::byte*>(p));
    cudaGetLastError();
    // Memory from cudaHostAlloc, or never registered, answers "not registered": nothing to undo.
    if (e != cudaSuccess && e != cudaErrorHostMemoryNotRegistered && e != cudaErrorInvalidValue)
      return check(e, "unregister_store: cudaHostUnregister");
  }
  return Status::ok();
}

std::uint64_t CudaExecutionBackend::now_ns() const noexcept { return steady_ns(); }

Status CudaExecutionBackend::allocate_slots(Precision pool, std::size_t slot_bytes, std::size_t count) noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  const auto p = static_cast<std::size_t>(pool);
  if (p >= kPrecisionCount) return invalid_argument("CudaExecutionBackend: bad pool");
  if (slot_bytes == 0 || count == 0) return invalid_argument("CudaExecutionBackend: zero slots");
  if (count >= (std::size_t{1} << kSlotBits)) return invalid_argument("CudaExecutionBackend: too many slots");
  Impl::Pool& pl = impl_->pools[p];
  if (pl.base) return invalid_argument("CudaExecutionBackend: pool allocated twice");
  pl.stride = align_up(slot_bytes, std::max<std::size_t>(kMatrixAlign, 256));
  if (count > (std::size_t{1} << 40) / pl.stride) return out_of_memory("CudaExecutionBackend: slot arena too large");
  void* base = nullptr;
  if (cudaMalloc(&base, pl.stride * count) != cudaSuccess) {
    cudaGetLastError();
    return out_of_memory("CudaExecutionBackend: device slots of " + std::to_string(pl.stride * count) + " bytes");
  }
  pl.base = static_cast<std::byte*>(base);
  pl.count = count;
  try {
    pl.filled.reserve(count);
    pl.released.reserve(count);
    pl.seq.assign(count, 0);
  } catch (...) {
    return out_of_memory("CudaExecutionBackend: slot events");
  }
  for (std::size_t i = 0; i < count; ++i) {
    cudaEvent_t f = nullptr, r = nullptr;
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&f, cudaEventDisableTiming), "event"));
    pl.filled.push_back(f);
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&r, cudaEventDisableTiming), "event"));
    pl.released.push_back(r);
  }
  return Status::ok();
}

std::size_t CudaExecutionBackend::slot_count(Precision pool) const noexcept {
  const auto p = static_cast<std::size_t>(pool);
  return impl_ && p < kPrecisionCount ? impl_->pools[p].count : 0;
}

Status CudaExecutionBackend::start_load(Precision pool, std::size_t slot, const ExpertView& src,
                                        LoadTicket& ticket) noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  Impl& m = *impl_;
  const auto p = static_cast<std::size_t>(pool);
  if (p >= kPrecisionCount || slot >= m.pools[p].count)
    return invalid_argument("CudaExecutionBackend::start_load: slot out of range");
  if (!src.valid()) return invalid_argument("CudaExecutionBackend::start_load: the source has no data");
  Impl::Pool& pl = m.pools[p];
  const ExpertLayout& l = src.layout;
  if (l.total_bytes > pl.stride) return invalid_argument("CudaExecutionBackend::start_load: expert larger than a slot");
  std::byte* dst = pl.base + slot * pl.stride;
  // A recorded (graph-mode) call that reads this slot must be launched before the slot's release
  // event is waited on.
  MOEX_RETURN_IF_ERROR(m.flush_if_reads(p, slot));
  MOEX_RETURN_IF_ERROR(check(cudaStreamWaitEvent(m.copy, pl.released[slot], 0), "wait released"));
  MOEX_RETURN_IF_ERROR(m.upload(dst + l.w1_offset, src.w1_data, l.w1.total_bytes));
  MOEX_RETURN_IF_ERROR(m.upload(dst + l.w3_offset, src.w3_data, l.w3.total_bytes));
  MOEX_RETURN_IF_ERROR(m.upload(dst + l.w2_offset, src.w2_data, l.w2.total_bytes));
  MOEX_RETURN_IF_ERROR(check(cudaEventRecord(pl.filled[slot], m.copy), "record filled"));
  const std::uint32_t seq = ++pl.seq[slot];
  ticket = (std::uint64_t{seq} << 32) | (std::uint64_t{p} << kSlotBits) | slot;
  const std::uint64_t bytes = l.w1.total_bytes + l.w3.total_bytes + l.w2.total_bytes;
  m.link_free_ns = std::max(m.link_free_ns, steady_ns()) + duration_ns(bytes, m.pcie_rate);
  ++m.counters.loads;
  m.counters.load_bytes += bytes;
  return Status::ok();
}

namespace {
struct TicketParts {
  std::size_t pool, slot;
  std::uint32_t seq;
};
TicketParts split_ticket(LoadTicket t) noexcept {
  return {static_cast<std::size_t>((t >> kSlotBits) & 0xFF), static_cast<std::size_t>(t & ((1u << kSlotBits) - 1)),
          static_cast<std::uint32_t>(t >> 32)};
}
}  // namespace

Status CudaExecutionBackend::wait_load(LoadTicket ticket) noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  const TicketParts tp = split_ticket(ticket);
  if (tp.pool >= kPrecisionCount || tp.slot >= impl_->pools[tp.pool].count)
    return invalid_argument("CudaExecutionBackend::wait_load: unknown ticket");
  const Impl::Pool& pl = impl_->pools[tp.pool];
  if (pl.seq[tp.slot] != tp.seq) return Status::ok();  // superseded by a later load into the slot
  return check(cudaEventSynchronize(pl.filled[tp.slot]), "wait_load");
}

bool CudaExecutionBackend::load_done(LoadTicket ticket) noexcept {
  if (!impl_) return true;
  const TicketParts tp = split_ticket(ticket);
  if (tp.pool >= kPrecisionCount || tp.slot >= impl_->pools[tp.pool].count) return true;
  const Impl::Pool& pl = impl_->pools[tp.pool];
  if (pl.seq[tp.slot] != tp.seq) return true;
  const cudaError_t e = cudaEventQuery(pl.filled[tp.slot]);
  if (e != cudaSuccess) cudaGetLastError();
  return e != cudaErrorNotReady;
}

void CudaExecutionBackend::cancel_load(LoadTicket /*ticket*/) noexcept {
  // A queued copy cannot be withdrawn; the next load into the slot is ordered after it.
}

ExpertView CudaExecutionBackend::slot_view(Precision pool, std::size_t slot,
                                           const ExpertLayout& layout) const noexcept {
  if (!impl_) return {};
  const Impl::Pool& pl = impl_->pools[static_cast<std::size_t>(pool) % kPrecisionCount];
  if (!pl.base || slot >= pl.count) return {};
  return ExpertView::contiguous(pl.base + slot * pl.stride, layout);
}

Status CudaExecutionBackend::expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  Impl& m = *impl_;
  if (!x || !y || !e.valid()) return invalid_argument("CudaExecutionBackend::expert_ffn: null pointer");
  if (n == 0 || n > m.config.max_tokens)
    return invalid_argument("CudaExecutionBackend::expert_ffn: n must be 1..max_tokens");
  const ExpertShape s = e.layout.shape;
  if (s.hidden > m.config.max_shape.hidden || s.ffn > m.config.max_shape.ffn)
    return invalid_argument("CudaExecutionBackend::expert_ffn: shape beyond max_shape");
  std::size_t pool = 0, slot = 0;
  if (!m.locate(e.w1_data, pool, slot))
    return invalid_argument("CudaExecutionBackend::expert_ffn: view is not a slot of this backend");
  if (m.rows_used + n > m.config.max_rows_per_step)
    return out_of_memory("CudaExecutionBackend::expert_ffn: more rows than max_rows_per_step before sync()");
  const std::size_t row = m.rows_used;
  const std::size_t floats = n * s.hidden;
  std::memcpy(m.h_x + row * m.hmax, x, floats * sizeof(float));
  const Impl::Deferred d{e, n, row, pool, slot};
  if (m.config.use_cuda_graphs && !m.library_path(e.layout, n)) {
    m.deferred.push_back(d);  // capacity max_rows: no allocation
  } else {
    MOEX_RETURN_IF_ERROR(m.flush());  // keep the step's order
    MOEX_RETURN_IF_ERROR(m.enqueue(d, false));
  }
  m.pending.push_back({y, row, floats});  // capacity max_rows: no allocation
  m.rows_used += n;
  ++m.counters.gpu_calls;
  return Status::ok();
}

Status CudaExecutionBackend::expert_ffn_at_source(const ExpertView& e, const float* x, std::size_t n,
                                                  float* y) noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  Impl& m = *impl_;
  if (!x || !y || !e.valid()) return invalid_argument("CudaExecutionBackend::expert_ffn_at_source: null pointer");
  if (n == 0 || n > m.config.max_tokens)
    return invalid_argument("CudaExecutionBackend::expert_ffn_at_source: n must be 1..max_tokens");
  const ExpertShape s = e.layout.shape;
  if (s.hidden > m.config.max_shape.hidden || s.ffn > m.config.max_shape.ffn)
    return invalid_argument("CudaExecutionBackend::expert_ffn_at_source: shape beyond max_shape");
  if (m.host_rows_used + n > m.config.max_rows_per_step)
    return out_of_memory("CudaExecutionBackend::expert_ffn_at_source: more rows than max_rows_per_step before sync()");
  float* hx = m.host_x.data() + m.host_rows_used * m.hmax;
  std::memcpy(hx, x, n * s.hidden * sizeof(float));
  m.host_rows_used += n;
  {
    std::lock_guard lk(m.mu);
    m.jobs[m.submitted % m.jobs.size()] = Impl::HostJob{e, hx, n, y};
    ++m.submitted;
  }
  m.cv_job.notify_one();
  m.host_free_ns = std::max(m.host_free_ns, steady_ns()) + duration_ns(e.layout.total_bytes, m.host_rate);
  ++m.counters.host_calls;
  return Status::ok();
}

Status CudaExecutionBackend::sync() noexcept {
  if (!impl_) return internal_error("CudaExecutionBackend: moved-from or default backend");
  Impl& m = *impl_;
  const std::uint64_t t0 = steady_ns();
  const Status launched = m.flush();
  Status gpu = check(cudaStreamSynchronize(m.compute), "compute stream sync");
  if (gpu.is_ok()) gpu = launched;
  Status host;
  {
    std::unique_lock lk(m.mu);
    m.cv_done.wait(lk, [&] { return m.finished >= m.submitted; });
    host = std::exchange(m.host_error, Status::ok());
    m.counters.host_busy_ns = m.host_busy_ns;
  }
  if (gpu.is_ok())
    for (const Impl::Pending& p : m.pending) std::memcpy(p.y, m.h_y + p.row * m.hmax, p.floats * sizeof(float));
  m.pending.clear();
  m.rows_used = 0;
  m.host_rows_used = 0;
  m.counters.sync_wait_ns += steady_ns() - t0;
  MOEX_RETURN_IF_ERROR(gpu);
  return host;
}

std::uint64_t CudaExecutionBackend::load_eta_ns(std::size_t bytes) const noexcept {
  if (!impl_) return UINT64_MAX;
  return std::max(impl_->link_free_ns, steady_ns()) + duration_ns(bytes, impl_->pcie_rate);
}

std::uint64_t CudaExecutionBackend::source_eta_ns(const ExpertLayout& layout, std::size_t /*n*/) const noexcept {
  if (!impl_) return UINT64_MAX;
  return std::max(impl_->host_free_ns, steady_ns()) + duration_ns(layout.total_bytes, impl_->host_rate);
}

void* CudaExecutionBackend::compute_stream() const noexcept { return impl_ ? impl_->compute : nullptr; }
void* CudaExecutionBackend::copy_stream() const noexcept { return impl_ ? impl_->copy : nullptr; }
std::uint64_t CudaExecutionBackend::pcie_bytes_per_s() const noexcept { return impl_ ? impl_->pcie_rate : 0; }
std::uint64_t CudaExecutionBackend::host_bytes_per_s() const noexcept { return impl_ ? impl_->host_rate : 0; }
void CudaExecutionBackend::set_host_bytes_per_s(std::uint64_t rate) noexcept {
  if (impl_ && rate) impl_->host_rate = rate;
}

const CudaExecutionCounters& CudaExecutionBackend::counters() const noexcept {
  static const CudaExecutionCounters kNone{};
  return impl_ ? impl_->counters : kNone;
}

void CudaExecutionBackend::reset_counters() noexcept {
  if (!impl_) return;
  impl_->counters = {};
  std::lock_guard lk(impl_->mu);
  impl_->host_busy_ns = 0;
}

MOEX_NAMESPACE_END
