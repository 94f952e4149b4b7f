#!/usr/bin/env bash
# Renders the PNG plots of a moex_e2e_bench output folder with gnuplot (installed on the dev
# machine; the GPU machine may lack it): bench/e2e/plot.sh OUTDIR -> OUTDIR/e2e-<shape>.png
# (copies the folder first when it is read-only).
set -euo pipefail
DIR=${1:?usage: bench/e2e/plot.sh OUTDIR}
command -v gnuplot >/dev/null || { echo "gnuplot not found (apt-get install gnuplot-nox)"; exit 1; }
if [ ! -w "$DIR" ]; then
  COPY=$(mktemp -d)
  cp "$DIR"/e2e-*.gp "$DIR"/e2e-*.dat "$COPY"/
  DIR=$COPY
fi
cd "$DIR"
for gp in e2e-*.gp; do
  [ -f "$gp" ] || continue
  gnuplot "$gp" && echo "$DIR/${gp%.gp}.png"
done
