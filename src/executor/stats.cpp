#include "moex/executor/stats.hpp"

#include <algorithm>

#include <nlohmann/json.hpp>

MOEX_NAMESPACE_BEGIN

LayerStats& LayerStats::operator+=(const LayerStats& o) noexcept {
  steps += o.steps;
  tokens += o.tokens;
  expert_calls += o.expert_calls;
  hits += o.hits;
  misses += o.misses;
  for (std::size_t i = 0; i < kPrecisionCount; ++i) misses_by_precision[i] += o.misses_by_precision[i];
  bytes_loaded += o.bytes_loaded;
  evictions += o.evictions;
  skipped += o.skipped;
  computed_at_source += o.computed_at_source;
  prefetches += o.prefetches;
  prefetch_hits += o.prefetch_hits;
  prefetch_wasted_bytes += o.prefetch_wasted_bytes;
  predicted += o.predicted;
  predicted_correct += o.predicted_correct;
  selected += o.selected;
  stall_ns += o.stall_ns;
  compute_ns += o.compute_ns;
  route_ns += o.route_ns;
  total_ns += o.total_ns;
  return *this;
}

LayerStats ExecutorStats::total() const noexcept {
  LayerStats t;
  for (const auto& l : layers) t += l;
  // steps of the whole stack = steps of its busiest layer, not the sum
  t.steps = 0;
  for (const auto& l : layers) t.steps = std::max(t.steps, l.steps);
  return t;
}

void ExecutorStats::reset() noexcept {
  for (auto& l : layers) l = LayerStats{};
  depths.clear();
}

namespace {
nlohmann::json to_json_obj(const LayerStats& s) {
  nlohmann::json j;
  j["steps"] = s.steps;
  j["tokens"] = s.tokens;
  j["expert_calls"] = s.expert_calls;
  j["hits"] = s.hits;
  j["misses"] = s.misses;
  j["hit_rate"] = s.hit_rate();
  nlohmann::json mp = nlohmann::json::object();
  for (std::size_t i = 0; i < kPrecisionCount; ++i)
    if (s.misses_by_precision[i]) mp[std::string(to_string(static_cast<Precision>(i)))] = s.misses_by_precision[i];
  j["misses_by_precision"] = mp;
  j["bytes_loaded"] = s.bytes_loaded;
  j["evictions"] = s.evictions;
  j["skipped"] = s.skipped;
  j["computed_at_source"] = s.computed_at_source;
  j["prefetches"] = s.prefetches;
  j["prefetch_hits"] = s.prefetch_hits;
  j["prefetch_wasted_bytes"] = s.prefetch_wasted_bytes;
  j["predicted"] = s.predicted;
  j["predicted_correct"] = s.predicted_correct;
  j["selected"] = s.selected;
  j["recall"] = s.recall();
  j["stall_ns"] = s.stall_ns;
  j["compute_ns"] = s.compute_ns;
  j["route_ns"] = s.route_ns;
  j["total_ns"] = s.total_ns;
  return j;
}
}  // namespace

std::string ExecutorStats::to_json() const {
  nlohmann::json j;
  j["total"] = to_json_obj(total());
  j["layers"] = nlohmann::json::array();
  for (const auto& l : layers) j["layers"].push_back(to_json_obj(l));
  j["recall_by_depth"] = nlohmann::json::array();
  for (std::size_t d = 0; d < depths.size(); ++d)
    j["recall_by_depth"].push_back({{"depth", d + 1},
                                    {"selected", depths[d].selected},
                                    {"predicted_correct", depths[d].predicted_correct},
                                    {"recall", depths[d].recall()}});
  if (resident_shared_bytes) j["resident_shared_bytes"] = resident_shared_bytes;
  return j.dump(2);
}

MOEX_NAMESPACE_END
