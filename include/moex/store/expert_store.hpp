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

/// The MoE part of a model: what every component needs to know about its shape.
struct MoeModelSpec {
  std::uint32_t n_layers = 0;  ///< MoE layers (dense layers of the checkpoint are not counted)
  std::uint32_t n_experts = 0;
  ExpertShape shape{};
  RouterConfig router{};  ///< router.n_experts == n_experts
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

  /// Router weights [n_experts x hidden] (f32) and optional selection bias [n_experts].
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

  /// True once every expert has a master copy.
  bool complete() const noexcept;

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
};

MOEX_NAMESPACE_END
