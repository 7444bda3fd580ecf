#!/usr/bin/env bash
# A session's GPU record in two device calls (carry .whl/), each bounded below the 600 s per-call
# limit; logs under $OUT:
#   bash scripts/session_gpu.sh suite [seconds=560]   the full `pytest -m cuda` (-n 10); it ran
#                                                     past 330 s in session 6, so it gets a call
#                                                     of its own
#   bash scripts/session_gpu.sh bench [seconds=150]   the GEMM benchmark, then the block at 1,
#                                                     64 and 8192 tokens
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
  suite)
    timeout "${2:-560}" bash scripts/gpu_suite.sh -n 10 --timeout 500 tests > "$OUT/suite_tail.txt" 2>&1
    grep -E "passed|failed|error" "$OUT/pytest_cuda.log" | tail -8 ;;
  bench)
    source scripts/device_setup.sh > /dev/null || exit 1
    timeout "${2:-150}" python3 -m inductor_w4a8 bench --out "$OUT/bench" > "$OUT/bench.txt" 2>&1
    grep -A9 "^| M | R" "$OUT/bench.txt"; grep -A7 "^| GEMM" "$OUT/bench.txt"
    timeout 150 python3 -m inductor_w4a8 bench --block --m 1 64 8192 --out "$OUT/block" 2>&1 | tail -6 ;;
  *) echo "usage: bash scripts/session_gpu.sh suite|bench [seconds]" >&2; exit 2 ;;
esac
