#!/usr/bin/env bash
# One device call for a session's GPU record (carry .whl/): the full `pytest -m cuda`, then the
# block and GEMM benchmarks; every step bounded so that the later ones still run. Logs under $OUT.
#   bash scripts/session_gpu.sh [suite_seconds=380] [bench_seconds=150]
set -u
SUITE_S=${1:-380}
BENCH_S=${2:-150}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout "$SUITE_S" bash scripts/gpu_suite.sh -n 10 --timeout 330 tests > "$OUT/suite_tail.txt" 2>&1
tail -8 "$OUT/suite_tail.txt"
source scripts/device_setup.sh > /dev/null || exit 1
timeout 120 python3 -m inductor_w4a8 bench --block --m 1 64 8192 --out "$OUT/block" 2>&1 | tail -6
timeout "$BENCH_S" python3 -m inductor_w4a8 bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt" | tail -20
