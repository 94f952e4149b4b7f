// CudaBackend: slots, uploads (pageable and registered), per-slot ordering, experts against the
// CPU expert_ffn.
#include <cmath>
#include <cstdint>
#include <vector>

#include <doctest/doctest.h>

#include "moex/backend/cuda_backend.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/quantize.hpp"

#include "gpu_test_support.hpp"
#include "support/test_support.hpp"

namespace {
// The GPU kernels compute with f32 activations; the CPU expert_ffn at avx512bf16/avx2 quantizes
// activations to int8 per group for integer weights (measured 1.4e-2 norm-wise on the H100 host):
// 3e-2 in norm.
constexpr double kBackendTol = 3e-2;
}  // namespace

TEST_SUITE("cuda") {
TEST_CASE("CudaBackend::create rejects empty configurations before touching a device") {
  moex::CudaBackendConfig c;
  CHECK(moex::CudaBackend::create(c).status().code() == moex::StatusCode::kInvalidArgument);
}
}  // TEST_SUITE("cuda")

TEST_SUITE("gpu" * doctest::skip(!moex::test::gpu_available())) {
TEST_CASE("CudaBackend runs uploaded experts like the CPU expert_ffn, reusing slots") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  const moex::ExpertShape shape{640, 1408};
  const moex::WeightFormat f = moex::quant_format(moex::Precision::kInt4, 64, moex::QuantScheme::kAsymmetric);
  const moex::ExpertLayout l = moex::expert_layout(shape, f);
  const std::size_t experts = 6, tokens = 4, slots = 4;

  // Master copies: experts 0..2 in pageable memory, 3..5 in one registered buffer.
  std::vector<std::vector<std::byte>> pageable(3);
  std::vector<std::byte> registered(3 * l.total_bytes);
  auto blob = [&](std::size_t e) -> std::byte* {
    return e < 3 ? pageable[e].data() : registered.data() + (e - 3) * l.total_bytes;
  };
  for (std::size_t e = 0; e < 3; ++e) pageable[e].resize(l.total_bytes);
  for (std::size_t e = 0; e < experts; ++e) {
    const auto a = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, 700 + e);
    const auto b = moex::test::random_normal(shape.ffn * shape.hidden, 0.05f, 710 + e);
    const auto c = moex::test::random_normal(shape.hidden * shape.ffn, 0.05f, 720 + e);
    REQUIRE(moex::pack_expert(a.data(), b.data(), c.data(), shape, f, {blob(e), l.total_bytes}).is_ok());
  }
  const auto x = moex::test::random_normal(tokens * shape.hidden, 1.f, 730);

  // Small staging buffer: forces several chunks per pageable upload.
  moex::CudaBackendConfig cfg;
  cfg.slot_bytes = l.total_bytes;
  cfg.slot_count = slots;
  cfg.staging_bytes = 256 << 10;
  cfg.max_shape = shape;
  auto created = moex::CudaBackend::create(cfg);
  INFO(created.status().to_string());
  REQUIRE(created.is_ok());
  moex::CudaBackend& be = **created;
  REQUIRE(be.register_host(registered.data(), registered.size()).is_ok());

  moex::test::DeviceBuffer<float> dx(x.size()), dout(x.size());
  REQUIRE(dx.upload(x));
  // Two rounds: experts {0,1,3,4} in slots 0..3, then {2,5} overwrite slots 0 and 2.
  const std::vector<std::vector<std::size_t>> rounds = {{0, 1, 3, 4}, {2, 5}};
  for (const auto& round : rounds) {
    MOEX_CUDA_REQUIRE(
        cudaMemsetAsync(dout.get(), 0, x.size() * sizeof(float), static_cast<cudaStream_t>(be.compute_stream())));
    std::vector<moex::SlotTask> tasks;
    std::vector<double> ref(x.size(), 0.0);
    for (std::size_t i = 0; i < round.size(); ++i) {
      const std::size_t e = round[i];
      const std::uint32_t slot = static_cast<std::uint32_t>(i * (round.size() == 2 ? 2 : 1));
      CAPTURE(e);
      REQUIRE(be.upload_slot(slot, blob(e), l.total_bytes).is_ok());
      moex::SlotTask t;
      t.slot = slot;
      t.n = static_cast<std::uint32_t>(1 + e % tokens);
      std::vector<float> xin(t.n * shape.hidden), yout(t.n * shape.hidden);
      std::vector<float> ws(moex::expert_ffn_workspace(shape, t.n));
      for (std::uint32_t j = 0; j < t.n; ++j) {
        t.token[j] = static_cast<std::uint32_t>((e + j) % tokens);
        t.weight[j] = 0.25f + 0.1f * static_cast<float>(j);
        std::copy_n(x.begin() + t.token[j] * shape.hidden, shape.hidden, xin.begin() + j * shape.hidden);
      }
      const moex::ExpertView v = moex::ExpertView::contiguous(blob(e), l);
      REQUIRE(moex::expert_ffn(v, xin.data(), t.n, yout.data(), ws).is_ok());
      for (std::uint32_t j = 0; j < t.n; ++j)
        for (std::size_t c = 0; c < shape.hidden; ++c)
          ref[t.token[j] * shape.hidden + c] += double(t.weight[j]) * yout[j * shape.hidden + c];
      tasks.push_back(t);
    }
    REQUIRE(be.expert_ffn(l, tasks, dx.get(), shape.hidden, dout.get(), shape.hidden).is_ok());
    REQUIRE(be.synchronize().is_ok());
    for (const auto& t : tasks) CHECK(be.slot_ready(t.slot));
    const auto got = dout.download(x.size());
    CHECK(moex::test::rel_error(got, ref) < kBackendTol);
  }
  REQUIRE(be.unregister_host(registered.data()).is_ok());
}
}  // TEST_SUITE("gpu"*doctest::skip(!moex::test::gpu_available()
