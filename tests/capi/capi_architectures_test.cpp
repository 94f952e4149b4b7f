// The C API's forward returns each architecture's whole MoE block: generated checkpoints of every
// architecture (safetensors and GGUF) opened with moex_model_open and run with
// moex_executor_forward_f32 / _forward_routed_f32 against the float64 reference of
// tests/support/moe_block_reference.hpp (which reads the checkpoint in C++, apart from libmoex).
#include <moex.h>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "support/checkpoint_writer.hpp"
#include "support/moe_block_reference.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Architecture;

// As in tests/unit/executor/architectures_test.cpp (bf16 activations under AVX-512-BF16).
constexpr double kTol = 2e-2;

void run_arch(Architecture a, bool gguf) {
  moex::ModelConfig c = moex::test::tiny_config(a);
  const std::string tag = std::string(moex::to_string(a)) + (gguf ? "-gguf" : "-st");
  CAPTURE(tag);
  CAPTURE(moex::test::seed());
  const auto dir = moex::test::temp_dir("capi-arch-" + tag);
  std::filesystem::path path = dir;
  if (gguf) {
    path = dir / "model.gguf";
    moex::test::write_gguf_model(path, c, moex::GgmlType::kBF16);
  } else {
    moex::test::write_hf_model(dir, c, /*sharded=*/true);
  }
  auto ck = moex::Checkpoint::open(path);
  REQUIRE(ck.is_ok());
  moex_model* model = nullptr;
  REQUIRE_MESSAGE(moex_model_open(path.c_str(), nullptr, nullptr, nullptr, &model) == MOEX_OK,
                  moex_last_error_message());
  moex_model_info info;
  moex_model_info_init(&info);
  REQUIRE(moex_model_get_info(model, &info) == MOEX_OK);
  moex_executor_params p;
  moex_executor_params_init(&p);
  p.threads = 2;
  moex_executor* ex = nullptr;
  REQUIRE_MESSAGE(moex_executor_create(model, &p, &ex) == MOEX_OK, moex_last_error_message());
  const std::size_t h = info.hidden;
  std::uint32_t moe_layer = 0;  // checkpoint layer of MoE layer sl
  std::uint64_t salt = 4242;
  for (std::uint32_t sl = 0; sl < info.n_layers; ++sl, ++moe_layer) {
    while (!ck.value()->config().is_moe_layer(moe_layer)) ++moe_layer;
    for (std::size_t n : {std::size_t{1}, std::size_t{5}}) {
      CAPTURE(sl);
      CAPTURE(n);
      const auto x = moex::test::random_normal(n * h, a == Architecture::kGptOss ? 6.f : 1.f, salt++);
      const auto ref = moex::test::ref_moe_block(**ck, moe_layer, x, n);
      std::vector<float> out(n * h, -1.f);
      REQUIRE(moex_executor_forward_f32(ex, sl, x.data(), n, out.data()) == MOEX_OK);
      CHECK(moex::test::rel_error(out, ref.out) < kTol);
      // The engine's own routing (the reference's) through forward_routed gives the same block.
      const std::uint32_t k = info.top_k;
      std::vector<std::uint32_t> experts(n * k);
      std::vector<float> weights(n * k);
      for (std::size_t t = 0; t < n; ++t)
        for (std::uint32_t j = 0; j < k; ++j) {
          experts[t * k + j] = ref.routing[t].experts[j];
          weights[t * k + j] = static_cast<float>(ref.routing[t].weights[j]);
        }
      std::vector<float> routed(n * h, -1.f);
      REQUIRE(moex_executor_forward_routed_f32(ex, sl, experts.data(), weights.data(), k, n, x.data(), routed.data()) ==
              MOEX_OK);
      CHECK(moex::test::rel_error(routed, ref.out) < kTol);
    }
  }
  char json[1 << 16];
  size_t needed = 0;
  REQUIRE(moex_executor_stats_json(ex, json, sizeof json, &needed) == MOEX_OK);
  CHECK((std::string(json).find("resident_shared_bytes") != std::string::npos) == (c.n_shared_experts > 0));
  moex_executor_destroy(ex);
  moex_model_destroy(model);
}

}  // namespace

TEST_SUITE("capi") {
TEST_CASE("the C API's forward computes every architecture's whole MoE block") {
  for (Architecture a :
       {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe, Architecture::kDeepseekV2,
        Architecture::kDeepseekV3, Architecture::kOlmoe, Architecture::kGptOss})
    for (bool gguf : {false, true}) run_arch(a, gguf);
}
}  // TEST_SUITE("capi")
