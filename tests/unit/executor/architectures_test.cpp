// Every architecture moex opens computes its whole MoE block exactly: generated checkpoints of
// each one (safetensors and GGUF), opened through the store and run by the executor, against the
// float64 reference of support/moe_block_reference.hpp, at batch 1 and at a larger batch, in the
// master precision and through a low-precision copy; and a backend that cannot compute a block is
// refused at creation, never run wrong.
#include <cmath>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/executor/moe_layer_executor.hpp"
#include "moex/store/open_expert_store.hpp"

#include "support/checkpoint_writer.hpp"
#include "support/moe_block_reference.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Architecture;

constexpr Architecture kAll[] = {Architecture::kMixtral,    Architecture::kQwen2Moe,   Architecture::kQwen3Moe,
                                 Architecture::kDeepseekV2, Architecture::kDeepseekV3, Architecture::kOlmoe,
                                 Architecture::kGptOss};

// Tolerance of the executor against float64, relative L2 over the block's output: bf16 weights
// are exact in both; the CPU kernels accumulate in f32 and, under AVX-512-BF16, round activations
// to bf16 once per matmul (expert_ffn.hpp: 3e-3 a dot product): two matmuls, the activation's
// slope and a sum of k experts stay under 2e-2 (measured: at most 1.1e-2). Leaving out a shared
// expert, a bias or the clamp costs 10% or more here.
constexpr double kTol = 2e-2;

// Hidden states whose gate and up projections reach past gpt-oss's clamp (|W x| > limit) for some
// rows, so the clamp is exercised: weights have stddev 0.05 over 64 inputs, x has stddev `scale`.
std::vector<float> hidden_states(std::size_t n, std::size_t h, float scale, std::uint64_t salt) {
  return moex::test::random_normal(n * h, scale, salt);
}

struct Case {
  std::string name;
  std::filesystem::path path;
  moex::test::WrittenModel written;
};

Case make_case(Architecture a, bool gguf, bool mxfp4 = false) {
  moex::ModelConfig c = moex::test::tiny_config(a);
  if (a == Architecture::kGptOss) c.swiglu_limit = gguf ? 7.f : 1.5f;  // GGUF: llama.cpp's fixed 7
  const std::string tag = std::string(moex::to_string(a)) + (gguf ? "-gguf" : mxfp4 ? "-mxfp4" : "-st");
  const auto dir = moex::test::temp_dir("arch-" + tag);
  Case k;
  k.name = tag;
  if (gguf) {
    k.path = dir / "model.gguf";
    k.written = moex::test::write_gguf_model(k.path, c, moex::GgmlType::kBF16);
  } else {
    k.path = dir;
    k.written = moex::test::write_hf_model(dir, c, /*sharded=*/false, mxfp4);
  }
  return k;
}

