#pragma once
/// @file checkpoint.hpp
/// Checkpoint: an opened model (Hugging Face safetensors, single or sharded, or llama.cpp GGUF),
/// its files memory-mapped and read in place, with the tensors of each architecture found by their
/// own names (see docs/formats.md).

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "moex/formats/model_config.hpp"
#include "moex/formats/tensor_ref.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Progress of a long operation: `done` of `total` units (files or bytes), `what` names the step.
/// Called on the calling thread; may be empty.
using ProgressFn = std::function<void(std::uint64_t done, std::uint64_t total, std::string_view what)>;

/// The container a checkpoint was read from.
enum class CheckpointFormat : std::uint8_t { kSafetensors = 0, kGguf = 1 };

/// An opened model. Immutable after open(); const methods may run concurrently.
class Checkpoint {
 public:
  /// Opens a model: a `.safetensors` file (config.json beside it), a directory holding
  /// `model.safetensors.index.json` (sharded) or `model.safetensors` plus config.json, or a `.gguf`
  /// file (or a directory holding exactly one). Every file is validated on open.
  static Result<std::unique_ptr<Checkpoint>> open(const std::filesystem::path& path_or_dir, ProgressFn progress = {});

  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;
  ~Checkpoint();

  const ModelConfig& config() const noexcept;
  CheckpointFormat format() const noexcept;
  /// The files mapped, in order.
  std::vector<std::filesystem::path> files() const;
  /// Total bytes of the mapped files.
  std::uint64_t file_bytes() const noexcept;

  /// A tensor by its name in the file (HF or GGUF spelling); kNotFound naming it otherwise.
  Result<TensorRef> tensor(std::string_view name) const;
  /// All tensor names, sorted.
  std::vector<std::string> tensor_names() const;

  /// The routed expert `expert` of MoE layer `layer`: w1 (gate), w3 (up), w2 (down), each [out, in].
  /// Merged tensors (GGUF `ffn_*_exps`, gpt-oss `gate_up_proj`) are sliced: the refs point inside
  /// them. fp8 weights carry their block scales (TensorRef::scales). kInvalidArgument for a
  /// non-MoE layer or an expert out of range.
  Result<ExpertTensors> expert(std::uint32_t layer, std::uint32_t expert) const;
  /// The router weight of MoE layer `layer`: [n_experts, hidden].
  Result<TensorRef> router(std::uint32_t layer) const;
  /// The router's selection bias (DeepSeek-V3 e_score_correction_bias, gpt-oss router bias):
  /// [n_experts]; kNotFound if the model has none.
  Result<TensorRef> router_bias(std::uint32_t layer) const;
  /// The shared expert of MoE layer `layer` (Qwen2-MoE, DeepSeek; several DeepSeek shared experts
  /// are stored merged as one of ffn shared_ffn); kNotFound if the model has none.
  Result<ExpertTensors> shared_expert(std::uint32_t layer) const;
  /// Qwen2-MoE's shared_expert_gate [1, hidden]; kNotFound elsewhere.
  Result<TensorRef> shared_expert_gate(std::uint32_t layer) const;

  struct Impl;

 private:
  explicit Checkpoint(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

MOEX_NAMESPACE_END
