#pragma once
// Test-side checkpoint writers: a GGUF v2/v3 writer following the spec, and a generator of small
// real checkpoints of every supported architecture (safetensors single/sharded via the library's
// SafetensorsWriter, and GGUF) that remembers every expert's bytes for comparison.
// Header-only: tests/CMakeLists.txt compiles only test_main.cpp and test_support.cpp into the
// shared test object, so inline definitions keep this usable from any suite.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "moex/formats/gguf.hpp"
#include "moex/formats/safetensors_writer.hpp"
#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

#include "support/block_expert.hpp"
#include "support/test_support.hpp"

namespace moex::test {

/// Builds a GGUF file in memory: metadata of every value type, tensor infos, aligned data.
class GgufWriter {
 public:
  void kv_u32(const std::string& k, std::uint32_t v) {
    key(k, GgufType::kU32);
    put(v);
  }
  void kv_f32(const std::string& k, float v) {
    key(k, GgufType::kF32);
    put(v);
  }
  void kv_bool(const std::string& k, bool v) {
    key(k, GgufType::kBool);
    put(static_cast<std::uint8_t>(v));
  }
  void kv_u64(const std::string& k, std::uint64_t v) {
    key(k, GgufType::kU64);
    put(v);
  }
  void kv_i8(const std::string& k, std::int8_t v) {
    key(k, GgufType::kI8);
    put(v);
  }
  void kv_f64(const std::string& k, double v) {
    key(k, GgufType::kF64);
    put(v);
  }
  void kv_string(const std::string& k, const std::string& v) {
    key(k, GgufType::kString);
    str(v);
  }
  void kv_strings(const std::string& k, const std::vector<std::string>& v) {
    key(k, GgufType::kArray);
    put(static_cast<std::uint32_t>(GgufType::kString));
    put(static_cast<std::uint64_t>(v.size()));
    for (const auto& s : v) str(s);
  }
  void kv_f32s(const std::string& k, const std::vector<float>& v) {
    key(k, GgufType::kArray);
    put(static_cast<std::uint32_t>(GgufType::kF32));
    put(static_cast<std::uint64_t>(v.size()));
    for (float f : v) put(f);
  }
  /// `shape` row-major (innermost last); written as ggml ne[] (reversed).
  void tensor(const std::string& name, GgmlType type, std::vector<std::uint64_t> shape, std::vector<std::byte> data) {
    tensors_.push_back({name, type, std::move(shape), std::move(data)});
  }
  void set_alignment(std::uint32_t a) {
    alignment_ = a;
    kv_u32("general.alignment", a);
  }

  std::vector<std::byte> bytes(std::uint32_t version = 3) const {
    std::vector<std::byte> out;
    auto app = [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::byte*>(p);
      out.insert(out.end(), b, b + n);
    };
    const char magic[4] = {'G', 'G', 'U', 'F'};
    app(magic, 4);
    app(&version, 4);
    const std::uint64_t nt = tensors_.size(), nkv = n_kv_;
    app(&nt, 8);
    app(&nkv, 8);
    out.insert(out.end(), kv_.begin(), kv_.end());
    std::uint64_t off = 0;
    for (const auto& t : tensors_) {
      const std::uint64_t len = t.name.size();
      app(&len, 8);
      app(t.name.data(), t.name.size());
      const auto nd = static_cast<std::uint32_t>(t.shape.size());
      app(&nd, 4);
      for (std::size_t d = t.shape.size(); d-- > 0;) app(&t.shape[d], 8);
      const auto ty = static_cast<std::uint32_t>(t.type);
      app(&ty, 4);
      app(&off, 8);
      off += (t.data.size() + alignment_ - 1) / alignment_ * alignment_;
    }
    while (out.size() % alignment_) out.push_back(std::byte{0});
    for (const auto& t : tensors_) {
      out.insert(out.end(), t.data.begin(), t.data.end());
      while (out.size() % alignment_) out.push_back(std::byte{0});
    }
    return out;
  }
  void write(const std::filesystem::path& p, std::uint32_t version = 3) const {
    const auto b = bytes(version);
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  }

