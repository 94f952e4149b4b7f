#pragma once
/// @file copy_cache_file.hpp
/// Cache files for the low-precision copies of a model's experts, so that a second start skips
/// re-quantizing. A cache file is validated before use — magic, version, the model's fingerprint,
/// shape, format, size and a checksum of every byte — and a stale or corrupt one is rebuilt, never
/// trusted.
///
/// Layout (little-endian): a 4096-byte header
///   "MOEXLPC\0" | u32 version (1) | u32 reserved | u64 model fingerprint | u32 n_layers |
///   u32 n_experts | u32 hidden | u32 ffn | u8 precision | u8 scheme | u16 group_size |
///   u32 reserved | u64 expert_bytes | u64 blob_bytes | u64 blob checksum | zero padding
/// followed by the blob (ExpertStore::copy_blob).

#include <cstdint>
#include <filesystem>
#include <span>

#include "moex/status.hpp"
#include "moex/store/expert_store.hpp"

MOEX_NAMESPACE_BEGIN

/// A 64-bit checksum of `bytes` (word-wise multiply-xor mixing; not cryptographic).
std::uint64_t checksum64(std::span<const std::byte> bytes) noexcept;

/// Writes the copy of `format.precision` held by `store` to `path` (atomically: a temporary file
/// renamed into place).
Status write_copy_cache(const ExpertStore& store, WeightFormat format, std::uint64_t fingerprint,
                        const std::filesystem::path& path);

/// Reads a cache file into `store` if it is valid for this store, `format` and `fingerprint`.
/// kNotFound when absent; kCorrupt (with the reason) when stale or damaged — the caller rebuilds.
Status read_copy_cache(ExpertStore& store, WeightFormat format, std::uint64_t fingerprint,
                       const std::filesystem::path& path);

MOEX_NAMESPACE_END
