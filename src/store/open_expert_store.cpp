#include "moex/store/open_expert_store.hpp"

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "moex/store/copy_cache_file.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

std::optional<Precision> dense_float_precision(const TensorRef& t) {
  if (!t.is_dense()) return std::nullopt;
  switch (t.dtype) {
    case DType::kF32:
      return Precision::kF32;
    case DType::kF16:
      return Precision::kF16;
    case DType::kBF16:
      return Precision::kBF16;
    default:
      return std::nullopt;
  }
}

bool shape_is(const TensorRef& t, std::uint64_t rows, std::uint64_t cols) {
  return t.shape.size() == 2 && t.shape[0] == rows && t.shape[1] == cols;
}

// The block precision of a tensor that keep_block_formats can hold as it is: GGUF Q8_0/Q4_0/Q4_K
// rows, or fp8 e4m3 with 128x128 block scales; nullopt otherwise.
std::optional<Precision> native_block_precision(const TensorRef& t) {
  const auto p = dtype_precision(t.dtype);
  if (!p || block_geometry(*p).weights == 0) return std::nullopt;
  if (*p == Precision::kFp8E4M3) return t.scales.empty() || t.scale_block != kFp8ScaleBlockSize ? std::nullopt : p;
  return t.scales.empty() ? p : std::nullopt;
}

// Copies one matrix of a block-format checkpoint into `dst` laid out as `l` (layout.hpp): the
// rows' blocks, then for fp8 the f32 block scales. Errors name the tensor.
Status copy_block_matrix(const TensorRef& t, const MatrixLayout& l, std::byte* dst) {
  const std::string at = t.file + ": tensor " + t.name;
  if (native_block_precision(t) != l.format.precision)
    return corrupt(at + " is " + std::string(to_string(t.dtype)) + (t.scales.empty() ? "" : " with scales") +
                   ", the first expert's is " + std::string(to_string(l.format.precision)) +
                   ": keep_block_formats needs every expert in one block format");
  if (!shape_is(t, l.rows, l.cols))
    return corrupt(at + " has shape other than [" + std::to_string(l.rows) + ", " + std::to_string(l.cols) + "]");
  if ((t.row_stride != 0 && t.row_stride != l.cols) || (t.col_stride != 0 && t.col_stride != 1))
    return unsupported(at + " is a strided view: keep_block_formats needs whole rows back to back");
  if (t.bytes.size() < l.codes_bytes)
    return corrupt(at + " holds " + std::to_string(t.bytes.size()) + " bytes, its blocks need " +
                   std::to_string(l.codes_bytes));
  std::copy_n(t.bytes.data(), l.codes_bytes, dst);
  if (l.format.precision == Precision::kFp8E4M3) {
    const std::size_t n = (l.rows + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize *
                          ((l.cols + kFp8ScaleBlockSize - 1) / kFp8ScaleBlockSize);
    if (t.scales.size() < n * sizeof(float))
      return corrupt(at + ": weight_scale_inv holds " + std::to_string(t.scales.size() / sizeof(float)) +
                     " scales, needs " + std::to_string(n));
    std::copy_n(t.scales.data(), n * sizeof(float), dst + l.scales_offset);
  }
  return Status::ok();
}

Status decode(const TensorRef& t, std::uint64_t rows, std::uint64_t cols, std::vector<float>& out) {
  if (t.numel() != rows * cols)
    return corrupt(t.file + ": tensor " + t.name + " has " + std::to_string(t.numel()) + " elements, expected " +
                   std::to_string(rows * cols));
  out.resize(rows * cols);
  return tensor_to_f32(t, out);
}

// Identifies the checkpoint's contents cheaply: each file's name, size, modification time and first
// 64 KiB, and the MoE shape; and a block-format master's precision (copies built from it differ in
// rounding from copies built from a decoded master; other masters keep their old fingerprints).
std::uint64_t fingerprint(const Checkpoint& ck, const MoeModelSpec& spec, WeightFormat master) {
  std::vector<std::byte> acc;
  auto put = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    acc.insert(acc.end(), b, b + n);
  };
  put(&spec.n_layers, 4);
  put(&spec.n_experts, 4);
  put(&spec.shape, sizeof spec.shape);
  if (is_block_format(master.precision)) put(&master.precision, sizeof master.precision);
  for (const auto& f : ck.files()) {
    std::error_code ec;
    const std::string name = f.filename().string();
    put(name.data(), name.size());
    const auto size = std::filesystem::file_size(f, ec);
    put(&size, sizeof size);
    const auto mtime = std::filesystem::last_write_time(f, ec).time_since_epoch().count();
    put(&mtime, sizeof mtime);
    std::ifstream in(f, std::ios::binary);
    std::vector<char> head(65536);
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    put(head.data(), static_cast<std::size_t>(std::max<std::streamsize>(0, in.gcount())));
  }
  return checksum64(acc);
}

