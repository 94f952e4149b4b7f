#include "moex/route/router.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <doctest/doctest.h>

#include "support/test_support.hpp"

using moex::RouterConfig;
using moex::RouterKind;
using moex::TokenRouting;

namespace {
// Reference: the formula written plainly in double.
TokenRouting reference_route(const RouterConfig& c, const std::vector<float>& logits, const std::vector<float>& bias) {
  const std::size_t n = logits.size();
  std::vector<double> score(n), key(n);
  if (c.kind == RouterKind::kSigmoidBiasScaled) {
    for (std::size_t e = 0; e < n; ++e) {
      score[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
      key[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
    }
  } else {
    double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
    for (std::size_t e = 0; e < n; ++e) sum += std::exp(logits[e] - mx);
    for (std::size_t e = 0; e < n; ++e) key[e] = score[e] = std::exp(logits[e] - mx) / sum;
  }
  std::vector<std::size_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return key[a] > key[b]; });
  TokenRouting r;
  r.k = c.top_k;
  double sum = 0;
  for (std::uint32_t j = 0; j < c.top_k; ++j) sum += score[idx[j]];
  for (std::uint32_t j = 0; j < c.top_k; ++j) {
    r.experts[j] = static_cast<std::uint32_t>(idx[j]);
    double w = score[idx[j]];
    if (c.kind == RouterKind::kSoftmaxTopKRenorm || (c.kind == RouterKind::kSigmoidBiasScaled && c.norm_topk_prob))
      w /= sum;
    if (c.kind != RouterKind::kSoftmaxTopKRenorm) w *= c.routed_scaling;
    r.weights[j] = static_cast<float>(w);
  }
  return r;
}
}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("Mixtral routing is softmax then top-2 then renormalized on a hand-computed case") {
  RouterConfig c{RouterKind::kSoftmaxTopKRenorm, 4, 2};
  const float logits[4] = {1.f, 3.f, 2.f, 0.f};
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, {}, r).is_ok());
  CHECK(r.k == 2);
  CHECK(r.experts[0] == 1);
  CHECK(r.experts[1] == 2);
  // renormalized softmax of (3, 2): 1/(1+e^-1) and e^-1/(1+e^-1)
  CHECK(r.weights[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(std::exp(-1.0) / (1.0 + std::exp(-1.0))).epsilon(1e-6));
}

TEST_CASE("Qwen2-MoE routing keeps the softmax probabilities without renormalizing") {
  RouterConfig c{RouterKind::kSoftmaxTopK, 4, 2};
  const float logits[4] = {0.f, 0.f, 0.f, 0.f};
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, {}, r).is_ok());
  CHECK(r.experts[0] == 0);  // ties go to the lower id
  CHECK(r.experts[1] == 1);
  CHECK(r.weights[0] == doctest::Approx(0.25));
  CHECK(r.weights[1] == doctest::Approx(0.25));
}

TEST_CASE("DeepSeek-V3 routing selects by score plus bias but weighs by the scaled score") {
  RouterConfig c{RouterKind::kSigmoidBiasScaled, 4, 2, 2.5f};
  const float logits[4] = {2.f, 1.f, 0.f, -1.f};
  const float bias[4] = {0.f, 0.f, 1.f, 0.f};  // lifts expert 2 above expert 1 for selection
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, bias, r).is_ok());
  const double s0 = 1 / (1 + std::exp(-2.0)), s2 = 0.5;
  CHECK(r.experts[0] == 2);  // 0.5 + 1 = 1.5 beats 0.88
  CHECK(r.experts[1] == 0);
  CHECK(r.weights[0] == doctest::Approx(2.5 * s2 / (s0 + s2)).epsilon(1e-6));
  CHECK(r.weights[1] == doctest::Approx(2.5 * s0 / (s0 + s2)).epsilon(1e-6));
}

TEST_CASE("group-limited routing only picks experts of the best groups") {
  RouterConfig c{RouterKind::kSigmoidBiasScaled, 8, 2, 1.f, 4, 1};
  // group 1 (experts 2,3) has the best top-2 sum although expert 0 alone is the best
  const float logits[8] = {5.f, -5.f, 3.f, 3.f, 0.f, 0.f, -1.f, -1.f};
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, {}, r).is_ok());
  CHECK(r.experts[0] == 2);
  CHECK(r.experts[1] == 3);
}

