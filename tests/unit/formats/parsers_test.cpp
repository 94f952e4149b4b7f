// The safetensors, GGUF and config.json parsers on valid and hand-broken inputs: every bad input is
// a Status naming the file (and tensor), never a crash.

#include <cstring>
#include <fstream>
#include <iterator>

#include <doctest/doctest.h>

#include "moex/formats/checkpoint.hpp"
#include "moex/formats/gguf.hpp"
#include "moex/formats/model_config.hpp"
#include "moex/formats/safetensors.hpp"

#include "support/checkpoint_writer.hpp"
#include "support/test_support.hpp"

using namespace moex;
namespace fs = std::filesystem;

namespace {

std::vector<std::byte> st_file(const std::string& header, std::size_t data_bytes, std::uint64_t len_override = 0) {
  std::vector<std::byte> b(8 + header.size() + data_bytes);
  const std::uint64_t n = len_override ? len_override : header.size();
  for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = std::byte(static_cast<std::uint8_t>(n >> (8 * i)));
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

Status st_status(const std::string& header, std::size_t data_bytes, std::uint64_t len_override = 0) {
  const auto b = st_file(header, data_bytes, len_override);
  return parse_safetensors(b, "bad.safetensors").status();
}

std::vector<std::byte> read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> b(c.size());
  std::memcpy(b.data(), c.data(), c.size());
  return b;
}

}  // namespace

TEST_SUITE("formats") {

TEST_CASE("safetensors: valid header with metadata and every dtype") {
  const std::string h =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[16,20]},"c":{"dtype":"BOOL","shape":[],"data_offsets":[20,21]},)"
      R"("d":{"dtype":"F8_E5M2","shape":[0],"data_offsets":[21,21]},"e":{"dtype":"I64","shape":[1],"data_offsets":[21,29]}})";
  auto b = st_file(h, 29);
  auto r = parse_safetensors(b, "ok.safetensors");
  REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
  CHECK(r->tensors.size() == 5);
  CHECK(r->metadata.at("format") == "pt");
  CHECK(r->tensors[0].name == "a");
  CHECK(r->tensors[0].file == "ok.safetensors");
  for (const char* dt : {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"}) {
    CHECK(parse_safetensors_dtype(dt).has_value());
  }
}

TEST_CASE("safetensors: bad inputs") {
  struct Case {
    const char* what;
    std::string header;
    std::size_t data;
    std::uint64_t len;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"header past end", R"({})", 0, 1000, "past the end"},
      {"absurd header length", R"({})", 0, ~0ull, "past the end"},
      {"not json", R"({"a":)", 0, 0, "not valid JSON"},
      {"not an object", R"([1,2])", 0, 0, "not a JSON object"},
      {"unknown dtype", R"({"t":{"dtype":"F12","shape":[1],"data_offsets":[0,2]}})", 2, 0, "unknown dtype 'F12'"},
      {"offset out of range", R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, 0,
       "past the data section"},
      {"shape/bytes mismatch", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16, 0, "need 12 bytes"},
      {"begin after end", R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}})", 8, 0, "begin 4 > end"},
      {"overlap",
       R"({"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"u":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}})",
       8, 0, "overlap"},
      {"duplicate",
       R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
       2, 0, "duplicate tensor name 't'"},
      {"negative dim", R"({"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1, 0, "non-negative"},
      {"float offset", R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1.5]}})", 2, 0, "non-negative"},
      {"overflowing shape", R"({"t":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8, 0,
       "overflows"},
      {"missing dtype", R"({"t":{"shape":[1],"data_offsets":[0,1]}})", 1, 0, "dtype"},
      {"bad metadata", R"({"__metadata__":{"a":1}})", 0, 0, "__metadata__"},
      {"deep nesting", std::string(1000, '[') + std::string(1000, ']'), 0, 0, "nested too deeply"},
  };
  {
    const std::vector<std::byte> five(5);
    CHECK(parse_safetensors(five, "bad.safetensors").status().message().find("truncated") != std::string::npos);
  }
  for (const auto& c : cases) {
    CAPTURE(c.what);
    const Status s = st_status(c.header, c.data, c.len);
    CHECK(!s.is_ok());
    CHECK_MESSAGE(s.message().find(c.expect) != std::string::npos, s.message());
    CHECK(s.message().find("bad.safetensors") != std::string::npos);
  }
}

