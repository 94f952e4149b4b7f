// The engine's own small safetensors reader (see safetensors_lite.hpp).
#include "safetensors_lite.hpp"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace moex_engine {
namespace {

float bf16_to_f32(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31)
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

}  // namespace

std::string SafetensorsLite::index_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return "cannot open " + path;
  std::error_code ec;
  const std::uint64_t size = std::filesystem::file_size(path, ec);
  if (ec || size < 8) return path + ": too short for a safetensors file";
  unsigned char len8[8];
  f.read(reinterpret_cast<char*>(len8), 8);
  std::uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | len8[i];
  if (hlen > size - 8 || hlen > (std::uint64_t{100} << 20)) return path + ": header length beyond the file";
  std::string header(static_cast<std::size_t>(hlen), '\0');
  f.read(header.data(), static_cast<std::streamsize>(hlen));
  if (!f) return path + ": cannot read the header";
  nlohmann::json j = nlohmann::json::parse(header, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return path + ": header is not a JSON object";
  const std::uint64_t data0 = 8 + hlen;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t.contains("data_offsets") || !t.contains("shape"))
      return path + ": tensor " + it.key() + " lacks dtype, shape or data_offsets";
    Entry e;
    e.file = path;
    e.dtype = t["dtype"].is_string() ? t["dtype"].get<std::string>() : "";
    const auto& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return path + ": tensor " + it.key() + " has bad data_offsets";
    e.begin = data0 + off[0].get<std::uint64_t>();
    e.end = data0 + off[1].get<std::uint64_t>();
    if (e.begin > e.end || e.end > size) return path + ": tensor " + it.key() + " lies beyond the file";
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned()) return path + ": tensor " + it.key() + " has a bad shape";
      e.numel *= d.get<std::uint64_t>();
    }
    tensors_[it.key()] = e;
  }
  return "";
}

std::string SafetensorsLite::open(const std::string& dir) {
  tensors_.clear();
  const std::filesystem::path d(dir);
  const auto index = d / "model.safetensors.index.json";
  if (std::filesystem::exists(index)) {
    std::ifstream f(index);
    std::ostringstream ss;
    ss << f.rdbuf();
    nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return index.string() + ": no weight_map";
    std::set<std::string> files;
    for (const auto& v : j["weight_map"])
      if (v.is_string()) files.insert(v.get<std::string>());
    for (const auto& file : files)
      if (std::string e = index_file((d / file).string()); !e.empty()) return e;
    return "";
  }
  return index_file((d / "model.safetensors").string());
}

std::string SafetensorsLite::load(const std::string& name, std::size_t numel, std::vector<float>& out) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return "tensor " + name + " not found";
  const Entry& e = it->second;
  if (e.numel != numel)
    return "tensor " + name + " has " + std::to_string(e.numel) + " elements, expected " + std::to_string(numel);
  const std::size_t width = e.dtype == "F32" ? 4 : (e.dtype == "BF16" || e.dtype == "F16") ? 2 : 0;
  if (width == 0) return "tensor " + name + ": dtype " + e.dtype + " is not F32, F16 or BF16";
  if (e.end - e.begin != numel * width) return "tensor " + name + ": byte size does not match its shape";
  std::vector<unsigned char> raw(numel * width);
  std::ifstream f(e.file, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(e.begin));
  f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
  if (!f) return "cannot read tensor " + name + " from " + e.file;
  out.resize(numel);
  for (std::size_t i = 0; i < numel; ++i) {
    if (width == 4) {
      std::memcpy(&out[i], &raw[4 * i], 4);
    } else {
      const auto b = static_cast<std::uint16_t>(raw[2 * i] | (raw[2 * i + 1] << 8));
      out[i] = e.dtype == "BF16" ? bf16_to_f32(b) : f16_to_f32(b);
    }
  }
  return "";
}

}  // namespace moex_engine
