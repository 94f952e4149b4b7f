// The CPU expert FFN on block-format experts (GGUF Q8_0/Q4_0/Q4_K, fp8 e4m3 with its scale
// section) laid out by quant/layout.hpp, against float64 math on fresh random data.
#include <vector>

#include <doctest/doctest.h>

#include "moex/cpu/expert_ffn.hpp"
#include "moex/thread_pool.hpp"

#include "support/block_expert.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Precision;

// Every CPU level (SIMD kernels and the portable decode path) decodes each weight exactly (Q4_K: one
// f32 rounding) and accumulates in f32: norm-wise error a few f32 ulps times sqrt(length <= 512);
// 1e-5 is ~10x that.
constexpr double kBlockFfnTol = 1e-5;

struct Case {
  Precision p;
  moex::ExpertShape shape;
};

// Shapes with partial 128x128 fp8 scale blocks, and several blocks per row elsewhere.
constexpr Case kCases[] = {{Precision::kQ8_0, {96, 160}},
                           {Precision::kQ4_0, {160, 96}},
                           {Precision::kQ4_K, {512, 256}},
                           {Precision::kFp8E4M3, {160, 288}}};

}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("expert_ffn on block-format experts matches float64, one thread or a pool") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  moex::ThreadPool pool(2);
  std::uint64_t salt = 300;
  for (const Case& c : kCases) {
    CAPTURE(moex::to_string(c.p));
    const auto e = moex::test::random_block_expert(c.shape, c.p, salt++);
    for (std::size_t n : {1u, 3u, 8u}) {
      CAPTURE(n);
      const auto x = moex::test::random_normal(n * c.shape.hidden, 1.f, salt++);
      std::vector<float> y(n * c.shape.hidden), y2(y.size()), ws(moex::expert_ffn_workspace(c.shape, n));
      REQUIRE(moex::expert_ffn(e.view(), x.data(), n, y.data(), ws).is_ok());
      const auto ref = moex::test::reference_expert(e.w, c.shape, x.data(), n);
      CHECK(moex::test::rel_error(y, ref) < kBlockFfnTol);
      REQUIRE(moex::expert_ffn(e.view(), x.data(), n, y2.data(), ws, &pool).is_ok());
      CHECK(y2 == y);  // rows split across threads: bit-identical
    }
  }
}

TEST_CASE("fp8 e4m3 views need the layout's scale section") {
  const auto e = moex::test::random_block_expert({160, 288}, Precision::kFp8E4M3, 7);
  auto v = e.view();
  CHECK(moex::check_matrix_view(v.w1()).is_ok());
  auto bad = v;
  bad.layout.w1.scales_offset = 0;  // a checkpoint's fp8 bytes, scales elsewhere
  CHECK(moex::check_matrix_view(bad.w1()).code() == moex::StatusCode::kUnsupported);
  bad = v;
  bad.layout.w1.scales_offset += 64;
  CHECK(moex::check_matrix_view(bad.w1()).code() == moex::StatusCode::kUnsupported);
  bad = v;
  bad.layout.w1.cols = 100;  // not a multiple of 32
  CHECK(moex::check_matrix_view(bad.w1()).code() == moex::StatusCode::kInvalidArgument);
  std::vector<float> x(160, 1.f), y(160), ws(moex::expert_ffn_workspace({160, 288}, 1));
  bad = v;
  bad.layout.w2.scales_offset = 0;
  CHECK(moex::expert_ffn(bad, x.data(), 1, y.data(), ws).code() == moex::StatusCode::kUnsupported);
}
}  // TEST_SUITE("cpu")
