#include "moex/formats/model_config.hpp"

#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "moex/formats/gguf.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

using nlohmann::json;

constexpr std::string_view kKnown = "mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe, gpt_oss";

/// Reads typed, range-checked values out of a config.json object.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  /// A required unsigned integer.
  Status u32(std::string_view key, std::uint32_t& out) const { return u32_any({key}, out, true); }
  /// An optional unsigned integer (out unchanged when absent).
  Status opt_u32(std::string_view key, std::uint32_t& out) const { return u32_any({key}, out, false); }
  Status u32_any(std::initializer_list<std::string_view> keys, std::uint32_t& out, bool required) const {
    for (auto key : keys) {
      const auto it = j_.find(key);
      if (it == j_.end() || it->is_null()) continue;
      if (!it->is_number_integer() || it->get<std::int64_t>() < 0 ||
          it->get<std::int64_t>() > std::numeric_limits<std::uint32_t>::max()) {
        return corrupt(source_ + ": '" + std::string(key) + "' is not an unsigned 32-bit integer");
      }
      out = static_cast<std::uint32_t>(it->get<std::int64_t>());
      return Status::ok();
    }
    if (!required) return Status::ok();
    std::string names;
    for (auto k : keys) names += (names.empty() ? "'" : " or '") + std::string(k) + "'";
    return corrupt(source_ + ": missing key " + names + " (needed for model_type '" + model_type_ + "')");
  }
  Status opt_f32(std::string_view key, float& out) const {
    const auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return Status::ok();
    if (!it->is_number()) return corrupt(source_ + ": '" + std::string(key) + "' is not a number");
    const double v = it->get<double>();
    if (!std::isfinite(v) || std::fabs(v) > 1e30)
      return corrupt(source_ + ": '" + std::string(key) + "' is out of range");
    out = static_cast<float>(v);
    return Status::ok();
  }
  Status opt_bool(std::string_view key, bool& out) const {
    const auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return Status::ok();
    if (!it->is_boolean()) return corrupt(source_ + ": '" + std::string(key) + "' is not a boolean");
    out = it->get<bool>();
    return Status::ok();
  }
  std::string opt_string(std::string_view key) const {
    const auto it = j_.find(key);
    return it != j_.end() && it->is_string() ? it->get<std::string>() : std::string();
  }
  void set_model_type(std::string t) { model_type_ = std::move(t); }
  const json& j() const noexcept { return j_; }

 private:
  const json& j_;
  std::string source_;
  std::string model_type_;
};

std::optional<Architecture> arch_from_model_type(std::string_view t) {
  if (t == "mixtral") return Architecture::kMixtral;
  if (t == "qwen2_moe") return Architecture::kQwen2Moe;
  if (t == "qwen3_moe") return Architecture::kQwen3Moe;
  if (t == "deepseek_v2") return Architecture::kDeepseekV2;
  if (t == "deepseek_v3") return Architecture::kDeepseekV3;
  if (t == "olmoe") return Architecture::kOlmoe;
  if (t == "gpt_oss") return Architecture::kGptOss;
  return std::nullopt;
}

std::optional<Architecture> arch_from_class(std::string_view c) {
  if (c == "MixtralForCausalLM") return Architecture::kMixtral;
  if (c == "Qwen2MoeForCausalLM") return Architecture::kQwen2Moe;
  if (c == "Qwen3MoeForCausalLM") return Architecture::kQwen3Moe;
  if (c == "DeepseekV2ForCausalLM") return Architecture::kDeepseekV2;
  if (c == "DeepseekV3ForCausalLM") return Architecture::kDeepseekV3;
  if (c == "OlmoeForCausalLM") return Architecture::kOlmoe;
  if (c == "GptOssForCausalLM") return Architecture::kGptOss;
  return std::nullopt;
}