std::filesystem::path cache_path(const Checkpoint& ck, const StoreOptions& o, WeightFormat f) {
  const auto files = ck.files();
  const std::filesystem::path first = files.empty() ? std::filesystem::path("model") : files.front();
  const std::filesystem::path dir = o.cache_dir.empty() ? first.parent_path() / ".moex-cache" : o.cache_dir;
  return dir /
         (first.stem().string() + "-" + std::string(to_string(f.precision)) +
          (f.scheme == QuantScheme::kAsymmetric ? "-asym" : "-sym") + "-g" + std::to_string(f.group_size) + ".bin");
}

// What the MoE block of this checkpoint computes beyond Mixtral's (docs/formats.md).
MoeBlockSpec block_spec(const Checkpoint& ck, const ExpertTensors& first) {
  const ModelConfig& cfg = ck.config();
  MoeBlockSpec b;
  if (cfg.arch == Architecture::kGptOss) {
    b.activation = FfnActivation::kClampedSwiGlu;
    b.activation_alpha = 1.702f;
    b.activation_limit = cfg.swiglu_limit;
  }
  b.expert_biases = first.b1.has_value() || first.b3.has_value() || first.b2.has_value();
  if (cfg.n_shared_experts > 0 && cfg.shared_ffn > 0) {
    b.shared_ffn = cfg.shared_ffn;
    b.shared_gate = cfg.arch == Architecture::kQwen2Moe;
  }
  return b;
}

// Decodes an optional bias of `n` values (zeros when absent).
Status bias_values(const std::optional<TensorRef>& t, std::size_t n, std::vector<float>& out) {
  out.assign(n, 0.f);
  if (!t) return Status::ok();
  if (t->numel() != n)
    return corrupt(t->file + ": bias " + t->name + " has " + std::to_string(t->numel()) + " values, expected " +
                   std::to_string(n));
  return tensor_to_f32(*t, out);
}

// The store format that holds a shared expert's tensors exactly: their own dense float dtype when
// all three share one, else f32 (quantized shared experts are decoded).
WeightFormat shared_format(const ExpertTensors& x) {
  const auto p = dense_float_precision(x.w1);
  if (p && dense_float_precision(x.w3) == p && dense_float_precision(x.w2) == p) return float_format(*p);
  return float_format(Precision::kF32);
}

// Sets the biases of expert `key` from its tensors (the store's spec asks for expert biases).
Status read_expert_biases(const ExpertTensors& x, ExpertKey key, ExpertStore& store) {
  const std::uint64_t h = store.spec().shape.hidden, f = store.spec().shape.ffn;
  std::vector<float> b1, b3, b2;
  MOEX_RETURN_IF_ERROR(bias_values(x.b1, f, b1));
  MOEX_RETURN_IF_ERROR(bias_values(x.b3, f, b3));
  MOEX_RETURN_IF_ERROR(bias_values(x.b2, h, b2));
  return store.set_expert_biases(key, b1, b3, b2);
}

