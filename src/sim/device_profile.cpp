// DeviceProfile JSON: parsing and writing (nlohmann json).
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "moex/backend/sim_backend.hpp"

MOEX_NAMESPACE_BEGIN

namespace {

constexpr const char* kLinkNames[kSimLinkCount] = {"disk_to_host", "host_to_device", "device_to_device"};
constexpr const char* kDeviceNames[kSimDeviceCount] = {"gpu", "host"};

// A non-negative finite number that fits u64, rounded to the nearest integer.
Status get_u64(const nlohmann::json& j, const char* key, std::uint64_t& out, const std::string& where) {
  if (!j.contains(key)) return Status::ok();  // absent: keep the default
  const auto& v = j.at(key);
  if (!v.is_number()) return invalid_argument(where + "." + key + " must be a number");
  const double d = v.get<double>();
  if (!std::isfinite(d) || d < 0 || d >= 1.8e19) return invalid_argument(where + "." + key + " out of range");
  out = v.is_number_unsigned() ? v.get<std::uint64_t>() : static_cast<std::uint64_t>(std::llround(d));
  return Status::ok();
}

Status parse_compute(const nlohmann::json& j, ComputeProfile& c, const std::string& where) {
  if (!j.is_object()) return invalid_argument(where + " must be an object");
  MOEX_RETURN_IF_ERROR(get_u64(j, "read_bytes_per_s", c.read_bytes_per_s, where));
  MOEX_RETURN_IF_ERROR(get_u64(j, "flops_per_s", c.flops_per_s, where));
  MOEX_RETURN_IF_ERROR(get_u64(j, "launch_ns", c.launch_ns, where));
  if (j.contains("flops_per_s_by_precision")) {
    const auto& m = j.at("flops_per_s_by_precision");
    if (!m.is_object()) return invalid_argument(where + ".flops_per_s_by_precision must be an object");
    for (const auto& [name, value] : m.items()) {
      bool found = false;
      for (std::size_t p = 0; p < kPrecisionCount; ++p) {
        if (to_string(static_cast<Precision>(p)) == name) {
          const nlohmann::json one = {{"rate", value}};
          MOEX_RETURN_IF_ERROR(get_u64(one, "rate", c.flops_per_s_by_precision[p], where + "." + name));
          found = true;
        }
      }
      if (!found) return invalid_argument(where + ": unknown precision " + name);
    }
  }
  return Status::ok();
}

}  // namespace

Result<DeviceProfile> parse_device_profile(std::string_view json) {
  try {
    const auto j = nlohmann::json::parse(json, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return invalid_argument("device profile: not a JSON object");
    DeviceProfile p;
    if (j.contains("name") && j.at("name").is_string()) p.name = j.at("name").get<std::string>();
    if (j.contains("links")) {
      const auto& links = j.at("links");
      if (!links.is_object()) return invalid_argument("device profile: links must be an object");
      for (std::size_t i = 0; i < kSimLinkCount; ++i) {
        if (!links.contains(kLinkNames[i])) continue;
        const auto& l = links.at(kLinkNames[i]);
        const std::string where = std::string("links.") + kLinkNames[i];
        if (!l.is_object()) return invalid_argument(where + " must be an object");
        MOEX_RETURN_IF_ERROR(get_u64(l, "latency_ns", p.links[i].latency_ns, where));
        MOEX_RETURN_IF_ERROR(get_u64(l, "bytes_per_s", p.links[i].bytes_per_s, where));
      }
    }
    for (std::size_t i = 0; i < kSimDeviceCount; ++i) {
      if (j.contains(kDeviceNames[i]))
        MOEX_RETURN_IF_ERROR(parse_compute(j.at(kDeviceNames[i]), p.compute[i], kDeviceNames[i]));
    }
    MOEX_RETURN_IF_ERROR(get_u64(j, "host_memcpy_bytes_per_s", p.host_memcpy_bytes_per_s, "profile"));
    return p;
  } catch (const std::bad_alloc&) {
    return out_of_memory("device profile");
  } catch (const std::exception& e) {
    return invalid_argument(std::string("device profile: ") + e.what());
  }
}

Result<DeviceProfile> load_device_profile(const std::filesystem::path& path) {
  try {
    std::ifstream f(path);
    if (!f) return io_error("cannot open " + path.string());
    std::ostringstream ss;
    ss << f.rdbuf();
    auto r = parse_device_profile(ss.str());
    if (!r) return Status(r.status().code(), path.string() + ": " + r.status().message());
    return r;
  } catch (const std::exception& e) {
    return io_error(path.string() + ": " + e.what());
  }
}

std::string device_profile_to_json(const DeviceProfile& p) {
  nlohmann::ordered_json j;
  j["name"] = p.name;
  for (std::size_t i = 0; i < kSimLinkCount; ++i) {
    j["links"][kLinkNames[i]] = {{"latency_ns", p.links[i].latency_ns}, {"bytes_per_s", p.links[i].bytes_per_s}};
  }
  for (std::size_t i = 0; i < kSimDeviceCount; ++i) {
    const ComputeProfile& c = p.compute[i];
    nlohmann::ordered_json cj = {
        {"read_bytes_per_s", c.read_bytes_per_s}, {"flops_per_s", c.flops_per_s}, {"launch_ns", c.launch_ns}};
    nlohmann::ordered_json by = nlohmann::ordered_json::object();
    for (std::size_t q = 0; q < kPrecisionCount; ++q) {
      if (c.flops_per_s_by_precision[q])
        by[std::string(to_string(static_cast<Precision>(q)))] = c.flops_per_s_by_precision[q];
    }
    cj["flops_per_s_by_precision"] = by;
    j[kDeviceNames[i]] = cj;
  }
  j["host_memcpy_bytes_per_s"] = p.host_memcpy_bytes_per_s;
  return j.dump(2) + "\n";
}

MOEX_NAMESPACE_END
