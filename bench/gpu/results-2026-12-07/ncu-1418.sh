#!/usr/bin/env bash
set -u
cd "$(dirname "$0")"
O=${OUT:-/tmp/out}; mkdir -p "$O"
for f in moex_bench_gpu.xz; do [ -x moex_bench_gpu ] || xz -d -f -T0 "$f"; done
chmod +x moex_bench_gpu
export LD_LIBRARY_PATH=$PWD:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
S=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis --section InstructionStats)
prof() {
  echo "== ncu $1" | tee -a "$O/ncu.txt"
  timeout 50 ncu --clock-control none "${S[@]}" -k "regex:$2" -s 2 -c 2 ./moex_bench_gpu --benchmark_filter="$3" >> "$O/ncu.txt" 2>&1; echo "ncu $1 rc=$?"
}
prof q4k_q8 'block_gemv' 'gemv/batch1/2/1/1/0/'
prof fp8 'block_gemv' 'gemv/batch1/3/1/0/0/'
prof q4k_exact 'block_gemv' 'gemv/batch1/2/1/0/0/'
prof int2_g32 'q8_swiglu|q8_down' 'grouped_experts8/7/0/'
prof int4_g128a 'q8_swiglu|q8_down' 'grouped_experts8/6/0/'
