// StoreOptions::keep_block_formats: GGUF Q8_0/Q4_0/Q4_K and fp8 e4m3 (DeepSeek-V3 safetensors)
// experts kept byte for byte in the quant/layout.hpp layout, low-precision copies built from them,
// the CPU expert on them against float64, and bad input (mixed formats) as clear errors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "moex/cpu/expert_ffn.hpp"
#include "moex/quant/ggml.hpp"
#include "moex/quant/quantize.hpp"
#include "moex/store/open_expert_store.hpp"

#include "support/block_expert.hpp"
#include "support/checkpoint_writer.hpp"
#include "support/test_support.hpp"

namespace {

using moex::Precision;

// The CPU expert decodes each block to f32 once and accumulates in f32: norm-wise error of a few
// f32 ulps times sqrt(length) on these shapes (<= 256 terms); 1e-5 leaves an order of margin.
constexpr double kCpuBlockTol = 1e-5;

// The weights the checkpoint holds for (layer, expert, which): GGUF blocks decoded here through
// decode_block_row (the writer's Q8_0 expert_values are its unquantized inputs), else the values
// written (fp8: code * scale, computed by the writer).
std::vector<float> stored_values(const moex::test::WrittenModel& w, std::uint32_t l, std::uint32_t e, int which,
                                 const moex::MatrixLayout& ml) {
  const Precision p = ml.format.precision;
  if (p == Precision::kFp8E4M3) return w.expert_values.at({l, e, which});
  const auto& b = w.expert_bytes.at({l, e, which});
  std::vector<float> v(ml.rows * ml.cols);
  const std::size_t row_bytes = ml.cols / moex::block_format_block_size(p) * moex::block_format_block_bytes(p);
  for (std::size_t r = 0; r < ml.rows; ++r)
    moex::decode_block_row(p, b.data() + r * row_bytes, ml.cols, &v[r * ml.cols]);
  return v;
}

// Every expert of the store holds exactly the checkpoint's bytes in the layout.hpp layout, and
// decodes to exactly the stored values.
void check_native_store(const moex::OpenedModel& m, const moex::test::WrittenModel& w, Precision p) {
  const auto& spec = m.store.spec();
  REQUIRE(m.store.master_format().precision == p);
  CHECK(m.store.master_tier() == moex::Tier::kHost);
  const moex::ExpertLayout want = moex::expert_layout(spec.shape, moex::float_format(p));
  CHECK(m.store.expert_bytes(p) == want.total_bytes);
  std::vector<float> got;
  for (std::uint32_t sl = 0; sl < spec.n_layers; ++sl) {
    for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
      const std::uint32_t l = m.moe_layers[sl];
      auto v = m.store.master({sl, e});
      REQUIRE(v.is_ok());
      CHECK(v->w2_data == v->w1_data + want.w2_offset);  // one contiguous blob
      const moex::MatrixView mats[3] = {v->w1(), v->w3(), v->w2()};
      for (int which = 0; which < 3; ++which) {
        CAPTURE(l);
        CAPTURE(e);
        CAPTURE(which);
        const moex::MatrixLayout& ml = mats[which].layout;
        if (const auto it = w.expert_bytes.find({l, e, which}); it != w.expert_bytes.end()) {
          REQUIRE(it->second.size() == ml.codes_bytes);
          CHECK(std::memcmp(mats[which].data, it->second.data(), ml.codes_bytes) == 0);
        }
        const auto vals = stored_values(w, l, e, which, ml);
        got.assign(vals.size(), NAN);
        moex::dequantize_matrix(mats[which], got.data());
        CHECK(got == vals);  // bit-exact decode (fp8: the same f32 product as the writer)
      }
    }
  }
}

// The CPU expert on store expert (0, 1) against float64 math on the written values.
void check_cpu_expert(const moex::OpenedModel& m, const moex::test::WrittenModel& w, std::uint64_t salt) {
  const moex::ExpertShape s = m.store.spec().shape;
  auto v = m.store.master({0, 1});
  REQUIRE(v.is_ok());
  const std::vector<float> wts[3] = {stored_values(w, m.moe_layers[0], 1, 0, v->layout.w1),
                                     stored_values(w, m.moe_layers[0], 1, 1, v->layout.w3),
                                     stored_values(w, m.moe_layers[0], 1, 2, v->layout.w2)};
  constexpr std::size_t n = 3;
  const auto x = moex::test::random_normal(n * s.hidden, 1.f, salt);
  std::vector<float> y(n * s.hidden), ws(moex::expert_ffn_workspace(s, n));
  REQUIRE(moex::expert_ffn(*v, x.data(), n, y.data(), ws).is_ok());
  const auto ref = moex::test::reference_expert(wts, s, x.data(), n);
  CHECK(moex::test::rel_error(y, ref) < kCpuBlockTol);
}

