#include "moex/store/expert_store.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "moex/quant/quantize.hpp"
#include "moex/route/router.hpp"
#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

Status validate(const MoeModelSpec& s) noexcept {
  if (s.n_layers == 0) return invalid_argument("model spec: n_layers must be > 0");
  if (s.n_experts == 0) return invalid_argument("model spec: n_experts must be > 0");
  if (s.shape.hidden == 0 || s.shape.ffn == 0) return invalid_argument("model spec: expert shape has a zero dimension");
  if (s.router.n_experts != s.n_experts) return invalid_argument("model spec: router.n_experts differs from n_experts");
  // Guard sizes that would overflow or could never be allocated.
  if (static_cast<std::uint64_t>(s.n_layers) * s.n_experts > (1ull << 24))
    return invalid_argument("model spec: more than 2^24 experts");
  if (static_cast<std::uint64_t>(s.shape.hidden) * s.shape.ffn > (1ull << 34))
    return invalid_argument("model spec: expert larger than 2^34 weights per matrix");
  const MoeBlockSpec& b = s.block;
  if (b.activation != FfnActivation::kSwiGlu && b.activation != FfnActivation::kClampedSwiGlu)
    return invalid_argument("model spec: unknown expert activation");
  if (b.activation == FfnActivation::kClampedSwiGlu &&
      !(std::isfinite(b.activation_alpha) && b.activation_alpha > 0.f && std::isfinite(b.activation_limit) &&
        b.activation_limit > 0.f))
    return invalid_argument("model spec: the clamped SwiGLU needs a finite alpha > 0 and limit > 0");
  if (static_cast<std::uint64_t>(s.shape.hidden) * b.shared_ffn > (1ull << 34))
    return invalid_argument("model spec: shared expert larger than 2^34 weights per matrix");
  if (b.shared_gate && b.shared_ffn == 0) return invalid_argument("model spec: a shared gate without a shared expert");
  return validate(s.router);
}

std::string MoeBlockSpec::extras() const {
  std::string r;
  auto add = [&](const std::string& x) { r += (r.empty() ? "" : ", ") + x; };
  if (shared_ffn) add(shared_gate ? "a gated shared expert" : "shared experts");
  if (expert_biases) add("expert biases");
  if (activation != FfnActivation::kSwiGlu) add("the " + std::string(to_string(activation)) + " activation");
  return r;
}

Result<ExpertStore> ExpertStore::create(const MoeModelSpec& spec, WeightFormat master_format) {
  MOEX_RETURN_IF_ERROR(validate(spec));
  if (!expert_format_is_valid(spec.shape, master_format))
    return invalid_argument("ExpertStore: format " + std::string(to_string(master_format.precision)) +
                            " cannot hold experts of hidden " + std::to_string(spec.shape.hidden) + " and ffn " +
                            std::to_string(spec.shape.ffn));
  ExpertStore s;
  s.spec_ = spec;
  s.master_format_ = master_format;
  s.master_layout_ = expert_layout(spec.shape, master_format);
  const std::size_t n = std::size_t{spec.n_layers} * spec.n_experts;
  s.master_views_.assign(n, ExpertView{nullptr, nullptr, nullptr, s.master_layout_, nullptr});
  s.routers_.assign(std::size_t{spec.n_layers} * spec.n_experts * spec.shape.hidden, 0.f);
  s.biases_.resize(spec.n_layers);
  const MoeBlockSpec& b = spec.block;
  s.activation_math_.activation = b.activation;
  s.activation_math_.alpha = b.activation_alpha;
  s.activation_math_.limit = b.activation_limit;
  if (b.expert_biases) {
    const std::size_t per = 2 * std::size_t{spec.shape.ffn} + spec.shape.hidden;
    s.expert_bias_values_.assign(n * per, 0.f);
    s.expert_math_.assign(n, s.activation_math_);
    for (std::size_t i = 0; i < n; ++i) {
      float* base = s.expert_bias_values_.data() + i * per;
      s.expert_math_[i].b1 = base;
      s.expert_math_[i].b3 = base + spec.shape.ffn;
      s.expert_math_[i].b2 = base + 2 * std::size_t{spec.shape.ffn};
    }
    s.biases_set_.assign(n, 0);
  }
  if (b.shared_ffn) s.shared_.resize(spec.n_layers);
  return s;
}

