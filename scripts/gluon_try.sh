#!/usr/bin/env bash
# One device call: the Gluon kernel's GPU tests, then its tiles timed beside the table's.
#   bash scripts/gluon_try.sh [M ...]    (OUT: logs)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/device_setup.sh > /dev/null || exit 1
timeout 200 python3 -m pytest tests/test_grouped_gemm.py -m cuda -k wgmma -x -q -p no:cacheprovider > "$OUT/wgmma_tests.txt" 2>&1
tail -15 "$OUT/wgmma_tests.txt"
timeout 240 python3 examples/tune_grouped_gemm.py --skip-check --no-fbgemm --m ${@:-64 1024 8192} --rep 30 \
  --variants ${VARIANTS:-64,64,4,6,2,1,wgmma 128,64,4,4,2,1,wgmma 128,64,4,5,2,1,wgmma 64,128,8,4,1,1,wgmma 128,128,8,4,1,1,wgmma} \
  > "$OUT/wgmma_tune.txt" 2>&1
tail -30 "$OUT/wgmma_tune.txt"
