// moex-profile: measures a SimBackend device profile on this machine and writes it as JSON.
// Measured here: host memcpy bandwidth and the host CPU's expert FFN (moex::expert_ffn, bf16, batch
// 1) as host.read_bytes_per_s and host.flops_per_s. GPU fields and links are copied from a known
// profile (--base, default bench/profiles/h100_pcie5.json) because this tool runs no GPU code.
//
// usage: moex-profile [--base PROFILE.json] [--hidden N] [--ffn N] [--out FILE] [--name NAME]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "moex/backend/sim_backend.hpp"
#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/half.hpp"
#include "moex/quant/layout.hpp"
#include "moex/thread_pool.hpp"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best-of-N memcpy bandwidth, counted as read + write bytes.
double memcpy_bytes_per_s(std::size_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::min(best, seconds_since(t0));
    a[static_cast<std::size_t>(i)] = b[bytes - 1];
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string base = (std::filesystem::path(__FILE__).parent_path() / "../../bench/profiles/h100_pcie5.json").string();
  std::string out, name = "this_machine";
  std::uint32_t hidden = 4096, ffn = 14336;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--base")
      base = next();
    else if (a == "--out")
      out = next();
    else if (a == "--name")
      name = next();
    else if (a == "--hidden")
      hidden = static_cast<std::uint32_t>(std::stoul(next()));
    else if (a == "--ffn")
      ffn = static_cast<std::uint32_t>(std::stoul(next()));
    else {
      std::cerr << "usage: moex-profile [--base PROFILE.json] [--hidden N] [--ffn N] [--out FILE] [--name NAME]\n";
      return 2;
    }
  }
  auto prof = moex::load_device_profile(base);
  if (!prof) {
    std::cerr << "moex-profile: " << prof.status().to_string() << "\n";
    return 1;
  }
  moex::DeviceProfile p = *prof;
  p.name = name;

  const double memcpy_bw = memcpy_bytes_per_s(std::size_t{256} << 20);
  p.host_memcpy_bytes_per_s = static_cast<std::uint64_t>(memcpy_bw);

  const moex::ExpertShape shape{hidden, ffn};
  const auto fmt = moex::float_format(moex::Precision::kBF16);
  if (!moex::expert_format_is_valid(shape, fmt)) {
    std::cerr << "moex-profile: invalid expert shape\n";
    return 2;
  }
  const auto layout = moex::expert_layout(shape, fmt);
  std::vector<std::byte> blob(layout.total_bytes);
  for (std::size_t i = 0; i + 1 < blob.size(); i += 2) {  // small bf16 values
    const std::uint16_t v = moex::float_to_bf16(0.001f * static_cast<float>((i / 2) % 17));
    std::memcpy(&blob[i], &v, 2);
  }
  const auto view = moex::ExpertView::contiguous(blob.data(), layout);
  std::vector<float> x(hidden, 0.5f), y(hidden);
  std::vector<float> ws(moex::expert_ffn_workspace(shape, 1));
  moex::ThreadPool pool(std::thread::hardware_concurrency());
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (!moex::expert_ffn(view, x.data(), 1, y.data(), ws, &pool).is_ok()) {
      std::cerr << "moex-profile: expert_ffn failed\n";
      return 1;
    }
    best = std::min(best, seconds_since(t0));
  }
  const std::uint64_t bytes = layout.total_bytes;
  auto& host = p.compute[static_cast<std::size_t>(moex::SimDevice::kHostCpu)];
  host.launch_ns = 0;
  host.read_bytes_per_s = static_cast<std::uint64_t>(static_cast<double>(bytes) / best);
  // Batch 1 is memory bound: the FLOP rate seen there is a lower bound on the host's real rate.
  host.flops_per_s = std::max<std::uint64_t>(
      host.flops_per_s, static_cast<std::uint64_t>(static_cast<double>(moex::expert_flops(shape, 1)) / best));

  std::fprintf(stderr,
               "moex-profile: memcpy %.2f GB/s (read+write); expert %ux%u bf16 batch 1: %.3f ms on %s "
               "(%.2f GB/s); GPU fields from %s\n",
               memcpy_bw / 1e9, hidden, ffn, best * 1e3, moex::cpu_kernel_isa(),
               static_cast<double>(bytes) / best / 1e9, base.c_str());
  const std::string json = moex::device_profile_to_json(p);
  if (out.empty()) {
    std::cout << json;
  } else {
    std::ofstream f(out);
    f << json;
    if (!f) {
      std::cerr << "moex-profile: cannot write " << out << "\n";
      return 1;
    }
  }
  return 0;
}