Result<ModelConfig> parse_impl(std::string_view text, const std::string& src) {
  const json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(src + ": not valid JSON");
  if (!j.is_object()) return corrupt(src + ": not a JSON object");
  ConfigReader r(j, src);
  ModelConfig c;
  const std::string model_type = r.opt_string("model_type");
  std::optional<Architecture> arch = arch_from_model_type(model_type);
  std::string arch_class;
  if (const auto it = j.find("architectures");
      it != j.end() && it->is_array() && !it->empty() && (*it)[0].is_string()) {
    arch_class = (*it)[0].get<std::string>();
    if (!arch) arch = arch_from_class(arch_class);
  }
  if (!arch) {
    if (model_type.empty() && arch_class.empty()) {
      return unsupported(src + ": no 'model_type' or 'architectures' key: cannot tell the architecture (moex reads " +
                         std::string(kKnown) + ")");
    }
    return unsupported(src + ": unsupported architecture '" + (model_type.empty() ? arch_class : model_type) +
                       "' (moex reads " + std::string(kKnown) + ")");
  }
  c.arch = *arch;
  c.architecture = std::string(to_string(c.arch));
  r.set_model_type(c.architecture);
  MOEX_RETURN_IF_ERROR(r.u32("hidden_size", c.hidden));
  MOEX_RETURN_IF_ERROR(r.u32("num_hidden_layers", c.n_layers));
  MOEX_RETURN_IF_ERROR(r.u32("num_attention_heads", c.n_heads));
  c.n_kv_heads = c.n_heads;
  MOEX_RETURN_IF_ERROR(r.opt_u32("num_key_value_heads", c.n_kv_heads));
  if (c.n_heads) c.head_dim = c.hidden / c.n_heads;
  MOEX_RETURN_IF_ERROR(r.opt_u32("head_dim", c.head_dim));
  MOEX_RETURN_IF_ERROR(r.opt_u32("vocab_size", c.vocab));
  MOEX_RETURN_IF_ERROR(r.opt_u32("max_position_embeddings", c.max_pos));
  MOEX_RETURN_IF_ERROR(r.opt_f32("rope_theta", c.rope_theta));
  MOEX_RETURN_IF_ERROR(r.opt_f32("rms_norm_eps", c.rms_eps));
  MOEX_RETURN_IF_ERROR(r.opt_bool("tie_word_embeddings", c.tie_embeddings));
  MOEX_RETURN_IF_ERROR(r.opt_u32("intermediate_size", c.dense_ffn));
  MOEX_RETURN_IF_ERROR(r.u32_any({"num_experts_per_tok", "experts_per_token"}, c.top_k, true));
  // Every architecture moex reads gates its experts with silu (gpt-oss: its clamped variant);
  // anything else would be computed wrong, so it is refused here.
  if (const std::string act = r.opt_string("hidden_act"); !act.empty() && act != "silu" && act != "swish")
    return unsupported(src + ": hidden_act '" + act + "' (moex computes SwiGLU experts, whose activation is silu)");
  switch (c.arch) {
    case Architecture::kMixtral:
    case Architecture::kGptOss:
      MOEX_RETURN_IF_ERROR(r.u32_any({"num_local_experts", "num_experts"}, c.n_experts, true));
      MOEX_RETURN_IF_ERROR(r.u32("intermediate_size", c.expert_ffn));
      c.router = RouterKind::kSoftmaxTopKRenorm;
      c.norm_topk_prob = true;
      if (c.arch == Architecture::kGptOss) {
        MOEX_RETURN_IF_ERROR(r.opt_f32("swiglu_limit", c.swiglu_limit));
        if (!(c.swiglu_limit > 0.f)) return corrupt(src + ": 'swiglu_limit' must be > 0");
      }
      break;
    case Architecture::kOlmoe:
      MOEX_RETURN_IF_ERROR(r.u32("num_experts", c.n_experts));
      MOEX_RETURN_IF_ERROR(r.u32("intermediate_size", c.expert_ffn));
      c.norm_topk_prob = false;
      MOEX_RETURN_IF_ERROR(r.opt_bool("norm_topk_prob", c.norm_topk_prob));
      c.router = c.norm_topk_prob ? RouterKind::kSoftmaxTopKRenorm : RouterKind::kSoftmaxTopK;
      break;
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3Moe: {
      MOEX_RETURN_IF_ERROR(r.u32("num_experts", c.n_experts));
      MOEX_RETURN_IF_ERROR(r.u32("moe_intermediate_size", c.expert_ffn));
      MOEX_RETURN_IF_ERROR(r.opt_u32("decoder_sparse_step", c.moe_layer_step));
      c.norm_topk_prob = false;
      MOEX_RETURN_IF_ERROR(r.opt_bool("norm_topk_prob", c.norm_topk_prob));
      c.router = c.norm_topk_prob ? RouterKind::kSoftmaxTopKRenorm : RouterKind::kSoftmaxTopK;
      if (c.arch == Architecture::kQwen2Moe) {
        MOEX_RETURN_IF_ERROR(r.opt_u32("shared_expert_intermediate_size", c.shared_ffn));
        c.n_shared_experts = c.shared_ffn ? 1 : 0;
      }
      if (const auto it = j.find("mlp_only_layers"); it != j.end() && it->is_array() && !it->empty()) {
        return unsupported(src + ": 'mlp_only_layers' is not empty (moex needs regularly spaced MoE layers)");
      }
      break;
    }
    case Architecture::kDeepseekV2:
    case Architecture::kDeepseekV3: {
      MOEX_RETURN_IF_ERROR(r.u32("n_routed_experts", c.n_experts));
      MOEX_RETURN_IF_ERROR(r.u32("moe_intermediate_size", c.expert_ffn));
      MOEX_RETURN_IF_ERROR(r.opt_u32("n_shared_experts", c.n_shared_experts));
      c.shared_ffn = c.n_shared_experts * c.expert_ffn;
      MOEX_RETURN_IF_ERROR(r.opt_u32("first_k_dense_replace", c.first_moe_layer));
      MOEX_RETURN_IF_ERROR(r.opt_u32("moe_layer_freq", c.moe_layer_step));
      MOEX_RETURN_IF_ERROR(r.opt_f32("routed_scaling_factor", c.routed_scaling));
      const std::string method = r.opt_string("topk_method");
      MOEX_RETURN_IF_ERROR(r.opt_u32("n_group", c.n_group));
      MOEX_RETURN_IF_ERROR(r.opt_u32("topk_group", c.topk_group));
      if (method == "greedy") c.n_group = c.topk_group = 1;
      if (c.n_group == 0) c.n_group = 1;
      if (c.topk_group == 0) c.topk_group = 1;
      std::string scoring = r.opt_string("scoring_func");
      if (scoring.empty()) scoring = c.arch == Architecture::kDeepseekV3 ? "sigmoid" : "softmax";
      c.norm_topk_prob = c.arch == Architecture::kDeepseekV3;
      MOEX_RETURN_IF_ERROR(r.opt_bool("norm_topk_prob", c.norm_topk_prob));
      if (scoring == "sigmoid") {
        c.router = RouterKind::kSigmoidBiasScaled;
      } else if (scoring == "softmax" && c.arch == Architecture::kDeepseekV3) {
        return unsupported(src + ": deepseek_v3 with scoring_func 'softmax' (its reference routes by sigmoid only)");
      } else if (scoring == "softmax") {
        // DeepSeek-V2 normalizes only when top_k > 1; otherwise it scales by routed_scaling_factor.
        c.router = c.norm_topk_prob && c.top_k > 1 ? RouterKind::kSoftmaxTopKRenorm : RouterKind::kSoftmaxTopK;
      } else {
        return unsupported(src + ": scoring_func '" + scoring + "' (moex reads softmax and sigmoid)");
      }
      if (const auto it = j.find("qk_rope_head_dim"); it != j.end() && it->is_number_unsigned()) {
        std::uint32_t nope = 0, rope = 0;
        MOEX_RETURN_IF_ERROR(r.opt_u32("qk_nope_head_dim", nope));
        MOEX_RETURN_IF_ERROR(r.opt_u32("qk_rope_head_dim", rope));
        c.head_dim = nope + rope;
      }
      break;
    }
  }
  if (const auto q = j.find("quantization_config"); q != j.end() && q->is_object()) {
    const auto bs = q->find("weight_block_size");
    if (bs != q->end() && bs->is_array() && bs->size() == 2 && (*bs)[0].is_number_unsigned() &&
        (*bs)[1].is_number_unsigned()) {
      const auto b0 = (*bs)[0].get<std::uint64_t>(), b1 = (*bs)[1].get<std::uint64_t>();
      if (b0 != b1 || b0 == 0 || b0 > 4096) return unsupported(src + ": weight_block_size must be square, 1..4096");
      c.fp8_block = static_cast<std::uint32_t>(b0);
    }
  }
  MOEX_RETURN_IF_ERROR(validate_model_config(c, src));
  return c;
}

}  // namespace