// Runs every MoE layer of the checkpoint through the executor against the reference. With
// `budget_experts` > 0 the cache holds that many experts (1: every step misses and loads).
void check_block(const Case& k, std::uint32_t budget_experts = 0, const moex::StoreOptions& so = {}) {
  CAPTURE(k.name);
  CAPTURE(moex::test::seed());
  auto m = moex::open_expert_store(k.path, so);
  REQUIRE_MESSAGE(m.is_ok(), m.status().message());
  const moex::ModelConfig& c = m->checkpoint->config();
  moex::ExecutorConfig cfg;
  cfg.cache_bytes = budget_experts * m->store.expert_bytes(m->store.master_format().precision);
  auto ex = moex::MoeLayerExecutor<>::create(m->store, cfg, moex::CpuBackendConfig{.threads = 2});
  REQUIRE_MESSAGE(ex.is_ok(), ex.status().message());
  const std::size_t h = c.hidden;
  // gpt-oss: large enough that some gate and up values pass the clamp (bf16 weights of stddev
  // 0.05; MXFP4 weights are larger by themselves).
  const float scale = c.arch != Architecture::kGptOss ? 1.f : k.name.find("mxfp4") != std::string::npos ? 0.5f : 6.f;
  std::uint64_t salt = 77;
  for (std::size_t sl = 0; sl < m->moe_layers.size(); ++sl) {
    const std::uint32_t layer = m->moe_layers[sl];
    for (std::size_t n : {std::size_t{1}, std::size_t{6}}) {
      CAPTURE(layer);
      CAPTURE(n);
      const auto x = hidden_states(n, h, scale, salt++);
      const moex::test::RefBlock ref = moex::test::ref_moe_block(*m->checkpoint, layer, x, n);
      // The router picks the reference's experts with the reference's weights.
      std::vector<moex::TokenRouting> r(n);
      REQUIRE(ex->route(static_cast<std::uint32_t>(sl), x.data(), n, r).is_ok());
      for (std::size_t t = 0; t < n; ++t) {
        REQUIRE(r[t].k == ref.routing[t].experts.size());
        for (std::uint32_t j = 0; j < r[t].k; ++j) {
          CHECK(r[t].experts[j] == ref.routing[t].experts[j]);
          CHECK(r[t].weights[j] == doctest::Approx(ref.routing[t].weights[j]).epsilon(1e-5));
        }
      }
      std::vector<float> out(n * h, -1.f);
      REQUIRE(ex->forward(static_cast<std::uint32_t>(sl), x.data(), n, out.data()).is_ok());
      const double err = moex::test::rel_error(out, ref.out);
      CAPTURE(err);
      CHECK(err < kTol);
    }
  }
}

// The CPU backend with its capability switched off stands for any backend without it.
struct PlainBackend : moex::CpuBackend {
  PlainBackend(moex::CpuBackendConfig c = {}) : moex::CpuBackend(c) {}  // NOLINT(google-explicit-constructor)
  static constexpr bool kComputesExpertMath = false;
};
struct PlainPolicies : moex::DefaultPolicies {
  using Backend = PlainBackend;
};

}  // namespace