TEST_CASE("GGUF: metadata of every type and tensor infos and alignment") {
  test::GgufWriter g;
  g.set_alignment(64);
  g.kv_string("general.architecture", "x");
  g.kv_u64("a.u64", 1ull << 40);
  g.kv_i8("a.i8", -3);
  g.kv_f64("a.f64", 0.25);
  g.kv_bool("a.bool", true);
  g.kv_strings("a.strs", {"x", "", "yz"});
  g.kv_f32s("a.f32s", {1.f, 2.5f});
  std::vector<std::byte> q4k(144 * 2);
  g.tensor("w", GgmlType::kQ4_K, {2, 256}, q4k);
  g.tensor("v", GgmlType::kF32, {3}, std::vector<std::byte>(12));
  for (std::uint32_t version : {2u, 3u}) {
    const auto b = g.bytes(version);
    auto r = parse_gguf(b, "t.gguf");
    REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
    CHECK(r->version == version);
    CHECK(r->alignment == 64);
    CHECK(r->data_offset % 64 == 0);
    CHECK(*r->find("a.u64")->as_uint() == (1ull << 40));
    CHECK(*r->find("a.i8")->as_double() == -3.0);
    CHECK(*r->find("a.f64")->as_double() == 0.25);
    CHECK(*r->find("a.bool")->as_uint() == 1);
    CHECK(r->find("a.strs")->array_strings() == std::vector<std::string>{"x", "", "yz"});
    CHECK(*r->find("a.f32s")->array_number(1) == 2.5);
    CHECK(!r->find("a.f32s")->array_number(2).has_value());
    REQUIRE(r->tensors.size() == 2);
    CHECK(r->tensors[0].dtype == DType::kQ4_K);
    CHECK(r->tensors[0].shape == std::vector<std::uint64_t>{2, 256});
    CHECK(r->tensors[0].bytes.size() == 288);
    CHECK(r->tensors[1].shape == std::vector<std::uint64_t>{3});
  }
}

TEST_CASE("GGUF: bad inputs") {
  test::GgufWriter g;
  g.kv_string("general.architecture", "x");
  g.tensor("w", GgmlType::kF32, {4}, std::vector<std::byte>(16));
  const auto good = g.bytes();
  auto expect = [](std::vector<std::byte> b, const char* what) {
    CAPTURE(what);
    auto r = parse_gguf(b, "bad.gguf");
    REQUIRE(!r.is_ok());
    CHECK_MESSAGE(r.status().message().find("bad.gguf") != std::string::npos, r.status().message());
    return r.status().message();
  };
  for (std::size_t cut = 0; cut < good.size() - 16; cut += 7) {  // the last 16 bytes are padding
    CAPTURE(cut);
    expect(std::vector<std::byte>(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut)), "truncated");
  }
  auto b = good;
  b[0] = std::byte{'X'};
  CHECK(expect(b, "magic").find("magic") != std::string::npos);
  b = good;
  b[4] = std::byte{1};
  CHECK(expect(b, "version 1").find("version 1") != std::string::npos);
  b = good;
  std::memset(b.data() + 8, 0xff, 8);  // tensor count 2^64-1
  CHECK(expect(b, "absurd tensor count").find("tensor count") != std::string::npos);
  b = good;
  std::memset(b.data() + 16, 0x7f, 8);  // metadata count
  CHECK(expect(b, "absurd kv count").find("metadata count") != std::string::npos);
  b = good;
  std::memset(b.data() + 24, 0xee, 8);  // key length
  CHECK(expect(b, "absurd key length").find("exceeds") != std::string::npos);
  {
    test::GgufWriter d;
    d.tensor("w", GgmlType::kF32, {4}, std::vector<std::byte>(16));
    d.tensor("w", GgmlType::kF32, {4}, std::vector<std::byte>(16));
    CHECK(expect(d.bytes(), "duplicate").find("duplicate tensor name") != std::string::npos);
  }
  {
    test::GgufWriter d;
    d.tensor("q", GgmlType::kQ8_0, {33}, std::vector<std::byte>(34));
    CHECK(expect(d.bytes(), "partial block").find("block size") != std::string::npos);
  }
  {
    test::GgufWriter d;
    d.tensor("u", static_cast<GgmlType>(3), {32}, std::vector<std::byte>(20));  // Q4_1: not read
    CHECK(expect(d.bytes(), "unsupported type").find("ggml type 3") != std::string::npos);
  }
  {
    test::GgufWriter d;
    d.kv_u32("general.alignment", 3);
    CHECK(expect(d.bytes(), "alignment").find("alignment") != std::string::npos);
  }
  {  // data past the end: drop the last bytes of the data section
    auto t = good;
    t.resize(t.size() - 20);  // 16 bytes of padding, then 4 of data
    CHECK(expect(t, "data past end").find("past the end") != std::string::npos);
  }
}

