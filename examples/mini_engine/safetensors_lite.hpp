#pragma once
/// @file safetensors_lite.hpp
/// A small safetensors reader of the engine's own (single file or sharded with
/// model.safetensors.index.json), for the variant that uses moex only through its C API.
/// F32, F16 and BF16 tensors decode to f32; files are read with plain streams, sizes checked
/// against the file length before anything is allocated.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine_core.hpp"

namespace moex_engine {

/// The tensors of a checkpoint folder: where each one lives.
class SafetensorsLite {
 public:
  /// Indexes `dir` (model.safetensors.index.json, else model.safetensors). Returns an error or "".
  std::string open(const std::string& dir);
  /// Reads tensor `name` into out (f32); it must have `numel` elements. Returns an error or "".
  std::string load(const std::string& name, std::size_t numel, std::vector<float>& out) const;
  /// A TensorLoader over this reader (which must outlive it).
  TensorLoader loader() const {
    return
        [this](const std::string& name, std::size_t numel, std::vector<float>& out) { return load(name, numel, out); };
  }

 private:
  struct Entry {
    std::string file, dtype;
    std::uint64_t begin = 0, end = 0, numel = 1;  // absolute byte offsets in the file
  };
  std::string index_file(const std::string& path);
  std::map<std::string, Entry> tensors_;
};

}  // namespace moex_engine
