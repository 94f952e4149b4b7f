// moex-inspect MODEL [--json]: what moex sees in a checkpoint (safetensors file or folder, or GGUF):
// architecture, layers, experts, top-k, shapes, formats, bytes per expert per precision, tier.

#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "moex/formats/checkpoint.hpp"
#include "moex/quant/layout.hpp"

namespace {

void progress_bar(std::uint64_t done, std::uint64_t total, std::string_view what) {
  constexpr int kWidth = 30;
  const int filled = total ? static_cast<int>(kWidth * done / total) : kWidth;
  std::string bar(static_cast<std::size_t>(filled), '#');
  bar.resize(kWidth, '.');
  std::fprintf(stderr, "\r[%s] %3d%% %-40.40s", bar.c_str(), total ? static_cast<int>(100 * done / total) : 100,
               std::string(what).c_str());
  if (done >= total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

std::string human(std::uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1ull << 30));
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1ull << 20));
  else if (b >= 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

std::string shape_str(const std::vector<std::uint64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int usage() {
  std::fprintf(stderr,
               "usage: moex-inspect MODEL [--json] [--quiet]\n"
               "  MODEL: a .safetensors file, a folder with model.safetensors(.index.json) and config.json,\n"
               "         or a .gguf file\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model;
  bool json = false, quiet = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json"))
      json = true;
    else if (!std::strcmp(argv[i], "--quiet"))
      quiet = true;
    else if (!std::strcmp(argv[i], "-h") || !std::strcmp(argv[i], "--help"))
      return usage(), 0;
    else if (model.empty())
      model = argv[i];
    else
      return usage();
  }
  if (model.empty()) return usage();
  moex::ProgressFn progress;
  if (!quiet) progress = progress_bar;
  auto ck = moex::Checkpoint::open(model, progress);
  if (!ck) {
    std::fprintf(stderr, "moex-inspect: %s\n", ck.status().to_string().c_str());
    return 1;
  }
  const auto& c = ck.value()->config();
  const std::uint32_t first = c.first_moe_layer;
  auto x = ck.value()->expert(first, 0);
  if (!x) {
    std::fprintf(stderr, "moex-inspect: %s\n", x.status().to_string().c_str());
    return 1;
  }
  std::uint32_t moe_layers = 0;
  for (std::uint32_t l = 0; l < c.n_layers; ++l) moe_layers += c.is_moe_layer(l) ? 1 : 0;
  const std::uint64_t source_bytes = x->w1.bytes.size() + x->w3.bytes.size() + x->w2.bytes.size() +
                                     x->w1.scales.size() + x->w3.scales.size() + x->w2.scales.size();
  std::map<std::string, std::uint64_t> dtype_counts;
  std::uint64_t tensor_bytes = 0;
  for (const auto& n : ck.value()->tensor_names()) {
    auto t = ck.value()->tensor(n);
    if (t) {
      ++dtype_counts[std::string(moex::to_string(t->dtype))];
      tensor_bytes += t->bytes.size() + t->scales.size();
    }
  }
  // Routed experts' bytes in the source format; the rest (attention, norms, embeddings, routers,
  // shared experts, biases) is what an engine keeps beside moex's expert budget.
  const std::uint64_t routed_bytes = source_bytes * c.n_experts * moe_layers;
  const std::uint64_t other_bytes = tensor_bytes > routed_bytes ? tensor_bytes - routed_bytes : 0;
  std::uint64_t shared_bytes = 0;
  if (auto sh = ck.value()->shared_expert(first); sh.is_ok())
    shared_bytes = (sh->w1.bytes.size() + sh->w3.bytes.size() + sh->w2.bytes.size()) * std::uint64_t{moe_layers};
  std::string block = c.arch == moex::Architecture::kGptOss ? "clamped SwiGLU experts" : "SwiGLU experts";
  if (x->b1 || x->b3 || x->b2) block += " with biases";
  if (c.n_shared_experts)
    block += c.arch == moex::Architecture::kQwen2Moe ? " + gated shared expert" : " + shared experts";
  const moex::ExpertShape shape{c.hidden, c.expert_ffn};
  struct P {
    const char* name;
    moex::WeightFormat f;
  };
  const P precisions[] = {{"bf16", moex::float_format(moex::Precision::kBF16)},
                          {"int8_g64", moex::quant_format(moex::Precision::kInt8, 64)},
                          {"int4_g64", moex::quant_format(moex::Precision::kInt4, 64)},
                          {"int2_g64", moex::quant_format(moex::Precision::kInt2, 64)}};
  const char* fmt = ck.value()->format() == moex::CheckpointFormat::kGguf ? "gguf" : "safetensors";
  if (json) {
    nlohmann::ordered_json j;
    j["model"] = model;
    j["format"] = fmt;
    j["architecture"] = c.architecture;
    j["files"] = nlohmann::ordered_json::array();
    for (const auto& f : ck.value()->files()) j["files"].push_back(f.string());
    j["file_bytes"] = ck.value()->file_bytes();
    j["tensors"] = ck.value()->tensor_names().size();
    j["tensor_dtypes"] = dtype_counts;
    j["layers"] = c.n_layers;
    j["moe_layers"] = moe_layers;
    j["first_moe_layer"] = c.first_moe_layer;
    j["experts"] = c.n_experts;
    j["top_k"] = c.top_k;
    j["shared_experts"] = c.n_shared_experts;
    j["shared_ffn"] = c.shared_ffn;
    j["router"] = std::string(moex::to_string(c.router));
    j["routed_scaling"] = c.routed_scaling;
    j["n_group"] = c.n_group;
    j["topk_group"] = c.topk_group;
    j["hidden"] = c.hidden;
    j["expert_ffn"] = c.expert_ffn;
    j["heads"] = c.n_heads;
    j["kv_heads"] = c.n_kv_heads;
    j["vocab"] = c.vocab;
    j["expert_shapes"] = {{"w1", x->w1.shape}, {"w3", x->w3.shape}, {"w2", x->w2.shape}};
    j["expert_dtype"] = std::string(moex::to_string(x->w1.dtype));
    j["expert_layout"] = x->w1.is_dense() ? "dense" : (x->w1.scales.empty() ? "strided" : "scaled");
    auto& b = j["bytes_per_expert"];
    b["source"] = source_bytes;
    for (const auto& p : precisions) b[p.name] = moex::expert_bytes(shape, p.f);
    j["total_expert_bytes_source"] = routed_bytes;
    j["non_expert_bytes"] = other_bytes;
    j["shared_expert_bytes"] = shared_bytes;
    j["moe_block"] = block;
    j["tier"] = "disk (mmap)";
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("model          %s\n", model.c_str());
  std::printf("format         %s, %zu file(s), %s\n", fmt, ck.value()->files().size(),
              human(ck.value()->file_bytes()).c_str());
  std::printf("architecture   %s\n", c.architecture.c_str());
  std::printf("layers         %u (%u MoE, first MoE layer %u, step %u)\n", c.n_layers, moe_layers, c.first_moe_layer,
              c.moe_layer_step);
  std::printf("experts        %u routed, top-%u, %u shared (ffn %u)\n", c.n_experts, c.top_k, c.n_shared_experts,
              c.shared_ffn);
  std::printf("router         %s, scaling %g, groups %u/%u\n", std::string(moex::to_string(c.router)).c_str(),
              static_cast<double>(c.routed_scaling), c.topk_group, c.n_group);
  std::printf("hidden         %u, expert ffn %u, heads %u/%u, vocab %u\n", c.hidden, c.expert_ffn, c.n_heads,
              c.n_kv_heads, c.vocab);
  std::printf("expert shapes  w1 %s, w3 %s, w2 %s, %s (%s)\n", shape_str(x->w1.shape).c_str(),
              shape_str(x->w3.shape).c_str(), shape_str(x->w2.shape).c_str(),
              std::string(moex::to_string(x->w1.dtype)).c_str(),
              x->w1.is_dense() ? "dense" : (x->w1.scales.empty() ? "strided" : "scaled"));
  std::printf("tensors        %zu:", ck.value()->tensor_names().size());
  for (const auto& [d, n] : dtype_counts) std::printf(" %s x%llu", d.c_str(), static_cast<unsigned long long>(n));
  std::printf("\nbytes/expert   source %s", human(source_bytes).c_str());
  for (const auto& p : precisions) std::printf(", %s %s", p.name, human(moex::expert_bytes(shape, p.f)).c_str());
  std::printf("\nall experts    %s in the source format\n", human(routed_bytes).c_str());
  std::printf("non-expert     %s (dense weights, routers, shared experts %s): outside the expert budget\n",
              human(other_bytes).c_str(), human(shared_bytes).c_str());
  std::printf("moe block      %s\n", block.c_str());
  std::printf("tier           disk (mmap, read in place)\n");
  return 0;
}
