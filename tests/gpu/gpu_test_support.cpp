#include "gpu_test_support.hpp"

#include <doctest/doctest.h>

namespace moex::test {

bool gpu_available() {
  static const bool available = [] {
    int count = 0;
    const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
    cudaGetLastError();
    return ok;
  }();
  return available;
}

std::vector<float> run_grouped_delta(const moex::ExpertLayout& layout, const std::vector<cuda::ExpertTask>& tasks,
                                     const std::vector<float>& x, std::size_t ld, const std::vector<float>& out0,
                                     bool exact, const std::function<Status(const cuda::GroupedExpertArgs&)>& launch) {
  const auto count = static_cast<std::uint32_t>(tasks.size());
  DeviceBuffer<float> dx(x.size()), dout(out0.size());
  DeviceBuffer<std::byte> ws(cuda::grouped_expert_workspace_bytes(layout.shape, count));
  REQUIRE(dx.upload(x));
  REQUIRE(dout.upload(out0));
  MOEX_CUDA_REQUIRE(cudaMemset(ws.get(), 0xFF, ws.size()));  // poisoned scratch
  cuda::GroupedExpertArgs a;
  a.layout = layout;
  a.tasks = tasks.data();
  a.count = count;
  a.x = dx.get();
  a.ldx = ld;
  a.out = dout.get();
  a.ldo = ld;
  a.workspace = reinterpret_cast<float*>(ws.get());
  a.exact = exact;
  const Status st = launch ? launch(a) : cuda::grouped_expert_ffn(a, nullptr);
  INFO(st.to_string());
  REQUIRE(st.is_ok());
  MOEX_CUDA_REQUIRE(cudaDeviceSynchronize());
  const auto got = dout.download(out0.size());
  CHECK(std::all_of(got.begin(), got.end(), [](float v) { return std::isfinite(v); }));
  std::vector<float> delta(got.size());
  for (std::size_t i = 0; i < got.size(); ++i) delta[i] = got[i] - out0[i];
  return delta;
}

}  // namespace moex::test