std::string_view to_string(Architecture a) noexcept {
  switch (a) {
    case Architecture::kMixtral:
      return "mixtral";
    case Architecture::kQwen2Moe:
      return "qwen2_moe";
    case Architecture::kQwen3Moe:
      return "qwen3_moe";
    case Architecture::kDeepseekV2:
      return "deepseek_v2";
    case Architecture::kDeepseekV3:
      return "deepseek_v3";
    case Architecture::kOlmoe:
      return "olmoe";
    case Architecture::kGptOss:
      return "gpt_oss";
  }
  return "?";
}

Status validate_model_config(const ModelConfig& c, std::string_view source) {
  const std::string s(source);
  auto in = [](std::uint64_t v, std::uint64_t lo, std::uint64_t hi) { return v >= lo && v <= hi; };
  if (!in(c.n_layers, 1, 4096)) return corrupt(s + ": layer count " + std::to_string(c.n_layers) + " out of 1..4096");
  if (!in(c.n_experts, 1, 65536))
    return corrupt(s + ": expert count " + std::to_string(c.n_experts) + " out of 1..65536");
  if (!in(c.top_k, 1, std::min<std::uint32_t>(kMaxTopK, c.n_experts))) {
    return corrupt(s + ": top-k " + std::to_string(c.top_k) + " out of 1.." +
                   std::to_string(std::min<std::uint32_t>(kMaxTopK, c.n_experts)));
  }
  if (!in(c.hidden, 1, 1u << 20)) return corrupt(s + ": hidden size " + std::to_string(c.hidden) + " out of range");
  if (!in(c.expert_ffn, 1, 1u << 20))
    return corrupt(s + ": expert ffn size " + std::to_string(c.expert_ffn) + " out of range");
  if (c.shared_ffn > (1u << 24)) return corrupt(s + ": shared expert ffn size out of range");
  if (c.first_moe_layer >= c.n_layers) return corrupt(s + ": no MoE layer (first_k_dense_replace >= layers)");
  if (c.moe_layer_step == 0) return corrupt(s + ": MoE layer step is 0");
  if (c.n_group == 0 || c.n_experts % c.n_group != 0) return corrupt(s + ": n_group does not divide the expert count");
  if (c.topk_group == 0 || c.topk_group > c.n_group) return corrupt(s + ": topk_group out of 1..n_group");
  if (c.n_heads && c.n_kv_heads && c.n_heads % c.n_kv_heads != 0)
    return corrupt(s + ": heads not a multiple of KV heads");
  if (!(c.routed_scaling > 0.f)) return corrupt(s + ": routed scaling must be > 0");
  return Status::ok();
}

