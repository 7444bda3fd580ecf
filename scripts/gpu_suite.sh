#!/usr/bin/env bash
# The GPU suite on the device machine: `bash scripts/gpu_suite.sh [pytest args...]`; logs under $OUT.
set -u
source scripts/device_setup.sh || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
