#pragma once
/// @file safetensors.hpp
/// The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
/// (`{"name": {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...,
/// "__metadata__": {"k": "v"}}`), then the data section; offsets are relative to its start.

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/formats/tensor_ref.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Largest header moex accepts (the reference implementation's limit is 100 MB).
inline constexpr std::uint64_t kMaxSafetensorsHeader = 100ull << 20;

/// The parsed header of one safetensors file; tensor bytes point into `file_bytes`.
struct SafetensorsHeader {
  std::vector<TensorRef> tensors;               ///< in file order of data offsets
  std::map<std::string, std::string> metadata;  ///< `__metadata__` (string values only)
  std::uint64_t data_offset = 0;                ///< 8 + N
};

/// Parses and validates a whole safetensors file held in memory (usually an mmap). Every check the
/// format implies is made: header length within the file, valid UTF-8 JSON object, known dtypes,
/// shapes whose byte size equals data_offsets' span, offsets inside the data section, no overlaps,
/// no duplicate names. `file` names the file in errors and in each TensorRef.
Result<SafetensorsHeader> parse_safetensors(std::span<const std::byte> file_bytes, std::string_view file);

MOEX_NAMESPACE_END
