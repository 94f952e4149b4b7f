// Routing traces: validation, moex's binary and JSON Lines forms, and readers for the real traces
// in ../shared (NumPy router logits, Mixtral JSON Lines, FLAME-MoE CSV).
#include "moex/formats/trace.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "moex/quant/half.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'X', 'T', 'R', 'C', '\0'};
constexpr std::uint32_t kVersion = 1;
constexpr std::uint32_t kFlagLogits = 1;
// Sanity caps: far above any real model, low enough that products of them cannot overflow.
constexpr std::uint32_t kMaxLayers = 1u << 12;
constexpr std::uint32_t kMaxExperts = 1u << 16;

Result<std::string> read_file(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return io_error("cannot open " + path.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return io_error("cannot read " + path.string());
  return std::move(ss).str();
}

Status check_dims(std::uint32_t n_layers, std::uint32_t n_experts, std::uint32_t top_k) {
  if (n_layers == 0 || n_layers > kMaxLayers) return corrupt("trace: n_layers out of range");
  if (n_experts == 0 || n_experts > kMaxExperts) return corrupt("trace: n_experts out of range");
  if (top_k == 0 || top_k > n_experts) return corrupt("trace: top_k out of range");
  return Status::ok();
}

// Reads little-endian PODs from a byte buffer with bounds checks.
class Reader {
 public:
  explicit Reader(std::string_view data) : data_(data) {}
  template <class T>
  bool get(T& out) {
    if (data_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(&out, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  template <class T>
  bool get_array(std::vector<T>& out, std::size_t n) {
    if (n > (data_.size() - pos_) / sizeof(T)) return false;
    out.resize(n);
    if (n) std::memcpy(out.data(), data_.data() + pos_, n * sizeof(T));
    pos_ += n * sizeof(T);
    return true;
  }
  std::size_t remaining() const { return data_.size() - pos_; }

 private:
  std::string_view data_;
  std::size_t pos_ = 0;
};

template <class T>
void put(std::string& out, const T& v) {
  const auto* p = reinterpret_cast<const char*>(&v);
  out.append(p, sizeof(T));
}
template <class T>
void put_array(std::string& out, const std::vector<T>& v) {
  if (!v.empty()) out.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

Status write_file(const std::filesystem::path& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) return io_error("cannot create " + path.string());
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  f.close();
  if (!f) return io_error("cannot write " + path.string());
  return Status::ok();
}

// Converts any exception escaping a reader into a Status.
template <class F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return out_of_memory("reading trace");
  } catch (const std::exception& e) {
    return corrupt(std::string("trace: ") + e.what());
  }
}

// Splits a line on commas.
std::vector<std::string_view> split_csv(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t c = line.find(',', start);
    out.push_back(line.substr(start, c == std::string_view::npos ? c : c - start));
    if (c == std::string_view::npos) break;
    start = c + 1;
  }
  return out;
}

bool parse_u64(std::string_view s, std::uint64_t& v) {
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ')) s.remove_suffix(1);
  if (s.empty() || s.size() > 19) return false;
  v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return true;
}

bool parse_f32(std::string_view s, float& v) {
  std::string tmp(s);
  char* end = nullptr;
  v = std::strtof(tmp.c_str(), &end);
  while (end && (*end == '\r' || *end == ' ')) ++end;
  return end && *end == '\0' && !tmp.empty();
}

// Builds a trace from sparse rows keyed (sequence, position) -> layer data.
struct Row {
  std::uint64_t seq = 0;
  std::uint64_t pos = 0;
  std::uint64_t layer = 0;
  std::vector<std::uint32_t> experts;
  std::vector<float> weights;
};

Result<RoutingTrace> assemble(std::vector<Row>& rows, std::uint32_t min_experts, bool renumber_layers,
                              std::string source) {
  if (rows.empty()) return corrupt("trace: no rows");
  std::vector<std::uint64_t> layers;
  std::uint32_t top_k = 0;
  std::uint64_t max_id = 0;
  for (const Row& r : rows) {
    layers.push_back(r.layer);
    top_k = std::max<std::uint32_t>(top_k, static_cast<std::uint32_t>(r.experts.size()));
    for (std::uint32_t e : r.experts) max_id = std::max<std::uint64_t>(max_id, e);
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  if (max_id >= kMaxExperts) return corrupt("trace: expert id too large");
  const auto n_experts = std::max<std::uint32_t>(min_experts, static_cast<std::uint32_t>(max_id + 1));
  std::uint64_t n_layers64 = renumber_layers ? layers.size() : layers.back() + 1;
  if (n_layers64 > kMaxLayers) return corrupt("trace: too many layers");
  const auto n_layers = static_cast<std::uint32_t>(n_layers64);
  MOEX_RETURN_IF_ERROR(check_dims(n_layers, n_experts, top_k));
  // Tokens: distinct (seq, pos) in order.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> toks;
  toks.reserve(rows.size());
  for (const Row& r : rows) toks.emplace_back(r.seq, r.pos);
  std::sort(toks.begin(), toks.end());
  toks.erase(std::unique(toks.begin(), toks.end()), toks.end());
  if (toks.size() > std::numeric_limits<std::uint32_t>::max()) return corrupt("trace: too many tokens");

  RoutingTrace t;
  t.n_layers = n_layers;
  t.n_experts = n_experts;
  t.top_k = top_k;
  t.source = std::move(source);
  const std::size_t cells = toks.size() * n_layers * top_k;
  t.expert_ids.assign(cells, kNoExpert);
  t.gate_weights.assign(cells, 0.0f);
  for (std::size_t i = 0; i < toks.size(); ++i) {
    if (i == 0 || toks[i].first != toks[i - 1].first) t.seq_start.push_back(static_cast<std::uint32_t>(i));
  }
  std::vector<bool> seen(toks.size() * n_layers, false);
  for (const Row& r : rows) {
    const auto tok = static_cast<std::size_t>(std::lower_bound(toks.begin(), toks.end(), std::make_pair(r.seq, r.pos)) -
                                              toks.begin());
    const auto layer = static_cast<std::uint32_t>(
        renumber_layers ? std::lower_bound(layers.begin(), layers.end(), r.layer) - layers.begin()
                        : static_cast<std::ptrdiff_t>(r.layer));
    const std::size_t cell = tok * n_layers + layer;
    if (seen[cell]) return corrupt("trace: duplicate (token, layer) row");
    seen[cell] = true;
    if (r.weights.size() != r.experts.size()) return corrupt("trace: experts/weights length mismatch");
    for (std::size_t j = 0; j < r.experts.size(); ++j) {
      for (std::size_t q = 0; q < j; ++q)
        if (r.experts[q] == r.experts[j]) return corrupt("trace: duplicate expert in a row");
      t.expert_ids[cell * top_k + j] = r.experts[j];
      t.gate_weights[cell * top_k + j] = r.weights[j];
    }
  }
  MOEX_RETURN_IF_ERROR(t.validate());
  return t;
}

Result<std::uint32_t> top_k_from_config(const std::filesystem::path& npy) {
  const auto cfg = npy.parent_path() / "config.json";
  auto text = read_file(cfg);
  if (!text) return not_found("top_k not given and no readable config.json beside " + npy.string());
  const auto j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded() || !j.contains("num_experts_per_tok") || !j["num_experts_per_tok"].is_number_unsigned())
    return corrupt(cfg.string() + ": no num_experts_per_tok");
  const auto k = j["num_experts_per_tok"].get<std::uint64_t>();
  if (k == 0 || k > kMaxExperts) return corrupt(cfg.string() + ": num_experts_per_tok out of range");
  return static_cast<std::uint32_t>(k);
}

}  // namespace

