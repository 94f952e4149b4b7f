// CudaBackend: one device arena cut into slots, pinned staging, copy + compute streams, an event
// pair per slot (cudart only; kernels through kernels.hpp).
#include "moex/backend/cuda_backend.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "kernels.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

/// Staging halves: one is filled by the host while the copy engine drains the other.
constexpr int kStagingHalves = 2;

Status check(cudaError_t e, const char* what) noexcept { return cuda::cuda_status(e, what); }

}  // namespace

struct CudaBackend::Impl {
  CudaBackendConfig config{};
  std::byte* arena = nullptr;   // slots, then workspace
  std::size_t slot_stride = 0;  // slot_bytes rounded to kMatrixAlign
  float* workspace = nullptr;  // grouped_expert_ffn's scratch
  std::size_t workspace_bytes = 0;
  std::byte* staging = nullptr;          // pinned, staging_bytes
  cudaStream_t compute = nullptr;
  cudaStream_t copy = nullptr;
  bool own_compute = false;
  std::vector<cudaEvent_t> filled;    // per slot: upload done
  std::vector<cudaEvent_t> released;  // per slot: last compute reading it done
  cudaEvent_t staging_done[kStagingHalves] = {};

  ~Impl() {
    if (copy) cudaStreamSynchronize(copy);
    if (compute) cudaStreamSynchronize(compute);
    for (cudaEvent_t e : filled) cudaEventDestroy(e);
    for (cudaEvent_t e : released) cudaEventDestroy(e);
    for (cudaEvent_t e : staging_done)
      if (e) cudaEventDestroy(e);
    if (copy) cudaStreamDestroy(copy);
    if (own_compute && compute) cudaStreamDestroy(compute);
    if (staging) cudaFreeHost(staging);
    if (arena) cudaFree(arena);
  }
};

CudaBackend::CudaBackend(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
CudaBackend::~CudaBackend() = default;

bool CudaBackend::device_available() noexcept {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

Result<std::unique_ptr<CudaBackend>> CudaBackend::create(const CudaBackendConfig& c) noexcept {
  if (c.slot_bytes == 0 || c.slot_count == 0) return invalid_argument("CudaBackend: zero slots");
  if (c.max_shape.hidden == 0 || c.max_shape.ffn == 0) return invalid_argument("CudaBackend: max_shape must be set");
  if (c.staging_bytes < 2 * kMatrixAlign) return invalid_argument("CudaBackend: staging too small");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return unsupported("CudaBackend: no CUDA device");
  if (c.device < 0 || c.device >= count) return invalid_argument("CudaBackend: bad device ordinal");
  MOEX_RETURN_IF_ERROR(check(cudaSetDevice(c.device), "cudaSetDevice"));

  auto impl = std::unique_ptr<Impl>(new (std::nothrow) Impl());
  if (!impl) return out_of_memory("CudaBackend");
  impl->config = c;
  impl->slot_stride = align_up(c.slot_bytes, kMatrixAlign);
  if (impl->slot_stride / kMatrixAlign > (std::size_t{1} << 40) / c.slot_count)
    return invalid_argument("CudaBackend: slot_bytes * slot_count overflows");
  const std::size_t slots_bytes = impl->slot_stride * c.slot_count;
  impl->workspace_bytes = cuda::grouped_expert_workspace_bytes(c.max_shape, cuda::kMaxGroupExperts);
  void* arena = nullptr;
  if (cudaMalloc(&arena, slots_bytes + impl->workspace_bytes) != cudaSuccess) {
    cudaGetLastError();
    return out_of_memory("CudaBackend: device arena of " + std::to_string(slots_bytes) + " bytes");
  }
  impl->arena = static_cast<std::byte*>(arena);
  impl->workspace = reinterpret_cast<float*>(impl->arena + slots_bytes);
  void* staging = nullptr;
  if (cudaHostAlloc(&staging, c.staging_bytes, cudaHostAllocDefault) != cudaSuccess) {
    cudaGetLastError();
    return out_of_memory("CudaBackend: pinned staging");
  }
  impl->staging = static_cast<std::byte*>(staging);
  MOEX_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&impl->copy, cudaStreamNonBlocking), "copy stream"));
  if (c.compute_stream) {
    impl->compute = static_cast<cudaStream_t>(c.compute_stream);
  } else {
    MOEX_RETURN_IF_ERROR(check(cudaStreamCreateWithFlags(&impl->compute, cudaStreamNonBlocking), "compute stream"));
    impl->own_compute = true;
  }
  impl->filled.reserve(c.slot_count);
  impl->released.reserve(c.slot_count);
  for (std::uint32_t i = 0; i < c.slot_count; ++i) {
    cudaEvent_t f = nullptr, r = nullptr;
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&f, cudaEventDisableTiming), "event"));
    impl->filled.push_back(f);
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&r, cudaEventDisableTiming), "event"));
    impl->released.push_back(r);
  }
  for (cudaEvent_t& e : impl->staging_done)
    MOEX_RETURN_IF_ERROR(check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event"));
  auto* backend = new (std::nothrow) CudaBackend(std::move(impl));
  if (!backend) return out_of_memory("CudaBackend");
  return std::unique_ptr<CudaBackend>(backend);
}

std::uint32_t CudaBackend::slot_count() const noexcept { return impl_->config.slot_count; }
std::size_t CudaBackend::slot_bytes() const noexcept { return impl_->config.slot_bytes; }
std::byte* CudaBackend::slot_data(std::uint32_t slot) const noexcept {
  if (slot >= impl_->config.slot_count) return nullptr;
  return impl_->arena + static_cast<std::size_t>(slot) * impl_->slot_stride;
}
void* CudaBackend::compute_stream() const noexcept { return impl_->compute; }
void* CudaBackend::copy_stream() const noexcept { return impl_->copy; }

