#pragma once
/// @file hobbit_victim_index.hpp
/// HobbitVictimIndex: an exact, faster victim choice for HobbitScoreEviction — per-layer skylines
/// of candidates plus per-layer lower bounds of the score.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "moex/concepts/eviction.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// HobbitVictimIndex — picks exactly the candidate HobbitScoreEviction::choose_victim picks,
/// without scoring every candidate.
///
/// Why it is exact. HOBBIT's score is computed as w_r R + w_f F + w_h H + w_d FLD in doubles, and
/// every operation in it (integer-to-double conversion, multiplication by a non-negative number,
/// division by a positive one, 1 - x, addition) is monotone under round-to-nearest. So with
/// non-negative finite weights and non-decreasing steps (last_step then grows with last_use), an
/// entry A of the same layer as B with A.last_use < B.last_use, A.hits <= B.hits and
/// A.hp_uses <= B.hp_uses scores <= B whatever "now" and the normalizers are, and wins a tie by
/// being less recently used: B is never the victim. Only the Pareto-minimal entries of a layer
/// (its skyline; the oldest is always on it) can win, and the formula applied to the skyline's
/// componentwise minima is a lower bound of every skyline score of that layer.
///
/// Victim choice: normalizers (oldest and newest last_step, largest hits and hp_uses) from
/// per-layer summaries, a lower bound per layer, then the layer of smallest bound and every layer
/// whose bound is <= the best exact score so far are scored exactly with the policy's own formula.
/// Per layer, candidates are kept in an array sorted by last_use (a hit moves one to the end) and
/// the skyline is kept incrementally; removing a skyline member (or the holder of a layer maximum)
/// marks the layer for a rebuild (one pass over its candidates) at the next victim choice.
/// Steps that went backwards or weights that are negative or not finite make victim() return
/// false, and the cache falls back to choose_victim.
/// Thread: the cache's thread only. Storage is reserved in reserve() and reserve_add().
class HobbitVictimIndex {
 public:
  /// Sizes the per-key table and the (empty) per-layer cells of every group.
  Status reserve(const VictimIndexShape& shape) {
    shape_ = shape;
    const std::size_t n_keys = static_cast<std::size_t>(shape.n_layers) * shape.n_experts;
    const std::size_t n_cells =
        shape.per_layer_groups ? shape.n_groups : static_cast<std::size_t>(shape.n_groups) * shape.n_layers;
    const bool ok = detail::try_alloc([&] {
      cells_.resize(n_cells);
      key_lu_.assign(n_keys, 0);
      bounds_.assign(shape.per_layer_groups ? 1 : shape.n_layers, 0.0);
    });
    return ok ? Status::ok() : out_of_memory("HobbitVictimIndex");
  }

  /// Room for `key`'s layer in group g, which will hold at most `group_size` entries (may throw).
  void reserve_add(std::uint32_t g, ExpertKey key, std::size_t group_size) {
    Cell& c = cells_[cell_of(g, key.layer)];
    const std::size_t n = std::min<std::size_t>(group_size, shape_.n_experts);
    c.members.reserve(n);
    c.sky.reserve(n);
  }

  /// `s` became a candidate of group g.
  template <class P>
  void add(P&, std::uint32_t g, const SlotView& s) noexcept {
    Cell& c = cells_[cell_of(g, s.key.layer)];
    key_lu_[key_index(s.key)] = s.last_use;
    const Rec r{s.last_use, s.last_step, s.hits, s.hp_uses, s.key.expert};
    c.max_hits = std::max(c.max_hits, r.hits);
    c.max_hp = std::max(c.max_hp, r.hp);
    if (c.members.empty() || c.members.back().last_use < r.last_use) {
      c.members.push_back(r);  // capacity reserved by reserve_add
      if (!c.dirty) append_newest(c, r);
    } else {  // an old entry comes back (unprotect): insert in order, rebuild the skyline later
      c.members.insert(lower(c.members, r.last_use), r);
      c.dirty = true;
    }
  }

