#!/bin/sh
# Builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined) straight from the
# sources of the formats code, then runs each for a bounded time on a copy of its seed corpus.
# usage: run_fuzzers.sh CLANGXX SOURCE_DIR BUILD_DIR [SECONDS_PER_TARGET]
# Run longer by hand:  tests/fuzz/run_fuzzers.sh clang++-14 . /tmp/fz 3600
set -eu
CXX="$1"; SRC="$2"; OUT="$3"; SECS="${4:-20}"
mkdir -p "$OUT/obj"
FLAGS="-std=c++20 -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined -I$SRC/include -I$SRC/tests/fuzz"
OBJS=""
for f in "$SRC"/src/formats/*.cpp "$SRC"/src/io/*.cpp "$SRC"/tests/fuzz/fuzz_targets.cpp; do
  o="$OUT/obj/$(basename "$f" .cpp).o"
  if [ ! -f "$o" ] || [ "$f" -nt "$o" ] || [ -n "$(find "$SRC/include/moex" -newer "$o" -name '*.hpp' | head -1)" ]; then
    "$CXX" $FLAGS -c "$f" -o "$o"
  fi
  OBJS="$OBJS $o"
done
status=0
for t in safetensors gguf config; do
  "$CXX" $FLAGS -fsanitize=fuzzer,address,undefined -DMOEX_FUZZ_ENTRY=$t "$SRC/tests/fuzz/fuzz_main.cpp" $OBJS \
    -o "$OUT/moex_fuzz_$t" -pthread
  rm -rf "$OUT/corpus_$t" && mkdir -p "$OUT/corpus_$t" && cp "$SRC/tests/fuzz/corpus/$t/"* "$OUT/corpus_$t/"
  echo "== fuzzing $t for ${SECS}s"
  if ! "$OUT/moex_fuzz_$t" -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 -timeout=10 \
       -artifact_prefix="$OUT/crash_${t}_" "$OUT/corpus_$t" 2>"$OUT/fuzz_$t.log"; then
    echo "fuzzer $t FAILED; see $OUT/fuzz_$t.log"; tail -40 "$OUT/fuzz_$t.log"; status=1
  else
    grep -E "^(#[0-9]+.*DONE|Done)" "$OUT/fuzz_$t.log" | tail -1 || true
  fi
done
exit $status