std::size_t RoutingTrace::sequence_of(std::size_t token) const noexcept {
  const auto it = std::upper_bound(seq_start.begin(), seq_start.end(), token);
  return it == seq_start.begin() ? 0 : static_cast<std::size_t>(it - seq_start.begin()) - 1;
}

Status RoutingTrace::validate() const {
  MOEX_RETURN_IF_ERROR(check_dims(n_layers, n_experts, top_k));
  const std::size_t per = static_cast<std::size_t>(n_layers) * top_k;
  if (expert_ids.size() % per != 0) return corrupt("trace: expert_ids size is not tokens*layers*top_k");
  const std::size_t n = expert_ids.size() / per;
  if (gate_weights.size() != expert_ids.size()) return corrupt("trace: gate_weights size mismatch");
  if (!router_logits.empty() && router_logits.size() != n * n_layers * n_experts)
    return corrupt("trace: router_logits size mismatch");
  if (n == 0 ? !seq_start.empty() : (seq_start.empty() || seq_start[0] != 0))
    return corrupt("trace: seq_start must start at 0");
  for (std::size_t i = 0; i < seq_start.size(); ++i) {
    if (seq_start[i] >= n || (i > 0 && seq_start[i] <= seq_start[i - 1]))
      return corrupt("trace: seq_start must ascend and stay below the token count");
  }
  for (std::size_t c = 0; c < n * n_layers; ++c) {
    bool pad = false;
    for (std::uint32_t j = 0; j < top_k; ++j) {
      const std::uint32_t e = expert_ids[c * top_k + j];
      if (e == kNoExpert) {
        pad = true;
        continue;
      }
      if (pad) return corrupt("trace: expert after padding");
      if (e >= n_experts) return corrupt("trace: expert id out of range");
    }
  }
  return Status::ok();
}

