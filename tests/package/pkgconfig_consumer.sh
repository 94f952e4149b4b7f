#!/bin/sh
# Builds and runs the C consumer with pkg-config against an installed moex. moex.pc is relocatable
# (prefix=${pcfiledir}/../..), so no --define-variable: the paths must come out of the install tree.
# usage: pkgconfig_consumer.sh <prefix> <consumer.c> <work dir>
set -eu
prefix=$1 src=$2 work=$3
command -v pkg-config >/dev/null || { echo "SKIP: pkg-config not found (Debian: pkgconf)"; exit 77; }
pc=$(find "$prefix" -name moex.pc | head -n 1)
[ -n "$pc" ] || { echo "no moex.pc under $prefix"; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")
libdir=$(pkg-config --variable=libdir moex)
[ -f "$libdir/libmoex.so" ] || { echo "moex.pc's libdir $libdir has no libmoex.so (not relocatable?)"; exit 1; }
rm -rf "$work" && mkdir -p "$work"
${CC:-cc} -std=c11 -Wall -Wextra -Werror $(pkg-config --cflags moex) "$src" -o "$work/consumer_pkgconfig" \
  $(pkg-config --libs moex) -Wl,-rpath,"$libdir"
"$work/consumer_pkgconfig" "$work/model"
