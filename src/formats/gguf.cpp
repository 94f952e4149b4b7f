#include "moex/formats/gguf.hpp"

#include <algorithm>
#include <cstring>
#include <set>

MOEX_NAMESPACE_BEGIN

namespace {

constexpr std::uint64_t kMaxNameBytes = 256;
constexpr int kMaxArrayDepth = 4;

/// A bounds-checked little-endian reader over the file.
class Reader {
 public:
  Reader(std::span<const std::byte> b, std::string file) : b_(b), file_(std::move(file)) {}

  std::uint64_t pos() const noexcept { return pos_; }
  std::uint64_t remaining() const noexcept { return b_.size() - pos_; }

  Status need(std::uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return corrupt(file_ + ": truncated at byte " + std::to_string(pos_) + " reading " + std::string(what) +
                     " (needs " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left)");
    }
    return Status::ok();
  }
  template <class T>
  Status read(T& v, std::string_view what) {
    MOEX_RETURN_IF_ERROR(need(sizeof(T), what));
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::ok();
  }
  Status read_string(std::string& s, std::uint64_t max_len, std::string_view what) {
    std::uint64_t n = 0;
    MOEX_RETURN_IF_ERROR(read(n, what));
    if (n > max_len) {
      return corrupt(file_ + ": " + std::string(what) + " of " + std::to_string(n) + " bytes exceeds the limit of " +
                     std::to_string(max_len));
    }
    MOEX_RETURN_IF_ERROR(need(n, what));
    s.assign(reinterpret_cast<const char*>(b_.data() + pos_), static_cast<std::size_t>(n));
    pos_ += n;
    return Status::ok();
  }
  Status skip(std::uint64_t n, std::string_view what) {
    MOEX_RETURN_IF_ERROR(need(n, what));
    pos_ += n;
    return Status::ok();
  }
  std::span<const std::byte> span(std::uint64_t from, std::uint64_t to) const noexcept {
    return b_.subspan(static_cast<std::size_t>(from), static_cast<std::size_t>(to - from));
  }
  const std::string& file() const noexcept { return file_; }

 private:
  std::span<const std::byte> b_;
  std::uint64_t pos_ = 0;
  std::string file_;
};

std::uint64_t scalar_size(GgufType t) noexcept {
  switch (t) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kBool:
      return 1;
    case GgufType::kU16:
    case GgufType::kI16:
      return 2;
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kF32:
      return 4;
    case GgufType::kU64:
    case GgufType::kI64:
    case GgufType::kF64:
      return 8;
    default:
      return 0;
  }
}

Status read_value(Reader& r, GgufType type, GgufValue& out, const std::string& key, int depth);

Status skip_array_elems(Reader& r, GgufType et, std::uint64_t count, const std::string& key, int depth) {
  const std::uint64_t es = scalar_size(et);
  if (es) {
    if (count > r.remaining() / es)
      return corrupt(r.file() + ": metadata '" + key + "': array count " + std::to_string(count) +
                     " runs past the end of the file");
    return r.skip(count * es, key);
  }
  if (et == GgufType::kString) {
    if (count > r.remaining() / 8)
      return corrupt(r.file() + ": metadata '" + key + "': array count " + std::to_string(count) +
                     " runs past the end of the file");
    for (std::uint64_t i = 0; i < count; ++i) {
      std::uint64_t n = 0;
      MOEX_RETURN_IF_ERROR(r.read(n, key));
      if (n > kGgufMaxStringBytes) return corrupt(r.file() + ": metadata '" + key + "': string too long");
      MOEX_RETURN_IF_ERROR(r.skip(n, key));
    }
    return Status::ok();
  }
  if (et == GgufType::kArray) {
    if (depth >= kMaxArrayDepth) return corrupt(r.file() + ": metadata '" + key + "': arrays nested too deeply");
    if (count > r.remaining() / 12)
      return corrupt(r.file() + ": metadata '" + key + "': array count " + std::to_string(count) +
                     " runs past the end of the file");
    for (std::uint64_t i = 0; i < count; ++i) {
      GgufValue tmp;
      MOEX_RETURN_IF_ERROR(read_value(r, GgufType::kArray, tmp, key, depth + 1));
    }
    return Status::ok();
  }
  return corrupt(r.file() + ": metadata '" + key + "': unknown array element type " +
                 std::to_string(static_cast<std::uint32_t>(et)));
}