Result<ExpertStore> ExpertStore::create_virtual(const MoeModelSpec& spec, WeightFormat master_format,
                                                std::span<const WeightFormat> extra_formats) {
  auto s = create(spec, master_format);
  if (!s) return s.status();
  s->virtual_ = true;
  s->routers_.clear();
  s->routers_.shrink_to_fit();
  for (WeightFormat f : extra_formats) {
    if (f.precision == master_format.precision) continue;
    if (!expert_format_is_valid(spec.shape, f))
      return invalid_argument("create_virtual: a format cannot hold this model's expert shape");
    Copy c;
    c.format = f;
    c.layout = expert_layout(spec.shape, f);
    s->copies_.push_back(std::move(c));
  }
  return s;
}

Status ExpertStore::check_key(ExpertKey k) const noexcept {
  if (k.layer >= spec_.n_layers || k.expert >= spec_.n_experts)
    return invalid_argument("expert (" + std::to_string(k.layer) + ", " + std::to_string(k.expert) +
                            ") is out of range for " + std::to_string(spec_.n_layers) + " layers x " +
                            std::to_string(spec_.n_experts) + " experts");
  return Status::ok();
}

std::byte* ExpertStore::owned_master(ExpertKey key) {
  if (master_blob_.empty()) master_blob_.resize(master_views_.size() * master_layout_.total_bytes);
  return master_blob_.data() + index(key) * master_layout_.total_bytes;
}

Status ExpertStore::set_expert(ExpertKey key, const float* w1, const float* w3, const float* w2) {
  if (virtual_) return unsupported("set_expert: a virtual store has no data");
  MOEX_RETURN_IF_ERROR(check_key(key));
  if (!w1 || !w3 || !w2) return invalid_argument("set_expert: null weights");
  if (is_block_format(master_format_.precision))
    return unsupported("set_expert: block formats cannot be encoded (set_expert_blob copies their bytes)");
  std::byte* dst = owned_master(key);
  MOEX_RETURN_IF_ERROR(
      pack_expert(w1, w3, w2, spec_.shape, master_format_, std::span<std::byte>(dst, master_layout_.total_bytes)));
  master_views_[index(key)] = ExpertView::contiguous(dst, master_layout_);
  return Status::ok();
}

Status ExpertStore::set_expert_blob(ExpertKey key, std::span<const std::byte> blob) {
  if (virtual_) return unsupported("set_expert_blob: a virtual store has no data");
  MOEX_RETURN_IF_ERROR(check_key(key));
  if (blob.data() == nullptr || blob.size() != master_layout_.total_bytes)
    return invalid_argument("set_expert_blob: blob has " + std::to_string(blob.size()) + " bytes, the master layout " +
                            std::to_string(master_layout_.total_bytes));
  std::byte* dst = owned_master(key);
  std::copy(blob.begin(), blob.end(), dst);
  master_views_[index(key)] = ExpertView::contiguous(dst, master_layout_);
  return Status::ok();
}

Status ExpertStore::set_expert_view(ExpertKey key, const ExpertView& view, Tier tier) {
  MOEX_RETURN_IF_ERROR(check_key(key));
  if (!view.valid()) return invalid_argument("set_expert_view: null matrix pointer");
  if (!(view.layout.shape == spec_.shape) || !(view.layout.format == master_format_))
    return invalid_argument("set_expert_view: the view's shape or format differs from the store's");
  master_views_[index(key)] = view;
  master_views_[index(key)].layout = master_layout_;
  master_tier_ = tier;
  return Status::ok();
}

void ExpertStore::keep_alive(std::shared_ptr<const void> owner) { owners_.push_back(std::move(owner)); }