  /// Candidate `s` of group g was hit.
  template <class P>
  void update(P& p, std::uint32_t g, const SlotView& s) noexcept {
    remove(p, g, s);
    add(p, g, s);
  }

  /// `s` is no longer a candidate of group g.
  template <class P>
  void remove(P&, std::uint32_t g, const SlotView& s) noexcept {
    Cell& c = cells_[cell_of(g, s.key.layer)];
    const std::uint64_t lu = key_lu_[key_index(s.key)];
    const auto it = lower(c.members, lu);
    if (it == c.members.end() || it->last_use != lu) return;  // not a candidate (cannot happen)
    const Rec r = *it;
    c.members.erase(it);
    if (c.members.empty()) {
      c.sky.clear();
      c.max_hits = c.max_hp = 0;
      c.dirty = false;
      return;
    }
    if (c.dirty) return;
    const auto sk = lower(c.sky, lu);
    if ((sk != c.sky.end() && sk->last_use == lu) || r.hits == c.max_hits || r.hp == c.max_hp) c.dirty = true;
  }

  /// The key HobbitScoreEviction::choose_victim would pick among group g's candidates; false when
  /// the group is empty or exactness cannot be guaranteed (see the class comment).
  template <class P, class ViewOf>
  bool victim(P& p, std::uint32_t g, const VictimQuery& q, ViewOf&&, ExpertKey& out) noexcept {
    if (!q.steps_monotone || !p.index_exact()) return false;
    const std::size_t n_cells = shape_.per_layer_groups ? 1 : shape_.n_layers;
    const std::size_t first = shape_.per_layer_groups ? g : static_cast<std::size_t>(g) * shape_.n_layers;
    bool any = false;
    std::uint64_t oldest = 0, newest = 0;
    std::uint32_t max_hits = 0, max_hp = 0;
    for (std::size_t i = 0; i < n_cells; ++i) {
      Cell& c = cells_[first + i];
      if (c.members.empty()) continue;
      if (c.dirty) rebuild(c);
      oldest = any ? std::min(oldest, c.members.front().last_step) : c.members.front().last_step;
      newest = std::max(newest, c.members.back().last_step);
      max_hits = std::max(max_hits, c.max_hits);
      max_hp = std::max(max_hp, c.max_hp);
      any = true;
    }
    if (!any) return false;
    const auto norms = p.norms(oldest, newest, max_hits, max_hp);
    std::size_t best_cell = n_cells;
    for (std::size_t i = 0; i < n_cells; ++i) {
      const Cell& c = cells_[first + i];
      if (c.members.empty()) continue;
      const double fld = p.layer_term(layer_of(g, i));
      bounds_[i] = p.score_of(c.sky.front().last_step, c.min_hits, c.min_hp, fld, norms);
      if (best_cell == n_cells || bounds_[i] < bounds_[best_cell]) best_cell = i;
    }
    Best best;
    scan(p, g, best_cell, first, norms, best);
    for (std::size_t i = 0; i < n_cells; ++i) {
      if (i == best_cell || cells_[first + i].members.empty() || bounds_[i] > best.score) continue;
      scan(p, g, i, first, norms, best);
    }
    out = ExpertKey{best.layer, best.expert};
    return true;
  }

  /// True when every cell's members are sorted, its skyline is exactly the Pareto-minimal set of
  /// its members and its summaries agree (cells awaiting a rebuild are rebuilt first); for tests.
  bool check_invariants() noexcept {
    for (Cell& c : cells_) {
      if (c.dirty) rebuild(c);
      std::uint32_t mh = 0, mp = 0;
      std::size_t n_sky = 0;
      for (std::size_t i = 0; i < c.members.size(); ++i) {
        const Rec& m = c.members[i];
        if (i > 0 && !(c.members[i - 1].last_use < m.last_use)) return false;
        mh = std::max(mh, m.hits);
        mp = std::max(mp, m.hp);
        bool dominated = false;
        for (std::size_t j = 0; j < i; ++j) dominated = dominated || dominates(c.members[j], m);
        if (!dominated) {
          if (n_sky >= c.sky.size() || c.sky[n_sky].last_use != m.last_use) return false;
          ++n_sky;
        }
      }
      if (n_sky != c.sky.size() || mh != c.max_hits || mp != c.max_hp) return false;
      for (const Rec& y : c.sky)
        if (y.hits < c.min_hits || y.hp < c.min_hp) return false;
    }
    return true;
  }

