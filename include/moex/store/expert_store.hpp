#pragma once
/// @file expert_store.hpp
/// ExpertStore: the master copies of every expert in their slowest tier, low-precision copies
/// built from them, and each layer's router.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moex/quant/layout.hpp"
#include "moex/route/router_config.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

class ThreadPool;

/// Progress of a long operation: `done` of `total` units of the step named `what` (the same alias
/// as in formats/checkpoint.hpp).
using ProgressFn = std::function<void(std::uint64_t done, std::uint64_t total, std::string_view what)>;

/// What one MoE block computes besides its routed experts' plain SwiGLU (docs/formats.md has the
/// table per architecture). The default is Mixtral's block: routed experts only, no biases.
///   out = sum_k w_k E_k(x) + [sigmoid(g . x)] S(x)
/// where E_k uses `activation` and, with `expert_biases`, each expert's b1, b3, b2 (ExpertMath),
/// and S is the layer's shared expert (intermediate size `shared_ffn`; several DeepSeek shared
/// experts are one merged expert), scaled by the sigmoid gate when `shared_gate` (Qwen2-MoE).
struct MoeBlockSpec {
  FfnActivation activation = FfnActivation::kSwiGlu;  ///< of the routed experts
  float activation_alpha = 1.702f;                    ///< kClampedSwiGlu's slope (gpt-oss)
  float activation_limit = 7.f;                       ///< kClampedSwiGlu's clamp (swiglu_limit)
  bool expert_biases = false;                         ///< routed experts carry b1, b3, b2 (gpt-oss)
  std::uint32_t shared_ffn = 0;                       ///< 0: no shared expert
  bool shared_gate = false;                           ///< sigmoid gate on the shared expert (Qwen2-MoE)

  /// True for Mixtral's block (what every backend computes).
  bool plain() const noexcept {
    return activation == FfnActivation::kSwiGlu && !expert_biases && shared_ffn == 0 && !shared_gate;
  }
  /// The pieces of this block beyond Mixtral's, comma-separated ("" when plain()): for messages.
  std::string extras() const;
};

/// The MoE part of a model: what every component needs to know about its shape.
struct MoeModelSpec {
  std::uint32_t n_layers = 0;  ///< MoE layers (dense layers of the checkpoint are not counted)
  std::uint32_t n_experts = 0;
  ExpertShape shape{};
  RouterConfig router{};  ///< router.n_experts == n_experts
  MoeBlockSpec block{};   ///< shared experts, biases, activation (default: Mixtral's block)
};

/// Checks a spec: kInvalidArgument naming the bad field.
Status validate(const MoeModelSpec& spec) noexcept;

/// The master copies of all experts and the copies in other precisions.
///
/// Master copies live where they were read from: host RAM the store owns, or memory that an owner
/// keeps alive (a memory-mapped checkpoint: the disk tier). Copies in other precisions are built
/// on all cores into host RAM. Thread safety: const methods may run concurrently; building copies
/// and setting experts need exclusive access.
class ExpertStore {
 public:
  ExpertStore() = default;
  ExpertStore(ExpertStore&&) noexcept = default;
  ExpertStore& operator=(ExpertStore&&) noexcept = default;

  /// An empty store whose experts will be held in `master_format`. Routers start as zeros.
  static Result<ExpertStore> create(const MoeModelSpec& spec, WeightFormat master_format);

  /// A store of shapes only, for simulation (SimBackend): every expert "exists" in the master
  /// format and in each of `extra_formats`, views have the right layouts but null data, and there
  /// are no router weights. Data backends refuse it.
  static Result<ExpertStore> create_virtual(const MoeModelSpec& spec, WeightFormat master_format,
                                            std::span<const WeightFormat> extra_formats = {});
  /// True for a store made by create_virtual.
  bool is_virtual() const noexcept { return virtual_; }

  const MoeModelSpec& spec() const noexcept { return spec_; }
  WeightFormat master_format() const noexcept { return master_format_; }
  /// Where the master copies live: kHost (owned RAM) or kDisk (a mapped file).
  Tier master_tier() const noexcept { return master_tier_; }

  /// Encodes f32 weights (w1, w3: [ffn x hidden], w2: [hidden x ffn]) into the master format
  /// (kUnsupported for block formats, which cannot be encoded: see set_expert_blob).
  Status set_expert(ExpertKey key, const float* w1, const float* w3, const float* w2);
  /// Copies one expert blob already in the master layout (expert_layout(spec().shape,
  /// master_format()), exactly that many bytes) into the store's own memory: how block-format
  /// masters (GGUF Q8_0/Q4_0/Q4_K, fp8 e4m3 with its scales) are kept without decoding. The caller
  /// vouches for the content; errors: kInvalidArgument for a key out of range or a size mismatch.
  Status set_expert_blob(ExpertKey key, std::span<const std::byte> blob);
  /// Uses memory kept alive elsewhere (e.g. a mapped checkpoint) as the master copy, in place.
  /// The view's layout must match spec().shape and master_format(). Marks the tier kDisk when
  /// `tier` says so.
  Status set_expert_view(ExpertKey key, const ExpertView& view, Tier tier = Tier::kDisk);
  /// Keeps `owner` alive as long as the store (the mapping behind set_expert_view views).
  void keep_alive(std::shared_ptr<const void> owner);

  /// Router weights [n_experts x hidden] (f32) and optional bias [n_experts]: a selection bias
  /// for sigmoid routers (DeepSeek-V3), added to the logits for softmax routers (gpt-oss); see
  /// route_token.
  Status set_router(std::uint32_t layer, std::span<const float> weights, std::span<const float> bias = {});
  const float* router_weights(std::uint32_t layer) const noexcept;
  std::span<const float> router_bias(std::uint32_t layer) const noexcept;

