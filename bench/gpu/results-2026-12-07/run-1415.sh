#!/usr/bin/env bash
# One device call: tests, benchmarks (branch + baseline binary, same run), sanitizers, ncu.
set -u
cd "$(dirname "$0")"
T0=$(date +%s); BUDGET=${BUDGET:-555}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
O=${OUT:-/tmp/out}; mkdir -p "$O"
for f in *.xz; do xz -d -f -T0 "$f"; done
chmod +x moex_test_gpu moex_bench_gpu base_bench_gpu
export LD_LIBRARY_PATH=$PWD:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } > "$O/device.txt" 2>&1
cat "$O/device.txt"
echo "== tests ($(left) s left)"
timeout 150 ./moex_test_gpu --duration=true > "$O/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$O/tests.log"
BF='^(gemv/batch1/|grouped_block8|grouped_experts8/[4-9]/0|grouped_q8_variant|gemv_block_nopdl)'
echo "== bench ($(left) s left)"
timeout 130 ./moex_bench_gpu --benchmark_filter="$BF" --benchmark_counters_tabular=true > "$O/bench.txt" 2>&1; echo "bench rc=$?"
echo "== base bench ($(left) s left)"
timeout 70 ./base_bench_gpu --benchmark_filter='^(gemv/batch1/|grouped_block8)' --benchmark_counters_tabular=true > "$O/base-bench.txt" 2>&1; echo "base rc=$?"
TC='*block*,*Q4_K*'
echo "== racecheck ($(left) s left)"
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 ./moex_test_gpu -tc="$TC" > "$O/sanitizers.log" 2>&1; echo "racecheck rc=$?"
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|test cases" "$O/sanitizers.log" | tail -3
SEC=SpeedOfLight,Occupancy,WarpStateStats,SchedulerStats,LaunchStats,MemoryWorkloadAnalysis,InstructionStats
prof() {  # name kernel-regex bench-filter
  [ "$(left)" -lt 90 ] && { echo "skip ncu $1"; return; }
  echo "== ncu $1 ($(left) s left)" | tee -a "$O/ncu.txt"
  timeout 45 ncu --clock-control none --section "${SEC//,/ --section }" -k "regex:$2" -s 2 -c 2 \
    ./moex_bench_gpu --benchmark_filter="$3" >> "$O/ncu.txt" 2>&1; echo "ncu $1 rc=$?"
}
prof q4k_q8 'block_gemv' 'gemv/batch1/2/1/1/0/'
prof fp8 'block_gemv' 'gemv/batch1/3/1/0/0/'
prof q4k_exact 'block_gemv' 'gemv/batch1/2/1/0/0/'
prof int2_g32 'q8_swiglu|q8_down' 'grouped_experts8/7/0/'
prof int4_g128a 'q8_swiglu|q8_down' 'grouped_experts8/6/0/'
L=$(left); echo "== memcheck ($L s left)"
if [ "$L" -gt 40 ]; then
  timeout $((L - 10)) compute-sanitizer --tool memcheck --error-exitcode 9 ./moex_test_gpu >> "$O/sanitizers.log" 2>&1; echo "memcheck rc=$?"
  grep -E "ERROR SUMMARY|test cases" "$O/sanitizers.log" | tail -3
fi
grep -E "d2d|h2d" "$O/bench.txt" | head -3
echo "done at $(left) s left"
