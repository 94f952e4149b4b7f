// Fixture of moex_capi_block_formats_test: writes small checkpoints into the folder argv[1] with
// the test suites' writers (tests/support/checkpoint_writer.hpp): Mixtral-shaped GGUF files whose
// experts are GGUF Q4_0, Q8_0 and Q4_K blocks (and a dense F16 one), and a DeepSeek-V3 safetensors
// folder with fp8 e4m3 experts, for the C test to open through moex_model_open with and without
// moex_model_params.keep_block_formats.
#include <cstdio>
#include <exception>
#include <filesystem>
#include <stdexcept>

// checkpoint_writer.hpp checks its writes with doctest's REQUIRE; this program has no doctest
// runner, so a failed check throws instead (caught in main).
#define REQUIRE(cond)                                              \
  do {                                                             \
    if (!(cond)) throw std::runtime_error("check failed: " #cond); \
  } while (0)
#include "support/checkpoint_writer.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <folder>\n", argv[0]);
    return 2;
  }
  try {
    const std::filesystem::path dir(argv[1]);
    std::filesystem::create_directories(dir);
    using moex::Architecture;
    using moex::GgmlType;
    namespace t = moex::test;
    // Q4_0 and Q8_0 need rows of whole 32-weight blocks, Q4_K of 256-weight ones.
    (void)t::write_gguf_model(dir / "q4_0.gguf", t::tiny_config(Architecture::kMixtral, 128, 64), GgmlType::kQ4_0);
    (void)t::write_gguf_model(dir / "q8_0.gguf", t::tiny_config(Architecture::kMixtral, 128, 64), GgmlType::kQ8_0);
    (void)t::write_gguf_model(dir / "q4_k.gguf", t::tiny_config(Architecture::kMixtral, 256, 256), GgmlType::kQ4_K);
    (void)t::write_gguf_model(dir / "f16.gguf", t::tiny_config(Architecture::kMixtral, 128, 64), GgmlType::kF16);
    // DeepSeek-V3 safetensors with fp8 e4m3 experts and 128x128 weight_scale_inv (ffn 160: partial
    // scale blocks); layer 0 is dense, so 2 MoE layers.
    moex::ModelConfig fp8 = t::tiny_config(Architecture::kDeepseekV3, 256, 160);
    fp8.fp8_block = 128;
    std::filesystem::create_directories(dir / "fp8");
    (void)t::write_hf_model(dir / "fp8", fp8, false);
    // gpt-oss safetensors with MXFP4 experts: a block format without a moex layout (decoded).
    std::filesystem::create_directories(dir / "mxfp4");
    (void)t::write_hf_model(dir / "mxfp4", t::tiny_config(Architecture::kGptOss), false, true);
    std::printf("wrote q4_0.gguf, q8_0.gguf, q4_k.gguf, f16.gguf, fp8/ and mxfp4/ to %s (seed %llu)\n", argv[1],
                static_cast<unsigned long long>(t::seed()));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "capi_block_fixture: %s\n", e.what());
    return 1;
  }
}
