#pragma once
/// @file cli_args.hpp
/// Tiny "--key value" / "--flag" parser shared by the engine's executables.

#include <algorithm>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moex_engine {

/// Command-line options: positional words and --key[=value | value] pairs.
class Args {
 public:
  /// `flags` lists the options that take no value.
  Args(int argc, char** argv, const std::vector<std::string>& flags) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) {
        positional_.push_back(a);
        continue;
      }
      a = a.substr(2);
      if (auto eq = a.find('='); eq != std::string::npos) {
        kv_[a.substr(0, eq)] = a.substr(eq + 1);
      } else if (std::find(flags.begin(), flags.end(), a) != flags.end() || i + 1 >= argc) {
        kv_[a] = "";
      } else {
        kv_[a] = argv[++i];
      }
    }
  }
  const std::vector<std::string>& positional() const { return positional_; }
  bool has(const std::string& k) const { return kv_.count(k) != 0; }
  std::string str(const std::string& k, const std::string& def = "") const {
    auto it = kv_.find(k);
    return it == kv_.end() ? def : it->second;
  }
  double num(const std::string& k, double def) const {
    auto it = kv_.find(k);
    if (it == kv_.end() || it->second.empty()) return def;
    char* end = nullptr;
    const double v = std::strtod(it->second.c_str(), &end);
    return (end && *end == '\0') ? v : def;
  }
  std::size_t count(const std::string& k, std::size_t def) const {
    const double v = num(k, static_cast<double>(def));
    return v >= 0 ? static_cast<std::size_t>(v) : def;
  }
  /// Options given that are not in `known` (typos).
  std::vector<std::string> unknown(const std::vector<std::string>& known) const {
    std::vector<std::string> out;
    for (const auto& [k, v] : kv_)
      if (std::find(known.begin(), known.end(), k) == known.end()) out.push_back(k);
    return out;
  }

 private:
  std::vector<std::string> positional_;
  std::map<std::string, std::string> kv_;
};

}  // namespace moex_engine
