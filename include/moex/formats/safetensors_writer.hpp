#pragma once
/// @file safetensors_writer.hpp
/// Writes safetensors files, single or sharded with `model.safetensors.index.json`, and a Hugging
/// Face config.json for a ModelConfig: "write a model in HF layout" (Mixtral and the other
/// architectures of docs/formats.md).

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "moex/formats/model_config.hpp"
#include "moex/formats/tensor_ref.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Collects tensors (copied) and writes them in the safetensors format, in insertion order.
class SafetensorsWriter {
 public:
  /// Adds a tensor of an element dtype; `data.size()` must equal the shape's byte size.
  Status add(std::string name, DType dtype, std::vector<std::uint64_t> shape, std::span<const std::byte> data);
  /// Adds floats converted to F32, F16 or BF16 (round to nearest even).
  Status add_floats(std::string name, DType dtype, std::vector<std::uint64_t> shape, std::span<const float> data);
  /// Sets a `__metadata__` entry.
  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }
  /// Total bytes of tensor data added.
  std::uint64_t data_bytes() const noexcept;

  /// Writes one file.
  Status write_file(const std::filesystem::path& path) const;
  /// Writes `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes` data each (a
  /// tensor larger than that gets a shard of its own) and `model.safetensors.index.json` into `dir`.
  Status write_sharded(const std::filesystem::path& dir, std::uint64_t max_shard_bytes) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<std::uint64_t> shape;
    std::vector<std::byte> data;
  };
  Status write_entries(const std::filesystem::path& path, std::span<const Entry* const> entries) const;
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// The Hugging Face name of an expert matrix of `arch` (which: 0 = gate/w1, 1 = up/w3, 2 = down/w2)
/// for architectures with one tensor per expert matrix (all but gpt_oss).
std::string hf_expert_tensor_name(Architecture arch, std::uint32_t layer, std::uint32_t expert, int which);
/// The Hugging Face name of the router weight of `layer`.
std::string hf_router_tensor_name(Architecture arch, std::uint32_t layer);

/// Writes `dir/config.json` describing `c` with the keys of its architecture's model_type.
Status write_config_json(const std::filesystem::path& dir, const ModelConfig& c);

MOEX_NAMESPACE_END