// Reads the shared expert of MoE layer `l` (stored as `sl`) and its gate, as the store's spec asks.
Status read_block_extras(const Checkpoint& ck, std::uint32_t l, std::uint32_t sl, ExpertStore& store) {
  const MoeModelSpec& spec = store.spec();
  const std::uint64_t h = spec.shape.hidden;
  if (spec.block.shared_ffn) {
    auto sh = ck.shared_expert(l);
    if (!sh) return sh.status();
    const std::uint64_t s = spec.block.shared_ffn;
    std::vector<float> w1, w3, w2;
    MOEX_RETURN_IF_ERROR(decode(sh->w1, s, h, w1));
    MOEX_RETURN_IF_ERROR(decode(sh->w3, s, h, w3));
    MOEX_RETURN_IF_ERROR(decode(sh->w2, h, s, w2));
    MOEX_RETURN_IF_ERROR(store.set_shared_expert(sl, w1.data(), w3.data(), w2.data(), shared_format(*sh)));
  }
  if (spec.block.shared_gate) {
    auto g = ck.shared_expert_gate(l);
    if (!g) return g.status();
    std::vector<float> gate;
    MOEX_RETURN_IF_ERROR(decode(*g, 1, h, gate));
    MOEX_RETURN_IF_ERROR(store.set_shared_gate(sl, gate));
  }
  return Status::ok();
}

}  // namespace

Result<OpenedModel> open_expert_store(const std::filesystem::path& path, const StoreOptions& options) {
  auto ck = Checkpoint::open(path, options.progress);
  if (!ck) return ck.status();
  return open_expert_store(std::shared_ptr<const Checkpoint>(std::move(*ck)), options);
}