Status ExpertStore::set_router(std::uint32_t layer, std::span<const float> weights, std::span<const float> bias) {
  if (virtual_) return unsupported("set_router: a virtual store has no data");
  if (layer >= spec_.n_layers) return invalid_argument("set_router: layer out of range");
  const std::size_t per = std::size_t{spec_.n_experts} * spec_.shape.hidden;
  if (weights.size() != per)
    return invalid_argument("set_router: expected " + std::to_string(per) + " weights, got " +
                            std::to_string(weights.size()));
  if (!bias.empty() && bias.size() != spec_.n_experts)
    return invalid_argument("set_router: bias size differs from n_experts");
  for (float w : weights)
    if (!std::isfinite(w)) return invalid_argument("set_router: non-finite router weight");
  std::copy(weights.begin(), weights.end(), routers_.begin() + static_cast<std::ptrdiff_t>(layer * per));
  biases_[layer].assign(bias.begin(), bias.end());
  return Status::ok();
}

const float* ExpertStore::router_weights(std::uint32_t layer) const noexcept {
  if (layer >= spec_.n_layers || virtual_) return nullptr;
  return routers_.data() + std::size_t{layer} * spec_.n_experts * spec_.shape.hidden;
}

std::span<const float> ExpertStore::router_bias(std::uint32_t layer) const noexcept {
  if (layer >= spec_.n_layers) return {};
  return biases_[layer];
}

bool ExpertStore::complete() const noexcept {
  if (virtual_) return true;
  if (!std::all_of(master_views_.begin(), master_views_.end(), [](const ExpertView& v) { return v.valid(); }))
    return false;
  if (!std::all_of(biases_set_.begin(), biases_set_.end(), [](std::uint8_t b) { return b != 0; })) return false;
  return std::all_of(shared_.begin(), shared_.end(), [&](const Shared& sh) {
    return !sh.blob.empty() && (!spec_.block.shared_gate || !sh.gate.empty());
  });
}

std::string ExpertStore::missing() const {
  if (virtual_) return {};
  for (std::size_t i = 0; i < master_views_.size(); ++i)
    if (!master_views_[i].valid())
      return "expert " + std::to_string(i % spec_.n_experts) + " of layer " + std::to_string(i / spec_.n_experts) +
             " has no master copy";
  for (std::size_t i = 0; i < biases_set_.size(); ++i)
    if (!biases_set_[i])
      return "expert " + std::to_string(i % spec_.n_experts) + " of layer " + std::to_string(i / spec_.n_experts) +
             " has no biases (set_expert_biases)";
  for (std::size_t l = 0; l < shared_.size(); ++l) {
    if (shared_[l].blob.empty()) return "layer " + std::to_string(l) + " has no shared expert (set_shared_expert)";
    if (spec_.block.shared_gate && shared_[l].gate.empty())
      return "layer " + std::to_string(l) + " has no shared-expert gate (set_shared_gate)";
  }
  return {};
}

Status ExpertStore::set_expert_biases(ExpertKey key, std::span<const float> b1, std::span<const float> b3,
                                      std::span<const float> b2) {
  if (virtual_) return unsupported("set_expert_biases: a virtual store has no data");
  MOEX_RETURN_IF_ERROR(check_key(key));
  if (!spec_.block.expert_biases)
    return invalid_argument("set_expert_biases: this model's experts have no biases (MoeBlockSpec::expert_biases)");
  const std::size_t f = spec_.shape.ffn, h = spec_.shape.hidden;
  if (b1.size() != f || b3.size() != f || b2.size() != h)
    return invalid_argument("set_expert_biases: expected " + std::to_string(f) + ", " + std::to_string(f) + " and " +
                            std::to_string(h) + " values, got " + std::to_string(b1.size()) + ", " +
                            std::to_string(b3.size()) + " and " + std::to_string(b2.size()));
  for (auto sp : {b1, b3, b2})
    for (float v : sp)
      if (!std::isfinite(v)) return invalid_argument("set_expert_biases: non-finite bias");
  float* base = expert_bias_values_.data() + index(key) * (2 * f + h);  // b1, b3, b2 as expert_math_ points
  std::copy(b1.begin(), b1.end(), base);
  std::copy(b3.begin(), b3.end(), base + f);
  std::copy(b2.begin(), b2.end(), base + 2 * f);
  biases_set_[index(key)] = 1;
  return Status::ok();
}

const ExpertMath* ExpertStore::expert_math(ExpertKey key) const noexcept {
  if (key.layer >= spec_.n_layers || key.expert >= spec_.n_experts) return nullptr;
  if (spec_.block.expert_biases) return &expert_math_[index(key)];
  if (spec_.block.activation != FfnActivation::kSwiGlu) return &activation_math_;
  return nullptr;
}

