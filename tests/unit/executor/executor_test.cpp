#include <cmath>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/executor/moe_layer_executor.hpp"
#include "moex/quant/quantize.hpp"

#include "support/test_support.hpp"

namespace {

struct TinyModel {
  moex::MoeModelSpec spec;
  moex::ExpertStore store;
};

TinyModel make_model(moex::WeightFormat fmt, std::uint32_t layers = 2, std::uint32_t experts = 4,
                     std::uint32_t top_k = 2, std::uint32_t hidden = 64, std::uint32_t ffn = 96) {
  moex::MoeModelSpec spec{layers, experts, {hidden, ffn}, {moex::RouterKind::kSoftmaxTopKRenorm, experts, top_k}};
  auto store = moex::ExpertStore::create(spec, fmt);
  REQUIRE(store.is_ok());
  std::uint64_t salt = 1;
  for (std::uint32_t l = 0; l < layers; ++l) {
    for (std::uint32_t e = 0; e < experts; ++e) {
      auto w1 = moex::test::random_normal(std::size_t{ffn} * hidden, 0.1f, salt++);
      auto w3 = moex::test::random_normal(std::size_t{ffn} * hidden, 0.1f, salt++);
      auto w2 = moex::test::random_normal(std::size_t{hidden} * ffn, 0.1f, salt++);
      REQUIRE(store->set_expert({l, e}, w1.data(), w3.data(), w2.data()).is_ok());
    }
    auto r = moex::test::random_normal(std::size_t{experts} * hidden, 0.5f, salt++);
    REQUIRE(store->set_router(l, r).is_ok());
  }
  return {spec, std::move(*store)};
}

// Dense reference in double from the dequantized master weights: every expert computed, the
// selected ones combined with the router's weights.
std::vector<double> dense_reference(const moex::ExpertStore& store, std::uint32_t layer, const std::vector<float>& x,
                                    std::size_t n) {
  const auto& spec = store.spec();
  const std::size_t h = spec.shape.hidden, f = spec.shape.ffn;
  std::vector<double> out(n * h, 0.0);
  std::vector<float> logits(spec.n_experts);
  for (std::size_t t = 0; t < n; ++t) {
    moex::router_logits(store.router_weights(layer), spec.n_experts, h, &x[t * h], 1, logits.data());
    moex::TokenRouting r;
    REQUIRE(moex::route_token(spec.router, logits, {}, r).is_ok());
    for (std::uint32_t j = 0; j < r.k; ++j) {
      auto v = store.master({layer, r.experts[j]});
      REQUIRE(v.is_ok());
      std::vector<float> w1(f * h), w3(f * h), w2(h * f);
      moex::dequantize_matrix(v->w1(), w1.data());
      moex::dequantize_matrix(v->w3(), w3.data());
      moex::dequantize_matrix(v->w2(), w2.data());
      std::vector<double> act(f);
      for (std::size_t i = 0; i < f; ++i) {
        double g = 0, u = 0;
        for (std::size_t c = 0; c < h; ++c) {
          g += double(w1[i * h + c]) * x[t * h + c];
          u += double(w3[i * h + c]) * x[t * h + c];
        }
        act[i] = g / (1 + std::exp(-g)) * u;
      }
      for (std::size_t o = 0; o < h; ++o) {
        double y = 0;
        for (std::size_t i = 0; i < f; ++i) y += double(w2[o * f + i]) * act[i];
        out[t * h + o] += r.weights[j] * y;
      }
    }
  }
  return out;
}

}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("the executor's output equals a dense computation of the same layer") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  // f32 weights: f32 accumulation over K <= 96 terms, twice: relative error far below 1e-5.
  constexpr double kTolF32 = 1e-5;
  // bf16/int weights: the reference uses the same dequantized weights, but the CPU kernels may
  // round activations to bf16 (vdpbf16ps paths): 2^-9 relative per operand, ~4e-3 after two
  // layers of random-sign sums; 1e-2 leaves room without hiding a wrong expert or weight.
  constexpr double kTolBf16Activations = 1e-2;
  // int weights: the CPU kernels quantize activations to int8 per group (llama.cpp's scheme): a
  // step of max|x|/127 per group, ~0.5% per product chain, compounded through w1/w3 and w2.
  constexpr double kTolInt8Activations = 3e-2;
  for (auto fmt : {moex::float_format(moex::Precision::kF32), moex::float_format(moex::Precision::kBF16),
                   moex::quant_format(moex::Precision::kInt4, 32)}) {
    CAPTURE(moex::to_string(fmt.precision));
    auto m = make_model(fmt);
    auto ex = moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = 2 * m.store.expert_bytes(fmt.precision)});
    REQUIRE(ex.is_ok());
    for (std::size_t n : {1u, 3u, 8u}) {
      for (std::uint32_t layer = 0; layer < 2; ++layer) {
        auto x = moex::test::random_normal(n * 64, 1.f, 100 + n + layer);
        std::vector<float> y(n * 64, NAN);
        REQUIRE(ex->forward(layer, x.data(), n, y.data()).is_ok());
        const double tol = fmt.precision == moex::Precision::kF32 ? kTolF32
                           : moex::is_quantized(fmt.precision)    ? kTolInt8Activations
                                                                  : kTolBf16Activations;
        CHECK(moex::test::rel_error(y, dense_reference(m.store, layer, x, n)) < tol);
      }
    }
    const auto total = ex->stats().total();
    CHECK(total.hits + total.misses == total.expert_calls);
    CHECK(total.bytes_loaded == total.misses * m.store.expert_bytes(fmt.precision));
  }
}

