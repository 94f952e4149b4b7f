#pragma once
/// @file open_expert_store.hpp
/// Builds an ExpertStore from a checkpoint on disk (safetensors or GGUF).

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <vector>

#include "moex/formats/checkpoint.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

/// How to build the store.
struct StoreOptions {
  /// Keep the master copies in the mapped file when its tensors are dense f32/f16/bf16 in the
  /// right shape (the disk tier; nothing is copied). Otherwise, and when false, experts are decoded
  /// into `master_format` in host RAM.
  bool in_place = true;
  /// The master format when experts are decoded (block formats, fp8, strided layouts).
  WeightFormat master_format = float_format(Precision::kBF16);
  /// Low-precision copies to build at load time (e.g. int4 g64 for HOBBIT-style loading).
  std::vector<WeightFormat> extra_formats;
  ThreadPool* pool = nullptr;  ///< null: the global pool
  ProgressFn progress;         ///< called from the loading thread
};

/// A checkpoint and the store of its MoE layers.
struct OpenedModel {
  std::shared_ptr<const Checkpoint> checkpoint;
  ExpertStore store;
  /// Checkpoint layer index of each store layer (the MoE layers, in order).
  std::vector<std::uint32_t> moe_layers;
};

/// Opens `path` (a .safetensors file, a folder with config.json, or a .gguf file) and builds the
/// store. Errors name the file and tensor at fault.
Result<OpenedModel> open_expert_store(const std::filesystem::path& path, const StoreOptions& options = {});

/// Builds the store from an opened checkpoint.
Result<OpenedModel> open_expert_store(std::shared_ptr<const Checkpoint> checkpoint, const StoreOptions& options = {});

MOEX_NAMESPACE_END