TEST_CASE("a softmax router's bias shifts its logits (gpt-oss); a sigmoid router's only ranks (DeepSeek-V3)") {
  RouterConfig c{RouterKind::kSoftmaxTopKRenorm, 4, 2};
  const float logits[4] = {1.f, 0.f, 0.5f, 0.2f};
  const float bias[4] = {-2.f, 1.5f, 0.f, 0.f};  // z + b = {-1, 1.5, 0.5, 0.2}
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, bias, r).is_ok());
  CHECK(r.experts[0] == 1);
  CHECK(r.experts[1] == 2);
  // softmax over the two biased logits: 1 / (1 + e^-1)
  CHECK(r.weights[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
  RouterConfig s{RouterKind::kSigmoidBiasScaled, 4, 1, 2.f};
  s.norm_topk_prob = false;
  REQUIRE(moex::route_token(s, logits, bias, r).is_ok());
  CHECK(r.experts[0] == 1);                                                  // ranked by sigmoid(z) + b
  CHECK(r.weights[0] == doctest::Approx(2.0 * 0.5).epsilon(1e-6));          // weighed by sigmoid(0), scaled
}

TEST_CASE("group-limited routing masks the other groups' keys to 0, as the reference models do") {
  // Two groups of 2; every key is negative (sigmoid + a large negative bias), group 0 scores
  // best and is kept, and the dropped group's experts (keys masked to 0) then outrank it, as
  // masked_fill(~mask, 0.0) followed by top-k does in DeepSeek-V3's modeling code.
  RouterConfig c{RouterKind::kSigmoidBiasScaled, 4, 2, 1.f, 2, 1};
  const float logits[4] = {0.f, 0.f, 0.f, 0.f};  // sigmoid 0.5 each
  const float bias[4] = {-0.6f, -0.9f, -0.95f, -0.97f};  // keys -0.1, -0.4 | -0.45, -0.47
  TokenRouting r;
  REQUIRE(moex::route_token(c, logits, bias, r).is_ok());
  CHECK(r.experts[0] == 2);  // masked keys of 0, ties to the lower id
  CHECK(r.experts[1] == 3);
}

TEST_CASE("every router variant matches the reference formula on random logits") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  // float softmax against double: the weights agree to a few float ulps.
  constexpr double kTol = 1e-5;
  for (RouterKind kind : {RouterKind::kSoftmaxTopKRenorm, RouterKind::kSoftmaxTopK, RouterKind::kSigmoidBiasScaled}) {
    for (std::uint32_t n : {8u, 64u, 128u}) {
      for (std::uint32_t k : {1u, 2u, 6u, 8u}) {
        RouterConfig c{kind, n, k, kind == RouterKind::kSoftmaxTopKRenorm ? 1.f : 2.5f};
        auto logits = moex::test::random_normal(n, 2.f, n * 31 + k);
        std::vector<float> bias;
        if (kind == RouterKind::kSigmoidBiasScaled) bias = moex::test::random_normal(n, 0.1f, n * 7 + k);
        TokenRouting got;
        REQUIRE(moex::route_token(c, logits, bias, got).is_ok());
        const TokenRouting want = reference_route(c, logits, bias);
        CAPTURE(n);
        CAPTURE(k);
        for (std::uint32_t j = 0; j < k; ++j) {
          CHECK(got.experts[j] == want.experts[j]);
          CHECK(std::abs(got.weights[j] - want.weights[j]) <= kTol * std::max(1.f, std::abs(want.weights[j])));
        }
      }
    }
  }
}

TEST_CASE("bad router input is an error and not a crash") {
  TokenRouting r;
  const float logits[4] = {0.f, 1.f, NAN, 0.f};
  CHECK(moex::route_token({RouterKind::kSoftmaxTopKRenorm, 4, 2}, logits, {}, r).code() ==
        moex::StatusCode::kInvalidArgument);
  const float ok[4] = {0.f, 1.f, 2.f, 0.f};
  CHECK_FALSE(moex::route_token({RouterKind::kSoftmaxTopKRenorm, 4, 0}, ok, {}, r).is_ok());
  CHECK_FALSE(moex::route_token({RouterKind::kSoftmaxTopKRenorm, 4, 5}, ok, {}, r).is_ok());
  CHECK_FALSE(moex::route_token({RouterKind::kSoftmaxTopKRenorm, 8, 2}, ok, {}, r).is_ok());  // size mismatch
  CHECK_FALSE(moex::route_token({static_cast<RouterKind>(9), 4, 2}, ok, {}, r).is_ok());
  CHECK_FALSE(moex::route_token({RouterKind::kSoftmaxTopKRenorm, 4, 2, 1.f, 3, 1}, ok, {}, r).is_ok());
}
}  // TEST_SUITE("cpu")
