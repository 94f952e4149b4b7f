#include "moex/formats/checkpoint.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <system_error>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "moex/formats/gguf.hpp"
#include "moex/formats/safetensors.hpp"
#include "moex/io/mapped_file.hpp"

MOEX_NAMESPACE_BEGIN

namespace fs = std::filesystem;

namespace {

constexpr std::size_t kMaxJsonFile = 64u << 20;  // config.json / index.json

std::string shape_str(const std::vector<std::uint64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string lp(std::uint32_t layer) { return "model.layers." + std::to_string(layer) + "."; }
std::string blk(std::uint32_t layer) { return "blk." + std::to_string(layer) + "."; }

}  // namespace

struct Checkpoint::Impl {
  CheckpointFormat format = CheckpointFormat::kSafetensors;
  std::vector<MappedFile> files;
  ModelConfig config;
  std::unordered_map<std::string, TensorRef> tensors;

  Result<TensorRef> get(const std::string& name) const {
    const auto it = tensors.find(name);
    if (it == tensors.end()) return not_found("tensor '" + name + "' is not in the checkpoint");
    return it->second;
  }
  bool has(const std::string& name) const { return tensors.count(name) != 0; }

  Status add(TensorRef t) {
    auto [it, inserted] = tensors.emplace(t.name, t);
    if (!inserted) {
      return corrupt("tensor '" + t.name + "' appears twice (" + it->second.file + " and " + t.file + ")");
    }
    return Status::ok();
  }

  /// Attaches DeepSeek's fp8 block scales (`<name>_scale_inv`) to an fp8 weight.
  Result<TensorRef> with_scales(TensorRef t) const {
    if (t.dtype != DType::kF8E4M3) return t;
    const auto s = get(t.name + "_scale_inv");
    if (!s) return corrupt("fp8 tensor '" + t.name + "' (" + t.file + ") has no '" + t.name + "_scale_inv'");
    if (s->dtype != DType::kF32 || t.shape.size() != 2 || s->shape.size() != 2) {
      return corrupt("'" + s->name + "' must be a 2-D F32 tensor scaling a 2-D weight");
    }
    const std::uint64_t b = config.fp8_block ? config.fp8_block : 128;
    if (s->shape[0] != (t.shape[0] + b - 1) / b || s->shape[1] != (t.shape[1] + b - 1) / b) {
      return corrupt("'" + s->name + "' has shape " + shape_str(s->shape) + ", expected one scale per " +
                     std::to_string(b) + "x" + std::to_string(b) + " block of " + shape_str(t.shape));
    }
    t.scales = s->bytes;
    t.scales_shape = s->shape;
    t.scale_block = static_cast<std::uint32_t>(b);
    return t;
  }

  /// Expert `e` of a merged [E, rows, cols] tensor (GGUF *_exps) as a [rows, cols] ref.
  Result<TensorRef> slice(const std::string& name, std::uint32_t e) const {
    auto t = get(name);
    if (!t) return t;
    if (t->shape.size() != 3 || t->shape[0] != config.n_experts) {
      return corrupt("merged expert tensor '" + name + "' has shape " + shape_str(t->shape) + ", expected [" +
                     std::to_string(config.n_experts) + ", rows, cols]");
    }
    const std::size_t per = t->bytes.size() / config.n_experts;
    TensorRef r = *t;
    r.name = name + "[" + std::to_string(e) + "]";
    r.shape = {t->shape[1], t->shape[2]};
    r.bytes = t->bytes.subspan(per * e, per);
    return r;
  }

  Status check_shape(const TensorRef& t, std::uint64_t rows, std::uint64_t cols) const {
    if (t.shape.size() != 2 || t.shape[0] != rows || t.shape[1] != cols) {
      return corrupt("tensor '" + t.name + "' (" + t.file + ") has shape " + shape_str(t.shape) + ", expected [" +
                     std::to_string(rows) + ", " + std::to_string(cols) + "]");
    }
    return Status::ok();
  }

