// moex-demo with each policy on the CPU backend at tiny sizes: exit 0, and with any policy on the
// quality line (relative error against the exact shadow executor); bad policy flags exit 2.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>

#include <doctest/doctest.h>

#include "support/test_support.hpp"

namespace {

struct DemoRun {
  int status = -1;
  std::string output;
};

}  // namespace

TEST_SUITE("simgrid") {

// The demo binary, when it was built next to this test (build/examples/demo/moex-demo).
TEST_CASE("moex-demo runs with each policy on the CPU backend and reports quality beside speed") {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  const auto demo = self.parent_path().parent_path() / "examples/demo/moex-demo";
  if (ec || !std::filesystem::exists(demo)) {
    MESSAGE("skipped: moex-demo is not built beside this test");
    return;
  }
  const auto dir = moex::test::temp_dir("moex-demo-policies");
  std::string tiny = "--layers 2 --experts 4 --hidden 64 --ffn 128 --tokens 8 --dir '";
  tiny.append((dir / "model").string()).append("'");
  // Runs the demo at tiny sizes with `args` appended.
  auto run = [&](const char* args) {
    const auto out = dir / "out.txt";
    std::string cmd = "'";
    cmd.append(demo.string()).append("' ").append(tiny).append(" ").append(args);
    cmd.append(" >'").append(out.string()).append("' 2>&1");
    const int st = std::system(cmd.c_str());
    DemoRun r;
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    std::ifstream f(out);
    std::stringstream ss;
    ss << f.rdbuf();
    r.output = ss.str();
    return r;
  };

  // No flags: the exact path as before, no quality line.
  {
    const DemoRun r = run("");
    CAPTURE(r.output);
    CHECK(r.status == 0);
    CHECK(r.output.find("tokens/s") != std::string::npos);
    CHECK(r.output.find("quality:") == std::string::npos);
  }
  const char* const kPolicies[] = {
      "--prefetch speculative",
      "--prefetch speculative:1 --eviction lfu",
      "--gate adaptive:1.5",
      "--miss hobbit:0.3,0.9 --low-precision int4",
      "--low-precision int8",
      "--low-precision int2 --miss cost:0.3,0.95",
      "--miss cost",
      "--per-layer-budget --budget 0.5",
      "--eviction lrfu",
      "--eviction hobbit",
      ("--prefetch speculative --gate adaptive:1.5 --miss cost:0.3,0.9 --low-precision int4 --per-layer-budget "
       "--budget 0.5 --eviction lfu"),
      "--gate adaptive:1.5 --json",
  };
  for (const char* p : kPolicies) {
    const std::string policy = p;
    CAPTURE(policy);
    const DemoRun r = run(p);
    CAPTURE(r.output);
    CHECK(r.status == 0);
    if (std::string(p).find("--json") != std::string::npos)
      CHECK(r.output.find("\"rel_error_vs_exact\"") != std::string::npos);
    else
      CHECK(r.output.find("quality: relative error") != std::string::npos);
  }
  // Exact policies report an exact result; an approximate gate a non-zero error.
  {
    const DemoRun r = run("--miss cost");
    CHECK(r.output.find("exact policies") != std::string::npos);
  }

  const char* const kBad[] = {"--prefetch oracle",       "--prefetch speculative:0",
                              "--gate adaptive:0",       "--gate 1.5",
                              "--gate adaptive:3",       "--miss skip",
                              "--miss hobbit:0.9,0.3",   "--low-precision int3",
                              "--eviction mru",          "--miss load --low-precision int4",
                              "--prefetch speculative:2"};
  for (const char* p : kBad) {
    const std::string flags = p;
    CAPTURE(flags);
    const DemoRun r = run(p);
    CAPTURE(r.output);
    CHECK(r.status == 2);
    CHECK(r.output.find("moex-demo:") != std::string::npos);
  }
}

}  // TEST_SUITE("simgrid")