Status ExpertStore::set_shared_expert(std::uint32_t layer, const float* w1, const float* w3, const float* w2,
                                      WeightFormat format) {
  if (virtual_) return unsupported("set_shared_expert: a virtual store has no data");
  if (spec_.block.shared_ffn == 0)
    return invalid_argument("set_shared_expert: this model has no shared expert (MoeBlockSpec::shared_ffn)");
  if (layer >= spec_.n_layers) return invalid_argument("set_shared_expert: layer out of range");
  if (!w1 || !w3 || !w2) return invalid_argument("set_shared_expert: null weights");
  const Precision p = format.precision;
  if (p != Precision::kF32 && p != Precision::kF16 && p != Precision::kBF16)
    return invalid_argument("set_shared_expert: shared experts are held in f32, f16 or bf16");
  const ExpertShape shape{spec_.shape.hidden, spec_.block.shared_ffn};
  if (!expert_format_is_valid(shape, format)) return invalid_argument("set_shared_expert: invalid format");
  Shared& sh = shared_[layer];
  sh.layout = expert_layout(shape, format);
  std::vector<std::byte> blob(sh.layout.total_bytes);
  MOEX_RETURN_IF_ERROR(pack_expert(w1, w3, w2, shape, format, blob));
  sh.blob = std::move(blob);
  return Status::ok();
}

Status ExpertStore::set_shared_gate(std::uint32_t layer, std::span<const float> gate) {
  if (virtual_) return unsupported("set_shared_gate: a virtual store has no data");
  if (!spec_.block.shared_gate)
    return invalid_argument("set_shared_gate: this model's shared expert has no gate (MoeBlockSpec::shared_gate)");
  if (layer >= spec_.n_layers) return invalid_argument("set_shared_gate: layer out of range");
  if (gate.size() != spec_.shape.hidden)
    return invalid_argument("set_shared_gate: expected " + std::to_string(spec_.shape.hidden) + " values, got " +
                            std::to_string(gate.size()));
  for (float v : gate)
    if (!std::isfinite(v)) return invalid_argument("set_shared_gate: non-finite weight");
  shared_[layer].gate.assign(gate.begin(), gate.end());
  return Status::ok();
}

Result<ExpertView> ExpertStore::shared_expert(std::uint32_t layer) const noexcept {
  if (layer >= shared_.size() || shared_[layer].blob.empty())
    return not_found("layer " + std::to_string(layer) + " has no shared expert");
  return ExpertView::contiguous(shared_[layer].blob.data(), shared_[layer].layout);
}

std::span<const float> ExpertStore::shared_gate(std::uint32_t layer) const noexcept {
  if (layer >= shared_.size()) return {};
  return shared_[layer].gate;
}

std::uint64_t ExpertStore::shared_expert_bytes() const noexcept {
  std::uint64_t n = 0;
  for (const Shared& sh : shared_) n += sh.blob.size();
  return n;
}

Status ExpertStore::build_precision(WeightFormat format, ThreadPool* pool, const ProgressFn& progress) {
  if (virtual_) return unsupported("build_precision: a virtual store has no data (pass formats to create_virtual)");
  if (!is_quantized(format.precision) && format.precision != Precision::kBF16 && format.precision != Precision::kF16 &&
      format.precision != Precision::kF32)
    return unsupported("build_precision: copies can be f32, f16, bf16, int8, int4 or int2");
  if (format.precision == master_format_.precision)
    return invalid_argument("build_precision: the master copy already has this precision");
  if (!expert_format_is_valid(spec_.shape, format))
    return invalid_argument("build_precision: format cannot hold this model's expert shape");
  if (!complete()) return invalid_argument("build_precision: some experts have no master copy yet");
  Copy c;
  c.format = format;
  c.layout = expert_layout(spec_.shape, format);
  const std::size_t n = master_views_.size();
  c.blob.resize(n * c.layout.total_bytes);
  ThreadPool& tp = pool ? *pool : ThreadPool::global();
  // Progress goes out per layer from the calling thread (callbacks need not be thread-safe).
  std::atomic<int> failed{0};
  // Parallel across experts; each conversion single-threaded (no nested parallel_for).
  const std::size_t per_layer = spec_.n_experts;
  for (std::uint32_t l = 0; l < spec_.n_layers; ++l) {
    tp.parallel_for(per_layer, 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = l * per_layer + b; i < l * per_layer + e; ++i) {
        Status s = convert_expert(master_views_[i], format,
                                  std::span<std::byte>(c.blob.data() + i * c.layout.total_bytes, c.layout.total_bytes));
        if (!s.is_ok()) failed.store(1);
      }
    });
    if (progress) progress((l + 1) * per_layer, n, "building low-precision copies");
  }
  if (failed.load()) return internal_error("build_precision: converting an expert failed");
  auto it = std::find_if(copies_.begin(), copies_.end(),
                         [&](const Copy& x) { return x.format.precision == format.precision; });
  if (it != copies_.end()) {
    *it = std::move(c);
  } else {
    copies_.push_back(std::move(c));
  }
  return Status::ok();
}

