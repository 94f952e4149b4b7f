#include "moex/route/pre_gate_router.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "moex/formats/safetensors.hpp"
#include "moex/formats/safetensors_writer.hpp"
#include "moex/io/mapped_file.hpp"

MOEX_NAMESPACE_BEGIN

Status write_pre_gates(const PreGateWeights& w, const std::filesystem::path& path) {
  if (w.n_layers < 2 || w.n_experts == 0 || w.hidden == 0) return invalid_argument("write_pre_gates: empty shape");
  const std::size_t per = std::size_t{w.n_experts} * w.hidden;
  if (w.weights.size() != per * (w.n_layers - 1)) return invalid_argument("write_pre_gates: weights size mismatch");
  SafetensorsWriter sw;
  sw.set_metadata("moex.kind", "pregate");
  sw.set_metadata("moex.version", "1");
  sw.set_metadata("moex.n_layers", std::to_string(w.n_layers));
  for (std::uint32_t l = 0; l + 1 < w.n_layers; ++l)
    MOEX_RETURN_IF_ERROR(
        sw.add_floats("pregate." + std::to_string(l) + ".weight", DType::kF32, {w.n_experts, w.hidden}, w.layer(l)));
  return sw.write_file(path);
}

Result<PreGateWeights> read_pre_gates(const std::filesystem::path& path) {
  auto file = MappedFile::open(path);
  if (!file) return file.status();
  auto hdr = parse_safetensors(file->bytes(), path.string());
  if (!hdr) return hdr.status();
  PreGateWeights w;
  std::map<std::uint32_t, const TensorRef*> layers;
  for (const TensorRef& t : hdr->tensors) {
    const std::string& n = t.name;
    if (n.rfind("pregate.", 0) != 0 || n.size() < 16 || n.substr(n.size() - 7) != ".weight")
      return corrupt(path.string() + ": unexpected tensor " + n + " in a pre-gate file");
    const std::string idx = n.substr(8, n.size() - 15);
    if (idx.empty() || idx.size() > 6 || idx.find_first_not_of("0123456789") != std::string::npos)
      return corrupt(path.string() + ": bad layer index in tensor " + n);
    if (t.shape.size() != 2 || t.dtype != DType::kF32)
      return corrupt(path.string() + ": tensor " + n + " must be F32 [n_experts, hidden]");
    layers[static_cast<std::uint32_t>(std::stoul(idx))] = &t;
  }
  if (layers.empty()) return corrupt(path.string() + ": no pre-gate tensors");
  w.n_layers = static_cast<std::uint32_t>(layers.size()) + 1;
  const auto* first = layers.begin()->second;
  if (first->shape[0] == 0 || first->shape[1] == 0 || first->shape[0] > 65536 || first->shape[1] > (1u << 20))
    return corrupt(path.string() + ": pre-gate shape out of range");
  w.n_experts = static_cast<std::uint32_t>(first->shape[0]);
  w.hidden = static_cast<std::uint32_t>(first->shape[1]);
  const std::size_t per = std::size_t{w.n_experts} * w.hidden;
  w.weights.resize(per * layers.size());
  std::uint32_t expect = 0;
  for (const auto& [l, t] : layers) {
    if (l != expect++) return corrupt(path.string() + ": pre-gate layers are not 0..L-2 without gaps");
    if (t->shape[0] != w.n_experts || t->shape[1] != w.hidden)
      return corrupt(path.string() + ": tensor " + t->name + " has a different shape than layer 0's");
    const auto bytes = t->bytes;
    if (bytes.size() != per * sizeof(float)) return corrupt(path.string() + ": tensor " + t->name + " size mismatch");
    std::memcpy(w.weights.data() + l * per, bytes.data(), bytes.size());
    for (std::size_t i = 0; i < per; ++i)
      if (!std::isfinite(w.weights[l * per + i])) return corrupt(path.string() + ": non-finite value in " + t->name);
  }
  return w;
}

Result<PreGateRouter> PreGateRouter::speculative(const ExpertStore& store, std::uint32_t depth) {
  const MoeModelSpec& s = store.spec();
  if (store.is_virtual())
    return unsupported("speculative prediction needs a store with routers (use replay in simulation)");
  if (depth == 0 || depth >= s.n_layers) return invalid_argument("speculative: depth must be in 1..n_layers-1");
  PreGateRouter r;
  r.mode_ = PreGateMode::kSpeculative;
  r.depth_ = depth;
  r.store_ = &store;
  r.router_ = s.router;
  r.n_layers_ = s.n_layers;
  r.n_experts_ = s.n_experts;
  r.hidden_ = s.shape.hidden;
  const std::size_t per = std::size_t{s.n_experts} * s.shape.hidden;
  r.stacked_.resize(per * s.n_layers);
  for (std::uint32_t l = 0; l < s.n_layers; ++l)
    std::memcpy(r.stacked_.data() + l * per, store.router_weights(l), per * sizeof(float));
  return r;
}

Result<PreGateRouter> PreGateRouter::trained(const ExpertStore& store, PreGateWeights w, bool as_routing) {
  const MoeModelSpec& s = store.spec();
  if (w.n_layers != s.n_layers || w.n_experts != s.n_experts || w.hidden != s.shape.hidden)
    return invalid_argument("pre-gates: shape differs from the model's (layers " + std::to_string(w.n_layers) +
                            ", experts " + std::to_string(w.n_experts) + ", hidden " + std::to_string(w.hidden) + ")");
  PreGateRouter r;
  r.mode_ = as_routing ? PreGateMode::kTrainedRouting : PreGateMode::kTrainedPrediction;
  r.depth_ = 1;
  r.store_ = &store;
  r.router_ = s.router;
  r.n_layers_ = s.n_layers;
  r.n_experts_ = s.n_experts;
  r.hidden_ = s.shape.hidden;
  r.stacked_ = std::move(w.weights);
  return r;
}

