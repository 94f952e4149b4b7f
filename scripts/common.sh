# Shared by scripts/demo and scripts/test: install what is missing, configure, build.
set -euo pipefail
MOEX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOEX_BUILD="${MOEX_BUILD:-$MOEX_ROOT/build}"
JOBS="${JOBS:-$(nproc)}"

# Debian packages moex needs; each line says why.
MOEX_PACKAGES=(
  cmake g++ make pkg-config    # the build
  libeigen3-dev                # f32 GEMM on the CPU
  nlohmann-json3-dev           # safetensors headers, config.json, stats/profile JSON
  doctest-dev                  # the test framework
  libbenchmark-dev             # microbenchmarks (bench/)
)
MOEX_TEST_PACKAGES=(
  clang-14 libclang-rt-14-dev  # libFuzzer targets and sanitizers
  abigail-tools                # abidiff: the C ABI against its committed baseline
  golang-go                    # the Go example (cgo)
  mono-devel                   # the C# example (P/Invoke)
  python3                      # the Python example (ctypes)
  gnuplot-nox                  # moex-sim plots
)

moex_install_missing() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "moex: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
      exit 1
    fi
    echo "moex: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

moex_configure_build() {
  cmake -S "$MOEX_ROOT" -B "$MOEX_BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$MOEX_BUILD" -j "$JOBS"
}
