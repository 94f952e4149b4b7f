#pragma once
// Helpers of the GPU suite: device detection, RAII device buffers, checked CUDA calls.

#include <cstddef>
#include <vector>

#include <cuda_runtime.h>

namespace moex::test {

/// True when a CUDA device is visible (cached; evaluated at test registration).
bool gpu_available();

/// A cudaMalloc'd buffer of T, freed on destruction.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
    if (cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T) + 16) != cudaSuccess) p_ = nullptr;
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  std::size_t size() const { return n_; }
  bool upload(const T* src, std::size_t n) {
    return cudaMemcpy(p_, src, n * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess;
  }
  bool upload(const std::vector<T>& v) { return upload(v.data(), v.size()); }
  std::vector<T> download(std::size_t n) const {
    std::vector<T> v(n);
    if (cudaMemcpy(v.data(), p_, n * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess) v.clear();
    return v;
  }
  /// Fills with 0xFF bytes: NaN for floats, -1 for ints (the poison of every test).
  bool poison() { return cudaMemset(p_, 0xFF, n_ * sizeof(T)) == cudaSuccess; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace moex::test

/// REQUIREs that a CUDA runtime call succeeded, printing its error string otherwise.
#define MOEX_CUDA_REQUIRE(expr)                          \
  do {                                                   \
    const cudaError_t moex_err_ = (expr);                \
    INFO("CUDA error: ", cudaGetErrorString(moex_err_)); \
    REQUIRE(moex_err_ == cudaSuccess);                   \
  } while (0)
