// libFuzzer entry point; MOEX_FUZZ_ENTRY names the target in fuzz_targets.hpp.
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return moex::fuzz::MOEX_FUZZ_ENTRY(data, size);
}