void route_softmax_topk(std::span<const float> logits, std::uint32_t k, std::uint32_t* ids, float* weights) noexcept {
  // Partial selection by (logit desc, id asc); k is small.
  for (std::uint32_t j = 0; j < k; ++j) {
    std::uint32_t best = kNoExpert;
    for (std::uint32_t e = 0; e < logits.size(); ++e) {
      bool taken = false;
      for (std::uint32_t q = 0; q < j; ++q) taken = taken || ids[q] == e;
      if (taken) continue;
      if (best == kNoExpert || logits[e] > logits[best]) best = e;
    }
    ids[j] = best;
  }
  // softmax over all then renormalized over the k == softmax over the k logits.
  double sum = 0;
  const double mx = logits[ids[0]];
  std::array<double, 64> tmp{};
  for (std::uint32_t j = 0; j < k; ++j) {
    const double v = std::exp(static_cast<double>(logits[ids[j]]) - mx);
    if (j < tmp.size()) tmp[j] = v;
    sum += v;
  }
  for (std::uint32_t j = 0; j < k; ++j) {
    const double v = j < tmp.size() ? tmp[j] : std::exp(static_cast<double>(logits[ids[j]]) - mx);
    weights[j] = static_cast<float>(v / sum);
  }
}

Result<RoutingTrace> read_trace_binary(const std::filesystem::path& path) {
  return guarded([&]() -> Result<RoutingTrace> {
    auto data = read_file(path);
    if (!data) return data.status();
    Reader r(*data);
    char magic[8];
    if (!r.get(magic) || std::memcmp(magic, kMagic, 8) != 0) return corrupt("trace: bad magic");
    std::uint32_t version = 0, flags = 0, n_seq = 0;
    std::uint64_t n_tokens = 0;
    RoutingTrace t;
    if (!r.get(version) || !r.get(flags) || !r.get(t.n_layers) || !r.get(t.n_experts) || !r.get(t.top_k) ||
        !r.get(n_seq) || !r.get(n_tokens))
      return corrupt("trace: truncated header");
    if (version != kVersion) return unsupported("trace: version " + std::to_string(version));
    if ((flags & ~kFlagLogits) != 0) return unsupported("trace: unknown flags");
    MOEX_RETURN_IF_ERROR(check_dims(t.n_layers, t.n_experts, t.top_k));
    // Exact size check before any allocation (all products fit: dims are capped).
    const std::uint64_t cells_per_tok = std::uint64_t{t.n_layers} * t.top_k;
    const std::uint64_t logits_per_tok = (flags & kFlagLogits) ? std::uint64_t{t.n_layers} * t.n_experts : 0;
    const std::uint64_t bytes_per_tok = cells_per_tok * 8 + logits_per_tok * 4;
    const std::uint64_t rem = r.remaining();
    if (n_seq > rem / 4) return corrupt("trace: truncated");
    if (n_tokens > (rem - 4ull * n_seq) / bytes_per_tok || 4ull * n_seq + n_tokens * bytes_per_tok != rem)
      return corrupt("trace: file size does not match the header");
    if (!r.get_array(t.seq_start, n_seq) || !r.get_array(t.expert_ids, n_tokens * cells_per_tok) ||
        !r.get_array(t.gate_weights, n_tokens * cells_per_tok) ||
        !r.get_array(t.router_logits, n_tokens * logits_per_tok))
      return corrupt("trace: truncated");
    t.source = path.string();
    MOEX_RETURN_IF_ERROR(t.validate());
    return t;
  });
}

