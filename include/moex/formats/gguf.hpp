#pragma once
/// @file gguf.hpp
/// The GGUF format (versions 2 and 3) as llama.cpp writes it: "GGUF", u32 version, u64 tensor
/// count, u64 metadata count, metadata key/values, tensor infos, padding to `general.alignment`
/// (default 32), then tensor data. All little-endian.

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "moex/formats/model_config.hpp"
#include "moex/formats/tensor_ref.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// GGUF metadata value types (pinned by the spec).
enum class GgufType : std::uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

/// ggml tensor types moex reads (values pinned by ggml.h).
enum class GgmlType : std::uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kBF16 = 30,
  kMxfp4 = 39,
};
/// The DType of a ggml type; nullopt for types moex does not read.
std::optional<DType> dtype_from_ggml(std::uint32_t ggml_type) noexcept;
/// The ggml type of a DType; nullopt where ggml has none.
std::optional<GgmlType> ggml_from_dtype(DType t) noexcept;

/// One metadata value. Arrays are not expanded (a hostile count must not turn into an allocation):
/// they keep their element type, count and the stored bytes, decoded on demand.
struct GgufValue {
  GgufType type = GgufType::kU32;
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string> scalar;  ///< non-arrays
  GgufType elem_type = GgufType::kU8;                                           ///< arrays
  std::uint64_t count = 0;                                                      ///< arrays: number of elements
  std::span<const std::byte> raw;  ///< arrays: the elements as stored (points into the file)

  /// The value as an unsigned integer if it is a non-negative integer (or bool).
  std::optional<std::uint64_t> as_uint() const noexcept;
  /// The value as a double if it is numeric.
  std::optional<double> as_double() const noexcept;
  /// The string if it is one.
  const std::string* as_string() const noexcept;
  /// Element i of a numeric array as a double (nullopt when out of range or not numeric).
  std::optional<double> array_number(std::uint64_t i) const noexcept;
  /// The elements of a string array (empty for other types).
  std::vector<std::string> array_strings() const;
};

/// A parsed GGUF file; tensor bytes point into the mapped file.
struct GgufFile {
  std::uint32_t version = 0;
  std::uint64_t alignment = 32;
  std::map<std::string, GgufValue, std::less<>> metadata;
  std::vector<TensorRef> tensors;  ///< shapes row-major (ne[] reversed)
  std::uint64_t data_offset = 0;

  /// A metadata value, or nullptr.
  const GgufValue* find(std::string_view key) const noexcept;
};

/// Limits that bound allocation on hostile input.
inline constexpr std::uint64_t kGgufMaxStringBytes = 1ull << 24;
inline constexpr std::uint64_t kGgufMaxArrayElems = 1ull << 24;
inline constexpr std::uint32_t kGgufMaxDims = 4;

/// Parses and validates a GGUF v2/v3 file held in memory. Counts are checked against the bytes
/// that remain before anything is allocated; tensor data must lie inside the file, aligned, without
/// overlaps; names must be unique. `file` names the file in errors.
Result<GgufFile> parse_gguf(std::span<const std::byte> file_bytes, std::string_view file);

/// The ModelConfig of a parsed GGUF file, from `general.architecture` and `<arch>.*` keys (see
/// docs/formats.md); an unknown architecture or a missing key is an error naming it.
Result<ModelConfig> model_config_from_gguf(const GgufFile& gguf, std::string_view source);

MOEX_NAMESPACE_END