Result<ModelConfig> parse_model_config(std::string_view json_text, std::string_view source) {
  try {
    return parse_impl(json_text, std::string(source));
  } catch (const std::bad_alloc&) {
    return out_of_memory(std::string(source) + ": out of memory");
  } catch (const std::exception& e) {
    return corrupt(std::string(source) + ": " + e.what());
  }
}

Result<ModelConfig> model_config_from_gguf(const GgufFile& g, std::string_view source) {
  const std::string src(source);
  const auto* av = g.find("general.architecture");
  if (!av || !av->as_string()) return corrupt(src + ": missing key 'general.architecture'");
  const std::string a = *av->as_string();
  auto get = [&](const std::string& k) { return g.find(a + "." + k); };
  auto u32 = [&](const std::string& k, std::uint32_t& out, bool required) -> Status {
    const auto* v = get(k);
    if (!v) return required ? corrupt(src + ": missing key '" + a + "." + k + "'") : Status::ok();
    const auto u = v->as_uint();
    if (!u || *u > std::numeric_limits<std::uint32_t>::max())
      return corrupt(src + ": '" + a + "." + k + "' is not an unsigned 32-bit integer");
    out = static_cast<std::uint32_t>(*u);
    return Status::ok();
  };
  auto f32 = [&](const std::string& k, float& out) -> Status {
    const auto* v = get(k);
    if (!v) return Status::ok();
    const auto d = v->as_double();
    if (!d || !std::isfinite(*d) || std::fabs(*d) > 1e30)
      return corrupt(src + ": '" + a + "." + k + "' is not a finite number");
    out = static_cast<float>(*d);
    return Status::ok();
  };
  ModelConfig c;
  std::uint32_t gating = 0;
  MOEX_RETURN_IF_ERROR(u32("expert_gating_func", gating, false));
  if (a == "llama" || a == "mixtral")
    c.arch = Architecture::kMixtral;
  else if (a == "qwen2moe")
    c.arch = Architecture::kQwen2Moe;
  else if (a == "qwen3moe")
    c.arch = Architecture::kQwen3Moe;
  else if (a == "deepseek2")
    c.arch = gating == 2 ? Architecture::kDeepseekV3 : Architecture::kDeepseekV2;
  else if (a == "olmoe")
    c.arch = Architecture::kOlmoe;
  else if (a == "gpt-oss")
    c.arch = Architecture::kGptOss;
  else
    return unsupported(src + ": unsupported GGUF architecture '" + a +
                       "' (moex reads llama/mixtral, qwen2moe, qwen3moe, deepseek2, olmoe, gpt-oss)");
  c.architecture = std::string(to_string(c.arch));
  MOEX_RETURN_IF_ERROR(u32("block_count", c.n_layers, true));
  MOEX_RETURN_IF_ERROR(u32("embedding_length", c.hidden, true));
  MOEX_RETURN_IF_ERROR(u32("expert_count", c.n_experts, true));
  MOEX_RETURN_IF_ERROR(u32("expert_used_count", c.top_k, true));
  MOEX_RETURN_IF_ERROR(u32("feed_forward_length", c.dense_ffn, false));
  c.expert_ffn = c.dense_ffn;
  MOEX_RETURN_IF_ERROR(u32("expert_feed_forward_length", c.expert_ffn, c.arch != Architecture::kMixtral));
  MOEX_RETURN_IF_ERROR(u32("expert_shared_count", c.n_shared_experts, false));
  MOEX_RETURN_IF_ERROR(u32("expert_shared_feed_forward_length", c.shared_ffn, false));
  if (c.arch == Architecture::kQwen2Moe && c.shared_ffn) c.n_shared_experts = 1;
  if ((c.arch == Architecture::kDeepseekV2 || c.arch == Architecture::kDeepseekV3) && !c.shared_ffn) {
    c.shared_ffn = c.n_shared_experts * c.expert_ffn;
  }
  MOEX_RETURN_IF_ERROR(u32("leading_dense_block_count", c.first_moe_layer, false));
  MOEX_RETURN_IF_ERROR(f32("expert_weights_scale", c.routed_scaling));
  if (c.routed_scaling == 0.f) c.routed_scaling = 1.f;
  MOEX_RETURN_IF_ERROR(u32("expert_group_count", c.n_group, false));
  MOEX_RETURN_IF_ERROR(u32("expert_group_used_count", c.topk_group, false));
  if (c.n_group == 0) c.n_group = 1;
  if (c.topk_group == 0) c.topk_group = 1;
  std::uint32_t norm = 0;
  const bool has_norm = get("expert_weights_norm") != nullptr;
  MOEX_RETURN_IF_ERROR(u32("expert_weights_norm", norm, false));
  switch (c.arch) {
    case Architecture::kMixtral:
    case Architecture::kGptOss:
      c.norm_topk_prob = true;
      break;
    case Architecture::kDeepseekV3:
      c.norm_topk_prob = has_norm ? norm != 0 : true;
      break;
    default:
      c.norm_topk_prob = norm != 0;
      break;
  }
  if (c.arch == Architecture::kDeepseekV3)
    c.router = RouterKind::kSigmoidBiasScaled;
  else if (c.arch == Architecture::kDeepseekV2)  // normalized only when top_k > 1 (as in its reference)
    c.router = c.norm_topk_prob && c.top_k > 1 ? RouterKind::kSoftmaxTopKRenorm : RouterKind::kSoftmaxTopK;
  else
    c.router = c.norm_topk_prob ? RouterKind::kSoftmaxTopKRenorm : RouterKind::kSoftmaxTopK;
  MOEX_RETURN_IF_ERROR(u32("attention.head_count", c.n_heads, false));
  c.n_kv_heads = c.n_heads;
  MOEX_RETURN_IF_ERROR(u32("attention.head_count_kv", c.n_kv_heads, false));
  if (c.n_heads) c.head_dim = c.hidden / c.n_heads;
  MOEX_RETURN_IF_ERROR(u32("attention.key_length", c.head_dim, false));
  MOEX_RETURN_IF_ERROR(u32("context_length", c.max_pos, false));
  MOEX_RETURN_IF_ERROR(u32("vocab_size", c.vocab, false));
  MOEX_RETURN_IF_ERROR(f32("rope.freq_base", c.rope_theta));
  MOEX_RETURN_IF_ERROR(f32("attention.layer_norm_rms_epsilon", c.rms_eps));
  MOEX_RETURN_IF_ERROR(validate_model_config(c, src));
  return c;
}

MOEX_NAMESPACE_END
