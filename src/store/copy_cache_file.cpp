#include "moex/store/copy_cache_file.hpp"

#include <cstring>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

MOEX_NAMESPACE_BEGIN

namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'X', 'L', 'P', 'C', '\0'};
constexpr std::uint32_t kVersion = 1;
constexpr std::size_t kHeaderBytes = 4096;

struct Header {
  char magic[8];
  std::uint32_t version;
  std::uint32_t reserved0;
  std::uint64_t fingerprint;
  std::uint32_t n_layers, n_experts, hidden, ffn;
  std::uint8_t precision, scheme;
  std::uint16_t group_size;
  std::uint32_t reserved1;
  std::uint64_t expert_bytes, blob_bytes, checksum;
};
static_assert(sizeof(Header) <= kHeaderBytes);

Header expected(const ExpertStore& s, WeightFormat f, std::uint64_t fingerprint) {
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kVersion;
  h.fingerprint = fingerprint;
  h.n_layers = s.spec().n_layers;
  h.n_experts = s.spec().n_experts;
  h.hidden = s.spec().shape.hidden;
  h.ffn = s.spec().shape.ffn;
  h.precision = static_cast<std::uint8_t>(f.precision);
  h.scheme = static_cast<std::uint8_t>(f.scheme);
  h.group_size = f.group_size;
  h.expert_bytes = expert_bytes(s.spec().shape, f);
  h.blob_bytes = h.expert_bytes * h.n_layers * h.n_experts;
  return h;
}

}  // namespace

std::uint64_t checksum64(std::span<const std::byte> bytes) noexcept {
  // Four independent lanes keep the multiplier pipeline busy (several GB/s on one core).
  std::uint64_t h[4] = {0x9E3779B97F4A7C15ull, 0xC2B2AE3D27D4EB4Full, 0x165667B19E3779F9ull, 0x27D4EB2F165667C5ull};
  const std::size_t words = bytes.size() / 8;
  std::size_t i = 0;
  for (; i + 4 <= words; i += 4)
    for (int l = 0; l < 4; ++l) {
      std::uint64_t w;
      std::memcpy(&w, bytes.data() + (i + static_cast<std::size_t>(l)) * 8, 8);
      h[l] = (h[l] ^ (w * 0xBF58476D1CE4E5B9ull)) * 0x94D049BB133111EBull;
      h[l] ^= h[l] >> 31;
    }
  std::uint64_t r = h[0] ^ (h[1] * 3) ^ (h[2] * 5) ^ (h[3] * 7) ^ bytes.size();
  for (std::size_t b = i * 8; b < bytes.size(); ++b) r = (r ^ static_cast<std::uint8_t>(bytes[b])) * 0x100000001B3ull;
  r ^= r >> 33;
  r *= 0xff51afd7ed558ccdull;
  return r ^ (r >> 33);
}

Status write_copy_cache(const ExpertStore& store, WeightFormat format, std::uint64_t fingerprint,
                        const std::filesystem::path& path) {
  const auto blob = store.copy_blob(format.precision);
  if (blob.empty())
    return not_found("write_copy_cache: the store holds no built " + std::string(to_string(format.precision)) +
                     " copy");
  if (!(store.format(format.precision) == format))
    return invalid_argument("write_copy_cache: the copy's format differs");
  Header h = expected(store, format, fingerprint);
  if (h.blob_bytes != blob.size()) return internal_error("write_copy_cache: blob size mismatch");
  h.checksum = checksum64(blob);
  std::vector<char> header(kHeaderBytes, 0);
  std::memcpy(header.data(), &h, sizeof h);
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return io_error("cannot write " + tmp);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(blob.data()), static_cast<std::streamsize>(blob.size()));
    if (!out) {
      out.close();
      std::filesystem::remove(tmp, ec);
      return io_error("short write to " + tmp);
    }
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    return io_error("cannot rename " + tmp + " into place");
  }
  return Status::ok();
}

Status read_copy_cache(ExpertStore& store, WeightFormat format, std::uint64_t fingerprint,
                       const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return not_found(path.string() + ": no cache file");
  const Header want = expected(store, format, fingerprint);
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) return io_error(path.string() + ": " + ec.message());
  if (size != kHeaderBytes + want.blob_bytes)
    return corrupt(path.string() + ": size " + std::to_string(size) + " does not match this model and format");
  std::ifstream in(path, std::ios::binary);
  if (!in) return io_error("cannot read " + path.string());
  Header h{};
  in.read(reinterpret_cast<char*>(&h), sizeof h);
  if (!in) return corrupt(path.string() + ": truncated header");
  if (std::memcmp(h.magic, kMagic, 8) != 0) return corrupt(path.string() + ": not a moex copy cache");
  if (h.version != kVersion) return corrupt(path.string() + ": cache version " + std::to_string(h.version));
  if (h.fingerprint != want.fingerprint) return corrupt(path.string() + ": stale (the model changed)");
  if (h.n_layers != want.n_layers || h.n_experts != want.n_experts || h.hidden != want.hidden || h.ffn != want.ffn ||
      h.precision != want.precision || h.scheme != want.scheme || h.group_size != want.group_size ||
      h.expert_bytes != want.expert_bytes || h.blob_bytes != want.blob_bytes)
    return corrupt(path.string() + ": shape or format differs");
  std::vector<std::byte> blob;
  try {
    blob.resize(want.blob_bytes);
  } catch (...) {
    return out_of_memory("read_copy_cache: " + std::to_string(want.blob_bytes) + " bytes");
  }
  in.seekg(static_cast<std::streamoff>(kHeaderBytes));
  in.read(reinterpret_cast<char*>(blob.data()), static_cast<std::streamsize>(blob.size()));
  if (!in) return corrupt(path.string() + ": truncated");
  if (checksum64(blob) != h.checksum) return corrupt(path.string() + ": checksum mismatch");
  return store.adopt_copy(format, std::move(blob));
}

MOEX_NAMESPACE_END