Status write_trace_binary(const RoutingTrace& trace, const std::filesystem::path& path) {
  try {
    MOEX_RETURN_IF_ERROR(trace.validate());
    std::string out;
    out.append(kMagic, 8);
    put(out, kVersion);
    put(out, trace.has_logits() ? kFlagLogits : 0u);
    put(out, trace.n_layers);
    put(out, trace.n_experts);
    put(out, trace.top_k);
    put(out, static_cast<std::uint32_t>(trace.seq_start.size()));
    put(out, static_cast<std::uint64_t>(trace.tokens()));
    put_array(out, trace.seq_start);
    put_array(out, trace.expert_ids);
    put_array(out, trace.gate_weights);
    put_array(out, trace.router_logits);
    return write_file(path, out);
  } catch (const std::bad_alloc&) {
    return out_of_memory("writing trace");
  }
}

Status write_trace_jsonl(const RoutingTrace& trace, const std::filesystem::path& path) {
  try {
    MOEX_RETURN_IF_ERROR(trace.validate());
    std::ofstream f(path, std::ios::trunc);
    if (!f) return io_error("cannot create " + path.string());
    nlohmann::json h = {
        {"moex_trace", kVersion}, {"n_layers", trace.n_layers}, {"n_experts", trace.n_experts}, {"top_k", trace.top_k}};
    f << h.dump() << '\n';
    for (std::size_t t = 0; t < trace.tokens(); ++t) {
      nlohmann::json line;
      line["seq"] = trace.sequence_of(t);
      nlohmann::json ex = nlohmann::json::array(), w = nlohmann::json::array(), lg = nlohmann::json::array();
      for (std::uint32_t l = 0; l < trace.n_layers; ++l) {
        const auto e = trace.experts(t, l);
        const auto g = trace.weights(t, l);
        ex.push_back(std::vector<std::uint32_t>(e.begin(), e.end()));
        w.push_back(std::vector<float>(g.begin(), g.end()));
        if (trace.has_logits()) {
          const auto z = trace.logits(t, l);
          lg.push_back(std::vector<float>(z.begin(), z.end()));
        }
      }
      line["experts"] = std::move(ex);
      line["weights"] = std::move(w);
      if (trace.has_logits()) line["logits"] = std::move(lg);
      f << line.dump() << '\n';
    }
    f.close();
    if (!f) return io_error("cannot write " + path.string());
    return Status::ok();
  } catch (const std::bad_alloc&) {
    return out_of_memory("writing trace");
  } catch (const std::exception& e) {
    return internal_error(e.what());
  }
}