Result<OpenedModel> open_expert_store(std::shared_ptr<const Checkpoint> ck, const StoreOptions& options) {
  if (!ck) return invalid_argument("open_expert_store: null checkpoint");
  const ModelConfig& cfg = ck->config();
  OpenedModel m;
  for (std::uint32_t l = 0; l < cfg.n_layers; ++l)
    if (cfg.is_moe_layer(l)) m.moe_layers.push_back(l);
  if (m.moe_layers.empty()) return invalid_argument("open_expert_store: the model has no MoE layers");
  // In place when the first expert is a dense float tensor of the right shape.
  auto first = ck->expert(m.moe_layers[0], 0);
  if (!first) return first.status();
  MoeModelSpec spec{static_cast<std::uint32_t>(m.moe_layers.size()),
                    cfg.n_experts,
                    {cfg.hidden, cfg.expert_ffn},
                    cfg.router_config(),
                    block_spec(*ck, *first)};
  MOEX_RETURN_IF_ERROR(validate(spec));
  const auto pf = dense_float_precision(first->w1);
  const bool in_place = options.in_place && pf.has_value();
  // Native block format: the first expert's precision, when the layout can hold this shape.
  std::optional<Precision> native;
  if (options.keep_block_formats && !pf) {
    native = native_block_precision(first->w1);
    if (native && !expert_format_is_valid(spec.shape, float_format(*native))) {
      m.notes.push_back(std::string(to_string(*native)) + " experts of hidden " + std::to_string(cfg.hidden) +
                        " and ffn " + std::to_string(cfg.expert_ffn) + " have no moex layout: decoded");
      native.reset();
    } else if (!native) {
      const TensorRef& t = first->w1;
      m.notes.push_back("keep_block_formats: experts are " + std::string(to_string(t.dtype)) +
                        (t.scales.empty() ? "" : " with " + std::to_string(t.scale_block) + "-wide block scales") +
                        ", which has no moex layout: decoded");
    }
  }
  const WeightFormat master = in_place ? float_format(*pf) : native ? float_format(*native) : options.master_format;
  auto store = ExpertStore::create(spec, master);
  if (!store) return store.status();
  const ExpertLayout layout = expert_layout(spec.shape, master);
  const std::uint64_t h = cfg.hidden, f = cfg.expert_ffn;
  std::vector<float> w1, w3, w2, router;
  std::vector<std::byte> blob(native ? layout.total_bytes : 0);
  const std::uint64_t total = std::uint64_t{spec.n_layers} * spec.n_experts;
  for (std::uint32_t sl = 0; sl < spec.n_layers; ++sl) {
    const std::uint32_t l = m.moe_layers[sl];
    for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
      auto ex = ck->expert(l, e);
      if (!ex) return ex.status();
      const bool dense_ok = in_place && dense_float_precision(ex->w1) == pf && dense_float_precision(ex->w3) == pf &&
                            dense_float_precision(ex->w2) == pf && shape_is(ex->w1, f, h) && shape_is(ex->w3, f, h) &&
                            shape_is(ex->w2, h, f);
      if (dense_ok) {
        ExpertView v{ex->w1.bytes.data(), ex->w3.bytes.data(), ex->w2.bytes.data(), layout, nullptr};
        MOEX_RETURN_IF_ERROR(store->set_expert_view({sl, e}, v, Tier::kDisk));
      } else if (native) {
        std::fill(blob.begin(), blob.end(), std::byte{0});
        MOEX_RETURN_IF_ERROR(copy_block_matrix(ex->w1, layout.w1, blob.data() + layout.w1_offset));
        MOEX_RETURN_IF_ERROR(copy_block_matrix(ex->w3, layout.w3, blob.data() + layout.w3_offset));
        MOEX_RETURN_IF_ERROR(copy_block_matrix(ex->w2, layout.w2, blob.data() + layout.w2_offset));
        MOEX_RETURN_IF_ERROR(store->set_expert_blob({sl, e}, blob));
      } else {
        if (in_place)
          return corrupt(ex->w1.file + ": expert " + std::to_string(e) + " of layer " + std::to_string(l) +
                         " differs in dtype or shape from the layer's first expert");
        MOEX_RETURN_IF_ERROR(decode(ex->w1, f, h, w1));
        MOEX_RETURN_IF_ERROR(decode(ex->w3, f, h, w3));
        MOEX_RETURN_IF_ERROR(decode(ex->w2, h, f, w2));
        MOEX_RETURN_IF_ERROR(store->set_expert({sl, e}, w1.data(), w3.data(), w2.data()));
      }
      if (spec.block.expert_biases) MOEX_RETURN_IF_ERROR(read_expert_biases(*ex, {sl, e}, *store));
      if (options.progress) options.progress(std::uint64_t{sl} * spec.n_experts + e + 1, total, "reading experts");
    }
    auto r = ck->router(l);
    if (!r) return r.status();
    MOEX_RETURN_IF_ERROR(decode(*r, spec.n_experts, h, router));
    std::vector<float> bias;
    if (auto b = ck->router_bias(l); b.is_ok()) {
      bias.resize(spec.n_experts);
      if (b->numel() != spec.n_experts) return corrupt(b->file + ": router bias " + b->name + " has the wrong size");
      MOEX_RETURN_IF_ERROR(tensor_to_f32(*b, bias));
    } else if (b.status().code() != StatusCode::kNotFound) {
      return b.status();
    }
    MOEX_RETURN_IF_ERROR(store->set_router(sl, router, bias));
    MOEX_RETURN_IF_ERROR(read_block_extras(*ck, l, sl, *store));
  }
  if (in_place) store->keep_alive(ck);
  const std::uint64_t fp =
      options.use_copy_cache && !options.extra_formats.empty() ? fingerprint(*ck, spec, master) : 0;
  for (const WeightFormat& wf : options.extra_formats) {
    if (wf.precision == master.precision) continue;
    if (options.use_copy_cache) {
      const auto cp = cache_path(*ck, options, wf);
      const Status r = read_copy_cache(*store, wf, fp, cp);
      if (r.is_ok()) {
        m.notes.push_back("read " + std::string(to_string(wf.precision)) + " copies from " + cp.string());
        continue;
      }
      if (r.code() != StatusCode::kNotFound) m.notes.push_back("rebuilding: " + r.message());
      MOEX_RETURN_IF_ERROR(store->build_precision(wf, options.pool, options.progress));
      // A folder marked read-only stays untouched, also for root (shared model folders).
      std::error_code ec;
      const auto parent = cp.parent_path().parent_path();
      const bool read_only =
          options.cache_dir.empty() && (std::filesystem::status(parent, ec).permissions() &
                                        std::filesystem::perms::owner_write) == std::filesystem::perms::none;
      if (read_only) {
        m.notes.push_back("copies not cached: " + parent.string() + " is read-only (set StoreOptions::cache_dir)");
      } else if (Status w = write_copy_cache(*store, wf, fp, cp); !w.is_ok()) {
        m.notes.push_back("copies not cached: " + w.message());
      }
    } else {
      MOEX_RETURN_IF_ERROR(store->build_precision(wf, options.pool, options.progress));
    }
  }
  m.checkpoint = std::move(ck);
  m.store = std::move(*store);
  return m;
}

MOEX_NAMESPACE_END
