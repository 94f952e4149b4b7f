#include "fuzz_targets.hpp"

#include <span>
#include <string_view>
#include <vector>

#include "moex/formats/gguf.hpp"
#include "moex/formats/model_config.hpp"
#include "moex/formats/safetensors.hpp"

namespace moex::fuzz {

namespace {

constexpr std::uint64_t kMaxDecode = 1u << 16;  // decode only small tensors (time, not safety)

void decode_small(const TensorRef& t) {
  const std::uint64_t n = t.numel();
  if (n > kMaxDecode) return;
  std::vector<float> out(static_cast<std::size_t>(n));
  (void)tensor_to_f32(t, out);
}

}  // namespace

int safetensors(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> b(reinterpret_cast<const std::byte*>(data), size);
  auto h = parse_safetensors(b, "fuzz.safetensors");
  if (h) {
    for (const auto& t : h->tensors) decode_small(t);
  }
  return 0;
}

int gguf(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> b(reinterpret_cast<const std::byte*>(data), size);
  auto g = parse_gguf(b, "fuzz.gguf");
  if (g) {
    (void)model_config_from_gguf(*g, "fuzz.gguf");
    for (const auto& [k, v] : g->metadata) {
      (void)v.as_uint();
      (void)v.as_double();
      (void)v.array_strings();
      (void)v.array_number(0);
      (void)v.array_number(v.count ? v.count - 1 : 0);
    }
    for (const auto& t : g->tensors) decode_small(t);
  }
  return 0;
}

int config(const std::uint8_t* data, std::size_t size) {
  (void)parse_model_config(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
  return 0;
}

}  // namespace moex::fuzz