 private:
  struct T {
    std::string name;
    GgmlType type;
    std::vector<std::uint64_t> shape;
    std::vector<std::byte> data;
  };
  template <class V>
  void put(V v) {
    const auto* b = reinterpret_cast<const std::byte*>(&v);
    kv_.insert(kv_.end(), b, b + sizeof v);
  }
  void str(const std::string& s) {
    put(static_cast<std::uint64_t>(s.size()));
    const auto* b = reinterpret_cast<const std::byte*>(s.data());
    kv_.insert(kv_.end(), b, b + s.size());
  }
  void key(const std::string& k, GgufType t) {
    ++n_kv_;
    str(k);
    put(static_cast<std::uint32_t>(t));
  }
  std::vector<std::byte> kv_;
  std::uint64_t n_kv_ = 0;
  std::uint32_t alignment_ = 32;
  std::vector<T> tensors_;
};

/// bf16 bytes of `v` (rounded), and the floats those bytes hold.
inline std::vector<std::byte> to_bf16_bytes(const std::vector<float>& v) {
  std::vector<std::byte> b(v.size() * 2);
  for (std::size_t i = 0; i < v.size(); ++i) {
    const std::uint16_t h = float_to_bf16(v[i]);
    std::memcpy(&b[2 * i], &h, 2);
  }
  return b;
}

/// A small config of `arch` (hidden 64, expert ffn 32 unless given).
inline ModelConfig tiny_config(Architecture arch, std::uint32_t hidden = 64, std::uint32_t ffn = 32) {
  ModelConfig c;
  c.arch = arch;
  c.architecture = std::string(to_string(arch));
  c.n_layers = 3;
  c.n_experts = 4;
  c.top_k = 2;
  c.hidden = hidden;
  c.expert_ffn = ffn;
  c.dense_ffn = 2 * ffn;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = hidden / 4;
  c.vocab = 256;
  c.max_pos = 128;
  c.rms_eps = 1e-5f;
  c.rope_theta = 10000.f;
  switch (arch) {
    case Architecture::kQwen2Moe:
      c.n_shared_experts = 1;
      c.shared_ffn = 2 * ffn;
      c.norm_topk_prob = false;
      c.router = RouterKind::kSoftmaxTopK;
      break;
    case Architecture::kQwen3Moe:
      c.norm_topk_prob = true;
      break;
    case Architecture::kOlmoe:
      c.norm_topk_prob = false;
      c.router = RouterKind::kSoftmaxTopK;
      break;
    case Architecture::kDeepseekV2:
    case Architecture::kDeepseekV3:
      c.n_shared_experts = 2;
      c.shared_ffn = 2 * ffn;
      c.first_moe_layer = 1;
      c.routed_scaling = 2.5f;
      c.n_group = 2;
      c.topk_group = 1;
      c.norm_topk_prob = arch == Architecture::kDeepseekV3;
      c.router = arch == Architecture::kDeepseekV3 ? RouterKind::kSigmoidBiasScaled : RouterKind::kSoftmaxTopK;
      break;
    default:
      break;
  }
  return c;
}

/// What a generated checkpoint holds, to compare against: per (layer, expert, which) the exact bytes
/// written (per-expert formats) and the float values (always).
struct WrittenModel {
  ModelConfig config;
  std::map<std::tuple<std::uint32_t, std::uint32_t, int>, std::vector<std::byte>> expert_bytes;
  std::map<std::tuple<std::uint32_t, std::uint32_t, int>, std::vector<float>> expert_values;  // [out, in]
  std::map<std::uint32_t, std::vector<float>> router_values;
};

/// Writes an HF safetensors checkpoint of `c` (bf16 weights; DeepSeek-V3 with fp8_block writes fp8
/// experts with scales; gpt-oss fused gate_up, or MXFP4 blocks when `mxfp4`) into `dir`.
inline WrittenModel write_hf_model(const std::filesystem::path& dir, const ModelConfig& c, bool sharded,
                                   bool mxfp4 = false) {
  WrittenModel w;
  w.config = c;
  SafetensorsWriter st;
  std::uint64_t salt = 1;
  auto bf16_tensor = [&](const std::string& name, std::vector<std::uint64_t> shape, std::vector<float>* vals) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    auto v = random_normal(n, 0.05f, salt++);
    for (auto& x : v) x = bf16_to_float(float_to_bf16(x));
    const auto b = to_bf16_bytes(v);
    REQUIRE(st.add(name, DType::kBF16, shape, b).is_ok());
    if (vals) *vals = v;
    return b;
  };
  const std::uint32_t H = c.hidden, F = c.expert_ffn, E = c.n_experts;
  bf16_tensor("model.embed_tokens.weight", {c.vocab, H}, nullptr);
  for (std::uint32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    bf16_tensor(p + "input_layernorm.weight", {H}, nullptr);
    if (!c.is_moe_layer(l)) {
      bf16_tensor(p + "mlp.gate_proj.weight", {c.dense_ffn, H}, nullptr);
      bf16_tensor(p + "mlp.up_proj.weight", {c.dense_ffn, H}, nullptr);
      bf16_tensor(p + "mlp.down_proj.weight", {H, c.dense_ffn}, nullptr);
      continue;
    }
    bf16_tensor(hf_router_tensor_name(c.arch, l), {E, H}, &w.router_values[l]);
    if (c.arch == Architecture::kDeepseekV3) {  // varied, some negative: it reorders the selection
      std::vector<float> bias = random_normal(E, 0.3f, salt++);
      REQUIRE(st.add_floats(p + "mlp.gate.e_score_correction_bias", DType::kF32, {E}, bias).is_ok());
    }
    if (c.arch == Architecture::kGptOss) {
      bf16_tensor(p + "mlp.router.bias", {E}, nullptr);
      std::vector<float> b13;
      bf16_tensor(p + "mlp.experts.gate_up_proj_bias", {E, 2 * F}, &b13);
      bf16_tensor(p + "mlp.experts.down_proj_bias", {E, H}, nullptr);
      if (!mxfp4) {
        std::vector<float> gu, dn;
        bf16_tensor(p + "mlp.experts.gate_up_proj", {E, H, 2 * F}, &gu);
        bf16_tensor(p + "mlp.experts.down_proj", {E, F, H}, &dn);
        for (std::uint32_t e = 0; e < E; ++e) {
          std::vector<float> g(F * H), u(F * H), d(H * F);
          for (std::uint32_t o = 0; o < F; ++o)
            for (std::uint32_t i = 0; i < H; ++i) {
              g[o * H + i] = gu[(e * H + i) * 2 * F + 2 * o];
              u[o * H + i] = gu[(e * H + i) * 2 * F + 2 * o + 1];
            }
          for (std::uint32_t o = 0; o < H; ++o)
            for (std::uint32_t i = 0; i < F; ++i) d[o * F + i] = dn[(e * F + i) * H + o];
          w.expert_values[{l, e, 0}] = g;
          w.expert_values[{l, e, 1}] = u;
          w.expert_values[{l, e, 2}] = d;
        }
      } else {
        // MXFP4: blocks [E, rows, cols/32, 16] (low nibble = even element), scales [E, rows, cols/32]
        static constexpr float kFp4[16] = {0, .5f, 1, 1.5f, 2, 3, 4, 6, -0.f, -.5f, -1, -1.5f, -2, -3, -4, -6};
        auto mx = [&](const std::string& name, std::uint32_t rows, std::uint32_t cols, std::vector<float>& vals) {
          std::vector<std::byte> blocks(std::size_t{E} * rows * cols / 2), scales(std::size_t{E} * rows * cols / 32);
          vals.assign(std::size_t{E} * rows * cols, 0.f);
          std::uint64_t x = seed() ^ salt++;
          for (std::size_t b = 0; b < scales.size(); ++b) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            const auto e8 = static_cast<std::uint8_t>(120 + (x >> 60) % 8);
            scales[b] = std::byte{e8};
            for (int j = 0; j < 16; ++j) {
              x = x * 6364136223846793005ull + 1442695040888963407ull;
              const auto q = static_cast<std::uint8_t>(x >> 56);
              blocks[b * 16 + j] = std::byte{q};
              vals[b * 32 + 2 * j] = std::ldexp(kFp4[q & 15], e8 - 127);
              vals[b * 32 + 2 * j + 1] = std::ldexp(kFp4[q >> 4], e8 - 127);
            }
          }
          REQUIRE(st.add(name + "_blocks", DType::kU8, {E, rows, cols / 32, 16}, blocks).is_ok());
          REQUIRE(st.add(name + "_scales", DType::kU8, {E, rows, cols / 32}, scales).is_ok());
        };
        std::vector<float> gu, dn;
        mx(p + "mlp.experts.gate_up_proj", 2 * F, H, gu);
        mx(p + "mlp.experts.down_proj", H, F, dn);
        for (std::uint32_t e = 0; e < E; ++e) {
          std::vector<float> g(F * H), u(F * H),
              d(dn.begin() + std::ptrdiff_t{e} * H * F, dn.begin() + std::ptrdiff_t{e + 1} * H * F);
          for (std::uint32_t o = 0; o < F; ++o)
            for (std::uint32_t i = 0; i < H; ++i) {
              g[o * H + i] = gu[(std::size_t{e} * 2 * F + 2 * o) * H + i];
              u[o * H + i] = gu[(std::size_t{e} * 2 * F + 2 * o + 1) * H + i];
            }
          w.expert_values[{l, e, 0}] = g;
          w.expert_values[{l, e, 1}] = u;
          w.expert_values[{l, e, 2}] = d;
        }
      }
      continue;
    }
    for (std::uint32_t e = 0; e < E; ++e) {
      for (int which = 0; which < 3; ++which) {
        const std::vector<std::uint64_t> shape =
            which == 2 ? std::vector<std::uint64_t>{H, F} : std::vector<std::uint64_t>{F, H};
        const std::string name = hf_expert_tensor_name(c.arch, l, e, which);
        if (c.fp8_block) {  // fp8 e4m3 codes 0..0x77 (finite) with one scale per block
          std::vector<std::byte> codes(std::size_t{F} * H);
          std::vector<float> vals(codes.size());
          const std::uint64_t b = c.fp8_block;
          const std::uint64_t sr = (shape[0] + b - 1) / b, sc = (shape[1] + b - 1) / b;
          std::vector<float> scales(sr * sc);
          for (std::size_t s = 0; s < scales.size(); ++s) scales[s] = 0.5f + 0.25f * static_cast<float>((s + salt) % 4);
          for (std::size_t i = 0; i < codes.size(); ++i) {
            const auto q = static_cast<std::uint8_t>((i * 37 + salt * 11) % 0xF0);
            codes[i] = std::byte{static_cast<std::uint8_t>((q & 0x7F) == 0x7F ? 0 : q)};
            const std::size_t r = i / shape[1], col = i % shape[1];
            vals[i] = fp8_e4m3_to_float(std::to_integer<std::uint8_t>(codes[i])) * scales[(r / b) * sc + col / b];
          }
          ++salt;
          REQUIRE(st.add(name, DType::kF8E4M3, shape, codes).is_ok());
          REQUIRE(st.add_floats(name + "_scale_inv", DType::kF32, {sr, sc}, scales).is_ok());
          w.expert_bytes[{l, e, which}] = codes;
          w.expert_values[{l, e, which}] = vals;
        } else {
          w.expert_bytes[{l, e, which}] = bf16_tensor(name, shape, &w.expert_values[{l, e, which}]);
        }
      }
    }
    if (c.n_shared_experts) {
      const std::string q = p + (c.arch == Architecture::kQwen2Moe ? "mlp.shared_expert." : "mlp.shared_experts.");
      bf16_tensor(q + "gate_proj.weight", {c.shared_ffn, H}, nullptr);
      bf16_tensor(q + "up_proj.weight", {c.shared_ffn, H}, nullptr);
      bf16_tensor(q + "down_proj.weight", {H, c.shared_ffn}, nullptr);
      if (c.arch == Architecture::kQwen2Moe) bf16_tensor(p + "mlp.shared_expert_gate.weight", {1, H}, nullptr);
    }
  }
  bf16_tensor("model.norm.weight", {H}, nullptr);
  bf16_tensor("lm_head.weight", {c.vocab, H}, nullptr);
  std::filesystem::create_directories(dir);
  REQUIRE(write_config_json(dir, c).is_ok());
  if (sharded) {
    REQUIRE(st.write_sharded(dir, st.data_bytes() / 3 + 1).is_ok());
  } else {
    REQUIRE(st.write_file(dir / "model.safetensors").is_ok());
  }
  return w;
}

