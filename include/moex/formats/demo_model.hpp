#pragma once
/// @file demo_model.hpp
/// Generates a random Mixtral-shaped checkpoint (config.json + model.safetensors with Hugging Face
/// Mixtral tensor names): the demo's model, and a model for tests and embedding examples.

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>

#include "moex/formats/checkpoint.hpp"
#include "moex/formats/tensor_ref.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Shape and content of a generated model.
struct DemoModelSpec {
  std::uint32_t n_layers = 8;
  std::uint32_t n_experts = 8;
  std::uint32_t top_k = 2;
  std::uint32_t hidden = 1024;
  std::uint32_t ffn = 3584;
  std::uint64_t seed = 1;
  DType dtype = DType::kBF16;           ///< F32, F16 or BF16
  std::string_view generator = "moex";  ///< written into the safetensors metadata
};

/// Fills `v` with uniform values of standard deviation `stddev` from xorshift64 seeded with `seed`:
/// the same bits on every machine.
void fill_uniform_random(std::span<float> v, float stddev, std::uint64_t seed) noexcept;

/// Writes the model into `dir` (created if needed). Expert matrices have standard deviation
/// 1/sqrt(fan-in) and routers 4/sqrt(hidden), so routing is decisive. `progress` is called per
/// expert. Errors: kInvalidArgument for a bad spec, kIo when writing fails.
Status write_demo_model(const std::filesystem::path& dir, const DemoModelSpec& spec, const ProgressFn& progress = {});

MOEX_NAMESPACE_END
