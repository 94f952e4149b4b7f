#pragma once
/// @file cuda_execution_backend.hpp
/// CudaExecutionBackend: the ExecutionBackend (moex/concepts/backend.hpp) of MoeLayerExecutor on
/// one NVIDIA GPU. Declarations only, no CUDA header: streams cross the interface as `void*`
/// (a cudaStream_t); the definitions live in src/cuda/ and link through moex::cuda.
///
/// - Memory: allocate_slots() makes one device arena per precision pool (before decoding), plus
///   device and pinned host buffers for activations, sized by the config; nothing is allocated
///   while decoding.
/// - Copies: start_load() copies an expert's three matrices from host memory into a slot on the
///   backend's copy stream, after the last compute that read the slot (its "released" event), and
///   records the slot's "filled" event; the ticket names that event. Pinned or registered sources
///   (register_store, cudaHostAlloc) go straight to the copy engine; pageable ones through a
///   pinned staging buffer (the call then returns once the last chunk is queued). A copy cannot be
///   stopped once queued: cancel_load() only forgets it (the next load into the slot is ordered
///   after it on the copy stream).
/// - Compute: expert_ffn() stages x in pinned memory, copies it to the device and runs the SwiGLU
///   expert on the compute stream after the slot's "filled" event (fused GEMV kernels up to
///   `gemv_max_tokens` tokens, cuBLAS above for bf16, or cuBLASLt for bf16/f16 with
///   `use_cublaslt`), then copies y back to pinned staging. Block-format slots (the store's
///   keep_block_formats masters, quant/layout.hpp) run the block kernels through the grouped
///   launch: GGUF Q8_0/Q4_0/Q4_K, and fp8 e4m3 with each matrix's scale section. With `use_cuda_graphs` the GEMV-path
///   calls of a step are recorded and launched at sync() as one cached CUDA graph.
///   expert_ffn_at_source() runs moex::expert_ffn (the CPU kernels) on a host worker thread, at
///   once with the GPU. sync() waits for both and copies the staged outputs into the callers' y.
/// - Cost model: load_eta_ns() = when a copy queued now would finish at the PCIe rate (measured
///   at create unless configured) behind the copies already queued; source_eta_ns() likewise for
///   the host CPU's expert rate (configured; default 20 GB/s of weights) and the host queue.
///
/// Threading: one thread (the executor's) calls it; the host worker is internal.

#include <cstddef>
#include <cstdint>
#include <memory>

#include "moex/concepts/backend.hpp"
#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ExpertStore;

/// Settings of a CudaExecutionBackend.
struct CudaExecutionBackendConfig {
  int device = 0;                           ///< CUDA device ordinal
  void* compute_stream = nullptr;           ///< caller's cudaStream_t; null: the backend makes one
  ExpertShape max_shape{};                  ///< largest expert shape served (sizes the buffers); required
  std::uint32_t max_tokens = 64;            ///< most tokens of one expert_ffn call
  std::uint32_t max_rows_per_step = 1024;   ///< most rows staged between two sync() calls (tokens x top-k)
  std::uint32_t gemv_max_tokens = 2;        ///< bf16/f16 calls with more tokens use cuBLAS (bf16) ...
  std::size_t staging_bytes = 64ull << 20;  ///< pinned bounce buffer for pageable sources
  std::uint64_t pcie_bytes_per_s = 0;       ///< cost model; 0 = measured at create (64 MB pinned copy)
  std::uint64_t host_bytes_per_s = 0;       ///< cost model: host expert compute, weight bytes/s; 0 = 20e9
  std::uint32_t host_threads = 0;           ///< threads of the host expert pool; 0 = cores - 2 (>= 1)
  /// bf16/f16 calls with more than gemv_max_tokens tokens run on cuBLASLt (f16 included) instead of
  /// cuBLAS (bf16 only; f16 then stays on the GEMV kernels).
  bool use_cublaslt = false;
  /// CUDA graphs: expert_ffn() calls on the GEMV path are recorded instead of launched, and sync()
  /// (or a start_load into a slot they read) replays the step as one CUDA graph, captured the first
  /// time that exact sequence (slots, token counts, rows) is seen and cached (see graph_cache).
  /// Off by default: the measured effect is in bench/RESULTS-gpu.md.
  bool use_cuda_graphs = false;
  std::uint32_t graph_cache = 256;  ///< instantiated graphs kept (least recently used replaced)
  /// int4/int2 and GGUF Q8_0/Q4_0/Q4_K experts on the fused kernels: false (default) quantizes
  /// activations to int8 per weight group for integer dot products (cuda::GroupedExpertArgs::exact;
  /// about 4e-3 relative per product), true keeps them f32 (the CPU expert's arithmetic, slower).
  bool exact_activations = false;
};

