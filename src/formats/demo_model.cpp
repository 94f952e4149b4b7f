#include "moex/formats/demo_model.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <system_error>
#include <vector>

#include "moex/formats/safetensors_writer.hpp"

MOEX_NAMESPACE_BEGIN

void fill_uniform_random(std::span<float> v, float stddev, std::uint64_t seed) noexcept {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  const float scale = stddev * std::sqrt(3.f) / 2147483648.f;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = static_cast<float>(static_cast<std::int32_t>(s >> 32)) * scale;
  }
}

Status write_demo_model(const std::filesystem::path& dir, const DemoModelSpec& p, const ProgressFn& progress) {
  if (p.n_layers == 0 || p.n_experts == 0 || p.top_k == 0 || p.top_k > p.n_experts || p.top_k > kMaxTopK ||
      p.hidden == 0 || p.ffn == 0)
    return invalid_argument("demo model: layers, experts, hidden and ffn must be > 0 and top_k in 1..experts");
  if (p.dtype != DType::kF32 && p.dtype != DType::kF16 && p.dtype != DType::kBF16)
    return invalid_argument("demo model: dtype must be F32, F16 or BF16");
  if (std::uint64_t{p.hidden} * p.ffn > (std::uint64_t{1} << 32))
    return invalid_argument("demo model: expert matrices larger than 2^32 weights");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return io_error("cannot create " + dir.string() + ": " + ec.message());
  ModelConfig c;
  c.arch = Architecture::kMixtral;
  c.architecture = "mixtral";
  c.n_layers = p.n_layers;
  c.n_experts = p.n_experts;
  c.top_k = p.top_k;
  c.hidden = p.hidden;
  c.expert_ffn = p.ffn;
  c.n_heads = std::max(1u, p.hidden / 128);
  c.n_kv_heads = c.n_heads;
  c.head_dim = p.hidden / c.n_heads;
  c.vocab = 256;
  c.max_pos = 4096;
  MOEX_RETURN_IF_ERROR(write_config_json(dir, c));
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("generator", std::string(p.generator));
  std::vector<float> buf;
  const std::uint64_t total = std::uint64_t{p.n_layers} * p.n_experts;
  for (std::uint32_t l = 0; l < p.n_layers; ++l) {
    for (std::uint32_t e = 0; e < p.n_experts; ++e) {
      const std::uint64_t salt = (std::uint64_t{l} * p.n_experts + e) * 4 + p.seed * 1000003;
      for (int which = 0; which < 3; ++which) {
        const bool down = which == 2;
        const std::uint64_t rows = down ? p.hidden : p.ffn, cols = down ? p.ffn : p.hidden;
        buf.resize(rows * cols);
        fill_uniform_random(buf, 1.f / std::sqrt(static_cast<float>(cols)), salt + static_cast<std::uint64_t>(which));
        MOEX_RETURN_IF_ERROR(w.add_floats(hf_expert_tensor_name(c.arch, l, e, which), p.dtype, {rows, cols}, buf));
      }
      if (progress) progress(std::uint64_t{l} * p.n_experts + e + 1, total, "generating experts");
    }
    buf.resize(std::size_t{p.n_experts} * p.hidden);
    fill_uniform_random(buf, 4.f / std::sqrt(static_cast<float>(p.hidden)), 77 + l + p.seed * 7919);
    MOEX_RETURN_IF_ERROR(w.add_floats(hf_router_tensor_name(c.arch, l), p.dtype, {p.n_experts, p.hidden}, buf));
  }
  return w.write_file(dir / "model.safetensors");
}

MOEX_NAMESPACE_END
