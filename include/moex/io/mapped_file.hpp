#pragma once
/// @file mapped_file.hpp
/// A read-only memory-mapped file: the disk tier. Pages are read in place on first touch.

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>

#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// A whole file mapped read-only (private). Move-only; unmaps on destruction. An empty file maps
/// to an empty span.
class MappedFile {
 public:
  MappedFile() noexcept = default;
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  /// Maps `path`; kIo naming the path when it cannot be opened or mapped.
  static Result<MappedFile> open(const std::filesystem::path& path) noexcept;

  /// The file's bytes.
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::filesystem::path path_;
};

/// Reads a whole (small) file into a string, refusing files larger than `max_bytes`.
Result<std::string> read_text_file(const std::filesystem::path& path, std::size_t max_bytes) noexcept;

MOEX_NAMESPACE_END
