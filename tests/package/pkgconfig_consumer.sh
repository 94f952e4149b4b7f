#!/bin/sh
# Builds and runs the C consumer with pkg-config against an installed moex.
# usage: pkgconfig_consumer.sh <prefix> <consumer.c> <work dir>
set -eu
prefix=$1 src=$2 work=$3
command -v pkg-config >/dev/null || { echo "SKIP: pkg-config not found (Debian: pkgconf)"; exit 77; }
pc=$(find "$prefix" -name moex.pc | head -n 1)
[ -n "$pc" ] || { echo "no moex.pc under $prefix"; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")
# moex.pc names the configure-time prefix; point it at this install tree.
flags="--define-variable=prefix=$prefix"
libdir=$(pkg-config $flags --variable=libdir moex)
rm -rf "$work" && mkdir -p "$work"
${CC:-cc} -std=c11 -Wall -Wextra -Werror $(pkg-config $flags --cflags moex) "$src" -o "$work/consumer_pkgconfig" \
  $(pkg-config $flags --libs moex) -Wl,-rpath,"$libdir"
"$work/consumer_pkgconfig" "$work/model"
