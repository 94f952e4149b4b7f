#include "moex/formats/tensor_ref.hpp"

#include <cmath>
#include <cstring>
#include <limits>

#include "moex/quant/ggml.hpp"
#include "moex/quant/half.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

struct DTypeInfo {
  DType type;
  std::string_view name;
  std::size_t block_size;
  std::size_t block_bytes;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 1, 8},       {DType::kF32, "F32", 1, 4},        {DType::kF16, "F16", 1, 2},
    {DType::kBF16, "BF16", 1, 2},     {DType::kF8E4M3, "F8_E4M3", 1, 1}, {DType::kF8E5M2, "F8_E5M2", 1, 1},
    {DType::kI64, "I64", 1, 8},       {DType::kI32, "I32", 1, 4},        {DType::kI16, "I16", 1, 2},
    {DType::kI8, "I8", 1, 1},         {DType::kU8, "U8", 1, 1},          {DType::kBool, "BOOL", 1, 1},
    {DType::kQ8_0, "Q8_0", 32, 34},   {DType::kQ4_0, "Q4_0", 32, 18},    {DType::kQ4_K, "Q4_K", 256, 144},
    {DType::kQ5_K, "Q5_K", 256, 176}, {DType::kQ6_K, "Q6_K", 256, 210},  {DType::kMxfp4, "MXFP4", 32, 17},
};

const DTypeInfo* info(DType t) noexcept {
  const auto i = static_cast<std::size_t>(t);
  return i < std::size(kDTypes) ? &kDTypes[i] : nullptr;
}