TEST_CASE("LRU through the executor counts hits and misses and evicts in order with two slots") {
  auto m = make_model(moex::float_format(moex::Precision::kBF16), 1, 4, 1);
  const std::size_t eb = m.store.expert_bytes(moex::Precision::kBF16);
  auto ex = moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = 2 * eb + eb / 2});
  REQUIRE(ex.is_ok());
  CHECK(ex->slot_count() == 2);
  auto x = moex::test::random_normal(64, 1.f, 7);
  std::vector<float> y(64);
  auto step = [&](std::uint32_t e) {
    moex::TokenRouting r;
    r.k = 1;
    r.experts[0] = e;
    r.weights[0] = 1.f;
    REQUIRE(ex->forward_routed(0, std::span(&r, 1), x.data(), 1, y.data()).is_ok());
  };
  step(0);  // miss
  step(1);  // miss
  step(0);  // hit; 1 is now least recent
  step(2);  // miss, evicts 1
  CHECK(ex->resident({0, 0}));
  CHECK_FALSE(ex->resident({0, 1}));
  CHECK(ex->resident({0, 2}));
  step(1);  // miss, evicts 0
  CHECK_FALSE(ex->resident({0, 0}));
  const auto s = ex->stats().layers[0];
  CHECK(s.hits == 1);
  CHECK(s.misses == 4);
  CHECK(s.evictions == 2);
  CHECK(s.bytes_loaded == 4 * eb);
}

TEST_CASE("bad input to the executor is an error and never a crash") {
  auto m = make_model(moex::float_format(moex::Precision::kBF16));
  const std::size_t eb = m.store.expert_bytes(moex::Precision::kBF16);
  SUBCASE("a budget smaller than one expert is refused") {
    auto ex = moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = eb - 1});
    CHECK(ex.status().code() == moex::StatusCode::kInvalidArgument);
  }
  SUBCASE("a cache precision the store does not hold is refused") {
    auto ex =
        moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = 4 * eb, .cache_precision = moex::Precision::kInt4});
    CHECK(ex.status().code() == moex::StatusCode::kInvalidArgument);
  }
  auto ex = moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = 4 * eb});
  REQUIRE(ex.is_ok());
  auto x = moex::test::random_normal(2 * 64, 1.f, 9);
  std::vector<float> y(2 * 64);
  SUBCASE("non-finite hidden states") {
    x[70] = NAN;
    CHECK(ex->forward(0, x.data(), 2, y.data()).code() == moex::StatusCode::kInvalidArgument);
    x[70] = INFINITY;
    CHECK(ex->forward(0, x.data(), 2, y.data()).code() == moex::StatusCode::kInvalidArgument);
  }
  SUBCASE("wrong layer or zero tokens or null pointers") {
    CHECK_FALSE(ex->forward(2, x.data(), 2, y.data()).is_ok());
    CHECK_FALSE(ex->forward(0, x.data(), 0, y.data()).is_ok());
    CHECK_FALSE(ex->forward(0, nullptr, 2, y.data()).is_ok());
    CHECK_FALSE(ex->forward(0, x.data(), 2, nullptr).is_ok());
  }
  SUBCASE("a routing naming an expert that does not exist") {
    moex::TokenRouting r;
    r.k = 1;
    r.experts[0] = 99;
    r.weights[0] = 1.f;
    CHECK_FALSE(ex->forward_routed(0, std::span(&r, 1), x.data(), 1, y.data()).is_ok());
  }
}

