#pragma once
/// @file cuda_backend.hpp
/// CudaBackend: the device expert cache and copy engine of moex (declarations only; the
/// definitions live in src/cuda/ and link through moex::cuda). No CUDA header is needed: streams
/// cross this interface as `void*` (a cudaStream_t).
///
/// Memory: one device allocation made at create() holds every slot plus the kernels' workspace;
/// nothing is allocated or freed while decoding. Host staging is one pinned buffer (for pageable
/// sources); master copies that are registered with register_host() (cudaHostRegister, e.g. over a
/// mapped file) are copied straight from where they live.
///
/// Streams and ordering: uploads run on the backend's copy stream, experts on the compute stream
/// (the caller's, when given). Each slot has a "filled" event, recorded after its upload, that
/// expert_ffn() makes the compute stream wait on — so compute waits only for the experts it uses —
/// and a "released" event, recorded after the compute that reads it, that the next upload into
/// the slot waits on.
///
/// Threading: one thread at a time per backend (the executor's thread).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Sizes and streams of a CudaBackend.
struct CudaBackendConfig {
  int device = 0;                           ///< CUDA device ordinal
  std::size_t slot_bytes = 0;               ///< bytes of one slot (>= the largest expert blob)
  std::uint32_t slot_count = 0;             ///< slots in the device cache
  std::size_t staging_bytes = 64ull << 20;  ///< pinned bounce buffer for pageable uploads
  ExpertShape max_shape{};                  ///< largest expert shape, sizes the workspace
  void* compute_stream = nullptr;           ///< caller's cudaStream_t; null: the backend makes one
  /// int4/int2 and GGUF Q8_0/Q4_0/Q4_K experts: false (default) quantizes activations to int8 per
  /// weight group for integer dot products (cuda::GroupedExpertArgs::exact; about 4e-3 relative per
  /// product), true keeps them f32 (the CPU expert's arithmetic, slower).
  bool exact_activations = false;
};

/// One expert of one step: the slot that holds it and the tokens routed to it.
struct SlotTask {
  std::uint32_t slot = 0;
  std::uint32_t n = 0;          ///< tokens, 1..8
  std::uint32_t token[8] = {};  ///< rows of x / out
  float weight[8] = {};         ///< gate weights
};

/// Device expert cache + copy engine + expert kernels on one GPU.
class CudaBackend {
 public:
  struct Impl;

  /// Allocates everything up front. Errors: kInvalidArgument (zero sizes), kUnsupported (no
  /// device), kOutOfMemory.
  static Result<std::unique_ptr<CudaBackend>> create(const CudaBackendConfig& config) noexcept;
  ~CudaBackend();
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  /// True when a CUDA device is visible to this process.
  static bool device_available() noexcept;

  std::uint32_t slot_count() const noexcept;
  std::size_t slot_bytes() const noexcept;
  /// Device address of a slot (null when out of range).
  std::byte* slot_data(std::uint32_t slot) const noexcept;
  /// The compute and copy streams (cudaStream_t).
  void* compute_stream() const noexcept;
  void* copy_stream() const noexcept;

  /// Pins [ptr, ptr+bytes) (cudaHostRegister) so uploads from it run at full PCIe speed.
  Status register_host(const void* ptr, std::size_t bytes) noexcept;
  /// Undoes register_host (waits for the copies in flight first).
  Status unregister_host(const void* ptr) noexcept;

  /// Copies `bytes` from host memory into `slot`, asynchronously on the copy stream when `src` is
  /// pinned or registered; pageable memory goes through the pinned staging buffer (the call then
  /// returns once the last chunk is handed to the copy engine). Records the slot's "filled" event.
  Status upload_slot(std::uint32_t slot, const void* src, std::size_t bytes) noexcept;
  /// True once the last upload into `slot` has completed.
  bool slot_ready(std::uint32_t slot) const noexcept;

  /// out[token] += weight * expert(x[token]) for every task, all experts of `layout` (one grouped
  /// launch per 32 tasks) on the compute stream, after their slots' uploads. x and out are
  /// device pointers, [tokens x hidden] with strides ldx / ldo; out is accumulated into.
  /// Every format of quant/layout.hpp that the kernels serve (cuda::gemv_supported) runs, GGUF
  /// Q8_0/Q4_0/Q4_K and fp8 e4m3 (with each matrix's block-scale section) included: block
  /// kernels, grouped.
  Status expert_ffn(const ExpertLayout& layout, std::span<const SlotTask> tasks, const float* x, std::size_t ldx,
                    float* out, std::size_t ldo) noexcept;

  /// Waits for both streams.
  Status synchronize() noexcept;

 private:
  explicit CudaBackend(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

MOEX_NAMESPACE_END
