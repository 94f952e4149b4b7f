#pragma once
/// @file open_expert_store.hpp
/// Builds an ExpertStore from a checkpoint on disk (safetensors or GGUF).

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
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
  /// Keep experts stored in a block format that has a moex layout (GGUF Q8_0, Q4_0, Q4_K; fp8
  /// e4m3 with DeepSeek-V3's 128x128 `weight_scale_inv`) in that format: the master copies are
  /// the checkpoint's bytes reassembled into quant/layout.hpp's layout in host RAM (fp8 weight and
  /// scales in one matrix), not decoded, so the backends run the block kernels on them. Every
  /// expert must then be in the first expert's format, in whole rows (kCorrupt naming the tensor
  /// otherwise). Checkpoints in other formats (dense floats, Q5_K, Q6_K, MXFP4...) load as when
  /// false. Off by default: decoding keeps every consumer on the formats it has always seen, and
  /// a bf16 master is what the fast CPU kernels read (block formats take the CPU's decode path).
  bool keep_block_formats = false;
  /// Low-precision copies to build at load time (e.g. int4 g64 for HOBBIT-style loading).
  std::vector<WeightFormat> extra_formats;
  /// Keep built copies in cache files, so the next start reads them instead of re-quantizing
  /// (validated; a stale or corrupt file is rebuilt). See store/copy_cache_file.hpp.
  bool use_copy_cache = true;
  /// Where cache files go; empty = a ".moex-cache" folder beside the model. When it cannot be
  /// written (a read-only model folder) the copies are simply built each time (see notes).
  std::filesystem::path cache_dir;
  ThreadPool* pool = nullptr;  ///< null: the global pool
  ProgressFn progress;         ///< called from the loading thread
};

/// A checkpoint and the store of its MoE layers.
struct OpenedModel {
  std::shared_ptr<const Checkpoint> checkpoint;
  ExpertStore store;
  /// Checkpoint layer index of each store layer (the MoE layers, in order).
  std::vector<std::uint32_t> moe_layers;
  /// Things worth telling a user that did not stop the load (e.g. a cache file rebuilt or not
  /// writable).
  std::vector<std::string> notes;
};

/// Opens `path` (a .safetensors file, a folder with config.json, or a .gguf file) and builds the
/// store. Errors name the file and tensor at fault.
Result<OpenedModel> open_expert_store(const std::filesystem::path& path, const StoreOptions& options = {});

/// Builds the store from an opened checkpoint.
Result<OpenedModel> open_expert_store(std::shared_ptr<const Checkpoint> checkpoint, const StoreOptions& options = {});

MOEX_NAMESPACE_END