  Result<ExpertTensors> check_expert(ExpertTensors x, std::uint64_t ffn) const {
    MOEX_RETURN_IF_ERROR(check_shape(x.w1, ffn, config.hidden));
    MOEX_RETURN_IF_ERROR(check_shape(x.w3, ffn, config.hidden));
    MOEX_RETURN_IF_ERROR(check_shape(x.w2, config.hidden, ffn));
    return x;
  }

  Result<ExpertTensors> triple(const std::string& g, const std::string& u, const std::string& d) const {
    ExpertTensors x;
    auto a = get(g);
    if (!a) return a.status();
    auto b = get(u);
    if (!b) return b.status();
    auto c = get(d);
    if (!c) return c.status();
    auto sa = with_scales(std::move(*a));
    if (!sa) return sa.status();
    auto sb = with_scales(std::move(*b));
    if (!sb) return sb.status();
    auto sc = with_scales(std::move(*c));
    if (!sc) return sc.status();
    x.w1 = std::move(*sa);
    x.w3 = std::move(*sb);
    x.w2 = std::move(*sc);
    return x;
  }

  Result<ExpertTensors> gpt_oss_expert(std::uint32_t layer, std::uint32_t e) const;
  Result<ExpertTensors> expert(std::uint32_t layer, std::uint32_t e) const;
  Result<ExpertTensors> shared(std::uint32_t layer) const;
  Status check_layer(std::uint32_t layer) const {
    if (!config.is_moe_layer(layer)) {
      return invalid_argument("layer " + std::to_string(layer) + " is not an MoE layer of this " + config.architecture +
                              " model (" + std::to_string(config.n_layers) + " layers, first MoE layer " +
                              std::to_string(config.first_moe_layer) + ", step " +
                              std::to_string(config.moe_layer_step) + ")");
    }
    return Status::ok();
  }
};

Result<ExpertTensors> Checkpoint::Impl::gpt_oss_expert(std::uint32_t layer, std::uint32_t e) const {
  const std::string p = lp(layer) + "mlp.experts.";
  const std::uint64_t E = config.n_experts, H = config.hidden, F = config.expert_ffn;
  ExpertTensors x;
  if (has(p + "gate_up_proj_blocks")) {  // MXFP4: blocks [E, 2F, H/32, 16], scales [E, 2F, H/32]
    auto gub = get(p + "gate_up_proj_blocks");
    auto gus = get(p + "gate_up_proj_scales");
    auto db = get(p + "down_proj_blocks");
    auto ds = get(p + "down_proj_scales");
    for (const auto* r : {&gub, &gus, &db, &ds}) {
      if (!*r) return r->status();
      if ((*r)->dtype != DType::kU8) return corrupt("'" + (*r)->name + "' must be U8");
    }
    const std::vector<std::uint64_t> gub_shape{E, 2 * F, H / 32, 16}, gus_shape{E, 2 * F, H / 32};
    const std::vector<std::uint64_t> db_shape{E, H, F / 32, 16}, ds_shape{E, H, F / 32};
    if (H % 32 || F % 32 || gub->shape != gub_shape || gus->shape != gus_shape || db->shape != db_shape ||
        ds->shape != ds_shape) {
      return corrupt("gpt-oss MXFP4 expert tensors of layer " + std::to_string(layer) + " disagree with the config (" +
                     shape_str(gub->shape) + ", " + shape_str(gus->shape) + ", " + shape_str(db->shape) + ", " +
                     shape_str(ds->shape) + ")");
    }
    const std::size_t gu_slab = 2 * F * H / 2, gu_sslab = 2 * F * H / 32;
    auto mk = [&](const TensorRef& b, const TensorRef& s, std::size_t slab, std::size_t sslab, std::uint64_t rows,
                  std::uint64_t cols, std::uint64_t row0, std::uint64_t row_stride, const char* tag) {
      TensorRef t;
      t.name = b.name + "[" + std::to_string(e) + "]." + tag;
      t.file = b.file;
      t.dtype = DType::kMxfp4;
      t.shape = {rows, cols};
      const std::size_t off = slab * e + row0 * cols / 2, soff = sslab * e + row0 * cols / 32;
      t.bytes = b.bytes.subspan(off, slab - row0 * cols / 2);
      t.scales = s.bytes.subspan(soff, sslab - row0 * cols / 32);
      t.scales_shape = {rows, cols / 32};
      t.scale_block = 32;
      t.row_stride = row_stride == cols ? 0 : row_stride;
      return t;
    };
    x.w1 = mk(*gub, *gus, gu_slab, gu_sslab, F, H, 0, 2 * H, "gate");
    x.w3 = mk(*gub, *gus, gu_slab, gu_sslab, F, H, 1, 2 * H, "up");
    x.w2 = mk(*db, *ds, H * F / 2, H * F / 32, H, F, 0, F, "down");
  } else {  // bf16/f32: gate_up_proj [E, H, 2F] (input-major), down_proj [E, F, H]
    auto gu = get(p + "gate_up_proj");
    if (!gu)
      return corrupt("gpt-oss layer " + std::to_string(layer) + ": neither '" + p + "gate_up_proj_blocks' nor '" + p +
                     "gate_up_proj'");
    auto dn = get(p + "down_proj");
    if (!dn) return dn.status();
    if (is_block_dtype(gu->dtype) || is_block_dtype(dn->dtype) ||
        gu->shape != std::vector<std::uint64_t>{E, H, 2 * F} || dn->shape != std::vector<std::uint64_t>{E, F, H} ||
        gu->dtype != dn->dtype) {
      return corrupt("gpt-oss expert tensors of layer " + std::to_string(layer) + " have shapes " +
                     shape_str(gu->shape) + " and " + shape_str(dn->shape) +
                     ", expected [E, hidden, 2*ffn] and [E, ffn, hidden]");
    }
    const std::size_t es = dtype_block_bytes(gu->dtype);
    auto mk = [&](const TensorRef& src, std::uint64_t rows, std::uint64_t cols, std::uint64_t first, std::uint64_t rs,
                  std::uint64_t cs, const char* tag) {
      TensorRef t = src;
      const std::size_t slab = src.bytes.size() / E;
      t.name = src.name + "[" + std::to_string(e) + "]." + tag;
      t.shape = {rows, cols};
      t.bytes = src.bytes.subspan(slab * e + first * es, slab - first * es);
      t.row_stride = rs;
      t.col_stride = cs;
      return t;
    };
    x.w1 = mk(*gu, F, H, 0, 2, 2 * F, "gate");
    x.w3 = mk(*gu, F, H, 1, 2, 2 * F, "up");
    x.w2 = mk(*dn, H, F, 0, 1, H, "down");
  }
  // biases: gate_up_proj_bias [E, 2F] interleaved, down_proj_bias [E, H]
  if (auto gb = get(p + "gate_up_proj_bias");
      gb && gb->shape == std::vector<std::uint64_t>{E, 2 * F} && !is_block_dtype(gb->dtype)) {
    const std::size_t es = dtype_block_bytes(gb->dtype), slab = gb->bytes.size() / E;
    TensorRef b1 = *gb;
    b1.shape = {F};
    b1.col_stride = 2;
    b1.bytes = gb->bytes.subspan(slab * e, slab);
    TensorRef b3 = b1;
    b3.bytes = gb->bytes.subspan(slab * e + es, slab - es);
    b1.name += "[" + std::to_string(e) + "].gate";
    b3.name += "[" + std::to_string(e) + "].up";
    x.b1 = std::move(b1);
    x.b3 = std::move(b3);
  }
  if (auto db = get(p + "down_proj_bias");
      db && db->shape == std::vector<std::uint64_t>{E, H} && !is_block_dtype(db->dtype)) {
    const std::size_t slab = db->bytes.size() / E;
    TensorRef b2 = *db;
    b2.shape = {H};
    b2.bytes = db->bytes.subspan(slab * e, slab);
    b2.name += "[" + std::to_string(e) + "]";
    x.b2 = std::move(b2);
  }
  return x;
}

Result<ExpertTensors> Checkpoint::Impl::expert(std::uint32_t layer, std::uint32_t e) const {
  MOEX_RETURN_IF_ERROR(check_layer(layer));
  if (e >= config.n_experts) {
    return invalid_argument("expert " + std::to_string(e) + " out of range (model has " +
                            std::to_string(config.n_experts) + ")");
  }
  Result<ExpertTensors> x = internal_error("unset");
  if (format == CheckpointFormat::kGguf) {
    const std::string b = blk(layer);
    if (has(b + "ffn_gate_exps.weight")) {
      ExpertTensors t;
      auto g = slice(b + "ffn_gate_exps.weight", e);
      if (!g) return g.status();
      auto u = slice(b + "ffn_up_exps.weight", e);
      if (!u) return u.status();
      auto d = slice(b + "ffn_down_exps.weight", e);
      if (!d) return d.status();
      t.w1 = std::move(*g);
      t.w3 = std::move(*u);
      t.w2 = std::move(*d);
      for (auto [bn, dst] : {std::pair{"ffn_gate_exps.bias", &t.b1}, std::pair{"ffn_up_exps.bias", &t.b3},
                             std::pair{"ffn_down_exps.bias", &t.b2}}) {
        if (auto bt = get(b + bn); bt && bt->shape.size() == 2 && bt->shape[0] == config.n_experts) {
          const std::size_t per = bt->bytes.size() / config.n_experts;
          TensorRef r = *bt;
          r.shape = {bt->shape[1]};
          r.bytes = bt->bytes.subspan(per * e, per);
          r.name += "[" + std::to_string(e) + "]";
          *dst = std::move(r);
        }
      }
      x = std::move(t);
    } else {  // older llama.cpp Mixtral files: one tensor per expert
      const std::string s = "." + std::to_string(e) + ".weight";
      if (!has(b + "ffn_gate" + s)) {
        return corrupt("GGUF layer " + std::to_string(layer) + ": neither '" + b + "ffn_gate_exps.weight' nor '" + b +
                       "ffn_gate" + s + "'");
      }
      x = triple(b + "ffn_gate" + s, b + "ffn_up" + s, b + "ffn_down" + s);
    }
  } else {
    const std::string p = lp(layer);
    const std::string es = std::to_string(e);
    switch (config.arch) {
      case Architecture::kMixtral: {
        const std::string q = p + "block_sparse_moe.experts." + es + ".";
        x = triple(q + "w1.weight", q + "w3.weight", q + "w2.weight");
        break;
      }
      case Architecture::kGptOss:
        x = gpt_oss_expert(layer, e);
        break;
      default: {
        const std::string q = p + "mlp.experts." + es + ".";
        x = triple(q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight");
        break;
      }
    }
  }
  if (!x) return x;
  return check_expert(std::move(*x), config.expert_ffn);
}

Result<ExpertTensors> Checkpoint::Impl::shared(std::uint32_t layer) const {
  MOEX_RETURN_IF_ERROR(check_layer(layer));
  if (config.n_shared_experts == 0) return not_found(config.architecture + " model has no shared expert");
  Result<ExpertTensors> x = internal_error("unset");
  if (format == CheckpointFormat::kGguf) {
    const std::string b = blk(layer);
    x = triple(b + "ffn_gate_shexp.weight", b + "ffn_up_shexp.weight", b + "ffn_down_shexp.weight");
  } else {
    const std::string q =
        lp(layer) + (config.arch == Architecture::kQwen2Moe ? "mlp.shared_expert." : "mlp.shared_experts.");
    x = triple(q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight");
  }
  if (!x) return x;
  return check_expert(std::move(*x), config.shared_ffn);
}

Checkpoint::Checkpoint(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
Checkpoint::~Checkpoint() = default;

const ModelConfig& Checkpoint::config() const noexcept { return impl_->config; }
CheckpointFormat Checkpoint::format() const noexcept { return impl_->format; }

std::vector<fs::path> Checkpoint::files() const {
  std::vector<fs::path> r;
  for (const auto& f : impl_->files) r.push_back(f.path());
  return r;
}

std::uint64_t Checkpoint::file_bytes() const noexcept {
  std::uint64_t n = 0;
  for (const auto& f : impl_->files) n += f.size();
  return n;
}

Result<TensorRef> Checkpoint::tensor(std::string_view name) const {
  try {
    return impl_->get(std::string(name));
  } catch (const std::bad_alloc&) {
    return out_of_memory("tensor lookup");
  }
}

std::vector<std::string> Checkpoint::tensor_names() const {
  std::vector<std::string> r;
  r.reserve(impl_->tensors.size());
  for (const auto& [k, v] : impl_->tensors) r.push_back(k);
  std::sort(r.begin(), r.end());
  return r;
}

Result<ExpertTensors> Checkpoint::expert(std::uint32_t layer, std::uint32_t e) const {
  try {
    return impl_->expert(layer, e);
  } catch (const std::bad_alloc&) {
    return out_of_memory("expert lookup");
  }
}

Result<ExpertTensors> Checkpoint::shared_expert(std::uint32_t layer) const {
  try {
    return impl_->shared(layer);
  } catch (const std::bad_alloc&) {
    return out_of_memory("shared expert lookup");
  }
}

Result<TensorRef> Checkpoint::router(std::uint32_t layer) const {
  try {
    MOEX_RETURN_IF_ERROR(impl_->check_layer(layer));
    const auto& c = impl_->config;
    std::string name;
    if (impl_->format == CheckpointFormat::kGguf)
      name = blk(layer) + "ffn_gate_inp.weight";
    else if (c.arch == Architecture::kMixtral)
      name = lp(layer) + "block_sparse_moe.gate.weight";
    else if (c.arch == Architecture::kGptOss)
      name = lp(layer) + "mlp.router.weight";
    else
      name = lp(layer) + "mlp.gate.weight";
    auto t = impl_->get(name);
    if (!t) return t;
    if (is_block_dtype(t->dtype)) return unsupported("router '" + name + "' is block-quantized");
    MOEX_RETURN_IF_ERROR(impl_->check_shape(*t, c.n_experts, c.hidden));
    return t;
  } catch (const std::bad_alloc&) {
    return out_of_memory("router lookup");
  }
}

Result<TensorRef> Checkpoint::router_bias(std::uint32_t layer) const {
  try {
    MOEX_RETURN_IF_ERROR(impl_->check_layer(layer));
    const auto& c = impl_->config;
    std::string name;
    if (impl_->format == CheckpointFormat::kGguf) {
      name = blk(layer) + (c.arch == Architecture::kGptOss ? "ffn_gate_inp.bias" : "exp_probs_b.bias");
    } else if (c.arch == Architecture::kGptOss) {
      name = lp(layer) + "mlp.router.bias";
    } else if (c.arch == Architecture::kDeepseekV3 || c.arch == Architecture::kDeepseekV2) {
      name = lp(layer) + "mlp.gate.e_score_correction_bias";
    } else {
      return not_found(c.architecture + " routers have no bias");
    }
    auto t = impl_->get(name);
    if (!t) return t;
    if (t->shape != std::vector<std::uint64_t>{c.n_experts} || is_block_dtype(t->dtype)) {
      return corrupt("router bias '" + name + "' has shape " + shape_str(t->shape) + ", expected [" +
                     std::to_string(c.n_experts) + "]");
    }
    return t;
  } catch (const std::bad_alloc&) {
    return out_of_memory("router bias lookup");
  }
}

Result<TensorRef> Checkpoint::shared_expert_gate(std::uint32_t layer) const {
  try {
    MOEX_RETURN_IF_ERROR(impl_->check_layer(layer));
    if (impl_->config.arch != Architecture::kQwen2Moe) return not_found("only qwen2_moe has a shared expert gate");
    return impl_->get(impl_->format == CheckpointFormat::kGguf ? blk(layer) + "ffn_gate_inp_shexp.weight"
                                                               : lp(layer) + "mlp.shared_expert_gate.weight");
  } catch (const std::bad_alloc&) {
    return out_of_memory("shared expert gate lookup");
  }
}

namespace {

Status open_safetensors(Checkpoint::Impl& im, const fs::path& dir, const std::vector<fs::path>& shards,
                        const std::map<std::string, std::string>& weight_map, const ProgressFn& progress) {
  std::map<std::string, std::size_t> shard_index;
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const auto& sp = shards[i];
    if (progress) progress(i, shards.size(), sp.filename().string());
    auto m = MappedFile::open(sp);
    if (!m) return m.status();
    im.files.push_back(std::move(*m));
    auto h = parse_safetensors(im.files.back().bytes(), sp.string());
    if (!h) return h.status();
    for (auto& t : h->tensors) MOEX_RETURN_IF_ERROR(im.add(std::move(t)));
    shard_index[sp.filename().string()] = i;
  }
  if (progress) progress(shards.size(), shards.size(), "done");
  for (const auto& [name, file] : weight_map) {
    const auto it = im.tensors.find(name);
    if (it == im.tensors.end()) {
      return corrupt((dir / "model.safetensors.index.json").string() + ": tensor '" + name + "' is mapped to " + file +
                     ", which does not hold it");
    }
    if (fs::path(it->second.file).filename() != file) {
      return corrupt((dir / "model.safetensors.index.json").string() + ": tensor '" + name + "' is mapped to " + file +
                     " but found in " + it->second.file);
    }
  }
  return Status::ok();
}

Status check_architecture(const Checkpoint& ck) {
  const auto& c = ck.config();
  for (std::uint32_t l = c.first_moe_layer; l < c.n_layers; l += c.moe_layer_step) {
    auto r = ck.router(l);
    if (!r)
      return {r.status().code(),
              c.architecture + " checkpoint: layer " + std::to_string(l) + " router: " + r.status().message()};
    for (std::uint32_t e = 0; e < c.n_experts; ++e) {
      auto x = ck.expert(l, e);
      if (!x) {
        return {x.status().code(), c.architecture + " checkpoint: layer " + std::to_string(l) + " expert " +
                                       std::to_string(e) + ": " + x.status().message()};
      }
    }
    if (c.n_shared_experts) {
      auto s = ck.shared_expert(l);
      if (!s)
        return {s.status().code(),
                c.architecture + " checkpoint: layer " + std::to_string(l) + " shared expert: " + s.status().message()};
    }
  }
  return Status::ok();
}

bool ends_with(const std::string& s, std::string_view suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

}  // namespace

Result<std::unique_ptr<Checkpoint>> Checkpoint::open(const fs::path& path, ProgressFn progress) {
  try {
    auto im = std::make_unique<Impl>();
    std::error_code ec;
    const bool is_dir = fs::is_directory(path, ec);
    if (!is_dir && !fs::exists(path, ec)) return not_found(path.string() + ": no such file or directory");
    fs::path dir = is_dir ? path : path.parent_path();
    if (dir.empty()) dir = ".";
    fs::path gguf;
    fs::path index;
    std::vector<fs::path> shards;
    if (is_dir) {
      std::vector<fs::path> ggufs, sts;
      for (const auto& de : fs::directory_iterator(dir, ec)) {
        const auto n = de.path().filename().string();
        if (ends_with(n, ".gguf")) ggufs.push_back(de.path());
        if (ends_with(n, ".safetensors")) sts.push_back(de.path());
      }
      if (fs::exists(dir / "model.safetensors.index.json", ec))
        index = dir / "model.safetensors.index.json";
      else if (fs::exists(dir / "model.safetensors", ec))
        shards.push_back(dir / "model.safetensors");
      else if (sts.size() == 1)
        shards = sts;
      else if (ggufs.size() == 1)
        gguf = ggufs[0];
      else
        return not_found(path.string() + ": no model.safetensors.index.json, model.safetensors or single .gguf file");
    } else {
      const auto n = path.filename().string();
      char magic[4] = {};
      {
        std::ifstream in(path, std::ios::binary);
        in.read(magic, 4);
      }
      if (ends_with(n, ".gguf") || std::memcmp(magic, "GGUF", 4) == 0)
        gguf = path;
      else if (ends_with(n, ".index.json"))
        index = path;
      else
        shards.push_back(path);
    }
    if (!gguf.empty()) {
      im->format = CheckpointFormat::kGguf;
      if (progress) progress(0, 1, gguf.filename().string());
      auto m = MappedFile::open(gguf);
      if (!m) return m.status();
      im->files.push_back(std::move(*m));
      auto g = parse_gguf(im->files.back().bytes(), gguf.string());
      if (!g) return g.status();
      auto c = model_config_from_gguf(*g, gguf.string());
      if (!c) return c.status();
      im->config = std::move(*c);
      for (auto& t : g->tensors) MOEX_RETURN_IF_ERROR(im->add(std::move(t)));
      if (progress) progress(1, 1, "done");
    } else {
      im->format = CheckpointFormat::kSafetensors;
      std::map<std::string, std::string> weight_map;
      if (!index.empty()) {
        auto text = read_text_file(index, kMaxJsonFile);
        if (!text) return text.status();
        const auto j = nlohmann::json::parse(*text, nullptr, false);
        if (j.is_discarded() || !j.is_object()) return corrupt(index.string() + ": not a JSON object");
        const auto wm = j.find("weight_map");
        if (wm == j.end() || !wm->is_object()) return corrupt(index.string() + ": missing object 'weight_map'");
        std::set<std::string> files;
        for (const auto& [name, f] : wm->items()) {
          if (!f.is_string()) return corrupt(index.string() + ": weight_map entry '" + name + "' is not a file name");
          const auto fn = f.get<std::string>();
          if (fn.empty() || fn.find('/') != std::string::npos || fn.find('\\') != std::string::npos || fn == "." ||
              fn == "..") {
            return corrupt(index.string() + ": weight_map entry '" + name + "' names '" + fn +
                           "', not a file beside the index");
          }
          weight_map[name] = fn;
          if (files.insert(fn).second && !fs::exists(dir / fn, ec)) {
            return not_found(index.string() + ": shard " + (dir / fn).string() + " (holding '" + name +
                             "') is missing");
          }
        }
        for (const auto& f : files) shards.push_back(dir / f);
      }
      auto cfg_text = read_text_file(dir / "config.json", kMaxJsonFile);
      if (!cfg_text) return cfg_text.status();
      auto c = parse_model_config(*cfg_text, (dir / "config.json").string());
      if (!c) return c.status();
      im->config = std::move(*c);
      MOEX_RETURN_IF_ERROR(open_safetensors(*im, dir, shards, weight_map, progress));
    }
    std::unique_ptr<Checkpoint> ck(new Checkpoint(std::move(im)));
    MOEX_RETURN_IF_ERROR(check_architecture(*ck));
    return ck;
  } catch (const std::bad_alloc&) {
    return out_of_memory(path.string() + ": out of memory opening the checkpoint");
  } catch (const std::exception& e) {
    return io_error(path.string() + ": " + e.what());
  }
}

MOEX_NAMESPACE_END
