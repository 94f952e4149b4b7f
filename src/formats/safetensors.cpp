#include "moex/formats/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <set>

#include <nlohmann/json.hpp>

MOEX_NAMESPACE_BEGIN

namespace {

constexpr std::size_t kMaxJsonDepth = 64;
constexpr std::size_t kMaxDims = 16;

/// Deepest bracket nesting of a JSON text outside strings (bounds the parser's recursion).
std::size_t json_depth(std::string_view s) noexcept {
  std::size_t depth = 0, max_depth = 0;
  bool in_str = false, esc = false;
  for (char ch : s) {
    if (in_str) {
      if (esc)
        esc = false;
      else if (ch == '\\')
        esc = true;
      else if (ch == '"')
        in_str = false;
      continue;
    }
    if (ch == '"')
      in_str = true;
    else if (ch == '{' || ch == '[')
      max_depth = std::max(max_depth, ++depth);
    else if ((ch == '}' || ch == ']') && depth > 0)
      --depth;
  }
  return max_depth;
}

Result<SafetensorsHeader> parse_impl(std::span<const std::byte> bytes, std::string_view file) {
  const std::string f(file);
  if (bytes.size() < 8) {
    return corrupt(f + ": truncated safetensors file (" + std::to_string(bytes.size()) +
                   " bytes, the header length alone takes 8)");
  }
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<std::uint64_t>(bytes[static_cast<std::size_t>(i)]);
  if (n > bytes.size() - 8) {
    return corrupt(f + ": header length " + std::to_string(n) + " runs past the end of the file (" +
                   std::to_string(bytes.size()) + " bytes)");
  }
  if (n > kMaxSafetensorsHeader) return corrupt(f + ": header length " + std::to_string(n) + " exceeds 100 MB");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, static_cast<std::size_t>(n));
  if (json_depth(text) > kMaxJsonDepth) return corrupt(f + ": header JSON nested too deeply");

  std::set<std::string, std::less<>> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t cb = [&](int depth, nlohmann::json::parse_event_t ev,
                                                   nlohmann::json& parsed) {
    if (depth == 1 && ev == nlohmann::json::parse_event_t::key && parsed.is_string()) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  const nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(f + ": header is not valid JSON");
  if (!j.is_object()) return corrupt(f + ": header is not a JSON object");
  if (!duplicate.empty()) return corrupt(f + ": duplicate tensor name '" + duplicate + "'");

  SafetensorsHeader h;
  h.data_offset = 8 + n;
  const std::uint64_t data_size = bytes.size() - h.data_offset;
  const std::byte* data = bytes.data() + h.data_offset;
  h.tensors.reserve(j.size());
  for (const auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) return corrupt(f + ": __metadata__ is not an object");
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string()) return corrupt(f + ": __metadata__ value '" + k + "' is not a string");
        h.metadata[k] = mv.get<std::string>();
      }
      continue;
    }
    const std::string where = f + ": tensor '" + name + "'";
    if (!v.is_object()) return corrupt(where + ": entry is not an object");
    const auto dt = v.find("dtype");
    const auto sh = v.find("shape");
    const auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) return corrupt(where + ": missing or non-string dtype");
    if (sh == v.end() || !sh->is_array()) return corrupt(where + ": missing or non-array shape");
    if (off == v.end() || !off->is_array() || off->size() != 2) {
      return corrupt(where + ": data_offsets is not an array of two integers");
    }
    TensorRef t;
    t.name = name;
    t.file = f;
    const auto dtype = parse_safetensors_dtype(dt->get_ref<const std::string&>());
    if (!dtype) return corrupt(where + ": unknown dtype '" + dt->get<std::string>() + "'");
    t.dtype = *dtype;
    if (sh->size() > kMaxDims) return corrupt(where + ": more than 16 dimensions");
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) return corrupt(where + ": shape entries must be non-negative integers");
      t.shape.push_back(d.get<std::uint64_t>());
    }
    for (const auto& o : *off) {
      if (!o.is_number_unsigned()) return corrupt(where + ": data_offsets must be non-negative integers");
    }
    const auto begin = (*off)[0].get<std::uint64_t>();
    const auto end = (*off)[1].get<std::uint64_t>();
    if (begin > end) return corrupt(where + ": data_offsets begin " + std::to_string(begin) + " > end");
    if (end > data_size) {
      return corrupt(where + ": data_offsets end " + std::to_string(end) + " past the data section (" +
                     std::to_string(data_size) + " bytes)");
    }
    auto nbytes = dtype_tensor_bytes(t.dtype, t.shape);
    if (!nbytes) return corrupt(where + ": " + nbytes.status().message());
    if (*nbytes != end - begin) {
      return corrupt(where + ": shape and dtype need " + std::to_string(*nbytes) + " bytes, data_offsets span " +
                     std::to_string(end - begin));
    }
    t.bytes = std::span<const std::byte>(data + begin, static_cast<std::size_t>(end - begin));
    h.tensors.push_back(std::move(t));
  }
  std::sort(h.tensors.begin(), h.tensors.end(), [&](const TensorRef& a, const TensorRef& b) {
    return a.bytes.data() != b.bytes.data() ? a.bytes.data() < b.bytes.data() : a.bytes.size() < b.bytes.size();
  });
  for (std::size_t i = 1; i < h.tensors.size(); ++i) {
    const auto& a = h.tensors[i - 1];
    const auto& b = h.tensors[i];
    if (b.bytes.data() < a.bytes.data() + a.bytes.size()) {
      return corrupt(f + ": tensors '" + a.name + "' and '" + b.name + "' overlap");
    }
  }
  return h;
}

}  // namespace

Result<SafetensorsHeader> parse_safetensors(std::span<const std::byte> file_bytes, std::string_view file) {
  try {
    return parse_impl(file_bytes, file);
  } catch (const std::bad_alloc&) {
    return out_of_memory(std::string(file) + ": out of memory parsing the header");
  } catch (const std::exception& e) {
    return corrupt(std::string(file) + ": " + e.what());
  }
}

MOEX_NAMESPACE_END
