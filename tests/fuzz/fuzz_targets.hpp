#pragma once
// Entry points shared by the libFuzzer targets (clang) and the corpus replay driver (any compiler).
// Each takes arbitrary bytes and must never crash, hang, over-read or allocate by an unchecked size.

#include <cstddef>
#include <cstdint>

namespace moex::fuzz {

/// safetensors header and data: parse_safetensors, then tensor_to_f32 on small tensors.
int safetensors(const std::uint8_t* data, std::size_t size);
/// GGUF: parse_gguf, model_config_from_gguf, metadata accessors, tensor_to_f32 on small tensors.
int gguf(const std::uint8_t* data, std::size_t size);
/// config.json: parse_model_config.
int config(const std::uint8_t* data, std::size_t size);

}  // namespace moex::fuzz
