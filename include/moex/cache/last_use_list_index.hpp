#pragma once
/// @file last_use_list_index.hpp
/// LastUseListIndex: the victim index of LRU — per eviction group, the candidates in a doubly
/// linked list ordered by SlotView::last_use.

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "moex/concepts/eviction.hpp"
#include "moex/status.hpp"

MOEX_NAMESPACE_BEGIN

/// LastUseListIndex — an exact victim index for a policy whose choice is "the candidate of
/// smallest SlotView::last_use" (LruEviction): per eviction group, the candidates in an intrusive
/// doubly linked list in ascending last_use, links in dense per-key arrays.
///
/// The victim is the list head (O(1)). A hit gives the entry the cache's newest last_use, so
/// update() moves it to the tail in O(1); an insert appends at the tail likewise. Only an old
/// entry that becomes a candidate again (unprotect, or the first hit of a prefetched expert after
/// newer accesses) is placed by walking from the tail, O(distance). remove() is O(1).
/// Much cheaper to keep than a rank heap (no sifting on every hit and eviction).
/// Storage is sized in reserve(); add/update/remove/victim never allocate.
/// Thread: the cache's thread only.
class LastUseListIndex {
 public:
  /// Sizes the per-key links and the (empty) per-group lists.
  Status reserve(const VictimIndexShape& shape) {
    n_experts_ = shape.n_experts;
    const std::size_t n_keys = static_cast<std::size_t>(shape.n_layers) * shape.n_experts;
    const bool ok = detail::try_alloc([&] {
      nodes_.assign(n_keys, Node{});
      lists_.assign(shape.n_groups, List{});
    });
    return ok ? Status::ok() : out_of_memory("LastUseListIndex");
  }

  /// Nothing to reserve per insert (links exist for every key).
  void reserve_add(std::uint32_t, ExpertKey, std::size_t) noexcept {}

  /// `s` became a candidate of group g.
  template <class P>
  void add(P&, std::uint32_t g, const SlotView& s) noexcept {
    const std::uint32_t k = key_index(s.key);
    List& l = lists_[g];
    Node& n = nodes_[k];
    n.last_use = s.last_use;
    std::uint32_t after = l.tail;  // the node to link after: the newest one older than s
    while (after != kNil && s.last_use < nodes_[after].last_use) after = nodes_[after].prev;
    n.prev = after;
    n.next = after == kNil ? l.head : nodes_[after].next;
    if (n.prev == kNil)
      l.head = k;
    else
      nodes_[n.prev].next = k;
    if (n.next == kNil)
      l.tail = k;
    else
      nodes_[n.next].prev = k;
    ++l.size;
  }

  /// Candidate `s` of group g was hit (its last_use changed).
  template <class P>
  void update(P& p, std::uint32_t g, const SlotView& s) noexcept {
    unlink(g, key_index(s.key));
    add(p, g, s);
  }

  /// `s` is no longer a candidate of group g.
  template <class P>
  void remove(P&, std::uint32_t g, const SlotView& s) noexcept {
    unlink(g, key_index(s.key));
  }

  /// The candidate of smallest last_use of group g; false when it has none.
  template <class P, class ViewOf>
  bool victim(P&, std::uint32_t g, const VictimQuery&, ViewOf&&, ExpertKey& out) const noexcept {
    const std::uint32_t k = lists_[g].head;
    if (k == kNil) return false;
    out = ExpertKey{k / n_experts_, k % n_experts_};
    return true;
  }

  /// Number of candidates of group g; for tests.
  std::size_t size(std::uint32_t g) const noexcept { return lists_[g].size; }

  /// True when every list is consistently linked, strictly ascending in last_use and as long as
  /// its count; for tests.
  bool check_invariants() const noexcept {
    for (const List& l : lists_) {
      std::size_t n = 0;
      std::uint32_t prev = kNil;
      for (std::uint32_t k = l.head; k != kNil; k = nodes_[k].next) {
        if (k >= nodes_.size() || nodes_[k].prev != prev || ++n > nodes_.size()) return false;
        if (prev != kNil && !(nodes_[prev].last_use < nodes_[k].last_use)) return false;
        prev = k;
      }
      if (l.tail != prev || n != l.size) return false;
    }
    return true;
  }

 private:
  static constexpr std::uint32_t kNil = 0xFFFFFFFFu;
  struct Node {
    std::uint32_t prev = kNil, next = kNil;
    std::uint64_t last_use = 0;  // as the index holds it
  };
  struct List {
    std::uint32_t head = kNil, tail = kNil;
    std::size_t size = 0;
  };

  std::uint32_t key_index(ExpertKey k) const noexcept { return k.layer * n_experts_ + k.expert; }
  void unlink(std::uint32_t g, std::uint32_t k) noexcept {
    List& l = lists_[g];
    Node& n = nodes_[k];
    if (n.prev == kNil)
      l.head = n.next;
    else
      nodes_[n.prev].next = n.next;
    if (n.next == kNil)
      l.tail = n.prev;
    else
      nodes_[n.next].prev = n.prev;
    n.prev = n.next = kNil;
    --l.size;
  }

  std::uint32_t n_experts_ = 1;
  std::vector<Node> nodes_;  // [n_keys]
  std::vector<List> lists_;  // [n_groups]
};

MOEX_NAMESPACE_END