Status read_value(Reader& r, GgufType type, GgufValue& out, const std::string& key, int depth) {
  out.type = type;
  switch (type) {
    case GgufType::kU8: {
      std::uint8_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::uint64_t{v};
      return Status::ok();
    }
    case GgufType::kU16: {
      std::uint16_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::uint64_t{v};
      return Status::ok();
    }
    case GgufType::kU32: {
      std::uint32_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::uint64_t{v};
      return Status::ok();
    }
    case GgufType::kU64: {
      std::uint64_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = v;
      return Status::ok();
    }
    case GgufType::kI8: {
      std::int8_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::int64_t{v};
      return Status::ok();
    }
    case GgufType::kI16: {
      std::int16_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::int64_t{v};
      return Status::ok();
    }
    case GgufType::kI32: {
      std::int32_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = std::int64_t{v};
      return Status::ok();
    }
    case GgufType::kI64: {
      std::int64_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = v;
      return Status::ok();
    }
    case GgufType::kF32: {
      float v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = double{v};
      return Status::ok();
    }
    case GgufType::kF64: {
      double v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      out.scalar = v;
      return Status::ok();
    }
    case GgufType::kBool: {
      std::uint8_t v;
      MOEX_RETURN_IF_ERROR(r.read(v, key));
      if (v > 1) return corrupt(r.file() + ": metadata '" + key + "': bool value " + std::to_string(v));
      out.scalar = v != 0;
      return Status::ok();
    }
    case GgufType::kString: {
      std::string s;
      MOEX_RETURN_IF_ERROR(r.read_string(s, kGgufMaxStringBytes, key));
      out.scalar = std::move(s);
      return Status::ok();
    }
    case GgufType::kArray: {
      std::uint32_t et = 0;
      MOEX_RETURN_IF_ERROR(r.read(et, key));
      MOEX_RETURN_IF_ERROR(r.read(out.count, key));
      if (out.count > kGgufMaxArrayElems) {
        return corrupt(r.file() + ": metadata '" + key + "': array of " + std::to_string(out.count) +
                       " elements exceeds the limit");
      }
      out.elem_type = static_cast<GgufType>(et);
      const std::uint64_t from = r.pos();
      MOEX_RETURN_IF_ERROR(skip_array_elems(r, out.elem_type, out.count, key, depth));
      out.raw = r.span(from, r.pos());
      return Status::ok();
    }
  }
  return corrupt(r.file() + ": metadata '" + key + "': unknown value type " +
                 std::to_string(static_cast<std::uint32_t>(type)));
}

