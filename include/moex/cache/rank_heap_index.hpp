#pragma once
/// @file rank_heap_index.hpp
/// RankHeapIndex: the victim index MixedPrecisionCache keeps for a RankedEviction policy — one
/// indexed binary min-heap of candidate ranks per eviction group.

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "moex/concepts/eviction.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// RankHeapIndex — per eviction group, an indexed binary min-heap over the ranks of the group's
/// candidates (unprotected entries), positions kept in one dense per-key array.
///
/// The victim is the heap top (O(1)); add/remove/update are O(log n). A rank that grows (every
/// hit under LRU/LFU/LRFU) is moved with a bottom-up sift: the hole goes down along the smaller
/// children (one comparison per level) and the entry sifts up from the leaf, which is short
/// because a freshly hit entry belongs near the bottom.
/// For an ExpiringRankEviction policy a second heap per group orders the candidates by rank
/// expiry; before answering, every candidate whose rank expired (expiry < now) gets its rank
/// recomputed, so the top is exact. Storage is reserved in reserve() and reserve_add() (which the
/// cache calls where it reserves its own group storage); add/update/remove/victim never allocate.
/// Thread: the cache's thread only.
template <RankedEviction P>
class RankHeapIndex {
 public:
  using Rank = eviction_rank_t<P>;

  /// Sizes the per-key positions and the (empty) per-group heaps.
  Status reserve(const VictimIndexShape& shape) {
    n_experts_ = shape.n_experts;
    const std::size_t n_keys = static_cast<std::size_t>(shape.n_layers) * shape.n_experts;
    const bool ok = detail::try_alloc([&] {
      heaps_.resize(shape.n_groups);
      pos_.assign(n_keys, kAbsent);
      if constexpr (ExpiringRankEviction<P>) {
        eheaps_.resize(shape.n_groups);
        epos_.assign(n_keys, kAbsent);
      }
    });
    return ok ? Status::ok() : out_of_memory("RankHeapIndex");
  }

  /// Makes room for `n` candidates in group g (may throw std::bad_alloc; the cache calls it
  /// inside its own reservation before an insert, so that add() never allocates).
  void reserve_add(std::uint32_t g, ExpertKey /*key*/, std::size_t n) {
    heaps_[g].reserve(n);
    if constexpr (ExpiringRankEviction<P>) eheaps_[g].reserve(n);
  }

  /// `s` became a candidate of group g.
  void add(P& p, std::uint32_t g, const SlotView& s) noexcept {
    const std::uint32_t k = key_index(s.key);
    const Rank r = p.rank(s);
    const auto i = static_cast<std::uint32_t>(heaps_[g].size());
    heaps_[g].push_back(Node{r, k});  // capacity reserved by reserve_group
    pos_[k] = i;
    sift_up(heaps_[g].data(), i);
    if constexpr (ExpiringRankEviction<P>) {
      eheaps_[g].push_back(ENode{p.rank_expiry(r), k});
      epos_[k] = i;
      esift_up(eheaps_[g].data(), i);
    }
  }

  /// Candidate `s` of group g was hit: its rank is read again.
  void update(P& p, std::uint32_t g, const SlotView& s) noexcept { rerank(p, g, key_index(s.key), s); }

  /// `s` is no longer a candidate of group g.
  void remove(P&, std::uint32_t g, const SlotView& s) noexcept {
    const std::uint32_t k = key_index(s.key);
    Node* h = heaps_[g].data();
    const std::uint32_t i = pos_[k];
    const auto last = static_cast<std::uint32_t>(heaps_[g].size() - 1);
    pos_[k] = kAbsent;
    if (i != last) {
      const Rank old = h[i].rank;
      h[i] = h[last];
      pos_[h[i].key] = i;
      if (h[i].rank < old)
        sift_up(h, i);
      else
        sift_down_bottom_up(h, last, i);  // the last leaf's rank mostly belongs near the bottom
    }
    heaps_[g].pop_back();
    if constexpr (ExpiringRankEviction<P>) {
      ENode* e = eheaps_[g].data();
      const std::uint32_t j = epos_[k];
      epos_[k] = kAbsent;
      if (j != last) {
        const std::uint64_t old = e[j].expiry;
        e[j] = e[last];
        epos_[e[j].key] = j;
        if (e[j].expiry < old)
          esift_up(e, j);
        else
          esift_down(e, last, j);
      }
      eheaps_[g].pop_back();
    }
  }

  /// The smallest-rank candidate of group g (false when it has none, or when expiring ranks
  /// cannot be refreshed exactly because steps went backwards). `view_of(key)` gives a candidate's
  /// current SlotView, to recompute expired ranks.
  template <class ViewOf>
  bool victim(P& p, std::uint32_t g, const VictimQuery& q, ViewOf&& view_of, ExpertKey& out) noexcept {
    if (heaps_[g].empty()) return false;
    if constexpr (ExpiringRankEviction<P>) {
      if (!q.steps_monotone) return false;
      ENode* e = eheaps_[g].data();
      while (e[0].expiry < q.now) {
        const std::uint32_t k = e[0].key;
        const SlotView& s = view_of(ExpertKey{k / n_experts_, k % n_experts_});
        const std::uint64_t before = e[0].expiry;
        rerank(p, g, k, s);
        if (!(before < e[epos_[k]].expiry)) return false;  // a policy whose expiry does not advance
      }
    }
    const std::uint32_t k = heaps_[g][0].key;
    out = ExpertKey{k / n_experts_, k % n_experts_};
    return true;
  }

