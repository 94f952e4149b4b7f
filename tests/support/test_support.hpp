#pragma once
// Helpers shared by the test suites: seeds, random data, higher-precision references, ../shared.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace moex::test {

/// The seed of this run: MOEX_TEST_SEED from the environment, else a fixed default. Tests print it
/// with CAPTURE so a failure can be replayed.
std::uint64_t seed();

/// n floats drawn from N(0, stddev), from a generator seeded with seed() ^ salt.
std::vector<float> random_normal(std::size_t n, float stddev, std::uint64_t salt);

/// ||a - b|| / ||b|| in double.
double rel_error(const std::vector<float>& a, const std::vector<double>& b);
double rel_error(const float* a, const double* b, std::size_t n);

/// The shared data folder (../shared beside the source tree) if present.
std::optional<std::filesystem::path> shared_dir();

/// A fresh empty temporary directory, removed at process exit.
std::filesystem::path temp_dir(const std::string& tag);

}  // namespace moex::test

/// Skips the current test case with a clear message when ../shared is absent (a user's clone).
#define MOEX_REQUIRE_SHARED(var)                                                               \
  auto var##_opt = ::moex::test::shared_dir();                                                 \
  if (!var##_opt) {                                                                            \
    MESSAGE("skipped: ../shared is absent (it ships with the project's CI, not with clones)"); \
    return;                                                                                    \
  }                                                                                            \
  const std::filesystem::path var = *var##_opt