Result<PreGateRouter> PreGateRouter::replay(RoutingTrace trace, std::uint32_t depth, float recall, std::uint64_t seed) {
  MOEX_RETURN_IF_ERROR(trace.validate());
  if (depth == 0 || depth >= trace.n_layers) return invalid_argument("replay: depth must be in 1..n_layers-1");
  if (!(recall >= 0.f && recall <= 1.f)) return invalid_argument("replay: recall must lie in [0, 1]");
  PreGateRouter r;
  r.mode_ = PreGateMode::kReplay;
  r.depth_ = depth;
  r.n_layers_ = trace.n_layers;
  r.n_experts_ = trace.n_experts;
  r.recall_ = recall;
  r.seed_ = seed;
  r.trace_ = std::move(trace);
  return r;
}

std::string_view PreGateRouter::name() const noexcept {
  switch (mode_) {
    case PreGateMode::kSpeculative:
      return "speculative";
    case PreGateMode::kTrainedPrediction:
      return "pre-gate";
    case PreGateMode::kTrainedRouting:
      return "pre-gate-routing";
    case PreGateMode::kReplay:
      return "replay";
  }
  return "?";
}

namespace {
// Adds (key, score) to out, merging duplicates by the maximum score.
void add_prediction(std::vector<Prediction>& out, std::size_t begin, ExpertKey key, std::uint32_t depth, float score) {
  for (std::size_t i = begin; i < out.size(); ++i)
    if (out[i].key == key) {
      out[i].score = std::max(out[i].score, score);
      return;
    }
  out.push_back({key, depth, score});
}

std::uint64_t mix(std::uint64_t x) noexcept {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}
}  // namespace

Status PreGateRouter::predict(const PredictContext& ctx, std::vector<Prediction>& out) {
  if (depth_ == 0 || ctx.layer + 1 >= n_layers_) return Status::ok();
  const std::uint32_t last = std::min(n_layers_ - 1, ctx.layer + depth_);
  if (mode_ == PreGateMode::kReplay) {
    const std::uint64_t token = ctx.step / n_layers_;
    if (token >= trace_.tokens()) return Status::ok();
    for (std::uint32_t l = ctx.layer + 1; l <= last; ++l) {
      const std::size_t begin = out.size();
      const auto ids = trace_.experts(token, l);
      const auto ws = trace_.weights(token, l);
      for (std::size_t j = 0; j < ids.size(); ++j) {
        std::uint32_t e = ids[j];
        const std::uint64_t h = mix(seed_ ^ (token * 1315423911ull) ^ (std::uint64_t{l} << 40) ^ (j << 20));
        if (static_cast<double>(h >> 11) * 0x1.0p-53 >= recall_) {
          e = static_cast<std::uint32_t>((e + 1 + (h % (n_experts_ - 1 ? n_experts_ - 1 : 1))) % n_experts_);
        }
        add_prediction(out, begin, {l, e}, l - ctx.layer, ws[j]);
      }
    }
    return Status::ok();
  }
  if (ctx.hidden == nullptr)
    return invalid_argument("PreGateRouter: hidden states are needed for " + std::string(name()));
  const std::size_t per = std::size_t{n_experts_} * hidden_;
  const std::uint32_t first = ctx.layer + 1;
  const bool trained = mode_ != PreGateMode::kSpeculative;
  const std::uint32_t n_pred = trained ? 1 : last - ctx.layer;
  // One product for every predicted layer: the stacked rows of layers first..last.
  const float* w = stacked_.data() + (trained ? ctx.layer : first) * per;
  logits_.resize(ctx.n * n_experts_ * n_pred);
  router_logits(w, std::size_t{n_experts_} * n_pred, hidden_, ctx.hidden, ctx.n, logits_.data());
  if (mode_ == PreGateMode::kTrainedRouting) {
    routed_.resize(ctx.n);
    routed_layer_ = first;
  }
  for (std::uint32_t d = 0; d < n_pred; ++d) {
    const std::uint32_t l = first + d;
    const std::size_t begin = out.size();
    for (std::size_t t = 0; t < ctx.n; ++t) {
      TokenRouting r;
      const float* lg = logits_.data() + t * n_experts_ * n_pred + std::size_t{d} * n_experts_;
      MOEX_RETURN_IF_ERROR(route_token(router_, std::span<const float>(lg, n_experts_),
                                       store_ ? store_->router_bias(l) : std::span<const float>{}, r));
      for (std::uint32_t j = 0; j < r.k; ++j) add_prediction(out, begin, {l, r.experts[j]}, d + 1, r.weights[j]);
      if (mode_ == PreGateMode::kTrainedRouting) routed_[t] = r;
    }
  }
  return Status::ok();
}

bool PreGateRouter::take_routing(std::uint32_t layer, std::span<TokenRouting> out) {
  if (mode_ != PreGateMode::kTrainedRouting || layer != routed_layer_ || out.size() != routed_.size()) return false;
  std::copy(routed_.begin(), routed_.end(), out.begin());
  routed_layer_ = UINT32_MAX;
  return true;
}

MOEX_NAMESPACE_END
