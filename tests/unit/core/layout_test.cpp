#include "moex/quant/layout.hpp"

#include <doctest/doctest.h>

#include "moex/status.hpp"

TEST_SUITE("cpu") {
TEST_CASE("expert layouts are aligned and sized by the documented formula") {
  const moex::ExpertShape s{4096, 14336};
  const auto bf16 = moex::expert_layout(s, moex::float_format(moex::Precision::kBF16));
  CHECK(bf16.total_bytes == 3ull * 4096 * 14336 * 2);
  const auto q4 = moex::expert_layout(s, moex::quant_format(moex::Precision::kInt4, 128));
  // 4 bits per weight plus one f16 scale per 128 weights: 4.125 bits per weight.
  CHECK(q4.total_bytes == 3ull * 4096 * 14336 * 4125 / 8000);
  CHECK(q4.w3_offset % moex::kMatrixAlign == 0);
  CHECK(q4.w2_offset % moex::kMatrixAlign == 0);
  CHECK_FALSE(moex::format_is_valid(moex::quant_format(moex::Precision::kInt4, 64), 96));
}

TEST_CASE("Result carries either a value or an error") {
  moex::Result<int> ok = 3;
  CHECK(ok.is_ok());
  CHECK(*ok == 3);
  moex::Result<int> bad = moex::invalid_argument("nope");
  CHECK_FALSE(bad.is_ok());
  CHECK(bad.status().code() == moex::StatusCode::kInvalidArgument);
  CHECK(bad.status().to_string() == "invalid argument: nope");
}
}  // TEST_SUITE("cpu")
