#!/usr/bin/env bash
# Second call: the branch-free fp8 scale division. Block tests + sanitizers, fp8/GGUF block benches
# against the baseline binary in the same run, ncu on the fp8 GEMV.
set -u
cd "$(dirname "$0")"
O=${OUT:-/tmp/out}; mkdir -p "$O"
for f in *.xz; do xz -d -f -T0 "$f"; done
chmod +x moex_test_gpu moex_bench_gpu base_bench_gpu
export LD_LIBRARY_PATH=$PWD:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; } > "$O/device.txt" 2>&1
cat "$O/device.txt"
echo "== tests"; timeout 120 ./moex_test_gpu --duration=true > "$O/tests.log" 2>&1; echo "tests rc=$?"; tail -3 "$O/tests.log"
F='^(gemv/batch1/[0-3]/1/[01]/0/|gemv_block_nopdl|grouped_block8)'
echo "== bench"; timeout 60 ./moex_bench_gpu --benchmark_filter="$F" --benchmark_counters_tabular=true > "$O/bench.txt" 2>&1; echo "bench rc=$?"
echo "== base"; timeout 60 ./base_bench_gpu --benchmark_filter='^(gemv/batch1/[0-3]/1/[01]/$|gemv/batch1/[0-3]/1/[01]/iter|grouped_block8)' --benchmark_counters_tabular=true > "$O/base-bench.txt" 2>&1; echo "base rc=$?"
echo "== bench again"; timeout 60 ./moex_bench_gpu --benchmark_filter="$F" --benchmark_counters_tabular=true >> "$O/bench.txt" 2>&1; echo "bench rc=$?"
S=(--section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats --section InstructionStats)
echo "== ncu fp8 new" | tee "$O/ncu.txt"
timeout 40 ncu --clock-control none "${S[@]}" -k regex:block_gemv -s 2 -c 1 ./moex_bench_gpu --benchmark_filter='gemv/batch1/3/1/0/0/' >> "$O/ncu.txt" 2>&1; echo "ncu rc=$?"
echo "== ncu fp8 base" | tee -a "$O/ncu.txt"
timeout 40 ncu --clock-control none "${S[@]}" -k regex:block_gemv -s 2 -c 1 ./base_bench_gpu --benchmark_filter='gemv/batch1/3/1/0/' >> "$O/ncu.txt" 2>&1; echo "ncu rc=$?"
TC='*block*,*Q4_K*'
echo "== racecheck"; timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 ./moex_test_gpu -tc="$TC" > "$O/sanitizers.log" 2>&1; echo "racecheck rc=$?"
echo "== memcheck"; timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 ./moex_test_gpu >> "$O/sanitizers.log" 2>&1; echo "memcheck rc=$?"
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|test cases" "$O/sanitizers.log"
grep -E "^gemv|^grouped" "$O/bench.txt" | grep -E "/3/1/0/0|grouped_block8/3" | sed 's/iterations:[0-9]*\/manual_time//'
grep -E "^gemv|^grouped" "$O/base-bench.txt" | grep -E "/3/1/0/|grouped_block8/3" | sed 's/iterations:[0-9]*\/manual_time//'