/// The GGUF architecture name of `a`.
inline std::string gguf_arch_name(Architecture a) {
  switch (a) {
    case Architecture::kMixtral:
      return "llama";
    case Architecture::kQwen2Moe:
      return "qwen2moe";
    case Architecture::kQwen3Moe:
      return "qwen3moe";
    case Architecture::kDeepseekV2:
    case Architecture::kDeepseekV3:
      return "deepseek2";
    case Architecture::kOlmoe:
      return "olmoe";
    case Architecture::kGptOss:
      return "gpt-oss";
  }
  return "?";
}

/// Encodes floats to Q8_0 blocks (ggml's quantize_row_q8_0_ref rule) and returns the block bytes.
inline std::vector<std::byte> encode_q8_0(const float* x, std::size_t n) {
  std::vector<std::byte> out;
  for (std::size_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    const std::uint16_t dh = float_to_f16(d);
    out.push_back(std::byte(dh & 0xff));
    out.push_back(std::byte(dh >> 8));
    for (int j = 0; j < 32; ++j)
      out.push_back(std::byte(static_cast<std::uint8_t>(static_cast<std::int8_t>(std::lround(x[b * 32 + j] * id)))));
  }
  return out;
}

/// Writes a GGUF checkpoint of `c` with merged expert tensors (`ffn_*_exps`) in `type` (F32, F16,
/// BF16, Q8_0, or random Q4_0 / Q4_K blocks) and returns the exact bytes of each expert slice.
inline WrittenModel write_gguf_model(const std::filesystem::path& path, const ModelConfig& c, GgmlType type,
                                     std::uint32_t version = 3) {
  WrittenModel w;
  w.config = c;
  GgufWriter g;
  const std::string a = gguf_arch_name(c.arch);
  g.kv_string("general.architecture", a);
  g.kv_string("general.name", "moex test " + c.architecture);
  g.kv_u32(a + ".block_count", c.n_layers);
  g.kv_u32(a + ".embedding_length", c.hidden);
  g.kv_u32(a + ".feed_forward_length", c.dense_ffn);
  g.kv_u32(a + ".expert_feed_forward_length", c.expert_ffn);
  g.kv_u32(a + ".expert_count", c.n_experts);
  g.kv_u32(a + ".expert_used_count", c.top_k);
  g.kv_u32(a + ".attention.head_count", c.n_heads);
  g.kv_u32(a + ".attention.head_count_kv", c.n_kv_heads);
  g.kv_f32(a + ".attention.layer_norm_rms_epsilon", c.rms_eps);
  g.kv_f32(a + ".rope.freq_base", c.rope_theta);
  g.kv_u64(a + ".context_length", c.max_pos);
  g.kv_strings("tokenizer.ggml.tokens", {"a", "b", "c"});
  g.kv_f32s("tokenizer.ggml.scores", {0.f, 1.f, 2.f});
  if (c.n_shared_experts) {
    g.kv_u32(a + ".expert_shared_count", c.n_shared_experts);
    if (c.arch == Architecture::kQwen2Moe) g.kv_u32(a + ".expert_shared_feed_forward_length", c.shared_ffn);
  }
  if (c.first_moe_layer) g.kv_u32(a + ".leading_dense_block_count", c.first_moe_layer);
  if (c.arch == Architecture::kDeepseekV2 || c.arch == Architecture::kDeepseekV3) {
    g.kv_f32(a + ".expert_weights_scale", c.routed_scaling);
    g.kv_bool(a + ".expert_weights_norm", c.norm_topk_prob);
    g.kv_u32(a + ".expert_gating_func", c.router == RouterKind::kSigmoidBiasScaled ? 2 : 1);
    g.kv_u32(a + ".expert_group_count", c.n_group);
    g.kv_u32(a + ".expert_group_used_count", c.topk_group);
  } else if (c.arch != Architecture::kMixtral && c.arch != Architecture::kGptOss) {
    g.kv_bool(a + ".expert_weights_norm", c.norm_topk_prob);
  }
  std::uint64_t salt = 1000;
  const std::uint64_t H = c.hidden, F = c.expert_ffn, E = c.n_experts;
  auto make = [&](std::uint64_t n, GgmlType t, std::vector<float>& vals) {
    vals = random_normal(n, 0.05f, salt++);
    std::vector<std::byte> b;
    if (t == GgmlType::kF32) {
      b.resize(n * 4);
      std::memcpy(b.data(), vals.data(), b.size());
    } else if (t == GgmlType::kF16) {
      for (auto& x : vals) x = f16_to_float(float_to_f16(x));
      b.resize(n * 2);
      for (std::size_t i = 0; i < n; ++i) {
        const auto h = float_to_f16(vals[i]);
        std::memcpy(&b[2 * i], &h, 2);
      }
    } else if (t == GgmlType::kBF16) {
      for (auto& x : vals) x = bf16_to_float(float_to_bf16(x));
      b = to_bf16_bytes(vals);
    } else if (t == GgmlType::kQ4_0 || t == GgmlType::kQ4_K) {
      b = random_gguf_blocks(t == GgmlType::kQ4_K ? Precision::kQ4_K : Precision::kQ4_0, 1, n, salt++, vals);
    } else {  // Q8_0
      b = encode_q8_0(vals.data(), n);
    }
    return b;
  };
  for (std::uint32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    std::vector<float> tmp;
    g.tensor(p + "attn_norm.weight", GgmlType::kF32, {H}, make(H, GgmlType::kF32, tmp));
    if (!c.is_moe_layer(l)) {
      g.tensor(p + "ffn_gate.weight", type, {c.dense_ffn, H}, make(c.dense_ffn * H, type, tmp));
      g.tensor(p + "ffn_up.weight", type, {c.dense_ffn, H}, make(c.dense_ffn * H, type, tmp));
      g.tensor(p + "ffn_down.weight", type, {H, c.dense_ffn}, make(c.dense_ffn * H, type, tmp));
      continue;
    }
    g.tensor(p + "ffn_gate_inp.weight", GgmlType::kF32, {E, H}, make(E * H, GgmlType::kF32, w.router_values[l]));
    if (c.arch == Architecture::kDeepseekV3)
      g.tensor(p + "exp_probs_b.bias", GgmlType::kF32, {E}, make(E, GgmlType::kF32, tmp));
    if (c.arch == Architecture::kGptOss)
      g.tensor(p + "ffn_gate_inp.bias", GgmlType::kF32, {E}, make(E, GgmlType::kF32, tmp));
    if (c.arch == Architecture::kGptOss) {  // expert biases, as llama.cpp's converter splits them
      g.tensor(p + "ffn_gate_exps.bias", GgmlType::kF32, {E, F}, make(E * F, GgmlType::kF32, tmp));
      g.tensor(p + "ffn_up_exps.bias", GgmlType::kF32, {E, F}, make(E * F, GgmlType::kF32, tmp));
      g.tensor(p + "ffn_down_exps.bias", GgmlType::kF32, {E, H}, make(E * H, GgmlType::kF32, tmp));
    }
    static constexpr const char* kNames[] = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"};
    for (int which = 0; which < 3; ++which) {
      const std::uint64_t rows = which == 2 ? H : F, cols = which == 2 ? F : H;
      std::vector<float> vals;
      auto b = make(E * rows * cols, type, vals);
      const std::size_t per = b.size() / E;
      for (std::uint32_t e = 0; e < E; ++e) {
        w.expert_bytes[{l, e, which}] = std::vector<std::byte>(b.begin() + static_cast<std::ptrdiff_t>(per * e),
                                                               b.begin() + static_cast<std::ptrdiff_t>(per * (e + 1)));
        w.expert_values[{l, e, which}] =
            std::vector<float>(vals.begin() + static_cast<std::ptrdiff_t>(rows * cols * e),
                               vals.begin() + static_cast<std::ptrdiff_t>(rows * cols * (e + 1)));
      }
      g.tensor(p + kNames[which], type, {E, rows, cols}, std::move(b));
    }
    if (c.n_shared_experts) {
      const std::uint64_t S = c.shared_ffn;
      g.tensor(p + "ffn_gate_shexp.weight", type, {S, H}, make(S * H, type, tmp));
      g.tensor(p + "ffn_up_shexp.weight", type, {S, H}, make(S * H, type, tmp));
      g.tensor(p + "ffn_down_shexp.weight", type, {H, S}, make(S * H, type, tmp));
      if (c.arch == Architecture::kQwen2Moe)
        g.tensor(p + "ffn_gate_inp_shexp.weight", GgmlType::kF32, {1, H}, make(H, GgmlType::kF32, tmp));
    }
  }
  std::vector<float> tmp;
  g.tensor("output_norm.weight", GgmlType::kF32, {H}, make(H, GgmlType::kF32, tmp));
  g.write(path, version);
  return w;
}

}  // namespace moex::test
