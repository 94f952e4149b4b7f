// Compile-fail test: a policy whose choose_victim is not noexcept (or missing) must be rejected by
// moex::EvictionPolicy. Built normally it compiles (a complete, conforming policy); built with
// -DMOEX_SHOULD_FAIL_TO_BUILD it must not compile.
#include <cstddef>
#include <span>
#include <string_view>

#include "moex/cache/mixed_precision_cache.hpp"
#include "moex/concepts/eviction.hpp"

struct CandidatePolicy {
  void on_access(const moex::SlotView&) noexcept {}
  void on_insert(const moex::SlotView&) noexcept {}
  void on_evict(const moex::SlotView&) noexcept {}
#ifdef MOEX_SHOULD_FAIL_TO_BUILD
  std::size_t choose_victim(std::span<const moex::SlotView>) { return 0; }  // not noexcept
#else
  std::size_t choose_victim(std::span<const moex::SlotView>) noexcept { return 0; }
#endif
  std::string_view name() const noexcept { return "candidate"; }
};

struct MissingVictim {
  void on_access(const moex::SlotView&) noexcept {}
  void on_insert(const moex::SlotView&) noexcept {}
  void on_evict(const moex::SlotView&) noexcept {}
  std::string_view name() const noexcept { return "missing"; }
};
static_assert(!moex::EvictionPolicy<MissingVictim>, "a policy without choose_victim must be rejected");

// Instantiating the cache is what a user does; the constraint must reject it there.
template class moex::MixedPrecisionCache<CandidatePolicy>;

int main() { return 0; }
