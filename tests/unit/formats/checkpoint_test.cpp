// Checkpoints of every architecture written with the writers, opened through Checkpoint, every
// expert's bytes compared with what was written; the shared tiny-mixtral models; bad inputs.

#include "moex/formats/checkpoint.hpp"

#include <cstring>
#include <fstream>

#include <doctest/doctest.h>

#include "moex/formats/safetensors.hpp"
#include "moex/quant/half.hpp"

#include "support/checkpoint_writer.hpp"
#include "support/test_support.hpp"

using namespace moex;
namespace fs = std::filesystem;

namespace {

bool same_bytes(std::span<const std::byte> a, const std::vector<std::byte>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), b.size()) == 0;
}

std::vector<float> to_f32(const TensorRef& t) {
  std::vector<float> v(t.numel());
  const Status s = tensor_to_f32(t, v);
  REQUIRE_MESSAGE(s.is_ok(), s.to_string());
  return v;
}

// Opens `dir` and checks config and every expert of every MoE layer against `w`.
void check_model(const fs::path& path, const test::WrittenModel& w, bool bytes_exact, bool values_exact) {
  auto ck = Checkpoint::open(path);
  REQUIRE_MESSAGE(ck.is_ok(), ck.status().to_string());
  const auto& c = (*ck)->config();
  CHECK(c.arch == w.config.arch);
  CHECK(c.n_layers == w.config.n_layers);
  CHECK(c.n_experts == w.config.n_experts);
  CHECK(c.top_k == w.config.top_k);
  CHECK(c.hidden == w.config.hidden);
  CHECK(c.expert_ffn == w.config.expert_ffn);
  CHECK(c.n_shared_experts == w.config.n_shared_experts);
  CHECK(c.shared_ffn == w.config.shared_ffn);
  CHECK(c.first_moe_layer == w.config.first_moe_layer);
  CHECK(c.router == w.config.router);
  CHECK(c.routed_scaling == w.config.routed_scaling);
  CHECK(c.n_group == w.config.n_group);
  CHECK(c.topk_group == w.config.topk_group);
  for (std::uint32_t l = 0; l < c.n_layers; ++l) {
    CAPTURE(l);
    if (!c.is_moe_layer(l)) {
      CHECK(ck.value()->expert(l, 0).status().code() == StatusCode::kInvalidArgument);
      continue;
    }
    auto r = ck.value()->router(l);
    REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
    CHECK(to_f32(*r) == w.router_values.at(l));
    if (c.arch == Architecture::kDeepseekV3 || c.arch == Architecture::kGptOss)
      CHECK(ck.value()->router_bias(l).is_ok());
    if (c.n_shared_experts) CHECK(ck.value()->shared_expert(l).is_ok());
    for (std::uint32_t e = 0; e < c.n_experts; ++e) {
      CAPTURE(e);
      auto x = ck.value()->expert(l, e);
      REQUIRE_MESSAGE(x.is_ok(), x.status().to_string());
      const TensorRef* m[3] = {&x->w1, &x->w3, &x->w2};
      for (int which = 0; which < 3; ++which) {
        CAPTURE(which);
        const auto key = std::make_tuple(l, e, which);
        if (bytes_exact) CHECK(same_bytes(m[which]->bytes, w.expert_bytes.at(key)));
        if (values_exact) CHECK(to_f32(*m[which]) == w.expert_values.at(key));
      }
    }
    CHECK(ck.value()->expert(l, c.n_experts).status().code() == StatusCode::kInvalidArgument);
  }
}

}  // namespace