std::span<const std::byte> ExpertStore::copy_blob(Precision p) const noexcept {
  for (const Copy& c : copies_)
    if (c.format.precision == p) return c.blob;
  return {};
}

Status ExpertStore::adopt_copy(WeightFormat format, std::vector<std::byte> blob) {
  if (virtual_) return unsupported("adopt_copy: a virtual store has no data");
  if (format.precision == master_format_.precision)
    return invalid_argument("adopt_copy: that is the master's precision");
  if (!expert_format_is_valid(spec_.shape, format))
    return invalid_argument("adopt_copy: format cannot hold this shape");
  Copy c;
  c.format = format;
  c.layout = expert_layout(spec_.shape, format);
  if (blob.size() != master_views_.size() * c.layout.total_bytes)
    return invalid_argument("adopt_copy: blob has " + std::to_string(blob.size()) + " bytes, expected " +
                            std::to_string(master_views_.size() * c.layout.total_bytes));
  c.blob = std::move(blob);
  auto it = std::find_if(copies_.begin(), copies_.end(),
                         [&](const Copy& x) { return x.format.precision == format.precision; });
  if (it != copies_.end()) {
    *it = std::move(c);
  } else {
    copies_.push_back(std::move(c));
  }
  return Status::ok();
}

bool ExpertStore::has_precision(Precision p) const noexcept {
  if (p == master_format_.precision) return complete();
  return std::any_of(copies_.begin(), copies_.end(), [&](const Copy& c) { return c.format.precision == p; });
}

std::optional<WeightFormat> ExpertStore::format(Precision p) const noexcept {
  if (p == master_format_.precision) return master_format_;
  for (const Copy& c : copies_)
    if (c.format.precision == p) return c.format;
  return std::nullopt;
}

std::vector<Precision> ExpertStore::precisions() const {
  std::vector<Precision> v{master_format_.precision};
  for (const Copy& c : copies_) v.push_back(c.format.precision);
  return v;
}

std::size_t ExpertStore::expert_bytes(Precision p) const noexcept {
  if (p == master_format_.precision) return master_layout_.total_bytes;
  for (const Copy& c : copies_)
    if (c.format.precision == p) return c.layout.total_bytes;
  return 0;
}

Result<ExpertView> ExpertStore::view(ExpertKey key, Precision p) const noexcept {
  MOEX_RETURN_IF_ERROR(check_key(key));
  if (virtual_) {
    if (auto f = format(p)) return ExpertView{nullptr, nullptr, nullptr, expert_layout(spec_.shape, *f), nullptr};
    return not_found("the store holds no " + std::string(to_string(p)) + " copy of its experts");
  }
  if (p == master_format_.precision) {
    ExpertView v = master_views_[index(key)];
    if (!v.valid()) return not_found("expert has no master copy yet");
    v.math = expert_math(key);
    return v;
  }
  for (const Copy& c : copies_)
    if (c.format.precision == p)
      return ExpertView::contiguous(c.blob.data() + index(key) * c.layout.total_bytes, c.layout, expert_math(key));
  return not_found("the store holds no " + std::string(to_string(p)) + " copy of its experts");
}

MOEX_NAMESPACE_END
