#pragma once
/// @file backend.hpp
/// The ExecutionBackend concept: fast-tier memory, copies into it, expert compute, and a clock.

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "moex/quant/layout.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// ExecutionBackend — where resident experts live and run.
///
/// Contract
/// - `allocate_slots(bytes, count)` reserves the whole fast tier once, before decoding.
/// - `load(slot, src)` makes the expert `src` (a view of its copy in the slow tier) resident in
///   `slot` and returns when it is usable. The time it takes is the executor's stall time.
/// - `slot_view(slot, layout)` is the resident expert; `expert_ffn(view, x, n, y)` computes it for
///   n tokens (x, y: row-major f32 [n x hidden]).
/// - `now_ns()` is the clock every statistic uses: wall time on real backends, the virtual clock
///   on SimBackend. Backends with `kHasData == false` (the simulator) move no bytes: views may hold
///   null pointers and x, y may be null.
/// - Called from the executor's thread only. Deterministic where the clock is virtual.
///
/// Performance considerations: load and expert_ffn are the two costs the executor exists to
/// overlap and minimize; a backend must not allocate inside them.
template <class B>
concept ExecutionBackend =
    std::move_constructible<B> &&
    requires(B& b, const B& cb, std::size_t slot, std::size_t bytes, const ExpertView& v, const ExpertLayout& l,
             const float* x, std::size_t n, float* y) {
      { B::kHasData } -> std::convertible_to<bool>;
      { cb.now_ns() } noexcept -> std::same_as<std::uint64_t>;
      { b.allocate_slots(bytes, n) } noexcept -> std::same_as<Status>;
      { cb.slot_count() } noexcept -> std::same_as<std::size_t>;
      { b.load(slot, v) } noexcept -> std::same_as<Status>;
      { cb.slot_view(slot, l) } noexcept -> std::same_as<ExpertView>;
      { b.expert_ffn(v, x, n, y) } noexcept -> std::same_as<Status>;
    };

MOEX_NAMESPACE_END
