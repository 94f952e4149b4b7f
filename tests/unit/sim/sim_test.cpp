// SimBackend: queue arithmetic to the nanosecond, profiles, and infinite bandwidth == compute only.
#include <doctest/doctest.h>

#include "moex/backend/sim_backend.hpp"
#include "moex/quant/layout.hpp"

#include "support/test_support.hpp"

using namespace moex;

namespace {
DeviceProfile simple_profile() {
  DeviceProfile p;
  p.name = "test";
  p.links[static_cast<std::size_t>(SimLink::kHostToDevice)] = {100, 1'000'000'000};  // 1 B/ns
  p.links[static_cast<std::size_t>(SimLink::kDiskToHost)] = {1000, 500'000'000};     // 0.5 B/ns
  p.compute[0].read_bytes_per_s = 4'000'000'000;                                     // 4 B/ns
  p.compute[0].flops_per_s = 10'000'000'000;                                         // 10 FLOP/ns
  p.compute[0].launch_ns = 7;
  p.compute[0].flops_per_s_by_precision[static_cast<std::size_t>(Precision::kFp8E4M3)] = 20'000'000'000;
  return p;
}
}  // namespace

TEST_SUITE("sim") {

TEST_CASE("durations are exact ceilings in integer nanoseconds") {
  CHECK(sim_duration_ns(0, 5) == 0);
  CHECK(sim_duration_ns(1000, 0) == 0);  // infinite bandwidth
  CHECK(sim_duration_ns(1, 1'000'000'000) == 1);
  CHECK(sim_duration_ns(3, 2'000'000'000) == 2);  // 1.5 -> 2
  CHECK(sim_duration_ns(55'000'000'000ull, 55'000'000'000ull) == 1'000'000'000ull);
  // Large values that overflow a naive bytes * 1e9 in 64 bits.
  CHECK(sim_duration_ns(100'000'000'000ull, 3'000'000'000'000ull) == 33'333'334ull);
}

TEST_CASE("queues serialize per resource and run concurrently across resources") {
  SimBackend sim(simple_profile());
  // Two copies on one link: the second starts when the first ends.
  CHECK(sim.submit_copy(SimLink::kHostToDevice, 1000, 0) == 1100);
  CHECK(sim.submit_copy(SimLink::kHostToDevice, 500, 0) == 1700);
  // A disk copy runs at the same time on its own queue.
  CHECK(sim.submit_copy(SimLink::kDiskToHost, 1000, 50) == 3050);
  // not_before later than the queue's free time.
  CHECK(sim.submit_copy(SimLink::kHostToDevice, 10, 5000) == 5110);
  // Compute: roofline max(bytes/bw, flops/rate) + launch; waits on the copy it depends on.
  CHECK(sim.compute_ns(SimDevice::kGpu, Precision::kBF16, 400, 100) == 7 + 100);
  CHECK(sim.compute_ns(SimDevice::kGpu, Precision::kBF16, 400, 5000) == 7 + 500);
  CHECK(sim.compute_ns(SimDevice::kGpu, Precision::kFp8E4M3, 400, 5000) == 7 + 250);
  CHECK(sim.submit_compute(SimDevice::kGpu, Precision::kBF16, 400, 100, 1100) == 1207);
  CHECK(sim.submit_compute(SimDevice::kGpu, Precision::kBF16, 400, 100, 0) == 1314);
  CHECK(sim.link_stats(SimLink::kHostToDevice).operations == 3);
  CHECK(sim.link_stats(SimLink::kHostToDevice).bytes == 1510);
  CHECK(sim.link_stats(SimLink::kHostToDevice).busy_ns == 1100 + 600 + 110);
  CHECK(sim.device_free_at(SimDevice::kGpu) == 1314);
  CHECK(sim.now() == 0);
  CHECK(sim.advance_to(1207) == 1207);
  CHECK(sim.advance_to(10) == 1207);                               // never backward
  CHECK(sim.submit_copy(SimLink::kDiskToHost, 0) == 3050 + 1000);  // default not_before = now
  sim.reset();
  CHECK(sim.now() == 0);
  CHECK(sim.link_free_at(SimLink::kHostToDevice) == 0);
}

TEST_CASE("with infinite bandwidth a run takes exactly its compute time") {
  DeviceProfile p = simple_profile();
  for (auto& l : p.links) l = LinkProfile{0, 0};
  SimBackend sim(p);
  std::uint64_t compute_only = 0;
  for (int layer_step = 0; layer_step < 100; ++layer_step) {
    for (int e = 0; e < 2; ++e) {
      const std::uint64_t bytes = 1000 + 10u * static_cast<std::uint64_t>(e);
      const std::uint64_t ready = sim.submit_copy(SimLink::kHostToDevice, bytes, sim.now());
      const std::uint64_t done = sim.submit_compute(SimDevice::kGpu, Precision::kBF16, bytes, 300, ready);
      sim.advance_to(done);
      compute_only += sim.compute_ns(SimDevice::kGpu, Precision::kBF16, bytes, 300);
    }
  }
  CHECK(sim.now() == compute_only);
}

TEST_CASE("shipped profiles load and reproduce the calibration points") {
  const std::filesystem::path dir = std::filesystem::path(MOEX_SOURCE_DIR) / "bench/profiles";
  auto h100 = load_device_profile(dir / "h100_pcie5.json");
  REQUIRE(h100.is_ok());
  CHECK(h100->links[static_cast<std::size_t>(SimLink::kHostToDevice)].bytes_per_s == 55'000'000'000ull);
  const ExpertShape mixtral{4096, 14336};
  const std::uint64_t bytes = expert_bytes(mixtral, float_format(Precision::kBF16));
  CHECK(bytes >= 352'321'536ull);
  SimBackend sim(*h100);
  // Mixtral-8x7B bf16 expert FFN at batch 1: 0.141 ms on the GPU, 7.0 ms on the host CPU.
  CHECK(sim.compute_ns(SimDevice::kGpu, Precision::kBF16, 352'321'536ull, expert_flops(mixtral, 1)) == 141'000);
  CHECK(sim.compute_ns(SimDevice::kHostCpu, Precision::kBF16, 352'321'536ull, expert_flops(mixtral, 1)) == 7'000'000);
  auto rtx = load_device_profile(dir / "rtx4090_pcie4.json");
  REQUIRE(rtx.is_ok());
  CHECK(rtx->links[static_cast<std::size_t>(SimLink::kHostToDevice)].bytes_per_s == 25'000'000'000ull);
  // Round trip through JSON.
  auto again = parse_device_profile(device_profile_to_json(*h100));
  REQUIRE(again.is_ok());
  CHECK(device_profile_to_json(*again) == device_profile_to_json(*h100));
}

TEST_CASE("bad profiles are errors") {
  CHECK(!parse_device_profile("not json").is_ok());
  CHECK(!parse_device_profile("[1,2]").is_ok());
  CHECK(!parse_device_profile(R"({"links":{"host_to_device":{"bytes_per_s":-1}}})").is_ok());
  CHECK(!parse_device_profile(R"({"gpu":{"flops_per_s_by_precision":{"bogus":1}}})").is_ok());
  CHECK(!parse_device_profile(R"({"gpu":{"read_bytes_per_s":"fast"}})").is_ok());
  CHECK(load_device_profile("/nonexistent/p.json").status().code() == StatusCode::kIo);
}

}  // TEST_SUITE("sim")