template <class T>
T load(const std::byte* p) noexcept {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One element of an element dtype at byte pointer p.
float element_to_f32(DType t, const std::byte* p) noexcept {
  switch (t) {
    case DType::kF64:
      return static_cast<float>(load<double>(p));
    case DType::kF32:
      return load<float>(p);
    case DType::kF16:
      return f16_to_float(load<std::uint16_t>(p));
    case DType::kBF16:
      return bf16_to_float(load<std::uint16_t>(p));
    case DType::kF8E4M3:
      return fp8_e4m3_to_float(load<std::uint8_t>(p));
    case DType::kF8E5M2:
      return fp8_e5m2_to_float(load<std::uint8_t>(p));
    case DType::kI64:
      return static_cast<float>(load<std::int64_t>(p));
    case DType::kI32:
      return static_cast<float>(load<std::int32_t>(p));
    case DType::kI16:
      return static_cast<float>(load<std::int16_t>(p));
    case DType::kI8:
      return static_cast<float>(load<std::int8_t>(p));
    case DType::kU8:
      return static_cast<float>(load<std::uint8_t>(p));
    case DType::kBool:
      return load<std::uint8_t>(p) != 0 ? 1.f : 0.f;
    default:
      return 0.f;
  }
}

bool mul_ok(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_mul_overflow(a, b, &out);
}

// OpenAI's MXFP4 e2m1 values (gpt-oss safetensors `*_blocks`).
constexpr float kFp4Values[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

}  // namespace

std::string_view to_string(DType t) noexcept {
  const auto* i = info(t);
  return i ? i->name : "?";
}

std::optional<DType> parse_safetensors_dtype(std::string_view name) noexcept {
  for (const auto& i : kDTypes) {
    if (i.block_size == 1 && i.name == name) return i.type;
  }
  return std::nullopt;
}

bool is_block_dtype(DType t) noexcept { return info(t) && info(t)->block_size > 1; }
std::size_t dtype_block_size(DType t) noexcept { return info(t) ? info(t)->block_size : 0; }
std::size_t dtype_block_bytes(DType t) noexcept { return info(t) ? info(t)->block_bytes : 0; }

std::optional<Precision> dtype_precision(DType t) noexcept {
  switch (t) {
    case DType::kF32:
      return Precision::kF32;
    case DType::kF16:
      return Precision::kF16;
    case DType::kBF16:
      return Precision::kBF16;
    case DType::kF8E4M3:
      return Precision::kFp8E4M3;
    case DType::kQ8_0:
      return Precision::kQ8_0;
    case DType::kQ4_0:
      return Precision::kQ4_0;
    case DType::kQ4_K:
      return Precision::kQ4_K;
    case DType::kQ5_K:
      return Precision::kQ5_K;
    case DType::kQ6_K:
      return Precision::kQ6_K;
    case DType::kMxfp4:
      return Precision::kMxfp4;
    default:
      return std::nullopt;
  }
}

Result<std::uint64_t> dtype_tensor_bytes(DType t, std::span<const std::uint64_t> shape) noexcept {
  const auto* i = info(t);
  if (!i) return invalid_argument("unknown dtype");
  std::uint64_t n = 1;
  for (auto d : shape) {
    if (!mul_ok(n, d, n)) return corrupt("tensor element count overflows 64 bits");
  }
  if (i->block_size > 1) {
    const std::uint64_t inner = shape.empty() ? 1 : shape.back();
    if (inner % i->block_size != 0) {
      return corrupt("innermost dimension " + std::to_string(inner) + " is not a multiple of the " +
                     std::string(i->name) + " block size " + std::to_string(i->block_size));
    }
  }
  std::uint64_t bytes = 0;
  if (!mul_ok(n / i->block_size, i->block_bytes, bytes)) return corrupt("tensor byte size overflows 64 bits");
  return bytes;
}

std::uint64_t TensorRef::numel() const noexcept {
  std::uint64_t n = 1;
  for (auto d : shape) {
    if (!mul_ok(n, d, n)) return std::numeric_limits<std::uint64_t>::max();
  }
  return n;
}

Status tensor_to_f32(const TensorRef& ref, std::span<float> out) {
  const auto* ti = info(ref.dtype);
  if (!ti) return invalid_argument(ref.name + ": unknown dtype");
  const std::uint64_t n = ref.numel();
  if (n != out.size()) {
    return invalid_argument(ref.name + ": output holds " + std::to_string(out.size()) + " floats, tensor has " +
                            std::to_string(n));
  }
  if (n == 0) return Status::ok();
  const std::uint64_t cols = ref.shape.empty() ? 1 : ref.shape.back();
  const std::uint64_t rows = n / cols;
  const std::size_t bs = ti->block_size, bb = ti->block_bytes;
  const bool split_mxfp4 = ref.dtype == DType::kMxfp4 && !ref.scales.empty();
  const bool scaled_fp8 = ref.dtype == DType::kF8E4M3 && !ref.scales.empty();
  if (!ref.scales.empty() && !split_mxfp4 && !scaled_fp8) {
    return unsupported(ref.name + ": separate scales are only defined for F8_E4M3 and MXFP4");
  }
  if (ref.col_stride > 1 && (bs > 1 || split_mxfp4 || scaled_fp8)) {
    return unsupported(ref.name + ": column strides need an element dtype without scales");
  }
  if ((ref.row_stride || ref.col_stride) && ref.shape.size() != 2 && !(ref.shape.size() == 1 && ref.row_stride == 0)) {
    return invalid_argument(ref.name + ": strided views must be 2-D (or 1-D with a column stride)");
  }
  const std::uint64_t rs = ref.row_stride ? ref.row_stride : cols;
  const std::uint64_t cs = ref.col_stride ? ref.col_stride : 1;
  if (bs > 1 && (cols % bs != 0 || rs % bs != 0)) {
    return corrupt(ref.name + ": rows are not whole " + std::string(ti->name) + " blocks");
  }
  // Bounds: the last element touched must lie inside bytes.
  const std::size_t data_bs = split_mxfp4 ? 32 : bs;
  const std::size_t data_bb = split_mxfp4 ? 16 : bb;
  std::uint64_t last = 0, tmp = 0;  // element index of the last element (inclusive)
  if (!mul_ok(rows - 1, rs, last) || !mul_ok(cols - 1, cs, tmp) || __builtin_add_overflow(last, tmp, &last)) {
    return corrupt(ref.name + ": view extent overflows");
  }
  const std::uint64_t need = (last / data_bs + 1) * data_bb;
  if (need > ref.bytes.size()) {
    return corrupt(ref.name + " (" + ref.file + "): view needs " + std::to_string(need) + " bytes, has " +
                   std::to_string(ref.bytes.size()));
  }
  const std::byte* base = ref.bytes.data();
  if (scaled_fp8) {
    const std::uint64_t b = ref.scale_block ? ref.scale_block : 128;
    const std::uint64_t sr = (rows + b - 1) / b, sc = (cols + b - 1) / b;
    if (ref.scales.size() < sr * sc * 4) {
      return corrupt(ref.name + ": weight_scale_inv holds " + std::to_string(ref.scales.size() / 4) +
                     " scales, needs " + std::to_string(sr * sc));
    }
    for (std::uint64_t r = 0; r < rows; ++r) {
      for (std::uint64_t c = 0; c < cols; ++c) {
        const float s = load<float>(ref.scales.data() + ((r / b) * sc + c / b) * 4);
        out[r * cols + c] = fp8_e4m3_to_float(load<std::uint8_t>(base + r * rs + c * cs)) * s;
      }
    }
    return Status::ok();
  }
  if (split_mxfp4) {
    if (ref.scales.size() < last / 32 + 1) return corrupt(ref.name + ": MXFP4 scales too short");
    for (std::uint64_t r = 0; r < rows; ++r) {
      for (std::uint64_t c = 0; c < cols; c += 32) {
        const std::uint64_t blk = (r * rs + c) / 32;
        const int e = static_cast<int>(load<std::uint8_t>(ref.scales.data() + blk)) - 127;
        const std::byte* q = base + blk * 16;
        float* y = &out[r * cols + c];
        for (std::size_t j = 0; j < 16; ++j) {
          const auto v = load<std::uint8_t>(q + j);
          y[2 * j] = std::ldexp(kFp4Values[v & 0xF], e);
          y[2 * j + 1] = std::ldexp(kFp4Values[v >> 4], e);
        }
      }
    }
    return Status::ok();
  }
  if (bs > 1) {
    const auto p = dtype_precision(ref.dtype);
    if (!p) return internal_error("block dtype without precision");
    for (std::uint64_t r = 0; r < rows; ++r) {
      decode_block_row(*p, base + (r * rs / bs) * bb, cols, &out[r * cols]);
    }
    return Status::ok();
  }
  for (std::uint64_t r = 0; r < rows; ++r) {
    for (std::uint64_t c = 0; c < cols; ++c) {
      out[r * cols + c] = element_to_f32(ref.dtype, base + (r * rs + c * cs) * bb);
    }
  }
  return Status::ok();
}

MOEX_NAMESPACE_END