Status CudaBackend::register_host(const void* ptr, std::size_t bytes) noexcept {
  if (!ptr || bytes == 0) return invalid_argument("register_host: empty range");
  return check(cudaHostRegister(const_cast<void*>(ptr), bytes, cudaHostRegisterReadOnly), "cudaHostRegister");
}

Status CudaBackend::unregister_host(const void* ptr) noexcept {
  if (!ptr) return invalid_argument("unregister_host: null");
  MOEX_RETURN_IF_ERROR(check(cudaStreamSynchronize(impl_->copy), "copy stream sync"));
  return check(cudaHostUnregister(const_cast<void*>(ptr)), "cudaHostUnregister");
}

Status CudaBackend::upload_slot(std::uint32_t slot, const void* src, std::size_t bytes) noexcept {
  if (slot >= impl_->config.slot_count) return invalid_argument("upload_slot: slot out of range");
  if (!src || bytes == 0) return invalid_argument("upload_slot: empty source");
  if (bytes > impl_->config.slot_bytes) return invalid_argument("upload_slot: larger than a slot");
  Impl& m = *impl_;
  std::byte* dst = slot_data(slot);
  // The previous reader of this slot must be done before it is overwritten.
  MOEX_RETURN_IF_ERROR(check(cudaStreamWaitEvent(m.copy, m.released[slot], 0), "wait released"));
  cudaPointerAttributes attr{};
  const bool pinned = cudaPointerGetAttributes(&attr, src) == cudaSuccess && attr.type == cudaMemoryTypeHost;
  cudaGetLastError();  // pageable pointers may leave an error behind on older drivers
  if (pinned) {
    MOEX_RETURN_IF_ERROR(check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, m.copy), "upload memcpy"));
  } else {
    const std::size_t half = m.config.staging_bytes / kStagingHalves & ~std::size_t{255};
    const auto* s = static_cast<const std::byte*>(src);
    int h = 0;
    for (std::size_t off = 0; off < bytes; off += half, h ^= 1) {
      const std::size_t n = std::min(half, bytes - off);
      std::byte* stage = m.staging + static_cast<std::size_t>(h) * half;
      MOEX_RETURN_IF_ERROR(check(cudaEventSynchronize(m.staging_done[h]), "staging wait"));
      std::memcpy(stage, s + off, n);
      MOEX_RETURN_IF_ERROR(
          check(cudaMemcpyAsync(dst + off, stage, n, cudaMemcpyHostToDevice, m.copy), "staged memcpy"));
      MOEX_RETURN_IF_ERROR(check(cudaEventRecord(m.staging_done[h], m.copy), "staging record"));
    }
  }
  return check(cudaEventRecord(m.filled[slot], m.copy), "record filled");
}

bool CudaBackend::slot_ready(std::uint32_t slot) const noexcept {
  if (slot >= impl_->config.slot_count) return false;
  const cudaError_t e = cudaEventQuery(impl_->filled[slot]);
  if (e != cudaSuccess && e != cudaErrorNotReady) cudaGetLastError();
  return e == cudaSuccess;
}

Status CudaBackend::expert_ffn(const ExpertLayout& layout, std::span<const SlotTask> tasks, const float* x,
                               std::size_t ldx, float* out, std::size_t ldo) noexcept {
  Impl& m = *impl_;
  if (layout.total_bytes > m.config.slot_bytes) return invalid_argument("expert_ffn: expert larger than a slot");
  if (layout.shape.hidden > m.config.max_shape.hidden || layout.shape.ffn > m.config.max_shape.ffn)
    return invalid_argument("expert_ffn: shape beyond max_shape");
  cuda::ExpertTask group[cuda::kMaxGroupExperts];
  std::size_t done = 0;
  while (done < tasks.size()) {
    const std::size_t count = std::min<std::size_t>(cuda::kMaxGroupExperts, tasks.size() - done);
    for (std::size_t i = 0; i < count; ++i) {
      const SlotTask& t = tasks[done + i];
      if (t.slot >= m.config.slot_count) return invalid_argument("expert_ffn: slot out of range");
      if (t.n == 0 || t.n > cuda::kMaxGemvTokens) return invalid_argument("expert_ffn: n must be 1..8");
      MOEX_RETURN_IF_ERROR(check(cudaStreamWaitEvent(m.compute, m.filled[t.slot], 0), "wait filled"));
      const ExpertView v = ExpertView::contiguous(slot_data(t.slot), layout);
      cuda::ExpertTask& g = group[i];
      g.w1 = v.w1_data;
      g.w3 = v.w3_data;
      g.w2 = v.w2_data;
      g.n = t.n;
      std::copy(t.token, t.token + t.n, g.token);
      std::copy(t.weight, t.weight + t.n, g.weight);
    }
    cuda::GroupedExpertArgs a;
    a.layout = layout;
    a.tasks = group;
    a.count = static_cast<std::uint32_t>(count);
    a.x = x;
    a.ldx = ldx;
    a.out = out;
    a.ldo = ldo;
    a.workspace = m.workspace;
    a.exact = m.config.exact_activations;
    MOEX_RETURN_IF_ERROR(cuda::grouped_expert_ffn(a, m.compute));
    for (std::size_t i = 0; i < count; ++i)
      MOEX_RETURN_IF_ERROR(check(cudaEventRecord(m.released[tasks[done + i].slot], m.compute), "record released"));
    done += count;
  }
  return Status::ok();
}

Status CudaBackend::synchronize() noexcept {
  MOEX_RETURN_IF_ERROR(check(cudaStreamSynchronize(impl_->copy), "copy stream sync"));
  return check(cudaStreamSynchronize(impl_->compute), "compute stream sync");
}

MOEX_NAMESPACE_END