/// Counters of a CudaExecutionBackend (cumulative; reset_counters clears them).
struct CudaExecutionCounters {
  std::uint64_t loads = 0;
  std::uint64_t load_bytes = 0;
  std::uint64_t staged_load_bytes = 0;  ///< of which went through pageable staging
  std::uint64_t gpu_calls = 0;
  std::uint64_t cublas_calls = 0;
  std::uint64_t host_calls = 0;
  std::uint64_t host_busy_ns = 0;    ///< time the host worker spent computing experts
  std::uint64_t sync_wait_ns = 0;    ///< time sync() waited
  std::uint64_t graph_launches = 0;  ///< steps replayed as a CUDA graph (use_cuda_graphs)
  std::uint64_t graph_captures = 0;  ///< of which were captured first (cache misses)
  std::uint64_t graph_failures = 0;  ///< steps whose capture failed and that ran eagerly instead
};

/// The executor's backend on one GPU (see the file comment).
class CudaExecutionBackend {
 public:
  struct Impl;
  /// Experts carry real weights here (see ExecutionBackend).
  static constexpr bool kHasData = true;

  /// Creates the streams, the host worker and the activation buffers. Errors: kInvalidArgument
  /// (max_shape unset, zero sizes), kUnsupported (no CUDA device), kOutOfMemory.
  static Result<CudaExecutionBackend> create(const CudaExecutionBackendConfig& config) noexcept;
  /// True when a CUDA device is visible to this process.
  static bool device_available() noexcept;

  /// Page-locks (cudaHostRegister) every copy the store holds that is not pinned already, so
  /// start_load copies from it at full PCIe speed. Process-wide; undo with unregister_store.
  /// Adjacent expert blobs are registered as one range.
  static Status register_store(const ExpertStore& store) noexcept;
  /// Undoes register_store (device work reading the store must be finished).
  static Status unregister_store(const ExpertStore& store) noexcept;

  CudaExecutionBackend() noexcept;
  CudaExecutionBackend(CudaExecutionBackend&&) noexcept;
  CudaExecutionBackend& operator=(CudaExecutionBackend&&) noexcept;
  ~CudaExecutionBackend();

  /// Wall time (steady clock), ns.
  std::uint64_t now_ns() const noexcept;
  Status allocate_slots(Precision pool, std::size_t slot_bytes, std::size_t count) noexcept;
  std::size_t slot_count(Precision pool) const noexcept;
  Status start_load(Precision pool, std::size_t slot, const ExpertView& src, LoadTicket& ticket) noexcept;
  Status wait_load(LoadTicket ticket) noexcept;
  bool load_done(LoadTicket ticket) noexcept;
  void cancel_load(LoadTicket ticket) noexcept;
  /// A view of the slot in device memory.
  ExpertView slot_view(Precision pool, std::size_t slot, const ExpertLayout& layout) const noexcept;
  /// x, y: host f32 [n x hidden]; x is read before the call returns, y is written by sync().
  Status expert_ffn(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept;
  /// e: a view of host memory (the master copy). x is copied before the call returns; y is
  /// written by the host worker, complete after sync().
  Status expert_ffn_at_source(const ExpertView& e, const float* x, std::size_t n, float* y) noexcept;
  Status sync() noexcept;
  std::uint64_t load_eta_ns(std::size_t bytes) const noexcept;
  std::uint64_t source_eta_ns(const ExpertLayout& layout, std::size_t n) const noexcept;

  /// The compute and copy streams (cudaStream_t).
  void* compute_stream() const noexcept;
  void* copy_stream() const noexcept;
  /// Rates in use by the cost model (bytes/s).
  std::uint64_t pcie_bytes_per_s() const noexcept;
  std::uint64_t host_bytes_per_s() const noexcept;
  /// Changes the host rate of the cost model (e.g. once measured).
  void set_host_bytes_per_s(std::uint64_t rate) noexcept;
  const CudaExecutionCounters& counters() const noexcept;
  void reset_counters() noexcept;

 private:
  explicit CudaExecutionBackend(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

static_assert(ExecutionBackend<CudaExecutionBackend>);

MOEX_NAMESPACE_END
