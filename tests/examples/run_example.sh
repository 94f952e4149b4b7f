#!/bin/sh
# Builds one language example against the installed moex and runs it on the C example's model and
# reference. Exit 77 = skipped (toolchain missing).
# usage: run_example.sh <lang> <prefix> <examples dir> <work dir> <model dir> <reference file>
set -eu
lang=$1 prefix=$2 examples=$3 work=$4 model=$5 ref=$6
lib=$(find "$prefix" -name libmoex.so | head -n 1)
[ -n "$lib" ] || { echo "no libmoex.so under $prefix"; exit 1; }
libdir=$(dirname "$lib")
mkdir -p "$work"
need() { command -v "$1" >/dev/null || { echo "SKIP: $1 not found ($2)"; exit 77; }; }
case $lang in
  python)
    need python3 "Debian: python3"
    PYTHONDONTWRITEBYTECODE=1 MOEX_PREFIX=$prefix exec python3 "$examples/python/example.py" "$model" "$ref" ;;
  rust)
    need cargo "rustup or Debian: cargo"
    MOEX_PREFIX=$prefix cargo build --quiet --offline --release --manifest-path "$examples/rust/Cargo.toml" \
      --target-dir "$work/rust-target"
    exec "$work/rust-target/release/moex_example_rust" "$model" "$ref" ;;
  go)
    need go "Debian: golang-go"
    cd "$examples/go"
    CGO_ENABLED=1 CGO_CFLAGS="-I$prefix/include" CGO_LDFLAGS="-L$libdir -Wl,-rpath,$libdir" \
      GOCACHE="$work/go-cache" GOPATH="$work/go-path" GOFLAGS=-mod=mod GOTOOLCHAIN=local \
      go build -o "$work/moex_example_go" .
    exec "$work/moex_example_go" "$model" "$ref" ;;
  csharp)
    need mcs "Debian: mono-devel"
    need mono "Debian: mono-runtime"
    mcs -nologo -out:"$work/moex_example_csharp.exe" "$examples/csharp/Moex.cs" "$examples/csharp/Example.cs"
    LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec mono "$work/moex_example_csharp.exe" "$model" "$ref" ;;
  *) echo "unknown language $lang"; exit 2 ;;
esac
