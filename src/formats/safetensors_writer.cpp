#include "moex/formats/safetensors_writer.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moex/quant/half.hpp"

MOEX_NAMESPACE_BEGIN

namespace fs = std::filesystem;

Status SafetensorsWriter::add(std::string name, DType dtype, std::vector<std::uint64_t> shape,
                              std::span<const std::byte> data) {
  try {
    if (is_block_dtype(dtype)) return invalid_argument(name + ": safetensors has no block dtypes");
    auto nb = dtype_tensor_bytes(dtype, shape);
    if (!nb) return nb.status();
    if (*nb != data.size()) {
      return invalid_argument(name + ": shape needs " + std::to_string(*nb) + " bytes, got " +
                              std::to_string(data.size()));
    }
    for (const auto& e : entries_) {
      if (e.name == name) return invalid_argument("tensor '" + name + "' added twice");
    }
    entries_.push_back({std::move(name), dtype, std::move(shape), std::vector<std::byte>(data.begin(), data.end())});
    return Status::ok();
  } catch (const std::bad_alloc&) {
    return out_of_memory("SafetensorsWriter::add");
  }
}

Status SafetensorsWriter::add_floats(std::string name, DType dtype, std::vector<std::uint64_t> shape,
                                     std::span<const float> data) {
  try {
    const std::size_t es = dtype == DType::kF32 ? 4 : (dtype == DType::kF16 || dtype == DType::kBF16) ? 2 : 0;
    if (!es) return invalid_argument(name + ": add_floats takes F32, F16 or BF16");
    std::vector<std::byte> bytes(data.size() * es);
    for (std::size_t i = 0; i < data.size(); ++i) {
      if (dtype == DType::kF32) {
        std::memcpy(&bytes[i * 4], &data[i], 4);
      } else {
        const std::uint16_t h = dtype == DType::kF16 ? float_to_f16(data[i]) : float_to_bf16(data[i]);
        std::memcpy(&bytes[i * 2], &h, 2);
      }
    }
    return add(std::move(name), dtype, std::move(shape), bytes);
  } catch (const std::bad_alloc&) {
    return out_of_memory("SafetensorsWriter::add_floats");
  }
}

std::uint64_t SafetensorsWriter::data_bytes() const noexcept {
  std::uint64_t n = 0;
  for (const auto& e : entries_) n += e.data.size();
  return n;
}

Status SafetensorsWriter::write_entries(const fs::path& path, std::span<const Entry* const> entries) const {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata_.empty()) {
    auto& m = h["__metadata__"];
    for (const auto& [k, v] : metadata_) m[k] = v;
  }
  std::uint64_t off = 0;
  for (const auto* e : entries) {
    h[e->name] = {{"dtype", std::string(to_string(e->dtype))},
                  {"shape", e->shape},
                  {"data_offsets", {off, off + e->data.size()}}};
    off += e->data.size();
  }
  std::string text = h.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // the reference writer pads to 8 bytes
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return io_error("cannot create " + path.string());
  std::uint64_t n = text.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto* e : entries)
    out.write(reinterpret_cast<const char*>(e->data.data()), static_cast<std::streamsize>(e->data.size()));
  out.close();
  if (!out) return io_error("cannot write " + path.string());
  return Status::ok();
}

Status SafetensorsWriter::write_file(const fs::path& path) const {
  try {
    std::vector<const Entry*> all;
    for (const auto& e : entries_) all.push_back(&e);
    return write_entries(path, all);
  } catch (const std::exception& e) {
    return io_error(path.string() + ": " + e.what());
  }
}

Status SafetensorsWriter::write_sharded(const fs::path& dir, std::uint64_t max_shard_bytes) const {
  try {
    std::vector<std::vector<const Entry*>> shards(1);
    std::uint64_t cur = 0;
    for (const auto& e : entries_) {
      if (!shards.back().empty() && cur + e.data.size() > max_shard_bytes) {
        shards.emplace_back();
        cur = 0;
      }
      shards.back().push_back(&e);
      cur += e.data.size();
    }
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", data_bytes()}};
    auto& wm = index["weight_map"];
    for (std::size_t i = 0; i < shards.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
      MOEX_RETURN_IF_ERROR(write_entries(dir / name, shards[i]));
      for (const auto* e : shards[i]) wm[e->name] = name;
    }
    std::ofstream out(dir / "model.safetensors.index.json", std::ios::trunc);
    out << index.dump(1);
    out.close();
    if (!out) return io_error("cannot write " + (dir / "model.safetensors.index.json").string());
    return Status::ok();
  } catch (const std::exception& e) {
    return io_error(dir.string() + ": " + e.what());
  }
}