moex::StoreOptions native_options(const std::filesystem::path& cache) {
  moex::StoreOptions o;
  o.keep_block_formats = true;
  o.cache_dir = cache;
  return o;
}

// Overwrites the u32 ggml type of tensor `name` in a GGUF file written by write_gguf_model (its
// tensor info: u64 name length, name, u32 n_dims, n_dims u64 dims, u32 type).
void patch_gguf_type(const std::filesystem::path& path, const std::string& name, std::uint32_t type) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  const auto at = std::search(b.begin(), b.end(), name.begin(), name.end());
  REQUIRE(at != b.end());
  const auto pos = static_cast<std::size_t>(at - b.begin()) + name.size();
  std::uint32_t dims = 0;
  std::memcpy(&dims, &b[pos], 4);
  REQUIRE(dims == 3);
  std::memcpy(&b[pos + 4 + 8 * dims], &type, 4);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
}

}  // namespace

TEST_SUITE("cpu") {
TEST_CASE("keep_block_formats holds GGUF Q8_0, Q4_0 and Q4_K experts byte for byte") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  struct Case {
    moex::GgmlType type;
    Precision p;
  };
  for (const Case c : {Case{moex::GgmlType::kQ8_0, Precision::kQ8_0}, Case{moex::GgmlType::kQ4_0, Precision::kQ4_0},
                       Case{moex::GgmlType::kQ4_K, Precision::kQ4_K}}) {
    CAPTURE(moex::to_string(c.p));
    const auto dir = moex::test::temp_dir("blockgguf");
    const auto w = moex::test::write_gguf_model(
        dir / "m.gguf", moex::test::tiny_config(moex::Architecture::kQwen3Moe, 256, 256), c.type);
    auto o = native_options(dir / "cache");
    o.extra_formats = {moex::quant_format(Precision::kInt4, 32)};
    auto m = moex::open_expert_store(dir / "m.gguf", o);
    INFO(m.status().to_string());
    REQUIRE(m.is_ok());
    check_native_store(*m, w, c.p);
    check_cpu_expert(*m, w, 17);

    // The int4 copy is built by decoding the block master: within int4's rounding of it.
    REQUIRE(m->store.has_precision(Precision::kInt4));
    auto q = m->store.view({0, 2}, Precision::kInt4);
    REQUIRE(q.is_ok());
    const auto want = stored_values(w, m->moe_layers[0], 2, 0, m->store.master({0, 2})->layout.w1);
    std::vector<float> got(want.size());
    moex::dequantize_matrix(q->w1(), got.data());
    const std::vector<double> want64(want.begin(), want.end());
    CHECK(moex::test::rel_error(got, want64) < 0.2);  // int4 g32: ~0.1 norm-wise on these weights

    // A second open reads the cached int4 copies; without the knob the file is decoded into the
    // bf16 master, as before, and the copies cached from the block master are not taken for its own.
    auto again = moex::open_expert_store(dir / "m.gguf", o);
    REQUIRE(again.is_ok());
    REQUIRE_FALSE(again->notes.empty());
    CHECK(again->notes.front().rfind("read int4", 0) == 0);
    auto d_opts = o;
    d_opts.keep_block_formats = false;
    auto d = moex::open_expert_store(dir / "m.gguf", d_opts);
    REQUIRE(d.is_ok());
    CHECK(d->store.master_format().precision == Precision::kBF16);
    for (const auto& note : d->notes) CHECK(note.rfind("read ", 0) != 0);
  }
}