TEST_SUITE("formats") {

TEST_CASE("safetensors checkpoints of every architecture: single and sharded") {
  CAPTURE(test::seed());
  for (auto arch : {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe, Architecture::kDeepseekV2,
                    Architecture::kDeepseekV3, Architecture::kOlmoe}) {
    for (bool sharded : {false, true}) {
      CAPTURE(to_string(arch));
      CAPTURE(sharded);
      const auto dir = test::temp_dir("st_" + std::string(to_string(arch)) + (sharded ? "_sh" : ""));
      const auto w = test::write_hf_model(dir, test::tiny_config(arch), sharded);
      check_model(dir, w, true, true);
    }
  }
}

TEST_CASE("DeepSeek-V3 fp8 experts carry their 128x128 block scales") {
  auto c = test::tiny_config(Architecture::kDeepseekV3, 256, 192);  // partial blocks on both axes
  c.fp8_block = 128;
  const auto dir = test::temp_dir("st_fp8");
  const auto w = test::write_hf_model(dir, c, true);
  check_model(dir, w, true, true);
  auto ck = Checkpoint::open(dir);
  REQUIRE(ck.is_ok());
  auto x = ck.value()->expert(1, 0);
  REQUIRE(x.is_ok());
  CHECK(x->w1.dtype == DType::kF8E4M3);
  CHECK(x->w1.scales_shape == std::vector<std::uint64_t>{2, 2});
  CHECK(x->w1.scale_block == 128);
}

TEST_CASE("gpt-oss fused gate_up: bf16 and MXFP4 layouts") {
  for (bool mx : {false, true}) {
    CAPTURE(mx);
    const auto dir = test::temp_dir(mx ? "st_gptoss_mx" : "st_gptoss");
    const auto w = test::write_hf_model(dir, test::tiny_config(Architecture::kGptOss), false, mx);
    check_model(dir, w, false, true);
    auto ck = Checkpoint::open(dir);
    REQUIRE(ck.is_ok());
    auto x = ck.value()->expert(0, 3);
    REQUIRE(x.is_ok());
    CHECK(x->b1.has_value());
    CHECK(x->b2.has_value());
    CHECK(x->w1.shape == std::vector<std::uint64_t>{32, 64});
    CHECK(x->w2.shape == std::vector<std::uint64_t>{64, 32});
    CHECK(x->w1.dtype == (mx ? DType::kMxfp4 : DType::kBF16));
  }
}

TEST_CASE("GGUF checkpoints of every architecture: merged experts sliced exactly") {
  CAPTURE(test::seed());
  for (auto arch : {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe, Architecture::kDeepseekV2,
                    Architecture::kDeepseekV3, Architecture::kOlmoe, Architecture::kGptOss}) {
    for (auto type : {GgmlType::kF32, GgmlType::kBF16, GgmlType::kF16, GgmlType::kQ8_0}) {
      for (std::uint32_t version : {2u, 3u}) {
        CAPTURE(to_string(arch));
        CAPTURE(static_cast<int>(type));
        CAPTURE(version);
        const auto dir = test::temp_dir("gguf");
        const auto path = dir / (std::string(to_string(arch)) + ".gguf");
        const auto w = test::write_gguf_model(path, test::tiny_config(arch), type, version);
        check_model(path, w, true, type != GgmlType::kQ8_0);
      }
    }
  }
}

TEST_CASE("the shared tiny-mixtral checkpoints") {
  MOEX_REQUIRE_SHARED(shared);
  for (const auto& model :
       {std::tuple{"tiny-mixtral-8e", 8u, 2u, 256u}, std::tuple{"tiny-mixtral-32e", 32u, 4u, 64u}}) {
    const std::string name = std::get<0>(model);
    const std::uint32_t experts = std::get<1>(model), top_k = std::get<2>(model), ffn = std::get<3>(model);
    CAPTURE(name);
    std::uint64_t last = 0, total = 0;
    auto ck = Checkpoint::open(shared / "models" / name, [&](std::uint64_t d, std::uint64_t t, std::string_view) {
      last = d;
      total = t;
    });
    REQUIRE_MESSAGE(ck.is_ok(), ck.status().to_string());
    CHECK(last == total);
    CHECK(total == 2);
    const auto& c = ck.value()->config();
    CHECK(c.arch == Architecture::kMixtral);
    CHECK(c.n_layers == 8);
    CHECK(c.n_experts == experts);
    CHECK(c.top_k == top_k);
    CHECK(c.hidden == 256);
    CHECK(c.expert_ffn == ffn);
    CHECK(c.n_heads == 4);
    CHECK(c.vocab == 256);
    CHECK(c.router == RouterKind::kSoftmaxTopKRenorm);
    // embed, norm, lm_head + per layer: 2 norms, 4 attention, router, 3 per expert
    CHECK(ck.value()->tensor_names().size() == 3 + 8 * (7 + 3 * experts));
    CHECK(ck.value()->files().size() == 2);
    for (std::uint32_t l = 0; l < 8; ++l) {
      auto x = ck.value()->expert(l, experts - 1);
      REQUIRE(x.is_ok());
      CHECK(x->w1.dtype == DType::kBF16);
      CHECK(x->w1.shape == std::vector<std::uint64_t>{ffn, 256});
      CHECK(x->w2.shape == std::vector<std::uint64_t>{256, ffn});
      CHECK(x->w1.is_dense());
      const auto v = to_f32(x->w2);
      double ss = 0;
      for (float f : v) ss += static_cast<double>(f) * f;
      CHECK(std::isfinite(ss));
      CHECK(ss > 0);  // trained weights are not all zero
      auto r = ck.value()->router(l);
      REQUIRE(r.is_ok());
      CHECK(r->shape == std::vector<std::uint64_t>{experts, 256});
    }
    // a value read through tensor() equals the same bytes through expert()
    auto t = ck.value()->tensor("model.layers.3.block_sparse_moe.experts.1.w3.weight");
    auto x = ck.value()->expert(3, 1);
    REQUIRE(t.is_ok());
    REQUIRE(x.is_ok());
    CHECK(t->bytes.data() == x->w3.bytes.data());
    std::uint16_t first = 0;
    std::memcpy(&first, t->bytes.data(), 2);
    CHECK(to_f32(*t)[0] == bf16_to_float(first));
  }
}

TEST_CASE("bad checkpoints give errors naming the file and tensor") {
  const auto dir = test::temp_dir("bad_ck");
  const auto w = test::write_hf_model(dir, test::tiny_config(Architecture::kMixtral), true);
  SUBCASE("missing shard") {
    fs::remove(dir / "model-00002-of-00004.safetensors");
    auto ck = Checkpoint::open(dir);
    REQUIRE(!ck.is_ok());
    CHECK(ck.status().code() == StatusCode::kNotFound);
    CHECK(ck.status().message().find("model-00002-of-00004.safetensors") != std::string::npos);
  }
  SUBCASE("unknown architecture") {
    std::ofstream(dir / "config.json") << R"({"model_type": "llama4_moe", "hidden_size": 8})";
    auto ck = Checkpoint::open(dir);
    REQUIRE(!ck.is_ok());
    CHECK(ck.status().code() == StatusCode::kUnsupported);
    CHECK(ck.status().message().find("llama4_moe") != std::string::npos);
  }
  SUBCASE("missing config key") {
    std::ofstream(dir / "config.json") << R"({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 3,
      "num_attention_heads": 4, "num_experts_per_tok": 2, "intermediate_size": 32})";
    auto ck = Checkpoint::open(dir);
    REQUIRE(!ck.is_ok());
    CHECK(ck.status().message().find("num_local_experts") != std::string::npos);
  }
  SUBCASE("config with more experts than the files hold") {
    auto c = test::tiny_config(Architecture::kMixtral);
    c.n_experts = 5;
    REQUIRE(write_config_json(dir, c).is_ok());
    auto ck = Checkpoint::open(dir);
    REQUIRE(!ck.is_ok());
    CHECK(ck.status().message().find("block_sparse_moe.gate.weight") !=
          std::string::npos);  // router [4, 64] vs 5 experts
  }
  SUBCASE("truncated shard") {
    const auto p = dir / "model-00003-of-00004.safetensors";
    fs::resize_file(p, fs::file_size(p) - 7);
    auto ck = Checkpoint::open(dir);
    REQUIRE(!ck.is_ok());
    CHECK(ck.status().code() == StatusCode::kCorrupt);
    CHECK(ck.status().message().find("model-00003-of-00004.safetensors") != std::string::npos);
  }
  SUBCASE("index naming a path outside the folder") {
    std::ofstream(dir / "model.safetensors.index.json") << R"({"weight_map": {"a": "../etc/passwd"}})";
    CHECK(Checkpoint::open(dir).status().code() == StatusCode::kCorrupt);
  }
}

}  // TEST_SUITE("formats")