Result<RoutingTrace> read_trace_jsonl(const std::filesystem::path& path) {
  return guarded([&]() -> Result<RoutingTrace> {
    std::ifstream f(path);
    if (!f) return io_error("cannot open " + path.string());
    std::string line;
    if (!std::getline(f, line)) return corrupt("trace: empty JSONL");
    const auto h = nlohmann::json::parse(line, nullptr, false);
    if (h.is_discarded() || !h.is_object() || h.value("moex_trace", 0u) != kVersion)
      return corrupt("trace: missing moex_trace header");
    RoutingTrace t;
    t.n_layers = h.value("n_layers", 0u);
    t.n_experts = h.value("n_experts", 0u);
    t.top_k = h.value("top_k", 0u);
    MOEX_RETURN_IF_ERROR(check_dims(t.n_layers, t.n_experts, t.top_k));
    t.source = path.string();
    std::int64_t prev_seq = -1;
    bool logits = false;
    std::size_t tok = 0;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) return corrupt("trace: bad JSON line");
      const auto seq = j.value("seq", std::int64_t{-1});
      if (seq < 0) return corrupt("trace: missing seq");
      if (seq != prev_seq) t.seq_start.push_back(static_cast<std::uint32_t>(tok));
      prev_seq = seq;
      const auto& ex = j.at("experts");
      const auto& w = j.at("weights");
      if (!ex.is_array() || !w.is_array() || ex.size() != t.n_layers || w.size() != t.n_layers)
        return corrupt("trace: experts/weights must have n_layers rows");
      if (tok == 0) logits = j.contains("logits");
      if (logits != j.contains("logits")) return corrupt("trace: logits on some lines only");
      for (std::uint32_t l = 0; l < t.n_layers; ++l) {
        if (!ex[l].is_array() || !w[l].is_array() || ex[l].size() > t.top_k || w[l].size() != ex[l].size())
          return corrupt("trace: bad experts/weights row");
        for (std::uint32_t q = 0; q < t.top_k; ++q) {
          if (q < ex[l].size()) {
            const auto id = ex[l][q].get<std::uint64_t>();
            if (id >= t.n_experts) return corrupt("trace: expert id out of range");
            t.expert_ids.push_back(static_cast<std::uint32_t>(id));
            t.gate_weights.push_back(w[l][q].get<float>());
          } else {
            t.expert_ids.push_back(kNoExpert);
            t.gate_weights.push_back(0.0f);
          }
        }
        if (logits) {
          const auto& z = j.at("logits");
          if (!z.is_array() || z.size() != t.n_layers || !z[l].is_array() || z[l].size() != t.n_experts)
            return corrupt("trace: bad logits row");
          for (const auto& v : z[l]) t.router_logits.push_back(v.get<float>());
        }
      }
      ++tok;
    }
    MOEX_RETURN_IF_ERROR(t.validate());
    return t;
  });
}