TEST_CASE("config.json: every architecture and errors naming the key") {
  for (auto arch : {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe, Architecture::kDeepseekV2,
                    Architecture::kDeepseekV3, Architecture::kOlmoe, Architecture::kGptOss}) {
    CAPTURE(to_string(arch));
    const auto dir = test::temp_dir("cfg");
    const auto c = test::tiny_config(arch);
    REQUIRE(write_config_json(dir, c).is_ok());
    std::ifstream in(dir / "config.json");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto r = parse_model_config(text);
    REQUIRE_MESSAGE(r.is_ok(), r.status().to_string());
    CHECK(r->arch == arch);
    CHECK(r->n_experts == c.n_experts);
    CHECK(r->expert_ffn == c.expert_ffn);
    CHECK(r->shared_ffn == c.shared_ffn);
    CHECK(r->router == c.router);
    CHECK(r->routed_scaling == c.routed_scaling);
    CHECK(r->first_moe_layer == c.first_moe_layer);
    CHECK(r->norm_topk_prob == c.norm_topk_prob);
  }
  CHECK(parse_model_config("{").status().code() == StatusCode::kCorrupt);
  CHECK(parse_model_config("{}").status().message().find("model_type") != std::string::npos);
  CHECK(parse_model_config(R"({"model_type":"mixtral","hidden_size":-4})").status().message().find("hidden_size") !=
        std::string::npos);
  CHECK(parse_model_config(R"({"model_type":"mixtral","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
      "num_local_experts":4,"num_experts_per_tok":9,"intermediate_size":8})")
            .status()
            .message()
            .find("top-k") != std::string::npos);
  CHECK(parse_model_config(R"({"architectures":["GrokForCausalLM"]})").status().message().find("GrokForCausalLM") !=
        std::string::npos);
}

TEST_CASE("config.json: what moex would compute wrong is refused on open") {
  const std::string base = R"("hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_experts_per_tok":2,)";
  auto mixtral = [&](const std::string& extra) {
    return parse_model_config("{\"model_type\":\"mixtral\"," + base +
                              R"("num_local_experts":4,"intermediate_size":32)" + extra + "}");
  };
  CHECK(mixtral("").is_ok());
  CHECK(mixtral(R"(,"hidden_act":"silu")").is_ok());
  auto gelu = mixtral(R"(,"hidden_act":"gelu")");
  CHECK(gelu.status().code() == StatusCode::kUnsupported);
  CHECK(gelu.status().message().find("gelu") != std::string::npos);
  auto ds = [&](const std::string& extra) {
    return parse_model_config("{" + base +
                              R"("n_routed_experts":4,"moe_intermediate_size":32,"n_shared_experts":1)" + extra + "}");
  };
  CHECK(ds(R"(,"model_type":"deepseek_v3","scoring_func":"softmax")").status().code() == StatusCode::kUnsupported);
  // DeepSeek-V2 normalizes only when top_k > 1: with one expert a token's weight is its scaled score.
  auto v2 = parse_model_config("{\"model_type\":\"deepseek_v2\"," +
                               std::string(R"("hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,)") +
                               R"("num_experts_per_tok":1,"n_routed_experts":4,"moe_intermediate_size":32,)" +
                               R"("norm_topk_prob":true,"routed_scaling_factor":2.0})");
  REQUIRE(v2.is_ok());
  CHECK(v2->router == RouterKind::kSoftmaxTopK);
  // gpt-oss's clamp comes from swiglu_limit.
  auto g = parse_model_config("{\"model_type\":\"gpt_oss\"," + base +
                              R"("num_local_experts":4,"intermediate_size":32,"swiglu_limit":3.5})");
  REQUIRE(g.is_ok());
  CHECK(g->swiglu_limit == 3.5f);
}

TEST_CASE("tensor_to_f32 rejects views that reach past their bytes") {
  std::vector<std::byte> buf(8);
  TensorRef t;
  t.name = "t";
  t.dtype = DType::kBF16;
  t.shape = {2, 3};
  t.bytes = buf;
  std::vector<float> out(6);
  CHECK(tensor_to_f32(t, out).code() == StatusCode::kCorrupt);
  t.shape = {2, 2};
  out.resize(4);
  CHECK(tensor_to_f32(t, out).is_ok());
  t.row_stride = 4;
  CHECK(tensor_to_f32(t, out).code() == StatusCode::kCorrupt);
  out.resize(3);
  CHECK(tensor_to_f32(t, out).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("the fuzz seed corpus holds valid files") {
  const fs::path corpus = fs::path(MOEX_SOURCE_DIR) / "tests" / "fuzz" / "corpus";
  REQUIRE(fs::is_directory(corpus));
  for (const auto& e : fs::directory_iterator(corpus / "gguf")) {
    CAPTURE(e.path().string());
    const auto b = read_all(e.path());
    auto r = parse_gguf(b, e.path().string());
    CHECK_MESSAGE(r.is_ok(), r.status().to_string());
    if (e.path().filename().string().find("_v") != std::string::npos) {
      auto ck = Checkpoint::open(e.path());
      CHECK_MESSAGE(ck.is_ok(), ck.status().to_string());
    }
  }
  for (const auto& e : fs::directory_iterator(corpus / "safetensors")) {
    CAPTURE(e.path().string());
    const auto b = read_all(e.path());
    CHECK_MESSAGE(parse_safetensors(b, e.path().string()).is_ok(), parse_safetensors(b, "x").status().to_string());
  }
}

}  // TEST_SUITE("formats")
