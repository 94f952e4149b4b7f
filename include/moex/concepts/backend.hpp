#pragma once
/// @file backend.hpp
/// The ExecutionBackend concept: fast-tier memory, asynchronous copies into it, expert compute
/// (resident, or where the master copy lives), and a clock.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// Identifies one transfer started by ExecutionBackend::start_load.
using LoadTicket = std::uint64_t;

/// ExecutionBackend — where resident experts live and run.
///
/// Contract
/// - Memory: `allocate_slots(pool, bytes, count)` reserves, before decoding, `count` slots of
///   `bytes` for experts held in precision `pool` (one pool per precision).
/// - Copies: `start_load(pool, slot, src, ticket)` starts copying the expert `src` (a view of a
///   copy in the slow tier) into a slot and returns at once; `wait_load(ticket)` returns when it
///   is usable; `load_done(ticket)` polls; `cancel_load(ticket)` abandons it (between chunks where
///   the backend can; the slot's content is then undefined and the executor frees it).
/// - Compute: `expert_ffn(view, x, n, y)` runs a resident expert; `expert_ffn_at_source(view, x,
///   n, y)` runs an expert where its master copy lives (the host CPU). Either may run
///   asynchronously: results are valid after `sync()`. x, y: row-major f32 [n x hidden].
/// - Cost model: `load_eta_ns(bytes)` and `source_eta_ns(layout, n)` estimate when such work,
///   queued now behind what is queued, would finish (UINT64_MAX: impossible).
/// - `now_ns()` is the clock of every statistic: wall time on real backends, the virtual clock on
///   SimBackend. With `kHasData == false` (the simulator) no bytes move: views may hold null
///   pointers and x, y may be null.
/// - Called from the executor's thread only. Deterministic where the clock is virtual.
///
/// Performance considerations: transfers and compute are what the executor overlaps; a backend
/// never allocates inside start_load, expert_ffn or sync.
template <class B>
concept ExecutionBackend = std::move_constructible<B> &&
    requires(B& b, const B& cb, Precision pool, std::size_t slot, std::size_t bytes, const ExpertView& v,
             const ExpertLayout& l, const float* x, std::size_t n, float* y, LoadTicket t, LoadTicket& tout) {
  { B::kHasData } -> std::convertible_to<bool>;
  { cb.now_ns() }
  noexcept->std::same_as<std::uint64_t>;
  { b.allocate_slots(pool, bytes, n) }
  noexcept->std::same_as<Status>;
  { cb.slot_count(pool) }
  noexcept->std::same_as<std::size_t>;
  { b.start_load(pool, slot, v, tout) }
  noexcept->std::same_as<Status>;
  { b.wait_load(t) }
  noexcept->std::same_as<Status>;
  { b.load_done(t) }
  noexcept->std::same_as<bool>;
  { b.cancel_load(t) }
  noexcept;
  { cb.slot_view(pool, slot, l) }
  noexcept->std::same_as<ExpertView>;
  { b.expert_ffn(v, x, n, y) }
  noexcept->std::same_as<Status>;
  { b.expert_ffn_at_source(v, x, n, y) }
  noexcept->std::same_as<Status>;
  { b.sync() }
  noexcept->std::same_as<Status>;
  { cb.load_eta_ns(bytes) }
  noexcept->std::same_as<std::uint64_t>;
  { cb.source_eta_ns(l, n) }
  noexcept->std::same_as<std::uint64_t>;
};

/// True for a backend that declares `static constexpr bool kComputesExpertMath = true`: its
/// expert_ffn and expert_ffn_at_source honour ExpertView::math (expert biases, gpt-oss's clamped
/// SwiGLU), and expert_ffn_at_source runs experts of another shape than the routed ones (a model's
/// shared experts, held by the store). An executor refuses a model that needs any of this on a
/// backend without it (kUnsupported naming the missing piece) instead of computing it wrong.
template <class B>
inline constexpr bool backend_computes_expert_math = requires {
  requires B::kComputesExpertMath;
};

MOEX_NAMESPACE_END