Result<GgufFile> parse_impl(std::span<const std::byte> bytes, std::string_view file) {
  Reader r(bytes, std::string(file));
  const std::string f(file);
  std::uint32_t magic = 0;
  MOEX_RETURN_IF_ERROR(r.read(magic, "the magic"));
  if (magic != 0x46554747u) return corrupt(f + ": not a GGUF file (bad magic)");
  GgufFile g;
  MOEX_RETURN_IF_ERROR(r.read(g.version, "the version"));
  if (g.version != 2 && g.version != 3) {
    return unsupported(f + ": GGUF version " + std::to_string(g.version) + " (moex reads versions 2 and 3)");
  }
  std::uint64_t n_tensors = 0, n_kv = 0;
  MOEX_RETURN_IF_ERROR(r.read(n_tensors, "the tensor count"));
  MOEX_RETURN_IF_ERROR(r.read(n_kv, "the metadata count"));
  if (n_kv > r.remaining() / 13)
    return corrupt(f + ": metadata count " + std::to_string(n_kv) + " exceeds what the file can hold");
  if (n_tensors > r.remaining() / 24)
    return corrupt(f + ": tensor count " + std::to_string(n_tensors) + " exceeds what the file can hold");
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    std::string key;
    MOEX_RETURN_IF_ERROR(r.read_string(key, kMaxNameBytes * 4, "a metadata key"));
    std::uint32_t type = 0;
    MOEX_RETURN_IF_ERROR(r.read(type, key));
    GgufValue v;
    MOEX_RETURN_IF_ERROR(read_value(r, static_cast<GgufType>(type), v, key, 0));
    if (!g.metadata.emplace(key, std::move(v)).second) return corrupt(f + ": duplicate metadata key '" + key + "'");
  }
  if (const auto* a = g.find("general.alignment")) {
    const auto al = a->as_uint();
    if (!al || *al == 0 || (*al & (*al - 1)) != 0 || *al > (1u << 20)) {
      return corrupt(f + ": general.alignment is not a power of two up to 1 MiB");
    }
    g.alignment = *al;
  }
  struct Info {
    std::uint64_t offset;
    std::uint64_t nbytes;
  };
  std::vector<Info> infos;
  std::set<std::string, std::less<>> names;
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    TensorRef t;
    MOEX_RETURN_IF_ERROR(r.read_string(t.name, kMaxNameBytes, "a tensor name"));
    const std::string where = f + ": tensor '" + t.name + "'";
    if (!names.insert(t.name).second) return corrupt(where + ": duplicate tensor name");
    std::uint32_t n_dims = 0;
    MOEX_RETURN_IF_ERROR(r.read(n_dims, t.name));
    if (n_dims == 0 || n_dims > kGgufMaxDims)
      return corrupt(where + ": " + std::to_string(n_dims) + " dimensions (1 to 4 allowed)");
    std::uint64_t ne[kGgufMaxDims] = {};
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      MOEX_RETURN_IF_ERROR(r.read(ne[d], t.name));
      if (ne[d] > (std::uint64_t{1} << 62))
        return corrupt(where + ": dimension " + std::to_string(ne[d]) + " is absurd");
    }
    for (std::uint32_t d = n_dims; d-- > 0;) t.shape.push_back(ne[d]);
    std::uint32_t type = 0;
    MOEX_RETURN_IF_ERROR(r.read(type, t.name));
    const auto dt = dtype_from_ggml(type);
    if (!dt) return unsupported(where + ": ggml type " + std::to_string(type) + " is not supported");
    t.dtype = *dt;
    std::uint64_t off = 0;
    MOEX_RETURN_IF_ERROR(r.read(off, t.name));
    if (off % g.alignment != 0) return corrupt(where + ": offset " + std::to_string(off) + " is not aligned");
    auto nb = dtype_tensor_bytes(t.dtype, t.shape);
    if (!nb) return corrupt(where + ": " + nb.status().message());
    t.file = f;
    infos.push_back({off, *nb});
    g.tensors.push_back(std::move(t));
  }
  const std::uint64_t pos = r.pos();
  g.data_offset = (pos + g.alignment - 1) / g.alignment * g.alignment;
  if (g.data_offset > bytes.size()) {
    if (!g.tensors.empty()) return corrupt(f + ": truncated before the tensor data");
    g.data_offset = bytes.size();
  }
  const std::uint64_t data_size = bytes.size() - g.data_offset;
  for (std::size_t i = 0; i < g.tensors.size(); ++i) {
    auto& t = g.tensors[i];
    if (infos[i].offset > data_size || infos[i].nbytes > data_size - infos[i].offset) {
      return corrupt(f + ": tensor '" + t.name + "': data [" + std::to_string(infos[i].offset) + ", +" +
                     std::to_string(infos[i].nbytes) + ") runs past the end of the file");
    }
    t.bytes = bytes.subspan(static_cast<std::size_t>(g.data_offset + infos[i].offset),
                            static_cast<std::size_t>(infos[i].nbytes));
  }
  std::vector<std::size_t> order(g.tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return infos[a].offset < infos[b].offset; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    const auto& a = infos[order[i - 1]];
    if (infos[order[i]].offset < a.offset + a.nbytes) {
      return corrupt(f + ": tensors '" + g.tensors[order[i - 1]].name + "' and '" + g.tensors[order[i]].name +
                     "' overlap");
    }
  }
  return g;
}

}  // namespace

std::optional<DType> dtype_from_ggml(std::uint32_t t) noexcept {
  switch (static_cast<GgmlType>(t)) {
    case GgmlType::kF32:
      return DType::kF32;
    case GgmlType::kF16:
      return DType::kF16;
    case GgmlType::kBF16:
      return DType::kBF16;
    case GgmlType::kF64:
      return DType::kF64;
    case GgmlType::kI8:
      return DType::kI8;
    case GgmlType::kI16:
      return DType::kI16;
    case GgmlType::kI32:
      return DType::kI32;
    case GgmlType::kI64:
      return DType::kI64;
    case GgmlType::kQ8_0:
      return DType::kQ8_0;
    case GgmlType::kQ4_0:
      return DType::kQ4_0;
    case GgmlType::kQ4_K:
      return DType::kQ4_K;
    case GgmlType::kQ5_K:
      return DType::kQ5_K;
    case GgmlType::kQ6_K:
      return DType::kQ6_K;
    case GgmlType::kMxfp4:
      return DType::kMxfp4;
  }
  return std::nullopt;
}

