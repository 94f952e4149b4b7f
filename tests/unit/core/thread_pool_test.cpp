#include "moex/thread_pool.hpp"

#include <atomic>
#include <numeric>
#include <thread>
#include <vector>

#include <doctest/doctest.h>

TEST_SUITE("concurrency") {
TEST_CASE("parallel_for covers every index exactly once at any grain and pool size") {
  for (std::size_t threads : {1u, 2u, 3u, 8u}) {
    moex::ThreadPool pool(threads);
    CHECK(pool.size() == threads);
    for (std::size_t n : {0u, 1u, 7u, 1000u}) {
      for (std::size_t grain : {1u, 3u, 64u}) {
        std::vector<std::atomic<int>> seen(n);
        pool.parallel_for(n, grain, [&](std::size_t b, std::size_t e) {
          for (std::size_t i = b; i < e; ++i) seen[i].fetch_add(1);
        });
        for (std::size_t i = 0; i < n; ++i) REQUIRE(seen[i].load() == 1);
      }
    }
  }
}

TEST_CASE("several threads may call parallel_for on one pool at once") {
  moex::ThreadPool pool(3);
  std::atomic<long> total{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] {
      for (int rep = 0; rep < 50; ++rep)
        pool.parallel_for(100, 1, [&](std::size_t b, std::size_t e) { total += static_cast<long>(e - b); });
    });
  for (auto& t : callers) t.join();
  CHECK(total.load() == 4 * 50 * 100);
}
}  // TEST_SUITE("concurrency")
