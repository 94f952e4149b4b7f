// moex_fuzz_replay TARGET FILE_OR_DIR...: runs every file through a fuzz entry point (regression
// replay of tests/fuzz/corpus/<target>/ under any compiler). Exits non-zero if a target is unknown
// or nothing was replayed; a crash fails the test by itself.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz_targets.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: moex_fuzz_replay safetensors|gguf|config FILE_OR_DIR...\n");
    return 2;
  }
  int (*fn)(const std::uint8_t*, std::size_t) = nullptr;
  if (!std::strcmp(argv[1], "safetensors"))
    fn = moex::fuzz::safetensors;
  else if (!std::strcmp(argv[1], "gguf"))
    fn = moex::fuzz::gguf;
  else if (!std::strcmp(argv[1], "config"))
    fn = moex::fuzz::config;
  if (!fn) {
    std::fprintf(stderr, "unknown target %s\n", argv[1]);
    return 2;
  }
  std::vector<std::filesystem::path> files;
  for (int i = 2; i < argc; ++i) {
    const std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) files.push_back(e.path());
      }
    } else {
      files.push_back(p);
    }
  }
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::vector<char> buf((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // also every prefix-truncation at a few points: truncated files are the commonest bad input
    fn(reinterpret_cast<const std::uint8_t*>(buf.data()), buf.size());
    for (std::size_t cut : {buf.size() / 2, buf.size() > 8 ? buf.size() - 1 : 0, std::size_t{9}, std::size_t{24}}) {
      if (cut < buf.size()) fn(reinterpret_cast<const std::uint8_t*>(buf.data()), cut);
    }
  }
  std::printf("replayed %zu %s inputs\n", files.size(), argv[1]);
  return files.empty() ? 1 : 0;
}