TEST_CASE("an incomplete store or a bad spec is refused") {
  moex::MoeModelSpec spec{1, 2, {64, 64}, {moex::RouterKind::kSoftmaxTopKRenorm, 2, 1}};
  auto store = moex::ExpertStore::create(spec, moex::float_format(moex::Precision::kBF16));
  REQUIRE(store.is_ok());
  CHECK_FALSE(moex::MoeLayerExecutor<>::create(*store, {}).is_ok());
  spec.shape.hidden = 0;
  CHECK_FALSE(moex::ExpertStore::create(spec, moex::float_format(moex::Precision::kBF16)).is_ok());
  spec.shape.hidden = 60;  // not a multiple of any group size
  CHECK_FALSE(moex::ExpertStore::create(spec, moex::quant_format(moex::Precision::kInt4, 32)).is_ok());
}
}  // TEST_SUITE("cpu")

TEST_CASE("the executor records the routing it used as a trace") {
  auto m = make_model(moex::float_format(moex::Precision::kBF16), 2, 4, 2);
  auto ex =
      moex::MoeLayerExecutor<>::create(m.store, {.cache_bytes = 8 * m.store.expert_bytes(moex::Precision::kBF16)});
  REQUIRE(ex.is_ok());
  ex->record_trace(true);
  auto x = moex::test::random_normal(3 * 64, 1.f, 11);
  std::vector<float> y(3 * 64);
  for (std::uint32_t l = 0; l < 2; ++l) REQUIRE(ex->forward(l, x.data(), 3, y.data()).is_ok());
  ex->begin_sequence();
  for (std::uint32_t l = 0; l < 2; ++l) REQUIRE(ex->forward(l, x.data(), 1, y.data()).is_ok());
  const auto& tr = ex->recorded_trace();
  REQUIRE(tr.validate().is_ok());
  CHECK(tr.tokens() == 4);
  CHECK(tr.seq_start == std::vector<std::uint32_t>{0, 3});
  std::vector<moex::TokenRouting> want(1);
  REQUIRE(ex->route(1, x.data(), 1, want).is_ok());
  REQUIRE(tr.experts(3, 1).size() == 2);
  CHECK(tr.experts(3, 1)[0] == want[0].experts[0]);
  CHECK(tr.experts(3, 1)[1] == want[0].experts[1]);
  CHECK(tr.weights(3, 1)[0] == doctest::Approx(want[0].weights[0]));
}

#include "moex/backend/sim_execution_backend.hpp"

namespace {
struct SimPolicies : moex::DefaultPolicies {
  using Backend = moex::SimExecutionBackend;
};
moex::DeviceProfile test_profile(std::uint64_t link_bps) {
  moex::DeviceProfile p;
  p.name = "test";
  p.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)] = {1000, link_bps};
  p.compute[static_cast<std::size_t>(moex::SimDevice::kGpu)].read_bytes_per_s = 1'000'000'000'000ull;
  return p;
}
}  // namespace