 private:
  struct Rec {
    std::uint64_t last_use;
    std::uint64_t last_step;
    std::uint32_t hits;
    std::uint32_t hp;
    std::uint32_t expert;
  };
  struct Cell {
    std::vector<Rec> members;                // candidates of one layer in one group, ascending last_use
    std::vector<Rec> sky;                    // the members no older member dominates, ascending last_use
    std::uint32_t max_hits = 0, max_hp = 0;  // over members
    std::uint32_t min_hits = 0, min_hp = 0;  // over sky
    bool dirty = false;                      // sky / maxima must be rebuilt from members
  };
  struct Best {
    bool found = false;
    double score = 0;
    std::uint64_t last_use = 0;
    std::uint32_t layer = 0, expert = 0;
  };

  static bool dominates(const Rec& a, const Rec& b) noexcept { return a.hits <= b.hits && a.hp <= b.hp; }
  static std::vector<Rec>::iterator lower(std::vector<Rec>& v, std::uint64_t lu) noexcept {
    return std::lower_bound(v.begin(), v.end(), lu, [](const Rec& r, std::uint64_t x) { return r.last_use < x; });
  }
  std::size_t key_index(ExpertKey k) const noexcept {
    return static_cast<std::size_t>(k.layer) * shape_.n_experts + k.expert;
  }
  std::size_t cell_of(std::uint32_t g, std::uint32_t layer) const noexcept {
    return shape_.per_layer_groups ? g : static_cast<std::size_t>(g) * shape_.n_layers + layer;
  }
  std::uint32_t layer_of(std::uint32_t g, std::size_t i) const noexcept {
    return shape_.per_layer_groups ? g / shape_.pools : static_cast<std::uint32_t>(i);
  }

  // r is the newest member of c (already appended to members); c's skyline is up to date.
  static void append_newest(Cell& c, const Rec& r) noexcept {
    for (const Rec& y : c.sky)
      if (dominates(y, r)) return;
    if (c.sky.empty()) {
      c.min_hits = r.hits;
      c.min_hp = r.hp;
    } else {
      c.min_hits = std::min(c.min_hits, r.hits);
      c.min_hp = std::min(c.min_hp, r.hp);
    }
    c.sky.push_back(r);  // capacity reserved with members
  }
  static void rebuild(Cell& c) noexcept {
    c.sky.clear();
    c.max_hits = c.max_hp = 0;
    for (const Rec& m : c.members) {
      c.max_hits = std::max(c.max_hits, m.hits);
      c.max_hp = std::max(c.max_hp, m.hp);
      append_newest(c, m);
    }
    c.dirty = false;
  }
  template <class P, class Norms>
  void scan(const P& p, std::uint32_t g, std::size_t i, std::size_t first, const Norms& norms,
            Best& best) const noexcept {
    const Cell& c = cells_[first + i];
    const std::uint32_t layer = layer_of(g, i);
    const double fld = p.layer_term(layer);
    for (const Rec& y : c.sky) {
      const double s = p.score_of(y.last_step, y.hits, y.hp, fld, norms);
      if (!best.found || s < best.score || (s == best.score && y.last_use < best.last_use)) {
        best = Best{true, s, y.last_use, layer, y.expert};
      }
    }
  }

  VictimIndexShape shape_{};
  std::vector<Cell> cells_;            // per (group, layer); one per group with per-layer groups
  std::vector<std::uint64_t> key_lu_;  // [n_keys] last_use of a candidate as the index holds it
  std::vector<double> bounds_;         // scratch: lower bound per cell of one group
};

MOEX_NAMESPACE_END
