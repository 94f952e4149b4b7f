#include "support/test_support.hpp"

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <unistd.h>

namespace moex::test {

std::uint64_t seed() {
  static const std::uint64_t s = [] {
    if (const char* e = std::getenv("MOEX_TEST_SEED")) return static_cast<std::uint64_t>(std::strtoull(e, nullptr, 0));
    return static_cast<std::uint64_t>(20261125);
  }();
  return s;
}

std::vector<float> random_normal(std::size_t n, float stddev, std::uint64_t salt) {
  std::mt19937_64 rng(seed() ^ (salt * 0x9E3779B97F4A7C15ull));
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double rel_error(const float* a, const double* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

double rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  return rel_error(a.data(), b.data(), a.size());
}

std::optional<std::filesystem::path> shared_dir() {
  if (const char* e = std::getenv("MOEX_SHARED_DIR")) {
    if (std::filesystem::is_directory(e)) return std::filesystem::path(e);
  }
  const std::filesystem::path p(MOEX_SHARED_DIR);
  std::error_code ec;
  if (std::filesystem::is_directory(p / "models", ec)) return std::filesystem::weakly_canonical(p, ec);
  return std::nullopt;
}

namespace {
struct TempDirs {
  std::mutex mu;
  std::vector<std::filesystem::path> dirs;
  ~TempDirs() {
    std::error_code ec;
    for (auto& d : dirs) std::filesystem::remove_all(d, ec);
  }
};
TempDirs& temp_dirs() {
  static TempDirs t;
  return t;
}
}  // namespace

std::filesystem::path temp_dir(const std::string& tag) {
  static std::uint64_t counter = 0;
  auto& t = temp_dirs();
  std::lock_guard lk(t.mu);
  std::filesystem::path p = std::filesystem::temp_directory_path() /
                            ("moex-test-" + std::to_string(::getpid()) + "-" + tag + "-" + std::to_string(counter++));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  t.dirs.push_back(p);
  return p;
}

}  // namespace moex::test