std::string hf_expert_tensor_name(Architecture arch, std::uint32_t layer, std::uint32_t expert, int which) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  const std::string e = std::to_string(expert);
  if (arch == Architecture::kMixtral) {
    static constexpr const char* kW[] = {"w1", "w3", "w2"};
    return p + "block_sparse_moe.experts." + e + "." + kW[which % 3] + ".weight";
  }
  static constexpr const char* kP[] = {"gate_proj", "up_proj", "down_proj"};
  return p + "mlp.experts." + e + "." + kP[which % 3] + ".weight";
}

std::string hf_router_tensor_name(Architecture arch, std::uint32_t layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  if (arch == Architecture::kMixtral) return p + "block_sparse_moe.gate.weight";
  if (arch == Architecture::kGptOss) return p + "mlp.router.weight";
  return p + "mlp.gate.weight";
}

Status write_config_json(const fs::path& dir, const ModelConfig& c) {
  try {
    nlohmann::ordered_json j;
    static constexpr const char* kClass[] = {"MixtralForCausalLM",    "Qwen2MoeForCausalLM",   "Qwen3MoeForCausalLM",
                                             "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "OlmoeForCausalLM",
                                             "GptOssForCausalLM"};
    j["architectures"] = {kClass[static_cast<int>(c.arch)]};
    j["model_type"] = std::string(to_string(c.arch));
    j["hidden_size"] = c.hidden;
    j["num_hidden_layers"] = c.n_layers;
    j["num_attention_heads"] = c.n_heads;
    j["num_key_value_heads"] = c.n_kv_heads;
    j["head_dim"] = c.head_dim;
    j["vocab_size"] = c.vocab;
    j["max_position_embeddings"] = c.max_pos;
    j["rope_theta"] = c.rope_theta;
    j["rms_norm_eps"] = c.rms_eps;
    j["tie_word_embeddings"] = c.tie_embeddings;
    j["num_experts_per_tok"] = c.top_k;
    switch (c.arch) {
      case Architecture::kMixtral:
      case Architecture::kGptOss:
        j["num_local_experts"] = c.n_experts;
        j["intermediate_size"] = c.expert_ffn;
        if (c.arch == Architecture::kGptOss) j["swiglu_limit"] = c.swiglu_limit;
        break;
      case Architecture::kOlmoe:
        j["num_experts"] = c.n_experts;
        j["intermediate_size"] = c.expert_ffn;
        j["norm_topk_prob"] = c.norm_topk_prob;
        break;
      case Architecture::kQwen2Moe:
      case Architecture::kQwen3Moe:
        j["num_experts"] = c.n_experts;
        j["moe_intermediate_size"] = c.expert_ffn;
        j["intermediate_size"] = c.dense_ffn ? c.dense_ffn : c.expert_ffn;
        j["decoder_sparse_step"] = c.moe_layer_step;
        j["norm_topk_prob"] = c.norm_topk_prob;
        j["mlp_only_layers"] = nlohmann::ordered_json::array();
        if (c.arch == Architecture::kQwen2Moe) j["shared_expert_intermediate_size"] = c.shared_ffn;
        break;
      case Architecture::kDeepseekV2:
      case Architecture::kDeepseekV3:
        j["n_routed_experts"] = c.n_experts;
        j["moe_intermediate_size"] = c.expert_ffn;
        j["intermediate_size"] = c.dense_ffn ? c.dense_ffn : c.expert_ffn;
        j["n_shared_experts"] = c.n_shared_experts;
        j["first_k_dense_replace"] = c.first_moe_layer;
        j["moe_layer_freq"] = c.moe_layer_step;
        j["routed_scaling_factor"] = c.routed_scaling;
        j["n_group"] = c.n_group;
        j["topk_group"] = c.topk_group;
        j["norm_topk_prob"] = c.norm_topk_prob;
        j["scoring_func"] = c.router == RouterKind::kSigmoidBiasScaled ? "sigmoid" : "softmax";
        j["topk_method"] = c.router == RouterKind::kSigmoidBiasScaled
                               ? "noaux_tc"
                               : (c.n_group > 1 ? "group_limited_greedy" : "greedy");
        if (c.fp8_block) {
          j["quantization_config"] = {
              {"quant_method", "fp8"}, {"fmt", "e4m3"}, {"weight_block_size", {c.fp8_block, c.fp8_block}}};
        }
        break;
    }
    std::ofstream out(dir / "config.json", std::ios::trunc);
    out << j.dump(1);
    out.close();
    if (!out) return io_error("cannot write " + (dir / "config.json").string());
    return Status::ok();
  } catch (const std::exception& e) {
    return io_error(dir.string() + ": " + e.what());
  }
}

MOEX_NAMESPACE_END