TEST_SUITE("executor") {
TEST_CASE("every architecture's MoE block against its float64 reference: safetensors") {
  for (Architecture a : kAll) check_block(make_case(a, false));
}

TEST_CASE("every architecture's MoE block against its float64 reference: GGUF") {
  for (Architecture a : kAll) check_block(make_case(a, true));
}

TEST_CASE("gpt-oss with MXFP4 experts: clamped SwiGLU, biases, router bias") {
  check_block(make_case(Architecture::kGptOss, false, true));
}

TEST_CASE("a small cache (misses load every step) and a decoded f32 master compute the same block") {
  for (Architecture a : {Architecture::kQwen2Moe, Architecture::kDeepseekV3, Architecture::kGptOss}) {
    const Case k = make_case(a, false);
    check_block(k, 1);
    moex::StoreOptions so;
    so.in_place = false;
    so.master_format = moex::float_format(moex::Precision::kF32);
    check_block(k, 1, so);
  }
}

TEST_CASE("low-precision copies keep the block's biases, activation and shared experts") {
  // int8 copies of a gpt-oss and a Qwen2-MoE model, cached and computed in int8: the block
  // differs from float64 only by int8's rounding, and by much less than dropping a piece would.
  for (Architecture a : {Architecture::kQwen2Moe, Architecture::kGptOss}) {
    const Case k = make_case(a, false);
    moex::StoreOptions so;
    so.extra_formats = {moex::quant_format(moex::Precision::kInt8, 32)};
    so.use_copy_cache = false;
    auto m = moex::open_expert_store(k.path, so);
    REQUIRE(m.is_ok());
    moex::ExecutorConfig cfg;
    cfg.cache_precision = moex::Precision::kInt8;
    auto ex = moex::MoeLayerExecutor<>::create(m->store, cfg, moex::CpuBackendConfig{.threads = 1});
    REQUIRE_MESSAGE(ex.is_ok(), ex.status().message());
    const std::size_t h = m->checkpoint->config().hidden, n = 3;
    const auto x = hidden_states(n, h, a == Architecture::kGptOss ? 6.f : 1.f, 991);
    const auto ref = moex::test::ref_moe_block(*m->checkpoint, m->moe_layers[0], x, n);
    std::vector<float> out(n * h);
    REQUIRE(ex->forward(0, x.data(), n, out.data()).is_ok());
    CAPTURE(k.name);
    CHECK(moex::test::rel_error(out, ref.out) < 3e-2);
  }
}

TEST_CASE("a backend that does not compute the block is refused, never run wrong") {
  // The CPU backend with its capability switched off stands for any backend without it (the
  // CUDA backend today): Mixtral still runs, the other blocks are kUnsupported naming the piece.
  for (Architecture a : kAll) {
    const Case k = make_case(a, false);
    auto m = moex::open_expert_store(k.path);
    REQUIRE(m.is_ok());
    auto ex = moex::MoeLayerExecutor<PlainPolicies>::create(m->store, {});
    CAPTURE(k.name);
    const bool plain = a == Architecture::kMixtral || a == Architecture::kQwen3Moe || a == Architecture::kOlmoe;
    if (plain) {
      CHECK(ex.is_ok());
    } else {
      REQUIRE(!ex.is_ok());
      CHECK(ex.status().code() == moex::StatusCode::kUnsupported);
      const std::string msg = ex.status().message();
      CAPTURE(msg);
      CHECK((msg.find("shared expert") != std::string::npos || msg.find("biases") != std::string::npos));
    }
  }
}

TEST_CASE("the store reports what an incomplete block lacks") {
  moex::MoeModelSpec spec{1, 2, {32, 32}, {moex::RouterKind::kSoftmaxTopKRenorm, 2, 1}};
  spec.block.shared_ffn = 32;
  spec.block.shared_gate = true;
  spec.block.expert_biases = true;
  auto s = moex::ExpertStore::create(spec, moex::float_format(moex::Precision::kF32));
  REQUIRE(s.is_ok());
  const std::vector<float> w(32 * 32, 0.01f), b(32, 0.5f), bad(31, 0.f);
  for (std::uint32_t e = 0; e < 2; ++e) REQUIRE(s->set_expert({0, e}, w.data(), w.data(), w.data()).is_ok());
  CHECK(!s->complete());
  CHECK(s->missing().find("biases") != std::string::npos);
  CHECK(s->set_expert_biases({0, 0}, b, b, bad).code() == moex::StatusCode::kInvalidArgument);
  for (std::uint32_t e = 0; e < 2; ++e) REQUIRE(s->set_expert_biases({0, e}, b, b, b).is_ok());
  CHECK(s->missing().find("shared expert") != std::string::npos);
  CHECK(s->set_shared_expert(0, w.data(), w.data(), w.data(), moex::quant_format(moex::Precision::kInt8, 32)).code() ==
        moex::StatusCode::kInvalidArgument);
  REQUIRE(s->set_shared_expert(0, w.data(), w.data(), w.data(), moex::float_format(moex::Precision::kBF16)).is_ok());
  CHECK(s->missing().find("gate") != std::string::npos);
  REQUIRE(s->set_shared_gate(0, b).is_ok());
  CHECK(s->complete());
  CHECK(s->missing().empty());
  CHECK(s->shared_expert_bytes() == moex::expert_bytes({32, 32}, moex::float_format(moex::Precision::kBF16)));
  auto ex = moex::MoeLayerExecutor<>::create(*s, {});
  REQUIRE(ex.is_ok());
  CHECK(ex->stats().resident_shared_bytes == s->shared_expert_bytes());
  CHECK(ex->stats().to_json().find("resident_shared_bytes") != std::string::npos);
  // A store without shared experts refuses them.
  moex::MoeModelSpec plain{1, 2, {32, 32}, {moex::RouterKind::kSoftmaxTopKRenorm, 2, 1}};
  auto p = moex::ExpertStore::create(plain, moex::float_format(moex::Precision::kF32));
  REQUIRE(p.is_ok());
  CHECK(p->set_shared_gate(0, b).code() == moex::StatusCode::kInvalidArgument);
  CHECK(p->set_expert_biases({0, 0}, b, b, b).code() == moex::StatusCode::kInvalidArgument);
  CHECK(p->expert_math({0, 0}) == nullptr);
}
}  // TEST_SUITE("executor")
