#pragma once
// Helpers of the GPU suite: device detection, RAII device buffers, checked CUDA calls.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

#include <cuda_runtime.h>

#include "kernels.hpp"

namespace moex::test {

/// True when a CUDA device is visible (cached; evaluated at test registration).
bool gpu_available();

/// float64 reference of y[t][r] = sum_c w[r][c] x[t][c]: w row-major [rows x cols], x with row
/// stride ldx; the result is dense [n x rows].
inline std::vector<double> reference_gemv(const std::vector<float>& w, std::size_t rows, std::size_t cols,
                                          const std::vector<float>& x, std::size_t n, std::size_t ldx) {
  std::vector<double> ref(n * rows);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t r = 0; r < rows; ++r) {
      double s = 0;
      for (std::size_t c = 0; c < cols; ++c) s += double(w[r * cols + c]) * x[t * ldx + c];
      ref[t * rows + r] = s;
    }
  return ref;
}

/// The first `rows` values of each of n rows of y (row stride ldy), densely packed.
inline std::vector<float> strided_rows(const std::vector<float>& y, std::size_t n, std::size_t rows, std::size_t ldy) {
  std::vector<float> got(n * rows);
  for (std::size_t t = 0; t < n; ++t)
    for (std::size_t r = 0; r < rows; ++r) got[t * rows + r] = y[t * ldy + r];
  return got;
}

/// The CPU's q8 rule (q8_kernel.hpp) on n values in groups of G: the dequantized values d_x * q.
inline std::vector<double> q8_round(const double* v, std::size_t n, std::size_t G) {
  std::vector<double> out(n);
  for (std::size_t g = 0; g < n / G; ++g) {
    float amax = 0.f;
    for (std::size_t c = g * G; c < (g + 1) * G; ++c) amax = std::max(amax, std::fabs(static_cast<float>(v[c])));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const float d = amax / 127.f;
    for (std::size_t c = g * G; c < (g + 1) * G; ++c)
      out[c] = double(d) * std::nearbyint(static_cast<float>(v[c]) * inv);
  }
  return out;
}

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

/// Runs cuda::grouped_expert_ffn (or `launch`, when given) for `tasks` (experts of `layout`
/// already on the device) on device copies of x and out0 (row stride ld), with a poisoned
/// workspace, and returns out - out0: the experts' contributions. REQUIREs success and CHECKs that
/// every output is finite (call inside a doctest case).
std::vector<float> run_grouped_delta(const moex::ExpertLayout& layout, const std::vector<cuda::ExpertTask>& tasks,
                                     const std::vector<float>& x, std::size_t ld, const std::vector<float>& out0,
                                     bool exact,
                                     const std::function<Status(const cuda::GroupedExpertArgs&)>& launch = {});

}  // namespace moex::test

/// REQUIREs that a CUDA runtime call succeeded, printing its error string otherwise.
#define MOEX_CUDA_REQUIRE(expr)                          \
  do {                                                   \
    const cudaError_t moex_err_ = (expr);                \
    INFO("CUDA error: ", cudaGetErrorString(moex_err_)); \
    REQUIRE(moex_err_ == cudaSuccess);                   \
  } while (0)