Result<RoutingTrace> read_npy_router_logits(const std::filesystem::path& path, const TraceLoadOptions& options) {
  return guarded([&]() -> Result<RoutingTrace> {
    auto data = read_file(path);
    if (!data) return data.status();
    const std::string& d = *data;
    if (d.size() < 10 || std::memcmp(d.data(), "\x93NUMPY", 6) != 0) return corrupt("npy: bad magic");
    const auto major = static_cast<unsigned char>(d[6]);
    std::size_t hlen = 0, hoff = 0;
    if (major == 1) {
      hlen = static_cast<unsigned char>(d[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(d[9])) << 8);
      hoff = 10;
    } else if (major == 2 || major == 3) {
      if (d.size() < 12) return corrupt("npy: truncated");
      for (int i = 3; i >= 0; --i) hlen = (hlen << 8) | static_cast<unsigned char>(d[8 + static_cast<std::size_t>(i)]);
      hoff = 12;
    } else {
      return unsupported("npy: version " + std::to_string(major));
    }
    if (hlen > d.size() - hoff) return corrupt("npy: truncated header");
    const std::string_view header(d.data() + hoff, hlen);
    if (header.find("'descr': '<f2'") == std::string_view::npos)
      return unsupported("npy: only little-endian float16 ('<f2') is read");
    if (header.find("'fortran_order': False") == std::string_view::npos) return unsupported("npy: fortran order");
    const auto sp = header.find("'shape': (");
    if (sp == std::string_view::npos) return corrupt("npy: no shape");
    std::vector<std::uint64_t> shape;
    std::size_t i = sp + 10;
    while (i < header.size() && header[i] != ')') {
      while (i < header.size() && (header[i] == ' ' || header[i] == ',')) ++i;
      if (i < header.size() && header[i] == ')') break;
      std::uint64_t v = 0;
      std::size_t digits = 0;
      while (i < header.size() && header[i] >= '0' && header[i] <= '9' && digits < 19) {
        v = v * 10 + static_cast<std::uint64_t>(header[i++] - '0');
        ++digits;
      }
      if (digits == 0) return corrupt("npy: bad shape");
      shape.push_back(v);
    }
    if (shape.size() != 3) return corrupt("npy: expected shape [tokens, layers, experts]");
    if (shape[1] == 0 || shape[1] > kMaxLayers || shape[2] == 0 || shape[2] > kMaxExperts)
      return corrupt("npy: layers/experts out of range");
    const std::size_t data_off = hoff + hlen;
    const std::uint64_t per_tok = shape[1] * shape[2] * 2;
    if (shape[0] > (d.size() - data_off) / per_tok || shape[0] * per_tok != d.size() - data_off)
      return corrupt("npy: data size does not match the shape");
    std::uint32_t k = options.top_k;
    if (k == 0) {
      auto kk = top_k_from_config(path);
      if (!kk) return kk.status();
      k = *kk;
    }
    RoutingTrace t;
    t.n_layers = static_cast<std::uint32_t>(shape[1]);
    t.n_experts = static_cast<std::uint32_t>(shape[2]);
    t.top_k = k;
    MOEX_RETURN_IF_ERROR(check_dims(t.n_layers, t.n_experts, t.top_k));
    if (options.sequence_length == 0) return invalid_argument("sequence_length must be > 0");
    const std::size_t n = static_cast<std::size_t>(shape[0]);
    t.source = path.string();
    t.expert_ids.resize(n * t.n_layers * k);
    t.gate_weights.resize(n * t.n_layers * k);
    std::vector<float> row(t.n_experts);
    if (options.keep_logits) t.router_logits.resize(n * t.n_layers * t.n_experts);
    const auto* src = reinterpret_cast<const unsigned char*>(d.data() + data_off);
    for (std::size_t c = 0; c < n * t.n_layers; ++c) {
      for (std::uint32_t e = 0; e < t.n_experts; ++e) {
        const std::size_t b = (c * t.n_experts + e) * 2;
        row[e] = f16_to_float(static_cast<std::uint16_t>(src[b] | (src[b + 1] << 8)));
      }
      if (options.keep_logits)
        std::copy(row.begin(), row.end(), t.router_logits.begin() + static_cast<std::ptrdiff_t>(c * t.n_experts));
      route_softmax_topk(row, k, &t.expert_ids[c * k], &t.gate_weights[c * k]);
    }
    for (std::size_t s = 0; s < n; s += options.sequence_length) t.seq_start.push_back(static_cast<std::uint32_t>(s));
    MOEX_RETURN_IF_ERROR(t.validate());
    return t;
  });
}

Result<RoutingTrace> read_mixtral_routing_jsonl(const std::filesystem::path& path) {
  return guarded([&]() -> Result<RoutingTrace> {
    std::ifstream f(path);
    if (!f) return io_error("cannot open " + path.string());
    std::vector<Row> rows;
    std::string line;
    std::uint64_t max_tok = 0;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) return corrupt("mixtral jsonl: bad JSON line");
      Row r;
      r.seq = j.at("problem_id").get<std::uint64_t>();
      r.pos = j.at("token_idx").get<std::uint64_t>();
      r.layer = j.at("layer").get<std::uint64_t>();
      if (r.layer >= kMaxLayers) return corrupt("mixtral jsonl: layer out of range");
      r.experts = j.at("experts").get<std::vector<std::uint32_t>>();
      r.weights = j.at("gating_probs").get<std::vector<float>>();
      max_tok = std::max(max_tok, r.pos);
      rows.push_back(std::move(r));
    }
    return assemble(rows, 1, false, path.string());
  });
}

