// ExpertStore from real checkpoint files: every architecture, safetensors and GGUF; the
// low-precision copy cache; bad model files; moex-inspect on each generated checkpoint.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "moex/executor/moe_layer_executor.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/store/copy_cache_file.hpp"
#include "moex/store/open_expert_store.hpp"

#include "support/checkpoint_writer.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Architecture;

// Every expert of the store decodes to exactly the values written (bf16 in place, or decoded).
void check_store_matches(const moex::OpenedModel& m, const moex::test::WrittenModel& w) {
  const auto& spec = m.store.spec();
  std::vector<float> got;
  for (std::uint32_t sl = 0; sl < spec.n_layers; ++sl) {
    const std::uint32_t l = m.moe_layers[sl];
    for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
      auto v = m.store.master({sl, e});
      REQUIRE(v.is_ok());
      const moex::MatrixView mats[3] = {v->w1(), v->w3(), v->w2()};
      for (int which = 0; which < 3; ++which) {
        const auto& want = w.expert_values.at({l, e, which});
        got.assign(want.size(), NAN);
        moex::dequantize_matrix(mats[which], got.data());
        CAPTURE(l);
        CAPTURE(e);
        CAPTURE(which);
        // bf16 masters hold the written bf16 values exactly; other sources are decoded to f32 and
        // rounded to the bf16 master: within half a bf16 ulp (2^-9 relative).
        for (std::size_t i = 0; i < want.size(); ++i)
          REQUIRE(std::abs(got[i] - want[i]) <= std::abs(want[i]) * 0x1p-8f + 1e-30f);
      }
    }
    const auto& rw = w.router_values.at(l);
    const float* r = m.store.router_weights(sl);
    for (std::size_t i = 0; i < rw.size(); ++i) REQUIRE(r[i] == rw[i]);
  }
}

}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("stores open from safetensors checkpoints of every architecture with exact experts") {
  for (Architecture a :
       {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe, Architecture::kDeepseekV2,
        Architecture::kDeepseekV3, Architecture::kOlmoe, Architecture::kGptOss}) {
    CAPTURE(moex::to_string(a));
    const auto dir = moex::test::temp_dir("st");
    const auto w =
        moex::test::write_hf_model(dir, moex::test::tiny_config(a), /*sharded=*/a == Architecture::kQwen3Moe);
    auto m = moex::open_expert_store(dir);
    INFO(m.status().to_string());
    REQUIRE(m.is_ok());
    CHECK(m->store.complete());
    check_store_matches(*m, w);
    // and the executor runs on it
    auto ex = moex::MoeLayerExecutor<>::create(m->store, {});
    REQUIRE(ex.is_ok());
    auto x = moex::test::random_normal(2 * 64, 1.f, 1);
    std::vector<float> y(2 * 64);
    CHECK(ex->forward(0, x.data(), 2, y.data()).is_ok());
  }
}

TEST_CASE("stores open from GGUF checkpoints with merged expert tensors sliced per expert") {
  for (Architecture a :
       {Architecture::kMixtral, Architecture::kQwen3Moe, Architecture::kDeepseekV3, Architecture::kOlmoe}) {
    for (moex::GgmlType t : {moex::GgmlType::kBF16, moex::GgmlType::kF16, moex::GgmlType::kQ8_0}) {
      CAPTURE(moex::to_string(a));
      CAPTURE(static_cast<int>(t));
      const auto dir = moex::test::temp_dir("gguf");
      const auto w = moex::test::write_gguf_model(dir / "m.gguf", moex::test::tiny_config(a), t);
      auto m = moex::open_expert_store(dir / "m.gguf");
      INFO(m.status().to_string());
      REQUIRE(m.is_ok());
      if (t == moex::GgmlType::kBF16) {
        check_store_matches(*m, w);
        CHECK(m->store.master_tier() == moex::Tier::kDisk);  // read in place
      }
      auto ex = moex::MoeLayerExecutor<>::create(m->store, {});
      REQUIRE(ex.is_ok());
      auto x = moex::test::random_normal(64, 1.f, 2);
      std::vector<float> y(64);
      CHECK(ex->forward(0, x.data(), 1, y.data()).is_ok());
    }
  }
}