TEST_CASE("keep_block_formats holds DeepSeek-V3 fp8 experts with their 128x128 scales") {
  const std::uint64_t seed = moex::test::seed();
  CAPTURE(seed);
  auto cfg = moex::test::tiny_config(moex::Architecture::kDeepseekV3, 256, 160);  // partial scale blocks
  cfg.fp8_block = 128;
  const auto dir = moex::test::temp_dir("blockfp8");
  const auto w = moex::test::write_hf_model(dir, cfg, false);
  auto o = native_options(dir / "cache");
  o.extra_formats = {moex::float_format(Precision::kBF16)};
  auto m = moex::open_expert_store(dir, o);
  INFO(m.status().to_string());
  REQUIRE(m.is_ok());
  check_native_store(*m, w, Precision::kFp8E4M3);
  check_cpu_expert(*m, w, 23);
  // The scale section sits where layout.hpp says: f32 [ceil(160/128)] x [ceil(256/128)] for w1.
  auto v = m->store.master({0, 0});
  REQUIRE(v.is_ok());
  CHECK(v->layout.w1.scales_offset == moex::align_up(160 * 256, moex::kSectionAlign));
  CHECK(v->layout.w1.total_bytes == moex::align_up(160 * 256 + 2 * 2 * 4, moex::kSectionAlign));
  // The bf16 copy is the fp8 master decoded and rounded to bf16: within half a bf16 ulp (2^-9).
  auto b = m->store.view({1, 3}, Precision::kBF16);
  REQUIRE(b.is_ok());
  const auto& want = w.expert_values.at({m->moe_layers[1], 3, 2});
  std::vector<float> got(want.size());
  moex::dequantize_matrix(b->w2(), got.data());
  for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(std::abs(got[i] - want[i]) <= std::abs(want[i]) * 0x1p-9f);
}

TEST_CASE("keep_block_formats refuses a checkpoint whose experts mix block formats") {
  const auto dir = moex::test::temp_dir("blockmixed");
  const auto path = dir / "m.gguf";
  (void)moex::test::write_gguf_model(path, moex::test::tiny_config(moex::Architecture::kMixtral, 256, 256),
                                     moex::GgmlType::kQ8_0);
  // Layer 1's up experts claim Q4_0: smaller than the Q8_0 bytes they sit on, so the file still opens.
  patch_gguf_type(path, "blk.1.ffn_up_exps.weight", static_cast<std::uint32_t>(moex::GgmlType::kQ4_0));
  auto m = moex::open_expert_store(path, native_options(dir / "cache"));
  REQUIRE_FALSE(m.is_ok());
  CHECK(m.status().code() == moex::StatusCode::kCorrupt);
  CHECK(m.status().message().find("blk.1.ffn_up_exps.weight") != std::string::npos);
  CHECK(m.status().message().find("one block format") != std::string::npos);
  // Decoding (the default) takes each tensor on its own: the Q8_0 bytes read as Q4_0 hold scales
  // that decode to NaN or infinity, refused by the bf16 encoder with an error (never a crash).
  auto d = moex::open_expert_store(path, moex::StoreOptions{});
  if (!d.is_ok()) CHECK_FALSE(d.status().message().empty());
}

TEST_CASE("keep_block_formats leaves dense checkpoints in place") {
  const auto dir = moex::test::temp_dir("blockdense");
  (void)moex::test::write_gguf_model(dir / "m.gguf", moex::test::tiny_config(moex::Architecture::kMixtral),
                                     moex::GgmlType::kBF16);
  auto m = moex::open_expert_store(dir / "m.gguf", native_options(dir / "cache"));
  REQUIRE(m.is_ok());
  CHECK(m->store.master_format().precision == Precision::kBF16);
  CHECK(m->store.master_tier() == moex::Tier::kDisk);
}

TEST_CASE("a block-format store refuses encoding and block-format copies") {
  moex::MoeModelSpec spec{1, 2, {256, 256}, {}};
  spec.router.n_experts = 2;
  spec.router.top_k = 1;
  auto s = moex::ExpertStore::create(spec, moex::float_format(Precision::kQ4_K));
  REQUIRE(s.is_ok());
  std::vector<float> w(256 * 256, 0.f);
  CHECK(s->set_expert({0, 0}, w.data(), w.data(), w.data()).code() == moex::StatusCode::kUnsupported);
  std::vector<std::byte> blob(s->expert_bytes(Precision::kQ4_K) - 1);
  CHECK(s->set_expert_blob({0, 0}, blob).code() == moex::StatusCode::kInvalidArgument);
  blob.resize(blob.size() + 1);
  CHECK(s->set_expert_blob({0, 2}, blob).code() == moex::StatusCode::kInvalidArgument);
  CHECK(s->set_expert_blob({0, 0}, blob).is_ok());
  CHECK(s->set_expert_blob({0, 1}, blob).is_ok());
  CHECK(s->build_precision(moex::float_format(Precision::kQ8_0)).code() == moex::StatusCode::kUnsupported);
  CHECK(s->build_precision(moex::float_format(Precision::kBF16)).is_ok());
  // Q6_K has no moex layout: no store holds it.
  CHECK(moex::ExpertStore::create(spec, moex::float_format(Precision::kQ6_K)).status().code() ==
        moex::StatusCode::kInvalidArgument);
}
}  // TEST_SUITE("cpu")