TEST_CASE("the same executor replays routing on the simulator with exact virtual-time accounting") {
  moex::MoeModelSpec spec{2, 4, {4096, 14336}, {moex::RouterKind::kSoftmaxTopKRenorm, 4, 1}};
  auto store = moex::ExpertStore::create_virtual(spec, moex::float_format(moex::Precision::kBF16));
  REQUIRE(store.is_ok());
  const std::uint64_t eb = store->expert_bytes(moex::Precision::kBF16);
  REQUIRE(eb == 3ull * 4096 * 14336 * 2);
  auto ex = moex::MoeLayerExecutor<SimPolicies>::create(*store, {.cache_bytes = 2 * eb},
                                                        moex::SimExecutionBackend(test_profile(50'000'000'000ull)));
  REQUIRE(ex.is_ok());
  moex::TokenRouting r;
  r.k = 1;
  r.weights[0] = 1.f;
  const std::uint32_t seq[] = {0, 1, 0, 2};
  for (std::uint32_t e : seq) {
    r.experts[0] = e;
    REQUIRE(ex->forward_routed(0, std::span(&r, 1), nullptr, 1, nullptr).is_ok());
  }
  const auto s = ex->stats().layers[0];
  CHECK(s.misses == 3);
  CHECK(s.hits == 1);
  // Each miss: 1000 ns latency + bytes / 50 GB/s, rounded up to the nanosecond; nothing overlaps.
  const std::uint64_t copy_ns = 1000 + moex::sim_duration_ns(eb, 50'000'000'000ull);
  CHECK(s.stall_ns == 3 * copy_ns);
  const std::uint64_t compute_ns = moex::sim_duration_ns(eb, 1'000'000'000'000ull);
  CHECK(s.compute_ns == 4 * compute_ns);
  CHECK(ex->backend().now_ns() == 3 * copy_ns + 4 * compute_ns);
  SUBCASE("a virtual store cannot drive a data backend") {
    CHECK_FALSE(moex::MoeLayerExecutor<>::create(*store, {.cache_bytes = 2 * eb}).is_ok());
  }
}

TEST_CASE("with infinite bandwidth the simulated time equals the compute-only time") {
  moex::MoeModelSpec spec{1, 8, {1024, 3584}, {moex::RouterKind::kSoftmaxTopKRenorm, 8, 2}};
  auto store = moex::ExpertStore::create_virtual(spec, moex::float_format(moex::Precision::kBF16));
  REQUIRE(store.is_ok());
  const std::uint64_t eb = store->expert_bytes(moex::Precision::kBF16);
  moex::DeviceProfile p = test_profile(0);  // 0 = infinite bandwidth
  p.links[static_cast<std::size_t>(moex::SimLink::kHostToDevice)].latency_ns = 0;
  auto ex = moex::MoeLayerExecutor<SimPolicies>::create(*store, {.cache_bytes = 2 * eb}, moex::SimExecutionBackend(p));
  REQUIRE(ex.is_ok());
  moex::TokenRouting r;
  r.k = 2;
  r.weights[0] = r.weights[1] = 0.5f;
  for (std::uint32_t t = 0; t < 50; ++t) {
    r.experts[0] = t % 8;
    r.experts[1] = (t * 3 + 1) % 8;
    if (r.experts[1] == r.experts[0]) r.experts[1] = (r.experts[0] + 1) % 8;
    REQUIRE(ex->forward_routed(0, std::span(&r, 1), nullptr, 1, nullptr).is_ok());
  }
  const auto s = ex->stats().total();
  CHECK(s.stall_ns == 0);
  CHECK(ex->backend().now_ns() == s.compute_ns);
  CHECK(s.compute_ns == 100 * moex::sim_duration_ns(eb, 1'000'000'000'000ull));
}

namespace {
// The simulator backend, logging the order of copies queued ('s') and waited on ('w').
struct RecordingSim : moex::SimExecutionBackend {
  using moex::SimExecutionBackend::SimExecutionBackend;
  std::string* log = nullptr;
  moex::Status start_load(moex::Precision pool, std::size_t slot, const moex::ExpertView& src,
                          moex::LoadTicket& ticket) noexcept {
    *log += 's';
    return moex::SimExecutionBackend::start_load(pool, slot, src, ticket);
  }
  moex::Status wait_load(moex::LoadTicket ticket) noexcept {
    *log += 'w';
    return moex::SimExecutionBackend::wait_load(ticket);
  }
};
}  // namespace

TEST_CASE("the executor queues the next miss's copy before waiting on the current one unless it would evict it") {
  moex::MoeModelSpec spec{1, 4, {4096, 14336}, {moex::RouterKind::kSoftmaxTopKRenorm, 4, 2}};
  auto store = moex::ExpertStore::create_virtual(spec, moex::float_format(moex::Precision::kBF16));
  REQUIRE(store.is_ok());
  const std::uint64_t eb = store->expert_bytes(moex::Precision::kBF16);
  struct Policies : moex::DefaultPolicies {
    using Backend = RecordingSim;
  };
  moex::TokenRouting r;
  r.k = 2;
  r.experts[0] = 0;
  r.experts[1] = 1;
  r.weights[0] = r.weights[1] = 0.5f;
  for (const std::uint64_t slots : {2ull, 1ull}) {
    CAPTURE(slots);
    std::string log;
    auto ex = moex::MoeLayerExecutor<Policies>::create(*store, {.cache_bytes = slots * eb},
                                                       RecordingSim(test_profile(50'000'000'000ull)));
    REQUIRE(ex.is_ok());
    ex->backend().log = &log;
    REQUIRE(ex->forward_routed(0, std::span(&r, 1), nullptr, 1, nullptr).is_ok());
    // Room for both: the second copy is queued before the first is waited on. Room for one: the
    // second copy's victim would be the first miss, so it is loaded after that one ran.
    CHECK(log == (slots == 2 ? "ssww" : "swsw"));
    CHECK(ex->stats().layers[0].misses == 2);
    // Later steps hit or miss exactly as loading in turn would (LRU with `slots` slots).
    r.experts[0] = 1;
    r.experts[1] = 2;
    log.clear();
    REQUIRE(ex->forward_routed(0, std::span(&r, 1), nullptr, 1, nullptr).is_ok());
    CHECK(ex->stats().layers[0].hits == 1);  // expert 1, kept in both cases
    r.experts[0] = 0;
    r.experts[1] = 1;
  }
}