TEST_CASE("low-precision copies are cached beside the model and a bad cache is rebuilt") {
  const auto dir = moex::test::temp_dir("cache");
  (void)moex::test::write_hf_model(dir, moex::test::tiny_config(Architecture::kMixtral), false);
  moex::StoreOptions o;
  o.extra_formats = {moex::quant_format(moex::Precision::kInt4, 32)};
  auto first = moex::open_expert_store(dir, o);
  REQUIRE(first.is_ok());
  const auto blob = first->store.copy_blob(moex::Precision::kInt4);
  REQUIRE_FALSE(blob.empty());
  const std::vector<std::byte> want(blob.begin(), blob.end());
  std::filesystem::path file;
  for (const auto& f : std::filesystem::directory_iterator(dir / ".moex-cache")) file = f.path();
  REQUIRE(std::filesystem::exists(file));

  auto second = moex::open_expert_store(dir, o);
  REQUIRE(second.is_ok());
  REQUIRE(second->notes.size() == 1);
  CHECK(second->notes[0].find("read int4") == 0);
  auto got = second->store.copy_blob(moex::Precision::kInt4);
  CHECK(std::equal(got.begin(), got.end(), want.begin(), want.end()));

  SUBCASE("a flipped byte is detected and the copy rebuilt") {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 100);
    f.put('\x5a');
    f.close();
    auto third = moex::open_expert_store(dir, o);
    REQUIRE(third.is_ok());
    REQUIRE_FALSE(third->notes.empty());
    CHECK(third->notes[0].find("checksum") != std::string::npos);
    auto g3 = third->store.copy_blob(moex::Precision::kInt4);
    CHECK(std::equal(g3.begin(), g3.end(), want.begin(), want.end()));
  }
  SUBCASE("a truncated cache is rebuilt") {
    std::filesystem::resize_file(file, 5000);
    auto third = moex::open_expert_store(dir, o);
    REQUIRE(third.is_ok());
    CHECK(third->notes[0].find("rebuilding") == 0);
  }
  SUBCASE("a cache of a different model is stale") {
    CHECK(moex::read_copy_cache(second->store, moex::quant_format(moex::Precision::kInt4, 32), 12345, file).code() ==
          moex::StatusCode::kCorrupt);
    CHECK(moex::read_copy_cache(second->store, moex::quant_format(moex::Precision::kInt4, 64), 12345, file).code() ==
          moex::StatusCode::kCorrupt);
  }
}

TEST_CASE("a missing or corrupt model file is a clear error") {
  const auto dir = moex::test::temp_dir("bad");
  auto missing = moex::open_expert_store(dir / "nope");
  CHECK_FALSE(missing.is_ok());
  CHECK_FALSE(missing.status().message().empty());
  { std::ofstream(dir / "garbage.safetensors") << "this is not a checkpoint"; }
  auto garbage = moex::open_expert_store(dir / "garbage.safetensors");
  CHECK_FALSE(garbage.is_ok());
  CHECK(garbage.status().message().find("config.json") != std::string::npos);  // needs its config first
  (void)moex::test::write_hf_model(dir / "real", moex::test::tiny_config(Architecture::kMixtral), false);
  std::filesystem::copy_file(dir / "real" / "config.json", dir / "config.json");
  auto garbage2 = moex::open_expert_store(dir / "garbage.safetensors");
  CHECK_FALSE(garbage2.is_ok());
  CHECK(garbage2.status().message().find("garbage.safetensors") != std::string::npos);
  // A real checkpoint cut in half.
  const auto half = moex::test::temp_dir("half");
  (void)moex::test::write_hf_model(half, moex::test::tiny_config(Architecture::kMixtral), false);
  for (const auto& f : std::filesystem::directory_iterator(half))
    if (f.path().extension() == ".safetensors")
      std::filesystem::resize_file(f.path(), std::filesystem::file_size(f.path()) / 2);
  auto cut = moex::open_expert_store(half);
  CHECK_FALSE(cut.is_ok());
}

TEST_CASE("moex-inspect lists generated checkpoints of every architecture") {
  const std::filesystem::path tool = std::filesystem::path(MOEX_TOOLS_DIR) / "moex-inspect";
  if (!std::filesystem::exists(tool)) {
    MESSAGE("skipped: moex-inspect was not built (MOEX_BUILD_EXAMPLES=OFF)");
    return;
  }
  auto inspect = [&](const std::filesystem::path& model, const std::filesystem::path& out) {
    const std::string cmd =
        "'" + tool.string() + "' --json --quiet '" + model.string() + "' > '" + out.string() + "' 2>&1";
    return std::system(cmd.c_str());
  };
  for (Architecture a : {Architecture::kMixtral, Architecture::kQwen3Moe, Architecture::kDeepseekV3,
                         Architecture::kOlmoe, Architecture::kGptOss}) {
    CAPTURE(moex::to_string(a));
    const auto dir = moex::test::temp_dir("inspect");
    (void)moex::test::write_hf_model(dir / "st", moex::test::tiny_config(a), false);
    REQUIRE(inspect(dir / "st", dir / "st.json") == 0);
    std::ifstream in(dir / "st.json");
    auto j = nlohmann::json::parse(in, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    CHECK(j.dump().find(std::string(moex::to_string(a))) != std::string::npos);
    if (a != Architecture::kGptOss) {
      (void)moex::test::write_gguf_model(dir / "m.gguf", moex::test::tiny_config(a), moex::GgmlType::kQ8_0);
      REQUIRE(inspect(dir / "m.gguf", dir / "g.json") == 0);
      std::ifstream gin(dir / "g.json");
      CHECK_FALSE(nlohmann::json::parse(gin, nullptr, false).is_discarded());
    }
  }
  const auto dir = moex::test::temp_dir("inspect-bad");
  CHECK(inspect(dir / "missing", dir / "x.json") != 0);
}
}  // TEST_SUITE("cpu")