  /// Number of candidates of group g; for tests.
  std::size_t size(std::uint32_t g) const noexcept { return heaps_[g].size(); }

  /// True when every group's heaps satisfy the heap property and the positions agree; for tests.
  bool check_invariants() const noexcept {
    for (std::size_t g = 0; g < heaps_.size(); ++g) {
      const Node* h = heaps_[g].data();
      for (std::uint32_t i = 0; i < heaps_[g].size(); ++i) {
        if (pos_[h[i].key] != i) return false;
        if (i > 0 && h[i].rank < h[(i - 1) / 2].rank) return false;
        if constexpr (ExpiringRankEviction<P>) {
          if (eheaps_[g].size() != heaps_[g].size()) return false;
          const ENode* e = eheaps_[g].data();
          if (epos_[e[i].key] != i) return false;
          if (i > 0 && e[i].expiry < e[(i - 1) / 2].expiry) return false;
        }
      }
    }
    return true;
  }

 private:
  static constexpr std::uint32_t kAbsent = 0xFFFFFFFFu;
  struct Node {
    Rank rank;
    std::uint32_t key;
  };
  struct ENode {
    std::uint64_t expiry;
    std::uint32_t key;
  };

  std::uint32_t key_index(ExpertKey k) const noexcept { return k.layer * n_experts_ + k.expert; }

  // Reads the rank of candidate k again and restores both heaps.
  void rerank(P& p, std::uint32_t g, std::uint32_t k, const SlotView& s) noexcept {
    Node* h = heaps_[g].data();
    const auto n = static_cast<std::uint32_t>(heaps_[g].size());
    const std::uint32_t i = pos_[k];
    const Rank r = p.rank(s);
    if (r < h[i].rank) {
      h[i].rank = r;
      sift_up(h, i);
    } else {
      h[i].rank = r;
      sift_down_bottom_up(h, n, i);
    }
    if constexpr (ExpiringRankEviction<P>) {
      ENode* e = eheaps_[g].data();
      const std::uint32_t j = epos_[k];
      const std::uint64_t x = p.rank_expiry(r);
      const std::uint64_t old = e[j].expiry;
      e[j].expiry = x;
      if (x < old)
        esift_up(e, j);
      else
        esift_down(e, n, j);
    }
  }

  void sift_up(Node* h, std::uint32_t i) noexcept {
    const Node x = h[i];
    while (i > 0) {
      const std::uint32_t parent = (i - 1) / 2;
      if (!(x.rank < h[parent].rank)) break;
      h[i] = h[parent];
      pos_[h[i].key] = i;
      i = parent;
    }
    h[i] = x;
    pos_[x.key] = i;
  }
  void sift_down(Node* h, std::uint32_t n, std::uint32_t i) noexcept {
    const Node x = h[i];
    for (;;) {
      std::uint32_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && h[c + 1].rank < h[c].rank) ++c;
      if (!(h[c].rank < x.rank)) break;
      h[i] = h[c];
      pos_[h[i].key] = i;
      i = c;
    }
    h[i] = x;
    pos_[x.key] = i;
  }
  // For a rank that grew: hole to a leaf along the smaller children, then sift up from there.
  void sift_down_bottom_up(Node* h, std::uint32_t n, std::uint32_t i) noexcept {
    const Node x = h[i];
    for (;;) {
      std::uint32_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && h[c + 1].rank < h[c].rank) ++c;
      h[i] = h[c];
      pos_[h[i].key] = i;
      i = c;
    }
    h[i] = x;
    sift_up(h, i);
  }
  void esift_up(ENode* e, std::uint32_t i) noexcept {
    const ENode x = e[i];
    while (i > 0) {
      const std::uint32_t parent = (i - 1) / 2;
      if (!(x.expiry < e[parent].expiry)) break;
      e[i] = e[parent];
      epos_[e[i].key] = i;
      i = parent;
    }
    e[i] = x;
    epos_[x.key] = i;
  }
  void esift_down(ENode* e, std::uint32_t n, std::uint32_t i) noexcept {
    const ENode x = e[i];
    for (;;) {
      std::uint32_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && e[c + 1].expiry < e[c].expiry) ++c;
      if (!(e[c].expiry < x.expiry)) break;
      e[i] = e[c];
      epos_[e[i].key] = i;
      i = c;
    }
    e[i] = x;
    epos_[x.key] = i;
  }

  std::uint32_t n_experts_ = 1;
  std::vector<std::vector<Node>> heaps_;    // [n_groups] rank heaps
  std::vector<std::uint32_t> pos_;          // [n_keys] heap position, kAbsent when not a candidate
  std::vector<std::vector<ENode>> eheaps_;  // [n_groups] expiry heaps (ExpiringRankEviction only)
  std::vector<std::uint32_t> epos_;
};

MOEX_NAMESPACE_END