std::optional<GgmlType> ggml_from_dtype(DType t) noexcept {
  for (std::uint32_t i = 0; i < 40; ++i) {
    const auto d = dtype_from_ggml(i);
    if (d && *d == t) return static_cast<GgmlType>(i);
  }
  return std::nullopt;
}

std::optional<std::uint64_t> GgufValue::as_uint() const noexcept {
  if (const auto* u = std::get_if<std::uint64_t>(&scalar); u && type != GgufType::kArray) return *u;
  if (const auto* i = std::get_if<std::int64_t>(&scalar); i && *i >= 0 && type != GgufType::kArray)
    return static_cast<std::uint64_t>(*i);
  if (const auto* b = std::get_if<bool>(&scalar); b && type == GgufType::kBool) return *b ? 1 : 0;
  return std::nullopt;
}

std::optional<double> GgufValue::as_double() const noexcept {
  if (type == GgufType::kArray || type == GgufType::kString) return std::nullopt;
  if (const auto* u = std::get_if<std::uint64_t>(&scalar)) return static_cast<double>(*u);
  if (const auto* i = std::get_if<std::int64_t>(&scalar)) return static_cast<double>(*i);
  if (const auto* d = std::get_if<double>(&scalar)) return *d;
  if (const auto* b = std::get_if<bool>(&scalar)) return *b ? 1.0 : 0.0;
  return std::nullopt;
}

const std::string* GgufValue::as_string() const noexcept {
  return type == GgufType::kString ? std::get_if<std::string>(&scalar) : nullptr;
}

std::optional<double> GgufValue::array_number(std::uint64_t i) const noexcept {
  const std::uint64_t es = scalar_size(elem_type);
  if (type != GgufType::kArray || es == 0 || i >= count || (i + 1) * es > raw.size()) return std::nullopt;
  const std::byte* p = raw.data() + i * es;
  auto ld = [p](auto v) {
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  switch (elem_type) {
    case GgufType::kU8:
      return ld(std::uint8_t{});
    case GgufType::kI8:
      return ld(std::int8_t{});
    case GgufType::kBool:
      return ld(std::uint8_t{}) ? 1.0 : 0.0;
    case GgufType::kU16:
      return ld(std::uint16_t{});
    case GgufType::kI16:
      return ld(std::int16_t{});
    case GgufType::kU32:
      return ld(std::uint32_t{});
    case GgufType::kI32:
      return ld(std::int32_t{});
    case GgufType::kF32:
      return ld(float{});
    case GgufType::kU64:
      return static_cast<double>(ld(std::uint64_t{}));
    case GgufType::kI64:
      return static_cast<double>(ld(std::int64_t{}));
    case GgufType::kF64:
      return ld(double{});
    default:
      return std::nullopt;
  }
}

std::vector<std::string> GgufValue::array_strings() const {
  std::vector<std::string> out;
  if (type != GgufType::kArray || elem_type != GgufType::kString) return out;
  Reader r(raw, "");
  for (std::uint64_t i = 0; i < count; ++i) {
    std::string s;
    if (!r.read_string(s, kGgufMaxStringBytes, "string").is_ok()) break;
    out.push_back(std::move(s));
  }
  return out;
}

const GgufValue* GgufFile::find(std::string_view key) const noexcept {
  const auto it = metadata.find(key);
  return it == metadata.end() ? nullptr : &it->second;
}

Result<GgufFile> parse_gguf(std::span<const std::byte> file_bytes, std::string_view file) {
  try {
    return parse_impl(file_bytes, file);
  } catch (const std::bad_alloc&) {
    return out_of_memory(std::string(file) + ": out of memory parsing GGUF");
  } catch (const std::exception& e) {
    return corrupt(std::string(file) + ": " + e.what());
  }
}

MOEX_NAMESPACE_END