Result<RoutingTrace> read_flame_csv(const std::filesystem::path& path) {
  return guarded([&]() -> Result<RoutingTrace> {
    std::ifstream f(path);
    if (!f) return io_error("cannot open " + path.string());
    std::string line;
    if (!std::getline(f, line)) return corrupt("flame csv: empty");
    const auto head = split_csv(line);
    if (head.size() < 6 || head[0] != "seq" || head[1] != "pos" || head[3] != "layer")
      return corrupt("flame csv: unexpected header");
    std::size_t k = 0;
    while (4 + k < head.size() && head[4 + k].substr(0, 6) == "expert") ++k;
    if (k == 0 || head.size() != 4 + 2 * k) return corrupt("flame csv: expected expertN and probN columns");
    std::vector<Row> rows;
    while (std::getline(f, line)) {
      if (line.empty() || line == "\r") continue;
      const auto c = split_csv(line);
      if (c.size() != head.size()) return corrupt("flame csv: wrong column count");
      Row r;
      std::uint64_t tmp = 0;
      if (!parse_u64(c[0], r.seq) || !parse_u64(c[1], r.pos) || !parse_u64(c[3], r.layer))
        return corrupt("flame csv: bad integer");
      for (std::size_t q = 0; q < k; ++q) {
        float p = 0;
        if (!parse_u64(c[4 + q], tmp) || tmp >= kMaxExperts || !parse_f32(c[4 + k + q], p))
          return corrupt("flame csv: bad expert or probability");
        r.experts.push_back(static_cast<std::uint32_t>(tmp));
        r.weights.push_back(p);
      }
      rows.push_back(std::move(r));
    }
    return assemble(rows, 64, true, path.string());
  });
}

Result<RoutingTrace> load_trace(const std::filesystem::path& path, const TraceLoadOptions& options) {
  return guarded([&]() -> Result<RoutingTrace> {
    std::ifstream f(path, std::ios::binary);
    if (!f) return io_error("cannot open " + path.string());
    std::string head(4096, '\0');
    f.read(head.data(), static_cast<std::streamsize>(head.size()));
    head.resize(static_cast<std::size_t>(f.gcount()));
    if (head.size() >= 8 && std::memcmp(head.data(), kMagic, 8) == 0) return read_trace_binary(path);
    if (head.size() >= 6 && std::memcmp(head.data(), "\x93NUMPY", 6) == 0) return read_npy_router_logits(path, options);
    const std::string first = head.substr(0, head.find('\n'));
    if (first.find("\"moex_trace\"") != std::string::npos) return read_trace_jsonl(path);
    if (first.find("\"problem_id\"") != std::string::npos && first.find("\"gating_probs\"") != std::string::npos)
      return read_mixtral_routing_jsonl(path);
    if (first.rfind("seq,pos,", 0) == 0) return read_flame_csv(path);
    return unsupported("unrecognized trace format: " + path.string());
  });
}

std::vector<double> expert_access_counts(const RoutingTrace& trace, std::size_t begin, std::size_t end) {
  std::vector<double> c(static_cast<std::size_t>(trace.n_layers) * trace.n_experts, 0.0);
  end = std::min(end, trace.tokens());
  for (std::size_t t = begin; t < end; ++t)
    for (std::uint32_t l = 0; l < trace.n_layers; ++l)
      for (std::uint32_t e : trace.experts(t, l)) c[static_cast<std::size_t>(l) * trace.n_experts + e] += 1.0;
  return c;
}

MOEX_NAMESPACE_END