  /// Builds a copy of every expert in `format` (f32/f16/bf16/int8/int4/int2, decoded from the
  /// master whatever its format, block formats included; replaces an older copy of the same
  /// precision). Block formats cannot be built (kUnsupported). Runs on `pool` (null: the global pool); reports progress
  /// per expert.
  Status build_precision(WeightFormat format, ThreadPool* pool = nullptr, const ProgressFn& progress = {});

  /// The built copy of precision `p`: every expert's blob back to back, in key order (layer-major),
  /// each expert_bytes(p) long. Empty when `p` is not a built copy (the master, or not held).
  std::span<const std::byte> copy_blob(Precision p) const noexcept;
  /// Adopts a copy built earlier (e.g. read from a cache file): `blob` must be exactly what
  /// copy_blob would return for `format`. The caller vouches for its content.
  Status adopt_copy(WeightFormat format, std::vector<std::byte> blob);

  /// True when every expert exists in precision `p` (the master's precision included).
  bool has_precision(Precision p) const noexcept;
  /// The format held for precision `p`, if any.
  std::optional<WeightFormat> format(Precision p) const noexcept;
  /// Precisions held, master first.
  std::vector<Precision> precisions() const;
  /// Bytes of one expert in precision `p` (0 when not held).
  std::size_t expert_bytes(Precision p) const noexcept;

  /// A view of an expert in precision `p`. kNotFound when the precision is not held or the expert
  /// was never set; kInvalidArgument for a key out of range.
  Result<ExpertView> view(ExpertKey key, Precision p) const noexcept;
  /// The master copy (set_expert or set_expert_view).
  Result<ExpertView> master(ExpertKey key) const noexcept { return view(key, master_format_.precision); }

  /// True once every expert has a master copy, and, where spec().block asks for them, every
  /// expert its biases and every layer its shared expert (and gate).
  bool complete() const noexcept;
  /// What complete() lacks, as a message ("" when complete).
  std::string missing() const;

  // ---- the rest of the block (MoeBlockSpec) ---------------------------------------------------

  /// Sets the biases of a routed expert (spec().block.expert_biases): b1, b3 [ffn], b2 [hidden],
  /// copied. kInvalidArgument when the block has no expert biases, or for a size mismatch or a
  /// non-finite value.
  Status set_expert_biases(ExpertKey key, std::span<const float> b1, std::span<const float> b3,
                           std::span<const float> b2);
  /// The activation and biases of a routed expert, the same for every precision; null for a
  /// plain block (Mixtral's expert). Views from view() carry it already.
  const ExpertMath* expert_math(ExpertKey key) const noexcept;

  /// Sets the shared expert of MoE layer `layer` from f32 weights (w1, w3: [shared_ffn x hidden],
  /// w2: [hidden x shared_ffn]), encoded in `format` (f32, f16 or bf16: pick the checkpoint's own
  /// dtype to keep it exact) into memory the store owns: the shared expert is resident, never
  /// evicted, and does not count against an executor's cache budget. kInvalidArgument when the
  /// block has no shared expert, or for a bad layer or format.
  Status set_shared_expert(std::uint32_t layer, const float* w1, const float* w3, const float* w2, WeightFormat format);
  /// Sets Qwen2-MoE's shared-expert gate of `layer`: [hidden] f32 (spec().block.shared_gate).
  Status set_shared_gate(std::uint32_t layer, std::span<const float> gate);
  /// The shared expert of `layer` (kNotFound when the block has none or it was never set).
  Result<ExpertView> shared_expert(std::uint32_t layer) const noexcept;
  /// The shared-expert gate of `layer`: [hidden], empty when there is none.
  std::span<const float> shared_gate(std::uint32_t layer) const noexcept;
  /// Bytes of every shared expert held (resident beside the routed cache; 0 when none).
  std::uint64_t shared_expert_bytes() const noexcept;

 private:
  struct Copy {
    WeightFormat format{};
    ExpertLayout layout{};
    std::vector<std::byte> blob;  // n_layers*n_experts expert blobs back to back (owned copies)
  };

  std::size_t index(ExpertKey k) const noexcept { return std::size_t{k.layer} * spec_.n_experts + k.expert; }
  Status check_key(ExpertKey k) const noexcept;
  /// The owned master blob of `key` (the owned blob is allocated on first use).
  std::byte* owned_master(ExpertKey key);

  MoeModelSpec spec_{};
  WeightFormat master_format_{};
  Tier master_tier_ = Tier::kHost;
  bool virtual_ = false;
  ExpertLayout master_layout_{};
  std::vector<std::byte> master_blob_;      // owned master copies (set_expert)
  std::vector<ExpertView> master_views_;    // per expert; w1_data null until set
  std::vector<Copy> copies_;                // other precisions
  std::vector<float> routers_;              // n_layers * n_experts * hidden
  std::vector<std::vector<float>> biases_;  // per layer, may be empty
  std::vector<std::shared_ptr<const void>> owners_;
  // The block beyond Mixtral's (MoeBlockSpec).
  ExpertMath activation_math_{};           // activation only (no biases): shared by every expert
  std::vector<float> expert_bias_values_;  // per expert: b1 [ffn], b3 [ffn], b2 [hidden]
  std::vector<ExpertMath> expert_math_;    // per expert, pointing into expert_bias_values_
  std::vector<std::uint8_t> biases_set_;   // per expert
  struct Shared {
    std::vector<std::byte> blob;  // expert_layout({hidden, shared_ffn}, format)
    ExpertLayout layout{};
    std::vector<float> gate;  // [hidden] or empty
  };
  std::vector<Shared> shared_;  // per layer (empty when the block has none)
};

MOEX_NAMESPACE_END
