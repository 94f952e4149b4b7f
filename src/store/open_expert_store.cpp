#include "moex/store/open_expert_store.hpp"

#include <string>
#include <vector>

#include "moex/thread_pool.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

std::optional<Precision> dense_float_precision(const TensorRef& t) {
  if (!t.is_dense()) return std::nullopt;
  switch (t.dtype) {
    case DType::kF32: return Precision::kF32;
    case DType::kF16: return Precision::kF16;
    case DType::kBF16: return Precision::kBF16;
    default: return std::nullopt;
  }
}

bool shape_is(const TensorRef& t, std::uint64_t rows, std::uint64_t cols) {
  return t.shape.size() == 2 && t.shape[0] == rows && t.shape[1] == cols;
}

Status decode(const TensorRef& t, std::uint64_t rows, std::uint64_t cols, std::vector<float>& out) {
  if (t.numel() != rows * cols)
    return corrupt(t.file + ": tensor " + t.name + " has " + std::to_string(t.numel()) + " elements, expected " +
                   std::to_string(rows * cols));
  out.resize(rows * cols);
  return tensor_to_f32(t, out);
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
  MoeModelSpec spec{static_cast<std::uint32_t>(m.moe_layers.size()), cfg.n_experts, {cfg.hidden, cfg.expert_ffn},
                    cfg.router_config()};
  MOEX_RETURN_IF_ERROR(validate(spec));

  // In place when the first expert is a dense float tensor of the right shape.
  auto first = ck->expert(m.moe_layers[0], 0);
  if (!first) return first.status();
  const auto pf = dense_float_precision(first->w1);
  const bool in_place = options.in_place && pf.has_value();
  const WeightFormat master = in_place ? float_format(*pf) : options.master_format;
  auto store = ExpertStore::create(spec, master);
  if (!store) return store.status();
  const ExpertLayout layout = expert_layout(spec.shape, master);
  const std::uint64_t h = cfg.hidden, f = cfg.expert_ffn;
  std::vector<float> w1, w3, w2, router;
  const std::uint64_t total = std::uint64_t{spec.n_layers} * spec.n_experts;
  for (std::uint32_t sl = 0; sl < spec.n_layers; ++sl) {
    const std::uint32_t l = m.moe_layers[sl];
    for (std::uint32_t e = 0; e < spec.n_experts; ++e) {
      auto ex = ck->expert(l, e);
      if (!ex) return ex.status();
      const bool dense_ok = in_place && dense_float_precision(ex->w1) == pf && dense_float_precision(ex->w3) == pf &&
                            dense_float_precision(ex->w2) == pf && shape_is(ex->w1, f, h) &&
                            shape_is(ex->w3, f, h) && shape_is(ex->w2, h, f);
      if (dense_ok) {
        ExpertView v{ex->w1.bytes.data(), ex->w3.bytes.data(), ex->w2.bytes.data(), layout};
        MOEX_RETURN_IF_ERROR(store->set_expert_view({sl, e}, v, Tier::kDisk));
      } else {
        if (in_place)
          return corrupt(ex->w1.file + ": expert " + std::to_string(e) + " of layer " + std::to_string(l) +
                         " differs in dtype or shape from the layer's first expert");
        MOEX_RETURN_IF_ERROR(decode(ex->w1, f, h, w1));
        MOEX_RETURN_IF_ERROR(decode(ex->w3, f, h, w3));
        MOEX_RETURN_IF_ERROR(decode(ex->w2, h, f, w2));
        MOEX_RETURN_IF_ERROR(store->set_expert({sl, e}, w1.data(), w3.data(), w2.data()));
      }
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
  }
  if (in_place) store->keep_alive(ck);
  for (const WeightFormat& wf : options.extra_formats)
    MOEX_RETURN_IF_ERROR(store->build_precision(wf, options.pool, options.progress));
  m.checkpoint = std::move(ck);
  m.store = std::move(*store);
  return m;
}

MOEX_NAMESPACE_END
